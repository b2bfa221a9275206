//! `--demo-upstream`: a stand-in for the API so a first run needs nothing else.
//! Every route answers 200 with a JSON echo of method and path;
//! `POST /api/v1/chat/completions` with `"stream": true` answers
//! `text/event-stream` with 5 events 100 ms apart. Given API keys, it
//! authenticates like a real API: any other key, or none, gets 401.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::net::TcpListener;

use crate::accept::accept_until;

type Body = BoxBody<Bytes, Infallible>;

/// Binds `addr` and serves the stand-in until the process ends.
pub async fn spawn(addr: SocketAddr, api_keys: Vec<String>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let api_keys: Arc<[String]> = api_keys.into();
    tokio::spawn(async move {
        accept_until(&listener, "demo", std::future::pending(), |stream, _| {
            let api_keys = api_keys.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| answer(req, api_keys.clone()));
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        })
        .await;
    });
    Ok(local)
}

async fn answer(
    req: Request<Incoming>,
    api_keys: Arc<[String]>,
) -> Result<Response<Body>, Infallible> {
    if !api_keys.is_empty() && !authenticated(req.headers(), &api_keys) {
        return Ok(Response::builder()
            .status(StatusCode::UNAUTHORIZED)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from_static(br#"{"error":"invalid API key"}"#)).boxed())
            .expect("static response"));
    }
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    let streaming = req.method() == http::Method::POST && path == "/api/v1/chat/completions";
    let body = req
        .into_body()
        .collect()
        .await
        .map(http_body_util::Collected::to_bytes)
        .unwrap_or_default();
    let wants_stream = streaming
        && serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("stream").and_then(serde_json::Value::as_bool))
            == Some(true);
    if wants_stream {
        return Ok(event_stream());
    }
    let echo = serde_json::json!({ "method": method, "path": path }).to_string();
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(echo)).boxed())
        .expect("static response"))
}

/// A known key in `X-API-Key` or as `Authorization: Bearer`.
fn authenticated(headers: &http::HeaderMap, api_keys: &[String]) -> bool {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let header_key = headers.get("x-api-key").and_then(|v| v.to_str().ok());
    [bearer, header_key]
        .into_iter()
        .flatten()
        .any(|key| api_keys.iter().any(|k| k == key))
}

fn event_stream() -> Response<Body> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
    tokio::spawn(async move {
        for i in 0..5 {
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let event = format!("data: {{\"index\":{i}}}\n\n");
            if tx.send(Ok(Frame::data(Bytes::from(event)))).await.is_err() {
                return;
            }
        }
    });
    let stream = tokio_stream_from(rx);
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(StreamBody::new(stream).boxed())
        .expect("static response")
}

/// A `Stream` over an mpsc receiver (what tokio-stream's wrapper does, in a few lines).
fn tokio_stream_from<T>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_core::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
