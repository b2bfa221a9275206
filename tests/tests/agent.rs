//! End to end: the real `limiter-agent` binary in front of a real upstream
//! process, driven over HTTP/1.1, HTTP/2 and TLS.

use std::time::{Duration, Instant};

use limiter_tests::{
    agent::{
        agent, agent_binary, agent_in_front, free_addr, raw_request, reference_config,
        reference_tiers, small_config,
    },
    http::{client, event_stream},
};
use reqwest::{Client, Response, StatusCode};
use sha2::{Digest as _, Sha256};

const BODY_429: &str = r#"{"error":{"code":"RATE_LIMIT_EXCEEDED","message":"Rate limit exceeded. Try again later.","details":{"retryAfter":"#;

fn header(response: &Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().expect("ASCII header").to_owned())
}

fn header_u64(response: &Response, name: &str) -> u64 {
    header(response, name)
        .unwrap_or_else(|| panic!("missing {name}"))
        .parse()
        .unwrap_or_else(|_| panic!("{name} is not a number"))
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

async fn get(client: &Client, url: &str, headers: &[(&str, &str)]) -> Response {
    let mut request = client.get(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.expect("request")
}

/// Sends `limit` requests that must pass with the remaining count going down,
/// then one that must be a 429 with the exact body and headers.
async fn exhaust(client: &Client, url: &str, key: &str, limit: u64, window_secs: u64) {
    let auth = format!("Bearer {key}");
    let headers = [("authorization", auth.as_str())];
    let mut reset = 0;
    for i in 0..limit {
        let response = get(client, url, &headers).await;
        assert_eq!(response.status(), StatusCode::OK, "{url} request {i}");
        assert_eq!(header_u64(&response, "x-ratelimit-limit"), limit, "{url}");
        assert_eq!(
            header_u64(&response, "x-ratelimit-remaining"),
            limit - i - 1,
            "{url}"
        );
        let r = header_u64(&response, "x-ratelimit-reset");
        if i == 0 {
            reset = r;
            let now = unix_now();
            assert!(
                r > now && r <= now + window_secs + 1,
                "{url}: reset {r} vs now {now}"
            );
        }
        assert_eq!(r, reset, "{url}: the reset stays fixed within the window");
    }
    let response = get(client, url, &headers).await;
    assert_eq!(
        response.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "{url} request {limit}"
    );
    assert_eq!(
        header(&response, "content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(header_u64(&response, "x-ratelimit-remaining"), 0);
    assert_eq!(header_u64(&response, "x-ratelimit-reset"), reset);
    let retry = header_u64(&response, "retry-after");
    assert!(
        retry >= 1 && retry <= window_secs + 1,
        "{url}: retry-after {retry}"
    );
    assert!(
        unix_now() + retry >= reset,
        "retry-after is never earlier than the reset"
    );
    let body = response.text().await.expect("body");
    assert_eq!(
        body,
        format!("{BODY_429}{retry}}}}}}}"),
        "{url}: exact 429 body"
    );
}

#[tokio::test]
async fn every_reference_row_admits_exactly_its_limit() {
    // Each row is exhausted under a key of its own: keys are buckets from their
    // first request here (verification has its own tests in `quota.rs`).
    let (_upstream, agent) = agent_in_front(
        &reference_config()
            .replace("enabled = true", "enabled = false")
            .replace("[identity]\n", "[identity]\nverify_keys = \"none\"\n"),
    );
    let client = client();
    for tier in reference_tiers() {
        // A path of the row: `*` and `:id` stand for these.
        let path = tier.route.replace('*', "a/b").replace(":id", "42");
        let (limit, window) = (u64::from(tier.limit.get()), tier.window.as_secs());
        exhaust(&client, &agent.url(&path), &path, limit, window).await;
    }
    // Shared buckets: another media path and another status id are already spent.
    let media = get(
        &client,
        &agent.url("/api/v1/media/other"),
        &[("authorization", "Bearer /api/v1/media/a/b")],
    )
    .await;
    assert_eq!(media.status(), StatusCode::TOO_MANY_REQUESTS);
    let status = get(
        &client,
        &agent.url("/api/v1/fashion/status/7"),
        &[("authorization", "Bearer /api/v1/fashion/status/42")],
    )
    .await;
    assert_eq!(status.status(), StatusCode::TOO_MANY_REQUESTS);
    // The upstream saw the request: its echo comes back.
    let echo = get(&client, &agent.url("/api/v1/vision?x=1"), &[]).await;
    assert_eq!(
        echo.text().await.unwrap(),
        r#"{"method":"GET","path":"/api/v1/vision"}"#
    );
}

#[tokio::test]
async fn a_short_window_resets_and_rejections_do_not_consume() {
    let (_upstream, agent) = agent_in_front(&small_config("/api/chat", 3, "1s", ""));
    let client = client();
    let u = agent.url("/api/chat");
    for _ in 0..3 {
        assert_eq!(get(&client, &u, &[]).await.status(), StatusCode::OK);
    }
    // Many rejections in the window...
    for _ in 0..20 {
        assert_eq!(
            get(&client, &u, &[]).await.status(),
            StatusCode::TOO_MANY_REQUESTS
        );
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // ...and the next window still has the full quota.
    for i in 0..3 {
        let response = get(&client, &u, &[]).await;
        assert_eq!(
            response.status(),
            StatusCode::OK,
            "request {i} after the reset"
        );
        assert_eq!(header_u64(&response, "x-ratelimit-remaining"), 2 - i);
    }
    assert_eq!(
        get(&client, &u, &[]).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
}

/// `ietf_headers = true`: the fields of draft-ietf-httpapi-ratelimit-headers-11,
/// byte for byte, on answers the upstream gave and on the agent's own 429s,
/// beside the X-RateLimit-* ones.
#[tokio::test]
async fn ietf_headers_follow_the_current_draft_exactly() {
    let (_upstream, agent) = agent_in_front(&small_config(
        "/api/v1/fashion/status/:id",
        2,
        "10s",
        "ietf_headers = true",
    ));
    let client = client();
    let u = agent.url("/api/v1/fashion/status/42");
    let policy = "\"api-v1-fashion-status-id\";q=2;w=10";
    for remaining in [1, 0] {
        let response = get(&client, &u, &[]).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            header(&response, "ratelimit-policy").as_deref(),
            Some(policy)
        );
        let state = header(&response, "ratelimit").expect("RateLimit");
        let (head, t) = state.rsplit_once(";t=").expect("a t parameter");
        assert_eq!(head, format!("\"api-v1-fashion-status-id\";r={remaining}"));
        let t: u64 = t.parse().expect("t is an integer");
        // Counted like Retry-After, from the current whole second to the
        // reset rounded up: up to one more than the window.
        assert!((1..=11).contains(&t), "{state}");
        assert_eq!(header_u64(&response, "x-ratelimit-remaining"), remaining);
    }
    let response = get(&client, &u, &[]).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        header(&response, "ratelimit-policy").as_deref(),
        Some(policy)
    );
    let retry = header(&response, "retry-after").expect("Retry-After");
    assert_eq!(
        header(&response, "ratelimit"),
        Some(format!("\"api-v1-fashion-status-id\";r=0;t={retry}")),
        "t is Retry-After on a 429"
    );
}

#[tokio::test]
async fn a_hundred_concurrent_requests_admit_exactly_the_limit() {
    // The per-source caps (100 connections, 100 in flight by default) well
    // above the 100 at once: what is measured is the limit alone.
    let (_upstream, agent) = agent_in_front(&small_config(
        "/api/v1/chat/completions",
        60,
        "1m",
        "max_connections_per_source = 1000\nmax_requests_in_flight_per_source = 1000",
    ));
    let client = client();
    let u = agent.url("/api/v1/chat/completions");
    let requests = (0..100).map(|_| {
        let client = client.clone();
        let u = u.clone();
        tokio::spawn(async move { client.get(&u).send().await.expect("request").status() })
    });
    let statuses = futures_util::future::join_all(requests).await;
    let ok = statuses
        .iter()
        .filter(|s| *s.as_ref().unwrap() == StatusCode::OK)
        .count();
    let limited = statuses
        .iter()
        .filter(|s| *s.as_ref().unwrap() == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert_eq!((ok, limited), (60, 40));
}

#[tokio::test]
async fn keys_and_ips_have_separate_buckets() {
    // Declared keys are verified: their own buckets from the first request.
    let declared = format!(
        "\n[[key]]\nkey_sha256 = \"{:x}\"\n\n[[key]]\nkey_sha256 = \"{:x}\"\n",
        Sha256::digest("alpha"),
        Sha256::digest("beta")
    );
    let (_upstream, agent) = agent_in_front(
        &(small_config("/api/chat", 2, "1m", "trusted_proxies = [\"127.0.0.1/32\"]") + &declared),
    );
    let client = client();
    let u = agent.url("/api/chat");
    for (name, value) in [
        ("x-api-key", "alpha"),
        ("authorization", "Bearer beta"),
        ("x-forwarded-for", "203.0.113.1"),
        ("x-forwarded-for", "203.0.113.2"),
    ] {
        for _ in 0..2 {
            assert_eq!(
                get(&client, &u, &[(name, value)]).await.status(),
                StatusCode::OK,
                "{value}"
            );
        }
        assert_eq!(
            get(&client, &u, &[(name, value)]).await.status(),
            StatusCode::TOO_MANY_REQUESTS,
            "{value}"
        );
    }
    // The same key through either header is one client.
    assert_eq!(
        get(&client, &u, &[("authorization", "Bearer alpha")])
            .await
            .status(),
        StatusCode::TOO_MANY_REQUESTS
    );
}

#[tokio::test]
async fn ipv6_clients_are_grouped_by_prefix() {
    let (_upstream, agent) = agent_in_front(&small_config(
        "/api/chat",
        2,
        "1m",
        "trusted_proxies = [\"127.0.0.1/32\"]",
    ));
    let client = client();
    let u = agent.url("/api/chat");
    let xff = |ip: &'static str| [("x-forwarded-for", ip)];
    assert_eq!(
        get(&client, &u, &xff("2001:db8:1:2::1")).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        get(&client, &u, &xff("2001:db8:1:2:ffff::9"))
            .await
            .status(),
        StatusCode::OK
    );
    // A third address in the same /64 is the same client.
    assert_eq!(
        get(&client, &u, &xff("2001:db8:1:2:abcd::7"))
            .await
            .status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        get(&client, &u, &xff("2001:db8:1:3::1")).await.status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn forwarded_for_from_an_untrusted_peer_is_ignored() {
    let (_upstream, agent) = agent_in_front(&small_config("/api/chat", 2, "1m", ""));
    let client = client();
    let u = agent.url("/api/chat");
    for (i, ip) in ["203.0.113.1", "203.0.113.2", "203.0.113.3"]
        .iter()
        .enumerate()
    {
        let expected = if i < 2 {
            StatusCode::OK
        } else {
            StatusCode::TOO_MANY_REQUESTS
        };
        let forwarded = format!("for={ip}");
        let response = get(
            &client,
            &u,
            &[("x-forwarded-for", ip), ("forwarded", &forwarded)],
        )
        .await;
        assert_eq!(response.status(), expected, "rotating {ip}");
    }
}

#[tokio::test]
async fn no_spelling_of_a_path_escapes_its_tier() {
    let (_upstream, agent) = agent_in_front(&small_config("/api/chat", 5, "1m", ""));
    let client = client();
    for path in [
        "/api/chat",
        "/API/Chat",
        "//api//chat/",
        "/api/./chat",
        "/api/x/../chat",
    ] {
        let response = get(&client, &agent.url(path), &[]).await;
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        assert!(
            header(&response, "x-ratelimit-limit").is_some(),
            "{path} is limited"
        );
    }
    for path in ["/api/cha%74", "/api/chat?x=2"] {
        let response = get(&client, &agent.url(path), &[]).await;
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS, "{path}");
    }
    // `;x=1` is a path parameter to Tomcat and part of the segment to Express and nginx:
    // refused (`tests/tests/paths.rs` runs every such spelling against real routers).
    for path in [
        "/api%2Fchat",
        "/api/chat%00",
        "/api/%zz",
        "/api/%252Fchat",
        "/api/chat;x=1",
    ] {
        let response = get(&client, &agent.url(path), &[]).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{path}");
        assert_eq!(
            header(&response, "content-type").as_deref(),
            Some("application/json")
        );
        let body: serde_json::Value = response.json().await.expect("JSON error body");
        assert_eq!(body["error"]["code"], "BAD_REQUEST", "{path}");
    }
    // HTTP clients resolve dot segments themselves: send this one raw.
    let raw = raw_request(
        agent.addr,
        "GET /../api/chat HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(raw.starts_with("HTTP/1.1 400 "), "{raw}");
    assert!(raw.contains("path escapes the root"), "{raw}");
    // Unmatched routes are proxied without limit headers.
    let other = get(&client, &agent.url("/other"), &[]).await;
    assert_eq!(other.status(), StatusCode::OK);
    assert!(header(&other, "x-ratelimit-limit").is_none());
}

#[tokio::test]
async fn server_sent_events_stream_through_event_by_event() {
    let (_upstream, agent) =
        agent_in_front(&reference_config().replace("enabled = true", "enabled = false"));
    let client = client();
    let start = Instant::now();
    let mut response = event_stream(&client, &agent).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        header(&response, "content-type").as_deref(),
        Some("text/event-stream")
    );
    assert_eq!(header_u64(&response, "x-ratelimit-remaining"), 59);
    let mut arrivals = Vec::new();
    let mut text = String::new();
    while let Some(chunk) = response.chunk().await.expect("chunk") {
        arrivals.push(start.elapsed());
        text.push_str(std::str::from_utf8(&chunk).expect("UTF-8"));
    }
    assert_eq!(text.matches("data: ").count(), 5, "{text}");
    let first = arrivals[0];
    let last = *arrivals.last().unwrap();
    assert!(
        first < Duration::from_millis(300),
        "first event after {first:?}"
    );
    assert!(
        last.saturating_sub(first) >= Duration::from_millis(300),
        "events arrived together: {arrivals:?}"
    );
}

#[tokio::test]
async fn unreachable_upstream_is_502_and_slow_upstream_is_504() {
    let dead = free_addr();
    let agent_502 = agent(&small_config("/api/chat", 5, "1m", ""), Some(dead), &[]);
    let client = client();
    let response = get(&client, &agent_502.url("/api/chat"), &[]).await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    let body: serde_json::Value = response.json().await.expect("JSON");
    assert_eq!(body["error"]["code"], "UPSTREAM_UNAVAILABLE");

    // An upstream that accepts and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let _holder = std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in silent.incoming().take(4) {
            held.push(stream);
        }
        std::thread::sleep(Duration::from_secs(10));
    });
    let agent_504 = agent(
        &small_config("/api/chat", 5, "1m", "upstream_timeout = \"500ms\""),
        Some(silent_addr),
        &[],
    );
    let start = Instant::now();
    let response = get(&client, &agent_504.url("/api/chat"), &[]).await;
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(start.elapsed() < Duration::from_secs(5));
    let body: serde_json::Value = response.json().await.expect("JSON");
    assert_eq!(body["error"]["code"], "UPSTREAM_TIMEOUT");
}

#[tokio::test]
async fn tls_termination_speaks_http2_by_alpn() {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("certificate");
    let dir = std::env::temp_dir().join(format!("limiter-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
    let tls = format!(
        "tls_cert = \"{}\"\ntls_key = \"{}\"",
        cert_path.display(),
        key_path.display()
    );
    let (_upstream, agent) = agent_in_front(&small_config("/api/chat", 2, "1m", &tls));
    let client = Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cert.cert.pem().as_bytes()).unwrap())
        .resolve("localhost", agent.addr)
        .build()
        .unwrap();
    let u = format!("https://localhost:{}/api/chat", agent.addr.port());
    let response = client.get(&u).send().await.expect("TLS request");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(header_u64(&response, "x-ratelimit-remaining"), 1);
    client.get(&u).send().await.unwrap();
    assert_eq!(
        client.get(&u).send().await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS
    );
}

#[test]
fn a_bad_config_is_refused_with_exit_64_naming_the_field() {
    let dir = std::env::temp_dir().join(format!("limiter-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.toml");
    std::fs::write(&path, small_config("/api/chat", 0, "1m", "")).unwrap();
    let output = std::process::Command::new(agent_binary())
        .arg("check-config")
        .arg(&path)
        .output()
        .expect("check-config");
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("tier[0].limit"), "{stderr}");
    let good = std::process::Command::new(agent_binary())
        .arg("check-config")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/concurred.toml"
        ))
        .output()
        .expect("check-config");
    assert!(good.status.success());
}
