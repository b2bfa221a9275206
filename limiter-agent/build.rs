//! Builds the XDP object (`limiter-ebpf`) with the nightly toolchain and
//! bpf-linker, into `OUT_DIR`, where `src/object.rs` embeds it.

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root = std::path::Path::new(&manifest_dir).join("../limiter-ebpf");
    let root = root
        .canonicalize()
        .with_context(|| format!("eBPF crate not found at {}", root.display()))?;
    let root = root.to_str().context("non-UTF-8 path to the eBPF crate")?;
    if which_bpf_linker().is_none() {
        return Err(anyhow!(
            "bpf-linker is not installed: run `cargo xtask setup` (as root) first"
        ));
    }
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "limiter-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .context("building the XDP object (run `cargo xtask setup` if a tool is missing)")
}

fn which_bpf_linker() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("bpf-linker"))
        .find(|candidate| candidate.is_file())
}
