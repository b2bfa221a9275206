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

use limiter_tests::agent::{
    Process, agent, demo_upstream, demo_upstream_with_keys, free_port, raw_request_from,
    small_config,
};

/// A GET with extra header lines from `from`; (status, whole answer).
fn get_from(from: IpAddr, addr: SocketAddr, path: &str, headers: &[String]) -> (u16, String) {
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: api\r\nConnection: close\r\n");
    for header in headers {
        request.push_str(header);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    let answer = raw_request_from(from, addr, &request);
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {answer:?}"));
    (status, answer)
}

fn local(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// nginx as a plain reverse proxy in front of `agent`, appending the client to
/// `X-Forwarded-For` as its docs recommend (and passing `Forwarded` through
/// untouched, as it does by default). Stopped on drop.
struct Nginx {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Nginx {
    fn start(agent: SocketAddr) -> Self {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let dir = std::env::temp_dir().join(format!(
            "limiter-nginx-{}-{}",
            std::process::id(),
            addr.port()
        ));
        std::fs::create_dir_all(dir.join("logs")).unwrap();
        let conf = format!(
            "worker_processes 1;\nerror_log {dir}/logs/error.log;\npid {dir}/nginx.pid;\n\
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
    let upstream = demo_upstream();
    let agent = agent(
        &small_config("/api/chat", 10, "1m", "trusted_proxies = [\"127.0.0.1\"]"),
        Some(upstream.addr),
        &[],
    );
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
    let upstream = demo_upstream();
    let agent = agent(
        &small_config("/api/chat", 10, "1m", "trusted_proxies = [\"127.0.0.1\"]"),
        Some(upstream.addr),
        &[],
    );
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
    let metrics = get_from(
        local(1),
        agent.admin.expect("admin listener"),
        "/metrics",
        &[],
    )
    .1;
    assert!(
        metrics.contains("limiter_requests_refused_total{reason=\"client_address\"} 3"),
        "{metrics}"
    );
}

#[test]
fn two_keys_in_one_request_or_a_malformed_key_are_refused_before_the_upstream() {
    let upstream = demo_upstream();
    let agent = agent(
        &small_config("/api/chat", 10, "1m", ""),
        Some(upstream.addr),
        &[],
    );
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
    // Two clients behind one NAT, each with a valid key: their first requests
    // are charged to the address and verify the keys.
    for k in ["valid-a", "valid-b"] {
        assert_eq!(get_from(nat, agent.addr, "/api/chat", &key(k)).0, 200);
    }
    // 1,000 random keys from the same address: the upstream sees 8 of them
    // (the address quota left), answered 401; the rest are 429s.
    let got = statuses(&agent, 1_000, |i| {
        get_from(nat, agent.addr, "/api/chat", &key(&format!("random-{i}")))
    });
    assert_eq!((count(&got, 401), count(&got, 429)), (8, 992), "{got:?}");
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
fn a_key_the_upstream_accepts_anywhere_is_verified_for_that_tier_only() {
    // An upstream that authenticates nothing (the plain demo) accepts every
    // key: each verification still costs a request of the address quota.
    let upstream = demo_upstream();
    let config = format!(
        "{}\n[[tier]]\nroute = \"/api/health\"\nlimit = 3\nwindow = \"1m\"\n",
        small_config("/api/chat", 2, "1m", "")
    );
    let agent = agent(&config, Some(upstream.addr), &[]);
    let client = local(2);
    let key = |i: usize| vec![format!("X-API-Key: minted-{i}")];
    let health = statuses(&agent, 10, |i| {
        get_from(client, agent.addr, "/api/health", &key(i))
    });
    assert_eq!(count(&health, 200), 3, "{health:?}");
    // Keys verified on the health tier are not verified on /api/chat: they
    // share the address quota there.
    let chat = statuses(&agent, 10, |i| {
        get_from(client, agent.addr, "/api/chat", &key(i))
    });
    assert_eq!(count(&chat, 200), 2, "{chat:?}");
}

#[test]
fn verify_keys_none_keeps_every_key_its_own_bucket() {
    let upstream = demo_upstream();
    let config = format!(
        "{}[identity]\nverify_keys = \"none\"\n",
        small_config("/api/chat", 10, "1m", "")
    );
    let agent = agent(&config, Some(upstream.addr), &[]);
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
    let upstream = demo_upstream();
    let config = small_config("/api/chat", 10, "1m", "")
        .replace("[xdp]", "[store]\nmax_buckets = 64\n\n[xdp]");
    let agent = agent(&config, Some(upstream.addr), &[]);
    let heavy = local(2);
    let got = statuses(&agent, 11, |_| {
        get_from(heavy, agent.addr, "/api/chat", &[])
    });
    assert_eq!(count(&got, 429), 1, "{got:?}");
    // 500 other clients, one request each: far more than the store holds.
    let (mut served, mut full) = (0, 0);
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
    let metrics = get_from(local(1), agent.admin.expect("admin"), "/metrics", &[]).1;
    assert!(
        metrics.contains(&format!(
            "limiter_requests_refused_total{{reason=\"store_full\"}} {full}"
        )),
        "{metrics}"
    );
}
