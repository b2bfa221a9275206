//! Everything that touches the kernel side: loading the embedded XDP object
//! with its maps pinned under `/sys/fs/bpf/limiter/<instance>/`, attaching it
//! (native mode first, generic as fallback), keeping its config in step with
//! the agent's, and escalating sources that ignore their 429s into bans.

pub mod clock;
mod escalate;
pub mod maps;
pub mod probe;
pub mod report;
pub mod state;
pub mod sync;

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use aya::{
    EbpfLoader,
    programs::{
        Xdp,
        links::{FdLink, LinkError, PinnedLink},
        xdp::{XdpLink, XdpMode},
    },
};
pub use escalate::Escalation;
use ipnet::IpNet;
use limiter_common::{GLOBAL_USE_COARSE_CLOCK, PROGRAM_NAME, map_names};

use self::{
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
    /// Attaching to an interface failed in both native and generic mode.
    #[error("attaching XDP to {interface}: {message}")]
    Attach { interface: String, message: String },
    /// A map operation failed.
    #[error(transparent)]
    Maps(#[from] MapsError),
}

/// The loaded program, its maps and its attachments, for as long as the agent runs.
pub struct Kernel {
    maps: Mutex<Maps>,
    /// Owns the program and its unpinned links: dropping it detaches them.
    ebpf: Mutex<Option<aya::Ebpf>>,
    pin_dir: PathBuf,
    instance: String,
    persist: bool,
    attachments: Vec<Attachment>,
    ipv6_prefix: Mutex<u8>,
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
        ensure_bpffs()?;
        let pin_dir = pin_dir(instance);
        std::fs::create_dir_all(&pin_dir)
            .and_then(|()| {
                std::fs::set_permissions(&pin_dir, std::fs::Permissions::from_mode(0o700))
            })
            .map_err(|source| KernelError::PinDir {
                path: pin_dir.clone(),
                source,
            })?;
        let paths: Vec<(&'static str, PathBuf)> = [
            map_names::CONFIG,
            map_names::SOURCES,
            map_names::ALLOW,
            map_names::BANS,
            map_names::STATS,
        ]
        .into_iter()
        .map(|name| (name, pin_dir.join(name)))
        .collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        // Kernels without the coarse-clock helper (before 5.11) still get the
        // jiffies clock once calibrated; until then the precise helper is the
        // fallback. Those kernels also charge maps to RLIMIT_MEMLOCK.
        probe::lift_memlock();
        let coarse = u8::from(probe::coarse_clock().unwrap_or(false));
        loader.override_global(GLOBAL_USE_COARSE_CLOCK, &coarse, true);
        let mut ebpf = loader
            .load(crate::object::LIMITER)
            .map_err(|e| KernelError::Load(format!("{e:#}")))?;
        program_mut(&mut ebpf)?
            .load()
            .map_err(|e| KernelError::Load(format!("{e:#}")))?;
        let mut maps = Maps::from_ebpf(&mut ebpf)?;
        // Pinned maps are restricted to their owner (root).
        for (_, path) in &paths {
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        }
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
        let wanted = sync::kernel_config(config, current.clock, possible_cpus());
        maps.write_config(&wanted)?;
        maps.set_allow(&sync::allow_list(config), config.ipv6_prefix)?;
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
        let kernel = Self {
            maps: Mutex::new(maps),
            ebpf: Mutex::new(Some(ebpf)),
            pin_dir,
            instance: instance.to_owned(),
            persist,
            attachments,
            ipv6_prefix: Mutex::new(config.ipv6_prefix),
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
        maps.write_config(&sync::kernel_config(config, clock, possible_cpus()))?;
        maps.set_allow(&sync::allow_list(config), config.ipv6_prefix)?;
        *self
            .ipv6_prefix
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = config.ipv6_prefix;
        Ok(())
    }

    #[must_use]
    pub fn ipv6_prefix(&self) -> u8 {
        *self
            .ipv6_prefix
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Drops ban entries that have ended (the program already ignores them).
    pub fn housekeeping(&self) {
        let removed = self.maps().remove_expired_bans(monotonic_ns());
        if removed > 0 {
            tracing::debug!(removed, "expired bans removed");
        }
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

fn program_mut(ebpf: &mut aya::Ebpf) -> Result<&mut Xdp, KernelError> {
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
        let now = monotonic_ns();
        self.maps()
            .bans()
            .iter()
            .filter(|b| b.until_ns > now)
            .count() as u64
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
        let maps = self.maps();
        let mut report = report::Report::read(&maps, monotonic_ns(), 10);
        report.instance.clone_from(&self.instance);
        report.attachments.clone_from(&self.attachments);
        report.persist = self.persist;
        serde_json::to_value(&report).unwrap_or_default()
    }
}

/// Attaches `program` to `interface`: takes over a link left pinned by an
/// earlier `--persist` run (atomic replace), else native mode, else generic.
/// With `persist` the link is pinned so it outlives the agent.
fn attach(
    program: &mut Xdp,
    pin_dir: &Path,
    interface: &str,
    persist: bool,
) -> Result<&'static str, KernelError> {
    let link_path = pin_dir.join(format!("link_{interface}"));
    let failed = |message: String| KernelError::Attach {
        interface: interface.to_owned(),
        message,
    };
    let mut mode = None;
    let mut id = None;
    if link_path.exists() {
        match take_pinned_link(&link_path) {
            Ok(link) => match program.attach_to_link(link) {
                Ok(link_id) => {
                    id = Some(link_id);
                    mode = Some("replaced");
                }
                Err(e) => tracing::warn!(%interface, "replacing the pinned link failed: {e}"),
            },
            Err(e) => tracing::warn!(%interface, "pinned link unusable: {e}"),
        }
    }
    if id.is_none() {
        match program.attach(interface, XdpMode::Driver) {
            Ok(link_id) => {
                id = Some(link_id);
                mode = Some("native");
            }
            Err(native) => {
                tracing::debug!(%interface, "native XDP refused ({native}); trying generic");
                let link_id = program
                    .attach(interface, XdpMode::Skb)
                    .map_err(|e| failed(format!("native: {native}; generic: {e}")))?;
                id = Some(link_id);
                mode = Some("generic");
            }
        }
    }
    let (Some(id), Some(mode)) = (id, mode) else {
        unreachable!("attached above or returned");
    };
    if persist {
        let link = program
            .take_link(id)
            .map_err(|e| failed(format!("taking the link: {e}")))?;
        let fd_link = FdLink::try_from(link).map_err(|e| {
            failed(format!(
                "this kernel attaches XDP without bpf_link, which cannot be pinned ({e}); \
                 run without --persist"
            ))
        })?;
        fd_link
            .pin(&link_path)
            .map_err(|e| failed(format!("pinning the link: {e}")))?;
    }
    Ok(mode)
}

fn take_pinned_link(path: &Path) -> Result<XdpLink, LinkError> {
    let pinned = PinnedLink::from_pin(path)?;
    let fd_link = pinned.unpin().map_err(|e| {
        LinkError::SyscallError(aya::sys::SyscallError {
            call: "unlink",
            io_error: e,
        })
    })?;
    XdpLink::try_from(fd_link)
}

/// Links pinned by an earlier `--persist` run on interfaces no longer
/// configured are unpinned, which detaches them.
fn drop_stale_links(pin_dir: &Path, interfaces: &[String]) {
    let Ok(entries) = std::fs::read_dir(pin_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(interface) = name.to_str().and_then(|n| n.strip_prefix("link_")) else {
            continue;
        };
        if !interfaces.iter().any(|i| i == interface) {
            let _ = std::fs::remove_file(entry.path());
            tracing::info!(%interface, "detached a program left attached by an earlier run");
        }
    }
}

/// Mounts the BPF filesystem at /sys/fs/bpf when nothing is mounted there.
fn ensure_bpffs() -> Result<(), KernelError> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let path = c"/sys/fs/bpf";
    // SAFETY: statfs writes into the zeroed struct we own; the path is a C string.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    let found = unsafe { libc::statfs(path.as_ptr(), &raw mut stat) } == 0;
    #[allow(
        clippy::useless_conversion,
        reason = "f_type is i64 here but narrower on other architectures"
    )]
    let f_type = i64::from(stat.f_type);
    if found && f_type == BPF_FS_MAGIC {
        return Ok(());
    }
    // SAFETY: all arguments are valid C strings or null.
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
    // SAFETY: clock_gettime writes into the timespec we own.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Parses `IP` or `IP/LEN`.
pub fn parse_net(text: &str) -> Result<IpNet, String> {
    text.parse::<IpNet>()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from))
        .map(|n| n.trunc())
        .map_err(|_| format!("`{text}` is not an IP address or IP/LEN network"))
}
