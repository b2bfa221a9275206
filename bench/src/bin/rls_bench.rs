//! `cargo xtask bench rls`: decisions per second and latency of the agent's
//! Envoy rate limit service, with 64 calls in flight on HTTP/2 streams, on the
//! in-memory and the Redis store, beside a floor measured in the same run.
//!
//! Usage: `rls-bench [OUT.json] [--seconds S] [--concurrency N]`.
//! - `floor`: the same client against a gRPC server of the same stack
//!   (tonic's service on hyper's HTTP/2, as the agent serves it; this binary
//!   re-run as `--floor ADDR` in its own process)
//!   that answers OK without deciding anything: what the transport costs.
//! - `memory`, `redis`: the agent binary (release, `--no-xdp`) with `[rls]`
//!   on, one tier, 10,000 client addresses under their limit, so every call
//!   is a counted decision; Redis is a `redis-server` the bench starts.
//!
//! Beside the rate and latency, the serving process's CPU time (user +
//! system) per decision: on 2 cores the client may saturate first, and then
//! the CPU cost is what tells the servers apart (Redis's own is not in it).
//!
//! Every case gets the same client: one channel per 16 streams, each stream
//! a task that sends the call Envoy sends (`path`, `remote_address`) and
//! waits for the answer.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use clap::Parser as _;
use envoy_types::pb::envoy::{
    extensions::common::ratelimit::v3::{RateLimitDescriptor, rate_limit_descriptor::Entry},
    service::ratelimit::v3::{
        RateLimitRequest, RateLimitResponse,
        rate_limit_response::Code,
        rate_limit_service_client::RateLimitServiceClient,
        rate_limit_service_server::{RateLimitService, RateLimitServiceServer},
    },
};
use limiter_bench::{closed_loop, quantile_us, ticks_to_us, tree_ticks, write_json_to};
use limiter_tests::{
    agent::{Process, agent, free_addr},
    redis::RedisServer,
};
use tonic::transport::{Channel, Endpoint};

const CLIENTS: u32 = 10_000;
const STREAMS_PER_CHANNEL: usize = 16;

/// Decisions per second and latency of the agent's rate limit service on
/// both stores, beside a floor of the same gRPC stack.
#[derive(clap::Parser)]
struct Args {
    /// Where the results go, as JSON (`$LIMITER_BENCH_OUT/rls.json` when set).
    #[arg(value_name = "OUT.json", default_value = "target/bench/rls.json")]
    out: PathBuf,
    /// Seconds of each case.
    #[arg(long, value_name = "S", default_value_t = 5.0)]
    seconds: f64,
    /// Calls in flight.
    #[arg(long, value_name = "N", default_value_t = 64)]
    concurrency: usize,
    /// Serve as the floor on ADDR instead (the bench starts itself so).
    #[arg(long, value_name = "ADDR")]
    floor: Option<SocketAddr>,
}

/// The floor: answers OK at once.
struct Floor;

#[tonic::async_trait]
impl RateLimitService for Floor {
    async fn should_rate_limit(
        &self,
        _request: tonic::Request<RateLimitRequest>,
    ) -> Result<tonic::Response<RateLimitResponse>, tonic::Status> {
        Ok(tonic::Response::new(RateLimitResponse {
            overall_code: Code::Ok.into(),
            ..RateLimitResponse::default()
        }))
    }
}

fn serve_floor(addr: SocketAddr) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    // The agent's own serving: hyper's HTTP/2 connection with tonic's service.
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .expect("binding the floor");
        let service = RateLimitServiceServer::new(Floor);
        loop {
            let (stream, _) = listener.accept().await.expect("accept");
            let _ = stream.set_nodelay(true);
            let service = service.clone();
            tokio::spawn(async move {
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(
                            hyper_util::rt::TokioIo::new(stream),
                            hyper_util::service::TowerToHyperService::new(service),
                        )
                        .await;
            });
        }
    });
}

fn request(i: u32) -> RateLimitRequest {
    let client = i % CLIENTS;
    RateLimitRequest {
        domain: "limiter".into(),
        descriptors: vec![RateLimitDescriptor {
            entries: vec![
                Entry {
                    key: "path".into(),
                    value: "/api/v1/chat/completions".into(),
                },
                Entry {
                    key: "remote_address".into(),
                    value: format!(
                        "10.{}.{}.{}",
                        client >> 16,
                        (client >> 8) & 255,
                        client & 255
                    ),
                },
            ],
            ..RateLimitDescriptor::default()
        }],
        hits_addend: 0,
    }
}

async fn channels(addr: SocketAddr, count: usize) -> Vec<Channel> {
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .tcp_nodelay(true)
            .connect()
            .await
            .expect("connecting to the service");
        out.push(channel);
    }
    out
}

/// `concurrency` streams for `seconds` against `addr`: decisions per second,
/// latency, and calls that were not answered OK.
/// `server` is the serving process, whose CPU time per decision is reported.
async fn load(
    addr: SocketAddr,
    server: u32,
    concurrency: usize,
    seconds: f64,
) -> serde_json::Value {
    let channels = channels(addr, concurrency.div_ceil(STREAMS_PER_CHANNEL)).await;
    // Warm up: connections, buckets of the first addresses.
    let mut warm = RateLimitServiceClient::new(channels[0].clone());
    for i in 0..1_000 {
        warm.should_rate_limit(request(i))
            .await
            .expect("warm-up call");
    }
    let ticks = tree_ticks(server);
    let mut run = closed_loop(concurrency, seconds, move |stream, i| {
        let mut client =
            RateLimitServiceClient::new(channels[stream / STREAMS_PER_CHANNEL].clone());
        async move {
            let sent = Instant::now();
            match client.should_rate_limit(request(i as u32)).await {
                Ok(r) if r.get_ref().overall_code == i32::from(Code::Ok) => Some(sent.elapsed()),
                _ => None,
            }
        }
    })
    .await;
    let cpu_us = ticks_to_us(tree_ticks(server).saturating_sub(ticks));
    #[expect(clippy::cast_precision_loss, reason = "a count of decisions")]
    let per_decision = cpu_us / run.samples.len().max(1) as f64;
    serde_json::json!({
        "decisions": run.samples.len(),
        "not_ok": run.failed,
        "server_cpu_us_per_decision": (per_decision * 10.0).round() / 10.0,
        "decisions_per_second": run.per_second().round(),
        "p50_us": quantile_us(&mut run.samples, 0.50),
        "p99_us": quantile_us(&mut run.samples, 0.99),
    })
}

fn agent_config(rls: SocketAddr, store: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:1\"\n\n[xdp]\nenabled = false\n\n{store}\n\
         [rls]\nlisten = \"{rls}\"\n\n[[tier]]\nroute = \"/api/v1/chat/completions\"\n\
         limit = 1000000000\nwindow = \"1m\"\n"
    )
}

fn wait_listening(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !limiter_tests::agent::listening(addr, Duration::from_millis(200)) {
        assert!(Instant::now() < deadline, "nothing listening on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ratio(a: &serde_json::Value, b: &serde_json::Value) -> f64 {
    let a = a["decisions_per_second"].as_f64().unwrap_or(0.0);
    let b = b["decisions_per_second"].as_f64().unwrap_or(0.0);
    if b > 0.0 {
        (a / b * 100.0).round() / 100.0
    } else {
        0.0
    }
}

fn main() {
    let args = Args::parse();
    if let Some(floor) = args.floor {
        return serve_floor(floor);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let case = |addr: SocketAddr, server: u32| {
        runtime.block_on(load(addr, server, args.concurrency, args.seconds))
    };

    let floor_addr = free_addr();
    let mut floor = Command::new(std::env::current_exe().expect("this binary"))
        .args(["--floor", &floor_addr.to_string()])
        .stdin(Stdio::null())
        .spawn()
        .expect("starting the floor server");
    wait_listening(floor_addr);
    let floor_result = case(floor_addr, floor.id());
    let _ = floor.kill();
    let _ = floor.wait();

    let rls = free_addr();
    let memory_agent: Process = agent(&agent_config(rls, ""), None, &[]);
    wait_listening(rls);
    let memory = case(rls, memory_agent.pid());
    drop(memory_agent);

    let redis = RedisServer::start();
    let rls = free_addr();
    let store = format!(
        "[store]\nkind = \"redis\"\nurl = \"{}\"\ntimeout = \"2s\"\n",
        redis.url()
    );
    let redis_agent = agent(&agent_config(rls, &store), None, &[]);
    wait_listening(rls);
    let redis_result = case(rls, redis_agent.pid());
    drop(redis_agent);
    drop(redis);

    let json = serde_json::json!({
        "concurrency": args.concurrency,
        "seconds": args.seconds,
        "clients": CLIENTS,
        "floor": floor_result,
        "memory": memory,
        "redis": redis_result,
        "memory_vs_floor": ratio(&memory, &floor_result),
        "redis_vs_memory": ratio(&redis_result, &memory),
    });
    for name in ["floor", "memory", "redis"] {
        let v = &json[name];
        println!(
            "{name:>7}: {:>8} decisions/s  p50 {:>7} µs  p99 {:>7} µs  server CPU {:>5} µs/decision  not OK {}",
            v["decisions_per_second"],
            v["p50_us"],
            v["p99_us"],
            v["server_cpu_us_per_decision"],
            v["not_ok"]
        );
    }
    println!(
        "memory store at {}× the floor's rate; redis at {}× memory's",
        json["memory_vs_floor"], json["redis_vs_memory"]
    );
    let out = std::env::var_os("LIMITER_BENCH_OUT")
        .map_or(args.out, |dir| PathBuf::from(dir).join("rls.json"));
    write_json_to(&out, &json);
    println!("wrote {}", out.display());
}
