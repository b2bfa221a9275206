//! Least privilege: once the XDP program is attached, the agent keeps only
//! the capabilities it still uses, in every set including the bounding set,
//! before it starts any thread (capabilities are per thread; new threads
//! inherit them from their creator).

use caps::{CapSet, Capability, CapsHashSet};

/// What the running agent still needs: map updates and re-syncs
/// (`CAP_BPF`, `CAP_NET_ADMIN`, `CAP_PERFMON`) when the kernel side is on, and
/// `CAP_NET_BIND_SERVICE` when a listener uses a port below 1024.
#[must_use]
pub fn needed(kernel: bool, ports: &[u16]) -> CapsHashSet {
    let mut keep = CapsHashSet::new();
    if kernel {
        keep.extend([
            Capability::CAP_BPF,
            Capability::CAP_NET_ADMIN,
            Capability::CAP_PERFMON,
        ]);
    }
    if ports.iter().any(|p| *p != 0 && *p < 1024) {
        keep.insert(Capability::CAP_NET_BIND_SERVICE);
    }
    keep
}

/// Reduces the calling thread (call before any other thread exists) to
/// `keep`. A process without capabilities has nothing to drop.
pub fn drop_to(keep: &CapsHashSet) -> Result<(), caps::errors::CapsError> {
    let permitted = caps::read(None, CapSet::Permitted)?;
    if permitted.is_empty() {
        return Ok(());
    }
    // The bounding set needs CAP_SETPCAP, which goes last.
    if permitted.contains(&Capability::CAP_SETPCAP) {
        for cap in caps::all() {
            if !keep.contains(&cap) && caps::has_cap(None, CapSet::Bounding, cap)? {
                caps::drop(None, CapSet::Bounding, cap)?;
            }
        }
    }
    let keep: CapsHashSet = keep.intersection(&permitted).copied().collect();
    caps::clear(None, CapSet::Ambient)?;
    caps::set(None, CapSet::Inheritable, &CapsHashSet::new())?;
    caps::set(None, CapSet::Effective, &keep)?;
    caps::set(None, CapSet::Permitted, &keep)?;
    Ok(())
}

/// The calling thread's effective capabilities, for the startup log.
#[must_use]
pub fn effective() -> Vec<String> {
    let mut names: Vec<String> = caps::read(None, CapSet::Effective)
        .unwrap_or_default()
        .iter()
        .map(ToString::to_string)
        .collect();
    names.sort();
    names
}
