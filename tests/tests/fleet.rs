//! The fleet acts as one: the admin API (auth, every endpoint with good and
//! bad input, changes kept across a restart), runtime changes reaching every
//! agent sharing Redis or a Redis Cluster within a second, and a ban
//! escalated on one host dropped at every other host's XDP (timed).

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use limiter_tests::{
    agent::{Process, agent, loopback, raw_request_from},
    fleet::{AUDITOR_TOKEN, StoreNet, TOKEN, admin_call, get_from, token_file},
    http::{Response, get_request},
    netns::{self, API_PORT, HOST_ATTACKER_ADDR, Topology},
    redis::{RedisCluster, RedisServer},
};

const KEY: &str = "sk-fleet-enterprise-1";

fn sha256(text: &str) -> String {
    use std::fmt::Write as _;

    use sha2::Digest as _;
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .fold(String::new(), |mut hex, b| {
            let _ = write!(hex, "{b:02x}");
            hex
        })
}

fn call(
    agent: &Process,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, serde_json::Value) {
    admin_call(
        None,
        agent.admin.expect("admin listener"),
        method,
        path,
        token,
        body,
    )
}

/// `GET path` from 127.0.0.`from`: the status.
fn get_path(agent: &Process, from: u8, path: &str) -> u16 {
    let raw = raw_request_from(loopback(from), agent.addr, &get_request(path, &[]));
    Response::parse(&raw).status
}

/// `GET /api/chat` with `key` from 127.0.0.`from`: the status.
fn get_chat(agent: &Process, from: u8, key: Option<&str>) -> u16 {
    let headers: Vec<String> = key
        .map(|k| vec![format!("Authorization: Bearer {k}")])
        .unwrap_or_default();
    let raw = raw_request_from(
        loopback(from),
        agent.addr,
        &get_request("/api/chat", &headers),
    );
    Response::parse(&raw).status
}

fn config(store: &str, dir: &std::path::Path, node: &str, extra_admin: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:1\"\ntrusted_proxies = [\"127.0.0.9\"]\n\n[admin]\ntoken_file = \"{}\"\nnode = \"{node}\"\n{extra_admin}\n[identity]\nverify_keys = \"none\"\n\n{store}\n[xdp]\nenabled = false\n\n[[tier]]\nroute = \"/api/chat\"\nlimit = 2\nwindow = \"1m\"\n\n[[tier]]\nroute = \"/api/v1/vision\"\nlimit = 3\nwindow = \"1m\"\n",
        token_file(dir).display()
    )
}

#[test]
fn the_admin_api_checks_its_caller_and_input_and_changes_survive_a_restart() {
    let dir = std::env::temp_dir().join(format!("limiter-fleet-api-{}", std::process::id()));
    let state = dir.join("runtime.json");
    let _ = std::fs::remove_file(&state);
    let text = config("", &dir, "api-1", "");
    let state_arg = state.display().to_string();
    let first = agent(
        &text,
        None,
        &["--demo-upstream", "--state-file", &state_arg],
    );
    let key = sha256(KEY);

    refuses_strangers_and_bad_input(&first, &key);
    applies_overrides(&first, &key);
    applies_bans_and_records_who(&first);
    // A restart keeps them (the memory store's state file).
    drop(first);
    let second = agent(
        &text,
        None,
        &["--demo-upstream", "--state-file", &state_arg],
    );
    let (_, overrides) = call(&second, "GET", "/overrides", Some(TOKEN), None);
    assert_eq!(
        overrides["overrides"][0]["key_sha256"],
        key.as_str(),
        "{overrides}"
    );
    let raw = raw_request_from(loopback(7), second.addr, &get_request("/api/chat", &[]));
    assert_eq!(
        Response::parse(&raw).status,
        403,
        "the ban outlives the restart"
    );
    assert_eq!(vision(&second).header("x-ratelimit-limit"), Some("9"));

    removes_and_takes_the_cli(&second, &dir);
    drop(second);
    without_tokens_writes_are_refused(&dir);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Calls the API must refuse with a 400, changing nothing.
fn bad_inputs(key: &str) -> Vec<(&'static str, String, &'static str)> {
    vec![
        ("PUT", "/overrides/abc".into(), r#"{"multiplier":2}"#),
        ("PUT", format!("/overrides/{key}"), r#"{"multiplier":0}"#),
        ("PUT", format!("/overrides/{key}"), r#"{"multiplier":-3}"#),
        (
            "PUT",
            format!("/overrides/{key}"),
            r#"{"multiplier":"ten"}"#,
        ),
        ("PUT", format!("/overrides/{key}"), "{}"),
        (
            "PUT",
            format!("/overrides/{key}"),
            r#"{"multiplier":2,"color":"red"}"#,
        ),
        (
            "PUT",
            format!("/overrides/{key}"),
            r#"{"limits":{"/api/unknown":5}}"#,
        ),
        (
            "PUT",
            format!("/overrides/{key}"),
            r#"{"limits":{"/api/chat":0}}"#,
        ),
        (
            "PUT",
            format!("/overrides/{key}"),
            r#"{"multiplier":2,"seconds":0}"#,
        ),
        ("PUT", format!("/overrides/{key}"), "not json"),
        ("PUT", "/bans/not-an-ip".into(), r#"{"seconds":60}"#),
        ("PUT", "/bans/127.0.0.7".into(), "{}"),
        (
            "PUT",
            "/bans/127.0.0.7".into(),
            r#"{"seconds":60,"reason":"a\nb"}"#,
        ),
        ("PUT", "/bans/0.0.0.0%2F0".into(), r#"{"seconds":60}"#),
        ("PUT", "/bans/127.0.0.0%2F24".into(), r#"{"seconds":60}"#),
        ("PUT", "/bans/127.0.0.9".into(), r#"{"seconds":60}"#),
        ("PUT", "/allow/10.0.0.0%2Fx".into(), "{}"),
        ("PUT", "/allow/10.0.0.1".into(), r#"{"seconds":-1}"#),
        ("PUT", "/allow/0.0.0.0%2F0".into(), "{}"),
        (
            "PUT",
            "/allow/10.0.0.1".into(),
            r#"{"reason":"x","extra":1}"#,
        ),
    ]
}

/// The vision tier's answer to `KEY` from 127.0.0.20.
fn vision(agent: &Process) -> Response {
    Response::parse(&raw_request_from(
        loopback(20),
        agent.addr,
        &get_request("/api/v1/vision", &[format!("Authorization: Bearer {KEY}")]),
    ))
}

fn refuses_strangers_and_bad_input(first: &Process, key: &str) {
    // Who may call: no token or a wrong one is refused, and nothing changes.
    let (status, body) = call(first, "GET", "/overrides", None, None);
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "UNAUTHORIZED");
    let (status, _) = call(
        first,
        "PUT",
        "/bans/127.0.0.7",
        Some("not-the-token-at-all"),
        Some(r#"{"seconds":60}"#),
    );
    assert_eq!(status, 401);
    let (status, body) = call(first, "GET", "/bans", Some(TOKEN), None);
    assert_eq!(
        (status, body["bans"].as_array().map(Vec::len)),
        (200, Some(0)),
        "{body}"
    );

    // Bad input: 400 with a JSON error, and nothing changes.
    let bad = bad_inputs(key);
    for (method, path, body) in &bad {
        let (status, answer) = call(first, method, path, Some(TOKEN), Some(body));
        assert_eq!(status, 400, "{method} {path} {body}: {answer}");
        assert!(answer["error"]["message"].is_string(), "{answer}");
    }
    assert_eq!(
        call(
            first,
            "DELETE",
            &format!("/overrides/{key}"),
            Some(TOKEN),
            None
        )
        .0,
        404
    );
    assert_eq!(
        call(first, "DELETE", "/bans/127.0.0.7", Some(TOKEN), None).0,
        404
    );
    assert_eq!(
        call(first, "POST", "/bans/127.0.0.7", Some(TOKEN), None).0,
        405
    );
    for list in ["/overrides", "/bans", "/allow", "/changes"] {
        let (status, body) = call(first, "GET", list, Some(TOKEN), None);
        assert_eq!(status, 200, "{list}");
        let entries = body
            .as_object()
            .and_then(|o| o.values().find_map(|v| v.as_array()));
        assert_eq!(
            entries.map(Vec::len),
            Some(0),
            "{list} after refused changes: {body}"
        );
    }
}

fn applies_overrides(first: &Process, key: &str) {
    // Good input, each visible in the limits, and recorded with who made it.
    assert_eq!(get_chat(first, 20, Some(KEY)), 200);
    assert_eq!(get_chat(first, 20, Some(KEY)), 200);
    assert_eq!(
        get_chat(first, 20, Some(KEY)),
        429,
        "the tier's own limit, 2"
    );
    let (status, body) = call(
        first,
        "PUT",
        &format!("/overrides/{key}"),
        Some(TOKEN),
        Some(r#"{"limits":{"/api/chat":5},"multiplier":3}"#),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["by"].as_str(), body["origin"].as_str()),
        (Some("ops"), Some("api-1"))
    );
    let statuses: Vec<u16> = (0..4).map(|_| get_chat(first, 20, Some(KEY))).collect();
    assert_eq!(
        statuses,
        [200, 200, 200, 429],
        "the key's limit is now 5 (2 spent)"
    );
    assert_eq!(
        vision(first).header("x-ratelimit-limit"),
        Some("9"),
        "3 × the multiplier"
    );
}

fn applies_bans_and_records_who(first: &Process) {
    let (status, body) = call(
        first,
        "PUT",
        "/bans/127.0.0.7",
        Some(AUDITOR_TOKEN),
        Some(r#"{"seconds":600,"reason":"scraping"}"#),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["net"], "127.0.0.7/32");
    let raw = raw_request_from(loopback(7), first.addr, &get_request("/api/chat", &[]));
    let banned = Response::parse(&raw);
    assert_eq!(banned.status, 403, "{raw}");
    let retry: u64 = banned
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After");
    assert!((590..=600).contains(&retry), "{retry}");
    assert!(banned.body.contains("\"BANNED\""), "{raw}");
    // Behind the trusted proxy, the client it names is the one banned.
    let proxied = raw_request_from(
        loopback(9),
        first.addr,
        &get_request("/api/chat", &["X-Forwarded-For: 127.0.0.7".into()]),
    );
    assert_eq!(Response::parse(&proxied).status, 403, "{proxied}");
    assert_eq!(get_chat(first, 8, None), 200, "others are served");
    let (status, body) = call(
        first,
        "PUT",
        "/allow/192.0.2.0%2F24",
        Some(TOKEN),
        Some(r#"{"reason":"office"}"#),
    );
    assert_eq!(status, 200, "{body}");
    let (status, body) = call(
        first,
        "PUT",
        "/bans/192.0.2.5",
        Some(TOKEN),
        Some(r#"{"seconds":60}"#),
    );
    assert_eq!(
        status, 400,
        "a ban inside an allowed network is refused: {body}"
    );
    let (_, changes) = call(first, "GET", "/changes", Some(TOKEN), None);
    let who: Vec<(&str, &str)> = changes["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .map(|c| (c["kind"].as_str().unwrap(), c["by"].as_str().unwrap()))
        .collect();
    assert_eq!(
        who,
        [("allow", "ops"), ("bans", "auditor"), ("overrides", "ops")],
        "{changes}"
    );
    let log = first.log();
    assert!(
        log.contains("fleet change") && log.contains("auditor"),
        "every change is logged with who made it: {log}"
    );
    let status = call(first, "GET", "/dashboard.json", None, None).1;
    assert_eq!(status["fleet"]["overrides"][0]["by"], "ops", "{status}");
    assert_eq!(status["fleet"]["changes"][1]["by"], "auditor", "{status}");
}

fn removes_and_takes_the_cli(second: &Process, dir: &std::path::Path) {
    // Removals, and the CLI on the same API.
    assert_eq!(
        call(second, "DELETE", "/bans/127.0.0.7%2F32", Some(TOKEN), None).0,
        200
    );
    assert_eq!(get_chat(second, 7, None), 200, "unbanned");
    let (status, allow) = call(second, "GET", "/allow", Some(TOKEN), None);
    assert_eq!(status, 200);
    assert_eq!(allow["allow"][0]["net"], "192.0.2.0/24", "{allow}");
    let (status, entry) = call(second, "GET", "/allow/192.0.2.0%2F24", Some(TOKEN), None);
    assert_eq!(
        (status, entry["reason"].as_str()),
        (200, Some("office")),
        "{entry}"
    );
    assert_eq!(
        call(second, "DELETE", "/allow/192.0.2.0%2F24", Some(TOKEN), None).0,
        200
    );
    assert_eq!(
        call(second, "DELETE", "/allow/192.0.2.0%2F24", Some(TOKEN), None).0,
        404,
        "gone"
    );
    assert_eq!(
        call(second, "GET", "/allow/192.0.2.0%2F24", Some(TOKEN), None).0,
        404
    );
    let (status, ban) = call(second, "GET", "/bans/127.0.0.7", Some(TOKEN), None);
    assert_eq!(status, 404, "{ban}");
    let tokens = dir.join("admin.tokens").display().to_string();
    let admin = second.admin.unwrap().to_string();
    let cli = |args: &[&str]| {
        let output = std::process::Command::new(limiter_tests::agent::agent_binary())
            .args(args)
            .args(["--admin", &admin, "--token-file", &tokens])
            .output()
            .expect("limiter-agent");
        (
            output.status.code(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        )
    };
    let other = sha256("sk-other");
    let (code, text) = cli(&[
        "override",
        "set",
        &other,
        "--multiplier",
        "4",
        "--for",
        "1h",
    ]);
    assert_eq!(code, Some(0), "{text}");
    let (code, text) = cli(&["override", "list"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains(&other) && text.contains("x4") && text.contains("by ops"),
        "{text}"
    );
    let (code, text) = cli(&["override", "set", &other, "--limit", "/nowhere=3"]);
    assert_eq!(code, Some(64), "a refused change exits 64: {text}");
    assert!(text.contains("not the route of a tier"), "{text}");
    let (code, text) = cli(&["override", "rm", &other]);
    assert_eq!(code, Some(0), "{text}");
    let (code, text) = cli(&["ban", "127.0.0.30", "--for", "10m", "--reason", "cli"]);
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(get_chat(second, 30, None), 403);
    let (code, text) = cli(&["unban", "127.0.0.30"]);
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(get_chat(second, 30, None), 200);
}

fn without_tokens_writes_are_refused(dir: &std::path::Path) {
    // Without a token file, reads are open and every write is refused.
    let open = agent(
        &config("", dir, "api-2", "").replace(
            &format!("token_file = \"{}\"\n", dir.join("admin.tokens").display()),
            "",
        ),
        None,
        &[
            "--demo-upstream",
            "--state-file",
            &dir.join("other.json").display().to_string(),
        ],
    );
    assert_eq!(call(&open, "GET", "/bans", None, None).0, 200);
    let (status, body) = call(
        &open,
        "PUT",
        "/bans/127.0.0.7",
        Some(TOKEN),
        Some(r#"{"seconds":60}"#),
    );
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "NO_TOKENS");
}

/// Three agents on one store: a change made on one is applied by the two
/// others within a second, each time (20 changes timed); an agent started
/// later has them at once.
fn three_agents_share_changes(store: &str, label: &str) {
    let dir = std::env::temp_dir().join(format!("limiter-fleet-{label}-{}", std::process::id()));
    let agents: Vec<Process> = ["a", "b", "c"]
        .iter()
        .map(|node| agent(&config(store, &dir, node, ""), None, &["--demo-upstream"]))
        .collect();
    time_overrides(&agents, label);

    // A ban made on b is enforced by a and c; lifted on c, by all.
    let (status, _) = call(
        &agents[1],
        "PUT",
        "/bans/127.0.0.40",
        Some(TOKEN),
        Some(r#"{"seconds":300,"reason":"fleet test"}"#),
    );
    assert_eq!(status, 200);
    let until_everywhere = |want: u16| {
        let started = Instant::now();
        for agent in &agents {
            while get_path(agent, 40, "/") != want {
                assert!(
                    started.elapsed() < Duration::from_secs(1),
                    "{label}: not {want} within 1 s"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        started.elapsed()
    };
    eprintln!(
        "{label}: a ban was enforced everywhere in {:?}",
        until_everywhere(403)
    );
    let (_, bans) = call(&agents[2], "GET", "/bans", Some(TOKEN), None);
    assert_eq!(
        (
            bans["bans"][0]["origin"].as_str(),
            bans["bans"][0]["by"].as_str()
        ),
        (Some("b"), Some("ops")),
        "{bans}"
    );
    // An agent that starts now has the ban in force before its first client.
    let late = agent(&config(store, &dir, "d", ""), None, &["--demo-upstream"]);
    assert_eq!(
        get_path(&late, 40, "/"),
        403,
        "the late agent loaded the ban"
    );
    assert_eq!(
        call(&agents[2], "DELETE", "/bans/127.0.0.40", Some(TOKEN), None).0,
        200
    );
    eprintln!(
        "{label}: the unban reached everyone in {:?}",
        until_everywhere(200)
    );
    let started = Instant::now();
    while get_path(&late, 40, "/") != 200 {
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{label}: the late agent kept the ban"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // An override's limits apply on every agent at once: 5 for the key,
    // shared, wherever it is spent.
    let key = sha256(KEY);
    assert_eq!(
        call(
            &agents[0],
            "PUT",
            &format!("/overrides/{key}"),
            Some(TOKEN),
            Some(r#"{"limits":{"/api/chat":5}}"#)
        )
        .0,
        200
    );
    std::thread::sleep(Duration::from_millis(600));
    let statuses: Vec<u16> = (0..7)
        .map(|i| get_chat(&agents[i % 3], 50, Some(KEY)))
        .collect();
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429, 429], "{label}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn three_agents_sharing_redis_apply_each_change_within_a_second() {
    let redis = RedisServer::start();
    let store = format!("[store]\nkind = \"redis\"\nurl = \"{}\"\n", redis.url());
    three_agents_share_changes(&store, "redis");
}

#[test]
fn three_agents_sharing_a_redis_cluster_apply_each_change_within_a_second() {
    let cluster = RedisCluster::start();
    let nodes: Vec<String> = cluster.urls().iter().map(|u| format!("\"{u}\"")).collect();
    let store = format!(
        "[store]\nkind = \"redis\"\ncluster_nodes = [{}]\n",
        nodes.join(", ")
    );
    three_agents_share_changes(&store, "cluster");
}

/// Sources escalated on host a, one after the other.
const TRIALS: u8 = 15;

/// From inside a topology's attacker namespace, from `src`: is the API
/// port answered? (A path of no tier: probes spend no budget.)
fn answered(topology: &Topology, src: Ipv4Addr) -> bool {
    get_from(
        &topology.attacker,
        Some(src),
        SocketAddrV4::new(HOST_ATTACKER_ADDR, API_PORT),
        "/",
        &[],
        Duration::from_millis(150),
    )
    .is_some()
}

#[test]
fn a_ban_escalated_on_one_host_drops_at_every_other_hosts_xdp_within_a_second() {
    let store = StoreNet::new();
    let topologies: Vec<Topology> = (0..3).map(|_| Topology::new()).collect();
    let redis_addrs: Vec<Ipv4Addr> = topologies
        .iter()
        .zip(1u8..)
        .map(|(t, i)| store.link(&t.host, i))
        .collect();
    let mut redis = store.redis(6379, &[]);
    // Every attacker namespace can send from 10.91.2.10… (the same
    // addresses on three separate hosts' links).
    for topology in &topologies {
        for n in 0..TRIALS {
            netns::ip(&[
                "-n",
                &topology.attacker.name,
                "addr",
                "add",
                &format!("10.91.2.{}/24", 10 + n),
                "dev",
                "va",
            ]);
        }
    }
    let dir = std::env::temp_dir().join(format!("limiter-fleet-xdp-{}", std::process::id()));
    let tokens = token_file(&dir);
    let agents: Vec<Process> = topologies
        .iter()
        .zip(&redis_addrs)
        .zip(["a", "b", "c"])
        .map(|((topology, addr), node)| {
            // c trusts 10.91.2.10 (its allow list): it never applies a ban on it.
            let allow = if node == "c" { "allow = [\"10.91.2.10\"]\n" } else { "" };
            let text = format!(
                "[admin]\ntoken_file = \"{}\"\nnode = \"{node}\"\n\n[store]\nkind = \"redis\"\nurl = \"redis://{addr}:6379\"\n\n{}",
                tokens.display(),
                netns::config("/api/chat", 2, &format!("escalate_after_rejections = 3\nban_seconds = 120\n{allow}"))
            );
            topology.agent(&text, &[])
        })
        .collect();
    time_escalations(&topologies);

    origins_allow_lists_unbans_and_restarts(&topologies, agents, &mut redis);
    drop(redis);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Times 20 overrides, each made on one agent, until both others have it.
fn time_overrides(agents: &[Process], label: &str) {
    let mut waits = Vec::new();
    for round in 0..20usize {
        let maker = &agents[round % 3];
        let key = sha256(&format!("{label}-key-{round}"));
        let started = Instant::now();
        let (status, body) = call(
            maker,
            "PUT",
            &format!("/overrides/{key}"),
            Some(TOKEN),
            Some(r#"{"multiplier":2}"#),
        );
        assert_eq!(status, 200, "{body}");
        for other in agents.iter().filter(|a| a.addr != maker.addr) {
            loop {
                let (_, list) = call(
                    other,
                    "GET",
                    &format!("/overrides/{key}"),
                    Some(TOKEN),
                    None,
                );
                if list["key_sha256"] == key.as_str() {
                    break;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(5),
                    "{label}: round {round} never arrived"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            waits.push(started.elapsed());
        }
    }
    waits.sort();
    let p99 = waits[(waits.len() * 99).div_ceil(100) - 1];
    eprintln!(
        "{label}: an override reached the other agents in median {:?}, p99 {:?}, max {:?} ({} arrivals)",
        waits[waits.len() / 2],
        p99,
        waits[waits.len() - 1],
        waits.len()
    );
    assert!(p99 <= Duration::from_secs(1), "{label}: p99 {p99:?}");
}

/// Escalates a fresh source on host a, `TRIALS` times, timing until b and
/// c drop it (c never for the first, on its allow list).
fn time_escalations(topologies: &[Topology]) {
    let mut waits = Vec::new();
    for n in 0..TRIALS {
        let src = Ipv4Addr::new(10, 91, 2, 10 + n);
        // The others answer this source before the ban.
        for other in &topologies[1..] {
            assert!(
                answered(other, src),
                "{src} served on the other hosts first"
            );
        }
        // Hammer host a until its XDP drops us: the escalating request is
        // the last one answered.
        // Probes on b and c (c only when it may ban) from the start, each
        // noting when its first SYN went unanswered.
        let probes: Vec<_> = topologies[1..]
            .iter()
            .enumerate()
            .filter(|(i, _)| n != 0 || *i == 0)
            .map(|(_, t)| {
                let attacker = t.attacker.clone();
                std::thread::spawn(move || {
                    let started = Instant::now();
                    loop {
                        let sent = Instant::now();
                        let answered = get_from(
                            &attacker,
                            Some(src),
                            SocketAddrV4::new(HOST_ATTACKER_ADDR, API_PORT),
                            "/",
                            &[],
                            Duration::from_millis(60),
                        )
                        .is_some();
                        if !answered {
                            return sent;
                        }
                        assert!(
                            started.elapsed() < Duration::from_secs(10),
                            "{src} never dropped"
                        );
                        std::thread::sleep(Duration::from_millis(5));
                    }
                })
            })
            .collect();
        // Hammer host a until its XDP drops us: the escalating request is
        // the last one answered.
        let mut escalated_at = None;
        let mut statuses = Vec::new();
        loop {
            let sent = Instant::now();
            match get_from(
                &topologies[0].attacker,
                Some(src),
                SocketAddrV4::new(HOST_ATTACKER_ADDR, API_PORT),
                "/api/chat",
                &[],
                Duration::from_millis(300),
            ) {
                Some(response) => {
                    statuses.push(response.status);
                    escalated_at = Some(sent);
                }
                None => break,
            }
            assert!(statuses.len() < 20, "{src} never banned on a: {statuses:?}");
        }
        assert_eq!(statuses, [200, 200, 429, 429, 429, 429], "{src}");
        let escalated_at = escalated_at.expect("answered before the ban");
        for probe in probes {
            let dropped = probe.join().expect("probe");
            waits.push(dropped.saturating_duration_since(escalated_at));
        }
    }
    waits.sort();
    let p99 = waits[(waits.len() * 99).div_ceil(100) - 1];
    eprintln!(
        "escalation on a → XDP drops on b and c: median {:?}, p99 {:?}, max {:?} ({} samples)",
        waits[waits.len() / 2],
        p99,
        waits[waits.len() - 1],
        waits.len()
    );
    assert!(p99 <= Duration::from_secs(1), "propagation p99 {p99:?}");
}

/// After the escalations: the bans' origins, c's allow list, an unban, and
/// a restart that catches up with a removal made while it was down.
fn origins_allow_lists_unbans_and_restarts(
    topologies: &[Topology],
    agents: Vec<Process>,
    redis: &mut RedisServer,
) {
    // The drops are XDP's, the bans say where they came from, and c kept
    // serving the source on its allow list.
    let b = topologies[1].status();
    assert!(
        netns::counter(&b, "drop", "banned") > 0,
        "b's XDP dropped banned packets: {b}"
    );
    let row = b["bans"]
        .as_array()
        .expect("bans")
        .iter()
        .find(|r| r["net"] == "10.91.2.11/32")
        .unwrap_or_else(|| panic!("10.91.2.11 banned on b: {b}"));
    assert_eq!(
        (
            row["origin"].as_str(),
            row["by"].as_str(),
            row["tier"].as_str()
        ),
        (Some("a"), Some("escalation"), Some("/api/chat")),
        "{row}"
    );
    let (_, text) = topologies[1].cli(&["status"]);
    assert!(text.contains("from a by escalation"), "{text}");
    assert!(
        answered(&topologies[2], Ipv4Addr::new(10, 91, 2, 10)),
        "c never bans its allow list"
    );
    let (_, bans) = admin_call(
        Some(&topologies[2].host),
        agents[2].admin.unwrap(),
        "GET",
        "/bans",
        Some(TOKEN),
        None,
    );
    let skipped = bans["bans"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["net"] == "10.91.2.10/32")
        .expect("listed");
    assert!(skipped["not_applied_here"].is_string(), "{bans}");

    // An unban on c lifts the ban on a and b within a second.
    let src = Ipv4Addr::new(10, 91, 2, 12);
    let (status, _) = admin_call(
        Some(&topologies[2].host),
        agents[2].admin.unwrap(),
        "DELETE",
        "/bans/10.91.2.12",
        Some(TOKEN),
        None,
    );
    assert_eq!(status, 200);
    let started = Instant::now();
    for topology in &topologies[..2] {
        while !answered(topology, src) {
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "unban not in force within 1 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    // An allow entry made on a reaches b's kernel allow list, and goes.
    let allow_on_b = |present: bool| {
        let started = Instant::now();
        loop {
            let listed = topologies[1].status()["allow"]
                .as_array()
                .is_some_and(|a| a.iter().any(|n| n == "198.51.100.0/24"));
            if listed == present {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "allow entry on b: {present}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let on_a = |method: &str, body: Option<&str>| {
        admin_call(
            Some(&topologies[0].host),
            agents[0].admin.unwrap(),
            method,
            "/allow/198.51.100.0%2F24",
            Some(TOKEN),
            body,
        )
        .0
    };
    assert_eq!(on_a("PUT", Some(r#"{"reason":"partner"}"#)), 200);
    allow_on_b(true);
    assert_eq!(on_a("DELETE", None), 200);
    allow_on_b(false);
    restarts(topologies, agents, redis);
}

#[test]
fn an_admin_listener_off_loopback_speaks_tls_and_asks_every_caller_for_a_token() {
    let store = StoreNet::new();
    let host = netns::Netns {
        name: format!("{}a", store.ns.name),
    };
    netns::ip(&["netns", "add", &host.name]);
    netns::ip(&["-n", &host.name, "link", "set", "lo", "up"]);
    let _host_gone = Gone(host.name.clone());
    let _ = store.link(&host, 1);
    let dir = std::env::temp_dir().join(format!("limiter-fleet-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["10.93.1.1".into()]).expect("certificate");
    let (cert_path, key_path) = (dir.join("admin.pem"), dir.join("admin.key"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
    let tls = format!(
        "tls_cert = \"{}\"\ntls_key = \"{}\"\n",
        cert_path.display(),
        key_path.display()
    );
    let server = "[server]\nlisten = \"0.0.0.0:1\"\n[xdp]\nenabled = false\n[[tier]]\nroute = \"/api/chat\"\nlimit = 2\nwindow = \"1m\"\n";
    let agent = limiter_tests::fleet::agent_in(
        &host,
        "tls-node",
        8089,
        &format!("{tls}{server}"),
        &["--admin", "10.93.1.1:9443"],
    );
    let admin = "10.93.1.1:9443".parse().unwrap();
    // From the store's side of the link: curl over TLS, trusting the cert.
    let curl = |args: &[&str]| -> (String, String) {
        let mut command = std::process::Command::new("curl");
        command
            .args([
                "-s",
                "-o",
                "/dev/stderr",
                "-w",
                "%{http_code}",
                "--max-time",
                "5",
            ])
            .args(["--cacert", &cert_path.display().to_string()])
            .args(args);
        store.ns.enter_on_exec(&mut command);
        let output = command.output().expect("curl");
        (
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let url = |path: &str| format!("https://10.93.1.1:9443{path}");
    assert_eq!(curl(&[&url("/healthz")]).0, "200", "health needs no token");
    for path in ["/status", "/dashboard.json", "/metrics", "/", "/bans"] {
        assert_eq!(curl(&[&url(path)]).0, "401", "{path} without a token");
    }
    let (code, body) = curl(&["-u", &format!("ops:{TOKEN}"), &url("/dashboard.json")]);
    assert_eq!(code, "200", "a browser's Basic auth with the token: {body}");
    let (code, _) = curl(&[
        "-H",
        &format!("Authorization: Bearer {TOKEN}"),
        &url("/status"),
    ]);
    assert_eq!(code, "200");
    let (code, _) = curl(&[
        "-H",
        "Authorization: Bearer wrong-token-0123456789",
        &url("/status"),
    ]);
    assert_eq!(code, "401");
    // Plain HTTP gets no answer from the TLS listener.
    let (status, _) = admin_call(Some(&store.ns), admin, "GET", "/healthz", None, None);
    assert_eq!(status, 0, "no plain HTTP on the TLS listener");
    // The CLI over TLS, from the store's namespace.
    let mut command = std::process::Command::new(limiter_tests::agent::agent_binary());
    command
        .args(["override", "set", &sha256(KEY), "--multiplier", "3"])
        .args(["--admin", "https://10.93.1.1:9443"])
        .args(["--ca-file", &cert_path.display().to_string()])
        .arg("--token-file")
        .arg(
            std::env::temp_dir()
                .join(format!("limiter-fleet-{}-tls-node", std::process::id()))
                .join("admin.tokens"),
        );
    store.ns.enter_on_exec(&mut command);
    let output = command.output().expect("limiter-agent override");
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let (code, body) = curl(&["-u", &format!("ops:{TOKEN}"), &url("/overrides")]);
    assert_eq!(code, "200");
    assert!(body.contains(&sha256(KEY)), "{body}");
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Deletes a network namespace when dropped.
struct Gone(String);

impl Drop for Gone {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

#[test]
fn a_loopback_admin_listener_refuses_hosts_named_by_a_domain() {
    let dir = std::env::temp_dir().join(format!("limiter-fleet-host-{}", std::process::id()));
    let agent = agent(&config("", &dir, "api-h", ""), None, &["--demo-upstream"]);
    let admin = agent.admin.unwrap();
    let ask = |host: &str| {
        let raw = limiter_tests::agent::raw_request(
            admin,
            &format!("GET /status HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        );
        Response::parse(&raw).status
    };
    assert_eq!(ask(&admin.to_string()), 200);
    assert_eq!(ask("localhost:9090"), 200);
    assert_eq!(
        ask("rebind.attacker.example:9090"),
        403,
        "a DNS-rebinding page"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn ban_json(until_ms: u64, by: &str, at_ms: u64, origin: &str) -> String {
    limiter_agent::fleet::record::json(&limiter_agent::fleet::record::Ban {
        until_ms,
        origin: origin.into(),
        by: by.into(),
        reason: String::new(),
        tier: None,
        at_ms,
    })
}

#[tokio::test]
async fn the_shared_entries_keep_longer_bans_lapse_by_the_stores_clock_and_follow_one_history() {
    use limiter_agent::fleet::SharedStore;
    let redis = RedisServer::start();
    let settings = limiter_agent::limit::RedisSettings {
        url: Some(redis.url()),
        cluster_nodes: Vec::new(),
        key_prefix: "t:".into(),
        timeout: Duration::from_millis(50),
        breaker_failures: 5,
        breaker_cooldown: Duration::from_secs(1),
        lease: Duration::from_secs(30),
    };
    let store = SharedStore::redis(&settings).unwrap();
    let now = limiter_agent::proxy::unix_ms();
    later_bans_are_kept(&store, &redis, now).await;
    lapses_are_the_stores_to_judge(&store, now).await;
    deltas_page_and_follow_one_history(&store, &redis, now).await;
}

/// An escalation never shortens a ban; an operator's decides.
async fn later_bans_are_kept(
    store: &limiter_agent::fleet::SharedStore,
    redis: &RedisServer,
    now: u64,
) {
    use limiter_agent::fleet::{record::Kind, shared::Written};
    let write = |value: String, keep_later: bool| async move {
        store
            .write(
                Kind::Bans,
                "10.0.0.1/32",
                Some(&value),
                None,
                None,
                keep_later,
            )
            .await
            .unwrap()
    };
    assert_eq!(
        write(ban_json(now + 60_000, "escalation", now, "a"), true).await,
        Written::Done { existed: false }
    );
    assert_eq!(
        write(ban_json(now + 30_000, "escalation", now + 1, "b"), true).await,
        Written::KeptLater
    );
    assert_eq!(
        write(ban_json(now + 10_000, "ops", now + 2, "a"), false).await,
        Written::Done { existed: true }
    );
    assert_eq!(
        write(ban_json(now + 20_000, "escalation", now + 1, "b"), true).await,
        Written::KeptLater,
        "an escalation made before the operator's shortening does not undo it"
    );
    // Whatever sits in the field, the script does not fail.
    let _ = redis.cli(&["HSET", "t:{limiter-fleet}:bans", "10.0.0.9/32", "not json"]);
    assert_eq!(
        store
            .write(
                Kind::Bans,
                "10.0.0.9/32",
                Some(&ban_json(now + 1000, "escalation", now, "a")),
                None,
                None,
                true
            )
            .await
            .unwrap(),
        Written::Done { existed: true }
    );
}

/// The maker's entry lapses at once, another's after the grace.
async fn lapses_are_the_stores_to_judge(store: &limiter_agent::fleet::SharedStore, now: u64) {
    use limiter_agent::fleet::record::Kind;
    store
        .write(
            Kind::Bans,
            "10.0.0.2/32",
            Some(&ban_json(now - 1000, "escalation", now - 5000, "a")),
            None,
            None,
            false,
        )
        .await
        .unwrap();
    assert!(
        !store
            .lapse(Kind::Bans, "10.0.0.2/32", "b", 60_000)
            .await
            .unwrap(),
        "not b's, within the grace"
    );
    assert!(
        store
            .lapse(Kind::Bans, "10.0.0.2/32", "a", 60_000)
            .await
            .unwrap(),
        "a's own"
    );
    assert!(
        !store
            .lapse(Kind::Bans, "10.0.0.1/32", "a", 0)
            .await
            .unwrap(),
        "not lapsed yet"
    );
}

/// From a full read's version, page by page, to the newest; a store whose
/// history is not the one applied is read whole.
async fn deltas_page_and_follow_one_history(
    store: &limiter_agent::fleet::SharedStore,
    redis: &RedisServer,
    now: u64,
) {
    use limiter_agent::fleet::{record::Kind, shared::Delta};
    let snapshot = store.read().await.unwrap();
    for n in 0..5000 {
        store
            .write(
                Kind::Bans,
                &format!("10.1.{}.{}/32", n / 250, n % 250),
                Some(&ban_json(now + 600_000, "ops", now, "a")),
                None,
                None,
                false,
            )
            .await
            .unwrap();
    }
    let (mut version, mut nonce) = (snapshot.version, snapshot.nonce.clone());
    let mut seen = std::collections::HashSet::new();
    let mut pages = 0;
    loop {
        match store.delta(version, &nonce).await.unwrap() {
            Delta::None => break,
            Delta::Full => panic!("the log reaches back"),
            Delta::Changes {
                version: v,
                nonce: n,
                entries,
                ..
            } => {
                pages += 1;
                seen.extend(entries.into_iter().map(|(_, name, _)| name));
                (version, nonce) = (v, n);
            }
        }
    }
    assert_eq!(seen.len(), 5000);
    assert!(pages >= 2, "read in pages: {pages}");
    // Writes lost and the same version reached again by others, or the
    // version gone back: read whole.
    let _ = redis.cli(&["SET", "t:{limiter-fleet}:last", "another-history"]);
    assert!(matches!(
        store.delta(version, &nonce).await.unwrap(),
        Delta::Full
    ));
    let _ = redis.cli(&["SET", "t:{limiter-fleet}:version", "1"]);
    assert!(
        matches!(store.delta(version, &nonce).await.unwrap(), Delta::Full),
        "the version went back"
    );
}

/// A restarted agent lifts a ban removed while it was down and keeps the
/// others; restarted while the store is down, it keeps them all.
fn restarts(topologies: &[Topology], agents: Vec<Process>, redis: &mut RedisServer) {
    let mut agents = agents;
    let b_agent = agents.remove(1);
    drop(b_agent);
    let (status, _) = admin_call(
        Some(&topologies[2].host),
        agents[1].admin.unwrap(),
        "DELETE",
        "/bans/10.91.2.13",
        Some(TOKEN),
        None,
    );
    assert_eq!(status, 200);
    let text = std::fs::read_to_string(
        std::env::temp_dir()
            .join(format!("limiter-{}", topologies[1].instance))
            .join("limiter.toml"),
    )
    .expect("b's config");
    let b_again = topologies[1].agent(&text, &[]);
    let started = Instant::now();
    while !answered(&topologies[1], Ipv4Addr::new(10, 91, 2, 13)) {
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "b lifted the ban removed while it was down"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !answered(&topologies[1], Ipv4Addr::new(10, 91, 2, 14)),
        "b keeps the others"
    );
    // Restarted while the store is down, b keeps the fleet's bans in its
    // kernel until it can read the store again.
    drop(b_again);
    redis.kill();
    let _b_alone = topologies[1].agent(&text, &[]);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !answered(&topologies[1], Ipv4Addr::new(10, 91, 2, 14)),
        "a restart with the store down lifted a fleet ban"
    );
    redis.restart();
}
