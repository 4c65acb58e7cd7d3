//! farmlb control plane library: the daemon and CLI in `main.rs` are thin wrappers over it.

pub mod announce;
pub mod api;
pub mod cli;
pub mod config;
pub mod conns;
pub mod daemon;
pub mod dataplane;
pub mod decap;
pub mod director;
pub mod farm;
pub mod health;
pub mod http;
pub mod logging;
pub mod maglev;
pub mod metrics;
pub mod neigh;
pub mod packet;
pub mod simulate;
pub mod sync;
pub mod top;
pub mod tunnel;

/// The XDP object built by `build.rs`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// The benchmark's reference object (see `lb-ebpf/src/bin/reference.rs`): a minimal
/// parse + MAC-swap + XDP_TX program, and the forwarding benchmark's traffic generator.
pub static REFERENCE_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/reference"));

/// A program that passes every frame (see `lb-ebpf/src/bin/pass.rs`).
pub static PASS_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/pass"));

/// The backend-side decapsulator (see `lb-ebpf/src/bin/decap.rs` and [`decap`]).
pub static DECAP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/decap"));
