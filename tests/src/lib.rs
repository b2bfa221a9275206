//! The kit every suite (and the benchmarks, `limiter-bench`) shares:
//!
//! - [`agent`]: the agent binary and its demo upstream as real processes, free ports.
//! - [`bulk`]: an upstream of large answers and an HTTP/2 client that shuts its window.
//! - [`cpu`]: CPU time of a process tree, from `/proc`.
//! - [`http`]: raw HTTP/1 requests and answers, the `reqwest` client, the agent's metrics.
//! - [`netns`]: host, client and attacker namespaces joined by veths, and SYN floods.
//! - [`newcomers`]: new clients connecting during a spoofed SYN flood.
//! - [`packet`]: hand-built frames (Ethernet, VLAN, IPv4/IPv6, TCP/UDP) for the XDP tests.
//! - [`prometheus`]: the reader of the agent's Prometheus text.
//! - [`redis`]: throwaway `redis-server`s, single and a three-node Cluster.
//! - [`rls`]: Envoy's rate limit service called by a client nobody here wrote.
//! - [`routers`]: Express, Starlette, Flask and nginx as upstreams of the path suite.
//! - [`scripted`]: a TCP upstream answering with the bytes a test chooses.
//! - [`spellings`]: spellings of the reference tiers' paths for the path suite.
//! - [`xdp`]: a private instance of the XDP program driven through `BPF_PROG_TEST_RUN`.

#![expect(
    clippy::missing_panics_doc,
    reason = "test support panics with a message rather than returning errors"
)]

pub mod agent;
pub mod bulk;
pub mod chaos;
pub mod cpu;
pub mod fleet;
pub mod http;
pub mod netns;
pub mod newcomers;
pub mod packet;
pub mod prometheus;
pub mod provider;
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
