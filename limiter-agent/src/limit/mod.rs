//! Fixed-window rate-limit decisions: the clock, the decision, and the [`Store`]
//! trait the stores implement (the embedded [`MemoryStore`] by default, the
//! shared [`RedisStore`] for several hosts).

mod memory;
mod redis;

use std::{
    future::Future,
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

pub use memory::MemoryStore;

pub use self::redis::{RedisStore, bucket_key};
use crate::identity::Identity;

/// Time source, injected so tests are exact and instant. Milliseconds since the Unix epoch; must never go backwards.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> u64;
}

/// The real clock: the Unix time at construction plus a monotonic `Instant` elapsed since (so it never jumps back).
#[derive(Debug)]
pub struct SystemClock {
    epoch_ms: u64,
    start: Instant,
}

impl SystemClock {
    #[must_use]
    pub fn new() -> Self {
        // A wall clock before 1970 is a broken host; 0 keeps the arithmetic total.
        let epoch_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Self {
            epoch_ms,
            start: Instant::now(),
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        let elapsed = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.epoch_ms.saturating_add(elapsed)
    }
}

/// A clock tests move by hand (interior mutability, `AtomicU64`).
#[derive(Debug)]
pub struct FakeClock(AtomicU64);

impl FakeClock {
    #[must_use]
    pub fn new(start_ms: u64) -> Self {
        Self(AtomicU64::new(start_ms))
    }

    pub fn advance(&self, ms: u64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }

    /// Sets the time; keeping it non-decreasing is the test's job.
    pub fn set(&self, ms: u64) {
        self.0.store(ms, Ordering::SeqCst);
    }
}

impl Clock for FakeClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Identifies a bucket: a keyed hash of (client identity, tier), computed by the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BucketKey(pub u64);

/// The outcome of one request against one bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub limit: u32,
    /// Requests left in the window after this one (0 when rejected).
    pub remaining: u32,
    /// When the window resets, Unix ms.
    pub reset_ms: u64,
    /// Rejected requests in this window so far, including this one if rejected.
    pub rejected: u32,
}

/// One request's question to a store.
#[derive(Clone, Copy, Debug)]
pub struct Ask<'a> {
    /// Process-local keyed hash of (identity, tier): the in-memory store's key.
    pub key: BucketKey,
    /// The tier's stable name (route and window), the same on every host.
    pub tier: &'a str,
    /// The client, for stores shared between hosts (they build their own key).
    pub identity: &'a Identity,
    pub limit: u32,
    pub window_ms: u64,
}

/// Why a store could not decide.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store did not answer within its per-call timeout.
    #[error("the store did not answer in time")]
    Timeout,
    /// Recent failures opened the circuit breaker; the store is not being asked.
    #[error("the store is marked down after recent failures")]
    Unavailable,
    /// The backend answered with an error, or the connection failed.
    #[error("store error: {0}")]
    Backend(String),
}

/// What [`Store::decide`] returns: boxed so stores can be chosen at run time.
pub type StoreFuture<'a> = Pin<Box<dyn Future<Output = Result<Decision, StoreError>> + Send + 'a>>;

/// A place where bucket counts live: the same fixed-window semantics whatever
/// the backend (see [`MemoryStore::decide`]).
pub trait Store: Send + Sync + 'static {
    /// Admits or rejects one request; `now_ms` is this host's clock (a store with
    /// its own clock, like Redis, may use that instead).
    fn decide<'a>(&'a self, ask: Ask<'a>, now_ms: u64) -> StoreFuture<'a>;

    /// Drops expired local state; called every second, off the request path.
    fn reclaim(&self, _now_ms: u64) {}

    /// Whether the backend is reachable right now (the store-health gauge).
    fn healthy(&self) -> bool {
        true
    }

    /// Live buckets held locally (a gauge; 0 for stores that keep none).
    fn local_buckets(&self) -> usize {
        0
    }
}
