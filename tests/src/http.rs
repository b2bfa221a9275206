//! The one HTTP kit of the suites and benches: raw HTTP/1 requests written as
//! bytes (so no client library normalises them), answers read to the close or
//! to their `Content-Length` and parsed into status, headers and body; the one
//! `reqwest` client; and the agent's metrics.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use crate::{agent::Process, prometheus};

/// The `reqwest` client of the suites: 10 s per request.
#[must_use]
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client")
}

/// A `POST` of `{"stream": true}` to the chat-completions route through
/// `agent`: the demo upstream answers it with a stream of five events.
pub async fn event_stream(client: &reqwest::Client, agent: &Process) -> reqwest::Response {
    client
        .post(agent.url("/api/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(r#"{"stream": true}"#)
        .send()
        .await
        .expect("request")
}

/// `GET path` on a connection of its own (`Host: api`, `Connection: close`),
/// with extra header lines (`Name: value`, no line ending).
#[must_use]
pub fn get_request(path: &str, headers: &[String]) -> String {
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: api\r\nConnection: close\r\n");
    for header in headers {
        request.push_str(header);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    request
}

/// Writes `request` on `stream` and reads until the peer closes (5 s at most
/// per read; a read error ends the answer where it stands).
pub fn exchange(stream: &mut TcpStream, request: &[u8]) -> String {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("read timeout");
    stream.write_all(request).expect("write");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

/// Reads one response off `stream`: up to its `Content-Length` (see
/// [`complete`]), or to the close if it has none. A reset is a close.
///
/// # Errors
/// Any other read error (a timeout set on `stream`, say).
pub fn read_response(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut answer = Vec::new();
    let mut buf = [0; 4096];
    while !complete(&answer) {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => return Err(e),
        }
    }
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

/// Whether `raw` holds a whole first response by its `Content-Length` (one
/// without that header is complete only at the close).
#[must_use]
pub fn complete(raw: &[u8]) -> bool {
    let text = String::from_utf8_lossy(raw);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    header(head, "content-length")
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|length| body.len() >= length)
}

/// The status code of an `HTTP/1.1` answer.
#[must_use]
pub fn status(raw: &str) -> Option<u16> {
    raw.strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
}

/// The first `name` header (any case) of the first response in `raw`, trimmed.
#[must_use]
pub fn header<'a>(raw: &'a str, name: &str) -> Option<&'a str> {
    let head = raw.split_once("\r\n\r\n").map_or(raw, |(head, _)| head);
    head.split("\r\n").skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// An answer, parsed.
#[derive(Debug)]
pub struct Response {
    /// 0 when `raw` does not start with an `HTTP/1.1` status line.
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// Everything after the head (empty when the head never ended).
    pub body: String,
}

impl Response {
    #[must_use]
    pub fn parse(raw: &str) -> Self {
        let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((raw, ""));
        let headers = head
            .split("\r\n")
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
            .collect();
        Self {
            status: status(raw).unwrap_or(0),
            headers,
            body: body.to_owned(),
        }
    }

    #[must_use]
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// `GET path` from this process, `Host` the address itself (as a browser
/// sends it; the admin listener answers no other); the answer (status 200
/// asserted) parsed.
#[must_use]
pub fn get(addr: SocketAddr, path: &str) -> Response {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let raw = exchange(&mut stream, request.as_bytes());
    let response = Response::parse(&raw);
    assert_eq!(response.status, 200, "GET {path} from {addr}: {raw}");
    response
}

/// The agent's Prometheus text, from its admin listener.
#[must_use]
pub fn metrics(agent: &Process) -> String {
    get(
        agent.admin.expect("agent has an admin listener"),
        "/metrics",
    )
    .body
}

/// One value of the agent's metrics (see [`prometheus::metric`]), or a panic
/// that shows them all.
#[must_use]
pub fn metric<T: std::str::FromStr>(agent: &Process, series: &str) -> T {
    let text = metrics(agent);
    prometheus::metric(&text, series).unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const RAW: &str =
        "HTTP/1.1 429 Too Many Requests\r\nContent-Length: 2\r\nx-ratelimit-limit: 7\r\n\r\n{}";

    #[test]
    fn answers_parse_into_status_headers_and_body() {
        let response = Response::parse(RAW);
        assert_eq!(response.status, 429);
        assert_eq!(response.header("X-RateLimit-Limit"), Some("7"));
        assert_eq!(response.body, "{}");
        assert_eq!(header(RAW, "content-length"), Some("2"));
        assert_eq!(status("garbage"), None);
        assert_eq!(Response::parse("").status, 0);
    }

    #[test]
    fn a_response_is_complete_at_its_content_length() {
        assert!(complete(RAW.as_bytes()));
        assert!(!complete(&RAW.as_bytes()[..RAW.len() - 1]));
        assert!(!complete(b"HTTP/1.1 200 OK\r\n\r\nstreamed"));
    }
}
