//! The XDP objects built by `build.rs` and embedded in the binary, so the agent
//! needs no file beside it.

/// The limiter's XDP program (`limiter-ebpf`, program `limiter`).
pub static LIMITER: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/limiter"));

/// A program that only returns `XDP_PASS` (program `baseline`): the yardstick
/// for per-packet cost in `cargo xtask bench xdp`.
pub static BASELINE: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/baseline"));
