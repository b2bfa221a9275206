//! Envoy's rate limit service end to end: the agent's `[rls]` listener asked
//! by Python `grpcio` with the `envoy-data-plane` types (the calls Envoy's
//! rate limit filter sends), against the agent binary with its in-memory and
//! Redis stores. The kernel ban through RLS is in `kernel.rs`.

use std::net::SocketAddr;

use limiter_tests::{
    agent::{agent, agent_in_front, free_addr, raw_request, reference_config, reference_tiers},
    http::{Response, get, get_request},
    redis::RedisServer,
    rls::{self, call, code, descriptor, header, path_call},
};
use serde_json::Value;

/// `config` with the service on a free port of its own: (config, address).
fn with_rls(config: &str, rls_lines: &str) -> (String, SocketAddr) {
    let addr = free_addr();
    (
        format!("{config}\n[rls]\nlisten = \"{addr}\"\n{rls_lines}\n"),
        addr,
    )
}

fn one_tier(route: &str, limit: u32, window: &str, extra: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:1\"\n{extra}\n[xdp]\nenabled = false\n\n[[tier]]\nroute = \"{route}\"\nlimit = {limit}\nwindow = \"{window}\"\n"
    )
}

/// A concrete path in a tier's route (`:id` and `*` filled in).
fn concrete(route: &str) -> String {
    route.replace(":id", "42").replace('*', "item-7")
}

/// `GET path` through the proxy, whatever the status.
fn proxy_get(addr: SocketAddr, path: &str, headers: &[String]) -> Response {
    Response::parse(&raw_request(addr, &get_request(path, headers)))
}

fn remaining(answer: &Value) -> u64 {
    answer["statuses"][0]["limit_remaining"]
        .as_u64()
        .expect("limit_remaining")
}

#[test]
fn every_reference_tier_meets_its_limit_through_rls_with_the_proxys_headers_and_body() {
    let config = reference_config().replace("enabled = true", "enabled = false");
    let (config, rls_addr) = with_rls(&config, "");
    let (_upstream, _agent) = agent_in_front(&config);
    for (i, tier) in reference_tiers().iter().enumerate() {
        let limit = u64::from(tier.limit.get());
        let remote = format!("10.1.0.{}", i + 1);
        let path = concrete(&tier.route);
        let calls: Vec<Value> = (0..=limit).map(|_| path_call(&path, &remote)).collect();
        let answers = rls::run(rls_addr, &calls, 1, None);
        let window_ms = u64::try_from(tier.window.as_millis()).unwrap();
        for (n, answer) in answers[..answers.len() - 1].iter().enumerate() {
            assert_eq!(code(answer), "OK", "{path} call {n}: {answer}");
            let left = limit - 1 - n as u64;
            assert_eq!(remaining(answer), left, "{path} call {n}");
            assert_eq!(
                header(answer, "x-ratelimit-limit"),
                Some(&*limit.to_string())
            );
            assert_eq!(
                header(answer, "x-ratelimit-remaining"),
                Some(&*left.to_string())
            );
            let status = &answer["statuses"][0];
            assert_eq!(status["current_limit"]["name"], tier.route.as_str());
            assert_eq!(status["current_limit"]["requests_per_unit"], limit);
            let until = status["duration_until_reset_ms"].as_u64().unwrap();
            assert!(
                until <= window_ms && until + 5_000 > window_ms,
                "{path}: {until} ms"
            );
        }
        let last = answers.last().unwrap();
        assert_eq!(code(last), "OVER_LIMIT", "{path} call {limit}: {last}");
        assert_eq!(last["statuses"][0]["code"], "OVER_LIMIT");
        assert_eq!(remaining(last), 0);
        assert_eq!(header(last, "x-ratelimit-remaining"), Some("0"));
        let retry: u64 = header(last, "retry-after").unwrap().parse().unwrap();
        // Reset rounded up, now rounded down (the proxy's rule): at most a second over.
        assert!(
            retry >= 1 && retry <= window_ms.div_ceil(1000) + 1,
            "{retry}"
        );
        assert!(header(last, "x-ratelimit-reset").is_some());
        assert_eq!(
            last["raw_body"].as_str().unwrap(),
            format!(
                r#"{{"error":{{"code":"RATE_LIMIT_EXCEEDED","message":"Rate limit exceeded. Try again later.","details":{{"retryAfter":{retry}}}}}}}"#
            ),
            "the proxy's exact 429 body"
        );
    }
}

#[test]
fn exactly_the_limit_under_100_concurrent_calls_and_hits_count_whole() {
    let (config, rls_addr) = with_rls(&one_tier("/api/chat", 50, "1m", ""), "");
    let _agent = agent(&config, None, &[]);
    let calls: Vec<Value> = (0..300)
        .map(|_| path_call("/api/chat", "10.2.0.1"))
        .collect();
    let answers = rls::run(rls_addr, &calls, 100, None);
    let ok = answers.iter().filter(|a| code(a) == "OK").count();
    let over = answers.iter().filter(|a| code(a) == "OVER_LIMIT").count();
    assert_eq!((ok, over), (50, 250), "exact under 100 in flight");
    // hits_addend: 3 units a call (request-level) fit 16 times in 50; the
    // 17th does not fit and exhausts the window (its units are spent, never
    // lost), whatever the order.
    let charge = |remote: &str, call_hits: u32, own: Option<u64>| {
        call(
            "limiter",
            &[descriptor(
                &[("path", "/api/chat"), ("remote_address", remote)],
                own,
            )],
            call_hits,
        )
    };
    let calls: Vec<Value> = (0..30).map(|_| charge("10.2.0.2", 3, None)).collect();
    let answers = rls::run(rls_addr, &calls, 100, None);
    let ok = answers.iter().filter(|a| code(a) == "OK").count();
    assert_eq!(ok, 16, "48 of 50 units spent in calls of 3, then exhausted");
    assert!(
        code(&rls::run(rls_addr, &[charge("10.2.0.2", 0, None)], 1, None)[0]) == "OVER_LIMIT",
        "the charge that did not fit spent the window"
    );
    // A descriptor's own hits_addend wins over the call's; its 0 is a check.
    let calls = [
        charge("10.2.0.3", 40, None),
        charge("10.2.0.3", 3, Some(0)),
        charge("10.2.0.3", 3, Some(10)),
        charge("10.2.0.3", 3, Some(0)),
        charge("10.2.0.4", 51, None),
        charge("10.2.0.4", 0, None),
    ];
    let answers = rls::run(rls_addr, &calls, 1, None);
    let seen: Vec<(String, u64)> = answers.iter().map(|a| (code(a), remaining(a))).collect();
    assert_eq!(
        seen,
        [
            ("OK".into(), 10),
            ("OK".into(), 10),
            ("OK".into(), 0),
            ("OVER_LIMIT".into(), 0),
            ("OVER_LIMIT".into(), 0),
            ("OVER_LIMIT".into(), 0),
        ],
        "{answers:?}"
    );
}

#[test]
fn exact_through_rls_on_the_redis_store_too() {
    let redis = RedisServer::start();
    let store = format!(
        "[store]\nkind = \"redis\"\nurl = \"{}\"\ntimeout = \"2s\"\n",
        redis.url()
    );
    let (config, rls_addr) = with_rls(
        &format!("{}\n{store}", one_tier("/api/chat", 40, "10s", "")),
        "",
    );
    let _agent = agent(&config, None, &[]);
    let calls: Vec<Value> = (0..200)
        .map(|_| path_call("/api/chat", "10.3.0.1"))
        .collect();
    let answers = rls::run(rls_addr, &calls, 100, None);
    let ok = answers.iter().filter(|a| code(a) == "OK").count();
    assert_eq!(ok, 40, "40 per 10 s, counted in Redis");
    let keys = redis.cli(&["--scan", "--pattern", "limiter:*"]);
    assert!(
        keys.contains("/api/chat|10000|ip:10.3.0.1"),
        "the proxy's bucket key: {keys}"
    );
    // Several units: all if they fit; a charge that does not fit exhausts the
    // window in Redis too, keeping its expiry (or starting one).
    let charge = |remote: &str, hits: u32| {
        call(
            "limiter",
            &[descriptor(
                &[("path", "/api/chat"), ("remote_address", remote)],
                None,
            )],
            hits,
        )
    };
    let calls = [
        charge("10.3.0.2", 30),
        charge("10.3.0.2", 20),
        charge("10.3.0.2", 1),
        charge("10.3.0.3", 41),
        charge("10.3.0.3", 1),
    ];
    let answers = rls::run(rls_addr, &calls, 1, None);
    let codes: Vec<String> = answers.iter().map(code).collect();
    assert_eq!(
        codes,
        ["OK", "OVER_LIMIT", "OVER_LIMIT", "OVER_LIMIT", "OVER_LIMIT"],
        "{answers:?}"
    );
    for remote in ["10.3.0.2", "10.3.0.3"] {
        let key = format!("limiter:{{/api/chat|10000|ip:{remote}}}");
        assert_eq!(redis.cli(&["GET", &key]).trim(), "40", "{remote} exhausted");
        let ttl: i64 = redis.cli(&["PTTL", &key]).trim().parse().unwrap();
        assert!(
            ttl > 0 && ttl <= 10_000,
            "{remote}: the window expires ({ttl} ms)"
        );
    }
}

#[test]
fn rls_and_proxy_traffic_of_one_client_share_one_bucket() {
    let (config, rls_addr) = with_rls(&one_tier("/api/chat", 5, "1m", ""), "");
    let (_upstream, agent) = agent_in_front(&config);
    for _ in 0..3 {
        assert_eq!(get(agent.addr, "/api/chat").status, 200);
    }
    // The same client (127.0.0.1) through Envoy, on another spelling of the path.
    let calls = [
        path_call("/api//chat?x=1", "127.0.0.1"),
        path_call("/api/chat", "127.0.0.1"),
        path_call("/api/chat", "127.0.0.1"),
    ];
    let answers = rls::run(rls_addr, &calls, 1, None);
    let seen: Vec<(String, u64)> = answers.iter().map(|a| (code(a), remaining(a))).collect();
    assert_eq!(
        seen,
        [("OK".into(), 1), ("OK".into(), 0), ("OVER_LIMIT".into(), 0)],
        "{answers:?}"
    );
    let response = proxy_get(agent.addr, "/api/chat", &[]);
    assert_eq!(response.status, 429, "the proxy sees Envoy's spending");
    // A configured key is its own bucket through both doors.
    let key_config = format!(
        "{}\n[[key]]\nkey_sha256 = \"{}\"\n",
        one_tier("/api/chat", 5, "1m", ""),
        limiter_agent::identity::sha256_hex(b"sk-team-a")
    );
    let (key_config, rls_addr) = with_rls(&key_config, "");
    let (_upstream, agent) = agent_in_front(&key_config);
    let keyed = |n| {
        call(
            "limiter",
            &[descriptor(
                &[
                    ("path", "/api/chat"),
                    (
                        "api_key",
                        if n % 2 == 0 {
                            "sk-team-a"
                        } else {
                            "Bearer sk-team-a"
                        },
                    ),
                    ("remote_address", "10.4.0.9"),
                ],
                None,
            )],
            0,
        )
    };
    let answers = rls::run(rls_addr, &(0..4).map(keyed).collect::<Vec<_>>(), 1, None);
    assert!(answers.iter().all(|a| code(a) == "OK"), "{answers:?}");
    let response = proxy_get(
        agent.addr,
        "/api/chat",
        &["x-api-key: sk-team-a".to_owned()],
    );
    assert_eq!(
        (response.status, response.header("x-ratelimit-remaining")),
        (200, Some("0")),
        "the key's fifth unit, spent through the proxy"
    );
}

#[test]
fn answers_envoy_expects_when_a_call_cannot_be_decided() {
    let (config, rls_addr) = with_rls(&one_tier("/api/chat", 5, "1m", ""), "");
    let _agent = agent(&config, None, &[]);
    let calls = [
        // No descriptors, no domain: the reference server's argument errors.
        call("limiter", &[], 0),
        call("", &[descriptor(&[("path", "/api/chat")], None)], 0),
        // A descriptor no tier matches, another domain: OK, no limit.
        path_call("/elsewhere", "10.5.0.1"),
        call(
            "other",
            &[descriptor(
                &[("path", "/api/chat"), ("remote_address", "10.5.0.1")],
                None,
            )],
            0,
        ),
        // A spelling the proxy answers 400, an identity it cannot settle: never a pass.
        path_call("/api/%2e%2e/chat", "10.5.0.1"),
        path_call("/api/chat", "not-an-address"),
        call("limiter", &[descriptor(&[("path", "/api/chat")], None)], 0),
        call(
            "limiter",
            &[descriptor(
                &[
                    ("path", "/api/chat"),
                    ("remote_address", "10.5.0.1"),
                    ("remote_address", "10.5.0.2"),
                ],
                None,
            )],
            0,
        ),
    ];
    let answers = rls::run(rls_addr, &calls, 1, None);
    let codes: Vec<String> = answers.iter().map(code).collect();
    assert_eq!(
        codes,
        [
            "error:INVALID_ARGUMENT",
            "error:INVALID_ARGUMENT",
            "OK",
            "OK",
            "OVER_LIMIT",
            "OVER_LIMIT",
            "OVER_LIMIT",
            "OVER_LIMIT"
        ],
        "{answers:?}"
    );
    assert!(answers[2]["statuses"][0]["current_limit"].is_null());
    assert!(
        answers[4]["raw_body"]
            .as_str()
            .unwrap()
            .contains("BAD_REQUEST"),
        "{}",
        answers[4]
    );
    assert!(
        answers[6]["raw_body"]
            .as_str()
            .unwrap()
            .contains("remote_address")
    );
    // The shared store down and on_error = "deny": UNAVAILABLE, for Envoy's
    // failure_mode_deny to decide.
    let dead = free_addr();
    let store = format!(
        "[store]\nkind = \"redis\"\nurl = \"redis://{dead}\"\non_error = \"deny\"\ntimeout = \"200ms\"\n"
    );
    let (config, rls_addr) = with_rls(
        &format!("{}\n{store}", one_tier("/api/chat", 5, "1m", "")),
        "",
    );
    let _agent = agent(&config, None, &[]);
    let answers = rls::run(rls_addr, &[path_call("/api/chat", "10.5.0.3")], 1, None);
    assert_eq!(code(&answers[0]), "error:UNAVAILABLE", "{answers:?}");
    // Callers outside [rls] clients are not served.
    let (config, rls_addr) = with_rls(
        &one_tier("/api/chat", 5, "1m", ""),
        "clients = [\"127.0.0.2\"]",
    );
    let _agent = agent(&config, None, &[]);
    let answers = rls::run(rls_addr, &[path_call("/api/chat", "10.5.0.4")], 1, None);
    assert_eq!(code(&answers[0]), "error:UNAVAILABLE", "{answers:?}");
}

#[test]
fn observe_mode_counts_and_reports_but_never_says_over_limit() {
    let (config, rls_addr) = with_rls(&one_tier("/api/chat", 2, "1m", "mode = \"observe\""), "");
    let agent = agent(&config, None, &[]);
    let calls: Vec<Value> = (0..4).map(|_| path_call("/api/chat", "10.6.0.1")).collect();
    let answers = rls::run(rls_addr, &calls, 1, None);
    assert!(answers.iter().all(|a| code(a) == "OK"), "{answers:?}");
    assert_eq!(remaining(&answers[3]), 0);
    let metrics = get(agent.admin.unwrap(), "/metrics").body;
    assert!(
        metrics.contains(r#"limiter_requests_total{tier="/api/chat",decision="would_reject"} 2"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"limiter_rls_calls_total{code="ok"} 4"#),
        "{metrics}"
    );
}

#[test]
fn envoy_ratelimit_config_files_are_a_tier_source_with_unit_multipliers() {
    let dir = std::env::temp_dir().join(format!("limiter-rls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("chat.yaml");
    std::fs::write(
        &file,
        "domain: chat
descriptors:
  - key: remote_address
    rate_limit: { unit: second, unit_multiplier: 10, requests_per_unit: 4 }
  - key: plan
    value: free
    descriptors:
      - key: user
        rate_limit: { unit: minute, requests_per_unit: 2, name: free-users }
  - key: plan
    value: trial
    descriptors:
      - key: user
        shadow_mode: true
        rate_limit: { unit: minute, requests_per_unit: 1 }
  - key: plan
    value: internal
    rate_limit: { unlimited: true }
  - key: route
    value: /api/*
    rate_limit: { unit: minute, requests_per_unit: 1 }
",
    )
    .unwrap();
    let (config, rls_addr) = with_rls(
        &one_tier("/api/chat", 5, "1m", ""),
        &format!("envoy_config = [\"{}\"]", file.display()),
    );
    let agent = agent(&config, None, &[]);
    let by_address = |ip: &str| call("chat", &[descriptor(&[("remote_address", ip)], None)], 0);
    let user = |plan: &str, user: &str| {
        call(
            "chat",
            &[descriptor(&[("plan", plan), ("user", user)], None)],
            0,
        )
    };
    let mut calls: Vec<Value> = (0..5).map(|_| by_address("10.7.0.1")).collect();
    calls.push(by_address("10.7.0.2"));
    calls.extend((0..3).map(|_| user("free", "ann")));
    calls.push(user("free", "bob"));
    calls.extend((0..2).map(|_| user("trial", "cy")));
    calls.push(user("internal", "dee"));
    calls.push(user("paid", "eve"));
    // Two descriptors in one call: over if either is.
    calls.push(call(
        "chat",
        &[
            descriptor(&[("remote_address", "10.7.0.3")], None),
            descriptor(&[("plan", "free"), ("user", "ann")], None),
        ],
        0,
    ));
    let answers = rls::run(rls_addr, &calls, 1, None);
    let codes: Vec<String> = answers.iter().map(code).collect();
    assert_eq!(
        codes,
        [
            "OK",
            "OK",
            "OK",
            "OK",
            "OVER_LIMIT", // 4 per 10 s per address
            "OK",         // another address
            "OK",
            "OK",
            "OVER_LIMIT", // 2 a minute per free user
            "OK",         // another user
            "OK",
            "OK", // shadow mode: never over
            "OK", // unlimited
            "OK", // no such node: no limit
            "OVER_LIMIT",
        ],
        "{answers:?}"
    );
    let first = &answers[0]["statuses"][0];
    assert_eq!(
        first["current_limit"]["unit"], "UNKNOWN",
        "10 s is not one unit"
    );
    assert!(first["duration_until_reset_ms"].as_u64().unwrap() <= 10_000);
    assert_eq!(
        answers[6]["statuses"][0]["current_limit"]["name"],
        "free-users"
    );
    assert_eq!(answers[6]["statuses"][0]["current_limit"]["unit"], "MINUTE");
    assert!(answers[12]["statuses"][0]["current_limit"].is_null());
    let last = &answers[14];
    assert_eq!(last["statuses"][0]["code"], "OK");
    assert_eq!(last["statuses"][1]["code"], "OVER_LIMIT");
    let metrics = get(agent.admin.unwrap(), "/metrics").body;
    assert!(
        metrics.contains(
            r#"limiter_requests_total{tier="chat:plan=trial/user",decision="would_reject"} 1"#
        ),
        "{metrics}"
    );
}

#[test]
fn remote_addresses_in_envoy_domains_are_grouped_and_spelled_once() {
    let (config, rls_addr) = with_rls(
        &one_tier("/api/chat", 5, "1m", ""),
        &format!(
            "envoy_config = [\"{}/../examples/envoy-ratelimit.yaml\"]",
            env!("CARGO_MANIFEST_DIR")
        ),
    );
    let agent = agent(&config, None, &[]);
    let by_address = |ip: String| call("chat", &[descriptor(&[("remote_address", &ip)], None)], 0);
    // 45 addresses of one /64 (the reference rule: 40 per 10 s per address).
    let mut calls: Vec<Value> = (1..=45)
        .map(|i| by_address(format!("2001:db8:7:1::{i:x}")))
        .collect();
    // One IPv4 client in four spellings, and an IPv6 one with a zone.
    calls.extend((0..40).map(|i| {
        by_address(match i % 4 {
            0 => "192.0.2.9".into(),
            1 => "::ffff:192.0.2.9".into(),
            2 => "[::ffff:192.0.2.9]".into(),
            _ => "::FFFF:c000:209".into(),
        })
    }));
    calls.push(by_address("192.0.2.9".into()));
    calls.push(by_address("2001:db8:7:1::99%eth0".into()));
    let answers = rls::run(rls_addr, &calls, 1, None);
    let codes: Vec<String> = answers.iter().map(code).collect();
    let over =
        |range: std::ops::Range<usize>| codes[range].iter().filter(|c| *c == "OVER_LIMIT").count();
    assert!(codes[..40].iter().all(|c| c == "OK"), "{codes:?}");
    assert_eq!(over(40..45), 5, "one /64 is one client: {codes:?}");
    assert!(codes[45..85].iter().all(|c| c == "OK"), "{codes:?}");
    assert_eq!(codes[85], "OVER_LIMIT", "four spellings, one address");
    assert_eq!(codes[86], "OVER_LIMIT", "a zone is not another address");
    drop(agent);
}
