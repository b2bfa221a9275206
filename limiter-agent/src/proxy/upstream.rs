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
    collections::VecDeque,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError, atomic::Ordering},
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
    wire::{self, Wire, WireBody, WireError},
};
use crate::body::ClientBody;

/// Longest wait for the upstream's TCP handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle upstream connections older than this are closed.
const IDLE_TIMEOUT: Duration = Duration::from_mins(1);
/// Longest wait for a pooled connection to take a request before a new one is opened.
const READY_WAIT: Duration = Duration::from_millis(100);
/// Most idle upstream connections kept; beyond it the oldest is closed.
const MAX_IDLE: usize = 1024;

/// An upstream connection and the authority (`host:port`) it was opened to;
/// a reload may move the upstream, and connections to the old one are closed.
struct Held {
    authority: Arc<str>,
    sender: SendRequest<ClientBody>,
    idle_since: Instant,
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

impl Held {
    fn reusable(&self, authority: &str, now: Instant) -> bool {
        &*self.authority == authority
            && !self.sender.is_closed()
            && now.saturating_duration_since(self.idle_since) < IDLE_TIMEOUT
    }
}

/// Every upstream connection was busy for `upstream_wait` (answered 503).
#[derive(Debug, thiserror::Error)]
#[error("all {0} upstream connections stayed busy")]
pub struct UpstreamBusy(pub usize);

/// The upstream connections not carrying a request now, and the permits of
/// all of them.
pub struct Upstreams {
    idle: Mutex<VecDeque<Held>>,
    /// Connections for requests without a body ([`wire`]).
    wires: Mutex<VecDeque<Wire>>,
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
            idle: Mutex::new(VecDeque::new()),
            wires: Mutex::new(VecDeque::new()),
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
        // Idle connections hold permits too: the oldest makes room (dropped
        // outside the lock). A wire first: its permit comes back as it drops;
        // a hyper connection's comes back when its aborted task ends.
        let wire = self
            .wires
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop_front();
        if wire.is_some() {
            drop(wire);
        } else {
            drop(
                self.idle
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .pop_front(),
            );
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
        let mut held = match self.checkout(authority) {
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

    /// The newest reusable idle connection to `authority`.
    fn checkout(&self, authority: &str) -> Option<Held> {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(held) = idle.pop_back() {
            if held.reusable(authority, now) {
                return Some(held);
            }
        }
        None
    }

    /// Keeps `held` for the next request; the oldest goes when the pool is full.
    fn give_back(&self, mut held: Held) {
        if held.sender.is_closed() {
            return;
        }
        held.idle_since = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() >= MAX_IDLE {
            idle.pop_front();
        }
        idle.push_back(held);
    }

    /// Closes idle connections that expired, closed, or lead to another
    /// upstream than `authority` (housekeeping, once a second).
    pub fn sweep(&self, authority: &str) {
        let now = Instant::now();
        let stale: VecDeque<Held> = {
            let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
            let (keep, stale) = idle
                .drain(..)
                .partition(|held| held.reusable(authority, now));
            *idle = keep;
            stale
        };
        // Dropped outside the lock: each drop ends a connection's task.
        drop(stale);
        // Checked outside the lock: a check may be a system call.
        let wires: Vec<Wire> = self
            .wires
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
            .collect();
        let keep: Vec<Wire> = wires
            .into_iter()
            .filter(|wire| wire_reusable(wire, authority, now) && wire.quiet())
            .collect();
        let mut wires = self.wires.lock().unwrap_or_else(PoisonError::into_inner);
        // Given back meanwhile: newer, so after these.
        for (i, wire) in keep.into_iter().enumerate() {
            wires.insert(i, wire);
        }
        let excess = wires.len().saturating_sub(MAX_IDLE);
        wires.drain(..excess);
    }

    /// Idle connections now.
    #[must_use]
    pub fn idle(&self) -> usize {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
            + self
                .wires
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .len()
    }

    /// Sends a request without a body (see [`wire::carries`]) to
    /// `authority` on an idle connection, else a new one, written and read
    /// in the caller's task. A pooled connection the upstream closed as it
    /// was reused is replaced once: always when the request could not be
    /// written, for an idempotent method when no answer came.
    ///
    /// # Errors
    /// The upstream could not be reached, or its answer was malformed.
    pub async fn send_bodyless(
        self: &Arc<Self>,
        authority: &str,
        parts: &request::Parts,
        wait: Duration,
    ) -> Result<Response<WireBody>, BoxError> {
        let mut head = Vec::with_capacity(256);
        wire::encode_head(parts, &mut head);
        // A request that must not reach the upstream twice is retried only
        // when it could not be written.
        let idempotent = parts.method.is_idempotent();
        let (mut wire, reused) = match self.checkout_wire(authority) {
            Some(wire) => (wire, true),
            None => (self.connect_wire(authority, wait).await?, false),
        };
        let answer = match wire.exchange(&head, &parts.method).await {
            Err(WireError::NotSent) if reused => None,
            Err(WireError::ClosedEarly) if reused && idempotent => None,
            other => Some(other?),
        };
        let (answer, framing) = if let Some(answer) = answer {
            answer
        } else {
            drop(wire);
            wire = self.connect_wire(authority, wait).await?;
            wire.exchange(&head, &parts.method).await?
        };
        Ok(answer.map(|()| WireBody::new(wire, framing, self.clone())))
    }

    /// The newest idle [`Wire`] to `authority` that nothing arrived on.
    fn checkout_wire(&self, authority: &str) -> Option<Wire> {
        let now = Instant::now();
        loop {
            let wire = self
                .wires
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop_back()?;
            if wire_reusable(&wire, authority, now) && wire.quiet() {
                return Some(wire);
            }
        }
    }

    /// Keeps `wire` for the next request; the oldest goes when the pool is full.
    pub(super) fn give_back_wire(&self, mut wire: Wire) {
        wire.idle_since = Instant::now();
        wire.shrink();
        let mut wires = self.wires.lock().unwrap_or_else(PoisonError::into_inner);
        if wires.len() >= MAX_IDLE {
            wires.pop_front();
        }
        wires.push_back(wire);
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
            idle_since: Instant::now(),
            task: task.abort_handle(),
        })
    }
}

fn wire_reusable(wire: &Wire, authority: &str, now: Instant) -> bool {
    &*wire.authority == authority && now.saturating_duration_since(wire.idle_since) < IDLE_TIMEOUT
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
