//! `cargo xtask test`: the project's one test command (what CI runs).

use crate::{build_ebpf, cmd, setup};

#[derive(clap::Args)]
pub struct Options {}

pub fn run(_options: &Options) -> anyhow::Result<()> {
    setup::ensure()?;
    // rustfmt.toml uses options that only nightly rustfmt implements.
    cmd::run(cmd::nightly_cargo().args(["fmt", "--all", "--check"]))?;
    cmd::run(cmd::cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    cmd::run(cmd::nightly_cargo().args([
        "clippy",
        "--package",
        "limiter-ebpf",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--release",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The standalone object must build too: it is what operators inspect.
    build_ebpf::build(false)?;
    // The end-to-end tests run the agent binary as a real process.
    cmd::run(cmd::cargo().args(["build", "--package", "limiter-agent", "--bins"]))?;
    cmd::run(cmd::cargo().args(["test", "--workspace", "--exclude", "limiter-ebpf"]))?;
    eprintln!("xtask test: all checks passed");
    Ok(())
}
