//! The HTTP/1.1 framing rules of the upstream leg, with no socket: the
//! request head as it is written, which requests may go without a body,
//! the answer's head and how its body is delimited (RFC 9112 §6.3), and
//! whether the connection may carry another exchange after it. Table tests
//! below; the reading itself is in [`super::body`].

use bytes::{Buf as _, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, header, request};

use super::WireError;
use crate::fields::Fields;

/// Most header fields in an upstream's answer or its trailers (hyper's
/// client allows 100).
pub(super) const MAX_HEADERS: usize = 100;
/// Most informational (1xx) answers before the final one.
const MAX_INFORMATIONAL: usize = 16;

/// An answer's head as it came from the upstream: its bytes, and where
/// each field's name and value sit in them. Read through [`Fields`]; made
/// into a `Response` only for hyper's path ([`RawHead::into_response`]).
pub struct RawHead {
    head: Bytes,
    status: StatusCode,
    /// The upstream's own reason phrase, where it is not the status's
    /// canonical one.
    reason: Option<(usize, usize)>,
    /// Name start and end, value start and end, in `head`.
    fields: Vec<[usize; 4]>,
    /// Which framing fields it has: `Connection`, `Content-Length`,
    /// `Transfer-Encoding` (noted as it is parsed, so the relay need not
    /// look again).
    connection: bool,
    length: bool,
    coding: bool,
}

impl RawHead {
    #[must_use]
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The upstream's own reason phrase, when it is not the canonical one.
    #[must_use]
    pub fn reason(&self) -> Option<&[u8]> {
        self.reason.map(|(start, end)| &self.head[start..end])
    }

    /// Whether it has a `Connection` field.
    #[must_use]
    pub fn has_connection(&self) -> bool {
        self.connection
    }

    /// The length its `Content-Length` declares, when it has one, every
    /// line and item the same number, and no transfer coding: what a HEAD
    /// or 304 answer says of the resource (the body's own length is the
    /// framing's, [`Framing`]).
    #[must_use]
    pub fn declared_length(&self) -> Option<u64> {
        if !self.length || self.coding {
            return None;
        }
        let mut length = None;
        for value in self.values(&header::CONTENT_LENGTH) {
            for item in value.split(|b| *b == b',') {
                let n = parse_length(item.trim_ascii())?;
                if length.is_some_and(|seen| seen != n) {
                    return None;
                }
                length = Some(n);
            }
        }
        length
    }

    /// Every field, name and value as bytes, in the order they came.
    pub fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.fields
            .iter()
            .map(|f| (&self.head[f[0]..f[1]], &self.head[f[2]..f[3]]))
    }

    /// The head of `raw`, an answer to a GET (a test's).
    #[cfg(test)]
    #[must_use]
    pub fn parsed(raw: &[u8]) -> Self {
        Self::parsed_for(&mut BytesMut::from(raw), &Method::GET)
    }

    /// The head in `buf`, an answer to `method` (a test's).
    #[cfg(test)]
    #[must_use]
    pub fn parsed_for(buf: &mut BytesMut, method: &Method) -> Self {
        parse_head(buf, method, &mut 0).unwrap().unwrap().0
    }

    /// The head as a `Response` with its fields in a `HeaderMap` (values
    /// sharing the head's bytes); a length beside a transfer coding left
    /// out, as the framing reads the body by the coding (RFC 9112 §6.3, 3).
    pub fn into_response(self) -> Result<Response<()>, WireError> {
        let mut headers = HeaderMap::with_capacity(self.fields.len());
        for &[name_start, name_end, start, end] in &self.fields {
            let name = HeaderName::from_bytes(&self.head[name_start..name_end])
                .map_err(|_| WireError::Malformed("invalid header name"))?;
            let value = HeaderValue::from_maybe_shared(self.head.slice(start..end))
                .map_err(|_| WireError::Malformed("invalid header value"))?;
            headers.append(name, value);
        }
        if headers.contains_key(header::TRANSFER_ENCODING) {
            headers.remove(header::CONTENT_LENGTH);
        }
        let mut answer = Response::new(());
        *answer.status_mut() = self.status;
        *answer.headers_mut() = headers;
        // A reason phrase of the upstream's own reaches the client, as
        // through hyper's client.
        if let Some(phrase) = self
            .reason()
            .and_then(|reason| hyper::ext::ReasonPhrase::try_from(reason).ok())
        {
            answer.extensions_mut().insert(phrase);
        }
        Ok(answer)
    }
}

impl Fields for RawHead {
    fn values<'a>(&'a self, name: &HeaderName) -> impl Iterator<Item = &'a [u8]> {
        // The framing fields the parse saw none of are not looked for again.
        let absent = (*name == header::CONNECTION && !self.connection)
            || (*name == header::CONTENT_LENGTH && !self.length)
            || (*name == header::TRANSFER_ENCODING && !self.coding);
        let fields = if absent { &[][..] } else { &self.fields[..] };
        let name = name.as_str().as_bytes();
        fields
            .iter()
            .filter(move |f| self.head[f[0]..f[1]].eq_ignore_ascii_case(name))
            .map(|f| &self.head[f[2]..f[3]])
    }

    fn each(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.fields.iter().map(|f| {
            // httparse took the name as a token: ASCII.
            let name = std::str::from_utf8(&self.head[f[0]..f[1]]).unwrap_or("");
            (name, &self.head[f[2]..f[3]])
        })
    }
}

/// The answer's head when `buf` holds all of it, taken off the buffer;
/// informational answers are consumed and skipped (`informational` counts
/// them across calls). Names are tokens and values hold no control byte
/// but a tab: httparse's rules, which are `http`'s.
pub(super) fn parse_head(
    buf: &mut BytesMut,
    method: &Method,
    informational: &mut usize,
) -> Result<Option<(RawHead, Framing)>, WireError> {
    loop {
        let mut slots = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut response,
            buf,
            &mut slots,
        ) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(_) => return Err(WireError::Malformed("invalid answer head")),
        };
        let code = response.code.unwrap_or(0);
        if (100..200).contains(&code) {
            // No upgrade was asked for (`Upgrade` is not forwarded).
            if code == 101 {
                return Err(WireError::Malformed("unrequested protocol switch"));
            }
            *informational += 1;
            if *informational > MAX_INFORMATIONAL {
                return Err(WireError::Malformed("too many informational answers"));
            }
            buf.advance(len);
            continue;
        }
        let status =
            StatusCode::from_u16(code).map_err(|_| WireError::Malformed("invalid status code"))?;
        let http11 = response.version == Some(1);
        let base = buf.as_ptr() as usize;
        let span = |bytes: &[u8]| {
            let start = bytes.as_ptr() as usize - base;
            (start, start + bytes.len())
        };
        // No reason, or one httparse does not give as text (bytes beyond
        // ASCII: it gives a constant "" then, not a slice of the head): the
        // canonical one is written.
        let reason = response
            .reason
            .filter(|reason| !reason.is_empty() && status.canonical_reason() != Some(*reason))
            .map(|reason| span(reason.as_bytes()));
        let (mut connection, mut length, mut coding) = (false, false, false);
        let fields = response
            .headers
            .iter()
            .map(|field| {
                let name = field.name;
                connection |= name.eq_ignore_ascii_case("connection");
                length |= name.eq_ignore_ascii_case("content-length");
                coding |= name.eq_ignore_ascii_case("transfer-encoding");
                let (name_start, name_end) = span(name.as_bytes());
                let (start, end) = span(field.value);
                [name_start, name_end, start, end]
            })
            .collect();
        let head = RawHead {
            head: buf.split_to(len).freeze(),
            status,
            reason,
            fields,
            connection,
            length,
            coding,
        };
        let framing = Framing::of(&head, status, method, http11)?;
        return Ok(Some((head, framing)));
    }
}

/// How an answer's body is delimited (RFC 9112 §6.3), and whether the
/// connection may carry another exchange after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(in crate::proxy) struct Framing {
    pub(super) body: BodyState,
    pub(super) reusable: bool,
}

impl Framing {
    pub(super) fn of(
        headers: &impl Fields,
        status: StatusCode,
        method: &Method,
        http11: bool,
    ) -> Result<Self, WireError> {
        let close = headers
            .values(&header::CONNECTION)
            .any(|v| has_token(v, b"close"));
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
        let mut codings = headers.values(&header::TRANSFER_ENCODING).peekable();
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
                .and_then(|v| v.rsplit(|b| *b == b',').next())
                .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            let both = headers.has(&header::CONTENT_LENGTH);
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
        for value in headers.values(&header::CONTENT_LENGTH) {
            for item in value.split(|b| *b == b',') {
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

/// A length of 1 to 19 digits (any such number fits a `u64`).
fn parse_length(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &b| {
        b.is_ascii_digit().then(|| n * 10 + u64::from(b - b'0'))
    })
}

fn has_token(list: &[u8], token: &[u8]) -> bool {
    list.split(|b| *b == b',')
        .any(|item| item.trim_ascii().eq_ignore_ascii_case(token))
}

/// Where reading an answer's body stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum BodyState {
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
pub(in crate::proxy) fn encode_head(parts: &request::Parts, out: &mut Vec<u8>) {
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
pub(in crate::proxy) fn carries(parts: &request::Parts, body_ended: bool) -> bool {
    body_ended
        && parts.method != Method::CONNECT
        && parts
            .headers
            .get_all(header::CONTENT_LENGTH)
            .iter()
            .all(|v| v.as_bytes().trim_ascii() == b"0")
}

pub(super) fn trailer_map(fields: &[httparse::Header<'_>]) -> Result<HeaderMap, WireError> {
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

    /// The head of `raw` as the wire reads it, or the reason it is refused.
    fn head(raw: &str) -> Result<Option<(Response<()>, Framing)>, &'static str> {
        let mut buf = BytesMut::from(raw);
        let mut informational = 0;
        let why = |e| match e {
            WireError::Malformed(why) => why,
            _ => "other",
        };
        match parse_head(&mut buf, &Method::GET, &mut informational).map_err(why)? {
            Some((head, framing)) => Ok(Some((head.into_response().map_err(why)?, framing))),
            None => Ok(None),
        }
    }

    #[test]
    fn answer_heads_are_refused_by_rule() {
        let endless = "HTTP/1.1 100 Continue\r\n\r\n".repeat(MAX_INFORMATIONAL + 1);
        let cases: &[(&str, &str)] = &[
            (&endless, "too many informational answers"),
            (
                "HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                "Transfer-Encoding in an HTTP/1.0 answer",
            ),
            (
                "HTTP/1.1 101 Switching Protocols\r\n\r\n",
                "unrequested protocol switch",
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
                "conflicting Content-Length",
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
                "invalid Content-Length",
            ),
            ("HTTP/1.1 2000 OK\r\n\r\n", "invalid answer head"),
            (
                "HTTP/1.1 200 OK\r\nbad name: x\r\n\r\n",
                "invalid answer head",
            ),
        ];
        for (raw, why) in cases {
            assert_eq!(head(raw).map(|_| ()), Err(*why), "{raw:?}");
        }
    }

    #[test]
    fn a_head_is_taken_whole_after_its_informational_answers() {
        assert!(
            head("HTTP/1.1 200 OK\r\ncontent-le").unwrap().is_none(),
            "partial"
        );
        let mut buf = BytesMut::from(
            "HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\n\
             content-length: 2\r\ntransfer-encoding: chunked\r\nx-a: 1\r\n\r\nrest",
        );
        let mut informational = 0;
        let (answer, framing) = parse_head(&mut buf, &Method::GET, &mut informational)
            .unwrap()
            .unwrap();
        let answer = answer.into_response().unwrap();
        assert_eq!((answer.status(), informational), (StatusCode::OK, 1));
        assert_eq!(answer.headers()["x-a"], "1");
        assert!(
            !answer.headers().contains_key(header::CONTENT_LENGTH),
            "a length beside a transfer coding goes no further"
        );
        assert_eq!(
            (framing.body, framing.reusable),
            (BodyState::ChunkSize, false)
        );
        assert_eq!(&buf[..], b"rest", "the body's bytes stay in the buffer");
    }

    /// Heads of none, one, some and the most fields keep every field, in
    /// order.
    #[test]
    fn every_field_of_a_long_head_is_kept() {
        for count in [0, 1, 24, MAX_HEADERS] {
            let mut raw = String::from("HTTP/1.1 200 OK\r\n");
            for i in 0..count {
                std::fmt::Write::write_fmt(&mut raw, format_args!("x-f{i}: v{i}\r\n")).unwrap();
            }
            raw.push_str("\r\n");
            let (answer, _) = head(&raw).unwrap().unwrap();
            assert_eq!(answer.headers().len(), count);
            for (i, (name, value)) in answer.headers().iter().enumerate() {
                assert_eq!(
                    (name.as_str(), value.to_str().unwrap()),
                    (&*format!("x-f{i}"), &*format!("v{i}"))
                );
            }
        }
    }

    #[test]
    fn an_upstreams_own_reason_phrase_is_kept() {
        let phrase = |raw| {
            head(raw)
                .unwrap()
                .unwrap()
                .0
                .extensions()
                .get::<hyper::ext::ReasonPhrase>()
                .map(|p| p.as_bytes().to_vec())
        };
        assert_eq!(
            phrase("HTTP/1.1 499 Client Went Away\r\ncontent-length: 0\r\n\r\n"),
            Some(b"Client Went Away".to_vec())
        );
        assert_eq!(
            phrase("HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"),
            None
        );
        // No reason at all, an empty one, and one beyond ASCII (which
        // httparse does not give as a slice of the head): the canonical one.
        assert_eq!(phrase("HTTP/1.1 200\r\ncontent-length: 0\r\n\r\n"), None);
        assert_eq!(phrase("HTTP/1.1 200 \r\ncontent-length: 0\r\n\r\n"), None);
        let mut buf =
            BytesMut::from(&b"HTTP/1.1 200 Tr\xc3\xa8s bien\r\ncontent-length: 0\r\n\r\n"[..]);
        let (head, _) = parse_head(&mut buf, &Method::GET, &mut 0).unwrap().unwrap();
        assert_eq!(head.reason(), None);
        assert_eq!(head.status(), StatusCode::OK);
    }

    #[test]
    fn trailers_keep_their_fields_and_refuse_bad_names() {
        let mut fields = [httparse::EMPTY_HEADER; 4];
        let (_, parsed) = httparse::parse_headers(b"x-sum: 1\r\n\r\n", &mut fields)
            .unwrap()
            .unwrap();
        assert_eq!(trailer_map(parsed).unwrap()["x-sum"], "1");
        let bad = [httparse::Header {
            name: "a b",
            value: b"1",
        }];
        assert!(trailer_map(&bad).is_err());
    }

    #[test]
    fn a_length_is_one_to_nineteen_digits_and_nothing_else() {
        assert_eq!(parse_length(b"0"), Some(0));
        assert_eq!(parse_length(b"0042"), Some(42));
        assert_eq!(
            parse_length(b"9999999999999999999"),
            Some(9_999_999_999_999_999_999)
        );
        for bad in [
            &b""[..],
            b"18446744073709551615",
            b"+1",
            b"-1",
            b"1a",
            b"1 2",
            b"\xd9\xa1",
        ] {
            assert_eq!(
                parse_length(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
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
