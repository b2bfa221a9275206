//! A bounded set of entries that lapse: each is held for a time-to-live after
//! its last mark, and when the set is full the least recently marked goes.
//! The proxy keeps two: the (key, tier) pairs whose API key the upstream has
//! accepted (a key is a bucket of its own only once verified, so random keys
//! cannot mint fresh quota; forgetting one only costs that key one more
//! request charged to its client address), and the tiers seen authenticating.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Mutex, PoisonError},
};

/// Entries (keyed hashes), with the time each lapses.
pub struct LapsingSet {
    inner: Mutex<Inner>,
    capacity: usize,
    ttl_ms: u64,
}

#[derive(Default)]
struct Inner {
    /// Entry → (lapses at, generation of its newest position in `order`).
    expiry: HashMap<u64, (u64, u64)>,
    /// Least recently verified or refreshed first. A position whose generation
    /// is not the entry's current one is stale and skipped; kept to at most
    /// twice the capacity.
    order: VecDeque<(u64, u64)>,
    generation: u64,
}

impl Inner {
    fn touch(&mut self, entry: u64, until: u64) {
        self.generation += 1;
        self.expiry.insert(entry, (until, self.generation));
        self.order.push_back((entry, self.generation));
    }
}

impl LapsingSet {
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

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether `entry` is verified at `now_ms`.
    #[must_use]
    pub fn contains(&self, entry: u64, now_ms: u64) -> bool {
        self.lock()
            .expiry
            .get(&entry)
            .is_some_and(|(until, _)| *until > now_ms)
    }

    /// Records (or renews) a verification; it becomes the most recent.
    pub fn insert(&self, entry: u64, now_ms: u64) {
        self.insert_for(entry, now_ms, self.ttl_ms);
    }

    /// As [`Self::insert`], trusted for `ttl_ms` only (a verification read
    /// from another host's record, so that its revocation reaches us soon).
    pub fn insert_for(&self, entry: u64, now_ms: u64, ttl_ms: u64) {
        let until = now_ms.saturating_add(ttl_ms.min(self.ttl_ms));
        let mut inner = self.lock();
        let inner = &mut *inner;
        inner.touch(entry, until);
        if inner.order.len() > 2 * self.capacity {
            // Stale positions (renewed or removed entries) are dropped, never
            // live entries: churn alone must not evict anyone.
            let expiry = &inner.expiry;
            inner
                .order
                .retain(|(e, g)| expiry.get(e).is_some_and(|(_, current)| current == g));
        }
        while inner.expiry.len() > self.capacity {
            let Some((oldest, generation)) = inner.order.pop_front() else {
                break;
            };
            if inner
                .expiry
                .get(&oldest)
                .is_some_and(|(_, g)| *g == generation)
            {
                inner.expiry.remove(&oldest);
            }
        }
    }

    /// Records `entry` unless it is live with more than half its time left,
    /// so a mark set on every event costs a write only now and then.
    pub fn mark(&self, entry: u64, now_ms: u64) {
        let live_for = self
            .lock()
            .expiry
            .get(&entry)
            .map_or(0, |(until, _)| until.saturating_sub(now_ms));
        if live_for < self.ttl_ms / 2 {
            self.insert(entry, now_ms);
        }
    }

    /// Whether a live verification in use is due for renewal: less than half
    /// its time left (so a key in use need not lapse, without a write per
    /// request). Absent or lapsed entries are not renewed.
    #[must_use]
    pub fn renewal_due(&self, entry: u64, now_ms: u64) -> bool {
        let half = self.ttl_ms / 2;
        self.lock()
            .expiry
            .get(&entry)
            .is_some_and(|(until, _)| *until > now_ms && until - now_ms < half)
    }

    /// Forgets a verification (the upstream refused the key: revoked).
    pub fn remove(&self, entry: u64) {
        self.lock().expiry.remove(&entry);
    }

    /// Entries held (expired ones included until evicted or refreshed).
    #[must_use]
    pub fn len(&self) -> usize {
        self.lock().expiry.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops lapsed entries; called by the housekeeping task, off the request path.
    pub fn reclaim(&self, now_ms: u64) {
        let mut inner = self.lock();
        let inner = &mut *inner;
        inner.expiry.retain(|_, (until, _)| *until > now_ms);
        let expiry = &inner.expiry;
        inner
            .order
            .retain(|(e, g)| expiry.get(e).is_some_and(|(_, current)| current == g));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_lapse_and_can_be_revoked() {
        let keys = LapsingSet::new(10, 1_000);
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
        let keys = LapsingSet::new(100, 60_000);
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

    #[test]
    fn keys_in_use_are_renewed_and_kept_when_others_churn() {
        let keys = LapsingSet::new(3, 1_000);
        keys.insert(1, 0);
        assert!(!keys.renewal_due(1, 400), "more than half left: no write");
        assert!(keys.renewal_due(1, 600), "less than half left: due");
        keys.insert(1, 600);
        assert!(keys.contains(1, 1_500));
        assert!(!keys.renewal_due(2, 600), "absent entries are not renewed");
        // Entry 1 used again after 2 and 3 arrived: 4 evicts 2, not 1.
        keys.insert(2, 700);
        keys.insert(3, 700);
        keys.insert(1, 800);
        keys.insert(4, 900);
        assert!(keys.contains(1, 901) && keys.contains(3, 901) && keys.contains(4, 901));
        assert!(!keys.contains(2, 901));
    }

    #[test]
    fn marks_and_churn_never_evict_live_entries_below_capacity() {
        let keys = LapsingSet::new(4, 60_000);
        keys.insert(7, 0);
        // Thousands of re-marks of one entry, and renewals of another: the
        // queue compacts, nobody is evicted.
        for t in 0..5_000 {
            keys.mark(1, t * 20);
            keys.insert(2, t);
        }
        assert!(keys.contains(7, 1) && keys.contains(1, 1) && keys.contains(2, 1));
        assert!(keys.inner.lock().unwrap().order.len() <= 8);
    }
}
