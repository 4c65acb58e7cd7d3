//! The rules that span more than one field: a backend within its service ([`admit`]) and the
//! services among themselves ([`check_services`]). The file (`raw.rs`) and the runtime API's
//! edits (`edit.rs`) both call these, so they enforce one rule set; each broken rule says
//! where it is (for the file's positions) and what kind of error it is (for the API's status).

use std::net::IpAddr;

use super::BackendCfg;
use super::{CheckSpec, EditError, FarmCfg, Forwarding, ServiceCfg};

/// How messages name services and backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Naming {
    /// In a file: `service[1] "web"`, `backend[0]` (positions count from 0 in file order).
    Indexed,
    /// In an API request: `service "web"`, `backend`. The positions would be in a document
    /// the client never saw.
    Named,
}

impl Naming {
    /// `service[1] "web"`, or `service[1]` while the name is unknown.
    pub(super) fn service(self, i: usize, name: Option<&str>) -> String {
        let at = match self {
            Naming::Indexed => format!("service[{i}]"),
            Naming::Named => "service".to_string(),
        };
        match name {
            Some(n) => format!("{at} {n:?}"),
            None => at,
        }
    }

    /// `service[1] "web": backend[0].`: the prefix of a backend's fields.
    pub(super) fn backend(self, i: usize, service: &str, j: usize) -> String {
        let svc = self.service(i, Some(service));
        match self {
            Naming::Indexed => format!("{svc}: backend[{j}]."),
            Naming::Named => format!("{svc}: backend."),
        }
    }

    /// ` (also service[0])`: where the other one of a duplicate is.
    fn also(self, what: &str, k: usize) -> String {
        match self {
            Naming::Indexed => format!(" (also {what}[{k}])"),
            Naming::Named => String::new(),
        }
    }
}

/// Where in a backend table a broken rule is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum InService {
    Table,
    Address,
    Check,
}

/// Where in the configuration a broken rule is: a service table (by position), its `name`
/// or `forwarding`, or `[farm] check`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum InConfig {
    Service(usize),
    Name(usize),
    Forwarding(usize),
    FarmCheck,
}

fn family(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() {
        "IPv4"
    } else {
        "IPv6"
    }
}

/// `b` as the next backend of `svc`, service `i`: not in a farm service, in the vip's address
/// family, not the vip itself, not a duplicate; its `check` becomes the service's merged with
/// its own.
pub(super) fn admit(
    svc: &ServiceCfg,
    mut b: BackendCfg,
    naming: Naming,
    i: usize,
) -> Result<BackendCfg, (InService, EditError)> {
    let invalid = |at, message| Err((at, EditError::Invalid(message)));
    if svc.forwarding == Forwarding::Farm {
        let s = naming.service(i, Some(&svc.name));
        return invalid(
            InService::Table,
            format!("{s}: backend: a farm service has no backends (the farm's nodes serve it)"),
        );
    }
    let p = naming.backend(i, &svc.name, svc.backends.len());
    let (address, vip) = (b.address, svc.vip);
    // Tunnels cross families (4in6, 6in4); DR and farm cannot.
    if address.is_ipv4() != vip.is_ipv4() && !svc.forwarding.is_tunnel() {
        return invalid(
            InService::Address,
            format!(
                "{p}address: {} address {address} for {} vip {vip} (backends must be in the \
                 vip's address family)",
                family(address),
                family(vip)
            ),
        );
    }
    if address == vip {
        return invalid(
            InService::Address,
            format!("{p}address: {address} is the service's own vip"),
        );
    }
    if let Some(k) = svc.backends.iter().position(|x| x.address == address) {
        let also = naming.also("backend", k);
        let message = format!("{p}address: duplicate backend {address}{also}");
        return Err((InService::Address, EditError::Conflict(message)));
    }
    b.check = match CheckSpec::merged(svc.check.as_ref(), b.check_override.as_ref()) {
        None => None,
        Some(spec) => spec.resolve(svc.port).map_err(|e| {
            (
                InService::Check,
                EditError::Invalid(format!("{p}check.{e}")),
            )
        })?,
    };
    Ok(b)
}

/// The rules between services, and the node check of `[farm]` that depends on them: at most
/// `MAX_SERVICES` services, unique names and (vip, port, protocol), fewer than `MAX_BACKENDS`
/// backends in all (id 0 means "no backend"), farm services only with a `[farm]` section, and
/// a node check that resolves.
pub(super) fn check_services(
    services: &[ServiceCfg],
    farm: Option<&FarmCfg>,
    naming: Naming,
) -> Result<(), (InConfig, EditError)> {
    let invalid = |at, message| Err((at, EditError::Invalid(message)));
    let max = lb_common::MAX_SERVICES as usize;
    if services.len() > max {
        let n = services.len();
        return invalid(
            InConfig::Service(max),
            format!("service: {n} services, at most {max} are supported"),
        );
    }
    let mut total_backends = 0;
    for (i, s) in services.iter().enumerate() {
        let p = naming.service(i, Some(&s.name));
        if s.forwarding == Forwarding::Farm && farm.is_none() {
            return invalid(
                InConfig::Forwarding(i),
                format!("{p}: forwarding: \"farm\" needs a [farm] section"),
            );
        }
        let earlier = &services[..i];
        if let Some(j) = earlier.iter().position(|e| e.name == s.name) {
            let also = naming.also("service", j);
            let message = format!("{p}: name: duplicate service name{also}");
            return Err((InConfig::Name(i), EditError::Conflict(message)));
        }
        let key = |e: &ServiceCfg| (e.vip, e.port, e.protocol);
        if let Some(e) = earlier.iter().find(|e| key(e) == key(s)) {
            let message = format!(
                "{p}: duplicate of service {:?} (same vip, port and protocol)",
                e.name
            );
            return Err((InConfig::Service(i), EditError::Conflict(message)));
        }
        total_backends += s.backends.len();
        if total_backends >= lb_common::MAX_BACKENDS as usize {
            return invalid(
                InConfig::Service(i),
                format!(
                    "{p}: backend: too many backends in total, at most {} over all services",
                    lb_common::MAX_BACKENDS - 1
                ),
            );
        }
    }
    if let Some(f) = farm {
        f.node_check(services)
            .map_err(|e| (InConfig::FarmCheck, EditError::Invalid(e)))?;
    }
    Ok(())
}
