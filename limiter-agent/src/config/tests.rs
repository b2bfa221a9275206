//! The config module's tests: defaults, typed values, the field each refusal
//! names, and what a reload may change.

use std::{path::PathBuf, time::Duration};

use super::*;
use crate::{cli::RunArgs, identity::ClientIpHeader};

const MINIMAL: &str = "[server]\nlisten = \"127.0.0.1:8080\"\n[[tier]]\nroute = \"/api/chat\"\nlimit = 10\nwindow = \"1m\"\n";

fn error(text: &str) -> String {
    Config::parse(text)
        .expect_err("config must be refused")
        .to_string()
}

#[test]
fn identity_settings_parse_and_default_safe() {
    let config = Config::parse(MINIMAL).unwrap();
    assert_eq!(config.live.verify_keys, KeyVerification::Upstream);
    assert_eq!(
        config.live.client_ip_header,
        ClientIpHeader::List(http::HeaderName::from_static("x-forwarded-for"))
    );
    let config = Config::parse(&format!(
        "{MINIMAL}[identity]\nclient_ip_header = \"Forwarded\"\nverify_keys = \"none\"\n"
    ))
    .unwrap();
    assert_eq!(config.live.client_ip_header, ClientIpHeader::Forwarded);
    assert_eq!(config.live.verify_keys, KeyVerification::Off);
    assert!(
        error(&format!("{MINIMAL}[identity]\nverify_keys = \"maybe\"\n"))
            .contains("identity.verify_keys")
    );
    assert!(
        error(&format!(
            "{MINIMAL}[identity]\nclient_ip_header = \"a b\"\n"
        ))
        .contains("identity.client_ip_header")
    );
}

#[test]
fn a_reload_names_every_setting_that_needs_a_restart() {
    let running = Config::parse(MINIMAL).unwrap();
    assert!(running.needs_restart(&running).is_empty());
    let changed = Config::parse(&MINIMAL.replace(
        "[[tier]]",
        "max_connections = 5\nmax_header_bytes = 2048\n[store]\nmax_buckets = 64\non_error = \"deny\"\n[[tier]]",
    ))
    .unwrap();
    assert_eq!(
        changed.needs_restart(&running),
        [
            "server.max_header_bytes",
            "server.max_connections",
            "store.max_buckets"
        ]
    );
    let moved = Config::parse(&format!(
        "{MINIMAL}[xdp]\ninterfaces = [\"eth0\"]\npersist = true\nmode = \"observe\"\n"
    ))
    .unwrap();
    assert_eq!(
        moved.needs_restart(&running),
        ["xdp.interfaces", "xdp.persist"],
        "the mode is live"
    );
}

#[test]
fn a_reload_takes_the_live_settings_and_keeps_the_running_startup() {
    let running = Config::parse(MINIMAL).unwrap();
    let file = Config::parse(&MINIMAL.replace("8080", "8081").replace(
        "[[tier]]",
        "idle_timeout = \"5s\"\n[xdp]\nmode = \"observe\"\n[[tier]]",
    ))
    .unwrap();
    assert_eq!(file.needs_restart(&running), ["server.listen"]);
    let reloaded = file.reloaded_onto(&running);
    assert_eq!(reloaded.startup, running.startup);
    assert_eq!(reloaded.live.idle_timeout, Duration::from_secs(5));
    assert_eq!(reloaded.live.xdp.mode, XdpMode::Observe);
}

#[test]
fn xdp_settings_validate_into_typed_values() {
    let config = Config::parse(&format!(
        "{MINIMAL}[xdp]\nmode = \"observe\"\nallow = [\"10.1.2.3/8\", \"2001:db8::1\"]\n"
    ))
    .unwrap();
    assert_eq!(config.live.xdp.mode, XdpMode::Observe);
    assert_eq!(
        config.live.xdp.allow.as_slice(),
        [
            "10.0.0.0/8".parse().unwrap(),
            "2001:db8::1/128".parse().unwrap()
        ]
    );
    let defaults = Config::parse(MINIMAL).unwrap();
    assert_eq!(defaults.live.xdp.mode, XdpMode::Enforce);
    assert!(defaults.live.xdp.allow.is_empty());
    assert_eq!(defaults.startup.xdp.interfaces, ["lo"]);
    assert_eq!(defaults.startup.xdp.instance, "default");
    assert_eq!(
        (
            defaults.live.xdp.ban_seconds,
            defaults.live.xdp.max_ban_seconds
        ),
        (60, 3600)
    );
    assert_eq!(defaults.live.xdp.max_syn_acks_per_second, 0, "derived");
    let capped =
        Config::parse(&format!("{MINIMAL}[xdp]\nmax_syn_acks_per_second = 500\n")).unwrap();
    assert_eq!(capped.live.xdp.max_syn_acks_per_second, 500);
    let error = Config::parse(&format!(
        "{MINIMAL}[xdp]\nmax_syn_acks_per_second = 1000001\n"
    ))
    .unwrap_err()
    .to_string();
    assert!(error.contains("xdp.max_syn_acks_per_second"), "{error}");
}

#[test]
fn run_flags_override_the_file() {
    let mut config = Config::parse(MINIMAL).unwrap();
    let args = RunArgs {
        config: None,
        listen: Some("127.0.0.1:7000".parse().unwrap()),
        upstream: Some("http://127.0.0.1:7001".into()),
        admin: None,
        demo_upstream: false,
        no_xdp: true,
        interfaces: vec!["lo".into(), "eth1".into()],
        instance: Some("blue".into()),
        persist: true,
        state_file: Some("/tmp/blue.json".into()),
        node: Some("api-7".into()),
    };
    config.apply(&args).unwrap();
    assert_eq!(config.startup.node, "api-7");
    assert_eq!(config.startup.state_file, PathBuf::from("/tmp/blue.json"));
    assert_eq!(config.startup.listen.port(), 7000);
    assert_eq!(config.live.upstream, "http://127.0.0.1:7001");
    assert_eq!(config.startup.xdp.interfaces, ["lo", "eth1"]);
    assert_eq!(config.startup.xdp.instance, "blue");
    assert!(config.startup.xdp.persist && !config.startup.xdp.enabled);
    let bad = |args: RunArgs| {
        Config::parse(MINIMAL)
            .unwrap()
            .apply(&args)
            .unwrap_err()
            .to_string()
    };
    assert!(
        bad(RunArgs {
            upstream: Some("https://x".into()),
            ..args.clone()
        })
        .starts_with("--upstream: `https://x` must be an http://host:port URL")
    );
    assert!(
        bad(RunArgs {
            instance: Some("a/b".into()),
            ..args
        })
        .starts_with("--instance:")
    );
    let built_in = Config::for_run(&RunArgs::default()).unwrap();
    assert_eq!(built_in.live.tiers.len(), 8, "examples/concurred.toml");
}

#[test]
fn minimal_config_gets_defaults() {
    let config = Config::parse(MINIMAL).expect("valid");
    assert_eq!(config.startup.listen, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(
        config.startup.admin_listen,
        "127.0.0.1:9090".parse().unwrap()
    );
    assert_eq!(config.live.ipv6_prefix, 64);
    assert_eq!(config.startup.store, StoreKind::Memory);
    assert_eq!(config.live.on_error, OnError::Allow);
    assert_eq!(config.live.tiers[0].window, Duration::from_mins(1));
    assert_eq!(config.live.tiers[0].limit.get(), 10);
    assert!(config.startup.xdp.enabled);
}

#[test]
fn connection_settings_default_to_a_cap_per_source_and_proxies_exempt() {
    let config = Config::parse(MINIMAL).expect("valid");
    assert_eq!(config.live.idle_timeout, Duration::from_mins(1));
    assert_eq!(config.live.max_connections_per_source, 100);
    assert_eq!(
        config.live.max_connections_per_proxy,
        config.startup.max_connections
    );
    let set = Config::parse(&MINIMAL.replace(
        "[[tier]]",
        "idle_timeout = \"5s\"\nmax_connections = 50\nmax_connections_per_source = 4\n\
         max_connections_per_proxy = 20\n[[tier]]",
    ))
    .expect("valid");
    assert_eq!(set.live.idle_timeout, Duration::from_secs(5));
    assert_eq!(
        (
            set.live.max_connections_per_source,
            set.live.max_connections_per_proxy
        ),
        (4, 20)
    );
    let with = |line: &str| MINIMAL.replace("[[tier]]", &format!("{line}\n[[tier]]"));
    assert!(error(&with("idle_timeout = \"0s\"")).contains("server.idle_timeout"));
    assert!(
        error(&with("max_connections_per_source = 0"))
            .contains("server.max_connections_per_source")
    );
    assert!(
        error(&with("max_connections_per_proxy = 0")).contains("server.max_connections_per_proxy")
    );
}

#[test]
fn redis_store_gets_defaults() {
    let text = format!("{MINIMAL}[store]\nkind = \"redis\"\nurl = \"rediss://cache:6380\"\n");
    let StoreKind::Redis(redis) = Config::parse(&text).expect("valid").startup.store else {
        panic!("kind = \"redis\" must give the Redis store");
    };
    assert_eq!(redis.url.as_deref(), Some("rediss://cache:6380"));
    assert!(redis.cluster_nodes.is_empty());
    assert_eq!(redis.key_prefix, "limiter:");
    assert_eq!(redis.timeout, Duration::from_millis(50));
    assert_eq!(redis.breaker_failures, 5);
    assert_eq!(redis.breaker_cooldown, Duration::from_secs(1));
    let cluster = format!(
        "{MINIMAL}[store]\nkind = \"redis\"\ncluster_nodes = [\"redis://a:7000\", \"redis://b:7001\"]\n"
    );
    let StoreKind::Redis(redis) = Config::parse(&cluster).expect("valid").startup.store else {
        panic!("kind = \"redis\" must give the Redis store");
    };
    assert_eq!(redis.url, None);
    assert_eq!(redis.cluster_nodes.len(), 2);
    let secret = format!(
        "{MINIMAL}[store]\nkind = \"redis\"\nurl = \"redis://user:hunter2@cache:6379/0\"\n"
    );
    let shown = format!("{:?}", Config::parse(&secret).expect("valid").startup.store);
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(shown.contains("redis://***@cache:6379/0"), "{shown}");
}

#[test]
fn reference_example_is_valid() {
    let text = include_str!("../../../examples/concurred.toml");
    let config = Config::parse(text).expect("examples/concurred.toml is valid");
    assert_eq!(config.live.tiers.len(), 8);
    let shared = Config::parse(include_str!("../../../examples/several-hosts.toml"))
        .expect("examples/several-hosts.toml is valid");
    assert_eq!(
        shared.live.tiers, config.live.tiers,
        "the same reference table"
    );
    assert!(matches!(shared.startup.store, StoreKind::Redis(_)));
}

#[test]
fn rls_section_and_the_envoy_ratelimit_example() {
    let off = Config::parse(MINIMAL).expect("valid");
    assert_eq!(off.startup.rls_listen, None, "served only when asked for");
    assert_eq!(off.live.rls.domain, "limiter");
    assert!(off.live.rls.clients.contains("127.0.0.1".parse().unwrap()));
    assert!(!off.live.rls.clients.contains("10.0.0.1".parse().unwrap()));
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/envoy-ratelimit.yaml"
    );
    let on = Config::parse(&format!(
        "{MINIMAL}[rls]\nlisten = \"127.0.0.1:8081\"\nenvoy_config = [\"{path}\"]\n"
    ))
    .expect("valid");
    assert_eq!(
        on.startup.rls_listen,
        Some("127.0.0.1:8081".parse().unwrap())
    );
    assert_eq!(on.live.rls.envoy[0].domain, "chat");
    for (extra, field) in [
        ("domain = \"\"", "rls.domain"),
        ("tls_cert = \"c.pem\"", "rls.tls_key"),
        ("clients = [\"nope\"]", "rls.clients[0]"),
        (
            &format!("domain = \"chat\"\nenvoy_config = [\"{path}\"]"),
            "served twice",
        ),
        (
            "envoy_config = [\"/nonexistent.yaml\"]",
            "rls.envoy_config[0]",
        ),
    ] {
        let error = Config::parse(&format!("{MINIMAL}[rls]\n{extra}\n"))
            .unwrap_err()
            .to_string();
        assert!(error.contains(field), "{extra}: {error}");
    }
}

#[test]
fn the_rls_secret_comes_from_a_file_is_long_enough_and_never_shown() {
    let dir = std::env::temp_dir().join(format!("limiter-secret-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good");
    std::fs::write(&good, "  0123456789abcdef-secret\n").unwrap();
    let short = dir.join("short");
    std::fs::write(&short, "0123456789\n").unwrap();
    let parse = |path: &Path| {
        Config::parse(&format!(
            "{MINIMAL}[rls]\nsecret_file = \"{}\"\n",
            path.display()
        ))
    };
    let config = parse(&good).expect("valid");
    let secret = config.live.rls.secret.as_ref().expect("a secret");
    assert!(secret.matches(b"0123456789abcdef-secret"), "trimmed");
    assert!(!secret.matches(b"0123456789abcdef-secreT"));
    assert!(!secret.matches(b"0123456789abcdef-secret "));
    assert!(
        !format!("{config:?}").contains("0123456789abcdef"),
        "never shown"
    );
    for bad in [short, dir.join("missing")] {
        let error = parse(&bad).unwrap_err().to_string();
        assert!(error.contains("rls.secret_file"), "{error}");
    }
    assert!(Config::parse(MINIMAL).unwrap().live.rls.secret.is_none());
}

#[test]
fn at_most_max_windows_distinct_windows() {
    let tiers = |n: usize| -> String {
        use std::fmt::Write as _;
        (0..n).fold(String::new(), |mut out, i| {
            let _ = write!(
                out,
                "[[tier]]\nroute = \"/t{i}\"\nlimit = 1\nwindow = \"{}s\"\n",
                i + 1
            );
            out
        })
    };
    let head = "[server]\nlisten = \"127.0.0.1:8080\"\n";
    // The verification TTL (1h) is one more window.
    let most = crate::limit::MAX_WINDOWS - 1;
    assert!(Config::parse(&format!("{head}{}", tiers(most))).is_ok());
    let error = error(&format!("{head}{}", tiers(most + 1)));
    assert!(error.contains("distinct windows"), "{error}");
}

#[test]
fn durations() {
    assert_eq!(parse_duration("10s"), Some(Duration::from_secs(10)));
    assert_eq!(parse_duration("1m"), Some(Duration::from_mins(1)));
    assert_eq!(parse_duration("1h"), Some(Duration::from_hours(1)));
    assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
    assert_eq!(parse_duration("0s"), None);
    assert_eq!(parse_duration("10"), None);
    assert_eq!(parse_duration("m"), None);
    assert_eq!(parse_duration("1w"), None);
}

#[test]
fn errors_name_the_field() {
    assert!(error("").contains("server"));
    assert!(error("[server]\nlisten = \"127.0.0.1:8080\"\n").contains("[[tier]]"));
    assert!(error(&MINIMAL.replace("10\n", "0\n")).contains("tier[0].limit"));
    assert!(error(&MINIMAL.replace("1m", "soon")).contains("tier[0].window"));
    assert!(error(&MINIMAL.replace("127.0.0.1:8080", "nowhere")).contains("server.listen"));
    assert!(error(&format!("{MINIMAL}[store]\nkind = \"disk\"\n")).contains("store.kind"));
    assert!(error(&format!("{MINIMAL}[store]\nkind = \"redis\"\n")).contains("store.url"));
    let redis = format!("{MINIMAL}[store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:6379\"\n");
    assert!(error(&redis.replace("redis://", "http://")).contains("store.url"));
    assert!(error(&format!("{redis}timeout = \"fast\"\n")).contains("store.timeout"));
    assert!(error(&format!("{redis}key_prefix = \"a{{b}}:\"\n")).contains("store.key_prefix"));
    assert!(error(&format!("{redis}breaker_failures = 0\n")).contains("store.breaker_failures"));
    assert!(
        error(&format!(
            "{redis}cluster_nodes = [\"redis://a:1\", \"b:2\"]\n"
        ))
        .contains("store.cluster_nodes[1]")
    );
    assert!(error(&format!("{MINIMAL}[xdp]\nmode = \"block\"\n")).contains("xdp.mode"));
    assert!(error(&format!("{MINIMAL}[xdp]\nallow = [\"x\"]\n")).contains("xdp.allow[0]"));
    assert!(error(&format!("{MINIMAL}[identity]\nipv6_prefix = 0\n")).contains("ipv6_prefix"));
    assert!(error(&MINIMAL.replace("listen", "lisen")).contains("lisen"));
    let ambiguous =
        format!("{MINIMAL}[[tier]]\nroute = \"/api/chat\"\nlimit = 5\nwindow = \"1s\"\n");
    assert!(error(&ambiguous).contains("tier"));
}

#[test]
fn key_overrides_resolve_routes_to_tiers() {
    let text = format!(
        "{MINIMAL}[[key]]\nkey_sha256 = \"{}\"\nlimits = {{ \"/api/chat\" = 100 }}\n",
        "ab".repeat(32)
    );
    let config = Config::parse(&text).expect("valid");
    let key = &config.live.keys[&"ab".repeat(32)];
    assert_eq!(key.limits[&0].get(), 100);
    let bad = format!(
        "{MINIMAL}[[key]]\nkey_sha256 = \"{}\"\nlimits = {{ \"/nope\" = 1 }}\n",
        "ab".repeat(32)
    );
    assert!(error(&bad).contains("key[0].limits"));
    let short = format!("{MINIMAL}[[key]]\nkey_sha256 = \"abc\"\nmultiplier = 2\n");
    assert!(error(&short).contains("key[0].key_sha256"));
}

#[test]
fn tier_modes_default_to_enforce_and_an_observing_agent_observes_every_tier() {
    let two = "[[tier]]\nroute = \"/a\"\nlimit = 1\nwindow = \"1m\"\nmode = \"observe\"\n\
               [[tier]]\nroute = \"/b\"\nlimit = 1\nwindow = \"1m\"\n";
    let modes = |server: &str| {
        let text = format!("[server]\nlisten = \"127.0.0.1:8080\"\n{server}\n{two}");
        let config = Config::parse(&text).expect("valid");
        config.live.tiers.iter().map(|t| t.mode).collect::<Vec<_>>()
    };
    assert_eq!(modes(""), [LimitMode::Observe, LimitMode::Enforce]);
    assert_eq!(
        modes("mode = \"observe\""),
        [LimitMode::Observe, LimitMode::Observe]
    );
    let listen = "[server]\nlisten = \"127.0.0.1:8080\"\n";
    let tier = "[[tier]]\nroute = \"/a\"\nlimit = 1\nwindow = \"1m\"\n";
    assert!(error(&format!("{listen}mode = \"dry\"\n{tier}")).contains("server.mode"));
    assert!(error(&format!("{listen}{tier}mode = \"off\"\n")).contains("tier[0].mode"));
}

#[test]
fn algorithms_parse_and_their_limits_are_refused_by_name() {
    let tier = |extra: &str| format!("{MINIMAL}{extra}\n");
    let config = Config::parse(&tier("algorithm = \"gcra\"")).unwrap();
    assert_eq!(
        config.live.tiers[0].algorithm,
        crate::limit::Algorithm::Gcra { burst: 10 },
        "the burst defaults to the limit"
    );
    let config = Config::parse(&tier("algorithm = \"sliding\"")).unwrap();
    assert_eq!(
        config.live.tiers[0].algorithm,
        crate::limit::Algorithm::Sliding
    );
    // 21 slices of 3 s: the span its buckets are queued by.
    assert_eq!(config.live.tiers[0].bucket_span(), Duration::from_secs(63));
    for (extra, names) in [
        ("algorithm = \"leaky\"", "tier[0].algorithm"),
        ("burst = 5", "tier[0].burst"),
        ("algorithm = \"gcra\"\nburst = 0", "tier[0].burst"),
        ("algorithm = \"gcra\"\nburst = 2\ncost = 3", "tier[0].cost"),
        (
            "algorithm = \"sliding\"\ncost_header = \"x-cost\"",
            "tier[0].cost_header",
        ),
        ("algorithm = \"gcra\"\nburst = 6000000", "tier[0].burst"),
    ] {
        assert!(
            error(&tier(extra)).contains(names),
            "{extra}: {}",
            error(&tier(extra))
        );
    }
    let long = MINIMAL.replace("window = \"1m\"", "window = \"400d\"");
    assert!(error(&format!("{long}algorithm = \"sliding\"\n")).contains("tier[0].window"));
    assert!(Config::parse(&long).is_ok(), "a fixed window may be longer");
}

#[test]
fn admin_tokens_are_named_and_required_off_loopback() {
    let dir = std::env::temp_dir().join(format!("limiter-admin-tokens-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let tokens = dir.join("tokens");
    std::fs::write(
        &tokens,
        "# operators\nalice:0123456789abcdef-alice\n\nbob:0123456789abcdef-bob\n",
    )
    .unwrap();
    let with = |admin: &str, file: &str| {
        Config::parse(&format!(
            "{MINIMAL}[admin]\nlisten = \"{admin}\"\ntoken_file = \"{file}\"\n"
        ))
    };
    let no_tls = with("0.0.0.0:9090", &tokens.display().to_string())
        .unwrap_err()
        .to_string();
    assert!(no_tls.contains("admin.tls_cert"), "{no_tls}");
    let config = with("127.0.0.1:9090", &tokens.display().to_string()).unwrap();
    let t = &config.live.admin_tokens;
    assert_eq!(t.who(b"0123456789abcdef-bob"), Some("bob"));
    assert_eq!(t.who(b"0123456789abcdef-alice"), Some("alice"));
    assert_eq!(t.who(b"0123456789abcdef-carol"), None);
    assert_eq!(t.who(b""), None);
    assert!(!format!("{t:?}").contains("0123"), "never shown: {t:?}");
    let off_loopback = Config::parse(&format!("{MINIMAL}[admin]\nlisten = \"0.0.0.0:9090\"\n"))
        .unwrap_err()
        .to_string();
    assert!(off_loopback.contains("admin.token_file"), "{off_loopback}");
    for bad in [
        "short\n",
        "a b:0123456789abcdef0\n",
        "x:0123456789abcdef0\nx:0123456789abcdef1\n",
        "# nothing\n",
    ] {
        std::fs::write(&tokens, bad).unwrap();
        let error = with("127.0.0.1:9090", &tokens.display().to_string())
            .unwrap_err()
            .to_string();
        assert!(error.contains("admin.token_file"), "{bad:?}: {error}");
    }
    let mut config = Config::parse(MINIMAL).unwrap();
    let args = RunArgs {
        admin: Some("0.0.0.0:9090".parse().unwrap()),
        ..RunArgs::default()
    };
    let error = config.apply(&args).unwrap_err().to_string();
    assert!(error.contains("--admin"), "{error}");
    let _ = std::fs::remove_dir_all(&dir);
}
