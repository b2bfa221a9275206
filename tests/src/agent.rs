//! Real processes for end-to-end tests: the `limiter-agent` binary, and the
//! stand-in upstream it ships (`limiter-agent demo-upstream`) in its own process.

use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

/// The agent binary of the same build profile: beside the running executable
/// (benchmark binaries in `target/<profile>/`) or one level up (test executables
/// in `target/<profile>/deps/`). `cargo xtask test` builds it before the tests.
#[must_use]
pub fn agent_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let beside = exe.with_file_name("limiter-agent");
    if beside.is_file() {
        return beside;
    }
    let binary = exe
        .parent()
        .and_then(std::path::Path::parent)
        .expect("target directory")
        .join("limiter-agent");
    assert!(
        binary.is_file(),
        "{} is missing: build it first (`cargo build -p limiter-agent`, which `cargo xtask test` does)",
        binary.display()
    );
    binary
}

/// A free TCP port on 127.0.0.1, never one this process was handed before.
/// The port is free when asked for, not reserved: tests start processes in
/// parallel, and the kernel readily hands a port just released to the next
/// caller, so without the memory two children of one test could be given the
/// same port, and one's readiness probe would reach the other.
#[must_use]
pub fn free_port() -> u16 {
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        if GIVEN
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(port)
        {
            return port;
        }
    }
}

/// Whether something listens on `addr`: a TCP connection completes within
/// `timeout`, and not to itself. A [`free_port`] is in the ephemeral range, so
/// while nothing listens there the kernel may pick that very port as the
/// probe's source, and TCP's simultaneous open then "connects" the socket to
/// itself: a probe that trusted it would report a process ready before it binds.
#[must_use]
pub fn listening(addr: SocketAddr, timeout: Duration) -> bool {
    TcpStream::connect_timeout(&addr, timeout).is_ok_and(|s| s.local_addr().ok() != Some(addr))
}

/// 127.0.0.1 on a [`free_port`].
#[must_use]
pub fn free_addr() -> SocketAddr {
    SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, free_port()))
}

fn wait_for_port(
    addr: SocketAddr,
    process: &mut Process,
    what: &str,
    probe: &dyn Fn(SocketAddr) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if probe(addr) {
            return;
        }
        if let Ok(Some(status)) = process.child.try_wait() {
            // Give the drain thread a moment to collect the last lines.
            std::thread::sleep(Duration::from_millis(100));
            panic!(
                "{what} exited with {status} before listening on {addr}:\n{}",
                process.log()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{what} did not listen on {addr} within 15 s");
}

/// A child process, killed when dropped. Its stderr is collected in the
/// background (so a chatty child never blocks on a full pipe).
pub struct Process {
    child: Child,
    pub addr: SocketAddr,
    /// The agent's admin listener.
    pub admin: Option<SocketAddr>,
    /// The agent's config file (rewrite it and send SIGHUP to reload).
    pub config_path: Option<PathBuf>,
    log: Arc<Mutex<String>>,
}

impl Process {
    fn spawn(command: Command, addr: SocketAddr, what: &str) -> Self {
        Self::spawn_with_probe(command, addr, what, |addr| {
            listening(addr, Duration::from_millis(200))
        })
    }

    /// Spawns `command` and waits until `probe(addr)` says it is listening.
    pub fn spawn_with_probe(
        mut command: Command,
        addr: SocketAddr,
        what: &str,
        probe: impl Fn(SocketAddr) -> bool,
    ) -> Self {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("starting {what}: {e}"));
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = sink.lock().unwrap_or_else(PoisonError::into_inner);
                log.push_str(&line);
                log.push('\n');
            }
        });
        let mut process = Self {
            child,
            addr,
            admin: None,
            config_path: None,
            log,
        };
        wait_for_port(addr, &mut process, what, &probe);
        process
    }

    /// Everything the process wrote to stderr so far.
    #[must_use]
    pub fn log(&self) -> String {
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// `http://ADDR{path}` on the process's listener.
    #[must_use]
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (e.g. `libc::SIGHUP`) to the process.
    pub fn signal(&self, signal: i32) {
        let pid = i32::try_from(self.child.id()).expect("pid fits i32");
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill({pid}, {signal}) failed");
    }

    /// Waits up to `timeout` for the process to exit; its status, or None.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the stand-in upstream as its own process.
#[must_use]
pub fn demo_upstream() -> Process {
    demo_upstream_at(free_addr())
}

/// Starts the stand-in upstream on `addr`.
#[must_use]
pub fn demo_upstream_at(addr: SocketAddr) -> Process {
    demo_upstream_on(addr, &[])
}

/// Starts the agent with `config` (TOML text; `[server] listen` and the admin
/// listener are overridden by free ports, and `upstream` by `upstream` when
/// given), without XDP.
#[must_use]
pub fn agent(config: &str, upstream: Option<SocketAddr>, extra: &[&str]) -> Process {
    agent_with_env(config, upstream, extra, &[])
}

/// The agent with `config` (see [`agent`]) in front of a demo upstream of its
/// own: (upstream, agent), to be held together.
#[must_use]
pub fn agent_in_front(config: &str) -> (Process, Process) {
    let upstream = demo_upstream();
    let agent = agent(config, Some(upstream.addr), &[]);
    (upstream, agent)
}

/// As [`agent`], with extra environment variables for the agent process.
#[must_use]
pub fn agent_with_env(
    config: &str,
    upstream: Option<SocketAddr>,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Process {
    let dir = std::env::temp_dir().join(format!(
        "limiter-test-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("limiter.toml");
    std::fs::write(&path, config).expect("writing the config");
    let (addr, admin) = (free_addr(), free_addr());
    let mut command = Command::new(agent_binary());
    command
        .args(["run", "--no-xdp", "--config"])
        .arg(&path)
        .args(["--listen", &addr.to_string()])
        .args(["--admin", &admin.to_string()])
        .args(extra)
        .env("RUST_LOG", "info")
        .envs(env.iter().copied());
    if !extra.contains(&"--state-file") {
        command.arg("--state-file").arg(dir.join("runtime.json"));
    }
    if let Some(upstream) = upstream {
        command.args(["--upstream", &format!("http://{upstream}")]);
    }
    let mut process = Process::spawn(command, addr, "the agent");
    process.admin = Some(admin);
    process.config_path = Some(path);
    process
}

/// A config with one tier, XDP off, and `extra_server` lines in `[server]`.
#[must_use]
pub fn small_config(route: &str, limit: u32, window: &str, extra_server: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:1\"\n{extra_server}\n[xdp]\nenabled = false\n{}",
        tier(route, limit, window)
    )
}

/// One `[[tier]]` table, after a blank line.
#[must_use]
pub fn tier(route: &str, limit: impl std::fmt::Display, window: &str) -> String {
    format!("\n[[tier]]\nroute = \"{route}\"\nlimit = {limit}\nwindow = \"{window}\"\n")
}

/// Sends raw bytes and returns everything the agent answers before closing.
#[must_use]
pub fn raw_request(addr: SocketAddr, request: &str) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect");
    crate::http::exchange(&mut stream, request.as_bytes())
}

/// The reference tier table (`examples/concurred.toml`).
#[must_use]
pub fn reference_config() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/concurred.toml"
    ))
    .expect("examples/concurred.toml")
}

/// The reference tiers, as the agent itself parses [`reference_config`].
#[must_use]
pub fn reference_tiers() -> Vec<limiter_agent::config::Tier> {
    limiter_agent::config::Config::parse(&reference_config())
        .expect("examples/concurred.toml is a valid config")
        .live
        .tiers
}

/// 127.0.0.`last`: one of the local addresses a test plays a client from.
#[must_use]
pub fn loopback(last: u8) -> std::net::IpAddr {
    std::net::Ipv4Addr::new(127, 0, 0, last).into()
}

/// A TCP connection to `to` from the local address `from` (any of
/// 127.0.0.0/8 on loopback), so one machine can play many clients.
pub async fn connect_from(from: std::net::IpAddr, to: SocketAddr) -> tokio::net::TcpStream {
    let socket = match from {
        std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .expect("socket");
    socket
        .bind(SocketAddr::new(from, 0))
        .unwrap_or_else(|e| panic!("binding {from}: {e}"));
    socket.connect(to).await.expect("connect")
}

/// As [`raw_request`], from the local address `from` (see [`connect_from`]).
#[must_use]
pub fn raw_request_from(from: std::net::IpAddr, addr: SocketAddr, request: &str) -> String {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("runtime");
    let mut stream = runtime
        .block_on(connect_from(from, addr))
        .into_std()
        .expect("std stream");
    stream.set_nonblocking(false).expect("blocking");
    crate::http::exchange(&mut stream, request.as_bytes())
}

/// Starts the stand-in upstream authenticating like a real API: only
/// `api_keys` are accepted, anything else gets 401.
#[must_use]
pub fn demo_upstream_with_keys(api_keys: &[&str]) -> Process {
    demo_upstream_on(free_addr(), api_keys)
}

fn demo_upstream_on(addr: SocketAddr, api_keys: &[&str]) -> Process {
    let mut command = Command::new(agent_binary());
    command.args(["demo-upstream", "--listen", &addr.to_string()]);
    for key in api_keys {
        command.args(["--api-key", key]);
    }
    Process::spawn(command, addr, "the demo upstream")
}
