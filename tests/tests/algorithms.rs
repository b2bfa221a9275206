//! Fixed window, sliding window and GCRA, checked decision by decision
//! against a reference model written here, on a fake clock, for the memory
//! store, one real Redis and a real three-node Redis Cluster (the GCRA and
//! sliding-window scripts run on the clock the test passes them; Redis's
//! fixed window runs on key expiry, Redis's own clock, and is checked in
//! real time by `tests/redis.rs`): scripted arrival
//! patterns (a burst at a window boundary, steady rates just above and
//! below the limit, concurrent arrivals, a client that waits exactly as
//! long as it was told), and random ones (proptest).
//!
//! The model finds its answers by search, not by formula: the units left
//! are the most a request could have now, and the time told is the first
//! millisecond at which the request (a rejection) or the whole limit (an
//! admission) would be admitted.

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures_util::future::join_all;
use limiter_agent::{
    answers,
    identity::Identity,
    limit::{
        Algorithm, Ask, BucketKey, Clock as _, Decision, FakeClock, MemoryStore, RedisSettings,
        RedisStore, Spend, Store,
    },
};
use limiter_tests::{
    agent::{agent_in_front, free_addr},
    http::{self, metric},
    redis::{RedisCluster, RedisServer},
    rls,
};
use proptest::prelude::*;

const T0: u64 = 1_706_540_000_000;

/// What the model knows of one client's bucket.
#[derive(Clone, Debug)]
struct Model {
    algorithm: Algorithm,
    limit: u32,
    window_ms: u64,
    /// Fixed: (window end, count). Sliding: every admission, (ms, units).
    /// GCRA: the TAT in µs.
    fixed: Option<(u64, u32)>,
    sliding: Vec<(u64, u32)>,
    tat_us: u64,
}

/// The model's answer: admitted, units left, the time told (ms).
type Told = (bool, u32, u64);

impl Model {
    fn new(algorithm: Algorithm, limit: u32, window_ms: u64) -> Self {
        Self {
            algorithm,
            limit,
            window_ms,
            fixed: None,
            sliding: Vec::new(),
            tat_us: 0,
        }
    }

    /// The model as it would stand at `now` with nothing more counted.
    fn at(&self, now: u64) -> Self {
        let mut m = self.clone();
        m.fixed = self.fixed.filter(|&(end, _)| now < end);
        m
    }

    /// A sliding window's slice: the window in 20 parts, on a grid from 0.
    fn slice(&self, ms: u64) -> u64 {
        ms / self.window_ms.div_ceil(20)
    }

    /// Whether `hits` units fit at `now` (state as of `at(now)`).
    fn fits(&self, now: u64, hits: u32) -> bool {
        let (limit, w) = (u128::from(self.limit), u128::from(self.window_ms));
        let hits_wide = u128::from(hits);
        match self.algorithm {
            Algorithm::Fixed => {
                let count = self.fixed.map_or(0, |(_, c)| c);
                u128::from(count) + hits_wide <= limit
            }
            Algorithm::Sliding => {
                // Everything admitted in this slice and the 20 before it.
                let since = self.slice(now).saturating_sub(20);
                let held: u128 = self
                    .sliding
                    .iter()
                    .filter(|&&(at, _)| self.slice(at) >= since)
                    .map(|&(_, units)| u128::from(units))
                    .sum();
                held + hits_wide <= limit
            }
            Algorithm::Gcra { burst } => {
                let interval = (w * 1000).div_ceil(limit);
                let tolerance = interval * u128::from(burst);
                let now_us = u128::from(now) * 1000;
                let tat = u128::from(self.tat_us).max(now_us);
                tat + hits_wide * interval - now_us <= tolerance
            }
        }
    }

    fn count(&mut self, now: u64, hits: u32) {
        let w = self.window_ms;
        match self.algorithm {
            Algorithm::Fixed => {
                let (end, c) = self.fixed.unwrap_or((now + w, 0));
                self.fixed = Some((end, c + hits));
            }
            Algorithm::Sliding => self.sliding.push((now, hits)),
            Algorithm::Gcra { .. } => {
                let interval = (w * 1000).div_ceil(u64::from(self.limit));
                self.tat_us = self.tat_us.max(now * 1000) + u64::from(hits) * interval;
            }
        }
    }

    /// The most units a bucket ever holds: the burst for GCRA.
    fn ceiling(&self) -> u32 {
        match self.algorithm {
            Algorithm::Gcra { burst } => burst,
            _ => self.limit,
        }
    }

    /// Units a request could have at `now`.
    fn left(&self, now: u64) -> u32 {
        let m = self.at(now);
        (0..=self.ceiling())
            .rev()
            .find(|&h| m.fits(now, h))
            .unwrap_or(0)
    }

    /// One request of `hits` units at `now`.
    fn decide(&mut self, now: u64, hits: u32) -> Told {
        let mut m = self.at(now);
        let allowed = m.fits(now, hits);
        if allowed {
            m.count(now, hits);
        }
        *self = m;
        let left = self.left(now);
        let ceiling = self.ceiling();
        let full = |t: u64| self.left(t) == ceiling;
        // Nothing takes longer to come back than a burst at the rate.
        let horizon = now..now + self.window_ms * u64::from(ceiling + 2);
        let told = if allowed || hits > ceiling {
            horizon
                .into_iter()
                .find(|&t| full(t))
                .expect("the limit comes back")
        } else {
            horizon
                .into_iter()
                .find(|&t| self.at(t).fits(t, hits))
                .expect("the units fit some day")
        };
        (allowed, left, told)
    }
}

/// The stores under test: each decides on its own fake clock.
struct Stores {
    memory: (MemoryStore, Arc<FakeClock>),
    redis: (RedisStore, Arc<FakeClock>),
    cluster: Option<(RedisStore, Arc<FakeClock>)>,
    servers: (RedisServer, Option<RedisCluster>),
}

fn settings(url: Option<String>, cluster_nodes: Vec<String>) -> RedisSettings {
    RedisSettings {
        url,
        cluster_nodes,
        key_prefix: "limiter:".into(),
        timeout: Duration::from_secs(2),
        breaker_failures: 3,
        breaker_cooldown: Duration::from_millis(200),
        lease: Duration::from_secs(30),
    }
}

async fn stores(with_cluster: bool) -> Stores {
    let server = RedisServer::start();
    let clock = Arc::new(FakeClock::new(T0));
    let redis = RedisStore::new(
        &settings(Some(server.url()), Vec::new()),
        clock.clone(),
        1_000,
    )
    .expect("the redis store")
    .on_caller_clock();
    redis.probe().await.expect("redis answers");
    let (cluster, cluster_servers) = if with_cluster {
        let c = RedisCluster::start();
        let cluster_clock = Arc::new(FakeClock::new(T0));
        let store = RedisStore::new(&settings(None, c.urls()), cluster_clock.clone(), 1_000)
            .expect("the cluster store")
            .on_caller_clock();
        store.probe().await.expect("the cluster answers");
        (Some((store, cluster_clock)), Some(c))
    } else {
        (None, None)
    };
    Stores {
        memory: (MemoryStore::new(100_000), Arc::new(FakeClock::new(T0))),
        redis: (redis, clock),
        cluster,
        servers: (server, cluster_servers),
    }
}

impl Stores {
    /// The stores that run `algorithm` on the fake clock. Redis runs a
    /// fixed window on key expiry, its own clock, which no test can move:
    /// its fixed windows are checked in real time by `tests/redis.rs`.
    fn each(&self, algorithm: Algorithm) -> Vec<(&'static str, &dyn Store, &FakeClock)> {
        let mut all: Vec<(&'static str, &dyn Store, &FakeClock)> =
            vec![("memory", &self.memory.0, &self.memory.1)];
        if algorithm == Algorithm::Fixed {
            return all;
        }
        all.push(("redis", &self.redis.0, &self.redis.1));
        if let Some((store, clock)) = &self.cluster {
            all.push(("cluster", store, clock));
        }
        all
    }
}

/// A client's identity and bucket: distinct per case so buckets never mix.
fn client(case: u64) -> (Identity, BucketKey) {
    (
        Identity::Key(format!("{case:064x}")),
        BucketKey(case.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1 << 40),
    )
}

fn tier_name(algorithm: Algorithm, limit: u32, window_ms: u64) -> String {
    format!("/api/conformance|{window_ms}|{limit}|{algorithm:?}")
}

/// The headers a decision tells at `clock`'s now: Remaining, Reset, Retry-After.
fn headers(decision: &Decision, window_ms: u64, clock: &FakeClock) -> (String, String, u64) {
    let mut map = reqwest::header::HeaderMap::new();
    answers::apply(&mut map, decision, window_ms, clock.now(), None);
    let text = |name: &str| map[name].to_str().expect("ASCII").to_owned();
    (
        text("x-ratelimit-remaining"),
        text("x-ratelimit-reset"),
        answers::retry_after_secs(decision, clock.now()),
    )
}

/// One arrival: ms after the pattern's start, and its units.
type Arrival = (u64, u32);

/// Runs `arrivals` (sorted by time; same-time arrivals go concurrently)
/// against every store and the model; returns how many each admitted.
async fn conform(
    stores: &Stores,
    case: u64,
    algorithm: Algorithm,
    limit: u32,
    window_ms: u64,
    arrivals: &[Arrival],
) -> u32 {
    let tier = tier_name(algorithm, limit, window_ms);
    let (identity, key) = client(case);
    let mut admitted_by_model = 0;
    for (name, store, clock) in stores.each(algorithm) {
        let mut model = Model::new(algorithm, limit, window_ms);
        // Each case starts on a window's edge, so on a slice's.
        let start = clock.now_ms().next_multiple_of(window_ms);
        let mut admitted = 0;
        let mut i = 0;
        while i < arrivals.len() {
            let at = arrivals[i].0;
            let same: Vec<Arrival> = arrivals[i..]
                .iter()
                .take_while(|a| a.0 == at)
                .copied()
                .collect();
            i += same.len();
            clock.set(start + at);
            let now = clock.now_ms();
            let asks = same.iter().map(|&(_, hits)| Ask {
                key,
                tier: &tier,
                identity: &identity,
                limit,
                hits,
                window_ms,
                spend: Spend::Admit,
                algorithm,
            });
            let decisions: Vec<Decision> = join_all(asks.map(|ask| store.decide(ask, now)))
                .await
                .into_iter()
                .map(|d| d.expect("a decision"))
                .collect();
            if same.len() > 1 {
                // Concurrent: the count admitted is the model's, whatever
                // the order they ran in.
                let mut count = 0;
                for &(_, hits) in &same {
                    count += u32::from(model.decide(now, hits).0);
                }
                let got = decisions.iter().filter(|d| d.allowed).count();
                assert_eq!(
                    got,
                    count as usize,
                    "{name} {algorithm:?}: {} concurrent at {at} ms",
                    same.len()
                );
                admitted += count;
                continue;
            }
            let d = decisions[0];
            let (allowed, left, told) = model.decide(now, same[0].1);
            assert_eq!(
                (d.allowed, d.remaining, d.reset_ms - start),
                (allowed, left, told - start),
                "{name} {algorithm:?} limit {limit}/{window_ms} ms: arrival {} at {at} ms \
                 (allowed, remaining, told) against the model; arrivals {arrivals:?}",
                i - 1
            );
            let mut expected = d;
            (expected.allowed, expected.remaining, expected.reset_ms) = (allowed, left, told);
            assert_eq!(
                headers(&d, window_ms, clock),
                headers(&expected, window_ms, clock)
            );
            admitted += u32::from(allowed);
        }
        // The next case starts later than anything this one left behind.
        clock.set(start + arrivals.last().map_or(0, |a| a.0) + 3 * window_ms + 10_000);
        admitted_by_model = admitted;
    }
    admitted_by_model
}

const ALGORITHMS: [Algorithm; 3] = [
    Algorithm::Fixed,
    Algorithm::Sliding,
    Algorithm::Gcra { burst: 10 },
];

/// `n` arrivals of one unit each, `gap` ms apart from `from`.
fn steady(from: u64, gap: u64, n: u64) -> Vec<Arrival> {
    (0..n).map(|i| (from + i * gap, 1)).collect()
}

#[tokio::test]
async fn scripted_patterns_match_the_model_in_memory_redis_and_cluster() {
    let stores = stores(true).await;
    let (limit, window) = (10, 1_000);
    let mut case = 0;
    let mut next = || {
        case += 1;
        case
    };
    for algorithm in ALGORITHMS {
        // A burst at the boundary: one request opens the window, `limit`
        // come 50 ms before it ends, `limit` 50 ms after.
        let mut boundary = vec![(0, 1)];
        boundary.extend(std::iter::repeat_n((950, 1), limit as usize));
        boundary.extend(std::iter::repeat_n((1_050, 1), limit as usize));
        let got = conform(&stores, next(), algorithm, limit, window, &boundary).await;
        let expected = match algorithm {
            Algorithm::Fixed => 2 * limit,
            // 9 before the boundary and 1 after, once the first request
            // has left the window: never more than the limit in a window.
            Algorithm::Sliding => limit + 1,
            // The first, the burst of 10, then one per 100 ms for the
            // 100 ms between.
            Algorithm::Gcra { .. } => limit + 2,
        };
        assert_eq!(got, expected, "{algorithm:?}: boundary burst");

        // Steady just above the limit (one per 90 ms) and just below (one
        // per 110 ms), for five windows.
        conform(
            &stores,
            next(),
            algorithm,
            limit,
            window,
            &steady(0, 90, 56),
        )
        .await;
        let below = conform(
            &stores,
            next(),
            algorithm,
            limit,
            window,
            &steady(0, 110, 46),
        )
        .await;
        assert_eq!(
            below, 46,
            "{algorithm:?}: a client below the limit is never refused"
        );

        // Concurrent arrivals: 25 at once, twice.
        let mut together = std::iter::repeat_n((0, 1), 25).collect::<Vec<_>>();
        together.extend(std::iter::repeat_n((400, 1), 25));
        conform(&stores, next(), algorithm, limit, window, &together).await;

        // Requests of several units.
        let units = [
            (0, 3),
            (10, 4),
            (20, 4),
            (30, 2),
            (600, 5),
            (1_200, 10),
            (1_250, 1),
        ];
        conform(&stores, next(), algorithm, limit, window, &units).await;
    }
}

/// After a 429, a client that waits until the reset it was told (the ms
/// the store decided, and the whole second of the headers) is admitted,
/// and one a millisecond early is not.
#[tokio::test]
async fn a_client_that_waits_as_told_is_admitted() {
    let stores = stores(false).await;
    let (limit, window) = (10, 1_000);
    for (n, algorithm) in ALGORITHMS.into_iter().enumerate() {
        for (name, store, clock) in stores.each(algorithm) {
            let tier = tier_name(algorithm, limit, window);
            let (identity, key) = client(1_000 + n as u64);
            let ask = Ask {
                key,
                tier: &tier,
                identity: &identity,
                limit,
                hits: 1,
                window_ms: window,
                spend: Spend::Admit,
                algorithm,
            };
            let start = clock.now_ms();
            let mut refused = None;
            for i in 0..40 {
                clock.set(start + i * 7);
                let d = store.decide(ask, clock.now_ms()).await.unwrap();
                if !d.allowed {
                    refused = Some(d);
                    break;
                }
            }
            let refused = refused.expect("the limit is reached");
            let (_, reset, retry_after) = headers(&refused, window, clock);
            let told_ms = refused.reset_ms;
            clock.set(told_ms - 1);
            let early = store.decide(ask, clock.now_ms()).await.unwrap();
            assert!(
                !early.allowed,
                "{name} {algorithm:?}: a ms early is refused"
            );
            clock.set(told_ms);
            let on_time = store.decide(ask, clock.now_ms()).await.unwrap();
            assert!(on_time.allowed, "{name} {algorithm:?}: admitted when told");
            // The headers' whole seconds are never earlier than the ms.
            let reset: u64 = reset.parse().unwrap();
            assert!(
                reset * 1000 >= clock.unix_ms(),
                "{name} {algorithm:?}: Reset {reset}"
            );
            assert!(retry_after >= 1);
            clock.set(start + 10_000);
        }
    }
}

/// `(gap ms, units)`: a client's arrivals.
fn arrivals() -> impl Strategy<Value = Vec<(u64, u32)>> {
    proptest::collection::vec((1_u64..300, 1_u32..4), 1..60)
}

fn algorithm() -> impl Strategy<Value = Algorithm> {
    prop_oneof![
        Just(Algorithm::Fixed),
        Just(Algorithm::Sliding),
        (1_u32..12).prop_map(|burst| Algorithm::Gcra { burst }),
    ]
}

fn timeline(gaps: &[(u64, u32)]) -> Vec<Arrival> {
    let mut at = 0;
    gaps.iter()
        .map(|&(gap, hits)| {
            at += gap;
            (at, hits)
        })
        .collect()
}

/// Random arrivals: memory and Redis decide as the model does, decision
/// by decision (one runtime and one Redis for all cases).
#[test]
fn random_arrivals_match_the_model_in_memory_and_redis() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let stores = runtime.block_on(stores(false));
    let case = std::cell::Cell::new(10_000);
    let config = ProptestConfig {
        cases: 200,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest!(config, |(
        algorithm in algorithm(),
        limit in 1_u32..15,
        window in prop_oneof![Just(100_u64), Just(1_000), Just(7_000)],
        gaps in arrivals(),
    )| {
        case.set(case.get() + 1);
        // Units beyond a limit or a burst never fit; keep them possible.
        let arrivals: Vec<Arrival> = timeline(&gaps)
            .into_iter()
            .map(|(at, hits)| (at, hits.min(limit)))
            .collect();
        runtime.block_on(conform(&stores, case.get(), algorithm, limit, window, &arrivals));
    });
}

/// Through the agent binary, in memory and on Redis's own clock: GCRA and
/// sliding tiers tell the truth in their headers, a client that waits
/// until the Reset it was told is admitted, observe mode counts what it
/// would refuse, and Envoy's rate limit service decides by the same rule.
#[tokio::test]
async fn smooth_tiers_through_the_agent_headers_observe_and_rls() {
    let redis = RedisServer::start();
    for store in [
        String::new(),
        format!("[store]\nkind = \"redis\"\nurl = \"{}\"\n", redis.url()),
    ] {
        let rls_addr = free_addr();
        let config = format!(
            "[server]\nlisten = \"127.0.0.1:1\"\n\n[xdp]\nenabled = false\n{store}\n\
             [rls]\nlisten = \"{rls_addr}\"\n\n\
             [[tier]]\nroute = \"/api/gcra\"\nlimit = 4\nwindow = \"2s\"\nalgorithm = \"gcra\"\nburst = 2\n\n\
             [[tier]]\nroute = \"/api/sliding\"\nlimit = 3\nwindow = \"2s\"\nalgorithm = \"sliding\"\n\n\
             [[tier]]\nroute = \"/api/observe\"\nlimit = 1\nwindow = \"10s\"\nalgorithm = \"gcra\"\nmode = \"observe\"\n"
        );
        let (_upstream, agent) = agent_in_front(&config);
        let client = http::client();
        let get = |path: &'static str| {
            let client = client.clone();
            let url = agent.url(path);
            async move { client.get(url).send().await.expect("the agent answers") }
        };
        let header = |r: &reqwest::Response, name: &str| -> u64 {
            r.headers()[name].to_str().unwrap().parse().unwrap()
        };
        let kind = if store.is_empty() { "memory" } else { "redis" };

        for (path, admitted) in [("/api/gcra", 2), ("/api/sliding", 3)] {
            for left in (0..admitted).rev() {
                let r = get(path).await;
                assert_eq!(r.status(), 200, "{kind} {path}");
                assert_eq!(header(&r, "x-ratelimit-remaining"), left, "{kind} {path}");
            }
            let refused = get(path).await;
            assert_eq!(refused.status(), 429, "{kind} {path}");
            let reset = header(&refused, "x-ratelimit-reset");
            let retry_after = header(&refused, "retry-after");
            assert_eq!(header(&refused, "x-ratelimit-remaining"), 0);
            let body = refused.text().await.unwrap();
            assert_eq!(
                body,
                answers::too_many_requests_body(retry_after),
                "{kind} {path}"
            );
            // Waits until the second it was told, and is admitted.
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
            let wait = Duration::from_secs(reset).saturating_sub(now);
            assert!(
                wait <= Duration::from_secs(retry_after) && wait <= Duration::from_millis(3_200),
                "{kind} {path}: told {reset}, Retry-After {retry_after}, at {now:?}"
            );
            tokio::time::sleep(wait).await;
            assert_eq!(
                get(path).await.status(),
                200,
                "{kind} {path}: waited as told"
            );
        }

        assert_eq!(get("/api/observe").await.status(), 200);
        let over = get("/api/observe").await;
        assert_eq!(over.status(), 200, "{kind}: observe mode serves");
        assert_eq!(header(&over, "x-ratelimit-remaining"), 0);
        let would: u64 = metric(
            &agent,
            "limiter_requests_total{tier=\"/api/observe\",decision=\"would_reject\"}",
        );
        assert_eq!(would, 1, "{kind}");

        let calls: Vec<_> = (0..3)
            .map(|_| rls::path_call("/api/gcra", "10.9.0.1"))
            .collect();
        let answers = tokio::task::spawn_blocking(move || rls::run(rls_addr, &calls, 1, None))
            .await
            .unwrap();
        let codes: Vec<String> = answers.iter().map(rls::code).collect();
        assert_eq!(
            codes,
            ["OK", "OK", "OVER_LIMIT"],
            "{kind}: the burst through RLS"
        );
    }
}

/// Envoy's `hits_addend` may be anything: a charge of `u32::MAX` reported
/// on a smooth tier fills it (memory and Redis alike), tells a time within
/// the window, and leaves the bucket limiting and its key expiring.
#[tokio::test]
async fn a_huge_reported_charge_fills_the_bucket_and_keeps_every_time_in_range() {
    let stores = stores(false).await;
    let (limit, window) = (10, 60_000);
    for (n, algorithm) in [Algorithm::Sliding, Algorithm::Gcra { burst: 10 }]
        .into_iter()
        .enumerate()
    {
        let mut told = Vec::new();
        for (name, store, clock) in stores.each(algorithm) {
            let tier = tier_name(algorithm, limit, window);
            let (identity, key) = client(2_000 + n as u64);
            let ask = |hits, spend| Ask {
                key,
                tier: &tier,
                identity: &identity,
                limit,
                hits,
                window_ms: window,
                spend,
                algorithm,
            };
            clock.set(clock.now_ms().next_multiple_of(window));
            let now = clock.now_ms();
            let first = store.decide(ask(3, Spend::Admit), now).await.unwrap();
            assert!(first.allowed);
            let huge = store
                .decide(ask(u32::MAX, Spend::Reported), now)
                .await
                .unwrap();
            assert!(!huge.allowed, "{name} {algorithm:?}");
            assert_eq!(huge.remaining, 0, "{name} {algorithm:?}: filled");
            assert!(huge.reset_ms <= now + 2 * window, "{name} {algorithm:?}");
            let one = store.decide(ask(1, Spend::Admit), now).await.unwrap();
            assert!(!one.allowed, "{name} {algorithm:?}: still limiting");
            assert!((now..=now + 2 * window).contains(&one.reset_ms));
            told.push((huge.remaining, huge.reset_ms - now, one.reset_ms - now));
            clock.set(now + 10 * window);
        }
        assert!(
            told.windows(2).all(|pair| pair[0] == pair[1]),
            "{algorithm:?}: memory and Redis agree: {told:?}"
        );
        let ttl: i64 = stores
            .servers
            .0
            .cli(&[
                "PTTL",
                &format!(
                    "limiter:{{{}|k:{:064x}}}",
                    tier_name(algorithm, limit, window),
                    2_000 + n as u64
                ),
            ])
            .trim()
            .parse()
            .unwrap();
        assert!(
            (1..=2 * i64::try_from(window).unwrap()).contains(&ttl),
            "{algorithm:?}: the Redis key expires: PTTL {ttl}"
        );
    }
}

/// A reload that cuts a GCRA burst keeps the buckets: a TAT beyond the new
/// burst is held to it (and kept held), so a client that waits the time
/// it was told is admitted, in memory and on Redis alike.
#[tokio::test]
async fn a_cut_burst_holds_the_tat_and_waiting_as_told_is_admitted() {
    let stores = stores(false).await;
    let (limit, window) = (10, 10_000);
    let mut seen = Vec::new();
    for (name, store, clock) in stores.each(Algorithm::Gcra { burst: 10 }) {
        let tier = "/api/reload|10000|gcra";
        let (identity, key) = client(3_000);
        let ask = |burst, hits| Ask {
            key,
            tier,
            identity: &identity,
            limit,
            hits,
            window_ms: window,
            spend: Spend::Admit,
            algorithm: Algorithm::Gcra { burst },
        };
        clock.set(clock.now_ms().next_multiple_of(window));
        let start = clock.now_ms();
        assert!(store.decide(ask(100, 100), start).await.unwrap().allowed);
        let refused = store.decide(ask(10, 1), start).await.unwrap();
        assert!(!refused.allowed, "{name}");
        assert_eq!(refused.reset_ms - start, 1_000, "{name}: one interval");
        clock.set(refused.reset_ms);
        let waited = store.decide(ask(10, 1), refused.reset_ms).await.unwrap();
        assert!(waited.allowed, "{name}: waited as told");
        seen.push((refused.remaining, waited.remaining, waited.reset_ms - start));
        clock.set(start + 100 * window);
    }
    assert_eq!(seen[0], seen[1], "memory and Redis agree");
}
