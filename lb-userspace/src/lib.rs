//! farmlb control plane library: the daemon and CLI in `main.rs` are thin wrappers over it.

pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod director;
pub mod maglev;
pub mod model;
pub mod neigh;
pub mod packet;

/// The XDP object built by `build.rs`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// A program that passes every frame (see `lb-ebpf/src/bin/pass.rs`).
pub static PASS_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/pass"));
