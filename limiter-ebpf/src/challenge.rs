//! The SYN challenge (the design is in `limiter_common::challenge`): turning
//! an unknown source's SYN into the challenge SYN-ACK in place, and checking
//! the cookie its RST carries.

use aya_ebpf::{maps::lpm_trie::Key, programs::XdpContext};
use limiter_common::{
    ProgramConfig,
    challenge::{SLOT_SHIFT, cookie, martian_v4, martian_v6},
};

use crate::{
    lookup::HOP_LINK,
    parse::{Source, TCP_ACK, TCP_SYN},
};

/// Offsets inside the TCP header.
const TCP_SEQ: usize = 4;
const TCP_ACK_SEQ: usize = 8;
const TCP_FLAGS_WORD: usize = 12;
const TCP_CHECK: usize = 16;
const TCP_OPTIONS: usize = 20;
/// 32-bit words of options a TCP header holds at most.
const MAX_OPTION_WORDS: usize = 10;
/// 32-bit words of a TCP header at most.
const MAX_HEADER_WORDS: usize = 15;
const IPPROTO_TCP: u8 = 6;
/// Four option bytes of kind 1 (no-operation).
const NOPS: u32 = 0x0101_0101;

/// A pointer to a `T` at `offset` when the whole `T` lies inside the packet.
///
/// Unlike the parser's, this bounds check reads the packet's bounds afresh
/// (volatile) each time: the parser has checked them before, and LLVM would
/// otherwise drop a check it can prove from an earlier one through another
/// pointer, which the verifier cannot follow ("R7 offset is outside of the
/// packet").
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
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
    Some((start + offset) as *mut T)
}

/// Reads a `T` at `offset` when it lies inside the packet.
#[inline(always)]
fn read<T: Copy>(ctx: &XdpContext, offset: usize) -> Option<T> {
    // SAFETY: `ptr_at` checked that the whole `T` lies inside the packet;
    // `T` is a plain integer or byte array, valid for any bytes.
    ptr_at::<T>(ctx, offset).map(|p| unsafe { *p })
}

/// Writes `value` at `offset` when it lies inside the packet.
#[inline(always)]
fn write<T: Copy>(ctx: &XdpContext, offset: usize, value: T) -> Option<()> {
    let p = ptr_at::<T>(ctx, offset)?;
    // SAFETY: `ptr_at` checked that the whole `T` lies inside the packet,
    // which an XDP program may write; `T` is a plain integer or byte array.
    unsafe { *p = value };
    Some(())
}

/// Folds a one's-complement sum to 16 bits.
#[inline(always)]
fn fold(mut sum: u64) -> u16 {
    // Four folds take any 64-bit sum down to 16 bits.
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Whether no answer may go to the source of the SYN described by `src`:
/// a martian address (see `limiter_common::challenge`), the SYN's own
/// destination, or another address of this host (the `local` trie).
#[inline(always)]
pub fn martian(ctx: &XdpContext, src: &Source) -> bool {
    if crate::LOCAL.get(Key::new(128, src.key)).is_some() {
        return true;
    }
    if src.ipv6 {
        let Some(to) = read::<[u8; 16]>(ctx, src.l3 + 24) else {
            return true;
        };
        martian_v6(&src.key.addr) || to == src.key.addr
    } else {
        let from = [
            src.key.addr[12],
            src.key.addr[13],
            src.key.addr[14],
            src.key.addr[15],
        ];
        let Some(to) = read::<[u8; 4]>(ctx, src.l3 + 16) else {
            return true;
        };
        martian_v4(from) || to == from
    }
}

/// Turns the SYN described by `src` into the challenge SYN-ACK, to be sent
/// back with `XDP_TX`: to the link addresses `macs` (source, destination)
/// when `hop` is `HOP_LINK`, else back to the frame's sender; addresses and
/// ports swapped, the acknowledgment number
/// the cookie, options overwritten with no-ops, the TCP checksum computed
/// afresh (the SYN's may be a partial one, left for the device to finish,
/// when it comes from a local veth; the IPv4 header's is unchanged: swapping
/// two of its words changes no sum). `None` when the frame cannot carry it
/// (a SYN with a payload, say); the caller drops the SYN then.
#[inline(always)]
pub fn answer(
    ctx: &XdpContext,
    config: &ProgramConfig,
    src: &Source,
    now_ns: u64,
    hop: u8,
    macs: &[[u8; 6]; 2],
) -> Option<()> {
    let l3 = src.l3;
    let l4 = src.l4;
    let ports: u32 = read(ctx, l4)?;
    let seq: u32 = read(ctx, l4 + TCP_SEQ)?;
    let cookie = cookie(
        &config.challenge_key,
        &src.key.addr,
        ports,
        now_ns >> SLOT_SHIFT,
    );
    // The one acknowledgment the client would accept: it would answer with
    // an ACK to a handshake nobody holds state for. Dropped instead (the
    // client sends the SYN again, into the next slot or a refilled budget).
    if cookie == u32::from_be(seq).wrapping_add(1) {
        return None;
    }
    let mut flags_word: [u8; 4] = read(ctx, l4 + TCP_FLAGS_WORD)?;
    let header_len = usize::from(flags_word[0] >> 4) * 4;
    // The segment is the header alone: the answer's checksum covers no data.
    let ip_payload = if src.ipv6 {
        usize::from(u16::from_be(read::<u16>(ctx, l3 + 4)?))
    } else {
        usize::from(u16::from_be(read::<u16>(ctx, l3 + 2)?)).wrapping_sub(l4 - l3)
    };
    if ip_payload != header_len {
        return None;
    }

    // Ethernet: to the next hop of the route back, or back to the sender.
    if hop == HOP_LINK {
        write(ctx, 0, macs[1])?;
        write(ctx, 6, macs[0])?;
    } else {
        let dst: [u8; 6] = read(ctx, 0)?;
        let from: [u8; 6] = read(ctx, 6)?;
        write(ctx, 0, from)?;
        write(ctx, 6, dst)?;
    }
    // IP: source and destination swapped, summed for the pseudo-header.
    let mut sum = 0u64;
    if src.ipv6 {
        let a: [u32; 4] = read(ctx, l3 + 8)?;
        let b: [u32; 4] = read(ctx, l3 + 24)?;
        write(ctx, l3 + 8, b)?;
        write(ctx, l3 + 24, a)?;
        // Spelled out: an iterator here compiles to a loop that Linux 5.10's
        // verifier refuses ("back-edge").
        sum += u64::from(a[0]) + u64::from(a[1]) + u64::from(a[2]) + u64::from(a[3]);
        sum += u64::from(b[0]) + u64::from(b[1]) + u64::from(b[2]) + u64::from(b[3]);
        // Upper-layer length (32 bits), then three zeros and the protocol.
        let len = u32::try_from(header_len).unwrap_or(0);
        sum += u64::from(u32::from_ne_bytes(len.to_be_bytes()));
        sum += u64::from(u32::from_ne_bytes([0, 0, 0, IPPROTO_TCP]));
    } else {
        let a: u32 = read(ctx, l3 + 12)?;
        let b: u32 = read(ctx, l3 + 16)?;
        write(ctx, l3 + 12, b)?;
        write(ctx, l3 + 16, a)?;
        sum += u64::from(a) + u64::from(b);
        // Zero, the protocol, then the TCP length (16 bits).
        let len = u16::try_from(header_len).unwrap_or(0).to_be_bytes();
        sum += u64::from(u32::from_ne_bytes([0, IPPROTO_TCP, len[0], len[1]]));
    }
    // TCP: the answer's fields, then the sum of the whole header.
    write(ctx, l4, ports.rotate_left(16))?;
    write(ctx, l4 + TCP_SEQ, !cookie)?;
    write(ctx, l4 + TCP_ACK_SEQ, cookie.to_be())?;
    flags_word[1] = TCP_SYN | TCP_ACK;
    write(ctx, l4 + TCP_FLAGS_WORD, flags_word)?;
    write(ctx, l4 + TCP_CHECK, 0u16)?;
    for i in 0..MAX_OPTION_WORDS {
        let offset = TCP_OPTIONS + 4 * i;
        if offset >= header_len {
            break;
        }
        write(ctx, l4 + offset, NOPS)?;
    }
    for i in 0..MAX_HEADER_WORDS {
        let offset = 4 * i;
        if offset >= header_len {
            break;
        }
        sum += u64::from(read::<u32>(ctx, l4 + offset)?);
    }
    // The sum was taken over words as loaded; stored the same way, the
    // checksum lands in network order (RFC 1071: the sum is byte-order
    // independent).
    write(ctx, l4 + TCP_CHECK, !fold(sum))
}

/// Whether the RST described by `src` carries the cookie of a challenge sent
/// in the current slot or the one before.
#[inline(always)]
pub fn passed(ctx: &XdpContext, config: &ProgramConfig, src: &Source, now_ns: u64) -> bool {
    let (Some(ports), Some(seq)) = (read::<u32>(ctx, src.l4), read::<u32>(ctx, src.l4 + TCP_SEQ))
    else {
        return false;
    };
    let seq = u32::from_be(seq);
    let slot = now_ns >> SLOT_SHIFT;
    let key = &config.challenge_key;
    seq == cookie(key, &src.key.addr, ports, slot)
        || seq == cookie(key, &src.key.addr, ports, slot.wrapping_sub(1))
}
