//! Forwarding to the upstream: the request rewritten for one hop, bodies
//! streamed both ways, and the upstream's failures turned into JSON errors.

use std::time::Instant;

use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, header};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;

use super::{Body, Peer, Proxy, State, respond::error};
use crate::body::{ClientBody, ClientBodyError, client_fault};

impl Proxy {
    /// Forwards to the upstream; 502 when it can't be reached, 504 when it
    /// doesn't answer in time. The body streams in both directions.
    pub(super) async fn forward(
        &self,
        state: &State,
        req: Request<Incoming>,
        peer: Peer,
    ) -> Response<Body> {
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
                    .live
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
        let request = Request::from_parts(
            parts,
            ClientBody::new(body, state.config.live.body_read_timeout),
        );
        let started = Instant::now();
        let result = tokio::time::timeout(
            state.config.live.upstream_timeout,
            self.client.request(request),
        )
        .await;
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
