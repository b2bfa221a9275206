//! An answer's body read off its connection as hyper's server polls it, by
//! the framing its head gave ([`Framing`]): a length, chunks and trailers,
//! or the upstream's close. The connection goes back to its pool only when
//! the body ended exactly where the framing said, with no byte after it.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use bytes::{Buf as _, Bytes};
use hyper::body::{Body, Frame, SizeHint};

use super::{
    Wire, WireError,
    framing::{BodyState, Framing},
};
use crate::proxy::pool::Pool;

/// An answer's body read from the connection as it is polled; the
/// connection goes back to the pool when the body ended exactly.
pub struct WireBody {
    wire: Option<Wire>,
    state: BodyState,
    reusable: bool,
    pool: Arc<Pool<Wire>>,
}

impl WireBody {
    pub(in crate::proxy) fn new(wire: Wire, framing: Framing, pool: Arc<Pool<Wire>>) -> Self {
        let mut body = Self {
            wire: Some(wire),
            state: framing.body,
            reusable: framing.reusable,
            pool,
        };
        if body.state == BodyState::Length(0) {
            body.finish();
        }
        body
    }

    /// The end of the body: the connection is given back if the exchange
    /// ended exactly where the framing said.
    fn finish(&mut self) {
        self.state = BodyState::Done;
        if let Some(wire) = self.wire.take()
            && self.reusable
            && wire.buf.is_empty()
        {
            self.pool.put(wire);
        }
    }

    fn step(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, WireError>>> {
        loop {
            let Some(wire) = self.wire.as_mut() else {
                return Poll::Ready(None);
            };
            match self.state {
                BodyState::Done => return Poll::Ready(None),
                BodyState::Length(0) => {
                    self.finish();
                    return Poll::Ready(None);
                }
                BodyState::Length(left) | BodyState::ChunkData(left) => {
                    if wire.buf.is_empty() {
                        if ready!(wire.poll_fill(cx))? == 0 {
                            return Poll::Ready(Some(Err(WireError::Truncated)));
                        }
                        continue;
                    }
                    let take = usize::try_from(left)
                        .unwrap_or(usize::MAX)
                        .min(wire.buf.len());
                    let data = wire.buf.split_to(take).freeze();
                    let left = left - take as u64;
                    self.state = match self.state {
                        BodyState::ChunkData(_) if left == 0 => BodyState::ChunkEnd,
                        BodyState::ChunkData(_) => BodyState::ChunkData(left),
                        _ => BodyState::Length(left),
                    };
                    if self.state == BodyState::Length(0) {
                        self.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                BodyState::Close => {
                    if wire.buf.is_empty() && ready!(wire.poll_fill(cx))? == 0 {
                        self.reusable = false;
                        self.finish();
                        return Poll::Ready(None);
                    }
                    let data = wire.buf.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                BodyState::ChunkSize => {
                    let size = ready!(wire.poll_chunk_size(cx))?;
                    self.state = if size == 0 {
                        BodyState::Trailers
                    } else {
                        BodyState::ChunkData(size)
                    };
                }
                BodyState::ChunkEnd => {
                    if wire.buf.len() < 2 {
                        if ready!(wire.poll_fill(cx))? == 0 {
                            return Poll::Ready(Some(Err(WireError::Truncated)));
                        }
                        continue;
                    }
                    if &wire.buf[..2] != b"\r\n" {
                        return Poll::Ready(Some(Err(WireError::Malformed(
                            "chunk without its CRLF",
                        ))));
                    }
                    wire.buf.advance(2);
                    self.state = BodyState::ChunkSize;
                }
                BodyState::Trailers => {
                    let trailers = ready!(wire.poll_trailers(cx))?;
                    self.finish();
                    if trailers.is_empty() {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
            }
        }
    }
}

impl Body for WireBody {
    type Data = Bytes;
    type Error = WireError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, WireError>>> {
        let frame = self.step(cx);
        if let Poll::Ready(Some(Err(_))) = frame {
            // The framing can't be trusted any more: the connection goes.
            self.wire = None;
            self.state = BodyState::Done;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.state == BodyState::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            BodyState::Length(left) => SizeHint::with_exact(left),
            BodyState::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}
