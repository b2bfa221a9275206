//! `cargo xtask bench proxy`: wrk through the limiter (without and with XDP),
//! nginx `limit_req` and `HAProxy` stick tables configured with the same
//! tiers, in front of the same static upstream; scenarios `allowed` (limits too
//! high to reject anything) and `rejected` (one client far over its limit), on
//! `lo` (XDP in generic mode sees the upstream leg too), and `allowed_veth` as
//! deployed: wrk in a network namespace over a veth, XDP attached natively to
//! the host's end, the contenders and the upstream in the host's namespace;
//! and `escalation`: the over-limit client at a fixed offered rate (open
//! loop), each contender's CPU per offered request, the limiter with XDP
//! banning the client after its ignored 429s.
//!
//! Core budget: every contender is pinned to CPU 1 with one worker (nginx
//! `worker_processes 1`, `HAProxy` `nbthread 1`, the agent's runtime sized by
//! its affinity mask); wrk and the upstream share CPU 0. Rounds are interleaved
//! across contenders and the median round is reported. Each round starts
//! with the next contender (the order turns by one a round), and each
//! measured run follows a short unmeasured one against the same contender:
//! the run after CPU 1 sat idle (`direct` leaves it so) cost up to a third
//! more CPU a request, and the same contender always paid it.
//!
//! The allowed scenario also runs two floors: `tcp_relay`, a byte relay with
//! no HTTP (`proxy-bench --relay`), the floor of a proxy on this runtime and
//! kernel path; and `hyper_floor`, hyper's HTTP/1 server and client and
//! nothing else (`proxy-bench --hyper`), the floor with HTTP; and
//! `http_floor`, the least an HTTP-aware relay does (`proxy-bench --http`):
//! each request head and answer head parsed by `httparse` and relayed as it
//! came, the answer's body by its length; and `epoll_http_floor`, the same
//! relay from a loop on `epoll` with no runtime (`proxy-bench
//! --epoll-http`), what the runtime adds to it. The rejected
//! scenario runs `answer_floor`: a server that answers every request with
//! the same pre-rendered 429, as long as the limiter's (`proxy-bench
//! --answer`), the floor of a sent 429: one receive and one send on this
//! runtime, no parsing and no decision; and `epoll_floor`, the same
//! answers from a loop on `epoll` with no runtime at all (`proxy-bench
//! --epoll`), what one receive and one send cost an `epoll` server.
//!
//! Usage: `proxy-bench [--rounds N] [--seconds S]`; writes `target/bench/proxy.json`.

// The report's figures are one `json!` literal, deeper than the default allows.
#![recursion_limit = "256"]

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
};

use clap::Parser as _;
use limiter_agent::config::Tier;
use limiter_bench::{
    BENCH_PATH, Peer, WrkResult, machine, median_run, offer, route_regex, scratch,
    time_to_first_event, with_cpu_cost, write_json, wrk, wrk_post,
};
use limiter_tests::{
    agent::{agent_binary, demo_upstream, free_port, reference_tiers, tier},
    http,
    netns::{HOST_CLIENT_ADDR, HOST_CLIENT_IF, Netns, Topology},
    prometheus::metric,
};
use serde_json::json;

/// wrk through the limiter and its peers, side by side; or, as a contender
/// the bench starts, one of the floors.
#[derive(clap::Parser)]
struct Args {
    /// Interleaved rounds of every contender; the median round is reported.
    #[arg(long, value_name = "N", default_value_t = 5)]
    rounds: u32,
    /// Seconds of each wrk run.
    #[arg(long, value_name = "S", default_value_t = 8)]
    seconds: u32,
    /// Serve as the `tcp_relay` floor instead: bytes relayed to UPSTREAM, no
    /// HTTP (the bench starts itself so).
    #[arg(long, num_args = 2, value_names = ["LISTEN", "UPSTREAM"], conflicts_with = "hyper")]
    relay: Option<Vec<SocketAddr>>,
    /// Serve as the `hyper_floor` floor instead: hyper's HTTP/1 server and
    /// client and nothing else (the bench starts itself so).
    #[arg(long, num_args = 2, value_names = ["LISTEN", "UPSTREAM"], conflicts_with = "answer")]
    hyper: Option<Vec<SocketAddr>>,
    /// Serve as the `http_floor` floor instead: heads parsed and relayed
    /// as they came, nothing else (the bench starts itself so).
    #[arg(long, num_args = 2, value_names = ["LISTEN", "UPSTREAM"], conflicts_with = "answer")]
    http: Option<Vec<SocketAddr>>,
    /// Serve as the `answer_floor` floor instead: every request answered
    /// with the same pre-rendered 429, nothing else (the bench starts itself
    /// so; UPSTREAM is not used).
    #[arg(long, num_args = 2, value_names = ["LISTEN", "UPSTREAM"], conflicts_with = "epoll")]
    answer: Option<Vec<SocketAddr>>,
    /// Serve as the `epoll_floor` floor instead: the same answers from a
    /// loop on `epoll`, no runtime (the bench starts itself so; UPSTREAM is
    /// not used).
    #[arg(long, num_args = 2, value_names = ["LISTEN", "UPSTREAM"])]
    epoll: Option<Vec<SocketAddr>>,
    /// Serve as the `epoll_http_floor` floor instead: `http_floor`'s
    /// relay from a loop on `epoll`, no runtime (the bench starts itself so).
    #[arg(long = "epoll-http", num_args = 2, value_names = ["LISTEN", "UPSTREAM"])]
    epoll_http: Option<Vec<SocketAddr>>,
}

const CONTENDER_CPU: u32 = 1;
const LOAD_CPU: u32 = 0;
const CONNECTIONS: u32 = 50;
/// The fixed rate the escalation case offers: under what every contender
/// answers with 429s, so what is measured is cost, not capacity.
const OFFERED_RATE: u32 = 40_000;

fn local(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// Where the contenders run and how wrk reaches them.
#[derive(Clone, Copy)]
struct Place<'a> {
    /// The namespace the contenders and the upstream run in (this one when `None`).
    ns: Option<&'a Netns>,
    /// The address the contenders listen on.
    listen: Ipv4Addr,
    /// The address wrk dials.
    dial: Ipv4Addr,
    /// Where XDP attaches.
    xdp_interface: &'a str,
    /// What wrk runs through (`ip netns exec CLIENT`), empty for this namespace.
    wrk_prefix: &'a [&'a str],
}

impl Place<'_> {
    /// Everything on `lo` here: the upstream leg crosses XDP too (generic mode).
    const LOOPBACK: Place<'static> = Place {
        ns: None,
        listen: Ipv4Addr::LOCALHOST,
        dial: Ipv4Addr::LOCALHOST,
        xdp_interface: "lo",
        wrk_prefix: &[],
    };
}

/// A tier's limit times `scale`.
fn scaled(tier: &Tier, scale: u32) -> u64 {
    u64::from(tier.limit.get()) * u64::from(scale)
}

fn nginx_common(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 8192; }}\n"
    )
}

fn nginx_temp(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "access_log off;\nclient_body_temp_path {d}/body;\nproxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fcgi;\nuwsgi_temp_path {d}/uwsgi;\nscgi_temp_path {d}/scgi;\n"
    )
}

/// The fast static upstream every contender proxies to (on the contenders' host).
fn upstream(dir: &Path, port: u16, place: Place) -> Peer {
    upstream_answering(dir, port, place, r#"{"ok":true}"#)
}

/// [`upstream`] answering `answer` to every request.
fn upstream_answering(dir: &Path, port: u16, place: Place, answer: &str) -> Peer {
    let conf = format!(
        "{}http {{\n{}keepalive_requests 1000000;\nserver {{\nlisten 127.0.0.1:{port};\n\
         location / {{ default_type application/json; return 200 '{answer}'; }}\n}}\n}}\n",
        nginx_common(dir),
        nginx_temp(dir)
    );
    start_nginx(
        "upstream (nginx static)",
        LOAD_CPU,
        dir,
        ("upstream.conf", &conf),
        port,
        place,
    )
}

/// Writes `conf` to `dir/file` and starts nginx with it (`dir` is this
/// nginx's own: its pid, logs and temporary files go there).
fn start_nginx(
    name: &str,
    cpu: u32,
    dir: &Path,
    (file, conf): (&str, &str),
    port: u16,
    place: Place,
) -> Peer {
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    let path = dir.join(file);
    std::fs::write(&path, conf).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    Peer::start_in(
        place.ns,
        name,
        cpu,
        "nginx",
        &[
            "-p",
            &dir.display().to_string(),
            "-c",
            &path.display().to_string(),
        ],
        local(port),
    )
}

/// nginx with one `limit_req` zone per tier, keyed by client address: an
/// exact location for a route with no parameter, a regex (compiled by
/// PCRE's JIT) for the others. Its rejections are logged at `notice`,
/// under the error log's `warn`: by default nginx writes a line for each
/// one, a write a request the agent does not do (it counts them, and notes
/// offenders by sample).
fn nginx(dir: &Path, port: u16, upstream: u16, tiers: &[Tier], scale: u32, place: Place) -> Peer {
    let mut http = nginx_temp(dir);
    let _ = writeln!(
        http,
        "keepalive_requests 1000000;\nlimit_req_status 429;\nlimit_req_log_level notice;"
    );
    let _ = writeln!(
        http,
        "upstream up {{ server 127.0.0.1:{upstream}; keepalive 64; }}"
    );
    for (i, tier) in tiers.iter().enumerate() {
        // nginx meters a rate (leaky bucket); burst = the window's quota makes
        // a whole window's requests admissible at once, like a fixed window.
        let per_minute = scaled(tier, scale) * 60 / tier.window.as_secs();
        let _ = writeln!(
            http,
            "limit_req_zone $binary_remote_addr zone=t{i}:10m rate={per_minute}r/m;"
        );
    }
    let _ = writeln!(http, "server {{\nlisten {}:{port} reuseport;", place.listen);
    let proxy = "proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection \"\";";
    for (i, tier) in tiers.iter().enumerate() {
        let burst = scaled(tier, scale);
        // A route with no parameter is an exact location, as an operator
        // would write it: no regex run for it.
        let exact = !tier.route.contains(['*', ':']);
        let location = if exact {
            format!("= {}", tier.route)
        } else {
            format!("~ {}", route_regex(&tier.route))
        };
        let _ = writeln!(
            http,
            "location {location} {{ limit_req zone=t{i} burst={burst} nodelay; {proxy} }}"
        );
    }
    let _ = writeln!(http, "location / {{ {proxy} }}\n}}");
    // The regexes left compiled to machine code (Debian's nginx has the JIT
    // off unless asked).
    let conf = format!("{}pcre_jit on;\nhttp {{\n{http}}}\n", nginx_common(dir));
    start_nginx(
        "nginx limit_req",
        CONTENDER_CPU,
        dir,
        ("nginx.conf", &conf),
        port,
        place,
    )
}

/// `HAProxy` with one stick table per tier (`http_req_rate` over the window).
fn haproxy(dir: &Path, port: u16, upstream: u16, tiers: &[Tier], scale: u32, place: Place) -> Peer {
    let mut conf = String::from(
        "global\n  nbthread 1\n  maxconn 8000\n\ndefaults\n  mode http\n  timeout connect 5s\n  \
         timeout client 30s\n  timeout server 30s\n  option http-keep-alive\n\n",
    );
    let _ = writeln!(conf, "frontend api\n  bind {}:{port}", place.listen);
    for (i, tier) in tiers.iter().enumerate() {
        let _ = writeln!(
            conf,
            "  http-request track-sc0 src table t{i} if {{ path_reg {} }}",
            route_regex(&tier.route)
        );
    }
    for (i, tier) in tiers.iter().enumerate() {
        let limit = scaled(tier, scale);
        let _ = writeln!(
            conf,
            "  http-request deny deny_status 429 if {{ path_reg {} }} {{ sc_http_req_rate(0,t{i}) gt {limit} }}",
            route_regex(&tier.route)
        );
    }
    let _ = writeln!(
        conf,
        "  default_backend up\n\nbackend up\n  http-reuse always\n  server s1 127.0.0.1:{upstream}\n"
    );
    for (i, tier) in tiers.iter().enumerate() {
        let window = tier.window.as_secs();
        let _ = writeln!(
            conf,
            "backend t{i}\n  stick-table type ip size 1m expire {window}s store http_req_rate({window}s)\n"
        );
    }
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, conf).expect("haproxy config");
    Peer::start_in(
        place.ns,
        "HAProxy stick tables",
        CONTENDER_CPU,
        "haproxy",
        &["-db", "-f", &path.display().to_string()],
        local(port),
    )
}

/// The agent with the reference tiers scaled by `scale`; with XDP on the
/// place's interface (instance `instance`) when given; its dashboard (and
/// sampler) on or off.
#[expect(
    clippy::too_many_arguments,
    reason = "one bench helper, called three times"
)]
fn limiter(
    dir: &Path,
    port: u16,
    admin: u16,
    upstream: u16,
    tiers: &[Tier],
    scale: u32,
    xdp: Option<&str>,
    dashboard: bool,
    place: Place,
) -> Peer {
    let mut conf = format!(
        "[server]\nlisten = \"{}:{port}\"\nupstream = \"http://127.0.0.1:{upstream}\"\n\
         max_connections = 20000\n\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\
         dashboard = {dashboard}\n\n",
        place.listen
    );
    match xdp {
        Some(instance) => {
            let _ = writeln!(
                conf,
                "[xdp]\nenabled = true\ninterfaces = [\"{}\"]\ninstance = \"{instance}\"\n",
                place.xdp_interface
            );
        }
        None => conf.push_str("[xdp]\nenabled = false\n\n"),
    }
    for t in tiers {
        let window = format!("{}s", t.window.as_secs());
        conf.push_str(&tier(&t.route, scaled(t, scale), &window));
    }
    let name = match (xdp, dashboard) {
        (Some(_), _) => "limiter-xdp.toml",
        (None, true) => "limiter.toml",
        (None, false) => "limiter-no-dashboard.toml",
    };
    let path = dir.join(name);
    std::fs::write(&path, conf).expect("limiter config");
    let binary = agent_binary();
    Peer::start_in(
        place.ns,
        match (xdp, dashboard) {
            (Some(_), _) => "limiter (XDP)",
            (None, true) => "limiter (--no-xdp)",
            (None, false) => "limiter (--no-xdp, no dashboard)",
        },
        CONTENDER_CPU,
        &binary.display().to_string(),
        &["run", "--config", &path.display().to_string()],
        local(port),
    )
}

/// A floor contender on `port` in front of the upstream: `--relay` for
/// `tcp_relay` (see [`relay`]), `--hyper` for `hyper_floor` (see [`hyper_floor`]).
fn floor_peer(mode: &str, place: Place, port: u16, upstream: u16) -> Peer {
    let exe = std::env::current_exe().expect("the bench's own path");
    Peer::start_in(
        place.ns,
        mode.trim_start_matches('-'),
        CONTENDER_CPU,
        &exe.display().to_string(),
        &[
            mode,
            &SocketAddr::from((place.listen, port)).to_string(),
            &local(upstream).to_string(),
        ],
        local(port),
    )
}

fn entry(result: &WrkResult) -> serde_json::Value {
    json!({
        "rps": (result.rps * 10.0).round() / 10.0,
        "p50_ms": (result.p50_ms * 1000.0).round() / 1000.0,
        "p99_ms": (result.p99_ms * 1000.0).round() / 1000.0,
        "requests": result.requests,
        "non_2xx": result.non_2xx,
        "errors": result.errors,
        "cpu_us_per_request": (result.cpu_us_per_request * 100.0).round() / 100.0,
        "process_cpu_us_per_request": (result.process_cpu_us_per_request * 100.0).round() / 100.0,
    })
}

/// A contender's runs, one a round: the median run's figures, and each
/// round's CPU per request in round order (ratios between contenders can be
/// taken within a round, where they ran minutes apart).
fn rounds_entry(runs: &[WrkResult]) -> serde_json::Value {
    let mut entry = entry(&median_run(runs));
    entry["cpu_us_per_request_by_round"] = runs
        .iter()
        .map(|run| (run.cpu_us_per_request * 100.0).round() / 100.0)
        .collect();
    entry
}

/// What the program did during the XDP contender's runs, from its metrics.
fn kernel_counts(place: Place, admin: u16) -> serde_json::Value {
    let metrics = match place.ns {
        Some(ns) => ns.run(move || http::get(local(admin), "/metrics").body),
        None => http::get(local(admin), "/metrics").body,
    };
    let dropped: f64 = ["banned", "packet_ceiling", "syn_ceiling"]
        .iter()
        .map(|r| {
            let name = format!("limiter_xdp_packets_total{{verdict=\"drop\",reason=\"{r}\"}}");
            metric(&metrics, &name).unwrap_or(0.0)
        })
        .sum();
    json!({
        "dropped_packets": dropped,
        "escalations": metric(&metrics, "limiter_escalations_total").unwrap_or(0.0),
    })
}

/// Removes the pinned maps of the agent `instance` (an earlier run's, or
/// this one's once it is done).
fn unpin(instance: &str) {
    let _ = std::fs::remove_dir_all(format!("/sys/fs/bpf/limiter/{instance}"));
}

/// Adds the XDP contender's kernel counts (read through its admin port) to
/// its entry in `out`, then stops it and removes its pins.
fn xdp_done(
    out: &mut serde_json::Map<String, serde_json::Value>,
    place: Place,
    (xdp, admin): (Peer, u16),
    instance: &str,
) {
    let kernel = kernel_counts(place, admin);
    if let Some(serde_json::Value::Object(entry)) = out.get_mut("limiter_xdp") {
        entry.insert("kernel".into(), kernel);
    }
    xdp.stop();
    unpin(instance);
}

/// The floors a scenario runs beside its contenders, each on a port of its
/// own: with the upstream `direct`ly reachable, `tcp_relay` (bytes relayed,
/// no HTTP: see [`relay`]), `http_floor` (the least an HTTP-aware relay
/// does: see [`http_floor`]), `epoll_http_floor` (the same with no runtime:
/// see [`epoll_http_floor`]) and `hyper_floor` (hyper's server and client,
/// nothing else); where every request is rejected (`scale` 1),
/// `answer_floor` (the floor of a sent 429: see [`answer_floor`]) and
/// `epoll_floor` (the same with no runtime: see [`epoll_floor`]).
fn floors(direct: bool, scale: u32, place: Place, up_port: u16) -> Vec<(&'static str, u16, Peer)> {
    let mut floors = Vec::new();
    let mut add = |name, mode| {
        let port = free_port();
        floors.push((name, port, floor_peer(mode, place, port, up_port)));
    };
    if direct {
        add("tcp_relay", "--relay");
        add("http_floor", "--http");
        add("epoll_http_floor", "--epoll-http");
        add("hyper_floor", "--hyper");
    }
    if scale == 1 {
        add("answer_floor", "--answer");
        add("epoll_floor", "--epoll");
    }
    floors
}

/// Seconds of the unmeasured wrk run before each measured one.
const WARM_UP_SECONDS: u32 = 1;

/// The order `count` contenders run in, in round `round` (from 1): from
/// the `round - 1`th on, so each takes each place in turn.
fn turned(count: usize, round: u32) -> impl Iterator<Item = usize> {
    let first = usize::try_from(round.saturating_sub(1)).unwrap_or(0);
    (0..count).map(move |k| (first + k) % count.max(1))
}

/// One scenario: every contender up at once at `place`, `rounds` interleaved wrk runs.
fn scenario(
    name: &str,
    scale: u32,
    (rounds, seconds): (u32, u32),
    direct: bool,
    place: Place,
) -> serde_json::Value {
    let dir = scratch(&format!("proxy-{name}"));
    let (up_port, nginx_port, haproxy_port) = (free_port(), free_port(), free_port());
    let (lim_port, lim_admin, xdp_port, xdp_admin) =
        (free_port(), free_port(), free_port(), free_port());
    let instance = format!("bench-{name}");
    unpin(&instance);
    let upstream = upstream(&dir.join("upstream"), up_port, place);
    let tiers = reference_tiers();
    let nginx = nginx(
        &dir.join("nginx"),
        nginx_port,
        up_port,
        &tiers,
        scale,
        place,
    );
    let haproxy = haproxy(&dir, haproxy_port, up_port, &tiers, scale, place);
    let limiter_plain = limiter(
        &dir, lim_port, lim_admin, up_port, &tiers, scale, None, true, place,
    );
    let limiter_xdp = limiter(
        &dir,
        xdp_port,
        xdp_admin,
        up_port,
        &tiers,
        scale,
        Some(&instance),
        true,
        place,
    );
    // The allowed path once more without the dashboard's sampler: what the
    // live page costs per request.
    let (quiet_port, quiet_admin) = (free_port(), free_port());
    let limiter_quiet = direct.then(|| {
        limiter(
            &dir,
            quiet_port,
            quiet_admin,
            up_port,
            &tiers,
            scale,
            None,
            false,
            place,
        )
    });
    // (name, port, the process whose CPU it costs, whether it has a CPU of
    // its own to measure): the upstream shares CPU 0 with wrk.
    let mut contenders = vec![
        ("limiter", lim_port, limiter_plain.pid(), true),
        ("limiter_xdp", xdp_port, limiter_xdp.pid(), true),
        ("nginx", nginx_port, nginx.pid(), true),
        ("haproxy", haproxy_port, haproxy.pid(), true),
    ];
    if let Some(quiet) = &limiter_quiet {
        contenders.push(("limiter_no_dashboard", quiet_port, quiet.pid(), true));
    }
    let floors = floors(direct, scale, place, up_port);
    for (floor, port, peer) in &floors {
        contenders.push((floor, *port, peer.pid(), true));
    }
    if direct {
        contenders.push(("direct", up_port, upstream.pid(), false));
    }
    let mut runs: Vec<Vec<WrkResult>> = vec![Vec::new(); contenders.len()];
    for round in 1..=rounds {
        for i in turned(contenders.len(), round) {
            let (contender, port, pid, own_cpu) = &contenders[i];
            eprintln!("proxy/{name}: round {round}/{rounds}: {contender}…");
            let url = format!("http://{}:{port}{BENCH_PATH}", place.dial);
            let run = || wrk(place.wrk_prefix, LOAD_CPU, &url, CONNECTIONS, seconds);
            // Warms CPU 1 and the contender; not counted.
            let _ = wrk(
                place.wrk_prefix,
                LOAD_CPU,
                &url,
                CONNECTIONS,
                WARM_UP_SECONDS,
            );
            let result = if *own_cpu {
                with_cpu_cost(CONTENDER_CPU, *pid, run)
            } else {
                run()
            };
            eprintln!(
                "  {:.0} req/s, p99 {:.2} ms, {} non-2xx, {} errors, {:.1} µs CPU ({:.1} µs process) \
                 per request",
                result.rps,
                result.p99_ms,
                result.non_2xx,
                result.errors,
                result.cpu_us_per_request,
                result.process_cpu_us_per_request
            );
            runs[i].push(result);
        }
    }
    let mut out = serde_json::Map::new();
    for (i, (contender, ..)) in contenders.iter().enumerate() {
        out.insert((*contender).to_owned(), rounds_entry(&runs[i]));
    }
    xdp_done(&mut out, place, (limiter_xdp, xdp_admin), &instance);
    serde_json::Value::Object(out)
}

/// A completion's answer with its usage, as the static upstream of the
/// token scenario sends it.
const COMPLETION: &str = r#"{"id":"c","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":30,"completion_tokens":12,"total_tokens":42}}"#;
/// The chat request wrk posts.
const CHAT_BODY: &str =
    r#"{"model":"m","max_tokens":64,"messages":[{"role":"user","content":"Say something short"}]}"#;

/// A limiter on the reference tiers (far above what a run sends) in front of
/// `upstream`, its chat tier with a token budget when `metered`.
fn limiter_tokens(dir: &Path, port: u16, upstream: u16, metered: bool) -> Peer {
    let mut conf = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nupstream = \"http://127.0.0.1:{upstream}\"\n\
         max_connections = 20000\n\n[admin]\nlisten = \"127.0.0.1:{}\"\n\n[xdp]\nenabled = false\n\n",
        free_port()
    );
    for t in reference_tiers() {
        let window = format!("{}s", t.window.as_secs());
        conf.push_str(&tier(&t.route, scaled(&t, 1_000_000), &window));
        if metered && t.route == BENCH_PATH {
            conf.push_str(
                "[tier.tokens]\nlimit = 4000000000\nwindow = \"1m\"\nreserve = \"max_tokens\"\n",
            );
        }
    }
    let name = if metered {
        "limiter-tokens.toml"
    } else {
        "limiter-post.toml"
    };
    let path = dir.join(name);
    std::fs::write(&path, conf).expect("limiter config");
    Peer::start_in(
        None,
        if metered {
            "limiter (token budget)"
        } else {
            "limiter (POST, no budget)"
        },
        CONTENDER_CPU,
        &agent_binary().display().to_string(),
        &["run", "--no-xdp", "--config", &path.display().to_string()],
        local(port),
    )
}

/// The allowed path of a chat completion `POST` with and without a token
/// budget on its tier (the body read and parsed, the reservation, the
/// answer read for its usage, the settlement), in front of a static
/// upstream that answers with a usage; and the time to a stream's first
/// event through the agent beside direct, against the demo upstream.
fn tokens(rounds: u32, seconds: u32) -> serde_json::Value {
    let dir = scratch("proxy-tokens");
    let up_port = free_port();
    let upstream = upstream_answering(&dir.join("upstream"), up_port, Place::LOOPBACK, COMPLETION);
    let (post_port, metered_port) = (free_port(), free_port());
    let post = limiter_tokens(&dir, post_port, up_port, false);
    let metered = limiter_tokens(&dir, metered_port, up_port, true);
    let contenders = [
        ("limiter_post", post_port, post.pid()),
        ("limiter_tokens", metered_port, metered.pid()),
    ];
    let mut runs: Vec<Vec<WrkResult>> = vec![Vec::new(); contenders.len()];
    for round in 1..=rounds {
        for i in turned(contenders.len(), round) {
            let (contender, at, process) = &contenders[i];
            eprintln!("proxy/tokens: round {round}/{rounds}: {contender}…");
            let url = format!("http://127.0.0.1:{at}{BENCH_PATH}");
            let _ = wrk_post(
                &[],
                LOAD_CPU,
                &url,
                (CONNECTIONS, WARM_UP_SECONDS),
                CHAT_BODY,
            );
            let result = with_cpu_cost(CONTENDER_CPU, *process, || {
                wrk_post(&[], LOAD_CPU, &url, (CONNECTIONS, seconds), CHAT_BODY)
            });
            eprintln!(
                "  {:.0} req/s, p99 {:.2} ms, {} non-2xx, {:.1} µs CPU per request",
                result.rps, result.p99_ms, result.non_2xx, result.cpu_us_per_request
            );
            runs[i].push(result);
        }
    }
    let mut out = serde_json::Map::new();
    for (i, (contender, ..)) in contenders.iter().enumerate() {
        out.insert((*contender).to_owned(), entry(&median_run(&runs[i])));
    }
    drop((post, metered, upstream));
    // Time to first event: the demo upstream streams its first event at
    // once; through a metered agent (the stream read line by line, its usage
    // stripped) and direct, interleaved.
    let demo = demo_upstream();
    let through_port = free_port();
    let through = limiter_tokens(&dir, through_port, demo.addr.port(), true);
    let (mut direct, mut via) = (Vec::new(), Vec::new());
    for _ in 0..(rounds * 50) {
        direct.push(time_to_first_event(demo.addr));
        via.push(time_to_first_event(local(through_port)));
    }
    drop(through);
    let median = |mut samples: Vec<std::time::Duration>| {
        samples.sort_unstable();
        samples[samples.len() / 2].as_secs_f64() * 1e3
    };
    let (direct, via) = (median(direct), median(via));
    eprintln!("proxy/tokens: first event {via:.3} ms through the agent, {direct:.3} ms direct");
    out.insert(
        "first_event_ms".to_owned(),
        json!({ "direct": direct, "through_agent": via, "added": via - direct }),
    );
    serde_json::Value::Object(out)
}

/// One client far over its limit at a fixed offered rate (open loop, so the
/// requests sent are known whatever happens to them): what each contender
/// spends per offered request, with the limiter's XDP escalation banning the
/// client after its ignored 429s.
fn escalation(seconds: u32) -> serde_json::Value {
    let dir = scratch("proxy-escalation");
    let place = Place::LOOPBACK;
    let (up_port, nginx_port, lim_port, lim_admin, xdp_port, xdp_admin) = (
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    );
    let instance = "bench-escalation";
    unpin(instance);
    let tiers = reference_tiers();
    let _upstream = upstream(&dir.join("upstream"), up_port, place);
    let nginx = nginx(&dir.join("nginx"), nginx_port, up_port, &tiers, 1, place);
    let plain = limiter(
        &dir, lim_port, lim_admin, up_port, &tiers, 1, None, true, place,
    );
    let xdp = limiter(
        &dir,
        xdp_port,
        xdp_admin,
        up_port,
        &tiers,
        1,
        Some(instance),
        true,
        place,
    );
    let mut out = serde_json::Map::new();
    for (name, port, pid) in [
        ("limiter", lim_port, plain.pid()),
        ("limiter_xdp", xdp_port, xdp.pid()),
        ("nginx", nginx_port, nginx.pid()),
    ] {
        eprintln!("proxy/escalation: {name} at {OFFERED_RATE} requests/s offered…");
        // Not 127.0.0.1: the upstream's address is on the kernel allow list.
        let r = offer(
            (Ipv4Addr::new(127, 0, 0, 2).into(), local(port)),
            BENCH_PATH,
            (OFFERED_RATE, seconds, 8),
            (LOAD_CPU, CONTENDER_CPU, pid),
        );
        eprintln!(
            "  offered {}, answered {} ({} 429s), {:.2} µs CPU ({:.2} µs process) per offered request",
            r.offered, r.answered, r.rejected, r.cpu_us_per_offered, r.process_cpu_us_per_offered
        );
        #[expect(clippy::cast_precision_loss, reason = "request counts")]
        let per_second = r.offered as f64 / r.seconds;
        out.insert(
            name.to_owned(),
            json!({
                "offered": r.offered,
                "offered_per_second": per_second.round(),
                "answered": r.answered,
                "rejected_429": r.rejected,
                "cpu_us_per_offered": (r.cpu_us_per_offered * 1000.0).round() / 1000.0,
                "process_cpu_us_per_offered": (r.process_cpu_us_per_offered * 1000.0).round() / 1000.0,
            }),
        );
    }
    xdp_done(&mut out, place, (xdp, xdp_admin), instance);
    serde_json::Value::Object(out)
}

/// The allowed path as deployed: wrk in its own namespace over a veth, the
/// program attached natively to the host's end, so only client traffic
/// crosses it (the upstream leg stays on the host's lo).
fn allowed_veth(rounds: u32, seconds: u32) -> serde_json::Value {
    let topology = Topology::new();
    let prefix = ["ip", "netns", "exec", topology.client.name.as_str()];
    let place = Place {
        ns: Some(&topology.host),
        listen: Ipv4Addr::UNSPECIFIED,
        dial: HOST_CLIENT_ADDR,
        xdp_interface: HOST_CLIENT_IF,
        wrk_prefix: &prefix,
    };
    scenario("allowed_veth", 1_000_000, (rounds, seconds), false, place)
}

/// The targets' verdicts on the console (`bench/RESULTS.md` has them too).
fn print_verdicts(result: &serde_json::Value) {
    let verdict = |r: f64, target: f64| if r >= target { "meets" } else { "misses" };
    let a = result["ratios"]["allowed_vs_nginx"].as_f64().unwrap_or(0.0);
    let r = result["ratios"]["rejected_vs_nginx"]
        .as_f64()
        .unwrap_or(0.0);
    println!(
        "proxy allowed: limiter {a:.2}x nginx (target >= 1.0x): {}",
        verdict(a, 1.0)
    );
    println!("proxy rejected: limiter {r:.2}x nginx");
    let cpu = |key: &str| result["ratios"][key].as_f64().unwrap_or(0.0);
    let at_most = |r: f64, target: f64| {
        if r > 0.0 && r <= target {
            "meets"
        } else {
            "misses"
        }
    };
    println!(
        "proxy allowed: limiter p99 {:.2}x nginx's (target <= 1.0x): {}",
        cpu("allowed_p99_vs_nginx"),
        at_most(cpu("allowed_p99_vs_nginx"), 1.0)
    );
    println!(
        "proxy allowed: limiter CPU per request {:.2}x nginx's (target <= 0.85x): {}",
        cpu("allowed_cpu_vs_nginx"),
        at_most(cpu("allowed_cpu_vs_nginx"), 0.85)
    );
    println!(
        "proxy rejected: limiter CPU per request {:.2}x nginx's (target <= 0.7x): {}",
        cpu("rejected_cpu_vs_nginx"),
        at_most(cpu("rejected_cpu_vs_nginx"), 0.7)
    );
    println!(
        "proxy floors, CPU per request against nginx's: http_floor {:.2}x, epoll_http_floor \
         {:.2}x, tcp_relay {:.2}x (allowed); answer_floor {:.2}x, epoll_floor {:.2}x (rejected)",
        cpu("http_floor_cpu_vs_nginx"),
        cpu("epoll_http_floor_cpu_vs_nginx"),
        cpu("tcp_relay_cpu_vs_nginx"),
        cpu("answer_floor_cpu_vs_nginx"),
        cpu("epoll_floor_cpu_vs_nginx")
    );
    println!(
        "proxy allowed: the dashboard's sampler on vs off: {:.2}x the throughput, {:.2}x the CPU \
         per request",
        result["ratios"]["allowed_with_dashboard_vs_without"]
            .as_f64()
            .unwrap_or(0.0),
        cpu("allowed_cpu_with_dashboard_vs_without")
    );
    // Zero is a result here (banned, the client costs nothing measurable);
    // what must not be zero is nginx's side of the ratio.
    let nginx_offered = result["escalation"]["nginx"]["cpu_us_per_offered"]
        .as_f64()
        .unwrap_or(0.0);
    println!(
        "proxy escalation: limiter with XDP spends {:.3}x nginx's CPU per offered request (target <= 0.5x): {}",
        cpu("escalation_cpu_vs_nginx"),
        if nginx_offered > 0.0 && cpu("escalation_cpu_vs_nginx") <= 0.5 {
            "meets"
        } else {
            "misses"
        }
    );
}

/// Serves `listen` on a current-thread tokio runtime, as the agent's runtime
/// is on one CPU: each client connection gets a new connection to `upstream`
/// (both `TCP_NODELAY`) and is handed with it to `serve` in a task of its own.
fn floor<F, Fut>(listen: SocketAddr, upstream: SocketAddr, serve: F)
where
    F: Fn(tokio::net::TcpStream, tokio::net::TcpStream) -> Fut,
    Fut: Future<Output = ()> + 'static,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .expect("floor listen");
        loop {
            let Ok((client, _)) = listener.accept().await else {
                continue;
            };
            let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                continue;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            tokio::task::spawn_local(serve(client, server));
        }
    });
}

/// `proxy-bench --relay LISTEN UPSTREAM`: the `tcp_relay` contender, bytes
/// copied both ways ([`floor`]): the same accept, connect, `recvfrom` and
/// `writev` per request as the agent, with no HTTP parsing, no decision and
/// no headers added. What the limiter costs over it is what its HTTP
/// handling and deciding cost.
fn relay(listen: SocketAddr, upstream: SocketAddr) {
    floor(listen, upstream, |mut client, mut server| async move {
        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
    });
}

/// `proxy-bench --http LISTEN UPSTREAM`: the `http_floor` contender
/// ([`floor`]: one upstream connection per client connection): each
/// request head read whole and parsed by `httparse`, written upstream as it
/// came; the answer's head read and parsed, its body read by its
/// `Content-Length`, and the answer written to the client as it came. The
/// least a proxy that reads HTTP does per request (requests without a
/// body, answers with a length: the allowed scenario's), with no header
/// rewritten, no decision and no limit fields.
fn http_floor(listen: SocketAddr, upstream: SocketAddr) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    floor(listen, upstream, |mut client, mut server| async move {
        let (mut request, mut answer) = (Vec::with_capacity(4096), Vec::with_capacity(16384));
        loop {
            let head = loop {
                let mut fields = [httparse::EMPTY_HEADER; 64];
                match httparse::Request::new(&mut fields).parse(&request) {
                    Ok(httparse::Status::Complete(len)) => break len,
                    Ok(httparse::Status::Partial) => {}
                    Err(_) => return,
                }
                request.reserve(4096);
                if !matches!(client.read_buf(&mut request).await, Ok(n) if n > 0) {
                    return;
                }
            };
            if server.write_all(&request[..head]).await.is_err() {
                return;
            }
            request.drain(..head);
            let whole = loop {
                let mut fields = [httparse::EMPTY_HEADER; 64];
                let mut parsed = httparse::Response::new(&mut fields);
                match parsed.parse(&answer) {
                    Ok(httparse::Status::Complete(len)) => {
                        let length = parsed
                            .headers
                            .iter()
                            .find(|f| f.name.eq_ignore_ascii_case("content-length"))
                            .and_then(|f| std::str::from_utf8(f.value).ok()?.parse::<usize>().ok());
                        let Some(length) = length else { return };
                        if answer.len() >= len + length {
                            break len + length;
                        }
                    }
                    Ok(httparse::Status::Partial) => {}
                    Err(_) => return,
                }
                answer.reserve(16384);
                if !matches!(server.read_buf(&mut answer).await, Ok(n) if n > 0) {
                    return;
                }
            };
            if client.write_all(&answer[..whole]).await.is_err() {
                return;
            }
            answer.drain(..whole);
        }
    });
}

/// `proxy-bench --hyper LISTEN UPSTREAM`: the `hyper_floor` contender, a
/// reverse proxy of hyper's HTTP/1 server and client and nothing else
/// ([`floor`]: one upstream connection per client connection, no pool at
/// all): what the HTTP library costs before the limiter does anything.
fn hyper_floor(listen: SocketAddr, upstream: SocketAddr) {
    use hyper::{client::conn::http1 as client, server::conn::http1 as server};
    use hyper_util::rt::TokioIo;
    floor(listen, upstream, |downstream, up| async move {
        let Ok((sender, connection)) = client::handshake(TokioIo::new(up)).await else {
            return;
        };
        tokio::task::spawn_local(connection);
        let sender = std::rc::Rc::new(tokio::sync::Mutex::new(sender));
        let service = hyper::service::service_fn(move |req| {
            let sender = sender.clone();
            async move {
                let mut sender = sender.lock().await;
                sender.ready().await?;
                sender.send_request(req).await
            }
        });
        let _ = server::Builder::new()
            .serve_connection(TokioIo::new(downstream), service)
            .await;
    });
}

/// The 429 `answer_floor` sends: the limiter's answer to the rejected
/// scenario's client, byte for byte in length (its `Date` a fixed one).
const ANSWER_429: &[u8] = b"HTTP/1.1 429 Too Many Requests\r\n\
date: Mon, 07 Dec 2026 14:00:00 GMT\r\n\
x-ratelimit-limit: 60\r\nx-ratelimit-remaining: 0\r\nx-ratelimit-reset: 1796653022\r\n\
retry-after: 55\r\ncontent-type: application/json\r\ncontent-length: 118\r\n\r\n\
{\"error\":{\"code\":\"RATE_LIMIT_EXCEEDED\",\"message\":\"Rate limit exceeded. Try again later.\",\"details\":{\"retryAfter\":55}}}";

/// `proxy-bench --answer LISTEN UPSTREAM`: the `answer_floor` contender
/// ([`floor`], its upstream connection unused): reads what a client sends
/// and answers each head (each blank line that ends one) with
/// [`ANSWER_429`], all of a read's answers in one write. One receive and
/// one send per request on the agent's runtime, and nothing else: what a
/// sent 429 costs before any HTTP handling or deciding.
fn answer_floor(listen: SocketAddr, upstream: SocketAddr) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    floor(listen, upstream, |mut client, server| async move {
        drop(server);
        let mut buf = Vec::with_capacity(4096);
        let mut out = Vec::with_capacity(4096);
        loop {
            match client.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let (end, heads) = whole_heads(&buf);
            for _ in 0..heads {
                out.extend_from_slice(ANSWER_429);
            }
            buf.drain(..end);
            if !out.is_empty() {
                if client.write_all(&out).await.is_err() {
                    return;
                }
                out.clear();
            }
            buf.reserve(4096);
        }
    });
}

/// `proxy-bench --epoll LISTEN UPSTREAM`: the `epoll_floor` contender, the
/// same answers as [`answer_floor`] from a loop on `epoll` itself, with no
/// runtime (UPSTREAM is not used): one thread, level-triggered interest in
/// each connection, one `read` when a connection is ready and one `write`
/// of every answer it completed, written from the constant when nothing
/// else waits. What a sent 429 costs an `epoll` server that does one
/// receive and one send per request and nothing else, on this kernel: no
/// task, no waker, no HTTP.
fn epoll_floor(listen: SocketAddr, _upstream: SocketAddr) {
    // By descriptor: one index per event, no hashing.
    let clients = std::cell::RefCell::new(Vec::<Option<FloorClient>>::new());
    let mut chunk = vec![0u8; 65536];
    // An error or a hang-up is read as readable: the read then sees it.
    let readable = (libc::EPOLLIN | libc::EPOLLERR | libc::EPOLLHUP).cast_unsigned();
    epoll_loop(
        listen,
        |_, stream, slot| {
            let mut clients = clients.borrow_mut();
            if clients.len() <= slot {
                clients.resize_with(slot + 1, || None);
            }
            clients[slot] = Some(FloorClient {
                stream,
                read: Vec::with_capacity(4096),
                unsent: Vec::new(),
            });
        },
        |epoll, fd, events| {
            let mut clients = clients.borrow_mut();
            let slot = usize::try_from(fd).expect("a descriptor we added");
            let Some(client) = clients.get_mut(slot).and_then(Option::as_mut) else {
                return;
            };
            let waited = !client.unsent.is_empty();
            if !client.ready(events & readable != 0, &mut chunk) {
                // Dropping the stream closes it, which takes it out of the set.
                clients[slot] = None;
            } else if waited == client.unsent.is_empty() {
                interest(epoll, fd, false, !client.unsent.is_empty());
            }
        },
    );
}

/// The loop of the `epoll` floors: one thread, level-triggered interest in
/// the listener and each connection. Each accepted connection is made
/// non-blocking with `TCP_NODELAY`, added to the set and handed to
/// `accepted` with the set and its descriptor's index; each event on a
/// connection goes to `ready` with the set, the descriptor and its events.
fn epoll_loop(
    listen: SocketAddr,
    mut accepted: impl FnMut(std::os::fd::RawFd, std::net::TcpStream, usize),
    mut ready: impl FnMut(std::os::fd::RawFd, std::os::fd::RawFd, u32),
) {
    use std::os::fd::{AsRawFd as _, RawFd};

    let listener = std::net::TcpListener::bind(listen).expect("floor listen");
    listener
        .set_nonblocking(true)
        .expect("non-blocking listener");
    // SAFETY: a plain system call with no pointers.
    let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    assert!(
        epoll >= 0,
        "epoll_create1: {}",
        std::io::Error::last_os_error()
    );
    let listening = listener.as_raw_fd();
    interest(epoll, listening, true, false);
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 512];
    loop {
        // SAFETY: `events` has room for the count passed.
        let count = unsafe { libc::epoll_wait(epoll, events.as_mut_ptr(), 512, -1) };
        let Ok(count) = usize::try_from(count) else {
            continue; // EINTR
        };
        for event in &events[..count] {
            let fd = RawFd::try_from(event.u64).expect("a descriptor we added");
            if fd != listening {
                ready(epoll, fd, event.events);
                continue;
            }
            // Until the queue is empty (or accepting fails: the listener
            // stays ready, and the next turn tries again).
            while let Ok((stream, _)) = listener.accept() {
                let _ = stream.set_nonblocking(true);
                let _ = stream.set_nodelay(true);
                let fd = stream.as_raw_fd();
                interest(epoll, fd, true, false);
                let slot = usize::try_from(fd).expect("a descriptor is not negative");
                accepted(epoll, stream, slot);
            }
        }
    }
}

/// `proxy-bench --epoll-http LISTEN UPSTREAM`: the `epoll_http_floor`
/// contender, [`http_floor`]'s work from a loop on `epoll` itself, with no
/// runtime: one thread, level-triggered interest in each connection, one
/// upstream connection per client connection (opened at accept, as
/// [`floor`] does), each head and answer head parsed by `httparse`, the
/// request head written upstream and the whole answer to the client, each
/// in one `write`. What relaying a request costs an `epoll` proxy with no
/// task, no waker and no decision: against `http_floor`, what the runtime
/// costs the allowed path.
fn epoll_http_floor(listen: SocketAddr, upstream: SocketAddr) {
    use std::os::fd::{AsRawFd as _, RawFd};

    // A pair by its client's descriptor; an upstream descriptor's client.
    let pairs = std::cell::RefCell::new(Vec::<Option<FloorPair>>::new());
    let client_of = std::cell::RefCell::new(Vec::<RawFd>::new());
    let mut chunk = vec![0u8; 65536];
    let slot = |fd: RawFd| usize::try_from(fd).expect("a descriptor is not negative");
    epoll_loop(
        listen,
        |epoll, client, c| {
            let Ok(server) = std::net::TcpStream::connect(upstream) else {
                return;
            };
            let _ = server.set_nonblocking(true);
            let _ = server.set_nodelay(true);
            let u = server.as_raw_fd();
            interest(epoll, u, true, false);
            let (mut pairs, mut client_of) = (pairs.borrow_mut(), client_of.borrow_mut());
            let top = c.max(slot(u)) + 1;
            if pairs.len() < top {
                pairs.resize_with(top, || None);
                client_of.resize(top, -1);
            }
            client_of[slot(u)] = client.as_raw_fd();
            pairs[c] = Some(FloorPair {
                client,
                server,
                request: Vec::with_capacity(4096),
                answer: Vec::with_capacity(16384),
                waiting: false,
            });
        },
        |_, fd, _| {
            let (mut pairs, mut client_of) = (pairs.borrow_mut(), client_of.borrow_mut());
            let Some(&owner) = client_of.get(slot(fd)) else {
                return;
            };
            let (c, from_client) = if owner >= 0 {
                (owner, false)
            } else {
                (fd, true)
            };
            let Some(pair) = pairs.get_mut(slot(c)).and_then(Option::as_mut) else {
                return;
            };
            if !pair.ready(from_client, &mut chunk) {
                client_of[slot(pair.server.as_raw_fd())] = -1;
                // Dropping the streams closes them, which takes them out of
                // the set.
                pairs[slot(c)] = None;
            }
        },
    );
}

/// A client connection of [`epoll_http_floor`] and its own upstream
/// connection: what the client sent not yet relayed, what the upstream sent
/// of an answer not yet whole, whether a request is upstream.
struct FloorPair {
    client: std::net::TcpStream,
    server: std::net::TcpStream,
    request: Vec<u8>,
    answer: Vec<u8>,
    waiting: bool,
}

impl FloorPair {
    /// Reads once from the side that is ready (the client when
    /// `from_client`), relays what became whole; whether both are open.
    fn ready(&mut self, from_client: bool, chunk: &mut [u8]) -> bool {
        let (stream, buf) = if from_client {
            (&mut self.client, &mut self.request)
        } else {
            (&mut self.server, &mut self.answer)
        };
        if !read_some(stream, buf, chunk) {
            return false;
        }
        if !from_client {
            let mut fields = [httparse::EMPTY_HEADER; 64];
            let mut parsed = httparse::Response::new(&mut fields);
            let whole = match parsed.parse(&self.answer) {
                Ok(httparse::Status::Complete(len)) => {
                    let Some(length) = parsed
                        .headers
                        .iter()
                        .find(|f| f.name.eq_ignore_ascii_case("content-length"))
                        .and_then(|f| std::str::from_utf8(f.value).ok()?.parse::<usize>().ok())
                    else {
                        return false;
                    };
                    (self.answer.len() >= len + length).then_some(len + length)
                }
                Ok(httparse::Status::Partial) => None,
                Err(_) => return false,
            };
            let Some(whole) = whole else { return true };
            if !write_whole(&mut self.client, &self.answer[..whole]) {
                return false;
            }
            self.answer.drain(..whole);
            self.waiting = false;
        }
        if self.waiting {
            return true;
        }
        let mut fields = [httparse::EMPTY_HEADER; 64];
        match httparse::Request::new(&mut fields).parse(&self.request) {
            Ok(httparse::Status::Complete(head)) => {
                if !write_whole(&mut self.server, &self.request[..head]) {
                    return false;
                }
                self.request.drain(..head);
                self.waiting = true;
                true
            }
            Ok(httparse::Status::Partial) => true,
            Err(_) => false,
        }
    }
}

/// Reads once (through `chunk`) onto the end of `buf`; false at the close
/// or on an error.
fn read_some(stream: &mut std::net::TcpStream, buf: &mut Vec<u8>, chunk: &mut [u8]) -> bool {
    use std::io::{ErrorKind, Read as _};
    loop {
        match stream.read(chunk) {
            Ok(0) => return false,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                return true;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return e.kind() == ErrorKind::WouldBlock,
        }
    }
}

/// Writes all of `bytes`, which a socket on `lo` takes at once (a floor
/// that finds it full closes the connection instead of waiting).
fn write_whole(stream: &mut std::net::TcpStream, bytes: &[u8]) -> bool {
    write_some(stream, bytes) == Some(bytes.len())
}

/// One client of [`epoll_floor`]: what it sent of a head not yet whole,
/// what it has not yet taken of its answers.
struct FloorClient {
    stream: std::net::TcpStream,
    read: Vec<u8>,
    unsent: Vec<u8>,
}

impl FloorClient {
    /// Reads once when `readable` (through `chunk`), answers each head
    /// completed, writes what it can; whether the connection is open.
    fn ready(&mut self, readable: bool, chunk: &mut [u8]) -> bool {
        use std::io::{ErrorKind, Read as _};
        let heads = if readable {
            let n = loop {
                match self.stream.read(chunk) {
                    Ok(0) => return false,
                    Ok(n) => break n,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    // Nothing after all: what waits is still written.
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break 0,
                    Err(_) => return false,
                }
            };
            // Scanned where it was read when no head was begun before it.
            if self.read.is_empty() {
                let (end, heads) = whole_heads(&chunk[..n]);
                self.read.extend_from_slice(&chunk[end..n]);
                heads
            } else {
                self.read.extend_from_slice(&chunk[..n]);
                let (end, heads) = whole_heads(&self.read);
                self.read.drain(..end);
                heads
            }
        } else {
            0
        };
        if heads == 1 && self.unsent.is_empty() {
            return match write_some(&mut self.stream, ANSWER_429) {
                Some(n) => {
                    self.unsent.extend_from_slice(&ANSWER_429[n..]);
                    true
                }
                None => false,
            };
        }
        for _ in 0..heads {
            self.unsent.extend_from_slice(ANSWER_429);
        }
        while !self.unsent.is_empty() {
            match write_some(&mut self.stream, &self.unsent) {
                Some(0) => break,
                Some(n) => {
                    self.unsent.drain(..n);
                }
                None => return false,
            }
        }
        true
    }
}

/// The whole heads at the start of `bytes` (each ended by a blank line):
/// where the last one ends, and how many there are.
fn whole_heads(bytes: &[u8]) -> (usize, usize) {
    let (mut end, mut heads) = (0, 0);
    while let Some(at) = bytes[end..].windows(4).position(|w| w == b"\r\n\r\n") {
        end += at + 4;
        heads += 1;
    }
    (end, heads)
}

/// Writes what the socket takes of `bytes`: how much (0 when it would
/// block), or `None` when the connection failed.
fn write_some(stream: &mut std::net::TcpStream, bytes: &[u8]) -> Option<usize> {
    use std::io::{ErrorKind, Write as _};
    loop {
        match stream.write(bytes) {
            Ok(0) => return None,
            Ok(n) => return Some(n),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Some(0),
            Err(_) => return None,
        }
    }
}

/// Sets `fd`'s interest in `epoll` (added when `add`): readable, and
/// writable while answers wait.
fn interest(epoll: std::os::fd::RawFd, fd: std::os::fd::RawFd, add: bool, writable: bool) {
    let events = if writable {
        libc::EPOLLIN | libc::EPOLLOUT
    } else {
        libc::EPOLLIN
    };
    let mut event = libc::epoll_event {
        events: events.cast_unsigned(),
        u64: u64::try_from(fd).expect("a descriptor is not negative"),
    };
    let op = if add {
        libc::EPOLL_CTL_ADD
    } else {
        libc::EPOLL_CTL_MOD
    };
    // SAFETY: both descriptors are open (the caller owns them), and `event`
    // lives across the call.
    let done = unsafe { libc::epoll_ctl(epoll, op, fd, &raw mut event) };
    assert_eq!(done, 0, "epoll_ctl: {}", std::io::Error::last_os_error());
}

/// The CPU per request of `ours` against that of `theirs` in `scenario`
/// (0 when either is missing).
fn cpu_of(scenario: &serde_json::Value, ours: &str, theirs: &str) -> f64 {
    let cpu = |key: &str| scenario[key]["cpu_us_per_request"].as_f64().unwrap_or(0.0);
    let (ours, theirs) = (cpu(ours), cpu(theirs));
    if ours > 0.0 && theirs > 0.0 {
        ours / theirs
    } else {
        0.0
    }
}

/// The CPU per request of `ours` against that of `theirs` in `scenario`
/// within each round: the median, the least and the most (zeros when
/// either is missing).
fn cpu_by_round(scenario: &serde_json::Value, ours: &str, theirs: &str) -> serde_json::Value {
    let rounds = |key: &str| -> Vec<f64> {
        scenario[key]["cpu_us_per_request_by_round"]
            .as_array()
            .map(|r| r.iter().filter_map(serde_json::Value::as_f64).collect())
            .unwrap_or_default()
    };
    let ratios: Vec<f64> = rounds(ours)
        .iter()
        .zip(rounds(theirs))
        .filter(|(o, t)| **o > 0.0 && *t > 0.0)
        .map(|(o, t)| o / t)
        .collect();
    let least = ratios.iter().copied().reduce(f64::min).unwrap_or(0.0);
    let most = ratios.iter().copied().reduce(f64::max).unwrap_or(0.0);
    let round = |x: f64| (x * 1000.0).round() / 1000.0;
    json!({
        "median": round(limiter_bench::median(ratios)),
        "min": round(least),
        "max": round(most),
    })
}

/// A floor contender's server: `LISTEN`, `UPSTREAM`.
type FloorServer = fn(SocketAddr, SocketAddr);

/// Serves as the floor `args` names, if it names one (until killed);
/// whether it did.
fn serve_floor(args: &Args) -> bool {
    let floors: [(&Option<Vec<SocketAddr>>, FloorServer); 6] = [
        (&args.relay, relay),
        (&args.http, http_floor),
        (&args.epoll_http, epoll_http_floor),
        (&args.hyper, hyper_floor),
        (&args.answer, answer_floor),
        (&args.epoll, epoll_floor),
    ];
    for (addrs, serve) in floors {
        if let Some([listen, upstream]) = addrs.as_deref() {
            serve(*listen, *upstream);
            return true;
        }
    }
    false
}

fn main() {
    let args = Args::parse();
    if serve_floor(&args) {
        return;
    }
    let Args {
        rounds, seconds, ..
    } = args;
    limiter_tests::require_root("the proxy benchmark (XDP on lo and on a veth)");
    // Limits far above what the run can send, then the reference limits.
    let allowed = scenario(
        "allowed",
        1_000_000,
        (rounds, seconds),
        true,
        Place::LOOPBACK,
    );
    let rejected = scenario("rejected", 1, (rounds, seconds), false, Place::LOOPBACK);
    let allowed_veth = allowed_veth(rounds, seconds);
    let escalation = escalation(seconds);
    let tokens = tokens(rounds, seconds);
    let ratio = |scenario: &serde_json::Value, key: &str| {
        let ours = scenario["limiter"]["rps"].as_f64().unwrap_or(0.0);
        let theirs = scenario[key]["rps"].as_f64().unwrap_or(0.0);
        if theirs > 0.0 { ours / theirs } else { 0.0 }
    };
    let cpu_ratio = |scenario: &serde_json::Value, key: &str| cpu_of(scenario, "limiter", key);
    let p99_ratio = |scenario: &serde_json::Value, key: &str| {
        let ours = scenario["limiter"]["p99_ms"].as_f64().unwrap_or(0.0);
        let theirs = scenario[key]["p99_ms"].as_f64().unwrap_or(0.0);
        if theirs > 0.0 { ours / theirs } else { 0.0 }
    };
    // What attaching the program costs the allowed path.
    let xdp_ratio = |scenario: &serde_json::Value| {
        let with = scenario["limiter_xdp"]["rps"].as_f64().unwrap_or(0.0);
        let without = scenario["limiter"]["rps"].as_f64().unwrap_or(0.0);
        if without > 0.0 { with / without } else { 0.0 }
    };
    let offered_ratio = |case: &serde_json::Value, ours: &str, theirs: &str| {
        let ours = case[ours]["cpu_us_per_offered"].as_f64().unwrap_or(0.0);
        let theirs = case[theirs]["cpu_us_per_offered"].as_f64().unwrap_or(0.0);
        if theirs > 0.0 { ours / theirs } else { 0.0 }
    };
    let result = json!({
        "machine": machine(),
        "rounds": rounds,
        "seconds": seconds,
        "connections": CONNECTIONS,
        "path": BENCH_PATH,
        "allowed": allowed,
        "rejected": rejected,
        "allowed_veth": allowed_veth,
        "escalation": escalation,
        "tokens": tokens,
        "ratios": {
            "tokens_cpu_vs_post": cpu_of(&tokens, "limiter_tokens", "limiter_post"),
            "allowed_vs_nginx": ratio(&allowed, "nginx"),
            "allowed_vs_haproxy": ratio(&allowed, "haproxy"),
            "rejected_vs_nginx": ratio(&rejected, "nginx"),
            "rejected_vs_haproxy": ratio(&rejected, "haproxy"),
            "allowed_cpu_vs_nginx": cpu_ratio(&allowed, "nginx"),
            "allowed_p99_vs_nginx": p99_ratio(&allowed, "nginx"),
            "allowed_cpu_vs_haproxy": cpu_ratio(&allowed, "haproxy"),
            "rejected_cpu_vs_nginx": cpu_ratio(&rejected, "nginx"),
            "rejected_cpu_vs_haproxy": cpu_ratio(&rejected, "haproxy"),
            "allowed_with_dashboard_vs_without": ratio(&allowed, "limiter_no_dashboard"),
            "allowed_cpu_with_dashboard_vs_without": cpu_ratio(&allowed, "limiter_no_dashboard"),
            "allowed_cpu_vs_tcp_relay": cpu_ratio(&allowed, "tcp_relay"),
            "allowed_cpu_vs_hyper_floor": cpu_ratio(&allowed, "hyper_floor"),
            "hyper_floor_cpu_vs_nginx": cpu_of(&allowed, "hyper_floor", "nginx"),
            "answer_floor_cpu_vs_nginx": cpu_of(&rejected, "answer_floor", "nginx"),
            "rejected_cpu_vs_answer_floor": cpu_ratio(&rejected, "answer_floor"),
            "epoll_floor_cpu_vs_nginx": cpu_of(&rejected, "epoll_floor", "nginx"),
            "rejected_cpu_vs_nginx_by_round": cpu_by_round(&rejected, "limiter", "nginx"),
            "answer_floor_cpu_vs_nginx_by_round": cpu_by_round(&rejected, "answer_floor", "nginx"),
            "epoll_floor_cpu_vs_nginx_by_round": cpu_by_round(&rejected, "epoll_floor", "nginx"),
            "allowed_cpu_vs_nginx_by_round": cpu_by_round(&allowed, "limiter", "nginx"),
            "rejected_cpu_vs_epoll_floor": cpu_ratio(&rejected, "epoll_floor"),
            "http_floor_cpu_vs_nginx": cpu_of(&allowed, "http_floor", "nginx"),
            "allowed_cpu_vs_http_floor": cpu_ratio(&allowed, "http_floor"),
            "epoll_http_floor_cpu_vs_nginx": cpu_of(&allowed, "epoll_http_floor", "nginx"),
            "http_floor_cpu_vs_nginx_by_round": cpu_by_round(&allowed, "http_floor", "nginx"),
            "epoll_http_floor_cpu_vs_nginx_by_round": cpu_by_round(&allowed, "epoll_http_floor", "nginx"),
            "tcp_relay_cpu_vs_nginx": cpu_of(&allowed, "tcp_relay", "nginx"),
            "allowed_veth_vs_nginx": ratio(&allowed_veth, "nginx"),
            "allowed_veth_vs_haproxy": ratio(&allowed_veth, "haproxy"),
            "allowed_veth_cpu_vs_nginx": cpu_ratio(&allowed_veth, "nginx"),
            "allowed_xdp_vs_plain": xdp_ratio(&allowed),
            "allowed_veth_xdp_vs_plain": xdp_ratio(&allowed_veth),
            "escalation_cpu_vs_nginx": offered_ratio(&escalation, "limiter_xdp", "nginx"),
            "escalation_cpu_xdp_vs_plain": offered_ratio(&escalation, "limiter_xdp", "limiter"),
        },
    });
    let path = write_json("proxy", &result);
    print_verdicts(&result);
    println!("{}", path.display());
}

#[cfg(test)]
mod tests {
    #[test]
    fn each_contender_takes_each_place_in_turn() {
        let orders: Vec<Vec<usize>> = (1..=4).map(|r| super::turned(3, r).collect()).collect();
        assert_eq!(orders, [[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 1, 2]]);
    }

    #[test]
    fn the_floor_answer_is_as_long_as_the_limiters() {
        assert_eq!(super::ANSWER_429.len(), 339);
        let body = super::ANSWER_429
            .split(|b| *b == b'\n')
            .next_back()
            .unwrap();
        assert_eq!(body.len(), 118);
    }
}
