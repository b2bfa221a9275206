//! No client gets more than its limit through its identity: forwarding headers
//! (behind a real nginx), several or malformed API keys, random keys, and a
//! store full of other clients' windows. Each test runs the agent binary as a
//! real process in front of a real upstream process; clients are told apart
//! by their loopback source address (127.0.0.0/8 is all local).

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::{Child, Command},
    time::{Duration, Instant},
};

use limiter_tests::{
    agent::{
        Process, agent, agent_in_front, demo_upstream, demo_upstream_with_keys, free_addr,
        loopback as local, raw_request_from, small_config,
    },
    http::{self, get_request, status},
};

/// A GET with extra header lines from `from`; (status, whole answer).
fn get_from(from: IpAddr, addr: SocketAddr, path: &str, headers: &[String]) -> (u16, String) {
    let answer = raw_request_from(from, addr, &get_request(path, headers));
    let status = status(&answer).unwrap_or_else(|| panic!("no status line in {answer:?}"));
    (status, answer)
}

/// nginx as a plain reverse proxy in front of `agent`, appending the client to
/// `X-Forwarded-For` as its docs recommend (and passing `Forwarded` through
/// untouched, as it does by default). One process (`master_process off`), so
/// killing it on drop leaves no worker behind holding the test's output.
struct Nginx {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Nginx {
    fn start(agent: SocketAddr) -> Self {
        let addr = free_addr();
        let dir = std::env::temp_dir().join(format!(
            "limiter-nginx-{}-{}",
            std::process::id(),
            addr.port()
        ));
        std::fs::create_dir_all(dir.join("logs")).unwrap();
        let conf = format!(
            "master_process off;\nworker_processes 1;\nerror_log {dir}/logs/error.log;\npid {dir}/nginx.pid;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {dir}/body;\n  proxy_temp_path {dir}/proxy;\n\
               fastcgi_temp_path {dir}/fastcgi;\n  uwsgi_temp_path {dir}/uwsgi;\n  scgi_temp_path {dir}/scgi;\n\
               server {{\n    listen {addr};\n    location / {{\n      proxy_pass http://{agent};\n\
                 proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n    }}\n  }}\n}}\n",
            dir = dir.display()
        );
        std::fs::write(dir.join("nginx.conf"), conf).unwrap();
        let child = Command::new("nginx")
            .args(["-p"])
            .arg(&dir)
            .args(["-c"])
            .arg(dir.join("nginx.conf"))
            .args(["-g", "daemon off;"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("starting nginx (installed by cargo xtask setup)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "nginx did not listen on {addr}: {}",
                std::fs::read_to_string(dir.join("logs/error.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, addr, dir }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn statuses(agent: &Process, n: usize, request: impl Fn(usize) -> (u16, String)) -> Vec<u16> {
    (0..n)
        .map(|i| {
            let (status, answer) = request(i);
            assert!(
                matches!(status, 200 | 401 | 429),
                "request {i}: {answer}\n{}",
                agent.log()
            );
            status
        })
        .collect()
}

fn count(statuses: &[u16], status: u16) -> usize {
    statuses.iter().filter(|s| **s == status).count()
}

#[test]
fn behind_nginx_a_client_cannot_pick_its_identity_with_forwarded() {
    let (_upstream, agent) = agent_in_front(&small_config(
        "/api/chat",
        10,
        "1m",
        "trusted_proxies = [\"127.0.0.1\"]",
    ));
    let nginx = Nginx::start(agent.addr);
    // The client is 127.0.0.2 (untrusted); nginx reaches the agent from 127.0.0.1.
    let spoofs = [
        |i: usize| format!("Forwarded: for=198.51.100.{i}"),
        |_| "Forwarded: for=unknown".to_owned(),
        |_| "Forwarded: for=127.0.0.1".to_owned(),
    ];
    for (n, spoof) in spoofs.iter().enumerate() {
        let client = local(2 + u8::try_from(n).unwrap());
        let got = statuses(&agent, 15, |i| {
            get_from(
                client,
                nginx.addr,
                "/api/chat",
                &[spoof(i), "X-Forwarded-For: 203.0.113.7".to_owned()],
            )
        });
        assert_eq!(
            (count(&got, 200), count(&got, 429)),
            (10, 5),
            "client {client}: {got:?}"
        );
    }
}

#[test]
fn an_unparsable_forwarding_hop_is_refused_not_pooled() {
    let (_upstream, agent) = agent_in_front(&small_config(
        "/api/chat",
        10,
        "1m",
        "trusted_proxies = [\"127.0.0.1\"]",
    ));
    // From the trusted proxy itself, a hop the walk reaches that is no address.
    for value in ["unknown", "garbage, 127.0.0.1", "_hidden"] {
        let (status, answer) = get_from(
            local(1),
            agent.addr,
            "/api/chat",
            &[format!("X-Forwarded-For: {value}")],
        );
        assert_eq!(status, 400, "{value}: {answer}");
        assert!(answer.contains("BAD_IDENTITY"), "{answer}");
    }
    assert_eq!(
        http::metric::<u64>(
            &agent,
            "limiter_requests_refused_total{reason=\"client_address\"}"
        ),
        3
    );
}

#[test]
fn two_keys_in_one_request_or_a_malformed_key_are_refused_before_the_upstream() {
    let (_upstream, agent) = agent_in_front(&small_config("/api/chat", 10, "1m", ""));
    let client = local(2);
    let cases: [&dyn Fn(usize) -> Vec<String>; 4] = [
        &|i| {
            vec![
                format!("Authorization: Bearer junk{i}"),
                "X-API-Key: real".into(),
            ]
        },
        &|i| vec![format!("Authorization: Bearer real junk{i}")],
        &|i| vec!["X-API-Key: real".into(), format!("X-API-Key: junk{i}")],
        &|i| vec![format!("X-API-Key: real, junk{i}")],
    ];
    for case in cases {
        for i in 0..15 {
            let (status, answer) = get_from(client, agent.addr, "/api/chat", &case(i));
            assert_eq!(status, 400, "{:?}: {answer}", case(i));
            assert!(answer.contains("BAD_IDENTITY"), "{answer}");
            assert!(
                !answer.contains("\"path\""),
                "reached the upstream: {answer}"
            );
        }
    }
    // The same key twice is one key, not an ambiguity.
    let (status, answer) = get_from(
        client,
        agent.addr,
        "/api/chat",
        &[
            "Authorization: bearer real".into(),
            "X-API-Key: real".into(),
        ],
    );
    assert_eq!(status, 200, "{answer}");
}

#[test]
fn random_keys_from_one_address_get_the_address_quota_and_verified_keys_their_own() {
    let upstream = demo_upstream_with_keys(&["valid-a", "valid-b"]);
    let agent = agent(
        &small_config("/api/chat", 10, "1m", ""),
        Some(upstream.addr),
        &[],
    );
    let nat = local(2);
    let key = |k: &str| vec![format!("X-API-Key: {k}")];
    // A wrong key shows the tier authenticates (401); until then no key is
    // verified there.
    assert_eq!(get_from(nat, agent.addr, "/api/chat", &key("wrong")).0, 401);
    // Two clients behind one NAT, each with a valid key: their first requests
    // are charged to the address and verify the keys.
    for k in ["valid-a", "valid-b"] {
        assert_eq!(get_from(nat, agent.addr, "/api/chat", &key(k)).0, 200);
    }
    // 1,000 random keys from the same address: the upstream sees 7 of them
    // (the address quota left), answered 401; the rest are 429s.
    let got = statuses(&agent, 1_000, |i| {
        get_from(nat, agent.addr, "/api/chat", &key(&format!("random-{i}")))
    });
    assert_eq!((count(&got, 401), count(&got, 429)), (7, 993), "{got:?}");
    // The verified keys are not starved: each has its own full quota.
    for k in ["valid-a", "valid-b"] {
        let got = statuses(&agent, 12, |_| {
            get_from(nat, agent.addr, "/api/chat", &key(k))
        });
        assert_eq!(
            (count(&got, 200), count(&got, 429)),
            (10, 2),
            "{k}: {got:?}"
        );
    }
    // A key used from elsewhere is limited by the key, not the address.
    let got = statuses(&agent, 3, |_| {
        get_from(local(3), agent.addr, "/api/chat", &key("valid-a"))
    });
    assert_eq!(count(&got, 429), 3, "{got:?}");
}

#[test]
fn keys_are_never_verified_on_a_tier_that_authenticates_nothing() {
    // The plain demo serves anyone: a 200 there proves nothing about a key,
    // so keys stay on the address quota however often they are used.
    let upstream = demo_upstream();
    let agent = agent(
        &small_config("/api/chat", 2, "1m", ""),
        Some(upstream.addr),
        &[],
    );
    let client = local(2);
    let key = |i: usize| vec![format!("X-API-Key: minted-{i}")];
    let first = statuses(&agent, 10, |i| {
        get_from(client, agent.addr, "/api/chat", &key(i))
    });
    assert_eq!(count(&first, 200), 2, "{first:?}");
    let again = statuses(&agent, 2, |i| {
        get_from(client, agent.addr, "/api/chat", &key(i))
    });
    assert_eq!(
        count(&again, 429),
        2,
        "keys 0 and 1 were verified: {again:?}"
    );
}

#[test]
fn a_key_beside_another_credential_cannot_be_verified_by_it() {
    // The upstream authenticates `Authorization: Token …` (or a tab after
    // Bearer): a random X-API-Key beside it would be verified by a 200 meant
    // for the other credential. Both are refused before the upstream.
    let upstream = demo_upstream_with_keys(&["real"]);
    let agent = agent(
        &small_config("/api/chat", 10, "1m", ""),
        Some(upstream.addr),
        &[],
    );
    for auth in ["Token real", "Bearer\treal", "Basic cmVhbDo="] {
        let (status, answer) = get_from(
            local(2),
            agent.addr,
            "/api/chat",
            &[format!("Authorization: {auth}"), "X-API-Key: random".into()],
        );
        assert_eq!(status, 400, "{auth:?}: {answer}");
        assert!(answer.contains("BAD_IDENTITY"), "{answer}");
    }
}

#[test]
fn a_per_address_budget_stops_verified_keys_piling_up_across_windows() {
    // Keys verified on an authenticating tier: at most the tier's limit of new
    // keys per address per verified_key_ttl, however many windows pass.
    let keys: Vec<String> = (0..12).map(|i| format!("k{i}")).collect();
    let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let upstream = demo_upstream_with_keys(&key_refs);
    let agent = agent(
        &small_config("/api/chat", 2, "1s", ""),
        Some(upstream.addr),
        &[],
    );
    let client = local(2);
    let with = |k: &str| vec![format!("X-API-Key: {k}")];
    assert_eq!(
        get_from(client, agent.addr, "/api/chat", &with("wrong")).0,
        401
    );
    std::thread::sleep(Duration::from_millis(1_100));
    for window in 0..4 {
        // Two fresh keys per window, each charged to the address…
        for k in &keys[window * 2..window * 2 + 2] {
            assert_eq!(get_from(client, agent.addr, "/api/chat", &with(k)).0, 200);
        }
        std::thread::sleep(Duration::from_millis(1_100));
    }
    // …then every one of them once more, in one window: only the first two
    // got their own bucket (the budget is the tier's limit, 2, per hour), the
    // rest share the address's 2.
    let served = keys[..8]
        .iter()
        .filter(|k| get_from(client, agent.addr, "/api/chat", &with(k)).0 == 200)
        .count();
    assert_eq!(served, 2 + 2, "two verified keys, plus the address's two");
}

#[test]
fn renewals_spend_the_same_budget_so_verified_keys_lapse_past_it() {
    // verified_key_ttl 4 s, tier limit 2: verifying k0 and k1 spends the
    // address's budget for 4 s, so k0's renewal (due 2 s in) is refused and
    // k0 lapses back to the address.
    let upstream = demo_upstream_with_keys(&["k0", "k1"]);
    let config = format!(
        "{}[identity]\nverified_key_ttl = \"4s\"\n",
        small_config("/api/chat", 2, "1s", "")
    );
    let agent = agent(&config, Some(upstream.addr), &[]);
    let client = local(2);
    let get = |headers: &[String]| get_from(client, agent.addr, "/api/chat", headers).0;
    let with = |k: &str| vec![format!("X-API-Key: {k}")];
    assert_eq!(get(&with("wrong")), 401);
    std::thread::sleep(Duration::from_millis(1_100));
    let verified_at = Instant::now();
    assert_eq!((get(&with("k0")), get(&with("k1"))), (200, 200));
    std::thread::sleep(Duration::from_millis(2_300));
    assert_eq!(get(&with("k0")), 200, "still verified, renewal refused");
    std::thread::sleep(Duration::from_millis(4_200).saturating_sub(verified_at.elapsed()));
    // The address's own window spent (keyless: the upstream answers 401, we
    // count them), then k0: lapsed, so it is the address's.
    assert_eq!((get(&[]), get(&[])), (401, 401));
    assert_eq!(get(&with("k0")), 429, "k0 was renewed for free");
}

#[test]
fn verify_keys_none_keeps_every_key_its_own_bucket() {
    let config = format!(
        "{}[identity]\nverify_keys = \"none\"\n",
        small_config("/api/chat", 10, "1m", "")
    );
    let (_upstream, agent) = agent_in_front(&config);
    let got = statuses(&agent, 15, |i| {
        get_from(
            local(2),
            agent.addr,
            "/api/chat",
            &[format!("X-API-Key: k{i}")],
        )
    });
    assert_eq!(count(&got, 200), 15, "{got:?}");
}

#[test]
fn a_full_store_never_hands_quota_back() {
    let config = small_config("/api/chat", 10, "1m", "")
        .replace("[xdp]", "[store]\nmax_buckets = 64\n\n[xdp]");
    let (_upstream, agent) = agent_in_front(&config);
    let heavy = local(2);
    let got = statuses(&agent, 11, |_| {
        get_from(heavy, agent.addr, "/api/chat", &[])
    });
    assert_eq!(count(&got, 429), 1, "{got:?}");
    // 500 other clients, one request each: far more than the store holds.
    let (mut served, mut full) = (0, 0u32);
    for i in 0..500u32 {
        let from = IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 1, 0, 0)) + i));
        let (status, answer) = get_from(from, agent.addr, "/api/chat", &[]);
        match status {
            200 => served += 1,
            503 => {
                assert!(answer.contains("STORE_FULL"), "{answer}");
                full += 1;
            }
            _ => panic!("{from}: {answer}"),
        }
    }
    assert!(served <= 64 && full >= 436, "served {served}, full {full}");
    // The client at its limit is still at its limit.
    let (status, answer) = get_from(heavy, agent.addr, "/api/chat", &[]);
    assert_eq!(status, 429, "quota handed back: {answer}");
    assert_eq!(
        http::metric::<u32>(
            &agent,
            "limiter_requests_refused_total{reason=\"store_full\"}"
        ),
        full
    );
}
