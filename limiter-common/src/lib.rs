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
    (probation) => {
        "probation"
    };
    (local) => {
        "local"
    };
}

/// Map names (at most 15 bytes: the kernel's object-name limit). The agent pins
/// each map of [`map_names::PINNED`] under `/sys/fs/bpf/limiter/<instance>/<name>`.
pub mod map_names {
    /// [`crate::ProgramConfig`] array with one entry.
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
    /// LRU hash [`crate::SourceKey`] → [`crate::SourceState`] of the sources
    /// admitted by the SYN challenge and not yet promoted to [`SOURCES`]
    /// (see [`crate::challenge`]).
    pub const PROBATION: &str = map_name!(probation);
    /// LPM trie of the host's own addresses ([`crate::SourceKey`], host
    /// routes), which the SYN challenge never answers (written by the agent
    /// at start and on reload).
    pub const LOCAL: &str = map_name!(local);
    /// The maps pinned, so counters, bans and the allow list outlive the agent.
    pub const PINNED: [&str; 7] = [CONFIG, SOURCES, ALLOW, BANS, STATS, PROBATION, LOCAL];
}

/// Default capacity of the per-source LRU hash (overridable at load time).
pub const SOURCES_CAPACITY: u32 = 131_072;
/// Capacity of the probation LRU hash: sources admitted by the SYN
/// challenge, held apart from the per-source map until promoted.
pub const PROBATION_CAPACITY: u32 = SOURCES_CAPACITY / 4;
/// SYNs a source in probation may pass per window until it is promoted. A
/// valid cookie proves only that some host answers at the address (a
/// bystander's kernel echoes it), so probation is worth a client's
/// handshakes, not a known source's ceilings: 32,768 bystander entries at
/// the full SYN ceiling would be a SYN flood (and the kernel's SYN-ACKs a
/// reflection) the budgets never see. Each SYN passed also takes a token of
/// the SYN-ACK cap.
pub const PROBATION_MAX_SYNS: u32 = 8;
/// Packets a source in probation may pass per window until it is promoted
/// (its first packet of an established connection promotes it).
pub const PROBATION_MAX_PACKETS: u32 = 64;
/// Capacity of the trie of the host's own addresses.
pub const LOCAL_CAPACITY: u32 = 1024;
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
pub struct ProgramConfig {
    /// API ports, network byte order; 0 marks an unused slot.
    pub ports: [u16; MAX_PORTS],
    /// Mask applied to IPv6 sources before the per-source lookup (network order).
    pub ipv6_mask: [u8; 16],
    /// Length of a ceiling window in nanoseconds (1 s for per-second ceilings).
    pub window_ns: u64,
    /// Kernel auto-ban length in nanoseconds; 0 disables the auto-ban.
    pub autoban_ns: u64,
    /// The program's clock, see [`TickCalibration`].
    pub clock: TickCalibration,
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
    /// Challenge SYN-ACKs each CPU may send per window (a token bucket of
    /// this size, refilled at this rate); 0 = no cap. Over it an unknown
    /// source's SYN is dropped (`syn_ack_cap`).
    pub max_syn_acks: u32,
    /// Secret `SipHash` key of the SYN challenge cookies, random per boot
    /// (kept across agent restarts by the pinned map, like the clock).
    pub challenge_key: [u64; 2],
    /// Sources each CPU may admit to probation by a valid cookie per
    /// window; 0 = no limit.
    pub max_challenge_admissions: u32,
    pub _pad2: u32,
}
const _: () = assert!(size_of::<ProgramConfig>() == 120);

/// The SYN challenge: how a source the map does not hold proves, during a
/// spoofed flood, that it receives what is sent to its address, and what
/// that proof is worth.
///
/// The program answers such a source's SYN with a SYN-ACK whose
/// acknowledgment number is a cookie instead of the SYN's sequence number + 1
/// (`XDP_TX`, no state kept). A real TCP stack in SYN-SENT answers an
/// unacceptable SYN-ACK with a RST whose sequence number is that
/// acknowledgment number (RFC 9293 3.10.7.3), and sends its SYN again (Linux
/// 5.7+ after two jiffies, other stacks after their first retransmission
/// timeout).
///
/// **What a valid cookie proves, and what it does not.** Every host answers
/// an unexpected SYN-ACK on a closed port the same way, so an attacker who
/// spoofs SYNs from the addresses of real third-party hosts ("bystanders")
/// has their kernels echo the cookies back. A valid RST proves only that
/// *some* host at the address answers, not that it wants to talk to us.
/// Hence:
///
/// - **Probation.** A RST with a valid cookie puts its source in the
///   `probation` LRU map ([`crate::PROBATION_CAPACITY`] entries), never in
///   `sources`: a campaign of reflected RSTs can churn only probation, never
///   push out a source that has been served, nor the auto-ban its entry
///   holds. A probation source is served like a known one (same ceilings).
/// - **Admission budget.** Each CPU admits at most
///   [`crate::ProgramConfig::max_challenge_admissions`] sources to probation per
///   window (over it: `challenge_budget`, no entry), so a legitimate client
///   stays in probation for at least capacity / (budget × CPUs) seconds,
///   far longer than its handshake takes, however fast the campaign runs.
/// - **Promotion.** A probation source moves to `sources` on its first
///   packet that belongs to an established connection of this host (the
///   kernel's socket lookup, `bpf_sk_lookup_tcp`, finds the connection in
///   `ESTABLISHED`): a completed three-way handshake, which a host that did
///   not send the SYN never makes. Promotions share the new-source budget
///   ([`crate::ProgramConfig::max_new_sources`] per CPU per window), so the map
///   takes in at most twice that budget a second however many real hosts an
///   attacker owns.
/// - **Reflection.** The SYN-ACKs themselves are capped per CPU
///   ([`crate::ProgramConfig::max_syn_acks`], a token bucket; over it
///   `syn_ack_cap`), never sent to a source no reply may go to
///   ([`martian_v4`], [`martian_v6`], the SYN's own destination, or any
///   other address of the host in the `local` trie: `martian_source`), and sent only the way a reply of the host's own
///   stack would go: to the next hop the FIB gives for the source
///   (`bpf_fib_lookup`), when that is out of the interface the SYN came in
///   on and its neighbour entry is known; otherwise not at all
///   (`no_return_path`). Where the FIB cannot say, the frame's MACs are
///   swapped instead, as before: on the loopback device (no link layer;
///   also where `BPF_PROG_TEST_RUN` runs its frames) and on an interface
///   with forwarding off, where the kernel refuses the lookup. There a
///   spoofer on the same segment reads the cookies of addresses it claims;
///   what that buys is probation, budgeted, and never promotion: the
///   kernel's own SYN-ACK goes by the real route.
///
/// The cookie is `SipHash`-2-4 of the source address, both ports and a time
/// slot under a random key; it is valid for the current slot and the one
/// before (17 to 34 s).
pub mod challenge {
    /// `CLOCK_MONOTONIC` ns >> this = the time slot (2^34 ns, about 17 s).
    pub const SLOT_SHIFT: u32 = 34;

    /// Whether no SYN-ACK may go to the IPv4 address `addr` (network
    /// order): "this network" 0/8 (the unspecified address included),
    /// loopback 127/8, multicast 224/4, reserved 240/4 (the limited
    /// broadcast address included).
    #[inline(always)]
    #[must_use]
    pub fn martian_v4(addr: [u8; 4]) -> bool {
        addr[0] == 0 || addr[0] == 127 || addr[0] >= 224
    }

    /// Whether no SYN-ACK may go to the IPv6 address `addr` (network
    /// order): unspecified `::`, loopback `::1`, multicast `ff00::/8`, and
    /// the IPv4-mapped and -compatible ranges `::ffff:0:0/96` and `::/96`
    /// (no IPv6 packet comes from those).
    #[inline(always)]
    #[must_use]
    pub fn martian_v6(addr: &[u8; 16]) -> bool {
        if addr[0] == 0xff {
            return true;
        }
        let head = u64::from_ne_bytes([
            addr[0], addr[1], addr[2], addr[3], addr[4], addr[5], addr[6], addr[7],
        ]);
        let middle = u32::from_ne_bytes([addr[8], addr[9], addr[10], addr[11]]);
        // ::/96 (unspecified, loopback, IPv4-compatible) and ::ffff:0:0/96.
        head == 0 && (middle == 0 || middle == u32::from_ne_bytes([0, 0, 0xff, 0xff]))
    }

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

/// Value of the per-CPU `new_sources` array: this CPU's budgets for sources
/// the map does not hold (new-source, challenge admission, promotion, and
/// the SYN-ACK token bucket).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NewSources {
    /// Start of the window (`CLOCK_MONOTONIC` ns).
    pub window_start_ns: u64,
    /// Packets of unknown sources in it on this CPU (the demand: those
    /// admitted, refused and challenged alike).
    pub count: u32,
    /// 1 when the window before this one ended over budget: a flood is on,
    /// and (with the challenge on) unknown sources get in only through the
    /// challenge, so the flood adds no entry to `sources` after its first
    /// window.
    pub flooded: u32,
    /// Sources admitted to probation by a valid cookie in this window.
    pub admitted: u32,
    /// Probation sources promoted to `sources` in this window.
    pub promoted: u32,
    /// When the SYN-ACK bucket was last refilled up to (`CLOCK_MONOTONIC` ns).
    pub syn_ack_refill_ns: u64,
    /// SYN-ACKs this CPU may still send.
    pub syn_ack_tokens: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<NewSources>() == 40);

impl NewSources {
    /// Refills the SYN-ACK bucket up to `now_ns` (`rate` tokens per
    /// `window_ns`, at most `rate` held: a full bucket after a quiet
    /// window) and says whether it holds a token. `rate` 0 means no cap.
    #[inline(always)]
    pub fn syn_ack_ready(&mut self, now_ns: u64, rate: u32, window_ns: u64) -> bool {
        if rate == 0 {
            return true;
        }
        let window_ns = window_ns.max(1);
        // Clamped, so the product below cannot overflow: a window refills
        // the whole bucket anyway.
        let elapsed = now_ns.wrapping_sub(self.syn_ack_refill_ns).min(window_ns);
        let earned = elapsed * u64::from(rate) / window_ns;
        if earned > 0 {
            let tokens = u64::from(self.syn_ack_tokens) + earned;
            if tokens >= u64::from(rate) {
                self.syn_ack_tokens = rate;
                self.syn_ack_refill_ns = now_ns;
            } else {
                // Only the time the tokens were earned in is spent, so a
                // fraction of a token is never lost between calls.
                self.syn_ack_tokens = tokens as u32;
                self.syn_ack_refill_ns = self
                    .syn_ack_refill_ns
                    .wrapping_add(earned * window_ns / u64::from(rate));
            }
        }
        self.syn_ack_tokens > 0
    }

    /// Spends a token [`NewSources::syn_ack_ready`] found (no-op without a cap).
    #[inline(always)]
    pub fn spend_syn_ack(&mut self, rate: u32) {
        if rate != 0 {
            self.syn_ack_tokens = self.syn_ack_tokens.saturating_sub(1);
        }
    }

    /// [`NewSources::syn_ack_ready`], then the token spent.
    #[inline(always)]
    pub fn take_syn_ack(&mut self, now_ns: u64, rate: u32, window_ns: u64) -> bool {
        let ready = self.syn_ack_ready(now_ns, rate, window_ns);
        if ready {
            self.spend_syn_ack(rate);
        }
        ready
    }
}

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
pub struct TickCalibration {
    /// `CLOCK_MONOTONIC` ns at the calibration sample.
    pub mono_base_ns: u64,
    /// jiffies at the calibration sample.
    pub jiffies_base: u64,
    /// Length of a tick (`1e9 / CONFIG_HZ`); 0 = use the helper clock.
    pub ns_per_jiffy: u64,
}
const _: () = assert!(size_of::<TickCalibration>() == 24);

impl TickCalibration {
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

impl ProgramConfig {
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
    /// The `ProgramConfig::policy_gen` that `flags` and `ban_until_ns` were read at.
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
    /// to probation and the RST, meant for the challenge, dropped.
    pub const CHALLENGE_PASSED: u32 = 10;
    /// Such a source's SYN while this CPU's SYN-ACK bucket is empty: dropped
    /// unanswered.
    pub const SYN_ACK_CAP: u32 = 11;
    /// Such a source's SYN from an address no reply may go to (martian,
    /// loopback, multicast, broadcast, unspecified, the SYN's own
    /// destination): dropped unanswered.
    pub const MARTIAN_SOURCE: u32 = 12;
    /// Such a source's SYN when the FIB gives no way back to it through the
    /// interface it came in on with a known neighbour (or says the address
    /// is local, broadcast or unreachable): dropped unanswered.
    pub const NO_RETURN_PATH: u32 = 13;
    /// A RST with a valid cookie while this CPU's challenge admission budget
    /// is spent: dropped, no entry.
    pub const CHALLENGE_BUDGET: u32 = 14;
    /// A probation source's packet on an established connection: the source
    /// is moved to the per-source map and the packet passed.
    pub const PROMOTED: u32 = 15;
    pub const COUNT: u32 = 16;
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
        "syn_ack_cap",
        "martian_source",
        "no_return_path",
        "challenge_budget",
        "promoted",
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
    unsafe impl aya::Pod for super::ProgramConfig {}
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
    use super::{ProgramConfig, ipv6_mask};

    /// The API port the test frames are addressed to.
    pub const API_PORT: u16 = 8080;

    /// Port [`API_PORT`], /64 grouping, 1 s windows, no ceilings, enforce
    /// mode, policy generation 1, the precise clock.
    #[must_use]
    pub fn config() -> ProgramConfig {
        let mut config = ProgramConfig {
            ipv6_mask: ipv6_mask(64),
            window_ns: 1_000_000_000,
            policy_gen: 1,
            ..ProgramConfig::default()
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
        assert_eq!(size_of::<ProgramConfig>(), 120);
        assert_eq!(core::mem::offset_of!(ProgramConfig, max_new_sources), 88);
        assert_eq!(core::mem::offset_of!(ProgramConfig, max_syn_acks), 92);
        assert_eq!(core::mem::offset_of!(ProgramConfig, challenge_key), 96);
        assert_eq!(
            core::mem::offset_of!(ProgramConfig, max_challenge_admissions),
            112
        );
        assert_eq!(size_of::<NewSources>(), 40);
        assert_eq!(core::mem::offset_of!(NewSources, syn_ack_refill_ns), 24);
        assert_eq!(size_of::<SourceState>(), 40);
        assert_eq!(align_of::<SourceState>(), 8);
        assert_eq!(size_of::<Ban>(), 8);
        assert_eq!(core::mem::offset_of!(ProgramConfig, ipv6_mask), 16);
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
    fn martian_sources_get_no_answer() {
        use challenge::{martian_v4, martian_v6};
        for v4 in [
            [0, 0, 0, 0],
            [0, 1, 2, 3],
            [127, 0, 0, 1],
            [127, 255, 0, 9],
            [224, 0, 0, 1],
            [239, 255, 255, 250],
            [240, 0, 0, 1],
            [255, 255, 255, 255],
        ] {
            assert!(martian_v4(v4), "{v4:?}");
        }
        for v4 in [
            [1, 0, 0, 0],
            [10, 0, 0, 1],
            [192, 0, 2, 7],
            [223, 255, 255, 255],
        ] {
            assert!(!martian_v4(v4), "{v4:?}");
        }
        let v6 = |s: &str| s.parse::<std::net::Ipv6Addr>().unwrap().octets();
        for addr in [
            "::",
            "::1",
            "ff02::1",
            "ff0e::1234",
            "::ffff:192.0.2.7",
            "::192.0.2.7",
        ] {
            assert!(martian_v6(&v6(addr)), "{addr}");
        }
        for addr in [
            "2001:db8::1",
            "fe80::1",
            "fd00::1",
            "64:ff9b::192.0.2.7",
            "::1:0:0:1",
        ] {
            assert!(!martian_v6(&v6(addr)), "{addr}");
        }
    }

    #[test]
    fn the_syn_ack_bucket_refills_at_its_rate_and_holds_one_window() {
        const SECOND: u64 = 1_000_000_000;
        let mut bucket = NewSources::default();
        let t0 = 1_000 * SECOND;
        // Full after a quiet window: exactly `rate` at once, then none.
        assert_eq!(
            (0..20)
                .filter(|_| bucket.take_syn_ack(t0, 10, SECOND))
                .count(),
            10
        );
        // A tenth of a second earns one; two twentieths earn one, not zero.
        assert!(bucket.take_syn_ack(t0 + SECOND / 10, 10, SECOND));
        assert!(!bucket.take_syn_ack(t0 + SECOND / 10, 10, SECOND));
        assert!(!bucket.take_syn_ack(t0 + SECOND / 10 + SECOND / 20, 10, SECOND));
        assert!(bucket.take_syn_ack(t0 + SECOND / 5, 10, SECOND));
        // Over a long run the rate holds: one per 100 ms, so 99 in the
        // 9.999 s after the last one taken.
        let taken = (0..10_000u64)
            .filter(|i| bucket.take_syn_ack(t0 + SECOND / 5 + i * SECOND / 1000, 10, SECOND))
            .count();
        assert_eq!(taken, 99);
        // However long the pause, the bucket holds one window's worth.
        let later = t0 + 3600 * SECOND;
        assert_eq!(
            (0..50)
                .filter(|_| bucket.take_syn_ack(later, 10, SECOND))
                .count(),
            10
        );
        // No cap.
        assert!((0..1000).all(|_| bucket.take_syn_ack(later, 0, SECOND)));
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
        let mut config = ProgramConfig::default();
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
        let clock = TickCalibration {
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
