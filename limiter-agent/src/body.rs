//! The client's request body on its way to the upstream: streamed frame by
//! frame, with an idle timeout, and with its failures marked so the proxy can
//! answer the client's fault (400, 408) rather than blame the upstream (502).

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
    /// Bad chunk framing, a connection reset mid-body, and the like.
    #[error("the request body is malformed or was cut off: {0}")]
    Malformed(hyper::Error),
}

/// [`Incoming`] with an idle timeout between frames.
pub struct ClientBody {
    inner: Incoming,
    idle: Duration,
    /// Armed when the body first has to wait (a body-less request never does).
    deadline: Option<Pin<Box<Sleep>>>,
    /// Set once the last byte has been handed on; `None` for a body-less request.
    sent: Option<Arc<AtomicBool>>,
}

impl ClientBody {
    #[must_use]
    pub fn new(inner: Incoming, idle: Duration) -> Self {
        let sent = (!inner.is_end_stream()).then(Arc::default);
        Self {
            inner,
            idle,
            deadline: None,
            sent,
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
                if let Some(deadline) = &mut this.deadline {
                    deadline.as_mut().reset(Instant::now() + this.idle);
                }
                if frame.is_none() || this.inner.is_end_stream() {
                    this.mark_sent();
                }
                Poll::Ready(frame.map(|f| f.map_err(ClientBodyError::Malformed)))
            }
            Poll::Pending => {
                let idle = this.idle;
                let deadline = this
                    .deadline
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                ready!(deadline.as_mut().poll(cx));
                Poll::Ready(Some(Err(ClientBodyError::Stalled(this.idle))))
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
