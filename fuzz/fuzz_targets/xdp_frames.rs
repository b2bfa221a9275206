//! The XDP program (its packet parser with every header layer) on arbitrary
//! frames through `BPF_PROG_TEST_RUN` (root needed): it must answer XDP_PASS
//! or XDP_DROP, and with no ban, no ceiling and no new-source budget it must
//! drop nothing, whatever the frame.
#![no_main]

use std::sync::{Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use limiter_tests::xdp::{Harness, XDP_PASS, test_config};

fn harness() -> &'static Mutex<Harness> {
    static HARNESS: OnceLock<Mutex<Harness>> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let mut h = Harness::new();
        let clock = h.config().clock;
        h.set_config(&limiter_common::ProgramConfig {
            clock,
            ..test_config()
        });
        Mutex::new(h)
    })
}

fuzz_target!(|frame: &[u8]| {
    // The kernel refuses test runs on frames shorter than an Ethernet header.
    if frame.len() < 14 || frame.len() > 4096 {
        return;
    }
    let h = harness().lock().unwrap();
    let action = h.run(frame);
    assert_eq!(action, XDP_PASS, "dropped with no policy: {frame:02x?}");
});
