//! The limiter agent as a library: the embedded XDP object and the modules the
//! binary is made of.

pub mod kernel;
pub mod object;
