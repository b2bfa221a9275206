//! `cargo xtask bench boundary`: the burst at a fixed window's edge, sent
//! through the agent to three tiers of the same limit and window, one per
//! algorithm. One request opens each tier's window; `limit` requests come
//! `delta` before the fixed window ends and `limit` more `delta` after it.
//! Each batch is pipelined on one keep-alive connection per tier, all
//! three tiers at once, on the real clock.
//!
//! Usage: `boundary-bench [--limit N] [--window-seconds S] [--delta-ms D]`;
//! writes `target/bench/boundary.json`.

use std::{
    fmt::Write as _,
    io::{BufReader, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use clap::Parser as _;
use limiter_bench::{Peer, machine, read_status, scratch, write_json};
use limiter_tests::agent::{agent_binary, free_port};
use serde_json::json;

#[derive(clap::Parser)]
struct Args {
    /// Requests per window on each tier (and GCRA's burst).
    #[arg(long, default_value_t = 50)]
    limit: u32,
    /// The tiers' window.
    #[arg(long, default_value_t = 10)]
    window_seconds: u64,
    /// How long before and after the fixed window's end the batches go.
    #[arg(long, default_value_t = 250)]
    delta_ms: u64,
}

const ALGORITHMS: [&str; 3] = ["fixed", "sliding", "gcra"];

/// Sends `n` pipelined `GET path` and counts the 200s.
fn batch(stream: &mut BufReader<TcpStream>, path: &str, n: u32) -> u32 {
    let request = format!("GET {path} HTTP/1.1\r\nhost: bench\r\n\r\n");
    let all = request.repeat(n as usize);
    stream
        .get_mut()
        .write_all(all.as_bytes())
        .expect("send the batch");
    (0..n).map(|_| u32::from(read_status(stream) == 200)).sum()
}

fn sleep_until(at: Instant) {
    std::thread::sleep(at.saturating_duration_since(Instant::now()));
}

fn main() {
    let Args {
        limit,
        window_seconds,
        delta_ms,
    } = Args::parse();
    let dir = scratch("boundary");
    let (port, upstream) = (free_port(), free_port());
    let local = |p: u16| SocketAddr::from((Ipv4Addr::LOCALHOST, p));
    let binary = agent_binary().display().to_string();
    let _upstream = Peer::start(
        "demo upstream",
        0,
        &binary,
        &["demo-upstream", "--listen", &local(upstream).to_string()],
        local(upstream),
    );
    let mut config = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nupstream = \"http://127.0.0.1:{upstream}\"\n\n\
         [xdp]\nenabled = false\n"
    );
    for algorithm in ALGORITHMS {
        let _ = write!(
            config,
            "\n[[tier]]\nroute = \"/api/{algorithm}\"\nlimit = {limit}\nwindow = \"{window_seconds}s\"\nalgorithm = \"{algorithm}\"\n"
        );
    }
    let path = dir.join("limiter.toml");
    std::fs::write(&path, config).expect("config");
    let _agent = Peer::start(
        "limiter",
        1,
        &binary,
        &["run", "--config", &path.display().to_string()],
        local(port),
    );
    let window = Duration::from_secs(window_seconds);
    let delta = Duration::from_millis(delta_ms);
    let runs: Vec<_> = ALGORITHMS
        .iter()
        .map(|&algorithm| {
            let addr = local(port);
            std::thread::spawn(move || {
                let stream = TcpStream::connect(addr).expect("connect to the agent");
                stream.set_nodelay(true).expect("nodelay");
                let mut stream = BufReader::new(stream);
                let path = format!("/api/{algorithm}");
                let opened = Instant::now();
                let first = batch(&mut stream, &path, 1);
                sleep_until(opened + window.saturating_sub(delta));
                let before = batch(&mut stream, &path, limit);
                sleep_until(opened + window + delta);
                let after = batch(&mut stream, &path, limit);
                (algorithm, first, before, after)
            })
        })
        .collect();
    let mut figures = serde_json::Map::new();
    for run in runs {
        let (algorithm, first, before, after) = run.join().expect("a tier's run");
        println!(
            "boundary: {algorithm}: {before} admitted before the edge, {after} after ({} of {})",
            before + after,
            2 * limit
        );
        figures.insert(
            algorithm.into(),
            json!({ "first": first, "before": before, "after": after }),
        );
    }
    let path = write_json(
        "boundary",
        &json!({
            "machine": machine(),
            "limit": limit,
            "window_seconds": window_seconds,
            "delta_ms": delta_ms,
            "algorithms": figures,
        }),
    );
    println!("{}", path.display());
}
