//! The allow list: allowed sources pass bans and ceilings.

use limiter_common::{
    SOURCE_ALLOWED,
    reason::{ALLOWLISTED, API, BANNED, PACKET_CEILING},
    verdict::{DROP, PASS},
};
use limiter_tests::{
    monotonic_ns,
    packet::{ACK, Frame, SYN},
    xdp::{API_PORT, Harness, XDP_DROP, XDP_PASS},
};

use crate::support::{
    MINUTE, api4, assert_stats, autobanning, entry, host, limited, net, send, send_n, v4,
};

#[test]
fn an_allowed_source_passes_even_when_banned() {
    let mut h = Harness::new();
    let src = [192, 0, 2, 50];
    let key = v4(src);
    h.ban(host(src), monotonic_ns() + MINUTE);
    h.allow(net("192.0.2.0/24"));
    send(&h, &api4(src, SYN), XDP_PASS);
    send(&h, &api4(src, ACK), XDP_PASS);
    // Its fragments pass too, uncounted.
    send(
        &h,
        &Frame::tcp4(src, API_PORT, ACK).ipv4_frag(7).build(),
        XDP_PASS,
    );
    assert_stats(&h, &[(PASS, ALLOWLISTED, 3)]);
    let s = entry(&h, &key);
    assert_eq!(s.flags, SOURCE_ALLOWED, "{s:?}");
    assert_eq!(
        (s.packets, s.syns),
        (0, 0),
        "allowed packets are not counted"
    );
}

#[test]
fn an_allowed_source_passes_over_the_ceilings() {
    let mut h = limited(2, 1);
    h.update_config(|c| {
        c.autoban_ns = MINUTE;
        c.autoban_after_windows = 1;
    });
    let src = [192, 0, 2, 51];
    h.allow(host(src));
    send_n(&h, &api4(src, SYN), 10, XDP_PASS);
    send_n(&h, &api4(src, ACK), 10, XDP_PASS);
    assert_stats(&h, &[(PASS, ALLOWLISTED, 20)]);
    let s = entry(&h, &v4(src));
    assert_eq!((s.packets, s.syns, s.autoban_until_ns), (0, 0, 0), "{s:?}");
}

#[test]
fn allowing_an_autobanned_source_applies_from_the_next_packet() {
    let mut h = autobanning(1, 1);
    let src = [192, 0, 2, 52];
    let key = v4(src);
    send(&h, &api4(src, ACK), XDP_PASS);
    send_n(&h, &api4(src, ACK), 2, XDP_DROP);
    assert!(entry(&h, &key).autoban_until_ns > monotonic_ns());
    h.allow(host(src));
    send(&h, &api4(src, ACK), XDP_PASS);
    assert_stats(
        &h,
        &[
            (PASS, API, 1),
            (PASS, ALLOWLISTED, 1),
            (DROP, PACKET_CEILING, 1),
            (DROP, BANNED, 1),
        ],
    );
    assert_eq!(entry(&h, &key).flags, SOURCE_ALLOWED);
}

#[test]
fn an_allow_list_change_reaches_a_source_that_read_the_tries_mid_reload() {
    // A reload writes the config (bumping the policy generation), then the
    // allow list. A packet between the two re-reads the tries under the new
    // generation and caches the old answer; the allow-list write must bump
    // the generation again, or the source keeps that answer.
    let mut h = limited(1, 0);
    let src = [192, 0, 2, 53];
    send(&h, &api4(src, ACK), XDP_PASS);
    let config = h.config();
    h.write_config(&config);
    send(&h, &api4(src, ACK), XDP_DROP);
    assert_eq!(entry(&h, &v4(src)).flags, 0, "cached: not allowed");
    h.allow(host(src));
    send(&h, &api4(src, ACK), XDP_PASS);
    assert_eq!(entry(&h, &v4(src)).flags, SOURCE_ALLOWED);
    // And back: taken off the list mid-reload, it is counted again.
    let config = h.config();
    h.write_config(&config);
    send(&h, &api4(src, ACK), XDP_PASS);
    h.disallow(host(src));
    send(&h, &api4(src, ACK), XDP_DROP);
    assert_stats(
        &h,
        &[
            (PASS, API, 1),
            (PASS, ALLOWLISTED, 2),
            (DROP, PACKET_CEILING, 2),
        ],
    );
}
