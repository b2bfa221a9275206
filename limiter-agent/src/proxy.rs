//! The request path: canonicalise, route to a tier, decide, then either answer
//! 429 or forward to the upstream with bodies streamed both ways.

use std::{
    collections::hash_map::RandomState,
    net::{IpAddr, SocketAddr},
    sync::{Arc, atomic::AtomicU64},
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;

mod charge;
mod descriptors;
mod forward;
mod head;
mod in_flight;
mod keys;
mod limited;
mod pool;
mod respond;
mod runtime;
mod state;
mod tokens;
mod upstream;
mod wire;

use self::{
    charge::{Charge, Charged},
    forward::Outgoing,
    in_flight::InFlightCaps,
    respond::too_many,
    state::TierState,
};
pub use self::{
    descriptors::{Answer, Verdict},
    forward::Relayed,
    head::{Head, Served, Standing, TooMany},
    in_flight::Slots,
    respond::{error, json_response},
    runtime::{BanList, Runtime, RuntimeOverride, unix_ms},
    state::State,
    upstream::Upstreams,
};
use crate::{
    config::{Config, ConfigError},
    fields::Fields,
    identity::{Identity, IdentityError, Requester},
    limit::{Clock, Decision, LapsingSet, MemoryStore, Store},
    metrics::Metrics,
    offenders::Offenders,
    route::canonical,
    smuggling,
};

/// Response bodies: upstream bodies streamed through, or small local ones.
pub type Body = BoxBody<Bytes, BoxError>;
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Told about every rejected request, to escalate sources that keep hammering.
pub trait RejectionSink: Send + Sync + 'static {
    /// `decision.rejected` counts this bucket's rejections in its window so far.
    /// `tier` names the tier (its route).
    fn rejected(
        &self,
        peer: IpAddr,
        identity: &Identity,
        decision: &Decision,
        window_ms: u64,
        tier: &str,
    );
}

/// Everything a request needs, shared by all connections. The config half is
/// swapped whole on reload; the store, client and metrics live across reloads.
pub struct Proxy {
    state: ArcSwap<State>,
    /// Runtime overrides and the bans the proxy enforces (the fleet's).
    runtime: ArcSwap<Runtime>,
    store: Arc<dyn Store>,
    /// Decides when a shared store fails and `on_error = "allow"` (the
    /// setting is read per request, so a reload may change it).
    fallback: Option<Arc<MemoryStore>>,
    /// (key, tier) pairs whose key the upstream has accepted.
    verified: LapsingSet,
    /// Tiers the upstream has been seen authenticating (a 401/403 within
    /// `verified_key_ttl`); apart from `verified`, so marks never evict keys.
    authenticating: LapsingSet,
    /// When the last "store full" warning was logged (ms), to log at most every 10 s.
    full_logged: AtomicU64,
    clock: Arc<dyn Clock>,
    /// Upstream connections.
    upstreams: Arc<Upstreams>,
    /// Requests in flight to the upstream, per client address and in all.
    in_flight: InFlightCaps,
    /// KiB of request bodies held whole to read their cost, in all
    /// (`limited::MAX_BUFFERED_BYTES`).
    buffered: Arc<tokio::sync::Semaphore>,
    /// Keys the bucket hash so clients cannot aim for collisions. Fixed for the
    /// process, so a reload keeps the buckets of unchanged tiers.
    hasher: RandomState,
    metrics: Metrics,
    rejections: Option<Arc<dyn RejectionSink>>,
    /// Clients rejected in their current windows, for the dashboard.
    offenders: Offenders,
}

/// Where [`Proxy::route`] sends a request.
enum Routed {
    Refused(Box<Response<Body>>),
    /// On no tier: forwarded, holding its in-flight slots.
    Unlimited(Slots),
    /// On the tier of this index, from this client.
    Limited(usize, Requester),
}

/// Connection facts the request path needs.
#[derive(Clone, Debug)]
pub struct Peer {
    pub addr: SocketAddr,
    pub tls: bool,
    /// The address as appended to `X-Forwarded-For`, rendered once per
    /// connection.
    forwarded_for: http::HeaderValue,
}

impl Peer {
    #[must_use]
    pub fn new(addr: SocketAddr, tls: bool) -> Self {
        let ip = addr.ip().to_canonical().to_string();
        Self {
            addr,
            tls,
            // An address's text is always a valid header value.
            forwarded_for: http::HeaderValue::try_from(ip)
                .unwrap_or_else(|_| http::HeaderValue::from_static("unknown")),
        }
    }
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
            Some(shared) => (
                shared,
                Some(Arc::new(MemoryStore::new(state.config.startup.max_buckets))),
            ),
            None => (
                Arc::new(MemoryStore::new(state.config.startup.max_buckets)) as Arc<dyn Store>,
                None,
            ),
        };
        let ttl_ms =
            u64::try_from(state.config.startup.verified_key_ttl.as_millis()).unwrap_or(u64::MAX);
        let verified = LapsingSet::new(state.config.startup.verified_keys_max, ttl_ms);
        // One entry per tier; tiers come and go with reloads.
        let authenticating = LapsingSet::new(4096, ttl_ms);
        let startup = state.config.startup.clone();
        Ok(Self {
            state: ArcSwap::from_pointee(state),
            runtime: ArcSwap::from_pointee(Runtime::default()),
            store,
            fallback,
            verified,
            authenticating,
            full_logged: AtomicU64::new(0),
            clock,
            upstreams: Arc::new(Upstreams::new(startup.max_upstream_connections)),
            in_flight: InFlightCaps::new(startup.max_requests_in_flight),
            buffered: Arc::new(tokio::sync::Semaphore::new(
                limited::MAX_BUFFERED_BYTES / 1024,
            )),
            hasher,
            metrics,
            rejections: None,
            offenders: Offenders::default(),
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

    /// Clients rejected in their current windows (the dashboard's board).
    #[must_use]
    pub fn offenders(&self) -> &Offenders {
        &self.offenders
    }

    /// Both clocks read now, for the reset times told to clients.
    #[must_use]
    pub fn clock_now(&self) -> crate::limit::Now {
        self.clock.now()
    }

    /// The decisions' clock, monotonic milliseconds.
    #[must_use]
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// Validates and builds a config's state without putting it in force, so a
    /// reload can check every other part (the kernel) before switching. Routes,
    /// tiers, identity rules, overrides and the upstream change at once;
    /// buckets of tiers with the same route and window keep their counts.
    pub fn prepare(&self, config: Config) -> Result<State, ConfigError> {
        State::new(config, &self.hasher, &self.metrics)
    }

    /// The runtime overrides and bans in force.
    #[must_use]
    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.load_full()
    }

    /// Puts runtime overrides and bans in force for every request that
    /// starts from now.
    pub fn set_runtime(&self, runtime: Runtime) {
        self.runtime.store(Arc::new(runtime));
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
        self.authenticating.reclaim(now);
        self.metrics
            .buckets
            .set(i64::try_from(buckets).unwrap_or(i64::MAX));
        self.metrics
            .store_healthy
            .set(i64::from(self.store.healthy()));
        let state = self.state.load();
        self.upstreams.sweep(forward::connect_to(&state));
        self.metrics
            .upstream_idle
            .set(i64::try_from(self.upstreams.idle()).unwrap_or(i64::MAX));
        self.metrics
            .upstream_open
            .set(i64::try_from(self.upstreams.open()).unwrap_or(i64::MAX));
    }

    /// Serves one request: the answer, and the in-flight slots a forwarded
    /// request holds until its answer is sent.
    pub async fn handle(
        &self,
        req: Request<Incoming>,
        peer: &Peer,
    ) -> (Response<Body>, Option<Slots>) {
        let state = self.state.load_full();
        // The framing rules the front end applies to what it reads, for
        // what hyper parsed: no head passes one reader and not the other.
        if let Err(refused) =
            smuggling::framing(req.version() == http::Version::HTTP_10, req.headers())
        {
            self.metrics.refuse("framing");
            return (
                error(StatusCode::BAD_REQUEST, "BAD_REQUEST", &refused.to_string()),
                None,
            );
        }
        let target = req.uri().path_and_query().map_or_else(
            || std::borrow::Cow::Owned(req.uri().to_string()),
            |pq| std::borrow::Cow::Borrowed(pq.as_str()),
        );
        match self.route(&state, req.headers(), &target, peer) {
            Routed::Refused(refused) => (*refused, None),
            Routed::Unlimited(slots) => (
                // Boxed: unlimited paths are the rare case, and the service's
                // future, moved whole on every request, holds one path's.
                Box::pin(self.forward(&state, Outgoing::Streamed(req), peer)).await,
                Some(slots),
            ),
            Routed::Limited(tier_index, client) => {
                self.limited(&state, req, peer, tier_index, client).await
            }
        }
    }

    /// Where a request goes, from its target and header fields (its framing
    /// already checked), before any store is asked: refused (banned, a path
    /// or an identity that can't be read), forwarded on no tier (its
    /// in-flight slots taken), or on to its tier as the client it resolved
    /// to.
    fn route<F: Fields>(&self, state: &State, fields: &F, target: &str, peer: &Peer) -> Routed {
        if let Some(refused) = self.banned(state, fields, peer) {
            return Routed::Refused(Box::new(refused));
        }
        let canonical = match canonical(target, state.config.live.path_policy) {
            Ok(path) => path,
            Err(e) => {
                self.metrics.refuse("path");
                return Routed::Refused(Box::new(error(
                    StatusCode::BAD_REQUEST,
                    "BAD_REQUEST",
                    &e.to_string(),
                )));
            }
        };
        let Some(tier_index) = state.routes.lookup(&canonical) else {
            // No tier, no identity to settle: the address a malformed
            // forwarding header hides is the peer's own.
            let source = state
                .identity
                .client_ip(fields, peer.addr.ip())
                .unwrap_or_else(|_| peer.addr.ip().to_canonical());
            return match self.admit(state, state.identity.group(source)) {
                Ok(slots) => {
                    state.unlimited.inc();
                    Routed::Unlimited(slots)
                }
                Err(refused) => Routed::Refused(refused),
            };
        };
        match state.identity.resolve(fields, peer.addr.ip()) {
            Ok(client) => Routed::Limited(tier_index, client),
            Err(e) => {
                self.metrics.refuse(match e {
                    IdentityError::BadClientAddress(_) => "client_address",
                    IdentityError::ConflictingKeys
                    | IdentityError::MalformedKey(_)
                    | IdentityError::Underscored(_) => "api_key",
                });
                Routed::Refused(Box::new(error(
                    StatusCode::BAD_REQUEST,
                    "BAD_IDENTITY",
                    &e.to_string(),
                )))
            }
        }
    }

    /// The answer to a banned client, before any other work: the TCP peer,
    /// or behind a trusted proxy the client it names. The kernel drops
    /// banned peers before they get here, unless XDP is off.
    fn banned<F: Fields>(&self, state: &State, fields: &F, peer: &Peer) -> Option<Response<Body>> {
        let runtime = self.runtime.load();
        if runtime.bans.is_empty() {
            return None;
        }
        let peer_ip = peer.addr.ip().to_canonical();
        let left = runtime.bans.left_ms(peer_ip).or_else(|| {
            if !state.identity.is_trusted_peer(peer_ip) {
                return None;
            }
            let client = state.identity.client_ip(fields, peer_ip).ok()?;
            runtime.bans.left_ms(client)
        })?;
        self.metrics.refuse("banned");
        let mut response = error(
            StatusCode::FORBIDDEN,
            "BANNED",
            "This client is banned for ignoring rate limits; retry after the time in Retry-After.",
        );
        response.headers_mut().insert(
            header::RETRY_AFTER,
            http::HeaderValue::from(left.div_ceil(1000)),
        );
        Some(response)
    }

    /// The in-flight slots of a request from `source` (the grouped client
    /// address), or the 503 that refuses it.
    fn admit(&self, state: &State, source: IpAddr) -> Result<Slots, Box<Response<Body>>> {
        self.in_flight
            .admit(source, state.config.live.max_requests_in_flight_per_source)
            .map_err(|refused| {
                self.metrics.refuse(refused.setting());
                Box::new(error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "OVERLOADED",
                    match refused {
                        in_flight::Refused::PerSource => {
                            "Too many requests in flight from this address; try again later."
                        }
                        in_flight::Refused::Total => {
                            "Too many requests in flight; try again later."
                        }
                    },
                ))
            })
    }
}
