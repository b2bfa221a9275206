//! The admin listener (localhost by default): the live dashboard (`/` and
//! `/dashboard.json`), `/healthz`, `/metrics` (Prometheus text) and `/status`
//! (JSON).

use std::{convert::Infallible, sync::Arc, time::Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

mod dashboard;
mod status;

pub use self::{dashboard::Dashboard, status::StatusReport};
use crate::{accept::accept_until, proxy::Proxy};

/// Calls served on the admin listener by a part above it (the fleet's
/// runtime changes).
pub trait AdminApi: Send + Sync + 'static {
    /// Whether `path` is one of its.
    fn owns(&self, path: &str) -> bool;
    /// Answers a call on one of its paths.
    fn handle(
        &self,
        req: Request<Incoming>,
    ) -> std::pin::Pin<Box<dyn Future<Output = Response<Full<Bytes>>> + Send + '_>>;
}

/// What the admin endpoints read.
pub struct Admin {
    proxy: Arc<Proxy>,
    started: Instant,
    sections: Vec<Arc<dyn StatusReport>>,
    dashboard: Option<Arc<Dashboard>>,
    /// The admin API (the fleet's runtime entries).
    api: Option<Arc<dyn AdminApi>>,
}

impl Admin {
    #[must_use]
    pub fn new(proxy: Arc<Proxy>, sections: Vec<Arc<dyn StatusReport>>) -> Self {
        Self {
            proxy,
            started: Instant::now(),
            sections,
            dashboard: None,
            api: None,
        }
    }

    /// Serves `dashboard` at `/` and `/dashboard.json`.
    #[must_use]
    pub fn with_dashboard(mut self, dashboard: Arc<Dashboard>) -> Self {
        self.dashboard = Some(dashboard);
        self
    }

    /// Serves `api` on the paths it owns.
    #[must_use]
    pub fn with_api(mut self, api: Arc<dyn AdminApi>) -> Self {
        self.api = Some(api);
        self
    }

    fn status(&self) -> serde_json::Value {
        let state = self.proxy.state();
        let config = &state.config;
        let tiers: Vec<_> = config
            .live
            .tiers
            .iter()
            .map(|t| {
                serde_json::json!({
                    "route": t.route,
                    "limit": t.limit.get(),
                    "window_seconds": t.window.as_secs_f64(),
                })
            })
            .collect();
        let mut status = serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": self.started.elapsed().as_secs(),
            "listen": config.startup.listen.to_string(),
            "upstream": config.live.upstream.to_string(),
            "store": {
                "kind": match config.startup.store {
                    crate::config::StoreKind::Memory => "memory",
                    crate::config::StoreKind::Redis { .. } => "redis",
                },
                "healthy": self.proxy.metrics().store_healthy.get() == 1,
                "local_buckets": self.proxy.metrics().buckets.get(),
            },
            "tiers": tiers,
        });
        for section in &self.sections {
            status[section.name()] = section.report();
        }
        status
    }

    fn respond(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "GET only\n".into(),
            );
        }
        match (req.uri().path(), &self.dashboard) {
            ("/", Some(_)) => text(
                StatusCode::OK,
                "text/html; charset=utf-8",
                dashboard::PAGE.into(),
            ),
            ("/dashboard.json", Some(dashboard)) => text(
                StatusCode::OK,
                "application/json",
                dashboard.json().to_string(),
            ),
            ("/healthz", _) => text(
                StatusCode::OK,
                "application/json",
                r#"{"status":"ok"}"#.into(),
            ),
            ("/metrics", _) => text(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                self.proxy.metrics().encode(),
            ),
            ("/status", _) => text(
                StatusCode::OK,
                "application/json",
                format!("{:#}\n", self.status()),
            ),
            _ => text(
                StatusCode::NOT_FOUND,
                "text/plain",
                "try /, /healthz, /metrics or /status\n".into(),
            ),
        }
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    response
}

/// Connections the admin listener holds at once from addresses other than
/// loopback; more are closed on accept.
const MAX_CONNECTIONS: usize = 64;
/// Connections one address may hold.
const MAX_PER_SOURCE: usize = 8;
/// How long a connection may take to finish its TLS handshake or send a
/// request's head.
const PRE_AUTH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves the admin endpoints until the task is dropped, over TLS when
/// `tls` is given. Off loopback every path but `/healthz` needs a token of
/// `[admin] token_file` (Bearer, or Basic with the token as the password, so
/// a browser can open the dashboard); on loopback, a `Host` that names a
/// domain other than `localhost` is refused, so no web page can read it
/// through a name that resolves to 127.0.0.1.
pub async fn serve(
    listener: TcpListener,
    admin: Arc<Admin>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let local = listener
        .local_addr()
        .is_ok_and(|a| a.ip().to_canonical().is_loopback());
    // Operators' tools, not clients: a few connections at a time, fewer
    // from one address; loopback (the host's own operators) is never
    // crowded out by others.
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let per_source = Arc::new(crate::tally::Tally::<std::net::IpAddr>::default());
    accept_until(
        &listener,
        "admin",
        std::future::pending(),
        |stream, peer| {
            let source = peer.ip().to_canonical();
            let slot = if source.is_loopback() {
                None
            } else {
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    return;
                };
                Some(slot)
            };
            let Some(held) = per_source.acquire(source, MAX_PER_SOURCE) else {
                return;
            };
            let admin = admin.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let _slots = (slot, held);
                let service = service_fn(move |req: Request<Incoming>| {
                    let admin = admin.clone();
                    async move {
                        if let Some(refused) = admin.gate(&req, local) {
                            return Ok::<_, Infallible>(refused);
                        }
                        if let Some(api) = admin.api.as_ref().filter(|a| a.owns(req.uri().path())) {
                            return Ok::<_, Infallible>(api.handle(req).await);
                        }
                        if matches!(req.uri().path(), "/status" | "/dashboard.json") {
                            for section in &admin.sections {
                                section.fresh().await;
                            }
                        }
                        Ok::<_, Infallible>(admin.respond(&req))
                    }
                });
                let builder = {
                    let mut builder = hyper::server::conn::http1::Builder::new();
                    builder
                        .timer(TokioTimer::new())
                        .header_read_timeout(PRE_AUTH_TIMEOUT);
                    builder
                };
                match tls {
                    Some(tls) => {
                        let handshake = tokio::time::timeout(PRE_AUTH_TIMEOUT, tls.accept(stream));
                        if let Ok(Ok(stream)) = handshake.await {
                            let _ = builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                    }
                    None => {
                        let _ = builder
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    }
                }
            });
        },
    )
    .await;
}

impl Admin {
    /// The refusal for a request that may not reach any admin path, if it
    /// is one.
    fn gate(&self, req: &Request<Incoming>, local: bool) -> Option<Response<Full<Bytes>>> {
        if local {
            let host = req
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or("");
            return (!local_host(host)).then(|| {
                closing(text(
                    StatusCode::FORBIDDEN,
                    "text/plain",
                    "the admin listener answers to an address or localhost only\n".into(),
                ))
            });
        }
        if req.uri().path() == "/healthz" {
            return None;
        }
        let state = self.proxy.state();
        let offered = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| offered_token(v.as_bytes()));
        if offered.is_some_and(|t| state.config.live.admin_tokens.who(&t).is_some()) {
            return None;
        }
        let mut refused = text(
            StatusCode::UNAUTHORIZED,
            "text/plain",
            "a token of [admin] token_file is required\n".into(),
        );
        refused.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Basic realm=\"limiter\", Bearer"),
        );
        Some(closing(refused))
    }
}

/// `response` with `Connection: close`: a refused caller keeps no connection.
fn closing(mut response: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    response
        .headers_mut()
        .insert(header::CONNECTION, http::HeaderValue::from_static("close"));
    response
}

/// Whether `host` (a `Host` header) is an address or `localhost`: never a
/// name a page could point at this machine (a domain, or a single label a
/// search domain or LLMNR could resolve).
fn local_host(host: &str) -> bool {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split_once(']').is_some_and(|(ip, port)| {
            ip.parse::<std::net::Ipv6Addr>().is_ok()
                && (port.is_empty()
                    || port
                        .strip_prefix(':')
                        .is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit())))
        });
    }
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    name.eq_ignore_ascii_case("localhost")
        || name.eq_ignore_ascii_case("localhost.")
        || name.parse::<std::net::Ipv4Addr>().is_ok()
}

/// The token in an `Authorization` value: `Bearer <token>`, or `Basic`
/// with the token as the password.
#[must_use]
pub fn offered_token(value: &[u8]) -> Option<Vec<u8>> {
    if let Some(token) = value.strip_prefix(b"Bearer ") {
        return Some(token.trim_ascii().to_vec());
    }
    let encoded = value.strip_prefix(b"Basic ")?;
    let decoded = base64_decode(encoded.trim_ascii())?;
    let colon = decoded.iter().position(|b| *b == b':')?;
    Some(decoded[colon + 1..].to_vec())
}

/// Standard base64 (with or without padding); `None` on anything else.
fn base64_decode(text: &[u8]) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(u32::from(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        }))
    };
    let text = text
        .strip_suffix(b"==")
        .or_else(|| text.strip_suffix(b"="))
        .unwrap_or(text);
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    for chunk in text.chunks(4) {
        let mut bits = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            bits |= value(*c)? << (18 - 6 * i);
        }
        let bytes = bits.to_be_bytes();
        match chunk.len() {
            4 => out.extend_from_slice(&bytes[1..4]),
            3 => out.extend_from_slice(&bytes[1..3]),
            2 => out.push(bytes[1]),
            _ => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_tokens_and_base64() {
        for host in [
            "127.0.0.1:9090",
            "localhost",
            "LOCALHOST:1",
            "localhost.",
            "[::1]:9090",
            "[::1]",
        ] {
            assert!(local_host(host), "{host}");
        }
        for host in [
            "evil.example.com",
            "evil.example.com:9090",
            "127.0.0.1.nip.io",
            "[nope]",
            "intranet",
            "intranet:9090",
            "",
            "[::1]x",
        ] {
            assert!(!local_host(host), "{host}");
        }
        assert_eq!(base64_decode(b"b3BzOnNlY3JldA==").unwrap(), b"ops:secret");
        assert_eq!(base64_decode(b"YQ").unwrap(), b"a");
        assert!(base64_decode(b"*").is_none());
        assert_eq!(offered_token(b"Bearer  abc ").unwrap(), b"abc");
        assert_eq!(offered_token(b"Basic b3BzOnNlY3JldA==").unwrap(), b"secret");
        assert!(offered_token(b"Digest x").is_none());
    }
}
