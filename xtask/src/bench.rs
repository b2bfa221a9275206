//! `cargo xtask bench [NAME] [--quick]`: benchmarks that measure a baseline in
//! the same run and report ratios. Results go to `target/bench/<name>.json`.

use anyhow::bail;

use crate::{cmd, setup};

/// The benchmark parts, in the order `cargo xtask bench` runs them.
const PARTS: &[&str] = &["xdp"];

#[derive(clap::Args)]
pub struct Options {
    /// One part to run (default: all of them): xdp.
    name: Option<String>,
    /// A short smoke run: fewer rounds and repetitions.
    #[arg(long)]
    quick: bool,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    setup::ensure()?;
    let parts: Vec<&str> = match options.name.as_deref() {
        None => PARTS.to_vec(),
        Some(name) if PARTS.contains(&name) => vec![name],
        Some(name) => bail!(
            "unknown benchmark `{name}`; available: {}",
            PARTS.join(", ")
        ),
    };
    for part in parts {
        match part {
            "xdp" => xdp(options.quick)?,
            _ => unreachable!("PARTS lists only implemented parts"),
        }
    }
    Ok(())
}

/// Per-packet cost through `BPF_PROG_TEST_RUN` beside a trivial XDP program.
fn xdp(quick: bool) -> anyhow::Result<()> {
    let out = cmd::workspace_root().join("target/bench/xdp.json");
    let mut command = cmd::cargo();
    command.args([
        "run",
        "--quiet",
        "--release",
        "--package",
        "limiter-tests",
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
