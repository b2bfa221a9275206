//! The fleet acts as one: bans (escalation, the CLI, the admin API), per-key
//! overrides and allow entries live in the shared store (Redis, or with the
//! in-memory store a local file), and every agent applies what is there: bans
//! to its kernel ban list (and to the proxy's own check), allow entries to the
//! kernel allow list, overrides to its limits.
//!
//! Each agent asks the store every [`POLL`] what changed since the version
//! it applied (one small script call; the changes themselves when there are
//! some), so a change reaches every host within a poll and a round trip; one
//! that starts, restarts, reconnects or falls too far behind reads
//! everything. A ban escalation makes here is in this host's kernel at once
//! and published after (never shortening a longer ban another host made);
//! until the store has it (Redis down), it is kept and published again. A
//! host never applies a ban covering its trusted proxies or its allow list,
//! whoever asked. Only the host that made an entry removes it from the store
//! when it lapses (another does, [`EXPIRY_GRACE`] later), so a host whose
//! clock runs ahead cannot end the fleet's bans early.

use std::{
    collections::HashMap,
    num::NonZeroU32,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use ipnet::IpNet;

mod api;
pub mod record;
pub mod shared;

pub use self::shared::{SharedError, SharedStore};
use self::{
    record::{Allow, Ban, Change, Kind, Override, Shared, json},
    shared::{Delta, Written},
};
use crate::{
    kernel::{BanCause, Banner, Kernel, monotonic_ns, report::origins_path},
    net::widen,
    proxy::{BanList, Proxy, Runtime, RuntimeOverride, unix_ms},
};

/// How often each agent asks whether anything changed.
pub const POLL: Duration = Duration::from_millis(200);
/// Lapsed entries are asked to be removed at most this often.
const LAPSE_EVERY: Duration = Duration::from_secs(1);
/// Delta pages one poll reads at most (a host further behind goes on at
/// the next poll).
const DELTA_PAGES: usize = 16;
/// Everything is read again at least this often, whatever the version says
/// (and the kernel's ban list checked against what this host applied).
const FULL_READ: Duration = Duration::from_secs(30);
/// How long after an entry lapses a host other than its maker removes it.
pub const EXPIRY_GRACE_MS: u64 = 60_000;
/// [`EXPIRY_GRACE_MS`] as a duration, for the docs.
pub const EXPIRY_GRACE: Duration = Duration::from_millis(EXPIRY_GRACE_MS);
/// Longest ban or override lifetime accepted (ten years).
pub const MAX_SECONDS: u64 = 10 * 365 * 86_400;

/// The origins file: the store's bans and this host's unpublished ones.
#[derive(Default, serde::Serialize, serde::Deserialize)]
struct Origins {
    #[serde(default)]
    store: std::collections::BTreeMap<String, Ban>,
    #[serde(default)]
    local: std::collections::BTreeMap<String, Ban>,
}

/// A ban made on this host, kept until the store is seen holding it.
struct Pending {
    ban: Ban,
    published: bool,
}

/// What this host applied, to undo only that.
#[derive(Default)]
struct Applied {
    version: Option<u64>,
    /// The nonce of the change at `version`: the history it belongs to.
    nonce: String,
    /// Reads put in force so far (a full read started before another
    /// install is not put in force).
    installs: u64,
    shared: Arc<Shared>,
    pending: HashMap<String, Pending>,
    /// Kernel ban entries this host put there, with their end (Unix ms).
    kernel_bans: HashMap<IpNet, u64>,
    kernel_allow: Vec<IpNet>,
    /// Bans in `shared` this host does not apply, and why.
    skipped: HashMap<String, &'static str>,
    /// Kernel bans that failed (a full map): tried again on the next full read.
    kernel_failed: std::collections::HashSet<IpNet>,
    /// The store's bans the previous run applied (the origins file): what
    /// this host shows and keeps until its first read of the store.
    seeded: std::collections::BTreeMap<String, Ban>,
    /// What the origins file holds.
    origins_written: Vec<u8>,
    /// Something changed since the last apply.
    dirty: bool,
    /// The next time an applied entry lapses (Unix ms): apply again then.
    next_lapse_ms: u64,
}

/// The fleet's entries on this host.
pub struct Fleet {
    node: String,
    store: SharedStore,
    kernel: Option<Arc<Kernel>>,
    proxy: Arc<Proxy>,
    applied: Mutex<Applied>,
    /// Bans escalation made on the request path, for the poll task: the
    /// request holds this lock for a push only.
    escalations: Mutex<Vec<(IpNet, Ban)>>,
    /// What GETs and the dashboard show: the last read, with local pending bans.
    view: ArcSwap<Shared>,
    wake: tokio::sync::Notify,
    /// When the store was last read (Unix ms), 0 = never.
    synced_ms: AtomicU64,
    /// A failed removal of lapsed entries was logged.
    lapse_warned: std::sync::atomic::AtomicBool,
    /// Where `limiter-agent status` finds the bans' origins.
    origins_file: Option<std::path::PathBuf>,
}

/// Why a change was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// The change names something this host refuses (a protected network,
    /// an unknown route…): a 400.
    #[error("{0}")]
    Refused(String),
    /// The store could not take it: a 503.
    #[error(transparent)]
    Store(#[from] SharedError),
}

impl Fleet {
    /// The fleet on `store`, applying to `proxy` and `kernel`; nothing is
    /// read until [`Fleet::run`] or [`Fleet::refresh`].
    #[must_use]
    pub fn new(store: SharedStore, proxy: Arc<Proxy>, kernel: Option<Arc<Kernel>>) -> Self {
        let node = proxy.state().config.startup.node.clone();
        let origins_file = kernel
            .as_ref()
            .map(|_| origins_path(&proxy.state().config.startup.xdp.instance));
        // The fleet's bans a previous run put in the (pinned) kernel maps:
        // applied already, and lifted if the store no longer has them.
        let origins: Origins = origins_file
            .as_deref()
            .and_then(|path| std::fs::read(path).ok())
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        let seeded = origins.store.clone();
        let kernel_bans = origins
            .store
            .iter()
            .chain(&origins.local)
            .filter_map(|(net, ban)| Some((net.parse().ok()?, ban.until_ms)))
            .collect();
        // Bans escalation made here that were not published yet: still
        // this host's to publish.
        let pending = origins
            .local
            .into_iter()
            .map(|(net, ban)| {
                (
                    net,
                    Pending {
                        ban,
                        published: false,
                    },
                )
            })
            .collect();
        Self {
            node,
            store,
            kernel,
            proxy,
            applied: Mutex::new(Applied {
                pending,
                kernel_bans,
                seeded,
                // The first apply shows what the kernel keeps.
                dirty: true,
                ..Applied::default()
            }),
            escalations: Mutex::default(),
            view: ArcSwap::from_pointee(Shared::default()),
            wake: tokio::sync::Notify::new(),
            synced_ms: AtomicU64::new(0),
            lapse_warned: std::sync::atomic::AtomicBool::new(false),
            origins_file,
        }
    }

    /// This host's name in the fleet.
    #[must_use]
    pub fn node(&self) -> &str {
        &self.node
    }

    /// What is in force, as last read (with this host's unpublished bans).
    #[must_use]
    pub fn view(&self) -> Arc<Shared> {
        self.view.load_full()
    }

    /// Bans in the store this host does not apply, and why.
    #[must_use]
    pub fn skipped(&self) -> Vec<(String, &'static str)> {
        let mut skipped: Vec<_> = self
            .lock()
            .skipped
            .iter()
            .map(|(net, why)| (net.clone(), *why))
            .collect();
        skipped.sort();
        skipped
    }

    /// When the store was last read, Unix ms (0: never).
    #[must_use]
    pub fn synced_ms(&self) -> u64 {
        self.synced_ms.load(Ordering::Relaxed)
    }

    /// Whether other hosts share the entries (Redis) or they are this
    /// host's (a file).
    #[must_use]
    pub fn is_shared(&self) -> bool {
        self.store.is_shared()
    }

    fn lock(&self) -> MutexGuard<'_, Applied> {
        self.applied.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Polls the store until the task is dropped.
    pub async fn run(self: Arc<Self>) {
        let mut last_full = tokio::time::Instant::now();
        let mut failing = false;
        let mut last_lapse = tokio::time::Instant::now();
        loop {
            let full = last_full.elapsed() >= FULL_READ;
            let outcome = self.tick(full).await;
            // Tried once per period, failed or not (deltas go on meanwhile);
            // one another read overtook is tried again at the next poll.
            if full && !matches!(outcome, Ok(false)) {
                last_full = tokio::time::Instant::now();
            }
            // Escalations queued from the request path; deadlines pass with
            // the store reachable or not.
            self.take_escalations();
            self.apply_if_due();
            if self.lock().next_lapse_ms <= unix_ms() && last_lapse.elapsed() >= LAPSE_EVERY {
                last_lapse = tokio::time::Instant::now();
                self.remove_lapsed().await;
            }
            match outcome {
                Ok(_) => {
                    if failing {
                        tracing::info!("fleet entries readable again");
                        failing = false;
                    }
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "fleet entries unreadable; keeping what is applied");
                        failing = true;
                    }
                }
            }
            tokio::select! {
                () = tokio::time::sleep(POLL) => {}
                () = self.wake.notified() => {}
            }
        }
    }

    /// One poll: publishes this host's pending bans, then reads what
    /// changed (everything when `full`). Whether a full read asked for was
    /// put in force.
    async fn tick(&self, full: bool) -> Result<bool, SharedError> {
        self.take_escalations();
        self.publish_pending().await;
        if full {
            self.check_kernel();
            if let Ok(installed) = self.refresh_installed().await {
                return Ok(installed);
            }
        }
        self.catch_up().await.map(|()| true)
    }

    /// Reads what changed since the version applied, a page at a time
    /// (everything when this host has none yet, is too far behind, or the
    /// store's history is not the one it applied).
    async fn catch_up(&self) -> Result<(), SharedError> {
        for _ in 0..DELTA_PAGES {
            let (since, nonce) = {
                let applied = self.lock();
                (applied.version, applied.nonce.clone())
            };
            let Some(since) = since else {
                return self.refresh().await;
            };
            match self.store.delta(since, &nonce).await? {
                Delta::None => {
                    self.synced_ms.store(unix_ms(), Ordering::Relaxed);
                    return Ok(());
                }
                Delta::Full => return self.refresh().await,
                Delta::Changes {
                    version,
                    nonce,
                    entries,
                    changes,
                } => {
                    self.synced_ms.store(unix_ms(), Ordering::Relaxed);
                    if !self.install_delta(since, version, nonce, &entries, changes) {
                        return Ok(());
                    }
                }
            }
        }
        self.remove_lapsed().await;
        Ok(())
    }

    /// Puts a delta read at `since` in force, unless another read got
    /// further meanwhile (it has these too); whether it did.
    fn install_delta(
        &self,
        since: u64,
        version: u64,
        nonce: String,
        entries: &[(Kind, String, Option<String>)],
        changes: Vec<Change>,
    ) -> bool {
        let mut applied = self.lock();
        if applied.version != Some(since) {
            return false;
        }
        let shared = Arc::make_mut(&mut applied.shared);
        for (kind, name, value) in entries {
            shared.set(*kind, name, value.as_deref());
        }
        shared.changes = changes;
        applied.version = Some(version);
        applied.nonce = nonce;
        applied.installs += 1;
        Self::settle_pending(&mut applied);
        applied.dirty = true;
        true
    }

    /// Reads everything now and applies it (unless another read installed
    /// something meanwhile: this one may be older; the next poll catches up).
    ///
    /// # Errors
    /// The store could not be read; what is applied stays.
    pub async fn refresh(&self) -> Result<(), SharedError> {
        self.refresh_installed().await.map(|_| ())
    }

    /// [`Fleet::refresh`], saying whether it put the read in force.
    async fn refresh_installed(&self) -> Result<bool, SharedError> {
        let installs = self.lock().installs;
        let snapshot = self.store.read().await?;
        self.synced_ms.store(unix_ms(), Ordering::Relaxed);
        {
            let mut applied = self.lock();
            if applied.installs != installs {
                return Ok(false);
            }
            applied.version = Some(snapshot.version);
            applied.nonce = snapshot.nonce;
            applied.shared = Arc::new(snapshot.shared);
            applied.installs += 1;
            applied.seeded.clear();
            Self::settle_pending(&mut applied);
            applied.dirty = true;
        }
        self.remove_lapsed().await;
        self.apply_if_due();
        Ok(true)
    }

    /// Bans made here that the store holds as they are, or that an
    /// operator decided about since, are no longer this host's to keep.
    fn settle_pending(applied: &mut Applied) {
        let shared = Arc::clone(&applied.shared);
        let now = unix_ms();
        applied.pending.retain(|net, pending| {
            pending.ban.until_ms > now
                && shared
                    .bans
                    .get(net)
                    .is_none_or(|b| !Self::supersedes(b, &pending.ban))
        });
    }

    /// Whether `stored` decides over `made_here` for the same network: it
    /// lasts as long or longer, or an operator made it since.
    fn supersedes(stored: &Ban, made_here: &Ban) -> bool {
        stored.until_ms >= made_here.until_ms
            || (stored.by != "escalation" && stored.at_ms >= made_here.at_ms)
    }

    /// Asks the store to remove the entries that look lapsed by this host's
    /// clock; the store decides by its own (this host's own entries at
    /// once, others' [`EXPIRY_GRACE`] after).
    async fn remove_lapsed(&self) {
        let shared = Arc::clone(&self.lock().shared);
        let now = unix_ms();
        for (kind, name, was) in shared.expired(now) {
            let (origin, until) = serde_json::from_str::<serde_json::Value>(&was)
                .map(|v| {
                    (
                        v["origin"].as_str().unwrap_or_default().to_owned(),
                        v["until_ms"].as_u64().unwrap_or(0),
                    )
                })
                .unwrap_or_default();
            if origin != self.node && until.saturating_add(EXPIRY_GRACE_MS) > now {
                continue;
            }
            if let Err(e) = self
                .store
                .lapse(kind, &name, &self.node, EXPIRY_GRACE_MS)
                .await
            {
                if !self.lapse_warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "lapsed fleet entries cannot be removed from the store");
                }
                return;
            }
        }
    }

    /// Before a full read: kernel ban entries this host applied but the
    /// map lost (removed by hand, maps recreated) are applied again, and
    /// those the kernel refused are tried again.
    fn check_kernel(&self) {
        let Some(kernel) = &self.kernel else {
            return;
        };
        let present: std::collections::HashSet<IpNet> = kernel.ban_nets().into_iter().collect();
        let mut applied = self.lock();
        let before = applied.kernel_bans.len();
        applied.kernel_bans.retain(|net, _| present.contains(net));
        if applied.kernel_bans.len() != before {
            tracing::warn!(
                missing = before - applied.kernel_bans.len(),
                "fleet bans missing from the kernel map; applying them again"
            );
            applied.dirty = true;
        }
        if !applied.kernel_failed.is_empty() {
            applied.kernel_failed.clear();
            applied.dirty = true;
        }
    }

    /// Applies when something changed or an entry lapsed since the last
    /// time. Before the store was first read, only adds (see [`Fleet::apply`]).
    fn apply_if_due(&self) {
        let due = {
            let applied = self.lock();
            applied.dirty || applied.next_lapse_ms <= unix_ms()
        };
        if due {
            self.apply();
        }
    }

    /// Moves the bans escalation queued into this host's pending list.
    fn take_escalations(&self) {
        let queued = std::mem::take(
            &mut *self
                .escalations
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        if queued.is_empty() {
            return;
        }
        let mut applied = self.lock();
        for (net, ban) in queued {
            applied.kernel_bans.insert(net, ban.until_ms);
            applied.pending.insert(
                net.to_string(),
                Pending {
                    ban,
                    published: false,
                },
            );
        }
        applied.dirty = true;
    }

    /// Publishes the bans escalation made here. With the in-memory store
    /// there is no other host to tell: they stay this host's (the kernel's
    /// pinned maps keep them across a restart).
    async fn publish_pending(&self) {
        if !self.store.is_shared() {
            return;
        }
        let unpublished: Vec<(String, Ban)> = self
            .lock()
            .pending
            .iter()
            .filter(|(_, p)| !p.published)
            .map(|(net, p)| (net.clone(), p.ban.clone()))
            .collect();
        for (net, ban) in unpublished {
            // Lifted meanwhile (an operator's unban): not published.
            if !self.lock().pending.contains_key(&net) {
                continue;
            }
            let change = Change {
                at_ms: ban.at_ms,
                origin: ban.origin.clone(),
                by: ban.by.clone(),
                action: "put".into(),
                kind: Kind::Bans,
                target: net.clone(),
            };
            match self
                .store
                .write(
                    Kind::Bans,
                    &net,
                    Some(&json(&ban)),
                    Some(&change),
                    None,
                    true,
                )
                .await
            {
                Ok(written) => {
                    if written == Written::Full {
                        tracing::warn!(%net, "the fleet's ban list is full: ban kept on this host only");
                    }
                    if let Some(p) = self.lock().pending.get_mut(&net) {
                        p.published = true;
                    }
                }
                Err(e) => {
                    tracing::debug!(%net, error = %e, "ban not published yet");
                    if matches!(e, SharedError::Timeout) {
                        return;
                    }
                }
            }
        }
    }

    /// Networks this host never bans: its trusted proxies and allow lists.
    fn protected(&self, shared: &Shared) -> Vec<IpNet> {
        let state = self.proxy.state();
        let live = &state.config.live;
        let mut nets: Vec<IpNet> = live.trusted_proxies.as_slice().to_vec();
        nets.extend_from_slice(live.xdp.allow.as_slice());
        nets.extend(shared.allow.keys().filter_map(|n| n.parse::<IpNet>().ok()));
        nets
    }

    /// Puts what was read (and this host's pending bans) in force: kernel
    /// bans and allow entries, the proxy's overrides and bans, the view.
    fn apply(&self) {
        let now = unix_ms();
        let mut applied = self.lock();
        applied.dirty = false;
        let mut view = (*applied.shared).clone();
        // Before the store is first read, what the previous run applied
        // stands in for it: nothing is lifted on an empty list.
        let read = applied.version.is_some();
        if !read {
            view.bans.extend(applied.seeded.clone());
        }
        // A pending ban is kept only while the store's does not decide over
        // it (`settle_pending`): it wins.
        for (net, pending) in &applied.pending {
            view.bans.insert(net.clone(), pending.ban.clone());
        }
        view.bans.retain(|_, b| b.until_ms > now);
        view.overrides
            .retain(|_, o| o.until_ms.is_none_or(|until| until > now));
        view.allow
            .retain(|_, a| a.until_ms.is_none_or(|until| until > now));
        applied.next_lapse_ms = view
            .bans
            .values()
            .map(|b| b.until_ms)
            .chain(view.overrides.values().filter_map(|o| o.until_ms))
            .chain(view.allow.values().filter_map(|a| a.until_ms))
            .min()
            .unwrap_or(u64::MAX);
        let protected = self.protected(&view);
        let prefix = self.proxy.state().config.live.ipv6_prefix;
        let mut bans: HashMap<IpNet, u64> = HashMap::new();
        let mut skipped = HashMap::new();
        for (name, ban) in &view.bans {
            let Ok(net) = name.parse::<IpNet>() else {
                skipped.insert(name.clone(), "not a network");
                continue;
            };
            let net = widen(net, prefix);
            if protected.iter().any(|p| overlaps(*p, net)) {
                skipped.insert(
                    name.clone(),
                    "covers a trusted proxy or an allowed network here",
                );
                continue;
            }
            let until = bans.entry(net).or_insert(0);
            *until = (*until).max(ban.until_ms);
        }
        for (name, why) in &skipped {
            if !applied.skipped.contains_key(name) {
                tracing::warn!(net = %name, why, "fleet ban not applied on this host");
            }
        }
        applied.skipped = skipped;
        let allow: Vec<IpNet> = view
            .allow
            .keys()
            .filter_map(|n| n.parse::<IpNet>().ok())
            .collect();
        if let Some(kernel) = &self.kernel {
            Self::apply_kernel(kernel, &mut applied, &bans, allow, now, prefix, read);
        }
        let overrides = view
            .overrides
            .iter()
            .map(|(key, o)| {
                (
                    key.clone(),
                    RuntimeOverride {
                        multiplier: o.multiplier,
                        limits: o
                            .limits
                            .iter()
                            .filter_map(|(route, limit)| {
                                NonZeroU32::new(*limit).map(|l| (route.clone(), l))
                            })
                            .collect(),
                        until_ms: o.until_ms,
                    },
                )
            })
            .collect();
        self.proxy.set_runtime(Runtime {
            overrides,
            bans: BanList::new(bans, prefix),
        });
        self.write_origins(&mut applied);
        if *self.view.load_full() != view {
            self.view.store(Arc::new(view));
        }
    }

    fn apply_kernel(
        kernel: &Kernel,
        applied: &mut Applied,
        bans: &HashMap<IpNet, u64>,
        allow: Vec<IpNet>,
        now: u64,
        prefix: u8,
        lift: bool,
    ) {
        let mono = monotonic_ns();
        let to_mono = |until_ms: u64| {
            mono.saturating_add(until_ms.saturating_sub(now).saturating_mul(1_000_000))
        };
        let stale: Vec<IpNet> = applied
            .kernel_bans
            .keys()
            .filter(|net| lift && !bans.contains_key(net))
            .copied()
            .collect();
        for net in stale {
            applied.kernel_bans.remove(&net);
            match kernel.maps().unban(net, prefix) {
                Ok(_) => tracing::info!(%net, "fleet ban lifted in the kernel"),
                Err(e) => tracing::error!(%net, "lifting a fleet ban: {e}"),
            }
        }
        for (net, until) in bans {
            if applied.kernel_bans.get(net) == Some(until) || applied.kernel_failed.contains(net) {
                continue;
            }
            match kernel.maps().ban(*net, to_mono(*until), prefix) {
                Ok(_) => {
                    applied.kernel_bans.insert(*net, *until);
                }
                Err(e) => {
                    // Tried again on the next full read, not every poll.
                    applied.kernel_failed.insert(*net);
                    tracing::error!(%net, "applying a fleet ban: {e}");
                }
            }
        }
        if lift && applied.kernel_allow != allow {
            match kernel.set_runtime_allow(allow.clone()) {
                Ok(()) => applied.kernel_allow = allow,
                Err(e) => tracing::error!("applying the fleet allow list: {e}"),
            }
        }
    }

    /// For `limiter-agent status` (each ban's origin) and the next run (the
    /// store's bans it finds in the kernel).
    fn write_origins(&self, applied: &mut Applied) {
        let Some(path) = &self.origins_file else {
            return;
        };
        let origins = Origins {
            store: applied.shared.bans.clone(),
            local: applied
                .pending
                .iter()
                .map(|(net, p)| (net.clone(), p.ban.clone()))
                .collect(),
        };
        let bytes = serde_json::to_vec(&origins).unwrap_or_default();
        if bytes == applied.origins_written {
            return;
        }
        applied.origins_written.clone_from(&bytes);
        let aside = path.with_extension("tmp");
        if std::fs::write(&aside, bytes)
            .and_then(|()| std::fs::rename(&aside, path))
            .is_err()
        {
            tracing::debug!(path = %path.display(), "ban origins not written");
        }
    }

    /// Records `change` and writes `value` (`None` removes) under `name`.
    async fn change(
        &self,
        kind: Kind,
        name: &str,
        value: Option<String>,
        by: &str,
    ) -> Result<bool, FleetError> {
        let change = Change {
            at_ms: unix_ms(),
            origin: self.node.clone(),
            by: by.to_owned(),
            action: if value.is_some() { "put" } else { "delete" }.into(),
            kind,
            target: name.to_owned(),
        };
        let existed = match self
            .store
            .write(kind, name, value.as_deref(), Some(&change), None, false)
            .await?
        {
            Written::Done { existed } => existed,
            Written::Full => {
                return Err(FleetError::Refused(format!(
                    "the fleet holds {} {} already: remove some first",
                    shared::capacity(kind),
                    kind.name()
                )));
            }
            Written::NotAsExpected | Written::KeptLater => false,
        };
        tracing::info!(
            by,
            action = change.action,
            kind = kind.name(),
            target = name,
            "fleet change"
        );
        // Applied here at once; the other hosts see the version move.
        match self.catch_up().await {
            Ok(()) => self.apply_if_due(),
            Err(e) => tracing::warn!(error = %e, "reading the fleet entries back after a change"),
        }
        Ok(existed)
    }

    /// Bans `net` on every host for `seconds`.
    ///
    /// # Errors
    /// It covers a network this host protects, or the store failed.
    pub async fn put_ban(
        &self,
        net: IpNet,
        seconds: u64,
        reason: String,
        by: &str,
    ) -> Result<(String, Ban), FleetError> {
        let net = widen(net, self.proxy.state().config.live.ipv6_prefix);
        let view = self.view();
        if let Some(p) = self
            .protected(&view)
            .into_iter()
            .find(|p| overlaps(*p, net))
        {
            return Err(FleetError::Refused(format!(
                "{net} covers {p}, a trusted proxy or allowed network on this host"
            )));
        }
        let now = unix_ms();
        let ban = Ban {
            until_ms: now.saturating_add(seconds.saturating_mul(1000)),
            origin: self.node.clone(),
            by: by.to_owned(),
            reason,
            tier: None,
            at_ms: now,
        };
        let name = net.to_string();
        self.change(Kind::Bans, &name, Some(json(&ban)), by).await?;
        self.lock().pending.remove(&name);
        Ok((name, ban))
    }

    /// Lifts the ban on exactly `net` on every host; whether there was one.
    ///
    /// # Errors
    /// The store failed.
    pub async fn delete_ban(&self, net: IpNet, by: &str) -> Result<bool, FleetError> {
        let name = widen(net, self.proxy.state().config.live.ipv6_prefix).to_string();
        let existed = self.change(Kind::Bans, &name, None, by).await?;
        let pending = self.lock().pending.remove(&name).is_some();
        if pending {
            self.lock().dirty = true;
            self.apply_if_due();
        }
        Ok(existed || pending)
    }

    /// Sets `key_sha256`'s override on every host.
    ///
    /// # Errors
    /// The store failed.
    pub async fn put_override(
        &self,
        key_sha256: &str,
        entry: Override,
        by: &str,
    ) -> Result<Override, FleetError> {
        self.change(Kind::Overrides, key_sha256, Some(json(&entry)), by)
            .await?;
        Ok(entry)
    }

    /// Removes `key_sha256`'s override on every host; whether it had one.
    ///
    /// # Errors
    /// The store failed.
    pub async fn delete_override(&self, key_sha256: &str, by: &str) -> Result<bool, FleetError> {
        self.change(Kind::Overrides, key_sha256, None, by).await
    }

    /// Adds `net` to every host's kernel allow list.
    ///
    /// # Errors
    /// The store failed.
    pub async fn put_allow(
        &self,
        net: IpNet,
        entry: Allow,
        by: &str,
    ) -> Result<String, FleetError> {
        let name = net.trunc().to_string();
        self.change(Kind::Allow, &name, Some(json(&entry)), by)
            .await?;
        Ok(name)
    }

    /// Removes `net` from every host's runtime allow list; whether it was there.
    ///
    /// # Errors
    /// The store failed.
    pub async fn delete_allow(&self, net: IpNet, by: &str) -> Result<bool, FleetError> {
        self.change(Kind::Allow, &net.trunc().to_string(), None, by)
            .await
    }

    /// A ban escalation made: in this host's kernel and proxy now, published
    /// by the poll task.
    fn ban_now(
        &self,
        net: IpNet,
        seconds: u64,
        prefix: u8,
        cause: &BanCause<'_>,
    ) -> Result<IpNet, String> {
        let net = widen(net, prefix);
        let now = unix_ms();
        let until_ms = now.saturating_add(seconds.saturating_mul(1000));
        if let Some(kernel) = &self.kernel {
            let until = monotonic_ns().saturating_add(seconds.saturating_mul(1_000_000_000));
            kernel
                .maps()
                .ban(net, until, prefix)
                .map_err(|e| e.to_string())?;
        }
        let ban = Ban {
            until_ms,
            origin: self.node.clone(),
            by: "escalation".into(),
            reason: cause.reason.clone(),
            tier: cause.tier.map(str::to_owned),
            at_ms: now,
        };
        self.escalations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((net, ban));
        // The poll task publishes it and applies the rest (the proxy's list,
        // the origins file) off the request path.
        self.wake.notify_one();
        Ok(net)
    }
}

impl Banner for Fleet {
    fn ban(
        &self,
        net: IpNet,
        seconds: u64,
        ipv6_prefix: u8,
        cause: BanCause<'_>,
    ) -> Result<IpNet, String> {
        self.ban_now(net, seconds, ipv6_prefix, &cause)
    }
}

/// Whether one network contains the other.
#[must_use]
pub fn overlaps(a: IpNet, b: IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

impl crate::admin::AdminApi for Fleet {
    fn owns(&self, path: &str) -> bool {
        api::owns(path)
    }

    fn handle(
        &self,
        req: http::Request<hyper::body::Incoming>,
    ) -> std::pin::Pin<
        Box<dyn Future<Output = http::Response<http_body_util::Full<bytes::Bytes>>> + Send + '_>,
    > {
        Box::pin(api::handle(self, req))
    }
}

impl crate::admin::StatusReport for Fleet {
    fn name(&self) -> &'static str {
        "fleet"
    }

    fn report(&self) -> serde_json::Value {
        let view = self.view();
        let skipped: HashMap<String, &str> = self.skipped().into_iter().collect();
        let bans: Vec<serde_json::Value> = view
            .bans
            .iter()
            .map(|(net, ban)| {
                let mut value = serde_json::to_value(ban).unwrap_or_default();
                value["net"] = net.clone().into();
                if let Some(why) = skipped.get(net) {
                    value["not_applied_here"] = (*why).into();
                }
                value
            })
            .collect();
        let with_names = |map: serde_json::Value, field: &str| -> Vec<serde_json::Value> {
            map.as_object()
                .map(|m| {
                    m.iter()
                        .map(|(name, entry)| {
                            let mut entry = entry.clone();
                            entry[field] = name.clone().into();
                            entry
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        serde_json::json!({
            "node": self.node,
            "shared": self.is_shared(),
            "synced_ms": self.synced_ms(),
            "bans": bans,
            "overrides": with_names(serde_json::to_value(&view.overrides).unwrap_or_default(), "key_sha256"),
            "allow": with_names(serde_json::to_value(&view.allow).unwrap_or_default(), "net"),
            "changes": view.changes.iter().take(20).collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_overlap_either_way() {
        let wide: IpNet = "10.0.0.0/8".parse().unwrap();
        let one: IpNet = "10.1.2.3/32".parse().unwrap();
        let other: IpNet = "192.0.2.0/24".parse().unwrap();
        assert!(overlaps(wide, one));
        assert!(overlaps(one, wide));
        assert!(!overlaps(wide, other));
    }
}
