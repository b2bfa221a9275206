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

/// Serves the admin endpoints until the task is dropped.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>) {
    accept_until(&listener, "admin", std::future::pending(), |stream, _| {
        let admin = admin.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let admin = admin.clone();
                async move {
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
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    })
    .await;
}
