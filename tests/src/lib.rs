//! Shared test support: a loaded instance of the XDP program driven through
//! `BPF_PROG_TEST_RUN` ([`xdp`]), hand-built packets ([`packet`]), real agent
//! processes ([`agent`]), real Redis servers ([`redis`]), and real routers
//! ([`routers`]) for the path spellings ([`spellings`]) of the differential suite.

#![expect(
    clippy::missing_panics_doc,
    reason = "test support panics with a message rather than returning errors"
)]

pub mod agent;
pub mod bulk;
pub mod http;
pub mod netns;
pub mod newcomers;
pub mod packet;
pub mod prometheus;
pub mod redis;
pub mod rls;
pub mod routers;
pub mod scripted;
pub mod spellings;
pub mod xdp;

/// `CLOCK_MONOTONIC` now, in nanoseconds: the clock the program's deadlines use.
pub use limiter_agent::kernel::monotonic_ns;

/// Keeps the calling thread (and the threads it starts afterwards) on `cpu`:
/// `BPF_PROG_TEST_RUN` and a veth's receive path run on the caller's CPU, and
/// the program's new-source budget is per CPU.
pub fn pin_to_cpu(cpu: usize) {
    // SAFETY: an all-zero cpu_set_t is a valid, empty set; CPU_SET writes a
    // bit of the set we own, and sched_setaffinity reads it for the call only.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set),
            0,
            "sched_setaffinity"
        );
    }
}

/// Panics with a clear message unless the process can load BPF programs.
pub fn require_root(what: &str) {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "{what} needs root (CAP_BPF, CAP_NET_ADMIN) to load XDP programs; run the tests as root (`sudo cargo xtask test`)"
    );
}
