//! The request path: canonicalise, route to a tier, decide, then either answer
//! 429 or forward to the upstream with bodies streamed both ways.

use std::{
    collections::hash_map::RandomState,
    hash::{BuildHasher, Hash, Hasher},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use prometheus_client::metrics::counter::Counter;

use crate::{
    body::{ClientBody, ClientBodyError, client_fault},
    config::{Config, ConfigError, KeyVerification, OnError},
    headers,
    identity::{Identity, IdentityError, IdentityResolver, Requester},
    limit::{
        Ask, BucketKey, Clock, Decision, MemoryStore, Now, Store, StoreError, StoreFull,
        VerifiedKeys,
    },
    metrics::Metrics,
    route::{RouteTable, canonicalize},
};

/// Response bodies: upstream bodies streamed through, or small local ones.
pub type Body = BoxBody<Bytes, BoxError>;
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Told about every rejected request, to escalate sources that keep hammering.
pub trait RejectionSink: Send + Sync + 'static {
    /// `decision.rejected` counts this bucket's rejections in its window so far.
    fn rejected(&self, peer: IpAddr, identity: &Identity, decision: &Decision, window_ms: u64);
}

/// Everything a request needs, shared by all connections. The config half is
/// swapped whole on reload; the store, client and metrics live across reloads.
pub struct Proxy {
    state: ArcSwap<State>,
    store: Arc<dyn Store>,
    /// Decides when a shared store fails and `on_error = "allow"` (the
    /// setting is read per request, so a reload may change it).
    fallback: Option<MemoryStore>,
    /// (key, tier) pairs whose key the upstream has accepted.
    verified: VerifiedKeys,
    /// When the last "store full" warning was logged (ms), to log at most every 10 s.
    full_logged: AtomicU64,
    clock: Arc<dyn Clock>,
    client: Client<HttpConnector, ClientBody>,
    /// Keys the bucket hash so clients cannot aim for collisions. Fixed for the
    /// process, so a reload keeps the buckets of unchanged tiers.
    hasher: RandomState,
    metrics: Metrics,
    rejections: Option<Arc<dyn RejectionSink>>,
}

/// The part of the proxy a reload replaces, validated as a whole.
pub struct State {
    pub config: Config,
    routes: RouteTable,
    identity: IdentityResolver,
    tiers: Vec<TierState>,
    unlimited: Counter,
}

/// A tier ready for the hot path.
struct TierState {
    /// Route and window: the same on every host and across reloads.
    id: String,
    /// Keyed hash of `id`, mixed into bucket keys.
    hash: u64,
    window_ms: u64,
    allowed: Counter,
    rejected: Counter,
    store_error: Counter,
}

/// What the upstream's answer may teach about the request's key.
enum KeyCheck {
    /// No key, or one whose standing does not depend on the upstream.
    None,
    /// Charged to the address; a 2xx/3xx verifies it. (entry, key hash)
    Unverified(u64, String),
    /// Its own bucket; a 401/403 revokes it. (entry, key hash)
    Verified(u64, String),
}

/// Connection facts the request path needs.
#[derive(Clone, Copy, Debug)]
pub struct Peer {
    pub addr: SocketAddr,
    pub tls: bool,
}

impl Proxy {
    /// A proxy deciding in `store` (the in-memory store when `None`).
    pub fn new(
        config: Config,
        clock: Arc<dyn Clock>,
        store: Option<Arc<dyn Store>>,
        metrics: Metrics,
    ) -> Result<Self, ConfigError> {
        let hasher = RandomState::new();
        let state = State::new(config, &hasher, &metrics)?;
        let (store, fallback) = match store {
            // Allocated lazily: empty until the shared store first fails.
            Some(shared) => (shared, Some(MemoryStore::new(state.config.max_buckets))),
            None => (
                Arc::new(MemoryStore::new(state.config.max_buckets)) as Arc<dyn Store>,
                None,
            ),
        };
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_mins(1))
            .build(connector);
        let verified = VerifiedKeys::new(
            state.config.verified_keys_max,
            u64::try_from(state.config.verified_key_ttl.as_millis()).unwrap_or(u64::MAX),
        );
        Ok(Self {
            state: ArcSwap::from_pointee(state),
            store,
            fallback,
            verified,
            full_logged: AtomicU64::new(0),
            clock,
            client,
            hasher,
            metrics,
            rejections: None,
        })
    }

    /// Reports rejections to `sink` (kernel escalation).
    #[must_use]
    pub fn with_rejection_sink(mut self, sink: Arc<dyn RejectionSink>) -> Self {
        self.rejections = Some(sink);
        self
    }

    /// The config in force now.
    #[must_use]
    pub fn state(&self) -> Arc<State> {
        self.state.load_full()
    }

    #[must_use]
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Swaps in a new config: routes, tiers, identity rules, overrides and the
    /// upstream change at once; buckets of tiers with the same route and window
    /// keep their counts. Listener, TLS and store settings need a restart.
    pub fn reload(&self, config: Config) -> Result<(), ConfigError> {
        self.install(self.prepare(config)?);
        Ok(())
    }

    /// Validates and builds a config's state without putting it in force, so a
    /// reload can check every other part (the kernel) before switching.
    pub fn prepare(&self, config: Config) -> Result<State, ConfigError> {
        State::new(config, &self.hasher, &self.metrics)
    }

    /// Puts a prepared config in force for every request that starts from now.
    pub fn install(&self, state: State) {
        self.state.store(Arc::new(state));
    }

    /// Reclaims expired buckets and refreshes the store gauges (every second).
    pub fn housekeeping(&self) {
        let now = self.clock.now_ms();
        self.store.reclaim(now);
        let mut buckets = self.store.local_buckets();
        if let Some(fallback) = &self.fallback {
            fallback.reclaim(now);
            buckets += fallback.len();
        }
        self.verified.reclaim(now);
        self.metrics
            .buckets
            .set(i64::try_from(buckets).unwrap_or(i64::MAX));
        self.metrics
            .store_healthy
            .set(i64::from(self.store.healthy()));
    }

    /// Serves one request.
    pub async fn handle(&self, req: Request<Incoming>, peer: Peer) -> Response<Body> {
        let state = self.state.load_full();
        // Both framings at once is how requests get smuggled past a proxy
        // (RFC 9112 §6.1 allows rejecting it): refuse rather than pick one.
        if req.headers().contains_key(header::TRANSFER_ENCODING)
            && req.headers().contains_key(header::CONTENT_LENGTH)
        {
            return error(
                StatusCode::BAD_REQUEST,
                "BAD_REQUEST",
                "Content-Length and Transfer-Encoding together are ambiguous.",
            );
        }
        let target = req
            .uri()
            .path_and_query()
            .map_or_else(|| req.uri().to_string(), |pq| pq.as_str().to_owned());
        let canonical = match canonicalize(&target, state.config.path_policy) {
            Ok(path) => path,
            Err(e) => {
                self.metrics.refuse("path");
                return error(StatusCode::BAD_REQUEST, "BAD_REQUEST", &e.to_string());
            }
        };
        let Some(tier_index) = state.routes.lookup(&canonical) else {
            state.unlimited.inc();
            return self.forward(&state, req, peer).await;
        };
        let started = Instant::now();
        let client = match state.identity.resolve(req.headers(), peer.addr.ip()) {
            Ok(client) => client,
            Err(e) => {
                self.metrics.refuse(match e {
                    IdentityError::BadClientAddress(_) => "client_address",
                    IdentityError::ConflictingKeys | IdentityError::MalformedKey(_) => "api_key",
                });
                return error(StatusCode::BAD_REQUEST, "BAD_IDENTITY", &e.to_string());
            }
        };
        let tier = &state.tiers[tier_index];
        let now_ms = self.clock.now_ms();
        let (identity, check) = self.identify(&state, client, tier, now_ms).await;
        let ask = Ask {
            key: self.bucket(&identity, tier.hash),
            tier: &tier.id,
            identity: &identity,
            limit: state.effective_limit(&identity, tier_index),
            window_ms: tier.window_ms,
        };
        let decision = match self.store.decide(ask, now_ms).await {
            Ok(decision) => Ok(decision),
            Err(StoreError::Full) => Err(StoreFull),
            Err(e) => {
                self.metrics.store_errors.inc();
                tracing::debug!(error = %e, "store failed");
                match &self.fallback {
                    Some(fallback) if state.config.on_error == OnError::Allow => {
                        fallback.decide(ask.key, ask.limit, ask.window_ms, now_ms)
                    }
                    _ => {
                        tier.store_error.inc();
                        return error(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "STORE_UNAVAILABLE",
                            "The rate-limit store is unavailable; try again later.",
                        );
                    }
                }
            }
        };
        self.metrics
            .decision_seconds
            .observe(started.elapsed().as_secs_f64());
        let Ok(decision) = decision else {
            return self.store_full(tier);
        };
        if !decision.allowed {
            tier.rejected.inc();
            if let Some(sink) = &self.rejections {
                sink.rejected(peer.addr.ip(), &identity, &decision, tier.window_ms);
            }
            let now = self.clock.now();
            return too_many(&decision, tier.window_ms, now, state.config.ietf_headers);
        }
        tier.allowed.inc();
        let mut response = self.forward(&state, req, peer).await;
        self.learn(&state, tier, check, response.status());
        // Both clocks read as the answer leaves: the reset is told as the wall
        // clock now plus the monotonic time left (the upstream took some of it).
        headers::apply(
            response.headers_mut(),
            &decision,
            tier.window_ms,
            self.clock.now(),
            state.config.ietf_headers,
        );
        response
    }

    /// The bucket identity: a verified key (or any key with `verify_keys =
    /// "none"`) is its own bucket; an unverified key is charged to the client
    /// address, so random keys cannot mint quota. Verification is per tier:
    /// an endpoint that accepts any key (a health check) verifies nothing for
    /// the others.
    async fn identify(
        &self,
        state: &State,
        client: Requester,
        tier: &TierState,
        now_ms: u64,
    ) -> (Identity, KeyCheck) {
        let Some(key) = client.key else {
            return (Identity::Ip(client.ip), KeyCheck::None);
        };
        match state.config.verify_keys {
            KeyVerification::Off => return (Identity::Key(key), KeyCheck::None),
            _ if state.config.keys.contains_key(&key) => {
                return (Identity::Key(key), KeyCheck::None);
            }
            KeyVerification::Config => return (Identity::Ip(client.ip), KeyCheck::None),
            KeyVerification::Upstream => {}
        }
        let entry = self.hasher.hash_one((&key, tier.hash));
        let verified = self.verified.contains(entry, now_ms) || {
            let shared = self.store.key_verified(&tier.id, &key).await;
            if shared {
                self.verified.insert(entry, now_ms);
            }
            shared
        };
        if verified {
            (Identity::Key(key.clone()), KeyCheck::Verified(entry, key))
        } else {
            (Identity::Ip(client.ip), KeyCheck::Unverified(entry, key))
        }
    }

    /// What the upstream's answer says about the request's key: a 2xx or 3xx
    /// verifies it for this tier; 401 or 403 revokes a verification. Other
    /// answers (404, 400, 429…) may come before authentication and say nothing.
    fn learn(&self, state: &State, tier: &TierState, check: KeyCheck, status: StatusCode) {
        let accepted = status.is_success() || status.is_redirection();
        let refused = matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN);
        match check {
            KeyCheck::Unverified(entry, key) if accepted => {
                self.verified.insert(entry, self.clock.now_ms());
                self.store
                    .share_verification(&tier.id, &key, Some(state.config.verified_key_ttl));
            }
            KeyCheck::Verified(entry, key) if refused => {
                self.verified.remove(entry);
                self.store.share_verification(&tier.id, &key, None);
            }
            _ => {}
        }
    }

    /// 503 for a new client when every bucket slot holds a live window: the
    /// store never forgets a window that has counted requests to make room.
    fn store_full(&self, tier: &TierState) -> Response<Body> {
        self.metrics.refuse("store_full");
        tier.store_error.inc();
        let now = self.clock.now_ms();
        let last = self.full_logged.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 10_000
            && self
                .full_logged
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                max_buckets = self.state().config.max_buckets,
                "bucket store full of live windows: new clients answered 503 (raise [store] max_buckets)"
            );
        }
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "STORE_FULL",
            "The rate limiter is at capacity; try again later.",
        )
    }

    fn bucket(&self, identity: &Identity, tier_hash: u64) -> BucketKey {
        let mut h = self.hasher.build_hasher();
        identity.hash(&mut h);
        tier_hash.hash(&mut h);
        BucketKey(h.finish())
    }

    /// Forwards to the upstream; 502 when it can't be reached, 504 when it
    /// doesn't answer in time. The body streams in both directions.
    async fn forward(&self, state: &State, req: Request<Incoming>, peer: Peer) -> Response<Body> {
        let (mut parts, body) = req.into_parts();
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", http::uri::PathAndQuery::as_str);
        let mut uri = Uri::builder()
            .scheme("http")
            .authority(
                state
                    .config
                    .upstream
                    .authority()
                    .map_or("127.0.0.1", http::uri::Authority::as_str),
            )
            .path_and_query(path);
        if let Ok(built) = std::mem::take(&mut uri).build() {
            parts.uri = built;
        } else {
            return error(
                StatusCode::BAD_REQUEST,
                "BAD_REQUEST",
                "invalid request target",
            );
        }
        // HTTP/2 clients send :authority; the upstream speaks HTTP/1.1 and needs Host.
        if !parts.headers.contains_key(header::HOST)
            && let Some(authority) = parts.uri.authority()
            && let Ok(value) = HeaderValue::from_str(authority.as_str())
        {
            parts.headers.insert(header::HOST, value);
        }
        parts.version = http::Version::HTTP_11;
        strip_hop_by_hop(&mut parts.headers);
        append_forwarded(&mut parts.headers, peer);
        let request =
            Request::from_parts(parts, ClientBody::new(body, state.config.body_read_timeout));
        let started = Instant::now();
        let result =
            tokio::time::timeout(state.config.upstream_timeout, self.client.request(request)).await;
        self.metrics
            .upstream_seconds
            .observe(started.elapsed().as_secs_f64());
        match result {
            Err(_) => error(
                StatusCode::GATEWAY_TIMEOUT,
                "UPSTREAM_TIMEOUT",
                "The upstream did not answer in time.",
            ),
            Ok(Err(e)) => match client_fault(&e) {
                Some(ClientBodyError::Stalled(_)) => error(
                    StatusCode::REQUEST_TIMEOUT,
                    "REQUEST_TIMEOUT",
                    "The request body took too long.",
                ),
                Some(ClientBodyError::Malformed(_)) => error(
                    StatusCode::BAD_REQUEST,
                    "BAD_REQUEST",
                    "The request body is malformed.",
                ),
                None => {
                    tracing::warn!(error = %e, "upstream request failed");
                    error(
                        StatusCode::BAD_GATEWAY,
                        "UPSTREAM_UNAVAILABLE",
                        "The upstream could not be reached.",
                    )
                }
            },
            Ok(Ok(response)) => {
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, body.map_err(Into::into).boxed())
            }
        }
    }
}

impl State {
    /// The identity rules in force (the listener asks which peers are proxies).
    #[must_use]
    pub fn identity(&self) -> &IdentityResolver {
        &self.identity
    }

    fn new(config: Config, hasher: &RandomState, metrics: &Metrics) -> Result<Self, ConfigError> {
        let routes = config.route_table()?;
        let identity = IdentityResolver::new(
            config.api_key_headers.clone(),
            config.client_ip_header.clone(),
            config.trusted_proxies.clone(),
            config.ipv6_prefix,
        );
        let tiers = config
            .tiers
            .iter()
            .map(|tier| {
                let window_ms = u64::try_from(tier.window.as_millis()).unwrap_or(u64::MAX);
                let id = format!("{}|{window_ms}", tier.route);
                TierState {
                    hash: hasher.hash_one(&id),
                    id,
                    window_ms,
                    allowed: metrics.request_counter(&tier.route, "allowed"),
                    rejected: metrics.request_counter(&tier.route, "rejected"),
                    store_error: metrics.request_counter(&tier.route, "store_error"),
                }
            })
            .collect();
        Ok(Self {
            unlimited: metrics.request_counter("none", "unlimited"),
            config,
            routes,
            identity,
            tiers,
        })
    }

    /// The tier's limit, or the key's override of it.
    fn effective_limit(&self, identity: &Identity, tier: usize) -> u32 {
        let base = self.config.tiers[tier].limit.get();
        let Identity::Key(hash) = identity else {
            return base;
        };
        let Some(o) = self.config.keys.get(hash) else {
            return base;
        };
        if let Some(limit) = o.limits.get(&tier) {
            return limit.get();
        }
        o.multiplier.map_or(base, |m| {
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "clamped to 1..=u32::MAX before the cast"
            )]
            let scaled = (f64::from(base) * m)
                .round()
                .clamp(1.0, f64::from(u32::MAX)) as u32;
            scaled
        })
    }
}

/// The 429: the exact body, `Retry-After` and the limit headers, stamped with
/// both clocks read at answer time (`now`).
fn too_many(decision: &Decision, window_ms: u64, now: Now, ietf: bool) -> Response<Body> {
    let retry = headers::retry_after_secs(decision, now);
    let mut response = json_response(
        StatusCode::TOO_MANY_REQUESTS,
        headers::too_many_requests_body(retry),
    );
    headers::apply(response.headers_mut(), decision, window_ms, now, ietf);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry));
    response
}

/// Headers that describe one hop and must not be forwarded (RFC 9110 §7.6.1),
/// plus every header the `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

/// Appends the peer to `X-Forwarded-For` and sets `X-Forwarded-Proto`.
fn append_forwarded(headers: &mut HeaderMap, peer: Peer) {
    let ip = peer.addr.ip().to_canonical().to_string();
    let value = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(existing) => format!("{existing}, {ip}"),
        None => ip,
    };
    if let Ok(value) = HeaderValue::from_str(&value) {
        headers.insert("x-forwarded-for", value);
    }
    headers.insert(
        "x-forwarded-proto",
        HeaderValue::from_static(if peer.tls { "https" } else { "http" }),
    );
}

/// A small JSON response.
#[must_use]
pub fn json_response(status: StatusCode, body: String) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// A JSON error response: `{"error":{"code":…,"message":…}}`.
#[must_use]
pub fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    json_response(status, headers::error_body(code, message))
}
