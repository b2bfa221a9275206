//! End to end, connections against the real agent binary: one source holding
//! its cap of idle HTTP/2 connections cannot lock another out, a trusted proxy
//! has a cap of its own, idle connections are closed (HTTP/1 keep-alive and
//! HTTP/2, pings or not), a stream longer than the idle timeout is not cut,
//! and an agent out of descriptors neither spins nor stays deaf.
//! Clients are told apart by binding to different loopback addresses.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use limiter_tests::{
    agent::{agent_in_front, connect_from, loopback, small_config},
    cpu::tree_seconds,
    http::{complete, metrics},
    prometheus::metric,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    sync::oneshot,
};

/// The series of connections refused at `cap`.
fn refused_at(cap: &str) -> String {
    format!("limiter_connections_refused_total{{cap=\"{cap}\"}}")
}

/// A cleartext HTTP/2 connection (prior knowledge) that answers the agent's
/// pings and sends its own every 100 ms, requests in flight or not.
struct H2 {
    send: http2::SendRequest<Full<Bytes>>,
    agent: SocketAddr,
    /// Fires when the agent closes the connection.
    closed: oneshot::Receiver<Instant>,
}

impl H2 {
    async fn connect(from: IpAddr, agent: SocketAddr) -> Self {
        let stream = connect_from(from, agent).await;
        let (send, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_millis(100))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(stream))
            .await
            .expect("HTTP/2 handshake");
        let (tx, closed) = oneshot::channel();
        tokio::spawn(async move {
            let _ = connection.await;
            let _ = tx.send(Instant::now());
        });
        Self {
            send,
            agent,
            closed,
        }
    }

    /// The status and body of one request, or `None` if the connection failed.
    async fn request(&mut self, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
        self.send.ready().await.ok()?;
        let request = hyper::Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.agent))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_owned())))
            .expect("request");
        let response = self.send.send_request(request).await.ok()?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.ok()?.to_bytes();
        Some((status, String::from_utf8_lossy(&body).into_owned()))
    }

    async fn get(&mut self, path: &str) -> Option<u16> {
        self.request("GET", path, "")
            .await
            .map(|(status, _)| status)
    }

    /// When the agent closed the connection, waiting at most `limit`.
    async fn closed_within(self, limit: Duration) -> Option<Instant> {
        tokio::time::timeout(limit, self.closed)
            .await
            .ok()
            .and_then(Result::ok)
    }
}

/// One HTTP/1.1 response read off a keep-alive connection (by its
/// `content-length`), or everything up to EOF if it has none.
async fn read_response(stream: &mut TcpStream) -> String {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    while !complete(&data) {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("the agent answered within 5 s")
            .expect("read");
        if n == 0 {
            break;
        }
        data.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&data).into_owned()
}

/// Sends one keep-alive GET on `stream` and returns the response.
async fn h1_get(stream: &mut TcpStream, path: &str) -> String {
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .await
        .expect("write");
    read_response(stream).await
}

/// Waits up to `limit` for the agent to close `stream`; when it did, and
/// whatever it sent first.
async fn h1_closed_within(stream: &mut TcpStream, limit: Duration) -> (Option<Instant>, String) {
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(limit, stream.read_to_end(&mut rest))
        .await
        .ok()
        .map(|_| Instant::now());
    (closed, String::from_utf8_lossy(&rest).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_holding_its_cap_of_idle_h2_connections_cannot_lock_out_another() {
    // Only settings today's agent knows: the per-source cap is the default (100).
    let (_upstream, agent) = agent_in_front(&small_config(
        "/api/chat",
        100_000,
        "1m",
        "max_connections = 150\nheader_read_timeout = \"1s\"",
    ));
    // The attacker tries to take every slot: one request per connection, then
    // idle, answering pings.
    let attacker = loopback(2);
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..150 {
        let mut h2 = H2::connect(attacker, agent.addr).await;
        match h2.get("/api/chat").await {
            Some(200) => held.push(h2),
            None => refused += 1,
            Some(other) => panic!("the attacker's request got {other}"),
        }
    }
    // Past the first-request deadline: only the idle timeout (60 s) could
    // close them now, and it has not run out.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let other = loopback(3);
    for i in 0..5 {
        let mut stream = connect_from(other, agent.addr).await;
        let answer = h1_get(&mut stream, "/api/chat").await;
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "request {i} of another source while the attacker holds {} connections: {answer}",
            held.len()
        );
    }
    let mut h2 = H2::connect(other, agent.addr).await;
    assert_eq!(
        h2.get("/api/chat").await,
        Some(200),
        "another source over HTTP/2"
    );
    assert_eq!(
        (held.len(), refused),
        (100, 50),
        "the attacker holds exactly the default cap per source"
    );
    // The cap kept the slots free, not a timeout: every held connection works.
    for h2 in &mut held {
        assert_eq!(h2.get("/api/chat").await, Some(200));
    }
    let text = metrics(&agent);
    assert_eq!(
        metric(&text, &refused_at("max_connections_per_source")),
        Some(50_u64),
        "{text}"
    );
    assert_eq!(
        metric::<u64>(&text, &refused_at("max_connections")),
        None,
        "the total cap was never reached: {text}"
    );
}

#[tokio::test]
async fn a_trusted_proxy_has_a_cap_of_its_own() {
    let (_upstream, agent) = agent_in_front(&small_config(
        "/api/chat",
        100_000,
        "1m",
        "trusted_proxies = [\"127.0.0.4\"]\nmax_connections_per_source = 2\nmax_connections_per_proxy = 4",
    ));
    // Keep-alive connections, each served once, all held open.
    let mut held = Vec::new();
    let (mut proxy, mut client) = (0, 0);
    for _ in 0..6 {
        for (from, served) in [(4, &mut proxy), (5, &mut client)] {
            let mut stream = connect_from(loopback(from), agent.addr).await;
            let answer = h1_get(&mut stream, "/api/chat").await;
            if answer.starts_with("HTTP/1.1 200") {
                *served += 1;
            } else {
                assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
                assert!(answer.contains("from this address"), "{answer}");
            }
            held.push(stream);
        }
    }
    assert_eq!(proxy, 4, "the proxy holds max_connections_per_proxy");
    assert_eq!(client, 2, "a client holds max_connections_per_source");
    let text = metrics(&agent);
    assert_eq!(
        metric(&text, &refused_at("max_connections_per_proxy")),
        Some(2_u64),
        "{text}"
    );
    assert_eq!(
        metric(&text, &refused_at("max_connections_per_source")),
        Some(4_u64),
        "{text}"
    );
}

#[tokio::test]
async fn idle_connections_are_closed_after_the_idle_timeout() {
    // The idle timeout is longer than the header timeout: waiting for the next
    // request is not reading a request's headers slowly.
    let (_upstream, agent) = agent_in_front(&small_config(
        "/api/chat",
        100_000,
        "1m",
        "header_read_timeout = \"1s\"\nidle_timeout = \"2s\"",
    ));
    let me = loopback(1);
    let mut h2 = H2::connect(me, agent.addr).await;
    let mut h1 = connect_from(me, agent.addr).await;
    assert!(
        h1_get(&mut h1, "/api/chat")
            .await
            .starts_with("HTTP/1.1 200")
    );
    assert_eq!(h2.get("/api/chat").await, Some(200));
    // Past the header timeout, both still serve (no 408 on an idle keep-alive).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let answer = h1_get(&mut h1, "/api/chat").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let h1_idle = Instant::now();
    assert_eq!(h2.get("/api/chat").await, Some(200));
    let h2_idle = Instant::now();
    // HTTP/2 pinging every 100 ms is idle all the same.
    let closed = h2
        .closed_within(Duration::from_secs(6))
        .await
        .expect("the idle HTTP/2 connection was closed");
    let waited = closed - h2_idle;
    eprintln!("HTTP/2 closed {waited:?} after its last request");
    assert!(
        (Duration::from_millis(1900)..Duration::from_secs(4)).contains(&waited),
        "HTTP/2 closed after {waited:?}"
    );
    let (closed, sent) = h1_closed_within(&mut h1, Duration::from_secs(6)).await;
    let waited = closed.expect("the idle HTTP/1 connection was closed") - h1_idle;
    eprintln!("HTTP/1 closed {waited:?} after its last response");
    assert!(
        (Duration::from_millis(1900)..Duration::from_secs(3)).contains(&waited),
        "HTTP/1 closed after {waited:?}"
    );
    assert_eq!(
        sent, "",
        "an idle keep-alive connection is closed without a 408"
    );
    // A request that starts and stalls still gets the header timeout's 408.
    let mut slow = connect_from(me, agent.addr).await;
    assert!(
        h1_get(&mut slow, "/api/chat")
            .await
            .starts_with("HTTP/1.1 200")
    );
    slow.write_all(b"GET /api/chat HTTP/1.1\r\n").await.unwrap();
    let started = Instant::now();
    let (closed, sent) = h1_closed_within(&mut slow, Duration::from_secs(5)).await;
    let waited = closed.expect("the stalled request was cut") - started;
    assert!(sent.starts_with("HTTP/1.1 408"), "{sent}");
    assert!(
        (Duration::from_millis(900)..Duration::from_millis(1900)).contains(&waited),
        "408 after {waited:?}"
    );
}

#[tokio::test]
async fn a_stream_longer_than_the_idle_timeout_is_not_cut() {
    // The demo's event stream lasts about 500 ms; the idle timeout is 200 ms.
    let (_upstream, agent) = agent_in_front(&small_config(
        "/api/v1/chat/completions",
        100,
        "1m",
        "idle_timeout = \"200ms\"",
    ));
    let me = loopback(1);
    let body = r#"{"stream": true}"#;
    // HTTP/1.1: the chunked stream ends with its last chunk, then the idle
    // connection is closed.
    let mut h1 = connect_from(me, agent.addr).await;
    let started = Instant::now();
    h1.write_all(
        format!(
            "POST /api/v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let (closed, text) = h1_closed_within(&mut h1, Duration::from_secs(5)).await;
    let lasted = closed.expect("closed once idle") - started;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("text/event-stream"), "{text}");
    assert_eq!(
        text.matches("data: ").count(),
        5,
        "every event arrived: {text}"
    );
    assert!(
        text.ends_with("0\r\n\r\n"),
        "the stream ended properly: {text}"
    );
    eprintln!("HTTP/1 stream and idle close took {lasted:?}");
    assert!(lasted >= Duration::from_millis(500), "{lasted:?}");
    // HTTP/2: the same over a stream.
    let mut h2 = H2::connect(me, agent.addr).await;
    let started = Instant::now();
    let (status, text) = h2
        .request("POST", "/api/v1/chat/completions", body)
        .await
        .expect("the stream completed");
    let lasted = started.elapsed();
    assert_eq!(status, 200);
    assert_eq!(
        text.matches("data: ").count(),
        5,
        "every event arrived: {text}"
    );
    eprintln!("HTTP/2 stream took {lasted:?}");
    assert!(lasted >= Duration::from_millis(400), "{lasted:?}");
    assert!(
        h2.closed_within(Duration::from_secs(3)).await.is_some(),
        "closed once idle"
    );
}

#[tokio::test]
async fn sigterm_closes_idle_connections_at_once() {
    let (_upstream, mut agent) = agent_in_front(&small_config("/api/chat", 100, "1m", ""));
    let me = loopback(1);
    let mut h2 = H2::connect(me, agent.addr).await;
    assert_eq!(h2.get("/api/chat").await, Some(200));
    let mut h1 = connect_from(me, agent.addr).await;
    assert!(
        h1_get(&mut h1, "/api/chat")
            .await
            .starts_with("HTTP/1.1 200")
    );
    let stopped = Instant::now();
    agent.signal(libc::SIGTERM);
    assert!(
        h2.closed_within(Duration::from_secs(3)).await.is_some(),
        "GOAWAY and close"
    );
    let (closed, _) = h1_closed_within(&mut h1, Duration::from_secs(3)).await;
    assert!(
        closed.is_some(),
        "the idle keep-alive connection was closed"
    );
    let status = agent
        .wait_exit(Duration::from_secs(5))
        .expect("the agent exits");
    assert!(status.success(), "exit status {status}");
    assert!(
        stopped.elapsed() < Duration::from_secs(3),
        "exit took {:?}",
        stopped.elapsed()
    );
}

/// Out of descriptors, the accept loop neither spins nor stays deaf: with
/// its descriptor limit lowered to what it holds plus a few, a crowd of
/// connections leaves accepts failing with EMFILE; the agent uses almost no
/// CPU meanwhile, logs the run of failures once, and serves again within a
/// few pauses (100 ms at most each) of the crowd leaving.
#[test]
fn an_agent_out_of_descriptors_neither_spins_nor_stays_deaf() {
    use std::io::{Read as _, Write as _};
    let (_upstream, agent) = agent_in_front(&small_config(
        "/api/limited",
        1_000_000,
        "1m",
        "max_connections_per_source = 10000",
    ));
    let pid = agent.pid();
    let held = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fds")
        .count();
    let limit = libc::rlimit {
        rlim_cur: (held + 8) as libc::rlim_t,
        rlim_max: (held + 8) as libc::rlim_t,
    };
    // SAFETY: a valid pid, a valid rlimit struct we own, a null old limit.
    let set = unsafe {
        libc::prlimit(
            i32::try_from(pid).unwrap(),
            libc::RLIMIT_NOFILE,
            &raw const limit,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(set, 0, "prlimit: {}", std::io::Error::last_os_error());

    let crowd: Vec<std::net::TcpStream> = (0..40)
        .map(|_| std::net::TcpStream::connect(agent.addr).expect("the backlog takes it"))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let before = tree_seconds(pid);
    std::thread::sleep(Duration::from_secs(2));
    let spent = tree_seconds(pid) - before;
    assert!(
        agent.log().contains("accept failing"),
        "the descriptor limit was reached: {}",
        agent.log()
    );
    assert!(
        spent < 0.3,
        "{spent:.2} s of CPU in 2 s out of descriptors: a spin"
    );

    drop(crowd);
    let left = Instant::now();
    let answered = loop {
        let mut stream = std::net::TcpStream::connect(agent.addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let _ =
            stream.write_all(b"GET /api/limited HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n");
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        if answer.starts_with(b"HTTP/1.1 200") {
            break left.elapsed();
        }
        assert!(
            left.elapsed() < Duration::from_secs(10),
            "never served again"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!(
        "out of descriptors: {spent:.3} s of CPU in 2 s; served again {answered:?} after the crowd left"
    );
    assert!(answered < Duration::from_secs(2), "deaf for {answered:?}");
    let log = agent.log();
    assert!(log.contains("accepting again"), "{log}");
}
