//! Builds the XDP program with aya-build (nightly + `-Z build-std=core` + bpf-linker) and hands
//! the object to the daemon through `OUT_DIR`, so the kernel half can never be older than the
//! userspace half that shares its map layouts.
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    aya_build::build_ebpf(
        [Package {
            name: "lb-ebpf",
            root_dir: "../lb-ebpf",
            no_default_features: false,
            features: &[],
        }],
        Toolchain::Nightly,
    )
}
