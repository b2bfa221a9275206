//! `cargo xtask test`: the project's one test command (what CI runs).

use crate::{bench, build_ebpf, cmd, package, setup, vm_test};

#[derive(clap::Args)]
pub struct Options {}

pub fn run(_options: &Options) -> anyhow::Result<()> {
    setup::ensure(setup::Need::All)?;
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
    let (passed, failed) = cargo_test()?;
    // The XDP suite and a real attach in a VM of bookworm's 6.1: 1.5 to 2.5
    // minutes under TCG. The whole matrix (`cargo xtask vm-test`) takes 6 to 9
    // on these shared 2-core machines.
    let matrix = vm_test::run(&vm_test::Options::kernel("6.1"));
    if let Err(e) = &matrix {
        eprintln!("{e:#}");
    }
    // Every benchmark part, briefly, as a smoke test: it must run end to end
    // (peers installed, started, measured, torn down); the figures don't count.
    let smoke = bench::smoke();
    if let Err(e) = &smoke {
        eprintln!("{e:#}");
    }
    // The Debian package, built from the build the smoke run made (release
    // code without the LTO link: `cargo xtask package` links the shipped one
    // with it), checked with lintian, installed, used, removed and purged.
    let packaged = package::build(bench::profile(true)).and_then(|deb| package::check(&deb));
    if let Err(e) = &packaged {
        eprintln!("{e:#}");
    }
    // One closing line for the whole suite: cargo's own last line is that of
    // whichever test binary ran last (often the doc tests, with no test).
    let verdict = |ok: bool| if ok { "passed" } else { "FAILED" };
    println!(
        "tests: {passed} passed, {failed} failed; vm-test (Linux 6.1) {}; bench --quick {}; package {}",
        verdict(matrix.is_ok()),
        verdict(smoke.is_ok()),
        verdict(packaged.is_ok())
    );
    anyhow::ensure!(
        failed == 0 && passed > 0 && matrix.is_ok() && smoke.is_ok() && packaged.is_ok(),
        "the test suite failed"
    );
    Ok(())
}

/// Runs `cargo test`, echoing its output, and sums the per-binary results.
fn cargo_test() -> anyhow::Result<(u64, u64)> {
    use std::io::{BufRead as _, BufReader};
    let mut command = cmd::cargo();
    command
        .args(["test", "--workspace", "--exclude", "limiter-ebpf"])
        .stdout(std::process::Stdio::piped());
    eprintln!("+ cargo test --workspace --exclude limiter-ebpf");
    let mut child = command.spawn()?;
    let stdout = child.stdout.take().expect("piped stdout");
    let (mut passed, mut failed) = (0, 0);
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(summary) = line.strip_prefix("test result: ") {
            passed += count(summary, " passed");
            failed += count(summary, " failed");
        }
    }
    let status = child.wait()?;
    if !status.success() {
        failed = failed.max(1);
    }
    Ok((passed, failed))
}

/// The number before `label` in a cargo summary like `ok. 3 passed; 0 failed; …`.
fn count(summary: &str, label: &str) -> u64 {
    summary
        .split(';')
        .find_map(|part| {
            part.trim()
                .trim_start_matches("ok. ")
                .trim_start_matches("FAILED. ")
                .strip_suffix(label.trim_start())
        })
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}
