//! `limiter-agent`: the command-line entry point.

use clap::Parser;

/// Rate limiter for HTTP APIs with an XDP fast path.
#[derive(Parser)]
#[command(name = "limiter-agent", version, about)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
}
