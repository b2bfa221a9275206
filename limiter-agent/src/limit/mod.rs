//! Rate-limit decisions (fixed window, sliding window, GCRA), their
//! settlement, and in-flight leases: the clock, the decision, and the
//! [`Store`] trait the stores implement (the embedded [`MemoryStore`] by default, the shared
//! [`RedisStore`] for several hosts).

mod clock;
mod gcra;
mod lapsing;
mod memory;
pub(crate) mod redis;
pub mod sliding;

use std::{future::Future, pin::Pin};

pub use clock::{Clock, FakeClock, Now, SystemClock};
pub use gcra::{Gcra, GcraDecision};
pub use lapsing::LapsingSet;
pub use memory::{MAX_WINDOWS, MemoryStore, StoreFull};
pub use sliding::{Slice, Sliding, SlidingDecision};

pub use self::redis::{RedisSettings, RedisStore, bucket_key};
use crate::identity::Identity;

/// Identifies a bucket: a keyed hash of (client identity, tier), computed by the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BucketKey(pub u64);

/// The outcome of one request against one bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub limit: u32,
    /// Units the client may send right after this request (a rejected
    /// request of one unit: 0; of several: what is left, too few for it).
    pub remaining: u32,
    /// When the request would be admitted (a rejection) or the whole limit
    /// is back (an admission): for a fixed window both are its reset. On
    /// the monotonic clock ([`Clock::now_ms`]); the Unix time sent to
    /// clients is worked out at answer time ([`Now::unix_at`]).
    pub reset_ms: u64,
    /// Rejected requests in this window so far, including this one if rejected.
    pub rejected: u32,
    /// Names the window, for a later [`Settle`]: the in-memory store's
    /// reset time, Redis's expiry of the key on its own clock. Only
    /// [`Spend::Reserve`] decisions are sure to carry it (0 otherwise).
    pub window: u64,
}

/// How a charge of `hits` units that does not fit is counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spend {
    /// An HTTP request asking to be admitted: all its units if they fit,
    /// none otherwise (a rejected request consumes nothing).
    Admit,
    /// Usage reported after the fact (Envoy's `hits_addend`): a charge that
    /// does not fit exhausts the window, so spent units are never lost.
    Reported,
    /// As `Admit`, for a charge to be settled later (a token reservation, a
    /// cost the upstream reports): the decision names its window, and no
    /// local shortcut answers for the bucket, whose count may go down.
    Reserve,
}

/// A correction to an earlier [`Spend::Reserve`] charge, once the real
/// figure is known.
#[derive(Clone, Copy, Debug)]
pub struct Settle<'a> {
    pub key: BucketKey,
    pub tier: &'a str,
    pub identity: &'a Identity,
    pub limit: u32,
    pub window_ms: u64,
    /// The reserving decision's [`Decision::window`].
    pub window: u64,
    /// Units to add (a charge beyond the reservation: counted in the window
    /// in force, exhausting it when it does not fit) or to give back (a
    /// refund: only to the window that took the reservation, never to a
    /// later one, which never held it).
    pub delta: i64,
}

/// A request's claim on one of its client's in-flight slots in a tier.
#[derive(Clone, Copy, Debug)]
pub struct LeaseAsk<'a> {
    pub key: BucketKey,
    pub tier: &'a str,
    pub identity: &'a Identity,
    /// Slots the client may hold at once.
    pub limit: u32,
}

/// A held in-flight slot, given back when dropped.
pub type Lease = Box<dyn std::any::Any + Send + Sync>;

/// What [`Store::acquire`] returns: the slot, or `None` when all are held.
pub type LeaseFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Option<Lease>, StoreError>> + Send + 'a>>;

/// How a bucket counts (`[[tier]] algorithm`; see `docs/algorithms.md`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Algorithm {
    /// `limit` per window anchored at the client's first request.
    #[default]
    Fixed,
    /// `limit` in any interval of the window's length, counted in slices
    /// ([`Sliding`]).
    Sliding,
    /// `limit` per window as a steady rate, with bursts of `burst` ([`Gcra`]).
    Gcra { burst: u32 },
}

impl Algorithm {
    /// How long a bucket lives after its last change when nothing renews
    /// it, at most, which groups buckets in the memory store's expiry
    /// queues: a fixed window's length; a sliding window's 21 slices; a
    /// GCRA burst's time (at least the window), rounded up to a power of
    /// two ms so keys' overrides, whose bursts round differently, share it.
    #[must_use]
    pub fn bucket_span_ms(self, limit: u32, window_ms: u64) -> u64 {
        let window_ms = window_ms.max(1);
        match self {
            Self::Fixed => window_ms,
            Self::Sliding => Sliding::new(limit, window_ms)
                .slice_ms()
                .saturating_mul(sliding::SLICES + 1),
            Self::Gcra { burst } => {
                let burst_ms = Gcra::new(limit, window_ms, burst)
                    .tolerance_us()
                    .div_ceil(1_000);
                burst_ms
                    .max(window_ms)
                    .checked_next_power_of_two()
                    .unwrap_or(u64::MAX)
            }
        }
    }
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
    /// Units this request is worth (1 for an HTTP request; Envoy's
    /// `hits_addend` through the rate limit service): all are counted if they
    /// fit, none if they do not.
    pub hits: u32,
    pub window_ms: u64,
    pub spend: Spend,
    pub algorithm: Algorithm,
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
    /// A new bucket found the store full of live windows (`[store] max_buckets`).
    #[error("the bucket store is full")]
    Full,
    /// The backend answered with an error, or the connection failed.
    #[error("store error: {0}")]
    Backend(String),
}

/// What [`Store::decide`] returns: boxed so stores can be chosen at run time.
pub type StoreFuture<'a> = Pin<Box<dyn Future<Output = Result<Decision, StoreError>> + Send + 'a>>;

/// What [`Store::key_verified`] returns.
pub type VerifiedFuture<'a> = Pin<Box<dyn Future<Output = bool> + Send + 'a>>;

/// A place where bucket counts live: the same fixed-window semantics whatever
/// the backend (see [`MemoryStore::decide`]).
pub trait Store: Send + Sync + 'static {
    /// Admits or rejects one request; `now_ms` is this host's monotonic clock (a
    /// store with its own clock, like Redis, may run the window on that, but the
    /// `reset_ms` it returns is on this host's monotonic clock).
    fn decide<'a>(&'a self, ask: Ask<'a>, now_ms: u64) -> StoreFuture<'a>;

    /// Applies a [`Settle`]; the decision is the bucket's state after it
    /// (`allowed`: whether a request now would be admitted).
    fn settle<'a>(&'a self, settle: Settle<'a>, now_ms: u64) -> StoreFuture<'a>;

    /// One of the client's in-flight slots in a tier, held until the lease
    /// is dropped; `None` when it holds `limit` already. A shared store
    /// counts every host's leases, each expiring unless its host renews it.
    fn acquire<'a>(&'a self, ask: LeaseAsk<'a>) -> LeaseFuture<'a>;

    /// Drops expired local state; called every second, off the request path.
    fn reclaim(&self, _now_ms: u64) {}

    /// Whether the backend is reachable right now (the store-health gauge).
    fn healthy(&self) -> bool {
        true
    }

    /// Whether another host recorded the key (its SHA-256 hex) as verified for
    /// `tier`. Only shared stores know; the caller's local cache comes first.
    fn key_verified<'a>(&'a self, _tier: &'a str, _key: &'a str) -> VerifiedFuture<'a> {
        Box::pin(std::future::ready(false))
    }

    /// Records (`ttl` = `Some`) or forgets (`None`) a verification for the
    /// other hosts; fire and forget, off the response path.
    fn share_verification(&self, _tier: &str, _key: &str, _ttl: Option<std::time::Duration>) {}

    /// Live buckets held locally (a gauge; 0 for stores that keep none).
    fn local_buckets(&self) -> usize {
        0
    }
}
