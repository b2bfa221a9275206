//! A private instance of the XDP program (its own, unpinned maps) driven through
//! `BPF_PROG_TEST_RUN`, with typed access to every map for assertions.

use std::{sync::OnceLock, time::Duration};

use aya::{
    Ebpf,
    programs::{ProgramError, TestRun, TestRunOptions, Xdp},
};
use ipnet::IpNet;
use limiter_agent::kernel::{self, KernelError, LoadOptions, clock::ClockError, maps::Maps};
use limiter_common::{PROGRAM_NAME, ProgramConfig, SourceKey, SourceState, TickCalibration};

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

/// The API port the test config declares.
pub use limiter_common::fixture::API_PORT;

/// The program's per-packet cost and verdict from one `BPF_PROG_TEST_RUN` call.
#[derive(Clone, Copy, Debug)]
pub struct Run {
    pub action: u32,
    pub per_packet: Duration,
}

/// A loaded limiter program with private maps, read and written through the
/// agent's own map layer.
pub struct Harness {
    ebpf: Ebpf,
    program: &'static str,
    maps: Option<Maps>,
}

/// The calibrated program clock, measured once per process (the mapping from
/// jiffies to `CLOCK_MONOTONIC` is the kernel's, shared by every instance).
///
/// Over one second: this runs while the suite's first tests load their programs
/// on every core, when a tick edge can be seen milliseconds late (a delayed
/// jiffies update), and over 100 ms a 1.2 ms error already snaps `HZ=250` to
/// `HZ=256`, after which the program's clock drifts 2.3% from `CLOCK_MONOTONIC`
/// (`clock_calibration_finds_the_kernel_tick_every_time` in `tests/xdp_clock.rs`).
fn clock(ebpf: &mut Ebpf) -> TickCalibration {
    static CLOCK: OnceLock<TickCalibration> = OnceLock::new();
    *CLOCK.get_or_init(|| {
        kernel::clock::calibrate(ebpf, Duration::from_secs(1))
            .expect("calibrating the program clock")
    })
}

/// Whether this kernel has `bpf_ktime_get_coarse_ns` for XDP (probed once):
/// the value the harness gives the object's `USE_COARSE_CLOCK` global, as the
/// agent does.
#[must_use]
pub fn coarse_clock() -> bool {
    static COARSE: OnceLock<bool> = OnceLock::new();
    *COARSE
        .get_or_init(|| kernel::probe::coarse_clock().expect("probing for bpf_ktime_get_coarse_ns"))
}

/// Loads the `limiter` program the agent's way, with `USE_COARSE_CLOCK` forced
/// to `coarse`, returning the verifier's refusal (with its log) as text.
pub fn load_with_coarse_clock(coarse: bool) -> Result<(), String> {
    crate::require_root("loading the XDP program");
    let options = LoadOptions {
        coarse_clock: Some(coarse),
        ..LoadOptions::default()
    };
    match kernel::load(limiter_agent::object::LIMITER, None, options) {
        Ok(_) => Ok(()),
        Err(KernelError::Program(ProgramError::LoadError {
            io_error,
            verifier_log,
        })) => Err(format!("{io_error}: {verifier_log}")),
        Err(other) => Err(other.to_string()),
    }
}

/// The config the tests start from: port [`API_PORT`], /64 grouping, 1 s
/// windows, no ceilings, enforce mode, policy generation 1, the precise clock.
#[must_use]
pub fn test_config() -> ProgramConfig {
    limiter_common::fixture::config()
}

impl Harness {
    /// Loads the limiter with the default map capacities and [`test_config`].
    #[must_use]
    pub fn new() -> Self {
        Self::with_sources_capacity(None)
    }

    /// Loads the limiter with `capacity` entries in the per-source LRU hash.
    #[must_use]
    pub fn with_sources_capacity(capacity: Option<u32>) -> Self {
        crate::require_root("the XDP test suite");
        let options = LoadOptions {
            sources_capacity: capacity,
            coarse_clock: Some(coarse_clock()),
        };
        let mut ebpf = kernel::load(limiter_agent::object::LIMITER, None, options)
            .unwrap_or_else(|e| panic!("loading the limiter: {e}"));
        let clock = clock(&mut ebpf);
        let maps = Maps::from_ebpf(&mut ebpf).expect("the limiter's maps");
        let mut harness = Self {
            ebpf,
            program: PROGRAM_NAME,
            maps: Some(maps),
        };
        harness.set_config(&ProgramConfig {
            clock,
            ..test_config()
        });
        harness
    }

    /// Runs the agent's clock calibration over `span` on this instance's
    /// `limiter_clock` program (the config is left as it is).
    pub fn calibrate_clock(&mut self, span: Duration) -> Result<TickCalibration, ClockError> {
        kernel::clock::calibrate(&mut self.ebpf, span)
    }

    /// Loads the trivial `XDP_PASS` program (the benchmark baseline).
    #[must_use]
    pub fn baseline() -> Self {
        crate::require_root("the XDP benchmark");
        let mut ebpf = Ebpf::load(limiter_agent::object::BASELINE).expect("loading the baseline");
        let program: &mut Xdp = ebpf
            .program_mut("baseline")
            .expect("program in object")
            .try_into()
            .expect("an XDP program");
        program.load().expect("the verifier accepts the baseline");
        Self {
            ebpf,
            program: "baseline",
            maps: None,
        }
    }

    /// Attaches this instance's program to `interface` (of the calling
    /// thread's namespace) until it is dropped.
    pub fn attach(&mut self, interface: &str, mode: aya::programs::XdpMode) {
        let program: &mut Xdp = self
            .ebpf
            .program_mut(self.program)
            .expect("program in object")
            .try_into()
            .expect("an XDP program");
        program
            .attach(interface, mode)
            .unwrap_or_else(|e| panic!("XDP on {interface}: {e}"));
    }

    fn xdp(&self) -> &Xdp {
        self.ebpf
            .program(self.program)
            .expect("program in object")
            .try_into()
            .expect("an XDP program")
    }

    /// The agent's view of this instance's maps.
    #[must_use]
    pub fn maps(&self) -> &Maps {
        self.maps
            .as_ref()
            .expect("the baseline program has no maps")
    }

    fn maps_mut(&mut self) -> &mut Maps {
        self.maps
            .as_mut()
            .expect("the baseline program has no maps")
    }

    /// Runs the program once on `frame` and returns its XDP action.
    #[must_use]
    pub fn run(&self, frame: &[u8]) -> u32 {
        self.run_repeat(frame, 1).action
    }

    /// Runs the program once on `frame`: the action, and the frame as the
    /// program left it (what `XDP_TX` sends back).
    #[must_use]
    pub fn run_out(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        let mut out = vec![0u8; frame.len() + 256];
        let result = self
            .xdp()
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    /// Runs the program `repeat` times on `frame` in the kernel.
    #[must_use]
    pub fn run_repeat(&self, frame: &[u8], repeat: u32) -> Run {
        let result = self
            .xdp()
            .test_run(TestRunOptions {
                data_in: Some(frame),
                repeat,
                ..TestRunOptions::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        Run {
            action: result.return_value,
            per_packet: result.duration,
        }
    }

    /// The current config.
    #[must_use]
    pub fn config(&self) -> ProgramConfig {
        self.maps().config().expect("reading the config")
    }

    /// Replaces the config exactly, `policy_gen` included.
    pub fn set_config(&mut self, config: &ProgramConfig) {
        self.maps_mut()
            .put_config_exact(config)
            .expect("writing the config");
    }

    /// Writes `config` the agent's way: the policy generation bumped past
    /// the map's, so every source re-reads the tries.
    pub fn write_config(&mut self, config: &ProgramConfig) {
        self.maps_mut()
            .write_config(config)
            .expect("writing the config");
    }

    /// Edits the config in place.
    pub fn update_config(&mut self, edit: impl FnOnce(&mut ProgramConfig)) {
        let mut config = self.config();
        edit(&mut config);
        self.set_config(&config);
    }

    /// The IPv6 grouping prefix of the current config.
    fn ipv6_prefix(&self) -> u8 {
        u128::from_be_bytes(self.config().ipv6_mask).leading_ones() as u8
    }

    /// The counter of (verdict, reason), summed over CPUs.
    #[must_use]
    pub fn stat(&self, verdict: u32, reason: u32) -> u64 {
        self.maps().stat(verdict, reason)
    }

    /// Every non-zero counter as (verdict, reason, count), for exact assertions.
    #[must_use]
    pub fn nonzero_stats(&self) -> Vec<(u32, u32, u64)> {
        let mut counters = self.maps().counters();
        counters.retain(|&(_, _, count)| count != 0);
        counters
    }

    /// The per-source entry of exactly `key`, if the program created one.
    #[must_use]
    pub fn source(&self, key: &SourceKey) -> Option<SourceState> {
        self.maps().source_at(key)
    }

    /// Number of per-source entries.
    #[must_use]
    pub fn source_count(&self) -> usize {
        self.maps().sources().len()
    }

    /// The probation entry of exactly `key`, if the challenge admitted one.
    #[must_use]
    pub fn probation(&self, key: &SourceKey) -> Option<SourceState> {
        self.maps().probation_at(key)
    }

    /// Number of probation entries.
    #[must_use]
    pub fn probation_count(&self) -> usize {
        self.maps().probation().len()
    }

    /// Puts `key` in probation, as a valid cookie does.
    pub fn put_probation(&mut self, key: &SourceKey, state: &SourceState) {
        self.maps_mut()
            .put_probation(key, state)
            .expect("writing a probation entry");
    }

    /// Sets the host's own addresses, as the agent does at start.
    pub fn set_local(&mut self, addrs: &[std::net::IpAddr]) {
        self.maps_mut()
            .set_local(addrs)
            .expect("writing the host's addresses");
    }

    /// Overwrites the per-source entry of `key`.
    pub fn put_source(&mut self, key: &SourceKey, state: &SourceState) {
        self.maps_mut()
            .put_source(key, state)
            .expect("writing a source");
    }

    /// Bans `net` until `until_ns` the agent's way: IPv6 widened to the
    /// grouping prefix, the policy generation bumped.
    pub fn ban(&mut self, net: IpNet, until_ns: u64) {
        let prefix = self.ipv6_prefix();
        self.maps_mut()
            .ban(net, until_ns, prefix)
            .expect("writing a ban");
    }

    /// Lifts the ban on `net` the agent's way (the generation bumped).
    pub fn unban(&mut self, net: IpNet) {
        assert!(self.lift(net), "no ban on {net} to lift");
    }

    /// Lifts the ban on `net` if there is one, the agent's way: whether
    /// there was (a failure of the map is the test's).
    pub fn lift(&mut self, net: IpNet) -> bool {
        let prefix = self.ipv6_prefix();
        self.maps_mut().unban(net, prefix).expect("removing a ban")
    }

    /// Adds `net` to the allow list the agent's way (the generation bumped).
    pub fn allow(&mut self, net: IpNet) {
        let mut nets = self.maps().allow_list();
        nets.push(net);
        self.set_allow(&nets);
    }

    /// Removes `net` from the allow list the agent's way (the generation bumped).
    pub fn disallow(&mut self, net: IpNet) {
        let mut nets = self.maps().allow_list();
        let before = nets.len();
        nets.retain(|n| *n != net);
        assert!(nets.len() < before, "{net} is not on the allow list");
        self.set_allow(&nets);
    }

    fn set_allow(&mut self, nets: &[IpNet]) {
        let prefix = self.ipv6_prefix();
        self.maps_mut()
            .set_allow(nets, prefix)
            .expect("writing the allow list");
    }
}

impl Default for Harness {
    fn default() -> Self {
        Self::new()
    }
}
