//! The HTTP/1 front end: plain HTTP/1 connections served by the agent's own
//! loop, the way pingora and nginx do it, for the common case of API
//! traffic, a request without a body.
//!
//! One task per connection with one read buffer and one write buffer for its
//! whole life. Each head is parsed by `httparse` (the parser hyper uses, so
//! the bytes accepted are the same), its fields borrowed from the buffer
//! (no `Request`, `Uri` or `HeaderMap`), its framing checked by one small
//! module ([`smuggling`]), and it goes through the same decision core as
//! hyper's requests ([`Proxy::serve_head`]). The answer is written in one
//! write where it can be: the head and the body's ready frames together; a
//! 429 from the request's standing, with no response built at all. One
//! timer per connection covers the head, idle and send deadlines.
//!
//! Anything else is handed to hyper with the bytes read so far, for the
//! rest of the connection: HTTP/2 (the prior-knowledge preface), requests
//! with a body, `Expect`, `Upgrade`, `CONNECT`, and targets that are not in
//! origin form. TLS connections never come here (ALPN may pick h2).

mod answer;
mod rewind;

use std::{sync::Arc, time::Duration};

use bytes::{Buf as _, Bytes, BytesMut};
use http::StatusCode;
use tokio::{io::AsyncReadExt as _, net::TcpStream, sync::watch, time::Instant};

pub use self::rewind::Rewind;
use crate::{
    fields::Raw,
    proxy::{Head, Peer, Proxy, Served},
    smuggling::{self, Framing, Refused},
    timer::Timer,
};

/// Most header fields in a head (hyper's limit too): more is a 431.
pub const MAX_HEADERS: usize = 100;

/// Longest request target hyper reads (a 414 beyond).
const MAX_TARGET: usize = u16::MAX as usize - 1;

/// The HTTP/2 connection preface's request line (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

/// A connection's limits, read from the config when it is accepted.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// From accept to the first head's end, and from a later head's first
    /// byte to its end: a 408.
    pub header_read: Duration,
    /// Between requests: the connection is closed.
    pub idle: Duration,
    /// A piece of an answer not taken by the client in this time: the
    /// connection is cut.
    pub send: Duration,
    /// Longest head: a 431.
    pub max_head: usize,
}

/// How the loop let go of a connection.
enum Ended {
    /// Closed by either side, or after its last answer.
    Closed,
    /// Cut with an answer unfinished: reset, so the client can't take a
    /// part for the whole.
    Cut,
    /// To be handed to hyper with these bytes read and not served.
    Handoff(Bytes),
}

/// The connection's state as its answers are written.
#[derive(Clone, Copy, Debug)]
pub struct Connection {
    /// Whether the connection stays open after this answer.
    keep: bool,
    /// The request was HTTP/1.0 (no chunked answers, keep-alive only when
    /// asked).
    http10: bool,
    send: Duration,
}

impl Default for Connection {
    fn default() -> Self {
        Self {
            keep: true,
            http10: false,
            send: Duration::from_secs(30),
        }
    }
}

impl Connection {
    /// Writes `bytes` whole, each piece of at most [`answer::PIECE`] bytes
    /// taken by the client within the send timeout of when it first had to
    /// wait for it (as hyper's path times a piece it was handed).
    async fn send(&self, stream: &mut TcpStream, bytes: &[u8]) -> Result<(), Ended> {
        // Unarmed until a piece has to wait.
        let mut timer = Timer::new();
        let mut sent = 0;
        // The piece being written: where it ends, and its deadline once it
        // has waited.
        let mut piece_end = 0;
        let mut deadline: Option<Instant> = None;
        while sent < bytes.len() {
            if sent >= piece_end {
                piece_end = bytes.len().min(sent + answer::PIECE);
                deadline = None;
            }
            match stream.try_write(&bytes[sent..piece_end]) {
                Ok(n) => {
                    sent += n;
                    continue;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return Err(Ended::Closed),
            }
            let deadline = *deadline.get_or_insert_with(|| Instant::now() + self.send);
            tokio::select! {
                biased;
                ready = stream.writable() => if ready.is_err() {
                    return Err(Ended::Closed);
                },
                () = timer.until(deadline) => return Err(Ended::Cut),
            }
        }
        Ok(())
    }
}

/// Serves `stream` from its first byte until it closes or is cut; or hands
/// it back, with the bytes read and not served, for hyper to serve the rest.
/// `stop` asks it to close once its answer in progress is sent.
pub async fn serve(
    mut stream: TcpStream,
    peer: &Peer,
    proxy: &Arc<Proxy>,
    limits: Limits,
    stop: &mut watch::Receiver<()>,
) -> Option<(TcpStream, Bytes)> {
    match run(&mut stream, peer, proxy, limits, stop).await {
        Ended::Closed => None,
        Ended::Cut => {
            let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
            None
        }
        Ended::Handoff(read) => Some((stream, read)),
    }
}

async fn run(
    stream: &mut TcpStream,
    peer: &Peer,
    proxy: &Arc<Proxy>,
    limits: Limits,
    stop: &mut watch::Receiver<()>,
) -> Ended {
    let accepted = Instant::now();
    let mut buf = BytesMut::with_capacity(4096);
    let mut out = Vec::with_capacity(4096);
    let mut timer = Timer::new();
    // The deadlines of the connection's requests upstream: each later than
    // the last, so one timer stays armed across them.
    let mut upstream = Timer::new();
    let mut first = true;
    let max_head = limits.max_head.max(8192);
    // When the head being read began: at accept for the first, about its
    // first byte for a later one; when the last answer ended. Each is read
    // from the clock at the first wait that needs it (`None` until then):
    // a head that came whole needs no clock at all.
    let mut head_began = Some(accepted);
    let mut last_end = None;
    // The requests being served came in one read with others.
    let mut batched = false;
    // The agent's stop, watched by one waiter for the connection's life
    // (not one registered and dropped per wait).
    let mut watcher = stop.clone();
    let stopped = async move {
        let _ = watcher.changed().await;
    };
    let mut stopped = std::pin::pin!(stopped);
    loop {
        let mut fields = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
        let read = if buf.is_empty() {
            Read::Partial
        } else {
            read_head(&buf, first, max_head, &mut fields)
        };
        match read {
            Read::Partial => {}
            Read::Serve(head) => {
                let len = head.len;
                // Requests that came together are answered together, even
                // if the client shut its side after sending them.
                batched |= buf.len() > len;
                let pipelined = batched;
                let serving = request(
                    &head,
                    stream,
                    &mut out,
                    peer,
                    proxy,
                    limits,
                    stop,
                    pipelined,
                    &mut upstream,
                );
                match serving.await {
                    Step::Served => {}
                    Step::Close => return Ended::Closed,
                    Step::Cut => return Ended::Cut,
                }
                buf.advance(len);
                first = false;
                last_end = None;
                head_began = None;
                continue;
            }
            Read::Handoff(_) => return Ended::Handoff(buf.freeze()),
            Read::Refused(refusal) => {
                if matches!(refusal, Refusal::Framing(_)) {
                    proxy.metrics().refuse("framing");
                }
                return refuse(stream, &mut out, refusal, limits).await;
            }
        }
        // More bytes, with a deadline. Through `AsyncRead`, whose short
        // reads clear the socket's readiness: the next wait (for the next
        // request, or for the client going away while one is upstream)
        // sleeps until bytes come, instead of asking the socket once more
        // only to hear it would block.
        buf.reserve(4096);
        let (deadline, idle) = match head_began {
            Some(began) => (began + limits.header_read, false),
            None if !buf.is_empty() => {
                let began = *head_began.insert(Instant::now());
                (began + limits.header_read, false)
            }
            None => (
                *last_end.get_or_insert_with(Instant::now) + limits.idle,
                true,
            ),
        };
        // A stopping agent closes a connection with no request begun.
        let quiet = buf.is_empty();
        tokio::select! {
            biased;
            read = stream.read_buf(&mut buf) => match read {
                Ok(0) | Err(_) => return Ended::Closed,
                Ok(_) => batched = false,
            },
            () = timer.until(deadline) => {
                if idle {
                    return Ended::Closed;
                }
                return timed_out(stream, &mut out, limits).await;
            }
            () = &mut stopped, if quiet => return Ended::Closed,
        }
    }
}

/// What became of one request.
enum Step {
    /// Answered; the connection stays open.
    Served,
    Close,
    Cut,
}

/// What the bytes read so far hold.
#[derive(Debug)]
pub enum Read<'h, 'b> {
    /// Not a whole head yet.
    Partial,
    /// A head the front end serves.
    Serve(Parsed<'h, 'b>),
    /// Hyper's to serve, from the first byte of this head: HTTP/2, a body,
    /// `Expect`, `Upgrade`, `CONNECT`, a target not in origin form. The
    /// framing, when the head is a whole HTTP/1 one.
    Handoff(Option<Framing>),
    Refused(Refusal),
}

/// A head the front end serves.
#[derive(Debug)]
pub struct Parsed<'h, 'b> {
    /// Bytes of the head.
    pub len: usize,
    pub method: &'b str,
    /// The path and query (a fragment dropped).
    pub target: &'b str,
    pub http10: bool,
    /// `None`, or an empty `Content-Length`.
    pub framing: Framing,
    pub fields: &'h [httparse::Header<'b>],
}

/// Why a head is refused; the connection closes after the answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The parser's: this status, no body.
    Parser(StatusCode),
    /// The framing rules'.
    Framing(Refused),
}

/// Reads a head from `buf` (`first` on a new connection, where HTTP/2's
/// preface may come), parsing its fields into `fields` (left uninitialised
/// by the caller: a head's fields are written, not the whole array). The one reading of
/// a head, for the connection loop and for the differential fuzz target
/// that holds it to hyper's.
pub fn read_head<'h, 'b>(
    buf: &'b [u8],
    first: bool,
    max_head: usize,
    fields: &'h mut [std::mem::MaybeUninit<httparse::Header<'b>>],
) -> Read<'h, 'b> {
    // HTTP/2 with prior knowledge starts with its preface: hyper's.
    if first {
        let n = buf.len().min(H2_PREFACE.len());
        if buf[..n] == H2_PREFACE[..n] {
            return if n == H2_PREFACE.len() {
                Read::Handoff(None)
            } else {
                Read::Partial
            };
        }
    }
    let mut req = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_request_with_uninit_headers(&mut req, buf, fields)
    {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= max_head => {
            return Read::Refused(Refusal::Parser(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE));
        }
        Ok(httparse::Status::Partial) => return Read::Partial,
        Err(httparse::Error::TooManyHeaders) => {
            return Read::Refused(Refusal::Parser(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE));
        }
        Err(_) => return Read::Refused(Refusal::Parser(StatusCode::BAD_REQUEST)),
    };
    if len > max_head {
        return Read::Refused(Refusal::Parser(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE));
    }
    let httparse::Request {
        method,
        path,
        version,
        headers,
    } = req;
    let (Some(method), Some(target), Some(version)) = (method, path, version) else {
        return Read::Refused(Refusal::Parser(StatusCode::BAD_REQUEST));
    };
    if target.len() > MAX_TARGET {
        return Read::Refused(Refusal::Parser(StatusCode::URI_TOO_LONG));
    }
    let http10 = version == 0;
    let fields: &'h [httparse::Header<'b>] = headers;
    let framing = match smuggling::framing(http10, &Raw(fields)) {
        Ok(framing) => framing,
        Err(refused) => return Read::Refused(Refusal::Framing(refused)),
    };
    let Some(target) = origin_form(target) else {
        return Read::Handoff(Some(framing));
    };
    let Ok(target) = target else {
        return Read::Refused(Refusal::Parser(StatusCode::BAD_REQUEST));
    };
    if !matches!(framing, Framing::None | Framing::Length(0))
        || method.eq_ignore_ascii_case("CONNECT")
        || fields.iter().any(|f| {
            f.name.eq_ignore_ascii_case("expect") || f.name.eq_ignore_ascii_case("upgrade")
        })
    {
        return Read::Handoff(Some(framing));
    }
    Read::Serve(Parsed {
        len,
        method,
        target,
        http10,
        framing,
        fields,
    })
}

/// Serves a request the front end read; `pipelined` when the client sent
/// more after it.
#[expect(
    clippy::too_many_arguments,
    reason = "a request and its connection's whole state"
)]
async fn request(
    parsed: &Parsed<'_, '_>,
    stream: &mut TcpStream,
    out: &mut Vec<u8>,
    peer: &Peer,
    proxy: &Arc<Proxy>,
    limits: Limits,
    stop: &watch::Receiver<()>,
    pipelined: bool,
    upstream: &mut Timer,
) -> Step {
    let &Parsed {
        method,
        target,
        http10,
        framing,
        fields,
        ..
    } = parsed;
    let fields = Raw(fields);
    let mut conn = Connection {
        keep: keep_alive(http10, fields),
        http10,
        send: limits.send,
    };
    let head = Head {
        method,
        target,
        fields,
        empty_length: framing == Framing::Length(0),
    };
    // A client that goes away while its request is upstream lets go of
    // what the request holds at once (its slots, its upstream
    // connection), as hyper does: the request is dropped. Not one that sent
    // more requests first and then shut its side: those are served.
    // Pinned where it is made: the select borrows it, not moves it.
    let serving = std::pin::pin!(proxy.serve_head(&head, peer, upstream));
    let served = tokio::select! {
        biased;
        served = serving => served,
        () = gone(stream), if !pipelined => return Step::Close,
    };
    // A stopping agent closes each connection after its answer in progress.
    if conn.keep && stop.has_changed().unwrap_or(true) {
        conn.keep = false;
    }
    let head_request = method == "HEAD";
    let sent = match served {
        Served::TooMany(rejected) if !head_request => {
            out.clear();
            // One read of the wall clock, for `Date` and the reset.
            let now = rejected.now(proxy);
            let secs = now.unix_ms / 1000;
            answer::start_at(out, StatusCode::TOO_MANY_REQUESTS, None, &conn, secs);
            rejected.write(out, now);
            conn.send(stream, out).await
        }
        Served::TooMany(rejected) => {
            let response = rejected.response(proxy);
            answer::write(stream, out, response, &mut conn, true, None).await
        }
        Served::Answer(response, slots) => {
            let sent = answer::write(stream, out, response, &mut conn, head_request, None).await;
            // The in-flight slots are held until the answer is sent.
            drop(slots);
            sent
        }
        Served::Relayed(relayed, slots, standing) => {
            let standing = standing.as_ref();
            let sent = answer::relay(stream, out, relayed, &mut conn, head_request, standing).await;
            drop(slots);
            sent
        }
        Served::Stamped(response, slots, standing) => {
            let standing = Some(&standing);
            let sent =
                answer::write(stream, out, response, &mut conn, head_request, standing).await;
            drop(slots);
            sent
        }
    };
    match sent {
        Ok(()) if conn.keep => Step::Served,
        Ok(()) | Err(Ended::Closed | Ended::Handoff(_)) => Step::Close,
        Err(Ended::Cut) => {
            proxy.metrics().answer_cut("send_timeout");
            Step::Cut
        }
    }
}

/// Resolves when the client has closed or reset the connection; never
/// while it is open (bytes of a next request included). Waits on the
/// socket's readiness, which the last short read cleared: no system call
/// until the client sends or closes.
async fn gone(stream: &TcpStream) {
    let mut byte = [0u8; 1];
    let mut open = false;
    std::future::poll_fn(|cx| {
        if open {
            return std::task::Poll::Pending;
        }
        let mut probe = tokio::io::ReadBuf::new(&mut byte);
        match stream.poll_peek(cx, &mut probe) {
            std::task::Poll::Pending => std::task::Poll::Pending,
            std::task::Poll::Ready(Ok(n)) if n > 0 => {
                open = true;
                std::task::Poll::Pending
            }
            std::task::Poll::Ready(_) => std::task::Poll::Ready(()),
        }
    })
    .await;
}

/// Whether the client keeps the connection open after this request: HTTP/1.1
/// unless it says `close`, HTTP/1.0 only when it says `keep-alive`.
fn keep_alive(http10: bool, fields: Raw<'_, '_>) -> bool {
    let mut keep = !http10;
    for field in fields.0 {
        if field.name.eq_ignore_ascii_case("connection") {
            for token in field.value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                if token.eq_ignore_ascii_case(b"close") {
                    return false;
                }
                if token.eq_ignore_ascii_case(b"keep-alive") {
                    keep = true;
                }
            }
        }
    }
    keep
}

/// The bytes `http` allows in a path: `"`, `{` and `}` too, and bytes of
/// UTF-8 beyond ASCII (the target is text: the path rules refuse them
/// later, with their own answer).
const PATH_BYTES: [bool; 256] = byte_table(false);

/// The bytes `http` allows in a query (`?` among them).
const QUERY_BYTES: [bool; 256] = byte_table(true);

/// Which bytes a path (or a `query`) allows.
const fn byte_table(query: bool) -> [bool; 256] {
    let mut table = [false; 256];
    let mut i = 0;
    while i < 256 {
        #[expect(clippy::cast_possible_truncation, reason = "i < 256")]
        let b = i as u8;
        table[i] = if query {
            matches!(b, 0x21 | 0x24..=0x3B | 0x3D | 0x3F..=0x7E | 0x80..=0xFF)
        } else {
            matches!(b, 0x21..=0x22 | 0x24..=0x3B | 0x3D | 0x40..=0x5F | 0x61..=0x7E | 0x80..=0xFF)
        };
        i += 1;
    }
    table
}

/// The request target in origin form as `http`'s `PathAndQuery` reads it: `None` for
/// another form (hyper's to serve), `Err` for a target hyper refuses, else
/// the path and query without a fragment.
fn origin_form(target: &str) -> Option<Result<&str, ()>> {
    if !target.starts_with('/') {
        return None;
    }
    let bytes = target.as_bytes();
    // The path's bytes, then the query's: neither table allows `#`, nor
    // the path's `?`, so each loop stops at the byte that ends its part.
    let mut i = bytes
        .iter()
        .position(|&b| !PATH_BYTES[usize::from(b)])
        .unwrap_or(bytes.len());
    if bytes.get(i) == Some(&b'?') {
        i += 1;
        i += bytes[i..]
            .iter()
            .position(|&b| !QUERY_BYTES[usize::from(b)])
            .unwrap_or(bytes.len() - i);
    }
    Some(match bytes.get(i) {
        None => Ok(target),
        // ASCII: a `str` boundary.
        Some(b'#') => Ok(&target[..i]),
        Some(_) => Err(()),
    })
}

/// Answers a refused head and closes. What hyper's parser refuses gets
/// its answer (the status, no body); what only the stricter rules refuse
/// gets the JSON 400 the proxy gives to the same head read by hyper.
async fn refuse(
    stream: &mut TcpStream,
    out: &mut Vec<u8>,
    refusal: Refusal,
    limits: Limits,
) -> Ended {
    let mut conn = Connection {
        keep: false,
        http10: false,
        send: limits.send,
    };
    let status = match refusal {
        Refusal::Framing(refused) if refused.stricter_than_hyper() => {
            let response =
                crate::proxy::error(StatusCode::BAD_REQUEST, "BAD_REQUEST", &refused.to_string());
            return match answer::write(stream, out, response, &mut conn, false, None).await {
                Err(Ended::Cut) => Ended::Cut,
                _ => Ended::Closed,
            };
        }
        Refusal::Parser(status) => status,
        Refusal::Framing(_) => StatusCode::BAD_REQUEST,
    };
    answer::refusal(out, status);
    match conn.send(stream, out).await {
        Err(Ended::Cut) => Ended::Cut,
        _ => Ended::Closed,
    }
}

/// A head that did not arrive in time: 408, then the close.
async fn timed_out(stream: &mut TcpStream, out: &mut Vec<u8>, limits: Limits) -> Ended {
    out.clear();
    let body = crate::answers::error_body("REQUEST_TIMEOUT", "The request headers took too long.");
    let conn = Connection {
        keep: false,
        http10: false,
        send: Duration::from_secs(1).min(limits.send),
    };
    answer::start(out, StatusCode::REQUEST_TIMEOUT, None, &conn);
    out.extend_from_slice(b"content-type: application/json\r\ncontent-length: ");
    out.extend_from_slice(itoa::Buffer::new().format(body.len()).as_bytes());
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(body.as_bytes());
    let _ = conn.send(stream, out).await;
    Ended::Closed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_read_as_hyper_reads_them() {
        assert_eq!(origin_form("/a/b?c=d"), Some(Ok("/a/b?c=d")));
        assert_eq!(origin_form("/a#frag"), Some(Ok("/a")));
        assert_eq!(origin_form("/a?b?c"), Some(Ok("/a?b?c")));
        assert_eq!(origin_form("/a?b#c d"), Some(Ok("/a?b")));
        assert_eq!(origin_form("/a?#"), Some(Ok("/a?")));
        assert_eq!(origin_form("/#"), Some(Ok("/")));
        assert_eq!(origin_form("/a?b c#d"), Some(Err(())));
        assert_eq!(origin_form("/{x}\"y\""), Some(Ok("/{x}\"y\"")));
        assert_eq!(origin_form("/a?\""), Some(Err(())));
        assert_eq!(origin_form("/a b"), Some(Err(())));
        assert_eq!(origin_form("/a\u{7f}"), Some(Err(())));
        assert_eq!(origin_form("/é?é"), Some(Ok("/é?é")));
        assert_eq!(origin_form("http://a/b"), None);
        assert_eq!(origin_form("*"), None);
    }

    #[test]
    fn keep_alive_follows_the_version_and_connection() {
        let fields = |v: &'static str| {
            vec![httparse::Header {
                name: "Connection",
                value: v.as_bytes(),
            }]
        };
        assert!(keep_alive(false, Raw(&[])));
        assert!(!keep_alive(true, Raw(&[])));
        assert!(!keep_alive(false, Raw(&fields("close"))));
        assert!(!keep_alive(false, Raw(&fields("keep-alive, Close"))));
        assert!(keep_alive(true, Raw(&fields("Keep-Alive"))));
    }
}
