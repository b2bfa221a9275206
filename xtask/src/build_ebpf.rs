//! `cargo xtask build-ebpf`: the XDP object on its own (the agent's build.rs
//! builds the same object to embed it).

use std::path::PathBuf;

use crate::{cmd, setup};

#[derive(clap::Args)]
pub struct Options {
    /// Build without optimisations (the kernel may reject an unoptimised object).
    #[arg(long)]
    debug: bool,
}

/// Builds the object and returns its path.
pub fn build(debug: bool) -> anyhow::Result<PathBuf> {
    setup::ensure(setup::Need::Build)?;
    let mut command = cmd::nightly_cargo();
    command.args([
        "build",
        "--package",
        "limiter-ebpf",
        "--bins",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
    ]);
    // The agent's build script builds the same object into the same
    // directory, with the same flags: whichever runs second finds it built.
    command
        .arg("--target-dir")
        .arg(cmd::workspace_root().join("target/ebpf"));
    if !debug {
        command.arg("--release");
    }
    // The profile settings of `limiter-agent/build.rs` (the workspace's
    // release LTO is the agent's, not the XDP object's).
    command.env("CARGO_PROFILE_RELEASE_LTO", "false");
    command.env("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "16");
    // The flags of `limiter-agent/build.rs`, so both builds produce the same object.
    command.env(
        "CARGO_ENCODED_RUSTFLAGS",
        [
            "--cfg=bpf_target_arch=\"x86_64\"",
            "-Cdebuginfo=2",
            "-Clink-arg=--btf",
        ]
        .join("\x1f"),
    );
    cmd::run(&mut command)?;
    let profile = if debug { "debug" } else { "release" };
    Ok(cmd::workspace_root()
        .join("target/ebpf/bpfel-unknown-none")
        .join(profile)
        .join("limiter"))
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    let object = build(options.debug)?;
    anyhow::ensure!(object.is_file(), "no object at {}", object.display());
    println!("{}", object.display());
    Ok(())
}
