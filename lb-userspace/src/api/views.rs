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
    /// How the last reload ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reload: Option<ReloadView>,
    /// `[announce]`: each VIP's route in the announce table (absent without the section).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announce: Option<crate::announce::AnnounceView>,
    /// `[announce] sync`: conntrack sync counters (absent when sync is off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync: Option<crate::sync::SyncView>,
}

/// How the last reload (SIGHUP, `farmlb reload`) ended; the daemon's start counts as a
/// successful one. API edits are not reloads.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ReloadView {
    pub ok: bool,
    /// Unix time, in seconds, of the last attempt and of the last success.
    pub last_attempt_unix: f64,
    pub last_success_unix: f64,
    /// Why the last attempt was rejected (`None` after a success).
    pub error: Option<String>,
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl ReloadView {
    pub fn started() -> Self {
        let now = unix_now();
        Self {
            ok: true,
            last_attempt_unix: now,
            last_success_unix: now,
            error: None,
        }
    }

    /// An attempt ended, with `error` if it was rejected.
    pub fn record(&mut self, error: Option<String>) {
        self.last_attempt_unix = unix_now();
        self.ok = error.is_none();
        if self.ok {
            self.last_success_unix = self.last_attempt_unix;
        }
        self.error = error;
    }
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
    /// Packets of this service dropped, by reason (`drop_no_backend`; farm services also
    /// `farm_drop_not_owner`, `farm_drop_no_socket`, `farm_drop_lease`).
    #[serde(default)]
    pub drops: BTreeMap<String, u64>,
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
    /// Conntrack entries naming this backend at the last count (every 30 s): TCP entries
    /// stay until evicted, so recently closed connections count too; expired UDP ones do
    /// not. `None` until the first count.
    #[serde(default)]
    pub flows: Option<u64>,
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
