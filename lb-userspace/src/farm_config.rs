//! The `[farm]` section of the configuration (see `docs/config.md`): this node's identity in
//! the farm, its peers, the membership timers, the node's own health check and user hooks.
//!
//! Parsed here from the raw TOML table and validated; `config.rs` only forwards the section
//! (with its `check` table already parsed by the code that parses a service's `check`, so the
//! node's check has exactly that syntax) and turns the (span, message) errors into its usual
//! one-line errors.

use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::config::{parse_duration, CheckSpec, CheckType, Forwarding, RawCheck, ServiceCfg};
use crate::health::Target;

/// Default UDP port of the membership protocol (SafeKit's default too).
pub const DEFAULT_MEMBERSHIP_PORT: u16 = 4800;
/// Default virtual MAC answered for farm VIPs: locally administered, unicast.
pub const DEFAULT_VIRTUAL_MAC: [u8; 6] = [0x02, 0xfa, 0x4c, 0x42, 0x00, 0x01];
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_millis(150);
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_millis(60);
pub const DEFAULT_SUSPECT_TIMEOUT: Duration = Duration::from_millis(300);
pub const DEFAULT_POWER: u32 = 1;
pub const MAX_POWER: u32 = 65535;
/// Shortest accepted shared key, in bytes.
pub const MIN_KEY_LEN: usize = 16;

/// Validated `[farm]` section.
#[derive(Clone, Debug, PartialEq)]
pub struct FarmCfg {
    /// 1..=255, unique in the farm.
    pub node_id: u32,
    /// Membership address: bound locally and used by peers to reach this node.
    pub address: SocketAddr,
    /// Other nodes' membership addresses (this node's own may be listed too; it is skipped).
    pub peers: Vec<SocketAddr>,
    /// File holding the shared secret that authenticates membership packets.
    pub key_file: PathBuf,
    /// Relative share of the farm's flows (0 = none, e.g. maintenance).
    pub power: u32,
    /// MAC answered for farm VIPs; no node ever sends from it, so switches flood it.
    pub virtual_mac: [u8; 6],
    pub probe_interval: Duration,
    pub probe_timeout: Duration,
    pub suspect_timeout: Duration,
    /// Where the daemon publishes its farm state for `farmlb status`.
    pub status_file: PathBuf,
    /// `check`: the node's check of its own service, as written; the same table (and the
    /// same engine, `health.rs`) as a service's `check`. While it fails the node withdraws
    /// (power 0).
    pub check: Option<CheckSpec>,
    /// `check_address`: the address probed (default: the first farm service's VIP, which the
    /// node holds on `lo`).
    pub check_address: Option<IpAddr>,
    pub hooks: HooksCfg,
}

/// `[farm.hooks]`: shell commands run on farm events, with the event in the environment.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct HooksCfg {
    pub on_start: Option<String>,
    pub on_stop: Option<String>,
    pub on_member_up: Option<String>,
    pub on_member_down: Option<String>,
    pub on_ownership_change: Option<String>,
    /// A hook still running after this long is killed (and logged).
    pub timeout: Duration,
}

type Field<T> = Option<Spanned<T>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFarm {
    node_id: Field<i64>,
    address: Field<String>,
    #[serde(default)]
    peers: Vec<Spanned<String>>,
    key_file: Field<String>,
    power: Field<i64>,
    virtual_mac: Field<String>,
    probe_interval: Field<String>,
    probe_timeout: Field<String>,
    suspect_timeout: Field<String>,
    status_file: Field<String>,
    check: Field<RawCheck>,
    check_address: Field<String>,
    hooks: Option<Spanned<RawHooks>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHooks {
    on_start: Field<String>,
    on_stop: Field<String>,
    on_member_up: Field<String>,
    on_member_down: Field<String>,
    on_ownership_change: Field<String>,
    timeout: Field<String>,
}

/// A validation error: where (if known) and the one-line message, already prefixed with the
/// field path (`farm.peers[1]: ...`).
pub(crate) type FarmError = (Option<Range<usize>>, String);

fn err<T>(span: Option<Range<usize>>, msg: String) -> Result<T, FarmError> {
    Err((span, msg))
}

fn int(v: &Spanned<i64>, field: &str, min: i64, max: i64) -> Result<u32, FarmError> {
    let n = *v.get_ref();
    if n < min || n > max {
        return err(
            Some(v.span()),
            format!("farm.{field}: {n} is out of range {min}..={max}"),
        );
    }
    Ok(n as u32)
}

fn duration(
    v: &Field<String>,
    field: &str,
    default: Duration,
    max: Duration,
) -> Result<Duration, FarmError> {
    let Some(v) = v else { return Ok(default) };
    match parse_duration(v.get_ref()) {
        Some(d) if !d.is_zero() && d <= max => Ok(d),
        Some(_) => err(
            Some(v.span()),
            format!(
                "farm.{field}: {:?} is out of range, expected more than 0 and at most {max:?}",
                v.get_ref()
            ),
        ),
        None => err(
            Some(v.span()),
            format!(
                "farm.{field}: invalid duration {:?}, expected an integer with a unit (ms, s, m, \
                 h), e.g. \"150ms\"",
                v.get_ref()
            ),
        ),
    }
}

/// `ip:port`, or a bare IP with the default membership port.
fn sock_addr(v: &Spanned<String>, field: &str) -> Result<SocketAddr, FarmError> {
    let s = v.get_ref();
    let parsed = s
        .parse::<SocketAddr>()
        .ok()
        .or_else(|| {
            s.parse::<IpAddr>()
                .ok()
                .map(|ip| SocketAddr::new(ip, DEFAULT_MEMBERSHIP_PORT))
        })
        .filter(|a| a.port() != 0 && !a.ip().is_unspecified() && !a.ip().is_multicast());
    match parsed {
        Some(a) => Ok(a),
        None => err(
            Some(v.span()),
            format!(
                "farm.{field}: invalid address {s:?}, expected a unicast \"ip:port\" or \"ip\" \
                 (port {DEFAULT_MEMBERSHIP_PORT})"
            ),
        ),
    }
}

fn command(v: &Field<String>, field: &str) -> Result<Option<String>, FarmError> {
    match v {
        None => Ok(None),
        Some(c) if c.get_ref().trim().is_empty() => {
            err(Some(c.span()), format!("farm.hooks.{field}: empty command"))
        }
        Some(c) => Ok(Some(c.get_ref().clone())),
    }
}

pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    crate::neigh::parse_mac(s).ok()
}

impl RawFarm {
    /// The `check` table, for `config.rs` to parse like a service's.
    pub(crate) fn check_table(&self) -> Option<&Spanned<RawCheck>> {
        self.check.as_ref()
    }

    /// `check` is the node's check table already parsed (with its span); `services` are the
    /// validated services (the check's defaults come from the first farm service).
    pub(crate) fn validate(
        &self,
        section: Range<usize>,
        check: Option<(CheckSpec, Range<usize>)>,
        services: &[ServiceCfg],
    ) -> Result<FarmCfg, FarmError> {
        let node_id = match &self.node_id {
            None => return err(Some(section), "farm.node_id: missing required field".into()),
            Some(v) => int(v, "node_id", 1, lb_common::MAX_MEMBERS as i64)?,
        };
        let address = match &self.address {
            None => return err(Some(section), "farm.address: missing required field".into()),
            Some(v) => sock_addr(v, "address")?,
        };
        let mut peers = Vec::with_capacity(self.peers.len());
        for (i, p) in self.peers.iter().enumerate() {
            let a = sock_addr(p, &format!("peers[{i}]"))?;
            if a.is_ipv4() != address.is_ipv4() {
                return err(
                    Some(p.span()),
                    format!("farm.peers[{i}]: {a} is not in the address family of farm.address"),
                );
            }
            if peers.contains(&a) {
                return err(
                    Some(p.span()),
                    format!("farm.peers[{i}]: duplicate peer {a}"),
                );
            }
            if a != address {
                peers.push(a);
            }
        }
        let key_file = match &self.key_file {
            None => {
                return err(
                    Some(section),
                    "farm.key_file: missing required field".into(),
                )
            }
            Some(v) if v.get_ref().is_empty() => {
                return err(Some(v.span()), "farm.key_file: must not be empty".into())
            }
            Some(v) => PathBuf::from(v.get_ref()),
        };
        let power = match &self.power {
            None => DEFAULT_POWER,
            Some(v) => int(v, "power", 0, MAX_POWER as i64)?,
        };
        let virtual_mac = match &self.virtual_mac {
            None => DEFAULT_VIRTUAL_MAC,
            Some(v) => match parse_mac(v.get_ref()) {
                Some(m) if m[0] & 1 == 0 && m != [0; 6] => m,
                _ => {
                    return err(
                        Some(v.span()),
                        format!(
                            "farm.virtual_mac: invalid MAC {:?}, expected a unicast address like \
                             \"02:fa:4c:42:00:01\"",
                            v.get_ref()
                        ),
                    )
                }
            },
        };
        let max_timer = Duration::from_secs(60);
        let probe_interval = duration(
            &self.probe_interval,
            "probe_interval",
            DEFAULT_PROBE_INTERVAL,
            max_timer,
        )?;
        let probe_timeout = duration(
            &self.probe_timeout,
            "probe_timeout",
            DEFAULT_PROBE_TIMEOUT,
            max_timer,
        )?;
        if probe_timeout >= probe_interval {
            let span = self.probe_timeout.as_ref().map(|v| v.span());
            return err(
                span.or(Some(section.clone())),
                format!(
                    "farm.probe_timeout: {probe_timeout:?} must be shorter than probe_interval \
                     ({probe_interval:?})"
                ),
            );
        }
        let suspect_timeout = duration(
            &self.suspect_timeout,
            "suspect_timeout",
            DEFAULT_SUSPECT_TIMEOUT,
            max_timer,
        )?;
        let status_file = match &self.status_file {
            None => PathBuf::from(format!("/run/farmlb/farm-{node_id}.json")),
            Some(v) => PathBuf::from(v.get_ref()),
        };
        let check_address = match &self.check_address {
            None => None,
            Some(a) => match a.get_ref().parse::<IpAddr>() {
                Ok(ip) if !ip.is_unspecified() && !ip.is_multicast() => Some(ip),
                _ => {
                    return err(
                        Some(a.span()),
                        format!(
                            "farm.check_address: invalid address {:?}, expected a unicast IP \
                             address",
                            a.get_ref()
                        ),
                    )
                }
            },
        };
        let hooks = match &self.hooks {
            None => HooksCfg {
                timeout: Duration::from_secs(30),
                ..Default::default()
            },
            Some(h) => {
                let h = h.get_ref();
                HooksCfg {
                    on_start: command(&h.on_start, "on_start")?,
                    on_stop: command(&h.on_stop, "on_stop")?,
                    on_member_up: command(&h.on_member_up, "on_member_up")?,
                    on_member_down: command(&h.on_member_down, "on_member_down")?,
                    on_ownership_change: command(&h.on_ownership_change, "on_ownership_change")?,
                    timeout: duration(
                        &h.timeout,
                        "hooks.timeout",
                        Duration::from_secs(30),
                        Duration::from_secs(3600),
                    )?,
                }
            }
        };
        let mut farm = FarmCfg {
            node_id,
            address,
            peers,
            key_file,
            power,
            virtual_mac,
            probe_interval,
            probe_timeout,
            suspect_timeout,
            status_file,
            check: None,
            check_address,
            hooks,
        };
        if let Some((spec, span)) = check {
            farm.check = Some(spec);
            // Resolve it once now, so a check that cannot run is a config error.
            if let Err(e) = farm.node_check(services) {
                return err(Some(span), e);
            }
        }
        Ok(farm)
    }
}

fn q(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

impl FarmCfg {
    /// What the node's check stands for: (service name, VIP, default port) of the first farm
    /// service; without one, ("farm", this node's membership address, no port).
    pub fn check_subject(&self, services: &[ServiceCfg]) -> (String, IpAddr, u16) {
        match services.iter().find(|s| s.forwarding == Forwarding::Farm) {
            Some(s) => (s.name.clone(), s.vip, s.port),
            None => ("farm".into(), self.address.ip(), 0),
        }
    }

    /// The node's own check as the health engine runs it: probes go to `check_address`
    /// (default the subject's VIP) and the check's `port` (default the subject's port).
    /// `Ok(None)` without a check (or with `type = "none"`); the error is one line naming
    /// the field.
    pub fn node_check(&self, services: &[ServiceCfg]) -> Result<Option<Target>, String> {
        let Some(spec) = &self.check else {
            return Ok(None);
        };
        let (service, vip, port) = self.check_subject(services);
        let no_farm_service = !services.iter().any(|s| s.forwarding == Forwarding::Farm);
        if no_farm_service
            && spec.port.is_none()
            && !matches!(spec.kind, Some(CheckType::Exec | CheckType::None))
        {
            return Err(
                "farm.check.port: required when no service has forwarding = \"farm\" (the \
                 check has no service port to default to)"
                    .into(),
            );
        }
        let check = spec.resolve(port).map_err(|e| format!("farm.check.{e}"))?;
        Ok(check.map(|check| Target {
            service,
            vip,
            addr: self.check_address.unwrap_or(vip),
            check,
        }))
    }

    /// The `[farm]` section as TOML that parses back to an equal `FarmCfg` (used by
    /// `Config::to_toml`).
    pub fn to_toml(&self) -> String {
        use crate::config::format_duration as d;
        use std::fmt::Write as _;
        let m = self.virtual_mac;
        let mut s = String::from("\n[farm]\n");
        let _ = writeln!(s, "node_id = {}", self.node_id);
        let _ = writeln!(s, "address = {}", q(&self.address.to_string()));
        let peers: Vec<String> = self.peers.iter().map(|p| q(&p.to_string())).collect();
        let _ = writeln!(s, "peers = [{}]", peers.join(", "));
        let _ = writeln!(s, "key_file = {}", q(&self.key_file.to_string_lossy()));
        let _ = writeln!(s, "power = {}", self.power);
        let _ = writeln!(
            s,
            "virtual_mac = \"{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}\"",
            m[0], m[1], m[2], m[3], m[4], m[5]
        );
        let _ = writeln!(s, "probe_interval = {}", q(&d(self.probe_interval)));
        let _ = writeln!(s, "probe_timeout = {}", q(&d(self.probe_timeout)));
        let _ = writeln!(s, "suspect_timeout = {}", q(&d(self.suspect_timeout)));
        let _ = writeln!(
            s,
            "status_file = {}",
            q(&self.status_file.to_string_lossy())
        );
        if let Some(c) = &self.check {
            let _ = writeln!(s, "check = {}", c.to_inline_toml());
        }
        if let Some(a) = self.check_address {
            let _ = writeln!(s, "check_address = {}", q(&a.to_string()));
        }
        s += "\n[farm.hooks]\n";
        let h = &self.hooks;
        for (k, v) in [
            ("on_start", &h.on_start),
            ("on_stop", &h.on_stop),
            ("on_member_up", &h.on_member_up),
            ("on_member_down", &h.on_member_down),
            ("on_ownership_change", &h.on_ownership_change),
        ] {
            if let Some(v) = v {
                let _ = writeln!(s, "{k} = {}", q(v));
            }
        }
        let _ = writeln!(s, "timeout = {}", q(&d(h.timeout)));
        s
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, Forwarding};

    const BASE: &str = "interface = \"eth0\"\n\n[farm]\nnode_id = 2\naddress = \"10.0.0.2\"\n\
                        peers = [\"10.0.0.1:4800\", \"10.0.0.2\", \"10.0.0.3:4801\"]\n\
                        key_file = \"/etc/farmlb/farm.key\"\n";

    #[test]
    fn farm_section_parses_with_defaults() {
        let src = format!(
            "{BASE}\n[[service]]\nname = \"web\"\nvip = \"10.0.100.1\"\nport = 80\n\
             forwarding = \"farm\"\n"
        );
        let c = Config::from_toml_str(&src).unwrap();
        let f = c.farm.as_ref().unwrap();
        assert_eq!(f.node_id, 2);
        assert_eq!(f.address, "10.0.0.2:4800".parse().unwrap());
        // Own address dropped from the peers.
        assert_eq!(f.peers.len(), 2);
        assert_eq!(f.power, 1);
        assert_eq!(f.virtual_mac, super::DEFAULT_VIRTUAL_MAC);
        assert_eq!(f.probe_interval, super::DEFAULT_PROBE_INTERVAL);
        assert!(f.check.is_none());
        assert_eq!(f.node_check(&c.services), Ok(None));
        assert_eq!(c.services[0].forwarding, Forwarding::Farm);
    }

    #[test]
    fn farm_section_round_trips_through_to_toml() {
        let src = format!(
            "{BASE}power = 3\ncheck_address = \"127.0.0.1\"\n[farm.check]\ntype = \"http\"\n\
             interval = \"250ms\"\npath = \"/health\"\n[farm.hooks]\n\
             on_member_down = \"echo \\\"$FARMLB_MEMBER\\\" >> /tmp/x\"\n\
             [[service]]\nname = \"web\"\nvip = \"10.0.100.1\"\nport = 80\n\
             forwarding = \"farm\"\n"
        );
        let c = Config::from_toml_str(&src).unwrap();
        let back = Config::from_toml_str(&c.to_toml()).unwrap();
        assert_eq!(back.farm, c.farm);
        assert_eq!(back, c);
    }

    #[test]
    fn farm_errors_name_the_field() {
        let bad = [
            ("node_id = 2", "node_id = 0", "farm.node_id"),
            ("address = \"10.0.0.2\"", "address = \"x\"", "farm.address"),
            ("key_file = \"/etc/farmlb/farm.key\"\n", "", "farm.key_file"),
        ];
        for (from, to, field) in bad {
            let src = BASE.replace(from, to);
            let e = Config::from_toml_str(&src).unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
            assert!(!e.contains('\n'));
        }
        let e = Config::from_toml_str(&format!("{BASE}probe_timeout = \"1s\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("farm.probe_timeout"), "{e}");
        let e = Config::from_toml_str(&format!("{BASE}virtual_mac = \"01:00:00:00:00:01\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("farm.virtual_mac"), "{e}");
    }

    #[test]
    fn farm_services_need_a_farm_section_and_no_backends() {
        let svc = "\n[[service]]\nname = \"web\"\nvip = \"10.0.100.1\"\nport = 80\n\
                   forwarding = \"farm\"\n";
        let e = Config::from_toml_str(&format!("interface = \"eth0\"\n{svc}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("[farm]"), "{e}");
        let e = Config::from_toml_str(&format!(
            "{BASE}{svc}[[service.backend]]\naddress = \"10.0.0.9\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("backend"), "{e}");
    }

    const WEB: &str = "\n[[service]]\nname = \"web\"\nvip = \"10.0.100.1\"\nport = 80\n\
                       forwarding = \"farm\"\n[[service]]\nname = \"dns\"\n\
                       vip = \"10.0.100.2\"\nport = 53\nprotocol = \"udp\"\n\
                       forwarding = \"farm\"\n";

    #[test]
    fn node_check_is_a_service_check_of_the_first_farm_service() {
        use crate::config::{Probe, DEFAULT_RISE};
        use std::time::Duration;
        // The same syntax and defaults as a service's `check`, inline or as a table.
        for check in [
            "check = { type = \"tcp\", interval = \"500ms\", fall = 2 }\n",
            "[farm.check]\ntype = \"tcp\"\ninterval = \"500ms\"\nfall = 2\n",
        ] {
            let c = Config::from_toml_str(&format!("{BASE}{check}{WEB}")).unwrap();
            let t = c
                .farm
                .as_ref()
                .unwrap()
                .node_check(&c.services)
                .unwrap()
                .unwrap();
            assert_eq!(t.service, "web");
            assert_eq!(t.addr, "10.0.100.1".parse::<std::net::IpAddr>().unwrap());
            assert_eq!(t.check.port, 80, "the first farm service's port");
            assert_eq!(t.check.probe, Probe::Tcp);
            assert_eq!(t.check.interval, Duration::from_millis(500));
            assert_eq!(
                t.check.timeout,
                Duration::from_millis(500),
                "capped at the interval"
            );
            assert_eq!((t.check.rise, t.check.fall), (DEFAULT_RISE, 2));
        }
        let c = Config::from_toml_str(&format!(
            "{BASE}check_address = \"127.0.0.1\"\n\
             check = {{ type = \"udp\", port = 5353, payload = \"ping\", expect = \"pong\" }}\n{WEB}"
        ))
        .unwrap();
        let t = c
            .farm
            .as_ref()
            .unwrap()
            .node_check(&c.services)
            .unwrap()
            .unwrap();
        assert_eq!(t.addr, "127.0.0.1".parse::<std::net::IpAddr>().unwrap());
        assert_eq!(t.vip, "10.0.100.1".parse::<std::net::IpAddr>().unwrap());
        assert_eq!(t.check.port, 5353);
        // type = "none": no check.
        let c =
            Config::from_toml_str(&format!("{BASE}check = {{ type = \"none\" }}\n{WEB}")).unwrap();
        assert_eq!(c.farm.as_ref().unwrap().node_check(&c.services), Ok(None));
        // Director failover (no farm service): exec needs no port, the others need one.
        let c = Config::from_toml_str(&format!(
            "{BASE}check = {{ type = \"exec\", command = \"true\", dynamic = true }}\n"
        ))
        .unwrap();
        let t = c
            .farm
            .as_ref()
            .unwrap()
            .node_check(&c.services)
            .unwrap()
            .unwrap();
        assert_eq!(t.addr, "10.0.0.2".parse::<std::net::IpAddr>().unwrap());
    }

    #[test]
    fn node_check_errors_name_the_field() {
        for (extra, field, why) in [
            (
                "check = { type = \"icmp\" }\n",
                "farm.check.type",
                "invalid value",
            ),
            (
                "check = { interval = \"1s\" }\n",
                "farm.check.type",
                "missing",
            ),
            (
                "check = { type = \"tcp\", interval = \"10ms\" }\n",
                "farm.check.interval",
                "out of range",
            ),
            (
                "check = { type = \"tcp\", path = \"/x\" }\n",
                "farm.check.path",
                "only valid for http",
            ),
            (
                "check = { type = \"tcp\", interval = \"1s\", timeout = \"2s\" }\n",
                "farm.check.timeout",
                "longer than the interval",
            ),
            (
                "check = { type = \"tcp\", shape = 1 }\n",
                "shape",
                "unknown field",
            ),
            (
                "check_address = \"224.0.0.1\"\n",
                "farm.check_address",
                "unicast",
            ),
            (
                "[farm.health]\ninterval = \"1s\"\n",
                "health",
                "unknown field",
            ),
        ] {
            let e = Config::from_toml_str(&format!("{BASE}{extra}{WEB}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(field) && e.contains(why), "{extra}: {e}");
        }
        // No farm service to take the port from.
        let e = Config::from_toml_str(&format!("{BASE}check = {{ type = \"tcp\" }}\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("farm.check.port: required"), "{e}");
    }
}
