//! `cargo xtask bench flood`: a legitimate client's throughput and p99 through
//! the agent while an attacker namespace floods the API port with SYNs as fast
//! as one thread can, under: no flood (baseline), no kernel protection, an
//! iptables `hashlimit` rule with the same SYN ceiling, and the XDP program.
//!
//! Topology as in the kernel tests (`limiter_tests::netns`): the agent runs in
//! a host namespace with the demo upstream, the client (wrk, keep-alive, pinned
//! to CPU 0) and the attacker (pinned to CPU 1) in their own namespaces.
//!
//! Then new clients under a spoofed flood: clients from never-seen addresses
//! connect while the attacker floods from ever-new spoofed sources (more than
//! the per-source map holds), with the SYN challenge on and off, in the same
//! run (`limiter_tests::newcomers`).
//!
//! Usage: `flood-bench [--seconds S] [--rounds N] [--clients C]`; writes
//! `target/bench/flood.json`.

use std::{net::Ipv4Addr, time::Duration};

use clap::Parser as _;
use limiter_bench::{
    BENCH_PATH, FLOOD_SCENARIOS, WrkResult, machine, median_run, softirq_ticks, ticks_to_us,
    write_json, wrk,
};
use limiter_tests::{
    netns::{self, API_PORT, HOST_ATTACKER_IF, HOST_CLIENT_ADDR, Topology, dropped, syn_flood_for},
    newcomers::{self, RxNapi},
};
use serde_json::json;

/// A legitimate client's throughput under a SYN flood, per protection, and
/// new clients under a spoofed flood.
#[derive(clap::Parser)]
struct Args {
    /// Seconds of each measured client run.
    #[arg(long, value_name = "S", default_value_t = 8)]
    seconds: u32,
    /// Interleaved rounds of every scenario; the median round is reported.
    #[arg(long, value_name = "N", default_value_t = 3)]
    rounds: u32,
    /// New clients that connect under the spoofed flood.
    #[arg(long, value_name = "C", default_value_t = 100)]
    clients: u32,
}

/// The SYN ceiling every protection uses (per source, per second).
const SYN_CEILING: u32 = 200;

fn config(xdp: bool) -> String {
    netns::config(
        BENCH_PATH,
        1_000_000_000,
        &format!("enabled = {xdp}\nmax_syns_per_second = {SYN_CEILING}"),
    )
}

struct Outcome {
    legit: WrkResult,
    attacker_pps: f64,
    dropped_pps: f64,
    /// Softirq time of every CPU per attack packet sent, in ns.
    softirq_ns_per_attack_packet: f64,
}

fn run(scenario: &str, seconds: u32) -> Outcome {
    let topology = Topology::new();
    let xdp = matches!(scenario, "with_xdp" | "attacker_busy_control");
    let _agent = topology.agent(&config(xdp), if xdp { &[] } else { &["--no-xdp"] });
    if scenario == "attacker_busy_control" {
        // The attacker sends as before, and its packets are dropped in its own
        // veth's transmit path (the host's end of the link is down): it costs
        // its CPU, the host receives nothing.
        netns::ip(&[
            "-n",
            &topology.host.name,
            "link",
            "set",
            HOST_ATTACKER_IF,
            "down",
        ]);
    }
    if scenario == "iptables_hashlimit" {
        let _ = topology.host.output(
            "iptables",
            &[
                "-A",
                "INPUT",
                "-p",
                "tcp",
                "--dport",
                &API_PORT.to_string(),
                "--syn",
                "-m",
                "hashlimit",
                "--hashlimit-above",
                &format!("{SYN_CEILING}/sec"),
                "--hashlimit-burst",
                &SYN_CEILING.to_string(),
                "--hashlimit-mode",
                "srcip",
                "--hashlimit-name",
                "limiter_bench",
                "-j",
                "DROP",
            ],
        );
    }
    let softirq_before = softirq_ticks();
    let flood = (scenario != "baseline").then(|| {
        // The flood outlasts the client's run on both ends.
        let duration = Duration::from_secs(u64::from(seconds) + 2);
        topology.flood_thread(Some(1), move |host, attacker| {
            syn_flood_for(host, attacker, duration)
        })
    });
    if flood.is_some() {
        std::thread::sleep(Duration::from_millis(500));
    }
    let drops_before = if xdp { dropped(&topology.status()) } else { 0 };
    let client_ns = topology.client.name.clone();
    let url = format!("http://{HOST_CLIENT_ADDR}:{API_PORT}{BENCH_PATH}");
    let legit = wrk(&["ip", "netns", "exec", &client_ns], 0, &url, 8, seconds);
    let drops_after = if xdp { dropped(&topology.status()) } else { 0 };
    let sent = flood.map_or(0, |f| f.join().expect("flood thread"));
    let softirq_us = ticks_to_us(softirq_ticks() - softirq_before);
    #[expect(clippy::cast_precision_loss, reason = "packet counts far below 2^52")]
    Outcome {
        legit,
        attacker_pps: sent as f64 / (f64::from(seconds) + 2.0),
        dropped_pps: (drops_after - drops_before) as f64 / legit.seconds.max(1e-9),
        softirq_ns_per_attack_packet: if sent > 0 {
            softirq_us * 1000.0 / sent as f64
        } else {
            0.0
        },
    }
}

/// `clients` new clients during a spoofed flood, the SYN challenge on or off,
/// and as many with no flood before it (the connect-time baseline).
fn new_clients(challenge: bool, clients: u32) -> serde_json::Value {
    let topology = Topology::new();
    // XDP_TX frames reach the client's veth end only with its NAPI on.
    let _rx = RxNapi::attach(&topology.client, "vc");
    let _agent = topology.agent(
        &netns::config(
            BENCH_PATH,
            1_000_000_000,
            &format!("syn_challenge = {challenge}"),
        ),
        &[],
    );
    let calm = newcomers::without_flood(&topology, Ipv4Addr::new(10, 92, 0, 20), 20, BENCH_PATH);
    let report = newcomers::under_spoofed_flood(
        &topology,
        Ipv4Addr::new(10, 92, 0, 50),
        clients,
        10,
        BENCH_PATH,
        Duration::from_millis(1500),
        Duration::from_millis(1500),
    );
    eprintln!(
        "  challenge {challenge}: {}/{} served, connect p99 {:.1} ms (no flood {:.2} ms), \
         flood {:.0} pps, {} flood entries",
        report.served,
        report.attempts,
        report.connect_quantile(0.99),
        calm.connect_quantile(0.99),
        report.flood_pps,
        report.map_entries_created_by_flood
    );
    let ms = |v: f64| (v * 100.0).round() / 100.0;
    json!({
        "attempts": report.attempts,
        "connected": report.connected,
        "served": report.served,
        "connect_p50_ms": ms(report.connect_quantile(0.5)),
        "connect_p99_ms": ms(report.connect_quantile(0.99)),
        "no_flood_connect_p99_ms": ms(calm.connect_quantile(0.99)),
        "flood_pps": report.flood_pps.round(),
        "map_entries_created_by_flood": report.map_entries_created_by_flood,
    })
}

/// The median round of one scenario, as written to `flood.json`.
fn summary(scenario: &str, outcomes: &[Outcome]) -> serde_json::Value {
    let runs: Vec<WrkResult> = outcomes.iter().map(|o| o.legit).collect();
    let median = median_run(&runs);
    let chosen = outcomes
        .iter()
        .find(|o| o.legit.rps.total_cmp(&median.rps).is_eq())
        .expect("the median run");
    let mut entry = json!({
        "legit_rps": (median.rps * 10.0).round() / 10.0,
        "legit_p99_ms": (median.p99_ms * 1000.0).round() / 1000.0,
        "legit_errors": median.errors,
    });
    if scenario != "baseline" {
        entry["attacker_pps"] = json!(chosen.attacker_pps.round());
        entry["softirq_ns_per_attack_packet"] =
            json!((chosen.softirq_ns_per_attack_packet * 10.0).round() / 10.0);
    }
    if scenario == "with_xdp" {
        entry["dropped_pps"] = json!(chosen.dropped_pps.round());
    }
    entry
}

fn main() {
    let Args {
        seconds,
        rounds,
        clients,
    } = Args::parse();
    limiter_tests::require_root("the flood benchmark (namespaces, XDP, iptables)");
    let scenarios = FLOOD_SCENARIOS;
    let mut results: Vec<Vec<Outcome>> = scenarios.iter().map(|_| Vec::new()).collect();
    for round in 1..=rounds {
        for (i, scenario) in scenarios.iter().enumerate() {
            eprintln!("flood: round {round}/{rounds}: {scenario}…");
            let outcome = run(scenario, seconds);
            eprintln!(
                "  legit {:.0} req/s, p99 {:.2} ms; attacker {:.0} pps, XDP dropped {:.0} pps",
                outcome.legit.rps, outcome.legit.p99_ms, outcome.attacker_pps, outcome.dropped_pps
            );
            results[i].push(outcome);
        }
    }
    let mut out = serde_json::Map::new();
    for (scenario, outcomes) in scenarios.iter().zip(&results) {
        out.insert((*scenario).to_owned(), summary(scenario, outcomes));
    }
    let baseline = out["baseline"]["legit_rps"].as_f64().unwrap_or(0.0);
    let ratio = |s: &str| {
        let rps = out[s]["legit_rps"].as_f64().unwrap_or(0.0);
        if baseline > 0.0 { rps / baseline } else { 0.0 }
    };
    let control = out["attacker_busy_control"]["legit_rps"]
        .as_f64()
        .unwrap_or(0.0);
    let protection = if control > 0.0 {
        out["with_xdp"]["legit_rps"].as_f64().unwrap_or(0.0) / control
    } else {
        0.0
    };
    let ratios = json!({
        "no_protection": ratio("no_protection"),
        "iptables_hashlimit": ratio("iptables_hashlimit"),
        "with_xdp": ratio("with_xdp"),
        "attacker_busy_control": ratio("attacker_busy_control"),
        "protection_ratio": protection,
    });
    let with_xdp = ratio("with_xdp");
    out.insert("ratios_to_baseline".into(), ratios);
    eprintln!("flood: new clients under a spoofed flood…");
    let cookies = new_clients(true, clients);
    let without = new_clients(false, clients);
    out.insert(
        "new_clients_under_spoofed_flood".into(),
        json!({ "with_cookies": cookies, "without_cookies": without }),
    );
    out.insert("machine".into(), json!(machine()));
    out.insert("seconds".into(), json!(seconds));
    out.insert("rounds".into(), json!(rounds));
    out.insert("syn_ceiling".into(), json!(SYN_CEILING));
    let path = write_json("flood", &serde_json::Value::Object(out));
    let verdict = if with_xdp >= 0.9 { "meets" } else { "misses" };
    println!("flood: legit client with XDP at {with_xdp:.2}x baseline (target >= 0.9x): {verdict}");
    let verdict = if protection >= 0.9 { "meets" } else { "misses" };
    println!(
        "flood: protection ratio (with XDP / attacker busy, nothing received) {protection:.2} \
         (target >= 0.9): {verdict}"
    );
    let served = |v: &serde_json::Value| {
        let (served, attempts) = (v["served"].as_f64(), v["attempts"].as_f64());
        served.zip(attempts).map_or(0.0, |(s, a)| s / a.max(1.0))
    };
    let verdict = if served(&cookies) >= 0.99 {
        "meets"
    } else {
        "misses"
    };
    println!(
        "flood: new clients under a spoofed flood served {:.0}% with the SYN challenge, {:.0}% \
         without (target >= 99%): {verdict}",
        served(&cookies) * 100.0,
        served(&without) * 100.0
    );
    println!("{}", path.display());
}
