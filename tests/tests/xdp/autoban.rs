//! The kernel's own auto-ban of sources over a ceiling for consecutive windows.

use limiter_common::{
    reason::{API, BANNED, PACKET_CEILING},
    verdict::{DROP, PASS},
};
use limiter_tests::{
    monotonic_ns,
    packet::{ACK, SYN},
    xdp::{XDP_DROP, XDP_PASS},
};

use crate::support::{
    CLOCK_SLACK, MINUTE, ONE_WINDOW_AGO, SECOND, TWO_WINDOWS_AGO, api4, assert_counts,
    assert_stats, autobanning, entry, send, send_n, start_window_ago, v4,
};

#[test]
fn going_over_the_ceiling_once_autobans_with_one_window() {
    let mut h = autobanning(3, 1);
    let src = [198, 51, 100, 10];
    let key = v4(src);
    let frame = api4(src, ACK);
    send_n(&h, &frame, 3, XDP_PASS);
    assert_eq!(entry(&h, &key).autoban_until_ns, 0);

    let before = monotonic_ns();
    send(&h, &frame, XDP_DROP);
    let after = monotonic_ns();
    let s = entry(&h, &key);
    assert_eq!((s.packets, s.strikes), (4, 1), "{s:?}");
    assert!(
        s.autoban_until_ns + CLOCK_SLACK >= before + MINUTE
            && s.autoban_until_ns <= after + MINUTE + CLOCK_SLACK,
        "autoban_until_ns {} is not now + 60 s ({before}..{after})",
        s.autoban_until_ns
    );
    // The packet that went over is counted against the ceiling, later ones as banned.
    send_n(&h, &frame, 2, XDP_DROP);
    send(&h, &api4(src, SYN), XDP_DROP);
    assert_stats(
        &h,
        &[(PASS, API, 3), (DROP, PACKET_CEILING, 1), (DROP, BANNED, 3)],
    );
    assert_counts(&h, &key, 4, 0, 1);

    // A new window does not lift the auto-ban.
    start_window_ago(&mut h, &key, TWO_WINDOWS_AGO);
    send(&h, &frame, XDP_DROP);
    assert_stats(
        &h,
        &[(PASS, API, 3), (DROP, PACKET_CEILING, 1), (DROP, BANNED, 4)],
    );
    assert_eq!(entry(&h, &key).autoban_until_ns, s.autoban_until_ns);
    // Nor does a policy generation bump (the auto-ban is not in the tries).
    h.update_config(|c| c.policy_gen += 1);
    send(&h, &frame, XDP_DROP);
    assert_eq!(h.stat(DROP, BANNED), 5);
}

#[test]
fn an_autoban_ends_at_its_deadline() {
    let mut h = autobanning(1, 1);
    let src = [198, 51, 100, 11];
    let key = v4(src);
    let frame = api4(src, ACK);
    send(&h, &frame, XDP_PASS);
    send(&h, &frame, XDP_DROP);
    send(&h, &frame, XDP_DROP);
    assert_stats(
        &h,
        &[(PASS, API, 1), (DROP, PACKET_CEILING, 1), (DROP, BANNED, 1)],
    );
    let mut state = entry(&h, &key);
    assert!(state.autoban_until_ns > monotonic_ns());
    state.autoban_until_ns = monotonic_ns() - SECOND;
    state.window_start_ns = monotonic_ns() - TWO_WINDOWS_AGO;
    h.put_source(&key, &state);
    send(&h, &frame, XDP_PASS);
    assert_stats(
        &h,
        &[(PASS, API, 2), (DROP, PACKET_CEILING, 1), (DROP, BANNED, 1)],
    );
    assert_counts(&h, &key, 1, 0, 0);
}

#[test]
fn two_windows_autoban_needs_two_consecutive_windows_over_the_ceiling() {
    let mut h = autobanning(2, 2);
    let src = [198, 51, 100, 12];
    let key = v4(src);
    let frame = api4(src, ACK);

    // First window over: a strike, no ban.
    send_n(&h, &frame, 2, XDP_PASS);
    send_n(&h, &frame, 2, XDP_DROP);
    assert_counts(&h, &key, 4, 0, 1);
    assert_eq!(
        entry(&h, &key).autoban_until_ns,
        0,
        "one window is not enough"
    );
    assert_stats(&h, &[(PASS, API, 2), (DROP, PACKET_CEILING, 2)]);

    // The directly following window (just over one window later) goes over too.
    start_window_ago(&mut h, &key, ONE_WINDOW_AGO);
    send_n(&h, &frame, 2, XDP_PASS);
    assert_counts(&h, &key, 2, 0, 1);
    let before = monotonic_ns();
    send(&h, &frame, XDP_DROP);
    let s = entry(&h, &key);
    assert_eq!((s.packets, s.strikes), (3, 2), "{s:?}");
    assert!(
        s.autoban_until_ns + CLOCK_SLACK >= before + MINUTE,
        "second window over sets the auto-ban: {s:?}"
    );
    send(&h, &frame, XDP_DROP);
    assert_stats(
        &h,
        &[(PASS, API, 4), (DROP, PACKET_CEILING, 3), (DROP, BANNED, 1)],
    );
}

#[test]
fn strikes_reset_after_a_window_under_the_ceiling_or_a_gap() {
    let mut h = autobanning(2, 2);
    let src = [198, 51, 100, 13];
    let key = v4(src);
    let frame = api4(src, ACK);

    // Over, then a following window under the ceiling, then over again: no ban.
    send_n(&h, &frame, 2, XDP_PASS);
    send(&h, &frame, XDP_DROP);
    assert_counts(&h, &key, 3, 0, 1);
    start_window_ago(&mut h, &key, ONE_WINDOW_AGO);
    send(&h, &frame, XDP_PASS);
    assert_counts(&h, &key, 1, 0, 1);
    start_window_ago(&mut h, &key, ONE_WINDOW_AGO);
    send_n(&h, &frame, 2, XDP_PASS);
    send(&h, &frame, XDP_DROP);
    assert_counts(&h, &key, 3, 0, 1);
    assert_eq!(entry(&h, &key).autoban_until_ns, 0);

    // Over, then silence for two windows, then over again: no ban either.
    start_window_ago(&mut h, &key, TWO_WINDOWS_AGO);
    send_n(&h, &frame, 2, XDP_PASS);
    send(&h, &frame, XDP_DROP);
    assert_counts(&h, &key, 3, 0, 1);
    assert_eq!(entry(&h, &key).autoban_until_ns, 0);
    send(&h, &frame, XDP_DROP);
    assert_stats(&h, &[(PASS, API, 7), (DROP, PACKET_CEILING, 4)]);
}
