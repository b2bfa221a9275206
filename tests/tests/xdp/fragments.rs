//! IP fragments: no reliable port, so dropped only from banned sources.

use limiter_common::{
    reason::{API, BANNED, FRAGMENT, PACKET_CEILING},
    verdict::{DROP, PASS},
};
use limiter_tests::{
    monotonic_ns,
    packet::{ACK, Frame, SYN},
    xdp::{API_PORT, Harness, XDP_DROP, XDP_PASS},
};

use crate::support::{
    FRAGMENT_HEADER, HOP_BY_HOP, IPV4_DF, IPV4_MF, IPV6_M, MINUTE, ROUTING, SECOND, api4,
    assert_counts, assert_stats, autobanning, entry, host, ipv6_frag_offset, net, send, v4,
};

#[test]
fn ipv4_fragments_from_a_source_that_is_not_banned_pass() {
    let h = Harness::new();
    let src = [192, 0, 2, 40];
    let frag = |field: u16| Frame::tcp4(src, API_PORT, SYN).ipv4_frag(field).build();
    send(&h, &frag(IPV4_MF), XDP_PASS); // first fragment
    send(&h, &frag(185), XDP_PASS); // last fragment, offset 185 * 8
    send(&h, &frag(IPV4_MF | 1), XDP_PASS); // middle fragment
    // A UDP fragment to any port is a fragment too.
    send(
        &h,
        &Frame::tcp4(src, 0, 0).udp(53).ipv4_frag(IPV4_MF).build(),
        XDP_PASS,
    );
    // DF with offset 0 is a whole packet.
    send(&h, &frag(IPV4_DF), XDP_PASS);
    assert_stats(&h, &[(PASS, API, 1), (PASS, FRAGMENT, 4)]);
    assert_counts(&h, &v4(src), 1, 1, 0);
    assert_eq!(h.source_count(), 1, "fragments create no entry");
}

#[test]
fn ipv4_fragments_from_a_banned_source_are_dropped() {
    let mut h = Harness::new();
    let until = monotonic_ns() + MINUTE;
    // A banned source with no entry: the fragment path reads the ban trie.
    let new = [203, 0, 113, 40];
    h.ban(host(new), until);
    let frag = |src, field: u16| Frame::tcp4(src, API_PORT, ACK).ipv4_frag(field).build();
    send(&h, &frag(new, IPV4_MF), XDP_DROP);
    send(&h, &frag(new, 100), XDP_DROP);
    assert!(h.source(&v4(new)).is_none(), "fragments create no entry");

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
    send(&h, &frag(expired, IPV4_MF), XDP_PASS);
    assert_stats(
        &h,
        &[(PASS, API, 1), (PASS, FRAGMENT, 1), (DROP, BANNED, 3)],
    );
}

#[test]
fn ipv4_fragments_from_an_autobanned_source_are_dropped() {
    let h = autobanning(1, 1);
    let src = [203, 0, 113, 43];
    send(&h, &api4(src, ACK), XDP_PASS);
    send(&h, &api4(src, ACK), XDP_DROP);
    assert!(entry(&h, &v4(src)).autoban_until_ns > monotonic_ns());
    let frag = Frame::tcp4(src, API_PORT, ACK).ipv4_frag(IPV4_MF).build();
    send(&h, &frag, XDP_DROP);
    assert_stats(
        &h,
        &[(PASS, API, 1), (DROP, PACKET_CEILING, 1), (DROP, BANNED, 1)],
    );
}

#[test]
fn ipv6_fragments_from_a_source_that_is_not_banned_pass() {
    let h = Harness::new();
    let frame = Frame::tcp6("2001:db8:f::1", API_PORT, SYN).ipv6_ext(FRAGMENT_HEADER, 8);
    send(&h, &frame.build_with_ipv6_frag(IPV6_M), XDP_PASS); // first
    send(
        &h,
        &frame.build_with_ipv6_frag(ipv6_frag_offset(1)),
        XDP_PASS,
    ); // last
    send(
        &h,
        &frame.build_with_ipv6_frag(ipv6_frag_offset(8190) | IPV6_M),
        XDP_PASS,
    );
    // Behind other extension headers too.
    let behind = Frame::tcp6("2001:db8:f::1", API_PORT, SYN)
        .ipv6_ext(HOP_BY_HOP, 8)
        .ipv6_ext(ROUTING, 24)
        .ipv6_ext(FRAGMENT_HEADER, 8)
        .build_with_ipv6_frag(ipv6_frag_offset(3));
    send(&h, &behind, XDP_PASS);
    assert_stats(&h, &[(PASS, FRAGMENT, 4)]);
    assert_eq!(h.source_count(), 0, "fragments create no entry");
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
    assert_eq!(h.source_count(), 0);
}
