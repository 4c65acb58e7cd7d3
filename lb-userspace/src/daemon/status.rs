//! The views the API, the CLI and `/metrics` read, built from the owner's state and the
//! data plane's counters.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::SystemTime;

use lb_common::{Stat, SERVICE_DROP_REASONS};

use super::owner::Owner;
use crate::api::{ApiError, BackendView, CheckView, ConntrackView, ServiceView, StatusView};
use crate::config::hash_mode_name;
use crate::dataplane::CounterKind;
use crate::director::Health;
use crate::health::Outcome;

impl Owner {
    pub fn service_view(&self, name: &str) -> Result<ServiceView, ApiError> {
        let cfg = self
            .cfg
            .services
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| ApiError::not_found(format!("service: no service named {name:?}")))?;
        let st = self
            .director
            .services
            .get(name)
            .ok_or_else(|| ApiError::internal(format!("service {name:?} is not programmed")))?;
        let counter = |kind, id| self.dp.counter(kind, id).unwrap_or_default();
        let drops = self.dp.service_drops(st.info.id).unwrap_or_default();
        let farm = cfg.forwarding == crate::config::Forwarding::Farm;
        let drops = SERVICE_DROP_REASONS
            .iter()
            .zip(drops)
            .filter(|(r, _)| farm || **r == Stat::DropNoBackend)
            .map(|(r, n)| (r.name().to_string(), n))
            .collect();
        let now = SystemTime::now();
        let counters: HashMap<u32, lb_common::Counter> = st
            .backends
            .values()
            .map(|b| (b.id, counter(CounterKind::Backend, b.id)))
            .collect();
        let svc_counter = self
            .dp
            .service_counter(st.info.id, counters.values().copied())
            .unwrap_or_default();
        let backends: Vec<BackendView> = cfg
            .backends
            .iter()
            .filter_map(|bc| st.backends.get(&bc.address))
            .map(|b| {
                let c = counters[&b.id];
                let last_check = self.supervisor.last(name, b.address).map(|l| CheckView {
                    ok: l.outcome.is_up(),
                    detail: match &l.outcome {
                        Outcome::Up { weight: None } => "ok".into(),
                        Outcome::Up { weight: Some(w) } => format!("ok, weight {w}"),
                        Outcome::Down { reason } => reason.clone(),
                        Outcome::Error { reason } => format!("check error: {reason}"),
                    },
                    latency_ms: l.latency.as_secs_f64() * 1000.0,
                    age_ms: now.duration_since(l.at).unwrap_or_default().as_millis() as u64,
                });
                BackendView {
                    address: b.address,
                    health: b.health.as_str().into(),
                    checked: b.cfg.check.is_some(),
                    state: b.state().as_str().into(),
                    state_runtime: b.state_override.is_some(),
                    weight: b.cfg.weight,
                    weight_runtime: b.weight_override,
                    weight_dynamic: b.dynamic_weight,
                    effective_weight: b.effective_weight(),
                    slots: b.slots,
                    resolved: b.mac.is_some(),
                    last_check,
                    packets: c.packets,
                    bytes: c.bytes,
                    flows: self
                        .conntrack
                        .as_ref()
                        .map(|ct| ct.by_backend.get(&b.id).copied().unwrap_or(0)),
                }
            })
            .collect();
        Ok(ServiceView {
            name: cfg.name.clone(),
            vip: cfg.vip,
            port: cfg.port,
            protocol: cfg.protocol.as_str().into(),
            hash: hash_mode_name(cfg.hash).into(),
            forwarding: cfg.forwarding.as_str().into(),
            table_size: cfg.table_size,
            check: cfg.default_check().as_ref().map(|c| c.summary()),
            backends_up: backends
                .iter()
                .filter(|b| b.health == Health::Up.as_str())
                .count(),
            backends_usable: backends.iter().filter(|b| b.effective_weight > 0).count(),
            packets: svc_counter.packets,
            bytes: svc_counter.bytes,
            drops,
            backends,
        })
    }

    /// One backend of a service.
    pub fn backend_view(
        &self,
        service: &str,
        addr: Option<IpAddr>,
    ) -> Result<BackendView, ApiError> {
        self.service_view(service)?
            .backends
            .into_iter()
            .find(|b| Some(b.address) == addr)
            .ok_or_else(|| ApiError::internal("backend missing from its service"))
    }

    pub fn status(&self) -> StatusView {
        let services = self
            .cfg
            .services
            .iter()
            .filter_map(|s| self.service_view(&s.name).ok())
            .collect();
        let stats: std::collections::BTreeMap<String, u64> = match self.dp.stats() {
            // The combined slots are folded into their parts (and read 0).
            Ok(s) => Stat::ALL
                .iter()
                .filter(|st| st.parts().is_none())
                .map(|st| (st.name().to_string(), s[*st as usize]))
                .collect(),
            Err(e) => {
                tracing::warn!("reading data-plane counters: {e:#}");
                Default::default()
            }
        };
        let conntrack = self.conntrack.as_ref().map(|ct| {
            let entries = ct.entries;
            let stat = |n: &str| stats.get(n).copied().unwrap_or(0);
            let made = (stat("ct_miss_syn") + stat("ct_miss_other"))
                .saturating_sub(stat("ct_flood_skip") + stat("ct_insert_fail"));
            ConntrackView {
                entries,
                capacity: self.cfg.conntrack_size,
                evicted_at_most: made.saturating_sub(entries),
            }
        });
        StatusView {
            services,
            stats,
            farm: self.farm.as_ref().map(|f| f.status(&self.director)),
            conntrack,
            reload: Some(self.reload.clone()),
            announce: self.announce.as_ref().map(|a| a.view()),
            sync: self.sync.as_ref().map(|s| s.view.borrow().clone()),
        }
    }
}
