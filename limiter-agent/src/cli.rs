//! The command line: a stable interface (`docs/operating.md` lists the
//! commands).

use std::{net::SocketAddr, path::PathBuf};

use clap::{Parser, Subcommand};

/// Rate limiter for HTTP APIs with an XDP fast path.
#[derive(Parser, Debug)]
#[command(name = "limiter-agent", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the proxy (and, unless --no-xdp, the kernel fast path).
    Run(RunArgs),
    /// Validate a config file: prints the effective tier table or one error (exit 64).
    CheckConfig {
        /// The TOML config file.
        file: PathBuf,
    },
    /// Show the kernel side from the pinned maps: mode, interfaces, ports,
    /// ceilings, top sources, bans, drop counters (works without a running agent).
    Status {
        #[command(flatten)]
        target: Target,
        /// Sources to list, by packets in their current window.
        #[arg(long, default_value_t = 10)]
        top: usize,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Ban an address or network at the API ports: with an admin token
    /// (`--token-file` or `$LIMITER_ADMIN_TOKEN_FILE`), through a running
    /// agent's admin API on every host sharing its store; without, in this
    /// host's pinned maps only.
    Ban {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        api: ApiArgs,
        /// `IP` or `IP/LEN`.
        net: String,
        /// How long: "90s", "10m", "1h"…
        #[arg(long = "for")]
        duration: String,
        /// Why (shown with the ban; through the admin API only).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Lift a ban set by `ban` or by escalation (on every host with an admin token).
    Unban {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        api: ApiArgs,
        /// `IP` or `IP/LEN`, as banned.
        net: String,
    },
    /// Per-key limits at runtime, on every host sharing the store, through a
    /// running agent's admin API.
    Override {
        #[command(subcommand)]
        action: OverrideAction,
    },
    /// Print the man page (roff) or a shell's completion script, generated
    /// from these definitions (the package builds its own with it).
    #[command(hide = true)]
    Generate {
        #[command(subcommand)]
        what: Generated,
    },
    /// Serve only the built-in stand-in upstream (what --demo-upstream runs in-process).
    #[command(hide = true)]
    DemoUpstream {
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: SocketAddr,
        /// Authenticate like a real API: requests without one of these keys
        /// (`Authorization: Bearer` or `X-API-Key`) get 401. Repeatable.
        #[arg(long = "api-key")]
        api_keys: Vec<String>,
    },
}

/// What `generate` prints.
#[derive(Subcommand, Debug)]
pub enum Generated {
    /// The man page, `limiter-agent(8)`; with `--dir`, it and a page per
    /// subcommand (`limiter-agent-run(8)`…) written there as files.
    Man {
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// The completion script for `shell`.
    Completion { shell: clap_complete::Shell },
}

impl Generated {
    /// Writes the man page or completion script for [`Cli`] to `out`.
    ///
    /// # Errors
    /// Writing to `out` failed.
    pub fn write(&self, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        let mut command = <Cli as clap::CommandFactory>::command();
        match self {
            Self::Man { dir: None } => clap_mangen::Man::new(command).section("8").render(out),
            Self::Man { dir: Some(dir) } => {
                command.build();
                let mut pages = vec![("limiter-agent".to_owned(), command.clone())];
                for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
                    let name = format!("limiter-agent-{}", sub.get_name());
                    pages.push((name.clone(), sub.clone().display_name(name)));
                }
                for (name, page) in pages {
                    let mut file = std::fs::File::create(dir.join(format!("{name}.8")))?;
                    clap_mangen::Man::new(page).section("8").render(&mut file)?;
                    writeln!(out, "{name}.8")?;
                }
                Ok(())
            }
            Self::Completion { shell } => {
                clap_complete::generate(*shell, &mut command, "limiter-agent", out);
                Ok(())
            }
        }
    }
}

#[derive(clap::Args, Debug, Clone, Default)]
pub struct RunArgs {
    /// The TOML config file; without it, the built-in reference config
    /// (examples/concurred.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Address to listen on (overrides [server] listen).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Upstream URL (overrides [server] upstream).
    #[arg(long)]
    pub upstream: Option<String>,
    /// Admin address (overrides [admin] listen).
    #[arg(long)]
    pub admin: Option<SocketAddr>,
    /// Serve a built-in stand-in for the API and proxy to it.
    #[arg(long)]
    pub demo_upstream: bool,
    /// Run without the kernel fast path.
    #[arg(long)]
    pub no_xdp: bool,
    /// Attach XDP to this interface (repeatable; adds to [xdp] interfaces).
    #[arg(long = "interface")]
    pub interfaces: Vec<String>,
    /// Pin directory name under /sys/fs/bpf/limiter/ (overrides [xdp] instance).
    #[arg(long)]
    pub instance: Option<String>,
    /// Leave XDP attached when the agent exits (overrides [xdp] persist).
    #[arg(long)]
    pub persist: bool,
    /// Where runtime changes persist with the in-memory store (overrides
    /// `[admin] state_file`).
    #[arg(long)]
    pub state_file: Option<PathBuf>,
    /// This host's name in the fleet (overrides `[admin] node`).
    #[arg(long)]
    pub node: Option<String>,
}

/// `override`'s actions.
#[derive(Subcommand, Debug)]
pub enum OverrideAction {
    /// Set a key's limits: a multiplier of every tier's, and/or exact
    /// limits per route; replaces its `[[key]]` entry while in force.
    Set {
        #[command(flatten)]
        api: ApiArgs,
        /// The key's SHA-256, 64 hex digits (`printf %s "$KEY" | sha256sum`).
        key_sha256: String,
        #[arg(long)]
        multiplier: Option<f64>,
        /// `ROUTE=LIMIT` (repeatable), the route as a tier names it.
        #[arg(long = "limit")]
        limits: Vec<String>,
        /// Lapses after this long ("1h", "7d"); without: until removed.
        #[arg(long = "for")]
        duration: Option<String>,
    },
    /// List the overrides in force.
    List {
        #[command(flatten)]
        api: ApiArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Remove a key's override.
    Rm {
        #[command(flatten)]
        api: ApiArgs,
        key_sha256: String,
    },
}

/// Where a running agent's admin API is.
#[derive(clap::Args, Debug, Clone)]
pub struct ApiArgs {
    /// The agent's admin listener: `IP:PORT`, or `https://HOST:PORT` when it
    /// speaks TLS (`[admin] tls_cert`).
    #[arg(long = "admin", default_value = "127.0.0.1:9090")]
    pub admin: String,
    /// With `https://`, the CA certificates (PEM) to trust.
    #[arg(long, default_value = "/etc/ssl/certs/ca-certificates.crt")]
    pub ca_file: PathBuf,
    /// A file holding an admin token (`name:token` or the token), as in
    /// `[admin] token_file`; default `$LIMITER_ADMIN_TOKEN_FILE`.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
}

/// Which agent instance a maps command acts on.
#[derive(clap::Args, Debug)]
pub struct Target {
    /// The instance (pin directory under /sys/fs/bpf/limiter/).
    #[arg(long, default_value = "default")]
    pub instance: String,
}
