//! HTTP/1.1 to the upstream written and read by the agent itself, for
//! requests without a body: most API traffic, and the allowed path's
//! benchmark.
//!
//! hyper's client runs each connection as a task of its own: a request goes
//! to it through a channel, the response comes back through another, and
//! its body through a third. Measured on the allowed path, that machinery
//! cost more of the agent's own CPU than hyper's whole server side. Here the
//! request's task writes the head, reads the answer's head and then, as
//! hyper's server polls the response body, reads the body from the socket
//! itself: no task, no channel. Requests with a body keep hyper's client
//! ([`super::upstream`]), which sends the body while it watches for an early
//! answer.
//!
//! A connection goes back to the pool only when its exchange ended exactly:
//! the answer framed by `Content-Length` or chunked encoding, read to its
//! end with no byte after it, HTTP/1.1 without `Connection: close`, and not
//! an answer whose body the method or status suppresses (HEAD, 204, 304),
//! which a broken upstream may still send, late. Before a pooled connection
//! takes a request, the socket itself is asked whether anything arrived.
//! Anything else (a body that runs to the close, a stray byte, a framing
//! error, a body the client left unread) closes it, so one exchange's bytes
//! can never be read as another's answer.

mod body;
mod framing;

use std::{
    future::Future as _,
    io,
    sync::Arc,
    task::{Context, Poll, ready},
};

use bytes::{Buf as _, BytesMut};
use http::{HeaderMap, Method};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    sync::OwnedSemaphorePermit,
};

use self::framing::{Framing, MAX_HEADERS, trailer_map};
pub(super) use self::framing::{carries, encode_head};
pub use self::{body::WireBody, framing::RawHead};
use super::pool::Pooled;

/// Longest answer head, informational answers included.
const MAX_HEAD: usize = 64 * 1024;
/// Longest chunk-size line (extensions included) or trailer section.
const MAX_LINE: usize = 8 * 1024;
/// Room made in the read buffer before each read.
const READ_CHUNK: usize = 16 * 1024;

/// An upstream connection carrying requests written here.
pub(in crate::proxy) struct Wire {
    stream: TcpStream,
    /// Read from the socket and not consumed yet.
    buf: BytesMut,
    /// `host:port` it was opened to; a reload may move the upstream.
    authority: Arc<str>,
    /// One of `max_upstream_connections`, for as long as the socket is open.
    _permit: OwnedSemaphorePermit,
}

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("upstream connection: {0}")]
    Io(#[from] io::Error),
    /// The connection was found closed as the request was written: the
    /// upstream never saw it.
    #[error("upstream connection closed before the request was sent")]
    NotSent,
    /// The connection closed before a byte of the answer: on a pooled
    /// connection, the upstream's idle close racing the reuse.
    #[error("upstream closed the connection before answering")]
    ClosedEarly,
    #[error("upstream closed the connection inside its answer")]
    Truncated,
    #[error("malformed upstream answer: {0}")]
    Malformed(&'static str),
}

impl Wire {
    pub(in crate::proxy) fn new(
        stream: TcpStream,
        authority: Arc<str>,
        permit: OwnedSemaphorePermit,
    ) -> Self {
        Self {
            stream,
            buf: BytesMut::new(),
            authority,
            _permit: permit,
        }
    }

    /// Whether the connection can take a request: nothing arrived while it
    /// was idle (an upstream's close, or bytes no request asked for).
    ///
    /// Asks the socket itself, just before the request is written: tokio's
    /// readiness tells only what the reactor saw at its last turn, and a
    /// stray byte an upstream writes late (a body after its answer to HEAD,
    /// 204 or 304, sent in a write of its own) could land after that turn and
    /// be read as the next request's answer. What arrives after this look and
    /// before the request is written (microseconds) can't be told from the
    /// answer: HTTP/1.1 has no way to.
    fn quiet(&self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut probe = [std::mem::MaybeUninit::uninit()];
        matches!(
            socket2::SockRef::from(&self.stream).peek(&mut probe),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock
        )
    }

    /// Writes the head of a request without a body and reads the head of its
    /// answer, informational answers skipped.
    pub(in crate::proxy) async fn exchange(
        &mut self,
        head: &[u8],
        method: &Method,
    ) -> Result<(RawHead, Framing), WireError> {
        if let Err(e) = self.stream.write_all(head).await {
            return Err(match e.kind() {
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => WireError::NotSent,
                _ => e.into(),
            });
        }
        let mut answered = false;
        let mut informational = 0;
        loop {
            if !self.buf.is_empty() {
                answered = true;
                if let Some(parsed) =
                    framing::parse_head(&mut self.buf, method, &mut informational)?
                {
                    return Ok(parsed);
                }
            }
            if self.buf.len() >= MAX_HEAD {
                return Err(WireError::Malformed("answer head too long"));
            }
            self.buf.reserve(READ_CHUNK);
            let read = self.stream.read_buf(&mut self.buf).await;
            match read {
                Ok(0) if answered => return Err(WireError::Truncated),
                Ok(0) => return Err(WireError::ClosedEarly),
                Ok(_) => {}
                Err(e) if !answered && e.kind() == io::ErrorKind::ConnectionReset => {
                    return Err(WireError::ClosedEarly);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Reads more into the buffer; `Ok(0)` at the upstream's close.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
            self.buf.reserve(READ_CHUNK);
        }
        // Through `AsyncRead`, whose short reads clear the socket's
        // readiness: the next exchange waits for its answer instead of
        // first asking the socket only to hear it would block.
        let read = self.stream.read_buf(&mut self.buf);
        std::pin::pin!(read).poll(cx)
    }

    /// Reads a chunk-size line: the next chunk's size (0 for the last).
    fn poll_chunk_size(&mut self, cx: &mut Context<'_>) -> Poll<Result<u64, WireError>> {
        loop {
            if !self.buf.is_empty() && !self.buf[0].is_ascii_hexdigit() {
                return Poll::Ready(Err(WireError::Malformed("invalid chunk size")));
            }
            // The line up to its LF, which must follow a CR: a bare LF in an
            // extension is refused, as hyper does.
            if let Some(lf) = self.buf.iter().position(|b| *b == b'\n') {
                return Poll::Ready(match httparse::parse_chunk_size(&self.buf[..=lf]) {
                    Ok(httparse::Status::Complete((len, size))) if len == lf + 1 => {
                        self.buf.advance(len);
                        Ok(size)
                    }
                    _ => Err(WireError::Malformed("invalid chunk size")),
                });
            }
            if self.buf.len() > MAX_LINE {
                return Poll::Ready(Err(WireError::Malformed("chunk-size line too long")));
            }
            if ready!(self.poll_fill(cx))? == 0 {
                return Poll::Ready(Err(WireError::Truncated));
            }
        }
    }

    /// Reads the trailer section after the last chunk, to its empty line.
    fn poll_trailers(&mut self, cx: &mut Context<'_>) -> Poll<Result<HeaderMap, WireError>> {
        loop {
            let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
            match httparse::parse_headers(&self.buf, &mut fields) {
                Ok(httparse::Status::Complete((len, fields))) => {
                    let trailers = trailer_map(fields)?;
                    self.buf.advance(len);
                    return Poll::Ready(Ok(trailers));
                }
                Ok(httparse::Status::Partial) => {
                    if self.buf.len() > MAX_LINE {
                        return Poll::Ready(Err(WireError::Malformed("trailers too long")));
                    }
                    if ready!(self.poll_fill(cx))? == 0 {
                        return Poll::Ready(Err(WireError::Truncated));
                    }
                }
                Err(_) => return Poll::Ready(Err(WireError::Malformed("invalid trailers"))),
            }
        }
    }
}

impl Pooled for Wire {
    fn authority(&self) -> &str {
        &self.authority
    }

    fn fit(&self) -> bool {
        self.quiet()
    }

    /// Lets go of a read buffer a large head or body grew.
    fn park(&mut self) {
        if self.buf.capacity() > 2 * READ_CHUNK {
            self.buf = BytesMut::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::pool::Pool;

    /// A connection to a server that answers its first request with `raw`
    /// and then keeps the socket open until the test ends.
    async fn answering(raw: &'static [u8]) -> Wire {
        served(raw, false).await
    }

    /// A connection to a server that reads the first request, writes `raw`
    /// and then closes the socket (`close`) or keeps it open.
    async fn served(raw: &'static [u8], close: bool) -> Wire {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut head = [0u8; 1024];
            let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut head).await;
            stream.write_all(raw).await.unwrap();
            if !close {
                std::future::pending::<()>().await;
            }
            drop(stream);
        });
        Wire::new(
            TcpStream::connect(addr).await.unwrap(),
            "a".into(),
            spare_permit(),
        )
    }

    /// A connection permit of a pool of its own.
    fn spare_permit() -> OwnedSemaphorePermit {
        Arc::new(tokio::sync::Semaphore::new(1))
            .try_acquire_owned()
            .unwrap()
    }

    /// Reads the answer `raw` to `method` through a real socket: the body's
    /// bytes, its trailers, and whether the connection went back to the pool.
    async fn read_answer(raw: &'static [u8], method: Method) -> (Vec<u8>, Option<HeaderMap>, bool) {
        use http_body_util::BodyExt as _;
        let pool = Arc::new(Pool::default());
        let mut wire = answering(raw).await;
        let (_, framing) = wire
            .exchange(b"GET / HTTP/1.1\r\n\r\n", &method)
            .await
            .unwrap();
        let collected = WireBody::new(wire, framing, pool.clone())
            .collect()
            .await
            .unwrap();
        let trailers = collected.trailers().cloned();
        (collected.to_bytes().to_vec(), trailers, pool.len() == 1)
    }

    /// A chunk-size line with a bare LF in its extension is refused, and the
    /// connection goes.
    #[tokio::test]
    async fn a_malformed_body_is_an_error_and_closes_its_connection() {
        use http_body_util::BodyExt as _;
        let mut wire = answering(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2;a=\nb\r\nok\r\n0\r\n\r\n",
        )
        .await;
        let (_, framing) = wire
            .exchange(b"GET / HTTP/1.1\r\n\r\n", &Method::GET)
            .await
            .unwrap();
        let pool = Arc::new(Pool::default());
        let body = WireBody::new(wire, framing, pool.clone()).collect().await;
        assert!(body.is_err(), "a bare LF in a chunk extension");
        assert_eq!(pool.len(), 0);
    }

    #[tokio::test]
    async fn a_refused_head_and_an_early_close_are_told_apart() {
        let refused = answering(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
            .await
            .exchange(b"GET / HTTP/1.1\r\n\r\n", &Method::GET)
            .await;
        assert!(matches!(refused, Err(WireError::Malformed(_))));
        let closed = served(b"", true)
            .await
            .exchange(b"GET / HTTP/1.1\r\n\r\n", &Method::GET)
            .await;
        assert!(matches!(closed, Err(WireError::ClosedEarly)));
    }

    /// A connection to a server that writes `sent` at once and then, if
    /// `close`, closes; and what the server is left holding.
    async fn greeted(sent: &'static [u8], close: bool) -> Wire {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            stream.write_all(sent).await.unwrap();
            if !close {
                std::future::pending::<()>().await;
            }
        });
        Wire::new(
            TcpStream::connect(addr).await.unwrap(),
            "a".into(),
            spare_permit(),
        )
    }

    /// A pooled connection is unfit once the upstream closed it or wrote to
    /// it unasked, and fit while nothing came or everything that came was
    /// read.
    #[tokio::test]
    async fn a_pooled_connection_is_quiet_until_the_upstream_speaks() {
        let idle = greeted(b"", false).await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(idle.quiet(), "nothing arrived");
        let closed = greeted(b"", true).await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!closed.quiet(), "the upstream closed it");
        let stray = greeted(b"X", false).await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!stray.quiet(), "a byte no request asked for");
        let mut exact = greeted(b"four", false).await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let mut four = [0u8; 4];
        exact.stream.read_exact(&mut four).await.unwrap();
        assert!(exact.quiet(), "everything that came was read");
    }

    /// A byte the reactor has not seen yet (the runtime blocked, its event
    /// loop not turned since the byte came) still makes the connection
    /// unfit: the socket itself is asked.
    #[tokio::test]
    async fn a_stray_byte_the_reactor_has_not_seen_retires_the_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            io::Write::write_all(&mut stream, b"X").unwrap();
            std::thread::sleep(std::time::Duration::from_millis(500));
        });
        let wire = Wire::new(
            TcpStream::connect(addr).await.unwrap(),
            "a".into(),
            spare_permit(),
        );
        // Blocks the runtime's only thread: no reactor turn.
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(!wire.quiet());
        server.join().unwrap();
    }

    /// The sweep finds every pooled connection the upstream closed, however
    /// many: the checks are not cut short by the task's tokio budget.
    #[tokio::test]
    async fn the_sweep_closes_every_connection_the_upstream_closed() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                drop(stream);
            }
        });
        let pool = Pool::default();
        for _ in 0..300 {
            let stream = TcpStream::connect(addr).await.unwrap();
            pool.put(Wire::new(stream, "a".into(), spare_permit()));
        }
        let open = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert_eq!(pool.len(), 300);
        pool.sweep("a");
        assert_eq!(pool.len(), 0, "every closed connection found");
        drop(open);
    }

    #[tokio::test]
    async fn bodies_are_read_by_their_framing_and_exact_ends_reused() {
        let (body, trailers, reused) = read_answer(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-sum: 1\r\n\r\n",
            Method::GET,
        )
        .await;
        assert_eq!(body, b"hello world");
        assert_eq!(trailers.unwrap()["x-sum"], "1");
        assert!(reused);
        let (body, _, reused) = read_answer(
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
            Method::GET,
        )
        .await;
        assert_eq!((body.as_slice(), reused), (&b"ok"[..], true));
        let (body, _, reused) = read_answer(
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokX",
            Method::GET,
        )
        .await;
        assert_eq!(
            (body.as_slice(), reused),
            (&b"ok"[..], false),
            "a stray byte"
        );
        let (body, _, reused) = read_answer(
            b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n",
            Method::HEAD,
        )
        .await;
        assert_eq!(
            (body.as_slice(), reused),
            (&b""[..], false),
            "a body the upstream may still send, late"
        );
    }
}
