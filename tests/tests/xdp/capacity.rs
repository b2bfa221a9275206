//! The per-source map's capacity: LRU eviction, and the per-CPU new-source
//! budget that keeps a spoofed flood from evicting known sources.

use std::{thread, time::Duration};

use limiter_common::{
    mode,
    reason::{ALLOWLISTED, API, NEW_SOURCE_CEILING},
    verdict::{DROP, PASS, WOULD_DROP},
};
use limiter_tests::{
    packet::{ACK, SYN},
    xdp::{Harness, XDP_DROP, XDP_PASS},
};

use crate::support::{
    SECOND, WINDOW_NS, api4, assert_counts, assert_stats, host, pin_to_one_cpu, send, send_n, v4,
};

#[test]
fn a_full_source_map_evicts_old_sources_and_tracks_the_newest() {
    // One CPU: the LRU keeps per-CPU free lists.
    pin_to_one_cpu();
    let h = Harness::with_sources_capacity(Some(64));
    let src = |i: u32| [10, 1, (i >> 8) as u8, i as u8];
    for i in 0..500 {
        send(&h, &api4(src(i), SYN), XDP_PASS);
    }
    assert_stats(&h, &[(PASS, API, 500)]);
    assert_counts(&h, &v4(src(499)), 1, 1, 0);
    let count = h.source_count();
    assert!(
        (1..=64).contains(&count),
        "{count} sources in a 64-entry map"
    );
    // Which old entries go first is the kernel's LRU approximation (5.10
    // keeps the very first one longer than 6.1 does); the newest stay.
    for i in 492..500 {
        assert!(h.source(&v4(src(i))).is_some(), "source {i} tracked");
    }
}

#[test]
fn over_the_new_source_budget_unknown_sources_are_dropped_without_an_entry() {
    pin_to_one_cpu();
    let mut h = Harness::new();
    h.update_config(|c| {
        c.window_ns = WINDOW_NS;
        c.max_new_sources = 10;
    });
    let src = |i: u8| [10, 2, 0, i];
    for i in 0..10 {
        send(&h, &api4(src(i), SYN), XDP_PASS);
    }
    for i in 10..20 {
        send(&h, &api4(src(i), SYN), XDP_DROP);
    }
    assert_eq!(h.source_count(), 10, "no entry for sources over the budget");
    // Known sources are unaffected; an allow-listed newcomer still passes.
    send(&h, &api4(src(3), ACK), XDP_PASS);
    h.allow(host([10, 2, 0, 15]));
    send(&h, &api4(src(15), SYN), XDP_PASS);
    assert_eq!(h.source(&v4(src(15))), None);
    h.update_config(|c| c.mode = mode::OBSERVE);
    send(&h, &api4(src(16), SYN), XDP_PASS);
    assert_stats(
        &h,
        &[
            (PASS, API, 11),
            (DROP, NEW_SOURCE_CEILING, 10),
            (PASS, ALLOWLISTED, 1),
            (WOULD_DROP, NEW_SOURCE_CEILING, 1),
        ],
    );
    // A new window brings a new budget.
    h.update_config(|c| {
        c.mode = mode::ENFORCE;
        c.window_ns = SECOND / 10;
    });
    thread::sleep(Duration::from_millis(150));
    send(&h, &api4(src(17), SYN), XDP_PASS);
    assert!(h.source(&v4(src(17))).is_some());
}

#[test]
fn a_spoofed_flood_larger_than_the_map_cannot_evict_known_sources() {
    pin_to_one_cpu();
    let mut h = Harness::with_sources_capacity(Some(64));
    h.update_config(|c| {
        // One window for the whole flood however slow the machine: on Linux
        // 5.10 under TCG (vm-test) the 5,000 runs take 10-14 s alone and over
        // a minute beside the rest of the suite, and each new window refilled
        // the budget mid-flood.
        c.window_ns = 3600 * SECOND;
        c.max_new_sources = 8;
        c.max_packets = 3;
    });
    let known: Vec<[u8; 4]> = (0..5).map(|i| [192, 0, 2, i]).collect();
    for src in &known {
        send(&h, &api4(*src, SYN), XDP_PASS);
    }
    // 5,000 spoofed sources, far more than the 64 entries.
    let spoofed = |i: u32| [10, 3, (i >> 8) as u8, i as u8];
    for i in 0..5000 {
        let _ = h.run(&api4(spoofed(i), SYN));
    }
    assert_stats(&h, &[(PASS, API, 5 + 3), (DROP, NEW_SOURCE_CEILING, 4997)]);
    for src in &known {
        assert!(h.source(&v4(*src)).is_some(), "{src:?} kept its entry");
        // Still tracked, so still under its own ceiling: two more pass, then drops.
        send_n(&h, &api4(*src, ACK), 2, XDP_PASS);
        send(&h, &api4(*src, ACK), XDP_DROP);
    }
}
