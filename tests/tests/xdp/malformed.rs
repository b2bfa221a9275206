//! Truncated and malformed headers. A frame cut or invalid before its source
//! address is known passes, counted as malformed, without creating a source
//! (the kernel drops it itself). From the source address on, whatever stops
//! the parser, the frame is counted against its source as API traffic, so a
//! cut header or an over-long IPv6 chain is no way past a ban or a ceiling.

use std::ops::Range;

use limiter_common::{
    SourceKey,
    reason::{API, BANNED, MALFORMED, NEW_SOURCE_CEILING, NON_API, PACKET_CEILING},
    verdict::{DROP, PASS},
};
use limiter_tests::{
    monotonic_ns,
    packet::{Frame, SYN},
    xdp::{API_PORT, Harness, XDP_DROP, XDP_PASS},
};

use crate::support::{
    AH, DEST_OPTS, ETH_LEN, FRAGMENT_HEADER, HOP_BY_HOP, IPV4_LEN, IPV6_LEN, MINUTE, OTHER_PORT,
    ROUTING, TCP_LEN, VLAN_LEN, api4, api6, assert_counts, assert_ipv6_ext_api, assert_stats, host,
    limited, net, send, send_n, v4, v6_64,
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

/// Runs every frame on a fresh harness: each must pass as malformed and be
/// counted against `source`, the only entry created.
#[track_caller]
fn assert_all_counted(frames: &[Vec<u8>], source: &SourceKey) {
    assert!(!frames.is_empty(), "no frames to test");
    // Ten-second windows: the counts must not start over midway.
    let h = limited(0, 0);
    for frame in frames {
        send(&h, frame, XDP_PASS);
    }
    assert_stats(&h, &[(PASS, MALFORMED, frames.len() as u64)]);
    let packets = u32::try_from(frames.len()).expect("a few frames");
    assert_counts(&h, source, packets, 0, 0);
    assert_eq!(h.source_count(), 1);
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

/// Seven extension headers: one more than the program walks.
fn seven_extension_headers(src: &str) -> Vec<u8> {
    let mut frame = Frame::tcp6(src, API_PORT, SYN);
    for _ in 0..7 {
        frame = frame.ipv6_ext(DEST_OPTS, 8);
    }
    frame.build()
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
fn cut_ipv4_options_are_counted_against_the_source() {
    // IHL 7: 8 bytes of NOP options the frame does not hold in full.
    let frame = Frame::tcp4([192, 0, 2, 12], API_PORT, SYN)
        .ipv4_options(&[1; 8])
        .build();
    assert_eq!(frame[ETH_LEN], 0x47, "version 4, IHL 7");
    let options = ETH_LEN + IPV4_LEN;
    assert_all_counted(
        &truncations(&frame, options..options + 8),
        &v4([192, 0, 2, 12]),
    );
}

#[test]
fn a_cut_tcp_header_is_counted_against_the_source() {
    let v4_frame = api4([192, 0, 2, 13], SYN);
    let v6_frame = api6("2001:db8::13", SYN);
    let tcp4 = ETH_LEN + IPV4_LEN;
    let tcp6 = ETH_LEN + IPV6_LEN;
    assert_all_counted(
        &truncations(&v4_frame, tcp4..tcp4 + TCP_LEN),
        &v4([192, 0, 2, 13]),
    );
    assert_all_counted(
        &truncations(&v6_frame, tcp6..tcp6 + TCP_LEN),
        &v6_64("2001:db8::13"),
    );
}

#[test]
fn a_cut_ipv6_header_is_malformed() {
    let frame = api6("2001:db8::14", SYN);
    assert_all_malformed(&truncations(&frame, ETH_LEN..ETH_LEN + IPV6_LEN));
}

#[test]
fn a_cut_ipv6_extension_header_is_counted_against_the_source() {
    // Hop-by-hop (16 bytes), routing (24), AH (24): the frame ends in each.
    let frame = Frame::tcp6("2001:db8::15", API_PORT, SYN)
        .ipv6_ext(HOP_BY_HOP, 16)
        .ipv6_ext(ROUTING, 24)
        .ipv6_ext(AH, 24)
        .build();
    let ext = ETH_LEN + IPV6_LEN;
    assert_all_counted(
        &truncations(&frame, ext..ext + 16 + 24 + 24),
        &v6_64("2001:db8::15"),
    );
}

#[test]
fn every_prefix_of_a_tagged_api_frame_is_counted_from_its_source_address_on() {
    let v4_src = [192, 0, 2, 16];
    let v4_frame = Frame::tcp4(v4_src, API_PORT, SYN)
        .vlans(&[100, 200])
        .ipv4_options(&[1; 12])
        .build();
    let v6_frame = Frame::tcp6("2001:db8::16", API_PORT, SYN)
        .vlans(&[300])
        .ipv6_ext(HOP_BY_HOP, 8)
        .ipv6_ext(FRAGMENT_HEADER, 8)
        .ipv6_ext(DEST_OPTS, 16)
        .build();
    // Where each source address ends: after it, a cut is the source's.
    let v4_known = ETH_LEN + 2 * VLAN_LEN + IPV4_LEN;
    let v6_known = ETH_LEN + VLAN_LEN + IPV6_LEN;
    // Ten-second windows: the counts must not start over midway.
    let h = limited(0, 0);
    let mut cuts = 0;
    for (frame, known) in [(&v4_frame, v4_known), (&v6_frame, v6_known)] {
        for len in ETH_LEN..frame.len() {
            send(&h, &frame[..len], XDP_PASS);
            cuts += 1;
        }
        assert!(known < frame.len());
    }
    assert_stats(&h, &[(PASS, MALFORMED, cuts)]);
    let counted = |frame: &[u8], known: usize| u32::try_from(frame.len() - known).expect("small");
    assert_counts(&h, &v4(v4_src), counted(&v4_frame, v4_known), 0, 0);
    assert_counts(
        &h,
        &v6_64("2001:db8::16"),
        counted(&v6_frame, v6_known),
        0,
        0,
    );
    send(&h, &v4_frame, XDP_PASS);
    send(&h, &v6_frame, XDP_PASS);
    assert_stats(&h, &[(PASS, MALFORMED, cuts), (PASS, API, 2)]);
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
fn a_tcp_data_offset_below_5_to_the_api_port_is_counted_against_the_source() {
    let v4_frame = api4([192, 0, 2, 19], SYN);
    let v6_frame = api6("2001:db8::19", SYN);
    let mut v4_frames = Vec::new();
    let mut v6_frames = Vec::new();
    for doff in 0..5u8 {
        let mut bad = v4_frame.clone();
        bad[ETH_LEN + IPV4_LEN + 12] = doff << 4;
        v4_frames.push(bad);
        let mut bad = v6_frame.clone();
        bad[ETH_LEN + IPV6_LEN + 12] = doff << 4;
        v6_frames.push(bad);
    }
    assert_all_counted(&v4_frames, &v4([192, 0, 2, 19]));
    assert_all_counted(&v6_frames, &v6_64("2001:db8::19"));
}

#[test]
fn an_invalid_tcp_header_to_another_port_is_not_api_traffic() {
    // The ports come first: a segment to another port is not the limiter's,
    // whatever the rest of its header holds (the kernel drops it).
    let mut frame = Frame::tcp4([192, 0, 2, 20], OTHER_PORT, SYN).build();
    frame[ETH_LEN + IPV4_LEN + 12] = 4 << 4;
    let h = Harness::new();
    send(&h, &frame, XDP_PASS);
    send(&h, &frame[..ETH_LEN + IPV4_LEN + 10], XDP_PASS);
    assert_stats(&h, &[(PASS, NON_API, 2)]);
    assert_eq!(h.source_count(), 0);
}

#[test]
fn more_than_six_ipv6_extension_headers_are_counted_against_the_source() {
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
    assert_all_counted(&[seven, eight_dest_opts.build()], &v6_64("2001:db8::21"));
}

#[test]
fn a_long_ipv6_chain_does_not_get_a_banned_source_past_its_ban() {
    let mut h = Harness::new();
    h.ban(net("2001:db8:bad::/64"), monotonic_ns() + MINUTE);
    send(&h, &api6("2001:db8:bad::1", SYN), XDP_DROP);
    send(&h, &seven_extension_headers("2001:db8:bad::1"), XDP_DROP);
    assert_stats(&h, &[(DROP, BANNED, 2)]);
}

#[test]
fn a_long_ipv6_chain_or_a_cut_header_meets_the_packet_ceiling() {
    let h = limited(3, 0);
    let src = "2001:db8:f100::1";
    send_n(&h, &seven_extension_headers(src), 3, XDP_PASS);
    send(&h, &seven_extension_headers(src), XDP_DROP);
    send(&h, &api6(src, SYN)[..ETH_LEN + IPV6_LEN + 6], XDP_DROP);
    assert_stats(&h, &[(PASS, MALFORMED, 3), (DROP, PACKET_CEILING, 2)]);
    // And over IPv4, a cut TCP header from a banned source.
    let mut h = Harness::new();
    let banned = [198, 51, 100, 21];
    h.ban(host(banned), monotonic_ns() + MINUTE);
    send(&h, &api4(banned, SYN)[..ETH_LEN + IPV4_LEN + 12], XDP_DROP);
    assert_stats(&h, &[(DROP, BANNED, 1)]);
}

#[test]
fn a_long_ipv6_chain_spends_the_new_source_budget() {
    let mut h = limited(0, 0);
    h.update_config(|c| c.max_new_sources = 1);
    send(&h, &seven_extension_headers("2001:db8:f200::1"), XDP_PASS);
    send(&h, &seven_extension_headers("2001:db8:f201::1"), XDP_DROP);
    assert_stats(&h, &[(PASS, MALFORMED, 1), (DROP, NEW_SOURCE_CEILING, 1)]);
    assert_eq!(h.source_count(), 1);
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
