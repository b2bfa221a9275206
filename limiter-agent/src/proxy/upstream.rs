//! Upstream HTTP/1.1 connections: a pool of idle connections, each request
//! taking one and its response body giving it back once it is read to the end.
//!
//! Built on hyper's connection API rather than hyper-util's pooled client,
//! which on every request hashed a pool key, handed the request to the
//! connection's task and the response back through channels, and spawned a
//! task to return a connection whose body was still streaming: about a tenth
//! of the agent's CPU per forwarded request. Here a request pops the newest
//! idle connection (a lock and a `VecDeque` pop), and the response body's
//! drop pushes it back when the body was read to its end; a body dropped
//! before its end takes the connection down with it, never back to the pool.
//! Upstream connections follow requests in flight, not client connections:
//! an idle client holds none.
//!
//! Every upstream connection, busy or idle, holds one of
//! `max_upstream_connections` permits for as long as its socket is open. A
//! request that needs a new connection when all are taken first closes an
//! idle one, else waits up to `upstream_wait` for one to close, then fails
//! with [`UpstreamBusy`] (a 503): the upstream's accept queue and this host's
//! ephemeral ports are never all one client's.
//!
//! Kept from the pooled client: the connector (DNS, Happy Eyeballs, a 5 s
//! connect timeout, `TCP_NODELAY`), idle connections closed after a minute
//! (swept by the agent's housekeeping), and a request that never reached a
//! connection the upstream had just closed sent again on a new one.

use std::{
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response, Uri, request};
use hyper::{
    body::{Body, Frame, Incoming, SizeHint},
    client::conn::http1::{self, SendRequest},
};
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower_service::Service as _;

use super::{
    BoxError,
    pool::{Pool, Pooled},
    wire::{self, RawHead, Wire, WireBody, WireError},
};
use crate::body::ClientBody;

/// Longest wait for the upstream's TCP handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for a pooled connection to take a request before a new one is opened.
const READY_WAIT: Duration = Duration::from_millis(100);

/// An upstream connection and the authority (`host:port`) it was opened to;
/// a reload may move the upstream, and connections to the old one are closed.
struct Held {
    authority: Arc<str>,
    sender: SendRequest<ClientBody>,
    /// The connection's task: aborted when this is dropped, so a connection
    /// nobody will reuse is closed at once, with whatever it was still doing
    /// (sending the rest of a request body the upstream already answered).
    task: tokio::task::AbortHandle,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Pooled for Held {
    fn authority(&self) -> &str {
        &self.authority
    }

    fn fit(&self) -> bool {
        !self.sender.is_closed()
    }

    const FIT_IS_CHEAP: bool = true;
}

/// Every upstream connection was busy for `upstream_wait` (answered 503).
#[derive(Debug, thiserror::Error)]
#[error("all {0} upstream connections stayed busy")]
pub struct UpstreamBusy(pub usize);

/// The upstream connections not carrying a request now, and the permits of
/// all of them.
pub struct Upstreams {
    /// Connections driven by hyper's client, for requests with a body.
    idle: Pool<Held>,
    /// Connections for requests without a body ([`wire`]).
    wires: Arc<Pool<Wire>>,
    connector: HttpConnector,
    /// One per open connection: `max_upstream_connections` in all.
    permits: Arc<Semaphore>,
    max_connections: usize,
}

impl Upstreams {
    /// No connections yet; at most `max_connections` open at once.
    #[must_use]
    pub fn new(max_connections: usize) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let max_connections = max_connections.min(Semaphore::MAX_PERMITS);
        Self {
            idle: Pool::default(),
            wires: Arc::new(Pool::default()),
            connector,
            permits: Arc::new(Semaphore::new(max_connections)),
            max_connections,
        }
    }

    /// Connections open now, busy and idle.
    #[must_use]
    pub fn open(&self) -> usize {
        self.max_connections - self.permits.available_permits()
    }

    /// A permit for a new connection: a free one, else one an idle
    /// connection gives up, else the first one freed within `wait`.
    async fn permit(&self, wait: Duration) -> Result<OwnedSemaphorePermit, UpstreamBusy> {
        if let Ok(permit) = self.permits.clone().try_acquire_owned() {
            return Ok(permit);
        }
        // Idle connections hold permits too: the oldest makes room. A wire
        // first: its permit comes back as it drops; a hyper connection's
        // comes back when its aborted task ends.
        if !self.wires.close_oldest() {
            self.idle.close_oldest();
        }
        if let Ok(permit) = self.permits.clone().try_acquire_owned() {
            return Ok(permit);
        }
        match tokio::time::timeout(wait, self.permits.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(UpstreamBusy(self.max_connections)),
        }
    }

    /// Sends `request` (origin-form target, `Host` set) to `authority` on an
    /// idle connection, else a new one. The response body gives the
    /// connection back when it has been read to its end.
    ///
    /// # Errors
    /// The upstream could not be reached, or the exchange failed; a client
    /// body's own failure is in the error's source chain.
    pub async fn send(
        self: &Arc<Self>,
        authority: &str,
        request: Request<ClientBody>,
        wait: Duration,
    ) -> Result<Response<Returning>, BoxError> {
        let mut held = match self.idle.take(authority) {
            Some(held) if held.sender.is_ready() => held,
            // Given back as its exchange ended: ready at its task's next turn.
            // Not ready soon (closed while idle, or still writing to an
            // upstream that stopped reading), a new connection takes over.
            Some(mut held) => {
                if let Ok(Ok(())) = tokio::time::timeout(READY_WAIT, held.sender.ready()).await {
                    held
                } else {
                    drop(held);
                    self.connect(authority, wait).await?
                }
            }
            None => self.connect(authority, wait).await?,
        };
        // A request body still being sent when the answer comes means the
        // upstream answered without reading all of it: the connection's
        // framing can no longer be trusted, so it is not reused. Best effort:
        // a body written in full before an upstream answered without
        // reading it cannot be told apart: an upstream that answers early
        // must read the rest of the body or close the connection.
        let body_sent = request.body().sent();
        let response = match held.sender.try_send_request(request).await {
            Ok(response) => response,
            Err(mut e) => {
                // Not written: the connection closed as the request was handed
                // to it (an upstream's idle close racing a reuse). A new
                // connection gets it, as the pooled client's retry does.
                let Some(request) = e.take_message() else {
                    return Err(e.into_error().into());
                };
                drop(held);
                held = self.connect(authority, wait).await?;
                held.sender.send_request(request).await?
            }
        };
        let reusable = body_sent.is_none_or(|sent| sent.load(Ordering::Acquire));
        Ok(response.map(|inner| Returning {
            inner,
            ended: false,
            reusable,
            held: Some((held, self.clone())),
        }))
    }

    /// Keeps `held` for the next request, unless it closed.
    fn give_back(&self, held: Held) {
        if !held.sender.is_closed() {
            self.idle.put(held);
        }
    }

    /// Closes idle connections that expired, closed, or lead to another
    /// upstream than `authority` (housekeeping, once a second).
    pub fn sweep(&self, authority: &str) {
        self.idle.sweep(authority);
        self.wires.sweep(authority);
    }

    /// Idle connections now.
    #[must_use]
    pub fn idle(&self) -> usize {
        self.idle.len() + self.wires.len()
    }

    /// Sends a request with its whole body in hand (none, see
    /// [`wire::carries`], or one read first, framed by the `Content-Length`
    /// in `parts`) to `authority` on an idle connection, else a new one,
    /// written with the head in one write and read in the caller's task. A pooled connection the upstream closed as it
    /// was reused is replaced once: always when the request could not be
    /// written, for an idempotent method when no answer came.
    ///
    /// # Errors
    /// The upstream could not be reached, or its answer was malformed.
    pub async fn send_whole(
        self: &Arc<Self>,
        authority: &str,
        parts: &request::Parts,
        body: &[u8],
        wait: Duration,
    ) -> Result<Response<WireBody>, BoxError> {
        let mut head = Vec::with_capacity(256 + body.len());
        wire::encode_head(parts, &mut head);
        head.extend_from_slice(body);
        let (answer, body) = self
            .send_encoded(authority, &head, &parts.method, wait, Instant::now())
            .await?;
        Ok(answer.into_response()?.map(|()| body))
    }

    /// [`Self::send_whole`] for a request already written out whole, head
    /// and body (`request`); `now` is the clock read a moment ago.
    ///
    /// # Errors
    /// The upstream could not be reached, or its answer was malformed.
    pub async fn send_encoded(
        self: &Arc<Self>,
        authority: &str,
        request: &[u8],
        method: &http::Method,
        wait: Duration,
        now: Instant,
    ) -> Result<(RawHead, WireBody), BoxError> {
        // A request that must not reach the upstream twice is retried only
        // when it could not be written.
        let idempotent = method.is_idempotent();
        let (mut wire, reused) = match self.wires.take_at(authority, now) {
            Some(wire) => (wire, true),
            None => (self.connect_wire(authority, wait).await?, false),
        };
        let answer = match wire.exchange(request, method).await {
            Err(WireError::NotSent) if reused => None,
            Err(WireError::ClosedEarly) if reused && idempotent => None,
            other => Some(other?),
        };
        let (answer, framing) = if let Some(answer) = answer {
            answer
        } else {
            drop(wire);
            wire = self.connect_wire(authority, wait).await?;
            wire.exchange(request, method).await?
        };
        Ok((answer, WireBody::new(wire, framing, self.wires.clone())))
    }

    /// A new connection to `authority` for requests written here.
    async fn connect_wire(&self, authority: &str, wait: Duration) -> Result<Wire, BoxError> {
        let permit = self.permit(wait).await?;
        let io = self.dial(authority).await?;
        Ok(Wire::new(io.into_inner(), authority.into(), permit))
    }

    /// A TCP connection to `authority` through the connector (DNS, Happy
    /// Eyeballs, the connect timeout, `TCP_NODELAY`).
    async fn dial(
        &self,
        authority: &str,
    ) -> Result<hyper_util::rt::TokioIo<tokio::net::TcpStream>, BoxError> {
        let uri: Uri = format!("http://{authority}/").parse()?;
        let mut connector = self.connector.clone();
        std::future::poll_fn(|cx| connector.poll_ready(cx)).await?;
        Ok(connector.call(uri).await?)
    }

    /// A new HTTP/1.1 connection to `authority`, driven by a task of its own.
    async fn connect(&self, authority: &str, wait: Duration) -> Result<Held, BoxError> {
        let permit = self.permit(wait).await?;
        let io = self.dial(authority).await?;
        let (mut sender, connection) = http1::Builder::new().handshake(io).await?;
        // The permit goes with the connection's task, which ends when the
        // socket is closed (either side closed it, or the `Held` was dropped).
        let task = tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        sender.ready().await?;
        Ok(Held {
            authority: authority.into(),
            sender,
            task: task.abort_handle(),
        })
    }
}

/// An upstream response body that gives its connection back to the pool
/// when dropped after its end; dropped before, or with the request body
/// still being sent, the connection closes. The connection lives as long as
/// this body: its task feeds it.
pub struct Returning {
    inner: Incoming,
    /// `None` was read: the end of a body whose length was not known.
    ended: bool,
    /// The request body had been sent whole when the answer came.
    reusable: bool,
    held: Option<(Held, Arc<Upstreams>)>,
}

impl Body for Returning {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = frame {
            self.ended = true;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Returning {
    fn drop(&mut self) {
        if self.reusable
            && (self.ended || self.inner.is_end_stream())
            && let Some((held, upstreams)) = self.held.take()
        {
            upstreams.give_back(held);
        }
    }
}
