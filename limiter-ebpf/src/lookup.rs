//! What the kernel's own tables say about a source: the way a reply to it
//! would go (the FIB and the neighbour table, for the challenge SYN-ACK), and
//! whether it has an established connection here (for promotion out of
//! probation). Both run only for sources the per-source map does not hold.

use aya_ebpf::{
    bindings::{
        BPF_F_CURRENT_NETNS, BPF_FIB_LKUP_RET_FWD_DISABLED, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_FIB_LOOKUP_OUTPUT, BPF_TCP_ESTABLISHED, bpf_fib_lookup as FibParams, bpf_sock_tuple,
    },
    helpers::{bpf_fib_lookup, bpf_sk_lookup_tcp, bpf_sk_release},
    programs::XdpContext,
};

use crate::parse::Source;

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const IPPROTO_TCP: u8 = 6;
/// `size_of::<bpf_fib_lookup>()` as the helper takes it (64 bytes).
const FIB_PARAMS_LEN: i32 = 64;
const _: () = assert!(size_of::<FibParams>() == FIB_PARAMS_LEN as usize);
/// The helper's "the namespace of the packet's device" (`BPF_F_CURRENT_NETNS`, -1).
const CURRENT_NETNS: u64 = u64::MAX;
const _: () = assert!(BPF_F_CURRENT_NETNS == -1);
/// The loopback device's index, the same in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

/// How the answer to a source leaves: [`next_hop`]'s result.
pub const HOP_NONE: u8 = 0;
/// Through the ingress interface to the MACs written out.
pub const HOP_LINK: u8 = 1;
/// Back to the frame's sender, its MACs swapped: where the FIB cannot say
/// (the loopback device, or an interface that does not forward).
pub const HOP_SWAP: u8 = 2;

/// Reads a `T` at `offset` of the packet, bounds read afresh (see
/// `challenge::ptr_at` for why).
#[inline(always)]
fn read<T: Copy>(ctx: &XdpContext, offset: usize) -> Option<T> {
    // SAFETY: `ctx.ctx` is the `xdp_md` the kernel passed in, valid for the
    // whole run of the program.
    let (start, end) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*ctx.ctx).data) as usize,
            core::ptr::read_volatile(&raw const (*ctx.ctx).data_end) as usize,
        )
    };
    if start + offset + size_of::<T>() > end {
        return None;
    }
    // SAFETY: the check above puts the whole `T` inside the packet; `T` is a
    // plain integer array, valid for any bytes.
    Some(unsafe { *((start + offset) as *const T) })
}

/// Where a reply of this host's own stack to `src` (a SYN, parsed) would
/// go: the FIB's route to the source's address, from the SYN's destination,
/// out of the interface the SYN came in on, to the neighbour entry of the
/// next hop. [`HOP_LINK`] with `macs` = (source MAC, destination MAC) when
/// all of that exists; [`HOP_NONE`] when the route leaves by another
/// interface, the address is local, broadcast, multicast or unreachable, or
/// the next hop's neighbour entry is not resolved (a real reply would wait
/// for ARP or neighbour discovery; this answer is never sent instead).
///
/// [`HOP_SWAP`] where the FIB cannot say: on the loopback device (no link
/// layer; also where `BPF_PROG_TEST_RUN` runs frames), and on an interface
/// with forwarding off, where the kernel refuses the lookup
/// (`BPF_FIB_LKUP_RET_FWD_DISABLED`, Linux 5.10 to 6.12 alike: the helper
/// was made for forwarding).
#[inline(always)]
pub fn next_hop(ctx: &XdpContext, src: &Source, macs: &mut [[u8; 6]; 2]) -> u8 {
    // SAFETY: `ctx.ctx` is the `xdp_md` the kernel passed in.
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    if ingress == LOOPBACK_IFINDEX {
        return HOP_SWAP;
    }
    // SAFETY: a plain C struct, valid all zero.
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    params.l4_protocol = IPPROTO_TCP;
    params.ifindex = ingress;
    let Some(ports) = read::<[u16; 2]>(ctx, src.l4) else {
        return HOP_NONE;
    };
    // The reply's direction: from the SYN's destination to its source.
    params.sport = ports[1];
    params.dport = ports[0];
    if src.ipv6 {
        let (Some(from), Some(to)) = (
            read::<[u32; 4]>(ctx, src.l3 + 8),
            read::<[u32; 4]>(ctx, src.l3 + 24),
        ) else {
            return HOP_NONE;
        };
        params.family = AF_INET6;
        params.__bindgen_anon_3.ipv6_src = to;
        params.__bindgen_anon_4.ipv6_dst = from;
    } else {
        let (Some(from), Some(to)) = (read::<u32>(ctx, src.l3 + 12), read::<u32>(ctx, src.l3 + 16))
        else {
            return HOP_NONE;
        };
        params.family = AF_INET;
        params.__bindgen_anon_3.ipv4_src = to;
        params.__bindgen_anon_4.ipv4_dst = from;
    }
    // OUTPUT: looked up as this host's own traffic (a forwarding lookup
    // needs forwarding on the ingress interface). The size is a constant.
    // SAFETY: `params` is a whole `bpf_fib_lookup` on the stack; the context
    // is the program's own.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx.cast(),
            &raw mut params,
            FIB_PARAMS_LEN,
            BPF_FIB_LOOKUP_OUTPUT,
        )
    };
    if rc == i64::from(BPF_FIB_LKUP_RET_FWD_DISABLED) {
        return HOP_SWAP;
    }
    if rc != i64::from(BPF_FIB_LKUP_RET_SUCCESS) || params.ifindex != ingress {
        return HOP_NONE;
    }
    macs[0] = params.smac;
    macs[1] = params.dmac;
    HOP_LINK
}

/// Whether the TCP segment described by `src` belongs to a connection this
/// host has in `ESTABLISHED`: its three-way handshake completed, so the
/// source received our SYN-ACK. (A request socket, mid-handshake, is found
/// as its listener, and a listener is not established.)
#[inline(always)]
pub fn established(ctx: &XdpContext, src: &Source) -> bool {
    let Some(ports) = read::<[u16; 2]>(ctx, src.l4) else {
        return false;
    };
    // SAFETY: a plain C union of integers, valid all zero.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let size = if src.ipv6 {
        let (Some(from), Some(to)) = (
            read::<[u32; 4]>(ctx, src.l3 + 8),
            read::<[u32; 4]>(ctx, src.l3 + 24),
        ) else {
            return false;
        };
        tuple.__bindgen_anon_1.ipv6.saddr = from;
        tuple.__bindgen_anon_1.ipv6.daddr = to;
        tuple.__bindgen_anon_1.ipv6.sport = ports[0];
        tuple.__bindgen_anon_1.ipv6.dport = ports[1];
        36
    } else {
        let (Some(from), Some(to)) = (read::<u32>(ctx, src.l3 + 12), read::<u32>(ctx, src.l3 + 16))
        else {
            return false;
        };
        tuple.__bindgen_anon_1.ipv4.saddr = from;
        tuple.__bindgen_anon_1.ipv4.daddr = to;
        tuple.__bindgen_anon_1.ipv4.sport = ports[0];
        tuple.__bindgen_anon_1.ipv4.dport = ports[1];
        12
    };
    // SAFETY: `tuple` lives on the stack for the call and holds `size`
    // bytes of the member in use; the netns argument is the helper's
    // "the device's own namespace".
    let sk = unsafe { bpf_sk_lookup_tcp(ctx.ctx.cast(), &raw mut tuple, size, CURRENT_NETNS, 0) };
    if sk.is_null() {
        return false;
    }
    // SAFETY: a non-null socket from the lookup, readable until released
    // just below (the verifier holds the program to that release).
    let state = unsafe { (*sk).state };
    // SAFETY: the reference the lookup took, released once.
    unsafe { bpf_sk_release(sk.cast()) };
    state == BPF_TCP_ESTABLISHED
}
