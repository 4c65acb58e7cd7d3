//! The API's answers, as JSON; the CLI (`cli.rs`) and the metrics (`metrics.rs`) read them too.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, Default)]
pub struct StatusView {
    pub services: Vec<ServiceView>,
    /// Global data-plane counters by reason (`tx`, `drop_no_backend`, `ct_hit`, ...).
    pub stats: BTreeMap<String, u64>,
    /// Farm role: members, role and share (absent on a node without `[farm]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub farm: Option<crate::farm::FarmStatus>,
    /// Conntrack occupancy, as last counted (absent until the first count).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conntrack: Option<ConntrackView>,
}

/// How full the conntrack table is.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConntrackView {
    /// Entries at the last count (the table is counted every 30 s, off the owner loop).
    pub entries: u64,
    pub capacity: u32,
    /// At most this many entries were evicted since the data plane was created: new entries
    /// made minus those still there (a rewrite in place is counted as new, hence "at most").
    pub evicted_at_most: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServiceView {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: String,
    pub hash: String,
    /// `dr` or `farm`.
    #[serde(default)]
    pub forwarding: String,
    pub table_size: u32,
    /// The service's default check, summarised (`None`: backends are not checked).
    pub check: Option<String>,
    /// Backends that pass their health check (or are unchecked).
    pub backends_up: usize,
    /// Backends that take new flows (effective weight > 0).
    pub backends_usable: usize,
    pub packets: u64,
    pub bytes: u64,
    pub backends: Vec<BackendView>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackendView {
    pub address: IpAddr,
    /// `up` or `down`.
    pub health: String,
    /// Whether a health check runs for it.
    pub checked: bool,
    /// `ready`, `drain` or `maint`.
    pub state: String,
    /// The state was set at runtime (it lasts until the file changes the backend's `state`).
    pub state_runtime: bool,
    /// Configured weight.
    pub weight: u32,
    /// Weight set at runtime (lasts until the file changes the backend's `weight`).
    pub weight_runtime: Option<u32>,
    /// Weight reported by a dynamic exec check.
    pub weight_dynamic: Option<u32>,
    /// Weight the Maglev table uses: 0 unless ready and up.
    pub effective_weight: u32,
    /// Maglev slots owned.
    pub slots: u32,
    /// The backend's MAC address is known (it is kept out of the table until then).
    pub resolved: bool,
    pub last_check: Option<CheckView>,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckView {
    pub ok: bool,
    /// `ok` or the failure reason.
    pub detail: String,
    pub latency_ms: f64,
    /// Milliseconds since the probe finished.
    pub age_ms: u64,
}
