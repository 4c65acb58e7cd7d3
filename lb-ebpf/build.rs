//! The eBPF binary links with `bpf-linker`; rebuild when it changes (as aya-template does).
fn main() {
    if let Ok(path) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    // bpf-linker does the code generation. Without this feature LLVM splits every access to
    // packet data (headers are byte arrays: alignment 1) into byte loads and shifts, and the
    // per-packet cost of the established path drops by a few percent with it. The kernels
    // farmlb runs on (x86-64, arm64: CONFIG_HAVE_EFFICIENT_UNALIGNED_ACCESS) take misaligned
    // packet and map accesses; the verifier refuses misaligned stack accesses, so byte arrays
    // kept in stack values sit 8-aligned (`parse::Aligned`). Needs an LLVM 22 bpf-linker.
    // Host builds of the crate (cargo-deb and tools build the workspace) link with `cc`.
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("bpf") {
        println!("cargo:rustc-link-arg=--cpu-features=+allows-misaligned-mem-access");
    }
}
