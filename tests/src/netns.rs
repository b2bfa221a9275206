//! Network namespaces for end-to-end tests of the kernel side: a host running
//! the agent, a client and an attacker, each joined to the host by a veth
//! pair. Everything is removed on drop, also when a test fails; nothing is
//! attached to or sent through the machine's own interfaces.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use crate::{
    agent::{Process, agent_binary, free_addr, tier},
    http::{self, Response},
};

/// Host-side interfaces: `hc` faces the client, `ha` the attacker.
pub const HOST_CLIENT_IF: &str = "hc";
pub const HOST_ATTACKER_IF: &str = "ha";
pub const HOST_CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 91, 1, 1);
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 91, 1, 2);
pub const HOST_ATTACKER_ADDR: Ipv4Addr = Ipv4Addr::new(10, 91, 2, 1);
pub const ATTACKER_ADDR: Ipv4Addr = Ipv4Addr::new(10, 91, 2, 2);
/// The agent's listen port inside the host namespace: the tests' one API port.
pub use crate::xdp::API_PORT;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// An agent config for a [`Topology`]: listening on `API_PORT`, XDP on both
/// host interfaces with `xdp_lines` added to `[xdp]`, and one tier of `limit`
/// a minute on `route`.
#[must_use]
pub fn config(route: &str, limit: u64, xdp_lines: &str) -> String {
    format!(
        "[server]\nlisten = \"0.0.0.0:{API_PORT}\"\n\n[xdp]\ninterfaces = [\"{HOST_CLIENT_IF}\", \"{HOST_ATTACKER_IF}\"]\n{xdp_lines}\n{}",
        tier(route, limit, "1m")
    )
}

/// Runs `ip ARGS…`, panicking with its error output when it fails.
pub fn ip(args: &[&str]) {
    let output = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running `ip` (iproute2 installed?): {e}"));
    assert!(
        output.status.success(),
        "`ip {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// One network namespace, by name.
#[derive(Clone, Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    /// Runs `f` on a thread that has entered this namespace (network only:
    /// the mount namespace, and so /sys/fs/bpf, stays the test's).
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = self.path();
        std::thread::spawn(move || {
            enter(&path);
            f()
        })
        .join()
        .expect("thread in the namespace panicked")
    }

    /// Starts `f` on a thread that has entered this namespace, without
    /// waiting for it.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = self.path();
        std::thread::spawn(move || {
            enter(&path);
            f()
        })
    }

    /// Output of `cmd args…` run inside this namespace (network only).
    #[must_use]
    pub fn output(&self, cmd: &str, args: &[&str]) -> String {
        let mut command = Command::new(cmd);
        command.args(args);
        self.enter_on_exec(&mut command);
        let output = command
            .output()
            .unwrap_or_else(|e| panic!("running {cmd}: {e}"));
        assert!(
            output.status.success(),
            "`{cmd} {}` in {} failed: {}",
            args.join(" "),
            self.name,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Makes `command` enter this network namespace just before it execs.
    pub fn enter_on_exec(&self, command: &mut Command) {
        let file = std::fs::File::open(self.path()).expect("namespace file");
        // SAFETY: setns(2) is async-signal-safe; `file` is moved into the closure
        // and stays open until the exec.
        unsafe {
            command.pre_exec(move || {
                if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    }
}

fn enter(path: &std::path::Path) {
    let file = std::fs::File::open(path).expect("namespace file");
    // SAFETY: setns on a valid namespace fd affects only the calling thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

/// The three namespaces and their links. Dropping it deletes them all, the
/// instance's pins and run-state file too.
pub struct Topology {
    pub host: Netns,
    pub client: Netns,
    pub attacker: Netns,
    /// The agent instance name (pin directory) for this topology.
    pub instance: String,
}

impl Topology {
    #[must_use]
    pub fn new() -> Self {
        crate::require_root("network-namespace tests");
        let id = format!(
            "{}x{}",
            std::process::id() % 100_000,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let topology = Self {
            host: Netns {
                name: format!("lim-h{id}"),
            },
            client: Netns {
                name: format!("lim-c{id}"),
            },
            attacker: Netns {
                name: format!("lim-a{id}"),
            },
            instance: format!("test{id}"),
        };
        for ns in [&topology.host, &topology.client, &topology.attacker] {
            ip(&["netns", "add", &ns.name]);
            ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        }
        let h = &topology.host.name;
        for (host_if, peer, peer_if, host_addr, peer_addr) in [
            (
                HOST_CLIENT_IF,
                &topology.client.name,
                "vc",
                HOST_CLIENT_ADDR,
                CLIENT_ADDR,
            ),
            (
                HOST_ATTACKER_IF,
                &topology.attacker.name,
                "va",
                HOST_ATTACKER_ADDR,
                ATTACKER_ADDR,
            ),
        ] {
            ip(&[
                "-n", h, "link", "add", host_if, "type", "veth", "peer", "name", peer_if, "netns",
                peer,
            ]);
            ip(&[
                "-n",
                h,
                "addr",
                "add",
                &format!("{host_addr}/24"),
                "dev",
                host_if,
            ]);
            ip(&["-n", h, "link", "set", host_if, "up"]);
            ip(&[
                "-n",
                peer,
                "addr",
                "add",
                &format!("{peer_addr}/24"),
                "dev",
                peer_if,
            ]);
            ip(&["-n", peer, "link", "set", peer_if, "up"]);
        }
        // Carrier comes up asynchronously; frames sent before it are refused.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        for (ns, interface) in [
            (&topology.host, HOST_CLIENT_IF),
            (&topology.host, HOST_ATTACKER_IF),
            (&topology.client, "vc"),
            (&topology.attacker, "va"),
        ] {
            while !ns
                .output("ip", &["-o", "link", "show", "dev", interface])
                .contains("state UP")
            {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{interface} in {} never came up",
                    ns.name
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        topology
    }

    /// Starts the agent in the host namespace on `API_PORT`, with `config`
    /// (its `[xdp] interfaces` should name `hc`/`ha`), this topology's
    /// instance, the in-process demo upstream, and `extra` arguments.
    #[must_use]
    pub fn agent(&self, config: &str, extra: &[&str]) -> Process {
        let dir = std::env::temp_dir().join(format!("limiter-{}", self.instance));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("limiter.toml");
        if !path.exists() {
            std::fs::write(&path, config).expect("writing the config");
        }
        let admin = free_addr();
        let mut command = Command::new(agent_binary());
        command
            .args(["run", "--demo-upstream", "--config"])
            .arg(&path)
            .args(["--listen", &format!("0.0.0.0:{API_PORT}")])
            .args(["--admin", &admin.to_string()])
            .args(["--instance", &self.instance])
            .arg("--state-file")
            .arg(dir.join("runtime.json"))
            .args(extra)
            .env("RUST_LOG", "info");
        self.host.enter_on_exec(&mut command);
        let target = SocketAddr::from((HOST_CLIENT_ADDR, API_PORT));
        let client = self.client.clone();
        let mut process = Process::spawn_with_probe(command, target, "the agent", move |addr| {
            client.run(move || crate::agent::listening(addr, Duration::from_millis(300)))
        });
        process.admin = Some(admin);
        process.config_path = Some(path);
        process
    }

    /// `limiter-agent ARGS… --instance <this>` in the test's own namespace;
    /// (success, stdout + stderr).
    #[must_use]
    pub fn cli(&self, args: &[&str]) -> (bool, String) {
        let output = Command::new(agent_binary())
            .args(args)
            .args(["--instance", &self.instance])
            .output()
            .expect("running limiter-agent");
        let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&output.stderr));
        (output.status.success(), text)
    }

    /// `status --json` of this instance.
    #[must_use]
    pub fn status(&self) -> serde_json::Value {
        let (ok, text) = self.cli(&["status", "--json"]);
        assert!(ok, "status failed: {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("status JSON: {e}: {text}"))
    }

    /// The host interface's `ip link` line (shows `xdp`/`xdpgeneric` when attached).
    #[must_use]
    pub fn link(&self, interface: &str) -> String {
        self.host.output("ip", &["link", "show", "dev", interface])
    }

    /// `bpftool map dump pinned` of one of this instance's maps.
    #[must_use]
    pub fn dump(&self, map: &str) -> String {
        let path = format!("/sys/fs/bpf/limiter/{}/{map}", self.instance);
        let output = Command::new("bpftool")
            .args(["map", "dump", "pinned", &path])
            .output()
            .expect("running bpftool (installed by cargo xtask setup)");
        assert!(
            output.status.success(),
            "bpftool map dump pinned {path}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in [&self.host, &self.client, &self.attacker] {
            let _ = Command::new("ip").args(["netns", "del", &ns.name]).status();
        }
        let _ = std::fs::remove_dir_all(format!("/sys/fs/bpf/limiter/{}", self.instance));
        let _ = std::fs::remove_file(format!("/run/limiter/{}.json", self.instance));
        let _ = std::fs::remove_file(format!("/run/limiter/{}.bans.json", self.instance));
        let _ = std::fs::remove_dir_all(
            std::env::temp_dir().join(format!("limiter-{}", self.instance)),
        );
    }
}

/// Where the bystanders live: third-party hosts on the far side of the
/// attacker's namespace, which routes between them and the host (as the
/// Internet would).
pub const BYSTANDERS: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 0);
/// The bystanders' prefix length: 65,536 addresses.
pub const BYSTANDERS_PREFIX: u8 = 16;
/// Where clients new to the host come from: a range routed through the
/// client's namespace (the host reaches it by its gateway, as it reaches
/// Internet clients), added to `vc` as needed.
pub const NEW_CLIENTS: Ipv4Addr = Ipv4Addr::new(10, 92, 0, 0);

/// A fourth namespace holding [`BYSTANDERS`]: every address of the range is
/// local there (one `local` route on its loopback), with no listener, so
/// its kernel answers a SYN-ACK it did not ask for with a RST, as any host
/// does. The attacker's namespace forwards between it and the host; the
/// host routes the range to the attacker. Removed on drop.
pub struct Bystanders {
    pub ns: Netns,
}

impl Topology {
    /// Adds the [`Bystanders`] behind the attacker.
    #[must_use]
    pub fn bystanders(&self) -> Bystanders {
        let ns = Netns {
            name: self.attacker.name.replacen("lim-a", "lim-b", 1),
        };
        let b = &ns.name.clone();
        let (a, h) = (&self.attacker.name, &self.host.name);
        let range = format!("{BYSTANDERS}/{BYSTANDERS_PREFIX}");
        ip(&["netns", "add", b]);
        let bystanders = Bystanders { ns };
        ip(&["-n", b, "link", "set", "lo", "up"]);
        ip(&[
            "-n", a, "link", "add", "ab", "type", "veth", "peer", "name", "vb", "netns", b,
        ]);
        ip(&["-n", a, "addr", "add", "10.91.3.1/24", "dev", "ab"]);
        ip(&["-n", a, "link", "set", "ab", "up"]);
        ip(&["-n", b, "addr", "add", "10.91.3.2/24", "dev", "vb"]);
        ip(&["-n", b, "link", "set", "vb", "up"]);
        ip(&["-n", b, "route", "add", "local", &range, "dev", "lo"]);
        ip(&["-n", b, "route", "add", "10.91.0.0/16", "via", "10.91.3.1"]);
        ip(&["-n", a, "route", "add", &range, "via", "10.91.3.2"]);
        let _ = self
            .attacker
            .output("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
        ip(&[
            "-n",
            h,
            "route",
            "add",
            &range,
            "via",
            &ATTACKER_ADDR.to_string(),
        ]);
        bystanders
    }

    /// Routes [`NEW_CLIENTS`] from the host through the client's namespace.
    pub fn route_new_clients(&self) {
        ip(&[
            "-n",
            &self.host.name,
            "route",
            "replace",
            "10.92.0.0/16",
            "via",
            &CLIENT_ADDR.to_string(),
        ]);
    }
}

impl Drop for Bystanders {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.ns.name])
            .status();
    }
}

/// The packets counted for (verdict, reason) in a [`Topology::status`] report.
#[must_use]
pub fn counter(status: &serde_json::Value, verdict: &str, reason: &str) -> u64 {
    counters(status)
        .filter(|c| c["verdict"] == verdict && c["reason"] == reason)
        .map(packets)
        .sum()
}

/// The packets dropped in a [`Topology::status`] report, for any reason.
#[must_use]
pub fn dropped(status: &serde_json::Value) -> u64 {
    counters(status)
        .filter(|c| c["verdict"] == "drop")
        .map(packets)
        .sum()
}

fn counters(status: &serde_json::Value) -> impl Iterator<Item = &serde_json::Value> {
    status["counters"].as_array().expect("counters").iter()
}

fn packets(counter: &serde_json::Value) -> u64 {
    counter["packets"].as_u64().expect("packets")
}

/// `GET path` on a fresh connection from inside `ns`; Err when the connection
/// can't be made or no whole answer comes back within `timeout`.
pub fn get(
    ns: &Netns,
    addr: SocketAddrV4,
    path: &str,
    timeout: Duration,
) -> std::io::Result<Response> {
    let path = path.to_owned();
    ns.run(move || {
        let mut stream = TcpStream::connect_timeout(&addr.into(), timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.write_all(http::get_request(&path, &[]).as_bytes())?;
        let mut raw = String::new();
        stream.read_to_string(&mut raw)?;
        let response = Response::parse(&raw);
        if response.status == 0 || !raw.contains("\r\n\r\n") {
            return Err(std::io::Error::other(format!("bad response: {raw:?}")));
        }
        Ok(response)
    })
}

/// Whether a TCP connection to `addr` from `ns` completes within `timeout`.
#[must_use]
pub fn connects(ns: &Netns, addr: SocketAddrV4, timeout: Duration) -> bool {
    ns.run(move || TcpStream::connect_timeout(&addr.into(), timeout).is_ok())
}

impl Topology {
    /// Runs `send(host, attacker)`, one of the SYN senders below, on a thread
    /// of its own, pinned to `cpu` when given (over veth the program runs on
    /// the sender's CPU, and the new-source budget is per CPU); join it for
    /// what the sender returns.
    pub fn flood_thread<T: Send + 'static>(
        &self,
        cpu: Option<usize>,
        send: impl FnOnce(&Netns, &Netns) -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let (host, attacker) = (self.host.clone(), self.attacker.clone());
        std::thread::spawn(move || {
            if let Some(cpu) = cpu {
                crate::pin_to_cpu(cpu);
            }
            send(&host, &attacker)
        })
    }
}

/// Sends `count` TCP SYNs from the attacker's veth to the host's API port, as
/// fast as one thread can, from rotating source ports; returns how long it took.
#[must_use]
pub fn syn_flood(host: &Netns, attacker: &Netns, count: u32) -> Duration {
    let started = std::time::Instant::now();
    let sent = flood(host, attacker, false, move |sent| sent >= u64::from(count));
    assert_eq!(sent, u64::from(count));
    started.elapsed()
}

/// Floods the host's API port with SYNs from the attacker for `duration`;
/// returns how many were sent.
#[must_use]
pub fn syn_flood_for(host: &Netns, attacker: &Netns, duration: Duration) -> u64 {
    let deadline = std::time::Instant::now() + duration;
    flood(host, attacker, false, move |sent| {
        sent % 256 == 0 && std::time::Instant::now() >= deadline
    })
}

/// Sends `count` SYNs from the attacker's veth, each from a different spoofed
/// source address (10.100.0.0 upwards): more sources than the per-source map
/// holds when `count` exceeds its capacity.
#[must_use]
pub fn spoofed_syn_flood(host: &Netns, attacker: &Netns, count: u32) -> Duration {
    let started = std::time::Instant::now();
    let sent = flood(host, attacker, true, move |sent| sent >= u64::from(count));
    assert_eq!(sent, u64::from(count));
    started.elapsed()
}

/// Sends SYNs from spoofed, ever-new source addresses (10.100.0.0 upwards)
/// until `stop` is set; returns how many were sent.
#[must_use]
pub fn spoofed_syn_flood_until(
    host: &Netns,
    attacker: &Netns,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> u64 {
    flood(host, attacker, true, move |sent| {
        sent % 256 == 0 && stop.load(Ordering::Relaxed)
    })
}

/// The first address [`spoofed_syn_flood`] sends from.
pub const SPOOFED_BASE: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 0);

/// Sends SYNs from the attacker's veth until `done(sent)` (from spoofed,
/// ever-new source addresses when `spoofed`); returns how many were sent.
fn flood(
    host: &Netns,
    attacker: &Netns,
    spoofed: bool,
    done: impl Fn(u64) -> bool + Send + 'static,
) -> u64 {
    let from = spoofed.then_some((SPOOFED_BASE, u32::MAX));
    flood_from(host, attacker, from, None, done)
}

/// Sends SYNs from spoofed sources `base`, `base + 1`, … (cycling through
/// `count` of them) at `rate` a second, until `stop` is set; returns how
/// many were sent.
#[must_use]
pub fn spoofed_syns_paced(
    host: &Netns,
    attacker: &Netns,
    (base, count): (Ipv4Addr, u32),
    rate: u32,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> u64 {
    flood_from(
        host,
        attacker,
        Some((base, count)),
        Some(rate),
        move |sent| sent % 64 == 0 && stop.load(Ordering::Relaxed),
    )
}

/// Sends SYNs through an `AF_PACKET` socket on the attacker's veth until
/// `done(sent)`: from the attacker's own address, or from `count` spoofed
/// sources from `base` on, cycling; as fast as one thread can, or at `rate`
/// a second; returns how many were sent.
fn flood_from(
    host: &Netns,
    attacker: &Netns,
    spoofed: Option<(Ipv4Addr, u32)>,
    rate: Option<u32>,
    done: impl Fn(u64) -> bool + Send + 'static,
) -> u64 {
    let dst_mac = mac(host, HOST_ATTACKER_IF);
    let src_mac = mac(attacker, "va");
    attacker.run(move || {
        // SAFETY: plain socket(2) call; the fd is closed below.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW,
                i32::from(u16::to_be(0x0003)), // ETH_P_ALL
            )
        };
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        let name = std::ffi::CString::new("va").expect("interface name");
        // SAFETY: a valid C string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert_ne!(ifindex, 0, "no interface va");
        // SAFETY: zeroed sockaddr_ll is valid; fields set below.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_ifindex = i32::try_from(ifindex).expect("ifindex fits i32");
        to.sll_halen = 6;
        to.sll_addr[..6].copy_from_slice(&dst_mac);
        // 40,000 distinct frames (source ports), built once.
        let frames: Vec<Vec<u8>> = (0..40_000u32)
            .map(|i| syn_frame(src_mac, dst_mac, ATTACKER_ADDR, 20_000 + i as u16, i))
            .collect();
        let mut sent = 0u64;
        let started = std::time::Instant::now();
        while !done(sent) {
            if let Some(rate) = rate {
                // Paced: never ahead of `rate` a second since the start.
                let due = started.elapsed().as_micros() * u128::from(rate) / 1_000_000;
                if u128::from(sent) >= due {
                    std::thread::sleep(Duration::from_micros(500));
                    continue;
                }
            }
            let fresh;
            let frame = if let Some((base, count)) = spoofed {
                let offset = (sent % u64::from(count.max(1))) as u32;
                let src = Ipv4Addr::from(u32::from(base).wrapping_add(offset));
                fresh = syn_frame(src_mac, dst_mac, src, 20_000, sent as u32);
                &fresh
            } else {
                &frames[(sent % 40_000) as usize]
            };
            // SAFETY: frame and address are valid for the lengths given.
            let rc = unsafe {
                libc::sendto(
                    fd,
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    (&raw const to).cast(),
                    size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if rc < 0 {
                let error = std::io::Error::last_os_error();
                // A full device queue under flood: retry.
                assert!(
                    error.raw_os_error() == Some(libc::ENOBUFS),
                    "sendto: {error}"
                );
                continue;
            }
            sent += 1;
        }
        // SAFETY: closing the fd we opened.
        unsafe { libc::close(fd) };
        sent
    })
}

fn mac(ns: &Netns, interface: &str) -> [u8; 6] {
    // /sys shows the test's own namespace; ask ip instead.
    let out = ns.output("ip", &["-o", "link", "show", "dev", interface]);
    let field = out
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .expect("a MAC address");
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(field.split(':')) {
        *byte = u8::from_str_radix(part, 16).expect("hex byte");
    }
    mac
}

/// Ethernet + IPv4 + TCP SYN from the attacker to the host's API port, with
/// valid checksums.
fn syn_frame(src_mac: [u8; 6], dst_mac: [u8; 6], src: Ipv4Addr, sport: u16, seq: u32) -> Vec<u8> {
    let src = src.octets();
    let dst = HOST_ATTACKER_ADDR.octets();
    let mut ip = vec![0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let sum = crate::packet::checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&API_PORT.to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = crate::packet::SYN;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let mut pseudo = Vec::with_capacity(32);
    pseudo.extend_from_slice(&src);
    pseudo.extend_from_slice(&dst);
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    pseudo.extend_from_slice(&tcp);
    let sum = crate::packet::checksum(&pseudo);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    let mut frame = Vec::with_capacity(54);
    frame.extend_from_slice(&dst_mac);
    frame.extend_from_slice(&src_mac);
    frame.extend_from_slice(&0x0800u16.to_be_bytes());
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&tcp);
    frame
}
