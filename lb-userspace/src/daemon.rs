//! `farmlb run`: load, program, attach, then serve until told to stop.
//!
//! One owner loop holds the data plane (the aya map handles), the director and the running
//! configuration, and applies every change in turn: API requests, health-check results,
//! `SIGHUP` reloads, metrics snapshots and neighbour-resolution retries all arrive on
//! channels. The API server, the metrics server and one task per health-checked backend run
//! on the runtime's worker threads, so a change that blocks the owner for a moment (resolving
//! a new backend's MAC) never delays a probe.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use axum::http::StatusCode;
use lb_common::Stat;
use serde_json::json;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot};

use crate::api::{
    self, ApiError, ApiReply, ApiRequest, BackendView, CheckView, ServiceView, StatusView,
};
use crate::config::{hash_mode_name, CheckCfg, Config};
use crate::dataplane::{Dataplane, LoadOpts};
use crate::director::{Director, Health};
use crate::health::{Outcome, ProbeResult, Supervisor};
use crate::metrics::{self, LiveMetrics};
use crate::neigh::{iface_mac, NeighResolver};

/// How often backends whose MAC is still unknown are retried.
const RESOLVE_RETRY: Duration = Duration::from_secs(2);

/// Everything the owner loop mutates.
struct Owner {
    path: PathBuf,
    cfg: Config,
    dp: Dataplane,
    director: Director,
    macs: NeighResolver,
    supervisor: Supervisor,
    live: LiveMetrics,
}

pub async fn run(config_path: &Path) -> Result<()> {
    let cfg = Config::load(config_path)?;
    if cfg.farm.is_some() {
        // Farm mode / director failover: its own loop (membership, ownership, ARP).
        return crate::farm::run(config_path, cfg).await;
    }
    let own_mac = iface_mac(&cfg.interface)?;
    let mut dp = Dataplane::load(LoadOpts {
        ring_slots: Director::ring_slots_for(&cfg),
        conntrack_size: cfg.conntrack_size,
    })?;
    let mut director = Director::new(dp.ring_slots(), own_mac);
    let mut macs = NeighResolver::new(&cfg.interface);
    // Program every map before attaching, so the first packet already sees the full config.
    director.apply(&cfg, &mut dp, &mut macs)?;

    let (api_tx, mut api_rx) = mpsc::channel::<api::Call>(64);
    let (probe_tx, mut probe_rx) = mpsc::channel::<ProbeResult>(4096);
    let (snap_tx, mut snap_rx) = mpsc::channel::<oneshot::Sender<StatusView>>(16);
    let listener = api::bind(&cfg.api_socket)?;
    let api_task = tokio::spawn(api::serve(listener, api_tx));
    let live = LiveMetrics::default();
    let metrics_task = match cfg.metrics_address {
        Some(addr) => {
            let l = metrics::bind(addr).await?;
            tracing::info!(%addr, "serving Prometheus metrics on /metrics");
            Some(tokio::spawn(metrics::serve(l, snap_tx, live.clone())))
        }
        None => None,
    };

    let mut owner = Owner {
        path: config_path.to_path_buf(),
        cfg,
        dp,
        director,
        macs,
        supervisor: Supervisor::new(probe_tx),
        live,
    };
    owner.sync_checks();
    owner
        .dp
        .attach(&owner.cfg.interface, owner.cfg.xdp_mode.into())?;
    tracing::info!(
        interface = %owner.cfg.interface,
        services = owner.cfg.services.len(),
        checks = owner.supervisor.len(),
        api = %owner.cfg.api_socket.display(),
        "XDP program attached"
    );

    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut retry = tokio::time::interval(RESOLVE_RETRY);
    let res = loop {
        tokio::select! {
            _ = sigint.recv() => break Ok(()),
            _ = sigterm.recv() => break Ok(()),
            _ = sighup.recv() => match owner.reload() {
                Ok(summary) => tracing::info!("SIGHUP: {summary}"),
                Err(e) => tracing::error!("SIGHUP: {}", e.message),
            },
            Some((req, reply)) = api_rx.recv() => {
                let _ = reply.send(owner.handle(req));
            }
            Some(p) = probe_rx.recv() => owner.on_probe(p),
            Some(otx) = snap_rx.recv() => {
                let _ = otx.send(owner.status());
            }
            _ = retry.tick() => {
                if owner.director.unresolved() > 0 {
                    if let Err(e) = owner.director.apply(&owner.cfg, &mut owner.dp, &mut owner.macs) {
                        break Err(e);
                    }
                }
            }
        }
    };
    owner.supervisor.shutdown();
    api_task.abort();
    if let Some(t) = metrics_task {
        t.abort();
    }
    let _ = std::fs::remove_file(&owner.cfg.api_socket);
    owner.dp.detach().context("detaching XDP program")?;
    tracing::info!("detached, exiting");
    res
}

/// Fields only a restart can change.
fn restart_only(running: &Config, new: &Config) -> Result<(), ApiError> {
    Ok(crate::config::restart_needed(running, new)?)
}

/// `tcp :80 every 2s timeout 1s rise 2 fall 3`.
pub fn check_summary(c: &CheckCfg) -> String {
    c.summary()
}

impl Owner {
    fn sync_checks(&mut self) {
        let director = &self.director;
        self.supervisor.sync(&self.cfg, |s, a| {
            director.backend(s, a).ok().map(|b| b.health)
        });
        // A service rebuilt by the change (new vip, port, protocol or table size) starts its
        // backends afresh: give them the verdicts their checks already hold.
        for (s, a, h) in self.supervisor.verdicts() {
            if let Err(e) = self.director.set_health(&s, a, h, None, &mut self.dp) {
                tracing::error!(service = %s, backend = %a, "restoring health: {e:#}");
            }
        }
    }

    /// Bring the data plane to `new` (already validated): rehearse on a copy first so a change
    /// that cannot be applied is refused before anything reaches the kernel.
    fn apply(&mut self, new: Config) -> Result<(), ApiError> {
        restart_only(&self.cfg, &new)?;
        let mut trial = self.director.clone();
        let mut model = crate::model::Model::default();
        let mut fixed: HashMap<IpAddr, [u8; 6]> = HashMap::new();
        for s in &new.services {
            for b in &s.backends {
                fixed.insert(b.address, [0; 6]);
            }
        }
        trial
            .apply(&new, &mut model, &mut fixed)
            .map_err(|e| ApiError::bad_request(format!("{e:#}")))?;
        self.director
            .apply(&new, &mut self.dp, &mut self.macs)
            .map_err(|e| ApiError::internal(format!("applying the change: {e:#}")))?;
        // Forget the check series of backends that are gone or no longer checked.
        for s in &self.cfg.services {
            for b in &s.backends {
                let still = new
                    .services
                    .iter()
                    .find(|n| n.name == s.name)
                    .and_then(|n| n.backends.iter().find(|x| x.address == b.address))
                    .is_some_and(|x| x.check.is_some());
                if b.check.is_some() && !still {
                    self.live.forget(&s.name, &b.address.to_string());
                }
            }
        }
        self.cfg = new;
        self.sync_checks();
        Ok(())
    }

    fn reload(&mut self) -> Result<String, ApiError> {
        let new = Config::load(&self.path).map_err(|e| {
            ApiError::bad_request(format!(
                "reload rejected, the running configuration stays: {e}"
            ))
        })?;
        self.apply(new).map_err(|e| ApiError {
            kind: e.kind,
            message: format!(
                "reload rejected, the running configuration stays: {}",
                e.message
            ),
        })?;
        let backends: usize = self.cfg.services.iter().map(|s| s.backends.len()).sum();
        Ok(format!(
            "configuration reloaded from {}: {} services, {backends} backends",
            self.path.display(),
            self.cfg.services.len()
        ))
    }

    fn on_probe(&mut self, p: ProbeResult) {
        if !self.supervisor.is_current(&p) {
            return;
        }
        self.live.observe_check(
            &p.service,
            &p.addr.to_string(),
            p.outcome.is_up(),
            p.latency,
        );
        let Some(v) = self.supervisor.record(&p) else {
            return;
        };
        let before = self
            .director
            .backend(&p.service, p.addr)
            .map(|b| b.dynamic_weight)
            .ok()
            .flatten();
        match self
            .director
            .set_health(&p.service, p.addr, v.health, v.dynamic_weight, &mut self.dp)
        {
            Ok(_) => {
                if v.dynamic_weight.is_some() && v.dynamic_weight != before {
                    tracing::info!(
                        service = %p.service, backend = %p.addr,
                        "dynamic weight set to {} by its check", v.dynamic_weight.unwrap_or(0)
                    );
                }
            }
            Err(e) => tracing::error!(
                service = %p.service, backend = %p.addr,
                "applying a health change failed: {e:#}"
            ),
        }
    }

    fn handle(&mut self, req: ApiRequest) -> Result<ApiReply, ApiError> {
        match req {
            ApiRequest::Status => Ok((StatusCode::OK, to_json(&self.status()))),
            ApiRequest::Config => Ok((StatusCode::OK, json!({ "config": self.cfg.to_toml() }))),
            ApiRequest::Service(name) => {
                let v = self.service_view(&name)?;
                Ok((StatusCode::OK, to_json(&v)))
            }
            ApiRequest::AddService(svc) => {
                let new = self.cfg.with_service(svc)?;
                let name = new
                    .services
                    .last()
                    .map(|s| s.name.clone())
                    .unwrap_or_default();
                self.apply(new)?;
                tracing::info!(service = %name, "API: service added");
                Ok((StatusCode::CREATED, to_json(&self.service_view(&name)?)))
            }
            ApiRequest::DelService(name) => {
                let new = self.cfg.without_service(&name)?;
                self.apply(new)?;
                tracing::info!(service = %name, "API: service removed");
                Ok((StatusCode::OK, json!({ "removed": name })))
            }
            ApiRequest::AddBackend(name, b) => {
                let new = self.cfg.with_backend(&name, b)?;
                let addr = new
                    .services
                    .iter()
                    .find(|s| s.name == name)
                    .and_then(|s| s.backends.last())
                    .map(|b| b.address);
                self.apply(new)?;
                tracing::info!(service = %name, backend = ?addr, "API: backend added");
                let v = self.service_view(&name)?;
                let b = v
                    .backends
                    .into_iter()
                    .find(|b| Some(b.address) == addr)
                    .ok_or_else(|| ApiError::internal("added backend missing"))?;
                Ok((StatusCode::CREATED, to_json(&b)))
            }
            ApiRequest::DelBackend(name, addr) => {
                let new = self.cfg.without_backend(&name, addr)?;
                self.apply(new)?;
                tracing::info!(service = %name, backend = %addr, "API: backend removed");
                Ok((
                    StatusCode::OK,
                    json!({ "removed": addr.to_string(), "service": name }),
                ))
            }
            ApiRequest::SetBackend {
                service,
                addr,
                weight,
                state,
            } => {
                self.director.backend(&service, addr)?;
                self.director
                    .set_admin(&service, addr, weight, state, &mut self.dp)
                    .map_err(|e| ApiError::internal(format!("{e:#}")))?;
                tracing::info!(
                    service = %service, backend = %addr,
                    weight = ?weight, state = ?state.map(|s| s.as_str()),
                    "API: backend set"
                );
                let v = self.service_view(&service)?;
                let b = v
                    .backends
                    .into_iter()
                    .find(|b| b.address == addr)
                    .ok_or_else(|| ApiError::internal("backend missing"))?;
                Ok((StatusCode::OK, to_json(&b)))
            }
            ApiRequest::Reload => {
                let summary = self.reload()?;
                tracing::info!("API: {summary}");
                Ok((StatusCode::OK, json!({ "reloaded": summary })))
            }
        }
    }

    fn service_view(&mut self, name: &str) -> Result<ServiceView, ApiError> {
        let cfg = self
            .cfg
            .services
            .iter()
            .find(|s| s.name == name)
            .cloned()
            .ok_or_else(|| ApiError::not_found(format!("service: no service named {name:?}")))?;
        let st = self
            .director
            .services
            .get(name)
            .ok_or_else(|| ApiError::internal(format!("service {name:?} is not programmed")))?;
        let svc_counter = self.dp.service_counter(st.info.id).unwrap_or_default();
        let now = SystemTime::now();
        let mut backends = Vec::with_capacity(cfg.backends.len());
        let ids: Vec<(IpAddr, u32)> = cfg
            .backends
            .iter()
            .filter_map(|b| st.backends.get(&b.address).map(|s| (b.address, s.id)))
            .collect();
        let counters: HashMap<u32, lb_common::Counter> = ids
            .iter()
            .map(|&(_, id)| (id, self.dp.backend_counter(id).unwrap_or_default()))
            .collect();
        let st = &self.director.services[name];
        for (addr, id) in ids {
            let b = &st.backends[&addr];
            let c = counters[&id];
            let last_check = self.supervisor.last(name, addr).map(|l| CheckView {
                ok: l.outcome.is_up(),
                detail: match &l.outcome {
                    Outcome::Up { weight: None } => "ok".into(),
                    Outcome::Up { weight: Some(w) } => format!("ok, weight {w}"),
                    Outcome::Down { reason } => reason.clone(),
                },
                latency_ms: l.latency.as_secs_f64() * 1000.0,
                age_ms: now.duration_since(l.at).unwrap_or_default().as_millis() as u64,
            });
            backends.push(BackendView {
                address: addr,
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
            });
        }
        Ok(ServiceView {
            name: cfg.name.clone(),
            vip: cfg.vip,
            port: cfg.port,
            protocol: cfg.protocol.as_str().into(),
            hash: hash_mode_name(cfg.hash).into(),
            table_size: cfg.table_size,
            check: cfg.default_check().as_ref().map(check_summary),
            backends_up: backends
                .iter()
                .filter(|b| b.health == Health::Up.as_str())
                .count(),
            backends_usable: backends.iter().filter(|b| b.effective_weight > 0).count(),
            packets: svc_counter.packets,
            bytes: svc_counter.bytes,
            backends,
        })
    }

    fn status(&mut self) -> StatusView {
        let names: Vec<String> = self.cfg.services.iter().map(|s| s.name.clone()).collect();
        let services = names
            .iter()
            .filter_map(|n| self.service_view(n).ok())
            .collect();
        let stats = match self.dp.stats() {
            Ok(s) => Stat::ALL
                .iter()
                .map(|st| (st.name().to_string(), s[*st as usize]))
                .collect(),
            Err(e) => {
                tracing::warn!("reading data-plane counters: {e:#}");
                Default::default()
            }
        };
        StatusView { services, stats }
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).expect("views serialize")
}
