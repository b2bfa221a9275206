//! Upstream HTTP/1.1 connections for HTTP/1 clients: each client connection
//! holds one upstream connection (its [`Lane`]) for as long as it lives.
//!
//! An HTTP/1 client sends its next request only after the last response has
//! been written, so one upstream connection serves it without any sharing.
//! Holding it per client connection takes the shared pool off the per-request
//! path: no pool lock, no key hashing, no task spawned to return a connection
//! whose response body is still streaming. The pool ([`Upstreams`]) is only
//! touched when a client connection makes its first request and when it
//! closes, to reuse upstream connections across short client connections.
//! HTTP/2 clients multiplex many requests on one connection; they keep the
//! shared pooled client (`Proxy::client`).
//!
//! Behaviour kept from the pooled client: a 5 s connect timeout, `TCP_NODELAY`,
//! idle upstream connections dropped after a minute, and a request that never
//! reached a connection the upstream had just closed is sent again on a new one.

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use http::{Request, Response};
use hyper::{
    body::Incoming,
    client::conn::http1::{self, SendRequest},
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::BoxError;
use crate::body::ClientBody;

/// Longest wait for the upstream's TCP handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle upstream connections older than this are not reused.
const IDLE_TIMEOUT: Duration = Duration::from_mins(1);
/// Most idle upstream connections kept for reuse.
const MAX_IDLE: usize = 1024;

/// An upstream connection and the authority (`host:port`) it was opened to;
/// a reload may move the upstream, and connections to the old one are dropped.
struct Held {
    authority: String,
    sender: SendRequest<ClientBody>,
    since: Instant,
}

impl Held {
    fn reusable(&self, authority: &str, now: Instant) -> bool {
        self.authority == authority
            && !self.sender.is_closed()
            && now.saturating_duration_since(self.since) < IDLE_TIMEOUT
    }
}

/// Idle upstream connections, shared by all client connections.
#[derive(Default)]
pub struct Upstreams {
    idle: Mutex<Vec<Held>>,
}

impl Upstreams {
    /// The newest reusable idle connection to `authority`; stale ones are dropped.
    fn checkout(&self, authority: &str) -> Option<Held> {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(held) = idle.pop() {
            if held.reusable(authority, now) && held.sender.is_ready() {
                return Some(held);
            }
        }
        None
    }

    /// Keeps `held` for another client connection, if it can take a request now.
    fn give_back(&self, mut held: Held) {
        if held.sender.is_closed() || !held.sender.is_ready() {
            return;
        }
        held.since = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < MAX_IDLE {
            idle.push(held);
        }
    }
}

/// The upstream connection of one client connection. Dropping it (the client
/// connection closed) gives the upstream connection back to the pool.
pub struct Lane {
    upstreams: Arc<Upstreams>,
    held: Mutex<Option<Held>>,
}

impl Lane {
    #[must_use]
    pub fn new(upstreams: Arc<Upstreams>) -> Self {
        Self {
            upstreams,
            held: Mutex::new(None),
        }
    }

    /// Sends `request` (origin-form target, `Host` set) to `authority`: on the
    /// lane's connection, else an idle one, else a new one.
    ///
    /// # Errors
    /// The upstream could not be reached, or the exchange failed; a client
    /// body's own failure is in the error's source chain.
    pub async fn send(
        &self,
        authority: &str,
        request: Request<ClientBody>,
    ) -> Result<Response<Incoming>, BoxError> {
        let now = Instant::now();
        let held = self
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .filter(|held| held.reusable(authority, now))
            .or_else(|| self.upstreams.checkout(authority));
        let mut held = match held {
            Some(mut held) => match held.sender.ready().await {
                Ok(()) => held,
                // Closed while idle: the upstream let it go.
                Err(_) => connect(authority).await?,
            },
            None => connect(authority).await?,
        };
        let response = match held.sender.try_send_request(request).await {
            Ok(response) => response,
            Err(mut e) => {
                // Not written: the connection closed as the request was handed
                // to it (an upstream's idle close racing a reuse). A new
                // connection gets it, as the pooled client's retry does.
                let Some(request) = e.take_message() else {
                    return Err(e.into_error().into());
                };
                held = connect(authority).await?;
                held.sender.send_request(request).await?
            }
        };
        held.since = Instant::now();
        let previous = self
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .replace(held);
        if let Some(previous) = previous {
            self.upstreams.give_back(previous);
        }
        Ok(response)
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        let held = self
            .held
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(held) = held {
            self.upstreams.give_back(held);
        }
    }
}

/// A new HTTP/1.1 connection to `authority`, driven by a task of its own.
async fn connect(authority: &str) -> Result<Held, BoxError> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(authority))
        .await
        .map_err(|_| format!("connecting to {authority} timed out"))??;
    stream.set_nodelay(true)?;
    let (mut sender, connection) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    });
    sender.ready().await?;
    Ok(Held {
        authority: authority.to_owned(),
        sender,
        since: Instant::now(),
    })
}
