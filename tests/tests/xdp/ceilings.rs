//! The packet and SYN ceilings per source and window.

use limiter_common::{
    reason::{API, PACKET_CEILING, SYN_CEILING},
    verdict::{DROP, PASS},
};
use limiter_tests::{
    monotonic_ns,
    packet::{ACK, PSH, SYN},
    xdp::{XDP_DROP, XDP_PASS},
};

use crate::support::{
    CLOCK_SLACK, TWO_WINDOWS_AGO, api4, assert_counts, assert_stats, entry, limited, send, send_n,
    start_window_ago, v4,
};

#[test]
fn packet_ceiling_drops_past_n_and_resets_after_the_window() {
    let mut h = limited(5, 0);
    let src = [198, 51, 100, 1];
    let key = v4(src);
    let frame = api4(src, ACK | PSH);
    send_n(&h, &frame, 5, XDP_PASS);
    assert_stats(&h, &[(PASS, API, 5)]);
    assert_counts(&h, &key, 5, 0, 0);

    send_n(&h, &frame, 2, XDP_DROP);
    assert_stats(&h, &[(PASS, API, 5), (DROP, PACKET_CEILING, 2)]);
    // Dropped packets count; going over is one strike; no auto-ban configured.
    assert_counts(&h, &key, 7, 0, 1);
    assert_eq!(entry(&h, &key).autoban_until_ns, 0);

    // Two windows later the counters (and, after a gap, the strikes) restart.
    start_window_ago(&mut h, &key, TWO_WINDOWS_AGO);
    let before = monotonic_ns();
    send(&h, &frame, XDP_PASS);
    assert_stats(&h, &[(PASS, API, 6), (DROP, PACKET_CEILING, 2)]);
    assert_counts(&h, &key, 1, 0, 0);
    assert!(
        entry(&h, &key).window_start_ns + CLOCK_SLACK >= before,
        "a new window started now"
    );
    send_n(&h, &frame, 4, XDP_PASS);
    send(&h, &frame, XDP_DROP);
    assert_stats(&h, &[(PASS, API, 10), (DROP, PACKET_CEILING, 3)]);
}

#[test]
fn packet_ceiling_is_per_source() {
    let h = limited(2, 0);
    let a = api4([198, 51, 100, 2], ACK);
    let b = api4([198, 51, 100, 3], ACK);
    send_n(&h, &a, 2, XDP_PASS);
    send(&h, &a, XDP_DROP);
    send_n(&h, &b, 2, XDP_PASS);
    send(&h, &b, XDP_DROP);
    assert_stats(&h, &[(PASS, API, 4), (DROP, PACKET_CEILING, 2)]);
    assert_counts(&h, &v4([198, 51, 100, 2]), 3, 0, 1);
    assert_counts(&h, &v4([198, 51, 100, 3]), 3, 0, 1);
}

#[test]
fn syn_ceiling_drops_syns_but_passes_other_segments() {
    let mut h = limited(0, 3);
    let src = [198, 51, 100, 4];
    let key = v4(src);
    send_n(&h, &api4(src, SYN), 3, XDP_PASS);
    send(&h, &api4(src, SYN), XDP_DROP);
    assert_stats(&h, &[(PASS, API, 3), (DROP, SYN_CEILING, 1)]);
    assert_counts(&h, &key, 4, 4, 1);

    // Over the SYN ceiling, ACKs (and SYN-ACKs) of the same source pass.
    send(&h, &api4(src, ACK), XDP_PASS);
    send(&h, &api4(src, ACK | PSH), XDP_PASS);
    send(&h, &api4(src, SYN | ACK), XDP_PASS);
    send(&h, &api4(src, SYN), XDP_DROP);
    assert_stats(&h, &[(PASS, API, 6), (DROP, SYN_CEILING, 2)]);
    assert_counts(&h, &key, 8, 5, 1);

    start_window_ago(&mut h, &key, TWO_WINDOWS_AGO);
    send(&h, &api4(src, SYN), XDP_PASS);
    assert_counts(&h, &key, 1, 1, 0);
    assert_stats(&h, &[(PASS, API, 7), (DROP, SYN_CEILING, 2)]);
}

#[test]
fn a_syn_over_both_ceilings_counts_as_syn_ceiling() {
    let h = limited(2, 2);
    let src = [198, 51, 100, 5];
    send_n(&h, &api4(src, SYN), 2, XDP_PASS);
    send(&h, &api4(src, SYN), XDP_DROP);
    send(&h, &api4(src, ACK), XDP_DROP);
    assert_stats(
        &h,
        &[
            (PASS, API, 2),
            (DROP, SYN_CEILING, 1),
            (DROP, PACKET_CEILING, 1),
        ],
    );
    assert_counts(&h, &v4(src), 4, 3, 1);
}
