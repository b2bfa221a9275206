//! Several agents as one fleet: a "store" network namespace holding Redis
//! (or a Redis Cluster), linked by a veth pair to each agent's namespace;
//! agents started there with an admin token; the admin API called from the
//! agent's own namespace. Everything is removed on drop; nothing leaves the
//! machine (the store namespace has no default route).

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use crate::{
    agent::{Process, agent_binary, free_addr},
    netns::{Netns, ip},
    redis::RedisServer,
};

/// The token the fleet's agents accept, named `ops` (and `auditor`'s).
pub const TOKEN: &str = "fleet-token-0123456789abcdef";
pub const AUDITOR_TOKEN: &str = "auditor-token-0123456789abcdef";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The store's namespace and its links.
pub struct StoreNet {
    pub ns: Netns,
}

impl StoreNet {
    #[must_use]
    pub fn new() -> Self {
        crate::require_root("fleet tests (network namespaces)");
        let ns = Netns {
            name: format!(
                "lim-s{}x{}",
                std::process::id() % 100_000,
                NEXT.fetch_add(1, Ordering::Relaxed)
            ),
        };
        ip(&["netns", "add", &ns.name]);
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        Self { ns }
    }

    /// Links `host` to the store as link `i` (1…250): the host gets
    /// 10.93.`i`.1, the store 10.93.`i`.2; the host reaches every store
    /// address (a Cluster announces one) through its link. Returns the
    /// store's address on the link.
    #[must_use]
    pub fn link(&self, host: &Netns, i: u8) -> Ipv4Addr {
        let (host_if, store_if) = (format!("st{i}"), format!("sh{i}"));
        ip(&[
            "-n",
            &host.name,
            "link",
            "add",
            &host_if,
            "type",
            "veth",
            "peer",
            "name",
            &store_if,
            "netns",
            &self.ns.name,
        ]);
        ip(&[
            "-n",
            &host.name,
            "addr",
            "add",
            &format!("10.93.{i}.1/24"),
            "dev",
            &host_if,
        ]);
        ip(&["-n", &host.name, "link", "set", &host_if, "up"]);
        ip(&[
            "-n",
            &self.ns.name,
            "addr",
            "add",
            &format!("10.93.{i}.2/24"),
            "dev",
            &store_if,
        ]);
        ip(&["-n", &self.ns.name, "link", "set", &store_if, "up"]);
        ip(&[
            "-n",
            &host.name,
            "route",
            "add",
            "10.93.0.0/16",
            "via",
            &format!("10.93.{i}.2"),
        ]);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !host
            .output("ip", &["-o", "link", "show", "dev", &host_if])
            .contains("state UP")
        {
            assert!(Instant::now() < deadline, "{host_if} never came up");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ipv4Addr::new(10, 93, i, 2)
    }

    /// A Redis server in the store namespace.
    #[must_use]
    pub fn redis(&self, port: u16, extra: &[&str]) -> RedisServer {
        RedisServer::start_in(&self.ns, port, extra)
    }
}

impl Default for StoreNet {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for StoreNet {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.ns.name])
            .status();
    }
}

/// A Redis Cluster in the store namespace: `masters` primaries, each with
/// `replicas` replicas, announcing `announce` (a store address every host
/// reaches).
pub struct NsCluster {
    pub nodes: Vec<RedisServer>,
    pub announce: Ipv4Addr,
}

impl NsCluster {
    #[must_use]
    pub fn start(store: &StoreNet, announce: Ipv4Addr, masters: usize, replicas: usize) -> Self {
        let nodes: Vec<RedisServer> = (0..masters * (1 + replicas))
            .map(|n| {
                let port = 7100 + u16::try_from(n).expect("few nodes");
                let config = format!("nodes-{port}.conf");
                store.redis(
                    port,
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        &config,
                        "--cluster-announce-ip",
                        &announce.to_string(),
                        "--cluster-node-timeout",
                        "2000",
                    ],
                )
            })
            .collect();
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("{announce}:{}", n.port))
            .collect();
        crate::redis::form_cluster(&nodes, &addresses, replicas, Some(&store.ns));
        Self { nodes, announce }
    }

    /// The seed URLs.
    #[must_use]
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("redis://{}:{}", self.announce, n.port))
            .collect()
    }

    /// The node holding the fleet's keys as primary, and one of its replicas.
    #[must_use]
    pub fn fleet_primary_and_replica(&self) -> (usize, usize) {
        let slot: u16 = self.nodes[0]
            .cli(&["CLUSTER", "KEYSLOT", "{limiter-fleet}"])
            .trim()
            .parse()
            .expect("a slot");
        let primary = self
            .nodes
            .iter()
            .position(|n| {
                let info = n.cli(&["ROLE"]);
                info.starts_with("master") && owns_slot(n, slot)
            })
            .expect("a primary owns the slot");
        let id = self.nodes[primary]
            .cli(&["CLUSTER", "MYID"])
            .trim()
            .to_owned();
        let replica = self
            .nodes
            .iter()
            .position(|n| {
                n.cli(&["CLUSTER", "NODES"])
                    .lines()
                    .any(|l| l.contains("myself") && l.contains("slave") && l.contains(&id))
            })
            .expect("the primary has a replica");
        (primary, replica)
    }
}

fn owns_slot(node: &RedisServer, slot: u16) -> bool {
    node.cli(&["CLUSTER", "NODES"]).lines().any(|line| {
        line.contains("myself")
            && line.split_whitespace().skip(8).any(|range| {
                let (a, b) = range.split_once('-').unwrap_or((range, range));
                match (a.parse::<u16>(), b.parse::<u16>()) {
                    (Ok(a), Ok(b)) => (a..=b).contains(&slot),
                    _ => false,
                }
            })
    })
}

/// A token file for the fleet's agents under `dir`: `ops` and `auditor`.
#[must_use]
pub fn token_file(dir: &std::path::Path) -> PathBuf {
    std::fs::create_dir_all(dir).expect("temp dir");
    let path = dir.join("admin.tokens");
    std::fs::write(
        &path,
        format!("# the fleet's operators\nops:{TOKEN}\nauditor:{AUDITOR_TOKEN}\n"),
    )
    .expect("token file");
    path
}

/// Starts an agent in `ns` listening on `listen` (0.0.0.0:port there), with
/// `config` (whose `[admin]` is added here: a token file and node `node`),
/// the demo upstream, admin on the namespace's loopback, and `extra` args.
#[must_use]
pub fn agent_in(ns: &Netns, node: &str, port: u16, config: &str, extra: &[&str]) -> Process {
    let dir = std::env::temp_dir().join(format!("limiter-fleet-{}-{}", std::process::id(), node));
    let tokens = token_file(&dir);
    let path = dir.join("limiter.toml");
    std::fs::write(
        &path,
        format!(
            "[admin]\ntoken_file = \"{}\"\nnode = \"{node}\"\n\n{config}",
            tokens.display()
        ),
    )
    .expect("config");
    // An `--admin` among `extra` replaces the loopback one.
    let admin = extra
        .iter()
        .position(|a| *a == "--admin")
        .and_then(|i| extra.get(i + 1)?.parse().ok())
        .unwrap_or_else(free_addr);
    let mut command = Command::new(agent_binary());
    command
        .args(["run", "--demo-upstream", "--config"])
        .arg(&path)
        .args(["--listen", &format!("0.0.0.0:{port}")]);
    if !extra.contains(&"--admin") {
        command.args(["--admin", &admin.to_string()]);
    }
    command
        .arg("--state-file")
        .arg(dir.join("runtime.json"))
        .args(extra)
        .env("RUST_LOG", "info");
    ns.enter_on_exec(&mut command);
    let probe_ns = ns.clone();
    let mut process = Process::spawn_with_probe(
        command,
        SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        "a fleet agent",
        move |addr| probe_ns.run(move || crate::agent::listening(addr, Duration::from_millis(300))),
    );
    process.admin = Some(admin);
    process.config_path = Some(path);
    process
}

/// An admin API call from inside `ns` to `admin`: (status, JSON body).
#[must_use]
pub fn admin_call(
    ns: Option<&Netns>,
    admin: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, serde_json::Value) {
    let (method, path) = (method.to_owned(), path.to_owned());
    let token = token.map(str::to_owned);
    let body = body.unwrap_or("").to_owned();
    let call = move || {
        let mut stream =
            TcpStream::connect_timeout(&admin, Duration::from_secs(5)).expect("admin listener");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {admin}\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).expect("write");
        let mut raw = String::new();
        let _ = stream.read_to_string(&mut raw);
        let response = crate::http::Response::parse(&raw);
        let json = serde_json::from_str(&response.body).unwrap_or(serde_json::Value::Null);
        (response.status, json)
    };
    match ns {
        Some(ns) => ns.run(call),
        None => call(),
    }
}

/// `GET path` from inside `ns` to `addr`, from the source address `from`
/// when given, with extra header lines: the status, or `None` when no
/// answer came (refused, dropped, timed out).
#[must_use]
pub fn get_from(
    ns: &Netns,
    from: Option<Ipv4Addr>,
    addr: SocketAddrV4,
    path: &str,
    headers: &[String],
    timeout: Duration,
) -> Option<crate::http::Response> {
    let request = crate::http::get_request(path, headers);
    ns.run(move || {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).ok()?;
        if let Some(from) = from {
            socket.bind(&SocketAddrV4::new(from, 0).into()).ok()?;
        }
        socket.connect_timeout(&addr.into(), timeout).ok()?;
        let mut stream: TcpStream = socket.into();
        stream.set_read_timeout(Some(timeout)).ok()?;
        stream.write_all(request.as_bytes()).ok()?;
        let mut raw = String::new();
        let _ = stream.read_to_string(&mut raw);
        let response = crate::http::Response::parse(&raw);
        (response.status != 0).then_some(response)
    })
}
