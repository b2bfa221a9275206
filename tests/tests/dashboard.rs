//! The live dashboard in a real browser: the agent attached by XDP in the
//! namespace topology, a client rejected a few times and an attacker that
//! ignores its 429s until it is banned in the kernel, then the page opened in
//! headless Chromium. The rendered DOM must show the tier with non-zero
//! rates, both rejected clients and the ban with where it came from; a
//! screenshot goes to
//! `target/dashboard.png`.

use std::{
    net::SocketAddrV4,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use limiter_tests::netns::{
    self, API_PORT, ATTACKER_ADDR, CLIENT_ADDR, HOST_ATTACKER_ADDR, HOST_CLIENT_ADDR, Netns,
    Topology, get,
};

const SHORT: Duration = Duration::from_secs(1);

/// Headless Chromium in `ns` on `url` with `args` (`--dump-dom`, `--screenshot=…`);
/// its standard output.
fn chromium(ns: &Netns, url: &str, args: &[String], profile: &Path) -> String {
    let output = Command::new("ip")
        .args(["netns", "exec", &ns.name, "chromium"])
        // As root, without a display, on a machine with no outside network:
        // no sandbox, no GPU, and none of the browser's own connections.
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--virtual-time-budget=6000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .output()
        .expect("running chromium (installed by cargo xtask setup)");
    assert!(
        output.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The number in the first cell of `class` inside the row that starts at `row`.
fn cell(dom: &str, row: &str, class: &str) -> f64 {
    let start = dom
        .find(row)
        .unwrap_or_else(|| panic!("no {row} in the page:\n{dom}"));
    let rest = &dom[start..];
    let at = rest
        .find(class)
        .unwrap_or_else(|| panic!("no {class} in {row}"));
    let value = &rest[at..];
    let value = &value[value.find('>').expect("cell") + 1..];
    value[..value.find('<').expect("cell end")]
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{class}: {e}"))
}

#[test]
fn the_dashboard_shows_tiers_rejected_clients_and_bans_in_a_real_browser() {
    let topology = Topology::new();
    let agent = topology.agent(
        &netns::config(
            "/api/chat",
            5,
            "escalate_after_rejections = 3\nban_seconds = 60",
        ),
        &[],
    );
    let admin = agent.admin.expect("admin listener");
    // The client: its 5, then two rejections (under the escalation threshold).
    let client = SocketAddrV4::new(HOST_CLIENT_ADDR, API_PORT);
    let statuses: Vec<u16> = (0..7)
        .map(|_| get(&topology.client, client, "/api/chat", SHORT).map_or(0, |r| r.status))
        .collect();
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429, 429]);
    // The attacker ignores its 429s until the kernel drops it.
    let attacker = SocketAddrV4::new(HOST_ATTACKER_ADDR, API_PORT);
    let mut sent = 0;
    while get(&topology.attacker, attacker, "/api/chat", SHORT).is_ok() {
        sent += 1;
        assert!(sent < 30, "never banned");
    }
    // Let the sampler see it all (one sample a second).
    std::thread::sleep(Duration::from_millis(2500));

    let url = format!("http://{admin}/");
    let scratch = std::env::temp_dir().join(format!("limiter-dashboard-{}", std::process::id()));
    let dom = chromium(
        &topology.host,
        &url,
        &["--dump-dom".to_owned()],
        &scratch.join("dom"),
    );
    let tier = r#"data-route="/api/chat""#;
    assert!(
        cell(&dom, tier, "rate-allowed") > 0.0,
        "allowed rate:\n{dom}"
    );
    assert!(
        cell(&dom, tier, "rate-rejected") > 0.0,
        "rejected rate:\n{dom}"
    );
    for client in [CLIENT_ADDR, ATTACKER_ADDR] {
        assert!(
            dom.contains(&format!(r#"class="offender" data-client="{client}""#)),
            "{client} among the top rejected clients:\n{dom}"
        );
    }
    assert!(
        dom.contains(&format!(r#"class="ban" data-source="{ATTACKER_ADDR}/32""#)),
        "the banned attacker listed:\n{dom}"
    );
    assert!(
        dom.contains("by escalation"),
        "the ban says where it came from:\n{dom}"
    );
    assert!(
        dom.contains("no runtime override"),
        "the runtime overrides table:\n{dom}"
    );
    assert!(dom.contains("hc (native)"), "attach modes shown:\n{dom}");

    let target = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/dashboard.png");
    let _ = std::fs::remove_file(&target);
    chromium(
        &topology.host,
        &url,
        &[
            format!("--screenshot={}", target.display()),
            "--window-size=1280,1000".to_owned(),
        ],
        &scratch.join("shot"),
    );
    let size = std::fs::metadata(&target).map_or(0, |m| m.len());
    assert!(
        size > 10_000,
        "screenshot of {size} bytes at {}",
        target.display()
    );
    let _ = std::fs::remove_dir_all(&scratch);
}
