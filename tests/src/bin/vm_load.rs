//! `vm-load PIN_DIR`: loads the embedded XDP object the way the agent does
//! (`kernel::load`: `USE_COARSE_CLOCK` from a probe), and pins the `limiter`
//! program at `PIN_DIR/limiter` and the agent's maps at `PIN_DIR/maps/<name>`,
//! for bpftool to attach, inspect and write. Used inside the VMs of
//! `cargo xtask vm-test`: bpftool itself cannot load the object (libbpf 1.x
//! refuses the legacy `maps` section that aya-ebpf emits).
//!
//! `vm-load --force-coarse-clock`: only loads the program with the global
//! forced to 1, and prints the verifier's refusal (exit 3) if there is one.

use std::path::PathBuf;

use aya::programs::{ProgramError, Xdp};
use limiter_agent::kernel::{self, KernelError, LoadOptions};
use limiter_common::PROGRAM_NAME;

fn main() {
    let arg = std::env::args()
        .nth(1)
        .expect("usage: vm-load PIN_DIR | vm-load --force-coarse-clock");
    limiter_tests::require_root("vm-load");
    if arg == "--force-coarse-clock" {
        match limiter_tests::xdp::load_with_coarse_clock(true) {
            Ok(()) => println!("the kernel accepts USE_COARSE_CLOCK = 1"),
            Err(refusal) => {
                println!("{refusal}");
                std::process::exit(3);
            }
        }
        return;
    }
    let dir = PathBuf::from(arg);
    let coarse = limiter_tests::xdp::coarse_clock();
    let options = LoadOptions {
        coarse_clock: Some(coarse),
        ..LoadOptions::default()
    };
    let mut ebpf = match kernel::load(
        limiter_agent::object::LIMITER,
        Some(&dir.join("maps")),
        options,
    ) {
        Ok(ebpf) => ebpf,
        Err(KernelError::Program(ProgramError::LoadError {
            io_error,
            verifier_log,
        })) => panic!("the verifier refused the program: {io_error}\n{verifier_log}"),
        Err(other) => panic!("loading the limiter: {other}"),
    };
    let program: &mut Xdp = ebpf
        .program_mut(PROGRAM_NAME)
        .expect("program in object")
        .try_into()
        .expect("an XDP program");
    program
        .pin(dir.join(PROGRAM_NAME))
        .expect("pinning the program");
    println!(
        "loaded and pinned under {}; USE_COARSE_CLOCK = {}",
        dir.display(),
        u8::from(coarse)
    );
}
