//! The embedded store: a sharded in-memory map of fixed-window buckets. This
//! file shards and locks; one shard's buckets and queues are in `shard`.

mod shard;

/// Distinct window lengths the store keeps in expiry order (tiers, envoy
/// limits, the key-verification TTL together); the config refuses more, since
/// beyond them windows share a queue whose long-lived front would delay the
/// reclaim of expired buckets behind it.
pub const MAX_WINDOWS: usize = shard::MAX_QUEUES;

use std::sync::{
    Arc, Mutex, MutexGuard, PoisonError,
    atomic::{AtomicU64, Ordering},
};

use self::shard::{Question, Shard};
use super::{
    Algorithm, Ask, BucketKey, Decision, Lease, LeaseAsk, LeaseFuture, Settle, Spend, Store,
    StoreError, StoreFuture,
};
use crate::tally::Tally;

const DEFAULT_SHARDS: usize = 64;
/// Shard index bits start at 32: the map takes its slot index from the low bits and a 7-bit
/// tag from the top 7, so a shard index taken from either would leave them constant per shard.
const SHARD_SHIFT: u32 = 32;
const MAX_SHARDS: usize = 1 << 16;
/// Queue entries examined per lock hold in `reclaim`, so requests interleave with it.
const RECLAIM_BATCH: usize = 4096;

/// A new bucket found its shard full of live windows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the bucket store is full of live windows")]
pub struct StoreFull;

/// Keeps each shard's lock on its own cache lines.
#[repr(align(128))]
struct Slot(Mutex<Shard>);

/// Sharded map of buckets; each decision locks one shard.
pub struct MemoryStore {
    shards: Box<[Slot]>,
    mask: u64,
    shard_cap: usize,
    /// New buckets refused because their shard was full of live windows.
    full: AtomicU64,
    /// In-flight slots held, by bucket.
    leases: Arc<Tally<BucketKey>>,
}

impl MemoryStore {
    /// `max_buckets`: cap on live buckets (memory bound), split evenly over 64 shards
    /// (at least one bucket per shard).
    #[must_use]
    pub fn new(max_buckets: usize) -> Self {
        Self::with_shards(max_buckets, DEFAULT_SHARDS)
    }

    /// As `new`, with `shards` rounded up to a power of two (at most 65,536).
    #[must_use]
    pub fn with_shards(max_buckets: usize, shards: usize) -> Self {
        let shards = shards.clamp(1, MAX_SHARDS).next_power_of_two();
        Self {
            shards: (0..shards).map(|_| Slot(Mutex::default())).collect(),
            mask: (shards - 1) as u64,
            shard_cap: (max_buckets / shards).max(1),
            full: AtomicU64::new(0),
            leases: Arc::default(),
        }
    }

    fn shard(&self, key: BucketKey) -> MutexGuard<'_, Shard> {
        let index = usize::try_from((key.0 >> SHARD_SHIFT) & self.mask).unwrap_or(0);
        lock(&self.shards[index])
    }

    /// Admits or rejects one request: fixed window of `window_ms` anchored at the bucket's first request (`reset_ms` = first request time + `window_ms`); exactly `limit` admitted per window under any concurrency; rejections do not consume quota (they only increment `rejected`); an expired bucket starts a fresh window at `now_ms`.
    ///
    /// A `window_ms` of 0 counts as 1, so a bucket is always live right after its decision.
    ///
    /// # Errors
    /// [`StoreFull`] when the bucket is new and its shard holds `max_buckets / shards`
    /// live windows: no live window is ever evicted to make room.
    pub fn decide(
        &self,
        key: BucketKey,
        limit: u32,
        window_ms: u64,
        now_ms: u64,
    ) -> Result<Decision, StoreFull> {
        self.decide_hits(key, limit, 1, window_ms, now_ms)
    }

    /// [`Self::decide`] for a request worth `hits` units (Envoy's
    /// `hits_addend`): admitted only if all of them fit in what is left, and
    /// then all are counted; one that does not fit exhausts the window (its
    /// units are spent, never lost); 0 is a check that counts nothing.
    ///
    /// # Errors
    /// As [`Self::decide`].
    pub fn decide_hits(
        &self,
        key: BucketKey,
        limit: u32,
        hits: u32,
        window_ms: u64,
        now_ms: u64,
    ) -> Result<Decision, StoreFull> {
        self.decide_spend(key, limit, hits, Spend::Reported, window_ms, now_ms)
    }

    /// [`Self::decide_hits`] with the charge counted as `spend` says: only a
    /// [`Spend::Reported`] charge that does not fit exhausts the window.
    ///
    /// # Errors
    /// As [`Self::decide`].
    pub fn decide_spend(
        &self,
        key: BucketKey,
        limit: u32,
        hits: u32,
        spend: Spend,
        window_ms: u64,
        now_ms: u64,
    ) -> Result<Decision, StoreFull> {
        let question = Question {
            key: key.0,
            limit,
            hits,
            exhaust: spend == Spend::Reported,
            window_ms,
            algorithm: Algorithm::Fixed,
        };
        self.decide_question(question, now_ms)
    }

    /// One request's decision by its tier's algorithm: [`Self::decide_spend`]
    /// for a fixed window; see [`crate::limit::Gcra`] and
    /// [`crate::limit::Sliding`] for the others (a [`Spend::Reserve`] charge
    /// is counted as `Admit` by them: only fixed windows settle).
    ///
    /// # Errors
    /// As [`Self::decide`]; a sliding window also needs a slot for its
    /// previous count when it rolls over.
    pub fn decide_ask(&self, ask: &Ask<'_>, now_ms: u64) -> Result<Decision, StoreFull> {
        let question = Question {
            key: ask.key.0,
            limit: ask.limit,
            hits: ask.hits,
            exhaust: ask.spend == Spend::Reported,
            window_ms: ask.window_ms,
            algorithm: ask.algorithm,
        };
        self.decide_question(question, now_ms)
    }

    fn decide_question(&self, question: Question, now_ms: u64) -> Result<Decision, StoreFull> {
        let decided = self
            .shard(BucketKey(question.key))
            .decide(question, now_ms, self.shard_cap);
        if decided.is_err() {
            self.full.fetch_add(1, Ordering::Relaxed);
        }
        decided
    }

    /// Applies a settlement (see [`Settle`]) to `key`'s bucket.
    ///
    /// # Errors
    /// [`StoreFull`] when a charge needs a new bucket and there is no room.
    pub fn settle(
        &self,
        key: BucketKey,
        limit: u32,
        window_ms: u64,
        window: u64,
        delta: i64,
        now_ms: u64,
    ) -> Result<Decision, StoreFull> {
        let window_ms = window_ms.max(1);
        self.shard(key).settle(
            key.0,
            limit,
            window_ms,
            window,
            delta,
            now_ms,
            self.shard_cap,
        )
    }

    /// One of `key`'s in-flight slots, of `limit`; `None` when all are held.
    #[must_use]
    pub fn lease(&self, key: BucketKey, limit: u32) -> Option<Lease> {
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        self.leases
            .acquire(key, limit)
            .map(|held| Box::new(held) as Lease)
    }

    /// Slots `key` holds now.
    #[must_use]
    pub fn leased(&self, key: BucketKey) -> usize {
        self.leases.held(key)
    }

    /// Current state of a bucket without changing it (None if absent or expired).
    /// The store does not keep limits, so `limit` is the caller's, as for `decide`;
    /// `allowed` says whether a request now would be admitted.
    #[must_use]
    pub fn peek(&self, key: BucketKey, limit: u32, now_ms: u64) -> Option<Decision> {
        self.shard(key).peek(key.0, limit, now_ms)
    }

    /// Live buckets (approximate is fine while other threads write).
    /// Expired buckets not yet reclaimed are counted: they hold memory until `reclaim`.
    #[must_use]
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reclaims expired buckets; called by a background task every second, never on the request path.
    /// Work is O(expired + renewed) per call, in batches that release the shard lock.
    pub fn reclaim(&self, now_ms: u64) -> usize {
        let mut removed = 0;
        for slot in &*self.shards {
            loop {
                let mut shard = lock(slot);
                let (n, more) = shard.reclaim(now_ms, RECLAIM_BATCH);
                removed += n;
                if !more {
                    shard.shrink();
                    break;
                }
            }
        }
        removed
    }

    /// New buckets refused because the cap was reached (a counter for metrics).
    #[must_use]
    pub fn refused_full(&self) -> u64 {
        self.full.load(Ordering::Relaxed)
    }
}

impl Store for MemoryStore {
    fn decide<'a>(&'a self, ask: Ask<'a>, now_ms: u64) -> StoreFuture<'a> {
        let decision = self
            .decide_ask(&ask, now_ms)
            .map_err(|StoreFull| StoreError::Full);
        Box::pin(std::future::ready(decision))
    }

    fn settle<'a>(&'a self, settle: Settle<'a>, now_ms: u64) -> StoreFuture<'a> {
        let decision = MemoryStore::settle(
            self,
            settle.key,
            settle.limit,
            settle.window_ms,
            settle.window,
            settle.delta,
            now_ms,
        )
        .map_err(|StoreFull| StoreError::Full);
        Box::pin(std::future::ready(decision))
    }

    fn acquire<'a>(&'a self, ask: LeaseAsk<'a>) -> LeaseFuture<'a> {
        Box::pin(std::future::ready(Ok(self.lease(ask.key, ask.limit))))
    }

    fn reclaim(&self, now_ms: u64) {
        MemoryStore::reclaim(self, now_ms);
    }

    fn local_buckets(&self) -> usize {
        self.len()
    }
}

/// Nothing panics between two consistent states under the lock (short of allocation failure,
/// which aborts), so a poisoned shard is still sound and keeps serving.
fn lock(slot: &Slot) -> MutexGuard<'_, Shard> {
    slot.0.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::{
        collections::HashMap,
        time::{SystemTime, UNIX_EPOCH},
    };

    use proptest::prelude::*;

    use super::*;
    use crate::limit::{Clock as _, FakeClock, SystemClock};

    const T0: u64 = 1_706_540_000_000;
    const KEY: BucketKey = BucketKey(0x1234_5678_9abc_def0);

    /// Distinct well-spread keys, as the caller's keyed hash gives.
    fn key(i: u64) -> BucketKey {
        let mut z = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        BucketKey(z ^ (z >> 31))
    }

    #[test]
    fn admits_exactly_limit_counting_remaining_down() {
        let store = MemoryStore::new(1000);
        let clock = FakeClock::new(T0);
        for i in 1..=5 {
            let d = store.decide(KEY, 5, 60_000, clock.now_ms()).unwrap();
            assert!(d.allowed);
            assert_eq!((d.limit, d.remaining, d.rejected), (5, 5 - i, 0));
            assert_eq!(d.reset_ms, T0 + 60_000, "anchored at the first request");
            clock.advance(1000);
        }
        for i in 1..=3 {
            let d = store.decide(KEY, 5, 60_000, clock.now_ms()).unwrap();
            assert!(!d.allowed);
            assert_eq!((d.remaining, d.rejected, d.reset_ms), (0, i, T0 + 60_000));
        }
        let (allowed, remaining, rejected, reset_ms) = (false, 0, 3, T0 + 60_000);
        let expected = Decision {
            allowed,
            limit: 5,
            remaining,
            reset_ms,
            rejected,
            window: reset_ms,
        };
        assert_eq!(store.peek(KEY, 5, clock.now_ms()), Some(expected));
    }

    #[test]
    fn rejections_do_not_consume_and_expiry_starts_a_new_window() {
        let store = MemoryStore::new(1000);
        let clock = FakeClock::new(T0);
        for _ in 0..3 {
            assert!(
                store
                    .decide(KEY, 3, 10_000, clock.now_ms())
                    .unwrap()
                    .allowed
            );
        }
        for _ in 0..50 {
            assert!(
                !store
                    .decide(KEY, 3, 10_000, clock.now_ms())
                    .unwrap()
                    .allowed
            );
        }
        clock.advance(9_999);
        assert!(
            !store
                .decide(KEY, 3, 10_000, clock.now_ms())
                .unwrap()
                .allowed,
            "still in the window"
        );
        clock.advance(1 + 2_500); // 2.5 s after the reset: the new window anchors here
        let first = store.decide(KEY, 3, 10_000, clock.now_ms()).unwrap();
        assert_eq!(
            (first.allowed, first.remaining, first.rejected),
            (true, 2, 0)
        );
        assert_eq!(first.reset_ms, clock.now_ms() + 10_000);
        assert!(
            store
                .decide(KEY, 3, 10_000, clock.now_ms())
                .unwrap()
                .allowed
        );
        assert!(
            store
                .decide(KEY, 3, 10_000, clock.now_ms())
                .unwrap()
                .allowed
        );
        assert!(
            !store
                .decide(KEY, 3, 10_000, clock.now_ms())
                .unwrap()
                .allowed
        );
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn requests_of_several_units_checks_and_charges_that_do_not_fit() {
        let store = MemoryStore::new(16);
        let d = store.decide_hits(key(1), 10, 4, 60_000, T0).unwrap();
        assert_eq!((d.allowed, d.remaining), (true, 6));
        let d = store.decide_hits(key(1), 10, 5, 60_000, T0).unwrap();
        assert_eq!((d.allowed, d.remaining), (true, 1));
        // A check counts nothing: the last unit is still there.
        let d = store.decide_hits(key(1), 10, 0, 60_000, T0).unwrap();
        assert_eq!((d.allowed, d.remaining), (true, 1));
        let d = store.decide(key(1), 10, 60_000, T0).unwrap();
        assert_eq!((d.allowed, d.remaining), (true, 0));
        let d = store.decide_hits(key(1), 10, 0, 60_000, T0).unwrap();
        assert!(!d.allowed, "nothing left to check");
        let d = store.decide_hits(key(2), 3, u32::MAX, 60_000, T0).unwrap();
        assert!(!d.allowed, "more units than the limit never fit");
        // A charge that did not fit exhausted the window: a request of one
        // unit that would have fit is refused too.
        assert!(!store.decide(key(2), 3, 60_000, T0).unwrap().allowed);
        // Near u32::MAX nothing wraps.
        let d = store
            .decide_hits(key(3), u32::MAX, u32::MAX - 1, 60_000, T0)
            .unwrap();
        assert!(d.allowed);
        let d = store.decide_hits(key(3), u32::MAX, 5, 60_000, T0).unwrap();
        assert_eq!((d.allowed, d.remaining), (false, 0));
        assert!(!store.decide(key(3), u32::MAX, 60_000, T0).unwrap().allowed);
    }

    #[test]
    fn edge_cases() {
        let store = MemoryStore::new(1000);
        let d = store.decide(KEY, 0, 0, T0).unwrap();
        assert_eq!(
            (d.allowed, d.remaining, d.rejected, d.reset_ms),
            (false, 0, 1, T0 + 1)
        );
        let clock = SystemClock::new();
        let (a, b) = (clock.now_ms(), clock.now_ms());
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis();
        assert!(a <= b && u128::from(b).abs_diff(wall) < 1_000);
    }

    #[test]
    fn a_charge_that_does_not_fit_consumes_nothing_unless_reported() {
        let store = MemoryStore::new(1000);
        let admit = |key, hits, spend| {
            store
                .decide_spend(BucketKey(key), 10, hits, spend, 60_000, T0)
                .unwrap()
        };
        assert!(admit(1, 8, Spend::Admit).allowed);
        let refused = admit(1, 5, Spend::Admit);
        assert!(!refused.allowed);
        assert_eq!(store.peek(BucketKey(1), 10, T0).unwrap().remaining, 2);
        assert!(!admit(1, 5, Spend::Reserve).allowed);
        assert_eq!(store.peek(BucketKey(1), 10, T0).unwrap().remaining, 2);
        assert!(!admit(1, 5, Spend::Reported).allowed);
        assert_eq!(
            store.peek(BucketKey(1), 10, T0).unwrap().remaining,
            0,
            "usage reported after the fact exhausts the window"
        );
    }

    #[test]
    fn a_settlement_refunds_only_its_own_window_and_charges_any() {
        let store = MemoryStore::new(1000);
        let clock = FakeClock::new(T0);
        let reserve = |hits| {
            store
                .decide_spend(KEY, 100, hits, Spend::Reserve, 10_000, clock.now_ms())
                .unwrap()
        };
        let held = reserve(60);
        assert_eq!((held.remaining, held.window), (40, T0 + 10_000));
        assert!(!reserve(50).allowed, "60 held: 50 more do not fit");
        // Used 20 of the 60: 40 come back, and then 50 fit.
        let settled = store
            .settle(KEY, 100, 10_000, held.window, -40, clock.now_ms())
            .unwrap();
        assert_eq!(settled.remaining, 80);
        assert!(reserve(50).allowed);
        // Used more than reserved: the excess is charged, at most up to the limit.
        let over = store
            .settle(KEY, 100, 10_000, held.window, 500, clock.now_ms())
            .unwrap();
        assert_eq!((over.remaining, over.allowed), (0, false));
        // A refund to a window that has ended gives nothing to the next one.
        clock.advance(10_000);
        let next = reserve(30);
        assert_eq!(next.remaining, 70);
        let stale = store
            .settle(KEY, 100, 10_000, held.window, -60, clock.now_ms())
            .unwrap();
        assert_eq!(stale.remaining, 70, "the old window's refund is dropped");
        // A charge with no live window starts one.
        let fresh = BucketKey(77);
        let charged = store
            .settle(fresh, 100, 10_000, 0, 30, clock.now_ms())
            .unwrap();
        assert_eq!(
            (charged.remaining, charged.reset_ms),
            (70, clock.now_ms() + 10_000)
        );
        assert_eq!(
            store
                .settle(BucketKey(78), 100, 10_000, 0, -30, clock.now_ms())
                .unwrap()
                .remaining,
            100,
            "a refund to nothing makes nothing"
        );
        assert!(store.peek(BucketKey(78), 100, clock.now_ms()).is_none());
    }

    #[test]
    fn leases_cap_what_a_key_holds_and_come_back_when_dropped() {
        let store = MemoryStore::new(10);
        let first = store.lease(KEY, 2).expect("first");
        let second = store.lease(KEY, 2).expect("second");
        assert!(store.lease(KEY, 2).is_none());
        assert!(store.lease(BucketKey(9), 2).is_some(), "another key");
        assert_eq!(store.leased(KEY), 2);
        drop(first);
        let third = store.lease(KEY, 2).expect("given back");
        drop((second, third));
        assert_eq!(store.leased(KEY), 0);
    }

    #[test]
    fn keys_are_independent() {
        let store = MemoryStore::new(1000);
        assert!(store.decide(key(1), 1, 1000, T0).unwrap().allowed);
        assert!(!store.decide(key(1), 1, 1000, T0).unwrap().allowed);
        assert!(store.decide(key(2), 1, 1000, T0).unwrap().allowed);
        assert_eq!(store.peek(key(3), 5, T0), None);
    }

    #[test]
    fn concurrent_requests_admit_exactly_limit() {
        let store = MemoryStore::new(1000);
        let allowed: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..16)
                .map(|_| {
                    s.spawn(|| {
                        (0..100)
                            .filter(|_| store.decide(KEY, 60, 60_000, T0).unwrap().allowed)
                            .count()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(allowed, 60);
        assert_eq!(store.peek(KEY, 60, T0).unwrap().rejected, 16 * 100 - 60);
    }

    #[test]
    fn reclaim_removes_only_expired_buckets() {
        let store = MemoryStore::with_shards(1000, 1);
        store.decide(key(1), 5, 1_000, T0).unwrap();
        store.decide(key(2), 5, 60_000, T0).unwrap(); // another window length: its own queue
        store.decide(key(3), 5, 1_000, T0 + 500).unwrap();
        assert_eq!(store.reclaim(T0 + 999), 0);
        assert_eq!(store.reclaim(T0 + 1_000), 1);
        assert_eq!(
            store.peek(key(3), 5, T0 + 1_000).map(|d| d.reset_ms),
            Some(T0 + 1_500)
        );
        assert_eq!(store.reclaim(T0 + 1_500), 1);
        assert_eq!(
            (store.len(), store.peek(key(2), 5, T0 + 1_500).is_some()),
            (1, true)
        );
        // A renewed bucket's stale queue position neither stops nor misleads reclaim.
        store.decide(key(4), 5, 1_000, T0 + 2_000).unwrap();
        store.decide(key(5), 5, 1_000, T0 + 2_100).unwrap();
        store.decide(key(4), 5, 1_000, T0 + 3_050).unwrap(); // renewed: expires at 4_050
        assert_eq!(store.reclaim(T0 + 3_100), 1, "key 5 only");
        assert!(store.peek(key(4), 5, T0 + 3_100).is_some());
        assert_eq!(store.reclaim(T0 + 4_050), 1);
        assert_eq!(store.reclaim(T0 + 60_000), 1);
        assert!(store.is_empty());
    }

    #[test]
    fn a_full_store_reuses_expired_slots_and_never_evicts_a_live_window() {
        let store = MemoryStore::with_shards(3, 1);
        for i in 0..3 {
            store.decide(key(i), 5, 10_000, T0 + i).unwrap();
        }
        // Every window is live: a new bucket is refused, the others keep their counts.
        assert_eq!(store.decide(key(9), 5, 1_000, T0 + 5), Err(StoreFull));
        assert_eq!((store.len(), store.refused_full()), (3, 1));
        for i in 0..3 {
            assert_eq!(store.peek(key(i), 5, T0 + 5).unwrap().remaining, 4);
        }
        // A bucket at its limit stays at its limit however many clients knock.
        for _ in 0..4 {
            store.decide(key(0), 5, 10_000, T0 + 6).unwrap();
        }
        for i in 100..200 {
            assert_eq!(store.decide(key(i), 5, 10_000, T0 + 7), Err(StoreFull));
        }
        assert!(!store.decide(key(0), 5, 10_000, T0 + 8).unwrap().allowed);
        // Once a window has expired its slot is reused.
        assert!(
            store
                .decide(key(10), 5, 10_000, T0 + 10_000)
                .unwrap()
                .allowed
        );
        assert_eq!(store.len(), 3);
        assert!(store.peek(key(0), 5, T0 + 10_000).is_none());
        for i in [1, 2, 10] {
            assert!(store.peek(key(i), 5, T0 + 10_000).is_some());
        }
        assert_eq!(store.refused_full(), 101);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Request(u64),
        Reclaim(u64),
    }

    fn op(window: u64) -> impl Strategy<Value = Op> {
        prop_oneof![
            8 => (0..window * 2).prop_map(Op::Request),
            1 => (0..window * 2).prop_map(Op::Reclaim),
        ]
    }

    /// A GCRA bucket a raised burst renews far beyond its queue's span
    /// moves to a queue of its own length, so the buckets queued after it
    /// are still reclaimed when they expire.
    #[test]
    fn a_bucket_renewed_beyond_its_queue_does_not_hold_the_reclaim() {
        let store = MemoryStore::with_shards(1_000, 1);
        let identity = crate::identity::Identity::Ip(std::net::Ipv4Addr::LOCALHOST.into());
        let ask = |key, burst, hits| Ask {
            key,
            tier: "",
            identity: &identity,
            limit: 60,
            hits,
            window_ms: 60_000,
            spend: Spend::Admit,
            algorithm: Algorithm::Gcra { burst },
        };
        // X opens with the tier's burst of 60, then a reload raises it to
        // 3600 and X spends an hour's worth.
        assert!(store.decide_ask(&ask(key(1), 60, 1), T0).unwrap().allowed);
        assert!(
            store
                .decide_ask(&ask(key(1), 3_600, 3_000), T0 + 10)
                .unwrap()
                .allowed
        );
        store.reclaim(T0 + 70_000);
        // Y comes after X's requeue and goes quiet; its TAT passes a
        // second later.
        assert!(
            store
                .decide_ask(&ask(key(2), 60, 1), T0 + 71_000)
                .unwrap()
                .allowed
        );
        assert_eq!(store.len(), 2);
        store.reclaim(T0 + 200_000);
        assert_eq!(store.len(), 1, "Y reclaimed while X still lives");
        assert!(
            store
                .decide_ask(&ask(key(1), 3_600, 0), T0 + 200_000)
                .unwrap()
                .remaining
                < 3_600
        );
    }

    proptest! {
        /// Compared with a reference model of the fixed window after every step.
        #[test]
        fn matches_the_fixed_window_model(
            (limit, window, ops) in (0u32..8, 1u64..5_000)
                .prop_flat_map(|(l, w)| (Just(l), Just(w), prop::collection::vec(op(w), 1..200)))
        ) {
            let store = MemoryStore::with_shards(16, 1);
            let clock = FakeClock::new(T0);
            let (mut start, mut admitted) = (None::<u64>, 0u32);
            for op in ops {
                match op {
                    Op::Reclaim(ms) => {
                        clock.advance(ms);
                        store.reclaim(clock.now_ms());
                        continue;
                    }
                    Op::Request(ms) => clock.advance(ms),
                }
                let now = clock.now_ms();
                if start.is_none_or(|s| now >= s + window) {
                    start = Some(now);
                    admitted = 0;
                }
                let true_reset = start.unwrap() + window;
                let d = store.decide(KEY, limit, window, now).unwrap();
                prop_assert_eq!(d.allowed, admitted < limit);
                admitted += u32::from(d.allowed);
                prop_assert!(admitted <= limit, "more than limit admitted in one window");
                prop_assert!(d.remaining <= limit);
                prop_assert_eq!(d.remaining, if d.allowed { limit - admitted } else { 0 });
                prop_assert!(d.reset_ms >= true_reset, "reset earlier than the true reset");
                prop_assert_eq!(d.reset_ms, true_reset);
            }
        }

        /// Many keys, renewals, and more window lengths than queues (so one queue is mixed):
        /// reclaim never drops a live bucket (every decision still matches the model) and in
        /// the end drops every expired one.
        #[test]
        fn reclaim_keeps_live_buckets(ops in prop::collection::vec((0u64..24, 0u64..1_500, any::<bool>()), 1..300)) {
            let store = MemoryStore::with_shards(1_000, 2);
            let mut model = HashMap::new();
            let mut now = T0;
            for (k, advance, reclaim) in ops {
                now += advance;
                if reclaim {
                    store.reclaim(now);
                    let live = model.values().filter(|&&(reset, _)| reset > now).count();
                    prop_assert!(store.len() >= live);
                }
                let window = 100 * (k % 12 + 1);
                let (reset, admitted) = model.entry(k).or_insert((0, 0));
                if now >= *reset {
                    (*reset, *admitted) = (now + window, 0);
                }
                let d = store.decide(key(k), 2, window, now).unwrap();
                prop_assert_eq!((d.allowed, d.reset_ms), (*admitted < 2, *reset));
                *admitted += u32::from(d.allowed);
            }
            store.reclaim(now + 1_200);
            prop_assert!(store.is_empty());
        }
    }
}
