//! The parse paths: what counts as API traffic to the declared ports (IPv4,
//! IPv6, every port slot) and what passes as non-API (other ports, UDP, other
//! ethertypes, the all-zero config).

use limiter_common::{
    ProgramConfig,
    reason::{API, FRAGMENT, MALFORMED, NON_API},
    verdict::PASS,
};
use limiter_tests::{
    monotonic_ns,
    packet::{ACK, Frame, PSH, SYN, ethernet},
    xdp::{API_PORT, Harness, XDP_PASS},
};

use crate::support::{
    CLOCK_SLACK, ETH_LEN, HOP_BY_HOP, OTHER_PORT, api4, api6, assert_counts, assert_stats, entry,
    send, v4, v6, v6_64,
};

#[test]
fn ipv4_tcp_syn_to_the_api_port_is_counted_as_api() {
    let h = Harness::new();
    let before = monotonic_ns();
    send(&h, &api4([192, 0, 2, 1], SYN), XDP_PASS);
    let after = monotonic_ns();
    assert_stats(&h, &[(PASS, API, 1)]);
    let s = entry(&h, &v4([192, 0, 2, 1]));
    assert_eq!((s.packets, s.syns, s.strikes), (1, 1, 0), "{s:?}");
    assert_eq!(
        (s.ban_until_ns, s.autoban_until_ns, s.flags),
        (0, 0, 0),
        "{s:?}"
    );
    assert_eq!(s.policy_gen, 1, "the entry read the policy at generation 1");
    assert!(
        s.window_start_ns + CLOCK_SLACK >= before && s.window_start_ns <= after + CLOCK_SLACK,
        "window_start_ns {} is not the program's now (between {before} and {after})",
        s.window_start_ns
    );
    assert_eq!(h.source_count(), 1);
}

#[test]
fn acks_and_syn_acks_count_as_packets_but_not_as_syns() {
    let h = Harness::new();
    let src = [192, 0, 2, 2];
    send(&h, &api4(src, SYN), XDP_PASS);
    send(&h, &api4(src, SYN | ACK), XDP_PASS);
    send(&h, &api4(src, ACK), XDP_PASS);
    send(&h, &api4(src, ACK | PSH), XDP_PASS);
    assert_stats(&h, &[(PASS, API, 4)]);
    assert_counts(&h, &v4(src), 4, 1, 0);
}

#[test]
fn tcp_to_a_port_that_is_not_an_api_port_is_non_api() {
    let h = Harness::new();
    send(
        &h,
        &Frame::tcp4([192, 0, 2, 3], OTHER_PORT, SYN).build(),
        XDP_PASS,
    );
    send(&h, &Frame::tcp6("2001:db8::3", 443, SYN).build(), XDP_PASS);
    assert_stats(&h, &[(PASS, NON_API, 2)]);
    assert_eq!(h.source_count(), 0, "non-API traffic touches no source");
}

#[test]
fn udp_to_the_api_port_is_non_api() {
    let h = Harness::new();
    let udp4 = Frame::tcp4([192, 0, 2, 4], API_PORT, 0)
        .udp(API_PORT)
        .build();
    let udp6 = Frame::tcp6("2001:db8::4", API_PORT, 0)
        .udp(API_PORT)
        .build();
    assert_eq!(udp4[ETH_LEN + 9], 17, "IPv4 protocol is UDP");
    assert_eq!(udp6[ETH_LEN + 6], 17, "IPv6 next header is UDP");
    send(&h, &udp4, XDP_PASS);
    send(&h, &udp6, XDP_PASS);
    assert_stats(&h, &[(PASS, NON_API, 2)]);
    assert_eq!(h.source_count(), 0);
}

#[test]
fn non_ip_ethertypes_are_non_api() {
    let h = Harness::new();
    // An ARP request (28 bytes), a bare 14-byte ARP frame, and LLDP.
    let mut arp = vec![0, 1, 0x08, 0x00, 6, 4, 0, 1];
    arp.extend_from_slice(&[0x02, 0, 0, 0, 0, 2, 192, 0, 2, 5]);
    arp.extend_from_slice(&[0, 0, 0, 0, 0, 0, 192, 0, 2, 1]);
    send(&h, &ethernet(0x0806, &arp), XDP_PASS);
    send(&h, &ethernet(0x0806, &[]), XDP_PASS);
    send(&h, &ethernet(0x88cc, &[0; 32]), XDP_PASS);
    assert_stats(&h, &[(PASS, NON_API, 3)]);
    assert_eq!(h.source_count(), 0);
}

#[test]
fn ipv6_tcp_to_the_api_port_is_counted_as_api_under_its_64() {
    let h = Harness::new();
    let addr = "2001:db8:1:2:3:4:5:6";
    send(&h, &api6(addr, SYN), XDP_PASS);
    assert_stats(&h, &[(PASS, API, 1)]);
    assert_counts(&h, &v6_64(addr), 1, 1, 0);
    assert!(
        h.source(&v6(addr, 128)).is_none(),
        "the entry is keyed by the /64, not the full address"
    );
    assert_eq!(h.source_count(), 1);
}

#[test]
fn every_api_port_slot_matches_in_network_byte_order() {
    let mut h = Harness::new();
    h.update_config(|c| c.ports[7] = 443u16.to_be());
    let src = [192, 0, 2, 6];
    send(&h, &Frame::tcp4(src, 443, SYN).build(), XDP_PASS);
    send(&h, &Frame::tcp4(src, API_PORT, ACK).build(), XDP_PASS);
    // 8080 byte-swapped: a program comparing in host order would match it.
    let swapped = API_PORT.swap_bytes();
    send(&h, &Frame::tcp4(src, swapped, SYN).build(), XDP_PASS);
    // Unused slots hold 0, which must not match port 0.
    send(&h, &Frame::tcp4(src, 0, SYN).build(), XDP_PASS);
    assert_stats(&h, &[(PASS, API, 2), (PASS, NON_API, 2)]);
    assert_counts(&h, &v4(src), 2, 1, 0);
}

#[test]
fn an_all_zero_config_passes_everything_as_non_api() {
    let mut h = Harness::new();
    h.set_config(&ProgramConfig::default());
    let frames = [
        api4([192, 0, 2, 70], SYN),
        api4([192, 0, 2, 70], ACK),
        api6("2001:db8::70", SYN),
        Frame::tcp4([192, 0, 2, 70], API_PORT, SYN)
            .vlans(&[100, 200])
            .ipv4_options(&[1; 4])
            .build(),
        Frame::tcp6("2001:db8::70", API_PORT, SYN)
            .ipv6_ext(HOP_BY_HOP, 8)
            .build(),
        Frame::tcp4([192, 0, 2, 70], API_PORT, 0)
            .udp(API_PORT)
            .build(),
        Frame::tcp4([192, 0, 2, 70], 0, SYN).build(),
    ];
    for frame in &frames {
        send(&h, frame, XDP_PASS);
    }
    assert_stats(&h, &[(PASS, NON_API, frames.len() as u64)]);
    assert_eq!(h.source_count(), 0);
    // Later fragments and malformed frames keep their own reasons, and pass
    // (no ceilings to meet).
    send(
        &h,
        &Frame::tcp4([192, 0, 2, 70], API_PORT, SYN)
            .ipv4_frag(185)
            .build(),
        XDP_PASS,
    );
    send(&h, &frames[0][..ETH_LEN + 10], XDP_PASS);
    assert_stats(
        &h,
        &[
            (PASS, NON_API, frames.len() as u64),
            (PASS, FRAGMENT, 1),
            (PASS, MALFORMED, 1),
        ],
    );
}
