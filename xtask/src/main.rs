//! `cargo xtask`: the project's automation, so that every task is one command.

mod bench;
mod build_ebpf;
mod chaos;
mod cmd;
mod package;
mod run;
mod setup;
mod test;
mod vm_test;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "limiter project automation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install everything the eBPF build and the tests need (idempotent; root).
    Setup(setup::Options),
    /// Build the XDP object; prints its path as the last line.
    BuildEbpf(build_ebpf::Options),
    /// Build and run the agent on examples/concurred.toml with the demo upstream.
    Run(run::Options),
    /// The whole test suite: setup, fmt, clippy, every test.
    Test(test::Options),
    /// Benchmarks; results go to target/bench/<name>.json.
    Bench(bench::Options),
    /// The fault-injection suite: three agents sharing Redis and a Redis
    /// Cluster under faults; its report goes into bench/RESULTS.md.
    Chaos(chaos::Options),
    /// The kernel matrix: the XDP suite and a real attach in a VM per kernel.
    VmTest(vm_test::Options),
    /// The Debian package, target/package/limiter_<version>_<arch>.deb.
    Package(package::Options),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Setup(options) => setup::run(&options),
        Command::BuildEbpf(options) => build_ebpf::run(&options),
        Command::Run(options) => run::run(&options),
        Command::Test(options) => test::run(&options),
        Command::Bench(options) => bench::run(&options),
        Command::Chaos(options) => chaos::run(&options),
        Command::VmTest(options) => vm_test::run(&options),
        Command::Package(options) => package::run(&options),
    }
}
