//! What the benchmark programs (`src/bin/`, run by `cargo xtask bench`) share:
//! peers started from their Debian packages with generated configs, `wrk`
//! runs and open-loop load pinned to a core, CPU accounting from `/proc`,
//! medians, and the results as JSON. Agents, namespaces and HTTP come from the
//! test kit (`limiter_tests`).

#![expect(
    clippy::missing_panics_doc,
    reason = "benchmark support panics with a message rather than returning errors"
)]

use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader, Read as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

pub use limiter_tests::cpu::{ticks_to_us, tree_ticks};
use limiter_tests::{agent, netns::Netns, pin_to_cpu};

/// The path every benchmark request goes to (the chat-completions tier).
pub const BENCH_PATH: &str = "/api/v1/chat/completions";

/// The flood bench's scenarios, in the order it runs and reports them: no
/// flood, then the flood against no protection, an iptables `hashlimit` rule,
/// the XDP program, and the XDP program with nothing reaching the host.
pub const FLOOD_SCENARIOS: [&str; 5] = [
    "baseline",
    "no_protection",
    "iptables_hashlimit",
    "with_xdp",
    "attacker_busy_control",
];

/// A regex matching exactly the paths of `route` (for nginx and `HAProxy`).
#[must_use]
pub fn route_regex(route: &str) -> String {
    let mut out = String::from("^");
    for segment in route.split('/').skip(1) {
        out.push('/');
        match segment {
            "*" => out.push_str(".+"),
            s if s.starts_with(':') => out.push_str("[^/]+"),
            s => out.push_str(&s.replace('.', "\\.")),
        }
    }
    out.push('$');
    out
}

/// A scratch directory under `target/bench/run/<name>`, emptied first.
#[must_use]
pub fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/bench/run")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// A child process killed (and reaped) on drop.
pub struct Peer {
    pub name: String,
    child: Child,
}

impl Peer {
    /// Starts `program args…` pinned to `cpu` and waits until `addr` accepts.
    #[must_use]
    pub fn start(name: &str, cpu: u32, program: &str, args: &[&str], addr: SocketAddr) -> Self {
        Self::start_in(None, name, cpu, program, args, addr)
    }

    /// [`Peer::start`] in the network namespace `ns` (this one when `None`),
    /// `addr` probed from inside it.
    #[must_use]
    pub fn start_in(
        ns: Option<&Netns>,
        name: &str,
        cpu: u32,
        program: &str,
        args: &[&str],
        addr: SocketAddr,
    ) -> Self {
        let mut command = Command::new("taskset");
        command
            .args(["-c", &cpu.to_string(), program])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .env("RUST_LOG", "warn");
        if let Some(ns) = ns {
            ns.enter_on_exec(&mut command);
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name} ({program}): {e}"));
        let mut peer = Self {
            name: name.to_owned(),
            child,
        };
        peer.wait_for(addr, ns);
        peer
    }

    fn wait_for(&mut self, addr: SocketAddr, ns: Option<&Netns>) {
        let connects = |addr: SocketAddr| {
            let probe = move || agent::listening(addr, Duration::from_millis(200));
            match ns {
                Some(ns) => ns.run(probe),
                None => probe(),
            }
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if connects(addr) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited with {status} before listening on {addr}",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{} did not listen on {addr} within 20 s", self.name);
    }

    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the process cleanly (SIGTERM, then SIGKILL after 5 s).
    pub fn stop(self) {
        drop(self);
    }
}

impl Drop for Peer {
    /// SIGTERM first (nginx's master only takes its workers down on a signal
    /// it can handle), SIGKILL after a grace period.
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: kill(2) on our child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One `wrk` run's result.
#[derive(Clone, Copy, Debug, Default)]
pub struct WrkResult {
    pub requests: u64,
    pub seconds: f64,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Responses that were not 2xx/3xx (the 429s).
    pub non_2xx: u64,
    /// Connect, read, write and timeout errors.
    pub errors: u64,
    /// Busy time of the contender's CPU (every state but idle and iowait,
    /// so kernel work on it counts) per answered request, in µs; 0 when not
    /// measured.
    pub cpu_us_per_request: f64,
    /// User + system time of the contender's processes per answered
    /// request, in µs; 0 when not measured.
    pub process_cpu_us_per_request: f64,
}

const WRK_REPORT: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("WRK %d %d %d %d %d %d\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), e.status, e.connect + e.read + e.write + e.timeout))
end
"#;

/// Runs `wrk` (pinned to `cpu`) against `url` with `connections` for `seconds`;
/// `prefix` runs it through another command (e.g. `ip netns exec NS`).
#[must_use]
pub fn wrk(prefix: &[&str], cpu: u32, url: &str, connections: u32, seconds: u32) -> WrkResult {
    wrk_with(prefix, cpu, url, (connections, seconds), "")
}

/// [`wrk`] sending every request as `POST` with the JSON `body`.
#[must_use]
pub fn wrk_post(
    prefix: &[&str],
    cpu: u32,
    url: &str,
    (connections, seconds): (u32, u32),
    body: &str,
) -> WrkResult {
    let prelude = format!(
        "wrk.method = \"POST\"\nwrk.headers[\"Content-Type\"] = \"application/json\"\nwrk.body = [[{body}]]\n"
    );
    wrk_with(prefix, cpu, url, (connections, seconds), &prelude)
}

/// [`wrk`] with `prelude` (Lua) before the report script.
fn wrk_with(
    prefix: &[&str],
    cpu: u32,
    url: &str,
    (connections, seconds): (u32, u32),
    prelude: &str,
) -> WrkResult {
    let script = std::env::temp_dir().join(format!(
        "limiter-wrk-report-{}.lua",
        if prelude.is_empty() { "get" } else { "post" }
    ));
    std::fs::write(&script, format!("{prelude}{WRK_REPORT}")).expect("wrk script");
    let mut command = match prefix.split_first() {
        Some((program, rest)) => {
            let mut c = Command::new(program);
            c.args(rest);
            c.arg("taskset");
            c
        }
        None => Command::new("taskset"),
    };
    command
        .args(["-c", &cpu.to_string(), "wrk", "-t1"])
        .arg(format!("-c{connections}"))
        .arg(format!("-d{seconds}s"))
        .args(["--timeout", "2s", "-s"])
        .arg(&script)
        .arg(url);
    let output = command
        .output()
        .expect("running wrk (installed by the bench)");
    let text = String::from_utf8_lossy(&output.stdout);
    let Some(line) = text.lines().find_map(|l| l.strip_prefix("WRK ")) else {
        // wrk gives up without a summary when no connection can be made at
        // all (a source banned in the kernel): nothing was served.
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("unable to connect") || text.contains("unable to connect"),
            "wrk printed no summary: {text}\n{stderr}"
        );
        return WrkResult {
            seconds: f64::from(seconds),
            errors: u64::from(connections),
            ..WrkResult::default()
        };
    };
    let n: Vec<f64> = line
        .split_whitespace()
        .map(|v| v.parse().expect("wrk number"))
        .collect();
    let seconds = n[1] / 1e6;
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "wrk prints non-negative integers"
    )]
    WrkResult {
        requests: n[0] as u64,
        seconds,
        rps: n[0] / seconds.max(1e-9),
        p50_ms: n[2] / 1e3,
        p99_ms: n[3] / 1e3,
        non_2xx: n[4] as u64,
        errors: n[5] as u64,
        ..WrkResult::default()
    }
}

/// CPU time of `cpu` since boot in clock ticks: (busy, softirq). Busy is
/// every state but idle, iowait and steal (time the hypervisor gave this
/// virtual CPU's host core to another guest: no work of the contender's).
#[must_use]
pub fn cpu_ticks(cpu: u32) -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
    let name = format!("cpu{cpu}");
    let line = stat
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name.as_str()))
        .unwrap_or_else(|| panic!("no {name} in /proc/stat"));
    let n: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().expect("a tick count"))
        .collect();
    // user nice system idle iowait irq softirq steal (guest counted in user).
    let total: u64 = n.iter().take(8).sum();
    (total - n[3] - n[4] - n[7], n[6])
}

/// Softirq ticks of every CPU together since boot (the receive path of
/// packets, wherever the kernel ran it).
#[must_use]
pub fn softirq_ticks() -> u64 {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    (0..cpus)
        .map(|cpu| cpu_ticks(u32::try_from(cpu).unwrap_or(0)).1)
        .sum()
}

/// Runs `run` and fills in the CPU it cost per answered request: busy time
/// of `cpu` and user + system time of `pid`'s process tree over the run.
pub fn with_cpu_cost(cpu: u32, pid: u32, run: impl FnOnce() -> WrkResult) -> WrkResult {
    let (busy, process) = (cpu_ticks(cpu).0, tree_ticks(pid));
    let mut result = run();
    let busy = cpu_ticks(cpu).0 - busy;
    let process = tree_ticks(pid).saturating_sub(process);
    if result.requests > 0 {
        let requests = f64::from(u32::try_from(result.requests).unwrap_or(u32::MAX));
        result.cpu_us_per_request = ticks_to_us(busy) / requests;
        result.process_cpu_us_per_request = ticks_to_us(process) / requests;
    }
    result
}

/// The `quantile` of `samples` in µs, to 0.1 µs (sorts them; `samples` must
/// not be empty).
#[must_use]
pub fn quantile_us(samples: &mut [Duration], quantile: f64) -> f64 {
    samples.sort_unstable();
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "an index into a non-empty sample"
    )]
    let index = ((samples.len() as f64 * quantile) as usize).min(samples.len() - 1);
    (samples[index].as_secs_f64() * 1e7).round() / 10.0
}

/// What a [`closed_loop`] run measured.
pub struct ClosedLoop {
    /// The latency of every call that succeeded.
    pub samples: Vec<Duration>,
    /// Calls that failed.
    pub failed: u64,
    pub seconds: f64,
}

impl ClosedLoop {
    /// Successful calls per second.
    #[must_use]
    pub fn per_second(&self) -> f64 {
        #[expect(clippy::cast_precision_loss, reason = "a count of calls")]
        let calls = self.samples.len() as f64;
        calls / self.seconds
    }
}

/// `callers` tasks, each making its next call as soon as the last returns,
/// for `seconds`: caller `c`'s calls are `call(c, i)` with `i` counting up
/// from `c × 7,919` (so callers start on different buckets); a call returns
/// its latency, or `None` when it failed.
pub async fn closed_loop<F, Fut>(callers: usize, seconds: f64, call: F) -> ClosedLoop
where
    F: Fn(usize, u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Option<Duration>> + Send + 'static,
{
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(seconds);
    let tasks: Vec<_> = (0..callers)
        .map(|c| {
            let call = call.clone();
            tokio::spawn(async move {
                let (mut samples, mut failed) = (Vec::new(), 0u64);
                let mut i = c as u64 * 7_919;
                while Instant::now() < deadline {
                    match call(c, i).await {
                        Some(took) => samples.push(took),
                        None => failed += 1,
                    }
                    i += 1;
                }
                (samples, failed)
            })
        })
        .collect();
    let mut run = ClosedLoop {
        samples: Vec::new(),
        failed: 0,
        seconds: 0.0,
    };
    for task in tasks {
        let (samples, failed) = task.await.expect("a caller task");
        run.samples.extend(samples);
        run.failed += failed;
    }
    run.seconds = started.elapsed().as_secs_f64();
    run
}

/// The median of `values` (upper median for even counts).
#[must_use]
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// The result whose rps is the median of `runs`.
#[must_use]
pub fn median_run(runs: &[WrkResult]) -> WrkResult {
    let mut sorted = runs.to_vec();
    sorted.sort_by(|a, b| a.rps.total_cmp(&b.rps));
    sorted.get(sorted.len() / 2).copied().unwrap_or_default()
}

/// Resident set size of `pid` in bytes.
#[must_use]
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

/// The machine line for the results: kernel and CPUs.
#[must_use]
pub fn machine() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    let mut out = String::new();
    let _ = write!(out, "Linux {kernel}, {cpus} CPUs ({model})");
    out
}

/// Writes `value` as pretty JSON to `<dir>/<name>.json`, where `dir` is
/// `LIMITER_BENCH_OUT` (set by `cargo xtask bench`) or `target/bench`, and
/// returns the path.
#[must_use]
pub fn write_json(name: &str, value: &serde_json::Value) -> PathBuf {
    let dir = std::env::var_os("LIMITER_BENCH_OUT").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench"),
        PathBuf::from,
    );
    let path = dir.join(format!("{name}.json"));
    write_json_to(&path, value);
    path
}

/// Writes `value` as pretty JSON to `path`, creating its directory.
pub fn write_json_to(path: &Path, value: &serde_json::Value) {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).expect("the results' directory");
    }
    std::fs::write(
        path,
        serde_json::to_string_pretty(value).expect("JSON") + "\n",
    )
    .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// What an open-loop run offered and what came back.
#[derive(Clone, Copy, Debug, Default)]
pub struct Offered {
    /// Requests sent on schedule (written, or refused by a full socket).
    pub offered: u64,
    /// Responses read, and how many of them were 429s.
    pub answered: u64,
    pub rejected: u64,
    pub seconds: f64,
    /// Busy time of the contender's CPU per offered request, µs.
    pub cpu_us_per_offered: f64,
    /// The contender's own user + system time per offered request, µs.
    pub process_cpu_us_per_offered: f64,
}

/// Offers `rate` requests per second of `GET path` to `addr`, from the local
/// address `from`, for `seconds`
/// over `connections` keep-alive connections, on a schedule that never waits
/// for answers (requests are pipelined; one a connection's socket will not
/// take is still counted as offered: the client sent it, nothing got it).
/// The load runs on a thread pinned to `cpu`; the contender's CPU (`pid`'s
/// and `contender_cpu`'s) is measured over the run and divided by what was
/// offered, so a source whose packets the kernel drops costs what dropping
/// costs, not what a served request would.
#[must_use]
pub fn offer(
    (from, addr): (std::net::IpAddr, SocketAddr),
    path: &str,
    (rate, seconds, connections): (u32, u32, u32),
    (cpu, contender_cpu, pid): (u32, u32, u32),
) -> Offered {
    use std::sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n").into_bytes();
    let (offered, answered, rejected) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let counters = (offered.clone(), answered.clone(), rejected.clone());
    let before = (cpu_ticks(contender_cpu).0, tree_ticks(pid));
    let started = Instant::now();
    std::thread::spawn(move || {
        pin_to_cpu(cpu as usize);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(u64::from(seconds));
            let interval = Duration::from_secs_f64(f64::from(connections) / f64::from(rate));
            let mut tasks = Vec::new();
            for _ in 0..connections {
                let stream = agent::connect_from(from, addr).await;
                let _ = stream.set_nodelay(true);
                let (mut reader, writer) = stream.into_split();
                let (offered, answered, rejected) = counters.clone();
                let request = request.clone();
                tasks.push(tokio::spawn(async move {
                    let mut tick = tokio::time::interval(interval);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                    while tokio::time::Instant::now() < deadline {
                        tick.tick().await;
                        offered.fetch_add(1, Ordering::Relaxed);
                        // A full socket (a banned source's stalled connection) drops it.
                        let _ = writer.try_write(&request);
                    }
                }));
                tasks.push(tokio::spawn(async move {
                    use tokio::io::AsyncReadExt as _;
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut carry: Vec<u8> = Vec::new();
                    loop {
                        let read = tokio::time::timeout_at(deadline, reader.read(&mut buf)).await;
                        let Ok(Ok(n)) = read else { break };
                        if n == 0 {
                            break;
                        }
                        carry.extend_from_slice(&buf[..n]);
                        // Count status lines; keep what may be the start of one.
                        let mut from = 0;
                        loop {
                            let Some(at) = carry[from..].windows(9).position(|w| w == b"HTTP/1.1 ")
                            else {
                                from = from.max(carry.len().saturating_sub(8));
                                break;
                            };
                            let status = from + at + 9;
                            if status + 3 > carry.len() {
                                from += at;
                                break;
                            }
                            answered.fetch_add(1, Ordering::Relaxed);
                            if &carry[status..status + 3] == b"429" {
                                rejected.fetch_add(1, Ordering::Relaxed);
                            }
                            from = status + 3;
                        }
                        carry.drain(..from);
                    }
                }));
            }
            for task in tasks {
                let _ = task.await;
            }
        });
    })
    .join()
    .expect("the load thread");
    let seconds = started.elapsed().as_secs_f64();
    let busy = cpu_ticks(contender_cpu).0 - before.0;
    let process = tree_ticks(pid).saturating_sub(before.1);
    let offered = offered.load(Ordering::Relaxed);
    let per = |ticks: u64| {
        if offered == 0 {
            0.0
        } else {
            ticks_to_us(ticks) / f64::from(u32::try_from(offered).unwrap_or(u32::MAX))
        }
    };
    Offered {
        offered,
        answered: answered.load(Ordering::Relaxed),
        rejected: rejected.load(Ordering::Relaxed),
        seconds,
        cpu_us_per_offered: per(busy),
        process_cpu_us_per_offered: per(process),
    }
}

/// Time to the first event of a streamed chat completion at `addr`
/// (`POST` [`BENCH_PATH`] with `"stream": true`): from the request's write
/// to the first `data:` byte read, on a new connection each time.
#[must_use]
pub fn time_to_first_event(addr: SocketAddr) -> Duration {
    use std::io::{Read as _, Write as _};
    let body = r#"{"model":"m","stream":true,"max_tokens":16,"messages":[{"role":"user","content":"hi"}]}"#;
    let request = format!(
        "POST {BENCH_PATH} HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let started = Instant::now();
    stream.write_all(request.as_bytes()).expect("write");
    let mut seen = Vec::new();
    let mut buf = [0_u8; 4096];
    loop {
        let n = stream.read(&mut buf).expect("read");
        assert!(n > 0, "the stream ended before its first event: {seen:?}");
        seen.extend_from_slice(&buf[..n]);
        if seen.windows(5).any(|w| w == b"data:") {
            return started.elapsed();
        }
    }
}

/// Reads one HTTP/1.1 answer from a keep-alive connection (its body by
/// `Content-Length`, read and dropped); its status.
pub fn read_status(reader: &mut BufReader<TcpStream>) -> u16 {
    let mut line = String::new();
    reader.read_line(&mut line).expect("status line");
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an answer: {line:?}"));
    let mut length = 0_usize;
    loop {
        line.clear();
        reader.read_line(&mut line).expect("header line");
        assert!(!line.is_empty(), "the connection closed mid-answer");
        if line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().expect("content-length");
        }
    }
    let mut body = vec![0_u8; length];
    reader.read_exact(&mut body).expect("body");
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_regexes_match_like_the_router() {
        assert_eq!(
            route_regex("/api/v1/fashion/status/:id"),
            "^/api/v1/fashion/status/[^/]+$"
        );
        assert_eq!(route_regex("/api/v1/media/*"), "^/api/v1/media/.+$");
        assert_eq!(route_regex("/api/health"), "^/api/health$");
    }
}
