//! The limiter agent as a library: the modules the binary is made of, and the
//! embedded XDP object.

pub mod accept;
pub mod admin;
pub mod answers;
pub mod app;
pub mod body;
pub mod cli;
pub mod config;
pub mod demo;
pub mod fields;
pub mod fleet;
pub mod front;
pub mod identity;
pub mod kernel;
pub mod limit;
pub mod metrics;
pub mod net;
pub mod object;
pub mod offenders;
pub mod ops;
pub mod privilege;
pub mod proxy;
pub mod rls;
pub mod route;
pub mod rt;
pub mod server;
pub mod smuggling;
pub mod tally;
pub mod timer;
