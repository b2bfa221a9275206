//! Envoy's rate limit service (`envoy.service.ratelimit.v3.RateLimitService`):
//! Envoy, Istio and Envoy Gateway ask the agent over gRPC, and get the proxy's
//! decisions: the same store, tiers, identities, counters and escalation to
//! a kernel ban (descriptor mapping in [`crate::proxy::Answer`]'s module).
//!
//! Served on its own listener (`[rls] listen`, TLS optional) by hyper's HTTP/2
//! server with tonic's generated service; only `[rls] clients` may connect,
//! since a caller names the addresses counted and banned.
//!
//! Answers, as the reference server (envoyproxy/ratelimit) gives them:
//! - `OK` or `OVER_LIMIT` overall, a status per descriptor with
//!   `current_limit`, `limit_remaining` and `duration_until_reset`; the
//!   proxy's `X-RateLimit-*` headers (and `Retry-After` when over) in
//!   `response_headers_to_add`, from the descriptor with the least left; the
//!   proxy's exact 429 body in `raw_body`.
//! - No descriptors or no domain: `INVALID_ARGUMENT`. A failed shared store
//!   with `on_error = "deny"`: `UNAVAILABLE`, so Envoy's `failure_mode_deny`
//!   decides.
//! - A descriptor the proxy would refuse (a path spelling it answers 400, an
//!   ambiguous identity) or a new client in a full store: `OVER_LIMIT` with
//!   the proxy's error body, never a pass.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use envoy_types::pb::{
    envoy::{
        config::core::v3::HeaderValue as EnvoyHeader,
        service::ratelimit::v3::{
            RateLimitRequest, RateLimitResponse,
            rate_limit_response::{Code, DescriptorStatus, RateLimit, rate_limit::Unit},
            rate_limit_service_server::{RateLimitService, RateLimitServiceServer},
        },
    },
    google::protobuf::Duration as PbDuration,
};
use http::{HeaderMap, HeaderValue, header};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::graceful::GracefulShutdown,
    service::TowerToHyperService,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
};
use tokio_rustls::TlsAcceptor;

use crate::{
    headers,
    proxy::{Answer, Proxy, Verdict},
};

/// Longest TLS handshake before the connection is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The service: a handle on the proxy whose decisions it shares.
#[derive(Clone)]
pub struct RateLimitServer {
    proxy: Arc<Proxy>,
}

impl RateLimitServer {
    #[must_use]
    pub fn new(proxy: Arc<Proxy>) -> Self {
        Self { proxy }
    }

    /// Decides a whole call (see the module doc for the answers).
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` for a call without domain or descriptors, or with
    /// negative hits; `UNAVAILABLE` when the shared store failed and
    /// `on_error = "deny"`.
    pub async fn decide(
        &self,
        call: &RateLimitRequest,
    ) -> Result<RateLimitResponse, tonic::Status> {
        if call.domain.is_empty() {
            return Err(tonic::Status::invalid_argument(
                "rate limit domain must not be empty",
            ));
        }
        if call.descriptors.is_empty() {
            return Err(tonic::Status::invalid_argument(
                "rate limit descriptor list must not be empty",
            ));
        }
        if call.descriptors.iter().any(|d| d.is_negative_hits) {
            // Refunds would let a caller hand quota back: not served.
            return Err(tonic::Status::invalid_argument(
                "negative hits are not supported",
            ));
        }
        let state = self.proxy.state();
        let mut statuses = Vec::with_capacity(call.descriptors.len());
        let mut verdicts: Vec<Verdict> = Vec::new();
        let mut refusal: Option<String> = None;
        for descriptor in &call.descriptors {
            // 0 (unset) counts as 1, as in Envoy's API.
            let hits = descriptor
                .hits_addend
                .map_or(u64::from(call.hits_addend), |h| h.value)
                .clamp(1, u64::from(u32::MAX));
            let hits = u32::try_from(hits).unwrap_or(u32::MAX);
            let entries: Vec<(&str, &str)> = descriptor
                .entries
                .iter()
                .map(|e| (e.key.as_str(), e.value.as_str()))
                .collect();
            let answer = self
                .proxy
                .decide_descriptor(&state, &call.domain, &entries, hits)
                .await;
            statuses.push(match answer {
                Answer::NoLimit => DescriptorStatus {
                    code: Code::Ok.into(),
                    ..DescriptorStatus::default()
                },
                Answer::Decided(verdict) => {
                    let status = self.status(&verdict);
                    verdicts.push(verdict);
                    status
                }
                Answer::Refused { code, message } => {
                    refusal.get_or_insert_with(|| headers::error_body(code, &message));
                    DescriptorStatus {
                        code: Code::OverLimit.into(),
                        ..DescriptorStatus::default()
                    }
                }
                Answer::Unavailable => {
                    return Err(tonic::Status::unavailable(
                        "the rate-limit store is unavailable",
                    ));
                }
            });
        }
        let over = statuses
            .iter()
            .any(|s| s.code == i32::from(Code::OverLimit));
        // The headers of the descriptor that binds: an enforced rejection
        // first, then the least left.
        let binding = verdicts
            .iter()
            .min_by_key(|v| (!v.over_limit(), v.decision.remaining));
        let (headers, raw_body) = self.headers(binding, over, refusal);
        Ok(RateLimitResponse {
            overall_code: if over { Code::OverLimit } else { Code::Ok }.into(),
            statuses,
            response_headers_to_add: headers
                .iter()
                .map(|(name, value)| EnvoyHeader {
                    key: name.as_str().to_owned(),
                    value: String::from_utf8_lossy(value.as_bytes()).into_owned(),
                    raw_value: Vec::new(),
                })
                .collect(),
            raw_body,
            ..RateLimitResponse::default()
        })
    }

    /// The headers and body Envoy sends the client: those of the binding
    /// descriptor, the proxy's 429 body when it is over, else the refusal's.
    fn headers(
        &self,
        binding: Option<&Verdict>,
        over: bool,
        refusal: Option<String>,
    ) -> (HeaderMap, Vec<u8>) {
        let now = self.proxy.clock_now();
        let mut headers = HeaderMap::new();
        let mut raw_body = Vec::new();
        if let Some(v) = binding {
            headers::apply(
                &mut headers,
                &v.decision,
                v.window_ms,
                now,
                v.policy.as_ref(),
            );
            if v.over_limit() {
                let retry = headers::retry_after_secs(&v.decision, now);
                headers.insert(header::RETRY_AFTER, HeaderValue::from(retry));
                raw_body = headers::too_many_requests_body(retry).into_bytes();
            }
        }
        if over {
            if raw_body.is_empty() {
                raw_body = refusal.unwrap_or_default().into_bytes();
            }
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
        (headers, raw_body)
    }

    fn status(&self, verdict: &Verdict) -> DescriptorStatus {
        let until_reset_ms = verdict
            .decision
            .reset_ms
            .saturating_sub(self.proxy.now_ms());
        DescriptorStatus {
            code: if verdict.over_limit() {
                Code::OverLimit
            } else {
                Code::Ok
            }
            .into(),
            current_limit: Some(RateLimit {
                name: verdict.name.clone(),
                requests_per_unit: verdict.decision.limit,
                unit: unit(verdict.window_ms).into(),
            }),
            limit_remaining: verdict.decision.remaining,
            duration_until_reset: Some(PbDuration {
                seconds: i64::try_from(until_reset_ms / 1000).unwrap_or(i64::MAX),
                nanos: i32::try_from(until_reset_ms % 1000 * 1_000_000).unwrap_or(0),
            }),
            quota: None,
        }
    }
}

/// The API's unit for a window that is exactly one; `UNKNOWN` for the
/// others (10 s), whose length `duration_until_reset` and the headers tell.
fn unit(window_ms: u64) -> Unit {
    match window_ms {
        1_000 => Unit::Second,
        60_000 => Unit::Minute,
        3_600_000 => Unit::Hour,
        86_400_000 => Unit::Day,
        604_800_000 => Unit::Week,
        _ => Unit::Unknown,
    }
}

#[tonic::async_trait]
impl RateLimitService for RateLimitServer {
    async fn should_rate_limit(
        &self,
        request: tonic::Request<RateLimitRequest>,
    ) -> Result<tonic::Response<RateLimitResponse>, tonic::Status> {
        let answered = self.decide(request.get_ref()).await;
        self.proxy.count_rls_call(match &answered {
            Ok(r) if r.overall_code == i32::from(Code::OverLimit) => "over_limit",
            Ok(_) => "ok",
            Err(status) if status.code() == tonic::Code::Unavailable => "unavailable",
            Err(_) => "invalid_argument",
        });
        answered.map(tonic::Response::new)
    }
}

/// Serves the rate limit service on `listener` until `shutdown`, then gives
/// calls in flight `drain` to finish. Connections from outside `[rls]
/// clients` are closed at once.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) {
    let service = RateLimitServiceServer::new(RateLimitServer::new(proxy.clone()));
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer): (_, SocketAddr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "rls accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        if !proxy
            .state()
            .config
            .live
            .rls
            .clients
            .contains(peer.ip().to_canonical())
        {
            proxy.count_rls_call("permission_denied");
            tracing::debug!(%peer, "rls caller outside [rls] clients: closed");
            continue;
        }
        let _ = stream.set_nodelay(true);
        let service = service.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => serve_connection(stream, service, watcher).await,
                Some(acceptor) => {
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
                    {
                        Ok(Ok(stream)) => serve_connection(stream, service, watcher).await,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "rls TLS handshake failed");
                        }
                        Err(_) => tracing::debug!(%peer, "rls TLS handshake timed out"),
                    }
                }
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("rls calls still in flight at the drain deadline");
    }
}

async fn serve_connection<S>(
    stream: S,
    service: RateLimitServiceServer<RateLimitServer>,
    watcher: hyper_util::server::graceful::Watcher,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
    if let Err(e) = watcher.watch(connection).await {
        tracing::debug!(error = %e, "rls connection ended with an error");
    }
}
