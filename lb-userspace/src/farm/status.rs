//! What `farmlb status` shows of a farm node: members, their state and power, this node's
//! role and share. Served by the API (`StatusView::farm`) and also written as JSON to
//! `farm.status_file` for scripts that read a file.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// What `farmlb status` shows; written by the daemon as JSON to `farm.status_file`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FarmStatus {
    pub node: u32,
    pub interface: String,
    pub healthy: bool,
    pub power: u32,
    /// Share of the farm's flows this node owns (0..=1).
    pub share: f64,
    /// Node answering ARP for farm VIPs / active director.
    pub leader: Option<u32>,
    /// "active" or "standby" (director failover role; in farm mode: ARP responder or not).
    pub role: String,
    /// The node's own check (`tcp 10.0.100.1:80 every 2s …`), if configured.
    #[serde(default)]
    pub check: Option<String>,
    /// Its latest probe: `up (0.4 ms)` or `down: <reason>`.
    #[serde(default)]
    pub last_check: Option<String>,
    pub members: Vec<MemberStatus>,
    pub auth_failures: u64,
    pub replays: u64,
    /// Datagrams from unknown addresses dropped unread (flood guard).
    #[serde(default)]
    pub unknown_dropped: u64,
    pub arp_answered: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MemberStatus {
    pub node: u32,
    pub address: SocketAddr,
    pub state: String,
    pub power: u32,
    pub share: f64,
}

impl FarmStatus {
    pub fn render(&self) -> String {
        let mut s = format!(
            "farm node {} on {}: {} ({}), power {}, share {:.1}%, leader {}\n\
             check: {}{}\n\
             membership: {} auth failures, {} replays, {} from unknown addresses dropped; \
             ARP/ND answered {}\n\
             {:<6} {:<22} {:<8} {:>6} {:>7}\n",
            self.node,
            self.interface,
            self.role,
            if self.healthy { "healthy" } else { "unhealthy" },
            self.power,
            self.share * 100.0,
            self.leader.map_or("none".into(), |l| l.to_string()),
            self.check.as_deref().unwrap_or("none"),
            self.last_check
                .as_ref()
                .map_or(String::new(), |l| format!("; last: {l}")),
            self.auth_failures,
            self.replays,
            self.unknown_dropped,
            self.arp_answered,
            "NODE",
            "ADDRESS",
            "STATE",
            "POWER",
            "SHARE"
        );
        for m in &self.members {
            s += &format!(
                "{:<6} {:<22} {:<8} {:>6} {:>6.1}%\n",
                m.node,
                m.address.to_string(),
                m.state,
                m.power,
                m.share * 100.0
            );
        }
        s
    }

    /// The snapshot a daemon wrote to `farm.status_file`.
    pub fn read(path: &Path) -> Result<FarmStatus> {
        let s = std::fs::read_to_string(path).with_context(|| {
            format!(
                "reading {} (is `farmlb run` running in farm mode?)",
                path.display()
            )
        })?;
        serde_json::from_str(&s).with_context(|| format!("parsing {}", path.display()))
    }
}

/// Replace `path` atomically with `st`; failures are logged (the API has the same data).
pub fn write(path: &Path, st: &FarmStatus) {
    let res = (|| -> Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(st)?)?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    })();
    if let Err(e) = res {
        tracing::warn!("writing farm status {}: {e:#}", path.display());
    }
}
