//! The circuit breaker in front of Redis: pure state, fed the outcome of each
//! call and the time, so its logic is tested without a server; and [`Attempt`],
//! the drop-safe permit every call holds while it waits on Redis.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Whether a call may go to Redis, and in which breaker state it went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Permit {
    /// The breaker is closed: a normal call.
    Closed,
    /// The breaker was open and its cooldown is over: the one trial call, with
    /// its ticket (so a late outcome of an earlier probe is told from this one's).
    Probe(u64),
}

/// Consecutive-failure circuit breaker: `threshold` failures in a row open it;
/// while open every call is refused without touching the network; after
/// `cooldown_ms` one probe goes through, and its outcome closes the breaker or
/// opens it for another cooldown. It starts open with the probe due: the store
/// is healthy only once Redis has answered.
#[derive(Debug)]
pub(super) struct Breaker {
    threshold: u32,
    cooldown_ms: u64,
    failures: u32,
    /// Set while open: when the next probe may go.
    open_until: Option<u64>,
    /// The ticket of the probe in flight. Only [`Breaker::succeeded`],
    /// [`Breaker::failed`] and [`Breaker::release`] clear it, and an [`Attempt`]
    /// calls one of them however its call ends, cancelled included.
    probe: Option<u64>,
    /// Probe tickets handed out so far.
    tickets: u64,
}

impl Breaker {
    pub(super) fn new(threshold: u32, cooldown_ms: u64) -> Self {
        Self {
            threshold: threshold.max(1),
            cooldown_ms,
            failures: 0,
            open_until: Some(0),
            probe: None,
            tickets: 0,
        }
    }

    pub(super) fn acquire(&mut self, now_ms: u64) -> Option<Permit> {
        match self.open_until {
            None => Some(Permit::Closed),
            Some(until) if now_ms >= until && self.probe.is_none() => {
                self.tickets = self.tickets.wrapping_add(1);
                self.probe = Some(self.tickets);
                Some(Permit::Probe(self.tickets))
            }
            Some(_) => None,
        }
    }

    pub(super) fn succeeded(&mut self) {
        self.failures = 0;
        self.open_until = None;
        self.probe = None;
    }

    pub(super) fn failed(&mut self, permit: Permit, now_ms: u64) {
        self.failures = self.failures.saturating_add(1);
        let trip = match permit {
            Permit::Probe(ticket) if self.probe == Some(ticket) => true,
            // A normal call, or a probe overtaken by events (a late success closed
            // the breaker meanwhile): counts like any failure, never pushes a deadline.
            Permit::Probe(_) | Permit::Closed => {
                self.open_until.is_none() && self.failures >= self.threshold
            }
        };
        if trip {
            self.open_until = Some(now_ms.saturating_add(self.cooldown_ms));
            self.probe = None;
        }
    }

    /// A call that ended without an outcome (its future was dropped). It counts as
    /// not tried: a probe frees its slot and the cooldown, already over, is not
    /// restarted, so the next call, a request's or the background probe, probes at
    /// once. Treating it as failed would hand the store's downtime to clients: one
    /// that hangs up on every probe would keep the breaker open for good.
    pub(super) fn release(&mut self, permit: Permit) {
        if let Permit::Probe(ticket) = permit
            && self.probe == Some(ticket)
        {
            self.probe = None;
        }
    }

    pub(super) fn is_closed(&self) -> bool {
        self.open_until.is_none()
    }
}

/// The breaker, locked; a panic elsewhere while holding it leaves valid state.
pub(super) fn lock(breaker: &Mutex<Breaker>) -> MutexGuard<'_, Breaker> {
    breaker.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One call admitted by the breaker. Report how it ended with
/// [`succeeded`](Self::succeeded) or [`failed`](Self::failed); dropped without
/// either (the request's future was cancelled: its client hung up) it
/// [releases](Breaker::release) its permit, so a probe is never in flight for ever.
#[must_use = "an attempt dropped at once releases its permit"]
pub(super) struct Attempt<'a> {
    breaker: &'a Mutex<Breaker>,
    /// `None` once the outcome is reported.
    permit: Option<Permit>,
}

/// How a failed call left the breaker (for the log).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Failed {
    /// This failure opened a closed breaker.
    Opened,
    /// The breaker stays as it was (closed under the threshold, or open).
    Unchanged,
}

impl<'a> Attempt<'a> {
    /// Asks the breaker for a permit; `None` when the call must not be made.
    pub(super) fn begin(breaker: &'a Mutex<Breaker>, now_ms: u64) -> Option<Self> {
        let permit = lock(breaker).acquire(now_ms)?;
        Some(Self {
            breaker,
            permit: Some(permit),
        })
    }

    pub(super) fn is_probe(&self) -> bool {
        matches!(self.permit, Some(Permit::Probe(_)))
    }

    pub(super) fn succeeded(mut self) {
        if self.permit.take().is_some() {
            lock(self.breaker).succeeded();
        }
    }

    pub(super) fn failed(mut self, now_ms: u64) -> Failed {
        let Some(permit) = self.permit.take() else {
            return Failed::Unchanged;
        };
        let mut breaker = lock(self.breaker);
        let was_closed = breaker.is_closed();
        breaker.failed(permit, now_ms);
        if was_closed && !breaker.is_closed() {
            Failed::Opened
        } else {
            Failed::Unchanged
        }
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            lock(self.breaker).release(permit);
            if matches!(permit, Permit::Probe(_)) {
                tracing::debug!("redis probe abandoned by its caller; the next call probes");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{future::Future, task::Poll};

    use super::*;

    fn is_probe(permit: Option<Permit>) -> bool {
        matches!(permit, Some(Permit::Probe(_)))
    }

    #[test]
    fn breaker_starts_with_a_probe() {
        let mut b = Breaker::new(3, 1_000);
        assert!(!b.is_closed(), "not healthy before Redis has answered");
        let probe = b.acquire(0).expect("the probe is due at once");
        assert!(matches!(probe, Permit::Probe(_)));
        assert_eq!(b.acquire(0), None, "others wait for the probe's outcome");
        b.failed(probe, 5);
        assert_eq!(b.acquire(1_004), None, "down at startup: a cooldown first");
        assert!(is_probe(b.acquire(1_005)));
        b.succeeded();
        assert!(b.is_closed());
    }

    /// A breaker that has seen Redis answer.
    fn closed(threshold: u32) -> Breaker {
        let mut b = Breaker::new(threshold, 1_000);
        assert!(is_probe(b.acquire(0)));
        b.succeeded();
        b
    }

    #[test]
    fn breaker_opens_after_threshold_and_probes_once_per_cooldown() {
        let mut b = closed(3);
        for _ in 0..2 {
            assert_eq!(b.acquire(0), Some(Permit::Closed));
            b.failed(Permit::Closed, 0);
        }
        assert!(b.is_closed(), "two failures are under the threshold");
        assert_eq!(b.acquire(10), Some(Permit::Closed));
        b.failed(Permit::Closed, 10);
        assert!(!b.is_closed(), "the third failure in a row opens it");
        assert_eq!(b.acquire(500), None, "open: refused without a call");
        assert_eq!(b.acquire(1_009), None);
        let probe = b.acquire(1_010).expect("cooldown over: one probe");
        assert!(matches!(probe, Permit::Probe(_)));
        assert_eq!(b.acquire(1_011), None, "only one probe at a time");
        b.failed(probe, 1_020);
        assert!(!b.is_closed());
        assert_eq!(
            b.acquire(2_019),
            None,
            "a failed probe restarts the cooldown"
        );
        assert!(is_probe(b.acquire(2_020)));
        b.succeeded();
        assert!(b.is_closed(), "a successful probe closes it");
        assert_eq!(b.acquire(2_021), Some(Permit::Closed));
    }

    #[test]
    fn breaker_counts_only_consecutive_failures() {
        let mut b = closed(2);
        b.failed(Permit::Closed, 0);
        b.succeeded();
        b.failed(Permit::Closed, 0);
        assert!(b.is_closed(), "a success in between resets the count");
        b.failed(Permit::Closed, 0);
        assert!(!b.is_closed());
        // Late failures of calls admitted before it opened don't push the deadline.
        b.failed(Permit::Closed, 900);
        assert!(is_probe(b.acquire(1_000)));
    }

    #[test]
    fn a_released_probe_frees_the_slot_without_a_new_cooldown() {
        let mut b = closed(1);
        b.failed(Permit::Closed, 0);
        let probe = b.acquire(1_000).expect("probe due");
        b.release(probe);
        assert!(!b.is_closed(), "not tried: still open");
        let next = b.acquire(1_001).expect("the next caller probes at once");
        assert_ne!(next, probe, "a new ticket");
        // The first probe's late release must not free the second one's slot.
        b.release(probe);
        assert_eq!(
            b.acquire(1_002),
            None,
            "the second probe is still in flight"
        );
        b.succeeded();
        assert!(b.is_closed());
    }

    #[test]
    fn a_stale_probe_cannot_reopen_or_free_what_is_not_its_own() {
        let mut b = closed(2);
        b.failed(Permit::Closed, 0);
        b.failed(Permit::Closed, 0);
        let stale = b.acquire(1_000).expect("probe due");
        // A call admitted before the breaker opened succeeds late: closed again.
        b.succeeded();
        assert!(b.is_closed());
        // The stale probe's failure is one failure under the threshold, not a trip.
        b.failed(stale, 1_100);
        assert!(b.is_closed());
    }

    #[test]
    fn an_attempt_dropped_without_an_outcome_releases_its_probe() {
        let breaker = Mutex::new(Breaker::new(1, 1_000));
        let attempt = Attempt::begin(&breaker, 0).expect("startup probe");
        assert!(attempt.is_probe());
        assert!(Attempt::begin(&breaker, 0).is_none(), "one probe at a time");
        drop(attempt);
        let again = Attempt::begin(&breaker, 0).expect("released: probe again at once");
        again.succeeded();
        assert!(lock(&breaker).is_closed());

        // A closed-state call dropped counts as nothing: no failure toward the threshold.
        drop(Attempt::begin(&breaker, 10).expect("closed"));
        assert!(lock(&breaker).is_closed());
        let failing = Attempt::begin(&breaker, 20).expect("closed");
        assert_eq!(failing.failed(20), Failed::Opened);
        assert!(Attempt::begin(&breaker, 500).is_none(), "cooling down");
    }

    /// The case of issue 12: the future awaiting Redis with the probe is cancelled
    /// mid-call (its client closed the connection). Before the guard, nothing
    /// cleared the probe and every later call was refused until a restart.
    #[test]
    fn a_request_cancelled_while_holding_the_probe_does_not_wedge_the_breaker() {
        let breaker = Mutex::new(Breaker::new(1, 1_000));
        Attempt::begin(&breaker, 0).expect("probe").succeeded();
        assert_eq!(
            Attempt::begin(&breaker, 0).expect("closed").failed(0),
            Failed::Opened
        );

        // What `guarded` does: take a permit, await the call, report.
        let request = async {
            let attempt = Attempt::begin(&breaker, 1_000).expect("cooldown over: probe");
            assert!(attempt.is_probe());
            std::future::pending::<()>().await; // Redis never answers
            attempt.succeeded();
        };
        let mut request = Box::pin(request);
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        assert_eq!(request.as_mut().poll(&mut cx), Poll::Pending);
        assert!(
            Attempt::begin(&breaker, 1_001).is_none(),
            "the probe is in flight"
        );
        drop(request); // the client hangs up

        let background =
            Attempt::begin(&breaker, 1_002).expect("the background probe is not refused for ever");
        assert!(background.is_probe());
        background.succeeded();
        assert!(lock(&breaker).is_closed(), "the store recovers");
    }
}
