//! One shard of the in-memory store: its buckets, packed to 20 bytes a slot,
//! and the per-window queues that give reclaim and the "full" check their
//! expiry order without scanning. Every algorithm keeps the same 12-byte
//! bucket (see [`Bucket`]); a sliding window takes one per slice that
//! counts.

use std::{
    collections::{HashMap, VecDeque},
    hash::{BuildHasherDefault, Hasher},
};

use super::StoreFull;
use crate::limit::{Algorithm, Decision, Gcra, Slice, Sliding, sliding::SLICES};

/// Slots a sliding-window bucket's slices take in turn.
const RING: u64 = SLICES + 1;

/// The slot of the slices at `place` in a sliding-window bucket's ring:
/// its key with the low bits changed (the same shard: shards are taken
/// from bits 32 and up). The bucket's own key is not used.
fn slice_key(key: u64, place: u64) -> u64 {
    key ^ (place + 1)
}

/// One question to a shard (see [`super::MemoryStore::decide_ask`]).
#[derive(Clone, Copy, Debug)]
pub(super) struct Question {
    pub(super) key: u64,
    pub(super) limit: u32,
    pub(super) hits: u32,
    /// A charge that does not fit exhausts the bucket (`Spend::Reported`).
    pub(super) exhaust: bool,
    pub(super) window_ms: u64,
    pub(super) algorithm: Algorithm,
}

/// Reset times are kept in 43 bits (up to year 2248); later ones saturate.
const RESET_BITS: u32 = 43;
const RESET_MAX: u64 = (1 << RESET_BITS) - 1;
/// Set when an expired bucket was renewed in place, so its queue entry sits too early.
const RENEWED: u64 = 1 << RESET_BITS;
/// The rest of the word counts rejections, saturating at 2^20 - 1 per window.
const REJECTED_SHIFT: u32 = RESET_BITS + 1;
const REJECTED_MAX: u64 = u64::MAX >> REJECTED_SHIFT;

/// Distinct window lengths with their own queue per shard (tiers are few); beyond this the
/// last queue is shared, which only delays reclaim (see `Shard::queue_for`).
pub(super) const MAX_QUEUES: usize = 32;
/// The map's key. Packed to 4-byte alignment so that with a `Bucket` a map slot is 20 bytes,
/// not 24: the memory budget (64 bytes per bucket, map and queue) has no room for padding.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
#[repr(C, packed(4))]
struct SlotKey(u64);

/// One bucket: 12 bytes. The limit is not kept (it comes with each call), which is what
/// makes 12 possible; the window length is implied by the reset time. The
/// reset time is when the bucket may be forgotten, and the count is, by
/// algorithm:
/// - fixed window: the window's reset and its count;
/// - GCRA: the theoretical arrival time (TAT) in µs rounded up to a ms, and
///   what the rounding added in µs (a bucket whose TAT has passed is full,
///   the same as none);
/// - sliding window: one slot per slice, in a ring of `RING` slots:
///   when the slice stops counting, and its count.
#[derive(Clone, Copy)]
#[repr(C, packed(4))]
struct Bucket {
    /// Reset ms | `RENEWED` | rejected << `REJECTED_SHIFT`.
    packed: u64,
    count: u32,
}

const _: () = assert!(size_of::<(SlotKey, Bucket)>() == 20);

impl Bucket {
    fn new(reset_ms: u64, flags: u64) -> Self {
        Self {
            packed: reset_ms.min(RESET_MAX) | flags,
            count: 0,
        }
    }

    fn reset_ms(self) -> u64 {
        self.packed & RESET_MAX
    }

    fn rejected(self) -> u32 {
        u32::try_from(self.packed >> REJECTED_SHIFT).unwrap_or(u32::MAX)
    }

    /// Counts one more rejection, saturating.
    fn reject(&mut self) {
        if self.packed >> REJECTED_SHIFT < REJECTED_MAX {
            self.packed += 1 << REJECTED_SHIFT;
        }
    }

    /// Moves the reset time, keeping the rejections, and flags the bucket
    /// renewed so its queue entry (now too early) is requeued.
    fn move_reset(&mut self, reset_ms: u64) {
        self.packed = (self.packed & !RESET_MAX) | reset_ms.min(RESET_MAX) | RENEWED;
    }

    /// A GCRA bucket's TAT in µs.
    fn tat_us(self) -> u64 {
        (self.reset_ms() * 1_000).saturating_sub(u64::from(self.count))
    }

    /// Sets a GCRA bucket's TAT.
    fn set_tat(&mut self, tat_us: u64) {
        let reset_ms = tat_us.div_ceil(1_000);
        self.move_reset(reset_ms);
        self.count = u32::try_from(reset_ms * 1_000 - tat_us).unwrap_or(0);
    }

    /// Counts one request of `hits` units, under the shard lock: admitted
    /// if all of them fit in what is left, and then all are counted; 0 is a
    /// check that counts nothing (admitted while a unit is left). A charge
    /// that does not fit consumes nothing, unless `exhaust` (usage reported
    /// after the fact, like Envoy's costs charged when a stream ends): then
    /// it exhausts the window rather than vanish, so the window never admits
    /// past its limit either way. `remaining` is the units left after it
    /// (0 for a rejected single unit: none was left).
    fn admit(&mut self, limit: u32, hits: u32, exhaust: bool) -> Decision {
        let left = limit.saturating_sub(self.count);
        let allowed = if hits == 0 { left > 0 } else { hits <= left };
        if allowed {
            self.count += hits;
        } else {
            if exhaust && hits > 1 {
                self.count = self.count.max(limit);
            }
            self.reject();
        }
        Decision {
            allowed,
            ..self.state(limit)
        }
    }

    /// Adds `delta` units (at most up to the limit: a charge that does not
    /// fit exhausts the window) or takes them back (down to 0).
    fn adjust(&mut self, limit: u32, delta: i64) {
        let count = i64::from(self.count);
        let adjusted = if delta > 0 {
            (count + delta).min(i64::from(limit)).max(count)
        } else {
            (count + delta).max(0)
        };
        self.count = u32::try_from(adjusted).unwrap_or(u32::MAX);
    }

    /// `allowed` here says whether a request now would be admitted.
    fn state(self, limit: u32) -> Decision {
        Decision {
            allowed: self.count < limit,
            limit,
            remaining: limit.saturating_sub(self.count),
            reset_ms: self.reset_ms(),
            rejected: self.rejected(),
            window: self.reset_ms(),
        }
    }
}

/// `BucketKey` is already a keyed hash, so the map uses it as is.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    /// Only reached if the key type ever stops being a `u64`.
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Keys of the buckets created with one window length, oldest first. As windows are
/// anchored at first use, this is also (nearly: threads read the clock before locking)
/// expiry order, which makes reclaim and eviction pop from the front.
struct Queue {
    window_ms: u64,
    keys: VecDeque<u64>,
}

/// Invariant: every key in `map` is in exactly one queue exactly once, and keys leave the
/// map only when popped from a queue front, so the queues cost 8 bytes per bucket.
#[derive(Default)]
pub(super) struct Shard {
    map: HashMap<SlotKey, Bucket, BuildHasherDefault<KeyHasher>>,
    queues: Vec<Queue>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Empty,
    Live,
    Expired,
    Requeued,
}

impl Shard {
    /// The queue of buckets that live `window_ms` from their creation when
    /// nothing renews them (a fixed window's length, twice a sliding one's,
    /// a GCRA burst's time).
    fn queue_for(&mut self, window_ms: u64) -> usize {
        if let Some(q) = self.queues.iter().position(|q| q.window_ms == window_ms) {
            q
        } else if self.queues.len() < MAX_QUEUES {
            self.queues.push(Queue {
                window_ms,
                keys: VecDeque::new(),
            });
            self.queues.len() - 1
        } else {
            // Mixed windows make this queue unsorted; a long-lived front then only delays
            // reclaim of what is behind it, and nothing live is ever reclaimed.
            MAX_QUEUES - 1
        }
    }

    /// Handles the front of queue `q`: removes it if expired, moves a renewed
    /// bucket to the back, or reports it live and leaves it.
    fn step(&mut self, q: usize, now_ms: u64) -> Step {
        let keys = &mut self.queues[q].keys;
        let Some(&key) = keys.front() else {
            return Step::Empty;
        };
        let Some(bucket) = self.map.get_mut(&SlotKey(key)) else {
            // Unreachable under the invariant; dropping the entry keeps the queue moving.
            keys.pop_front();
            return Step::Requeued;
        };
        if bucket.reset_ms() <= now_ms {
            self.map.remove(&SlotKey(key));
            keys.pop_front();
            Step::Expired
        } else if bucket.packed & RENEWED != 0 {
            // Each renewal is requeued at most once, so loops over `step` terminate.
            bucket.packed &= !RENEWED;
            keys.pop_front();
            let life = bucket.reset_ms() - now_ms;
            if life > self.queues[q].window_ms {
                // Renewed beyond its queue's span (a burst raised by a
                // reload): queued with the buckets that live as long.
                let longer = self.queue_for(life.checked_next_power_of_two().unwrap_or(life));
                self.queues[longer].keys.push_back(key);
            } else {
                self.queues[q].keys.push_back(key);
            }
            Step::Requeued
        } else {
            Step::Live
        }
    }

    /// One decision on this shard (see [`super::MemoryStore::decide_ask`]);
    /// `cap` is the shard's share of `max_buckets`.
    pub(super) fn decide(
        &mut self,
        q: Question,
        now_ms: u64,
        cap: usize,
    ) -> Result<Decision, StoreFull> {
        match q.algorithm {
            Algorithm::Fixed => {
                self.decide_fixed(q.key, q.limit, q.hits, q.exhaust, q.window_ms, now_ms, cap)
            }
            Algorithm::Gcra { burst } => self.decide_gcra(q, burst, now_ms, cap),
            Algorithm::Sliding => self.decide_sliding(q, now_ms, cap),
        }
    }

    /// A fixed-window decision.
    #[expect(clippy::too_many_arguments, reason = "one bucket's whole question")]
    fn decide_fixed(
        &mut self,
        key: u64,
        limit: u32,
        hits: u32,
        exhaust: bool,
        window_ms: u64,
        now_ms: u64,
        cap: usize,
    ) -> Result<Decision, StoreFull> {
        let window_ms = window_ms.max(1);
        let reset_ms = now_ms.saturating_add(window_ms);
        if let Some(bucket) = self.map.get_mut(&SlotKey(key)) {
            if bucket.reset_ms() <= now_ms {
                // Expired but not reclaimed yet: renew in place. Its queue entry stays at the
                // old, earlier position; the flag tells the front-popper to requeue it.
                *bucket = Bucket::new(reset_ms, RENEWED);
            }
            return Ok(bucket.admit(limit, hits, exhaust));
        }
        if !self.make_room(cap, now_ms) {
            return Err(StoreFull);
        }
        let q = self.queue_for(window_ms);
        let mut bucket = Bucket::new(reset_ms, 0);
        let decision = bucket.admit(limit, hits, exhaust);
        self.map.insert(SlotKey(key), bucket);
        self.queues[q].keys.push_back(key);
        Ok(decision)
    }

    /// A GCRA decision: the bucket holds the TAT; one whose TAT has passed
    /// is full, so a new bucket is stored only once a request moves it.
    fn decide_gcra(
        &mut self,
        q: Question,
        burst: u32,
        now_ms: u64,
        cap: usize,
    ) -> Result<Decision, StoreFull> {
        let gcra = Gcra::new(q.limit, q.window_ms, burst);
        let clock_us = now_ms.saturating_mul(1_000);
        let (tat_us, rejected) = self
            .map
            .get(&SlotKey(q.key))
            .filter(|b| b.reset_ms() > now_ms)
            .map_or((0, 0), |b| (b.tat_us(), b.rejected()));
        let d = gcra.decide(tat_us, clock_us, q.hits);
        // A rejection keeps the TAT held to the burst (see `Gcra::held`).
        let tat_after = if !d.allowed && q.exhaust && q.hits > 1 {
            gcra.exhausted(tat_us, clock_us)
        } else {
            d.tat_us
        };
        let wait_us = if d.allowed {
            d.reset_us
        } else {
            // After an exhausting charge, from the TAT it left.
            gcra.decide(tat_after, clock_us, q.hits).retry_us
        };
        let mut decision = Decision {
            allowed: d.allowed,
            limit: q.limit,
            remaining: if tat_after == d.tat_us {
                d.remaining
            } else {
                0
            },
            reset_ms: now_ms + wait_us.div_ceil(1_000),
            rejected: rejected.saturating_add(u32::from(!d.allowed)),
            window: 0,
        };
        if tat_after <= clock_us {
            // Full before and after (a rejection of more than the burst):
            // nothing to keep.
            return Ok(decision);
        }
        let fresh = !self.map.contains_key(&SlotKey(q.key));
        let bucket = if let Some(b) = self.map.get_mut(&SlotKey(q.key)) {
            if tat_us == 0 {
                // Expired but not reclaimed yet: its rejections start over.
                b.packed &= !(REJECTED_MAX << REJECTED_SHIFT);
            }
            b
        } else {
            // Queued with the buckets that live a burst's time.
            let span_ms = q.algorithm.bucket_span_ms(q.limit, q.window_ms);
            self.insert(q.key, tat_after.div_ceil(1_000), span_ms, now_ms, cap)?
        };
        if tat_after != tat_us {
            bucket.set_tat(tat_after);
        }
        if fresh {
            // Queued just now, in its place.
            bucket.packed &= !RENEWED;
        }
        if !d.allowed {
            bucket.reject();
            decision.rejected = bucket.rejected();
        }
        Ok(decision)
    }

    /// A sliding-window decision: each slice's count in a slot of its own,
    /// keyed by its place in a ring of `SLICES + 1` (`slice_key`), the
    /// slot's reset being when the slice stops counting.
    fn decide_sliding(
        &mut self,
        q: Question,
        now_ms: u64,
        cap: usize,
    ) -> Result<Decision, StoreFull> {
        let sliding = Sliding::new(q.limit, q.window_ms);
        let slice_ms = sliding.slice_ms();
        let mut live: [Slice; RING as usize] = [(0, 0); RING as usize];
        let (mut found, mut rejected) = (0, 0_u32);
        for place in 0..RING {
            let Some(b) = self.map.get(&SlotKey(slice_key(q.key, place))) else {
                continue;
            };
            if b.reset_ms() > now_ms {
                live[found] = ((b.reset_ms() / slice_ms).saturating_sub(RING), b.count);
                found += 1;
                rejected = rejected.saturating_add(b.rejected());
            }
        }
        let d = sliding.decide(&live[..found], now_ms, q.hits, q.exhaust);
        let mut decision = Decision {
            allowed: d.allowed,
            limit: q.limit,
            remaining: d.remaining,
            reset_ms: d.reset_ms,
            rejected: rejected.saturating_add(u32::from(!d.allowed)),
            window: 0,
        };
        if d.add == 0 && d.allowed {
            return Ok(decision);
        }
        let now = sliding.slice_of(now_ms);
        let forget = sliding.forget_at(now);
        let key = slice_key(q.key, now % RING);
        let slot = if let Some(b) = self.map.get_mut(&SlotKey(key)) {
            if b.reset_ms() != forget {
                // An older slice's slot, expired: this slice's now.
                b.move_reset(forget);
                b.packed &= !(REJECTED_MAX << REJECTED_SHIFT);
                b.count = 0;
            }
            b
        } else {
            let span_ms = q.algorithm.bucket_span_ms(q.limit, q.window_ms);
            self.insert(key, forget, span_ms, now_ms, cap)?
        };
        slot.count = slot.count.saturating_add(d.add);
        if !d.allowed {
            slot.reject();
            decision.rejected = decision.rejected.max(slot.rejected());
        }
        Ok(decision)
    }

    /// Stores a new bucket resetting at `reset_ms`, queued with the buckets
    /// that live `span_ms`; `StoreFull` when there is no room.
    fn insert(
        &mut self,
        key: u64,
        reset_ms: u64,
        span_ms: u64,
        now_ms: u64,
        cap: usize,
    ) -> Result<&mut Bucket, StoreFull> {
        if !self.make_room(cap, now_ms) {
            return Err(StoreFull);
        }
        let q = self.queue_for(span_ms.max(1));
        self.queues[q].keys.push_back(key);
        Ok(self
            .map
            .entry(SlotKey(key))
            .or_insert(Bucket::new(reset_ms, 0)))
    }

    /// A settlement (see [`crate::limit::Settle`]): a refund only to the
    /// live window named `window`, a charge to whichever window is live (a
    /// new one if none is). The bucket's state after it; `StoreFull` when a
    /// charge needs a new bucket and there is no room.
    #[expect(clippy::too_many_arguments, reason = "one bucket's whole question")]
    pub(super) fn settle(
        &mut self,
        key: u64,
        limit: u32,
        window_ms: u64,
        window: u64,
        delta: i64,
        now_ms: u64,
        cap: usize,
    ) -> Result<Decision, StoreFull> {
        let live = self
            .map
            .get_mut(&SlotKey(key))
            .filter(|b| b.reset_ms() > now_ms);
        match live {
            Some(bucket) => {
                if delta > 0 || bucket.reset_ms() == window {
                    bucket.adjust(limit, delta);
                }
                Ok(bucket.state(limit))
            }
            None if delta > 0 => {
                let fresh = self.decide_fixed(key, limit, 0, false, window_ms, now_ms, cap)?;
                let bucket = self
                    .map
                    .get_mut(&SlotKey(key))
                    .expect("decide just made it");
                bucket.adjust(limit, delta);
                Ok(Decision {
                    rejected: fresh.rejected,
                    ..bucket.state(limit)
                })
            }
            None => Ok(Bucket::new(now_ms, 0).state(limit)),
        }
    }

    /// A live bucket's state, unchanged (None if absent or expired).
    pub(super) fn peek(&self, key: u64, limit: u32, now_ms: u64) -> Option<Decision> {
        let bucket = self
            .map
            .get(&SlotKey(key))
            .filter(|b| b.reset_ms() > now_ms)?;
        Some(bucket.state(limit))
    }

    /// Buckets held, expired ones not yet reclaimed included.
    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    /// Frees one slot when the shard is at `cap` by removing expired fronts.
    /// Never a live bucket: forgetting a window that has counted requests would
    /// hand its client a fresh quota. `false` when every front is live (the
    /// fronts are the buckets nearest to expiry, so the shard is full of live
    /// windows).
    fn make_room(&mut self, cap: usize, now_ms: u64) -> bool {
        while self.map.len() >= cap {
            let nearest = (0..self.queues.len())
                .filter_map(|q| {
                    let key = self.queues[q].keys.front()?;
                    Some((self.map.get(&SlotKey(*key)).map_or(0, |b| b.reset_ms()), q))
                })
                .min();
            let Some((_, q)) = nearest else { return false };
            match self.step(q, now_ms) {
                Step::Expired | Step::Requeued => {}
                Step::Live | Step::Empty => return false,
            }
        }
        true
    }

    /// Pops expired fronts, at most `budget` steps; returns (removed, budget ran out).
    pub(super) fn reclaim(&mut self, now_ms: u64, budget: usize) -> (usize, bool) {
        let (mut removed, mut steps) = (0, 0);
        for q in 0..self.queues.len() {
            loop {
                if steps == budget {
                    return (removed, true);
                }
                steps += 1;
                match self.step(q, now_ms) {
                    Step::Expired => removed += 1,
                    Step::Requeued => {}
                    Step::Empty | Step::Live => break,
                }
            }
        }
        (removed, false)
    }

    /// Returns memory after a spike has drained; the rehash is O(live) and runs only in
    /// the background task, once per fourfold drop.
    pub(super) fn shrink(&mut self) {
        if self.map.capacity() / 4 > self.map.len().max(1024) {
            self.map.shrink_to(self.map.len() * 2);
        }
        for q in &mut self.queues {
            if q.keys.capacity() / 4 > q.keys.len().max(1024) {
                q.keys.shrink_to(q.keys.len() * 2);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejections_saturate_and_the_reset_time_is_kept() {
        const T0: u64 = 1_706_540_000_000;
        let mut bucket = Bucket::new(T0, (REJECTED_MAX - 1) << REJECTED_SHIFT);
        assert_eq!(bucket.admit(0, 1, false).rejected, (1 << 20) - 1);
        assert_eq!(
            bucket.admit(0, 1, false).rejected,
            (1 << 20) - 1,
            "saturates"
        );
        assert_eq!(bucket.reset_ms(), T0);
    }
}
