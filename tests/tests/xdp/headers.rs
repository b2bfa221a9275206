//! The headers the parser walks to reach TCP: VLAN tags, IPv4 options and IPv6
//! extension headers.

use limiter_common::{
    reason::{API, NON_API},
    verdict::PASS,
};
use limiter_tests::{
    packet::{ACK, Frame, SYN},
    xdp::{API_PORT, Harness, XDP_PASS},
};

use crate::support::{
    AH, DEST_OPTS, ETH_LEN, FRAGMENT_HEADER, HOP_BY_HOP, ROUTING, assert_counts,
    assert_ipv6_ext_api, assert_stats, send, v4, v6_64,
};

#[test]
fn one_8021q_tag_reaches_tcp() {
    let h = Harness::new();
    let frame = Frame::tcp4([192, 0, 2, 30], API_PORT, SYN)
        .vlans(&[100])
        .build();
    assert_eq!(frame[12..14], [0x81, 0x00], "802.1Q TPID");
    let frame6 = Frame::tcp6("2001:db8::30", API_PORT, SYN)
        .vlans(&[100])
        .build();
    send(&h, &frame, XDP_PASS);
    send(&h, &frame6, XDP_PASS);
    assert_stats(&h, &[(PASS, API, 2)]);
    assert_counts(&h, &v4([192, 0, 2, 30]), 1, 1, 0);
    assert_counts(&h, &v6_64("2001:db8::30"), 1, 1, 0);
}

#[test]
fn an_8021ad_outer_and_8021q_inner_tag_reach_tcp() {
    let h = Harness::new();
    let frame = Frame::tcp4([192, 0, 2, 31], API_PORT, SYN)
        .vlans(&[100, 200])
        .build();
    assert_eq!(frame[12..14], [0x88, 0xa8], "802.1ad outer TPID");
    assert_eq!(frame[16..18], [0x81, 0x00], "802.1Q inner TPID");
    send(&h, &frame, XDP_PASS);
    // A single 802.1ad tag is walked too.
    let mut single_ad = Frame::tcp4([192, 0, 2, 31], API_PORT, ACK)
        .vlans(&[100])
        .build();
    single_ad[12..14].copy_from_slice(&[0x88, 0xa8]);
    send(&h, &single_ad, XDP_PASS);
    assert_stats(&h, &[(PASS, API, 2)]);
    assert_counts(&h, &v4([192, 0, 2, 31]), 2, 1, 0);
}

#[test]
fn a_third_vlan_tag_is_not_walked_and_passes_as_non_api() {
    // Only two tags are parsed; behind them the program sees a third TPID,
    // which is not IP. Pinned here: such frames bypass the limiter.
    let h = Harness::new();
    let frame = Frame::tcp4([192, 0, 2, 32], API_PORT, SYN)
        .vlans(&[100, 200, 300])
        .build();
    send(&h, &frame, XDP_PASS);
    assert_stats(&h, &[(PASS, NON_API, 1)]);
    assert_eq!(h.source_count(), 0);
}

#[test]
fn ipv4_options_are_skipped_to_reach_tcp() {
    let h = Harness::new();
    let src = [192, 0, 2, 33];
    let nops = Frame::tcp4(src, API_PORT, SYN)
        .ipv4_options(&[1; 8])
        .build();
    assert_eq!(nops[ETH_LEN], 0x47, "IHL 7");
    // The longest header: IHL 15, 40 bytes of options.
    let longest = Frame::tcp4(src, API_PORT, ACK)
        .ipv4_options(&[1; 40])
        .build();
    assert_eq!(longest[ETH_LEN], 0x4f, "IHL 15");
    send(&h, &nops, XDP_PASS);
    send(&h, &longest, XDP_PASS);
    assert_stats(&h, &[(PASS, API, 2)]);
    assert_counts(&h, &v4(src), 2, 1, 0);
}

#[test]
fn ipv6_hop_by_hop_header_is_skipped_to_reach_tcp() {
    assert_ipv6_ext_api(&[(HOP_BY_HOP, 8)]);
}

#[test]
fn ipv6_routing_header_is_skipped_to_reach_tcp() {
    assert_ipv6_ext_api(&[(ROUTING, 24)]);
}

#[test]
fn ipv6_destination_options_header_is_skipped_to_reach_tcp() {
    assert_ipv6_ext_api(&[(DEST_OPTS, 16)]);
}

#[test]
fn ipv6_authentication_header_is_skipped_to_reach_tcp() {
    // AH counts its length in 4-octet units minus 2, unlike the others.
    assert_ipv6_ext_api(&[(AH, 24)]);
}

#[test]
fn ipv6_atomic_fragment_header_is_skipped_to_reach_tcp() {
    // Offset 0 and M = 0: a whole packet, not a fragment.
    assert_ipv6_ext_api(&[(FRAGMENT_HEADER, 8)]);
}

#[test]
fn ipv6_chain_of_every_extension_header_type_reaches_tcp() {
    assert_ipv6_ext_api(&[
        (HOP_BY_HOP, 16),
        (ROUTING, 24),
        (DEST_OPTS, 8),
        (FRAGMENT_HEADER, 8),
        (AH, 24),
    ]);
}
