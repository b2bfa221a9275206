//! `cargo xtask run`: builds the agent and runs it on the reference config with
//! the built-in demo upstream, listening on 127.0.0.1:8080, with the XDP
//! program attached to `lo` (generic mode; needs root, `-- --no-xdp` without).

use crate::{cmd, setup};

#[derive(clap::Args)]
pub struct Options {
    /// More arguments for `limiter-agent run` (e.g. `--listen 127.0.0.1:8081`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    setup::ensure(setup::Need::Build)?;
    let root = cmd::workspace_root();
    cmd::run(
        cmd::cargo()
            .args(["run", "--package", "limiter-agent", "--", "run", "--config"])
            .arg(root.join("examples/concurred.toml"))
            .arg("--demo-upstream")
            .args(&options.args),
    )
}
