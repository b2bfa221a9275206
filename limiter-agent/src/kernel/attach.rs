//! Attaching the program to interfaces: taking over links pinned by an
//! earlier `--persist` run, native mode first and generic as fallback, and
//! detaching links left for interfaces no longer configured.

use std::path::Path;

use aya::programs::{
    Xdp,
    links::{FdLink, LinkError, PinnedLink},
    xdp::{XdpLink, XdpMode},
};

use super::KernelError;

/// Attaches `program` to `interface`: takes over a link left pinned by an
/// earlier `--persist` run (atomic replace), else native mode, else generic.
/// With `persist` the link is pinned so it outlives the agent.
pub(super) fn attach(
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
pub(super) fn drop_stale_links(pin_dir: &Path, interfaces: &[String]) {
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
