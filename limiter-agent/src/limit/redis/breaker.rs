//! The circuit breaker in front of Redis: pure state, fed the outcome of each
//! call and the time, so its logic is tested without a server.

/// Whether a call may go to Redis, and in which breaker state it went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Permit {
    /// The breaker is closed: a normal call.
    Closed,
    /// The breaker was open and its cooldown is over: the one trial call.
    Probe,
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
    probing: bool,
}

impl Breaker {
    pub(super) fn new(threshold: u32, cooldown_ms: u64) -> Self {
        Self {
            threshold: threshold.max(1),
            cooldown_ms,
            failures: 0,
            open_until: Some(0),
            probing: false,
        }
    }

    pub(super) fn acquire(&mut self, now_ms: u64) -> Option<Permit> {
        match self.open_until {
            None => Some(Permit::Closed),
            Some(until) if now_ms >= until && !self.probing => {
                self.probing = true;
                Some(Permit::Probe)
            }
            Some(_) => None,
        }
    }

    pub(super) fn succeeded(&mut self) {
        self.failures = 0;
        self.open_until = None;
        self.probing = false;
    }

    pub(super) fn failed(&mut self, permit: Permit, now_ms: u64) {
        self.failures = self.failures.saturating_add(1);
        let trip = match permit {
            Permit::Probe => true,
            Permit::Closed => self.open_until.is_none() && self.failures >= self.threshold,
        };
        if trip {
            self.open_until = Some(now_ms.saturating_add(self.cooldown_ms));
            self.probing = false;
        }
    }

    pub(super) fn is_closed(&self) -> bool {
        self.open_until.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaker_starts_with_a_probe() {
        let mut b = Breaker::new(3, 1_000);
        assert!(!b.is_closed(), "not healthy before Redis has answered");
        assert_eq!(b.acquire(0), Some(Permit::Probe));
        assert_eq!(b.acquire(0), None, "others wait for the probe's outcome");
        b.failed(Permit::Probe, 5);
        assert_eq!(b.acquire(1_004), None, "down at startup: a cooldown first");
        assert_eq!(b.acquire(1_005), Some(Permit::Probe));
        b.succeeded();
        assert!(b.is_closed());
    }

    /// A breaker that has seen Redis answer.
    fn closed(threshold: u32) -> Breaker {
        let mut b = Breaker::new(threshold, 1_000);
        assert_eq!(b.acquire(0), Some(Permit::Probe));
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
        assert_eq!(
            b.acquire(1_010),
            Some(Permit::Probe),
            "cooldown over: one probe"
        );
        assert_eq!(b.acquire(1_011), None, "only one probe at a time");
        b.failed(Permit::Probe, 1_020);
        assert!(!b.is_closed());
        assert_eq!(
            b.acquire(2_019),
            None,
            "a failed probe restarts the cooldown"
        );
        assert_eq!(b.acquire(2_020), Some(Permit::Probe));
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
        assert_eq!(b.acquire(1_000), Some(Permit::Probe));
    }
}
