//! End to end, what the agent makes of the upstream's answers: every way an
//! HTTP/1.1 answer can be framed reaches the client whole, a connection is
//! reused only after an answer that ended exactly, and pooled connections the
//! upstream closed never cost a client an error.
//!
//! The upstream here ([`limiter_tests::scripted`]) answers each request with
//! bytes chosen by its path.

use std::{
    io::Write as _,
    net::{SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use limiter_tests::{
    agent::{Process, agent, small_config},
    http::client,
    scripted::{self, After, Asked},
};
use reqwest::StatusCode;

/// The answer to a request for `path`; other paths are answered with the
/// request line's method and path, and the body if it had one.
fn script(asked: &Asked) -> (Vec<u8>, After) {
    let (method, path) = (asked.method.as_str(), asked.target.as_str());
    let body = String::from_utf8_lossy(&asked.body);
    let fixed = |body: &str| {
        format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    };
    match path {
        "/api/len" if method == "HEAD" => (
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n".to_vec(),
            After::KeepOpen,
        ),
        "/api/chunked" => (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-checksum: 1\r\n\r\n"
                .to_vec(),
            After::KeepOpen,
        ),
        "/api/chunked-and-length" => (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\nb\r\nhello world\r\n0\r\n\r\n"
                .to_vec(),
            After::KeepOpen,
        ),
        // A body after the answer to HEAD, in a write of its own, 100 ms
        // later: a whole forged answer, as a broken upstream's would look.
        "/api/late-stray" if method == "HEAD" => (
            b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\n".to_vec(),
            After::LateWrite(
                Duration::from_millis(100),
                b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nforged",
            ),
        ),
        "/api/to-close" => (b"HTTP/1.1 200 OK\r\n\r\nuntil the close".to_vec(), After::Close),
        "/api/early-hints" => (
            b"HTTP/1.1 103 Early Hints\r\nlink: </s.css>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                .to_vec(),
            After::KeepOpen,
        ),
        "/api/no-content" => (
            b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(),
            After::KeepOpen,
        ),
        "/api/conflict" => (
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nabc".to_vec(),
            After::Close,
        ),
        "/api/stray" => (
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nforged"
                .to_vec(),
            After::KeepOpen,
        ),
        "/api/truncated" => (
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc".to_vec(),
            After::Close,
        ),
        "/api/bad-chunk" => (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n".to_vec(),
            After::Close,
        ),
        "/api/big" => (fixed(&"x".repeat(1 << 20)), After::KeepOpen),
        "/api/idle-close" => (fixed("short-lived"), After::CloseIn(Duration::from_millis(50))),
        other if body.is_empty() => (fixed(&format!("{method} {other}")), After::KeepOpen),
        other => (fixed(&format!("{method} {other} {body}")), After::KeepOpen),
    }
}

fn upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    scripted::upstream(script)
}

fn agent_for(upstream: SocketAddr) -> Process {
    agent(
        &small_config("/api/*", 10_000, "1m", ""),
        Some(upstream),
        &[],
    )
}

/// One answer from the agent: status and body, or the error reading it.
async fn fetch(
    client: &reqwest::Client,
    agent: &Process,
    method: reqwest::Method,
    path: &str,
) -> Result<(StatusCode, String), reqwest::Error> {
    let response = client.request(method, agent.url(path)).send().await?;
    let status = response.status();
    Ok((status, response.text().await?))
}

#[tokio::test]
async fn every_framing_of_an_answer_reaches_the_client_whole() {
    let (upstream, accepted) = upstream();
    let agent = agent_for(upstream);
    let client = client();
    let get = |path| fetch(&client, &agent, reqwest::Method::GET, path);

    assert_eq!(
        get("/api/plain").await.unwrap(),
        (StatusCode::OK, "GET /api/plain".into())
    );
    assert_eq!(
        get("/api/chunked").await.unwrap(),
        (StatusCode::OK, "hello world".into()),
        "chunked, with an extension and a trailer"
    );
    assert_eq!(
        get("/api/early-hints").await.unwrap(),
        (StatusCode::OK, "ok".into()),
        "an informational answer before the final one"
    );
    assert_eq!(
        get("/api/no-content").await.unwrap(),
        (StatusCode::NO_CONTENT, String::new())
    );
    let head = client.head(agent.url("/api/len")).send().await.unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(
        head.headers()
            .get("content-length")
            .map(|v| v.to_str().unwrap()),
        Some("10"),
        "a HEAD answer keeps its length and has no body"
    );
    let (status, big) = get("/api/big").await.unwrap();
    assert_eq!((status, big.len()), (StatusCode::OK, 1 << 20));
    assert!(big.bytes().all(|b| b == b'x'));
    // The answers to HEAD and the 204 closed theirs: a body they suppress
    // may come late from a broken upstream.
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        3,
        "answers that ended exactly leave their connection for the next request\n{}",
        agent.log()
    );

    assert_eq!(
        get("/api/to-close").await.unwrap(),
        (StatusCode::OK, "until the close".into()),
        "an answer with neither length nor chunks runs to the close"
    );
    assert_eq!(get("/api/plain").await.unwrap().1, "GET /api/plain");
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        4,
        "after the close, a new connection"
    );

    // Both framings: read by the chunks, told to the client without the
    // length, and the connection not reused.
    let both = client
        .get(agent.url("/api/chunked-and-length"))
        .send()
        .await
        .unwrap();
    assert_eq!(both.headers().get("content-length"), None);
    assert_eq!(both.text().await.unwrap(), "hello world");
    assert_eq!(get("/api/plain").await.unwrap().1, "GET /api/plain");
    assert_eq!(accepted.load(Ordering::SeqCst), 5, "{}", agent.log());
}

#[tokio::test]
async fn a_broken_answer_is_an_error_and_its_connection_is_never_reused() {
    let (upstream, accepted) = upstream();
    let agent = agent_for(upstream);
    let client = client();
    let get = |path| fetch(&client, &agent, reqwest::Method::GET, path);

    let (status, _) = get("/api/conflict").await.unwrap();
    assert_eq!(
        status,
        StatusCode::BAD_GATEWAY,
        "two lengths: which one is the body's?"
    );

    assert!(
        get("/api/truncated").await.is_err(),
        "a body cut short is cut short for the client too"
    );
    assert!(
        get("/api/bad-chunk").await.is_err(),
        "an invalid chunk size ends the answer"
    );

    // Bytes after an answer's end would be the next request's answer on a
    // reused connection: the connection is closed instead.
    let before = accepted.load(Ordering::SeqCst);
    assert_eq!(
        get("/api/stray").await.unwrap(),
        (StatusCode::OK, "ok".into())
    );
    for _ in 0..3 {
        assert_eq!(
            get("/api/plain").await.unwrap(),
            (StatusCode::OK, "GET /api/plain".into()),
            "no request gets the stray bytes as its answer"
        );
    }
    assert_eq!(accepted.load(Ordering::SeqCst), before + 2);
}

/// An upstream that closes idle connections (keep-alive timeouts) races the
/// agent's reuse of them: requests after the close still get answers.
#[tokio::test]
async fn connections_the_upstream_closed_while_idle_are_replaced() {
    let (upstream, accepted) = upstream();
    let agent = agent_for(upstream);
    let client = client();
    for (i, method) in [
        reqwest::Method::GET,
        reqwest::Method::POST,
        reqwest::Method::DELETE,
        reqwest::Method::POST,
    ]
    .into_iter()
    .enumerate()
    {
        let (status, body) = fetch(&client, &agent, method.clone(), "/api/idle-close")
            .await
            .unwrap_or_else(|e| panic!("{method} {i}: {e}\n{}", agent.log()));
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::OK, "short-lived"),
            "{method} {i}"
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        4,
        "one connection per request"
    );

    // Closed an instant before the reuse: the request may already be on the
    // wire when the close arrives; idempotent ones are sent again.
    for _ in 0..20 {
        let (status, _) = fetch(&client, &agent, reqwest::Method::GET, "/api/idle-close")
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK, "{}", agent.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_late_stray_answer_after_head_is_never_read_as_the_next_requests_answer() {
    let (upstream, _) = upstream();
    let agent = agent_for(upstream);
    let client = client();
    // The next request comes before the stray bytes (10 ms), and after them
    // (300 ms): neither gets them as its answer.
    for pause in [10, 300] {
        let (status, _) = fetch(&client, &agent, reqwest::Method::HEAD, "/api/late-stray")
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let (status, body) = fetch(&client, &agent, reqwest::Method::GET, "/api/next")
            .await
            .unwrap();
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::OK, "GET /api/next"),
            "after {pause} ms"
        );
    }
}

/// A request whose `Content-Length` is not 0 is never sent as one without a
/// body, and a body that is sent arrives whole (hyper's client sends it).
#[test]
fn requests_with_bodies_keep_their_bodies() {
    let (upstream, _) = upstream();
    let agent = agent_for(upstream);
    let mut stream = TcpStream::connect(agent.addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    stream
        .write_all(b"POST /api/echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello")
        .expect("write");
    let first = limiter_tests::http::read_response(&mut stream).expect("first answer");
    assert!(first.ends_with("POST /api/echo hello"), "{first}");
    // The next request on the same connections: the body did not bleed into it.
    stream
        .write_all(b"GET /api/after HTTP/1.1\r\nHost: a\r\n\r\n")
        .expect("write");
    let second = limiter_tests::http::read_response(&mut stream).expect("second answer");
    assert!(second.ends_with("GET /api/after"), "{second}");
}
