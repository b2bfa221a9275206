//! `limiter-agent`: the command-line entry point.

use std::{process::ExitCode, sync::Arc};

use anyhow::Context as _;
use clap::Parser as _;
use limiter_agent::{
    admin::{self, Admin},
    cli::{Cli, Command, RunArgs},
    config::{Config, StoreKind},
    demo,
    limit::{Clock, Store, SystemClock},
    metrics::{Metrics, ReloadLabels},
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

/// How long in-flight requests get to finish after SIGTERM/SIGINT.
const DRAIN_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

async fn run(args: RunArgs, mut config: Config) -> anyhow::Result<()> {
    if config.xdp.enabled && !args.no_xdp {
        anyhow::bail!(
            "the kernel fast path is not wired into the agent yet: run with --no-xdp \
             (or set [xdp] enabled = false)"
        );
    }
    let demo_upstream = if args.demo_upstream {
        let addr = demo::spawn("127.0.0.1:0".parse()?)
            .await
            .context("starting the demo upstream")?;
        tracing::info!(%addr, "demo upstream listening");
        Some(format!("http://{addr}").parse::<http::Uri>()?)
    } else {
        None
    };
    if let Some(upstream) = &demo_upstream {
        config.upstream = upstream.clone();
    }
    let tls = match &config.tls {
        Some((cert, key)) => Some(server::tls_acceptor(cert, key)?),
        None => None,
    };
    let store: Option<Arc<dyn Store>> = match &config.store {
        StoreKind::Memory => None,
        StoreKind::Redis { .. } => {
            anyhow::bail!("[store] kind = \"redis\" is not supported by this build")
        }
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let admin_listener = tokio::net::TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("binding the admin listener {}", config.admin_listen))?;
    let local = listener.local_addr()?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        listen = %local,
        admin = %admin_listener.local_addr()?,
        upstream = %config.upstream,
        tiers = config.tiers.len(),
        tls = tls.is_some(),
        store = ?config.store,
        "limiter-agent started"
    );
    let metrics = Metrics::new();
    let proxy = Arc::new(Proxy::new(config, clock, store, metrics)?);
    let housekeeper = proxy.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tick.tick().await;
            housekeeper.housekeeping();
        }
    });
    let admin = Arc::new(Admin::new(proxy.clone(), Vec::new()));
    tokio::spawn(admin::serve(admin_listener, admin));
    tokio::spawn(reload_on_hangup(args, demo_upstream, proxy.clone()));
    server::serve(listener, proxy, tls, shutdown_signal(), DRAIN_DEADLINE).await?;
    tracing::info!("stopped");
    Ok(())
}

/// SIGHUP: re-reads the config file and swaps it in whole; a bad file is
/// refused (logged and counted) and the running config stays.
async fn reload_on_hangup(args: RunArgs, demo_upstream: Option<http::Uri>, proxy: Arc<Proxy>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hangup) = signal(SignalKind::hangup()) else {
        tracing::warn!("no SIGHUP handler: config reload disabled");
        return;
    };
    while hangup.recv().await.is_some() {
        let result = load(&args).and_then(|mut config| {
            if let Some(upstream) = &demo_upstream {
                config.upstream = upstream.clone();
            }
            let running = proxy.state();
            for (what, changed) in [
                ("listen", config.listen != running.config.listen),
                (
                    "admin.listen",
                    config.admin_listen != running.config.admin_listen,
                ),
                ("tls", config.tls != running.config.tls),
                ("store", config.store != running.config.store),
            ] {
                if changed {
                    tracing::warn!(
                        setting = what,
                        "changed in the file; takes effect on restart"
                    );
                }
            }
            proxy.reload(config).map_err(anyhow::Error::from)
        });
        let outcome = if let Err(e) = result {
            tracing::error!("config reload refused, keeping the running config: {e:#}");
            "error"
        } else {
            tracing::info!(tiers = proxy.state().config.tiers.len(), "config reloaded");
            "ok"
        };
        proxy
            .metrics()
            .reloads
            .get_or_create(&ReloadLabels { result: outcome })
            .inc();
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
