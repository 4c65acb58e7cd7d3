//! The owner of the running state: configuration, data plane, director, checks, farm role.
//! Every change goes through [`Owner::apply`]: validate whole → rehearse → apply as a
//! difference, or reject and keep running the old configuration.

use std::path::PathBuf;

use axum::http::StatusCode;
use serde_json::json;

use super::state::{Edit, Override, RuntimeState};
use crate::api::ErrorKind;
use crate::api::{self, ApiError, ApiReply, ApiRequest};
use crate::config::{Config, ConfigError, RestartNeeded};
use crate::dataplane::{Dataplane, DryRun};
use crate::director::Director;
use crate::farm::membership::View;
use crate::farm::FarmRole;
use crate::health::{ProbeResult, Supervisor};
use crate::metrics::LiveMetrics;
use crate::neigh::{AssumeResolved, Neighbours, Resolved};

/// Why a reload or an API change was refused; the running configuration stays.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The new file does not parse or validate.
    #[error("{0}")]
    Invalid(#[from] ConfigError),
    /// A field that only a restart can change.
    #[error("{0}")]
    RestartNeeded(#[from] RestartNeeded),
    /// The change is valid but cannot be programmed (e.g. no room left in the ring); found
    /// by the rehearsal, before anything reached the kernel.
    #[error("{0}")]
    Rejected(String),
    /// The kernel refused a map update while applying (should not happen).
    #[error("applying the change: {0:#}")]
    Apply(anyhow::Error),
}

impl From<ReloadError> for ApiError {
    fn from(e: ReloadError) -> Self {
        let kind = match e {
            ReloadError::Invalid(_) | ReloadError::Rejected(_) => ErrorKind::BadRequest,
            ReloadError::RestartNeeded(_) => ErrorKind::RestartNeeded,
            ReloadError::Apply(_) => ErrorKind::Internal,
        };
        ApiError::new(kind, e.to_string())
    }
}

/// Everything the owner loop mutates.
pub(super) struct Owner {
    pub path: PathBuf,
    pub cfg: Config,
    pub dp: Dataplane,
    pub director: Director,
    pub macs: Neighbours,
    pub supervisor: Supervisor,
    pub live: LiveMetrics,
    pub farm: Option<FarmRole>,
    /// `[announce]`: the writer of the VIP routes.
    pub announce: Option<crate::announce::Announcer>,
    /// `[announce] sync`: the conntrack sync task.
    pub sync: Option<crate::sync::Sync>,
    /// The last conntrack count.
    pub conntrack: Option<crate::dataplane::conntrack::Count>,
    /// How the last reload (SIGHUP, `farmlb reload`) ended; the start counts as one.
    pub reload: api::ReloadView,
    /// Runtime state saved to `state_path` after every change.
    pub state: RuntimeState,
    pub state_path: PathBuf,
}

/// `cfg` with one API edit applied, validated as the API validates it: a saved body goes
/// through the same parser as a request's.
pub fn apply_edit(cfg: &Config, e: &Edit) -> Result<Config, ApiError> {
    let bytes = |v: &serde_json::Value| serde_json::to_vec(v).unwrap_or_default();
    Ok(match e {
        Edit::AddService { body } => cfg.with_service(api::body::service(&bytes(body))?)?,
        Edit::DelService { service } => cfg.without_service(service)?,
        Edit::AddBackend { service, body } => {
            cfg.with_backend(service, api::body::backend(service, &bytes(body))?)?
        }
        Edit::DelBackend { service, backend } => cfg.without_backend(service, *backend)?,
    })
}

/// The file's configuration with the saved API edits replayed; an edit that no longer
/// applies (the file changed meanwhile) is dropped, with a warning.
pub fn replay(mut cfg: Config, edits: &mut Vec<Edit>) -> Config {
    edits.retain(|e| match apply_edit(&cfg, e) {
        Ok(next) => {
            cfg = next;
            true
        }
        Err(err) => {
            tracing::warn!(
                "state_file: dropping the saved API edit {e:?}: {}",
                err.message
            );
            false
        }
    });
    cfg
}

impl Owner {
    pub fn sync_checks(&mut self) {
        let director = &self.director;
        self.supervisor.sync(&self.cfg, |s, a| {
            director.backend(s, a).ok().map(|b| b.health)
        });
        // A service rebuilt by the change (new vip, port, protocol, table size or
        // forwarding) starts its backends afresh: give them the verdicts their checks hold.
        for (s, a, h) in self.supervisor.verdicts() {
            if let Err(e) = self.director.set_health(&s, a, h, None, &mut self.dp) {
                tracing::error!(service = %s, backend = %a, "restoring health: {e:#}");
            }
        }
    }

    /// Restore saved runtime weights/states whose file value is still the one they were set
    /// over (the same rule as a reload).
    pub fn restore_overrides(&mut self, saved: &[Override]) {
        for o in saved {
            let Ok(b) = self.director.backend(&o.service, o.backend) else {
                continue;
            };
            let weight = o
                .weight
                .filter(|(file, _)| *file == b.cfg.weight)
                .map(|(_, w)| w);
            let state = o
                .state
                .as_ref()
                .filter(|(file, _)| file == b.cfg.state.as_str())
                .and_then(|(_, st)| st.parse().ok());
            if weight.is_none() && state.is_none() {
                continue;
            }
            match self
                .director
                .set_admin(&o.service, o.backend, weight, state, &mut self.dp)
            {
                Ok(()) => tracing::info!(
                    service = %o.service, backend = %o.backend, ?weight,
                    state = ?state.map(|s: crate::config::AdminState| s.as_str()),
                    "restored a runtime override"
                ),
                Err(e) => tracing::warn!("restoring an override of {}: {e:#}", o.backend),
            }
        }
    }

    /// Save the runtime state (the director holds the overrides).
    pub fn persist(&mut self) {
        self.state.overrides = self
            .director
            .services
            .values()
            .flat_map(|s| s.backends.values().map(move |b| (s, b)))
            .filter(|(_, b)| b.weight_override.is_some() || b.state_override.is_some())
            .map(|(s, b)| Override {
                service: s.cfg.name.clone(),
                backend: b.address,
                weight: b.weight_override.map(|w| (b.cfg.weight, w)),
                state: b
                    .state_override
                    .map(|st| (b.cfg.state.as_str().into(), st.as_str().into())),
            })
            .collect();
        if let Err(e) = self.state.save(&self.state_path) {
            tracing::warn!("saving the runtime state: {e:#}");
        }
    }

    /// The program is attached: roles announce themselves.
    pub fn started(&mut self) {
        if let Some(f) = &mut self.farm {
            f.started(&self.cfg, &self.director);
        }
    }

    /// Bring everything to `new` (already validated): rehearse on a copy first so a change
    /// that cannot be applied is refused before anything reaches the kernel.
    pub fn apply(&mut self, new: Config) -> Result<(), ReloadError> {
        crate::config::restart_needed(&self.cfg, &new)?;
        let mut trial = self.director.clone();
        trial
            .apply(
                &new,
                &mut DryRun {
                    ring_slots: self.dp.ring_slots(),
                },
                &mut AssumeResolved,
            )
            .map_err(|e| ReloadError::Rejected(format!("{e:#}")))?;
        self.director
            .apply(&new, &mut self.dp, &mut self.macs)
            .map_err(ReloadError::Apply)?;
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
        if let Some(f) = &mut self.farm {
            f.reloaded(&self.cfg, &self.director);
        }
        Ok(())
    }

    /// Re-read the file and apply it (SIGHUP, `farmlb reload`).
    pub fn reload(&mut self) -> Result<String, ReloadError> {
        let _reloading = super::notify::Reloading::start();
        let res = self.reload_file();
        self.reload
            .record(res.as_ref().err().map(|e| e.to_string()));
        res
    }

    fn reload_file(&mut self) -> Result<String, ReloadError> {
        let new = Config::load(&self.path)?;
        self.apply(new)?;
        // The running set matches the file again.
        self.state.edits.clear();
        self.persist();
        let backends: usize = self.cfg.services.iter().map(|s| s.backends.len()).sum();
        Ok(format!(
            "configuration reloaded from {}: {} services, {backends} backends",
            self.path.display(),
            self.cfg.services.len()
        ))
    }

    pub fn on_probe(&mut self, p: ProbeResult) {
        if !self.supervisor.is_current(&p) {
            return;
        }
        self.live.observe_check(
            &p.service,
            &p.addr.to_string(),
            p.outcome.label(),
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

    /// A result of the farm node's own check.
    pub fn on_node_probe(&mut self, p: &ProbeResult) {
        if let Some(f) = &mut self.farm {
            f.on_probe(p, &self.cfg, &self.director);
        }
    }

    /// A new membership view.
    pub fn on_view(&mut self, view: View) {
        if let Some(f) = &mut self.farm {
            if let Err(e) = f.on_view(view, &self.cfg, &mut self.director, &mut self.dp) {
                tracing::error!("installing the ownership tables failed: {e:#}");
            }
        }
    }

    /// Hand the announcer the VIPs that should be announced now (a no-op when nothing
    /// changed; the writer task does the rest).
    pub fn announce(&self) {
        if let Some(a) = &self.announce {
            a.set(self.wanted_vips());
        }
        if let Some(s) = &self.sync {
            s.set_table(crate::sync::Table::of(&self.director));
        }
    }

    /// Every VIP and whether it should be announced now.
    pub fn wanted_vips(
        &self,
    ) -> std::collections::BTreeMap<std::net::IpAddr, crate::announce::Reason> {
        let node_ok = self.farm.as_ref().is_none_or(|f| f.node_ok());
        crate::announce::wanted(&self.cfg, &self.director, node_ok)
    }

    /// Farm role: take new flows for another lease.
    pub fn renew_lease(&mut self) {
        let Some(f) = &self.farm else { return };
        let until = crate::dataplane::monotonic_ns() + f.lease().as_nanos() as u64;
        if let Err(e) = self.director.set_lease(until, &mut self.dp) {
            tracing::error!("renewing the farm lease: {e:#}");
        }
    }

    /// A neighbour resolution finished: a backend with a new MAC joins its table.
    pub fn on_resolved(&mut self, r: Resolved) {
        if self.macs.learned(r) {
            if let Err(e) = self.director.apply(&self.cfg, &mut self.dp, &mut self.macs) {
                tracing::error!("adding resolved backends: {e:#}");
            }
        }
    }

    /// Periodic work: retry unresolved backends, refresh the farm status.
    pub fn tick(&mut self) {
        self.macs.recheck_routed();
        if self.director.unresolved() > 0 {
            if let Err(e) = self.director.apply(&self.cfg, &mut self.dp, &mut self.macs) {
                tracing::error!("retrying unresolved backends: {e:#}");
            }
        }
        if let Some(f) = &mut self.farm {
            f.publish(&self.cfg, &self.director);
        }
    }

    pub fn handle(&mut self, req: ApiRequest) -> Result<ApiReply, ApiError> {
        match req {
            ApiRequest::Status => Ok((StatusCode::OK, to_json(&self.status()))),
            ApiRequest::Config => Ok((StatusCode::OK, json!({ "config": self.cfg.to_toml() }))),
            ApiRequest::Service(name) => {
                let v = self.service_view(&name)?;
                Ok((StatusCode::OK, to_json(&v)))
            }
            ApiRequest::AddService(svc, body) => {
                let name = svc.name.clone();
                self.edit(Edit::AddService { body })?;
                tracing::info!(service = %name, "API: service added");
                Ok((StatusCode::CREATED, to_json(&self.service_view(&name)?)))
            }
            ApiRequest::DelService(service) => {
                self.edit(Edit::DelService {
                    service: service.clone(),
                })?;
                tracing::info!(service = %service, "API: service removed");
                Ok((StatusCode::OK, json!({ "removed": service })))
            }
            ApiRequest::AddBackend(service, b, body) => {
                let addr = Some(b.address);
                self.edit(Edit::AddBackend {
                    service: service.clone(),
                    body,
                })?;
                tracing::info!(service = %service, backend = ?addr, "API: backend added");
                Ok((
                    StatusCode::CREATED,
                    to_json(&self.backend_view(&service, addr)?),
                ))
            }
            ApiRequest::DelBackend(service, backend) => {
                self.edit(Edit::DelBackend {
                    service: service.clone(),
                    backend,
                })?;
                tracing::info!(service = %service, backend = %backend, "API: backend removed");
                Ok((
                    StatusCode::OK,
                    json!({ "removed": backend.to_string(), "service": service }),
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
                self.persist();
                Ok((
                    StatusCode::OK,
                    to_json(&self.backend_view(&service, Some(addr))?),
                ))
            }
            ApiRequest::Stop { .. } | ApiRequest::Conns { .. } => {
                unreachable!("the owner loop handles stop and conns")
            }
            ApiRequest::Simulate(q) => {
                let fail = |e: anyhow::Error| ApiError::internal(format!("{e:#}"));
                let flow = q
                    .flow()
                    .map_err(|e| ApiError::new(ErrorKind::BadRequest, format!("{e:#}")))?;
                let mut model = self.dp.model_for_flow(&flow).map_err(fail)?;
                let names = crate::simulate::service_names(&self.director);
                let now = crate::dataplane::monotonic_ns();
                let v =
                    crate::simulate::decide(&mut model, &q, &names, now, "daemon").map_err(fail)?;
                Ok((StatusCode::OK, to_json(&v)))
            }
            ApiRequest::Reload => {
                let summary = self.reload().map_err(|e| {
                    let mut a = ApiError::from(e);
                    a.message = format!("{REJECTED}: {}", a.message);
                    a
                })?;
                tracing::info!("API: {summary}");
                Ok((StatusCode::OK, json!({ "reloaded": summary })))
            }
        }
    }
}

impl Owner {
    /// Apply an API edit to the running configuration and remember it in the state file.
    fn edit(&mut self, e: Edit) -> Result<(), ApiError> {
        let new = apply_edit(&self.cfg, &e)?;
        self.apply(new)?;
        self.state.edits.push(e);
        self.persist();
        Ok(())
    }
}

/// How a refused reload begins, in the log and in the API's answer.
pub const REJECTED: &str = "reload rejected, the running configuration stays";

fn to_json<T: serde::Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).expect("views serialize")
}
