//! Answers written to the client by the front end: the head built in the
//! connection's write buffer (status line, fields, `Date` from a per-second
//! cache, the framing chosen here), then the body in pieces of at most
//! [`PIECE`] bytes, each of which the client must take within
//! `send_timeout`. Body frames that are ready at once go out in the same
//! write as the head.

use std::{cell::RefCell, pin::Pin, task::Poll, time::SystemTime};

use bytes::{Buf as _, Bytes};
use http::{Response, StatusCode, header};
use hyper::body::Body as _;
use tokio::net::TcpStream;

use super::{Connection, Ended};
use crate::proxy::{Body, Relayed, Standing};

/// Largest piece written with one deadline (as `server::answer` hands hyper).
pub const PIECE: usize = 16 * 1024;

/// The status line and the fields every answer starts with: `Date`, and
/// `Connection` when the connection will close (or, to an HTTP/1.0
/// client, stay open).
pub fn start(out: &mut Vec<u8>, status: StatusCode, reason: Option<&[u8]>, conn: &Connection) {
    start_at(out, status, reason, conn, unix_secs(SystemTime::now()));
}

/// [`start`] with the wall clock read by the caller: `unix_secs` for `Date`.
pub fn start_at(
    out: &mut Vec<u8>,
    status: StatusCode,
    reason: Option<&[u8]>,
    conn: &Connection,
    unix_secs: u64,
) {
    // An HTTP/1.0 client is answered in its version, as hyper does.
    out.extend_from_slice(if conn.http10 {
        b"HTTP/1.0 "
    } else {
        b"HTTP/1.1 "
    });
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(
        reason.unwrap_or_else(|| status.canonical_reason().unwrap_or("").as_bytes()),
    );
    out.extend_from_slice(b"\r\ndate: ");
    date(out, unix_secs);
    out.extend_from_slice(b"\r\n");
    if !conn.keep {
        out.extend_from_slice(b"connection: close\r\n");
    } else if conn.http10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
}

/// How the body of an answer is delimited on the way to the client.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Delimit {
    /// No body is sent (HEAD, 204, 304), whatever the fields say.
    None,
    /// By a length the fields carry.
    Length,
    Chunked,
    /// By the close (an HTTP/1.0 client and no length).
    Close,
}

/// Writes `response` (the head, then its body as it comes). The connection
/// is kept only if the answer was delimited without the close.
pub async fn write(
    stream: &mut TcpStream,
    out: &mut Vec<u8>,
    response: Response<Body>,
    conn: &mut Connection,
    head_request: bool,
    standing: Option<&Standing>,
) -> Result<(), Ended> {
    let (parts, body) = response.into_parts();
    let status = parts.status;
    let length = parts.headers.contains_key(header::CONTENT_LENGTH);
    let exact = body.size_hint().exact();
    let delimit = delimit(status, head_request, length, exact, conn);
    out.clear();
    let reason = parts
        .extensions
        .get::<hyper::ext::ReasonPhrase>()
        .map(hyper::ext::ReasonPhrase::as_bytes);
    start(out, status, reason, conn);
    for (name, value) in &parts.headers {
        if *name == header::DATE
            || *name == header::CONNECTION
            || standing.is_some_and(|s| s.writes(name.as_str().as_bytes()))
        {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(standing) = standing {
        standing.write(out);
    }
    end_head(out, delimit, length, exact, head_request);
    if delimit == Delimit::None {
        return conn.send(stream, out).await;
    }
    send_body(stream, out, body, delimit == Delimit::Chunked, conn).await
}

/// Writes an upstream's answer as it came ([`Relayed::fields`]: the
/// hop-by-hop fields and the hidden one left out), its `Date` and
/// `Connection` written here and its limit fields from `standing`; then its
/// body, read off the upstream connection as it is written.
pub async fn relay(
    stream: &mut TcpStream,
    out: &mut Vec<u8>,
    relayed: Relayed,
    conn: &mut Connection,
    head_request: bool,
    standing: Option<&Standing>,
) -> Result<(), Ended> {
    let status = relayed.head.status();
    // The body's length is the framing's (the upstream's own field is
    // never relayed: one that `Connection` named, or a list, would frame
    // it wrong); HEAD and 304 tell the resource's, as the upstream did.
    let exact = relayed.body.size_hint().exact();
    let delimit = delimit(status, head_request, false, exact, conn);
    out.clear();
    let reason = relayed.head.reason();
    match standing {
        Some(standing) => start_at(out, status, reason, conn, standing.unix_secs()),
        None => start(out, status, reason, conn),
    }
    for (name, value) in relayed.fields() {
        if name.eq_ignore_ascii_case(b"date") || standing.is_some_and(|s| s.writes(name)) {
            continue;
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    if let Some(standing) = standing {
        standing.write(out);
    }
    let told = ((head_request || status == StatusCode::NOT_MODIFIED)
        && status != StatusCode::NO_CONTENT)
        .then(|| relayed.head.declared_length())
        .flatten();
    if let Some(n) = told {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    end_head(out, delimit, false, exact, head_request);
    if delimit == Delimit::None {
        return conn.send(stream, out).await;
    }
    send_body(stream, out, relayed.body, delimit == Delimit::Chunked, conn).await
}

/// How an answer of `status` goes to the client: without a body (HEAD, 1xx,
/// 204, 304), by a length (its own, or one known), by the close (an
/// HTTP/1.0 client, the connection not kept), or chunked.
fn delimit(
    status: StatusCode,
    head_request: bool,
    length: bool,
    exact: Option<u64>,
    conn: &mut Connection,
) -> Delimit {
    let bodiless = head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    if bodiless {
        Delimit::None
    } else if length || exact.is_some() {
        Delimit::Length
    } else if conn.http10 {
        conn.keep = false;
        Delimit::Close
    } else {
        Delimit::Chunked
    }
}

/// The framing fields the answer lacks, and the head's end.
fn end_head(
    out: &mut Vec<u8>,
    delimit: Delimit,
    length: bool,
    exact: Option<u64>,
    head_request: bool,
) {
    match (delimit, length, exact) {
        (Delimit::Length, false, Some(n)) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        // As hyper: a known length told for HEAD, but not an empty one
        // (that is a body's, not the resource's).
        (Delimit::None, false, Some(n)) if head_request && n > 0 => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        (Delimit::Chunked, ..) => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        _ => {}
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes the body after the head waiting in `out`: every frame ready at
/// once joins what waits, up to a piece; what waits goes out when the body
/// has nothing more ready (a stream's event is never held back).
async fn send_body<B>(
    stream: &mut TcpStream,
    out: &mut Vec<u8>,
    mut body: B,
    chunked: bool,
    conn: &Connection,
) -> Result<(), Ended>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    loop {
        let polled = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx)));
        let frame = match polled.await {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                if !out.is_empty() {
                    conn.send(stream, out).await?;
                    out.clear();
                }
                std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
            }
        };
        match frame {
            None => {
                if chunked {
                    out.extend_from_slice(b"0\r\n\r\n");
                }
                return conn.send(stream, out).await;
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "an answer's body failed; connection cut");
                return Err(Ended::Cut);
            }
            Some(Ok(frame)) => {
                // Trailers are not passed on (nor by hyper to a client that
                // did not ask for them).
                let Ok(mut data) = frame.into_data() else {
                    continue;
                };
                if data.is_empty() {
                    continue;
                }
                if chunked {
                    let mut hex = [0u8; 16];
                    out.extend_from_slice(hex_len(data.len(), &mut hex));
                    out.extend_from_slice(b"\r\n");
                }
                while data.has_remaining() {
                    let take = PIECE.saturating_sub(out.len()).max(1).min(data.len());
                    out.extend_from_slice(&data[..take]);
                    data.advance(take);
                    if out.len() >= PIECE {
                        conn.send(stream, out).await?;
                        out.clear();
                    }
                }
                if chunked {
                    out.extend_from_slice(b"\r\n");
                }
            }
        }
    }
}

/// `n` in lowercase hex.
fn hex_len(n: usize, buf: &mut [u8; 16]) -> &[u8] {
    let mut i = buf.len();
    let mut n = n;
    loop {
        i -= 1;
        buf[i] = b"0123456789abcdef"[n & 15];
        n >>= 4;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// An answer the parser gives before any request exists: `status`, no
/// body, and the connection closed (as hyper answers).
pub fn refusal(out: &mut Vec<u8>, status: StatusCode) {
    out.clear();
    start(
        out,
        status,
        None,
        &Connection {
            keep: false,
            http10: false,
            ..Connection::default()
        },
    );
    out.extend_from_slice(b"content-length: 0\r\n\r\n");
}

thread_local! {
    /// The `Date` value for the current second.
    static DATE: RefCell<(u64, [u8; 29])> = const { RefCell::new((u64::MAX, [0; 29])) };
}

fn unix_secs(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Appends the IMF-fixdate of `secs` (Unix seconds), rendered once a
/// second per thread.
fn date(out: &mut Vec<u8>, secs: u64) {
    DATE.with_borrow_mut(|(cached, text)| {
        if *cached != secs {
            let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs);
            let rendered = httpdate::fmt_http_date(at);
            if rendered.len() == text.len() {
                text.copy_from_slice(rendered.as_bytes());
                *cached = secs;
            }
        }
        out.extend_from_slice(text);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_are_lowercase_hex() {
        let mut buf = [0; 16];
        assert_eq!(hex_len(0, &mut buf), b"0");
        assert_eq!(hex_len(255, &mut buf), b"ff");
        assert_eq!(hex_len(16 * 1024, &mut buf), b"4000");
    }

    #[test]
    fn dates_are_imf_fixdates() {
        let mut out = Vec::new();
        date(&mut out, unix_secs(SystemTime::now()));
        let text = std::str::from_utf8(&out).unwrap();
        assert!(httpdate::parse_http_date(text).is_ok(), "{text}");
    }
}
