//! New clients during a spoofed SYN flood: clients from addresses the program
//! has never seen open connections to the agent while a flood from more
//! distinct sources than the per-source map holds goes on. Shared by the
//! namespace test (`tests/tests/kernel.rs`) and `cargo xtask bench flood`.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    os::fd::FromRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use aya::programs::XdpMode;
use limiter_agent::kernel::maps::Maps;

use crate::{
    http::{self, Response},
    netns::{
        API_PORT, HOST_CLIENT_ADDR, Netns, SPOOFED_BASE, Topology, ip, spoofed_syn_flood_until,
    },
    pin_to_cpu,
    xdp::Harness,
};

/// The trivial `XDP_PASS` program attached natively to a veth end, for as
/// long as this lives. A veth end receives what its peer sends back with
/// `XDP_TX` (the SYN challenge) only when its NAPI is on, which a native XDP
/// program turns on.
pub struct RxNapi {
    /// Dropping the program detaches it.
    _program: Harness,
}

impl RxNapi {
    /// Attaches it to `interface` in `ns`.
    #[must_use]
    pub fn attach(ns: &Netns, interface: &str) -> Self {
        let interface = interface.to_owned();
        let program = ns.run(move || {
            let mut program = Harness::baseline();
            program.attach(&interface, XdpMode::Driver);
            program
        });
        Self { _program: program }
    }
}

/// What the new clients got during one flood.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub attempts: u32,
    /// Handshakes completed within the timeout.
    pub connected: u32,
    /// Answered 200.
    pub served: u32,
    /// Connect times of the handshakes completed, in ms.
    pub connect_ms: Vec<f64>,
    /// Flood packets per second while the clients connected.
    pub flood_pps: f64,
    /// Per-source map entries of flood addresses when the flood stopped.
    pub map_entries_created_by_flood: usize,
}

impl Report {
    /// The `q` quantile (0..=1) of the connect times, in ms; 0 with none.
    #[must_use]
    pub fn connect_quantile(&self, q: f64) -> f64 {
        quantile(&self.connect_ms, q)
    }
}

/// The `q` quantile (nearest rank) of `values`; 0 when empty.
#[must_use]
pub fn quantile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let Some(last) = sorted.len().checked_sub(1) else {
        return 0.0;
    };
    // Nearest rank: the smallest value with at least `q` of them at or below.
    let rank = (0..=last)
        .find(|&i| ratio(i + 1, sorted.len()) >= q)
        .unwrap_or(last);
    sorted[rank]
}

/// `part / whole` for counts (far below 2^52).
fn ratio(part: usize, whole: usize) -> f64 {
    let count = |n: usize| f64::from(u32::try_from(n).unwrap_or(u32::MAX));
    count(part) / count(whole)
}

/// Connects from `local` to `to` within `timeout` (bound before connecting,
/// so the client is `local` to the host); the stream and the handshake's time.
pub fn connect_from(
    local: Ipv4Addr,
    to: SocketAddrV4,
    timeout: Duration,
) -> std::io::Result<(TcpStream, Duration)> {
    // SAFETY: plain socket(2); the fd is owned by the TcpStream below or
    // closed on error.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket nothing else owns.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    let sockaddr = |addr: SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    let bound = sockaddr(SocketAddrV4::new(local, 0));
    let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a valid sockaddr_in of the length given, on our socket.
    if unsafe { libc::bind(fd, (&raw const bound).cast(), len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // connect(2) honours the send timeout.
    stream.set_write_timeout(Some(timeout))?;
    let target = sockaddr(to);
    let started = Instant::now();
    // SAFETY: as for bind.
    if unsafe { libc::connect(fd, (&raw const target).cast(), len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((stream, started.elapsed()))
}

/// One client from `local`: connect, `GET path`, read the answer. The connect
/// time when the handshake completed, and whether the answer was a 200.
fn one_client(local: Ipv4Addr, path: &str, timeout: Duration) -> (Option<Duration>, bool) {
    let target = SocketAddrV4::new(HOST_CLIENT_ADDR, API_PORT);
    let Ok((mut stream, took)) = connect_from(local, target, timeout) else {
        return (None, false);
    };
    let served = (|| {
        stream.set_read_timeout(Some(timeout))?;
        stream.write_all(http::get_request(path, &[]).as_bytes())?;
        let mut raw = String::new();
        stream.read_to_string(&mut raw)?;
        std::io::Result::Ok(Response::parse(&raw).status == 200)
    })()
    .unwrap_or(false);
    (Some(took), served)
}

/// Runs `clients` new clients from fresh addresses `first`, `first + 1`, …
/// (in [`crate::netns::NEW_CLIENTS`], added to the client's veth `vc`; the host reaches
/// them through the client's namespace, as it reaches Internet clients by
/// its gateway), `batch` at a time, each allowed `timeout` to connect and
/// be answered.
#[must_use]
pub fn run_clients(
    topology: &Topology,
    first: Ipv4Addr,
    clients: u32,
    batch: u32,
    path: &str,
    timeout: Duration,
) -> Report {
    let mut report = Report {
        attempts: clients,
        ..Report::default()
    };
    let addrs: Vec<Ipv4Addr> = (0..clients)
        .map(|i| Ipv4Addr::from(u32::from(first) + i))
        .collect();
    let client = &topology.client.name;
    topology.route_new_clients();
    for addr in &addrs {
        ip(&[
            "-n",
            client,
            "addr",
            "add",
            &format!("{addr}/32"),
            "dev",
            "vc",
        ]);
    }
    for chunk in addrs.chunks(batch.max(1) as usize) {
        let threads: Vec<_> = chunk
            .iter()
            .map(|&addr| {
                let path = path.to_owned();
                topology.client.spawn(move || {
                    pin_to_cpu(0);
                    one_client(addr, &path, timeout)
                })
            })
            .collect();
        for thread in threads {
            let (took, served) = thread.join().expect("client thread");
            if let Some(took) = took {
                report.connected += 1;
                report.connect_ms.push(took.as_secs_f64() * 1000.0);
            }
            report.served += u32::from(served);
        }
    }
    for addr in &addrs {
        ip(&[
            "-n",
            client,
            "addr",
            "del",
            &format!("{addr}/32"),
            "dev",
            "vc",
        ]);
    }
    report
}

/// `clients` new clients with no flood: the baseline connect times.
#[must_use]
pub fn without_flood(topology: &Topology, first: Ipv4Addr, clients: u32, path: &str) -> Report {
    run_clients(topology, first, clients, 1, path, Duration::from_secs(3))
}

/// `clients` new clients while the attacker floods from ever-new spoofed
/// addresses at the rate one sender thread reaches. Flood and clients run on
/// CPU 0: over veth the program runs on the sender's CPU and the new-source
/// budget is per CPU, so the clients meet a budget the flood has spent, as on
/// a NIC whose every queue the flood reaches. The flood runs `warmup`
/// first, past the new-source budget's first window; clients go `batch` at a
/// time with `timeout` each.
#[must_use]
pub fn under_spoofed_flood(
    topology: &Topology,
    first: Ipv4Addr,
    clients: u32,
    batch: u32,
    path: &str,
    warmup: Duration,
    timeout: Duration,
) -> Report {
    let stop = Arc::new(AtomicBool::new(false));
    let flood = {
        let stop = Arc::clone(&stop);
        topology.flood_thread(Some(0), move |host, attacker| {
            spoofed_syn_flood_until(host, attacker, stop)
        })
    };
    let started = Instant::now();
    std::thread::sleep(warmup);
    let mut report = run_clients(topology, first, clients, batch, path, timeout);
    stop.store(true, Ordering::Relaxed);
    let sent = flood.join().expect("flood thread");
    report.flood_pps =
        f64::from(u32::try_from(sent).unwrap_or(u32::MAX)) / started.elapsed().as_secs_f64();
    let spoofed = u32::from(SPOOFED_BASE)..u32::from(SPOOFED_BASE).saturating_add(sent as u32);
    let maps = Maps::open_pinned(&std::path::PathBuf::from(format!(
        "/sys/fs/bpf/limiter/{}",
        topology.instance
    )))
    .expect("opening the pinned maps");
    report.map_entries_created_by_flood = maps
        .sources()
        .iter()
        .filter(|s| match s.addr {
            std::net::IpAddr::V4(v4) => spoofed.contains(&u32::from(v4)),
            std::net::IpAddr::V6(_) => false,
        })
        .count();
    report
}
