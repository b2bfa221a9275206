//! `cargo xtask bench [NAME] [--quick]`: benchmarks that measure a baseline in
//! the same run and report ratios. Results go to `target/bench/<name>.json`.

use anyhow::bail;

use crate::{cmd, setup};

/// The benchmark parts, in the order `cargo xtask bench` runs them.
const PARTS: &[&str] = &[
    "xdp", "proxy", "flood", "memory", "redis", "rls", "boundary",
];

/// The peers the side-by-side parts measure against, from Debian packages.
const PEER_PACKAGES: &[&str] = &["nginx", "haproxy", "wrk", "iptables"];

#[derive(clap::Args)]
pub struct Options {
    /// One part to run (default: all of them): xdp, proxy, flood, memory, redis, rls,
    /// boundary.
    name: Option<String>,
    /// A short smoke run: fewer rounds and repetitions.
    #[arg(long)]
    quick: bool,
}

/// Every part with `--quick`, results under `target/bench/quick/` (the test
/// command's smoke run: it must work end to end, whatever the figures).
pub fn smoke() -> anyhow::Result<()> {
    run(&Options {
        name: None,
        quick: true,
    })
}

/// The profile the programs are built in: `release` (what is shipped), or
/// `smoke` for a smoke run (the same code without the LTO link).
pub fn profile(quick: bool) -> &'static str {
    if quick { "smoke" } else { "release" }
}

/// Where a built program is: `target/<profile>/<name>`.
fn built(name: &str, quick: bool) -> std::path::PathBuf {
    cmd::workspace_root()
        .join("target")
        .join(profile(quick))
        .join(name)
}

/// Where results go: `target/bench/`, or `target/bench/quick/` for smoke runs
/// (which must not replace a real run's figures).
fn out_dir(quick: bool) -> std::path::PathBuf {
    let dir = cmd::workspace_root().join("target/bench");
    if quick { dir.join("quick") } else { dir }
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    setup::ensure(setup::Need::All)?;
    let parts: Vec<&str> = match options.name.as_deref() {
        None => PARTS.to_vec(),
        Some(name) if PARTS.contains(&name) => vec![name],
        Some(name) => bail!(
            "unknown benchmark `{name}`; available: {}",
            PARTS.join(", ")
        ),
    };
    if parts.iter().any(|p| matches!(*p, "proxy" | "flood")) {
        setup::ensure_apt(PEER_PACKAGES)?;
    }
    // The agent and the benchmark programs, optimised.
    cmd::run(cmd::cargo().args([
        "build",
        "--profile",
        profile(options.quick),
        "--package",
        "limiter-agent",
        "--package",
        "limiter-bench",
        "--bins",
    ]))?;
    for part in parts {
        eprintln!("== bench {part}");
        match part {
            "xdp" => xdp(options.quick)?,
            "proxy" => bench_bin(
                "proxy-bench",
                if options.quick {
                    &["--rounds", "1", "--seconds", "3"]
                } else {
                    &[]
                },
                options.quick,
            )?,
            "flood" => bench_bin(
                "flood-bench",
                if options.quick {
                    &["--rounds", "1", "--seconds", "3", "--clients", "20"]
                } else {
                    &[]
                },
                options.quick,
            )?,
            "memory" => bench_bin(
                "memory-bench",
                if options.quick {
                    &["--buckets", "100000"]
                } else {
                    &[]
                },
                options.quick,
            )?,
            "redis" => redis(options.quick)?,
            "rls" => bench_bin(
                "rls-bench",
                if options.quick {
                    &["--seconds", "1"]
                } else {
                    &[]
                },
                options.quick,
            )?,
            "boundary" => bench_bin(
                "boundary-bench",
                if options.quick {
                    &["--window-seconds", "2", "--limit", "20"]
                } else {
                    &[]
                },
                options.quick,
            )?,
            _ => unreachable!("PARTS lists only implemented parts"),
        }
    }
    report(options.quick)
}

/// Runs one of the release benchmark programs built above (they write their
/// JSON to `LIMITER_BENCH_OUT`).
fn bench_bin(name: &str, args: &[&str], quick: bool) -> anyhow::Result<()> {
    let binary = built(name, quick);
    cmd::run(
        std::process::Command::new(binary)
            .args(args)
            .env("LIMITER_BENCH_OUT", out_dir(quick)),
    )
}

/// Regenerates `bench/RESULTS.md` and `bench/flood.svg` from every part's
/// latest JSON, and copies the configs the proxy part generated. A quick run
/// writes its report beside its JSON instead.
fn report(quick: bool) -> anyhow::Result<()> {
    let root = cmd::workspace_root();
    if quick {
        let dir = out_dir(true);
        return cmd::run(
            std::process::Command::new(built("bench-report", true))
                .arg(&dir)
                .arg(&dir),
        );
    }
    let out = root.join("bench");
    for scenario in ["allowed", "rejected"] {
        let run = root
            .join("target/bench/run")
            .join(format!("proxy-{scenario}"));
        if !run.is_dir() {
            continue;
        }
        let dest = out.join("configs").join(scenario);
        std::fs::create_dir_all(&dest)?;
        for file in [
            "upstream/upstream.conf",
            "nginx/nginx.conf",
            "haproxy.cfg",
            "limiter.toml",
            "limiter-xdp.toml",
        ] {
            let from = run.join(file);
            if from.is_file() {
                let name = std::path::Path::new(file).file_name().expect("file name");
                std::fs::copy(&from, dest.join(name))?;
            }
        }
    }
    cmd::run(
        std::process::Command::new(built("bench-report", false))
            .arg(root.join("target/bench"))
            .arg(&out),
    )
}

/// Per-packet cost through `BPF_PROG_TEST_RUN` beside a trivial XDP program.
fn xdp(quick: bool) -> anyhow::Result<()> {
    let out = out_dir(quick).join("xdp.json");
    let mut command = cmd::cargo();
    command.args([
        "run",
        "--quiet",
        "--profile",
        profile(quick),
        "--package",
        "limiter-bench",
        "--bin",
        "xdp-bench",
        "--",
    ]);
    command.arg(&out);
    if quick {
        command.args(["--rounds", "3", "--repeat", "200000", "--singles", "2000"]);
    }
    cmd::run(&mut command)
}

/// Decisions per second and added latency of the Redis store beside the
/// in-memory store, against a throwaway local `redis-server`.
fn redis(quick: bool) -> anyhow::Result<()> {
    let out = out_dir(quick).join("redis.json");
    let out = out.to_string_lossy();
    let mut args = vec![out.as_ref()];
    if quick {
        args.extend(["--seconds", "0.5"]);
    }
    bench_bin("redis-bench", &args, quick)
}
