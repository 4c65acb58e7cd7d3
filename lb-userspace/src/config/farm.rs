//! The `[farm]` section of the configuration (see `docs/config.md`): this node's identity in
//! the farm, its peers, the membership timers, the node's own health check and user hooks.
//! Its `check` table is validated by the code that validates a service's `check`, so the
//! node's check has exactly that syntax.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::check::RawCheck;
use super::raw::{int, positive_duration, Ctx, Field};
use super::{parse_mac, put, quote, CheckCfg, CheckSpec, CheckType, ConfigError, Entries};
use super::{Forwarding, ServiceCfg, Spell};

/// Default UDP port of the membership protocol (SafeKit's default too).
pub const DEFAULT_MEMBERSHIP_PORT: u16 = 4800;
/// Default virtual MAC answered for farm VIPs: locally administered, unicast.
pub const DEFAULT_VIRTUAL_MAC: [u8; 6] = [0x02, 0xfa, 0x4c, 0x42, 0x00, 0x01];
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_millis(150);
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_millis(60);
pub const DEFAULT_SUSPECT_TIMEOUT: Duration = Duration::from_millis(300);
/// Longest accepted membership timer.
const MAX_TIMER: Duration = Duration::from_secs(60);
pub const DEFAULT_POWER: u32 = 1;
pub const MAX_POWER: u32 = 65535;
/// Shortest accepted shared key, in bytes.
pub const MIN_KEY_LEN: usize = 16;
/// A hook still running after this long is killed.
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_HOOK_TIMEOUT: Duration = Duration::from_secs(3600);

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
    /// Where the daemon also writes the farm part of `farmlb status`, as JSON, for scripts.
    pub status_file: PathBuf,
    /// `check`: the node's check of its own service, as written; the same table (and the
    /// same engine, `health/`) as a service's `check`. While it fails the node withdraws
    /// (power 0).
    pub check: Option<CheckSpec>,
    /// `check_address`: the address probed (default: the first farm service's VIP, which the
    /// node holds on `lo`).
    pub check_address: Option<IpAddr>,
    pub hooks: HooksCfg,
}

/// `[farm.hooks]`: shell commands run on farm events, with the event in the environment.
#[derive(Clone, Debug, PartialEq)]
pub struct HooksCfg {
    pub on_start: Option<String>,
    pub on_stop: Option<String>,
    pub on_member_up: Option<String>,
    pub on_member_down: Option<String>,
    pub on_ownership_change: Option<String>,
    /// A hook still running after this long is killed (and logged).
    pub timeout: Duration,
}

/// The node's own check as the health engine runs it (see [`FarmCfg::node_check`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeCheckCfg {
    /// The service it stands for: the first farm service, else `"farm"`.
    pub service: String,
    /// That service's VIP, else this node's membership address.
    pub vip: IpAddr,
    /// The address probed: `check_address`, else `vip`.
    pub addr: IpAddr,
    pub check: CheckCfg,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFarm {
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

const P: &str = "farm.";

impl RawFarm {
    /// The `check` table, for the file's error positions.
    pub(super) fn check_table(&self) -> Option<&Spanned<RawCheck>> {
        self.check.as_ref()
    }
}

impl Ctx<'_> {
    /// The section's own fields. Its node check is resolved against the services by
    /// `rules::check_services`.
    pub(super) fn farm(&self, f: &Spanned<RawFarm>) -> Result<FarmCfg, ConfigError> {
        let section = Some(f.span());
        let f = f.get_ref();
        let node_id = int(1, lb_common::MAX_MEMBERS);
        let node_id = self.req(P, "node_id", &f.node_id, section.clone(), node_id)?;
        let address = self.req(P, "address", &f.address, section.clone(), sock_addr)?;
        let mut peers = Vec::with_capacity(f.peers.len());
        for (i, p) in f.peers.iter().enumerate() {
            let a = self.one(P, &format!("peers[{i}]"), p, |s: &str| {
                let a = sock_addr(s)?;
                if a.is_ipv4() != address.is_ipv4() {
                    return Err(format!("{a} is not in the address family of farm.address"));
                }
                if peers.contains(&a) {
                    return Err(format!("duplicate peer {a}"));
                }
                Ok(a)
            })?;
            // This node's own address may be listed too; it is not a peer.
            if a != address {
                peers.push(a);
            }
        }
        let key_file = self.req(P, "key_file", &f.key_file, section.clone(), |s: &str| {
            if s.is_empty() {
                return Err("must not be empty".to_string());
            }
            Ok(PathBuf::from(s))
        })?;
        let power = self.opt(P, "power", &f.power, int(0, MAX_POWER))?;
        let virtual_mac = self.opt(P, "virtual_mac", &f.virtual_mac, virtual_mac)?;
        let timer = positive_duration(MAX_TIMER);
        let probe_interval = self.opt(P, "probe_interval", &f.probe_interval, &timer)?;
        let probe_interval = probe_interval.unwrap_or(DEFAULT_PROBE_INTERVAL);
        let probe_timeout = self.opt(P, "probe_timeout", &f.probe_timeout, &timer)?;
        let probe_timeout = probe_timeout.unwrap_or(DEFAULT_PROBE_TIMEOUT);
        if probe_timeout >= probe_interval {
            let span = f.probe_timeout.as_ref().map(Spanned::span);
            return Err(self.err(
                span.or(section),
                format!(
                    "farm.probe_timeout: {probe_timeout:?} must be shorter than probe_interval \
                     ({probe_interval:?})"
                ),
            ));
        }
        let suspect_timeout = self.opt(P, "suspect_timeout", &f.suspect_timeout, &timer)?;
        let status_file = self.opt(P, "status_file", &f.status_file, |s: &str| {
            Ok(PathBuf::from(s))
        })?;
        let check = (f.check.as_ref())
            .map(|rc| self.check_spec("farm.check.", rc))
            .transpose()?;
        let check_address = self.opt(P, "check_address", &f.check_address, check_address)?;
        let hooks = match &f.hooks {
            None => HooksCfg::default(),
            Some(h) => self.hooks(h.get_ref())?,
        };
        Ok(FarmCfg {
            node_id,
            address,
            peers,
            key_file,
            power: power.unwrap_or(DEFAULT_POWER),
            virtual_mac: virtual_mac.unwrap_or(DEFAULT_VIRTUAL_MAC),
            probe_interval,
            probe_timeout,
            suspect_timeout: suspect_timeout.unwrap_or(DEFAULT_SUSPECT_TIMEOUT),
            status_file: status_file
                .unwrap_or_else(|| PathBuf::from(format!("/run/farmlb/farm-{node_id}.json"))),
            check,
            check_address,
            hooks,
        })
    }

    fn hooks(&self, h: &RawHooks) -> Result<HooksCfg, ConfigError> {
        const P: &str = "farm.hooks.";
        let timeout = positive_duration(MAX_HOOK_TIMEOUT);
        Ok(HooksCfg {
            on_start: self.opt(P, "on_start", &h.on_start, command)?,
            on_stop: self.opt(P, "on_stop", &h.on_stop, command)?,
            on_member_up: self.opt(P, "on_member_up", &h.on_member_up, command)?,
            on_member_down: self.opt(P, "on_member_down", &h.on_member_down, command)?,
            on_ownership_change: self.opt(
                P,
                "on_ownership_change",
                &h.on_ownership_change,
                command,
            )?,
            timeout: self
                .opt(P, "timeout", &h.timeout, timeout)?
                .unwrap_or(DEFAULT_HOOK_TIMEOUT),
        })
    }
}

/// `ip:port`, or a bare IP with the default membership port.
fn sock_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .ok()
        .or_else(|| {
            s.parse::<IpAddr>()
                .ok()
                .map(|ip| SocketAddr::new(ip, DEFAULT_MEMBERSHIP_PORT))
        })
        .filter(|a| a.port() != 0 && !a.ip().is_unspecified() && !a.ip().is_multicast())
        .ok_or_else(|| {
            format!(
                "invalid address {s:?}, expected a unicast \"ip:port\" or \"ip\" (port \
                 {DEFAULT_MEMBERSHIP_PORT})"
            )
        })
}

fn virtual_mac(s: &str) -> Result<[u8; 6], String> {
    parse_mac(s)
        .ok()
        .filter(|m| m[0] & 1 == 0 && *m != [0; 6])
        .ok_or_else(|| {
            format!("invalid MAC {s:?}, expected a unicast address like \"02:fa:4c:42:00:01\"")
        })
}

fn check_address(s: &str) -> Result<IpAddr, String> {
    s.parse::<IpAddr>()
        .ok()
        .filter(|ip| !ip.is_unspecified() && !ip.is_multicast())
        .ok_or_else(|| format!("invalid address {s:?}, expected a unicast IP address"))
}

fn command(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        return Err("empty command".into());
    }
    Ok(s.to_string())
}

impl Default for HooksCfg {
    fn default() -> Self {
        HooksCfg {
            on_start: None,
            on_stop: None,
            on_member_up: None,
            on_member_down: None,
            on_ownership_change: None,
            timeout: DEFAULT_HOOK_TIMEOUT,
        }
    }
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
    pub fn node_check(&self, services: &[ServiceCfg]) -> Result<Option<NodeCheckCfg>, String> {
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
        Ok(check.map(|check| NodeCheckCfg {
            service,
            vip,
            addr: self.check_address.unwrap_or(vip),
            check,
        }))
    }

    /// The section's fields (without `hooks`), in file order.
    pub(super) fn entries(&self) -> Entries {
        entries!(self => FarmCfg {
            node_id, address, peers, key_file, power, virtual_mac, probe_interval,
            probe_timeout, suspect_timeout, status_file, check, check_address
        } skip { hooks })
    }

    /// The `[farm]` section as TOML that parses back to an equal `FarmCfg` (used by
    /// `Config::to_toml`).
    pub fn to_toml(&self) -> String {
        let mut s = String::from("\n[farm]\n");
        put(&mut s, "", &self.entries());
        s += "\n[farm.hooks]\n";
        put(&mut s, "", &self.hooks.entries());
        s
    }
}

impl HooksCfg {
    pub(super) fn entries(&self) -> Entries {
        entries!(self => HooksCfg {
            on_start, on_stop, on_member_up, on_member_down, on_ownership_change, timeout
        } skip {})
    }
}

/// A MAC address, written `02:fa:4c:42:00:01`.
impl Spell for [u8; 6] {
    fn spell(&self) -> Option<String> {
        let hex: Vec<String> = self.iter().map(|b| format!("{b:02x}")).collect();
        Some(quote(&hex.join(":")))
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

    /// The node check of a config that has one.
    fn node_check(c: &Config) -> super::NodeCheckCfg {
        let farm = c.farm.as_ref().unwrap();
        farm.node_check(&c.services).unwrap().unwrap()
    }

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
            let t = node_check(&c);
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
        let t = node_check(&c);
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
        let t = node_check(&c);
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
