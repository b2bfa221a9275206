//! `vm-load PIN_DIR`: loads the embedded XDP object the way the agent will
//! (`USE_COARSE_CLOCK` from a probe), and pins the `limiter` program at
//! `PIN_DIR/limiter` and every map at `PIN_DIR/maps/<name>`, for bpftool to
//! attach, inspect and write. Used inside the VMs of `cargo xtask vm-test`:
//! bpftool itself cannot load the object (libbpf 1.x refuses the legacy
//! `maps` section that aya-ebpf emits).
//!
//! `vm-load --force-coarse-clock`: only loads the program with the global
//! forced to 1, and prints the verifier's refusal (exit 3) if there is one.

use std::path::PathBuf;

use aya::{EbpfLoader, programs::Xdp};
use limiter_common::{GLOBAL_USE_COARSE_CLOCK, PROGRAM_NAME};

fn main() {
    let arg = std::env::args()
        .nth(1)
        .expect("usage: vm-load PIN_DIR | vm-load --force-coarse-clock");
    limiter_tests::require_root("vm-load");
    if arg == "--force-coarse-clock" {
        match limiter_tests::xdp::load_with_coarse_clock(1) {
            Ok(()) => println!("the kernel accepts USE_COARSE_CLOCK = 1"),
            Err(refusal) => {
                println!("{refusal}");
                std::process::exit(3);
            }
        }
        return;
    }
    let dir = PathBuf::from(arg);
    let coarse = u8::from(limiter_tests::xdp::coarse_clock());
    let mut ebpf = EbpfLoader::new()
        .override_global(GLOBAL_USE_COARSE_CLOCK, &coarse, true)
        .load(limiter_agent::object::LIMITER)
        .expect("loading the limiter object");
    std::fs::create_dir_all(dir.join("maps")).expect("creating the pin directory");
    for (name, map) in ebpf.maps() {
        // `.rodata` holds the load-time globals: nothing to pin.
        if !name.starts_with('.') {
            map.pin(dir.join("maps").join(name))
                .unwrap_or_else(|e| panic!("pinning map {name}: {e}"));
        }
    }
    let program: &mut Xdp = ebpf
        .program_mut(PROGRAM_NAME)
        .expect("program in object")
        .try_into()
        .expect("an XDP program");
    if let Err(e) = program.load() {
        match e {
            aya::programs::ProgramError::LoadError {
                io_error,
                verifier_log,
            } => panic!("the verifier refused the program: {io_error}\n{verifier_log}"),
            other => panic!("loading the program: {other}"),
        }
    }
    program
        .pin(dir.join(PROGRAM_NAME))
        .expect("pinning the program");
    println!(
        "loaded and pinned under {}; USE_COARSE_CLOCK = {coarse}",
        dir.display()
    );
}
