//! The shared store for several hosts: Redis, Valkey or Redis Cluster, one
//! server-side script (one round trip) per decision, a local cache of buckets
//! known to be over their limit, and a circuit breaker around the connection.

mod breaker;
mod over_limit;

use std::{
    sync::{Arc, Mutex, MutexGuard},
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
use super::{Ask, Clock, Decision, Store, StoreError, StoreFuture, VerifiedFuture};
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
            .finish()
    }
}

/// One decision, atomically, on Redis's clock. `KEYS[1]`: the bucket;
/// `ARGV[1]`: the limit; `ARGV[2]`: the window in ms; `ARGV[3]`: the units the
/// request is worth, as `Bucket::admit` counts them: all if they fit (a
/// rejection of one unit consumes nothing), a charge of several that does not
/// fit exhausts the window (`SET … KEEPTTL`), 0 checks without counting. The
/// first hit starts the window (`PEXPIRE`), anchoring it at the client's first
/// request. Returns `{admitted (0|1), count, ms until reset}`.
const DECIDE_LUA: &str = r"
local limit = tonumber(ARGV[1])
local hits = tonumber(ARGV[3])
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
    return {1, count, tonumber(ARGV[2])}
  end
elseif hits > 1 and count < limit then
  if count == 0 then
    redis.call('SET', KEYS[1], limit, 'PX', ARGV[2])
    return {0, limit, tonumber(ARGV[2])}
  end
  redis.call('SET', KEYS[1], limit, 'KEEPTTL')
  count = limit
end
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  -- -1: a counter without expiry (written by something else); never let it live forever.
  if ttl == -1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
  ttl = tonumber(ARGV[2])
end
return {admitted, count, ttl}
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
enum Backend {
    Single(ConnectionManager),
    Cluster(Box<LazyCluster>),
}

struct LazyCluster {
    client: ClusterClient,
    /// Set once connected; the connection then follows the cluster's topology itself.
    connection: ArcSwapOption<ClusterConnection>,
    /// Serialises connection attempts.
    connecting: tokio::sync::Mutex<()>,
}

impl Backend {
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

    async fn decide(
        &self,
        script: &Script,
        key: &str,
        limit: u32,
        hits: u32,
        window_ms: u64,
    ) -> RedisResult<(u8, u64, u64)> {
        let mut invocation = script.key(key);
        invocation.arg(limit).arg(window_ms).arg(hits);
        match self {
            // Concurrent calls share one multiplexed connection: they are pipelined.
            Self::Single(manager) => invocation.invoke_async(&mut manager.clone()).await,
            Self::Cluster(cluster) => {
                let mut connection = Self::cluster(cluster).await?;
                invocation.invoke_async(&mut connection).await
            }
        }
    }

    async fn query<T: redis::FromRedisValue>(&self, command: &redis::Cmd) -> RedisResult<T> {
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
        let backend = if settings.cluster_nodes.is_empty() {
            let url = settings.url.as_deref().unwrap_or_default();
            let client = Client::open(url).map_err(backend_error)?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(connect_timeout))
                .set_response_timeout(Some(settings.timeout))
                .set_number_of_retries(2)
                .set_min_delay(Duration::from_millis(50))
                .set_max_delay(Duration::from_secs(1));
            Backend::Single(
                ConnectionManager::new_lazy_with_config(client, config).map_err(backend_error)?,
            )
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
                .build()
                .map_err(backend_error)?;
            Backend::Cluster(Box::new(LazyCluster {
                client,
                connection: ArcSwapOption::empty(),
                connecting: tokio::sync::Mutex::new(()),
            }))
        };
        Ok(Self {
            inner: Arc::new(Inner {
                backend,
                script: Script::new(DECIDE_LUA),
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
        if let Some(rejection) = self.over_limit.check(ask.key, ask.limit, now_ms) {
            return Ok(rejection);
        }
        let key = bucket_key(&self.prefix, ask.tier, ask.identity);
        let window_ms = ask.window_ms.max(1);
        let (admitted, count, ttl_ms) = self
            .guarded(
                self.timeout,
                self.backend
                    .decide(&self.script, &key, ask.limit, ask.hits, window_ms),
            )
            .await?;
        // Redis's clock ran the window; its TTL becomes a deadline on this host's
        // monotonic clock at answer time, off by the one-way latency (and never
        // earlier than the request). Neither clock is the wall clock: the Unix time
        // a client is told is worked out when the answer goes (`answers::apply`).
        let reset_ms = self
            .clock
            .now_ms()
            .max(now_ms)
            .saturating_add(ttl_ms.max(1));
        let count = u32::try_from(count).unwrap_or(u32::MAX);
        if admitted == 1 {
            return Ok(Decision {
                allowed: true,
                limit: ask.limit,
                remaining: ask.limit.saturating_sub(count),
                reset_ms,
                rejected: 0,
            });
        }
        // A rejection leaves the bucket full (a charge that did not fit
        // exhausts it), so it is over its limit for every request until its
        // reset; the check is kept for counters written by something else.
        let rejected = if count >= ask.limit {
            self.over_limit.insert(ask.key, ask.limit, reset_ms)
        } else {
            1
        };
        Ok(Decision {
            allowed: false,
            limit: ask.limit,
            remaining: 0,
            reset_ms,
            rejected,
        })
    }
}

impl Store for RedisStore {
    fn decide<'a>(&'a self, ask: Ask<'a>, now_ms: u64) -> StoreFuture<'a> {
        Box::pin(self.inner.decide(ask, now_ms))
    }

    /// Drops expired over-limit entries and, while the breaker is open, sends
    /// the probe that brings the store back without waiting for traffic.
    fn reclaim(&self, now_ms: u64) {
        self.inner.over_limit.reclaim(now_ms);
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
