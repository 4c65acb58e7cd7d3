//! Test rig for farmlb's direct-routing director: network namespaces joined by a bridge, an
//! identity server per backend, client helpers, and a runner for the `farmlb` daemon.
//!
//! Used by `cargo xtask rig|demo` and by the end-to-end tests in `tests/tests/`. Everything here
//! needs root (namespaces, veths, sysctls) and the tools `ip`, `ethtool` and `ping`
//! (`cargo xtask setup` installs them).

pub mod client;
pub mod cluster;
pub mod ctl;
pub mod daemon;
pub mod demo;
pub mod ecmp_rig;
pub mod farm_rig;
pub mod icmp;
pub mod netns;
pub mod pins;
pub mod process;
pub mod pty;
pub mod rig;
pub mod server;
pub mod svg;
pub mod tunnel_rig;
pub mod wait;

pub use client::{connect_many, connect_tallied, ping_all, try_identify, LongConn};
pub use daemon::{
    farmlb_bin, farmlb_config, write_config, xdp_attached, BackendSpec, Daemon, DirectorRig,
    HashMode, Service,
};
pub use netns::{in_netns, spawn_in_netns};
pub use rig::{Rig, RigOpts, VIP_V4, VIP_V6};
pub use server::{backend_id, start_on_backend, start_on_backends, Background, IdentityServer};
pub use wait::wait_until;

use std::collections::BTreeMap;

/// Count identities (`"b1"` → 97, …) among successful results; returns (counts, failures).
pub fn tally(results: &[anyhow::Result<String>]) -> (BTreeMap<String, usize>, Vec<String>) {
    let mut counts = BTreeMap::new();
    let mut failures = Vec::new();
    for r in results {
        match r {
            Ok(id) => *counts.entry(id.clone()).or_insert(0) += 1,
            Err(e) => failures.push(format!("{e:#}")),
        }
    }
    (counts, failures)
}

/// Render a distribution as lines `  b1    97  32.3%`.
pub fn format_distribution(counts: &BTreeMap<String, usize>) -> String {
    let total: usize = counts.values().sum();
    counts
        .iter()
        .map(|(id, n)| {
            let pct = if total == 0 {
                0.0
            } else {
                100.0 * *n as f64 / total as f64
            };
            format!("  {id:<6} {n:>5}  {pct:5.1}%\n")
        })
        .collect()
}
