//! API keys the upstream has accepted, per tier: a key is a bucket of its own
//! only once verified, so random keys cannot mint fresh quota. Bounded: when
//! full, the oldest verification is forgotten, which only costs that key one
//! more request charged to its client address.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Mutex, PoisonError},
};

/// (key, tier) entries as keyed hashes, with the time each verification lapses.
pub struct VerifiedKeys {
    inner: Mutex<Inner>,
    capacity: usize,
    ttl_ms: u64,
}

#[derive(Default)]
struct Inner {
    expiry: HashMap<u64, u64>,
    /// Insertion order, for eviction when full. May hold entries removed since
    /// (then skipped); kept to at most twice the capacity.
    order: VecDeque<u64>,
}

impl VerifiedKeys {
    /// At most `capacity` entries, each trusted for `ttl_ms` after its last
    /// successful answer.
    #[must_use]
    pub fn new(capacity: usize, ttl_ms: u64) -> Self {
        Self {
            inner: Mutex::default(),
            capacity: capacity.max(1),
            ttl_ms,
        }
    }

    /// Whether `entry` is verified at `now_ms`.
    #[must_use]
    pub fn contains(&self, entry: u64, now_ms: u64) -> bool {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner
            .expiry
            .get(&entry)
            .is_some_and(|until| *until > now_ms)
    }

    /// Records (or refreshes) a verification.
    pub fn insert(&self, entry: u64, now_ms: u64) {
        let until = now_ms.saturating_add(self.ttl_ms);
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let inner = &mut *inner;
        if inner.expiry.insert(entry, until).is_none() {
            inner.order.push_back(entry);
        }
        while inner.expiry.len() > self.capacity || inner.order.len() > 2 * self.capacity {
            let Some(oldest) = inner.order.pop_front() else {
                break;
            };
            // A stale position (removed, then inserted again at the back) may
            // drop a fresher entry: that only means one more verification.
            inner.expiry.remove(&oldest);
        }
    }

    /// Forgets a verification (the upstream refused the key: revoked).
    pub fn remove(&self, entry: u64) {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .expiry
            .remove(&entry);
    }

    /// Entries held (expired ones included until evicted or refreshed).
    #[must_use]
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .expiry
            .len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops lapsed entries; called by the housekeeping task, off the request path.
    pub fn reclaim(&self, now_ms: u64) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let inner = &mut *inner;
        inner.expiry.retain(|_, until| *until > now_ms);
        let expiry = &inner.expiry;
        inner.order.retain(|e| expiry.contains_key(e));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_lapse_and_can_be_revoked() {
        let keys = VerifiedKeys::new(10, 1_000);
        assert!(!keys.contains(1, 0));
        keys.insert(1, 0);
        assert!(keys.contains(1, 999));
        assert!(!keys.contains(1, 1_000));
        keys.insert(1, 500);
        assert!(keys.contains(1, 1_400));
        keys.remove(1);
        assert!(!keys.contains(1, 600));
        keys.insert(2, 0);
        keys.reclaim(1_000);
        assert!(keys.is_empty());
    }

    #[test]
    fn memory_stays_bounded_under_churn() {
        let keys = VerifiedKeys::new(100, 60_000);
        for i in 0..10_000u64 {
            keys.insert(i, 0);
            if i % 3 == 0 {
                keys.remove(i);
                keys.insert(i, 0);
            }
        }
        assert!(keys.len() <= 100);
        assert!(keys.inner.lock().unwrap().order.len() <= 200);
        // The newest survive.
        assert!(keys.contains(9_999, 1));
        assert!(!keys.contains(0, 1));
    }
}
