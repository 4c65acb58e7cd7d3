//! `check` tables: as written ([`CheckSpec`], one list of fields below generates the struct,
//! its raw form and its per-field code), merged (a backend's over its service's) and resolved
//! into the [`CheckCfg`] a backend runs.

use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::raw::{duration, int, positive_duration, spelled, Ctx, Field};
use super::{
    format_duration, parse_status_range, quote, ConfigError, Spell, DEFAULT_CHECK_INTERVAL,
    DEFAULT_CHECK_TIMEOUT, DEFAULT_EXPECT_STATUS, DEFAULT_FALL, DEFAULT_RISE, MAX_CHECK_INTERVAL,
    MAX_RISE_FALL, MIN_CHECK_INTERVAL,
};

/// Kind of health check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CheckType {
    /// No checking: the backend is always considered up (a backend can opt out this way).
    None,
    /// TCP connect.
    Tcp,
    /// HTTP/1.0 GET, status in the expected range.
    Http,
    /// Send a datagram; down on ICMP unreachable, or without the expected reply.
    Udp,
    /// Run a command; exit 0 = up (keepalived MISC_CHECK).
    Exec,
}

/// Command of an `exec` check.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ExecCommand {
    /// A string: run with `/bin/sh -c`.
    Shell(String),
    /// An array: program and arguments, no shell.
    Argv(Vec<String>),
}

/// The fields of a `check` table, once: `field "key": type [raw type] = reader`, and
/// `only KIND` for a field that only that kind of check takes. Generates [`CheckSpec`], its raw
/// form `RawCheck`, and the code that merges, writes and validates every field.
macro_rules! check_fields {
    ($($field:ident $key:literal: $ty:ty [$raw:ty] = $read:expr $(, only $only:ident)?;)+) => {
        /// A `check` table as written. At service level it is the default of every backend; at
        /// backend level each field given overrides the service's (a different `type` keeps
        /// only the timing fields and `port` of the service's check).
        #[derive(Clone, Debug, PartialEq, Eq, Default)]
        pub struct CheckSpec {
            $(pub $field: Option<$ty>,)+
        }

        /// A `check` table as the file spells it (also `[farm] check`).
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        pub(super) struct RawCheck {
            $(#[serde(rename = $key)] $field: Field<$raw>,)+
        }

        impl CheckSpec {
            /// Every field `over` sets replaces this one's.
            fn overlay(&mut self, over: &CheckSpec) {
                $(if over.$field.is_some() { self.$field.clone_from(&over.$field); })+
            }

            fn entries(&self) -> Vec<(&'static str, Option<String>)> {
                vec![$(($key, self.$field.as_ref().and_then(Spell::spell))),+]
            }

            /// `(key, is set, the kind it is only valid for)`.
            fn kind_only(&self) -> Vec<(&'static str, bool, CheckType)> {
                vec![$($(($key, self.$field.is_some(), CheckType::$only),)?)+]
            }
        }

        impl Ctx<'_> {
            /// Field-level validation of a `check` table (the rules of the merged table are
            /// in [`CheckSpec::resolve`]). `prefix` ends with `check.`.
            pub(super) fn check_spec(
                &self,
                prefix: &str,
                rc: &Spanned<RawCheck>,
            ) -> Result<CheckSpec, ConfigError> {
                let rc = rc.get_ref();
                Ok(CheckSpec { $($field: self.opt(prefix, $key, &rc.$field, $read)?,)+ })
            }
        }
    };
}

check_fields! {
    kind "type": CheckType [String] = spelled(CheckType::from_str);
    interval "interval": Duration [String] = duration(MIN_CHECK_INTERVAL, MAX_CHECK_INTERVAL);
    timeout "timeout": Duration [String] = positive_duration(MAX_CHECK_INTERVAL);
    rise "rise": u32 [i64] = int(1, MAX_RISE_FALL);
    fall "fall": u32 [i64] = int(1, MAX_RISE_FALL);
    port "port": u16 [i64] = int(1, u16::MAX);
    path "path": String [String] = path, only Http;
    host "host": String [String] = host, only Http;
    expect_status "expect_status": (u16, u16) [RawStatus] = status, only Http;
    payload "payload": String [String] = text, only Udp;
    expect "expect": String [String] = text, only Udp;
    command "command": ExecCommand [RawCommand] = command, only Exec;
    dynamic "dynamic": bool [bool] = flag, only Exec;
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum RawStatus {
    Code(i64),
    Range(String),
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum RawCommand {
    Shell(String),
    Argv(Vec<String>),
}

fn path(s: &str) -> Result<String, String> {
    if !s.starts_with('/') || s.contains(char::is_whitespace) {
        return Err(format!(
            "{s:?} must start with '/' and contain no whitespace"
        ));
    }
    Ok(s.to_string())
}

fn host(s: &str) -> Result<String, String> {
    if s.is_empty() || s.contains(char::is_whitespace) {
        return Err(format!("{s:?} must be non-empty without whitespace"));
    }
    Ok(s.to_string())
}

fn status(v: &RawStatus) -> Result<(u16, u16), String> {
    let (parsed, shown) = match v {
        RawStatus::Code(c) => (
            u16::try_from(*c)
                .ok()
                .and_then(|c| parse_status_range(&c.to_string())),
            c.to_string(),
        ),
        RawStatus::Range(r) => (parse_status_range(r), format!("{r:?}")),
    };
    parsed.ok_or_else(|| {
        format!(
            "invalid status {shown}, expected a status 100..=599 or a range such as \"200-399\""
        )
    })
}

fn command(v: &RawCommand) -> Result<ExecCommand, String> {
    let (c, empty) = match v {
        RawCommand::Shell(s) => (ExecCommand::Shell(s.clone()), s.trim().is_empty()),
        RawCommand::Argv(a) => (
            ExecCommand::Argv(a.clone()),
            a.first().is_none_or(|p| p.is_empty()),
        ),
    };
    if empty {
        return Err("must not be empty".into());
    }
    Ok(c)
}

fn text(s: &str) -> Result<String, String> {
    Ok(s.to_string())
}

fn flag(b: &bool) -> Result<bool, String> {
    Ok(*b)
}

impl Spell for (u16, u16) {
    fn spell(&self) -> Option<String> {
        Some(quote(&format!("{}-{}", self.0, self.1)))
    }
}

impl Spell for ExecCommand {
    fn spell(&self) -> Option<String> {
        match self {
            ExecCommand::Shell(c) => c.spell(),
            ExecCommand::Argv(a) => a.spell(),
        }
    }
}

impl Spell for CheckSpec {
    fn spell(&self) -> Option<String> {
        Some(self.to_inline_toml())
    }
}

/// What a check does.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Probe {
    Tcp,
    Http {
        path: String,
        /// `Host` header; the backend's address when unset.
        host: Option<String>,
        /// Inclusive range of statuses that mean "up".
        status: (u16, u16),
    },
    Udp {
        payload: String,
        /// When set, a reply containing it must arrive within the timeout.
        expect: Option<String>,
    },
    Exec {
        command: ExecCommand,
        /// keepalived `misc_dynamic`: exit 1 = down, 2..=255 = up with weight = code - 2.
        dynamic: bool,
    },
}

/// The check a backend actually runs: complete and validated.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CheckCfg {
    pub probe: Probe,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successes that bring a down backend up.
    pub rise: u32,
    /// Consecutive failures that take an up backend down.
    pub fall: u32,
    /// Port probed (tcp, http, udp) and passed to exec checks as `FARMLB_PORT`.
    pub port: u16,
}

impl CheckSpec {
    /// Merge a backend's `check` table over the service's.
    pub fn merged(service: Option<&CheckSpec>, backend: Option<&CheckSpec>) -> Option<CheckSpec> {
        let (base, over) = match (service, backend) {
            (s, None) => return s.cloned(),
            (None, b) => return b.cloned(),
            (Some(s), Some(b)) => (s, b),
        };
        let mut m = if over.kind.is_none() || over.kind == base.kind {
            base.clone()
        } else {
            // Another type: only the timing fields and the port carry over.
            CheckSpec {
                interval: base.interval,
                timeout: base.timeout,
                rise: base.rise,
                fall: base.fall,
                port: base.port,
                ..Default::default()
            }
        };
        m.overlay(over);
        Some(m)
    }

    /// The complete check, or `None` for `type = "none"`. Errors name the field (without
    /// prefix) and the problem.
    pub fn resolve(&self, service_port: u16) -> Result<Option<CheckCfg>, String> {
        let kind = self
            .kind
            .ok_or_else(|| "type: missing required field".to_string())?;
        let misplaced = self
            .kind_only()
            .into_iter()
            .find(|&(_, set, only)| set && only != kind);
        if let Some((key, _, only)) = misplaced {
            return Err(format!("{key}: only valid for {only} checks"));
        }
        let probe = match kind {
            CheckType::None => return Ok(None),
            CheckType::Tcp => Probe::Tcp,
            CheckType::Http => Probe::Http {
                path: self.path.clone().unwrap_or_else(|| "/".into()),
                host: self.host.clone(),
                status: self.expect_status.unwrap_or(DEFAULT_EXPECT_STATUS),
            },
            CheckType::Udp => Probe::Udp {
                payload: self.payload.clone().unwrap_or_default(),
                expect: self.expect.clone(),
            },
            CheckType::Exec => Probe::Exec {
                command: self
                    .command
                    .clone()
                    .ok_or_else(|| "command: missing required field for exec checks".to_string())?,
                dynamic: self.dynamic.unwrap_or(false),
            },
        };
        let port = match self.port {
            Some(p) => p,
            None if service_port == 0 && kind != CheckType::Exec => {
                return Err("port: required when the service port is 0 (every port)".into())
            }
            None => service_port,
        };
        let interval = self.interval.unwrap_or(DEFAULT_CHECK_INTERVAL);
        let timeout = self.timeout.unwrap_or(DEFAULT_CHECK_TIMEOUT.min(interval));
        if timeout > interval {
            return Err(format!(
                "timeout: {} is longer than the interval {}",
                format_duration(timeout),
                format_duration(interval)
            ));
        }
        Ok(Some(CheckCfg {
            probe,
            interval,
            timeout,
            rise: self.rise.unwrap_or(DEFAULT_RISE),
            fall: self.fall.unwrap_or(DEFAULT_FALL),
            port,
        }))
    }

    /// `{ type = "tcp", interval = "2s", ... }` with the fields that are set.
    pub fn to_inline_toml(&self) -> String {
        let set: Vec<String> = self
            .entries()
            .into_iter()
            .filter_map(|(key, value)| Some(format!("{key} = {}", value?)))
            .collect();
        format!("{{ {} }}", set.join(", "))
    }
}

impl CheckCfg {
    /// `tcp :80 every 2s timeout 1s rise 2 fall 3`.
    pub fn summary(&self) -> String {
        let port = self.port;
        let what = match &self.probe {
            Probe::Tcp => format!("tcp :{port}"),
            Probe::Http { path, status, .. } => {
                format!("http :{port}{path} {}-{}", status.0, status.1)
            }
            Probe::Udp {
                expect: Some(e), ..
            } => format!("udp :{port} expect {e:?}"),
            Probe::Udp { expect: None, .. } => format!("udp :{port}"),
            Probe::Exec { dynamic: true, .. } => "exec (dynamic)".to_string(),
            Probe::Exec { dynamic: false, .. } => "exec".to_string(),
        };
        format!(
            "{what} every {} timeout {} rise {} fall {}",
            format_duration(self.interval),
            format_duration(self.timeout),
            self.rise,
            self.fall
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::*;
    use crate::config::Config;

    #[test]
    fn check_defaults_are_haproxy_like() {
        let c = Config::from_toml_str(&svc(
            "check = { type = \"tcp\" }\n[[service.backend]]\naddress = \"10.0.0.2\"",
        ))
        .unwrap();
        let ch = c.services[0].backends[0].check.clone().unwrap();
        assert_eq!(ch.probe, Probe::Tcp);
        assert_eq!(ch.interval, Duration::from_secs(2));
        assert_eq!(ch.timeout, Duration::from_secs(1));
        assert_eq!((ch.rise, ch.fall), (2, 3));
        assert_eq!(ch.port, 80, "defaults to the service port");
        // The timeout defaults to at most the interval.
        let c = Config::from_toml_str(&svc(
            "check = { type = \"tcp\", interval = \"200ms\" }\n[[service.backend]]\naddress = \"10.0.0.2\"",
        ))
        .unwrap();
        let ch = c.services[0].backends[0].check.clone().unwrap();
        assert_eq!(ch.timeout, Duration::from_millis(200));
    }

    #[test]
    fn backend_check_overrides_the_service_check() {
        let c = Config::from_toml_str(&svc(
            "[service.check]\ntype = \"http\"\npath = \"/health\"\ninterval = \"1s\"\nfall = 5\n\
             [[service.backend]]\naddress = \"10.0.0.2\"\n\
             [[service.backend]]\naddress = \"10.0.0.3\"\ncheck = { port = 8080, rise = 4 }\n\
             [[service.backend]]\naddress = \"10.0.0.4\"\ncheck = { type = \"tcp\" }\n\
             [[service.backend]]\naddress = \"10.0.0.5\"\ncheck = { type = \"none\" }\n",
        ))
        .unwrap();
        let b = &c.services[0].backends;
        let http = Probe::Http {
            path: "/health".into(),
            host: None,
            status: (200, 399),
        };
        let c0 = b[0].check.clone().unwrap();
        assert_eq!(
            (c0.probe.clone(), c0.port, c0.fall, c0.rise),
            (http.clone(), 80, 5, 2)
        );
        let c1 = b[1].check.clone().unwrap();
        assert_eq!((c1.probe, c1.port, c1.fall, c1.rise), (http, 8080, 5, 4));
        // Another type keeps the timing fields but not http's path.
        let c2 = b[2].check.clone().unwrap();
        assert_eq!(
            (c2.probe, c2.interval, c2.fall),
            (Probe::Tcp, Duration::from_secs(1), 5)
        );
        assert_eq!(b[3].check, None, "type none opts out");
    }

    #[test]
    fn check_kinds() {
        let c = Config::from_toml_str(&svc(
            "[[service.backend]]\naddress = \"10.0.0.2\"\n\
             check = { type = \"udp\", port = 53, payload = \"ping\", expect = \"pong\" }\n\
             [[service.backend]]\naddress = \"10.0.0.3\"\n\
             check = { type = \"exec\", command = \"/usr/bin/check $FARMLB_BACKEND\", dynamic = true }\n\
             [[service.backend]]\naddress = \"10.0.0.4\"\n\
             check = { type = \"exec\", command = [\"/bin/check\", \"-v\"], timeout = \"5s\", interval = \"10s\" }\n\
             [[service.backend]]\naddress = \"10.0.0.5\"\n\
             check = { type = \"http\", expect_status = 204, host = \"example.org\" }\n",
        ))
        .unwrap();
        let b = &c.services[0].backends;
        assert_eq!(
            b[0].check.as_ref().unwrap().probe,
            Probe::Udp {
                payload: "ping".into(),
                expect: Some("pong".into())
            }
        );
        assert_eq!(
            b[1].check.as_ref().unwrap().probe,
            Probe::Exec {
                command: ExecCommand::Shell("/usr/bin/check $FARMLB_BACKEND".into()),
                dynamic: true
            }
        );
        assert_eq!(
            b[2].check.as_ref().unwrap().probe,
            Probe::Exec {
                command: ExecCommand::Argv(vec!["/bin/check".into(), "-v".into()]),
                dynamic: false
            }
        );
        assert_eq!(
            b[3].check.as_ref().unwrap().probe,
            Probe::Http {
                path: "/".into(),
                host: Some("example.org".into()),
                status: (204, 204)
            }
        );
    }

    #[test]
    fn check_errors_name_the_field() {
        let be = |check: &str| {
            svc(&format!(
                "[[service.backend]]\naddress = \"10.0.0.2\"\ncheck = {{ {check} }}\n"
            ))
        };
        for (check, field, why) in [
            (
                "type = \"icmp\"",
                "backend[0].check.type",
                "expected \"tcp\", \"http\"",
            ),
            (
                "port = 80",
                "backend[0].check.type",
                "missing required field",
            ),
            (
                "type = \"tcp\", interval = \"10ms\"",
                "check.interval",
                "out of range 50ms..=1h",
            ),
            (
                "type = \"tcp\", interval = \"2\"",
                "check.interval",
                "invalid duration",
            ),
            (
                "type = \"tcp\", timeout = \"3s\"",
                "check.timeout",
                "longer than the interval 2s",
            ),
            (
                "type = \"tcp\", rise = 0",
                "check.rise",
                "out of range 1..=1000",
            ),
            (
                "type = \"tcp\", fall = -1",
                "check.fall",
                "out of range 1..=1000",
            ),
            (
                "type = \"tcp\", port = 0",
                "check.port",
                "out of range 1..=65535",
            ),
            (
                "type = \"tcp\", path = \"/x\"",
                "check.path",
                "only valid for http checks",
            ),
            (
                "type = \"http\", path = \"x\"",
                "check.path",
                "must start with '/'",
            ),
            (
                "type = \"http\", expect_status = \"abc\"",
                "check.expect_status",
                "invalid status",
            ),
            (
                "type = \"http\", expect_status = 700",
                "check.expect_status",
                "invalid status",
            ),
            (
                "type = \"http\", expect_status = \"300-200\"",
                "check.expect_status",
                "invalid",
            ),
            ("type = \"exec\"", "check.command", "missing required field"),
            (
                "type = \"exec\", command = \"\"",
                "check.command",
                "must not be empty",
            ),
            (
                "type = \"exec\", command = 5",
                "command",
                "expected a string or an array",
            ),
            (
                "type = \"tcp\", dynamic = true",
                "check.dynamic",
                "only valid for exec",
            ),
            (
                "type = \"udp\", expect_status = 200",
                "check.expect_status",
                "only valid for http",
            ),
            ("type = \"tcp\", colour = 1", "colour", "unknown field"),
        ] {
            let msg = error(&be(check), field);
            assert!(msg.contains(why), "{check}: {msg}");
            assert!(
                msg.contains("service[0] \"web\": ")
                    || msg.contains("colour")
                    || msg.contains("command"),
                "{msg}"
            );
        }
        let msg = error(&svc("state = \"x\""), "state");
        assert!(msg.contains("unknown field"), "{msg}");
        let msg = error(
            &svc("[[service.backend]]\naddress = \"10.0.0.2\"\nstate = \"down\""),
            "backend[0].state",
        );
        assert!(
            msg.ends_with("invalid value \"down\", expected \"ready\", \"drain\" or \"maint\""),
            "{msg}"
        );
        // A port-wildcard service needs an explicit check port.
        let src =
            "interface = \"eth0\"\n[[service]]\nname = \"any\"\nvip = \"10.0.0.1\"\nport = 0\n\
                   check = { type = \"tcp\" }\n";
        let msg = error(src, "check.port");
        assert!(msg.contains("required when the service port is 0"), "{msg}");
        let src = src.replace("type = \"tcp\"", "type = \"tcp\", port = 22");
        Config::from_toml_str(&src).unwrap();
    }

    #[test]
    fn summaries() {
        let c = Config::from_toml_str(&svc("[[service.backend]]\naddress = \"10.0.0.2\"\n\
             check = { type = \"http\", path = \"/h\", interval = \"500ms\" }\n\
             [[service.backend]]\naddress = \"10.0.0.3\"\n\
             check = { type = \"exec\", command = \"true\", dynamic = true, rise = 1 }\n"))
        .unwrap();
        let summary = |j: usize| c.services[0].backends[j].check.as_ref().unwrap().summary();
        assert_eq!(
            summary(0),
            "http :80/h 200-399 every 500ms timeout 500ms rise 2 fall 3"
        );
        assert_eq!(
            summary(1),
            "exec (dynamic) every 2s timeout 1s rise 1 fall 3"
        );
    }
}
