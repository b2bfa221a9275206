//! The rate limit service's listener: connections accepted (only from
//! `[rls] clients`), TLS when configured, hyper's HTTP/2 server with tonic's
//! gRPC framing, the one method routed, and each call checked (caller,
//! secret) before it is decided. Drained on shutdown.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use envoy_types::pb::envoy::service::ratelimit::v3::{
    RateLimitResponse, rate_limit_response::Code,
};
use http::{HeaderValue, header};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::graceful::GracefulShutdown,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
};
use tokio_rustls::TlsAcceptor;

use super::{Call, RateLimitServer};
use crate::{accept::accept_until, proxy::Proxy};

/// Longest TLS handshake before the connection is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The one method served.
const SHOULD_RATE_LIMIT: &str = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";

/// A call, decided and counted.
#[derive(Clone)]
struct Unary {
    server: RateLimitServer,
    peer: SocketAddr,
}

impl tonic::server::UnaryService<Call> for Unary {
    type Response = RateLimitResponse;
    type Future = std::pin::Pin<
        Box<dyn Future<Output = Result<tonic::Response<RateLimitResponse>, tonic::Status>> + Send>,
    >;

    fn call(&mut self, request: tonic::Request<Call>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let proxy = &this.server.proxy;
            // Checked per call too: a reload may have removed the caller
            // from a connection that stays open.
            if !this.server.admits(this.peer) {
                return Err(tonic::Status::permission_denied("not an [rls] client"));
            }
            let state = proxy.state();
            if !this.server.authenticated(&state, request.metadata()) {
                return Err(tonic::Status::permission_denied(
                    "missing or wrong x-limiter-rls-secret",
                ));
            }
            let answered = this.server.decide_in(&state, request.get_ref()).await;
            proxy.metrics().rls_call(match &answered {
                Ok(r) if r.overall_code == i32::from(Code::OverLimit) => "over_limit",
                Ok(r) if r.statuses.iter().all(|s| s.current_limit.is_none()) => "no_limit",
                Ok(_) => "ok",
                Err(status) if status.code() == tonic::Code::Unavailable => "unavailable",
                Err(_) => "invalid_argument",
            });
            answered.map(tonic::Response::new)
        })
    }
}

/// Answers one HTTP/2 request of a connection from `peer`.
async fn answer(
    server: RateLimitServer,
    peer: SocketAddr,
    request: http::Request<hyper::body::Incoming>,
) -> Result<http::Response<tonic::body::Body>, std::convert::Infallible> {
    if request.uri().path() != SHOULD_RATE_LIMIT {
        let mut response = http::Response::new(tonic::body::Body::default());
        response.headers_mut().insert(
            "grpc-status",
            HeaderValue::from(tonic::Code::Unimplemented as i32),
        );
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        return Ok(response);
    }
    let codec = tonic_prost::ProstCodec::<RateLimitResponse, Call>::default();
    let mut grpc = tonic::server::Grpc::new(codec);
    Ok(grpc.unary(Unary { server, peer }, request).await)
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
    let server = RateLimitServer::new(proxy.clone());
    let graceful = GracefulShutdown::new();
    accept_until(&listener, "rls", shutdown, |stream, peer| {
        if !server.admits(peer) {
            tracing::debug!(%peer, "rls caller outside [rls] clients: closed");
            return;
        }
        let server = server.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => serve_connection(stream, server, peer, watcher).await,
                Some(acceptor) => {
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
                    {
                        Ok(Ok(stream)) => serve_connection(stream, server, peer, watcher).await,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "rls TLS handshake failed");
                        }
                        Err(_) => tracing::debug!(%peer, "rls TLS handshake timed out"),
                    }
                }
            }
        });
    })
    .await;
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
    server: RateLimitServer,
    peer: SocketAddr,
    watcher: hyper_util::server::graceful::Watcher,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |request| answer(server.clone(), peer, request));
    let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(stream), service);
    if let Err(e) = watcher.watch(connection).await {
        tracing::debug!(error = %e, "rls connection ended with an error");
    }
}
