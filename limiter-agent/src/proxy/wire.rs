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

use std::{
    future::Future as _,
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Instant,
};

use bytes::{Buf as _, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, header, request};
use hyper::body::{Body, Frame, SizeHint};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    sync::OwnedSemaphorePermit,
};

use super::upstream::Upstreams;

/// Most header fields in an upstream's answer (hyper's client allows 100).
const MAX_HEADERS: usize = 100;
/// Longest answer head, informational answers included.
const MAX_HEAD: usize = 64 * 1024;
/// Longest chunk-size line (extensions included) or trailer section.
const MAX_LINE: usize = 8 * 1024;
/// Most informational (1xx) answers before the final one.
const MAX_INFORMATIONAL: usize = 16;
/// Room made in the read buffer before each read.
const READ_CHUNK: usize = 16 * 1024;

/// An upstream connection carrying requests written here.
pub(super) struct Wire {
    stream: TcpStream,
    /// Read from the socket and not consumed yet.
    buf: BytesMut,
    /// `host:port` it was opened to; a reload may move the upstream.
    pub(super) authority: Arc<str>,
    pub(super) idle_since: Instant,
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
    pub(super) fn new(
        stream: TcpStream,
        authority: Arc<str>,
        permit: OwnedSemaphorePermit,
    ) -> Self {
        Self {
            stream,
            buf: BytesMut::new(),
            authority,
            idle_since: Instant::now(),
            _permit: permit,
        }
    }

    /// Lets go of a read buffer a large head or body grew, before the
    /// connection waits in the pool.
    pub(super) fn shrink(&mut self) {
        if self.buf.capacity() > 2 * READ_CHUNK {
            self.buf = BytesMut::new();
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
    pub(super) fn quiet(&self) -> bool {
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
    pub(super) async fn exchange(
        &mut self,
        head: &[u8],
        method: &Method,
    ) -> Result<(Response<()>, Framing), WireError> {
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
                if let Some(parsed) = self.parse_head(method, &mut informational)? {
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

    /// The answer's head when the buffer holds all of it; informational
    /// answers are consumed and skipped.
    fn parse_head(
        &mut self,
        method: &Method,
        informational: &mut usize,
    ) -> Result<Option<(Response<()>, Framing)>, WireError> {
        loop {
            let mut slots = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
            let mut response = httparse::Response::new(&mut []);
            let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
                &mut response,
                &self.buf,
                &mut slots,
            ) {
                Ok(httparse::Status::Complete(len)) => len,
                Ok(httparse::Status::Partial) => return Ok(None),
                Err(_) => return Err(WireError::Malformed("invalid answer head")),
            };
            let code = response.code.unwrap_or(0);
            let reason: Box<str> = response.reason.unwrap_or("").into();
            if (100..200).contains(&code) {
                // No upgrade was asked for (`Upgrade` is not forwarded).
                if code == 101 {
                    return Err(WireError::Malformed("unrequested protocol switch"));
                }
                *informational += 1;
                if *informational > MAX_INFORMATIONAL {
                    return Err(WireError::Malformed("too many informational answers"));
                }
                self.buf.advance(len);
                continue;
            }
            let status = StatusCode::from_u16(code)
                .map_err(|_| WireError::Malformed("invalid status code"))?;
            let http11 = response.version == Some(1);
            // Where each field's name and value sit in the head, so the head
            // can be split off and the values share its bytes.
            let base = self.buf.as_ptr() as usize;
            let mut fields = Vec::with_capacity(response.headers.len());
            for field in response.headers.iter() {
                let name = HeaderName::from_bytes(field.name.as_bytes())
                    .map_err(|_| WireError::Malformed("invalid header name"))?;
                let start = field.value.as_ptr() as usize - base;
                fields.push((name, start, start + field.value.len()));
            }
            let head = self.buf.split_to(len).freeze();
            let mut headers = HeaderMap::with_capacity(fields.len());
            for (name, start, end) in fields {
                let value = HeaderValue::from_maybe_shared(head.slice(start..end))
                    .map_err(|_| WireError::Malformed("invalid header value"))?;
                headers.append(name, value);
            }
            let framing = Framing::of(&headers, status, method, http11)?;
            // Read by its transfer coding, an answer that also carries a
            // length goes on without it (RFC 9112 §6.3, 3): the client must
            // not frame it by a length the body does not have.
            if headers.contains_key(header::TRANSFER_ENCODING) {
                headers.remove(header::CONTENT_LENGTH);
            }
            let mut answer = Response::new(());
            *answer.status_mut() = status;
            *answer.headers_mut() = headers;
            // A reason phrase of the upstream's own reaches the client, as
            // through hyper's client.
            if status.canonical_reason() != Some(&*reason)
                && let Ok(phrase) = hyper::ext::ReasonPhrase::try_from(reason.as_bytes())
            {
                answer.extensions_mut().insert(phrase);
            }
            return Ok(Some((answer, framing)));
        }
    }

    /// Reads more into the buffer; `Ok(0)` at the upstream's close.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
            self.buf.reserve(READ_CHUNK);
        }
        // Through `AsyncRead`, whose short reads clear the readiness that
        // `quiet` relies on.
        let read = self.stream.read_buf(&mut self.buf);
        std::pin::pin!(read).poll(cx)
    }
}

/// How an answer's body is delimited (RFC 9112 §6.3), and whether the
/// connection may carry another exchange after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Framing {
    body: BodyState,
    reusable: bool,
}

impl Framing {
    fn of(
        headers: &HeaderMap,
        status: StatusCode,
        method: &Method,
        http11: bool,
    ) -> Result<Self, WireError> {
        let close = headers
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| has_token(v.as_bytes(), b"close"));
        let reusable = http11 && !close;
        if *method == Method::HEAD
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            // No body, whatever the fields say; but an upstream that writes
            // one anyway (a known bug class) may write it late, after the
            // next request went out on the connection, where it would be
            // read as that request's answer. Such a connection is closed.
            return Ok(Self {
                body: BodyState::Length(0),
                reusable: false,
            });
        }
        let mut codings = headers.get_all(header::TRANSFER_ENCODING).iter().peekable();
        if codings.peek().is_some() && !http11 {
            // HTTP/1.0 has no transfer codings (RFC 9112 §6.1).
            return Err(WireError::Malformed(
                "Transfer-Encoding in an HTTP/1.0 answer",
            ));
        }
        if codings.peek().is_some() {
            // Chunked last means chunked; any other coding runs to the
            // close. With a `Content-Length` too the answer is suspect: read
            // by the transfer coding, never reused (§6.3, 3).
            let chunked = codings
                .last()
                .and_then(|v| v.as_bytes().rsplit(|b| *b == b',').next())
                .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            let both = headers.contains_key(header::CONTENT_LENGTH);
            return Ok(Self {
                body: if chunked {
                    BodyState::ChunkSize
                } else {
                    BodyState::Close
                },
                reusable: reusable && chunked && !both,
            });
        }
        let mut length = None;
        for value in headers.get_all(header::CONTENT_LENGTH) {
            for item in value.as_bytes().split(|b| *b == b',') {
                let n = parse_length(item.trim_ascii())
                    .ok_or(WireError::Malformed("invalid Content-Length"))?;
                if length.is_some_and(|seen| seen != n) {
                    return Err(WireError::Malformed("conflicting Content-Length"));
                }
                length = Some(n);
            }
        }
        Ok(match length {
            Some(n) => Self {
                body: BodyState::Length(n),
                reusable,
            },
            None => Self {
                body: BodyState::Close,
                reusable: false,
            },
        })
    }
}

fn parse_length(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

fn has_token(list: &[u8], token: &[u8]) -> bool {
    list.split(|b| *b == b',')
        .any(|item| item.trim_ascii().eq_ignore_ascii_case(token))
}

/// Where reading an answer's body stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BodyState {
    /// This many bytes left.
    Length(u64),
    /// Until the upstream closes.
    Close,
    /// Before a chunk-size line.
    ChunkSize,
    /// Inside a chunk, this many bytes left.
    ChunkData(u64),
    /// The CRLF after a chunk's data.
    ChunkEnd,
    /// After the last chunk: trailer fields, then an empty line.
    Trailers,
    Done,
}

/// The request head as it goes to the upstream: the origin-form target and
/// the headers as `forward` left them, as hyper's client writes a request
/// whose body is empty (no framing header is added: neither means no body).
pub(super) fn encode_head(parts: &request::Parts, out: &mut Vec<u8>) {
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    let target = parts
        .uri
        .path_and_query()
        .map_or("/", http::uri::PathAndQuery::as_str);
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Whether a request can go this way: no body, and no `Content-Length` that
/// says otherwise (the upstream would read the next request as its body).
pub(super) fn carries(parts: &request::Parts, body_ended: bool) -> bool {
    body_ended
        && parts.method != Method::CONNECT
        && parts
            .headers
            .get_all(header::CONTENT_LENGTH)
            .iter()
            .all(|v| v.as_bytes().trim_ascii() == b"0")
}

/// An answer's body read from the connection as it is polled; the
/// connection goes back to the pool when the body ended exactly.
pub struct WireBody {
    wire: Option<Wire>,
    state: BodyState,
    reusable: bool,
    upstreams: Arc<Upstreams>,
}

impl WireBody {
    pub(super) fn new(wire: Wire, framing: Framing, upstreams: Arc<Upstreams>) -> Self {
        let mut body = Self {
            wire: Some(wire),
            state: framing.body,
            reusable: framing.reusable,
            upstreams,
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
            self.upstreams.give_back_wire(wire);
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

impl Wire {
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

fn trailer_map(fields: &[httparse::Header<'_>]) -> Result<HeaderMap, WireError> {
    let mut trailers = HeaderMap::new();
    for field in fields {
        let name = HeaderName::from_bytes(field.name.as_bytes())
            .map_err(|_| WireError::Malformed("invalid trailer name"))?;
        let value = HeaderValue::from_bytes(field.value)
            .map_err(|_| WireError::Malformed("invalid trailer value"))?;
        trailers.append(name, value);
    }
    Ok(trailers)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn framing(head: &[(&str, &str)], status: u16, method: &Method) -> Result<Framing, WireError> {
        let mut headers = HeaderMap::new();
        for (n, v) in head {
            headers.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        Framing::of(
            &headers,
            StatusCode::from_u16(status).unwrap(),
            method,
            true,
        )
    }

    /// A connection to a server that answers its first request with `raw`
    /// and then keeps the socket open until the test ends.
    async fn answering(raw: &'static [u8]) -> Wire {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut head = [0u8; 1024];
            let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut head).await;
            stream.write_all(raw).await.unwrap();
            std::future::pending::<()>().await;
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
        let upstreams = Arc::new(Upstreams::new(1000));
        let mut wire = answering(raw).await;
        let (_, framing) = wire
            .exchange(b"GET / HTTP/1.1\r\n\r\n", &method)
            .await
            .unwrap();
        let collected = WireBody::new(wire, framing, upstreams.clone())
            .collect()
            .await
            .unwrap();
        let trailers = collected.trailers().cloned();
        (
            collected.to_bytes().to_vec(),
            trailers,
            upstreams.idle() == 1,
        )
    }

    #[tokio::test]
    async fn malformed_answers_are_errors() {
        use http_body_util::BodyExt as _;
        let head = |raw| async move {
            answering(raw)
                .await
                .exchange(b"GET / HTTP/1.1\r\n\r\n", &Method::GET)
                .await
                .map(|_| ())
        };
        let informational: &'static [u8] = "HTTP/1.1 100 Continue\r\n\r\n"
            .repeat(MAX_INFORMATIONAL + 1)
            .leak()
            .as_bytes();
        assert!(head(informational).await.is_err(), "endless 1xx answers");
        assert!(
            head(b"HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n")
                .await
                .is_err()
        );
        assert!(
            head(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
                .await
                .is_err()
        );
        assert!(
            head(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n")
                .await
                .is_err()
        );

        let mut wire = answering(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2;a=\nb\r\nok\r\n0\r\n\r\n",
        )
        .await;
        let (_, framing) = wire
            .exchange(b"GET / HTTP/1.1\r\n\r\n", &Method::GET)
            .await
            .unwrap();
        let upstreams = Arc::new(Upstreams::new(1000));
        let body = WireBody::new(wire, framing, upstreams.clone())
            .collect()
            .await;
        assert!(body.is_err(), "a bare LF in a chunk extension");
        assert_eq!(upstreams.idle(), 0);
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
        let upstreams = Upstreams::new(1000);
        for _ in 0..300 {
            let stream = TcpStream::connect(addr).await.unwrap();
            upstreams.give_back_wire(Wire::new(stream, "a".into(), spare_permit()));
        }
        let open = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert_eq!(upstreams.idle(), 300);
        upstreams.sweep("a");
        assert_eq!(upstreams.idle(), 0, "every closed connection found");
        drop(open);
    }

    #[tokio::test]
    async fn an_upstreams_own_reason_phrase_is_kept() {
        let mut wire =
            answering(b"HTTP/1.1 499 Client Went Away\r\ncontent-length: 0\r\n\r\n").await;
        let (answer, _) = wire
            .exchange(b"GET / HTTP/1.1\r\n\r\n", &Method::GET)
            .await
            .unwrap();
        let phrase = answer.extensions().get::<hyper::ext::ReasonPhrase>();
        assert_eq!(
            phrase.map(hyper::ext::ReasonPhrase::as_bytes),
            Some(&b"Client Went Away"[..])
        );
        let mut wire = answering(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n").await;
        let (answer, _) = wire
            .exchange(b"GET / HTTP/1.1\r\n\r\n", &Method::GET)
            .await
            .unwrap();
        assert!(
            answer
                .extensions()
                .get::<hyper::ext::ReasonPhrase>()
                .is_none()
        );
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

    #[test]
    fn framing_follows_rfc_9112() {
        let get = &Method::GET;
        let length = |n| Framing {
            body: BodyState::Length(n),
            reusable: true,
        };
        assert_eq!(
            framing(&[("content-length", "12")], 200, get).unwrap(),
            length(12)
        );
        assert_eq!(
            framing(&[("content-length", "12, 12")], 200, get).unwrap(),
            length(12)
        );
        assert!(
            framing(
                &[("content-length", "12"), ("content-length", "13")],
                200,
                get
            )
            .is_err()
        );
        assert!(framing(&[("content-length", "+12")], 200, get).is_err());
        assert!(framing(&[("content-length", "")], 200, get).is_err());
        // No body whatever the fields say, and never reused: a broken
        // upstream may send one anyway, late.
        let suppressed = Framing {
            body: BodyState::Length(0),
            reusable: false,
        };
        assert_eq!(
            framing(&[("content-length", "12")], 200, &Method::HEAD).unwrap(),
            suppressed
        );
        assert_eq!(
            framing(&[("content-length", "12")], 304, get).unwrap(),
            suppressed
        );
        assert_eq!(framing(&[], 204, get).unwrap(), suppressed);
        // Chunked last wins; with a length too it is read but not reused.
        let chunked = framing(&[("transfer-encoding", "gzip, Chunked")], 200, get).unwrap();
        assert_eq!(
            (chunked.body, chunked.reusable),
            (BodyState::ChunkSize, true)
        );
        let both = framing(
            &[("transfer-encoding", "chunked"), ("content-length", "5")],
            200,
            get,
        )
        .unwrap();
        assert_eq!((both.body, both.reusable), (BodyState::ChunkSize, false));
        let not_last = framing(&[("transfer-encoding", "chunked, gzip")], 200, get).unwrap();
        assert_eq!(
            (not_last.body, not_last.reusable),
            (BodyState::Close, false)
        );
        // Neither: to the close.
        let close = framing(&[], 200, get).unwrap();
        assert_eq!((close.body, close.reusable), (BodyState::Close, false));
        let told = framing(
            &[("content-length", "1"), ("connection", "Close")],
            200,
            get,
        )
        .unwrap();
        assert!(!told.reusable);
    }

    #[test]
    fn requests_with_a_length_other_than_zero_are_not_carried() {
        let parts = |cl: Option<&str>| {
            let mut req = http::Request::post("/x");
            if let Some(cl) = cl {
                req = req.header("content-length", cl);
            }
            req.body(()).unwrap().into_parts().0
        };
        assert!(carries(&parts(None), true));
        assert!(carries(&parts(Some("0")), true));
        assert!(!carries(&parts(Some("5")), true));
        assert!(!carries(&parts(None), false));
    }

    #[test]
    fn the_head_is_written_as_http_1_1() {
        let (parts, ()) = http::Request::post("/a?b=1")
            .header("host", "up")
            .header("x-k", "v")
            .body(())
            .unwrap()
            .into_parts();
        let mut out = Vec::new();
        encode_head(&parts, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /a?b=1 HTTP/1.1\r\nhost: up\r\nx-k: v\r\n\r\n"
        );
    }
}
