//! Shared test support: a loaded instance of the XDP program driven through
//! `BPF_PROG_TEST_RUN` ([`xdp`]), hand-built packets ([`packet`]), real agent
//! processes ([`agent`]), real Redis servers ([`redis`]), and real routers
//! ([`routers`]) for the path spellings ([`spellings`]) of the differential suite.

#![expect(
    clippy::missing_panics_doc,
    reason = "test support panics with a message rather than returning errors"
)]

pub mod agent;
pub mod bench;
pub mod http;
pub mod netns;
pub mod newcomers;
pub mod packet;
pub mod prometheus;
pub mod redis;
pub mod routers;
pub mod spellings;
pub mod xdp;

/// `CLOCK_MONOTONIC` now, in nanoseconds: the clock the program's deadlines use.
pub use limiter_agent::kernel::monotonic_ns;

/// Panics with a clear message unless the process can load BPF programs.
pub fn require_root(what: &str) {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "{what} needs root (CAP_BPF, CAP_NET_ADMIN) to load XDP programs; run the tests as root (`sudo cargo xtask test`)"
    );
}
