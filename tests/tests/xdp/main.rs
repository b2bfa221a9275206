//! The XDP program through `BPF_PROG_TEST_RUN`: every parse path, truncated and
//! malformed headers, VLAN tags, IPv4 options, IPv6 extension headers and prefix
//! grouping, the packet and SYN ceilings, the auto-ban, bans and the allow list
//! written by userspace, fragments, observe mode, the LRU capacity, the
//! all-zero config, the SYN challenge, its probation and its bounds on
//! reflection, and the program's jiffies clock and
//! its calibration.
//!
//! Each test loads its own instance of the program with private maps, and checks
//! the XDP action of every frame, then the exact stat counters and the
//! per-source entries.
//!
//! One file per subject; what they share is in `support.rs`.

mod allow;
mod autoban;
mod bans;
mod capacity;
mod ceilings;
mod challenge;
mod clock;
mod fragments;
mod grouping;
mod headers;
mod malformed;
mod observe;
mod parse;
mod probation;
mod reflection;
mod support;
