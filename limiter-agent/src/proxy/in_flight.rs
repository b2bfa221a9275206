//! Requests in flight to the upstream, bounded per client address and in
//! all: a request holds a slot of each from before its charge until its
//! answer's last byte is sent (or the client goes away), so one client
//! cannot hold every upstream connection with answers it never reads. A
//! tier's own cap per client (`max_in_flight`) is a lease from the store,
//! held as long.

use std::{net::IpAddr, sync::Arc};

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::{
    limit::Lease,
    tally::{Held, Tally},
};

/// Which cap refused a request (the `reason` label of
/// `limiter_requests_refused_total`: the setting's name).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// `[server] max_requests_in_flight_per_source`.
    PerSource,
    /// `[server] max_requests_in_flight`.
    Total,
}

impl Refused {
    #[must_use]
    pub fn setting(self) -> &'static str {
        match self {
            Self::PerSource => "max_requests_in_flight_per_source",
            Self::Total => "max_requests_in_flight",
        }
    }
}

/// The requests in flight now, per client address and in all.
pub struct InFlightCaps {
    per_source: Arc<Tally<IpAddr>>,
    total: Arc<Semaphore>,
}

/// A request's two slots, and its tier's in-flight lease if the tier caps
/// them; given back when dropped.
pub struct Slots {
    _source: Held<IpAddr>,
    _total: OwnedSemaphorePermit,
    tier: Option<TierLease>,
}

impl std::fmt::Debug for Slots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slots")
            .field("tier", &self.tier.is_some())
            .finish_non_exhaustive()
    }
}

impl Slots {
    /// These slots holding `lease` too.
    pub(super) fn with_tier(mut self, lease: Option<TierLease>) -> Self {
        self.tier = lease;
        self
    }
}

/// A client's in-flight slot on a tier (`max_in_flight`), counted in the
/// tier's gauge while held.
pub(super) struct TierLease {
    _lease: Lease,
    gauge: Gauge,
}

impl TierLease {
    pub(super) fn new(lease: Lease, gauge: &Gauge) -> Self {
        gauge.inc();
        Self {
            _lease: lease,
            gauge: gauge.clone(),
        }
    }
}

impl Drop for TierLease {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

impl InFlightCaps {
    /// Caps with room for `total` requests in all (fixed at start).
    #[must_use]
    pub fn new(total: usize) -> Self {
        Self {
            per_source: Arc::default(),
            total: Arc::new(Semaphore::new(total.min(Semaphore::MAX_PERMITS))),
        }
    }

    /// Slots for a request of `source` (the grouped client address), which
    /// may hold `per_source`.
    ///
    /// # Errors
    /// The cap that is full; the source's own is checked first, so a source
    /// over it is told so even when the total is full too.
    pub fn admit(&self, source: IpAddr, per_source: usize) -> Result<Slots, Refused> {
        let source = self
            .per_source
            .acquire(source, per_source)
            .ok_or(Refused::PerSource)?;
        let total = self
            .total
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refused::Total)?;
        Ok(Slots {
            _source: source,
            _total: total,
            tier: None,
        })
    }

    /// Requests `source` has in flight now.
    #[cfg(test)]
    #[must_use]
    pub fn held(&self, source: IpAddr) -> usize {
        self.per_source.held(source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn a_source_over_its_cap_is_refused_before_the_total_and_slots_come_back() {
        let caps = InFlightCaps::new(3);
        let a = ip("192.0.2.1");
        let b = ip("192.0.2.2");
        let first = caps.admit(a, 2).expect("first");
        let second = caps.admit(a, 2).expect("second");
        assert_eq!(caps.admit(a, 2).unwrap_err(), Refused::PerSource);
        let third = caps.admit(b, 2).expect("another source");
        // The total is full: a new source is refused by it, the full source
        // still by its own cap.
        assert_eq!(caps.admit(ip("192.0.2.3"), 2).unwrap_err(), Refused::Total);
        assert_eq!(caps.admit(a, 2).unwrap_err(), Refused::PerSource);
        assert_eq!(caps.held(ip("192.0.2.3")), 0, "a refusal holds nothing");
        drop(first);
        assert_eq!(caps.held(a), 1);
        let again = caps.admit(a, 2).expect("given back");
        drop((second, third, again));
        assert_eq!(caps.held(a), 0);
        assert_eq!(caps.held(b), 0);
    }
}
