//! The allow list: allowed sources pass bans and ceilings.

use limiter_common::{
    SOURCE_ALLOWED,
    reason::{ALLOWLISTED, API, BANNED, FRAGMENT, PACKET_CEILING},
    verdict::{DROP, PASS},
};
use limiter_tests::{
    monotonic_ns,
    packet::{ACK, Frame, SYN},
    xdp::{API_PORT, Harness, XDP_DROP, XDP_PASS},
};

use crate::support::{
    IPV4_MF, MINUTE, api4, assert_stats, autobanning, entry, host, limited, net, send, send_n, v4,
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
    // Its fragments pass as fragments.
    send(
        &h,
        &Frame::tcp4(src, API_PORT, ACK).ipv4_frag(IPV4_MF).build(),
        XDP_PASS,
    );
    assert_stats(&h, &[(PASS, ALLOWLISTED, 2), (PASS, FRAGMENT, 1)]);
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
