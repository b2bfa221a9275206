//! `cargo xtask bench memory`: the agent's RSS growth per live bucket with the
//! in-memory store. A load generator sends requests with distinct API keys
//! (one bucket each) over pipelined keep-alive connections; RSS is read after
//! a warm-up and again once the buckets are live.
//!
//! Usage: `memory-bench [--buckets N]` (default 1,000,000); writes
//! `target/bench/memory.json`.

use std::{
    io::{BufReader, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use clap::Parser as _;
use limiter_bench::{Peer, machine, read_status, rss_bytes, scratch, write_json};
use limiter_tests::{
    agent::{agent_binary, free_port, tier},
    http,
    prometheus::metric,
};
use serde_json::json;

/// The agent's RSS growth per live bucket with the in-memory store.
#[derive(clap::Parser)]
struct Args {
    /// Live buckets to add after the warm-up.
    #[arg(long, value_name = "N", default_value_t = 1_000_000)]
    buckets: u64,
}

const WARMUP: u64 = 20_000;
const CONNECTIONS: u64 = 8;
const PIPELINE: u64 = 64;

/// Sends requests for keys `from..to` over `CONNECTIONS` connections.
fn fill(addr: SocketAddr, from: u64, to: u64) {
    let per = (to - from).div_ceil(CONNECTIONS);
    let threads: Vec<_> = (0..CONNECTIONS)
        .map(|c| {
            let start = from + c * per;
            let end = (start + per).min(to);
            std::thread::spawn(move || send(addr, start, end))
        })
        .collect();
    for t in threads {
        t.join().expect("load thread");
    }
}

fn send(addr: SocketAddr, start: u64, end: u64) {
    let stream = TcpStream::connect(addr).expect("connect to the agent");
    stream.set_nodelay(true).expect("nodelay");
    let mut writer = stream.try_clone().expect("clone");
    let mut reader = BufReader::with_capacity(1 << 16, stream);
    let mut key = start;
    while key < end {
        let batch = (end - key).min(PIPELINE);
        let mut out = Vec::with_capacity(usize::try_from(batch).unwrap_or(64) * 80);
        for k in key..key + batch {
            write!(
                out,
                "GET /api/chat HTTP/1.1\r\nhost: bench\r\nx-api-key: bucket-{k}\r\n\r\n"
            )
            .expect("format");
        }
        writer.write_all(&out).expect("send");
        for _ in 0..batch {
            let status = read_status(&mut reader);
            assert_eq!(
                status, 200,
                "bucket {key}: every request is under its limit"
            );
        }
        key += batch;
    }
}

fn buckets(admin: SocketAddr) -> f64 {
    // The gauge is refreshed every second.
    std::thread::sleep(Duration::from_millis(2200));
    metric(&http::get(admin, "/metrics").body, "limiter_buckets").expect("limiter_buckets")
}

/// One algorithm's figures: an agent of its own, filled from empty.
fn measure(algorithm: &str, buckets_wanted: u64) -> serde_json::Value {
    let dir = scratch(&format!("memory-{algorithm}"));
    let (port, admin, upstream) = (free_port(), free_port(), free_port());
    let local = |p: u16| SocketAddr::from((Ipv4Addr::LOCALHOST, p));
    let binary = agent_binary().display().to_string();
    let _upstream = Peer::start(
        "demo upstream",
        0,
        &binary,
        &["demo-upstream", "--listen", &local(upstream).to_string()],
        local(upstream),
    );
    // One bucket per key on purpose (`verify_keys = "none"`): the bench
    // measures what a live bucket costs, not key verification. Two an
    // hour, so a GCRA bucket one request moved stays live (30 min) for
    // the whole fill, as a fixed window does.
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nupstream = \"http://127.0.0.1:{upstream}\"\n\n\
         [admin]\nlisten = \"127.0.0.1:{admin}\"\n\n[identity]\nverify_keys = \"none\"\n\n\
         [xdp]\nenabled = false\n{}algorithm = \"{algorithm}\"\n",
        tier("/api/chat", 2, "1h")
    );
    let path = dir.join("limiter.toml");
    std::fs::write(&path, config).expect("config");
    let agent = Peer::start(
        &format!("limiter (memory store, {algorithm})"),
        1,
        &binary,
        &["run", "--config", &path.display().to_string()],
        local(port),
    );
    eprintln!("memory ({algorithm}): warming up with {WARMUP} buckets…");
    fill(local(port), 0, WARMUP);
    let before_buckets = buckets(local(admin));
    let before_rss = rss_bytes(agent.pid());
    eprintln!("memory ({algorithm}): {buckets_wanted} more buckets…");
    let started = Instant::now();
    fill(local(port), WARMUP, WARMUP + buckets_wanted);
    let took = started.elapsed();
    let after_buckets = buckets(local(admin));
    let after_rss = rss_bytes(agent.pid());
    let live = after_buckets - before_buckets;
    #[expect(clippy::cast_precision_loss, reason = "byte counts far below 2^52")]
    let per_bucket = (after_rss.saturating_sub(before_rss)) as f64 / live.max(1.0);
    agent.stop();
    json!({
        "buckets": live,
        "bytes_per_bucket": (per_bucket * 10.0).round() / 10.0,
        "rss_before_bytes": before_rss,
        "rss_after_bytes": after_rss,
        "fill_seconds": took.as_secs_f64(),
    })
}

fn main() {
    let Args {
        buckets: buckets_wanted,
    } = Args::parse();
    // Each algorithm in turn, on an agent of its own, in the same run.
    let fixed = measure("fixed", buckets_wanted);
    let gcra = measure("gcra", buckets_wanted);
    let sliding = measure("sliding", buckets_wanted);
    let per = |v: &serde_json::Value| v["bytes_per_bucket"].as_f64().unwrap_or(f64::NAN);
    let gcra_vs_fixed = per(&gcra) / per(&fixed);
    let mut result = fixed.clone();
    result["machine"] = json!(machine());
    result["algorithms"] = json!({ "fixed": fixed, "gcra": gcra, "sliding": sliding });
    result["gcra_vs_fixed"] = json!((gcra_vs_fixed * 100.0).round() / 100.0);
    let path = write_json("memory", &result);
    let per_fixed = per(&fixed);
    let verdict = if per_fixed <= 64.0 { "meets" } else { "misses" };
    println!(
        "memory: {per_fixed:.1} bytes per bucket (target <= 64): {verdict}; GCRA {:.1} ({gcra_vs_fixed:.2}x), sliding {:.1}",
        per(&gcra),
        per(&sliding)
    );
    println!("{}", path.display());
}
