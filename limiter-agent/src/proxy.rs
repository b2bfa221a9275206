//! The request path: canonicalise, route to a tier, decide, then either answer
//! 429 or forward to the upstream with bodies streamed both ways.

use std::{
    collections::hash_map::RandomState,
    hash::{BuildHasher, Hash, Hasher},
    net::SocketAddr,
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};

use crate::{
    config::Config,
    headers,
    identity::{Identity, IdentityResolver},
    limit::{BucketKey, Clock, Decision, MemoryStore},
    route::{RouteTable, canonicalize},
};

/// Response bodies: upstream bodies streamed through, or small local ones.
pub type Body = BoxBody<Bytes, BoxError>;
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Everything a request needs, shared by all connections.
pub struct Proxy {
    config: Config,
    routes: RouteTable,
    identity: IdentityResolver,
    store: MemoryStore,
    clock: Arc<dyn Clock>,
    client: Client<HttpConnector, Incoming>,
    /// Keys the bucket hash so clients cannot aim for collisions.
    hasher: RandomState,
}

/// Connection facts the request path needs.
#[derive(Clone, Copy, Debug)]
pub struct Peer {
    pub addr: SocketAddr,
    pub tls: bool,
}

impl Proxy {
    pub fn new(config: Config, clock: Arc<dyn Clock>) -> Result<Self, crate::config::ConfigError> {
        let routes = config.route_table()?;
        let identity = IdentityResolver::new(
            config.api_key_headers.clone(),
            config.trusted_proxies.clone(),
            config.ipv6_prefix,
        );
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_mins(1))
            .build(connector);
        Ok(Self {
            store: MemoryStore::new(config.max_buckets),
            config,
            routes,
            identity,
            clock,
            client,
            hasher: RandomState::new(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn store(&self) -> &MemoryStore {
        &self.store
    }

    /// Serves one request.
    pub async fn handle(&self, req: Request<Incoming>, peer: Peer) -> Response<Body> {
        let target = req
            .uri()
            .path_and_query()
            .map_or_else(|| req.uri().to_string(), |pq| pq.as_str().to_owned());
        let canonical = match canonicalize(&target, self.config.path_policy) {
            Ok(path) => path,
            Err(e) => return error(StatusCode::BAD_REQUEST, "BAD_REQUEST", &e.to_string()),
        };
        let Some(tier_index) = self.routes.lookup(&canonical) else {
            return self.forward(req, peer).await;
        };
        let identity = self.identity.resolve(req.headers(), peer.addr.ip());
        let tier = &self.config.tiers[tier_index];
        let limit = self.effective_limit(&identity, tier_index);
        let window_ms = u64::try_from(tier.window.as_millis()).unwrap_or(u64::MAX);
        let now_ms = self.clock.now_ms();
        let decision =
            self.store
                .decide(self.bucket(&identity, tier_index), limit, window_ms, now_ms);
        if !decision.allowed {
            tracing::debug!(tier = %tier.route, "rate limited");
            return self.too_many(&decision, window_ms, now_ms);
        }
        let mut response = self.forward(req, peer).await;
        headers::apply(
            response.headers_mut(),
            &decision,
            window_ms,
            now_ms,
            self.config.ietf_headers,
        );
        response
    }

    fn bucket(&self, identity: &Identity, tier: usize) -> BucketKey {
        let mut h = self.hasher.build_hasher();
        identity.hash(&mut h);
        tier.hash(&mut h);
        BucketKey(h.finish())
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

    fn too_many(&self, decision: &Decision, window_ms: u64, now_ms: u64) -> Response<Body> {
        let retry = headers::retry_after_secs(decision, now_ms);
        let mut response = json_response(
            StatusCode::TOO_MANY_REQUESTS,
            headers::too_many_requests_body(retry),
        );
        headers::apply(
            response.headers_mut(),
            decision,
            window_ms,
            now_ms,
            self.config.ietf_headers,
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(retry));
        response
    }

    /// Forwards to the upstream; 502 when it can't be reached, 504 when it
    /// doesn't answer in time. The body streams in both directions.
    async fn forward(&self, req: Request<Incoming>, peer: Peer) -> Response<Body> {
        let (mut parts, body) = req.into_parts();
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", http::uri::PathAndQuery::as_str);
        let mut uri = Uri::builder()
            .scheme("http")
            .authority(
                self.config
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
        let request = Request::from_parts(parts, body);
        match tokio::time::timeout(self.config.upstream_timeout, self.client.request(request)).await
        {
            Err(_) => error(
                StatusCode::GATEWAY_TIMEOUT,
                "UPSTREAM_TIMEOUT",
                "The upstream did not answer in time.",
            ),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "upstream request failed");
                error(
                    StatusCode::BAD_GATEWAY,
                    "UPSTREAM_UNAVAILABLE",
                    "The upstream could not be reached.",
                )
            }
            Ok(Ok(response)) => {
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, body.map_err(Into::into).boxed())
            }
        }
    }
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
