//! IP fragments. A first fragment that holds the TCP header is its whole
//! packet (Linux discards overlapping fragments, so that header is the one
//! reassembled); every other fragment has no port to read, so it is counted
//! against its source as API traffic: bans, the packet ceiling and the
//! new-source budget apply to it like to any API packet.

use limiter_common::{
    reason::{API, BANNED, FRAGMENT, NEW_SOURCE_CEILING, NON_API, PACKET_CEILING, SYN_CEILING},
    verdict::{DROP, PASS},
};
use limiter_tests::{
    monotonic_ns,
    packet::{ACK, Frame, SYN},
    xdp::{API_PORT, Harness, XDP_DROP, XDP_PASS},
};

use crate::support::{
    ETH_LEN, FRAGMENT_HEADER, HOP_BY_HOP, IPV4_DF, IPV4_LEN, IPV4_MF, IPV6_LEN, IPV6_M, MINUTE,
    OTHER_PORT, ROUTING, SECOND, api4, assert_counts, assert_stats, autobanning, entry, host,
    ipv6_frag_offset, limited, net, send, send_n, v4, v6_64,
};

/// A first IPv4 fragment of a SYN to the API port holding only the first
/// `tcp_bytes` of the TCP header.
fn tiny_first_fragment(src: [u8; 4], tcp_bytes: usize) -> Vec<u8> {
    let mut frame = Frame::tcp4(src, API_PORT, SYN).ipv4_frag(IPV4_MF).build();
    frame.truncate(ETH_LEN + IPV4_LEN + tcp_bytes);
    frame
}

#[test]
fn every_ipv4_fragment_is_counted_against_its_source() {
    // Ten-second windows: the counts must not start over midway.
    let h = limited(0, 0);
    let src = [192, 0, 2, 40];
    let frag = |field: u16| Frame::tcp4(src, API_PORT, SYN).ipv4_frag(field).build();
    // A first fragment holding the TCP header is its packet: an API SYN.
    send(&h, &frag(IPV4_MF), XDP_PASS);
    // The last and a middle fragment carry no port: counted, as fragments.
    send(&h, &frag(185), XDP_PASS);
    send(&h, &frag(IPV4_MF | 1), XDP_PASS);
    // A first fragment too short for the ports: counted, as a fragment.
    send(&h, &tiny_first_fragment(src, 2), XDP_PASS);
    // A first fragment of UDP, or of TCP to another port, is not API traffic;
    // a later fragment of UDP cannot be told from one of TCP.
    send(
        &h,
        &Frame::tcp4(src, 0, 0).udp(53).ipv4_frag(IPV4_MF).build(),
        XDP_PASS,
    );
    send(
        &h,
        &Frame::tcp4(src, OTHER_PORT, SYN).ipv4_frag(IPV4_MF).build(),
        XDP_PASS,
    );
    send(
        &h,
        &Frame::tcp4(src, 0, 0).udp(53).ipv4_frag(100).build(),
        XDP_PASS,
    );
    // DF with offset 0 is a whole packet.
    send(&h, &frag(IPV4_DF), XDP_PASS);
    assert_stats(
        &h,
        &[(PASS, API, 2), (PASS, FRAGMENT, 4), (PASS, NON_API, 2)],
    );
    assert_counts(&h, &v4(src), 6, 2, 0);
    assert_eq!(h.source_count(), 1);
}

#[test]
fn a_syn_flood_sent_as_two_fragment_syns_meets_the_syn_ceiling() {
    // Linux reassembles the two pieces and the SYN reaches the listener, so
    // the first piece is counted as the SYN it starts.
    let h = limited(1000, 3);
    let src = [198, 51, 100, 40];
    let first = Frame::tcp4(src, API_PORT, SYN).ipv4_frag(IPV4_MF).build();
    let second = Frame::tcp4(src, API_PORT, SYN).ipv4_frag(3).build();
    for _ in 0..3 {
        send(&h, &first, XDP_PASS);
        send(&h, &second, XDP_PASS);
    }
    send(&h, &first, XDP_DROP);
    assert_stats(
        &h,
        &[(PASS, API, 3), (PASS, FRAGMENT, 3), (DROP, SYN_CEILING, 1)],
    );
    assert_counts(&h, &v4(src), 7, 4, 1);
}

#[test]
fn tiny_and_later_fragments_meet_the_packet_ceiling() {
    // A first fragment cut inside the TCP header hides its flags and a later
    // one its port; neither escapes the packet ceiling.
    let h = limited(4, 1);
    let src = [198, 51, 100, 41];
    send_n(&h, &tiny_first_fragment(src, 8), 2, XDP_PASS);
    send_n(
        &h,
        &Frame::tcp4(src, API_PORT, ACK).ipv4_frag(7).build(),
        2,
        XDP_PASS,
    );
    send(&h, &tiny_first_fragment(src, 8), XDP_DROP);
    send(
        &h,
        &Frame::tcp4(src, API_PORT, ACK).ipv4_frag(7).build(),
        XDP_DROP,
    );
    assert_stats(&h, &[(PASS, FRAGMENT, 4), (DROP, PACKET_CEILING, 2)]);
    assert_counts(&h, &v4(src), 6, 0, 1);
}

#[test]
fn fragments_of_unknown_sources_spend_the_new_source_budget() {
    // During a spoofed flood (the budget spent) a fragment from a source the
    // map does not hold is dropped like any packet of such a source: it
    // cannot be shown to be anything but API traffic, and passing it would
    // let the flood through as fragments. Tracked sources are unaffected.
    let mut h = limited(0, 0);
    h.update_config(|c| c.max_new_sources = 1);
    let frag = |src| Frame::tcp4(src, API_PORT, ACK).ipv4_frag(9).build();
    let known = [192, 0, 2, 41];
    send(&h, &frag(known), XDP_PASS);
    send(&h, &frag([203, 0, 113, 1]), XDP_DROP);
    send(&h, &frag([203, 0, 113, 2]), XDP_DROP);
    send(&h, &frag(known), XDP_PASS);
    assert_stats(&h, &[(PASS, FRAGMENT, 2), (DROP, NEW_SOURCE_CEILING, 2)]);
    assert_eq!(
        h.source_count(),
        1,
        "the flood's fragments created no entry"
    );
}

#[test]
fn ipv4_fragments_from_a_banned_source_are_dropped() {
    let mut h = Harness::new();
    let until = monotonic_ns() + MINUTE;
    // A banned source with no entry yet.
    let new = [203, 0, 113, 40];
    h.ban(host(new), until);
    let frag = |src, field: u16| Frame::tcp4(src, API_PORT, ACK).ipv4_frag(field).build();
    send(&h, &frag(new, IPV4_MF), XDP_DROP);
    send(&h, &frag(new, 100), XDP_DROP);
    send(&h, &tiny_first_fragment(new, 8), XDP_DROP);
    assert_eq!(entry(&h, &v4(new)).ban_until_ns, until);

    // A known source banned afterwards: the entry re-reads the tries.
    let known = [203, 0, 113, 41];
    send(&h, &api4(known, SYN), XDP_PASS);
    h.ban(host(known), until);
    send(&h, &frag(known, IPV4_MF | 7), XDP_DROP);
    let s = entry(&h, &v4(known));
    assert_eq!((s.ban_until_ns, s.policy_gen), (until, 3), "{s:?}");

    // An expired ban does not drop fragments.
    let expired = [203, 0, 113, 42];
    h.ban(host(expired), monotonic_ns() - SECOND);
    send(&h, &frag(expired, 5), XDP_PASS);
    assert_stats(
        &h,
        &[(PASS, API, 1), (PASS, FRAGMENT, 1), (DROP, BANNED, 4)],
    );
}

#[test]
fn ipv4_fragments_from_an_autobanned_source_are_dropped() {
    let h = autobanning(1, 1);
    let src = [203, 0, 113, 43];
    send(&h, &api4(src, ACK), XDP_PASS);
    send(&h, &api4(src, ACK), XDP_DROP);
    assert!(entry(&h, &v4(src)).autoban_until_ns > monotonic_ns());
    let frag = Frame::tcp4(src, API_PORT, ACK).ipv4_frag(40).build();
    send(&h, &frag, XDP_DROP);
    assert_stats(
        &h,
        &[(PASS, API, 1), (DROP, PACKET_CEILING, 1), (DROP, BANNED, 1)],
    );
}

#[test]
fn every_ipv6_fragment_is_counted_against_its_source() {
    // Ten-second windows: the counts must not start over midway.
    let h = limited(0, 0);
    let addr = "2001:db8:f::1";
    let frame = Frame::tcp6(addr, API_PORT, SYN).ipv6_ext(FRAGMENT_HEADER, 8);
    // First fragment (offset 0, M set) holding the TCP header: an API SYN.
    send(&h, &frame.build_with_ipv6_frag(IPV6_M), XDP_PASS);
    // Last and middle fragments: counted as fragments.
    send(
        &h,
        &frame.build_with_ipv6_frag(ipv6_frag_offset(1)),
        XDP_PASS,
    );
    send(
        &h,
        &frame.build_with_ipv6_frag(ipv6_frag_offset(8190) | IPV6_M),
        XDP_PASS,
    );
    // Behind other extension headers too.
    let behind = Frame::tcp6(addr, API_PORT, SYN)
        .ipv6_ext(HOP_BY_HOP, 8)
        .ipv6_ext(ROUTING, 24)
        .ipv6_ext(FRAGMENT_HEADER, 8)
        .build_with_ipv6_frag(ipv6_frag_offset(3));
    send(&h, &behind, XDP_PASS);
    // A first fragment cut inside the TCP ports.
    let mut tiny = frame.build_with_ipv6_frag(IPV6_M);
    tiny.truncate(ETH_LEN + IPV6_LEN + 8 + 3);
    send(&h, &tiny, XDP_PASS);
    assert_stats(&h, &[(PASS, API, 1), (PASS, FRAGMENT, 4)]);
    assert_counts(&h, &v6_64(addr), 5, 1, 0);
    assert_eq!(h.source_count(), 1);
}

#[test]
fn ipv6_fragments_from_a_banned_source_are_dropped() {
    let mut h = Harness::new();
    h.ban(net("2001:db8:f:1::/64"), monotonic_ns() + MINUTE);
    let frame = Frame::tcp6("2001:db8:f:1::99", API_PORT, ACK).ipv6_ext(FRAGMENT_HEADER, 8);
    send(
        &h,
        &frame.build_with_ipv6_frag(ipv6_frag_offset(2)),
        XDP_DROP,
    );
    send(&h, &frame.build_with_ipv6_frag(IPV6_M), XDP_DROP);
    // Another /64 is not banned.
    let other = Frame::tcp6("2001:db8:f:2::99", API_PORT, ACK).ipv6_ext(FRAGMENT_HEADER, 8);
    send(
        &h,
        &other.build_with_ipv6_frag(ipv6_frag_offset(2)),
        XDP_PASS,
    );
    assert_stats(&h, &[(PASS, FRAGMENT, 1), (DROP, BANNED, 2)]);
}
