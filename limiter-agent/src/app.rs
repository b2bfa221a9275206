//! The running agent: built from a validated config (kernel side, store,
//! proxy, listeners), served until SIGTERM, reloaded on SIGHUP, with its
//! once-a-second housekeeping.

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::{
    admin::{self, Admin, Dashboard, StatusReport},
    cli::RunArgs,
    config::{Config, StoreKind},
    demo,
    fleet::{Fleet, SharedStore},
    identity::Identity,
    kernel::{Banner, Escalation, Kernel},
    limit::{Clock, Decision, RedisStore, Store, SystemClock},
    metrics::{Metrics, ReloadLabels},
    privilege,
    proxy::{Proxy, RejectionSink},
    server,
};

/// The rejection sink set once escalation exists (it needs the fleet, which
/// needs the proxy).
#[derive(Default)]
struct LateSink(std::sync::OnceLock<Arc<Escalation>>);

impl RejectionSink for LateSink {
    fn rejected(
        &self,
        peer: std::net::IpAddr,
        identity: &Identity,
        decision: &Decision,
        window_ms: u64,
        tier: &str,
    ) {
        if let Some(escalation) = self.0.get() {
            escalation.rejected(peer, identity, decision, window_ms, tier);
        }
    }
}

/// How long in-flight requests get to finish after SIGTERM/SIGINT.
const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// Loads and attaches the XDP program unless it is off. Called before any
/// thread exists, so capabilities can be dropped once it is done.
///
/// # Errors
/// The program could not be loaded or attached (not root, old kernel).
pub fn start_kernel(config: &Config) -> anyhow::Result<Option<Arc<Kernel>>> {
    let xdp = &config.startup.xdp;
    if !xdp.enabled {
        tracing::info!("kernel fast path off (--no-xdp or [xdp] enabled = false)");
        return Ok(None);
    }
    let kernel = Kernel::start(config, &xdp.instance, &xdp.interfaces, xdp.persist)
        .context("starting the kernel fast path (run as root, or use --no-xdp)")?;
    Ok(Some(Arc::new(kernel)))
}

/// Everything `run` serves, bound and ready.
pub struct App {
    listener: TcpListener,
    admin_listener: TcpListener,
    /// Envoy's rate limit service, when `[rls] listen` is set.
    rls: Option<(TcpListener, Option<TlsAcceptor>)>,
    tls: Option<TlsAcceptor>,
    proxy: Arc<Proxy>,
    kernel: Option<Arc<Kernel>>,
    escalation: Option<Arc<Escalation>>,
    fleet: Arc<Fleet>,
    reload: Reload,
}

/// What a reload needs besides the running state: where the config came
/// from, and the in-process upstream that replaces the file's.
struct Reload {
    args: RunArgs,
    demo_upstream: Option<http::Uri>,
}

impl App {
    /// Starts the store, builds the proxy and binds both listeners. The
    /// kernel side (if any) is already attached: once the listener accepts,
    /// XDP is in place.
    ///
    /// # Errors
    /// A listener can't be bound, TLS files can't be read, the store can't be
    /// set up.
    pub async fn build(
        args: RunArgs,
        mut config: Config,
        kernel: Option<Arc<Kernel>>,
    ) -> anyhow::Result<Self> {
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
            config.live.upstream = upstream.clone();
        }
        let startup = &config.startup;
        let tls = match &startup.tls {
            Some((cert, key)) => Some(server::tls_acceptor(cert, key)?),
            None => None,
        };
        let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
        let store = shared_store(&config, &clock).await?;
        let metrics = Metrics::new();
        if let Some(kernel) = &kernel {
            metrics.set_kernel(kernel.clone());
        }
        let listener = TcpListener::bind(startup.listen)
            .await
            .with_context(|| format!("binding {}", startup.listen))?;
        let admin_listener = TcpListener::bind(startup.admin_listen)
            .await
            .with_context(|| format!("binding the admin listener {}", startup.admin_listen))?;
        let rls = match startup.rls_listen {
            Some(addr) => {
                let listener = TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding the rls listener {addr}"))?;
                let tls = match &startup.rls_tls {
                    Some((cert, key)) => Some(server::tls_acceptor(cert, key)?),
                    None => None,
                };
                tracing::info!(listen = %listener.local_addr()?, domain = %config.live.rls.domain, tls = tls.is_some(), "envoy rate limit service listening");
                if config.live.rls.secret.is_none() {
                    tracing::warn!(
                        "[rls] has no secret_file: any caller in [rls] clients can charge any \
                         address, so RLS rejections never escalate to kernel bans"
                    );
                }
                Some((listener, tls))
            }
            None => None,
        };
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            listen = %listener.local_addr()?,
            admin = %admin_listener.local_addr()?,
            upstream = %config.live.upstream,
            tiers = config.live.tiers.len(),
            tls = tls.is_some(),
            store = ?startup.store,
            capabilities = ?privilege::effective(),
            "limiter-agent started"
        );
        let (proxy, fleet, escalation) =
            start_fleet(&config, clock, store, metrics, kernel.as_ref()).await?;
        Ok(Self {
            listener,
            admin_listener,
            rls,
            tls,
            proxy,
            kernel,
            escalation,
            fleet,
            reload: Reload {
                args,
                demo_upstream,
            },
        })
    }

    /// Serves until SIGTERM or SIGINT, then drains and detaches (unless the
    /// program is to persist).
    ///
    /// # Errors
    /// Serving failed.
    pub async fn serve(self) -> anyhow::Result<()> {
        let Self {
            listener,
            admin_listener,
            rls,
            tls,
            proxy,
            kernel,
            escalation,
            fleet,
            reload,
        } = self;
        tokio::spawn(fleet.clone().run());
        // Gauges (store health above all) are right before the admin listener serves.
        proxy.housekeeping();
        spawn_housekeeping(proxy.clone(), kernel.clone(), escalation.clone());
        let mut sections: Vec<Arc<dyn StatusReport>> = kernel
            .iter()
            .map(|k| k.clone() as Arc<dyn StatusReport>)
            .collect();
        sections.push(fleet.clone());
        let mut admin = Admin::new(proxy.clone(), sections.clone()).with_api(fleet.clone());
        if proxy.state().config.startup.dashboard {
            let dashboard = Arc::new(
                Dashboard::new(
                    proxy.clone(),
                    kernel.clone().map(|k| k as Arc<dyn StatusReport>),
                )
                .with_fleet(fleet.clone()),
            );
            tokio::spawn(dashboard.clone().run_sampler());
            admin = admin.with_dashboard(dashboard);
        }
        let admin = Arc::new(admin);
        let admin_tls = match &proxy.state().config.startup.admin_tls {
            Some((cert, key)) => Some(
                server::tls_acceptor_with_alpn(cert, key, &[b"http/1.1"])
                    .context("the admin listener's TLS")?,
            ),
            None => None,
        };
        tokio::spawn(admin::serve(admin_listener, admin, admin_tls));
        tokio::spawn(reload.on_hangup(proxy.clone(), kernel.clone(), escalation));
        let (stop_rls, rls_stopped) = tokio::sync::watch::channel(false);
        let rls = rls.map(|(listener, tls)| {
            let mut stopped = rls_stopped;
            tokio::spawn(crate::rls::serve(
                listener,
                proxy.clone(),
                tls,
                async move {
                    let _ = stopped.changed().await;
                },
                DRAIN_DEADLINE,
            ))
        });
        let served = server::serve(listener, proxy, tls, shutdown_signal(), DRAIN_DEADLINE).await;
        let _ = stop_rls.send(true);
        if let Some(rls) = rls {
            let _ = rls.await;
        }
        if let Some(kernel) = &kernel {
            kernel.shutdown();
        }
        served?;
        tracing::info!("stopped");
        Ok(())
    }
}

/// The proxy, the fleet's entries it applies (read once before the first
/// client), and escalation when the kernel is there.
async fn start_fleet(
    config: &Config,
    clock: Arc<dyn Clock>,
    store: Option<Arc<dyn Store>>,
    metrics: Metrics,
    kernel: Option<&Arc<Kernel>>,
) -> anyhow::Result<(Arc<Proxy>, Arc<Fleet>, Option<Arc<Escalation>>)> {
    let shared = match &config.startup.store {
        StoreKind::Redis(settings) => SharedStore::redis(settings),
        StoreKind::Memory => SharedStore::file(&config.startup.state_file),
    }
    .context("opening the fleet's shared entries")?;
    // The proxy and the fleet refer to each other (escalation's bans go
    // through the fleet, which applies to the proxy): the sink is set
    // once both exist.
    let sink = Arc::new(LateSink::default());
    let mut proxy = Proxy::new(config.clone(), clock, store, metrics.clone())?;
    if kernel.is_some() {
        proxy = proxy.with_rejection_sink(sink.clone());
    }
    let proxy = Arc::new(proxy);
    let fleet = Arc::new(Fleet::new(shared, proxy.clone(), kernel.cloned()));
    let escalation = kernel.map(|_| {
        Arc::new(Escalation::new(
            fleet.clone() as Arc<dyn Banner>,
            config,
            metrics.clone(),
        ))
    });
    if let Some(escalation) = &escalation {
        let _ = sink.0.set(escalation.clone());
    }
    // Bans and overrides in force before the first client is served.
    match tokio::time::timeout(Duration::from_secs(3), fleet.refresh()).await {
        Ok(Ok(())) => tracing::info!(
            bans = fleet.view().bans.len(),
            overrides = fleet.view().overrides.len(),
            allow = fleet.view().allow.len(),
            shared = fleet.is_shared(),
            "fleet entries loaded"
        ),
        Ok(Err(e)) => tracing::warn!(error = %e, "fleet entries not loaded yet; retrying"),
        Err(_) => tracing::warn!("fleet entries not loaded in 3 s; retrying"),
    }
    Ok((proxy, fleet, escalation))
}

/// The Redis store, when `[store]` names one; `None` means in-memory.
async fn shared_store(
    config: &Config,
    clock: &Arc<dyn Clock>,
) -> anyhow::Result<Option<Arc<dyn Store>>> {
    let StoreKind::Redis(settings) = &config.startup.store else {
        return Ok(None);
    };
    let store = RedisStore::new(settings, clock.clone(), config.startup.max_buckets)
        .context("setting up the redis store")?;
    // Down at boot is not fatal: the breaker opens and recovery is automatic.
    if let Err(e) = store.probe().await {
        tracing::warn!(error = %e, on_error = ?config.live.on_error, "redis store unreachable at startup");
    }
    Ok(Some(Arc::new(store)))
}

/// Once a second: expired buckets, bans and offenders; store and bucket gauges.
fn spawn_housekeeping(
    proxy: Arc<Proxy>,
    kernel: Option<Arc<Kernel>>,
    escalation: Option<Arc<Escalation>>,
) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            proxy.housekeeping();
            if let Some(kernel) = &kernel {
                let kernel = kernel.clone();
                let _ = tokio::task::spawn_blocking(move || kernel.housekeeping()).await;
            }
            if let Some(escalation) = &escalation {
                escalation.housekeeping();
            }
        }
    });
}

impl Reload {
    /// SIGHUP: re-reads the config file and swaps its live settings in whole;
    /// a bad file is refused (logged and counted) and the running config stays.
    async fn on_hangup(
        self,
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
            let outcome =
                if let Err(e) = self.apply(&proxy, kernel.as_deref(), escalation.as_deref()) {
                    tracing::error!("config reload refused, keeping the running config: {e:#}");
                    "error"
                } else {
                    tracing::info!(
                        tiers = proxy.state().config.live.tiers.len(),
                        "config reloaded"
                    );
                    "ok"
                };
            proxy
                .metrics()
                .reloads
                .get_or_create(&ReloadLabels { result: outcome })
                .inc();
        }
    }

    /// All or nothing: the proxy switches only once the kernel has the new
    /// config; a kernel that refuses it gets the running one back.
    fn apply(
        &self,
        proxy: &Proxy,
        kernel: Option<&Kernel>,
        escalation: Option<&Escalation>,
    ) -> anyhow::Result<()> {
        let mut config = Config::for_run(&self.args)?;
        if let Some(upstream) = &self.demo_upstream {
            config.live.upstream = upstream.clone();
        }
        let running = proxy.state();
        for setting in config.needs_restart(&running.config) {
            tracing::warn!(setting, "changed in the file; takes effect on restart");
        }
        let config = config.reloaded_onto(&running.config);
        let prepared = proxy.prepare(config.clone())?;
        if let Some(kernel) = kernel
            && let Err(e) = kernel.sync(&config)
        {
            if let Err(undo) = kernel.sync(&running.config) {
                tracing::error!(error = %undo, "restoring the running config in the kernel failed");
            }
            return Err(anyhow::Error::new(e).context("pushing the new config to the kernel"));
        }
        proxy.install(prepared);
        if let Some(escalation) = escalation {
            escalation.update(&config);
        }
        Ok(())
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
