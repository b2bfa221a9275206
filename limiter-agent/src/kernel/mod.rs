//! Everything that touches the kernel side: loading the embedded XDP object
//! with its maps pinned under `/sys/fs/bpf/limiter/<instance>/`, attaching it
//! (native mode first, generic as fallback), keeping its config in step with
//! the agent's, and escalating sources that ignore their 429s into bans.

mod attach;
pub mod clock;
mod escalate;
pub mod maps;
pub mod probe;
pub mod report;
mod reporter;
pub mod state;
pub mod sync;

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{ProgramError, Xdp},
};
pub use escalate::{BanCause, Banner, Escalation};
use ipnet::IpNet;
use limiter_common::{GLOBAL_USE_COARSE_CLOCK, PROGRAM_NAME, map_names};

use self::{
    attach::{attach, drop_stale_links},
    maps::{Maps, MapsError},
    state::{Attachment, RunState},
};
use crate::config::Config;

/// Root of every instance's pins.
pub const PIN_ROOT: &str = "/sys/fs/bpf/limiter";

/// The pin directory of `instance`.
#[must_use]
pub fn pin_dir(instance: &str) -> PathBuf {
    Path::new(PIN_ROOT).join(instance)
}

/// Why the kernel side could not start or be changed.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// No BPF filesystem at `/sys/fs/bpf` and mounting one failed.
    #[error("no BPF filesystem at /sys/fs/bpf and mounting one failed: {0}")]
    Bpffs(std::io::Error),
    /// Creating the pin directory failed.
    #[error("creating {path}: {source}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Loading the object (maps or program) failed: usually missing privileges
    /// (root or `CAP_BPF` + `CAP_NET_ADMIN`) or a kernel without the needed features.
    #[error("loading the XDP object: {0}")]
    Load(String),
    /// Loading the program failed; a verifier refusal carries the verifier's log.
    #[error("loading the XDP object: {0}")]
    Program(ProgramError),
    /// Attaching to an interface failed in both native and generic mode.
    #[error("attaching XDP to {interface}: {message}")]
    Attach { interface: String, message: String },
    /// A map operation failed.
    #[error(transparent)]
    Maps(#[from] MapsError),
}

/// How [`load`] loads the object.
#[derive(Clone, Copy, Debug, Default)]
pub struct LoadOptions {
    /// Entries of the per-source map; `None` keeps the object's
    /// [`limiter_common::SOURCES_CAPACITY`].
    pub sources_capacity: Option<u32>,
    /// The object's `USE_COARSE_CLOCK` global; `None` probes the kernel
    /// ([`probe::coarse_clock`]), as the agent does.
    pub coarse_clock: Option<bool>,
}

/// Loads `object` with its `limiter` program verified and loaded, not attached.
///
/// With `pin_dir`, the maps of [`map_names::PINNED`] are pinned at
/// `<pin_dir>/<name>` (owner-only), reusing maps already pinned there, so
/// counters and bans survive a restart; the directory is created (and the
/// BPF filesystem mounted) as needed. Without it every map is private to the
/// returned [`Ebpf`].
pub fn load(
    object: &[u8],
    pin_dir: Option<&Path>,
    options: LoadOptions,
) -> Result<Ebpf, KernelError> {
    let pins: Vec<(&'static str, PathBuf)> = match pin_dir {
        Some(dir) => {
            create_pin_dir(dir)?;
            map_names::PINNED
                .into_iter()
                .map(|name| (name, dir.join(name)))
                .collect()
        }
        None => Vec::new(),
    };
    let mut loader = EbpfLoader::new();
    for (name, path) in &pins {
        loader.map_pin_path(name, path.as_path());
    }
    if let Some(capacity) = options.sources_capacity {
        loader.map_max_entries(map_names::SOURCES, capacity);
    }
    // Kernels without the coarse-clock helper (before 5.11) still get the
    // jiffies clock once calibrated; until then the precise helper is the
    // fallback. Those kernels also charge maps to RLIMIT_MEMLOCK.
    probe::lift_memlock();
    let coarse = u8::from(
        options
            .coarse_clock
            .unwrap_or_else(|| probe::coarse_clock().unwrap_or(false)),
    );
    loader.override_global(GLOBAL_USE_COARSE_CLOCK, &coarse, true);
    let mut ebpf = loader
        .load(object)
        .map_err(|e| KernelError::Load(format!("{e:#}")))?;
    program_mut(&mut ebpf)?
        .load()
        .map_err(KernelError::Program)?;
    // Pinned maps are restricted to their owner (root).
    for (_, path) in &pins {
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    }
    Ok(ebpf)
}

/// Creates `dir` (owner-only) on a mounted BPF filesystem.
fn create_pin_dir(dir: &Path) -> Result<(), KernelError> {
    ensure_bpffs()?;
    std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)))
        .map_err(|source| KernelError::PinDir {
            path: dir.to_owned(),
            source,
        })
}

/// The loaded program, its maps and its attachments, for as long as the agent runs.
pub struct Kernel {
    maps: Mutex<Maps>,
    /// Owns the program and its unpinned links: dropping it detaches them.
    ebpf: Mutex<Option<Ebpf>>,
    pin_dir: PathBuf,
    instance: String,
    persist: bool,
    attachments: Vec<Attachment>,
    ipv6_prefix: Mutex<u8>,
    /// Status snapshots, on a thread with handles of its own.
    reporter: reporter::Reporter,
    /// Handles of its own for walking the ban trie in housekeeping.
    sweep: Mutex<Maps>,
    /// The config's allow list and the fleet's runtime entries, pushed together.
    allow: Mutex<AllowParts>,
}

/// The two halves of the kernel allow list.
#[derive(Default)]
struct AllowParts {
    config: Vec<IpNet>,
    runtime: Vec<IpNet>,
}

impl AllowParts {
    fn all(&self) -> Vec<IpNet> {
        let mut all = self.config.clone();
        all.extend(self.runtime.iter().filter(|n| !self.config.contains(n)));
        all
    }
}

impl Kernel {
    /// Loads the embedded object (reusing pinned maps, so counters and bans
    /// survive a restart), writes the config, and attaches to `interfaces`.
    pub fn start(
        config: &Config,
        instance: &str,
        interfaces: &[String],
        persist: bool,
    ) -> Result<Self, KernelError> {
        let pin_dir = pin_dir(instance);
        let mut ebpf = load(
            crate::object::LIMITER,
            Some(&pin_dir),
            LoadOptions::default(),
        )?;
        let mut maps = Maps::from_ebpf(&mut ebpf)?;
        let mut current = maps.config()?;
        if current.clock.ns_per_jiffy == 0 {
            // Once per boot: pinned maps keep the calibration across restarts.
            match clock::calibrate(&mut ebpf, Duration::from_secs(1)) {
                Ok(clock) => {
                    tracing::info!(
                        ns_per_jiffy = clock.ns_per_jiffy,
                        "program clock calibrated"
                    );
                    current.clock = clock;
                }
                Err(e) => tracing::warn!("program clock not calibrated, using the helper: {e}"),
            }
        }
        let wanted = sync::program_config(config, current.clock, possible_cpus());
        maps.write_config(&wanted)?;
        maps.set_allow(&sync::allow_list(config), config.live.ipv6_prefix)?;
        maps.set_local(&sync::local_addresses())?;
        let program = program_mut(&mut ebpf)?;
        let mut attachments = Vec::new();
        for interface in interfaces {
            let mode = attach(program, &pin_dir, interface, persist)?;
            tracing::info!(%interface, mode, persist, "XDP attached");
            attachments.push(Attachment {
                interface: interface.clone(),
                mode: mode.to_owned(),
            });
        }
        drop_stale_links(&pin_dir, interfaces);
        let reporter = reporter::Reporter::spawn(
            Maps::open_pinned(&pin_dir)?,
            reporter::Identity {
                instance: instance.to_owned(),
                attachments: attachments.clone(),
                persist,
            },
        )
        .map_err(|e| KernelError::Load(format!("starting the kernel reporter: {e}")))?;
        let sweep = Maps::open_pinned(&pin_dir)?;
        let kernel = Self {
            maps: Mutex::new(maps),
            ebpf: Mutex::new(Some(ebpf)),
            pin_dir,
            instance: instance.to_owned(),
            persist,
            attachments,
            ipv6_prefix: Mutex::new(config.live.ipv6_prefix),
            reporter,
            sweep: Mutex::new(sweep),
            allow: Mutex::new(AllowParts {
                config: sync::allow_list(config),
                runtime: Vec::new(),
            }),
        };
        kernel.write_run_state();
        Ok(kernel)
    }

    /// The instance's pin directory.
    #[must_use]
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    #[must_use]
    pub fn attachments(&self) -> &[Attachment] {
        &self.attachments
    }

    pub(crate) fn maps(&self) -> MutexGuard<'_, Maps> {
        self.maps.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Pushes a (reloaded) config into the maps without detaching.
    pub fn sync(&self, config: &Config) -> Result<(), KernelError> {
        let mut maps = self.maps();
        let clock = maps.config()?.clock;
        maps.write_config(&sync::program_config(config, clock, possible_cpus()))?;
        let all = {
            let mut allow = self.allow.lock().unwrap_or_else(PoisonError::into_inner);
            allow.config = sync::allow_list(config);
            allow.all()
        };
        maps.set_allow(&all, config.live.ipv6_prefix)?;
        maps.set_local(&sync::local_addresses())?;
        *self
            .ipv6_prefix
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = config.live.ipv6_prefix;
        Ok(())
    }

    /// Drops ban entries that have ended (the program already ignores them).
    /// The ban trie is walked on handles of its own, off the lock escalation
    /// takes; each expired entry is read again and removed under that lock,
    /// so a ban renewed meanwhile stays. Blocking (a walk of up to 65,536
    /// entries): run it off the runtime.
    pub fn housekeeping(&self) {
        let now = monotonic_ns();
        let expired: Vec<IpNet> = self
            .sweep
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .bans()
            .into_iter()
            .filter(|b| b.until_ns <= now)
            .map(|b| b.net)
            .collect();
        let removed = expired
            .into_iter()
            .filter(|net| self.maps().remove_ban_if_expired(*net, now))
            .count();
        if removed > 0 {
            tracing::debug!(removed, "expired bans removed");
        }
    }

    /// The networks in the ban list, expired ones included (walked on the
    /// housekeeping handles, off the lock escalation takes).
    #[must_use]
    pub fn ban_nets(&self) -> Vec<IpNet> {
        self.sweep
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .bans()
            .into_iter()
            .map(|b| b.net)
            .collect()
    }

    /// Replaces the runtime part of the allow list (the fleet's entries);
    /// the config's part stays.
    ///
    /// # Errors
    /// A map update failed.
    pub fn set_runtime_allow(&self, nets: Vec<IpNet>) -> Result<(), KernelError> {
        let all = {
            let mut allow = self.allow.lock().unwrap_or_else(PoisonError::into_inner);
            allow.runtime = nets;
            allow.all()
        };
        let prefix = self.ipv6_prefix();
        self.maps().set_allow(&all, prefix)?;
        Ok(())
    }

    #[must_use]
    pub fn ipv6_prefix(&self) -> u8 {
        *self
            .ipv6_prefix
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Detaches (unless persisting) and records that the agent is gone. The
    /// maps stay pinned, so a restarted agent finds its counters and bans.
    pub fn shutdown(&self) {
        let ebpf = self
            .ebpf
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if ebpf.is_none() {
            return;
        }
        drop(ebpf);
        if self.persist {
            tracing::info!(instance = %self.instance, "XDP left attached (persist)");
        } else {
            tracing::info!(instance = %self.instance, "XDP detached");
        }
        let _ = std::fs::remove_file(state::run_state_path(&self.instance));
    }

    fn write_run_state(&self) {
        let state = RunState {
            pid: std::process::id(),
            persist: self.persist,
            attachments: self.attachments.clone(),
        };
        if let Err(e) = state.write(&self.instance) {
            tracing::warn!("writing the run state for `status`: {e}");
        }
    }
}

fn program_mut(ebpf: &mut Ebpf) -> Result<&mut Xdp, KernelError> {
    ebpf.program_mut(PROGRAM_NAME)
        .ok_or_else(|| KernelError::Load(format!("no `{PROGRAM_NAME}` program")))?
        .try_into()
        .map_err(|e| KernelError::Load(format!("{e}")))
}

impl crate::metrics::KernelStats for Kernel {
    fn xdp_packets(&self) -> Vec<(&'static str, &'static str, u64)> {
        self.maps().stats()
    }

    fn bans_active(&self) -> u64 {
        self.reporter.bans_active()
    }
}

impl std::fmt::Debug for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernel")
            .field("pin_dir", &self.pin_dir)
            .field("attachments", &self.attachments)
            .finish_non_exhaustive()
    }
}

impl crate::admin::StatusReport for Kernel {
    fn name(&self) -> &'static str {
        "xdp"
    }

    fn report(&self) -> serde_json::Value {
        (*self.reporter.latest()).clone()
    }

    fn fresh(&self) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(self.reporter.fresh())
    }
}

/// Mounts the BPF filesystem at /sys/fs/bpf when nothing is mounted there.
fn ensure_bpffs() -> Result<(), KernelError> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let path = c"/sys/fs/bpf";
    // SAFETY: `statfs` is plain integers, for which all-zero is a valid value.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: the path is a NUL-terminated C string and `stat` a struct we own,
    // both valid for the duration of the call.
    let found = unsafe { libc::statfs(path.as_ptr(), &raw mut stat) } == 0;
    #[allow(
        clippy::useless_conversion,
        reason = "f_type is i64 here but narrower on other architectures"
    )]
    let f_type = i64::from(stat.f_type);
    if found && f_type == BPF_FS_MAGIC {
        return Ok(());
    }
    // SAFETY: every argument is a NUL-terminated C string or, for the mount
    // data, null, which `mount` accepts.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            path.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(KernelError::Bpffs(std::io::Error::last_os_error()))
    }
}

/// CPUs the kernel may run the program on (per-CPU budgets are split over them).
fn possible_cpus() -> u32 {
    aya::util::nr_cpus()
        .ok()
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(1)
}

/// `CLOCK_MONOTONIC` in ns: the clock of every deadline in the maps.
#[must_use]
pub fn monotonic_ns() -> u64 {
    // SAFETY: `timespec` is plain integers, for which all-zero is a valid value.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: clock_gettime writes into the timespec we own, valid for the call.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}
