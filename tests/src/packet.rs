//! Hand-built frames for the XDP tests: Ethernet with optional VLAN tags, IPv4
//! with options and fragment fields, IPv6 with extension headers, TCP or UDP.

use std::net::{Ipv4Addr, Ipv6Addr};

pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;
pub const PSH: u8 = 0x08;
pub const RST: u8 = 0x04;

/// A bare Ethernet frame: destination and source MACs, `ethertype`, then
/// `payload` as is (for `EtherTypes` the [`Frame`] builder does not know, e.g.
/// ARP `0x0806`).
#[must_use]
pub fn ethernet(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(14 + payload.len());
    out.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]); // dst MAC
    out.extend_from_slice(&[0x02, 0, 0, 0, 0, 2]); // src MAC
    out.extend_from_slice(&ethertype.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// The network layer of a frame.
#[derive(Clone, Debug)]
pub enum Ip {
    V4 {
        src: Ipv4Addr,
        /// Raw option bytes (padded to a multiple of 4 by the builder).
        options: Vec<u8>,
        /// The 16-bit flags + fragment offset field, host order.
        frag: u16,
    },
    V6 {
        src: Ipv6Addr,
        /// Extension headers in order: (header type, total length in bytes).
        ext: Vec<(u8, usize)>,
    },
}

/// The transport layer of a frame.
#[derive(Clone, Copy, Debug)]
pub enum L4 {
    Tcp { dport: u16, flags: u8 },
    Udp { dport: u16 },
}

/// A frame under construction.
#[derive(Clone, Debug)]
pub struct Frame {
    pub vlans: Vec<u16>,
    pub ip: Ip,
    pub l4: L4,
    /// TCP sequence number.
    pub seq: u32,
    /// Raw TCP option bytes (padded with End-of-Options to 4-byte words).
    pub tcp_options: Vec<u8>,
}

impl Frame {
    /// TCP from an IPv4 source to `dport` with `flags`.
    #[must_use]
    pub fn tcp4(src: [u8; 4], dport: u16, flags: u8) -> Self {
        Self {
            vlans: Vec::new(),
            ip: Ip::V4 {
                src: Ipv4Addr::from(src),
                options: Vec::new(),
                frag: 0x4000, // DF
            },
            l4: L4::Tcp { dport, flags },
            seq: 0,
            tcp_options: Vec::new(),
        }
    }

    /// TCP from an IPv6 source to `dport` with `flags`.
    #[must_use]
    pub fn tcp6(src: &str, dport: u16, flags: u8) -> Self {
        Self {
            vlans: Vec::new(),
            ip: Ip::V6 {
                src: src.parse().expect("IPv6 literal"),
                ext: Vec::new(),
            },
            l4: L4::Tcp { dport, flags },
            seq: 0,
            tcp_options: Vec::new(),
        }
    }

    /// The TCP sequence number and option bytes (a SYN's MSS, window scale…).
    #[must_use]
    pub fn tcp_header(mut self, seq: u32, options: &[u8]) -> Self {
        self.seq = seq;
        self.tcp_options = options.to_vec();
        self
    }

    /// Replaces the transport layer by UDP to `dport`.
    #[must_use]
    pub fn udp(mut self, dport: u16) -> Self {
        self.l4 = L4::Udp { dport };
        self
    }

    /// Adds VLAN tags, outermost first (TPID 0x88a8 for an outer tag of two).
    #[must_use]
    pub fn vlans(mut self, ids: &[u16]) -> Self {
        self.vlans = ids.to_vec();
        self
    }

    /// IPv4 options (raw bytes, padded with End-of-Options to 4-byte words).
    #[must_use]
    pub fn ipv4_options(mut self, bytes: &[u8]) -> Self {
        if let Ip::V4 { options, .. } = &mut self.ip {
            *options = bytes.to_vec();
        }
        self
    }

    /// IPv4 flags + fragment offset field (host order): 0x2000 = MF, low 13 bits offset.
    #[must_use]
    pub fn ipv4_frag(mut self, field: u16) -> Self {
        if let Ip::V4 { frag, .. } = &mut self.ip {
            *frag = field;
        }
        self
    }

    /// Appends an IPv6 extension header of `header_type` spanning `len` bytes
    /// (a multiple of 8; a fragment header is always 8).
    #[must_use]
    pub fn ipv6_ext(mut self, header_type: u8, len: usize) -> Self {
        if let Ip::V6 { ext, .. } = &mut self.ip {
            ext.push((header_type, len));
        }
        self
    }

    /// The frame's bytes. A fragment header (type 44) gets `frag_field` as its
    /// offset/M field.
    #[must_use]
    pub fn build_with_ipv6_frag(&self, frag_field: u16) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        out.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]); // dst MAC
        out.extend_from_slice(&[0x02, 0, 0, 0, 0, 2]); // src MAC
        let ethertype: u16 = match self.ip {
            Ip::V4 { .. } => 0x0800,
            Ip::V6 { .. } => 0x86dd,
        };
        for (i, id) in self.vlans.iter().enumerate() {
            let tpid: u16 = if i == 0 && self.vlans.len() > 1 {
                0x88a8
            } else {
                0x8100
            };
            out.extend_from_slice(&tpid.to_be_bytes());
            out.extend_from_slice(&id.to_be_bytes());
        }
        out.extend_from_slice(&ethertype.to_be_bytes());
        let l4 = self.l4_bytes();
        let l4_proto: u8 = match self.l4 {
            L4::Tcp { .. } => 6,
            L4::Udp { .. } => 17,
        };
        match &self.ip {
            Ip::V4 { src, options, frag } => {
                let mut opts = options.clone();
                while opts.len() % 4 != 0 {
                    opts.push(0);
                }
                let ihl = 5 + opts.len() / 4;
                let total = u16::try_from(ihl * 4 + l4.len()).expect("small frame");
                out.push(0x40 | u8::try_from(ihl).expect("ihl"));
                out.push(0);
                out.extend_from_slice(&total.to_be_bytes());
                out.extend_from_slice(&[0x12, 0x34]);
                out.extend_from_slice(&frag.to_be_bytes());
                out.push(64);
                out.push(l4_proto);
                out.extend_from_slice(&[0, 0]);
                out.extend_from_slice(&src.octets());
                out.extend_from_slice(&[127, 0, 0, 1]);
                out.extend_from_slice(&opts);
            }
            Ip::V6 { src, ext } => {
                let ext_len: usize = ext.iter().map(|(_, len)| *len).sum();
                let payload = u16::try_from(ext_len + l4.len()).expect("small frame");
                out.extend_from_slice(&[0x60, 0, 0, 0]);
                out.extend_from_slice(&payload.to_be_bytes());
                out.push(ext.first().map_or(l4_proto, |(t, _)| *t));
                out.push(64);
                out.extend_from_slice(&src.octets());
                out.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
                for (i, (header_type, len)) in ext.iter().enumerate() {
                    let next = ext.get(i + 1).map_or(l4_proto, |(t, _)| *t);
                    let mut header = vec![0u8; *len];
                    header[0] = next;
                    match header_type {
                        44 => header[2..4].copy_from_slice(&frag_field.to_be_bytes()),
                        51 => header[1] = u8::try_from(len / 4 - 2).expect("AH length"),
                        _ => header[1] = u8::try_from(len / 8 - 1).expect("ext length"),
                    }
                    out.extend_from_slice(&header);
                }
            }
        }
        out.extend_from_slice(&l4);
        out
    }

    /// The frame's bytes.
    #[must_use]
    pub fn build(&self) -> Vec<u8> {
        self.build_with_ipv6_frag(0)
    }

    fn l4_bytes(&self) -> Vec<u8> {
        match self.l4 {
            L4::Tcp { dport, flags } => {
                let mut options = self.tcp_options.clone();
                while !options.len().is_multiple_of(4) {
                    options.push(0);
                }
                let mut tcp = vec![0u8; 20];
                tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
                tcp[2..4].copy_from_slice(&dport.to_be_bytes());
                tcp[4..8].copy_from_slice(&self.seq.to_be_bytes());
                tcp[12] = u8::try_from(5 + options.len() / 4).expect("doff") << 4;
                tcp[13] = flags;
                tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
                tcp.extend_from_slice(&options);
                tcp
            }
            L4::Udp { dport } => {
                let mut udp = vec![0u8; 8];
                udp[0..2].copy_from_slice(&40000u16.to_be_bytes());
                udp[2..4].copy_from_slice(&dport.to_be_bytes());
                udp[4..6].copy_from_slice(&8u16.to_be_bytes());
                udp
            }
        }
    }
}

/// The Internet checksum (RFC 1071) of `bytes`, to write into an IPv4 or TCP
/// header (over the pseudo-header) whose checksum field is zero.
#[must_use]
pub fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).expect("folded to 16 bits")
}

/// Where the headers of an untagged frame without IPv6 extension headers are:
/// (IP header offset, TCP header offset, IPv6).
fn layout(frame: &[u8]) -> (usize, usize, bool) {
    let v6 = frame[12..14] == [0x86, 0xdd];
    let l4 = if v6 {
        14 + 40
    } else {
        14 + usize::from(frame[14] & 0x0f) * 4
    };
    (14, l4, v6)
}

/// The one's-complement sum of the TCP pseudo-header and segment of an
/// untagged frame without IPv6 extension headers.
fn tcp_sum(frame: &[u8]) -> u16 {
    let (l3, l4, v6) = layout(frame);
    let segment = &frame[l4..];
    let mut pseudo = Vec::new();
    if v6 {
        pseudo.extend_from_slice(&frame[l3 + 8..l3 + 40]);
        pseudo.extend_from_slice(&u32::try_from(segment.len()).expect("len").to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, 6]);
    } else {
        pseudo.extend_from_slice(&frame[l3 + 12..l3 + 20]);
        pseudo.extend_from_slice(&[0, 6]);
        pseudo.extend_from_slice(&u16::try_from(segment.len()).expect("len").to_be_bytes());
    }
    pseudo.extend_from_slice(segment);
    checksum(&pseudo)
}

/// Fills in the IPv4 header and TCP checksums of an untagged frame without
/// IPv6 extension headers, as a real sender would.
pub fn seal(frame: &mut [u8]) {
    let (l3, l4, v6) = layout(frame);
    if !v6 {
        frame[l3 + 10..l3 + 12].fill(0);
        let sum = checksum(&frame[l3..l4]);
        frame[l3 + 10..l3 + 12].copy_from_slice(&sum.to_be_bytes());
    }
    frame[l4 + 16..l4 + 18].fill(0);
    let sum = tcp_sum(frame);
    frame[l4 + 16..l4 + 18].copy_from_slice(&sum.to_be_bytes());
}

/// Whether both checksums of such a frame verify, as a receiver checks them.
#[must_use]
pub fn sealed(frame: &[u8]) -> bool {
    let (l3, l4, v6) = layout(frame);
    // Summed with its checksum in place, a header sums to zero (complemented).
    (v6 || checksum(&frame[l3..l4]) == 0) && tcp_sum(frame) == 0
}
