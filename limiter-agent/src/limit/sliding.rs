//! The sliding window: two fixed windows back to back, the previous one's
//! count weighted by how much of it the sliding window still covers. A
//! request at `e` ms into the current window (of `W`), whose previous
//! window counted `P` and the current one `c`, is admitted with `h` units
//! when
//!
//! ```text
//! P·(W − e) + (c + h)·W ≤ limit·W
//! ```
//!
//! compared exactly in integers (the previous window taken as if its
//! requests were spread evenly over it). Windows are anchored at the
//! client's first request, like the fixed window's; each next window starts
//! where the last one ended, and once nothing weighs (no count in either
//! window) the next request anchors a new one.
//!
//! The bound (in `docs/algorithms.md`): in any interval of length `W`
//! starting a fraction `g` into a window that counted `P`, fewer than
//! `limit + P·g` units are admitted. A client whose previous window's
//! requests were spread evenly, a steady client among them, gets at most
//! `limit`; the worst case, a previous window spent at its very end, tends
//! to `2·limit` as `g` tends to 1, and a burst at the boundary gets
//! `limit + limit·d/W` for a burst `d` ms long.

/// A bucket's state: the current window's start and the two counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlidingState {
    pub start_ms: u64,
    pub count: u32,
    pub previous: u32,
}

/// One decision on a sliding-window bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlidingDecision {
    pub allowed: bool,
    /// The state after the decision (rolled over to the window in force,
    /// even for a rejection).
    pub state: SlidingState,
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
    window_ms: u64,
}

impl Sliding {
    /// `limit` units per `window_ms` (at least 1 ms).
    #[must_use]
    pub fn new(limit: u32, window_ms: u64) -> Self {
        Self {
            limit,
            window_ms: window_ms.max(1),
        }
    }

    /// The state at `now_ms`: the window in force, started where the last
    /// one ended, or a new one anchored now when nothing weighs (`state` of
    /// `None`: a new bucket).
    #[must_use]
    pub fn rolled(&self, state: Option<SlidingState>, now_ms: u64) -> SlidingState {
        let w = self.window_ms;
        let rolled = match state {
            Some(s) if now_ms < s.start_ms.saturating_add(w) => s,
            Some(s) if now_ms < s.start_ms.saturating_add(2 * w) => SlidingState {
                start_ms: s.start_ms + w,
                count: 0,
                previous: s.count,
            },
            _ => SlidingState::default(),
        };
        if rolled.count == 0 && rolled.previous == 0 {
            // Nothing weighs: the same as no bucket, whose window starts at
            // its first request. So a request not seen (a rejection the
            // Redis store answered from its cache) changes nothing after.
            SlidingState {
                start_ms: now_ms,
                ..rolled
            }
        } else {
            rolled
        }
    }

    /// When the bucket says nothing any more (the current window's count
    /// no longer weighs): a bucket may be forgotten from then on.
    #[must_use]
    pub fn forget_at(&self, state: SlidingState) -> u64 {
        state.start_ms.saturating_add(2 * self.window_ms)
    }

    /// `P·(W − e)`: the previous window's weight at `e` ms into the current one.
    fn carried(&self, state: SlidingState, now_ms: u64) -> u128 {
        let e = now_ms.saturating_sub(state.start_ms).min(self.window_ms);
        u128::from(state.previous) * u128::from(self.window_ms - e)
    }

    /// Units a request may have at `now_ms` (the state already rolled).
    #[must_use]
    pub fn remaining(&self, state: SlidingState, now_ms: u64) -> u32 {
        let w = u128::from(self.window_ms);
        let room = (u128::from(self.limit) * w).saturating_sub(self.carried(state, now_ms));
        let sendable = (room / w).saturating_sub(u128::from(state.count));
        u32::try_from(sendable).unwrap_or(u32::MAX)
    }

    /// Admits or rejects a request of `hits` units (0: a check that counts
    /// nothing, admitted while a unit is left) at `now_ms`. A rejection
    /// counts nothing, unless `exhaust` (a reported charge, see
    /// [`super::Spend::Reported`]): then the current window is counted full.
    #[must_use]
    pub fn decide(
        &self,
        state: Option<SlidingState>,
        now_ms: u64,
        hits: u32,
        exhaust: bool,
    ) -> SlidingDecision {
        let mut state = self.rolled(state, now_ms);
        let allowed = self.remaining(state, now_ms) >= hits.max(1);
        if allowed {
            state.count += hits;
        } else if exhaust && hits > 1 {
            state.count = state.count.max(self.limit);
        }
        let reset_ms = if allowed {
            self.full_at(state).max(now_ms)
        } else {
            self.admits_at(state, hits.max(1))
        };
        SlidingDecision {
            allowed,
            state,
            remaining: self.remaining(state, now_ms),
            reset_ms,
        }
    }

    /// When the whole limit is back if nothing more comes: once the
    /// current window's count weighs nothing (the end of the next window),
    /// or, if it is 0, once the previous one's does.
    #[must_use]
    pub fn full_at(&self, state: SlidingState) -> u64 {
        if state.count > 0 {
            self.forget_at(state)
        } else if state.previous > 0 {
            state.start_ms + self.window_ms
        } else {
            state.start_ms
        }
    }

    /// The first ms at which `hits` units fit if nothing more comes (the
    /// full limit's time when they never fit).
    fn admits_at(&self, state: SlidingState, hits: u32) -> u64 {
        let (limit, w) = (u128::from(self.limit), u128::from(self.window_ms));
        let need = u128::from(state.count) + u128::from(hits);
        let within = |weighed: u32, room: u128| -> u64 {
            // The least e with weighed·(W − e) ≤ room·W.
            let e = w - (room * w / u128::from(weighed.max(1))).min(w);
            u64::try_from(e).unwrap_or(u64::MAX)
        };
        if need <= limit {
            // In this window, as the previous one's weight falls (or at
            // its end, when this one's count becomes the weighed one).
            state.start_ms + within(state.previous, limit - need)
        } else if u128::from(hits) <= limit && state.count > 0 {
            state.start_ms + self.window_ms + within(state.count, limit - u128::from(hits))
        } else {
            self.full_at(state)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_previous_window_weighs_less_as_the_current_one_goes_on() {
        // 10 a minute: 10 at the start of the first window.
        let sliding = Sliding::new(10, 60_000);
        let mut state = None;
        for left in (0..10).rev() {
            let d = sliding.decide(state, 1_000, 1, false);
            assert!(d.allowed);
            assert_eq!(d.remaining, left);
            assert_eq!(
                d.reset_ms,
                1_000 + 120_000,
                "full when the next window ends"
            );
            state = Some(d.state);
        }
        let refused = sliding.decide(state, 30_000, 1, false);
        assert!(!refused.allowed);
        // One fits once 10·(W − e) + W ≤ 10·W in the next window: e = 6 s.
        assert_eq!(refused.reset_ms, 1_000 + 60_000 + 6_000);
        // 15 s into the next window, 3/4 of the previous one's 10 weigh:
        // 7.5, so 2 are left.
        let d = sliding.decide(state, 76_000, 0, false);
        assert_eq!((d.allowed, d.remaining), (true, 2));
        let d = sliding.decide(Some(d.state), 76_000, 3, false);
        assert!(!d.allowed);
        // 3 fit once 10·(W − e) ≤ 7·W: e = 18 s.
        assert_eq!(d.reset_ms, 61_000 + 18_000);
        assert!(
            !sliding
                .decide(Some(d.state), d.reset_ms - 1, 3, false)
                .allowed
        );
        assert!(sliding.decide(Some(d.state), d.reset_ms, 3, false).allowed);
        // Two idle windows: a new one anchored at the request.
        let fresh = sliding.decide(Some(d.state), 500_000, 1, false);
        assert_eq!(
            fresh.state,
            SlidingState {
                start_ms: 500_000,
                count: 1,
                previous: 0
            }
        );
    }

    #[test]
    fn a_burst_at_the_boundary_gets_the_limit_and_a_little() {
        let sliding = Sliding::new(50, 10_000);
        let mut state = Some(sliding.decide(None, 0, 1, false).state);
        let mut admitted = 0;
        for at in [9_750, 10_250] {
            for _ in 0..50 {
                let d = sliding.decide(state, at, 1, false);
                admitted += u32::from(d.allowed);
                state = Some(d.state);
            }
        }
        // 49 before the boundary (the first request opened the window), then
        // 50·(W − 250) + c·W ≤ 50·W: c = 1.
        assert_eq!(admitted, 50);
    }

    #[test]
    fn a_reported_charge_that_does_not_fit_fills_the_window() {
        let sliding = Sliding::new(10, 1_000);
        let d = sliding.decide(None, 0, 8, false);
        let over = sliding.decide(Some(d.state), 0, 5, true);
        assert!(!over.allowed);
        assert_eq!((over.state.count, over.remaining), (10, 0));
        let kept = sliding.decide(Some(d.state), 0, 5, false);
        assert_eq!((kept.state.count, kept.remaining), (8, 2));
        let never = sliding.decide(Some(d.state), 0, 11, false);
        assert_eq!(
            never.reset_ms, 2_000,
            "too many ever: told when the limit is whole"
        );
    }
}
