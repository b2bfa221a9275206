//! The client's request body on its way to the upstream: streamed frame by
//! frame, with an idle timeout and a minimum rate, and with its failures
//! marked so the proxy can answer the client's fault (400, 408) rather than
//! blame the upstream (502).
//!
//! The rate rule bounds a body trickled in just under the idle timeout, which
//! would otherwise hold its upstream connection for as long as the client
//! likes: the time spent waiting on the client, in all, may not pass
//! `body_read_timeout` plus one second per `body_min_rate` bytes received.
//! Time the upstream spends not reading (backpressure) is not the client's
//! and is not counted.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::{Instant, Sleep};

/// Why the client's body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ClientBodyError {
    /// No data for longer than `body_read_timeout`.
    #[error("the request body stalled for longer than {0:?}")]
    Stalled(Duration),
    /// Data slower than `body_min_rate` bytes per second on average.
    #[error("the request body came slower than {0} bytes per second")]
    TooSlow(u64),
    /// Bad chunk framing, a connection reset mid-body, and the like.
    #[error("the request body is malformed or was cut off: {0}")]
    Malformed(hyper::Error),
}

/// [`Incoming`] with an idle timeout between frames and a minimum rate.
pub struct ClientBody {
    inner: Incoming,
    idle: Duration,
    /// Bytes per second; 0 = no rate rule.
    min_rate: u64,
    /// Armed when the body first has to wait (a body-less request never does).
    deadline: Option<Pin<Box<Sleep>>>,
    /// Since when the body waits on the client, while it does.
    waiting_since: Option<Instant>,
    /// Time spent waiting on the client before `waiting_since`.
    waited: Duration,
    received: u64,
    /// Set once the last byte has been handed on; `None` for a body-less request.
    sent: Option<Arc<AtomicBool>>,
}

impl ClientBody {
    #[must_use]
    pub fn new(inner: Incoming, idle: Duration, min_rate: u64) -> Self {
        let sent = (!inner.is_end_stream()).then(Arc::default);
        Self {
            inner,
            idle,
            min_rate,
            deadline: None,
            waiting_since: None,
            waited: Duration::ZERO,
            received: 0,
            sent,
        }
    }

    /// How much longer, from the start of a wait, the client may keep the
    /// body waiting: the idle timeout, or less when the rate rule's
    /// allowance is nearly spent; and which rule that is.
    fn allowance(&self) -> (Duration, ClientBodyError) {
        let stalled = (self.idle, ClientBodyError::Stalled(self.idle));
        if self.min_rate == 0 {
            return stalled;
        }
        let earned =
            self.idle + Duration::from_millis(self.received.saturating_mul(1000) / self.min_rate);
        let left = earned.saturating_sub(self.waited);
        if left < self.idle {
            (left, ClientBodyError::TooSlow(self.min_rate))
        } else {
            stalled
        }
    }

    /// A flag set once the whole body has been handed on (`None`: there is no body).
    #[must_use]
    pub fn sent(&self) -> Option<Arc<AtomicBool>> {
        self.sent.clone()
    }

    fn mark_sent(&self) {
        if let Some(sent) = &self.sent {
            sent.store(true, Ordering::Release);
        }
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                if let Some(since) = this.waiting_since.take() {
                    this.waited += since.elapsed();
                }
                if let Some(Ok(data)) = frame.as_ref().map(|f| f.as_ref().map(Frame::data_ref)) {
                    this.received += data.map_or(0, |d| d.len() as u64);
                }
                if frame.is_none() || this.inner.is_end_stream() {
                    this.mark_sent();
                }
                Poll::Ready(frame.map(|f| f.map_err(ClientBodyError::Malformed)))
            }
            Poll::Pending => {
                // A new wait on the client: its deadline, from now.
                if this.waiting_since.is_none() {
                    let now = Instant::now();
                    this.waiting_since = Some(now);
                    let at = now + this.allowance().0;
                    match &mut this.deadline {
                        Some(deadline) => deadline.as_mut().reset(at),
                        None => this.deadline = Some(Box::pin(tokio::time::sleep_until(at))),
                    }
                }
                let Some(deadline) = &mut this.deadline else {
                    return Poll::Pending;
                };
                ready!(deadline.as_mut().poll(cx));
                Poll::Ready(Some(Err(this.allowance().1)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The [`ClientBodyError`] somewhere in `error`'s source chain, if any.
#[must_use]
pub fn client_fault<'e>(
    error: &'e (dyn std::error::Error + 'static),
) -> Option<&'e ClientBodyError> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<ClientBodyError>() {
            return Some(found);
        }
        current = e.source();
    }
    None
}
