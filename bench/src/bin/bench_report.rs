//! `cargo xtask bench` writes `bench/RESULTS.md` and `bench/flood.svg` from the
//! parts' JSON in `target/bench/` with this program: a table per part, the
//! ratios, a verdict per target, the machine and the commands and configs used.
//!
//! Usage: `bench-report TARGET_BENCH_DIR OUT_DIR`.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

use clap::Parser as _;
use limiter_bench::{FLOOD_SCENARIOS, machine};
use serde_json::Value;

/// `RESULTS.md` (and `flood.svg`) from the benchmarks' latest JSON.
#[derive(clap::Parser)]
struct Args {
    /// Where the benchmarks wrote their JSON (`target/bench`).
    #[arg(value_name = "TARGET_BENCH_DIR")]
    bench_dir: PathBuf,
    /// Where the report goes (`bench/`).
    #[arg(value_name = "OUT_DIR")]
    out_dir: PathBuf,
}

fn read(dir: &Path, name: &str) -> Option<Value> {
    let text = std::fs::read_to_string(dir.join(format!("{name}.json"))).ok()?;
    serde_json::from_str(&text).ok()
}

fn f(value: &Value) -> f64 {
    value.as_f64().unwrap_or(0.0)
}

fn verdict(ok: bool) -> &'static str {
    if ok { "**meets**" } else { "**misses**" }
}

fn xdp_section(out: &mut String, xdp: &Value) {
    let _ = writeln!(out, "## xdp: cost per packet (`BPF_PROG_TEST_RUN`)\n");
    let _ = writeln!(out, "| case | ns/packet | × trivial |\n|---|---:|---:|");
    let mut known = 0.0;
    let mut non_api = 0.0;
    for case in xdp["cases"].as_array().into_iter().flatten() {
        let name = case["name"].as_str().unwrap_or("?");
        let ratio = f(&case["ratio"]);
        match name {
            "api_known_source" => known = ratio,
            "non_api" => non_api = ratio,
            _ => {}
        }
        let _ = writeln!(out, "| {name} | {:.1} | {ratio:.2} |", f(&case["ns"]));
    }
    let _ = writeln!(
        out,
        "\n- API packet of a known source ≤ 3× trivial (goal 2.5×): {known:.2}× — {}\n- non-API packet ≤ 1.5× trivial: {non_api:.2}× — {}",
        verdict(known > 0.0 && known <= 3.0),
        verdict(non_api > 0.0 && non_api <= 1.5)
    );
    let _ = writeln!(
        out,
        "\nCommand: `cargo xtask bench xdp` ({} rounds × {} packets, median; see `target/bench/xdp.json`).\n",
        xdp["rounds"], xdp["repeat"]
    );
}

/// A CPU-per-request figure, or a dash where it was not measured.
fn cpu_cell(v: &Value) -> String {
    if v.is_null() || f(v) == 0.0 {
        "–".to_owned()
    } else {
        format!("{:.1}", f(v))
    }
}

/// The verdict lines of the escalation case and the deployed placement.
fn placement_and_escalation_verdicts(out: &mut String, proxy: &Value) {
    if !proxy["escalation"].is_null() {
        let e = f(&proxy["ratios"]["escalation_cpu_vs_nginx"]);
        // Zero is a result (banned, the client costs nothing measurable);
        // nginx's side of the ratio is what must be there.
        let nginx = f(&proxy["escalation"]["nginx"]["cpu_us_per_offered"]);
        let _ = writeln!(
            out,
            "- over-limit client at a fixed offered rate, CPU per offered request with XDP \
             escalation ≤ 0.5× nginx's: {e:.3}× — {} ({:.3}× the limiter's without XDP)\n",
            verdict(nginx > 0.0 && e <= 0.5),
            f(&proxy["ratios"]["escalation_cpu_xdp_vs_plain"])
        );
    }
    if !proxy["allowed_veth"].is_null() {
        let _ = writeln!(
            out,
            "- as deployed (`allowed_veth`: wrk in a namespace over a veth, XDP native on the \
             host's end): limiter {:.2}× nginx, {:.2}× `HAProxy`, CPU per request {:.2}× nginx's; \
             with the program attached the allowed path runs at {:.2}× its speed without there, \
             {:.2}× on `lo` (generic mode, where the upstream leg crosses it too)\n",
            f(&proxy["ratios"]["allowed_veth_vs_nginx"]),
            f(&proxy["ratios"]["allowed_veth_vs_haproxy"]),
            f(&proxy["ratios"]["allowed_veth_cpu_vs_nginx"]),
            f(&proxy["ratios"]["allowed_veth_xdp_vs_plain"]),
            f(&proxy["ratios"]["allowed_xdp_vs_plain"])
        );
    }
}

/// The over-limit client at a fixed offered rate.
fn escalation_table(out: &mut String, escalation: &Value) {
    if escalation.is_null() {
        return;
    }
    let _ = writeln!(
        out,
        "### escalation (one client far over its limit, fixed offered rate)\n\n| contender | offered | offered/s | answered | 429s | CPU µs per offered | process µs per offered |\n|---|---:|---:|---:|---:|---:|---:|"
    );
    for contender in ["limiter", "limiter_xdp", "nginx"] {
        let c = &escalation[contender];
        if c.is_null() {
            continue;
        }
        let _ = writeln!(
            out,
            "| {contender} | {:.0} | {:.0} | {:.0} | {:.0} | {:.3} | {:.3} |",
            f(&c["offered"]),
            f(&c["offered_per_second"]),
            f(&c["answered"]),
            f(&c["rejected_429"]),
            f(&c["cpu_us_per_offered"]),
            f(&c["process_cpu_us_per_offered"])
        );
    }
    let kernel = &escalation["limiter_xdp"]["kernel"];
    if !kernel.is_null() {
        let _ = writeln!(
            out,
            "\nlimiter_xdp: {} packets dropped in the kernel, {} escalation ban(s). The load is open \
             loop (8 connections, requests pipelined on a schedule): a request a banned \
             connection's full socket will not take is still offered.",
            f(&kernel["dropped_packets"]),
            f(&kernel["escalations"])
        );
    }
    let _ = writeln!(out);
}

/// The token scenario: a chat completion `POST` with and without a token
/// budget on its tier, and a stream's first event through the agent.
fn tokens_table(out: &mut String, proxy: &Value) {
    let tokens = &proxy["tokens"];
    if tokens.is_null() {
        return;
    }
    let _ = writeln!(
        out,
        "### tokens (`POST` a chat completion; the upstream answers with a usage)\n\n| contender | req/s | p50 ms | p99 ms | non-2xx | errors | CPU µs/req | process µs/req |\n|---|---:|---:|---:|---:|---:|---:|---:|"
    );
    for contender in ["limiter_post", "limiter_tokens"] {
        let c = &tokens[contender];
        let _ = writeln!(
            out,
            "| {contender} | {:.0} | {:.2} | {:.2} | {} | {} | {} | {} |",
            f(&c["rps"]),
            f(&c["p50_ms"]),
            f(&c["p99_ms"]),
            c["non_2xx"],
            c["errors"],
            cpu_cell(&c["cpu_us_per_request"]),
            cpu_cell(&c["process_cpu_us_per_request"])
        );
    }
    let first = &tokens["first_event_ms"];
    let added = f(&first["added"]);
    let _ = writeln!(
        out,
        "\n- a token budget on the tier (`limiter_tokens`, the body read and parsed, the \
         reservation, the answer read for its usage, the settlement) costs {:.2}× the CPU per \
         request of the same `POST` without one (`limiter_post`)\n\
         - a stream's first event, median: {:.3} ms through a metered tier, {:.3} ms direct \
         (+{added:.3} ms), within 1 ms of direct — {}\n",
        f(&proxy["ratios"]["tokens_cpu_vs_post"]),
        f(&first["through_agent"]),
        f(&first["direct"]),
        verdict(added <= 1.0)
    );
}

fn proxy_section(out: &mut String, proxy: &Value) {
    let _ = writeln!(out, "## proxy: wrk through each contender\n");
    for scenario in ["allowed", "rejected", "allowed_veth"] {
        let s = &proxy[scenario];
        if s.is_null() {
            continue;
        }
        let nginx = f(&s["nginx"]["rps"]);
        let _ = writeln!(
            out,
            "### {scenario}\n\n| contender | req/s | p50 ms | p99 ms | non-2xx | errors | × nginx | CPU µs/req | process µs/req |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for contender in [
            "limiter",
            "limiter_xdp",
            "limiter_no_dashboard",
            "nginx",
            "haproxy",
            "tcp_relay",
            "http_floor",
            "epoll_http_floor",
            "hyper_floor",
            "answer_floor",
            "epoll_floor",
            "direct",
        ] {
            let c = &s[contender];
            if c.is_null() {
                continue;
            }
            let ratio = if nginx > 0.0 {
                f(&c["rps"]) / nginx
            } else {
                0.0
            };
            let _ = writeln!(
                out,
                "| {contender} | {:.0} | {:.2} | {:.2} | {} | {} | {ratio:.2} | {} | {} |",
                f(&c["rps"]),
                f(&c["p50_ms"]),
                f(&c["p99_ms"]),
                c["non_2xx"],
                c["errors"],
                cpu_cell(&c["cpu_us_per_request"]),
                cpu_cell(&c["process_cpu_us_per_request"])
            );
        }
        let kernel = &s["limiter_xdp"]["kernel"];
        if !kernel.is_null() {
            let _ = writeln!(
                out,
                "\nlimiter_xdp: {} packets dropped in the kernel, {} escalation ban(s).",
                f(&kernel["dropped_packets"]),
                f(&kernel["escalations"])
            );
        }
        let _ = writeln!(out);
    }
    escalation_table(out, &proxy["escalation"]);
    tokens_table(out, proxy);
    proxy_verdicts(out, proxy);
    floor_lines(out, proxy);
    let _ = writeln!(out);
    placement_and_escalation_verdicts(out, proxy);
    let _ = writeln!(
        out,
        "Command: `cargo xtask bench proxy` ({} rounds of {} s, {} connections, `GET {}`). \
         Each contender is pinned to CPU 1 with one worker; wrk and the static upstream (nginx) \
         share CPU 0. Each round starts with the next contender, and each measured run follows \
         an unmeasured second against the same contender. CPU µs/req: busy time of CPU 1 (from `/proc/stat`, so the kernel's work \
         there counts; steal time does not) over the run, per answered request; process µs/req: the contender's own \
         user + system time (`/proc/<pid>/stat`, workers included). Configs: \
         [`bench/configs/`](configs/).\n",
        proxy["rounds"],
        proxy["seconds"],
        proxy["connections"],
        proxy["path"].as_str().unwrap_or("")
    );
}

/// The allowed path's floor without a runtime, against `http_floor` and the
/// target.
fn epoll_http_line(out: &mut String, proxy: &Value) {
    let epoll_http = &proxy["ratios"]["epoll_http_floor_cpu_vs_nginx"];
    if f(epoll_http) > 0.0 {
        let cpu = |c: &str| f(&proxy["allowed"][c]["cpu_us_per_request"]);
        let room = 0.85 * cpu("nginx") - cpu("epoll_http_floor");
        let runtime = cpu("http_floor") - cpu("epoll_http_floor");
        let runtime = if runtime >= 0.0 {
            format!(
                "what the runtime adds to a relayed request in this run (`http_floor` less \
                 `epoll_http_floor`) is {runtime:.1} µs"
            )
        } else {
            format!(
                "in this run it measured {:.1} µs a request above `http_floor`, the same work on \
                 the runtime: the median runs came from rounds apart, and the difference is \
                 below this run's noise",
                -runtime
            )
        };
        let _ = writeln!(
            out,
            "- the same relay as `http_floor` from a loop on `epoll` with no runtime \
             (`epoll_http_floor`) {:.2}× nginx's CPU per request: {runtime}. The 0.85× target \
             leaves {room:.1} µs per request above it for the runtime and everything the \
             limiter does",
            f(epoll_http)
        );
    } else if !proxy["allowed"].is_null() {
        let _ = writeln!(out, "- `epoll_http_floor`: not measured in this run");
    }
}

/// The floors measured beside the contenders, against nginx and the limiter.
fn floor_lines(out: &mut String, proxy: &Value) {
    let relay = &proxy["ratios"]["tcp_relay_cpu_vs_nginx"];
    if !relay.is_null() {
        let _ = writeln!(
            out,
            "- the floors of the allowed path, CPU per request against nginx's: `tcp_relay` \
             (bytes relayed on the same runtime, no HTTP) {:.2}×, `http_floor` (heads parsed by \
             httparse and relayed as they came, nothing else) {:.2}×, `hyper_floor` (hyper's \
             HTTP/1 server and client, nothing else) {:.2}×; the limiter spends {:.2}× the \
             relay's, {:.2}× the least HTTP-aware relay's and {:.2}× hyper's alone",
            f(relay),
            f(&proxy["ratios"]["http_floor_cpu_vs_nginx"]),
            f(&proxy["ratios"]["hyper_floor_cpu_vs_nginx"]),
            f(&proxy["ratios"]["allowed_cpu_vs_tcp_relay"]),
            f(&proxy["ratios"]["allowed_cpu_vs_http_floor"]),
            f(&proxy["ratios"]["allowed_cpu_vs_hyper_floor"])
        );
    }
    epoll_http_line(out, proxy);
    let answer = &proxy["ratios"]["answer_floor_cpu_vs_nginx"];
    if !answer.is_null() {
        let _ = writeln!(
            out,
            "- the floor of the 429 path: `answer_floor` (the limiter's 429, pre-rendered, sent \
             for each request read: one receive and one send, nothing else) {:.2}× nginx's CPU \
             per request; the limiter spends {:.2}× it",
            f(answer),
            f(&proxy["ratios"]["rejected_cpu_vs_answer_floor"])
        );
    }
    let epoll = &proxy["ratios"]["epoll_floor_cpu_vs_nginx"];
    if f(epoll) > 0.0 {
        let cpu = |c: &str| f(&proxy["rejected"][c]["cpu_us_per_request"]);
        let room = 0.7 * cpu("nginx") - cpu("epoll_floor");
        let room = if room > 0.0 {
            format!(
                "The 0.7× target leaves {room:.1} µs per 429 above it for the runtime and \
                 everything the limiter does (parse, route, decide, count, write the answer)"
            )
        } else {
            format!("The 0.7× target is {:.1} µs per 429 below it", -room)
        };
        let _ = writeln!(
            out,
            "- the same 429 from a loop on `epoll` with no runtime (`epoll_floor`: one receive \
             and one send per request and nothing else, on `lo`) {:.2}× nginx's CPU per request; \
             the limiter spends {:.2}× it. {room}; what the runtime adds to the same answer in \
             this run (`answer_floor` less `epoll_floor`) is {:.1} µs",
            f(epoll),
            f(&proxy["ratios"]["rejected_cpu_vs_epoll_floor"]),
            cpu("answer_floor") - cpu("epoll_floor")
        );
    } else if !proxy["rejected"].is_null() {
        let _ = writeln!(out, "- `epoll_floor`: not measured in this run");
    }
    let rounds = |key: &str| {
        let r = &proxy["ratios"][key];
        format!(
            "{:.2}× ({:.2}–{:.2})",
            f(&r["median"]),
            f(&r["min"]),
            f(&r["max"])
        )
    };
    if !proxy["ratios"]["epoll_floor_cpu_vs_nginx_by_round"].is_null() {
        let _ = writeln!(
            out,
            "- within each round (every contender of a round runs minutes apart), CPU per \
             request against nginx's, median (least–most) over the rounds: allowed, the limiter \
             {}{}; rejected, the limiter {}, `answer_floor` {}, `epoll_floor` {}",
            rounds("allowed_cpu_vs_nginx_by_round"),
            if f(&proxy["ratios"]["epoll_http_floor_cpu_vs_nginx_by_round"]["median"]) <= 0.0 {
                String::new()
            } else {
                format!(
                    ", `http_floor` {}, `epoll_http_floor` {}",
                    rounds("http_floor_cpu_vs_nginx_by_round"),
                    rounds("epoll_http_floor_cpu_vs_nginx_by_round")
                )
            },
            rounds("rejected_cpu_vs_nginx_by_round"),
            rounds("answer_floor_cpu_vs_nginx_by_round"),
            rounds("epoll_floor_cpu_vs_nginx_by_round")
        );
    }
}

/// The proxy's lines against the design's targets.
fn proxy_verdicts(out: &mut String, proxy: &Value) {
    let allowed = f(&proxy["ratios"]["allowed_vs_nginx"]);
    let rejected = f(&proxy["ratios"]["rejected_vs_nginx"]);
    let allowed_cpu = f(&proxy["ratios"]["allowed_cpu_vs_nginx"]);
    let allowed_p99 = f(&proxy["ratios"]["allowed_p99_vs_nginx"]);
    let rejected_cpu = f(&proxy["ratios"]["rejected_cpu_vs_nginx"]);
    let _ = writeln!(
        out,
        "- allowed path, CPU per request ≤ 0.85× nginx's (goal 0.75×): {allowed_cpu:.2}× — {}\n\
         - allowed path, limiter ≥ 1.0× nginx's req/s: {allowed:.2}× — {}\n\
         - allowed path, p99 ≤ nginx's: {allowed_p99:.2}× — {}\n\
         - rejected path, CPU per request ≤ 0.7× nginx's: {rejected_cpu:.2}× — {} \
         (req/s {rejected:.2}× nginx's)\n\
         - the dashboard's sampler (limiter vs limiter_no_dashboard, allowed path): {:.2}× the \
         throughput, {:.2}× the CPU per request\n",
        verdict(allowed_cpu > 0.0 && allowed_cpu <= 0.85),
        verdict(allowed >= 1.0),
        verdict(allowed_p99 > 0.0 && allowed_p99 <= 1.0),
        verdict(rejected_cpu > 0.0 && rejected_cpu <= 0.7),
        f(&proxy["ratios"]["allowed_with_dashboard_vs_without"]),
        f(&proxy["ratios"]["allowed_cpu_with_dashboard_vs_without"])
    );
}

fn flood_section(out: &mut String, flood: &Value) {
    let _ = writeln!(
        out,
        "## flood: a legitimate client while another source floods\n"
    );
    let _ = writeln!(
        out,
        "| scenario | legit req/s | legit p99 ms | × baseline | attacker pps | XDP dropped pps | softirq ns per attack packet |\n|---|---:|---:|---:|---:|---:|---:|"
    );
    let baseline = f(&flood["baseline"]["legit_rps"]);
    for scenario in FLOOD_SCENARIOS {
        let s = &flood[scenario];
        let ratio = if baseline > 0.0 {
            f(&s["legit_rps"]) / baseline
        } else {
            0.0
        };
        let dash = |v: &Value| {
            if v.is_null() {
                "–".to_owned()
            } else {
                format!("{:.0}", f(v))
            }
        };
        let _ = writeln!(
            out,
            "| {scenario} | {:.0} | {:.2} | {ratio:.2} | {} | {} | {} |",
            f(&s["legit_rps"]),
            f(&s["legit_p99_ms"]),
            dash(&s["attacker_pps"]),
            dash(&s["dropped_pps"]),
            dash(&s["softirq_ns_per_attack_packet"])
        );
    }
    let with_xdp = f(&flood["ratios_to_baseline"]["with_xdp"]);
    let protection = f(&flood["ratios_to_baseline"]["protection_ratio"]);
    let _ = writeln!(
        out,
        "\n![legit throughput under flood](flood.svg)\n\n- with XDP, legit ≥ 0.9× baseline: {with_xdp:.2}× — {}\n\
         - protection ratio (with XDP ÷ attacker busy with nothing received) ≥ 0.9: {protection:.2} — {}\n",
        verdict(with_xdp >= 0.9),
        verdict(protection >= 0.9)
    );
    let _ = writeln!(
        out,
        "Command: `cargo xtask bench flood` ({} rounds of {} s). The client runs wrk (8 keep-alive \
         connections, CPU 0) in its namespace; the attacker sends SYNs to the API port from one \
         thread (CPU 1) through an `AF_PACKET` socket on its veth; the agent runs unpinned in the \
         host namespace with the demo upstream. SYN ceiling {} per source per second for both \
         XDP and `iptables -A INPUT -p tcp --dport 8080 --syn -m hashlimit --hashlimit-above {}/sec \
         --hashlimit-burst {} --hashlimit-mode srcip -j DROP`. A veth delivers in the sender's \
         context, so what the host spends on each flood packet also slows the attacker: its \
         rate is part of the result. `attacker_busy_control` is the control for the attacker's \
         own CPU: the same sender thread (a busy loop on CPU 1, as in every scenario), its \
         packets dropped in its own veth's transmit path (the host's end of the link is down), \
         so the host receives nothing. \
         Softirq ns per attack packet: softirq time of every CPU (`/proc/stat`) over the flood, \
         divided by the packets sent.\n",
        flood["rounds"],
        flood["seconds"],
        flood["syn_ceiling"],
        flood["syn_ceiling"],
        flood["syn_ceiling"]
    );
    new_clients_section(out, &flood["new_clients_under_spoofed_flood"]);
}

fn new_clients_section(out: &mut String, new_clients: &Value) {
    if new_clients.is_null() {
        return;
    }
    let _ = writeln!(
        out,
        "### New clients during a spoofed flood

| | attempts | connected | served | connect p50 ms | connect p99 ms | no-flood p99 ms | flood pps | flood entries in the map |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for (key, label) in [
        ("with_cookies", "SYN challenge on"),
        ("without_cookies", "SYN challenge off"),
    ] {
        let s = &new_clients[key];
        let _ = writeln!(
            out,
            "| {label} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {:.0} | {:.0} |",
            f(&s["attempts"]),
            f(&s["connected"]),
            f(&s["served"]),
            f(&s["connect_p50_ms"]),
            f(&s["connect_p99_ms"]),
            f(&s["no_flood_connect_p99_ms"]),
            f(&s["flood_pps"]),
            f(&s["map_entries_created_by_flood"])
        );
    }
    let on = &new_clients["with_cookies"];
    let served = f(&on["served"]) / f(&on["attempts"]).max(1.0);
    let _ = writeln!(
        out,
        "\n- with the challenge, new clients served ≥ 99 %: {:.0} % — {}\n\n\
         Clients from addresses the program has never seen connect, ten at a time with a 1.5 s \
         timeout each, while one thread floods SYNs from ever-new spoofed addresses (more than \
         the 131,072-entry map holds); flood and clients on CPU 0, so the clients meet the \
         budget the flood spends, as on a NIC whose every queue it reaches. A challenged client \
         pays one SYN retransmission (Linux sends it two jiffies after the challenge).\n",
        served * 100.0,
        verdict(served >= 0.99)
    );
}

fn memory_section(out: &mut String, memory: &Value) {
    let per = f(&memory["bytes_per_bucket"]);
    let _ = writeln!(
        out,
        "## memory: in-memory store\n\n| algorithm | live buckets | RSS before | RSS after | bytes per bucket |\n|---|---:|---:|---:|---:|"
    );
    let algorithms = memory["algorithms"].as_object();
    let rows: Vec<(&str, &Value)> = match algorithms {
        Some(all) => ["fixed", "gcra", "sliding"]
            .iter()
            .filter_map(|name| all.get(*name).map(|v| (*name, v)))
            .collect(),
        None => vec![("fixed", memory)],
    };
    for (name, m) in rows {
        let _ = writeln!(
            out,
            "| {name} | {:.0} | {:.1} MiB | {:.1} MiB | {:.1} |",
            f(&m["buckets"]),
            f(&m["rss_before_bytes"]) / 1_048_576.0,
            f(&m["rss_after_bytes"]) / 1_048_576.0,
            f(&m["bytes_per_bucket"]),
        );
    }
    let _ = writeln!(
        out,
        "\n- ≤ 64 bytes per live bucket: {per:.1} — {}",
        verdict(per <= 64.0)
    );
    if algorithms.is_some() {
        let ratio = f(&memory["gcra_vs_fixed"]);
        let _ = writeln!(
            out,
            "- GCRA costs no more per live bucket than the fixed window: {ratio:.2}× — {}",
            verdict(ratio <= 1.05)
        );
    }
    let _ = writeln!(
        out,
        "\nCommand: `cargo xtask bench memory`: requests with distinct API keys (one bucket each) \
         over 8 pipelined keep-alive connections, one agent per algorithm in turn (a tier of 2 \
         an hour, so every bucket stays live through the fill); RSS of the agent after a \
         20,000-bucket warm-up and after the fill. A sliding window's bucket takes a slot per \
         slice it counts in: one here, up to 21 for a client busy all window.\n"
    );
}

fn boundary_section(out: &mut String, boundary: &Value) {
    let limit = f(&boundary["limit"]);
    let window = f(&boundary["window_seconds"]);
    let delta = f(&boundary["delta_ms"]);
    let _ = writeln!(
        out,
        "## boundary: a burst at a fixed window's edge\n\n\
         One request opens the window of each tier ({limit:.0} per {window:.0} s); {limit:.0} \
         come {delta:.0} ms before the fixed window ends and {limit:.0} more {delta:.0} ms after.\n\n\
         | algorithm | admitted before | admitted after | of the {:.0} | bound |\n|---|---:|---:|---:|---|",
        2.0 * limit
    );
    let rate_back = (2.0 * delta / 1000.0 * limit / window).floor();
    for (name, bound) in [
        ("fixed", format!("2 × limit − 1 = {:.0}", 2.0 * limit - 1.0)),
        (
            "sliding",
            format!("limit in any window: {limit:.0} (the opening request is in the window)"),
        ),
        (
            "gcra",
            format!(
                "burst + rate × {:.0} ms = {:.0}",
                2.0 * delta,
                limit + rate_back
            ),
        ),
    ] {
        let a = &boundary["algorithms"][name];
        let (before, after) = (f(&a["before"]), f(&a["after"]));
        let _ = writeln!(
            out,
            "| {name} | {before:.0} | {after:.0} | **{:.0}** | {bound} |",
            before + after
        );
    }
    let _ = writeln!(
        out,
        "\nCommand: `cargo xtask bench boundary`: the agent with the in-memory store on the real \
         clock; each batch pipelined on one keep-alive connection. See `docs/algorithms.md` for \
         the bounds.\n"
    );
}

fn chaos_section(out: &mut String, chaos: &Value) {
    let _ = writeln!(
        out,
        "## chaos: three agents sharing a store, under faults\n\n\
         Three agents in network namespaces share Redis (append-only, fsync always) or a Redis \
         Cluster of three primaries with a replica each; clients spread over the agents, every \
         request recorded; faults in turn, each followed by quiet time. The tier is a sliding \
         window, so the checker can hold any set of admitted requests sent and answered within \
         one window to the bound `docs/fleet.md` states: the limit while every agent reaches the \
         store, the limit × (1 + agents on their local store) under `on_error = \"allow\"`, the \
         limit at all times under `\"deny\"`. \"Converged\" is the time from the fault's end \
         until every agent lists an override and a ban made during it (or, when the store took \
         no change then, right after).\n\n\
         Checker: **{}**.\n",
        if chaos["ok"] == true {
            "every history within its bounds"
        } else {
            "a bound was exceeded"
        }
    );
    for run in chaos["runs"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "### {} with `on_error = \"{}\"`: {} requests, {} admitted, largest in a window with the store {} (limit {})\n\n\
             | fault | s | requests | admitted | 429 | 503 | unanswered | largest in a window | bound | converged ms |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            run["store"].as_str().unwrap_or("?"),
            run["on_error"].as_str().unwrap_or("?"),
            run["requests"],
            run["admitted"],
            run["largest_in_a_window_with_the_store"],
            run["limit"],
        );
        for fault in run["faults"].as_array().into_iter().flatten() {
            let converged = fault["converged_ms"]
                .as_f64()
                .map_or_else(|| "**never**".to_owned(), |ms| format!("{ms:.0}"));
            let _ = writeln!(
                out,
                "| {} | {:.1} | {} | {} | {} | {} | {} | **{}** | {} | {converged} |",
                fault["fault"].as_str().unwrap_or("?"),
                f(&fault["seconds"]),
                fault["requests"],
                fault["admitted"],
                fault["limited"],
                fault["refused_503"],
                fault["unanswered"],
                fault["largest_in_a_window"],
                fault["bound"],
            );
        }
        let _ = writeln!(out);
    }
    let _ = writeln!(
        out,
        "Command: `cargo xtask chaos` (`tests/src/chaos.rs`, `tests/src/bin/chaos.rs`; a \
         shorter run is part of `cargo xtask test`). Unanswered requests went to an agent that \
         was down.\n"
    );
}

fn redis_section(out: &mut String, redis: &Value) {
    let _ = writeln!(
        out,
        "## redis: shared store\n\n| case | store | decisions | decisions/s | p50 µs | p99 µs | errors |\n|---|---|---:|---:|---:|---:|---:|"
    );
    let mut errors = 0.0;
    for (case, what) in [
        ("latency", "one at a time"),
        ("throughput", "under load"),
        ("rejected", "over the limit"),
    ] {
        for store in ["memory", "redis"] {
            let v = &redis[case][store];
            errors += f(&v["errors"]);
            let rate = if v["decisions_per_second"].is_null() {
                "–".to_owned()
            } else {
                format!("{:.0}", f(&v["decisions_per_second"]))
            };
            let _ = writeln!(
                out,
                "| {case} ({what}) | {store} | {:.0} | {rate} | {:.1} | {:.1} | {:.0} |",
                f(&v["decisions"]),
                f(&v["p50_us"]),
                f(&v["p99_us"]),
                f(&v["errors"])
            );
        }
    }
    let added_p99 = f(&redis["added_latency_us"]["p99"]);
    let _ = writeln!(
        out,
        "\n- Redis adds ≤ 1 ms at p99 per decision (one at a time, same host): {added_p99:.0} µs \
         (p50 {:.0} µs) — {}\n- no store errors in any case: {errors:.0} — {}\n\n\
         Command: `cargo xtask bench redis`: {} buckets, {} concurrent decisions, {} s per case, \
         against a `redis-server` started by the bench.\n",
        f(&redis["added_latency_us"]["p50"]),
        verdict(added_p99 > 0.0 && added_p99 <= 1000.0),
        verdict(errors == 0.0),
        redis["buckets"],
        redis["concurrency"],
        redis["seconds"]
    );
}

fn rls_section(out: &mut String, rls: &Value) {
    let _ = writeln!(
        out,
        "## rls: Envoy's rate limit service\n\n| case | decisions | decisions/s | p50 µs | p99 µs | server CPU µs/decision | not OK |\n|---|---:|---:|---:|---:|---:|---:|"
    );
    let mut not_ok = 0.0;
    for (case, what) in [
        ("floor", "gRPC floor: answers OK, decides nothing"),
        ("memory", "agent, in-memory store"),
        ("redis", "agent, Redis store"),
    ] {
        let v = &rls[case];
        not_ok += f(&v["not_ok"]);
        let _ = writeln!(
            out,
            "| {case} ({what}) | {:.0} | {:.0} | {:.1} | {:.1} | {:.1} | {:.0} |",
            f(&v["decisions"]),
            f(&v["decisions_per_second"]),
            f(&v["p50_us"]),
            f(&v["p99_us"]),
            f(&v["server_cpu_us_per_decision"]),
            f(&v["not_ok"])
        );
    }
    let _ = writeln!(
        out,
        "\n- in-memory store at {:.2}× the floor's decisions/s; Redis at {:.2}× the in-memory \
         store's (the client shares the 2 cores: compare the server CPU per decision)\n\
         - every call answered OK (all under their limit): {not_ok:.0} not OK — {}\n\n\
         Command: `cargo xtask bench rls`: {} streams in flight ({} per HTTP/2 connection), \
         {} s per case, {} client addresses under their limit, the `redis-server` started by \
         the bench; the floor is a server of the same stack that answers OK deciding nothing.\n",
        f(&rls["memory_vs_floor"]),
        f(&rls["redis_vs_memory"]),
        verdict(not_ok == 0.0),
        rls["concurrency"],
        16,
        rls["seconds"],
        rls["clients"]
    );
}

/// A bar chart of the client's throughput per flood scenario.
fn flood_svg(flood: &Value) -> String {
    let scenarios = [
        ("baseline", "no flood"),
        ("no_protection", "no protection"),
        ("iptables_hashlimit", "iptables hashlimit"),
        ("with_xdp", "XDP"),
        ("attacker_busy_control", "attacker busy, nothing sent"),
    ];
    let max = scenarios
        .iter()
        .map(|(s, _)| f(&flood[*s]["legit_rps"]))
        .fold(1.0, f64::max);
    let (width, bar_h, gap, left) = (640.0, 36.0, 16.0, 150.0);
    let height = 60.0 + (bar_h + gap) * 4.0;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"13\">\n\
         <text x=\"10\" y=\"22\" font-size=\"15\">Legitimate client under a SYN flood (req/s, higher is better)</text>\n"
    );
    for (i, (key, label)) in scenarios.iter().enumerate() {
        let rps = f(&flood[*key]["legit_rps"]);
        #[expect(clippy::cast_precision_loss, reason = "four rows")]
        let y = 40.0 + (bar_h + gap) * i as f64;
        let w = (width - left - 90.0) * rps / max;
        let color = if *key == "with_xdp" {
            "#2b8a3e"
        } else {
            "#868e96"
        };
        let _ = writeln!(
            svg,
            "<text x=\"10\" y=\"{:.0}\">{label}</text>\n<rect x=\"{left}\" y=\"{y:.0}\" width=\"{w:.0}\" height=\"{bar_h}\" fill=\"{color}\"/>\n<text x=\"{:.0}\" y=\"{:.0}\">{rps:.0}</text>",
            y + bar_h * 0.65,
            left + w + 6.0,
            y + bar_h * 0.65
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn main() {
    let Args { bench_dir, out_dir } = Args::parse();
    let (bench_dir, out_dir) = (bench_dir.as_path(), out_dir.as_path());
    std::fs::create_dir_all(out_dir).expect("output directory");
    let machine = ["proxy", "flood", "memory"]
        .iter()
        .find_map(|p| read(bench_dir, p).and_then(|v| v["machine"].as_str().map(str::to_owned)))
        .unwrap_or_else(machine);
    let mut out = format!(
        "# Benchmark results\n\nProduced by `cargo xtask bench` (this file is written by it). \
         Machine: {machine}. Every number is a median over interleaved rounds on a shared, \
         noisy 2-core machine: compare the ratios, measured in the same run, more than the \
         absolute values.\n\n"
    );
    if let Some(xdp) = read(bench_dir, "xdp") {
        xdp_section(&mut out, &xdp);
    }
    if let Some(proxy) = read(bench_dir, "proxy") {
        proxy_section(&mut out, &proxy);
    }
    if let Some(flood) = read(bench_dir, "flood") {
        flood_section(&mut out, &flood);
        std::fs::write(out_dir.join("flood.svg"), flood_svg(&flood)).expect("flood.svg");
    }
    if let Some(memory) = read(bench_dir, "memory") {
        memory_section(&mut out, &memory);
    }
    if let Some(redis) = read(bench_dir, "redis") {
        redis_section(&mut out, &redis);
    }
    if let Some(rls) = read(bench_dir, "rls") {
        rls_section(&mut out, &rls);
    }
    if let Some(boundary) = read(bench_dir, "boundary") {
        boundary_section(&mut out, &boundary);
    }
    if let Some(chaos) = read(bench_dir, "chaos") {
        chaos_section(&mut out, &chaos);
    }
    let path = out_dir.join("RESULTS.md");
    std::fs::write(&path, out).expect("RESULTS.md");
    println!("{}", path.display());
}
