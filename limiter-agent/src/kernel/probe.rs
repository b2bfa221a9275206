//! Kernel feature probes that decide the object's load-time globals, so one
//! object loads on every supported kernel (5.10 and later).

use aya::{
    programs::{ProgramError, ProgramType},
    sys::{BpfHelper, is_helper_supported},
};

/// Whether XDP programs may call `bpf_ktime_get_coarse_ns` (Linux 5.11+): the
/// value of [`limiter_common::GLOBAL_USE_COARSE_CLOCK`]. Linux 5.10 refuses a
/// program that calls it even on a branch it would never take, unless the
/// global makes that branch dead at load time.
pub fn coarse_clock() -> Result<bool, ProgramError> {
    is_helper_supported(ProgramType::Xdp, BpfHelper::BPF_FUNC_ktime_get_coarse_ns)
}
