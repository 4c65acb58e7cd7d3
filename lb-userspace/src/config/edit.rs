//! Typed edits of a running configuration, for the runtime API. A request body becomes a
//! [`ServiceCfg`] or [`BackendCfg`] through the file's own table validators, and every edit
//! returns the whole candidate configuration checked with the file's rules (`rules.rs`), or
//! says why not, by kind. The running configuration itself never changes here.

use std::net::IpAddr;

use toml::Spanned;

use super::raw::{Ctx, RawBackend, RawService};
use super::rules::{self, Naming};
use super::{BackendCfg, Config, ConfigError, ServiceCfg};

/// Why an edit was refused; the message is one line naming the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EditError {
    /// No such service or backend.
    #[error("{0}")]
    NotFound(String),
    /// The edit collides with what is there: a service of the same name or the same vip,
    /// port and protocol, or the same backend.
    #[error("{0}")]
    Conflict(String),
    /// The edit breaks any other rule of the file.
    #[error("{0}")]
    Invalid(String),
}

impl From<ConfigError> for EditError {
    /// A table validator's error: its position is in text the client never saw. Whatever it
    /// says (even a duplicate backend within the table), the request is invalid in itself;
    /// conflicts are with the running configuration.
    fn from(e: ConfigError) -> Self {
        EditError::Invalid(e.message())
    }
}

/// `t` as TOML text, validated by `table` as a table of that text, whose positions are
/// dropped (see [`EditError::from`]).
fn validate_table<R: serde::de::DeserializeOwned, T>(
    t: &toml::Table,
    table: impl FnOnce(&Ctx, &Spanned<R>) -> Result<T, ConfigError>,
) -> Result<T, EditError> {
    let src = toml::to_string(t).map_err(|e| EditError::Invalid(format!("body: {e}")))?;
    let cx = Ctx::new(&src, None, Naming::Named);
    let raw = Spanned::new(0..src.len(), cx.parse()?);
    Ok(table(&cx, &raw)?)
}

impl ServiceCfg {
    /// A `[[service]]` table given on its own (a request body), validated like one of the
    /// file's; its backends are admitted as in the file.
    pub fn from_table(t: &toml::Table) -> Result<ServiceCfg, EditError> {
        validate_table(t, |cx, raw: &Spanned<RawService>| cx.service(0, raw))
    }
}

impl BackendCfg {
    /// A `[[service.backend]]` table given on its own, validated like one of the file's;
    /// `service` only names it in messages. Its `check` is derived when it joins its service
    /// ([`Config::with_backend`]).
    pub fn from_table(service: &str, t: &toml::Table) -> Result<BackendCfg, EditError> {
        let prefix = Naming::Named.backend(0, service, 0);
        validate_table(t, |cx, raw: &Spanned<RawBackend>| cx.backend(&prefix, raw))
    }
}

impl Config {
    /// The candidate after an edit, if it keeps the rules between services.
    fn checked(self) -> Result<Config, EditError> {
        rules::check_services(&self.services, self.farm.as_ref(), Naming::Named)
            .map_err(|(_, e)| e)?;
        Ok(self)
    }

    fn service_index(&self, name: &str) -> Result<usize, EditError> {
        (self.services.iter().position(|s| s.name == name))
            .ok_or_else(|| EditError::NotFound(format!("service: no service named {name:?}")))
    }

    /// This configuration plus `svc` (last). Its backends are admitted again, so their checks
    /// are derived from `svc`'s however it was built.
    pub fn with_service(&self, mut svc: ServiceCfg) -> Result<Config, EditError> {
        let i = self.services.len();
        let backends = std::mem::take(&mut svc.backends);
        let mut admitted = svc;
        for b in backends {
            let b = rules::admit(&admitted, b, Naming::Named, i).map_err(|(_, e)| e)?;
            admitted.backends.push(b);
        }
        let mut c = self.clone();
        c.services.push(admitted);
        c.checked()
    }

    /// This configuration without service `name`.
    pub fn without_service(&self, name: &str) -> Result<Config, EditError> {
        let i = self.service_index(name)?;
        let mut c = self.clone();
        c.services.remove(i);
        c.checked()
    }

    /// This configuration plus backend `b` (last) of service `service`; `b`'s check becomes
    /// the service's merged with its own, as in the file.
    pub fn with_backend(&self, service: &str, b: BackendCfg) -> Result<Config, EditError> {
        let i = self.service_index(service)?;
        let b = rules::admit(&self.services[i], b, Naming::Named, i).map_err(|(_, e)| e)?;
        let mut c = self.clone();
        c.services[i].backends.push(b);
        c.checked()
    }

    /// This configuration without backend `addr` of service `service`.
    pub fn without_backend(&self, service: &str, addr: IpAddr) -> Result<Config, EditError> {
        let i = self.service_index(service)?;
        let backends = &self.services[i].backends;
        let j = (backends.iter().position(|b| b.address == addr)).ok_or_else(|| {
            EditError::NotFound(format!(
                "backend: service {service:?} has no backend {addr}"
            ))
        })?;
        let mut c = self.clone();
        c.services[i].backends.remove(j);
        c.checked()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::testing::BASE;
    use crate::config::{CheckCfg, Probe};

    /// Service "web" with a tcp check every 200 ms and one backend.
    fn running_src() -> String {
        format!(
            "{BASE}[[service]]\nname = \"web\"\nvip = \"10.0.0.1\"\nport = 80\ntable_size = 7\n\
             check = {{ type = \"tcp\", interval = \"200ms\" }}\n\
             [[service.backend]]\naddress = \"10.0.0.11\"\n"
        )
    }

    fn running() -> Config {
        Config::from_toml_str(&running_src()).unwrap()
    }

    fn table(s: &str) -> toml::Table {
        toml::from_str(s).unwrap()
    }

    fn backend(s: &str) -> BackendCfg {
        BackendCfg::from_table("web", &table(s)).unwrap()
    }

    fn service(s: &str) -> ServiceCfg {
        ServiceCfg::from_table(&table(s)).unwrap()
    }

    #[test]
    fn an_edit_gives_what_the_file_gives() {
        let added = "address = \"10.0.0.12\"\nweight = 2\ncheck = { port = 8080 }\n";
        let c = running().with_backend("web", backend(added)).unwrap();
        let file = format!("{}[[service.backend]]\n{added}", running_src());
        assert_eq!(c, Config::from_toml_str(&file).unwrap());
        // The runtime backend's check is the service's merged with its own, as in the file.
        let interval = Duration::from_millis(200);
        let want = CheckCfg {
            probe: Probe::Tcp,
            interval,
            timeout: interval,
            rise: 2,
            fall: 3,
            port: 8080,
        };
        assert_eq!(c.services[0].backends[1].check, Some(want));
        let api = "name = \"api\"\nvip = \"10.0.0.2\"\nport = 81\n\
                   [[backend]]\naddress = \"10.0.0.21\"\n";
        let with_api = c.with_service(service(api)).unwrap();
        let file = format!(
            "{file}[[service]]\n{}",
            api.replace("[[backend]]", "[[service.backend]]")
        );
        assert_eq!(with_api, Config::from_toml_str(&file).unwrap());
        assert_eq!(with_api.without_service("api").unwrap(), c);
        let b = "10.0.0.12".parse().unwrap();
        assert_eq!(c.without_backend("web", b).unwrap(), running());
    }

    #[test]
    fn a_runtime_backend_merges_the_service_check() {
        // Another type keeps the service's interval: a 1 s timeout no longer fits.
        let b = backend("address = \"10.0.0.12\"\ncheck = { type = \"http\", timeout = \"1s\" }");
        assert_eq!(b.check, None, "derived when it joins its service");
        assert_eq!(
            running().with_backend("web", b),
            Err(EditError::Invalid(
                "service \"web\": backend.check.timeout: 1s is longer than the interval 200ms"
                    .into()
            ))
        );
        // A backend built in code gets the service's check too.
        let plain = BackendCfg::new("10.0.0.13".parse().unwrap(), 1);
        let c = running().with_backend("web", plain).unwrap();
        assert_eq!(
            c.services[0].backends[1].check,
            c.services[0].default_check()
        );
    }

    #[test]
    fn refusals_have_kinds_and_name_no_index() {
        use EditError::{Conflict, Invalid, NotFound};
        let r = running();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let web = |s: &str| format!("service \"web\": {s}");
        for (got, want) in [
            (
                r.with_backend("web", backend("address = \"10.0.0.11\"")),
                Conflict(web("backend.address: duplicate backend 10.0.0.11")),
            ),
            (
                r.with_backend("nope", backend("address = \"10.0.0.12\"")),
                NotFound("service: no service named \"nope\"".into()),
            ),
            (
                r.with_backend("web", backend("address = \"fd00::2\"")),
                Invalid(web(
                    "backend.address: IPv6 address fd00::2 for IPv4 vip 10.0.0.1 (backends \
                     must be in the vip's address family)",
                )),
            ),
            (
                r.with_backend("web", backend("address = \"10.0.0.1\"")),
                Invalid(web("backend.address: 10.0.0.1 is the service's own vip")),
            ),
            (
                r.with_service(service("name = \"web\"\nvip = \"10.0.0.9\"\nport = 80")),
                Conflict(web("name: duplicate service name")),
            ),
            (
                r.with_service(service("name = \"api\"\nvip = \"10.0.0.1\"\nport = 80")),
                Conflict(
                    "service \"api\": duplicate of service \"web\" (same vip, port and \
                     protocol)"
                        .into(),
                ),
            ),
            (
                r.with_service(service(
                    "name = \"f\"\nvip = \"10.0.0.9\"\nport = 80\nforwarding = \"farm\"",
                )),
                Invalid("service \"f\": forwarding: \"farm\" needs a [farm] section".into()),
            ),
            (
                r.without_service("nope"),
                NotFound("service: no service named \"nope\"".into()),
            ),
            (
                r.without_backend("web", ip("10.0.0.99")),
                NotFound("backend: service \"web\" has no backend 10.0.0.99".into()),
            ),
        ] {
            assert_eq!(got, Err(want));
        }
        // The tables are checked by the file's validators.
        for (t, want) in [
            (
                "address = \"10.0.0.x\"",
                web("backend.address: invalid IP address \"10.0.0.x\""),
            ),
            (
                "address = \"10.0.0.2\"\nweight = 70000",
                web("backend.weight: 70000 is out of range 0..=65535"),
            ),
            ("weight = 1", web("backend.address: missing required field")),
            (
                "address = \"10.0.0.2\"\ncheck = { type = \"icmp\" }",
                web(
                    "backend.check.type: invalid value \"icmp\", expected \"tcp\", \"http\", \
                     \"udp\", \"exec\" or \"none\"",
                ),
            ),
            (
                "address = \"10.0.0.2\"\nwieght = 1",
                "unknown field \"wieght\", expected one of \"address\", \"weight\", \"state\", \
                 \"check\""
                    .into(),
            ),
        ] {
            assert_eq!(BackendCfg::from_table("web", &table(t)), Err(Invalid(want)));
        }
        let e = ServiceCfg::from_table(&table("name = \"x\"\nvip = \"10.0.0.9\"")).unwrap_err();
        assert_eq!(
            e,
            Invalid("service \"x\": port: missing required field".into())
        );
        let e = ServiceCfg::from_table(&table(
            "name = \"x\"\nvip = \"10.0.0.9\"\nport = 1\n\
             backend = [{ address = \"10.0.0.2\" }, { address = \"10.0.0.2\" }]",
        ))
        .unwrap_err();
        // A duplicate within the request itself is not a conflict with what is running.
        assert_eq!(
            e,
            Invalid("service \"x\": backend.address: duplicate backend 10.0.0.2".into())
        );
    }

    #[test]
    fn limits_hold_for_edits() {
        use EditError::Invalid;
        let mut src = running_src();
        for i in 1..lb_common::MAX_BACKENDS - 1 {
            let (hi, lo) = (1 + (i >> 8) as u8, i as u8);
            src.push_str(&format!(
                "[[service.backend]]\naddress = \"10.1.{hi}.{lo}\"\n"
            ));
        }
        let full = Config::from_toml_str(&src).unwrap();
        let b = backend("address = \"10.0.0.12\"");
        match full.with_backend("web", b) {
            Err(Invalid(m)) => assert!(m.contains("at most 4095 over all services"), "{m}"),
            other => panic!("{other:?}"),
        }
        let mut c = Config::from_toml_str(BASE).unwrap();
        for i in 0..lb_common::MAX_SERVICES {
            let svc = format!("name = \"s{i}\"\nvip = \"10.0.0.1\"\nport = {}", i + 1);
            c.services.push(service(&svc));
        }
        let one_more = service("name = \"x\"\nvip = \"10.0.0.1\"\nport = 9999");
        assert_eq!(
            c.with_service(one_more),
            Err(Invalid(
                "service: 513 services, at most 512 are supported".into()
            ))
        );
    }

    #[test]
    fn farm_rules_hold_for_edits() {
        let farm = format!(
            "{BASE}[farm]\nnode_id = 1\naddress = \"10.0.0.1\"\nkey_file = \"/k\"\n\
             check = {{ type = \"tcp\" }}\n\
             [[service]]\nname = \"web\"\nvip = \"10.0.100.1\"\nport = 80\nforwarding = \"farm\"\n"
        );
        let c = Config::from_toml_str(&farm).unwrap();
        assert_eq!(
            c.with_backend("web", backend("address = \"10.0.100.2\"")),
            Err(EditError::Invalid(
                "service \"web\": backend: a farm service has no backends (the farm's nodes \
                 serve it)"
                    .into()
            ))
        );
        // The node check takes its port from the first farm service: it cannot go.
        match c.without_service("web") {
            Err(EditError::Invalid(m)) => {
                assert!(m.starts_with("farm.check.port: required"), "{m}")
            }
            other => panic!("{other:?}"),
        }
        let dr = service("name = \"dr\"\nvip = \"10.0.100.2\"\nport = 80");
        assert_eq!(c.with_service(dr).unwrap().services.len(), 2);
    }
}
