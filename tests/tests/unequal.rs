//! Requests are not equal, end to end against real peers: a stand-in LLM
//! provider process that streams like OpenAI's and counts its own requests
//! in flight and the tokens it reported, the official OpenAI Python SDK,
//! agents on the in-memory store and two agents sharing a real Redis. The
//! in-flight cap is never exceeded where the upstream can see it, a killed
//! agent's slots come back within the lease, a token budget is never
//! overspent however many requests race for it, the usage a client did not
//! ask for is taken out of its stream byte for byte, and costs are charged
//! as the tier and the upstream say.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::future::join_all;
use limiter_agent::{
    identity::Identity,
    limit::{
        Algorithm, Ask, BucketKey, Clock as _, LeaseAsk, MemoryStore, RedisSettings, RedisStore,
        Settle, Spend, Store, SystemClock,
    },
};
use limiter_tests::{
    agent::{Process, agent},
    http::metric,
    provider::{self, Stats},
    redis::RedisServer,
};
use reqwest::Client;

const CHAT: &str = "/api/v1/chat/completions";

/// One chat tier of `limit` requests a minute with `tier_extra` lines (and
/// tables after them), keys as identities, the store `store` (`""`: memory).
fn config(limit: u32, tier_extra: &str, store: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:1\"\nmax_connections_per_source = 1000\n\
         max_requests_in_flight_per_source = 1000\nupstream_timeout = \"60s\"\n\n\
         [identity]\nverify_keys = \"none\"\n\n{store}\n[xdp]\nenabled = false\n\n\
         [[tier]]\nroute = \"{CHAT}\"\nlimit = {limit}\nwindow = \"1m\"\n{tier_extra}\n"
    )
}

fn redis_store(redis: &RedisServer, lease: &str) -> String {
    format!(
        "[store]\nkind = \"redis\"\nurl = \"{}\"\non_error = \"deny\"\ntimeout = \"2s\"\nlease = \"{lease}\"\n",
        redis.url()
    )
}

/// What one chat request got.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().expect("ASCII"))
    }

    fn number(&self, name: &str) -> Option<u64> {
        self.header(name).map(|v| v.parse().expect("a number"))
    }

    fn code(&self) -> String {
        serde_json::from_str::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
            .unwrap_or_default()
    }
}

/// A chat request for `key` to `agent` with `body`, and extra headers.
async fn chat(
    client: &Client,
    agent: &Process,
    key: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> Answer {
    let mut request = client
        .post(format!("http://{}{CHAT}", agent.addr))
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(body.to_owned());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("request to the agent at {}: {e}", agent.addr));
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.text().await.unwrap_or_default();
    Answer {
        status,
        headers,
        body,
    }
}

fn client() -> Client {
    Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_mins(1))
        .build()
        .expect("client")
}

/// `n` requests at once for `key`, holding the upstream `hold_ms` each,
/// spread over `agents`: how many were admitted, and every refusal's code.
async fn wave(agents: &[&Process], key: &str, n: usize, hold_ms: u64) -> (usize, Vec<String>) {
    let client = client();
    let hold = hold_ms.to_string();
    let headers = [("x-test-hold-ms", hold.as_str())];
    let body = r#"{"model":"m","max_tokens":4,"messages":[{"role":"user","content":"hi"}]}"#;
    let answers =
        join_all((0..n).map(|i| chat(&client, agents[i % agents.len()], key, body, &headers)))
            .await;
    let admitted = answers.iter().filter(|a| a.status == 200).count();
    let refused = answers
        .iter()
        .filter(|a| a.status != 200)
        .map(|a| {
            assert_eq!(a.status, 429, "{a:?}");
            assert_eq!(a.header("retry-after"), Some("1"), "{a:?}");
            a.code()
        })
        .collect();
    (admitted, refused)
}

/// Waits (up to 10 s) until the provider has `open` requests in flight.
async fn provider_holds(provider: &Process, open: u64) -> Stats {
    for _ in 0..100 {
        let stats = provider::stats(provider);
        if stats.open == open {
            return stats;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "the provider never held {open}: {:?}",
        provider::stats(provider)
    );
}

#[tokio::test]
async fn a_client_never_has_more_than_max_in_flight_at_the_upstream() {
    let provider = provider::start(20);
    let agent = agent(
        &config(1000, "max_in_flight = 3", ""),
        Some(provider.addr),
        &[],
    );
    for round in 0..2 {
        provider::reset(&provider);
        let (admitted, refused) = wave(&[&agent], "client-a", 24, 400).await;
        let stats = provider::stats(&provider);
        eprintln!(
            "round {round}: admitted {admitted}, refused {}, {stats:?}",
            refused.len()
        );
        assert_eq!(
            stats.peak, 3,
            "the upstream saw at most the cap, and the cap was reached"
        );
        assert!(admitted >= 3, "{admitted}");
        assert!(
            refused.iter().all(|c| c == "CONCURRENCY_LIMIT_EXCEEDED"),
            "{refused:?}"
        );
        assert_eq!(admitted + refused.len(), 24);
    }
    // Another client is not held back by the first one's slots.
    let client = client();
    let body = r#"{"model":"m","max_tokens":4,"messages":[]}"#;
    let holders = (0..3).map(|_| {
        let client = client.clone();
        let addr = agent.addr;
        tokio::spawn(async move {
            client
                .post(format!("http://{addr}{CHAT}"))
                .header("authorization", "Bearer client-a")
                .header("content-type", "application/json")
                .header("x-test-hold-ms", "1500")
                .body(body)
                .send()
                .await
                .map(|r| r.status().as_u16())
        })
    });
    let holders: Vec<_> = holders.collect();
    provider_holds(&provider, 3).await;
    assert_eq!(
        metric::<u64>(
            &agent,
            &format!("limiter_tier_in_flight{{tier=\"{CHAT}\"}}")
        ),
        3
    );
    let board: serde_json::Value = serde_json::from_str(
        &limiter_tests::http::get(agent.admin.expect("admin"), "/dashboard.json").body,
    )
    .expect("the dashboard's JSON");
    assert_eq!(
        board["tiers"][0]["in_flight"],
        serde_json::json!({ "max": 3, "now": 3 }),
        "the dashboard shows the slots held"
    );
    let over = chat(&client, &agent, "client-a", body, &[]).await;
    assert_eq!(
        (over.status, over.code().as_str()),
        (429, "CONCURRENCY_LIMIT_EXCEEDED")
    );
    assert!(over.header("x-ratelimit-limit").is_some(), "{over:?}");
    let other = chat(&client, &agent, "client-b", body, &[]).await;
    assert_eq!(other.status, 200, "{other:?}");
    for holder in holders {
        assert_eq!(holder.await.unwrap().unwrap(), 200);
    }
    // Each slot comes back once its answer is sent.
    let gauge = format!("limiter_tier_in_flight{{tier=\"{CHAT}\"}}");
    for _ in 0..50 {
        if metric::<u64>(&agent, &gauge) == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("slots still held: {}", metric::<u64>(&agent, &gauge));
}

#[tokio::test]
async fn two_agents_on_redis_share_the_cap_and_a_killed_agents_slots_lapse_with_their_lease() {
    let redis = RedisServer::start();
    let provider = provider::start(20);
    let text = config(1000, "max_in_flight = 3", &redis_store(&redis, "3s"));
    let a = agent(&text, Some(provider.addr), &[]);
    let b = agent(&text, Some(provider.addr), &[]);
    for round in 0..2 {
        provider::reset(&provider);
        let (admitted, refused) = wave(&[&a, &b], "client-a", 24, 400).await;
        let stats = provider::stats(&provider);
        eprintln!(
            "round {round}: admitted {admitted}, refused {}, {stats:?}",
            refused.len()
        );
        assert_eq!(stats.peak, 3, "both agents together held at most the cap");
        assert!(
            refused.iter().all(|c| c == "CONCURRENCY_LIMIT_EXCEEDED"),
            "{refused:?}"
        );
    }
    // Agent a holds all three slots with long requests, renewing its leases
    // past their 3 s, then dies without giving them back.
    let client = client();
    let body = r#"{"model":"m","max_tokens":4,"messages":[]}"#;
    let a_addr = a.addr;
    for _ in 0..3 {
        let client = client.clone();
        tokio::spawn(async move {
            let _ = client
                .post(format!("http://{a_addr}{CHAT}"))
                .header("authorization", "Bearer client-a")
                .header("content-type", "application/json")
                .header("x-test-hold-ms", "30000")
                .body(body)
                .send()
                .await;
        });
    }
    provider_holds(&provider, 3).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let held = chat(&client, &b, "client-a", body, &[]).await;
    assert_eq!(
        (held.status, held.code().as_str()),
        (429, "CONCURRENCY_LIMIT_EXCEEDED"),
        "a's leases outlived their 3 s because a renewed them"
    );
    a.signal(libc::SIGKILL);
    let killed = Instant::now();
    let freed = loop {
        let answer = chat(&client, &b, "client-a", body, &[]).await;
        if answer.status == 200 {
            break killed.elapsed();
        }
        assert_eq!(answer.code(), "CONCURRENCY_LIMIT_EXCEEDED", "{answer:?}");
        assert!(killed.elapsed() < Duration::from_secs(10), "never freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("a killed agent's slots came back after {freed:?} (lease 3 s)");
    assert!(
        freed <= Duration::from_millis(3500),
        "within the lease: {freed:?}"
    );
    assert!(
        freed >= Duration::from_secs(1),
        "held until the lease lapsed, not freed by the dead connections: {freed:?}"
    );
}

/// A chat body asking for at most `max_tokens`, streamed or not.
fn chat_body(max_tokens: u32, stream: bool) -> String {
    format!(
        r#"{{"model":"m","stream":{stream},"max_tokens":{max_tokens},"messages":[{{"role":"user","content":"Write a short poem about rate limits and tokens"}}]}}"#
    )
}

/// Fires 50 chat requests at once at `agents` for one client, twice (the
/// second wave once the first has settled), against a budget of `budget`
/// tokens: what the provider reported must stay within it.
async fn race_for_the_budget(agents: &[&Process], provider: &Process, budget: u64) {
    provider::reset(provider);
    let client = client();
    let mut admitted = 0;
    for round in 0..2 {
        let answers = join_all((0..50).map(|i| {
            let body = chat_body(100, i % 2 == 0);
            let agent = agents[i % agents.len()];
            let client = client.clone();
            async move {
                chat(
                    &client,
                    agent,
                    "racer",
                    &body,
                    &[("x-test-completion-tokens", "100")],
                )
                .await
            }
        }))
        .await;
        let ok = answers.iter().filter(|a| a.status == 200).count();
        for refused in answers.iter().filter(|a| a.status != 200) {
            assert_eq!(
                (refused.status, refused.code().as_str()),
                (429, "TOKEN_LIMIT_EXCEEDED"),
                "{refused:?}"
            );
            assert!(refused.number("retry-after").is_some());
        }
        admitted += ok;
        let stats = provider::stats(provider);
        eprintln!("wave {round}: {ok} admitted, provider {stats:?}, budget {budget}");
        assert!(
            stats.tokens <= budget,
            "tokens settled in the window {} over the budget {budget}",
            stats.tokens
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let stats = provider::stats(provider);
    assert!(
        admitted >= 10,
        "the budget was used, not refused outright: {admitted}"
    );
    assert_eq!(stats.requests, admitted as u64);
    // Settled exactly: what is left is the budget less what the provider
    // reported, less this request's own reservation.
    let body = chat_body(1, false);
    let last = chat(&client, agents[0], "racer", &body, &[]).await;
    if last.status == 200 {
        let reservation = 1 + body.len() as u64;
        assert_eq!(
            last.number("x-ratelimit-remaining-tokens"),
            Some(budget - stats.tokens - reservation),
            "{last:?}"
        );
    } else {
        assert!(budget - stats.tokens < 1 + body.len() as u64, "{last:?}");
    }
}

const BUDGET: &str = "[tier.tokens]\nlimit = 3000\nwindow = \"1m\"\nreserve = \"max_tokens\"\n";

#[tokio::test]
async fn a_token_budget_is_never_overspent_by_parallel_requests_in_memory() {
    let provider = provider::start(10);
    let agent = agent(&config(1000, BUDGET, ""), Some(provider.addr), &[]);
    race_for_the_budget(&[&agent], &provider, 3000).await;
}

#[tokio::test]
async fn a_token_budget_is_never_overspent_by_parallel_requests_across_agents_on_redis() {
    let redis = RedisServer::start();
    let provider = provider::start(10);
    let text = config(1000, BUDGET, &redis_store(&redis, "30s"));
    let a = agent(&text, Some(provider.addr), &[]);
    let b = agent(&text, Some(provider.addr), &[]);
    race_for_the_budget(&[&a, &b], &provider, 3000).await;
}

/// `text` with every chunk's id and creation time blanked.
fn without_ids(text: &str) -> String {
    let mut normalized = String::new();
    let mut rest = text;
    while let Some(at) = rest.find("\"id\":\"") {
        normalized.push_str(&rest[..at + 6]);
        rest = &rest[at + 6..];
        let end = rest.find('"').expect("a closed id");
        normalized.push_str("ID");
        rest = &rest[end..];
    }
    normalized.push_str(rest);
    let mut done = String::new();
    let mut rest = normalized.as_str();
    while let Some(at) = rest.find("\"created\":") {
        done.push_str(&rest[..at + 10]);
        rest = &rest[at + 10..];
        let end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        done.push('T');
        rest = &rest[end..];
    }
    done.push_str(rest);
    done
}

async fn raw_stream(
    client: &Client,
    url: &str,
    body: &str,
) -> (reqwest::header::HeaderMap, String) {
    let response = client
        .post(url)
        .header("authorization", "Bearer streamer")
        .header("content-type", "application/json")
        .header("x-test-completion-tokens", "6")
        .body(body.to_owned())
        .send()
        .await
        .expect("a stream");
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    (headers, response.text().await.expect("the stream"))
}

#[tokio::test]
async fn a_stream_through_the_agent_is_byte_for_byte_the_one_the_client_asked_for() {
    let provider = provider::start(5);
    let agent = agent(&config(1000, BUDGET, ""), Some(provider.addr), &[]);
    let client = client();
    let direct = format!("http://{}{CHAT}", provider.addr);
    let through = format!("http://{}{CHAT}", agent.addr);
    let plain = r#"{"model":"m","stream":true,"max_tokens":50,"messages":[{"role":"user","content":"count to six"}]}"#;
    let asked = r#"{"model":"m","stream":true,"stream_options":{"include_usage":true},"max_tokens":50,"messages":[{"role":"user","content":"count to six"}]}"#;
    for body in [plain, asked] {
        let (_, want) = raw_stream(&client, &direct, body).await;
        let (headers, got) = raw_stream(&client, &through, body).await;
        assert_eq!(without_ids(&got), without_ids(&want), "{body}");
        assert!(headers.contains_key("x-ratelimit-remaining-tokens"));
        assert_eq!(
            got.contains("\"usage\""),
            body == asked,
            "usage only when asked for: {got}"
        );
    }
    // Both streams were settled from the usage the agent read: 2 × (6
    // completion tokens + the provider's prompt count).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let used: u64 = metric(
        &agent,
        &format!("limiter_tokens_total{{tier=\"{CHAT}\",kind=\"used\"}}"),
    );
    let per_stream = 6 + (3 + 4 + 3);
    assert_eq!(used, 2 * per_stream);
}

#[tokio::test]
async fn the_openai_sdk_reads_completions_streams_and_our_429() {
    let provider = provider::start(5);
    let agent = agent(
        &config(3, &format!("max_in_flight = 4\n{BUDGET}"), ""),
        Some(provider.addr),
        &[],
    );
    let base = format!("http://{}/api/v1", agent.addr);
    let plain = provider::sdk(&base, "plain");
    assert_eq!(plain["status"], 200, "{plain}");
    assert!(
        plain["usage"]["total_tokens"].as_u64().unwrap() > 0,
        "{plain}"
    );
    assert_eq!(
        plain["headers"]["x-ratelimit-limit-tokens"], "3000",
        "{plain}"
    );
    assert_eq!(
        plain["headers"]["x-ratelimit-remaining-requests"], "2",
        "{plain}"
    );
    let stream = provider::sdk(&base, "stream");
    assert_eq!(stream["status"], 200, "{stream}");
    assert!(!stream["content"].as_str().unwrap().is_empty(), "{stream}");
    assert_eq!(
        stream["usage_chunks"], 0,
        "no usage the client did not ask for: {stream}"
    );
    assert_eq!(stream["empty_choice_chunks"], 0, "{stream}");
    let with_usage = provider::sdk(&base, "stream_usage");
    assert!(
        with_usage["usage"]["total_tokens"].as_u64().unwrap() > 0,
        "{with_usage}"
    );
    let limited = provider::sdk(&base, "limited");
    assert_eq!(limited["status"], 429, "{limited}");
    assert_eq!(
        limited["raw_body"]["error"]["code"], "RATE_LIMIT_EXCEEDED",
        "{limited}"
    );
    assert_eq!(
        limited["body"]["details"]["retryAfter"]
            .as_u64()
            .map(|s| s > 0),
        Some(true),
        "{limited}"
    );
    assert!(
        limited["headers"]["retry-after"].as_str().is_some(),
        "{limited}"
    );
}

#[tokio::test]
async fn costs_are_charged_as_the_tier_and_the_upstream_say() {
    let provider = provider::start(5);
    let client = client();
    let body = r#"{"model":"m","messages":[]}"#;
    // A static cost: 2 units of 10.
    let static_cost = agent(&config(10, "cost = 2", ""), Some(provider.addr), &[]);
    let mut seen = Vec::new();
    for _ in 0..6 {
        let answer = chat(&client, &static_cost, "c", body, &[]).await;
        seen.push((answer.status, answer.number("x-ratelimit-remaining")));
    }
    assert_eq!(
        seen,
        [
            (200, Some(8)),
            (200, Some(6)),
            (200, Some(4)),
            (200, Some(2)),
            (200, Some(0)),
            (429, Some(0))
        ]
    );
    // A reported cost, charged beyond the tier's 1 and refunded below it;
    // the header never reaches the client.
    let reported = agent(
        &config(10, "cost_header = \"x-request-cost\"", ""),
        Some(provider.addr),
        &[],
    );
    let mut seen = Vec::new();
    for cost in ["4", "1", "0", "3", "50"] {
        let answer = chat(
            &client,
            &reported,
            "c",
            body,
            &[("x-test-cost", cost), ("x-request-cost", "0")],
        )
        .await;
        assert!(answer.header("x-request-cost").is_none(), "{answer:?}");
        seen.push((answer.status, answer.number("x-ratelimit-remaining")));
    }
    let after = chat(&client, &reported, "c", body, &[]).await;
    seen.push((after.status, after.number("x-ratelimit-remaining")));
    assert_eq!(
        seen,
        [
            (200, Some(6)),
            (200, Some(5)),
            (200, Some(5)),
            (200, Some(2)),
            (200, Some(0)),
            (429, Some(0))
        ],
        "4, 1, 0 (a refund), 3, 50 (exhausts the window)"
    );
}

/// The stores agree on settlements and leases: the in-memory store and a
/// real Redis take the same script to the same states, and a Redis lease
/// nobody renews lapses on its own.
#[tokio::test]
async fn memory_and_redis_settle_and_lease_alike() {
    let redis = RedisServer::start();
    let settings = RedisSettings {
        url: Some(redis.url()),
        cluster_nodes: Vec::new(),
        key_prefix: "limiter:".into(),
        timeout: Duration::from_secs(2),
        breaker_failures: 3,
        breaker_cooldown: Duration::from_millis(200),
        lease: Duration::from_secs(1),
    };
    let clock = Arc::new(SystemClock::new());
    let shared = RedisStore::new(&settings, clock.clone(), 1_000).expect("the redis store");
    shared.probe().await.expect("redis answers");
    let memory = MemoryStore::new(1_000);
    let identity = Identity::Key("ef".repeat(32));
    for store in [&shared as &dyn Store, &memory as &dyn Store] {
        let ask = |hits| Ask {
            key: BucketKey(11),
            tier: "/api/v1/chat/completions|60000|tokens|60000",
            identity: &identity,
            limit: 100,
            hits,
            window_ms: 60_000,
            spend: Spend::Reserve,
            algorithm: Algorithm::Fixed,
        };
        let held = store.decide(ask(60), clock.now_ms()).await.unwrap();
        assert_eq!((held.allowed, held.remaining), (true, 40));
        assert_ne!(held.window, 0, "a reservation names its window");
        let refused = store.decide(ask(50), clock.now_ms()).await.unwrap();
        assert_eq!((refused.allowed, refused.remaining), (false, 40));
        let settle = |delta, window| Settle {
            key: BucketKey(11),
            tier: "/api/v1/chat/completions|60000|tokens|60000",
            identity: &identity,
            limit: 100,
            window_ms: 60_000,
            window,
            delta,
        };
        let refunded = store
            .settle(settle(-40, held.window), clock.now_ms())
            .await
            .unwrap();
        assert_eq!(refunded.remaining, 80);
        let stale = store
            .settle(settle(-40, held.window + 1), clock.now_ms())
            .await
            .unwrap();
        assert_eq!(stale.remaining, 80, "a refund to another window is dropped");
        let charged = store
            .settle(settle(500, held.window), clock.now_ms())
            .await
            .unwrap();
        assert_eq!((charged.allowed, charged.remaining), (false, 0));

        let lease = |limit| LeaseAsk {
            key: BucketKey(12),
            tier: "/api/v1/chat/completions|60000",
            identity: &identity,
            limit,
        };
        let first = store.acquire(lease(2)).await.unwrap().expect("first");
        let second = store.acquire(lease(2)).await.unwrap().expect("second");
        assert!(store.acquire(lease(2)).await.unwrap().is_none());
        drop(first);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let third = store.acquire(lease(2)).await.unwrap().expect("given back");
        drop((second, third));
    }
    // A lease whose holder vanished (never given back, never renewed) lapses.
    let ask = LeaseAsk {
        key: BucketKey(13),
        tier: "/api/lapse|60000",
        identity: &identity,
        limit: 1,
    };
    std::mem::forget(shared.acquire(ask).await.unwrap().expect("taken"));
    assert!(shared.acquire(ask).await.unwrap().is_none());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(
        shared.acquire(ask).await.unwrap().is_some(),
        "lapsed after its second"
    );
}
