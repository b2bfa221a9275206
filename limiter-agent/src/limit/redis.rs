//! The shared store for several hosts: Redis, Valkey or Redis Cluster, one
//! server-side script (one round trip) per decision, a local cache of buckets
//! known to be over their limit, and a circuit breaker around the connection.

mod breaker;
mod over_limit;

use std::{
    collections::HashSet,
    hash::BuildHasher as _,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwapOption;
use redis::{
    Client, RedisError, RedisResult, Script,
    aio::{ConnectionManager, ConnectionManagerConfig},
    cluster::ClusterClient,
    cluster_async::ClusterConnection,
};

use self::{
    breaker::{Attempt, Breaker, Failed},
    over_limit::OverLimitCache,
};
use super::{
    Algorithm, Ask, Clock, Decision, Gcra, Lease, LeaseAsk, LeaseFuture, Settle, Sliding, Spend,
    Store, StoreError, StoreFuture, VerifiedFuture, sliding::SLICES,
};
use crate::identity::Identity;

/// `[store] kind = "redis"`: where the shared counters live and how hard to try.
/// Its `Debug` (the startup line) hides URL passwords.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisSettings {
    /// `redis://` or `rediss://` URL of one server (or the first Cluster seed).
    pub url: Option<String>,
    /// Redis Cluster seed nodes; non-empty means Cluster mode.
    pub cluster_nodes: Vec<String>,
    /// Prepended to every key, outside the hash tag.
    pub key_prefix: String,
    /// Budget for one decision's round trip.
    pub timeout: Duration,
    /// Consecutive failures that open the circuit breaker.
    pub breaker_failures: u32,
    /// How long an open breaker refuses calls before one probe is let through.
    pub breaker_cooldown: Duration,
    /// How long an in-flight lease lives unless its host renews it (every
    /// third of it): what a host that dies holding slots keeps them for.
    pub lease: Duration,
}

impl std::fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        fn redact(url: &str) -> String {
            match (url.find("://"), url.rfind('@')) {
                (Some(scheme), Some(at)) if at > scheme => {
                    format!("{}***{}", &url[..scheme + 3], &url[at..])
                }
                _ => url.to_owned(),
            }
        }
        f.debug_struct("RedisSettings")
            .field("url", &self.url.as_deref().map(redact))
            .field(
                "cluster_nodes",
                &self
                    .cluster_nodes
                    .iter()
                    .map(|u| redact(u))
                    .collect::<Vec<_>>(),
            )
            .field("key_prefix", &self.key_prefix)
            .field("timeout", &self.timeout)
            .field("breaker_failures", &self.breaker_failures)
            .field("breaker_cooldown", &self.breaker_cooldown)
            .field("lease", &self.lease)
            .finish()
    }
}

/// One decision, atomically, on Redis's clock. `KEYS[1]`: the bucket;
/// `ARGV[1]`: the limit; `ARGV[2]`: the window in ms; `ARGV[3]`: the units the
/// request is worth, counted as `Bucket::admit` counts them: all if they fit
/// (0 checks without counting); `ARGV[4]`: how a charge that does not fit is
/// counted (`Spend`: 0 admit, nothing; 1 reported, the window is exhausted,
/// `SET … KEEPTTL`; 2 reserve, nothing, and the window is named). The first
/// hit starts the window (`PEXPIRE`), anchoring it at the client's first
/// request. Returns `{admitted (0|1), count, ms until reset, window}`, the
/// window being the key's expiry on Redis's clock (`PEXPIRETIME`, Redis 7)
/// when reserving, else 0.
const DECIDE_LUA: &str = r"
local limit = tonumber(ARGV[1])
local hits = tonumber(ARGV[3])
local spend = tonumber(ARGV[4] or 1)
if spend == 2 then
  -- Before any write: a server without PEXPIRETIME (Redis 6) fails here.
  local probe = redis.pcall('PEXPIRETIME', KEYS[1])
  if type(probe) == 'table' and probe.err then
    return redis.error_reply('token budgets and reported costs need Redis 7 or Valkey 7.2 (PEXPIRETIME)')
  end
end
local count = tonumber(redis.call('GET', KEYS[1]) or 0)
local admitted = 0
if hits == 0 then
  if count < limit then admitted = 1 end
elseif count + hits <= limit then
  admitted = 1
  local before = count
  count = redis.call('INCRBY', KEYS[1], hits)
  if before == 0 and count == hits then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
  end
elseif spend == 1 and hits > 1 and count < limit then
  if count == 0 then
    redis.call('SET', KEYS[1], limit, 'PX', ARGV[2])
  else
    redis.call('SET', KEYS[1], limit, 'KEEPTTL')
  end
  count = limit
end
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  -- -1: a counter without expiry (written by something else); never let it live forever.
  if ttl == -1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
  ttl = tonumber(ARGV[2])
end
local window = 0
if spend == 2 then window = redis.call('PEXPIRETIME', KEYS[1]) end
return {admitted, count, ttl, window}
";

/// A GCRA decision (see `Gcra`), atomically, in µs on Redis's clock.
/// `KEYS[1]`: the bucket, its TAT as a string (absent: full); `ARGV[1]`: the
/// emission interval; `ARGV[2]`: the tolerance (burst × interval); `ARGV[3]`:
/// the units; `ARGV[4]`: 1 when a charge that does not fit exhausts the
/// burst (`Spend::Reported`); `ARGV[5]`: now, or empty for `TIME`. The key
/// expires when its TAT passes. Integers stay below 2^53, so the doubles of
/// Lua count them exactly, and are written with `%.0f`. Returns `{admitted,
/// TAT − now after the decision, µs until the units would fit}`.
const GCRA_LUA: &str = r"
local now
if ARGV[5] ~= '' then
  now = tonumber(ARGV[5])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local hits = tonumber(ARGV[3])
local stored = tonumber(redis.call('GET', KEYS[1]) or 0)
-- A TAT beyond the burst (a larger burst before a reload) is held to it,
-- and kept held.
local tat = math.min(stored, now + tolerance)
local from = math.max(tat, now)
-- More units than the burst never fit; more than one beyond it changes nothing.
local units = math.min(math.max(hits, 1), math.floor(tolerance / interval) + 1)
local moved = from + units * interval
local admitted = 0
local retry = moved - now - tolerance
local after = tat
if retry <= 0 then
  admitted = 1
  retry = 0
  if hits > 0 then after = moved end
elseif ARGV[4] == '1' and hits > 1 then
  after = math.max(tat, now + tolerance)
  retry = math.max(after, now) + units * interval - now - tolerance
end
if retry > 0 and units * interval > tolerance then
  -- More than the burst never fits: when it is whole.
  retry = math.max(after, now) - now
end
if after ~= stored then
  redis.call('SET', KEYS[1], string.format('%.0f', after), 'PX', string.format('%.0f', math.ceil((after - now) / 1000)))
end
return {admitted, math.max(after, now) - now, retry}
";

/// A sliding-window decision (see `Sliding`), atomically, in ms on Redis's
/// clock. `KEYS[1]`: the bucket, a hash of slice index → units; `ARGV[1]`:
/// the limit; `ARGV[2]`: the slice in ms; `ARGV[3]`: the units; `ARGV[4]`:
/// 1 when a charge that does not fit fills the window (`Spend::Reported`);
/// `ARGV[5]`: now, or empty for `TIME`; `ARGV[6]`: slices per window.
/// Slices that no longer count are deleted; the key expires when the last
/// one stops counting. Returns `{admitted, units left, ms from now until
/// the units fit (a rejection) or the limit is whole}`.
const SLIDING_LUA: &str = r"
local now
if ARGV[5] ~= '' then
  now = tonumber(ARGV[5])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local limit = tonumber(ARGV[1])
local slice = tonumber(ARGV[2])
local hits = tonumber(ARGV[3])
local n = tonumber(ARGV[6])
local current = math.floor(now / slice)
local function forget(index) return (index + n + 1) * slice end
local live, held = {}, 0
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  local index = tonumber(fields[i])
  if forget(index) > now then
    local units = tonumber(fields[i + 1])
    live[#live + 1] = {index, units}
    held = held + units
  else
    redis.call('HDEL', KEYS[1], fields[i])
  end
end
local admitted, add = 0, 0
if limit - held >= math.max(hits, 1) then
  admitted, add = 1, hits
elseif ARGV[4] == '1' and hits > 1 then
  add = math.max(limit - held, 0)
end
if add > 0 then
  redis.call('HINCRBY', KEYS[1], current, add)
  live[#live + 1] = {current, add}
  held = held + add
end
table.sort(live, function(a, b) return a[1] < b[1] end)
local full = now
if #live > 0 then full = forget(live[#live][1]) end
local at = full
if admitted == 0 and hits <= limit then
  local must_go = held + math.max(hits, 1) - limit
  local gone = 0
  for _, s in ipairs(live) do
    gone = gone + s[2]
    if gone >= must_go then at = forget(s[1]) break end
  end
end
if #live > 0 then
  redis.call('PEXPIRE', KEYS[1], math.max(full - now, 1))
end
return {admitted, math.max(limit - held, 0), math.max(at - now, 0)}
";

/// A settlement (`Settle`), atomically. `KEYS[1]`: the bucket; `ARGV[1]`:
/// the limit; `ARGV[2]`: the window in ms; `ARGV[3]`: the reserving
/// decision's window (`PEXPIRETIME`); `ARGV[4]`: the units to add (> 0: up
/// to the limit, in whatever window is live, a new one if none) or to give
/// back (< 0: only to the window named, down to 0). Returns `{count, ms
/// until reset}`.
const SETTLE_LUA: &str = r"
local limit = tonumber(ARGV[1])
local delta = tonumber(ARGV[4])
local count = tonumber(redis.call('GET', KEYS[1]) or 0)
if delta > 0 then
  local settled = math.max(count, math.min(count + delta, limit))
  if redis.call('EXISTS', KEYS[1]) == 0 then
    redis.call('SET', KEYS[1], settled, 'PX', ARGV[2])
  else
    redis.call('SET', KEYS[1], settled, 'KEEPTTL')
  end
  count = settled
elseif delta < 0 and redis.call('PEXPIRETIME', KEYS[1]) == tonumber(ARGV[3]) then
  count = math.max(0, count + delta)
  redis.call('SET', KEYS[1], count, 'KEEPTTL')
end
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then ttl = tonumber(ARGV[2]) end
return {count, ttl}
";

/// Takes an in-flight slot, atomically, on Redis's clock. `KEYS[1]`: the
/// client's leases in a tier, a sorted set of lease ids scored by expiry;
/// `ARGV[1]`: the slots it may hold; `ARGV[2]`: the lease in ms; `ARGV[3]`:
/// this lease's id. Expired leases (their hosts stopped renewing them) are
/// dropped first. Returns 1 when taken, 0 when all are held.
const ACQUIRE_LUA: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
";

/// Renews leases still held (`ZADD XX`: one that expired meanwhile is not
/// brought back, its slot may be another's now). `KEYS[1]`: the set;
/// `ARGV[1]`: the lease in ms; `ARGV[2..]`: the ids. Returns how many were
/// renewed.
const RENEW_LUA: &str = r"
local t = redis.call('TIME')
local expiry = t[1] * 1000 + math.floor(t[2] / 1000) + tonumber(ARGV[1])
local renewed = 0
for i = 2, #ARGV do
  renewed = renewed + redis.call('ZADD', KEYS[1], 'XX', 'CH', expiry, ARGV[i])
end
if renewed > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return renewed
";

/// The Redis key of a bucket: the same on every host, since it is built from the
/// tier's stable name and the client identity (never the process-local hash).
/// The whole bucket is the hash tag, so a Cluster keeps each bucket on one slot.
#[must_use]
pub fn bucket_key(prefix: &str, tier: &str, identity: &Identity) -> String {
    match identity {
        Identity::Key(sha256) => format!("{prefix}{{{tier}|k:{sha256}}}"),
        Identity::Ip(ip) => format!("{prefix}{{{tier}|ip:{ip}}}"),
    }
}

/// The Redis key recording that the upstream accepted an API key (its SHA-256
/// hex) in `tier`, so every host treats it as verified. Hash-tagged whole, like
/// buckets.
#[must_use]
pub fn verified_key(prefix: &str, tier: &str, key_sha256: &str) -> String {
    format!("{prefix}{{{tier}|verified:{key_sha256}}}")
}

/// The connection: a single server through the crate's reconnecting manager, or
/// a Cluster client connected on first use (so the agent starts with Redis down).
pub(crate) enum Backend {
    Single(ConnectionManager),
    Cluster(Box<LazyCluster>),
}

pub(crate) struct LazyCluster {
    client: ClusterClient,
    /// Set once connected; the connection then follows the cluster's topology itself.
    connection: ArcSwapOption<ClusterConnection>,
    /// Serialises connection attempts.
    connecting: tokio::sync::Mutex<()>,
}

impl Backend {
    /// A lazily connecting backend for `settings` (Redis may be down now).
    pub(crate) fn new(settings: &RedisSettings) -> RedisResult<Self> {
        let tls = settings
            .url
            .iter()
            .chain(&settings.cluster_nodes)
            .any(|url| url.starts_with("rediss://"));
        if tls {
            // rediss:// builds a rustls client config from the process default provider;
            // an error only means one is installed already.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        // Connecting gets more time than a call (a handshake, maybe TLS); the
        // per-call timeout still bounds what a request waits.
        let connect_timeout = settings.timeout.max(Duration::from_millis(500));
        if settings.cluster_nodes.is_empty() {
            let url = settings.url.as_deref().unwrap_or_default();
            let client = Client::open(url)?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(connect_timeout))
                .set_response_timeout(Some(settings.timeout))
                .set_number_of_retries(2)
                .set_min_delay(Duration::from_millis(50))
                .set_max_delay(Duration::from_secs(1));
            Ok(Self::Single(ConnectionManager::new_lazy_with_config(
                client, config,
            )?))
        } else {
            let nodes: Vec<&str> = settings
                .url
                .iter()
                .chain(&settings.cluster_nodes)
                .map(String::as_str)
                .collect();
            let client = ClusterClient::builder(nodes)
                .connection_timeout(connect_timeout)
                .response_timeout(settings.timeout)
                .retries(1)
                .build()?;
            Ok(Self::Cluster(Box::new(LazyCluster {
                client,
                connection: ArcSwapOption::empty(),
                connecting: tokio::sync::Mutex::new(()),
            })))
        }
    }

    /// The Cluster connection, connecting it first if needed (one attempt at a time).
    async fn cluster(cluster: &LazyCluster) -> RedisResult<ClusterConnection> {
        if let Some(connection) = &*cluster.connection.load() {
            return Ok(ClusterConnection::clone(connection));
        }
        let _connecting = cluster.connecting.lock().await;
        if let Some(connection) = &*cluster.connection.load() {
            return Ok(ClusterConnection::clone(connection));
        }
        let connected = cluster.client.get_async_connection().await?;
        cluster.connection.store(Some(Arc::new(connected.clone())));
        Ok(connected)
    }

    /// Runs a script invocation on the connection.
    pub(crate) async fn run<T: redis::FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> RedisResult<T> {
        match self {
            // Concurrent calls share one multiplexed connection: they are pipelined.
            Self::Single(manager) => invocation.invoke_async(&mut manager.clone()).await,
            Self::Cluster(cluster) => {
                let mut connection = Self::cluster(cluster).await?;
                invocation.invoke_async(&mut connection).await
            }
        }
    }

    pub(crate) async fn query<T: redis::FromRedisValue>(
        &self,
        command: &redis::Cmd,
    ) -> RedisResult<T> {
        match self {
            Self::Single(manager) => command.query_async(&mut manager.clone()).await,
            Self::Cluster(cluster) => {
                let mut connection = Self::cluster(cluster).await?;
                command.query_async(&mut connection).await
            }
        }
    }

    async fn ping(&self) -> RedisResult<()> {
        self.query(&redis::cmd("PING")).await
    }
}

/// The Redis store. Cheap to share: everything lives behind one `Arc`.
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Backend,
    script: Script,
    gcra: Script,
    sliding: Script,
    /// GCRA and sliding windows run on the caller's clock, not `TIME`.
    caller_clock: bool,
    settle: Script,
    acquire: Script,
    renew: Script,
    /// Leases this host holds, to renew: (set key, lease id).
    leases: Mutex<HashSet<(Arc<str>, Arc<str>)>>,
    lease_ms: u64,
    /// When the leases were last renewed (this host's monotonic ms).
    renewed_ms: AtomicU64,
    /// This process's lease id prefix, and the count after it.
    lease_host: String,
    next_lease: AtomicU64,
    prefix: String,
    timeout: Duration,
    /// Probes are off the request path: they may wait for a (TLS) connection.
    probe_timeout: Duration,
    breaker: Mutex<Breaker>,
    over_limit: OverLimitCache,
    clock: Arc<dyn Clock>,
}

impl RedisStore {
    /// A store for `settings`; connects lazily, so Redis may be down now.
    /// `max_buckets` caps the over-limit cache. Needs a tokio runtime.
    pub fn new(
        settings: &RedisSettings,
        clock: Arc<dyn Clock>,
        max_buckets: usize,
    ) -> Result<Self, StoreError> {
        let backend_error = |e: RedisError| StoreError::Backend(e.to_string());
        let connect_timeout = settings.timeout.max(Duration::from_millis(500));
        let backend = Backend::new(settings).map_err(backend_error)?;
        Ok(Self {
            inner: Arc::new(Inner {
                backend,
                script: Script::new(DECIDE_LUA),
                gcra: Script::new(GCRA_LUA),
                sliding: Script::new(SLIDING_LUA),
                caller_clock: false,
                settle: Script::new(SETTLE_LUA),
                acquire: Script::new(ACQUIRE_LUA),
                renew: Script::new(RENEW_LUA),
                leases: Mutex::default(),
                lease_ms: u64::try_from(settings.lease.as_millis())
                    .unwrap_or(u64::MAX)
                    .max(3),
                renewed_ms: AtomicU64::new(0),
                lease_host: lease_host(),
                next_lease: AtomicU64::new(0),
                prefix: settings.key_prefix.clone(),
                timeout: settings.timeout,
                probe_timeout: connect_timeout,
                breaker: Mutex::new(Breaker::new(
                    settings.breaker_failures,
                    u64::try_from(settings.breaker_cooldown.as_millis()).unwrap_or(u64::MAX),
                )),
                over_limit: OverLimitCache::new(max_buckets),
                clock,
            }),
        })
    }

    /// This store with GCRA and sliding windows run on the clock the caller
    /// passes to [`Store::decide`] rather than on Redis's `TIME`: for tests
    /// that drive a fake clock through the same scripts. Not for several
    /// hosts, whose monotonic clocks differ.
    ///
    /// # Panics
    /// If the store was shared already (call it right after [`Self::new`]).
    #[must_use]
    pub fn on_caller_clock(self) -> Self {
        let mut inner = Arc::into_inner(self.inner).expect("not shared yet");
        inner.caller_clock = true;
        Self {
            inner: Arc::new(inner),
        }
    }

    /// Pings Redis through the breaker (startup and the background probe).
    pub async fn probe(&self) -> Result<(), StoreError> {
        self.inner.probe().await
    }
}

impl Inner {
    fn breaker(&self) -> MutexGuard<'_, Breaker> {
        breaker::lock(&self.breaker)
    }

    /// Runs `call` if the breaker lets it, within the timeout, and tells the breaker.
    /// The permit is an [`Attempt`]: if this future is dropped mid-call (a request
    /// whose client hung up), it is released, so a probe can't stay in flight for ever.
    async fn guarded<T>(
        &self,
        timeout: Duration,
        call: impl Future<Output = RedisResult<T>>,
    ) -> Result<T, StoreError> {
        let Some(attempt) = Attempt::begin(&self.breaker, self.clock.now_ms()) else {
            return Err(StoreError::Unavailable);
        };
        let result = match tokio::time::timeout(timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) if e.is_timeout() => Err(StoreError::Timeout),
            Ok(Err(e)) => Err(StoreError::Backend(e.to_string())),
            Err(_) => Err(StoreError::Timeout),
        };
        match &result {
            Ok(_) => {
                if attempt.is_probe() {
                    tracing::info!("redis store answering");
                }
                attempt.succeeded();
            }
            Err(e) => {
                if attempt.failed(self.clock.now_ms()) == Failed::Opened {
                    tracing::warn!(error = %e, "redis store marked down; calls refused until a probe succeeds");
                }
            }
        }
        result
    }

    async fn probe(&self) -> Result<(), StoreError> {
        self.guarded(self.probe_timeout, self.backend.ping()).await
    }

    async fn decide(&self, ask: Ask<'_>, now_ms: u64) -> Result<Decision, StoreError> {
        // A reserved bucket's count may go down (a settlement): no shortcut.
        // A smooth bucket's cached time is one unit's: not for more.
        let cached =
            ask.spend != Spend::Reserve && (ask.algorithm == Algorithm::Fixed || ask.hits <= 1);
        if cached && let Some(rejection) = self.over_limit.check(ask.key, ask.limit, now_ms) {
            return Ok(rejection);
        }
        let key = bucket_key(&self.prefix, ask.tier, ask.identity);
        if ask.algorithm != Algorithm::Fixed {
            return self.decide_smooth(ask, &key, now_ms).await;
        }
        let window_ms = ask.window_ms.max(1);
        let spend = match ask.spend {
            Spend::Admit => 0,
            Spend::Reported => 1,
            Spend::Reserve => 2,
        };
        let mut invocation = self.script.key(&key);
        invocation
            .arg(ask.limit)
            .arg(window_ms)
            .arg(ask.hits)
            .arg(spend);
        let (admitted, count, ttl_ms, window): (u8, u64, u64, i64) = self
            .guarded(self.timeout, self.backend.run(&invocation))
            .await?;
        let reset_ms = self.reset_at(now_ms, ttl_ms);
        let count = u32::try_from(count).unwrap_or(u32::MAX);
        let window = u64::try_from(window).unwrap_or(0);
        if admitted == 1 {
            return Ok(Decision {
                allowed: true,
                limit: ask.limit,
                remaining: ask.limit.saturating_sub(count),
                reset_ms,
                rejected: 0,
                window,
            });
        }
        // A rejection of a reported charge leaves the bucket full, so it is
        // over its limit for every request until its reset; the check is
        // kept for counters written by something else.
        let rejected = if cached && count >= ask.limit {
            self.over_limit.insert(ask.key, ask.limit, reset_ms)
        } else {
            1
        };
        Ok(Decision {
            allowed: false,
            limit: ask.limit,
            remaining: ask.limit.saturating_sub(count),
            reset_ms,
            rejected,
            window,
        })
    }

    /// A GCRA or sliding-window decision: one script, one key.
    async fn decide_smooth(
        &self,
        ask: Ask<'_>,
        key: &str,
        now_ms: u64,
    ) -> Result<Decision, StoreError> {
        let exhaust = u8::from(ask.spend == Spend::Reported);
        let (admitted, remaining, wait_ms) = if let Algorithm::Gcra { burst } = ask.algorithm {
            let gcra = Gcra::new(ask.limit, ask.window_ms, burst);
            let mut invocation = self.gcra.key(key);
            invocation
                .arg(gcra.interval_us())
                .arg(gcra.tolerance_us())
                .arg(ask.hits)
                .arg(exhaust)
                .arg(self.given_now(now_ms.saturating_mul(1_000)));
            let (admitted, ahead_us, retry_us): (u8, u64, u64) = self
                .guarded(self.timeout, self.backend.run(&invocation))
                .await?;
            let remaining =
                gcra.tolerance_us().saturating_sub(ahead_us) / gcra.interval_us().max(1);
            let wait_us = if admitted == 1 { ahead_us } else { retry_us };
            (
                admitted,
                u32::try_from(remaining).unwrap_or(u32::MAX),
                wait_us.div_ceil(1_000),
            )
        } else {
            let mut invocation = self.sliding.key(key);
            invocation
                .arg(ask.limit)
                .arg(Sliding::new(ask.limit, ask.window_ms).slice_ms())
                .arg(ask.hits)
                .arg(exhaust)
                .arg(self.given_now(now_ms))
                .arg(SLICES);
            let (admitted, remaining, wait_ms): (u8, u64, u64) = self
                .guarded(self.timeout, self.backend.run(&invocation))
                .await?;
            (
                admitted,
                u32::try_from(remaining).unwrap_or(u32::MAX),
                wait_ms,
            )
        };
        let reset_ms = self.clock.now_ms().max(now_ms).saturating_add(wait_ms);
        let rejected = if admitted == 1 {
            0
        } else if remaining == 0 && ask.hits <= 1 {
            // Nothing fits before then: answered here until then.
            self.over_limit.insert(ask.key, ask.limit, reset_ms)
        } else {
            1
        };
        Ok(Decision {
            allowed: admitted == 1,
            limit: ask.limit,
            remaining,
            reset_ms,
            rejected,
            window: 0,
        })
    }

    /// The time a script runs at: Redis's own (`TIME`, an empty argument),
    /// or the caller's with [`RedisStore::on_caller_clock`].
    fn given_now(&self, now: u64) -> String {
        if self.caller_clock {
            now.to_string()
        } else {
            String::new()
        }
    }

    /// Redis's clock ran the window; its TTL becomes a deadline on this
    /// host's monotonic clock at answer time, off by the one-way latency (and
    /// never earlier than the request). Neither clock is the wall clock: the
    /// Unix time a client is told is worked out when the answer goes
    /// (`answers::apply`).
    fn reset_at(&self, now_ms: u64, ttl_ms: u64) -> u64 {
        self.clock
            .now_ms()
            .max(now_ms)
            .saturating_add(ttl_ms.max(1))
    }

    async fn settle(&self, settle: Settle<'_>, now_ms: u64) -> Result<Decision, StoreError> {
        let key = bucket_key(&self.prefix, settle.tier, settle.identity);
        let mut invocation = self.settle.key(&key);
        invocation
            .arg(settle.limit)
            .arg(settle.window_ms.max(1))
            .arg(settle.window)
            .arg(settle.delta);
        let (count, ttl_ms): (u64, u64) = self
            .guarded(self.timeout, self.backend.run(&invocation))
            .await?;
        if settle.delta < 0 {
            self.over_limit.forget(settle.key);
        }
        let count = u32::try_from(count).unwrap_or(u32::MAX);
        Ok(Decision {
            allowed: count < settle.limit,
            limit: settle.limit,
            remaining: settle.limit.saturating_sub(count),
            reset_ms: self.reset_at(now_ms, ttl_ms),
            rejected: 0,
            window: settle.window,
        })
    }

    async fn acquire(self: &Arc<Self>, ask: LeaseAsk<'_>) -> Result<Option<Lease>, StoreError> {
        let key: Arc<str> = lease_key(&self.prefix, ask.tier, ask.identity).into();
        let id: Arc<str> = format!(
            "{}:{}",
            self.lease_host,
            self.next_lease.fetch_add(1, Ordering::Relaxed)
        )
        .into();
        // Made before the call: if the call times out or is dropped (its
        // client gone) after the script ran, the lease it may have taken is
        // given back rather than held until it lapses.
        let mut lease = RedisLease {
            inner: self.clone(),
            key,
            id,
            taken: true,
        };
        let mut invocation = self.acquire.key(&*lease.key);
        invocation.arg(ask.limit).arg(self.lease_ms).arg(&*lease.id);
        let taken: u8 = self
            .guarded(self.timeout, self.backend.run(&invocation))
            .await?;
        if taken == 0 {
            lease.taken = false;
            return Ok(None);
        }
        self.held_leases()
            .insert((lease.key.clone(), lease.id.clone()));
        Ok(Some(Box::new(lease)))
    }

    fn held_leases(&self) -> MutexGuard<'_, HashSet<(Arc<str>, Arc<str>)>> {
        self.leases.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Renews every lease this host holds, one script per client and tier,
    /// all at once; a failure leaves the lease to expire on its own.
    async fn renew(&self) {
        let mut by_key: std::collections::HashMap<Arc<str>, Vec<Arc<str>>> =
            std::collections::HashMap::new();
        for (key, id) in self.held_leases().iter() {
            by_key.entry(key.clone()).or_default().push(id.clone());
        }
        let calls = by_key.into_iter().map(|(key, ids)| async move {
            let mut invocation = self.renew.key(&*key);
            invocation.arg(self.lease_ms);
            for id in &ids {
                invocation.arg(&**id);
            }
            let renewed: RedisResult<u64> = self.backend.run(&invocation).await;
            if let Err(e) = renewed {
                tracing::debug!(error = %e, "renewing in-flight leases failed");
            }
        });
        let all = futures_util::future::join_all(calls);
        let _ = tokio::time::timeout(Duration::from_millis(self.lease_ms / 3), all).await;
    }
}

/// A slot held in Redis: given back (`ZREM`, off the response path) when
/// dropped; if that fails, the lease expires once no longer renewed.
struct RedisLease {
    inner: Arc<Inner>,
    key: Arc<str>,
    id: Arc<str>,
    /// Whether the set may hold it (not when the script said all were held).
    taken: bool,
}

impl Drop for RedisLease {
    fn drop(&mut self) {
        if !self.taken {
            return;
        }
        let held = (self.key.clone(), self.id.clone());
        self.inner.held_leases().remove(&held);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let inner = self.inner.clone();
        runtime.spawn(async move {
            let mut remove = redis::cmd("ZREM");
            remove.arg(&*held.0).arg(&*held.1);
            let sent = inner.backend.query::<u8>(&remove);
            if let Ok(Err(e)) = tokio::time::timeout(inner.timeout, sent).await {
                tracing::debug!(error = %e, "giving back an in-flight lease failed");
            }
        });
    }
}

/// A process-unique lease id prefix: leases of agents that share a store
/// never collide.
fn lease_host() -> String {
    let seed = std::collections::hash_map::RandomState::new();
    format!(
        "{:016x}",
        seed.hash_one((std::process::id(), std::time::SystemTime::now()))
    )
}

/// The Redis key of a client's in-flight leases in a tier; hash-tagged
/// whole, like buckets.
#[must_use]
pub fn lease_key(prefix: &str, tier: &str, identity: &Identity) -> String {
    bucket_key(prefix, &format!("{tier}|in-flight"), identity)
}

impl Store for RedisStore {
    fn decide<'a>(&'a self, ask: Ask<'a>, now_ms: u64) -> StoreFuture<'a> {
        Box::pin(self.inner.decide(ask, now_ms))
    }

    fn settle<'a>(&'a self, settle: Settle<'a>, now_ms: u64) -> StoreFuture<'a> {
        Box::pin(self.inner.settle(settle, now_ms))
    }

    fn acquire<'a>(&'a self, ask: LeaseAsk<'a>) -> LeaseFuture<'a> {
        Box::pin(self.inner.acquire(ask))
    }

    /// Drops expired over-limit entries and, while the breaker is open, sends
    /// the probe that brings the store back without waiting for traffic.
    fn reclaim(&self, now_ms: u64) {
        self.inner.over_limit.reclaim(now_ms);
        let renewed = self.inner.renewed_ms.load(Ordering::Relaxed);
        if now_ms.saturating_sub(renewed) >= self.inner.lease_ms / 3
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            self.inner.renewed_ms.store(now_ms, Ordering::Relaxed);
            let inner = self.inner.clone();
            runtime.spawn(async move { inner.renew().await });
        }
        if !self.inner.breaker().is_closed()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let inner = self.inner.clone();
            runtime.spawn(async move { inner.probe().await });
        }
    }

    fn healthy(&self) -> bool {
        self.inner.breaker().is_closed()
    }

    /// One `EXISTS` within the call timeout; `false` while the breaker is open
    /// (then the key is charged to its address, the safe side).
    fn key_verified<'a>(&'a self, tier: &'a str, key: &'a str) -> VerifiedFuture<'a> {
        Box::pin(async move {
            if !self.inner.breaker().is_closed() {
                return false;
            }
            let mut exists = redis::cmd("EXISTS");
            exists.arg(verified_key(&self.inner.prefix, tier, key));
            let asked = self.inner.backend.query::<u8>(&exists);
            matches!(
                tokio::time::timeout(self.inner.timeout, asked).await,
                Ok(Ok(1))
            )
        })
    }

    fn share_verification(&self, tier: &str, key: &str, ttl: Option<Duration>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if !self.inner.breaker().is_closed() {
            return;
        }
        let name = verified_key(&self.inner.prefix, tier, key);
        let command = if let Some(ttl) = ttl {
            let mut set = redis::cmd("SET");
            set.arg(name)
                .arg(1)
                .arg("PX")
                .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1));
            set
        } else {
            let mut del = redis::cmd("DEL");
            del.arg(name);
            del
        };
        let inner = self.inner.clone();
        runtime.spawn(async move {
            let sent = inner.backend.query::<()>(&command);
            if let Ok(Err(e)) = tokio::time::timeout(inner.timeout, sent).await {
                tracing::debug!(error = %e, "sharing a key verification failed");
            }
        });
    }

    fn local_buckets(&self) -> usize {
        self.inner.over_limit.len()
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use super::*;

    #[test]
    fn keys_are_host_independent_and_hash_tagged_whole() {
        let ip = Identity::Ip(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)));
        assert_eq!(
            bucket_key("limiter:", "/api/chat|60000", &ip),
            "limiter:{/api/chat|60000|ip:192.0.2.7}"
        );
        let v6 = Identity::Ip(IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 2, 0, 0, 0, 0)));
        assert_eq!(
            bucket_key("x:", "/api/chat|60000", &v6),
            "x:{/api/chat|60000|ip:2001:db8:1:2::}"
        );
        let key = Identity::Key("ab".repeat(32));
        let built = bucket_key("limiter:", "/api/v1/media/*|60000", &key);
        assert_eq!(
            built,
            format!("limiter:{{/api/v1/media/*|60000|k:{}}}", "ab".repeat(32))
        );
        // The hash tag is everything between the first `{` and the next `}`:
        // the tier and the identity, so each bucket hashes to one slot.
        let tag = &built[built.find('{').unwrap() + 1..built.find('}').unwrap()];
        assert_eq!(tag, format!("/api/v1/media/*|60000|k:{}", "ab".repeat(32)));
        // Different windows of one route are different buckets.
        assert_ne!(
            bucket_key("limiter:", "/api/chat|60000", &ip),
            bucket_key("limiter:", "/api/chat|10000", &ip)
        );
    }
}
