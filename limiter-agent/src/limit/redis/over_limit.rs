//! Buckets known to be over their limit, kept in the agent until their reset so
//! rejected traffic costs no round trip to Redis.

use std::{
    collections::HashMap,
    sync::{Mutex, MutexGuard, PoisonError},
};

use crate::limit::{BucketKey, Decision};

/// Shards (each a mutex over a small map).
const SHARDS: usize = 16;

/// A bucket known to be over its limit until `reset_ms` (this host's monotonic clock).
#[derive(Clone, Copy, Debug)]
struct OverLimit {
    reset_ms: u64,
    /// The limit it was rejected under: a raised limit (reload, override) must ask Redis again.
    limit: u32,
    /// This host's rejections of the bucket in its window.
    rejected: u32,
}

/// Buckets over their limit, answered locally until their reset so rejected
/// traffic costs no round trip. At most `cap` entries (beyond that, rejections
/// simply go to Redis).
pub(super) struct OverLimitCache {
    shards: Box<[Mutex<HashMap<BucketKey, OverLimit>>]>,
    shard_cap: usize,
}

impl OverLimitCache {
    pub(super) fn new(cap: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            shard_cap: (cap / SHARDS).max(1),
        }
    }

    fn shard(&self, key: BucketKey) -> MutexGuard<'_, HashMap<BucketKey, OverLimit>> {
        let index = usize::try_from(key.0 >> 60).unwrap_or(0) % SHARDS;
        self.shards[index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The rejection for `key` if it is cached, live and still applies to `limit`.
    pub(super) fn check(&self, key: BucketKey, limit: u32, now_ms: u64) -> Option<Decision> {
        let mut shard = self.shard(key);
        let entry = shard.get_mut(&key)?;
        if entry.reset_ms <= now_ms {
            shard.remove(&key);
            return None;
        }
        if limit > entry.limit {
            return None;
        }
        entry.rejected = entry.rejected.saturating_add(1);
        Some(Decision {
            allowed: false,
            limit,
            remaining: 0,
            reset_ms: entry.reset_ms,
            rejected: entry.rejected,
            window: 0,
        })
    }

    /// Forgets `key` (its count went down).
    pub(super) fn forget(&self, key: BucketKey) {
        self.shard(key).remove(&key);
    }

    /// Records a rejection Redis made; returns this host's rejections of the bucket so far.
    pub(super) fn insert(&self, key: BucketKey, limit: u32, reset_ms: u64) -> u32 {
        let mut shard = self.shard(key);
        if let Some(entry) = shard.get_mut(&key) {
            entry.rejected = entry.rejected.saturating_add(1);
            entry.reset_ms = reset_ms;
            entry.limit = limit;
            return entry.rejected;
        }
        if shard.len() < self.shard_cap {
            shard.insert(
                key,
                OverLimit {
                    reset_ms,
                    limit,
                    rejected: 1,
                },
            );
        }
        1
    }

    pub(super) fn reclaim(&self, now_ms: u64) {
        for shard in &*self.shards {
            let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            shard.retain(|_, entry| entry.reset_ms > now_ms);
        }
    }

    pub(super) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn over_limit_cache_answers_until_reset_and_counts_rejections() {
        let cache = OverLimitCache::new(1_000);
        let key = BucketKey(0xdead_beef_0000_0001);
        assert!(cache.check(key, 10, 0).is_none(), "nothing cached yet");
        assert_eq!(cache.insert(key, 10, 5_000), 1);
        let hit = cache.check(key, 10, 4_999).expect("cached until reset");
        assert!(!hit.allowed);
        assert_eq!((hit.remaining, hit.reset_ms, hit.rejected), (0, 5_000, 2));
        assert_eq!(
            cache.check(key, 5, 4_999).map(|d| d.limit),
            Some(5),
            "a lower limit still rejects"
        );
        assert!(
            cache.check(key, 11, 4_999).is_none(),
            "a raised limit asks Redis again"
        );
        assert!(cache.check(key, 10, 5_000).is_none(), "gone at reset");
        assert_eq!(cache.len(), 0, "an expired entry is dropped when seen");
    }

    #[test]
    fn over_limit_cache_is_bounded_and_reclaimed() {
        let cache = OverLimitCache::new(SHARDS);
        // Keys of one shard (top 4 bits equal): only one fits.
        assert_eq!(cache.insert(BucketKey(1), 1, 100), 1);
        assert_eq!(cache.insert(BucketKey(2), 1, 100), 1);
        assert!(
            cache.check(BucketKey(2), 1, 0).is_none(),
            "over the cap: not cached"
        );
        assert_eq!(cache.insert(BucketKey(1 << 60), 1, 200), 1);
        assert_eq!(cache.len(), 2);
        cache.reclaim(100);
        assert_eq!(cache.len(), 1);
        cache.reclaim(200);
        assert_eq!(cache.len(), 0);
    }
}
