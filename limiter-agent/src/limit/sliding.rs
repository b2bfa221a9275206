//! The sliding window: the window cut into [`SLICES`] slices of
//! `ceil(window / SLICES)` ms on the store's clock, one count per slice. A
//! request is admitted when its units and those of the slices that
//! overlap the last window (the current slice and the `SLICES` before it)
//! are at most the limit.
//!
//! The bound (in `docs/algorithms.md`): since those slices always cover at
//! least the last window, **no interval of one window's length ever holds
//! more than `limit` admitted units**, whatever the arrivals: no boundary
//! burst, no over-admission. What it costs: they cover at most
//! `SLICES + 1` slices, a window and a slice, so a request is refused only
//! when that much of the past held `limit`; a client steady below `limit`
//! per window and slice (95% of the limit, give or take a unit) is never
//! refused.
//!
//! Slices sit on a grid from the clock's zero, so a slice's index alone
//! says when it stops counting: at the end of slice `index + SLICES`.

/// Slices per window.
pub const SLICES: u64 = 20;

/// One slice's units: its index on the grid and its count.
pub type Slice = (u64, u32);

/// One decision on a sliding-window bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlidingDecision {
    pub allowed: bool,
    /// Units to add to the current slice (the request's; for a reported
    /// charge that does not fit, what fills the window).
    pub add: u32,
    /// Units that could be admitted right after this decision.
    pub remaining: u32,
    /// When (ms, same clock) a request of the same units would be admitted
    /// (a rejection), or the whole limit is back (otherwise).
    pub reset_ms: u64,
}

/// A limit per window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sliding {
    limit: u32,
    slice_ms: u64,
}

impl Sliding {
    /// `limit` units per `window_ms` (at least 1 ms).
    #[must_use]
    pub fn new(limit: u32, window_ms: u64) -> Self {
        Self {
            limit,
            slice_ms: window_ms.max(1).div_ceil(SLICES),
        }
    }

    /// A slice's length in ms.
    #[must_use]
    pub fn slice_ms(&self) -> u64 {
        self.slice_ms
    }

    /// The slice `now_ms` falls in.
    #[must_use]
    pub fn slice_of(&self, now_ms: u64) -> u64 {
        now_ms / self.slice_ms
    }

    /// When a slice stops counting: the end of the `SLICES`-th after it.
    #[must_use]
    pub fn forget_at(&self, slice: u64) -> u64 {
        slice
            .saturating_add(SLICES + 1)
            .saturating_mul(self.slice_ms)
    }

    /// Whether a slice still counts at `now_ms`.
    #[must_use]
    pub fn counts(&self, slice: u64, now_ms: u64) -> bool {
        self.forget_at(slice) > now_ms
    }

    /// Admits or rejects a request of `hits` units (0: a check that counts
    /// nothing, admitted while a unit is left) at `now_ms`; `live` is every
    /// slice that still counts (see [`Self::counts`]), in any order. A
    /// rejection adds nothing, unless `exhaust` (a reported charge, see
    /// [`super::Spend::Reported`]): then what fills the window.
    #[must_use]
    pub fn decide(&self, live: &[Slice], now_ms: u64, hits: u32, exhaust: bool) -> SlidingDecision {
        let held: u64 = live.iter().map(|&(_, c)| u64::from(c)).sum();
        let limit = u64::from(self.limit);
        let left = limit.saturating_sub(held);
        let allowed = left >= u64::from(hits.max(1));
        let add = if allowed {
            hits
        } else if exhaust && hits > 1 {
            u32::try_from(left).unwrap_or(u32::MAX)
        } else {
            0
        };
        let held = held + u64::from(add);
        let mut slices: Vec<Slice> = live.to_vec();
        if add > 0 {
            slices.push((self.slice_of(now_ms), add));
        }
        slices.sort_unstable();
        let full = slices
            .last()
            .map_or(now_ms, |&(last, _)| self.forget_at(last));
        let reset_ms = if allowed || u64::from(hits) > limit {
            full
        } else {
            // The oldest slices go first: when enough have gone.
            let must_go = held + u64::from(hits.max(1)) - limit;
            let mut gone = 0;
            slices
                .iter()
                .find(|&&(_, c)| {
                    gone += u64::from(c);
                    gone >= must_go
                })
                .map_or(full, |&(slice, _)| self.forget_at(slice))
        };
        SlidingDecision {
            allowed,
            add,
            remaining: u32::try_from(limit.saturating_sub(held)).unwrap_or(0),
            reset_ms: reset_ms.max(now_ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Runs arrivals of one unit at `times` (sorted) against a bucket kept
    /// here; returns the admitted times.
    fn run(sliding: Sliding, times: &[u64]) -> Vec<u64> {
        let mut slices: Vec<Slice> = Vec::new();
        let mut admitted = Vec::new();
        for &t in times {
            slices.retain(|&(s, _)| sliding.counts(s, t));
            let d = sliding.decide(&slices, t, 1, false);
            if d.add > 0 {
                let now = sliding.slice_of(t);
                match slices.iter_mut().find(|(s, _)| *s == now) {
                    Some(slice) => slice.1 += d.add,
                    None => slices.push((now, d.add)),
                }
            }
            if d.allowed {
                admitted.push(t);
            }
        }
        admitted
    }

    /// The most admitted in an interval `[a, a + w)` starting at an admission.
    fn busiest(admitted: &[u64], w: u64) -> (u64, usize) {
        admitted
            .iter()
            .enumerate()
            .map(|(i, &a)| {
                let n = admitted[i..].iter().take_while(|&&b| b < a + w).count();
                (a, n)
            })
            .max_by_key(|&(_, n)| n)
            .unwrap_or_default()
    }

    #[test]
    fn slices_leave_the_window_one_by_one_and_the_time_told_is_exact() {
        // 10 a second: slices of 50 ms.
        let sliding = Sliding::new(10, 1_000);
        assert_eq!(sliding.slice_ms(), 50);
        let live = [(100, 4), (103, 6)];
        // Slice 100 counts until the end of slice 120: 6_050 ms.
        let refused = sliding.decide(&live, 5_999, 1, false);
        assert!(!refused.allowed);
        assert_eq!((refused.remaining, refused.reset_ms), (0, 6_050));
        // Five units need both slices gone: 6_200.
        assert_eq!(sliding.decide(&live, 5_999, 5, false).reset_ms, 6_200);
        let live = [(103, 6)];
        let d = sliding.decide(&live, 6_050, 3, false);
        assert_eq!((d.allowed, d.add, d.remaining), (true, 3, 1));
        assert_eq!(
            d.reset_ms,
            sliding.forget_at(121),
            "whole once the new slice goes"
        );
        let never = sliding.decide(&live, 6_050, 11, false);
        assert_eq!(
            never.reset_ms, 6_200,
            "too many ever: told when the limit is whole"
        );
        let filled = sliding.decide(&live, 6_050, 5, true);
        assert_eq!(
            (filled.allowed, filled.add, filled.remaining),
            (false, 4, 0)
        );
    }

    #[test]
    fn a_burst_at_a_boundary_gets_the_limit() {
        let sliding = Sliding::new(50, 10_000);
        let mut times = vec![0];
        times.extend([9_750; 50]);
        times.extend([10_250; 50]);
        assert_eq!(run(sliding, &times).len(), 50);
    }

    proptest! {
        /// The documented bound: no interval of one window's length holds
        /// more than the limit, whatever the arrivals.
        #[test]
        fn never_more_than_the_limit_in_any_window(
            limit in 1_u32..30,
            w in 1_u64..3_000,
            gaps in proptest::collection::vec(0_u64..400, 1..300),
        ) {
            let sliding = Sliding::new(limit, w);
            let mut t = 1_000;
            let times: Vec<u64> = gaps.iter().map(|g| { t += g; t }).collect();
            let (a, n) = busiest(&run(sliding, &times), w);
            prop_assert!(n <= limit as usize, "{n} admitted from {a}");
        }

        /// What it costs: a steady client with room for a unit more per
        /// window and slice is never refused.
        #[test]
        fn a_steady_client_under_the_limit_is_never_refused(
            limit in 1_u32..60,
            w in 20_u64..5_000,
            start in 0_u64..10_000,
        ) {
            let sliding = Sliding::new(limit, w);
            let span = (SLICES + 1) * sliding.slice_ms();
            // At most limit − 1 arrivals in any `span`: more than span / (limit − 1) apart.
            prop_assume!(limit > 1);
            let gap = span / u64::from(limit - 1) + 1;
            let times: Vec<u64> = (0..u64::from(limit) * 5).map(|i| start + i * gap).collect();
            prop_assert_eq!(run(sliding, &times).len(), times.len());
        }
    }
}
