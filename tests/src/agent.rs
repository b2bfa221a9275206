//! Real processes for end-to-end tests: the `limiter-agent` binary, and the
//! stand-in upstream it ships (`limiter-agent demo-upstream`) in its own process.

use std::{
    io::{BufRead as _, BufReader},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// The agent binary next to the test executable (`cargo xtask test` builds it
/// before running the tests).
#[must_use]
pub fn agent_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/limiter-agent
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

/// A free TCP port on 127.0.0.1.
#[must_use]
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn wait_for_port(addr: SocketAddr, child: &mut Child, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            let mut stderr = String::new();
            if let Some(err) = child.stderr.take() {
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    stderr.push_str(&line);
                    stderr.push('\n');
                }
            }
            panic!("{what} exited with {status} before listening on {addr}:\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{what} did not listen on {addr} within 15 s");
}

/// A child process killed when dropped.
pub struct Process {
    child: Child,
    pub addr: SocketAddr,
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
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port())
        .parse()
        .expect("address");
    let mut child = Command::new(agent_binary())
        .args(["demo-upstream", "--listen", &addr.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the demo upstream");
    wait_for_port(addr, &mut child, "the demo upstream");
    Process { child, addr }
}

/// Starts the agent with `config` (TOML text; `[server] listen` is overridden
/// by a free port, and `upstream` by `upstream` when given), without XDP.
#[must_use]
pub fn agent(config: &str, upstream: Option<SocketAddr>, extra: &[&str]) -> Process {
    let dir = std::env::temp_dir().join(format!(
        "limiter-test-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("limiter.toml");
    std::fs::write(&path, config).expect("writing the config");
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port())
        .parse()
        .expect("address");
    let mut command = Command::new(agent_binary());
    command
        .args(["run", "--no-xdp", "--config"])
        .arg(&path)
        .args(["--listen", &addr.to_string()])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(upstream) = upstream {
        command.args(["--upstream", &format!("http://{upstream}")]);
    }
    let mut child = command.spawn().expect("starting the agent");
    wait_for_port(addr, &mut child, "the agent");
    Process { child, addr }
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
