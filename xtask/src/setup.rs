//! `cargo xtask setup`: installs what the eBPF build and the tests need, and
//! nothing when it is all there (a second's worth of checks). `run` and
//! `build-ebpf` ask only for what building the agent needs (`Need::Build`);
//! `test`, `bench` and `vm-test` for everything.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::cmd;

/// Debian packages building the agent needs: LLVM 22 for bpf-linker (the
/// LLVM of nightly rustc).
const BUILD_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
];

/// Debian packages only the tests, benches and VMs need: bpftool and iproute2
/// for inspecting and wiring up XDP, redis-server (with redis-cli) for the
/// shared-store tests and bench; qemu, busybox and xz for the VMs of `vm-test`
/// (xz unpacks trixie's modules); nginx, one of the real routers of the path
/// suite (`tests/tests/paths.rs`); chromium, the browser of the dashboard test;
/// iptables, which cuts an agent off its store in the fault-injection suite;
/// curl, a TLS client of the admin listener in the fleet suite.
const TEST_PACKAGES: &[&str] = &[
    "bpftool",
    "iproute2",
    "iptables",
    "curl",
    "redis-server",
    "qemu-system-x86",
    "busybox-static",
    "xz-utils",
    "nginx",
    "chromium",
];

/// bpf-linker must link with the same LLVM major as nightly rustc.
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// What a command needs installed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Building and running the agent (`run`, `build-ebpf`).
    Build,
    /// Everything: the tests, benches and VMs too.
    All,
}

#[derive(clap::Args)]
pub struct Options {
    /// Only report what is missing; install nothing.
    #[arg(long)]
    check: bool,
}

/// What is missing, in install order.
#[derive(Debug, Default)]
pub struct Missing {
    packages: Vec<&'static str>,
    nightly: bool,
    components: Vec<&'static str>,
    bpf_linker: bool,
    /// The test suites' real routers and clients (`tests/routers/`).
    routers: Vec<&'static Routers>,
}

impl Missing {
    fn is_empty(&self) -> bool {
        self.packages.is_empty()
            && !self.nightly
            && self.components.is_empty()
            && !self.bpf_linker
            && self.routers.is_empty()
    }

    fn describe(&self) -> String {
        let mut parts: Vec<String> = self
            .packages
            .iter()
            .map(|p| format!("apt package {p}"))
            .collect();
        if self.nightly {
            parts.push("the nightly Rust toolchain".into());
        }
        parts.extend(
            self.components
                .iter()
                .map(|c| format!("nightly component {c}")),
        );
        if self.bpf_linker {
            parts.push(format!("bpf-linker {BPF_LINKER_VERSION} (LLVM 22)"));
        }
        parts.extend(
            self.routers
                .iter()
                .map(|r| format!("{} for the test suites", r.what)),
        );
        parts.join(", ")
    }
}

/// Checks every requirement of `need` without changing anything.
pub fn missing(need: Need) -> Missing {
    let mut missing = Missing::default();
    let packages: Vec<&'static str> = match need {
        Need::Build => BUILD_PACKAGES.to_vec(),
        Need::All => [BUILD_PACKAGES, TEST_PACKAGES].concat(),
    };
    let installed = cmd::output(
        Command::new("dpkg-query")
            .args(["-W", "-f", "${Package} ${db:Status-Status}\n"])
            .args(&packages),
    )
    .unwrap_or_default();
    missing.packages = packages
        .into_iter()
        .filter(|p| !installed.lines().any(|l| l == format!("{p} installed")))
        .collect();
    let toolchains =
        cmd::output(Command::new("rustup").args(["toolchain", "list"])).unwrap_or_default();
    missing.nightly = !toolchains.lines().any(|l| l.starts_with("nightly"));
    let components = cmd::output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))
    .unwrap_or_default();
    missing.components = ["rust-src", "rustfmt", "clippy"]
        .into_iter()
        .filter(|c| !components.lines().any(|l| l.starts_with(c)))
        .collect();
    missing.bpf_linker = !cmd::output(Command::new("bpf-linker").arg("--version"))
        .is_some_and(|v| v.contains(BPF_LINKER_VERSION));
    if need == Need::All {
        missing.routers = ROUTERS.iter().filter(|r| !installed_from(r)).collect();
    }
    missing
}

/// The real routers and clients the test suites drive (the path suite's
/// routers, the RLS client, the stand-in LLM provider and the OpenAI SDK),
/// each installed into `tests/routers/` from a pinned list.
#[derive(Debug)]
struct Routers {
    what: &'static str,
    /// The pinned list, in `tests/routers/`.
    list: &'static str,
    /// Where they install, in `tests/routers/`.
    dir: &'static str,
    /// A file that exists once they have.
    installed: &'static str,
    install: fn(&Path) -> anyhow::Result<()>,
}

const ROUTERS: [Routers; 2] = [
    Routers {
        what: "Express (npm)",
        list: "package-lock.json",
        dir: "node_modules",
        installed: "node_modules/express/package.json",
        install: |dir| {
            cmd::run(
                Command::new("npm")
                    .args(["ci", "--no-audit", "--no-fund", "--prefix"])
                    .arg(dir),
            )
            .context("installing Express for the path suite (needs node and npm)")
        },
    },
    Routers {
        what: "Starlette, uvicorn, Flask, grpcio and the OpenAI SDK (pip)",
        list: "requirements.txt",
        dir: ".venv",
        installed: ".venv/bin/python",
        install: |dir| {
            let venv = dir.join(".venv");
            if !venv.join("bin/python").is_file() {
                cmd::run(Command::new("python3").args(["-m", "venv"]).arg(&venv))
                    .context("creating the test suites' venv (needs python3)")?;
            }
            cmd::run(
                Command::new(venv.join("bin/pip"))
                    .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
                    .arg(dir.join("requirements.txt")),
            )
            .context("installing the Python routers and clients of the test suites")
        },
    },
];

fn routers_dir() -> PathBuf {
    cmd::workspace_root().join("tests/routers")
}

/// Written after an install: a copy of the list it installed, so a changed list reinstalls.
fn stamp(routers: &Routers) -> PathBuf {
    routers_dir()
        .join(routers.dir)
        .join(".limiter-installed-from")
}

fn installed_from(routers: &Routers) -> bool {
    let dir = routers_dir();
    let list = std::fs::read(dir.join(routers.list)).ok();
    dir.join(routers.installed).is_file()
        && list.is_some()
        && std::fs::read(stamp(routers)).ok() == list
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    let missing = missing(Need::All);
    if missing.is_empty() {
        eprintln!("setup: everything is installed");
        return Ok(());
    }
    if options.check {
        bail!("missing: {}", missing.describe());
    }
    install(&missing, Need::All)
}

/// Runs setup when something is missing (as root), or explains what to do.
pub fn ensure(need: Need) -> anyhow::Result<()> {
    let missing = missing(need);
    if missing.is_empty() {
        return Ok(());
    }
    if !missing.packages.is_empty() && !cmd::is_root() {
        bail!(
            "missing: {}; run `sudo cargo xtask setup` first",
            missing.describe()
        );
    }
    install(&missing, need)
}

fn install(missing: &Missing, need: Need) -> anyhow::Result<()> {
    eprintln!("setup: installing {}", missing.describe());
    if !missing.packages.is_empty() {
        if !cmd::is_root() {
            bail!("installing apt packages needs root: run `sudo cargo xtask setup`");
        }
        cmd::run(
            Command::new("apt-get")
                .arg("update")
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
        cmd::run(
            Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends"])
                .args(&missing.packages)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    if missing.nightly {
        cmd::run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    if !missing.components.is_empty() {
        cmd::run(
            Command::new("rustup")
                .args(["component", "add", "--toolchain", "nightly"])
                .args(&missing.components),
        )?;
    }
    if missing.bpf_linker {
        cmd::run(
            Command::new("cargo")
                .args([
                    "install",
                    "--force",
                    &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                    "--no-default-features",
                    "--features",
                    "llvm-22",
                ])
                .env("LLVM_PREFIX", LLVM_PREFIX)
                .env_remove("RUSTUP_TOOLCHAIN"),
        )
        .context("building bpf-linker against LLVM 22")?;
    }
    for routers in &missing.routers {
        (routers.install)(&routers_dir())?;
        std::fs::copy(routers_dir().join(routers.list), stamp(routers))?;
    }
    let left = self::missing(need);
    if !left.is_empty() {
        bail!("still missing after setup: {}", left.describe());
    }
    eprintln!("setup: done");
    Ok(())
}

/// Installs the Debian `packages` that are missing (root), for tools only some
/// commands need (the benchmarks' peers).
pub fn ensure_apt(packages: &[&str]) -> anyhow::Result<()> {
    let installed = cmd::output(
        Command::new("dpkg-query")
            .args(["-W", "-f", "${Package} ${db:Status-Status}\n"])
            .args(packages),
    )
    .unwrap_or_default();
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !installed.lines().any(|l| l == format!("{p} installed")))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !cmd::is_root() {
        bail!("missing apt packages {}: run as root", missing.join(", "));
    }
    eprintln!("setup: installing {}", missing.join(", "));
    cmd::run(
        Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    cmd::run(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .context("installing the benchmark peers")
}
