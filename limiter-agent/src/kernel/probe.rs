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

/// Lifts `RLIMIT_MEMLOCK` as far as this process may: to infinity with
/// `CAP_SYS_RESOURCE`, else the soft limit to the hard one. Before Linux 5.11
/// BPF maps are charged to it, and the per-source map alone is larger than the
/// default limit; later kernels charge the memory cgroup instead.
pub fn lift_memlock() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: each call gets a pointer to an rlimit we own, valid for the
    // duration of the call; none of them keeps it.
    unsafe {
        if libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const unlimited) != 0 {
            let mut limit = unlimited;
            if libc::getrlimit(libc::RLIMIT_MEMLOCK, &raw mut limit) == 0 {
                limit.rlim_cur = limit.rlim_max;
                libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const limit);
            }
        }
    }
}
