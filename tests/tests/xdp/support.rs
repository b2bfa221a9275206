//! What every part of the suite shares: time and window constants, header
//! lengths, the frames, sends and exact assertions on verdicts, counters
//! and per-source entries.

use std::net::{IpAddr, Ipv6Addr};

use ipnet::IpNet;
use limiter_agent::{kernel::maps::source_key, net::parse_net};
use limiter_common::{SourceKey, SourceState, reason, reason::API, verdict, verdict::PASS};
use limiter_tests::{
    monotonic_ns,
    packet::{Frame, SYN},
    xdp::{API_PORT, Harness, XDP_DROP, XDP_PASS, XDP_TX},
};

pub const SECOND: u64 = 1_000_000_000;
/// The ceiling window of the ceiling and auto-ban tests: long enough that no
/// window ends by itself while a test runs on a loaded machine. Tests end a
/// window by moving the entry's `window_start_ns` back.
pub const WINDOW_NS: u64 = 10 * SECOND;
/// Where to move a window's start to end it: "just over one window" ago makes
/// the next packet start the directly following window (strikes carry over);
/// "over two windows" ago leaves a gap (strikes reset). Both keep a tenth of a
/// window clear of the boundary, since the program's clock runs up to one tick
/// behind `CLOCK_MONOTONIC`.
pub const ONE_WINDOW_AGO: u64 = WINDOW_NS + WINDOW_NS / 10;
pub const TWO_WINDOWS_AGO: u64 = 2 * WINDOW_NS + WINDOW_NS / 10;
/// Further ahead than any test lasts.
pub const MINUTE: u64 = 60 * SECOND;
/// The program's clock is `CLOCK_MONOTONIC` with the resolution of one tick
/// (at most 10 ms); this covers that and the calibration.
pub const CLOCK_SLACK: u64 = 50_000_000;
/// A port the test config does not declare.
pub const OTHER_PORT: u16 = 22;

pub const ETH_LEN: usize = 14;
pub const VLAN_LEN: usize = 4;
pub const IPV4_LEN: usize = 20;
pub const IPV6_LEN: usize = 40;
pub const TCP_LEN: usize = 20;

/// IPv6 extension header types.
pub const HOP_BY_HOP: u8 = 0;
pub const ROUTING: u8 = 43;
pub const FRAGMENT_HEADER: u8 = 44;
pub const AH: u8 = 51;
pub const DEST_OPTS: u8 = 60;

/// IPv4 flags + fragment offset: more fragments, don't fragment.
pub const IPV4_MF: u16 = 0x2000;
pub const IPV4_DF: u16 = 0x4000;
/// IPv6 fragment header offset/M field: the M (more fragments) flag.
pub const IPV6_M: u16 = 0x0001;
/// IPv6 fragment header offset/M field: an offset of `units` 8-octet units.
pub const fn ipv6_frag_offset(units: u16) -> u16 {
    units << 3
}

pub fn v4(octets: [u8; 4]) -> SourceKey {
    SourceKey::from_v4(octets)
}

/// The key of an IPv6 address grouped to `prefix` bits, as the agent keys it.
pub fn v6(addr: &str, prefix: u8) -> SourceKey {
    let ip: Ipv6Addr = addr.parse().expect("IPv6 literal");
    source_key(IpAddr::V6(ip), prefix)
}

/// The per-source key of an IPv6 address under the test config's /64 grouping.
pub fn v6_64(addr: &str) -> SourceKey {
    v6(addr, 64)
}

pub fn api4(src: [u8; 4], flags: u8) -> Vec<u8> {
    Frame::tcp4(src, API_PORT, flags).build()
}

pub fn api6(src: &str, flags: u8) -> Vec<u8> {
    Frame::tcp6(src, API_PORT, flags).build()
}

pub fn action_name(action: u32) -> &'static str {
    match action {
        0 => "XDP_ABORTED",
        XDP_DROP => "XDP_DROP",
        XDP_PASS => "XDP_PASS",
        XDP_TX => "XDP_TX",
        4 => "XDP_REDIRECT",
        _ => "unknown action",
    }
}

pub fn stat_names(stats: &[(u32, u32, u64)]) -> String {
    stats
        .iter()
        .map(|&(v, r, n)| {
            format!(
                "{}/{}={n}",
                verdict::NAMES[v as usize],
                reason::NAMES[r as usize]
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Asserts the exact set of non-zero (verdict, reason, count) counters.
#[track_caller]
pub fn assert_stats(h: &Harness, expected: &[(u32, u32, u64)]) {
    let mut want = expected.to_vec();
    want.sort_unstable();
    let got = h.nonzero_stats();
    assert_eq!(
        got,
        want,
        "stats: got [{}], want [{}]",
        stat_names(&got),
        stat_names(&want)
    );
}

/// Runs `frame` once and asserts the XDP action.
#[track_caller]
pub fn send(h: &Harness, frame: &[u8], action: u32) {
    let got = h.run(frame);
    assert_eq!(
        got,
        action,
        "{} for a {}-byte frame, want {}",
        action_name(got),
        frame.len(),
        action_name(action)
    );
}

/// Runs `frame` `n` times, asserting the XDP action each time.
#[track_caller]
pub fn send_n(h: &Harness, frame: &[u8], n: u32, action: u32) {
    for i in 1..=n {
        let got = h.run(frame);
        assert_eq!(
            got,
            action,
            "packet {i} of {n}: {}, want {}",
            action_name(got),
            action_name(action)
        );
    }
}

/// The per-source entry of `key`, which must exist.
#[track_caller]
pub fn entry(h: &Harness, key: &SourceKey) -> SourceState {
    h.source(key)
        .unwrap_or_else(|| panic!("no per-source entry for {key:?}"))
}

/// Asserts (packets, syns, strikes) of the entry of `key`.
#[track_caller]
pub fn assert_counts(h: &Harness, key: &SourceKey, packets: u32, syns: u32, strikes: u16) {
    let s = entry(h, key);
    assert_eq!(
        (s.packets, s.syns, s.strikes),
        (packets, syns, strikes),
        "(packets, syns, strikes) of {key:?} in {s:?}"
    );
}

/// Moves the current window of `key` to have started `ago_ns` before now.
pub fn start_window_ago(h: &mut Harness, key: &SourceKey, ago_ns: u64) {
    let mut state = entry(h, key);
    state.window_start_ns = monotonic_ns()
        .checked_sub(ago_ns)
        .expect("CLOCK_MONOTONIC is younger than the window to move: boot longer ago");
    h.put_source(key, &state);
}

/// A harness with `WINDOW_NS` windows and the given ceilings (0 = none).
pub fn limited(max_packets: u32, max_syns: u32) -> Harness {
    let mut h = Harness::new();
    h.update_config(|c| {
        c.window_ns = WINDOW_NS;
        c.max_packets = max_packets;
        c.max_syns = max_syns;
    });
    h
}

/// Sends one SYN from an IPv6 source through `ext` headers (type, bytes) to the
/// API port and asserts it is counted as API under its /64.
#[track_caller]
pub fn assert_ipv6_ext_api(ext: &[(u8, usize)]) {
    let h = Harness::new();
    let mut frame = Frame::tcp6("2001:db8:e::1", API_PORT, SYN);
    for &(header_type, len) in ext {
        frame = frame.ipv6_ext(header_type, len);
    }
    let bytes = frame.build();
    let ext_len: usize = ext.iter().map(|(_, len)| len).sum();
    assert_eq!(bytes.len(), ETH_LEN + IPV6_LEN + ext_len + TCP_LEN);
    send(&h, &bytes, XDP_PASS);
    assert_stats(&h, &[(PASS, API, 1)]);
    assert_counts(&h, &v6_64("2001:db8:e::1"), 1, 1, 0);
}

/// A harness with a packet ceiling of `max_packets` and a one-minute auto-ban
/// after `after` windows over it.
pub fn autobanning(max_packets: u32, after: u16) -> Harness {
    let mut h = limited(max_packets, 0);
    h.update_config(|c| {
        c.autoban_ns = MINUTE;
        c.autoban_after_windows = after;
    });
    h
}

/// A single IPv4 address as a network (a /32), as bans and allow entries take it.
pub fn host(octets: [u8; 4]) -> IpNet {
    IpNet::from(IpAddr::from(octets))
}

/// `IP/LEN` as the agent parses it.
pub fn net(text: &str) -> IpNet {
    parse_net(text).unwrap_or_else(|e| panic!("{e}"))
}

/// Keeps the calling thread on one CPU: the new-source budget is per CPU, and
/// `BPF_PROG_TEST_RUN` runs the program on the caller's.
pub fn pin_to_one_cpu() {
    limiter_tests::pin_to_cpu(0);
}
