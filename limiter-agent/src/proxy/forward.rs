//! Forwarding to the upstream: the request rewritten for one hop, bodies
//! streamed both ways, and the upstream's failures turned into JSON errors.

use std::time::Instant;

use bytes::Bytes;
use http::{
    HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, header, request,
};
use http_body_util::BodyExt as _;
use hyper::body::{Body as _, Incoming};

use super::{Body, Head, Peer, Proxy, State, respond::error, upstream::UpstreamBusy, wire};
use crate::{
    body::{ClientBody, ClientBodyError, client_fault},
    fields::Fields,
    smuggling::MAX_CONNECTION_OPTIONS,
    timer::Timer,
};

/// A request on its way upstream: its body streamed from the client as it
/// comes, or read whole first (to find what it costs).
pub(super) enum Outgoing {
    Streamed(Request<Incoming>),
    Whole(request::Parts, Bytes),
}

/// What became of a request the front end forwarded.
pub enum Forwarded {
    /// The upstream's answer, to relay as it came.
    Relayed(Relayed),
    /// An answer the agent made (the upstream failed, or the request could
    /// not go).
    Made(Response<Body>),
}

/// An upstream's answer relayed as it came: its head as read, its body
/// read off the connection as it is written.
pub struct Relayed {
    pub head: wire::RawHead,
    pub body: wire::WireBody,
    /// A field the writer leaves out (the tier's cost field: the agent's,
    /// not the client's).
    pub hidden: Option<HeaderName>,
}

impl Relayed {
    /// The answer's fields as they go to the client, as hyper's path strips
    /// them ([`strip_hop_by_hop`]): no hop-by-hop field nor one its
    /// `Connection` names, not the hidden field; and no `Content-Length`,
    /// which the writer writes from the framing the body is read by.
    pub fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        relayed_fields(&self.head, self.hidden.as_ref())
    }
}

/// [`Relayed::fields`] of `head`, less `hidden`.
fn relayed_fields<'a>(
    head: &'a wire::RawHead,
    hidden: Option<&'a HeaderName>,
) -> impl Iterator<Item = (&'a [u8], &'a [u8])> {
    // The names `Connection` lists, sorted for a binary search (an upstream
    // may list many): most answers have none, or only `keep-alive`.
    let mut named: Vec<&[u8]> = Vec::new();
    if head.has_connection() {
        named.extend(head.values(&header::CONNECTION).flat_map(connection_tokens));
        named.sort_unstable_by(|a, b| caseless_cmp(a, b));
    }
    head.fields().filter(move |(name, _)| {
        !(hop_by_hop(name)
            || name.eq_ignore_ascii_case(b"content-length")
            || hidden.is_some_and(|hidden| name.eq_ignore_ascii_case(hidden.as_str().as_bytes()))
            || named
                .binary_search_by(|token| caseless_cmp(token, name))
                .is_ok())
    })
}

/// `a` against `b`, ASCII letters compared without regard to case.
fn caseless_cmp(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    a.iter()
        .map(u8::to_ascii_lowercase)
        .cmp(b.iter().map(u8::to_ascii_lowercase))
}

/// Marks an answer the agent gave because the request never reached the
/// upstream (every upstream connection busy).
#[derive(Clone, Copy, Debug)]
pub(super) struct NotSent;

impl Outgoing {
    /// Whether the request has a body (one to come, or one in hand).
    pub(super) fn has_body(&self) -> bool {
        match self {
            Self::Streamed(req) => !req.body().is_end_stream(),
            Self::Whole(_, body) => !body.is_empty(),
        }
    }

    pub(super) fn method(&self) -> &http::Method {
        match self {
            Self::Streamed(req) => req.method(),
            Self::Whole(parts, _) => &parts.method,
        }
    }

    pub(super) fn headers_mut(&mut self) -> &mut HeaderMap {
        match self {
            Self::Streamed(req) => req.headers_mut(),
            Self::Whole(parts, _) => &mut parts.headers,
        }
    }
}

impl Proxy {
    /// Forwards to the upstream; 502 when it can't be reached, 504 when it
    /// doesn't answer in time. The body streams in both directions.
    pub(super) async fn forward(
        &self,
        state: &State,
        outgoing: Outgoing,
        peer: &Peer,
    ) -> Response<Body> {
        let (mut parts, body) = match outgoing {
            Outgoing::Streamed(req) => req.into_parts(),
            Outgoing::Whole(parts, body) => {
                // Rare, and its future is large: boxed, so the common
                // path's future (moved whole on every request) stays small.
                return Box::pin(self.forward_whole(state, parts, body, peer)).await;
            }
        };
        if let Err(refused) = one_hop(&mut parts, state, peer) {
            return *refused;
        }
        let started = Instant::now();
        let connect_to = connect_to(state);
        let live = &state.config.live;
        let (timeout, wait) = (live.upstream_timeout, live.upstream_wait);
        let result = if wire::carries(&parts, body.is_end_stream()) {
            drop(body);
            tokio::time::timeout(
                timeout,
                self.upstreams.send_whole(connect_to, &parts, &[], wait),
            )
            .await
            .map(|sent| sent.map(answer))
        } else {
            let request = Request::from_parts(
                parts,
                ClientBody::new(body, live.body_read_timeout, live.body_min_rate),
            );
            tokio::time::timeout(timeout, self.upstreams.send(connect_to, request, wait))
                .await
                .map(|sent| sent.map(answer))
        };
        self.answered(started, result)
    }

    /// [`Self::forward`] for a request without a body read by the HTTP/1
    /// front end: its head written for the upstream straight from the
    /// fields it read, the same way [`one_hop`] rewrites a parsed one; the
    /// upstream's answer kept as it came, for the front end to relay.
    pub(super) async fn forward_head(
        &self,
        state: &State,
        head: &Head<'_, '_>,
        peer: &Peer,
        cost_header: Option<&HeaderName>,
        timer: &mut Timer,
    ) -> Forwarded {
        let Ok(method) = http::Method::from_bytes(head.method.as_bytes()) else {
            return Forwarded::Made(error(
                StatusCode::BAD_REQUEST,
                "BAD_REQUEST",
                "invalid method",
            ));
        };
        let mut request = Vec::with_capacity(512);
        encode_from_fields(&mut request, head, state, peer, cost_header);
        // One clock read for the deadline, the pooled connections' idle
        // time and the upstream's time.
        let started = tokio::time::Instant::now();
        let live = &state.config.live;
        let sending = self.upstreams.send_encoded(
            connect_to(state),
            &request,
            &method,
            live.upstream_wait,
            started.into_std(),
        );
        // The deadline is polled outside the task's budget, as tokio's own
        // `timeout` polls it: an exchange that used the budget up cannot
        // keep it from firing.
        let deadline = tokio::task::unconstrained(timer.until(started + live.upstream_timeout));
        let sent = tokio::select! {
            biased;
            sent = sending => Some(sent),
            () = deadline => None,
        };
        self.observe_upstream(started.into_std());
        match sent {
            Some(Ok((head, body))) => Forwarded::Relayed(Relayed {
                head,
                body,
                hidden: cost_header.cloned(),
            }),
            Some(Err(e)) => Forwarded::Made(self.failed(Some(e))),
            None => Forwarded::Made(self.failed(None)),
        }
    }

    /// [`Self::forward`] for a body read whole: framed here, whatever the
    /// client's framing was.
    async fn forward_whole(
        &self,
        state: &State,
        mut parts: request::Parts,
        body: Bytes,
        peer: &Peer,
    ) -> Response<Body> {
        if let Err(refused) = one_hop(&mut parts, state, peer) {
            return *refused;
        }
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        let started = Instant::now();
        let connect_to = connect_to(state);
        let live = &state.config.live;
        let sent = tokio::time::timeout(
            live.upstream_timeout,
            self.upstreams
                .send_whole(connect_to, &parts, &body, live.upstream_wait),
        )
        .await
        .map(|sent| sent.map(answer));
        self.answered(started, sent)
    }

    /// The upstream's answer, or the error that stands for it.
    fn answered(
        &self,
        started: Instant,
        result: Result<Result<Response<Body>, super::BoxError>, tokio::time::error::Elapsed>,
    ) -> Response<Body> {
        self.observe_upstream(started);
        match result {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => self.failed(Some(e)),
            Err(_elapsed) => self.failed(None),
        }
    }

    /// How long the upstream took, from `started`.
    fn observe_upstream(&self, started: Instant) {
        self.metrics
            .upstream_seconds
            .observe(started.elapsed().as_secs_f64());
    }

    /// The error that stands for an upstream's answer that did not come:
    /// the request failed, or it timed out.
    fn failed(&self, failure: Option<super::BoxError>) -> Response<Body> {
        let Some(e) = failure else {
            return error(
                StatusCode::GATEWAY_TIMEOUT,
                "UPSTREAM_TIMEOUT",
                "The upstream did not answer in time.",
            );
        };
        if e.is::<UpstreamBusy>() {
            self.metrics.refuse("max_upstream_connections");
            let mut busy = error(
                StatusCode::SERVICE_UNAVAILABLE,
                "OVERLOADED",
                "Every upstream connection is busy; try again later.",
            );
            busy.extensions_mut().insert(NotSent);
            return busy;
        }
        if let Some(fault) = client_fault(&*e) {
            return client_body_answer(fault);
        }
        tracing::warn!(error = %e, "upstream request failed");
        error(
            StatusCode::BAD_GATEWAY,
            "UPSTREAM_UNAVAILABLE",
            "The upstream could not be reached.",
        )
    }
}

/// The answer to a request body the client broke: 408 for one that stalled
/// or came too slowly, 400 for one malformed or cut off.
pub(super) fn client_body_answer(fault: &ClientBodyError) -> Response<Body> {
    match fault {
        ClientBodyError::Stalled(_) | ClientBodyError::TooSlow(_) => error(
            StatusCode::REQUEST_TIMEOUT,
            "REQUEST_TIMEOUT",
            "The request body took too long.",
        ),
        ClientBodyError::Malformed(_) => error(
            StatusCode::BAD_REQUEST,
            "BAD_REQUEST",
            "The request body is malformed.",
        ),
    }
}

/// Rewrites a request's head for the hop to the upstream: the origin-form
/// target, a `Host`, HTTP/1.1, no hop-by-hop fields, `X-Forwarded-*`; a 400
/// for a target that has no origin form.
fn one_hop(
    parts: &mut request::Parts,
    state: &State,
    peer: &Peer,
) -> Result<(), Box<Response<Body>>> {
    let upstream = upstream_authority(state);
    // The upstream gets the origin form (`/path?query`): HTTP/2 targets
    // and absolute-form HTTP/1 ones carry a scheme and authority.
    if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", http::uri::PathAndQuery::as_str);
        let Ok(origin) = Uri::builder().path_and_query(path).build() else {
            return Err(Box::new(error(
                StatusCode::BAD_REQUEST,
                "BAD_REQUEST",
                "invalid request target",
            )));
        };
        parts.uri = origin;
    }
    // HTTP/2 clients send :authority, and HTTP/1.0 clients may send no
    // Host; the upstream speaks HTTP/1.1 and needs one.
    if !parts.headers.contains_key(header::HOST)
        && let Ok(value) = HeaderValue::from_str(upstream)
    {
        parts.headers.insert(header::HOST, value);
    }
    parts.version = http::Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers, |name| kept(state, name));
    append_forwarded(&mut parts.headers, peer);
    Ok(())
}

/// The upstream's answer as it goes to the client: hop-by-hop fields
/// dropped, the body streamed.
fn answer<B>(response: Response<B>) -> Response<Body>
where
    B: hyper::body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<super::BoxError>,
{
    let (mut parts, body) = response.into_parts();
    // Read by its transfer coding, an answer that also carries a length goes
    // on without it (RFC 9112 §6.3, 3), as the front end's relay sends it.
    if parts.headers.contains_key(header::TRANSFER_ENCODING) {
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    strip_hop_by_hop(&mut parts.headers, |_| false);
    Response::from_parts(parts, body.map_err(Into::into).boxed())
}

/// The configured upstream's authority (`host[:port]`).
pub(super) fn upstream_authority(state: &State) -> &str {
    &state.upstream_authority
}

/// `host:port` of the configured upstream to connect to; port 80 when it names none.
pub(super) fn connect_to(state: &State) -> &str {
    &state.connect_to
}

/// Whether a request's field `name` goes upstream whatever `Connection`
/// says: `Host`, and the fields identity reads (the limiter counted the
/// request by them; the upstream must see the same).
fn kept(state: &State, name: &[u8]) -> bool {
    name.eq_ignore_ascii_case(b"host") || state.identity.reads(name)
}

/// Headers that describe one hop and must not be forwarded (RFC 9110 §7.6.1),
/// plus every header the `Connection` header names but those `keep` keeps.
fn strip_hop_by_hop(headers: &mut HeaderMap, keep: impl Fn(&[u8]) -> bool) {
    // One pass over the names notes which hop-by-hop headers are present:
    // most messages carry none, responses often only `Connection: keep-alive`.
    let mut present = 0u16;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|hop| hop == name) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    // `Connection` (the first) names more; `close` and `keep-alive` are
    // options, not headers to look for.
    if present & 1 != 0 {
        let mut named: Vec<HeaderName> = Vec::new();
        // Read as bytes: a value with a byte beyond ASCII still names the
        // fields it lists (as the front end's relay reads it).
        for token in headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| connection_tokens(v.as_bytes()))
            .filter(|t| !keep(t))
        {
            if let Ok(name) = HeaderName::from_bytes(token) {
                named.push(name);
            }
        }
        for name in named {
            headers.remove(name);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// The hop-by-hop headers; `Connection` names any others. A `static`: one
/// array, not a copy made (and dropped) wherever it is named.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    KEEP_ALIVE,
    PROXY_CONNECTION,
];

/// Whether `name` (in any case) is one of [`HOP_BY_HOP`], told by its
/// length first: a field of another length costs one comparison.
fn hop_by_hop(name: &[u8]) -> bool {
    let is = |hop: &str| name.eq_ignore_ascii_case(hop.as_bytes());
    match name.len() {
        2 => is("te"),
        7 => is("trailer") || is("upgrade"),
        10 => is("connection") || is("keep-alive"),
        16 => is("proxy-connection"),
        17 => is("transfer-encoding"),
        18 => is("proxy-authenticate"),
        19 => is("proxy-authorization"),
        _ => false,
    }
}

/// The head of a request the front end read, as it goes upstream (what
/// [`one_hop`] and [`wire::encode_head`] make of a parsed request): the
/// origin-form target, HTTP/1.1, no hop-by-hop field nor one `Connection`
/// names, a `Host`, `X-Forwarded-*`, and no framing but an empty length the
/// client sent; the tier's cost field taken out.
fn encode_from_fields(
    out: &mut Vec<u8>,
    head: &Head<'_, '_>,
    state: &State,
    peer: &Peer,
    cost_header: Option<&HeaderName>,
) {
    let fields = head.fields.0;
    out.extend_from_slice(head.method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(head.target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    // The fields `Connection` names, read once (the framing rules bound
    // how many): most requests name none, or only `keep-alive` or `close`.
    let mut named: [&[u8]; MAX_CONNECTION_OPTIONS] = [&[]; MAX_CONNECTION_OPTIONS];
    let mut count = 0;
    for field in fields {
        if field.name.eq_ignore_ascii_case("connection") {
            for token in connection_tokens(field.value) {
                if count < named.len() && !kept(state, token) {
                    named[count] = token;
                    count += 1;
                }
            }
        }
    }
    let named = &named[..count];
    let mut host = false;
    let mut forwarded = false;
    for field in fields {
        let name = field.name;
        if hop_by_hop(name.as_bytes())
            || name.eq_ignore_ascii_case("content-length")
            || name.eq_ignore_ascii_case(X_FORWARDED_PROTO.as_str())
            || cost_header.is_some_and(|cost| name.eq_ignore_ascii_case(cost.as_str()))
            || named
                .iter()
                .any(|n| n.eq_ignore_ascii_case(name.as_bytes()))
        {
            continue;
        }
        if name.eq_ignore_ascii_case(X_FORWARDED_FOR.as_str()) {
            forwarded = true;
            continue;
        }
        host |= name.eq_ignore_ascii_case("host");
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(field.value);
        out.extend_from_slice(b"\r\n");
    }
    if !host {
        out.extend_from_slice(b"host: ");
        out.extend_from_slice(upstream_authority(state).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if head.empty_length {
        out.extend_from_slice(b"content-length: 0\r\n");
    }
    out.extend_from_slice(b"x-forwarded-for: ");
    if forwarded {
        for field in fields {
            if field.name.eq_ignore_ascii_case(X_FORWARDED_FOR.as_str()) {
                out.extend_from_slice(field.value);
                out.extend_from_slice(b", ");
            }
        }
    }
    out.extend_from_slice(peer.forwarded_for.as_bytes());
    out.extend_from_slice(if peer.tls {
        b"\r\nx-forwarded-proto: https\r\n\r\n"
    } else {
        b"\r\nx-forwarded-proto: http\r\n\r\n"
    });
}

/// The field names a `Connection` value lists, but `close` and `keep-alive`.
fn connection_tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|b| *b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| {
            !t.is_empty()
                && !t.eq_ignore_ascii_case(b"close")
                && !t.eq_ignore_ascii_case(b"keep-alive")
        })
}

/// Appends the peer to `X-Forwarded-For` and sets `X-Forwarded-Proto`.
/// Every line the client sent counts, as one list (as identity reads it).
fn append_forwarded(headers: &mut HeaderMap, peer: &Peer) {
    let ip = &peer.forwarded_for;
    let value = if headers.contains_key(&X_FORWARDED_FOR) {
        let mut joined = Vec::with_capacity(64);
        for existing in headers.get_all(&X_FORWARDED_FOR) {
            joined.extend_from_slice(existing.as_bytes());
            joined.extend_from_slice(b", ");
        }
        joined.extend_from_slice(ip.as_bytes());
        HeaderValue::try_from(joined).ok()
    } else {
        Some(ip.clone())
    };
    if let Some(value) = value {
        headers.insert(X_FORWARDED_FOR, value);
    }
    headers.insert(
        X_FORWARDED_PROTO,
        HeaderValue::from_static(if peer.tls { "https" } else { "http" }),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_knows_each_name_in_any_case_and_no_other() {
        for hop in &HOP_BY_HOP {
            assert!(hop_by_hop(hop.as_str().as_bytes()), "{hop}");
            assert!(
                hop_by_hop(hop.as_str().to_ascii_uppercase().as_bytes()),
                "{hop}"
            );
        }
        // Other names, some of each length a hop-by-hop name has.
        for other in [
            "",
            "host",
            "content-length",
            "tee",
            "trailers",
            "connections",
            "x-forwarded-for",
            "tx",
            "referer",
            "keep_alive",
            "connectioN-",
            "proxy-connectio_",
            "transfer-encodinx",
            "proxy-authenticatx",
            "proxy-authorizatio_",
        ] {
            assert!(!hop_by_hop(other.as_bytes()), "{other}");
        }
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(n, v)| {
                (
                    HeaderName::from_bytes(n.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_stripped() {
        let mut headers = map(&[
            ("connection", "keep-alive, X-Secret"),
            ("connection", "x-other, \u{e9}"),
            ("x-other", "2"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("transfer-encoding", "chunked"),
            ("proxy-authorization", "Basic x"),
            ("accept", "*/*"),
            ("authorization", "Bearer k"),
        ]);
        strip_hop_by_hop(&mut headers, |_| false);
        let mut left: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["accept", "authorization"]);
    }

    /// An answer relayed as it came loses what hyper's path strips: the
    /// hop-by-hop fields and those `Connection` names (in any case), a
    /// length beside a transfer coding, and the hidden field.
    #[test]
    fn a_relayed_answer_loses_what_hyper_strips() {
        let head = wire::RawHead::parsed(
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Secret, x-other\r\n\
              X-SECRET: 1\r\nX-Other: 2\r\nKeep-Alive: timeout=5\r\n\
              Transfer-Encoding: chunked\r\nContent-Length: 5\r\nUpgrade: h2c\r\n\
              Proxy-Authenticate: Basic\r\nX-Cost: 7\r\nContent-Type: application/json\r\n\
              x-ratelimit-limit: 9\r\n\r\n",
        );
        let cost = HeaderName::from_static("x-cost");
        let left: Vec<_> = relayed_fields(&head, Some(&cost)).collect();
        assert_eq!(
            left,
            [
                (&b"Content-Type"[..], &b"application/json"[..]),
                (&b"x-ratelimit-limit"[..], &b"9"[..])
            ]
        );
        assert_eq!(head.declared_length(), None, "a length beside a coding");
        let plain =
            wire::RawHead::parsed(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-cost: 7\r\n\r\n");
        assert_eq!(
            relayed_fields(&plain, None).collect::<Vec<_>>(),
            [(&b"x-cost"[..], &b"7"[..])],
            "the length is the writer's, from the framing"
        );
        assert_eq!(plain.declared_length(), Some(5));
        for (raw, declared) in [
            (
                &b"HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\ncontent-length: 5\r\n\r\n"[..],
                Some(5),
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
                None,
            ),
            (b"HTTP/1.1 200 OK\r\ncontent-length: abc\r\n\r\n", None),
        ] {
            let mut buf = bytes::BytesMut::from(raw);
            let head = wire::RawHead::parsed_for(&mut buf, &http::Method::HEAD);
            assert_eq!(
                head.declared_length(),
                declared,
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn end_to_end_headers_are_kept_as_they_are() {
        let mut headers = map(&[("accept", "*/*"), ("x-api-key", "k"), ("host", "api")]);
        let before = headers.clone();
        strip_hop_by_hop(&mut headers, |_| false);
        assert_eq!(headers, before);
    }
}
