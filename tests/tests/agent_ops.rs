//! End to end, the operational side of the agent: connection and header limits,
//! per-key overrides, the admin listener, SIGHUP reloads and graceful shutdown.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use limiter_tests::{
    agent::{Process, agent, agent_in_front, demo_upstream, raw_request, small_config, tier},
    http::{self, client, event_stream},
    prometheus::metric,
    scripted::{self, After},
};
use reqwest::{Client, StatusCode};
use sha2::Digest as _;

fn admin(agent: &Process, path: &str) -> String {
    format!(
        "http://{}{path}",
        agent.admin.expect("agent has an admin listener")
    )
}

async fn status_of(client: &Client, url: &str, key: Option<&str>) -> (StatusCode, Option<u64>) {
    let mut request = client.get(url);
    if let Some(key) = key {
        request = request.header("x-api-key", key);
    }
    let response = request.send().await.expect("request");
    let limit = response
        .headers()
        .get("x-ratelimit-limit")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    (response.status(), limit)
}

/// Requests until the first 429; returns how many were admitted.
async fn admitted(client: &Client, url: &str, key: Option<&str>, at_most: u32) -> u32 {
    for i in 0..at_most {
        let (status, _) = status_of(client, url, key).await;
        if status == StatusCode::TOO_MANY_REQUESTS {
            return i;
        }
        assert_eq!(status, StatusCode::OK);
    }
    at_most
}

#[test]
fn oversized_headers_get_431_and_slow_headers_get_408() {
    let (_upstream, agent) = agent_in_front(&small_config(
        "/api/chat",
        5,
        "1m",
        "max_header_bytes = 4096\nheader_read_timeout = \"1s\"",
    ));
    let big = "a".repeat(8192);
    let answer = raw_request(
        agent.addr,
        &format!("GET /api/chat HTTP/1.1\r\nhost: x\r\nx-big: {big}\r\n\r\n"),
    );
    assert!(
        answer.starts_with("HTTP/1.1 431"),
        "oversized headers: {answer:?}"
    );

    // A client that starts a request and never finishes its headers.
    let mut slow = TcpStream::connect(agent.addr).expect("connect");
    slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    slow.write_all(b"GET /api/chat HTTP/1.1\r\nhost: x\r\n")
        .unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    let _ = slow.read_to_end(&mut answer);
    let waited = started.elapsed();
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 408"),
        "slow headers: {answer:?}"
    );
    assert!(answer.contains("REQUEST_TIMEOUT"), "{answer}");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(4),
        "408 after {waited:?}"
    );

    // The agent is still serving.
    let ok = raw_request(
        agent.addr,
        "GET /api/chat HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    );
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
}

#[test]
fn connections_over_the_cap_get_503_and_the_cap_frees_up() {
    let (_upstream, agent) =
        agent_in_front(&small_config("/api/chat", 50, "1m", "max_connections = 2"));
    // Two idle keep-alive connections hold both slots. The start-up probe's
    // connection (closed at once) may hold one until the agent sees it
    // close: a slot refused in the first second is asked again.
    let take_slot = || {
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            let mut s = TcpStream::connect(agent.addr).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(b"GET /api/chat HTTP/1.1\r\nhost: x\r\n\r\n")
                .unwrap();
            let mut buf = [0u8; 12];
            s.read_exact(&mut buf).expect("first response");
            if &buf == b"HTTP/1.1 503" && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            assert_eq!(&buf, b"HTTP/1.1 200");
            return s;
        }
    };
    let mut held: Vec<TcpStream> = (0..2).map(|_| take_slot()).collect();
    let refused = raw_request(
        agent.addr,
        "GET /api/chat HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    );
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(refused.contains(r#""code":"OVERLOADED""#), "{refused}");
    held.clear();
    std::thread::sleep(Duration::from_millis(200));
    let served = raw_request(
        agent.addr,
        "GET /api/chat HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    );
    assert!(served.starts_with("HTTP/1.1 200"), "{served}");
}

#[tokio::test]
async fn key_overrides_raise_and_set_limits() {
    let hex = |key: &str| format!("{:x}", sha2::Sha256::digest(key.as_bytes()));
    let config = format!(
        "{}{}\n\
         [[key]]\nkey_sha256 = \"{}\"\nmultiplier = 3\n\n\
         [[key]]\nkey_sha256 = \"{}\"\nlimits = {{ \"/api/v1/vision\" = 1 }}\n",
        small_config("/api/chat", 2, "1m", ""),
        tier("/api/v1/vision", 4, "1m"),
        hex("enterprise"),
        hex("trial"),
    );
    let (_upstream, agent) = agent_in_front(&config);
    let client = client();
    let chat = agent.url("/api/chat");
    let vision = agent.url("/api/v1/vision");
    assert_eq!(admitted(&client, &chat, Some("enterprise"), 20).await, 6);
    assert_eq!(admitted(&client, &vision, Some("enterprise"), 20).await, 12);
    assert_eq!(admitted(&client, &chat, Some("trial"), 20).await, 2);
    assert_eq!(admitted(&client, &vision, Some("trial"), 20).await, 1);
    // An undeclared key, on an upstream that authenticates nothing, is never
    // verified: it shares the address's quota (the tier's own limit).
    assert_eq!(admitted(&client, &chat, Some("anyone"), 20).await, 2);
    let (_, limit) = status_of(&client, &vision, Some("enterprise")).await;
    assert_eq!(limit, Some(12), "the header shows the key's own limit");
}

#[tokio::test]
async fn the_admin_listener_serves_health_metrics_and_status() {
    let (_upstream, agent) = agent_in_front(&small_config("/api/chat", 2, "1m", ""));
    let client = client();
    assert_eq!(admitted(&client, &agent.url("/api/chat"), None, 5).await, 2);
    let _ = status_of(&client, &agent.url("/elsewhere"), None).await;

    let health = client.get(admin(&agent, "/healthz")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);

    let metrics = client.get(admin(&agent, "/metrics")).send().await.unwrap();
    assert_eq!(metrics.status(), StatusCode::OK);
    let text = metrics.text().await.unwrap();
    for (series, value) in [
        (
            r#"limiter_requests_total{tier="/api/chat",decision="allowed"}"#,
            2.0,
        ),
        (
            r#"limiter_requests_total{tier="/api/chat",decision="rejected"}"#,
            1.0,
        ),
        (
            r#"limiter_requests_total{tier="none",decision="unlimited"}"#,
            1.0,
        ),
        ("limiter_decision_duration_seconds_count", 3.0),
        ("limiter_upstream_duration_seconds_count", 3.0),
        ("limiter_store_errors_total", 0.0),
    ] {
        assert_eq!(metric(&text, series), Some(value), "`{series}` in:\n{text}");
    }

    let status: serde_json::Value = client
        .get(admin(&agent, "/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["tiers"][0]["route"], "/api/chat");
    assert_eq!(status["tiers"][0]["limit"], 2);
    assert_eq!(status["store"]["kind"], "memory");
    assert_eq!(status["listen"], agent.addr.to_string());
}

#[tokio::test]
async fn sighup_reloads_keeping_counts_and_refuses_a_broken_file() {
    let (_upstream, agent) = agent_in_front(&small_config("/api/chat", 3, "1m", ""));
    let client = client();
    let chat = agent.url("/api/chat");
    assert_eq!(
        admitted(&client, &chat, None, 2).await,
        2,
        "two of three used"
    );
    let path = agent.config_path.clone().expect("config path");

    // Same route and window, higher limit, one more tier: the count carries over.
    std::fs::write(
        &path,
        small_config("/api/chat", 5, "1m", "") + &tier("/api/v1/vision", 1, "1m"),
    )
    .unwrap();
    agent.signal(libc::SIGHUP);
    wait_for_log(&agent, "config reloaded");
    assert_eq!(
        admitted(&client, &chat, None, 10).await,
        3,
        "5 - 2 already used"
    );
    let vision = agent.url("/api/v1/vision");
    assert_eq!(
        admitted(&client, &vision, None, 5).await,
        1,
        "new tier live"
    );

    // A broken file is refused; the running config stays.
    std::fs::write(&path, small_config("/api/chat", 0, "1m", "")).unwrap();
    agent.signal(libc::SIGHUP);
    wait_for_log(&agent, "config reload refused");
    assert!(
        agent.log().contains("tier[0].limit"),
        "the refusal names the field:\n{}",
        agent.log()
    );
    let (status, limit) = status_of(&client, &vision, None).await;
    assert_eq!(
        (status, limit),
        (StatusCode::TOO_MANY_REQUESTS, Some(1)),
        "old config still in force"
    );
    for result in ["error", "ok"] {
        let series = format!("limiter_config_reloads_total{{result=\"{result}\"}}");
        assert_eq!(http::metric::<u64>(&agent, &series), 1, "{series}");
    }
}

/// `[server] mode` and `[[tier]] mode`: a tier in observe mode decides and
/// counts as usual and sends the limit headers, but forwards what it would
/// reject (counted as `decision="would_reject"`); SIGHUP switches modes.
#[tokio::test]
async fn observe_mode_forwards_what_it_would_reject_and_counts_it() {
    let config = |server_mode: &str, chat_mode: &str| {
        format!(
            "[server]\nlisten = \"127.0.0.1:1\"\nmode = \"{server_mode}\"\n\n[xdp]\nenabled = false\n{}\
             mode = \"{chat_mode}\"\n{}",
            tier("/api/chat", 2, "1m"),
            tier("/api/v1/vision", 1, "1m")
        )
    };
    let (_upstream, agent) = agent_in_front(&config("enforce", "observe"));
    let client = client();
    let chat = agent.url("/api/chat");
    let vision = agent.url("/api/v1/vision");
    let mut remaining = Vec::new();
    for _ in 0..5 {
        let response = client.get(&chat).send().await.expect("request");
        assert_eq!(response.status(), StatusCode::OK, "observed, not refused");
        remaining.push(
            response.headers()["x-ratelimit-remaining"]
                .to_str()
                .unwrap()
                .to_owned(),
        );
    }
    assert_eq!(
        remaining,
        ["1", "0", "0", "0", "0"],
        "the headers tell the truth"
    );
    // The other tier enforces.
    assert_eq!(admitted(&client, &vision, None, 3).await, 1);
    let series = |tier: &str, decision: &str| {
        http::metric::<u64>(
            &agent,
            &format!("limiter_requests_total{{tier=\"{tier}\",decision=\"{decision}\"}}"),
        )
    };
    assert_eq!(series("/api/chat", "allowed"), 2);
    assert_eq!(series("/api/chat", "would_reject"), 3);
    assert_eq!(series("/api/chat", "rejected"), 0);
    assert_eq!(series("/api/v1/vision", "rejected"), 1);

    // The whole agent observes after a reload, then enforces everywhere.
    let path = agent.config_path.clone().expect("config path");
    std::fs::write(&path, config("observe", "enforce")).unwrap();
    agent.signal(libc::SIGHUP);
    wait_for_log(&agent, "config reloaded");
    assert_eq!(admitted(&client, &vision, None, 3).await, 3);
    assert_eq!(series("/api/v1/vision", "would_reject"), 3);
    std::fs::write(&path, config("enforce", "enforce")).unwrap();
    agent.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(5);
    while http::metric::<u64>(&agent, r#"limiter_config_reloads_total{result="ok"}"#) < 2 {
        assert!(Instant::now() < deadline, "second reload not applied");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(admitted(&client, &chat, None, 3).await, 0, "enforced again");
}

fn wait_for_log(agent: &Process, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if agent.log().contains(needle) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("no `{needle}` in the agent's log:\n{}", agent.log());
}

#[tokio::test]
async fn sigterm_lets_in_flight_requests_finish_then_exits() {
    let (_upstream, mut agent) =
        agent_in_front(&small_config("/api/v1/chat/completions", 60, "1m", ""));
    let client = client();
    let mut stream = event_stream(&client, &agent).await;
    assert_eq!(stream.status(), StatusCode::OK);
    let first = stream.chunk().await.expect("chunk").expect("first event");
    agent.signal(libc::SIGTERM);
    let mut text = String::from_utf8_lossy(&first).into_owned();
    while let Some(chunk) = stream.chunk().await.expect("the stream completes") {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert_eq!(
        text.matches("data: ").count(),
        5,
        "every event arrived: {text}"
    );
    let status = agent
        .wait_exit(Duration::from_secs(5))
        .expect("the agent exits after draining");
    assert!(status.success(), "exit status {status}");
    assert!(
        TcpStream::connect_timeout(&agent.addr, Duration::from_millis(300)).is_err(),
        "the listener is closed"
    );
}

#[tokio::test]
async fn an_upstream_that_dies_and_returns_is_used_again_without_a_restart() {
    let upstream = demo_upstream();
    let addr = upstream.addr;
    let agent = agent(&small_config("/api/chat", 100, "1m", ""), Some(addr), &[]);
    let client = client();
    let chat = agent.url("/api/chat");
    assert_eq!(status_of(&client, &chat, None).await.0, StatusCode::OK);
    drop(upstream);
    let (status, limit) = status_of(&client, &chat, None).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        limit,
        Some(100),
        "every response of a limited route has the headers"
    );
    // The same address comes back.
    let _again = limiter_tests::agent::demo_upstream_at(addr);
    assert_eq!(status_of(&client, &chat, None).await.0, StatusCode::OK);
}

/// An upstream that answers each request (no bodies) with the `Host` it was
/// sent, closing after every response when `close`: its address, and the
/// connections it took.
fn counting_upstream(close: bool) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    scripted::upstream(move |asked| {
        let body = format!("host={}", asked.field("host").unwrap_or("none"));
        let connection = if close { "close" } else { "keep-alive" };
        let answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: {connection}\r\n\r\n{body}",
            body.len()
        );
        let after = if close { After::Close } else { After::KeepOpen };
        (answer.into_bytes(), after)
    })
}

/// Upstream connections are reused across requests and client connections:
/// the agent must follow the upstream closing them after every response, a
/// reload moving the upstream elsewhere (never reusing a connection to the
/// previous one), and a client that sends no `Host`.
#[test]
fn upstream_connections_follow_closes_and_a_reload_to_another_upstream() {
    let (closing, accepted) = counting_upstream(true);
    let demo = demo_upstream();
    let config = |upstream: std::net::SocketAddr| {
        small_config(
            "/api/chat",
            100,
            "1m",
            &format!("upstream = \"http://{upstream}\"\n"),
        )
    };
    let agent = agent(&config(closing), None, &[]);
    let mut stream = TcpStream::connect(agent.addr).expect("connect");
    let request = b"GET /api/chat HTTP/1.1\r\nHost: api.example\r\n\r\n";
    for i in 1..=5 {
        stream.write_all(request).expect("write");
        let answer = http::read_response(&mut stream).expect("an answer");
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("host=api.example"),
            "request {i} on one client connection, the upstream closing after each: {answer}\n{}",
            agent.log()
        );
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            i,
            "one upstream connection per request"
        );
    }

    // HTTP/1.0 without Host: the upstream still gets one, its own authority.
    let answer = raw_request(agent.addr, "GET /api/chat HTTP/1.0\r\n\r\n");
    assert!(
        answer.starts_with("HTTP/1.0 200") && answer.ends_with(&format!("host={closing}")),
        "{answer}"
    );

    // The same client connection, after reloads moved the upstream: to one
    // that keeps its connections open, then back.
    let reload = |upstream| {
        let path = agent.config_path.clone().expect("config path");
        std::fs::write(&path, config(upstream)).expect("rewrite config");
        let reloads = agent.log().matches("config reloaded").count();
        agent.signal(libc::SIGHUP);
        let deadline = Instant::now() + Duration::from_secs(5);
        while agent.log().matches("config reloaded").count() == reloads {
            assert!(Instant::now() < deadline, "no reload:\n{}", agent.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    reload(demo.addr);
    let before = accepted.load(Ordering::SeqCst);
    for _ in 0..3 {
        stream.write_all(request).expect("write");
        let answer = http::read_response(&mut stream).expect("an answer");
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.contains(r#""path":"/api/chat""#),
            "the reloaded upstream answers on the same client connection: {answer}"
        );
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        before,
        "the old upstream is not asked"
    );
    reload(closing);
    stream.write_all(request).expect("write");
    let answer = http::read_response(&mut stream).expect("an answer");
    assert!(
        answer.ends_with("host=api.example"),
        "a connection kept open to the previous upstream is not reused: {answer}"
    );
    assert_eq!(accepted.load(Ordering::SeqCst), before + 1);
}

/// An idle client connection holds no upstream connection: one upstream
/// connection serves one request after another from many client connections
/// that stay open, and is kept idle for the next (the metric says so).
#[test]
fn idle_client_connections_hold_no_upstream_connection() {
    let (upstream, accepted) = counting_upstream(false);
    let agent = agent(
        &small_config("/api/chat", 1000, "1m", ""),
        Some(upstream),
        &[],
    );
    let mut clients = Vec::new();
    for i in 0..20 {
        let mut stream = TcpStream::connect(agent.addr).expect("connect");
        stream
            .write_all(b"GET /api/chat HTTP/1.1\r\nHost: api\r\n\r\n")
            .expect("write");
        let answer = http::read_response(&mut stream).expect("an answer");
        assert!(answer.starts_with("HTTP/1.1 200"), "request {i}: {answer}");
        clients.push(stream);
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "20 client connections, open and idle, one request each in turn"
    );
    // Housekeeping (once a second) publishes the pool's size.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let idle: Option<f64> = metric(&http::metrics(&agent), "limiter_upstream_connections_idle");
        if idle == Some(1.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "idle upstream connections: {idle:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
