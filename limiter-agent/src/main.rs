//! `limiter-agent`: the command-line entry point.

use std::{process::ExitCode, sync::Arc};

use anyhow::Context as _;
use clap::Parser as _;
use limiter_agent::{
    admin::{self, Admin, StatusReport},
    cli::{Cli, Command, RunArgs},
    config::{Config, StoreKind},
    demo,
    kernel::{Escalation, Kernel},
    limit::{Clock, RedisStore, Store, SystemClock},
    metrics::{Metrics, ReloadLabels},
    ops, privilege,
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
        Command::DemoUpstream { listen, api_keys } => runtime()
            .and_then(|rt| {
                rt.block_on(async {
                    let addr = demo::spawn(listen, api_keys)
                        .await
                        .context("binding the demo upstream")?;
                    tracing::info!(%addr, "demo upstream listening");
                    tokio::signal::ctrl_c().await.context("waiting for Ctrl-C")
                })
            })
            .map_or_else(|e| report(&e), |()| ExitCode::SUCCESS),
        Command::Status { target, top, json } => {
            maps_command(|| ops::status(&target.instance, top, json))
        }
        Command::Ban {
            target,
            net,
            duration,
        } => maps_command(|| ops::ban(&target.instance, &net, &duration)),
        Command::Unban { target, net } => maps_command(|| ops::unban(&target.instance, &net)),
        Command::Run(args) => {
            let config = match load(&args) {
                Ok(config) => config,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(EXIT_BAD_CONFIG);
                }
            };
            // Attach before any thread exists, then drop what is no longer needed:
            // the runtime's threads inherit the reduced capabilities.
            let kernel = match start_kernel(&config) {
                Ok(kernel) => kernel,
                Err(e) => return report(&e),
            };
            let keep = privilege::needed(
                kernel.is_some(),
                &[config.listen.port(), config.admin_listen.port()],
            );
            if let Err(e) = privilege::drop_to(&keep) {
                return report(&anyhow::anyhow!("dropping capabilities: {e}"));
            }
            runtime()
                .and_then(|rt| rt.block_on(run(args, config, kernel)))
                .map_or_else(|e| report(&e), |()| ExitCode::SUCCESS)
        }
    }
}

/// Runs a command on the pinned maps: bad input exits 64, a missing or
/// unreadable pin 1.
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

/// One worker per CPU the process may run on; on a single CPU, a
/// current-thread runtime (no work-stealing, no cross-thread wake-ups).
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let mut builder = if cpus == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    builder
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
    for interface in &args.interfaces {
        if !config.xdp.interfaces.contains(interface) {
            config.xdp.interfaces.push(interface.clone());
        }
    }
    if let Some(instance) = &args.instance {
        anyhow::ensure!(
            limiter_agent::config::valid_instance(instance),
            "--instance: use 1 to 64 letters, digits, `-` or `_`"
        );
        config.xdp.instance.clone_from(instance);
    }
    config.xdp.persist |= args.persist;
    if args.no_xdp {
        config.xdp.enabled = false;
    }
    Ok(config)
}

/// How long in-flight requests get to finish after SIGTERM/SIGINT.
const DRAIN_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

async fn run(args: RunArgs, mut config: Config, kernel: Option<Arc<Kernel>>) -> anyhow::Result<()> {
    let demo_upstream = if args.demo_upstream {
        let addr = demo::spawn("127.0.0.1:0".parse()?, Vec::new())
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
    let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
    let store: Option<Arc<dyn Store>> = match &config.store {
        StoreKind::Memory => None,
        StoreKind::Redis(settings) => {
            let store = RedisStore::new(settings, clock.clone(), config.max_buckets)
                .context("setting up the redis store")?;
            // Down at boot is not fatal: the breaker opens and recovery is automatic.
            if let Err(e) = store.probe().await {
                tracing::warn!(error = %e, on_error = ?config.on_error, "redis store unreachable at startup");
            }
            Some(Arc::new(store))
        }
    };
    // The kernel side is already attached: once the listener accepts, XDP is in place.
    let metrics = Metrics::new();
    if let Some(kernel) = &kernel {
        metrics.set_kernel(kernel.clone());
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let admin_listener = tokio::net::TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("binding the admin listener {}", config.admin_listen))?;
    let local = listener.local_addr()?;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        listen = %local,
        admin = %admin_listener.local_addr()?,
        upstream = %config.upstream,
        tiers = config.tiers.len(),
        tls = tls.is_some(),
        store = ?config.store,
        capabilities = ?privilege::effective(),
        "limiter-agent started"
    );
    let escalation = kernel
        .as_ref()
        .map(|k| Arc::new(Escalation::new(k.clone(), &config, metrics.clone())));
    let mut proxy = Proxy::new(config, clock, store, metrics)?;
    if let Some(escalation) = &escalation {
        proxy = proxy.with_rejection_sink(escalation.clone());
    }
    let proxy = Arc::new(proxy);
    // Gauges (store health above all) are right before the admin listener serves.
    proxy.housekeeping();
    spawn_housekeeping(proxy.clone(), kernel.clone(), escalation.clone());
    let sections: Vec<Arc<dyn StatusReport>> = kernel
        .iter()
        .map(|k| k.clone() as Arc<dyn StatusReport>)
        .collect();
    let admin = Arc::new(Admin::new(proxy.clone(), sections));
    tokio::spawn(admin::serve(admin_listener, admin));
    tokio::spawn(reload_on_hangup(
        args,
        demo_upstream,
        proxy.clone(),
        kernel.clone(),
        escalation,
    ));
    let served = server::serve(listener, proxy, tls, shutdown_signal(), DRAIN_DEADLINE).await;
    if let Some(kernel) = &kernel {
        kernel.shutdown();
    }
    served?;
    tracing::info!("stopped");
    Ok(())
}

/// Loads and attaches the XDP program unless it is off.
fn start_kernel(config: &Config) -> anyhow::Result<Option<Arc<Kernel>>> {
    if !config.xdp.enabled {
        tracing::info!("kernel fast path off (--no-xdp or [xdp] enabled = false)");
        return Ok(None);
    }
    let kernel = Kernel::start(
        config,
        &config.xdp.instance,
        &config.xdp.interfaces,
        config.xdp.persist,
    )
    .context("starting the kernel fast path (run as root, or use --no-xdp)")?;
    Ok(Some(Arc::new(kernel)))
}

/// Once a second: expired buckets, bans and offenders; store and bucket gauges.
fn spawn_housekeeping(
    proxy: Arc<Proxy>,
    kernel: Option<Arc<Kernel>>,
    escalation: Option<Arc<Escalation>>,
) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tick.tick().await;
            proxy.housekeeping();
            if let Some(kernel) = &kernel {
                kernel.housekeeping();
            }
            if let Some(escalation) = &escalation {
                escalation.housekeeping();
            }
        }
    });
}

/// SIGHUP: re-reads the config file and swaps it in whole; a bad file is
/// refused (logged and counted) and the running config stays.
async fn reload_on_hangup(
    args: RunArgs,
    demo_upstream: Option<http::Uri>,
    proxy: Arc<Proxy>,
    kernel: Option<Arc<Kernel>>,
    escalation: Option<Arc<Escalation>>,
) {
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
            for setting in config.needs_restart(&running.config) {
                tracing::warn!(setting, "changed in the file; takes effect on restart");
            }
            // All or nothing: the proxy switches only once the kernel has the
            // new config; a kernel that refuses it gets the running one back.
            let prepared = proxy.prepare(config.clone())?;
            if let Some(kernel) = &kernel
                && let Err(e) = kernel.sync(&config)
            {
                if let Err(undo) = kernel.sync(&running.config) {
                    tracing::error!(error = %undo, "restoring the running config in the kernel failed");
                }
                return Err(anyhow::Error::new(e).context("pushing the new config to the kernel"));
            }
            proxy.install(prepared);
            if let Some(escalation) = &escalation {
                escalation.update(&config);
            }
            Ok(())
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
