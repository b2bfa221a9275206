//! `limiter-agent`: the command-line entry point. Parses the command line,
//! then hands `run` to [`app`](limiter_agent::app) and the maps commands to
//! [`ops`](limiter_agent::ops).

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use limiter_agent::{
    app::{self, App},
    cli::{ApiArgs, Cli, Command, OverrideAction, RunArgs},
    config::Config,
    demo, ops, privilege, rt,
};

/// mimalloc: about 4 % less CPU per proxied request than glibc's allocator
/// (A/B in the proxy bench setup), whose consolidation of freed chunks showed
/// in every request's profile.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit status for a refused config (`EX_USAGE` of sysexits).
const EXIT_BAD_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Run(args) => run(args),
        Command::CheckConfig { file } => match Config::load(&file) {
            Ok(config) => {
                println!("{}: ok", file.display());
                for tier in &config.live.tiers {
                    println!("  {} {} per {:?}", tier.route, tier.limit, tier.window);
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: {e}", file.display());
                ExitCode::from(EXIT_BAD_CONFIG)
            }
        },
        Command::Generate { what } => match what.write(&mut std::io::stdout().lock()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("writing it out: {e}");
                ExitCode::FAILURE
            }
        },
        Command::DemoUpstream { listen, api_keys } => block_on(async {
            let addr = demo::spawn(listen, api_keys)
                .await
                .context("binding the demo upstream")?;
            tracing::info!(%addr, "demo upstream listening");
            tokio::signal::ctrl_c().await.context("waiting for Ctrl-C")
        }),
        Command::Status { target, top, json } => {
            maps_command(|| ops::status(&target.instance, top, json))
        }
        Command::Ban {
            target,
            api,
            net,
            duration,
            reason,
        } => maps_command(|| match api_target(&api, false)? {
            Some(api) => ops::ban_everywhere(&api, &net, &duration, reason.as_deref()),
            None => ops::ban(&target.instance, &net, &duration),
        }),
        Command::Unban { target, api, net } => maps_command(|| match api_target(&api, false)? {
            Some(api) => ops::unban_everywhere(&api, &net),
            None => ops::unban(&target.instance, &net),
        }),
        Command::Override { action } => maps_command(|| match action {
            OverrideAction::Set {
                api,
                key_sha256,
                multiplier,
                limits,
                duration,
            } => ops::override_set(
                &required(api_target(&api, true)?),
                &key_sha256,
                multiplier,
                &limits,
                duration.as_deref(),
            ),
            OverrideAction::List { api, json } => {
                ops::override_list(&required(api_target(&api, true)?), json)
            }
            OverrideAction::Rm { api, key_sha256 } => {
                ops::override_rm(&required(api_target(&api, true)?), &key_sha256)
            }
        }),
    }
}

/// `run`: a refused config exits 64, any later failure 1.
fn run(args: RunArgs) -> ExitCode {
    let config = match Config::for_run(&args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    // Attach before any thread exists, then drop what is no longer needed:
    // the runtime's threads inherit the reduced capabilities.
    let kernel = match app::start_kernel(&config) {
        Ok(kernel) => kernel,
        Err(e) => return report(&e),
    };
    let keep = privilege::needed(
        kernel.is_some(),
        &[
            config.startup.listen.port(),
            config.startup.admin_listen.port(),
        ],
    );
    if let Err(e) = privilege::drop_to(&keep) {
        return report(&anyhow::anyhow!("dropping capabilities: {e}"));
    }
    block_on(async { App::build(args, config, kernel).await?.serve().await })
}

/// Runs `future` to completion on the agent's runtime.
fn block_on(future: impl Future<Output = anyhow::Result<()>>) -> ExitCode {
    rt::build()
        .context("starting the async runtime")
        .and_then(|rt| rt.block_on(future))
        .map_or_else(|e| report(&e), |()| ExitCode::SUCCESS)
}

/// Runs a command on the pinned maps: bad input exits 64, a missing or
/// unreadable pin 1.
/// The admin API to call: with a token file given (or in the
/// environment); `needed` commands call it without one too (reads of an
/// agent without `[admin] token_file` are open).
fn api_target(
    api: &ApiArgs,
    needed: bool,
) -> Result<Option<ops::remote::ApiTarget>, ops::OpsError> {
    let (admin, host) = ops::remote::admin_address(&api.admin)?;
    let tls = host.map(|host| (host, api.ca_file.clone()));
    match ops::remote::ApiTarget::token_file(api.token_file.as_deref()) {
        Some(file) => ops::remote::ApiTarget::new(admin, &file)
            .map(|target| Some(ops::remote::ApiTarget { tls, ..target })),
        None if needed => Ok(Some(ops::remote::ApiTarget {
            admin,
            token: String::new(),
            tls,
        })),
        None => Ok(None),
    }
}

fn required(api: Option<ops::remote::ApiTarget>) -> ops::remote::ApiTarget {
    api.expect("api_target gives one when needed")
}

fn maps_command(f: impl FnOnce() -> Result<(), ops::OpsError>) -> ExitCode {
    match f() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ ops::OpsError::Usage(_)) => {
            eprintln!("limiter-agent: {e}");
            ExitCode::from(EXIT_BAD_CONFIG)
        }
        Err(e) => {
            eprintln!("limiter-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

fn report(e: &anyhow::Error) -> ExitCode {
    eprintln!("limiter-agent: {e:#}");
    ExitCode::FAILURE
}
