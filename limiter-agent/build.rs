//! Builds the XDP object (`limiter-ebpf`) with the nightly toolchain and
//! bpf-linker, and copies its programs into `OUT_DIR`, where `src/object.rs`
//! embeds them.
//!
//! The nested build uses one target directory for the whole workspace,
//! `<target>/ebpf`, shared with `cargo xtask build-ebpf`, instead of one under
//! each `OUT_DIR`: cargo runs this script once per profile (check, clippy,
//! dev, test, release), and each private target directory compiled `core` for
//! the BPF target again, about a minute each time. The nested cargo locks
//! `<target>/ebpf` itself, never the outer `<target>`, which the outer cargo
//! holds (rust-lang/cargo#6412).

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, anyhow, bail};

/// The flags the object is built with: BTF for the loader, and the `cfg` the
/// aya-ebpf crates read.
const RUSTFLAGS: [&str; 3] = [
    "--cfg=bpf_target_arch=\"x86_64\"",
    "-Cdebuginfo=2",
    "-Clink-arg=--btf",
];

/// The programs the object's package builds, each embedded by `object.rs`.
const PROGRAMS: [&str; 2] = ["limiter", "baseline"];

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let out_dir = PathBuf::from(env::var("OUT_DIR").context("OUT_DIR")?);
    let ebpf = canonical(&manifest_dir.join("../limiter-ebpf"))?;
    let common = canonical(&manifest_dir.join("../limiter-common"))?;
    // The object's sources and the layouts it shares with the agent.
    for dir in [&ebpf, &common] {
        println!("cargo:rerun-if-changed={}", dir.display());
    }
    if env::var("CARGO_CFG_TARGET_ARCH").as_deref() != Ok("x86_64")
        || env::var("CARGO_CFG_TARGET_ENDIAN").as_deref() != Ok("little")
    {
        bail!("the XDP object is built for x86_64 hosts only");
    }
    if which_bpf_linker().is_none() {
        return Err(anyhow!(
            "bpf-linker is not installed: run `cargo xtask setup` (as root) first"
        ));
    }
    let target_dir = shared_target_dir(&out_dir);
    let mut cargo = Command::new("rustup");
    cargo
        .args([
            "run",
            "nightly",
            "cargo",
            "build",
            "--package",
            "limiter-ebpf",
            "--bins",
        ])
        .args([
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(&ebpf);
    // What the outer (stable) cargo set for this script: its compiler would
    // pin the nested cargo to stable, and the dependencies' build scripts
    // watch some of the rest (aya-ebpf: `HOST`), which would make this build
    // and `cargo xtask build-ebpf` rebuild after each other.
    for (key, _) in env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if set_by_cargo(key) {
            cargo.env_remove(key);
        }
    }
    cargo.env("CARGO_ENCODED_RUSTFLAGS", RUSTFLAGS.join("\x1f"));
    // The workspace's release profile links the agent with fat LTO; the XDP
    // object is linked by bpf-linker, as before (and as `cargo xtask
    // build-ebpf` builds it: the same setting, the same object).
    cargo.env("CARGO_PROFILE_RELEASE_LTO", "false");
    cargo.env("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "16");
    let status = cargo
        .status()
        .context("running `rustup run nightly cargo` (run `cargo xtask setup` if it is missing)")?;
    if !status.success() {
        bail!(
            "building the XDP object failed ({status}); run `cargo xtask setup` if a tool is missing"
        );
    }
    let built = target_dir.join("bpfel-unknown-none/release");
    for program in PROGRAMS {
        std::fs::copy(built.join(program), out_dir.join(program))
            .with_context(|| format!("copying {} into OUT_DIR", built.join(program).display()))?;
    }
    Ok(())
}

/// Whether cargo sets `key` for build scripts (or for the toolchain it runs).
fn set_by_cargo(key: &str) -> bool {
    const EXACT: [&str; 14] = [
        "CARGO",
        "RUSTC",
        "RUSTDOC",
        "RUSTUP_TOOLCHAIN",
        "HOST",
        "TARGET",
        "OUT_DIR",
        "PROFILE",
        "OPT_LEVEL",
        "DEBUG",
        "NUM_JOBS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_MAKEFLAGS",
        "CARGO_PRIMARY_PACKAGE",
    ];
    const PREFIXES: [&str; 5] = [
        "CARGO_CFG_",
        "CARGO_PKG_",
        "CARGO_MANIFEST_",
        "CARGO_FEATURE_",
        "RUSTC_",
    ];
    EXACT.contains(&key) || PREFIXES.iter().any(|prefix| key.starts_with(prefix))
}

fn canonical(path: &Path) -> anyhow::Result<PathBuf> {
    path.canonicalize()
        .with_context(|| format!("no crate at {}", path.display()))
}

/// `<target>/ebpf`: the outer target directory is the nearest ancestor of
/// `OUT_DIR` that cargo tagged with `CACHEDIR.TAG`.
fn shared_target_dir(out_dir: &Path) -> PathBuf {
    out_dir
        .ancestors()
        .find(|dir| dir.join("CACHEDIR.TAG").is_file())
        .map_or_else(|| out_dir.join("ebpf-target"), |target| target.join("ebpf"))
}

fn which_bpf_linker() -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join("bpf-linker"))
        .find(|candidate| candidate.is_file())
}
