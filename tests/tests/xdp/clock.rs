//! The program's jiffies clock, its calibration, and the coarse-clock global.

use std::{thread, time::Duration};

use limiter_common::{reason::API, verdict::PASS};
use limiter_tests::{
    monotonic_ns,
    packet::SYN,
    xdp::{Harness, XDP_PASS},
};

use crate::support::{api4, assert_stats, entry, send, v4};

#[test]
fn the_program_clock_follows_clock_monotonic() {
    // Window starts are the program's now: two of them two seconds apart must
    // be two seconds apart on CLOCK_MONOTONIC too, to within a tick or two.
    let h = Harness::new();
    let stamp = |src: [u8; 4]| {
        let before = monotonic_ns();
        send(&h, &api4(src, SYN), XDP_PASS);
        let after = monotonic_ns();
        (before, entry(&h, &v4(src)).window_start_ns, after)
    };
    let (before0, now0, after0) = stamp([192, 0, 2, 80]);
    thread::sleep(Duration::from_secs(2));
    let (before1, now1, after1) = stamp([192, 0, 2, 81]);
    let tolerance = 12_000_000; // three ticks at HZ=250
    let elapsed = now1 - now0;
    assert!(
        elapsed + tolerance >= before1 - after0 && elapsed <= after1 - before0 + tolerance,
        "the program measured {elapsed} ns where CLOCK_MONOTONIC measured {}..{} ns (clock {:?})",
        before1 - after0,
        after1 - before0,
        h.config().clock
    );
    assert_stats(&h, &[(PASS, API, 2)]);
}

#[test]
fn clock_calibration_finds_the_kernel_tick_every_time() {
    // Calibration snaps the measured tick to the nearest HZ, and HZ=250 and
    // HZ=256 are 2.3% apart: a wrong pick makes the program's clock drift 2.3%
    // from CLOCK_MONOTONIC, and every ban deadline userspace writes with it.
    // Tick edges can be seen a millisecond or more late (a delayed jiffies
    // update in a VM), which over 100 ms picked the wrong HZ now and then; over
    // the 1 s span the agent and the harness use, such an error is 0.1%.
    // Calibrations run while the rest of the suite loads the machine must all
    // agree with one over 3 s.
    let mut h = Harness::new();
    let reference = h
        .calibrate_clock(Duration::from_secs(3))
        .expect("calibrating over 3 s")
        .ns_per_jiffy;
    let ticks: Vec<u64> = (0..4u64)
        .map(|i| {
            h.calibrate_clock(Duration::from_micros(1_000_000 + i * 150))
                .map_or(0, |clock| clock.ns_per_jiffy)
        })
        .collect();
    assert!(
        ticks.iter().all(|&tick| tick == reference),
        "1 s calibrations found ticks {ticks:?}; over 3 s the tick is {reference} ns"
    );
}

#[test]
fn the_coarse_clock_global_follows_the_kernel() {
    // The harness (like the agent) sets USE_COARSE_CLOCK from a probe. The
    // probe must be right both ways: a kernel that has the helper accepts the
    // program with the global set, one without it (Linux 5.10) refuses it, so
    // loading there depends on the global making the branch dead.
    let supported = limiter_tests::xdp::coarse_clock();
    let forced = limiter_tests::xdp::load_with_coarse_clock(true);
    if supported {
        forced.expect("the kernel has bpf_ktime_get_coarse_ns, yet refuses the program using it");
    } else {
        let refusal = forced.expect_err(
            "the probe found no bpf_ktime_get_coarse_ns, yet the kernel accepts a program calling it",
        );
        assert!(
            refusal.contains("func"),
            "the kernel refused the program for another reason than the helper: {refusal}"
        );
    }
    limiter_tests::xdp::load_with_coarse_clock(false)
        .expect("the program loads with the coarse clock disabled");
}
