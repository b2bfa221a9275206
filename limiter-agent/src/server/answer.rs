//! A response body on its way to the client: it keeps its request in flight
//! (and the request's in-flight slots) until it is sent, hands hyper pieces
//! of at most [`PIECE`] bytes, and tells the connection's tracker while a
//! piece waits for the client to take it. The tracker can cut it: the body
//! and what it holds (its upstream connection, its slots) are let go at once,
//! and the stream ends with an error when hyper next asks for it.
//!
//! Pieces are bounded so the send deadline measures the client, not the
//! upstream: an upstream read can yield hundreds of kilobytes at once, and
//! the deadline is for one piece. A client that takes less than a piece per
//! `send_timeout` (0.5 KiB/s at the defaults) is cut.

use std::{
    pin::Pin,
    sync::{Arc, Mutex, PoisonError, Weak},
    task::{Context, Poll},
};

use bytes::{Buf as _, Bytes};
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use super::activity::{Cut, InFlight, Tracker};

/// Largest piece handed to hyper at once.
pub const PIECE: usize = 16 * 1024;

/// The answer was cut: the client took no piece for `send_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("the client took nothing of the answer for send_timeout; cut")]
pub struct Stalled;

/// What an answer holds until it is sent or cut.
struct Held<B> {
    body: B,
    /// What is left of a data frame larger than a piece.
    rest: Option<Bytes>,
    _in_flight: InFlight,
}

/// The body and what it holds; `None` once cut.
struct Slot<B>(Mutex<Option<Held<B>>>);

impl<B: Send> Cut for Slot<B> {
    fn cut(&self) {
        let held = self.0.lock().unwrap_or_else(PoisonError::into_inner).take();
        drop(held);
    }
}

/// A response body that keeps its request in flight until it is sent. `H`
/// is whatever else the request holds until then (its in-flight slots):
/// kept until hyper lets go of the answer, even once cut, so answers hyper
/// still holds stay under the caps (the connection is closed when a cut one
/// lingers).
pub struct Tracked<B, H> {
    held: Arc<Slot<B>>,
    tracker: Arc<Tracker>,
    id: u64,
    /// Handed a piece (or the head) that hyper has not come back for yet.
    waiting: bool,
    _holds: H,
}

impl<B, H> Tracked<B, H>
where
    B: Send + 'static,
    H: Send + 'static,
{
    /// The answer's head is handed to hyper with this body: it waits on the
    /// client until hyper first asks for a piece.
    pub fn new(body: B, in_flight: InFlight, holds: H) -> Self {
        let tracker = in_flight.tracker.clone();
        let id = in_flight.id;
        let held = Arc::new(Slot(Mutex::new(Some(Held {
            body,
            rest: None,
            _in_flight: in_flight,
        }))));
        let weak: Weak<dyn Cut> = Arc::downgrade(&held) as Weak<dyn Cut>;
        tracker.answer(id, weak);
        tracker.with(|a| a.handed(id, Instant::now()));
        Self {
            held,
            tracker,
            id,
            waiting: true,
            _holds: holds,
        }
    }
}

impl<B, H> Body for Tracked<B, H>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: From<Stalled>,
    H: Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        if this.waiting {
            this.waiting = false;
            this.tracker.with(|a| a.taken(this.id));
        }
        let polled = {
            let mut held = this.held.0.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(held) = held.as_mut() else {
                return Poll::Ready(Some(Err(Stalled.into())));
            };
            match held.rest.take() {
                Some(rest) => Poll::Ready(Some(Ok(Frame::data(piece(rest, &mut held.rest))))),
                None => Pin::new(&mut held.body).poll_frame(cx).map(|frame| {
                    frame.map(|frame| {
                        frame.map(|frame| match frame.into_data() {
                            Ok(data) => Frame::data(piece(data, &mut held.rest)),
                            Err(frame) => frame,
                        })
                    })
                }),
            }
        };
        // The last piece too: hyper may hold an answer it has the whole of
        // without finishing it (an HTTP/2 stream with no window). One it
        // finishes is dropped, which ends the wait.
        if matches!(polled, Poll::Ready(Some(Ok(_)))) {
            this.waiting = true;
            this.tracker.with(|a| a.handed(this.id, Instant::now()));
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        // A cut answer has not ended: hyper must ask, and be told.
        self.held
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .is_some_and(|held| held.rest.is_none() && held.body.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let held = self.held.0.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(held) = held.as_ref() else {
            return SizeHint::default();
        };
        let rest = held.rest.as_ref().map_or(0, |r| r.len() as u64);
        let inner = held.body.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + rest);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + rest);
        }
        hint
    }
}

/// The first piece of `data`, the rest left in `rest`. A piece cut from a
/// larger frame is copied: hyper may keep it for as long as a stream's
/// window stays shut, and a view would keep the whole upstream read buffer.
fn piece(mut data: Bytes, rest: &mut Option<Bytes>) -> Bytes {
    if data.len() <= PIECE {
        return data;
    }
    let first = Bytes::copy_from_slice(&data[..PIECE]);
    data.advance(PIECE);
    *rest = Some(data);
    first
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http_body_util::{BodyExt as _, Full};

    use super::*;
    use crate::server::activity::{Expiry, TEST_TIMEOUTS as TIMEOUTS};

    type TestBody = http_body_util::combinators::BoxBody<Bytes, crate::proxy::BoxError>;

    fn body(bytes: usize) -> TestBody {
        Full::new(Bytes::from(vec![b'x'; bytes]))
            .map_err(|e| match e {})
            .boxed()
    }

    #[tokio::test]
    async fn large_frames_are_handed_in_pieces_and_arrive_whole() {
        let connection = Tracker::new(TIMEOUTS);
        let answer = Tracked::new(body(3 * PIECE + 5), connection.request(), ());
        assert_eq!(answer.size_hint().exact(), Some(3 * PIECE as u64 + 5));
        let mut pinned = std::pin::pin!(answer);
        let mut sizes = Vec::new();
        while let Some(frame) = pinned.frame().await {
            sizes.push(frame.unwrap().into_data().unwrap().len());
        }
        assert_eq!(sizes, [PIECE, PIECE, PIECE, 5]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cut_answer_lets_go_of_its_body_at_once_and_of_its_slots_with_hyper() {
        let connection = Tracker::new(TIMEOUTS);
        let slots = Arc::new(());
        let answer = Tracked::new(body(10), connection.request(), slots.clone());
        // Nothing asked for a piece yet: it waits on the client.
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(connection.cut_stalled(), 1);
        assert!(answer.held.0.lock().unwrap().is_none(), "the body let go");
        assert_eq!(
            Arc::strong_count(&slots),
            2,
            "the slots stay while hyper holds it"
        );
        assert!(!answer.is_end_stream(), "a cut answer has not ended");
        assert_eq!(connection.cut_stalled(), 0, "cut once");
        // Held a send timeout more, the connection is to be closed.
        let lingering = tokio::spawn({
            let connection = connection.clone();
            async move { connection.expired().await }
        });
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(lingering.await.unwrap(), Expiry::CutLingers);
        let mut pinned = std::pin::pin!(answer);
        assert!(
            pinned.frame().await.unwrap().is_err(),
            "asked again: an error"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_cut_answer_hyper_let_go_of_closes_nothing() {
        let connection = Tracker::new(TIMEOUTS);
        let slots = Arc::new(());
        let answer = Tracked::new(body(10), connection.request(), slots.clone());
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(connection.cut_stalled(), 1);
        drop(answer);
        assert_eq!(Arc::strong_count(&slots), 1, "the slots come back with it");
        let timer = tokio::spawn({
            let connection = connection.clone();
            async move { connection.expired().await }
        });
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(timer.await.unwrap(), Expiry::Idle, "only the idle timeout");
    }
}
