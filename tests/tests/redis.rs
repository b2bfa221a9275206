//! The shared Redis store end to end: real `redis-server` processes started on
//! free ports, real agents, a real upstream. Exact shared limits across two
//! agents, rejections that consume nothing, Redis dying and coming back under
//! load in both failure modes, key verifications shared between hosts, and a
//! three-node Redis Cluster.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc, time::Duration};

use futures_util::future::join_all;
use limiter_agent::{
    answers,
    identity::Identity,
    limit::{
        Algorithm, Ask, BucketKey, Clock as _, FakeClock, RedisSettings, RedisStore, Spend, Store,
    },
};
use limiter_tests::{
    agent::{
        Process, agent, agent_with_env, demo_upstream, demo_upstream_with_keys, free_port,
        loopback, raw_request_from,
    },
    http::{Response, client, get_request, metric},
    redis::{RedisCluster, RedisServer, redis_cli},
};
use reqwest::{Client, StatusCode};

/// One `/api/chat` tier of `limit` per `window`, decided in Redis at `store`
/// (`url = …` or `cluster_nodes = […]`). Keys name buckets from their first
/// request here (`verify_keys = "none"`); sharing verifications has its own test.
/// Every client is 127.0.0.1, with up to 240 connections at once: above the
/// default per-source connection cap.
fn config(store: &str, on_error: &str, limit: u32, window: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:1\"\nmax_connections_per_source = 1000\n\n[identity]\nverify_keys = \"none\"\n\n[store]\nkind = \"redis\"\n{store}\non_error = \"{on_error}\"\n\
         timeout = \"2s\"\nbreaker_failures = 3\nbreaker_cooldown = \"200ms\"\n\n\
         [xdp]\nenabled = false\n\n[[tier]]\nroute = \"/api/chat\"\nlimit = {limit}\nwindow = \"{window}\"\n"
    )
}

fn url_store(redis: &RedisServer) -> String {
    format!("url = \"{}\"", redis.url())
}

/// What one request got: status, the limit headers, and the body of an error.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    remaining: Option<u64>,
    reset: Option<u64>,
    body: String,
}

async fn ask(client: &Client, agent: &Process, key: &str) -> Answer {
    let response = client
        .get(format!("http://{}/api/chat", agent.addr))
        .header("authorization", format!("Bearer {key}"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("request to the agent at {}: {e}", agent.addr));
    let number = |name: &str| {
        response
            .headers()
            .get(name)
            .map(|v| v.to_str().expect("ASCII").parse::<u64>().expect("a number"))
    };
    let (remaining, reset) = (number("x-ratelimit-remaining"), number("x-ratelimit-reset"));
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    Answer {
        status,
        remaining,
        reset,
        body,
    }
}

/// `n` concurrent requests for `key`, alternating between `agents`.
async fn burst(client: &Client, agents: &[&Process], key: &str, n: usize) -> Vec<Answer> {
    join_all((0..n).map(|i| ask(client, agents[i % agents.len()], key))).await
}

fn count(answers: &[Answer], status: StatusCode) -> usize {
    answers.iter().filter(|a| a.status == status).count()
}

fn statuses(answers: &[Answer]) -> BTreeMap<u16, usize> {
    let mut map = BTreeMap::new();
    for a in answers {
        *map.entry(a.status.as_u16()).or_default() += 1;
    }
    map
}

/// Two agents with `text` in front of `upstream`, once both report the store healthy.
async fn two_agents(text: &str, upstream: &Process) -> (Process, Process) {
    let a = agent(text, Some(upstream.addr), &[]);
    let b = agent(text, Some(upstream.addr), &[]);
    wait_store_healthy(&a, true).await;
    wait_store_healthy(&b, true).await;
    (a, b)
}

/// Waits (up to 10 s) until the agent reports the store healthy or not.
async fn wait_store_healthy(agent: &Process, healthy: bool) {
    let want = u64::from(healthy);
    for _ in 0..100 {
        if metric::<u64>(agent, "limiter_store_healthy") == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "the agent did not report limiter_store_healthy {want} within 10 s:\n{}",
        agent.log()
    );
}

/// The one bucket counter in Redis under the default prefix, and its value.
fn only_bucket(redis: &RedisServer) -> (String, u64) {
    let keys = redis.cli(&["--scan", "--pattern", "limiter:*"]);
    let keys: Vec<&str> = keys.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(
        keys.len(),
        1,
        "expected one bucket key in Redis, got {keys:?}"
    );
    let value = redis
        .cli(&["GET", keys[0]])
        .trim()
        .parse()
        .expect("a counter");
    (keys[0].to_owned(), value)
}

/// Decisions Redis has made, from `INFO commandstats`: each run of the
/// fixed-window script reads its bucket's `PTTL` once, and nothing else this
/// file's agents run does. (Counting script calls would count the fleet
/// sync's too: it runs a script of its own on every tick, whatever the
/// traffic.)
fn decisions_made(redis: &RedisServer) -> u64 {
    redis
        .cli(&["INFO", "commandstats"])
        .lines()
        .filter(|l| l.starts_with("cmdstat_pttl:"))
        .map(|l| {
            let calls = l.split("calls=").nth(1).expect("calls=");
            calls[..calls.find(',').unwrap_or(calls.len())]
                .parse::<u64>()
                .expect("a count")
        })
        .sum()
}

/// Asserts that exactly `limit` of `answers` were admitted and the rest got
/// the 429, with one reset time (±1 s) whichever agent answered.
fn assert_exact(answers: &[Answer], limit: usize) {
    assert_eq!(
        count(answers, StatusCode::OK),
        limit,
        "exactly the limit is admitted in total: {:?}",
        statuses(answers)
    );
    assert_eq!(
        count(answers, StatusCode::TOO_MANY_REQUESTS),
        answers.len() - limit,
        "everything else is a 429: {:?}",
        statuses(answers)
    );
    let resets: Vec<u64> = answers.iter().filter_map(|a| a.reset).collect();
    assert_eq!(
        resets.len(),
        answers.len(),
        "every answer carries X-RateLimit-Reset"
    );
    let (min, max) = (resets.iter().min().unwrap(), resets.iter().max().unwrap());
    assert!(
        max - min <= 1,
        "both agents report one reset (±1 s): {min}..={max}"
    );
}

#[tokio::test]
async fn two_agents_admit_exactly_the_limit_in_total() {
    let redis = RedisServer::start();
    let upstream = demo_upstream();
    let text = config(&url_store(&redis), "allow", 30, "1m");
    let (a, b) = two_agents(&text, &upstream).await;
    let client = client();

    let answers = burst(&client, &[&a, &b], "shared-key", 100).await;
    assert_exact(&answers, 30);
    let remaining: Vec<u64> = answers
        .iter()
        .filter(|x| x.status == StatusCode::OK)
        .map(|x| x.remaining.expect("X-RateLimit-Remaining"))
        .collect();
    let mut sorted = remaining.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        (0..30).collect::<Vec<u64>>(),
        "each admitted request saw a distinct remaining count"
    );
    let (key, value) = only_bucket(&redis);
    assert_eq!(value, 30, "rejections did not increment {key}");
    assert!(key.starts_with("limiter:{/api/chat|60000|k:"), "{key}");
    let ttl: u64 = redis.cli(&["PTTL", &key]).trim().parse().expect("a TTL");
    assert!(
        (50_000..=60_000).contains(&ttl),
        "the window is set on the first hit: {ttl} ms left"
    );
    for agent in [&a, &b] {
        assert_eq!(
            metric::<u64>(agent, "limiter_store_errors_total"),
            0,
            "no store errors: {}",
            agent.log()
        );
    }
    // Both agents now answer this bucket from their over-limit caches: more
    // rejections, the same reset, and not one more script call in Redis.
    let decided_before = decisions_made(&redis);
    let later = burst(&client, &[&a, &b], "shared-key", 10).await;
    assert_eq!(count(&later, StatusCode::TOO_MANY_REQUESTS), 10);
    assert_eq!(
        decisions_made(&redis),
        decided_before,
        "rejected traffic cost no round trip"
    );
    let reset = answers[0].reset.unwrap();
    assert!(later.iter().all(|x| x.reset.unwrap().abs_diff(reset) <= 1));
}

#[tokio::test]
async fn rejections_do_not_consume_quota() {
    let redis = RedisServer::start();
    let upstream = demo_upstream();
    let text = config(&url_store(&redis), "allow", 5, "2s");
    let (a, b) = two_agents(&text, &upstream).await;
    let client = client();

    let first = burst(&client, &[&a, &b], "patient", 5).await;
    assert_eq!(count(&first, StatusCode::OK), 5, "{:?}", statuses(&first));
    // Hammer the full bucket from both hosts: none of it may count.
    let hammer = burst(&client, &[&a, &b], "patient", 40).await;
    assert_eq!(
        count(&hammer, StatusCode::TOO_MANY_REQUESTS),
        40,
        "{:?}",
        statuses(&hammer)
    );
    assert_eq!(
        only_bucket(&redis).1,
        5,
        "rejections left the counter alone"
    );

    // Wait for the window to end (the reset header rounds up to the second).
    let reset = first.iter().filter_map(|x| x.reset).max().expect("a reset");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    #[expect(clippy::cast_precision_loss, reason = "a Unix time in seconds")]
    let wait = (reset as f64 - now).max(0.0) + 0.2;
    tokio::time::sleep(Duration::from_secs_f64(wait)).await;

    let again = burst(&client, &[&a, &b], "patient", 8).await;
    assert_eq!(
        count(&again, StatusCode::OK),
        5,
        "the full quota is back after the reset: {:?}",
        statuses(&again)
    );
    assert_eq!(count(&again, StatusCode::TOO_MANY_REQUESTS), 3);
}

/// Keeps `agents` busy with many clients until `stop`, returning every answer.
async fn load(
    client: Client,
    agents: [&Process; 2],
    stop: tokio::sync::watch::Receiver<bool>,
) -> Vec<Answer> {
    let mut all = Vec::new();
    let mut round = 0usize;
    while !*stop.borrow() {
        let keys: Vec<String> = (0..10).map(|i| format!("loader-{round}-{i}")).collect();
        let answers = join_all(
            keys.iter()
                .enumerate()
                .map(|(i, key)| ask(&client, agents[i % 2], key)),
        )
        .await;
        all.extend(answers);
        round += 1;
    }
    all
}

#[tokio::test]
async fn redis_dying_under_load_allow_keeps_limiting_locally_then_resumes_shared() {
    let mut redis = RedisServer::start();
    let upstream = demo_upstream();
    let text = config(&url_store(&redis), "allow", 10, "1m");
    let (a, b) = two_agents(&text, &upstream).await;
    let client = client();

    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let loader = {
        let (client, a, b) = (client.clone(), &a, &b);
        async move { load(client, [a, b], stop).await }
    };
    let chaos = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        redis.kill();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        stop_tx.send(true).expect("stop the load");
    };
    let (answers, ()) = tokio::join!(loader, chaos);
    let failed: Vec<&Answer> = answers
        .iter()
        .filter(|x| x.status.is_server_error())
        .collect();
    assert!(
        failed.is_empty(),
        "no 5xx in allow mode while Redis dies ({} of {}): {:?}",
        failed.len(),
        answers.len(),
        failed.first()
    );
    assert!(
        answers.len() > 50,
        "the load ran: {} requests",
        answers.len()
    );

    // Down: each agent limits on its own (its local store, a limit per host).
    wait_store_healthy(&a, false).await;
    assert!(metric::<u64>(&a, "limiter_store_errors_total") >= 1);
    let local = burst(&client, &[&a], "while-down", 15).await;
    assert_eq!(count(&local, StatusCode::OK), 10, "{:?}", statuses(&local));
    assert_eq!(count(&local, StatusCode::TOO_MANY_REQUESTS), 5);

    // Back (empty, same port): shared limits resume without restarting the agents.
    redis.restart();
    wait_store_healthy(&a, true).await;
    wait_store_healthy(&b, true).await;
    let shared = burst(&client, &[&a, &b], "after-recovery", 100).await;
    assert_exact(&shared, 10);
    assert_eq!(only_bucket(&redis).1, 10, "decided in Redis again");
}

#[tokio::test]
async fn redis_dying_with_deny_answers_503_then_recovers() {
    let mut redis = RedisServer::start();
    let upstream = demo_upstream();
    let text = config(&url_store(&redis), "deny", 10, "1m");
    let a = agent(&text, Some(upstream.addr), &[]);
    let client = client();
    wait_store_healthy(&a, true).await;

    assert_eq!(ask(&client, &a, "k").await.status, StatusCode::OK);
    redis.kill();
    let down = burst(&client, &[&a], "k", 20).await;
    assert!(
        down.iter()
            .all(|x| x.status == StatusCode::SERVICE_UNAVAILABLE),
        "{:?}",
        statuses(&down)
    );
    let body: serde_json::Value = serde_json::from_str(&down[0].body).expect("a JSON error body");
    assert_eq!(body["error"]["code"], "STORE_UNAVAILABLE", "{body}");
    wait_store_healthy(&a, false).await;

    redis.restart();
    wait_store_healthy(&a, true).await;
    let back = burst(&client, &[&a], "k", 12).await;
    assert_eq!(count(&back, StatusCode::OK), 10, "{:?}", statuses(&back));
    assert_eq!(count(&back, StatusCode::TOO_MANY_REQUESTS), 2);
}

#[tokio::test]
async fn agent_starts_with_redis_down_and_picks_it_up() {
    let port = free_port();
    let upstream = demo_upstream();
    let text = config(
        &format!("url = \"redis://127.0.0.1:{port}\""),
        "allow",
        3,
        "1m",
    );
    let a = agent(&text, Some(upstream.addr), &[]);
    let b = agent(&text, Some(upstream.addr), &[]);
    let client = client();

    // Nothing there: each agent decides locally (3 each), never a 5xx.
    let local = burst(&client, &[&a, &b], "early", 10).await;
    assert_eq!(count(&local, StatusCode::OK), 6, "{:?}", statuses(&local));
    assert!(a.log().contains("unreachable at startup"), "{}", a.log());
    wait_store_healthy(&a, false).await;
    wait_store_healthy(&b, false).await;

    let redis = RedisServer::start_with(port, &[]);
    wait_store_healthy(&a, true).await;
    wait_store_healthy(&b, true).await;
    let shared = burst(&client, &[&a, &b], "late", 20).await;
    assert_exact(&shared, 3);
    assert_eq!(only_bucket(&redis).1, 3);
}

#[tokio::test]
async fn redis_cluster_keeps_limits_exact_across_slots() {
    let cluster = RedisCluster::start();
    let upstream = demo_upstream();
    // Seed with one node only: the client learns the others from it.
    let nodes = format!("cluster_nodes = [\"{}\"]", cluster.urls()[0]);
    let text = config(&nodes, "allow", 7, "1m");
    let (a, b) = two_agents(&text, &upstream).await;
    let client = client();

    let keys: Vec<String> = (0..12).map(|i| format!("cluster-client-{i}")).collect();
    let both = [&a, &b];
    let rounds = join_all(keys.iter().map(|key| burst(&client, &both, key, 20))).await;
    for (key, answers) in keys.iter().zip(&rounds) {
        assert_eq!(
            count(answers, StatusCode::OK),
            7,
            "{key}: {:?}",
            statuses(answers)
        );
        assert_eq!(count(answers, StatusCode::TOO_MANY_REQUESTS), 13, "{key}");
    }
    let per_node: Vec<u64> = cluster
        .nodes
        .iter()
        .map(|n| n.cli(&["DBSIZE"]).trim().parse().expect("DBSIZE"))
        .collect();
    assert_eq!(
        per_node.iter().sum::<u64>(),
        12,
        "one key per bucket: {per_node:?}"
    );
    assert!(
        per_node.iter().filter(|&&n| n > 0).count() >= 2,
        "buckets spread over the cluster's slots: {per_node:?}"
    );
    for agent in [&a, &b] {
        assert_eq!(
            metric::<u64>(agent, "limiter_store_errors_total"),
            0,
            "no store errors: {}",
            agent.log()
        );
    }
    // Each bucket's key lives on the node that owns its hash tag's slot.
    let node = &cluster.nodes[0];
    for key in node
        .cli(&["--scan", "--pattern", "limiter:*"])
        .lines()
        .filter(|l| !l.is_empty())
    {
        let value = redis_cli(node.port, &["GET", key]);
        assert_eq!(value.trim(), "7", "{key}");
    }
}

/// A private CA and a server certificate for 127.0.0.1 it signed, as PEM files
/// (ca.pem, server.pem, server.key) in a fresh directory.
fn private_ca() -> std::path::PathBuf {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let dir = std::env::temp_dir().join(format!(
        "limiter-redis-tls-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "limiter test CA");
    let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
    let server_key = KeyPair::generate().expect("server key");
    let server = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .expect("server params")
        .signed_by(&server_key, &ca, &ca_key)
        .expect("server certificate");
    std::fs::write(dir.join("ca.pem"), ca.pem()).expect("ca.pem");
    std::fs::write(dir.join("server.pem"), server.pem()).expect("server.pem");
    std::fs::write(dir.join("server.key"), server_key.serialize_pem()).expect("server.key");
    dir
}

#[tokio::test]
async fn rediss_verifies_the_server_certificate() {
    let certs = private_ca();
    let ca = certs.join("ca.pem");
    let redis = RedisServer::start_tls(&certs.join("server.pem"), &certs.join("server.key"), &ca);
    let upstream = demo_upstream();
    let text = config(
        &format!("url = \"rediss://127.0.0.1:{}\"", redis.port),
        "deny",
        3,
        "1m",
    );
    let client = client();

    // The CA is trusted through the system roots' SSL_CERT_FILE: decisions go over TLS.
    let ca_text = ca.to_string_lossy();
    let trusting = agent_with_env(
        &text,
        Some(upstream.addr),
        &[],
        &[("SSL_CERT_FILE", &ca_text)],
    );
    wait_store_healthy(&trusting, true).await;
    let answers = burst(&client, &[&trusting], "tls-client", 5).await;
    assert_eq!(
        count(&answers, StatusCode::OK),
        3,
        "{:?}\n{}",
        statuses(&answers),
        trusting.log()
    );
    assert_eq!(count(&answers, StatusCode::TOO_MANY_REQUESTS), 2);
    assert_eq!(only_bucket(&redis).1, 3, "counted in the TLS Redis");

    // Without it the certificate is refused: nothing is decided over an unverified link.
    let doubting = agent(&text, Some(upstream.addr), &[]);
    let refused = ask(&client, &doubting, "tls-client-2").await;
    assert_eq!(
        refused.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        doubting.log()
    );
    assert!(
        doubting.log().contains("UnknownIssuer"),
        "{}",
        doubting.log()
    );
    let _ = std::fs::remove_dir_all(certs);
}

/// Issue 12 item 6: a request holding the breaker's one probe is dropped when its
/// client hangs up. The probe slot must come free (not "in flight" for ever), so
/// the store recovers once Redis answers again instead of answering 503 until a
/// restart.
#[tokio::test]
async fn a_probe_dropped_by_a_disconnecting_client_does_not_keep_the_breaker_open() {
    let redis = RedisServer::start();
    let upstream = demo_upstream();
    // One failure opens the breaker; a call waits at most 300 ms for Redis (a probe
    // 500 ms), longer than the impatient clients below wait for their answer.
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:1\"\n\n[store]\nkind = \"redis\"\n{}\non_error = \"deny\"\n\
         timeout = \"300ms\"\nbreaker_failures = 1\nbreaker_cooldown = \"100ms\"\n\n\
         [xdp]\nenabled = false\n\n[[tier]]\nroute = \"/api/chat\"\nlimit = 1000\nwindow = \"1m\"\n",
        url_store(&redis)
    );
    let a = agent(&text, Some(upstream.addr), &[]);
    let patient = client();
    wait_store_healthy(&a, true).await;
    assert_eq!(ask(&patient, &a, "k").await.status, StatusCode::OK);

    // Redis stops answering for 3 s (every command waits; it comes back by itself).
    let pause = std::time::Instant::now();
    assert_eq!(redis.cli(&["CLIENT", "PAUSE", "3000", "ALL"]).trim(), "OK");
    // A call that waits out the agent's timeout fails and opens the breaker.
    let opening = ask(&patient, &a, "k").await;
    assert_eq!(
        opening.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        a.log()
    );

    // Now clients that hang up after 100 ms. The breaker is open, so the only call
    // that can still be waiting on Redis is the probe: a client that times out
    // held the probe and dropped it.
    let impatient = Client::builder()
        .timeout(Duration::from_millis(100))
        .build()
        .expect("http client");
    let mut dropped_probes = 0;
    while pause.elapsed() < Duration::from_millis(2_500) {
        match impatient
            .get(format!("http://{}/api/chat", a.addr))
            .header("authorization", "Bearer k")
            .send()
            .await
        {
            Err(e) if e.is_timeout() => dropped_probes += 1,
            Err(e) => panic!("request to the agent: {e}"),
            Ok(response) => assert_eq!(
                response.status(),
                StatusCode::SERVICE_UNAVAILABLE,
                "deny mode while Redis is paused"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        dropped_probes >= 1,
        "no client hung up on a probe in flight: the test did not test anything"
    );

    // Redis answers again: the next probe (a request's or the background one)
    // closes the breaker.
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(pause.elapsed())).await;
    wait_store_healthy(&a, true).await;
    assert_eq!(
        ask(&patient, &a, "k").await.status,
        StatusCode::OK,
        "served again after {dropped_probes} dropped probes"
    );
}

/// Issue 12 item 8 with Redis's clock: Redis runs the window (the key's TTL), the
/// store turns the TTL left into a deadline on the agent's monotonic clock, and
/// the Unix time a client is told is the wall clock at answer time plus what is
/// left. A wall-clock step on the agent's host moves what clients are told and
/// leaves the window alone.
#[tokio::test]
async fn redis_windows_ignore_a_wall_clock_step_and_the_reset_told_follows_it() {
    const T0: u64 = 1_706_540_000_000;
    let redis = RedisServer::start();
    let clock = Arc::new(FakeClock::new(T0));
    let settings = RedisSettings {
        url: Some(redis.url()),
        cluster_nodes: Vec::new(),
        key_prefix: "limiter:".into(),
        timeout: Duration::from_secs(2),
        breaker_failures: 3,
        breaker_cooldown: Duration::from_millis(200),
        lease: Duration::from_secs(30),
    };
    let store = RedisStore::new(&settings, clock.clone(), 1_000).expect("the redis store");
    store.probe().await.expect("redis answers");
    let identity = Identity::Key("cd".repeat(32));
    let ask = Ask {
        key: BucketKey(7),
        tier: "/api/chat|60000",
        identity: &identity,
        limit: 2,
        hits: 1,
        window_ms: 60_000,
        spend: Spend::Admit,
        algorithm: Algorithm::Fixed,
    };
    let decide = || async { store.decide(ask, clock.now_ms()).await.expect("a decision") };
    let told = |decision| {
        let mut map = reqwest::header::HeaderMap::new();
        answers::apply(&mut map, &decision, 60_000, clock.now(), None);
        let reset: u64 = map["x-ratelimit-reset"].to_str().unwrap().parse().unwrap();
        (reset, answers::retry_after_secs(&decision, clock.now()))
    };

    let first = decide().await;
    assert!(first.allowed);
    // Redis 7.0's clock may tick between the script's `PEXPIRE` and its
    // `PTTL`: a millisecond less may be left.
    assert!(
        (T0 + 59_999..=T0 + 60_000).contains(&first.reset_ms),
        "the window from the first hit: {}",
        first.reset_ms - T0
    );
    assert_eq!(told(first), (1_706_540_060, 60));

    // NTP steps the agent's wall clock an hour ahead.
    clock.step_wall(3_600_000);
    let second = decide().await;
    assert!(second.allowed);
    assert!(
        (T0 + 59_000..=T0 + 60_000).contains(&second.reset_ms),
        "the window is Redis's TTL on the monotonic clock, unmoved by the step: {}",
        second.reset_ms - T0
    );
    let (reset, _) = told(second);
    assert_eq!(reset, 1_706_543_660, "told on the stepped wall clock");

    // Over the limit: Redis rejects, then the local over-limit cache does; both
    // tell the same reset and a Retry-After that reaches it.
    for _ in 0..2 {
        let rejected = decide().await;
        assert!(!rejected.allowed);
        let (reset, retry) = told(rejected);
        assert_eq!(reset, 1_706_543_660);
        assert!((59..=60).contains(&retry), "Retry-After {retry}");
        assert!(T0 / 1000 + 3_600 + retry >= reset);
    }
}

/// (status, `X-RateLimit-Remaining`) of one request with `key` from 127.0.0.`from`.
fn keyed_from(from: u8, agent: SocketAddr, key: &str) -> (u16, Option<u64>) {
    let answer = raw_request_from(
        loopback(from),
        agent,
        &get_request("/api/chat", &[format!("X-API-Key: {key}")]),
    );
    let response = Response::parse(&answer);
    let remaining = response
        .header("x-ratelimit-remaining")
        .map(|v| v.parse().expect("a number"));
    (response.status, remaining)
}

#[tokio::test]
async fn a_key_verified_through_one_agent_is_verified_on_the_other() {
    let redis = RedisServer::start();
    let upstream = demo_upstream_with_keys(&["shared-valid"]);
    let text = config(&url_store(&redis), "allow", 5, "1m")
        .replace("verify_keys = \"none\"", "verify_keys = \"upstream\"");
    let (a, b) = two_agents(&text, &upstream).await;
    // A wrong key through A shows the tier authenticates (401). Then, from
    // 127.0.0.2, the first request is charged to that address and verifies
    // the key; the second is the key's own.
    let a_addr = a.addr;
    let probe = tokio::task::spawn_blocking(move || keyed_from(4, a_addr, "wrong"))
        .await
        .unwrap();
    assert_eq!(probe.0, 401);
    let (a1, a2) = tokio::task::spawn_blocking(move || {
        (
            keyed_from(2, a_addr, "shared-valid"),
            keyed_from(2, a_addr, "shared-valid"),
        )
    })
    .await
    .unwrap();
    assert_eq!(a1, (200, Some(4)), "{}", a.log());
    assert_eq!(a2, (200, Some(4)), "{}", a.log());
    let verified = redis.cli(&["--scan", "--pattern", "*verified*"]);
    assert!(
        verified.contains("verified:"),
        "no shared verification: {verified}"
    );
    // Through B, from another address, the key is already verified: its own
    // bucket (one used), not 127.0.0.3's.
    let b_addr = b.addr;
    let (b1, rejected) = tokio::task::spawn_blocking(move || {
        (
            keyed_from(3, b_addr, "shared-valid"),
            keyed_from(3, b_addr, "not-a-key"),
        )
    })
    .await
    .unwrap();
    assert_eq!(b1, (200, Some(3)), "{}", b.log());
    // A key the upstream refuses is never recorded.
    assert_eq!(rejected.0, 401);
    let verified = redis.cli(&["--scan", "--pattern", "*verified*"]);
    assert_eq!(verified.lines().count(), 1, "{verified}");
}
