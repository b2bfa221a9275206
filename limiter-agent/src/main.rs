//! `limiter-agent`: the command-line entry point.

use std::{process::ExitCode, sync::Arc};

use anyhow::Context as _;
use clap::Parser as _;
use limiter_agent::{
    cli::{Cli, Command, RunArgs},
    config::Config,
    demo,
    limit::{Clock, SystemClock},
    proxy::Proxy,
    server,
};

/// Exit status for a refused config (`EX_USAGE` of sysexits).
const EXIT_BAD_CONFIG: u8 = 64;

/// The built-in reference config: used when `run` gets no `--config`.
const DEFAULT_CONFIG: &str = include_str!("../../examples/concurred.toml");

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
        Command::CheckConfig { file } => match Config::load(&file) {
            Ok(config) => {
                println!("{}: ok", file.display());
                for tier in &config.tiers {
                    println!("  {} {} per {:?}", tier.route, tier.limit, tier.window);
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: {e}", file.display());
                ExitCode::from(EXIT_BAD_CONFIG)
            }
        },
        Command::DemoUpstream { listen } => runtime()
            .and_then(|rt| {
                rt.block_on(async {
                    let addr = demo::spawn(listen)
                        .await
                        .context("binding the demo upstream")?;
                    tracing::info!(%addr, "demo upstream listening");
                    tokio::signal::ctrl_c().await.context("waiting for Ctrl-C")
                })
            })
            .map_or_else(|e| report(&e), |()| ExitCode::SUCCESS),
        Command::Run(args) => {
            let config = match load(&args) {
                Ok(config) => config,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(EXIT_BAD_CONFIG);
                }
            };
            runtime()
                .and_then(|rt| rt.block_on(run(args, config)))
                .map_or_else(|e| report(&e), |()| ExitCode::SUCCESS)
        }
    }
}

fn report(e: &anyhow::Error) -> ExitCode {
    eprintln!("limiter-agent: {e:#}");
    ExitCode::FAILURE
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// The config file (or the built-in one) with the command-line overrides.
fn load(args: &RunArgs) -> anyhow::Result<Config> {
    let mut config = match &args.config {
        Some(path) => Config::load(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
        None => {
            Config::parse(DEFAULT_CONFIG).map_err(|e| anyhow::anyhow!("built-in config: {e}"))?
        }
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(admin) = args.admin {
        config.admin_listen = admin;
    }
    if let Some(upstream) = &args.upstream {
        config.upstream = upstream
            .parse()
            .ok()
            .filter(|u: &http::Uri| u.scheme_str() == Some("http") && u.authority().is_some())
            .ok_or_else(|| {
                anyhow::anyhow!("--upstream: `{upstream}` must be an http://host:port URL")
            })?;
    }
    config
        .xdp
        .interfaces
        .extend(args.interfaces.iter().cloned());
    Ok(config)
}

async fn run(args: RunArgs, mut config: Config) -> anyhow::Result<()> {
    if config.xdp.enabled && !args.no_xdp {
        anyhow::bail!(
            "the kernel fast path is not wired into the agent yet: run with --no-xdp \
             (or set [xdp] enabled = false)"
        );
    }
    if args.demo_upstream {
        let addr = demo::spawn("127.0.0.1:0".parse()?)
            .await
            .context("starting the demo upstream")?;
        config.upstream = format!("http://{addr}").parse()?;
        tracing::info!(%addr, "demo upstream listening");
    }
    let tls = match &config.tls {
        Some((cert, key)) => Some(server::tls_acceptor(cert, key)?),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let local = listener.local_addr()?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        listen = %local,
        upstream = %config.upstream,
        tiers = config.tiers.len(),
        tls = tls.is_some(),
        store = ?config.store,
        "limiter-agent started"
    );
    let proxy = Arc::new(Proxy::new(config, clock.clone())?);
    let reclaimer = proxy.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tick.tick().await;
            reclaimer.store().reclaim(clock.now_ms());
        }
    });
    tokio::select! {
        result = server::serve(listener, proxy, tls) => result,
        () = shutdown_signal() => {
            tracing::info!("shutting down");
            Ok(())
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
