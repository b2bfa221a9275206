//! `cargo xtask vm-test`: the kernel compatibility matrix. For each supported
//! kernel (Debian's cloud kernels, fetched with apt) it boots a VM whose
//! initramfs holds busybox, bpftool, iproute2, the XDP suite's test binary and
//! `vm-load` (the agent's embedded object, loaded with aya and pinned); inside,
//! `init.sh` runs the suite through `BPF_PROG_TEST_RUN`, loads the object,
//! attaches it with bpftool to `lo` and a veth pair, sends real TCP traffic
//! through them and checks the pinned maps with bpftool. Each step reports on the serial console; a step that fails or never
//! reports fails the run.

mod initramfs;
mod kernel;
mod qemu;
mod report;

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::Context as _;
use limiter_common::{
    Ban, ProgramConfig, SourceKey,
    fixture::{self, API_PORT},
    reason, stat_index, verdict,
};

use self::{
    initramfs::Initramfs,
    kernel::{KERNELS, Kernel},
    qemu::Accel,
    report::Outcome,
};
use crate::{cmd, setup};

#[derive(clap::Args)]
pub struct Options {
    /// A kernel to test: 5.10, 6.1, 6.12 (or bullseye, bookworm, trixie).
    /// Repeat for several; default: every one.
    #[arg(long = "kernel", value_name = "NAME")]
    kernels: Vec<String>,
    /// Resolve the kernel packages with apt again instead of reusing those
    /// unpacked under target/vm by an earlier run.
    #[arg(long)]
    refresh: bool,
    /// qemu accelerator. TCG by default: nested KVM is far slower on the
    /// machines this project runs on.
    #[arg(long, value_enum, default_value_t = Accel::Tcg)]
    accel: Accel,
    /// Hard time limit per VM, in seconds.
    #[arg(long, default_value_t = TIMEOUT_S)]
    timeout: u64,
    /// Replace the kernel table in docs/testing.md with this run's results
    /// (whole matrix only).
    #[arg(long, alias = "update-readme")]
    update_docs: bool,
}

/// The doc whose kernel table `--update-docs` replaces.
const MATRIX_DOC: &str = "docs/testing.md";

/// A VM runs for 1.5 to 3.5 minutes under TCG on a loaded 2-core machine.
const TIMEOUT_S: u64 = 420;

impl Options {
    /// One kernel with the defaults, as `cargo xtask vm-test --kernel NAME`.
    pub fn kernel(name: &str) -> Self {
        Self {
            kernels: vec![name.to_owned()],
            refresh: false,
            accel: Accel::Tcg,
            timeout: TIMEOUT_S,
            update_docs: false,
        }
    }
}

/// The steps `init.sh` reports, in order; each must report `ok`.
const STEPS: &[&str] = &[
    "bpffs",
    "modules",
    "suite",
    "syn-challenge",
    "coarse-clock",
    "load",
    "config",
    "attach-lo",
    "veth",
    "attach-veth",
    "prog-show",
    "net-show",
    "traffic-veth",
    "traffic-lo",
    "map-sources",
    "map-stats",
    "ban",
    "ban-drops",
    "detach",
];

/// Modules the VM loads (Debian's cloud kernels build veth as a module).
const MODULES: &[&str] = &["veth"];

const CLIENT_V4: [u8; 4] = [10, 99, 0, 2];
const SERVER_V4: [u8; 4] = [10, 99, 0, 1];

pub fn run(options: &Options) -> anyhow::Result<()> {
    let kernels: Vec<Kernel> = if options.kernels.is_empty() {
        KERNELS.to_vec()
    } else {
        let mut named = Vec::new();
        for name in &options.kernels {
            let kernel = Kernel::named(name)?;
            if !named.contains(&kernel) {
                named.push(kernel);
            }
        }
        named
    };
    anyhow::ensure!(
        !options.update_docs || kernels.len() == KERNELS.len(),
        "--update-docs replaces the kernel table in {MATRIX_DOC}: run the whole matrix"
    );
    setup::ensure(setup::Need::All)?;
    let base = cmd::workspace_root().join("target/vm");
    let common = common_files(&base)?;
    let mut outcomes = Vec::new();
    for kernel in kernels {
        eprintln!("vm-test: Linux {} ({})", kernel.name, kernel.suite);
        let outcome = run_kernel(kernel, options, &base.join(kernel.suite), &common)
            .unwrap_or_else(|e| Outcome::broken(kernel, format!("{e:#}")));
        outcome.print();
        outcomes.push(outcome);
    }
    let table = report::table(&outcomes);
    println!("\n{table}");
    fs::write(base.join("matrix.md"), &table)?;
    if options.update_docs {
        report::update_doc(&cmd::workspace_root().join(MATRIX_DOC), &table)?;
    }
    let failed: Vec<&str> = outcomes
        .iter()
        .filter(|o| !o.passed())
        .map(|o| o.kernel.name)
        .collect();
    anyhow::ensure!(
        failed.is_empty(),
        "vm-test failed on Linux {}",
        failed.join(", ")
    );
    eprintln!("vm-test: every kernel passed");
    Ok(())
}

fn run_kernel(
    kernel: Kernel,
    options: &Options,
    dir: &Path,
    common: &Initramfs,
) -> anyhow::Result<Outcome> {
    fs::create_dir_all(dir)?;
    let unpacked = kernel::fetch(kernel, dir, options.refresh)?;
    let mut image = common.clone();
    for (i, (name, data)) in kernel::modules(&unpacked.modules, MODULES)?
        .into_iter()
        .enumerate()
    {
        image.file(&format!("modules/{i:02}-{name}.ko"), data, 0o644);
    }
    let initrd = dir.join("initramfs.cpio");
    image.write(&initrd)?;
    let console = qemu::boot(
        &unpacked.vmlinuz,
        &initrd,
        options.accel,
        Duration::from_secs(options.timeout),
        &dir.join("console.log"),
    )?;
    Ok(Outcome::read(
        kernel,
        unpacked.package,
        &console,
        STEPS,
        dir.join("console.log"),
    ))
}

/// The files every VM shares: busybox, bpftool, ip, the XDP suite, the
/// loader, `/init` and its environment. The host tools go to `/usr/sbin`,
/// ahead of busybox's applets of the same name in `PATH`.
fn common_files(base: &Path) -> anyhow::Result<Initramfs> {
    let (tests, loader) = test_executables()?;
    let mut image = Initramfs::default();
    for dir in ["bin", "dev", "proc", "sys", "run", "tmp", "modules"] {
        image.dir(dir);
    }
    image.executable("bin/busybox", &host_tool("busybox")?)?;
    image.executable("usr/sbin/bpftool", &host_tool("bpftool")?)?;
    image.executable("usr/sbin/ip", &host_tool("ip")?)?;
    let bin = base.join("bin");
    fs::create_dir_all(&bin)?;
    image.executable("usr/sbin/xdp-tests", &stripped(&tests, &bin)?)?;
    image.executable("usr/sbin/vm-load", &stripped(&loader, &bin)?)?;
    image.file("init", include_bytes!("init.sh").to_vec(), 0o755);
    image.file("vm-test.env", environment().into_bytes(), 0o644);
    Ok(image)
}

/// The first of the usual places holding `tool`.
fn host_tool(tool: &str) -> anyhow::Result<PathBuf> {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|dir| Path::new(dir).join(tool))
        .find(|p| p.is_file())
        .with_context(|| format!("`{tool}` is not installed (cargo xtask setup installs it)"))
}

/// Builds the XDP suite (`tests/tests/xdp/`) and, in the same build (so
/// with the same features), the tests crate's binaries; returns the suite's
/// test executable and `vm-load`.
fn test_executables() -> anyhow::Result<(PathBuf, PathBuf)> {
    let output = cmd::cargo()
        .args([
            "test",
            "--package",
            "limiter-tests",
            "--test",
            "xdp",
            "--no-run",
        ])
        .arg("--message-format=json")
        .stderr(Stdio::inherit())
        .output()
        .context("building the XDP suite")?;
    anyhow::ensure!(output.status.success(), "building the XDP suite failed");
    let messages: Vec<serde_json::Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect();
    let find = |name: &str, test: bool| {
        messages
            .iter()
            .filter(|m| {
                m["reason"] == "compiler-artifact"
                    && m["target"]["name"] == name
                    && m["profile"]["test"] == test
            })
            .find_map(|m| m["executable"].as_str().map(PathBuf::from))
            .with_context(|| format!("cargo reported no executable for {name}"))
    };
    Ok((find("xdp", true)?, find("vm-load", false)?))
}

/// Copies `binary` into `dir` without its debug info (most of a test binary's
/// size, and never needed in the VM).
fn stripped(binary: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    let out = dir.join(binary.file_name().context("binary file name")?);
    cmd::run(
        Command::new("strip")
            .args(["--strip-debug", "-o"])
            .arg(&out)
            .arg(binary),
    )?;
    Ok(out)
}

/// `/vm-test.env`: the values `init.sh` writes into the maps and looks for,
/// from the kernel/user contract itself.
fn environment() -> String {
    let config = fixture::config();
    let banned = ProgramConfig {
        policy_gen: 2,
        ..config
    };
    let client = SourceKey::from_v4(CLIENT_V4);
    let mut ban_key = 128u32.to_le_bytes().to_vec();
    ban_key.extend_from_slice(&client.addr);
    let ban = Ban { until_ns: u64::MAX };
    let index = |v, r| hex(&stat_index(v, r).to_le_bytes());
    let json = |key: &SourceKey| {
        key.addr[10..]
            .iter()
            .map(|b| format!("\"0x{b:02x}\""))
            .collect::<Vec<_>>()
            .join(",")
    };
    let dotted = |a: [u8; 4]| format!("{}.{}.{}.{}", a[0], a[1], a[2], a[3]);
    [
        format!("API_PORT={API_PORT}"),
        format!("CLIENT_V4={}", dotted(CLIENT_V4)),
        format!("SERVER_V4={}", dotted(SERVER_V4)),
        format!("CONFIG_HEX='{}'", hex(as_bytes(&config))),
        format!("CONFIG_BANNED_HEX='{}'", hex(as_bytes(&banned))),
        format!("STAT_PASS_API='{}'", index(verdict::PASS, reason::API)),
        format!(
            "STAT_DROP_BANNED='{}'",
            index(verdict::DROP, reason::BANNED)
        ),
        format!("BAN_KEY_HEX='{}'", hex(&ban_key)),
        format!("BAN_VALUE_HEX='{}'", hex(&ban.until_ns.to_ne_bytes())),
        format!("CLIENT_KEY_JSON='{}'", json(&client)),
        format!(
            "LOOPBACK_KEY_JSON='{}'",
            json(&SourceKey::from_v4([127, 0, 0, 1]))
        ),
    ]
    .join("\n")
        + "\n"
}

/// The bytes of a map value as the kernel sees them.
fn as_bytes(config: &ProgramConfig) -> &[u8] {
    // SAFETY: `ProgramConfig` is `repr(C)` with every padding byte written out as a
    // field (its size is asserted in limiter-common), so all its bytes are
    // initialised.
    unsafe {
        std::slice::from_raw_parts(
            std::ptr::from_ref(config).cast::<u8>(),
            size_of::<ProgramConfig>(),
        )
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}
