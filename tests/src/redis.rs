//! Real Redis servers for the shared-store tests: a throwaway `redis-server` on
//! a free port (no persistence), killed when dropped, and a three-node Cluster.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::agent::free_port;

/// `redis-server`, or a panic that says how to get it (tests never skip silently).
#[must_use]
pub fn redis_server_binary() -> PathBuf {
    which("redis-server").unwrap_or_else(|| {
        panic!(
            "redis-server is not installed: the Redis store tests need a real server \
             (`apt-get install redis-server`, which `cargo xtask setup` does)"
        )
    })
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| PathBuf::from(dir).join(name))
        .find(|path| path.is_file())
}

/// One `redis-server` process on 127.0.0.1 (or on every address of a
/// network namespace).
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    extra: Vec<String>,
    /// `redis-cli` options to reach it (TLS).
    cli_options: Vec<String>,
    /// The namespace it runs in, bound to all its addresses; `None`: this
    /// one's 127.0.0.1.
    netns: Option<crate::netns::Netns>,
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers PING.
    #[must_use]
    pub fn start() -> Self {
        Self::start_with(free_port(), &[])
    }

    /// Starts a server on `port` with extra `redis-server` arguments.
    #[must_use]
    pub fn start_with(port: u16, extra: &[&str]) -> Self {
        Self::launch(port, extra, &[])
    }

    /// Starts a server on `port` with `extra` server arguments, reached by
    /// `redis-cli` with `cli_options`.
    fn launch(port: u16, extra: &[&str], cli_options: &[&str]) -> Self {
        let owned =
            |args: &[&str]| -> Vec<String> { args.iter().map(|s| (*s).to_owned()).collect() };
        let dir = std::env::temp_dir().join(format!("limiter-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("redis temp dir");
        let mut server = Self {
            child: None,
            port,
            dir,
            extra: owned(extra),
            cli_options: owned(cli_options),
            netns: None,
        };
        server.restart();
        server
    }

    /// Starts a server inside `netns` on `port`, on all its addresses, with
    /// extra `redis-server` arguments.
    #[must_use]
    pub fn start_in(netns: &crate::netns::Netns, port: u16, extra: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "limiter-redis-{}-{}-{port}",
            std::process::id(),
            netns.name
        ));
        std::fs::create_dir_all(&dir).expect("redis temp dir");
        let mut server = Self {
            child: None,
            port,
            dir,
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
            cli_options: Vec::new(),
            netns: Some(netns.clone()),
        };
        server.restart();
        server
    }

    /// Stops the process (SIGSTOP: connections stay open, nothing answers)
    /// or lets it go on (SIGCONT).
    pub fn pause(&self, paused: bool) {
        if let Some(child) = &self.child {
            let signal = if paused { libc::SIGSTOP } else { libc::SIGCONT };
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(i32::try_from(child.id()).expect("pid"), signal);
            }
        }
    }

    /// Starts a server that speaks only TLS on a free port, with the PEM files
    /// `cert` and `key`, its chain trusted through `ca` (clients need no certificate).
    #[must_use]
    pub fn start_tls(cert: &Path, key: &Path, ca: &Path) -> Self {
        let port = free_port();
        let (port_text, cert, key, ca) = (
            port.to_string(),
            cert.to_string_lossy(),
            key.to_string_lossy(),
            ca.to_string_lossy(),
        );
        // Later options win: the plain port is closed.
        Self::launch(
            port,
            &[
                "--port",
                "0",
                "--tls-port",
                &port_text,
                "--tls-cert-file",
                &cert,
                "--tls-key-file",
                &key,
                "--tls-ca-cert-file",
                &ca,
                "--tls-auth-clients",
                "no",
            ],
            &["--tls", "--cacert", &ca],
        )
    }

    /// `redis://127.0.0.1:PORT`.
    #[must_use]
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server at once (SIGKILL: no goodbye to its clients).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, empty (nothing is persisted).
    pub fn restart(&mut self) {
        self.kill();
        let mut command = Command::new(redis_server_binary());
        let bind = if self.netns.is_some() {
            "0.0.0.0"
        } else {
            "127.0.0.1"
        };
        command
            .args(["--port", &self.port.to_string()])
            .args(["--bind", bind, "--protected-mode", "no"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--dir", &self.dir.to_string_lossy()])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(netns) = &self.netns {
            netns.enter_on_exec(&mut command);
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("starting redis-server on port {}: {e}", self.port));
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let reachable =
                self.netns.is_some() || crate::agent::listening(addr, Duration::from_millis(200));
            if reachable && self.cli(&["PING"]).trim() == "PONG" {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("redis-server on port {} exited with {status}", self.port);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "redis-server did not answer on port {} within 10 s",
            self.port
        );
    }

    /// Runs `redis-cli` against this server and returns its output.
    #[must_use]
    pub fn cli(&self, args: &[&str]) -> String {
        let mut all: Vec<&str> = self.cli_options.iter().map(String::as_str).collect();
        all.extend(args);
        match &self.netns {
            None => redis_cli(self.port, &all),
            Some(netns) => {
                let mut command = Command::new("redis-cli");
                command
                    .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
                    .args(&all);
                netns.enter_on_exec(&mut command);
                let output = command
                    .output()
                    .unwrap_or_else(|e| panic!("running redis-cli: {e}"));
                String::from_utf8_lossy(&output.stdout).into_owned()
            }
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `redis-cli -p PORT ARGS…` (comes with `redis-server`).
#[must_use]
pub fn redis_cli(port: u16, args: &[&str]) -> String {
    let output = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running redis-cli: {e} (it comes with redis-server)"));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Joins `nodes` (reached at `addresses`) into one cluster with `replicas`
/// replicas per primary, running `redis-cli --cluster create` in `netns`
/// when given, and waits until every node reports `cluster_state:ok`.
pub fn form_cluster(
    nodes: &[RedisServer],
    addresses: &[String],
    replicas: usize,
    netns: Option<&crate::netns::Netns>,
) {
    let mut command = Command::new("redis-cli");
    command
        .arg("--cluster")
        .arg("create")
        .args(addresses)
        .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"]);
    if let Some(netns) = netns {
        netns.enter_on_exec(&mut command);
    }
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("running redis-cli --cluster create: {e}"));
    assert!(
        output.status.success(),
        "redis-cli --cluster create failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !nodes
        .iter()
        .all(|n| n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok"))
    {
        assert!(
            Instant::now() < deadline,
            "the cluster did not reach cluster_state:ok within 30 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Three masters with `--cluster-enabled yes`, slots spread by `redis-cli --cluster create`.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    #[must_use]
    pub fn start() -> Self {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                let port = free_port();
                let config = format!("nodes-{port}.conf");
                RedisServer::start_with(
                    port,
                    &["--cluster-enabled", "yes", "--cluster-config-file", &config],
                )
            })
            .collect();
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        form_cluster(&nodes, &addresses, 0, None);
        Self { nodes }
    }

    /// `redis://` URLs of every node.
    #[must_use]
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }
}
