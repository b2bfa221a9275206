//! The kernel side's status (`/status`, the dashboard, `limiter_bans_active`)
//! read off the request path. A full per-source map is 131,072 entries, two
//! system calls each: walked on the proxy's runtime under the lock that
//! escalation takes, it stalled every request for half a second per poll.
//!
//! Here one thread of its own, at the lowest CPU priority, with map handles
//! of its own (opened from the pins: no lock shared with escalation or
//! reloads), takes a snapshot when one is asked for, at most one per
//! [`MIN_INTERVAL`] and never more often than four times the last walk's
//! length (so the walk itself uses at most a fifth of a CPU, however full the
//! map). A poll reads the latest snapshot: the admin listener first waits for
//! a fresh one at most [`FRESH_WAIT`], asynchronously. (Expired bans are
//! dropped under the maps lock, by housekeeping: a sweep on other handles
//! could delete a ban escalation renewed between its look and its delete.)

use std::{
    sync::{Arc, Condvar, Mutex, PoisonError},
    time::{Duration, Instant},
};

use super::{maps::Maps, monotonic_ns, report::Report, state::Attachment};

/// Shortest time between two snapshots.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// Longest a poll waits for a fresh snapshot before taking the latest.
pub const FRESH_WAIT: Duration = Duration::from_millis(250);
/// A snapshot waits at least this many times the last walk's length.
const DUTY: u32 = 4;
/// Top sources a snapshot keeps.
const TOP: usize = 10;

/// What the agent adds to the maps' report.
#[derive(Clone, Debug)]
pub struct Identity {
    pub instance: String,
    pub attachments: Vec<Attachment>,
    pub persist: bool,
}

#[derive(Default)]
struct Latest {
    /// When the latest snapshot was finished; `None` before the first.
    taken: Option<Instant>,
    report: Arc<serde_json::Value>,
    bans_active: u64,
    /// A poll asked for a fresh snapshot.
    wanted: bool,
}

struct Shared {
    latest: Mutex<Latest>,
    /// Wakes the thread: a snapshot is wanted.
    wake: Condvar,
    /// Wakes the polls waiting for a snapshot.
    taken: tokio::sync::Notify,
}

/// The reporter thread's handle.
pub struct Reporter {
    shared: Arc<Shared>,
}

impl Reporter {
    /// Starts the thread on `maps` (handles of its own).
    pub fn spawn(maps: Maps, identity: Identity) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            latest: Mutex::default(),
            wake: Condvar::new(),
            taken: tokio::sync::Notify::new(),
        });
        let thread = shared.clone();
        std::thread::Builder::new()
            .name("kernel-reporter".into())
            .spawn(move || run(&thread, &maps, &identity))?;
        Ok(Self { shared })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Latest> {
        self.shared
            .latest
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The latest snapshot, asking for a fresh one when it is older than
    /// [`MIN_INTERVAL`]; never waits.
    #[must_use]
    pub fn latest(&self) -> Arc<serde_json::Value> {
        let mut latest = self.lock();
        if latest.taken.is_none_or(|t| t.elapsed() >= MIN_INTERVAL) {
            latest.wanted = true;
            self.shared.wake.notify_one();
        }
        latest.report.clone()
    }

    /// Active bans in the latest snapshot (asking for a fresh one as
    /// [`Reporter::latest`] does).
    #[must_use]
    pub fn bans_active(&self) -> u64 {
        let _ = self.latest();
        self.lock().bans_active
    }

    /// Waits at most [`FRESH_WAIT`] for a snapshot younger than
    /// [`MIN_INTERVAL`].
    pub async fn fresh(&self) {
        let notified = self.shared.taken.notified();
        let mut notified = std::pin::pin!(notified);
        notified.as_mut().enable();
        {
            let mut latest = self.lock();
            if latest.taken.is_some_and(|t| t.elapsed() < MIN_INTERVAL) {
                return;
            }
            latest.wanted = true;
            self.shared.wake.notify_one();
        }
        let _ = tokio::time::timeout(FRESH_WAIT, notified).await;
    }
}

/// The thread: a snapshot when one is wanted, no sooner than the duty cycle
/// allows.
fn run(shared: &Shared, maps: &Maps, identity: &Identity) {
    lowest_priority();
    let mut next_allowed = Instant::now();
    loop {
        {
            let latest = shared.latest.lock().unwrap_or_else(PoisonError::into_inner);
            let latest = shared
                .wake
                .wait_while(latest, |l| !l.wanted)
                .unwrap_or_else(PoisonError::into_inner);
            drop(latest);
        }
        std::thread::sleep(next_allowed.saturating_duration_since(Instant::now()));
        let started = Instant::now();
        let now_ns = monotonic_ns();
        let mut report = Report::read(maps, now_ns, TOP);
        report.instance.clone_from(&identity.instance);
        report.attach_origins();
        report.attachments.clone_from(&identity.attachments);
        report.persist = identity.persist;
        let bans_active = report.bans.len() as u64;
        let value = serde_json::to_value(&report).unwrap_or_default();
        let took = started.elapsed();
        next_allowed = Instant::now() + MIN_INTERVAL.max(took * DUTY);
        {
            let mut latest = shared.latest.lock().unwrap_or_else(PoisonError::into_inner);
            latest.taken = Some(Instant::now());
            latest.report = Arc::new(value);
            latest.bans_active = bans_active;
            latest.wanted = false;
        }
        shared.taken.notify_waiters();
        if took > Duration::from_millis(100) {
            tracing::debug!(?took, "kernel snapshot");
        }
    }
}

/// Nice 19 for this thread alone (Linux threads have their own nice value):
/// under CPU pressure the proxy's threads go first.
fn lowest_priority() {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    // SAFETY: setpriority on our own thread id with a valid nice value.
    let rc = unsafe {
        libc::setpriority(
            libc::PRIO_PROCESS,
            libc::id_t::try_from(tid).unwrap_or_default(),
            19,
        )
    };
    if rc != 0 {
        tracing::debug!("could not lower the kernel reporter's priority");
    }
}
