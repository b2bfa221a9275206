//! Truncated and malformed headers: every cut and every invalid field passes,
//! counted as malformed, without creating a source.

use std::ops::Range;

use limiter_common::{
    reason::{API, MALFORMED},
    verdict::PASS,
};
use limiter_tests::{
    packet::{Frame, SYN},
    xdp::{API_PORT, Harness, XDP_PASS},
};

use crate::support::{
    AH, DEST_OPTS, ETH_LEN, FRAGMENT_HEADER, HOP_BY_HOP, IPV4_LEN, IPV6_LEN, OTHER_PORT, ROUTING,
    TCP_LEN, VLAN_LEN, api4, api6, assert_counts, assert_ipv6_ext_api, assert_stats, send, v4,
    v6_64,
};

/// Runs every frame on a fresh harness: each must pass and count as malformed,
/// and none may create a per-source entry.
#[track_caller]
fn assert_all_malformed(frames: &[Vec<u8>]) {
    assert!(!frames.is_empty(), "no frames to test");
    let h = Harness::new();
    for frame in frames {
        send(&h, frame, XDP_PASS);
    }
    assert_stats(&h, &[(PASS, MALFORMED, frames.len() as u64)]);
    assert_eq!(h.source_count(), 0, "a malformed frame created a source");
}

/// Every prefix of `frame` whose length is in `lengths`.
fn truncations(frame: &[u8], lengths: Range<usize>) -> Vec<Vec<u8>> {
    assert!(
        lengths.end <= frame.len(),
        "truncating a {}-byte frame to {lengths:?}",
        frame.len()
    );
    lengths.map(|n| frame[..n].to_vec()).collect()
}

#[test]
fn a_cut_vlan_tag_is_malformed() {
    // One tag: the frame ends in the TPID's payload (TCI, inner EtherType).
    let one = Frame::tcp4([192, 0, 2, 10], API_PORT, SYN)
        .vlans(&[100])
        .build();
    // Two tags: the frame ends inside the second tag.
    let two = Frame::tcp4([192, 0, 2, 10], API_PORT, SYN)
        .vlans(&[100, 200])
        .build();
    let mut frames = truncations(&one, ETH_LEN..ETH_LEN + VLAN_LEN);
    frames.extend(truncations(
        &two,
        ETH_LEN + VLAN_LEN..ETH_LEN + 2 * VLAN_LEN,
    ));
    assert_all_malformed(&frames);
}

#[test]
fn a_cut_ipv4_header_is_malformed() {
    let frame = api4([192, 0, 2, 11], SYN);
    assert_all_malformed(&truncations(&frame, ETH_LEN..ETH_LEN + IPV4_LEN));
}

#[test]
fn cut_ipv4_options_are_malformed() {
    // IHL 7: 8 bytes of NOP options the frame does not hold in full.
    let frame = Frame::tcp4([192, 0, 2, 12], API_PORT, SYN)
        .ipv4_options(&[1; 8])
        .build();
    assert_eq!(frame[ETH_LEN], 0x47, "version 4, IHL 7");
    let options = ETH_LEN + IPV4_LEN;
    assert_all_malformed(&truncations(&frame, options..options + 8));
}

#[test]
fn a_cut_tcp_header_is_malformed() {
    let v4_frame = api4([192, 0, 2, 13], SYN);
    let v6_frame = api6("2001:db8::13", SYN);
    let tcp4 = ETH_LEN + IPV4_LEN;
    let tcp6 = ETH_LEN + IPV6_LEN;
    let mut frames = truncations(&v4_frame, tcp4..tcp4 + TCP_LEN);
    frames.extend(truncations(&v6_frame, tcp6..tcp6 + TCP_LEN));
    assert_all_malformed(&frames);
}

#[test]
fn a_cut_ipv6_header_is_malformed() {
    let frame = api6("2001:db8::14", SYN);
    assert_all_malformed(&truncations(&frame, ETH_LEN..ETH_LEN + IPV6_LEN));
}

#[test]
fn a_cut_ipv6_extension_header_is_malformed() {
    // Hop-by-hop (16 bytes), routing (24), AH (24): the frame ends in each.
    let frame = Frame::tcp6("2001:db8::15", API_PORT, SYN)
        .ipv6_ext(HOP_BY_HOP, 16)
        .ipv6_ext(ROUTING, 24)
        .ipv6_ext(AH, 24)
        .build();
    let ext = ETH_LEN + IPV6_LEN;
    assert_all_malformed(&truncations(&frame, ext..ext + 16 + 24 + 24));
}

#[test]
fn every_prefix_of_a_tagged_api_frame_is_malformed_and_the_whole_frame_is_api() {
    let v4_frame = Frame::tcp4([192, 0, 2, 16], API_PORT, SYN)
        .vlans(&[100, 200])
        .ipv4_options(&[1; 12])
        .build();
    let v6_frame = Frame::tcp6("2001:db8::16", API_PORT, SYN)
        .vlans(&[300])
        .ipv6_ext(HOP_BY_HOP, 8)
        .ipv6_ext(FRAGMENT_HEADER, 8)
        .ipv6_ext(DEST_OPTS, 16)
        .build();
    let h = Harness::new();
    let mut cut = 0;
    for frame in [&v4_frame, &v6_frame] {
        for len in ETH_LEN..frame.len() {
            send(&h, &frame[..len], XDP_PASS);
            cut += 1;
        }
    }
    assert_stats(&h, &[(PASS, MALFORMED, cut)]);
    assert_eq!(h.source_count(), 0);
    send(&h, &v4_frame, XDP_PASS);
    send(&h, &v6_frame, XDP_PASS);
    assert_stats(&h, &[(PASS, MALFORMED, cut), (PASS, API, 2)]);
    assert_counts(&h, &v4([192, 0, 2, 16]), 1, 1, 0);
    assert_counts(&h, &v6_64("2001:db8::16"), 1, 1, 0);
}

#[test]
fn ipv4_ihl_below_5_is_malformed() {
    let frame = api4([192, 0, 2, 17], SYN);
    let frames: Vec<Vec<u8>> = (0..5u8)
        .map(|ihl| {
            let mut bad = frame.clone();
            bad[ETH_LEN] = 0x40 | ihl;
            bad
        })
        .collect();
    assert_all_malformed(&frames);
}

#[test]
fn a_wrong_ip_version_is_malformed() {
    let mut frames = Vec::new();
    // IPv4 EtherType with version 6, 0 and 5 (IHL 5 kept).
    let v4_frame = api4([192, 0, 2, 18], SYN);
    for version in [6u8, 0, 5] {
        let mut bad = v4_frame.clone();
        bad[ETH_LEN] = version << 4 | 5;
        frames.push(bad);
    }
    // IPv6 EtherType with version 4 and 0.
    let v6_frame = api6("2001:db8::18", SYN);
    for version in [4u8, 0] {
        let mut bad = v6_frame.clone();
        bad[ETH_LEN] = version << 4;
        frames.push(bad);
    }
    assert_all_malformed(&frames);
}

#[test]
fn tcp_data_offset_below_5_is_malformed() {
    let v4_frame = api4([192, 0, 2, 19], SYN);
    let v6_frame = api6("2001:db8::19", SYN);
    let mut frames = Vec::new();
    for doff in 0..5u8 {
        let mut bad = v4_frame.clone();
        bad[ETH_LEN + IPV4_LEN + 12] = doff << 4;
        frames.push(bad);
        let mut bad = v6_frame.clone();
        bad[ETH_LEN + IPV6_LEN + 12] = doff << 4;
        frames.push(bad);
    }
    assert_all_malformed(&frames);
}

#[test]
fn a_tcp_data_offset_below_5_is_malformed_even_to_a_non_api_port() {
    // The header is validated before the port is looked at.
    let mut frame = Frame::tcp4([192, 0, 2, 20], OTHER_PORT, SYN).build();
    frame[ETH_LEN + IPV4_LEN + 12] = 4 << 4;
    assert_all_malformed(&[frame]);
}

#[test]
fn more_than_six_ipv6_extension_headers_are_malformed() {
    let seven = Frame::tcp6("2001:db8::21", API_PORT, SYN)
        .ipv6_ext(HOP_BY_HOP, 8)
        .ipv6_ext(DEST_OPTS, 8)
        .ipv6_ext(ROUTING, 8)
        .ipv6_ext(FRAGMENT_HEADER, 8)
        .ipv6_ext(AH, 16)
        .ipv6_ext(DEST_OPTS, 8)
        .ipv6_ext(DEST_OPTS, 8)
        .build();
    let mut eight_dest_opts = Frame::tcp6("2001:db8::21", API_PORT, SYN);
    for _ in 0..8 {
        eight_dest_opts = eight_dest_opts.ipv6_ext(DEST_OPTS, 8);
    }
    assert_all_malformed(&[seven, eight_dest_opts.build()]);
}

#[test]
fn six_ipv6_extension_headers_still_reach_tcp() {
    assert_ipv6_ext_api(&[
        (HOP_BY_HOP, 8),
        (DEST_OPTS, 8),
        (ROUTING, 8),
        (FRAGMENT_HEADER, 8),
        (AH, 16),
        (DEST_OPTS, 8),
    ]);
}
