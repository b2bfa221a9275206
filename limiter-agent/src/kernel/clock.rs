//! Calibration of the program's tick clock (see [`limiter_common::TickCalibration`]):
//! jiffies and `CLOCK_MONOTONIC` sampled at one instant by the object's
//! `limiter_clock` program, and the tick length measured and snapped to a
//! kernel `HZ`.

use std::time::Duration;

use aya::{
    Ebpf,
    programs::{ProgramError, TestRun, TestRunOptions, Xdp},
};
use limiter_common::{CLOCK_PROGRAM_NAME, CLOCK_SAMPLE_LEN, TickCalibration};

/// Why the clock could not be calibrated.
#[derive(Debug, thiserror::Error)]
pub enum ClockError {
    /// The object has no `limiter_clock` XDP program.
    #[error("the XDP object has no `{CLOCK_PROGRAM_NAME}` program")]
    MissingProgram,
    /// Loading or running the sampling program failed.
    #[error("sampling the kernel clock: {0}")]
    Program(#[from] ProgramError),
    /// The measured tick matches no kernel `HZ`.
    #[error("measured tick of {measured_ns} ns matches no kernel HZ")]
    UnknownHz { measured_ns: u64 },
}

/// `CONFIG_HZ` values Linux is built with.
const KNOWN_HZ: [u64; 8] = [100, 128, 200, 250, 256, 300, 500, 1000];

/// One simultaneous reading of jiffies and `CLOCK_MONOTONIC`.
#[derive(Clone, Copy, Debug)]
struct Sample {
    jiffies: u64,
    mono_ns: u64,
}

fn sample(program: &Xdp) -> Result<Sample, ClockError> {
    let input = [0u8; CLOCK_SAMPLE_LEN];
    let mut output = [0u8; CLOCK_SAMPLE_LEN];
    program.test_run(TestRunOptions {
        data_in: Some(&input),
        data_out: Some(&mut output),
        ..TestRunOptions::default()
    })?;
    let word = |i: usize| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&output[i * 8..i * 8 + 8]);
        u64::from_ne_bytes(bytes)
    };
    Ok(Sample {
        jiffies: word(0),
        mono_ns: word(1),
    })
}

/// A sample taken within [`EDGE_BRACKET_NS`] of a tick: two back-to-back
/// samples whose jiffies differ. A sample delayed by preemption could be late by
/// milliseconds, so a loose pair waits for the next tick (a bounded number of times).
fn tick_edge(program: &Xdp) -> Result<Sample, ClockError> {
    let mut loose = None;
    for _ in 0..MAX_EDGE_ATTEMPTS {
        let mut previous = sample(program)?;
        loop {
            let now = sample(program)?;
            if now.jiffies != previous.jiffies {
                if now.mono_ns.saturating_sub(previous.mono_ns) <= EDGE_BRACKET_NS {
                    return Ok(now);
                }
                loose = Some(now);
                break;
            }
            previous = now;
        }
    }
    Ok(loose.expect("at least one attempt"))
}

/// How close to a tick an edge sample must be taken.
const EDGE_BRACKET_NS: u64 = 50_000;
/// Ticks to wait for a tight edge before settling for a loose one.
const MAX_EDGE_ATTEMPTS: usize = 100;

/// Loads `limiter_clock` from `ebpf` (if needed) and measures the clock mapping.
/// Takes about `span`: use 1 s. Tick edges can be seen a millisecond or more
/// late (delayed jiffies updates in VMs); over 100 ms that occasionally picks
/// the wrong `HZ`, over 1 s the error is 0.1%, far inside the 1% snap.
pub fn calibrate(ebpf: &mut Ebpf, span: Duration) -> Result<TickCalibration, ClockError> {
    let program: &mut Xdp = ebpf
        .program_mut(CLOCK_PROGRAM_NAME)
        .ok_or(ClockError::MissingProgram)?
        .try_into()
        .map_err(|_| ClockError::MissingProgram)?;
    if program.fd().is_err() {
        program.load()?;
    }
    // Both samples are taken just after a tick, so the span holds a whole
    // number of ticks and the division is off by microseconds, not by a tick.
    let first = tick_edge(program)?;
    std::thread::sleep(span);
    let last = tick_edge(program)?;
    let ticks = last.jiffies.saturating_sub(first.jiffies).max(1);
    let measured_ns = last.mono_ns.saturating_sub(first.mono_ns) / ticks;
    let ns_per_jiffy = snap_to_hz(measured_ns).ok_or(ClockError::UnknownHz { measured_ns })?;
    Ok(TickCalibration {
        mono_base_ns: last.mono_ns,
        jiffies_base: last.jiffies,
        ns_per_jiffy,
    })
}

/// The tick length of the `HZ` within 1% of `measured_ns`, if any. Measured
/// between tick edges over a 1 s span the error stays well under 1%, far
/// inside the 2.3% between the closest `HZ` values (250, 256).
fn snap_to_hz(measured_ns: u64) -> Option<u64> {
    KNOWN_HZ
        .iter()
        .map(|hz| 1_000_000_000 / hz)
        .filter(|tick| measured_ns.abs_diff(*tick) * 100 <= *tick)
        .min_by_key(|tick| measured_ns.abs_diff(*tick))
}

#[cfg(test)]
mod tests {
    use super::snap_to_hz;

    #[test]
    fn ticks_snap_to_the_nearest_hz() {
        assert_eq!(snap_to_hz(4_000_000), Some(4_000_000));
        assert_eq!(snap_to_hz(4_030_000), Some(4_000_000));
        // HZ=256 is 3.906 ms: 2.3% away, not to be confused with HZ=250.
        assert_eq!(snap_to_hz(3_907_000), Some(3_906_250));
        assert_eq!(snap_to_hz(3_950_000), None);
        assert_eq!(snap_to_hz(3_340_000), Some(3_333_333));
        assert_eq!(snap_to_hz(1_003_000), Some(1_000_000));
        assert_eq!(snap_to_hz(10_020_000), Some(10_000_000));
        assert_eq!(snap_to_hz(7_000_000), None);
    }
}
