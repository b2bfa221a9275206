//! A private instance of the XDP program (its own, unpinned maps) driven through
//! `BPF_PROG_TEST_RUN`, with typed access to every map for assertions.

use std::{sync::OnceLock, time::Duration};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, lpm_trie::Key},
    programs::{TestRun, TestRunOptions, Xdp},
};
use limiter_agent::kernel::clock::ClockError;
use limiter_common::{
    Ban, Clock, Config, GLOBAL_USE_COARSE_CLOCK, PROGRAM_NAME, SourceKey, SourceState, ipv6_mask,
    map_names, stat_index,
};

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;

/// The API port the test config declares.
pub const API_PORT: u16 = 8080;

/// The program's per-packet cost and verdict from one `BPF_PROG_TEST_RUN` call.
#[derive(Clone, Copy, Debug)]
pub struct Run {
    pub action: u32,
    pub per_packet: Duration,
}

/// A loaded limiter program with private maps.
pub struct Harness {
    ebpf: Ebpf,
    program: &'static str,
}

/// The calibrated program clock, measured once per process (the mapping from
/// jiffies to `CLOCK_MONOTONIC` is the kernel's, shared by every instance).
///
/// Over one second: this runs while the suite's first tests load their programs
/// on every core, when a tick edge can be seen milliseconds late (a delayed
/// jiffies update), and over 100 ms a 1.2 ms error already snaps `HZ=250` to
/// `HZ=256`, after which the program's clock drifts 2.3% from `CLOCK_MONOTONIC`
/// (`clock_calibration_finds_the_kernel_tick_every_time` in `tests/xdp.rs`).
fn clock(ebpf: &mut Ebpf) -> Clock {
    static CLOCK: OnceLock<Clock> = OnceLock::new();
    *CLOCK.get_or_init(|| {
        limiter_agent::kernel::clock::calibrate(ebpf, Duration::from_secs(1))
            .expect("calibrating the program clock")
    })
}

/// Whether this kernel has `bpf_ktime_get_coarse_ns` for XDP (probed once):
/// the value the harness gives the object's `USE_COARSE_CLOCK` global, as the
/// agent does. Also lifts `RLIMIT_MEMLOCK`, which charges BPF maps before Linux
/// 5.11 (the per-source map alone is larger than the default limit there).
#[must_use]
pub fn coarse_clock() -> bool {
    static COARSE: OnceLock<bool> = OnceLock::new();
    *COARSE.get_or_init(|| {
        limiter_agent::kernel::probe::lift_memlock();
        limiter_agent::kernel::probe::coarse_clock().expect("probing for bpf_ktime_get_coarse_ns")
    })
}

/// Loads the `limiter` program with `USE_COARSE_CLOCK` forced to `coarse`,
/// returning the verifier's refusal (with its log) as text.
pub fn load_with_coarse_clock(coarse: u8) -> Result<(), String> {
    crate::require_root("loading the XDP program");
    let _ = coarse_clock();
    let mut ebpf = EbpfLoader::new()
        .override_global(GLOBAL_USE_COARSE_CLOCK, &coarse, true)
        .load(limiter_agent::object::LIMITER)
        .map_err(|e| format!("{e:#}"))?;
    let program: &mut Xdp = ebpf
        .program_mut(PROGRAM_NAME)
        .expect("program in object")
        .try_into()
        .expect("an XDP program");
    program.load().map_err(|e| match e {
        aya::programs::ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            format!("{io_error}: {verifier_log}")
        }
        other => other.to_string(),
    })
}

/// The config the tests start from: port 8080, /64 grouping, 1 s windows,
/// no ceilings, enforce mode, policy generation 1, the calibrated clock.
#[must_use]
pub fn test_config() -> Config {
    let mut config = Config {
        ipv6_mask: ipv6_mask(64),
        window_ns: 1_000_000_000,
        policy_gen: 1,
        ..Config::default()
    };
    config.ports[0] = API_PORT.to_be();
    config
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
        let mut loader = EbpfLoader::new();
        if let Some(capacity) = capacity {
            loader.map_max_entries(map_names::SOURCES, capacity);
        }
        let coarse = u8::from(coarse_clock());
        loader.override_global(GLOBAL_USE_COARSE_CLOCK, &coarse, true);
        let mut ebpf = loader
            .load(limiter_agent::object::LIMITER)
            .expect("loading the limiter object");
        let clock = clock(&mut ebpf);
        let mut harness = Self {
            ebpf,
            program: PROGRAM_NAME,
        };
        harness.load_program();
        harness.set_config(&Config {
            clock,
            ..test_config()
        });
        harness
    }

    /// Runs the agent's clock calibration over `span` on this instance's
    /// `limiter_clock` program (the config is left as it is).
    pub fn calibrate_clock(&mut self, span: Duration) -> Result<Clock, ClockError> {
        limiter_agent::kernel::clock::calibrate(&mut self.ebpf, span)
    }

    /// Loads the trivial `XDP_PASS` program (the benchmark baseline).
    #[must_use]
    pub fn baseline() -> Self {
        crate::require_root("the XDP benchmark");
        let ebpf = Ebpf::load(limiter_agent::object::BASELINE).expect("loading the baseline");
        let mut harness = Self {
            ebpf,
            program: "baseline",
        };
        harness.load_program();
        harness
    }

    fn load_program(&mut self) {
        let program: &mut Xdp = self
            .ebpf
            .program_mut(self.program)
            .expect("program in object")
            .try_into()
            .expect("an XDP program");
        program.load().expect("the verifier accepts the program");
    }

    fn xdp(&self) -> &Xdp {
        self.ebpf
            .program(self.program)
            .expect("program in object")
            .try_into()
            .expect("an XDP program")
    }

    /// Runs the program once on `frame` and returns its XDP action.
    #[must_use]
    pub fn run(&self, frame: &[u8]) -> u32 {
        self.run_repeat(frame, 1).action
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
    pub fn config(&self) -> Config {
        let map: Array<&MapData, Config> =
            Array::try_from(self.ebpf.map(map_names::CONFIG).expect("config map"))
                .expect("config array");
        map.get(&0, 0).expect("config entry")
    }

    /// Replaces the config.
    pub fn set_config(&mut self, config: &Config) {
        let mut map: Array<&mut MapData, Config> =
            Array::try_from(self.ebpf.map_mut(map_names::CONFIG).expect("config map"))
                .expect("config array");
        map.set(0, config, 0).expect("writing the config");
    }

    /// Edits the config in place.
    pub fn update_config(&mut self, edit: impl FnOnce(&mut Config)) {
        let mut config = self.config();
        edit(&mut config);
        self.set_config(&config);
    }

    /// The counter of (verdict, reason), summed over CPUs.
    #[must_use]
    pub fn stat(&self, verdict: u32, reason: u32) -> u64 {
        let map: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.ebpf.map(map_names::STATS).expect("stats map"))
                .expect("stats array");
        map.get(&stat_index(verdict, reason), 0)
            .expect("stats entry")
            .iter()
            .sum()
    }

    /// Every non-zero counter as (verdict, reason, count), for exact assertions.
    #[must_use]
    pub fn nonzero_stats(&self) -> Vec<(u32, u32, u64)> {
        let mut out = Vec::new();
        for verdict in 0..limiter_common::verdict::COUNT {
            for reason in 0..limiter_common::reason::COUNT {
                let count = self.stat(verdict, reason);
                if count != 0 {
                    out.push((verdict, reason, count));
                }
            }
        }
        out
    }

    fn sources(&self) -> HashMap<&MapData, SourceKey, SourceState> {
        HashMap::try_from(self.ebpf.map(map_names::SOURCES).expect("sources map"))
            .expect("sources hash")
    }

    /// The per-source entry of `key`, if the program created one.
    #[must_use]
    pub fn source(&self, key: &SourceKey) -> Option<SourceState> {
        self.sources().get(key, 0).ok()
    }

    /// Number of per-source entries.
    #[must_use]
    pub fn source_count(&self) -> usize {
        self.sources().keys().filter_map(Result::ok).count()
    }

    /// Overwrites the per-source entry of `key`.
    pub fn put_source(&mut self, key: &SourceKey, state: &SourceState) {
        let mut map: HashMap<&mut MapData, SourceKey, SourceState> =
            HashMap::try_from(self.ebpf.map_mut(map_names::SOURCES).expect("sources map"))
                .expect("sources hash");
        map.insert(key, state, 0).expect("writing a source");
    }

    /// Adds `key/prefix_len` (bits of the 16-byte key) to the ban trie and bumps
    /// the policy generation, as the agent does.
    pub fn ban(&mut self, key: SourceKey, prefix_len: u32, until_ns: u64) {
        let mut map: LpmTrie<&mut MapData, SourceKey, Ban> =
            LpmTrie::try_from(self.ebpf.map_mut(map_names::BANS).expect("bans map"))
                .expect("bans trie");
        map.insert(&Key::new(prefix_len, key), Ban { until_ns }, 0)
            .expect("writing a ban");
        self.update_config(|c| c.policy_gen += 1);
    }

    /// Removes a ban and bumps the policy generation.
    pub fn unban(&mut self, key: SourceKey, prefix_len: u32) {
        let mut map: LpmTrie<&mut MapData, SourceKey, Ban> =
            LpmTrie::try_from(self.ebpf.map_mut(map_names::BANS).expect("bans map"))
                .expect("bans trie");
        map.remove(&Key::new(prefix_len, key))
            .expect("removing a ban");
        self.update_config(|c| c.policy_gen += 1);
    }

    /// Adds `key/prefix_len` to the allow list and bumps the policy generation.
    pub fn allow(&mut self, key: SourceKey, prefix_len: u32) {
        let mut map: LpmTrie<&mut MapData, SourceKey, u8> =
            LpmTrie::try_from(self.ebpf.map_mut(map_names::ALLOW).expect("allow map"))
                .expect("allow trie");
        map.insert(&Key::new(prefix_len, key), 1, 0)
            .expect("writing an allow entry");
        self.update_config(|c| c.policy_gen += 1);
    }

    /// Removes an allow-list entry and bumps the policy generation.
    pub fn disallow(&mut self, key: SourceKey, prefix_len: u32) {
        let mut map: LpmTrie<&mut MapData, SourceKey, u8> =
            LpmTrie::try_from(self.ebpf.map_mut(map_names::ALLOW).expect("allow map"))
                .expect("allow trie");
        map.remove(&Key::new(prefix_len, key))
            .expect("removing an allow entry");
        self.update_config(|c| c.policy_gen += 1);
    }
}

impl Default for Harness {
    fn default() -> Self {
        Self::new()
    }
}
