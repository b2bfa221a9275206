//! The generic cell rate algorithm (GCRA): a rate of `limit` per `window`
//! with bursts of up to `burst`, kept as one number per bucket, its
//! theoretical arrival time (TAT): when the bucket would be back to its full
//! burst if no more requests came. A request of `hits` units moves the TAT
//! `hits` emission intervals on (from now, if the TAT has passed) and is
//! admitted if the TAT then runs at most `burst` intervals ahead of now; a
//! rejected request moves nothing. In any interval of length t, at most
//! `burst + t / interval` units are admitted, and a request that waits the
//! time it was told is admitted.
//!
//! Times are microseconds on one clock (this host's monotonic clock, or
//! Redis's `TIME`), so a Unix time in them stays below 2^53 and Redis's Lua
//! does the same integer arithmetic as this module. The emission interval
//! is the window divided by the limit, rounded up, so the rate is never
//! above `limit / window`.

/// A rate and its burst.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gcra {
    /// `window / limit`, rounded up.
    interval_us: u64,
    /// How far ahead of now the TAT may run: `burst` intervals.
    tolerance_us: u64,
}

/// One decision on a GCRA bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GcraDecision {
    pub allowed: bool,
    /// The bucket's TAT after the decision (by a rejection, only held to
    /// the burst).
    pub tat_us: u64,
    /// Units that could be admitted right after this decision.
    pub remaining: u32,
    /// From now until a request of the same units would be admitted: 0 when
    /// this one was; until the full burst is back when they never fit.
    pub retry_us: u64,
    /// From now until the full burst is back.
    pub reset_us: u64,
}

impl Gcra {
    /// `limit` units per `window_ms`, bursts of up to `burst` (each at least
    /// 1; a window of 0 counts as 1 ms).
    #[must_use]
    pub fn new(limit: u32, window_ms: u64, burst: u32) -> Self {
        let span = u128::from(window_ms.max(1)) * 1_000;
        let interval = span.div_ceil(u128::from(limit.max(1)));
        let interval_us = u64::try_from(interval).unwrap_or(u64::MAX);
        Self {
            interval_us,
            tolerance_us: interval_us.saturating_mul(u64::from(burst.max(1))),
        }
    }

    /// The emission interval: the time one unit takes to come back.
    #[must_use]
    pub fn interval_us(&self) -> u64 {
        self.interval_us
    }

    /// How far ahead of now the TAT may run: `burst` intervals.
    #[must_use]
    pub fn tolerance_us(&self) -> u64 {
        self.tolerance_us
    }

    /// The TAT after a reported charge that did not fit (Envoy's
    /// `hits_addend`): the burst is spent, so the units are never lost.
    #[must_use]
    pub fn exhausted(&self, tat_us: u64, now_us: u64) -> u64 {
        self.held(tat_us, now_us)
            .max(now_us.saturating_add(self.tolerance_us))
    }

    /// The TAT as this rate reads it: one beyond the burst (left by a
    /// larger burst before a reload) is held to it, and the bucket keeps
    /// the held TAT from then on.
    #[must_use]
    pub fn held(&self, tat_us: u64, now_us: u64) -> u64 {
        tat_us.min(now_us.saturating_add(self.tolerance_us))
    }

    /// Admits or rejects a request of `hits` units (0: a check that takes
    /// nothing, admitted while a unit is left) at `now_us` on a bucket whose
    /// TAT is `tat_us` (0 for a new bucket), [`held`](Self::held) to the
    /// burst; the decision's `tat_us` is the TAT to keep.
    #[must_use]
    pub fn decide(&self, tat_us: u64, now_us: u64, hits: u32) -> GcraDecision {
        let tat_us = self.held(tat_us, now_us);
        let from = tat_us.max(now_us);
        let asked = u64::from(hits.max(1)).saturating_mul(self.interval_us);
        let moved = from.saturating_add(asked);
        let allowed = moved - now_us <= self.tolerance_us;
        let tat = if allowed && hits > 0 { moved } else { from };
        let ahead = tat - now_us;
        let remaining = (self.tolerance_us.saturating_sub(ahead)) / self.interval_us;
        GcraDecision {
            allowed,
            tat_us: if allowed && hits > 0 { tat } else { tat_us },
            remaining: u32::try_from(remaining).unwrap_or(u32::MAX),
            retry_us: if allowed {
                0
            } else if asked > self.tolerance_us {
                // More than the burst never fits: when it is whole.
                ahead
            } else {
                (moved - now_us).saturating_sub(self.tolerance_us)
            },
            reset_us: ahead,
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const MS: u64 = 1_000;

    #[test]
    fn a_burst_then_one_per_interval_and_the_retry_told_is_exact() {
        // 60 a minute, bursts of 5: an interval of 1 s.
        let gcra = Gcra::new(60, 60_000, 5);
        assert_eq!(gcra.interval_us(), 1_000 * MS);
        let mut tat = 0;
        let now = 1_000_000 * MS;
        for left in (0..5).rev() {
            let d = gcra.decide(tat, now, 1);
            assert!(d.allowed);
            assert_eq!(d.remaining, left);
            tat = d.tat_us;
        }
        let refused = gcra.decide(tat, now, 1);
        assert!(!refused.allowed);
        assert_eq!(refused.tat_us, tat, "a rejection moves nothing");
        assert_eq!(
            (refused.retry_us, refused.reset_us),
            (1_000 * MS, 5_000 * MS)
        );
        assert!(!gcra.decide(tat, now + refused.retry_us - 1, 1).allowed);
        let waited = gcra.decide(tat, now + refused.retry_us, 1);
        assert!(waited.allowed, "a client that waits until told is admitted");
        assert_eq!(waited.remaining, 0);
        // Idle for the whole burst's time: full again.
        let rested = gcra.decide(waited.tat_us, waited.tat_us, 0);
        assert_eq!(rested.remaining, 5);
    }

    #[test]
    fn several_units_fit_or_take_nothing_and_a_rate_is_never_rounded_up() {
        let gcra = Gcra::new(10, 1_000, 10);
        let d = gcra.decide(0, 0, 7);
        assert_eq!((d.allowed, d.remaining), (true, 3));
        let refused = gcra.decide(d.tat_us, 0, 4);
        assert!(!refused.allowed);
        assert_eq!(refused.retry_us, 100 * MS, "one unit must come back first");
        assert_eq!(gcra.decide(d.tat_us, 0, 3).remaining, 0);
        // 40 per 10 s → 250 ms; 7 a minute → 8571428.58 µs, rounded up.
        assert_eq!(Gcra::new(40, 10_000, 40).interval_us(), 250 * MS);
        assert_eq!(Gcra::new(7, 60_000, 1).interval_us(), 8_571_429);
    }

    #[test]
    fn a_tat_beyond_the_burst_is_held_to_it() {
        // A burst of 100 spent, then the burst cut to 10 by a reload.
        let before = Gcra::new(10, 10_000, 100);
        let spent = before.decide(0, 0, 100).tat_us;
        let after = Gcra::new(10, 10_000, 10);
        let d = after.decide(spent, 0, 1);
        assert!(!d.allowed);
        assert_eq!(d.retry_us, 1_000 * MS, "one interval, not ninety-one");
        assert_eq!(d.reset_us, 10_000 * MS);
        assert_eq!(d.tat_us, 10_000 * MS, "the bucket keeps the held TAT");
        // Waiting as told is admitted, from the TAT kept.
        assert!(after.decide(d.tat_us, d.retry_us, 1).allowed);
        assert!(
            !after.decide(spent, d.retry_us, 1).allowed,
            "not from the old one"
        );
        // Charges of any size: refused, with a time that stays in range.
        let huge = after.decide(0, 5, u32::MAX);
        assert!(!huge.allowed);
        assert_eq!(huge.retry_us, 0, "never fits: the burst is whole now");
        assert_eq!(
            after.exhausted(spent, 0),
            10_000 * MS,
            "held, then the burst spent"
        );
    }

    /// (gap in ms before the request, units): arrivals of one client.
    fn arrivals() -> impl Strategy<Value = Vec<(u64, u32)>> {
        proptest::collection::vec((0_u64..400, 1_u32..3), 1..120)
    }

    proptest! {
        /// In any interval [a, b] between two admitted requests, the units
        /// admitted are at most `burst + (b - a) / interval`.
        #[test]
        fn never_more_than_the_burst_plus_the_rate(
            limit in 1_u32..20,
            window_ms in 100_u64..5_000,
            burst in 1_u32..10,
            arrivals in arrivals(),
        ) {
            let gcra = Gcra::new(limit, window_ms, burst);
            let (mut tat, mut now) = (0, 10_000 * MS);
            let mut admitted: Vec<(u64, u32)> = Vec::new();
            for (gap, hits) in arrivals {
                now += gap * MS;
                let d = gcra.decide(tat, now, hits);
                if d.allowed {
                    tat = d.tat_us;
                    admitted.push((now, hits));
                } else {
                    // Told when to come back: then it is admitted.
                    let again = gcra.decide(tat, now + d.retry_us, hits);
                    prop_assert!(again.allowed || hits > burst);
                }
            }
            for (i, &(a, _)) in admitted.iter().enumerate() {
                let mut units = 0_u64;
                for &(b, hits) in &admitted[i..] {
                    units += u64::from(hits);
                    let bound = u128::from(burst) * u128::from(gcra.interval_us())
                        + u128::from(b - a);
                    prop_assert!(
                        u128::from(units) * u128::from(gcra.interval_us()) <= bound,
                        "{units} units in {} ms", (b - a) / MS
                    );
                }
            }
        }
    }
}
