//! Empty library target: it lets the agent's `build.rs` depend on this crate so
//! cargo rebuilds the embedded object when the program's sources change.
#![no_std]
