//! `cargo xtask bench redis`: decisions per second and latency of the Redis
//! store against the in-memory store, in the same run, through the `Store`
//! trait the proxy calls (no HTTP: what is measured is the store).
//!
//! Usage: `redis-bench [OUT.json] [--seconds S] [--concurrency N]`. A throwaway
//! `redis-server` is started on a free port on this machine (same cores as the
//! bench: the round trip is loopback). Cases:
//! - `latency`: one decision at a time, each timed: p50/p99 per store, and what
//!   the Redis store adds over the in-memory one;
//! - `throughput`: N concurrent callers for S seconds on 10,000 buckets under
//!   their limit (every decision is a script call), with p50/p99 under that load;
//! - `rejected`: the same on buckets over their limit, which the Redis store
//!   answers from its local over-limit cache (no round trip).

use std::{
    hash::{BuildHasher as _, RandomState},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use clap::Parser as _;
use limiter_agent::{
    identity::Identity,
    limit::{
        Algorithm, Ask, BucketKey, Clock, MemoryStore, RedisSettings, RedisStore, Spend, Store,
        SystemClock,
    },
};
use limiter_bench::{closed_loop, quantile_us, write_json_to};
use limiter_tests::redis::RedisServer;

const WINDOW_MS: u64 = 60_000;
const BUCKETS: u64 = 10_000;

/// Decisions per second and latency of the Redis store beside the in-memory
/// store, through the `Store` trait.
#[derive(clap::Parser)]
struct Args {
    /// Where the results go, as JSON.
    #[arg(value_name = "OUT.json", default_value = "target/bench/redis.json")]
    out: PathBuf,
    /// Seconds of each throughput case.
    #[arg(long, value_name = "S", default_value_t = 3.0)]
    seconds: f64,
    /// Concurrent callers in the throughput cases.
    #[arg(long, value_name = "N", default_value_t = 64)]
    concurrency: usize,
}

/// The identities of the bench's buckets (API-key hashes, as the proxy makes them).
fn identities(tag: &str) -> Vec<Identity> {
    (0..BUCKETS)
        .map(|i| Identity::Key(format!("{tag}{i:060x}")))
        .collect()
}

#[derive(Clone)]
struct Bench {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    identities: Arc<Vec<Identity>>,
    tier: &'static str,
    salt: RandomState,
    limit: u32,
    /// What every decision must say (the bench's buckets are all under, or all over).
    allowed: bool,
}

impl Bench {
    /// One timed decision; `None` if the store failed (counted, not timed).
    async fn decide(&self, i: u64) -> Option<Duration> {
        let n = usize::try_from(i % BUCKETS).expect("index");
        let ask = Ask {
            // The proxy's key is a keyed hash of (identity, tier); so is this one.
            key: BucketKey(self.salt.hash_one((self.tier, n))),
            tier: self.tier,
            identity: &self.identities[n],
            limit: self.limit,
            hits: 1,
            window_ms: WINDOW_MS,
            spend: Spend::Admit,
            algorithm: Algorithm::Fixed,
        };
        let started = Instant::now();
        let decision = self.store.decide(ask, self.clock.now_ms()).await;
        let took = started.elapsed();
        match decision {
            Ok(decision) => {
                assert_eq!(
                    decision.allowed, self.allowed,
                    "bucket {n} of {}",
                    self.tier
                );
                Some(took)
            }
            Err(e) => {
                eprintln!("store error in the bench: {e}");
                None
            }
        }
    }
}

/// One decision at a time: per-decision latency.
async fn latency(bench: &Bench, count: u64) -> serde_json::Value {
    let mut samples = Vec::new();
    for i in 0..count {
        samples.extend(bench.decide(i).await);
    }
    serde_json::json!({
        "decisions": samples.len(),
        "errors": count - samples.len() as u64,
        "p50_us": quantile_us(&mut samples, 0.50),
        "p99_us": quantile_us(&mut samples, 0.99),
    })
}

/// `concurrency` callers for `seconds`: decisions per second and latency under load.
async fn throughput(bench: &Arc<Bench>, concurrency: usize, seconds: f64) -> serde_json::Value {
    let bench = bench.clone();
    let mut run = closed_loop(concurrency, seconds, move |_, i| {
        let bench = bench.clone();
        async move { bench.decide(i).await }
    })
    .await;
    serde_json::json!({
        "decisions": run.samples.len(),
        "errors": run.failed,
        "decisions_per_second": run.per_second().round(),
        "p50_us": quantile_us(&mut run.samples, 0.50),
        "p99_us": quantile_us(&mut run.samples, 0.99),
    })
}

fn redis_store(redis: &RedisServer, clock: Arc<dyn Clock>) -> RedisStore {
    let settings = RedisSettings {
        url: Some(redis.url()),
        cluster_nodes: Vec::new(),
        key_prefix: "bench:".into(),
        // Generous: the bench measures latency, it does not test the breaker.
        timeout: Duration::from_secs(5),
        breaker_failures: 5,
        breaker_cooldown: Duration::from_secs(1),
        lease: Duration::from_secs(30),
    };
    RedisStore::new(&settings, clock, 1_000_000).expect("the redis store")
}

fn number(value: &serde_json::Value, field: &str) -> f64 {
    value[field].as_f64().expect("a number")
}

fn main() {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let redis = RedisServer::start();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
    let json = runtime.block_on(async {
        let memory: Arc<dyn Store> = Arc::new(MemoryStore::new(1_000_000));
        let redis_store = redis_store(&redis, clock.clone());
        redis_store.probe().await.expect("redis answers");
        let redis_store: Arc<dyn Store> = Arc::new(redis_store);
        let bench = |store: &Arc<dyn Store>| {
            Arc::new(Bench {
                store: store.clone(),
                clock: clock.clone(),
                identities: Arc::new(identities("a")),
                tier: "/api/bench|60000",
                salt: RandomState::new(),
                limit: u32::MAX,
                allowed: true,
            })
        };
        let (mem, red) = (bench(&memory), bench(&redis_store));
        // Warm up: connections, the script cache, the maps.
        latency(&mem, 2_000).await;
        latency(&red, 2_000).await;
        let mem_latency = latency(&mem, 20_000).await;
        let red_latency = latency(&red, 20_000).await;
        let mem_load = throughput(&mem, args.concurrency, args.seconds).await;
        let red_load = throughput(&red, args.concurrency, args.seconds).await;
        // Over the limit: one admitted decision per bucket with limit 1, then rejections.
        let over = |b: &Arc<Bench>| {
            let primer = Bench {
                tier: "/api/full|60000",
                limit: 1,
                ..Bench::clone(b)
            };
            Arc::new(Bench {
                allowed: false,
                ..primer
            })
        };
        let (mem_over, red_over) = (over(&mem), over(&red));
        for b in [&mem_over, &red_over] {
            let primer = Bench {
                allowed: true,
                ..Bench::clone(b)
            };
            for i in 0..BUCKETS {
                primer.decide(i).await.expect("priming the over-limit buckets");
            }
        }
        let mem_rejected = throughput(&mem_over, args.concurrency, args.seconds).await;
        let red_rejected = throughput(&red_over, args.concurrency, args.seconds).await;
        serde_json::json!({
            "concurrency": args.concurrency,
            "seconds": args.seconds,
            "buckets": BUCKETS,
            "latency": {"memory": mem_latency, "redis": red_latency},
            "throughput": {"memory": mem_load, "redis": red_load},
            "rejected": {"memory": mem_rejected, "redis": red_rejected},
            "added_latency_us": {
                "p50": ((number(&red_latency, "p50_us") - number(&mem_latency, "p50_us")) * 10.0).round() / 10.0,
                "p99": ((number(&red_latency, "p99_us") - number(&mem_latency, "p99_us")) * 10.0).round() / 10.0,
            },
        })
    });
    drop(redis);
    for (case, what) in [
        ("latency", "one at a time"),
        ("throughput", "under load"),
        ("rejected", "over limit"),
    ] {
        for store in ["memory", "redis"] {
            let v = &json[case][store];
            println!(
                "{case:>10} {store:>6} ({what}): {:>9} decisions/s  p50 {:>7} µs  p99 {:>7} µs",
                v.get("decisions_per_second")
                    .map_or_else(|| "-".into(), ToString::to_string),
                v["p50_us"],
                v["p99_us"]
            );
        }
    }
    println!(
        "redis adds p50 {} µs, p99 {} µs per decision (one at a time)",
        json["added_latency_us"]["p50"], json["added_latency_us"]["p99"]
    );
    write_json_to(&args.out, &json);
    println!("wrote {}", args.out.display());
}
