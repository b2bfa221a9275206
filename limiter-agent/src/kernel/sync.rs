//! The agent's config as the program sees it: API ports, ceilings (derived
//! from the tier table when left at 0), IPv6 grouping, mode, auto-ban.

use std::net::{IpAddr, UdpSocket};

use ipnet::IpNet;
use limiter_common::{TickCalibration, mode};

use crate::config::{Config, XdpMode};

/// Packets a client sends for one request at most on a fresh connection (SYN,
/// ACK, request, ACKs of the response, FIN, final ACK) with room for
/// retransmissions and a modest body.
pub const PACKETS_PER_REQUEST: u32 = 10;
/// Floors of the derived ceilings, so small tables don't cut normal use of
/// unlimited routes.
pub const MIN_PACKETS_PER_SECOND: u32 = 1000;
pub const MIN_SYNS_PER_SECOND: u32 = 100;

/// Requests one client may legitimately send within one second: every tier's
/// whole quota (fixed windows allow a window's quota as one burst).
#[must_use]
pub fn burst_requests(config: &Config) -> u32 {
    config
        .live
        .tiers
        .iter()
        .map(|t| t.limit.get())
        .fold(0u32, u32::saturating_add)
}

/// `max_packets_per_second`, or when 0: `max(1000, 10 × Σ tier limits)`.
#[must_use]
pub fn packet_ceiling(config: &Config) -> u32 {
    match config.live.xdp.max_packets_per_second {
        0 => burst_requests(config)
            .saturating_mul(PACKETS_PER_REQUEST)
            .max(MIN_PACKETS_PER_SECOND),
        set => set,
    }
}

/// `max_syns_per_second`, or when 0: `max(100, 2 × Σ tier limits)` (a new
/// connection per request, each SYN possibly retransmitted once).
#[must_use]
pub fn syn_ceiling(config: &Config) -> u32 {
    match config.live.xdp.max_syns_per_second {
        0 => burst_requests(config)
            .saturating_mul(2)
            .max(MIN_SYNS_PER_SECOND),
        set => set,
    }
}

/// `max_new_sources_per_second`, or when 0: the per-source map's capacity / 64
/// (2,048 a second): a flood of fresh (spoofed) addresses then needs over a
/// minute to cycle the whole map, so a client sending at least once a minute
/// keeps its entry, its counters and its ban.
#[must_use]
pub fn new_source_ceiling(config: &Config) -> u32 {
    match config.live.xdp.max_new_sources_per_second {
        0 => limiter_common::SOURCES_CAPACITY / 64,
        set => set,
    }
}

/// The per-CPU share of the new-source ceiling (the program counts per CPU).
#[must_use]
pub fn new_sources_per_cpu(config: &Config, cpus: u32) -> u32 {
    new_source_ceiling(config).div_ceil(cpus.max(1))
}

/// Sources the challenge may admit to probation per second, all CPUs
/// together: the probation map's capacity / 4, so a client admitted there
/// stays at least four seconds, however fast a campaign of reflected RSTs
/// churns the map, far longer than its handshake takes.
#[must_use]
pub fn challenge_admissions_per_second() -> u32 {
    limiter_common::PROBATION_CAPACITY / 4
}

/// `max_syn_acks_per_second`, or when 0: as many challenge SYN-ACKs a
/// second as the challenge may admit sources (8,192): one answer per
/// admission, and no more reflected toward whatever addresses a flood claims.
#[must_use]
pub fn syn_ack_cap(config: &Config) -> u32 {
    match config.live.xdp.max_syn_acks_per_second {
        0 => challenge_admissions_per_second(),
        set => set,
    }
}

/// The addresses of this host's interfaces (in the agent's network
/// namespace, where it attaches), which the SYN challenge never answers:
/// read at start and on each reload.
#[must_use]
pub fn local_addresses() -> Vec<IpAddr> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list it allocates, freed below.
    if unsafe { libc::getifaddrs(&raw mut head) } != 0 {
        tracing::warn!(
            "listing the host's addresses: {}",
            std::io::Error::last_os_error()
        );
        return Vec::new();
    }
    let mut addrs = Vec::new();
    let mut next = head;
    while !next.is_null() {
        // SAFETY: a node of the list getifaddrs returned, not yet freed.
        let entry = unsafe { &*next };
        if !entry.ifa_addr.is_null() {
            // SAFETY: `ifa_addr` points at a sockaddr of the family it
            // names; each arm reads the struct of that family (unaligned:
            // the list promises only a `sockaddr`'s alignment).
            let addr = unsafe {
                match i32::from((*entry.ifa_addr).sa_family) {
                    libc::AF_INET => {
                        let v4 = entry.ifa_addr.cast::<libc::sockaddr_in>().read_unaligned();
                        Some(IpAddr::from(v4.sin_addr.s_addr.to_ne_bytes()))
                    }
                    libc::AF_INET6 => {
                        let v6 = entry.ifa_addr.cast::<libc::sockaddr_in6>().read_unaligned();
                        Some(IpAddr::from(v6.sin6_addr.s6_addr))
                    }
                    _ => None,
                }
            };
            addrs.extend(addr);
        }
        next = entry.ifa_next;
    }
    // SAFETY: the list getifaddrs allocated, freed once.
    unsafe { libc::freeifaddrs(head) };
    addrs.sort_unstable();
    addrs.dedup();
    addrs
}

/// The API ports: `[xdp] ports`, or the listen port.
#[must_use]
pub fn ports(config: &Config) -> Vec<u16> {
    if config.live.xdp.ports.is_empty() {
        vec![config.startup.listen.port()]
    } else {
        config.live.xdp.ports.clone()
    }
}

/// The program's config for `config`, keeping `clock` (calibrated once per
/// boot), for a machine with `cpus` possible CPUs.
#[must_use]
pub fn program_config(
    config: &Config,
    clock: TickCalibration,
    cpus: u32,
) -> limiter_common::ProgramConfig {
    let mut out = limiter_common::ProgramConfig {
        ipv6_mask: limiter_common::ipv6_mask(config.live.ipv6_prefix),
        window_ns: 1_000_000_000,
        autoban_ns: config.live.xdp.ban_seconds.saturating_mul(1_000_000_000),
        clock,
        max_packets: packet_ceiling(config),
        max_syns: syn_ceiling(config),
        policy_gen: 1,
        autoban_after_windows: config.live.xdp.autoban_after_seconds,
        max_new_sources: new_sources_per_cpu(config, cpus),
        mode: match config.live.xdp.mode {
            XdpMode::Enforce => mode::ENFORCE,
            XdpMode::Observe => mode::OBSERVE,
        },
        syn_challenge: u8::from(config.live.xdp.syn_challenge),
        max_syn_acks: syn_ack_cap(config).div_ceil(cpus.max(1)),
        max_challenge_admissions: challenge_admissions_per_second().div_ceil(cpus.max(1)),
        ..limiter_common::ProgramConfig::default()
    };
    for (slot, port) in out.ports.iter_mut().zip(ports(config)) {
        *slot = port.to_be();
    }
    out
}

/// Networks the program never counts or bans: `[xdp] allow`, the trusted
/// proxies (a load balancer's packet rate is that of all the clients behind
/// it, which the proxy limits one by one; counted as one source it would meet
/// the ceilings and be auto-banned, taking every client down), and the
/// upstream when it runs on this host.
#[must_use]
pub fn allow_list(config: &Config) -> Vec<IpNet> {
    let mut nets = config.live.xdp.allow.as_slice().to_vec();
    nets.extend_from_slice(config.live.trusted_proxies.as_slice());
    nets.extend(local_upstream(&config.live.upstream).map(IpNet::from));
    nets.sort_unstable();
    nets.dedup();
    nets
}

/// The upstream's address when the URI names it by a literal address of this
/// host (loopback, or one the host can bind); `None` for a host name or a
/// remote address.
fn local_upstream(upstream: &http::Uri) -> Option<IpAddr> {
    let host = upstream.host()?;
    let literal = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
    let ip = literal
        .unwrap_or(host)
        .parse::<IpAddr>()
        .ok()?
        .to_canonical();
    if ip.is_unspecified() {
        return None;
    }
    (ip.is_loopback() || UdpSocket::bind((ip, 0)).is_ok()).then_some(ip)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::escalate::EscalationSettings;

    #[test]
    fn derived_ceilings_follow_the_reference_table() {
        let config = Config::parse(include_str!("../../../examples/concurred.toml")).unwrap();
        // 120 + 60 + 60 + 60 + 30 + 30 + 40 + 10
        assert_eq!(burst_requests(&config), 410);
        assert_eq!(packet_ceiling(&config), 4100);
        assert_eq!(syn_ceiling(&config), 820);
        assert_eq!(ports(&config), vec![8080]);
        let k = program_config(&config, TickCalibration::default(), 2);
        assert_eq!(k.max_new_sources, 1024, "2048 a second over two CPUs");
        assert_eq!(k.max_syn_acks, 4096, "8192 a second over two CPUs");
        assert_eq!(k.max_challenge_admissions, 4096);
        assert_eq!(k.ports[0], 8080u16.to_be());
        assert_eq!(k.ports[1], 0);
        assert_eq!(k.max_packets, 4100);
        assert_eq!(k.mode, mode::ENFORCE);
        assert_eq!(k.autoban_ns, 60_000_000_000);
        assert_eq!(EscalationSettings::from_config(&config).threshold(60), 60);
        assert_eq!(EscalationSettings::from_config(&config).threshold(3), 10);
    }

    #[test]
    fn explicit_values_win_and_small_tables_get_the_floors() {
        let text = "[server]\nlisten = \"127.0.0.1:8080\"\n[xdp]\nports = [443, 8443]\nmax_syns_per_second = 7\n\
                    mode = \"observe\"\nescalate_after_rejections = 4\n\
                    [[tier]]\nroute = \"/a\"\nlimit = 5\nwindow = \"1m\"\n";
        let config = Config::parse(text).unwrap();
        assert_eq!(packet_ceiling(&config), MIN_PACKETS_PER_SECOND);
        assert_eq!(syn_ceiling(&config), 7);
        assert_eq!(ports(&config), vec![443, 8443]);
        let k = program_config(&config, TickCalibration::default(), 3);
        assert_eq!(k.max_new_sources, 683, "2048 a second over three CPUs");
        assert_eq!(k.max_syn_acks, 2731, "8192 a second over three CPUs");
        assert_eq!((k.ports[0], k.ports[1]), (443u16.to_be(), 8443u16.to_be()));
        assert_eq!(k.mode, mode::OBSERVE);
        assert_eq!(EscalationSettings::from_config(&config).threshold(100), 4);
    }

    #[test]
    fn the_hosts_own_addresses_include_loopback() {
        let addrs = local_addresses();
        assert!(addrs.contains(&IpAddr::from([127, 0, 0, 1])), "{addrs:?}");
    }

    #[test]
    fn trusted_proxies_and_a_local_upstream_join_the_allow_list() {
        let with = |server: &str, xdp: &str| {
            let text = format!(
                "[server]\nlisten = \"127.0.0.1:8080\"\n{server}\n[xdp]\n{xdp}\n\
                 [[tier]]\nroute = \"/a\"\nlimit = 5\nwindow = \"1m\"\n"
            );
            let config = Config::parse(&text).unwrap();
            allow_list(&config)
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            with(
                "upstream = \"http://127.0.0.1:9000\"\ntrusted_proxies = [\"10.0.0.0/8\", \"192.0.2.7\"]",
                "allow = [\"192.0.2.7\", \"2001:db8::/48\"]"
            ),
            [
                "10.0.0.0/8",
                "127.0.0.1/32",
                "192.0.2.7/32",
                "2001:db8::/48"
            ]
        );
        assert_eq!(with("upstream = \"http://[::1]:9000\"", ""), ["::1/128"]);
        // A remote address, a name or the unspecified address is not the host's.
        for upstream in [
            "http://192.0.2.1:80",
            "http://localhost:9000",
            "http://0.0.0.0:80",
        ] {
            assert_eq!(
                with(&format!("upstream = \"{upstream}\""), ""),
                Vec::<String>::new(),
                "{upstream}"
            );
        }
    }
}
