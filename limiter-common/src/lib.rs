//! The kernel/userspace contract of limiter: the layout of every BPF map key and
//! value, the map names and capacities, and the stat indexes.
//!
//! Both sides compile this crate: `limiter-ebpf` for `bpfel-unknown-none`, the
//! agent and the tests for the host with the `user` feature (which adds the
//! `aya::Pod` impls). Every type is `#[repr(C)]` with its padding written out and
//! its size asserted, so the two sides can never disagree about a byte.
//!
//! Byte order: addresses and ports are stored in **network byte order** (as they
//! appear on the wire), so the program compares them without swapping. Counters,
//! deadlines and generations are in **host byte order**. Deadlines are
//! `CLOCK_MONOTONIC` nanoseconds, the clock of `bpf_ktime_get_ns` and
//! `bpf_ktime_get_coarse_ns`.
#![cfg_attr(not(test), no_std)]
#![expect(
    clippy::inline_always,
    reason = "helpers run per packet in the XDP program: a BPF-to-BPF call costs a call and a return"
)]
#![expect(
    clippy::pub_underscore_fields,
    reason = "padding is written out as public `_pad` fields so values can be built with struct literals"
)]

/// Name of the XDP program in the object.
pub const PROGRAM_NAME: &str = "limiter";

/// The literal name of a map, for the attributes that take only literals: the
/// eBPF crate's `export_name`s (aya's `#[map(name = …)]` accepts no constant).
/// [`map_names`] is built from it, so both sides of the contract spell each
/// name once, here.
#[macro_export]
macro_rules! map_name {
    (config) => {
        "config"
    };
    (sources) => {
        "sources"
    };
    (allow) => {
        "allow"
    };
    (bans) => {
        "bans"
    };
    (stats) => {
        "stats"
    };
    (new_sources) => {
        "new_sources"
    };
}

/// Map names (at most 15 bytes: the kernel's object-name limit). The agent pins
/// each map of [`map_names::PINNED`] under `/sys/fs/bpf/limiter/<instance>/<name>`.
pub mod map_names {
    /// [`crate::Config`] array with one entry.
    pub const CONFIG: &str = map_name!(config);
    /// LRU hash [`crate::SourceKey`] → [`crate::SourceState`].
    pub const SOURCES: &str = map_name!(sources);
    /// LPM trie of [`crate::SourceKey`] addresses that bypass every check.
    pub const ALLOW: &str = map_name!(allow);
    /// LPM trie of [`crate::SourceKey`] addresses → [`crate::Ban`].
    pub const BANS: &str = map_name!(bans);
    /// Per-CPU array of `u64` packet counters, indexed by [`crate::stat_index`].
    pub const STATS: &str = map_name!(stats);
    /// Per-CPU array with one [`crate::NewSources`]: this CPU's new-source
    /// budget in the current window (not pinned: it restarts with the program).
    pub const NEW_SOURCES: &str = map_name!(new_sources);
    /// The maps pinned, so counters, bans and the allow list outlive the agent.
    pub const PINNED: [&str; 5] = [CONFIG, SOURCES, ALLOW, BANS, STATS];
}

/// Default capacity of the per-source LRU hash (overridable at load time).
pub const SOURCES_CAPACITY: u32 = 131_072;
/// Capacity of the allow-list trie.
pub const ALLOW_CAPACITY: u32 = 16_384;
/// Capacity of the ban trie.
pub const BANS_CAPACITY: u32 = 65_536;
/// How many API ports the program matches.
pub const MAX_PORTS: usize = 8;

/// Load-time global: `1` when the kernel has `bpf_ktime_get_coarse_ns` (Linux
/// 5.11+), `0` to fall back to `bpf_ktime_get_ns`. The verifier removes the
/// branch not taken, so the object loads on kernels without the coarse clock.
/// The object's own value is 0; loaders set it from a probe
/// (`limiter_agent::kernel::probe::coarse_clock`).
pub const GLOBAL_USE_COARSE_CLOCK: &str = "USE_COARSE_CLOCK";

/// Prefix length of an IPv4 address inside its IPv4-mapped [`SourceKey`].
pub const V4_MAPPED_PREFIX_LEN: u32 = 96;

/// A source address: IPv6 as is (masked to the configured grouping prefix for
/// the per-source map), IPv4 as an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`).
/// Network byte order. Also the data of the LPM trie keys (`Key<SourceKey>`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SourceKey {
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<SourceKey>() == 16);

impl SourceKey {
    /// The key of an IPv4 address given as its four bytes in network order.
    #[must_use]
    pub const fn from_v4(octets: [u8; 4]) -> Self {
        let mut addr = [0u8; 16];
        addr[10] = 0xff;
        addr[11] = 0xff;
        addr[12] = octets[0];
        addr[13] = octets[1];
        addr[14] = octets[2];
        addr[15] = octets[3];
        Self { addr }
    }

    /// The key of an IPv6 address given as its sixteen bytes in network order.
    #[must_use]
    pub const fn from_v6(octets: [u8; 16]) -> Self {
        Self { addr: octets }
    }

    /// The key of an IPv6 address given as four words whose in-memory bytes are
    /// the address in network order (as loaded from a packet).
    #[inline(always)]
    #[must_use]
    pub fn from_v6_words(words: [u32; 4]) -> Self {
        let mut addr = [0u8; 16];
        addr[0..4].copy_from_slice(&words[0].to_ne_bytes());
        addr[4..8].copy_from_slice(&words[1].to_ne_bytes());
        addr[8..12].copy_from_slice(&words[2].to_ne_bytes());
        addr[12..16].copy_from_slice(&words[3].to_ne_bytes());
        Self { addr }
    }

    /// The IPv4 address when this key is IPv4-mapped.
    #[must_use]
    pub fn as_v4(&self) -> Option<[u8; 4]> {
        let (head, tail) = self.addr.split_at(12);
        if head == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff] {
            Some([tail[0], tail[1], tail[2], tail[3]])
        } else {
            None
        }
    }

    /// This key with every bit past `mask` cleared.
    #[must_use]
    #[inline(always)]
    pub fn masked(&self, mask: &[u8; 16]) -> Self {
        // Two 64-bit ANDs rather than sixteen byte ones: this runs per IPv6 packet.
        let half = |bytes: &[u8; 16], i: usize| {
            let mut word = [0u8; 8];
            word.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
            u64::from_ne_bytes(word)
        };
        let hi = half(&self.addr, 0) & half(mask, 0);
        let lo = half(&self.addr, 1) & half(mask, 1);
        let mut addr = [0u8; 16];
        addr[..8].copy_from_slice(&hi.to_ne_bytes());
        addr[8..].copy_from_slice(&lo.to_ne_bytes());
        Self { addr }
    }
}

/// The netmask (network byte order) of an IPv6 prefix of `len` bits (clamped to 128).
#[must_use]
pub fn ipv6_mask(len: u8) -> [u8; 16] {
    let len = u32::from(len.min(128));
    let bits = if len == 0 {
        0u128
    } else {
        u128::MAX << (128 - len)
    };
    bits.to_be_bytes()
}

/// The program's mode.
pub mod mode {
    /// Drop what is over a ceiling or banned.
    pub const ENFORCE: u8 = 0;
    /// Count what would be dropped; pass everything.
    pub const OBSERVE: u8 = 1;
}

/// Runtime configuration, the only entry of the `config` array. All zero (the
/// state before userspace writes it) means: no API ports, so every packet passes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Config {
    /// API ports, network byte order; 0 marks an unused slot.
    pub ports: [u16; MAX_PORTS],
    /// Mask applied to IPv6 sources before the per-source lookup (network order).
    pub ipv6_mask: [u8; 16],
    /// Length of a ceiling window in nanoseconds (1 s for per-second ceilings).
    pub window_ns: u64,
    /// Kernel auto-ban length in nanoseconds; 0 disables the auto-ban.
    pub autoban_ns: u64,
    /// The program's clock, see [`Clock`].
    pub clock: Clock,
    /// Packets per source per window; 0 = no ceiling.
    pub max_packets: u32,
    /// SYNs (new connections) per source per window; 0 = no ceiling.
    pub max_syns: u32,
    /// Bumped by userspace whenever the allow list or the ban trie changes; a
    /// source entry whose `policy_gen` differs re-reads both tries. Starts at 1.
    pub policy_gen: u32,
    /// Consecutive windows over a ceiling that trigger the auto-ban (0 counts as 1).
    pub autoban_after_windows: u16,
    /// [`mode::ENFORCE`] or [`mode::OBSERVE`].
    pub mode: u8,
    /// 1: while the new-source budget is spent, answer an unknown source's
    /// SYN with a SYN challenge instead of dropping it (see [`challenge`]).
    pub syn_challenge: u8,
    /// Sources each CPU may add to the per-source map per window; 0 = no
    /// limit. Over it, packets of sources not yet in the map are dropped
    /// (allow-listed ones excepted) without creating an entry, so a flood
    /// from more spoofed addresses than the map holds cannot evict the
    /// sources it already tracks, nor escape the ceilings by being forgotten.
    pub max_new_sources: u32,
    pub _pad2: u32,
    /// Secret `SipHash` key of the SYN challenge cookies, random per boot
    /// (kept across agent restarts by the pinned map, like the clock).
    pub challenge_key: [u64; 2],
}
const _: () = assert!(size_of::<Config>() == 112);

/// The SYN challenge: how a source the map does not hold proves, during a
/// spoofed flood, that it receives what is sent to its address.
///
/// The program answers such a source's SYN with a SYN-ACK whose
/// acknowledgment number is a cookie instead of the SYN's sequence number + 1
/// (`XDP_TX`, no state kept). A real TCP stack in SYN-SENT answers an
/// unacceptable SYN-ACK with a RST whose sequence number is that
/// acknowledgment number (RFC 9293 3.10.7.3), and sends its SYN again (Linux
/// 5.7+ after two jiffies, other stacks after their first retransmission
/// timeout). A RST carrying a valid cookie puts the source in the map; its
/// retransmitted SYN then goes to the listener as usual. A spoofed source
/// never sees the cookie, so the flood creates no entry.
///
/// The cookie is `SipHash`-2-4 of the source address, both ports and a time
/// slot under a random key; it is valid for the current slot and the one
/// before (17 to 34 s).
pub mod challenge {
    /// `CLOCK_MONOTONIC` ns >> this = the time slot (2^34 ns, about 17 s).
    pub const SLOT_SHIFT: u32 = 34;

    /// The cookie for `addr` (a [`crate::SourceKey`]'s unmasked bytes),
    /// `ports` (the TCP header's first four bytes, as loaded) and `slot`.
    #[inline(always)]
    #[must_use]
    pub fn cookie(key: &[u64; 2], addr: &[u8; 16], ports: u32, slot: u64) -> u32 {
        let m0 = u64::from_le_bytes([
            addr[0], addr[1], addr[2], addr[3], addr[4], addr[5], addr[6], addr[7],
        ]);
        let m1 = u64::from_le_bytes([
            addr[8], addr[9], addr[10], addr[11], addr[12], addr[13], addr[14], addr[15],
        ]);
        let m2 = u64::from(ports) | (slot << 32);
        let hash = siphash24(key, [m0, m1, m2]);
        (hash ^ (hash >> 32)) as u32
    }

    /// `SipHash`-2-4 of three 64-bit words (a 24-byte message).
    #[inline(always)]
    #[must_use]
    pub fn siphash24(key: &[u64; 2], words: [u64; 3]) -> u64 {
        let mut v = [
            key[0] ^ 0x736f_6d65_7073_6575,
            key[1] ^ 0x646f_7261_6e64_6f6d,
            key[0] ^ 0x6c79_6765_6e65_7261,
            key[1] ^ 0x7465_6462_7974_6573,
        ];
        // The three words, then the final block: the length (24) in the top byte.
        for m in [words[0], words[1], words[2], 24u64 << 56] {
            v[3] ^= m;
            round(&mut v);
            round(&mut v);
            v[0] ^= m;
        }
        v[2] ^= 0xff;
        round(&mut v);
        round(&mut v);
        round(&mut v);
        round(&mut v);
        v[0] ^ v[1] ^ v[2] ^ v[3]
    }

    #[inline(always)]
    fn round(v: &mut [u64; 4]) {
        v[0] = v[0].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(13);
        v[1] ^= v[0];
        v[0] = v[0].rotate_left(32);
        v[2] = v[2].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(16);
        v[3] ^= v[2];
        v[0] = v[0].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(21);
        v[3] ^= v[0];
        v[2] = v[2].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(17);
        v[1] ^= v[2];
        v[2] = v[2].rotate_left(32);
    }
}

/// Value of the per-CPU `new_sources` array: the new-source budget's window.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NewSources {
    /// Start of the window (`CLOCK_MONOTONIC` ns).
    pub window_start_ns: u64,
    /// Packets of unknown sources in it on this CPU (the demand: those
    /// admitted, refused and challenged alike).
    pub count: u32,
    /// 1 when the window before this one ended over budget: a flood is on,
    /// and every unknown source's SYN gets the challenge (when on) without
    /// spending the budget, so the flood adds no entry after its first window.
    pub flooded: u32,
}
const _: () = assert!(size_of::<NewSources>() == 16);

/// How the program tells the time.
///
/// Every helper call costs a call and a return, and with return-thunk
/// mitigations (AMD's SRSO "safe RET", for one) a return alone costs tens of
/// nanoseconds: `bpf_ktime_get_coarse_ns` measured ~20 ns per packet here, as
/// much as the whole rest of the accounting. `bpf_jiffies64` is inlined by the
/// verifier into one load. So userspace samples jiffies and `CLOCK_MONOTONIC` at
/// the same instant (the object's `limiter_clock` program does that through
/// `BPF_PROG_TEST_RUN`) and the program computes
/// `now = mono_base_ns + (jiffies - jiffies_base) * ns_per_jiffy`,
/// which is `CLOCK_MONOTONIC` with the resolution of one tick (like the coarse
/// clock). Jiffies are advanced from the monotonic clock, so the mapping does not
/// drift. With `ns_per_jiffy == 0` (not calibrated) the program calls the
/// coarse-clock helper instead.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Clock {
    /// `CLOCK_MONOTONIC` ns at the calibration sample.
    pub mono_base_ns: u64,
    /// jiffies at the calibration sample.
    pub jiffies_base: u64,
    /// Length of a tick (`1e9 / CONFIG_HZ`); 0 = use the helper clock.
    pub ns_per_jiffy: u64,
}
const _: () = assert!(size_of::<Clock>() == 24);

impl Clock {
    /// `CLOCK_MONOTONIC` ns at `jiffies` (calibrated clocks only).
    #[inline(always)]
    #[must_use]
    pub fn at(&self, jiffies: u64) -> u64 {
        self.mono_base_ns.wrapping_add(
            jiffies
                .wrapping_sub(self.jiffies_base)
                .wrapping_mul(self.ns_per_jiffy),
        )
    }
}

/// Name of the program that samples jiffies and `CLOCK_MONOTONIC` together: run
/// through `BPF_PROG_TEST_RUN` on a frame of at least [`CLOCK_SAMPLE_LEN`]
/// bytes, it writes jiffies (bytes 0..8) and `bpf_ktime_get_ns` (bytes 8..16),
/// native byte order, into the output frame.
pub const CLOCK_PROGRAM_NAME: &str = "limiter_clock";
/// Frame length the clock program needs.
pub const CLOCK_SAMPLE_LEN: usize = 64;

impl Config {
    /// Whether `port` (network byte order) is one of the API ports.
    #[inline(always)]
    #[must_use]
    pub fn is_api_port(&self, port_be: u16) -> bool {
        // Unrolled: eight compares are cheaper than a map lookup.
        port_be != 0
            && (self.ports[0] == port_be
                || self.ports[1] == port_be
                || self.ports[2] == port_be
                || self.ports[3] == port_be
                || self.ports[4] == port_be
                || self.ports[5] == port_be
                || self.ports[6] == port_be
                || self.ports[7] == port_be)
    }
}

/// `SourceState::flags`: the source matched the allow list at `policy_gen`.
pub const SOURCE_ALLOWED: u8 = 1;

/// Per-source state. One lookup on the hot path reads the counters, the cached
/// allow/ban policy and the auto-ban together.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SourceState {
    /// Start of the current ceiling window (`CLOCK_MONOTONIC` ns).
    pub window_start_ns: u64,
    /// Deadline of the ban from the `bans` trie, as read at `policy_gen`; 0 = none.
    pub ban_until_ns: u64,
    /// Deadline of the kernel's own auto-ban; 0 = none.
    pub autoban_until_ns: u64,
    /// API packets seen in the current window (including dropped ones).
    pub packets: u32,
    /// SYNs (SYN without ACK) seen in the current window.
    pub syns: u32,
    /// The `Config::policy_gen` that `flags` and `ban_until_ns` were read at.
    pub policy_gen: u32,
    /// Consecutive windows in which this source went over a ceiling.
    pub strikes: u16,
    /// [`SOURCE_ALLOWED`].
    pub flags: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<SourceState>() == 40);

impl SourceState {
    /// Whether a ban (from the trie or the auto-ban) is in force at `now_ns`.
    #[inline(always)]
    #[must_use]
    pub fn banned_at(&self, now_ns: u64) -> bool {
        self.ban_until_ns > now_ns || self.autoban_until_ns > now_ns
    }
}

/// Value of the `bans` trie.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Ban {
    /// `CLOCK_MONOTONIC` ns after which the ban is ignored; the program needs no
    /// cleanup for expired entries.
    pub until_ns: u64,
}
const _: () = assert!(size_of::<Ban>() == 8);

/// What the program did with a packet.
pub mod verdict {
    pub const PASS: u32 = 0;
    pub const DROP: u32 = 1;
    /// Observe mode: the packet would have been dropped and was passed.
    pub const WOULD_DROP: u32 = 2;
    /// Answered from XDP (`XDP_TX`): the SYN challenge.
    pub const TX: u32 = 3;
    pub const COUNT: u32 = 4;
    pub const NAMES: [&str; COUNT as usize] = ["pass", "drop", "would_drop", "tx"];
}

/// Why the program decided what it did.
pub mod reason {
    /// Not TCP to an API port (or not IP at all).
    pub const NON_API: u32 = 0;
    /// API traffic within the ceilings.
    pub const API: u32 = 1;
    /// Source on the allow list.
    pub const ALLOWLISTED: u32 = 2;
    /// Source banned (ban trie or auto-ban).
    pub const BANNED: u32 = 3;
    /// Source over its packets-per-window ceiling.
    pub const PACKET_CEILING: u32 = 4;
    /// Source over its SYNs-per-window ceiling.
    pub const SYN_CEILING: u32 = 5;
    /// Cut or invalid headers, or an IPv6 extension-header chain longer than
    /// the program walks. Passed; counted against its source (as API traffic)
    /// when the frame gets as far as the source address.
    pub const MALFORMED: u32 = 6;
    /// An IP fragment whose port is unknown (any but a first fragment holding
    /// the TCP header), from a source within its ceilings. Counted against the
    /// source as API traffic.
    pub const FRAGMENT: u32 = 7;
    /// A source not yet in the map while the new-source budget is spent.
    pub const NEW_SOURCE_CEILING: u32 = 8;
    /// Such a source's SYN, answered with a SYN challenge (verdict `tx`).
    pub const SYN_CHALLENGE: u32 = 9;
    /// Such a source's RST carrying a valid cookie: the source is admitted
    /// to the map and the RST, meant for the challenge, dropped.
    pub const CHALLENGE_PASSED: u32 = 10;
    pub const COUNT: u32 = 11;
    pub const NAMES: [&str; COUNT as usize] = [
        "non_api",
        "api",
        "allowlisted",
        "banned",
        "packet_ceiling",
        "syn_ceiling",
        "malformed",
        "fragment",
        "new_source_ceiling",
        "syn_challenge",
        "challenge_passed",
    ];
}

/// Number of entries of the `stats` array.
pub const STATS_LEN: u32 = verdict::COUNT * reason::COUNT;

/// Index of the (verdict, reason) counter in the `stats` array.
#[inline(always)]
#[must_use]
pub const fn stat_index(verdict: u32, reason: u32) -> u32 {
    verdict * reason::COUNT + reason
}

#[cfg(feature = "user")]
mod pod {
    // Every type is repr(C), made only of integers and integer arrays, with its
    // padding written out as fields, so any bit pattern is a valid value.

    // SAFETY: repr(C) `[u8; 16]`, no padding.
    unsafe impl aya::Pod for super::SourceKey {}
    // SAFETY: repr(C) integers and integer arrays, padding written out (size asserted).
    unsafe impl aya::Pod for super::Config {}
    // SAFETY: repr(C) integers, padding written out (size asserted).
    unsafe impl aya::Pod for super::SourceState {}
    // SAFETY: repr(C) one `u64`.
    unsafe impl aya::Pod for super::Ban {}
    // SAFETY: repr(C) integers, padding written out (size asserted).
    unsafe impl aya::Pod for super::NewSources {}
}

/// The fixture every test of the program starts from, shared by the
/// `BPF_PROG_TEST_RUN` suite (`tests`) and the VM matrix (`xtask vm-test`), so
/// the two cannot drift apart.
#[cfg(feature = "test-util")]
pub mod fixture {
    use super::{Config, ipv6_mask};

    /// The API port the test frames are addressed to.
    pub const API_PORT: u16 = 8080;

    /// Port [`API_PORT`], /64 grouping, 1 s windows, no ceilings, enforce
    /// mode, policy generation 1, the precise clock.
    #[must_use]
    pub fn config() -> Config {
        let mut config = Config {
            ipv6_mask: ipv6_mask(64),
            window_ns: 1_000_000_000,
            policy_gen: 1,
            ..Config::default()
        };
        config.ports[0] = API_PORT.to_be();
        config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_the_kernel_layout() {
        assert_eq!(size_of::<SourceKey>(), 16);
        assert_eq!(size_of::<Config>(), 112);
        assert_eq!(core::mem::offset_of!(Config, max_new_sources), 88);
        assert_eq!(core::mem::offset_of!(Config, challenge_key), 96);
        assert_eq!(size_of::<NewSources>(), 16);
        assert_eq!(size_of::<SourceState>(), 40);
        assert_eq!(align_of::<SourceState>(), 8);
        assert_eq!(size_of::<Ban>(), 8);
        assert_eq!(core::mem::offset_of!(Config, ipv6_mask), 16);
        assert_eq!(core::mem::offset_of!(SourceState, packets), 24);
    }

    #[test]
    fn v4_keys_are_ipv4_mapped_in_network_order() {
        let key = SourceKey::from_v4([192, 0, 2, 7]);
        assert_eq!(
            key.addr,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 0, 2, 7]
        );
        assert_eq!(key.as_v4(), Some([192, 0, 2, 7]));
        assert_eq!(SourceKey::from_v6([0x20; 16]).as_v4(), None);
    }

    #[test]
    fn siphash_matches_the_reference_vector_and_cookies_depend_on_every_input() {
        // Key 00..0f and the 24-byte message 00..17, as the reference
        // implementation computes it (the same code gives the paper's vector
        // for the 15-byte message 00..0e).
        let key = [0x0706_0504_0302_0100, 0x0f0e_0d0c_0b0a_0908];
        let words = [
            0x0706_0504_0302_0100,
            0x0f0e_0d0c_0b0a_0908,
            0x1716_1514_1312_1110,
        ];
        assert_eq!(challenge::siphash24(&key, words), 0xb8ad_50c6_f649_af94);
        let addr = SourceKey::from_v4([192, 0, 2, 1]).addr;
        let base = challenge::cookie(&key, &addr, 0x901f_3930, 7);
        let other = SourceKey::from_v4([192, 0, 2, 2]).addr;
        assert_ne!(base, challenge::cookie(&key, &other, 0x901f_3930, 7));
        assert_ne!(base, challenge::cookie(&key, &addr, 0x901f_3931, 7));
        assert_ne!(base, challenge::cookie(&key, &addr, 0x901f_3930, 8));
        assert_ne!(base, challenge::cookie(&[1, 2], &addr, 0x901f_3930, 7));
    }

    #[test]
    fn ipv6_masks() {
        assert_eq!(ipv6_mask(0), [0; 16]);
        assert_eq!(ipv6_mask(128), [0xff; 16]);
        assert_eq!(ipv6_mask(200), [0xff; 16]);
        let m64 = ipv6_mask(64);
        assert_eq!(&m64[..8], &[0xff; 8]);
        assert_eq!(&m64[8..], &[0; 8]);
        let m57 = ipv6_mask(57);
        assert_eq!(m57[7], 0x80);
        assert_eq!(m57[8], 0);
        let key = SourceKey::from_v6([0xab; 16]).masked(&m64);
        assert_eq!(&key.addr[8..], &[0; 8]);
        assert_eq!(&key.addr[..8], &[0xab; 8]);
    }

    #[test]
    fn ports_are_matched_in_network_order() {
        let mut config = Config::default();
        assert!(!config.is_api_port(0));
        assert!(!config.is_api_port(8080u16.to_be()));
        config.ports[3] = 8080u16.to_be();
        assert!(config.is_api_port(8080u16.to_be()));
        assert!(!config.is_api_port(8080));
        assert!(
            !config.is_api_port(0),
            "an unused slot never matches port 0"
        );
    }

    #[test]
    fn stat_indexes_are_dense_and_unique() {
        let mut seen = [false; STATS_LEN as usize];
        for v in 0..verdict::COUNT {
            for r in 0..reason::COUNT {
                let i = stat_index(v, r) as usize;
                assert!(!seen[i]);
                seen[i] = true;
            }
        }
        assert!(seen.iter().all(|s| *s));
    }

    #[test]
    fn calibrated_clock_maps_jiffies_to_monotonic_ns() {
        let clock = Clock {
            mono_base_ns: 5_000_000_000,
            jiffies_base: 4_294_967_000,
            ns_per_jiffy: 4_000_000,
        };
        assert_eq!(clock.at(4_294_967_000), 5_000_000_000);
        assert_eq!(clock.at(4_294_967_250), 6_000_000_000);
        // Across the 32-bit boundary jiffies start near.
        assert_eq!(
            clock.at(4_294_967_296 + 704),
            5_000_000_000 + 1000 * 4_000_000
        );
    }

    #[test]
    fn bans_expire_by_deadline() {
        let mut s = SourceState::default();
        assert!(!s.banned_at(5));
        s.ban_until_ns = 10;
        assert!(s.banned_at(9));
        assert!(!s.banned_at(10));
        s.ban_until_ns = 0;
        s.autoban_until_ns = 20;
        assert!(s.banned_at(19));
        assert!(!s.banned_at(20));
    }
}
