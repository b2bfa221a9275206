//! Observe mode: what would be dropped is counted and passed.

use limiter_common::{
    mode,
    reason::{API, BANNED, PACKET_CEILING, SYN_CEILING},
    verdict::{PASS, WOULD_DROP},
};
use limiter_tests::{
    monotonic_ns,
    packet::{ACK, Frame, SYN},
    xdp::{API_PORT, XDP_PASS},
};

use crate::support::{
    IPV4_MF, MINUTE, api4, assert_counts, assert_stats, autobanning, entry, host, limited, send,
    send_n, v4,
};

#[test]
fn observe_mode_passes_packets_over_the_ceilings() {
    let mut h = limited(3, 2);
    h.update_config(|c| c.mode = mode::OBSERVE);
    let src = [192, 0, 2, 60];
    send_n(&h, &api4(src, SYN), 2, XDP_PASS);
    send(&h, &api4(src, SYN), XDP_PASS); // over max_syns
    send(&h, &api4(src, ACK), XDP_PASS); // over max_packets
    send(&h, &api4(src, ACK), XDP_PASS);
    assert_stats(
        &h,
        &[
            (PASS, API, 2),
            (WOULD_DROP, SYN_CEILING, 1),
            (WOULD_DROP, PACKET_CEILING, 2),
        ],
    );
    assert_counts(&h, &v4(src), 5, 3, 1);
}

#[test]
fn observe_mode_passes_banned_sources() {
    let mut h = autobanning(1, 1);
    h.update_config(|c| c.mode = mode::OBSERVE);
    let banned = [192, 0, 2, 61];
    h.ban(host(banned), monotonic_ns() + MINUTE);
    send(&h, &api4(banned, SYN), XDP_PASS);
    send(
        &h,
        &Frame::tcp4(banned, API_PORT, ACK)
            .ipv4_frag(IPV4_MF)
            .build(),
        XDP_PASS,
    );
    // The auto-ban is recorded and observed too.
    let flooding = [192, 0, 2, 62];
    send_n(&h, &api4(flooding, ACK), 3, XDP_PASS);
    assert!(entry(&h, &v4(flooding)).autoban_until_ns > monotonic_ns());
    assert_stats(
        &h,
        &[
            (PASS, API, 1),
            (WOULD_DROP, BANNED, 3),
            (WOULD_DROP, PACKET_CEILING, 1),
        ],
    );
}
