//! The XDP fast path: drops floods and banned sources to the API ports before
//! the kernel allocates an skb, and passes everything else untouched.
//!
//! Per API packet the program does one lookup in the per-source LRU hash, which
//! holds the ceiling counters, the cached allow/ban policy and the auto-ban
//! together. The allow and ban tries are read only when a source is new or the
//! policy generation changed. A source that map does not hold is looked up in
//! `probation` (sources the SYN challenge admitted, `admission.rs`). Non-API
//! traffic touches no hash map at all.
#![no_std]
#![no_main]
#![expect(
    clippy::inline_always,
    reason = "every helper runs per packet: a BPF-to-BPF call costs a call and a return"
)]
#![expect(
    clippy::single_match_else,
    reason = "hit and miss of the per-source lookup are two equal paths, not a special case"
)]
#![expect(
    clippy::needless_pass_by_value,
    reason = "the #[xdp] entry point's signature is fixed by aya"
)]

mod admission;
mod challenge;
mod lookup;
mod parse;

use aya_ebpf::{
    Global,
    bindings::xdp_action,
    helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
    macros::xdp,
    maps::{Array, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
    programs::XdpContext,
};
use limiter_common::{
    ALLOW_CAPACITY, BANS_CAPACITY, Ban, CLOCK_PROGRAM_NAME, CLOCK_SAMPLE_LEN,
    GLOBAL_USE_COARSE_CLOCK, LOCAL_CAPACITY, NewSources, PROBATION_CAPACITY, PROGRAM_NAME,
    ProgramConfig, SOURCE_ALLOWED, SOURCES_CAPACITY, STATS_LEN, SourceKey, SourceState, map_name,
    mode, reason, stat_index, verdict,
};

use crate::{
    admission::{admit_new_source, challenge_unknown, on_probation},
    parse::{Packet, Source, parse},
};

// `#[xdp]` names a program after its function and `#[no_mangle]` a global
// after its static; neither takes a constant. These asserts hold the contract's
// names to the identifiers below, so renaming a constant fails to compile here
// (and renaming an identifier means editing the literal beside it) instead of
// failing to load.
const _: () = assert!(same(PROGRAM_NAME, "limiter"));
const _: () = assert!(same(CLOCK_PROGRAM_NAME, "limiter_clock"));
const _: () = assert!(same(GLOBAL_USE_COARSE_CLOCK, "USE_COARSE_CLOCK"));

const fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// 1 when `bpf_ktime_get_coarse_ns` exists (Linux 5.11+); set by the loader
/// from a probe. 0 by default, so the object loads on every supported kernel
/// even when a loader does not probe: Linux 5.10's verifier refuses the call
/// (`invalid func unknown#160`) on a branch never taken unless this makes the
/// branch dead.
#[unsafe(no_mangle)]
static USE_COARSE_CLOCK: Global<u8> = Global::new(0);

// Each map is what aya's `#[map(name = "…")]` expands to, spelled out: that
// macro takes the name only as a literal, and these names must come from the
// contract (`limiter_common::map_names`), so a rename cannot compile on one
// side only.
#[unsafe(link_section = "maps")]
#[unsafe(export_name = map_name!(config))]
static CONFIG: Array<ProgramConfig> = Array::with_max_entries(1, 0);

#[unsafe(link_section = "maps")]
#[unsafe(export_name = map_name!(sources))]
static SOURCES: LruHashMap<SourceKey, SourceState> =
    LruHashMap::with_max_entries(SOURCES_CAPACITY, 0);

#[unsafe(link_section = "maps")]
#[unsafe(export_name = map_name!(allow))]
static ALLOW: LpmTrie<SourceKey, u8> = LpmTrie::with_max_entries(ALLOW_CAPACITY, 0);

#[unsafe(link_section = "maps")]
#[unsafe(export_name = map_name!(bans))]
static BANS: LpmTrie<SourceKey, Ban> = LpmTrie::with_max_entries(BANS_CAPACITY, 0);

#[unsafe(link_section = "maps")]
#[unsafe(export_name = map_name!(stats))]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STATS_LEN, 0);

#[unsafe(link_section = "maps")]
#[unsafe(export_name = map_name!(new_sources))]
static NEW_SOURCES: PerCpuArray<NewSources> = PerCpuArray::with_max_entries(1, 0);

#[unsafe(link_section = "maps")]
#[unsafe(export_name = map_name!(local))]
static LOCAL: LpmTrie<SourceKey, u8> = LpmTrie::with_max_entries(LOCAL_CAPACITY, 0);

#[unsafe(link_section = "maps")]
#[unsafe(export_name = map_name!(probation))]
static PROBATION: LruHashMap<SourceKey, SourceState> =
    LruHashMap::with_max_entries(PROBATION_CAPACITY, 0);

// Inlined into the entry `#[xdp]` generates: left to LLVM, a body this size
// becomes a BPF-to-BPF call, a call and a return on every packet.
#[xdp]
#[inline(always)]
pub fn limiter(ctx: XdpContext) -> u32 {
    let (verdict, reason) = classify(&ctx);
    if let Some(counter) = STATS.get_ptr_mut(stat_index(verdict, reason)) {
        // SAFETY: the pointer comes from a successful lookup, so it points at a
        // live u64; the slot is this CPU's own and XDP does not preempt itself,
        // so nothing else writes it meanwhile.
        unsafe { *counter += 1 };
    }
    match verdict {
        verdict::DROP => xdp_action::XDP_DROP,
        verdict::TX => xdp_action::XDP_TX,
        _ => xdp_action::XDP_PASS,
    }
}

/// Samples jiffies and `CLOCK_MONOTONIC` at one instant into the frame, for
/// userspace to calibrate [`limiter_common::TickCalibration`]. Run only through
/// `BPF_PROG_TEST_RUN`; never attached.
#[xdp]
pub fn limiter_clock(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    if start + CLOCK_SAMPLE_LEN > ctx.data_end() {
        return xdp_action::XDP_ABORTED;
    }
    let out = start as *mut u64;
    // SAFETY: the bounds check above covers both words of the frame, which the
    // program may write.
    unsafe {
        *out = bpf_jiffies64();
        *out.add(1) = bpf_ktime_get_ns();
    }
    xdp_action::XDP_PASS
}

/// `CLOCK_MONOTONIC` ns with one tick of resolution (see `TickCalibration` for why).
#[inline(always)]
fn now_ns(config: &ProgramConfig) -> u64 {
    if config.clock.ns_per_jiffy != 0 {
        // Inlined by the verifier into a load: no call.
        // SAFETY: a helper without arguments, callable from XDP.
        config.clock.at(unsafe { bpf_jiffies64() })
    } else if USE_COARSE_CLOCK.load() != 0 {
        // SAFETY: a helper without arguments; the loader sets the global only
        // where the kernel has it (Linux 5.11+), and the verifier drops the
        // branch elsewhere.
        unsafe { bpf_ktime_get_coarse_ns() }
    } else {
        // SAFETY: a helper without arguments, callable from XDP.
        unsafe { bpf_ktime_get_ns() }
    }
}

#[inline(always)]
fn classify(ctx: &XdpContext) -> (u32, u32) {
    let Some(config) = CONFIG.get(0) else {
        return (verdict::PASS, reason::NON_API);
    };
    let mut src = Source::default();
    // The reason a packet that passes its source's checks is counted under.
    let (syn, passed) = match parse(ctx, config, &mut src) {
        Packet::Other => return (verdict::PASS, reason::NON_API),
        Packet::Malformed => return (verdict::PASS, reason::MALFORMED),
        Packet::Api { syn } => (syn, reason::API),
        Packet::Opaque { fragment: true } => (false, reason::FRAGMENT),
        Packet::Opaque { fragment: false } => (false, reason::MALFORMED),
    };
    let key = source_key(config, &src);
    let reason = match SOURCES.get_ptr_mut(key) {
        // SAFETY: the pointer comes from a successful lookup, so it points at
        // a live entry (an LRU entry stays valid while the program runs). The
        // map is shared by every CPU and the entry is not locked: two CPUs
        // counting packets of one source at once can lose an update. Accepted:
        // a lost update under-counts a source by a packet or two, well inside
        // the slack of any ceiling, and a spin lock (or atomics on every
        // field) would cost every packet to guard against a miscount that
        // changes no verdict that matters; the counters are a rate, not an
        // account.
        Some(state) => account(config, unsafe { &mut *state }, &key, syn),
        None => {
            if let Some(state) = PROBATION.get_ptr_mut(key) {
                // SAFETY: as for the per-source entry above.
                return on_probation(ctx, config, unsafe { &mut *state }, &key, syn, passed);
            }
            // With the challenge on, a flood admits unknown sources only
            // through it: packets it cannot answer (fragments, extension
            // headers) get no entry then either.
            let challenge_on = config.syn_challenge != 0 && config.mode == mode::ENFORCE;
            if !admit_new_source(config, challenge_on) {
                // No entry: the map keeps the sources it tracks.
                if ALLOW.get(Key::new(128, key)).is_some() {
                    return (verdict::PASS, reason::ALLOWLISTED);
                }
                if challenge_on && src.challengeable {
                    return challenge_unknown(ctx, config, syn);
                }
                return enforce(config, reason::NEW_SOURCE_CEILING);
            }
            let mut state = SourceState::default();
            refresh_policy(config, &mut state, &key);
            let reason = account(config, &mut state, &key, syn);
            // Racing CPUs may both insert a new source; the last one wins,
            // which costs at most one packet of accounting.
            let _ = SOURCES.insert(key, state, 0);
            reason
        }
    };
    if reason == reason::API {
        (verdict::PASS, passed)
    } else {
        enforce(config, reason)
    }
}

/// The per-source key: IPv6 sources grouped by the configured prefix.
#[inline(always)]
fn source_key(config: &ProgramConfig, src: &Source) -> SourceKey {
    if src.ipv6 {
        src.key.masked(&config.ipv6_mask)
    } else {
        src.key
    }
}

/// Turns a reason into the verdict for the current mode.
#[inline(always)]
fn enforce(config: &ProgramConfig, reason: u32) -> (u32, u32) {
    match reason {
        reason::API | reason::ALLOWLISTED => (verdict::PASS, reason),
        _ if config.mode == mode::OBSERVE => (verdict::WOULD_DROP, reason),
        _ => (verdict::DROP, reason),
    }
}

/// Re-reads the allow list and the ban trie for `key` into `state`.
#[inline(always)]
fn refresh_policy(config: &ProgramConfig, state: &mut SourceState, key: &SourceKey) {
    let lookup = Key::new(128, *key);
    state.flags = if ALLOW.get(&lookup).is_some() {
        SOURCE_ALLOWED
    } else {
        0
    };
    state.ban_until_ns = BANS.get(&lookup).map_or(0, |ban| ban.until_ns);
    state.policy_gen = config.policy_gen;
}

/// Counts an API packet against its source and returns the reason for its verdict.
#[inline(always)]
fn account(config: &ProgramConfig, state: &mut SourceState, key: &SourceKey, syn: bool) -> u32 {
    // The tries are read for a new source (by the caller) and again only when
    // userspace has changed them: allowed and banned sources never start a
    // window, so nothing else may trigger a re-read.
    if state.policy_gen != config.policy_gen {
        refresh_policy(config, state, key);
    }
    if state.flags & SOURCE_ALLOWED != 0 {
        return reason::ALLOWLISTED;
    }
    let now = now_ns(config);
    if state.banned_at(now) {
        return reason::BANNED;
    }
    let elapsed = now.wrapping_sub(state.window_start_ns);
    if elapsed >= config.window_ns {
        // A window that went over, followed directly by this one, keeps the strikes.
        if !over_ceiling(config, state) || elapsed >= 2 * config.window_ns {
            state.strikes = 0;
        }
        state.window_start_ns = now;
        state.packets = 0;
        state.syns = 0;
    }
    let was_over = over_ceiling(config, state);
    state.packets = state.packets.saturating_add(1);
    if syn {
        state.syns = state.syns.saturating_add(1);
    }
    if !was_over && over_ceiling(config, state) {
        state.strikes = state.strikes.saturating_add(1);
        if config.autoban_ns != 0 && state.strikes >= config.autoban_after_windows.max(1) {
            state.autoban_until_ns = now + config.autoban_ns;
        }
    }
    if syn && config.max_syns != 0 && state.syns > config.max_syns {
        reason::SYN_CEILING
    } else if config.max_packets != 0 && state.packets > config.max_packets {
        reason::PACKET_CEILING
    } else {
        reason::API
    }
}

#[inline(always)]
fn over_ceiling(config: &ProgramConfig, state: &SourceState) -> bool {
    (config.max_packets != 0 && state.packets > config.max_packets)
        || (config.max_syns != 0 && state.syns > config.max_syns)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
