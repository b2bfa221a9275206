//! Header parsing: Ethernet (with up to two VLAN tags), IPv4 (with options),
//! IPv6 (with extension headers), TCP. Every read goes through [`ptr_at`], the one
//! bounds check the verifier needs to see.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
use limiter_common::{ProgramConfig, SourceKey};

const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_DSTOPTS: u8 = 60;

/// IPv6 extension headers walked before giving up (and counting the packet as
/// opaque, against its source): enough for any chain a real stack sends.
const MAX_IPV6_EXT_HEADERS: usize = 6;

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

/// What the parser found out about a packet. A plain value rather than an enum
/// carrying the source: LLVM merges the variants of such an enum through
/// registers the verifier sees as uninitialised, so the source goes to an
/// out-parameter the caller zeroes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Packet {
    /// Provably not TCP to an API port (or not IP at all): never limited.
    Other,
    /// Cut or invalid before the source address is known: nothing to count
    /// it against. The kernel drops such frames itself.
    Malformed,
    /// The source is known but not whether the packet is for an API port: a
    /// fragment after the first, a first fragment too short to hold the
    /// ports, an IPv6 extension-header chain longer than the walk, or a cut or
    /// invalid header after the IP header. Counted as API traffic, so none of
    /// these is a way past a ban, a ceiling or the new-source budget.
    Opaque { fragment: bool },
    /// A TCP segment to an API port; `syn` for SYN without ACK. A first
    /// fragment that holds the TCP header counts as its whole packet.
    Api { syn: bool },
}

/// The source of an opaque or API packet, filled in by [`parse`], and where
/// an API packet's headers are, for the SYN challenge.
#[derive(Clone, Copy, Default)]
pub struct Source {
    pub key: SourceKey,
    pub ipv6: bool,
    /// Offset of the IP header.
    pub l3: usize,
    /// Offset of the TCP header (API packets only).
    pub l4: usize,
    /// The TCP flags byte (API packets only).
    pub tcp_flags: u8,
    /// The TCP header directly follows the IP header (IPv6 without extension
    /// headers, any IPv4) of a whole packet: one the challenge can answer by
    /// turning it around in place.
    pub challengeable: bool,
}

pub const TCP_RST: u8 = 0x04;

/// Returns a pointer to a `T` at `offset` when the whole `T` lies inside the packet.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

/// Reads a `T` at `offset`. Packet loads may be misaligned (IPv4 options, VLAN
/// tags); the verifier allows that on architectures with efficient unaligned
/// access, and word-sized loads cost a fraction of the byte-wise ones that
/// `read_unaligned` compiles to here.
#[inline(always)]
fn read<T: Copy>(ctx: &XdpContext, offset: usize) -> Option<T> {
    // SAFETY: `ptr_at` checked that the whole `T` lies inside the packet; `T`
    // is a plain header or integer, valid for any bytes.
    ptr_at::<T>(ctx, offset).map(|p| unsafe { *p })
}

/// Parses `ctx` far enough to classify it against `config`'s API ports.
#[inline(always)]
pub fn parse(ctx: &XdpContext, config: &ProgramConfig, src: &mut Source) -> Packet {
    match parse_l2(ctx, config, src) {
        Some(packet) => packet,
        None => Packet::Malformed,
    }
}

#[inline(always)]
fn parse_l2(ctx: &XdpContext, config: &ProgramConfig, src: &mut Source) -> Option<Packet> {
    // Destination and source MACs, then the EtherType (or a VLAN TPID).
    let mut offset = 12;
    let mut ethertype = u16::from_be(read::<u16>(ctx, offset)?);
    offset += 2;
    // Up to two tags: 802.1ad outer + 802.1Q inner (QinQ), or a single 802.1Q.
    for _ in 0..2 {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        // TCI (2 bytes) then the encapsulated EtherType.
        ethertype = u16::from_be(read::<u16>(ctx, offset + 2)?);
        offset += 4;
    }
    match ethertype {
        ETH_P_IPV4 => parse_ipv4(ctx, config, offset, src),
        ETH_P_IPV6 => parse_ipv6(ctx, config, offset, src),
        _ => Some(Packet::Other),
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv4Hdr {
    version_ihl: u8,
    tos: u8,
    total_len: u16,
    id: u16,
    frag_off: u16,
    ttl: u8,
    protocol: u8,
    check: u16,
    saddr: u32,
    daddr: u32,
}

#[inline(always)]
fn parse_ipv4(
    ctx: &XdpContext,
    config: &ProgramConfig,
    offset: usize,
    src: &mut Source,
) -> Option<Packet> {
    let ip = ptr_at::<Ipv4Hdr>(ctx, offset)?;
    // SAFETY: ptr_at checked that the whole header is inside the packet.
    let (version_ihl, frag_off, protocol, saddr) = unsafe {
        (
            (*ip).version_ihl,
            (*ip).frag_off,
            (*ip).protocol,
            (*ip).saddr,
        )
    };
    let ihl = usize::from(version_ihl & 0x0f);
    if version_ihl >> 4 != 4 || ihl < 5 {
        return None;
    }
    // The address stays in network order: its in-memory bytes are the wire bytes.
    src.key = SourceKey::from_v4(saddr.to_ne_bytes());
    src.l3 = offset;
    // Options included, the whole header must be there; cut options are
    // counted against the source like any other cut after the address.
    let header_len = ihl * 4;
    if ptr_at::<u8>(ctx, offset + header_len - 1).is_none() {
        return Some(Packet::Opaque { fragment: false });
    }
    let frag_off = u16::from_be(frag_off);
    // A non-zero offset: no transport header in this piece.
    if frag_off & 0x1fff != 0 {
        return Some(Packet::Opaque { fragment: true });
    }
    // The first fragment (more-fragments flag set) starts the transport
    // header; Linux discards overlapping fragments, so this header is the
    // reassembled packet's.
    let first_fragment = frag_off & 0x2000 != 0;
    if protocol != IPPROTO_TCP {
        return Some(Packet::Other);
    }
    Some(tcp(ctx, config, offset + header_len, first_fragment, src))
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv6Hdr {
    version_class_flow: [u8; 4],
    payload_len: u16,
    next_header: u8,
    hop_limit: u8,
    saddr: [u32; 4],
    daddr: [u32; 4],
}

#[inline(always)]
fn parse_ipv6(
    ctx: &XdpContext,
    config: &ProgramConfig,
    offset: usize,
    src: &mut Source,
) -> Option<Packet> {
    let ip = ptr_at::<Ipv6Hdr>(ctx, offset)?;
    // SAFETY: ptr_at checked that the whole header is inside the packet.
    let (version, next_header, saddr) =
        unsafe { ((*ip).version_class_flow[0], (*ip).next_header, (*ip).saddr) };
    if version >> 4 != 6 {
        return None;
    }
    src.key = SourceKey::from_v6_words(saddr);
    src.ipv6 = true;
    src.l3 = offset;
    // From here on the source is known: whatever stops the walk, the packet
    // is counted against it.
    let mut fragment = false;
    Some(
        ipv6_payload(
            ctx,
            config,
            offset + size_of::<Ipv6Hdr>(),
            next_header,
            &mut fragment,
            src,
        )
        .unwrap_or(Packet::Opaque { fragment }),
    )
}

/// Walks the extension headers from `offset` (`next` names the first) to the
/// transport header; `None` when a header is cut or the chain is longer than
/// the walk. Sets `fragment` on passing a first fragment's header.
#[inline(always)]
fn ipv6_payload(
    ctx: &XdpContext,
    config: &ProgramConfig,
    mut offset: usize,
    mut next: u8,
    fragment: &mut bool,
    src: &mut Source,
) -> Option<Packet> {
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                // Next header, then the length in 8-octet units, not counting the first 8.
                let [nh, len]: [u8; 2] = read(ctx, offset)?;
                next = nh;
                offset += (usize::from(len) + 1) * 8;
            }
            IPPROTO_AH => {
                // Length in 4-octet units, minus 2 (RFC 4302).
                let [nh, len]: [u8; 2] = read(ctx, offset)?;
                next = nh;
                offset += (usize::from(len) + 2) * 4;
            }
            IPPROTO_FRAGMENT => {
                let header: [u8; 4] = read(ctx, offset)?;
                let field = u16::from_be_bytes([header[2], header[3]]);
                // A non-zero offset (13 bits): no transport header here.
                if field & 0xfff8 != 0 {
                    return Some(Packet::Opaque { fragment: true });
                }
                // Offset 0: the first fragment (M set), which holds the rest
                // of the chain (RFC 8200 requires it), or an atomic fragment
                // (M clear), which is a whole packet.
                *fragment |= field & 1 != 0;
                next = header[0];
                offset += 8;
            }
            IPPROTO_TCP => return Some(tcp(ctx, config, offset, *fragment, src)),
            _ => return Some(Packet::Other),
        }
    }
    match next {
        IPPROTO_TCP => Some(tcp(ctx, config, offset, *fragment, src)),
        // Still inside the extension-header chain after the walk.
        IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_AH | IPPROTO_FRAGMENT => None,
        _ => Some(Packet::Other),
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
struct TcpHdr {
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    data_offset: u8,
    flags: u8,
    window: u16,
    check: u16,
    urg: u16,
}

/// Classifies the TCP header at `offset`, in a first fragment when `fragment`.
/// The ports come first: a segment to another port is `Other` even when the
/// rest of its header is cut or invalid (the kernel drops it); one to an API
/// port without a whole, valid header is opaque.
#[inline(always)]
fn tcp(
    ctx: &XdpContext,
    config: &ProgramConfig,
    offset: usize,
    fragment: bool,
    src: &mut Source,
) -> Packet {
    // The common case first, with one bounds check: the whole header is there.
    let Some(tcp) = ptr_at::<TcpHdr>(ctx, offset) else {
        // Cut: the ports may still tell that it is not for an API port.
        return match read::<[u16; 2]>(ctx, offset) {
            Some([_, dport_be]) if !config.is_api_port(dport_be) => Packet::Other,
            _ => Packet::Opaque { fragment },
        };
    };
    // SAFETY: ptr_at checked that the whole header is inside the packet.
    let (dport_be, data_offset, flags) =
        unsafe { ((*tcp).dport, (*tcp).data_offset, (*tcp).flags) };
    if !config.is_api_port(dport_be) {
        return Packet::Other;
    }
    if data_offset >> 4 < 5 {
        return Packet::Opaque { fragment };
    }
    src.l4 = offset;
    src.tcp_flags = flags;
    let ip_header_len = if src.ipv6 {
        size_of::<Ipv6Hdr>()
    } else {
        size_of::<Ipv4Hdr>()
    };
    // IPv4 options are turned around with the header; IPv6 extension
    // headers (a routing header, say) are not.
    src.challengeable = !fragment && (!src.ipv6 || offset == src.l3 + ip_header_len);
    Packet::Api {
        syn: flags & (TCP_SYN | TCP_ACK) == TCP_SYN,
    }
}
