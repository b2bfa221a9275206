//! The HTTP/1 front end against the real agent binary and a scripted
//! upstream that answers with the head it read: pipelined requests in
//! order across a handoff to hyper, the framing rules on both readers,
//! `Connection` unable to strip what the limiter counted, a client that
//! goes away letting go of its request, and HTTP/1.0 and HEAD answered as
//! hyper answers them.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use limiter_tests::{
    agent::{Process, agent, small_config},
    http::{self, status},
    scripted::{self, After},
};

/// An upstream answering each request with its head as the body, after
/// `delay`; what it read, in order.
fn echoing(delay: Duration) -> (std::net::SocketAddr, Arc<Mutex<Vec<String>>>) {
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = seen.clone();
    let (addr, _) = scripted::upstream(move |asked| {
        std::thread::sleep(delay);
        let line = format!("{} {}", asked.method, asked.target);
        log.lock().unwrap().push(format!("{line}\n{}", asked.head));
        let body = format!("{line}\n{}", asked.head);
        let answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        (answer.into_bytes(), After::KeepOpen)
    });
    (addr, seen)
}

fn start(delay: Duration, server: &str) -> (Process, Arc<Mutex<Vec<String>>>) {
    let (upstream, seen) = echoing(delay);
    let config = small_config(
        "/api/:name",
        1000,
        "1m",
        &format!(
            "upstream = \"http://{upstream}\"\nheader_read_timeout = \"2s\"\nidle_timeout = \"2s\"\n{server}"
        ),
    );
    (agent(&config, None, &[]), seen)
}

/// The agent on a tier `/api/:name` of 1000 a minute (`tier_extra` added
/// to the tier's table) in front of a scripted upstream answering with
/// `answer`.
fn in_front_of(
    answer: impl Fn(&scripted::Asked) -> (Vec<u8>, After) + Send + Sync + 'static,
    tier_extra: &str,
) -> Process {
    let (upstream, _) = scripted::upstream(answer);
    let config = small_config(
        "/api/:name",
        1000,
        "1m",
        &format!("upstream = \"http://{upstream}\"\n"),
    );
    agent(&format!("{config}{tier_extra}"), None, &[])
}

/// Every response in `raw`, split by their `Content-Length`.
fn responses(raw: &str) -> Vec<http::Response> {
    let mut left = raw;
    let mut all = Vec::new();
    while !left.is_empty() {
        let response = http::Response::parse(left);
        let head_end = left.find("\r\n\r\n").map_or(left.len(), |i| i + 4);
        let length: usize = response
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        left = &left[(head_end + length).min(left.len())..];
        all.push(response);
    }
    all
}

#[test]
fn pipelined_requests_are_answered_in_order_across_a_handoff() {
    let (agent, seen) = start(Duration::ZERO, "");
    let mut stream = TcpStream::connect(agent.addr).unwrap();
    let answer = http::exchange(
        &mut stream,
        b"GET /api/one HTTP/1.1\r\nhost: a\r\n\r\n\
          GET /api/two?x=1 HTTP/1.1\r\nhost: a\r\ncontent-length: 0\r\n\r\n\
          POST /api/three HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\n\r\nhello\
          GET /api/four HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    );
    let all = responses(&answer);
    let lines: Vec<String> = all
        .iter()
        .map(|r| r.body.lines().next().unwrap_or("").to_owned())
        .collect();
    assert_eq!(
        lines,
        [
            "GET /api/one",
            "GET /api/two?x=1",
            "POST /api/three",
            "GET /api/four"
        ],
        "{answer}"
    );
    assert!(all.iter().all(|r| r.status == 200), "{answer}");
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 4);
    // The empty length is re-emitted; the body of the third is its own.
    assert!(seen[1].contains("content-length: 0"), "{}", seen[1]);
    assert!(seen[2].contains("content-length: 5"), "{}", seen[2]);
    assert!(all[0].header("x-ratelimit-remaining").is_some());
}

/// A client that sends its requests and shuts its side (`nc -N`) gets
/// every answer: only one that leaves with nothing more sent is dropped.
#[test]
fn pipelined_requests_before_a_half_close_are_all_answered() {
    let (agent, _) = start(Duration::from_millis(200), "");
    let mut stream = TcpStream::connect(agent.addr).unwrap();
    stream
        .write_all(
            b"GET /api/one HTTP/1.1\r\nhost: a\r\n\r\nGET /api/two HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
        )
        .unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    let all = responses(&answer);
    assert_eq!(all.len(), 2, "{answer}");
    assert!(all.iter().all(|r| r.status == 200), "{answer}");
}

#[test]
fn the_framing_rules_hold_on_both_readers() {
    let (agent, seen) = start(Duration::ZERO, "");
    let bad: [(&str, &[u8]); 3] = [
        (
            "two Hosts",
            b"GET /api/x HTTP/1.1\r\nhost: a\r\nHost: b\r\n\r\n",
        ),
        (
            "an underscore in a framing name",
            b"GET /api/x HTTP/1.1\r\nhost: a\r\ncontent_length: 5\r\n\r\nhello",
        ),
        (
            "a coding beside chunked",
            b"GET /api/x HTTP/1.1\r\nhost: a\r\ntransfer-encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        ),
    ];
    for (what, head) in bad {
        // Read by the front end, then by hyper after a request with a body
        // handed it the connection.
        let first = http::exchange(&mut TcpStream::connect(agent.addr).unwrap(), head);
        let mut after = b"POST /api/ok HTTP/1.1\r\nhost: a\r\ncontent-length: 2\r\n\r\nok".to_vec();
        after.extend_from_slice(head);
        let second = http::exchange(&mut TcpStream::connect(agent.addr).unwrap(), &after);
        let second = responses(&second);
        assert_eq!(status(&first), Some(400), "{what}, front end: {first}");
        assert!(first.contains("BAD_REQUEST"), "{what}: {first}");
        assert_eq!(second.len(), 2, "{what}, after a handoff");
        assert_eq!(
            (second[0].status, second[1].status),
            (200, 400),
            "{what}, after a handoff"
        );
        assert!(second[1].body.contains("BAD_REQUEST"), "{what}");
    }
    let seen = seen.lock().unwrap();
    assert!(
        seen.iter().all(|s| s.starts_with("POST /api/ok")),
        "only the good requests went upstream: {seen:?}"
    );
}

#[test]
fn connection_cannot_strip_what_the_limiter_counted() {
    let (agent, seen) = start(Duration::ZERO, "");
    let requests: [&[u8]; 2] = [
        b"GET /api/x HTTP/1.1\r\nhost: api.example\r\nx-api-key: k1\r\nx-secret: s\r\nconnection: x-api-key, Host, x-secret, Authorization\r\nauthorization: Bearer k1\r\n\r\n",
        b"POST /api/x HTTP/1.1\r\nhost: api.example\r\nx-api-key: k1\r\nx-secret: s\r\nconnection: x-api-key, Host, x-secret, Authorization\r\nauthorization: Bearer k1\r\ncontent-length: 2\r\n\r\nok",
    ];
    for request in requests {
        let answer = http::exchange(&mut TcpStream::connect(agent.addr).unwrap(), request);
        assert_eq!(status(&answer), Some(200), "{answer}");
    }
    for head in seen.lock().unwrap().iter() {
        assert!(head.contains("x-api-key: k1"), "{head}");
        assert!(head.contains("authorization: bearer k1"), "{head}");
        assert!(head.contains("host: api.example"), "{head}");
        assert!(!head.contains("x-secret"), "{head}");
        assert!(!head.contains("connection:"), "{head}");
    }
    // A key header spelled with an underscore is refused, not forwarded.
    let answer = http::exchange(
        &mut TcpStream::connect(agent.addr).unwrap(),
        b"GET /api/x HTTP/1.1\r\nhost: a\r\nx_api_key: k2\r\n\r\n",
    );
    assert_eq!(status(&answer), Some(400), "{answer}");
    assert!(answer.contains("BAD_IDENTITY"), "{answer}");
}

#[test]
fn a_client_that_goes_away_lets_go_of_its_request() {
    // One request in flight per client address: a request held for a
    // client that left would refuse the next with a 503.
    let (agent, seen) = start(
        Duration::from_millis(1500),
        "max_requests_in_flight_per_source = 1\n",
    );
    let mut gone = TcpStream::connect(agent.addr).unwrap();
    gone.write_all(b"GET /api/slow HTTP/1.1\r\nhost: a\r\n\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    drop(gone);
    std::thread::sleep(Duration::from_millis(100));
    let started = Instant::now();
    let answer = http::exchange(
        &mut TcpStream::connect(agent.addr).unwrap(),
        b"GET /api/next HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    );
    assert_eq!(status(&answer), Some(200), "{answer}");
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(seen.lock().unwrap().len(), 2);
}

#[test]
fn http_1_0_head_and_limit_fields_are_answered_as_hyper_answers_them() {
    let chunks = Arc::new(AtomicUsize::new(0));
    let count = chunks.clone();
    let agent = in_front_of(
        move |_| {
            count.fetch_add(1, Ordering::SeqCst);
            (
            b"HTTP/1.1 200 OK\r\nx-ratelimit-limit: 999\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                .to_vec(),
            After::KeepOpen,
        )
        },
        "",
    );
    // HTTP/1.0 asking to stay open: answered in its version, kept open,
    // and a body of unknown length delimited by the close.
    let mut stream = TcpStream::connect(agent.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream
        .write_all(b"GET /api/a HTTP/1.0\r\nconnection: keep-alive\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
    assert!(answer.ends_with("\r\n\r\nhello"), "{answer}");
    assert!(!answer.contains("transfer-encoding"), "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");
    // HTTP/1.1: chunked; the upstream's own limit field replaced by the
    // agent's.
    let answer = http::exchange(
        &mut TcpStream::connect(agent.addr).unwrap(),
        b"GET /api/a HTTP/1.1\r\nconnection: close\r\n\r\n",
    );
    assert!(answer.contains("transfer-encoding: chunked"), "{answer}");
    assert_eq!(answer.matches("x-ratelimit-limit").count(), 1, "{answer}");
    assert!(answer.contains("x-ratelimit-limit: 1000\r\n"), "{answer}");
    assert!(answer.ends_with("5\r\nhello\r\n0\r\n\r\n"), "{answer}");
    // HEAD: no body, and no length made up for it.
    let answer = http::exchange(
        &mut TcpStream::connect(agent.addr).unwrap(),
        b"HEAD /api/a HTTP/1.1\r\nconnection: close\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("\r\n\r\n"), "{answer}");
    assert!(!answer.contains("content-length"), "{answer}");
    assert!(chunks.load(Ordering::SeqCst) >= 3);
}

/// The field names of an answer's head, lowercased and sorted, and how
/// many times each came; its `Date` aside (each reader writes its own).
fn field_names(answer: &str) -> Vec<String> {
    let head = answer.split("\r\n\r\n").next().unwrap_or("");
    let mut names: Vec<String> = head
        .lines()
        .skip(1)
        .filter_map(|line| line.split_once(':'))
        .map(|(name, _)| name.trim().to_ascii_lowercase())
        .filter(|name| name != "date")
        .collect();
    names.sort();
    names
}

/// An upstream's answer goes to the client as it came, less what belongs
/// to one hop: the hop-by-hop fields and those its `Connection` names (in
/// any case), its `Date` and its limit fields (the agent writes its own),
/// and the tier's cost field. The front end relays it from the bytes it
/// read; hyper's path (a request with a body) from a parsed head: both
/// leave the same fields.
#[test]
fn an_upstream_answer_is_relayed_less_what_one_hop_carries() {
    let agent = in_front_of(
        |_| {
            (
                b"HTTP/1.1 299 Custom Reason\r\nContent-Type: text/plain\r\n\
              Connection: keep-alive, X-Hop\r\nx-HOP: secret\r\nKeep-Alive: timeout=5\r\n\
              Proxy-Authenticate: Basic\r\nX-Request-Cost: 1\r\n\
              Date: Mon, 01 Jan 2001 00:00:00 GMT\r\nX-RateLimit-Remaining: 12345\r\n\
              X-Kept: a\r\nX-Kept: b\r\nContent-Length: 5\r\n\r\nhello"
                    .to_vec(),
                After::KeepOpen,
            )
        },
        "cost_header = \"x-request-cost\"\n",
    );
    let relayed = http::exchange(
        &mut TcpStream::connect(agent.addr).unwrap(),
        b"GET /api/a HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    );
    assert!(
        relayed.starts_with("HTTP/1.1 299 Custom Reason\r\n"),
        "{relayed}"
    );
    assert!(relayed.ends_with("\r\n\r\nhello"), "{relayed}");
    assert!(!relayed.contains("2001"), "the upstream's Date: {relayed}");
    assert!(relayed.contains("X-Kept: a\r\nX-Kept: b\r\n"), "{relayed}");
    assert_eq!(
        field_names(&relayed),
        [
            "connection",
            "content-length",
            "content-type",
            "x-kept",
            "x-kept",
            "x-ratelimit-limit",
            "x-ratelimit-remaining",
            "x-ratelimit-reset"
        ],
        "{relayed}"
    );
    assert!(
        !relayed.contains("12345"),
        "the upstream's own limit field: {relayed}"
    );
    let parsed = http::exchange(
        &mut TcpStream::connect(agent.addr).unwrap(),
        b"POST /api/a HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: 2\r\n\r\nhi",
    );
    assert!(
        parsed.starts_with("HTTP/1.1 299 Custom Reason\r\n"),
        "{parsed}"
    );
    assert!(parsed.ends_with("\r\n\r\nhello"), "{parsed}");
    assert_eq!(
        field_names(&parsed),
        field_names(&relayed),
        "{parsed}\n{relayed}"
    );
}

/// Heads a broken upstream writes still reach the client framed: a
/// `Connection` that names `Content-Length` (the length is the agent's,
/// from the body's framing), a status line with no reason, and a reason
/// beyond ASCII (both answered with the canonical one); the connection
/// stays in step, so the next answer on it is read as its own.
#[test]
fn a_broken_upstream_head_still_reaches_the_client_framed() {
    let agent = in_front_of(
        |asked| {
            let answer: &[u8] = match asked.target.as_str() {
            "/api/a" => {
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: content-length\r\n\r\nhello"
            }
            "/api/b" => b"HTTP/1.1 200\r\ncontent-length: 2\r\n\r\nok",
            _ => b"HTTP/1.1 200 Tr\xc3\xa8s bien\r\ncontent-length: 3\r\n\r\nyes",
        };
            (answer.to_vec(), After::KeepOpen)
        },
        "",
    );
    let mut stream = TcpStream::connect(agent.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    for (target, body) in [("/api/a", "hello"), ("/api/b", "ok"), ("/api/c", "yes")] {
        stream
            .write_all(format!("GET {target} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
            .unwrap();
        let mut answer = Vec::new();
        let mut chunk = [0u8; 4096];
        while !String::from_utf8_lossy(&answer).ends_with(&format!("\r\n\r\n{body}")) {
            let n = stream.read(&mut chunk).unwrap();
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&answer));
            answer.extend_from_slice(&chunk[..n]);
        }
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(
            answer.contains(&format!("content-length: {}\r\n", body.len())),
            "{answer}"
        );
        assert_eq!(answer.matches("ontent-").count(), 1, "{answer}");
    }
}

/// An answer framed by chunks that also carries a (wrong) length reaches
/// the client whole and without the length, on both paths: the front end's
/// relay (a `GET`) and hyper's client (a request with a body).
#[test]
fn a_chunked_answer_with_a_length_goes_on_without_it_on_both_paths() {
    let agent = in_front_of(
        |_| {
            (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 1\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                .to_vec(),
            After::Close,
        )
        },
        "",
    );
    for request in [
        &b"GET /api/a HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"[..],
        b"POST /api/a HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: 2\r\n\r\nhi",
    ] {
        let answer = http::exchange(&mut TcpStream::connect(agent.addr).unwrap(), request);
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(
            !answer.to_ascii_lowercase().contains("content-length"),
            "{answer}"
        );
        assert!(
            answer.contains("transfer-encoding: chunked\r\n"),
            "{answer}"
        );
        assert!(
            answer.ends_with("\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
            "{answer}"
        );
    }
}

/// Each request upstream is timed from its own start, however the
/// connection's earlier requests left its timer: on one connection, fast
/// answers and then a slow one, which gets its 504 at its own
/// `upstream_timeout` (not at the deadline an earlier request armed, nor
/// later); and the connection goes on serving after it.
#[test]
fn each_request_upstream_is_timed_from_its_own_start() {
    let (upstream, _) = scripted::upstream(|asked| {
        if asked.target.ends_with("/slow") {
            std::thread::sleep(Duration::from_secs(3));
        }
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(),
            After::KeepOpen,
        )
    });
    let config = small_config(
        "/api/:name",
        1000,
        "1m",
        &format!("upstream = \"http://{upstream}\"\nupstream_timeout = \"800ms\"\n"),
    );
    let agent = agent(&config, None, &[]);
    let mut stream = TcpStream::connect(agent.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut ask = |path: &str| {
        let request = format!("GET {path} HTTP/1.1\r\nhost: a\r\n\r\n");
        stream.write_all(request.as_bytes()).unwrap();
        let sent = Instant::now();
        let answer = http::read_response(&mut stream).unwrap();
        (status(&answer), sent.elapsed())
    };
    // Fast answers, the last of them 500 ms before the slow request: the
    // timer they armed would fire 300 ms into it.
    for _ in 0..3 {
        assert_eq!(ask("/api/fast").0, Some(200));
    }
    std::thread::sleep(Duration::from_millis(500));
    let (code, took) = ask("/api/slow");
    assert_eq!(code, Some(504));
    assert!(
        took >= Duration::from_millis(750) && took < Duration::from_millis(2500),
        "timed out after {took:?}, not its own 800 ms"
    );
    assert_eq!(ask("/api/fast").0, Some(200), "the connection goes on");
}
