//! Time for the limiter: a monotonic clock runs every window and deadline, and
//! the wall clock is read only to stamp the Unix times sent to clients.

use std::{
    sync::atomic::{AtomicI64, AtomicU64, Ordering},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

/// Time source, injected so tests are exact and instant. Two readings, never
/// mixed: [`now_ms`](Self::now_ms) runs the windows (every
/// [`Decision::reset_ms`](super::Decision::reset_ms) is on it) and
/// [`unix_ms`](Self::unix_ms) only turns such a deadline into the Unix time a
/// client is told, at answer time ([`Now::unix_at`]). So an NTP step moves what
/// clients are told with the wall clock, and never lengthens or shortens a window.
pub trait Clock: Send + Sync + 'static {
    /// Monotonic milliseconds: never goes backwards and never steps. Its origin
    /// is the clock's own, not the Unix epoch: never send it to a client.
    fn now_ms(&self) -> u64;

    /// [`now_ms`](Self::now_ms) at `at`, an instant read a moment ago: a
    /// caller that already read the clock need not read it again. A clock
    /// that does not run on [`Instant`]s reads itself now.
    fn now_ms_at(&self, at: Instant) -> u64 {
        let _ = at;
        self.now_ms()
    }

    /// The wall clock, milliseconds since the Unix epoch, read now. It may step
    /// either way (NTP, an operator), so nothing is timed with it.
    fn unix_ms(&self) -> u64;

    /// Both clocks read together: what an answer is stamped with.
    fn now(&self) -> Now {
        Now {
            mono_ms: self.now_ms(),
            unix_ms: self.unix_ms(),
        }
    }
}

/// The monotonic and the wall clock read at one instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Now {
    /// [`Clock::now_ms`].
    pub mono_ms: u64,
    /// [`Clock::unix_ms`].
    pub unix_ms: u64,
}

impl Now {
    /// The Unix time (ms) of the monotonic deadline `deadline_ms`: the wall clock
    /// now plus the monotonic time left (none once it has passed).
    #[must_use]
    pub fn unix_at(self, deadline_ms: u64) -> u64 {
        self.unix_ms
            .saturating_add(deadline_ms.saturating_sub(self.mono_ms))
    }
}

/// The real clock. The monotonic part is an [`Instant`]'s elapsed time on top of
/// the Unix time at construction: readable numbers, but from then on it runs on
/// its own and drifts from the wall clock by every step the wall clock takes.
/// The wall part is [`SystemTime::now`] at each call.
#[derive(Debug)]
pub struct SystemClock {
    origin_ms: u64,
    start: Instant,
}

impl SystemClock {
    #[must_use]
    pub fn new() -> Self {
        Self {
            origin_ms: wall_ms(),
            start: Instant::now(),
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

/// `SystemTime::now()` in Unix ms. A wall clock before 1970 is a broken host;
/// 0 keeps the arithmetic total.
fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        self.now_ms_at(Instant::now())
    }

    fn now_ms_at(&self, at: Instant) -> u64 {
        let elapsed = at.saturating_duration_since(self.start).as_millis();
        self.origin_ms
            .saturating_add(u64::try_from(elapsed).unwrap_or(u64::MAX))
    }

    fn unix_ms(&self) -> u64 {
        wall_ms()
    }
}

/// A clock tests move by hand. Both parts start at `start_ms` and advance
/// together; [`step_wall`](Self::step_wall) moves the wall part alone, as an
/// NTP step does.
#[derive(Debug)]
pub struct FakeClock {
    mono_ms: AtomicU64,
    /// Wall minus monotonic, in ms.
    wall_offset_ms: AtomicI64,
}

impl FakeClock {
    #[must_use]
    pub fn new(start_ms: u64) -> Self {
        Self {
            mono_ms: AtomicU64::new(start_ms),
            wall_offset_ms: AtomicI64::new(0),
        }
    }

    /// Time passes: both parts move on by `ms`.
    pub fn advance(&self, ms: u64) {
        self.mono_ms.fetch_add(ms, Ordering::SeqCst);
    }

    /// Sets the monotonic part (the wall part keeps its offset); keeping it
    /// non-decreasing is the test's job.
    pub fn set(&self, ms: u64) {
        self.mono_ms.store(ms, Ordering::SeqCst);
    }

    /// Steps the wall clock alone by `delta_ms`, forwards or back.
    pub fn step_wall(&self, delta_ms: i64) {
        self.wall_offset_ms.fetch_add(delta_ms, Ordering::SeqCst);
    }
}

impl Clock for FakeClock {
    fn now_ms(&self) -> u64 {
        self.mono_ms.load(Ordering::SeqCst)
    }

    fn unix_ms(&self) -> u64 {
        self.now_ms()
            .saturating_add_signed(self.wall_offset_ms.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_706_540_000_000;

    #[test]
    fn a_wall_step_moves_unix_times_and_no_deadline() {
        let clock = FakeClock::new(T0);
        let deadline = clock.now_ms() + 60_000;
        clock.advance(10_000);
        assert_eq!(clock.now().unix_at(deadline), T0 + 60_000);
        clock.step_wall(3_600_000);
        assert_eq!(clock.now_ms(), T0 + 10_000, "monotonic time does not step");
        assert_eq!(
            clock.now().unix_at(deadline),
            T0 + 3_600_000 + 60_000,
            "50 s left, told on the new wall clock"
        );
        clock.step_wall(-7_200_000);
        assert_eq!(clock.now().unix_at(deadline), T0 - 3_600_000 + 60_000);
        clock.advance(60_000);
        let now = clock.now();
        assert_eq!(
            now.unix_at(deadline),
            now.unix_ms,
            "a passed deadline is now"
        );
    }

    #[test]
    fn the_system_clock_reads_the_wall_clock_at_each_call() {
        let clock = SystemClock::new();
        let (a, b) = (clock.now_ms(), clock.now_ms());
        assert!(a <= b);
        let (read, wall) = (clock.unix_ms(), wall_ms());
        assert!(read.abs_diff(wall) < 1_000, "{read} vs {wall}");
    }
}
