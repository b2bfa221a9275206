//! What a running agent records for `limiter-agent status` beside the pinned
//! maps: its pid and where it attached (bpffs holds only BPF objects).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Directory of the run-state files.
pub const RUN_DIR: &str = "/run/limiter";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Attachment {
    pub interface: String,
    /// `native`, `generic`, or `replaced` (took over a link pinned by `--persist`).
    pub mode: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunState {
    pub pid: u32,
    pub persist: bool,
    pub attachments: Vec<Attachment>,
}

#[must_use]
pub fn run_state_path(instance: &str) -> PathBuf {
    PathBuf::from(RUN_DIR).join(format!("{instance}.json"))
}

impl RunState {
    pub fn write(&self, instance: &str) -> std::io::Result<()> {
        std::fs::create_dir_all(RUN_DIR)?;
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(run_state_path(instance), text)
    }

    /// The state of `instance`'s agent, if one recorded it and is still alive.
    #[must_use]
    pub fn read_live(instance: &str) -> Option<Self> {
        let text = std::fs::read_to_string(run_state_path(instance)).ok()?;
        let state: Self = serde_json::from_str(&text).ok()?;
        std::path::Path::new(&format!("/proc/{}", state.pid))
            .exists()
            .then_some(state)
    }
}
