//! `--demo-upstream`: a stand-in for the API so a first run needs nothing else.
//! Every route answers 200 with a JSON echo of method and path.
//! `POST /api/v1/chat/completions` answers like OpenAI's chat completions:
//! with `messages`, a `chat.completion` with its `usage`; with
//! `"stream": true`, `text/event-stream` with 5 events 100 ms apart (the
//! role, two pieces of content, the finish, `[DONE]`), and with
//! `stream_options.include_usage` every chunk's `"usage":null` and a
//! usage-only chunk before `[DONE]`, as OpenAI sends them. Given API keys,
//! it authenticates like a real API: any other key, or none, gets 401.

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
    let chat = req.method() == http::Method::POST && path == "/api/v1/chat/completions";
    let body = req
        .into_body()
        .collect()
        .await
        .map(http_body_util::Collected::to_bytes)
        .unwrap_or_default();
    let asked = if chat {
        serde_json::from_slice::<serde_json::Value>(&body).ok()
    } else {
        None
    };
    if let Some(asked) = &asked {
        let completion = Completion::of(asked, body.len());
        if asked.get("stream").and_then(serde_json::Value::as_bool) == Some(true) {
            return Ok(event_stream(completion));
        }
        if asked.get("messages").is_some() {
            return Ok(Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(completion.whole())).boxed())
                .expect("static response"));
        }
    }
    let echo = serde_json::json!({ "method": method, "path": path }).to_string();
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(echo)).boxed())
        .expect("static response"))
}

/// The demo's one answer, as a chat completion sized to the request.
struct Completion {
    model: String,
    /// The pieces of content generated (one token each, in the usage).
    pieces: Vec<&'static str>,
    prompt_tokens: u64,
    include_usage: bool,
}

impl Completion {
    const PIECES: [&'static str; 4] = ["Hello", " from", " the", " demo."];

    /// The answer to `asked` (a body of `bytes` bytes): at most its
    /// `max_completion_tokens`/`max_tokens` pieces, a prompt counted as its
    /// words plus OpenAI's framing (4 per message, 3 for the reply).
    fn of(asked: &serde_json::Value, bytes: usize) -> Self {
        let bound = asked
            .get("max_completion_tokens")
            .or_else(|| asked.get("max_tokens"))
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(u64::MAX);
        let pieces = Self::PIECES
            .iter()
            .take(usize::try_from(bound).unwrap_or(usize::MAX))
            .copied()
            .collect();
        let messages = asked
            .get("messages")
            .and_then(serde_json::Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let words: usize = messages
            .iter()
            .filter_map(|m| m.get("content").and_then(serde_json::Value::as_str))
            .map(|text| text.split_whitespace().count())
            .sum();
        let prompt_tokens = (words + 4 * messages.len() + 3).min(bytes) as u64;
        Self {
            model: asked
                .get("model")
                .and_then(serde_json::Value::as_str)
                .unwrap_or("demo")
                .to_owned(),
            pieces,
            prompt_tokens,
            include_usage: asked
                .pointer("/stream_options/include_usage")
                .and_then(serde_json::Value::as_bool)
                == Some(true),
        }
    }

    fn usage(&self) -> serde_json::Value {
        let completion = self.pieces.len() as u64;
        serde_json::json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        })
    }

    fn finish_reason(&self) -> &'static str {
        if self.pieces.len() < Self::PIECES.len() {
            "length"
        } else {
            "stop"
        }
    }

    /// The non-streamed answer.
    fn whole(&self) -> String {
        format!(
            r#"{{"id":"chatcmpl-demo","object":"chat.completion","created":{},"model":{},"choices":[{{"index":0,"message":{{"role":"assistant","content":{}}},"finish_reason":"{}"}}],"usage":{}}}"#,
            unix_now(),
            serde_json::Value::from(self.model.as_str()),
            serde_json::Value::from(self.pieces.concat()),
            self.finish_reason(),
            self.usage(),
        )
    }

    /// The streamed answer's events: the role, the content in two chunks,
    /// the finish, the usage if asked for, `[DONE]`.
    fn events(&self) -> Vec<String> {
        let created = unix_now();
        let model = serde_json::Value::from(self.model.as_str());
        let usage_null = if self.include_usage {
            r#","usage":null"#
        } else {
            ""
        };
        let chunk = |choices: &str, tail: &str| {
            format!(
                r#"data: {{"id":"chatcmpl-demo","object":"chat.completion.chunk","created":{created},"model":{model},"choices":{choices}{tail}}}"#
            ) + "\n\n"
        };
        let (first, second) = self.pieces.split_at(self.pieces.len().min(2));
        let delta = |pieces: &[&str]| {
            format!(
                r#"[{{"index":0,"delta":{{"content":{}}},"finish_reason":null}}]"#,
                serde_json::Value::from(pieces.concat())
            )
        };
        let mut events = vec![
            chunk(
                r#"[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]"#,
                usage_null,
            ),
            chunk(&delta(first), usage_null),
            chunk(&delta(second), usage_null),
            chunk(
                &format!(
                    r#"[{{"index":0,"delta":{{}},"finish_reason":"{}"}}]"#,
                    self.finish_reason()
                ),
                usage_null,
            ),
        ];
        if self.include_usage {
            events.push(chunk("[]", &format!(r#","usage":{}"#, self.usage())));
        }
        events.push("data: [DONE]\n\n".to_owned());
        events
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
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

/// The events of `completion`, 100 ms apart (the usage-only one, when
/// asked for, right before `[DONE]`).
fn event_stream(completion: Completion) -> Response<Body> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
    tokio::spawn(async move {
        let events = completion.events();
        let last = events.len() - 1;
        for (i, event) in events.into_iter().enumerate() {
            let usage_only = completion.include_usage && i + 1 == last;
            if i > 0 && !usage_only {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
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
