//! End to end, bad HTTP input against the real agent binary: every malformed
//! request gets the 4xx its case names, never a crash, a hang, a silent close
//! or a request smuggled to the upstream; slow clients can't starve others.

use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use limiter_tests::{
    agent::{Process, agent_in_front, small_config},
    http::{self, status},
};

/// Sends raw bytes and returns everything answered before the agent closes
/// (which it must within 5 s: the header and idle timeouts are 2 s).
fn exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect");
    let started = Instant::now();
    let answer = http::exchange(&mut stream, bytes);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the agent neither answered nor closed: {bytes:?}"
    );
    answer
}

/// How the agent refuses one malformed request. No case expects a silent
/// close: an empty answer fails every one.
#[derive(Clone, Copy, Debug)]
enum Refusal {
    /// Refused by the HTTP parser before any request exists: this status,
    /// no body, and the connection closed (`Connection: close`).
    Parser(u16),
    /// Refused by the agent: a 400 with its JSON error body, this message
    /// under `BAD_REQUEST`.
    BadRequest(&'static str),
}

/// Asserts that `answer` is exactly one response, the one `expected` says.
fn assert_refused(answer: &str, expected: Refusal, what: &str) {
    let response = http::Response::parse(answer);
    let length: usize = response
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{what}: no Content-Length: {answer:?}"));
    assert_eq!(
        response.body.len(),
        length,
        "{what}: not exactly one response: {answer:?}"
    );
    match expected {
        Refusal::Parser(code) => {
            assert_eq!(response.status, code, "{what}: {answer:?}");
            assert_eq!(length, 0, "{what}: {answer:?}");
            assert_eq!(
                response.header("connection"),
                Some("close"),
                "{what}: {answer:?}"
            );
        }
        Refusal::BadRequest(message) => {
            assert_eq!(response.status, 400, "{what}: {answer:?}");
            assert!(
                response
                    .header("content-type")
                    .is_some_and(|v| v.to_ascii_lowercase().starts_with("application/json")),
                "{what}: a body that is not JSON: {answer:?}"
            );
            let body: serde_json::Value = serde_json::from_str(&response.body)
                .unwrap_or_else(|e| panic!("{what}: {e}: {answer:?}"));
            assert_eq!(
                (&body["error"]["code"], &body["error"]["message"]),
                (&"BAD_REQUEST".into(), &message.into()),
                "{what}: {answer:?}"
            );
        }
    }
}

fn still_serving(agent: &Process) {
    let answer = exchange(
        agent.addr,
        b"GET /api/chat HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    );
    assert_eq!(status(&answer), Some(200), "{answer}");
}

fn start() -> (Process, Process) {
    agent_in_front(&small_config(
        "/api/chat",
        1000,
        "1m",
        "max_header_bytes = 8192\nheader_read_timeout = \"2s\"\nbody_read_timeout = \"1s\"\nidle_timeout = \"2s\"",
    ))
}

#[test]
fn malformed_requests_get_their_4xx() {
    use Refusal::{BadRequest, Parser};
    let (_upstream, agent) = start();
    let long_path = format!(
        "GET /api/{} HTTP/1.1\r\nhost: x\r\n\r\n",
        "a".repeat(20_000)
    );
    let mut many_headers = String::from("GET /api/chat HTTP/1.1\r\nhost: x\r\n");
    for i in 0..200 {
        let _ = write!(many_headers, "x-h{i}: v\r\n");
    }
    many_headers.push_str("\r\n");
    // Framing, header syntax and sizes are the parser's to refuse; a request
    // it parsed (a path the router can't read one way only, a body that
    // breaks its own chunking) is the agent's, with a JSON body. The 20,000-byte path
    // overflows the read buffer (`max_header_bytes`) before the agent could
    // check it against `MAX_TARGET_LEN`.
    let cases: Vec<(&str, Vec<u8>, Refusal)> = vec![
        ("garbage request line", b"GARBAGE\r\n\r\n".to_vec(), Parser(400)),
        ("no version", b"GET /api/chat\r\n\r\n".to_vec(), Parser(400)),
        (
            "invalid method",
            b"G@T /api/chat HTTP/1.1\r\nhost: x\r\n\r\n".to_vec(),
            Parser(400),        ),
        (
            "unknown version",
            b"GET /api/chat HTTP/9.9\r\nhost: x\r\n\r\n".to_vec(),
            Parser(400),        ),
        (
            "control byte in the path",
            b"GET /api/\x01chat HTTP/1.1\r\nhost: x\r\n\r\n".to_vec(),
            Parser(400),        ),
        (
            "control byte in a header",
            b"GET /api/chat HTTP/1.1\r\nhost: x\r\nx-a: a\x01b\r\n\r\n".to_vec(),
            Parser(400),        ),
        (
            "space before the colon",
            b"GET /api/chat HTTP/1.1\r\nhost : x\r\n\r\n".to_vec(),
            Parser(400),        ),
        (
            "conflicting content-length",
            b"POST /api/chat HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!".to_vec(),
            Parser(400),        ),
        (
            "invalid content-length",
            b"POST /api/chat HTTP/1.1\r\nhost: x\r\ncontent-length: abc\r\n\r\n".to_vec(),
            Parser(400),        ),
        (
            "negative content-length",
            b"POST /api/chat HTTP/1.1\r\nhost: x\r\ncontent-length: -1\r\n\r\n".to_vec(),
            Parser(400),        ),
        (
            "unknown transfer-encoding",
            b"POST /api/chat HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip\r\n\r\n".to_vec(),
            Parser(400),        ),
        (
            "bad chunk size",
            b"POST /api/chat HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"
                .to_vec(),
            BadRequest("The request body is malformed."),        ),
        ("oversized path", long_path.into_bytes(), Parser(431)),
        ("too many headers", many_headers.into_bytes(), Parser(431)),
        (
            "invalid percent-encoding",
            b"GET /api/%zzchat HTTP/1.1\r\nhost: x\r\n\r\n".to_vec(),
            BadRequest("invalid percent-encoding"),        ),
        (
            "encoded slash in a segment",
            b"GET /api%2fchat HTTP/1.1\r\nhost: x\r\n\r\n".to_vec(),
            BadRequest("encoded slash or backslash"),        ),
        (
            "encoded NUL",
            b"GET /api/chat%00 HTTP/1.1\r\nhost: x\r\n\r\n".to_vec(),
            BadRequest("control character"),        ),
        (
            "non-UTF-8 path bytes",
            b"GET /api/\xff\xfe HTTP/1.1\r\nhost: x\r\n\r\n".to_vec(),
            Parser(400),        ),
    ];
    for (what, bytes, expected) in cases {
        let answer = exchange(agent.addr, &bytes);
        assert_refused(&answer, expected, what);
        still_serving(&agent);
    }
    // HTTP/2 with prior knowledge, then half a frame: the agent speaks HTTP/2
    // back (its SETTINGS first) and closes once no request has started within
    // the header timeout (`exchange` fails if it holds the connection 5 s).
    let started = Instant::now();
    let answer = exchange(agent.addr, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00");
    let closed = started.elapsed();
    let frame = answer.as_bytes();
    assert!(
        frame.len() >= 9 && frame[3] == 0x4 && frame[4] == 0 && frame[5..9] == [0; 4],
        "HTTP/2 preface: not answered with SETTINGS: {frame:?}"
    );
    assert!(
        closed >= Duration::from_millis(1900),
        "HTTP/2 preface: closed after {closed:?}, before the header timeout"
    );
    still_serving(&agent);
}

#[test]
fn api_keys_beyond_visible_ascii_are_refused_not_rebucketed() {
    let (_upstream, agent) = agent_in_front(&small_config("/api/chat", 1, "1m", ""));
    let with_key = |key: &[u8]| {
        let mut request =
            b"GET /api/chat HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-api-key: ".to_vec();
        request.extend_from_slice(key);
        request.extend_from_slice(b"\r\n\r\n");
        exchange(agent.addr, &request)
    };
    // Neither a fresh bucket nor the address's: a key no upstream would read
    // the same way is refused before it gets there.
    for key in [&b"\xff\xfe"[..], b"k\xe9y", b"two words"] {
        let answer = with_key(key);
        assert_eq!(status(&answer), Some(400), "{answer}");
        assert!(answer.contains("BAD_IDENTITY"), "{answer}");
    }
    assert_eq!(status(&with_key(b"fine")), Some(200));
}

/// Counts the upstream's echoes of `path` in everything the agent answered.
fn echoes(answer: &str, path: &str) -> usize {
    answer.matches(&format!("\"path\":\"{path}\"")).count()
}

#[test]
fn ambiguous_framing_smuggles_nothing_to_the_upstream() {
    let (_upstream, agent) = start();
    let attempts: Vec<(&str, &[u8])> = vec![
        (
            "CL.TE",
            b"POST /api/chat HTTP/1.1\r\nhost: x\r\ncontent-length: 6\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n",
        ),
        (
            "TE.CL",
            b"POST /api/chat HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\ncontent-length: 4\r\n\r\n5c\r\nGET /smuggled HTTP/1.1\r\nhost: x\r\ncontent-length: 15\r\n\r\nx=1\r\n0\r\n\r\n",
        ),
        (
            "TE obfuscated",
            b"POST /api/chat HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\ntransfer-encoding: xchunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n",
        ),
        (
            "TE with a space",
            b"POST /api/chat HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\ntransfer-encoding : chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n",
        ),
        (
            "bare LF in the header block",
            b"POST /api/chat HTTP/1.1\nhost: x\ncontent-length: 0\n\nGET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n",
        ),
    ];
    for (what, bytes) in attempts {
        let answer = exchange(agent.addr, bytes);
        // A pipelined second request is fine only when the agent itself parsed
        // it as one (then it is limited and forwarded as a request of its own,
        // and the first request's body holds none of it).
        let first_echoes = echoes(&answer, "/api/chat");
        let smuggled = echoes(&answer, "/smuggled");
        assert!(
            smuggled == 0 || (first_echoes == 1 && answer.matches("HTTP/1.1 ").count() >= 2),
            "{what}: {answer}"
        );
        assert!(
            !answer.contains("GET /smuggled"),
            "{what}: a request reached the upstream inside a body: {answer}"
        );
        still_serving(&agent);
    }
}

#[test]
fn slow_clients_cannot_starve_the_others() {
    let (_upstream, agent) = agent_in_front(&small_config(
        "/api/chat",
        100_000,
        "1m",
        "header_read_timeout = \"1s\"\nmax_connections = 64",
    ));
    // Slowloris: 40 connections that trickle header bytes and never finish.
    let mut slow: Vec<TcpStream> = (0..40)
        .map(|_| {
            let mut s = TcpStream::connect(agent.addr).expect("connect");
            s.write_all(b"GET /api/chat HTTP/1.1\r\nhost: x\r\n")
                .unwrap();
            s
        })
        .collect();
    let started = Instant::now();
    let mut served = 0;
    while started.elapsed() < Duration::from_secs(3) {
        for s in &mut slow {
            let _ = s.write_all(b"x-slow: 1\r\n");
        }
        let sent = Instant::now();
        still_serving(&agent);
        assert!(
            sent.elapsed() < Duration::from_millis(500),
            "a normal request waited {:?} behind slow clients",
            sent.elapsed()
        );
        served += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(served >= 10);
    // The header timeout answered every slow connection with a 408, then
    // closed it.
    for mut s in slow {
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        let answer = String::from_utf8_lossy(&answer);
        assert_eq!(status(&answer), Some(408), "{answer:?}");
        assert!(answer.contains("REQUEST_TIMEOUT"), "{answer:?}");
    }
}

#[test]
fn a_stalled_request_body_is_cut_off_with_408() {
    let (_upstream, agent) = start();
    let mut stream = TcpStream::connect(agent.addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // Chunked, so the upstream reads the body before it answers; then silence.
    stream
        .write_all(
            b"POST /api/chat HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
        )
        .unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let waited = started.elapsed();
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        waited < Duration::from_secs(4),
        "the stalled connection was held for {waited:?}"
    );
    assert_eq!(status(&answer), Some(408), "{answer}");
    assert!(answer.contains("REQUEST_TIMEOUT"), "{answer}");
    assert!(
        waited >= Duration::from_millis(900),
        "cut off after {waited:?}"
    );
    still_serving(&agent);
}

#[tokio::test]
async fn http2_multiplexing_on_one_connection_admits_exactly_the_limit() {
    let (_upstream, agent) = agent_in_front(&small_config("/api/chat", 25, "1m", ""));
    // Cleartext HTTP/2 with prior knowledge: every request one stream of a
    // single connection.
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("client");
    let url = format!("http://{}/api/chat", agent.addr);
    let requests = (0..100).map(|_| {
        let client = client.clone();
        let url = url.clone();
        tokio::spawn(async move {
            let response = client.get(&url).send().await.expect("request");
            assert_eq!(response.version(), reqwest::Version::HTTP_2);
            response.status().as_u16()
        })
    });
    let statuses: Vec<u16> = futures_util::future::join_all(requests)
        .await
        .into_iter()
        .map(|s| s.expect("task"))
        .collect();
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!((admitted, limited), (25, 75));
}

#[test]
fn many_requests_on_one_keep_alive_connection_admit_exactly_the_limit() {
    let (_upstream, agent) = agent_in_front(&small_config("/api/chat", 7, "1m", ""));
    let mut stream = TcpStream::connect(agent.addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // Twenty pipelined requests, the last one closing the connection.
    let mut requests = String::new();
    for i in 0..20 {
        let close = if i == 19 { "connection: close\r\n" } else { "" };
        let _ = write!(requests, "GET /api/chat HTTP/1.1\r\nhost: x\r\n{close}\r\n");
    }
    stream.write_all(requests.as_bytes()).unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    assert_eq!(answer.matches("HTTP/1.1 200").count(), 7, "{answer}");
    assert_eq!(answer.matches("HTTP/1.1 429").count(), 13, "{answer}");
}
