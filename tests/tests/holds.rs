//! End to end, what one client can make the agent hold, against real peers:
//! an HTTP/2 client that shuts its flow-control window (the `h2` package), an
//! HTTP/1 client that never reads its answers, and a request body trickled in
//! just under the idle timeout, each against a real upstream process that
//! serves large answers and counts its own connections. Each is bounded in
//! count (requests in flight per source, upstream connections) and in time
//! (`send_timeout`, `body_min_rate`), while other clients are served.

use std::{
    net::{IpAddr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use limiter_tests::{
    agent::{Process, agent, loopback, raw_request_from, small_config},
    bulk,
    http::{metric, status},
};

/// Times an HTTP/1 GET of `path` from `source`: (status, how long).
fn timed_get(source: IpAddr, agent: SocketAddr, path: &str) -> (Option<u16>, Duration) {
    let started = Instant::now();
    let answer = raw_request_from(
        source,
        agent,
        &format!("GET {path} HTTP/1.1\r\nhost: api\r\nconnection: close\r\n\r\n"),
    );
    (status(&answer), started.elapsed())
}

/// Waits up to `limit` for the upstream to see at most `open` connections.
fn upstream_settles(upstream: &Process, open: u64, limit: Duration) -> u64 {
    let deadline = Instant::now() + limit;
    loop {
        let (now, _) = bulk::connections(upstream);
        if now <= open || Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_shut_http2_window_holds_no_more_than_the_caps_and_is_cut_at_the_send_deadline() {
    let upstream = bulk::upstream();
    let agent = agent(
        &small_config(
            "/api/limited",
            1000,
            "1m",
            "send_timeout = \"2s\"\nidle_timeout = \"3s\"\nupstream_timeout = \"2s\"\n\
             max_requests_in_flight_per_source = 20\nmax_upstream_connections = 30\n\
             upstream_wait = \"1s\"",
        ),
        Some(upstream.addr),
        &[],
    );
    let (attacker, other) = (loopback(2), loopback(3));
    // Baseline: the other source alone.
    let mut baseline = Vec::new();
    for _ in 0..20 {
        let (status, took) = timed_get(other, agent.addr, "/api/small");
        assert_eq!(status, Some(200));
        baseline.push(took);
    }
    baseline.sort();
    let client = bulk::zero_window(
        attacker,
        agent.addr,
        100,
        "/api/bulk",
        Duration::from_secs(20),
    );
    // While the window is shut: the other source is served, the upstream
    // never sees more connections than the caps allow, and the stalled
    // answers let go of theirs at the send deadline.
    let started = Instant::now();
    let mut during = Vec::new();
    let mut most_open = 0;
    let mut released_after = None;
    while started.elapsed() < Duration::from_secs(5) {
        let (status, took) = timed_get(other, agent.addr, "/api/small");
        assert_eq!(status, Some(200), "another source is served throughout");
        during.push(took);
        let (open, _) = bulk::connections(&upstream);
        most_open = most_open.max(open);
        if most_open >= 20 && open <= 1 && released_after.is_none() {
            released_after = Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let report = bulk::finish(client);
    let (_, peak) = bulk::connections(&upstream);
    during.sort();
    eprintln!(
        "zero window: {report:?}; upstream peak {peak}, most open seen {most_open}, \
         released after {released_after:?}; other source median {:?} (baseline {:?}), max {:?}",
        during[during.len() / 2],
        baseline[baseline.len() / 2],
        during[during.len() - 1]
    );
    assert!(
        report.count(200) <= 20,
        "at most max_requests_in_flight_per_source answers started: {report:?}"
    );
    assert!(
        report.count(503) >= 80,
        "the streams over the cap are refused: {report:?}"
    );
    // 20 for the attacker, one for the other source, one the stats probe.
    assert!(
        peak <= 22 && most_open <= 21,
        "the upstream saw {peak} connections at most, {most_open} while watched"
    );
    let released =
        released_after.expect("the stalled answers let go of their upstream connections");
    assert!(
        released < Duration::from_millis(3500),
        "released at the send deadline (2 s), not after {released:?}"
    );
    // The cut streams' window stays shut, so hyper never lets go of them:
    // a send timeout after the cut the connection is closed.
    let closed = report
        .closed_after
        .expect("the agent closed the connection of the stalled answers");
    assert!(closed < Duration::from_secs(6), "closed after {closed:?}");
    assert!(
        during[during.len() / 2] < baseline[baseline.len() / 2] * 3 + Duration::from_millis(20),
        "the other source's median latency stayed normal: {during:?} vs {baseline:?}"
    );
    assert!(during[during.len() - 1] < Duration::from_millis(500));
    assert!(
        metric::<u64>(
            &agent,
            r#"limiter_requests_refused_total{reason="max_requests_in_flight_per_source"}"#
        ) >= 80
    );
    assert!(
        metric::<u64>(
            &agent,
            r#"limiter_answers_cut_total{reason="send_timeout"}"#
        ) >= 20
    );
}

/// A connection from `source` that asks for `path` and never reads, with a
/// small receive buffer so the answer backs up into the agent.
fn unread_request(source: IpAddr, agent: SocketAddr, path: &str) -> TcpStream {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    socket
        .bind(&SocketAddr::new(source, 0).into())
        .expect("bind");
    socket.connect(&agent.into()).expect("connect");
    let mut stream: TcpStream = socket.into();
    std::io::Write::write_all(
        &mut stream,
        format!("GET {path} HTTP/1.1\r\nhost: api\r\n\r\n").as_bytes(),
    )
    .expect("write");
    stream
}

#[test]
fn http1_clients_that_never_read_hold_at_most_the_upstream_bound_until_the_send_deadline() {
    let upstream = bulk::upstream();
    let agent = agent(
        &small_config(
            "/api/limited",
            1000,
            "1m",
            "send_timeout = \"2s\"\nmax_upstream_connections = 10\nupstream_wait = \"500ms\"",
        ),
        Some(upstream.addr),
        &[],
    );
    let (attacker, other) = (loopback(4), loopback(5));
    let started = Instant::now();
    let held: Vec<TcpStream> = (0..15)
        .map(|_| unread_request(attacker, agent.addr, "/api/bulk/16"))
        .collect();
    std::thread::sleep(Duration::from_millis(700));
    let (open, _) = bulk::connections(&upstream);
    // Every upstream connection is busy with an unread answer: a new request
    // waits `upstream_wait`, then is refused.
    let (busy, waited) = timed_get(other, agent.addr, "/api/small");
    assert_eq!(
        busy,
        Some(503),
        "no upstream connection within upstream_wait"
    );
    assert!(
        waited >= Duration::from_millis(400),
        "it waited: {waited:?}"
    );
    // The send deadline frees them, and the other source is served again.
    let settled = upstream_settles(&upstream, 0, Duration::from_secs(5));
    let freed_after = started.elapsed();
    let (served, _) = timed_get(other, agent.addr, "/api/small");
    let (_, peak) = bulk::connections(&upstream);
    eprintln!(
        "unread answers: {open} upstream connections held, peak {peak}; freed after {freed_after:?}"
    );
    assert!(
        peak <= 11,
        "max_upstream_connections (10) + the stats probe: {peak}"
    );
    assert_eq!(open, 10, "the unread answers hold the whole bound");
    assert_eq!(settled, 0, "released by the send deadline");
    assert!(freed_after < Duration::from_secs(5), "{freed_after:?}");
    assert_eq!(served, Some(200));
    assert!(
        metric::<u64>(
            &agent,
            r#"limiter_requests_refused_total{reason="max_upstream_connections"}"#
        ) >= 1
    );
    drop(held);
}

#[test]
fn a_request_body_trickled_under_the_idle_timeout_is_refused_at_the_minimum_rate() {
    use std::io::{Read as _, Write as _};
    let upstream = bulk::upstream();
    let agent = agent(
        &small_config(
            "/api/limited",
            1000,
            "1m",
            "body_read_timeout = \"1s\"\nbody_min_rate = 100",
        ),
        Some(upstream.addr),
        &[],
    );
    let mut stream = TcpStream::connect(agent.addr).expect("connect");
    stream
        .write_all(b"POST /api/upload HTTP/1.1\r\nhost: api\r\ncontent-length: 1000\r\n\r\n")
        .expect("head");
    stream.set_nonblocking(true).expect("nonblocking");
    let started = Instant::now();
    let mut answer = Vec::new();
    // One byte every 500 ms: never a pause as long as body_read_timeout.
    while started.elapsed() < Duration::from_secs(6) {
        let _ = stream.write_all(b"x");
        std::thread::sleep(Duration::from_millis(500));
        let mut buf = [0u8; 4096];
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
        if !answer.is_empty() {
            break;
        }
    }
    let took = started.elapsed();
    let answer = String::from_utf8_lossy(&answer);
    eprintln!("trickled body answered after {took:?}: {answer}");
    assert_eq!(status(&answer), Some(408), "{answer}");
    assert!(answer.contains("REQUEST_TIMEOUT"), "{answer}");
    assert!(
        took < Duration::from_secs(3),
        "about body_read_timeout plus 1 s per 100 bytes: {took:?}"
    );
    assert_eq!(upstream_settles(&upstream, 0, Duration::from_secs(3)), 0);
}

#[test]
fn an_upload_the_upstream_answered_early_releases_its_upstream_connection() {
    use std::io::{Read as _, Write as _};
    // Answers at once without reading the body, then neither reads nor closes.
    let (upstream, _) = limiter_tests::scripted::upstream(|_| {
        (
            b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\n\r\n".to_vec(),
            limiter_tests::scripted::After::CloseIn(Duration::from_secs(20)),
        )
    });
    let agent = agent(
        &small_config("/api/limited", 1000, "1m", ""),
        Some(upstream),
        &[],
    );
    let mut stream = TcpStream::connect(agent.addr).expect("connect");
    stream
        .write_all(b"POST /api/upload HTTP/1.1\r\nhost: api\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
        .expect("head");
    stream.set_nonblocking(true).expect("nonblocking");
    let started = Instant::now();
    let mut answer = Vec::new();
    let mut open_after = None;
    // The upload goes on, a chunk every 100 ms (well above body_min_rate).
    while started.elapsed() < Duration::from_secs(4) {
        let _ = stream.write_all(b"400\r\n");
        let _ = stream.write_all(&[b'x'; 1024]);
        let _ = stream.write_all(b"\r\n");
        let mut buf = [0u8; 4096];
        if let Ok(n) = stream.read(&mut buf) {
            answer.extend_from_slice(&buf[..n]);
        }
        if started.elapsed() > Duration::from_millis(2500) && open_after.is_none() {
            open_after = Some(metric::<u64>(&agent, "limiter_upstream_connections_open"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let answer = String::from_utf8_lossy(&answer);
    assert_eq!(status(&answer), Some(413), "{answer}");
    assert_eq!(
        open_after,
        Some(0),
        "the answered upload's upstream connection was closed, not left sending"
    );
}
