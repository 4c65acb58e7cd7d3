//! The TOML configuration file (`examples/farmlb.toml`, `docs/config.md`).
//!
//! Parsing goes through "raw" structs whose fields keep their source spans, then every field
//! is checked and converted, so each error is one line naming the file position and the
//! field, e.g. `farmlb.toml line 14, column 13: service[1] "web": backend[0].address: invalid
//! IP address "10.0.0.x"` (on one line).
//!
//! | file | holds |
//! |---|---|
//! | `mod.rs` | the validated types, constants, spellings, loading, [`Config::to_toml`] |
//! | `raw.rs` | the file as written, and the field validators that check it |
//! | `check.rs` | `check` tables: as written, merged, resolved |
//! | `farm.rs` | the `[farm]` section |
//! | `host.rs` | what the file asks of this host (interface, programs, the farm key file) |
//! | `rules.rs` | the rules between backends and services, shared by the file and the API |
//! | `edit.rs` | the runtime API's typed edits of a running configuration |
//! | `reload.rs` | the fields only a restart can change |
//!
//! A leaf of the crate: of the crate it uses only `maglev::is_prime`.

use std::fmt;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use lb_common::HashMode;

/// A value as TOML text in the file's spelling; `None` when unset (then it is not written).
trait Spell {
    fn spell(&self) -> Option<String>;
}

/// `vec![(key, value.spell())]` of the fields of `$value`, a `$ty` destructured exhaustively
/// (a new field does not compile until it is listed here or after `skip`). The key is the
/// field's name unless `= "key"` follows it.
macro_rules! entries {
    (
        $value:expr => $ty:ident { $($field:ident $(= $key:literal)?),+ } skip { $($skip:ident),* }
    ) => {{
        let $ty { $($field,)+ $($skip: _,)* } = $value;
        vec![$((entries!(@key $field $($key)?), $field.spell())),+]
    }};
    (@key $field:ident) => { stringify!($field) };
    (@key $field:ident $key:literal) => { $key };
}

mod announce;
mod check;
mod edit;
mod farm;
pub mod host;
mod raw;
mod reload;
mod rules;

pub use announce::{AnnounceCfg, DEFAULT_SYNC_RATE};
pub use check::{CheckCfg, CheckSpec, CheckType, ExecCommand, Probe};
pub use edit::EditError;
pub use farm::{
    FarmCfg, HooksCfg, NodeCheckCfg, DEFAULT_HOOK_TIMEOUT, DEFAULT_MEMBERSHIP_PORT, DEFAULT_POWER,
    DEFAULT_PROBE_INTERVAL, DEFAULT_PROBE_TIMEOUT, DEFAULT_SUSPECT_TIMEOUT, DEFAULT_VIRTUAL_MAC,
    MAX_POWER, MIN_KEY_LEN,
};
pub use reload::{restart_needed, RestartNeeded};

pub const DEFAULT_UDP_TIMEOUT: Duration = Duration::from_nanos(lb_common::DEFAULT_UDP_TIMEOUT_NS);
/// Longest accepted `udp_timeout`.
pub const MAX_UDP_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
pub const DEFAULT_CONNTRACK_SIZE: u32 = lb_common::CT_MAX_ENTRIES;
pub const MIN_CONNTRACK_SIZE: u32 = 1024;
/// 64 Mi entries: several GiB of kernel memory already.
pub const MAX_CONNTRACK_SIZE: u32 = 1 << 26;
pub const DEFAULT_TABLE_SIZE: u32 = lb_common::DEFAULT_TABLE_SIZE;
pub const MIN_TABLE_SIZE: u32 = 7;
/// Largest prime below 2^20.
pub const MAX_TABLE_SIZE: u32 = 1_048_573;
pub const MAX_WEIGHT: u32 = 65535;
pub const DEFAULT_WEIGHT: u32 = 1;
pub const MAX_NAME_LEN: usize = 64;
/// Linux `IFNAMSIZ - 1`.
pub const MAX_IFNAME_LEN: usize = 15;
/// Where the daemon serves its runtime API (HTTP+JSON over a unix socket).
pub const DEFAULT_API_SOCKET: &str = "/run/farmlb/farmlb.sock";
/// Default `pin_path` is this directory + `/<interface>`.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/farmlb";
/// Default `state_file` is this directory + `/<interface>.state.json`.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/farmlb";
/// Longest unix socket path (`sun_path` is 108 bytes with the terminating NUL).
pub const MAX_SOCKET_PATH: usize = 107;
/// Where Prometheus scrapes `/metrics`; `metrics_address = "off"` disables it.
pub const DEFAULT_METRICS_ADDRESS: &str = "127.0.0.1:9740";
/// Health check defaults, HAProxy-like (`inter 2s rise 2 fall 3`, 1 s check timeout).
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(2);
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(1);
pub const DEFAULT_RISE: u32 = 2;
pub const DEFAULT_FALL: u32 = 3;
pub const MIN_CHECK_INTERVAL: Duration = Duration::from_millis(50);
pub const MAX_CHECK_INTERVAL: Duration = Duration::from_secs(3600);
pub const MAX_RISE_FALL: u32 = 1000;
/// HTTP statuses that mean "up" unless `expect_status` says otherwise (HAProxy: 2xx and 3xx).
pub const DEFAULT_EXPECT_STATUS: (u16, u16) = (200, 399);

// --- public, validated configuration ---------------------------------------------------

/// How the XDP program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum XdpModeCfg {
    /// Native (driver) mode when the driver supports it, else generic.
    #[default]
    Auto,
    /// Driver mode only; attaching fails if the driver lacks XDP support.
    Native,
    /// Generic (skb) mode: works everywhere, slower.
    Generic,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl Protocol {
    /// IP protocol number (`lb_common::PROTO_TCP` / `PROTO_UDP`).
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::PROTO_TCP,
            Protocol::Udp => lb_common::PROTO_UDP,
        }
    }
}

/// Forwarding method.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Forwarding {
    /// Direct routing: rewrite the destination MAC, backends hold the VIP themselves.
    #[default]
    Dr,
    /// Farm mode (needs `[farm]`): every node holds the VIP; the node that owns a flow
    /// delivers it locally.
    Farm,
    /// IP-in-IP to backends anywhere routable (IPv4 in IPv4, IPv6 in IPv6, or across
    /// families); the backends run `farmlb decap`.
    Ipip,
    /// The inner packet in UDP to `gue_port` (GUE variant 1); the backends run `farmlb decap`.
    Gue,
}

impl Forwarding {
    /// `ServiceInfo::fwd_mode` byte.
    pub const fn mode(self) -> u8 {
        match self {
            Forwarding::Dr => lb_common::FWD_DR,
            Forwarding::Farm => lb_common::FWD_FARM,
            Forwarding::Ipip => lb_common::FWD_IPIP,
            Forwarding::Gue => lb_common::FWD_GUE,
        }
    }

    /// Encapsulating modes: backends are reached through the routing table, in either
    /// address family.
    pub const fn is_tunnel(self) -> bool {
        matches!(self, Forwarding::Ipip | Forwarding::Gue)
    }
}

/// `tunnel_source`: a prefix the outer source addresses of tunnelled packets come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    /// The host bits (of the address's last 32) that vary per flow.
    pub fn host_mask(&self) -> u32 {
        let host = if self.addr.is_ipv4() { 32 } else { 128 } - self.len as u32;
        if host >= 32 {
            u32::MAX
        } else {
            (1u32 << host) - 1
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, l) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a prefix (expected ADDRESS/LENGTH)"))?;
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("{a:?} is not an IP address"))?;
        let (min, max) = if addr.is_ipv4() { (0, 32) } else { (96, 128) };
        let len: u8 = l
            .parse()
            .ok()
            .filter(|n| (min..=max).contains(n))
            .ok_or_else(|| {
                format!(
                    "prefix length {l:?} out of range {min}..={max} (only the address's last 32 \
                     bits vary per flow)"
                )
            })?;
        let c = Cidr { addr, len };
        let low = match addr {
            IpAddr::V4(v) => u32::from(v),
            IpAddr::V6(v) => u128::from(v) as u32,
        };
        if low & c.host_mask() != 0 && c.host_mask() != u32::MAX {
            return Err(format!("{s:?} has host bits set"));
        }
        Ok(c)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub interface: String,
    pub xdp_mode: XdpModeCfg,
    /// Idle timeout of UDP conntrack entries.
    pub udp_timeout: Duration,
    /// Maximum conntrack entries.
    pub conntrack_size: u32,
    /// Flood guard: new conntrack entries per second and CPU above which new flows are
    /// forwarded without an entry; 0 = off.
    pub flood_guard_rate: u32,
    /// Unix socket of the runtime API.
    pub api_socket: PathBuf,
    /// TCP address of the Prometheus endpoint; `None` = disabled.
    pub metrics_address: Option<SocketAddr>,
    /// bpffs directory where program, link and maps are pinned, so the data plane outlives
    /// the daemon.
    pub pin_path: PathBuf,
    /// Runtime state (API edits, runtime weights/states) kept across restarts.
    pub state_file: PathBuf,
    /// Tunnel modes: destination UDP port of GUE packets (the backends' `farmlb decap
    /// --gue-port`).
    pub gue_port: u16,
    /// Tunnel modes: prefixes (at most one per family) the outer source address is taken
    /// from, per flow; empty = the interface's own address.
    pub tunnel_source: Vec<Cidr>,
    pub services: Vec<ServiceCfg>,
    /// `[farm]`: farm mode / director failover (see `farm.rs`).
    pub farm: Option<FarmCfg>,
    /// `[announce]`: VIP routes for a BGP daemon, conntrack sync (see `announce.rs`).
    pub announce: Option<AnnounceCfg>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ServiceCfg {
    pub name: String,
    pub vip: IpAddr,
    /// 0 = every port of the VIP (port-wildcard service).
    pub port: u16,
    pub protocol: Protocol,
    pub hash: HashMode,
    pub forwarding: Forwarding,
    /// GUE services: this service's UDP port, instead of the global `gue_port`.
    pub gue_port: Option<u16>,
    /// Maglev table slots (prime).
    pub table_size: u32,
    /// The service's `check` table as written: the default check of its backends.
    pub check: Option<CheckSpec>,
    pub backends: Vec<BackendCfg>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendCfg {
    pub address: IpAddr,
    /// 0..=65535; 0 = drain (no new flows, established ones stay).
    pub weight: u32,
    /// Administrative state.
    pub state: AdminState,
    /// The backend's own `check` table as written (overrides the service's).
    pub check_override: Option<CheckSpec>,
    /// The check this backend gets: the service's merged with its own, derived when the
    /// backend joins its service (from the file, or [`Config::with_backend`]); `None` =
    /// unchecked (always considered up).
    pub check: Option<CheckCfg>,
}

impl BackendCfg {
    /// A ready backend without a `check` table of its own; its check is derived when it joins
    /// its service ([`Config::with_backend`]).
    pub fn new(address: IpAddr, weight: u32) -> Self {
        Self {
            address,
            weight,
            state: AdminState::Ready,
            check_override: None,
            check: None,
        }
    }
}

/// Administrative state of a backend (HAProxy's `set server ... state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum AdminState {
    /// Takes new flows (if healthy and weight > 0).
    #[default]
    Ready,
    /// No new flows; established flows continue through conntrack.
    Drain,
    /// Administratively out: no new flows; established flows are not cut either.
    Maint,
}

impl ServiceCfg {
    /// The service-level check alone (what a backend without its own `check` gets).
    pub fn default_check(&self) -> Option<CheckCfg> {
        self.check
            .as_ref()
            .and_then(|c| c.resolve(self.port).ok().flatten())
    }
}

// --- spellings ----------------------------------------------------------------------------

/// Error of the `FromStr` impls: lists the accepted spellings.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid value {value:?}, expected {expected}")]
pub struct BadValue {
    pub value: String,
    pub expected: &'static str,
}

macro_rules! spelled {
    ($ty:ty, $expected:literal, $($s:literal => $v:path),+ $(,)?) => {
        impl $ty {
            /// The spelling used in the config file.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($v => $s,)+
                }
            }
        }
        impl FromStr for $ty {
            type Err = BadValue;
            fn from_str(s: &str) -> Result<Self, BadValue> {
                match s {
                    $($s => Ok($v),)+
                    _ => Err(BadValue { value: s.to_string(), expected: $expected }),
                }
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

spelled!(XdpModeCfg, r#""auto", "native" or "generic""#,
    "auto" => XdpModeCfg::Auto, "native" => XdpModeCfg::Native, "generic" => XdpModeCfg::Generic);
spelled!(Protocol, r#""tcp" or "udp""#, "tcp" => Protocol::Tcp, "udp" => Protocol::Udp);
spelled!(Forwarding, r#""dr", "farm", "ipip" or "gue""#, "dr" => Forwarding::Dr,
    "farm" => Forwarding::Farm, "ipip" => Forwarding::Ipip, "gue" => Forwarding::Gue);
spelled!(AdminState, r#""ready", "drain" or "maint""#,
    "ready" => AdminState::Ready, "drain" => AdminState::Drain, "maint" => AdminState::Maint);
spelled!(CheckType, r#""tcp", "http", "udp", "exec" or "none""#,
    "tcp" => CheckType::Tcp, "http" => CheckType::Http, "udp" => CheckType::Udp,
    "exec" => CheckType::Exec, "none" => CheckType::None);

const HASH_EXPECTED: &str = r#""5-tuple", "src-ip" or "src-ip-port""#;

/// Config spelling of a hash mode.
pub fn hash_mode_name(m: HashMode) -> &'static str {
    match m {
        HashMode::FiveTuple => "5-tuple",
        HashMode::SrcIp => "src-ip",
        HashMode::SrcIpPort => "src-ip-port",
    }
}

pub fn parse_hash_mode(s: &str) -> Result<HashMode, BadValue> {
    [HashMode::FiveTuple, HashMode::SrcIp, HashMode::SrcIpPort]
        .into_iter()
        .find(|m| hash_mode_name(*m) == s)
        .ok_or_else(|| BadValue {
            value: s.to_string(),
            expected: HASH_EXPECTED,
        })
}

/// Parse a duration written as one or more `<integer><unit>` groups, unit one of
/// `ms`, `s`, `m`, `h`: `"500ms"`, `"30s"`, `"2m"`, `"1m30s"`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let mut rest = s;
    let mut total = Duration::ZERO;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let d = match &rest[..unit] {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.checked_mul(60)?),
            "h" => Duration::from_secs(n.checked_mul(3600)?),
            _ => return None,
        };
        rest = &rest[unit..];
        total = total.checked_add(d)?;
    }
    Some(total)
}

/// The shortest spelling [`parse_duration`] reads back as `d` (millisecond resolution).
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 || !ms.is_multiple_of(1000) {
        format!("{ms}ms")
    } else if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else {
        format!("{}s", ms / 1000)
    }
}

/// Parse an HTTP status range: `"200"`, `"200-399"`.
pub fn parse_status_range(s: &str) -> Option<(u16, u16)> {
    let (lo, hi) = s.split_once('-').unwrap_or((s, s));
    let lo: u16 = lo.trim().parse().ok()?;
    let hi: u16 = hi.trim().parse().ok()?;
    ((100..=599).contains(&lo) && (lo..=599).contains(&hi)).then_some((lo, hi))
}

/// A MAC address that does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("bad MAC {0:?}")]
pub struct BadMac(pub String);

/// `02:fa:4c:42:00:01` (hex bytes, any case).
pub fn parse_mac(s: &str) -> Result<[u8; 6], BadMac> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next().ok_or_else(|| BadMac(s.into()))?;
        *b = u8::from_str_radix(p, 16).map_err(|_| BadMac(s.into()))?;
    }
    if parts.next().is_some() {
        return Err(BadMac(s.into()));
    }
    Ok(mac)
}

// --- errors -------------------------------------------------------------------------------

/// A configuration error. `Display` is always a single line naming the file position (when
/// known) and the offending field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{}{message}", location(.file, .position))]
    Invalid {
        /// The file, when the config was loaded from one.
        file: Option<PathBuf>,
        /// 1-based (line, column) of the offending text, when known.
        position: Option<(usize, usize)>,
        /// Field path and problem, e.g. `service[0] "web": port: ...`.
        message: String,
    },
}

fn location(file: &Option<PathBuf>, position: &Option<(usize, usize)>) -> String {
    match (file, position) {
        (Some(f), Some((l, c))) => format!("{} line {l}, column {c}: ", f.display()),
        (Some(f), None) => format!("{}: ", f.display()),
        (None, Some((l, c))) => format!("line {l}, column {c}: "),
        (None, None) => String::new(),
    }
}

impl ConfigError {
    /// The message without the location prefix.
    pub fn message(&self) -> String {
        match self {
            ConfigError::Read { error, .. } => error.to_string(),
            ConfigError::Invalid { message, .. } => message.clone(),
        }
    }

    /// 1-based (line, column), when known.
    pub fn position(&self) -> Option<(usize, usize)> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Invalid { position, .. } => *position,
        }
    }
}

impl Config {
    /// Parse and validate a config held in memory; error positions have no file name.
    pub fn from_toml_str(s: &str) -> Result<Config, ConfigError> {
        Self::parse(s, None)
    }

    /// Read, parse and validate a config file; errors start with the file's path.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let s = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        Self::parse(&s, Some(path.to_path_buf()))
    }

    fn parse(src: &str, file: Option<PathBuf>) -> Result<Config, ConfigError> {
        let cx = raw::Ctx::new(src, file, rules::Naming::Indexed);
        cx.config(&cx.parse()?)
    }
}

// --- writing ------------------------------------------------------------------------------

/// A TOML string literal (quoted and escaped).
fn quote(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// Written as a TOML string of their `Display`.
macro_rules! spell_quoted {
    ($($t:ty),+) => { $(impl Spell for $t {
        fn spell(&self) -> Option<String> { Some(quote(&self.to_string())) }
    })+ };
}

/// Written bare: numbers and booleans.
macro_rules! spell_bare {
    ($($t:ty),+) => { $(impl Spell for $t {
        fn spell(&self) -> Option<String> { Some(self.to_string()) }
    })+ };
}

spell_quoted!(
    String, &str, IpAddr, SocketAddr, XdpModeCfg, Protocol, Forwarding, AdminState, CheckType, Cidr
);
spell_bare!(u16, u32, bool);

impl Spell for Duration {
    fn spell(&self) -> Option<String> {
        Some(quote(&format_duration(*self)))
    }
}

impl Spell for PathBuf {
    fn spell(&self) -> Option<String> {
        Some(quote(&self.to_string_lossy()))
    }
}

/// Optional values: not written when unset.
macro_rules! spell_optional {
    ($($t:ty),+) => { $(impl Spell for Option<$t> {
        fn spell(&self) -> Option<String> { self.as_ref().and_then(Spell::spell) }
    })+ };
}

spell_optional!(String, IpAddr, CheckSpec, u16);

/// `metrics_address`: unset is written `"off"` (a missing key means the default address).
impl Spell for Option<SocketAddr> {
    fn spell(&self) -> Option<String> {
        Some(quote(&self.map_or("off".to_string(), |a| a.to_string())))
    }
}

impl Spell for HashMode {
    fn spell(&self) -> Option<String> {
        Some(quote(hash_mode_name(*self)))
    }
}

impl<T: Spell> Spell for Vec<T> {
    fn spell(&self) -> Option<String> {
        let items: Vec<String> = self.iter().filter_map(Spell::spell).collect();
        Some(format!("[{}]", items.join(", ")))
    }
}

/// `(key, value)` pairs in the file's spelling, in file order.
type Entries = Vec<(&'static str, Option<String>)>;

/// `key = value` lines of the entries that are set.
fn put(s: &mut String, indent: &str, entries: &[(&str, Option<String>)]) {
    for (key, value) in entries {
        if let Some(v) = value {
            let _ = writeln!(s, "{indent}{key} = {v}");
        }
    }
}

impl Config {
    /// The global settings.
    fn globals(&self) -> Entries {
        entries!(self => Config {
            interface, xdp_mode, udp_timeout, conntrack_size, flood_guard_rate, api_socket,
            metrics_address, pin_path, state_file, gue_port, tunnel_source
        } skip { services, farm, announce })
    }

    /// The configuration as a TOML document that [`Config::from_toml_str`] reads back as an
    /// equal `Config`: what `GET /v1/config` shows.
    pub fn to_toml(&self) -> String {
        let mut s = String::new();
        put(&mut s, "", &self.globals());
        for svc in &self.services {
            s += "\n[[service]]\n";
            let fields = entries!(svc => ServiceCfg {
                name, vip, port, protocol, hash, forwarding, gue_port, table_size, check
            } skip { backends });
            put(&mut s, "", &fields);
            for b in &svc.backends {
                s += "\n  [[service.backend]]\n";
                // The backend's `check` is derived from its own table and the service's.
                let fields = entries!(b => BackendCfg {
                    address, weight, state, check_override = "check"
                } skip { check });
                put(&mut s, "  ", &fields);
            }
        }
        if let Some(f) = &self.farm {
            s += &f.to_toml();
        }
        if let Some(a) = &self.announce {
            s += &a.to_toml();
        }
        s
    }
}

/// Helpers of the config tests.
#[cfg(test)]
pub(super) mod testing {
    use super::Config;

    pub const EXAMPLE: &str = include_str!("../../../examples/farmlb.toml");

    pub const BASE: &str = "interface = \"eth0\"\n";

    /// The one-line message of a config that must fail; checks it names `field`.
    pub fn error(src: &str, field: &str) -> String {
        let e = Config::from_toml_str(src).expect_err("config should be rejected");
        let msg = e.to_string();
        assert!(!msg.contains('\n'), "multi-line error: {msg:?}");
        assert!(msg.contains(field), "{msg:?} does not name {field:?}");
        msg
    }

    /// A config with service "web" (10.0.0.1:80) on line 3, `body` ending its table.
    pub fn svc(body: &str) -> String {
        format!("{BASE}\n[[service]]\nname = \"web\"\nvip = \"10.0.0.1\"\nport = 80\n{body}")
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::testing::*;
    use super::*;

    #[test]
    fn example_file_parses() {
        let c = Config::from_toml_str(EXAMPLE).unwrap();
        assert_eq!(c.interface, "eth0");
        assert_eq!(c.xdp_mode, XdpModeCfg::Auto);
        assert_eq!(c.udp_timeout, Duration::from_secs(30));
        assert_eq!(c.conntrack_size, 1_048_576);
        assert_eq!(c.services.len(), 4);
        assert_eq!(c.services[3].gue_port, Some(6081));
        assert_eq!(c.gue_port, lb_common::DEFAULT_GUE_PORT);
        assert_eq!(
            c.tunnel_source,
            [
                "192.0.2.0/28".parse().unwrap(),
                "2001:db8:5::/124".parse().unwrap()
            ]
        );
        let api = &c.services[2];
        assert_eq!(api.forwarding, Forwarding::Ipip);
        assert!(api.backends[0].address.is_ipv4() && api.backends[1].address.is_ipv6());
        let web = &c.services[0];
        assert_eq!(web.name, "web");
        assert_eq!(web.vip, IpAddr::V4(Ipv4Addr::new(10, 99, 100, 1)));
        assert_eq!(web.port, 80);
        assert_eq!(web.protocol, Protocol::Tcp);
        assert_eq!(web.protocol.number(), lb_common::PROTO_TCP);
        assert_eq!(web.hash, HashMode::FiveTuple);
        assert_eq!(web.forwarding, Forwarding::Dr);
        assert_eq!(web.table_size, 65537);
        let weights: Vec<u32> = web.backends.iter().map(|b| b.weight).collect();
        assert_eq!(weights, [1, 2, 0]);
        assert_eq!(
            web.backends[0].address,
            IpAddr::V4(Ipv4Addr::new(10, 99, 0, 11))
        );
        let dns = &c.services[1];
        assert_eq!(dns.vip, "fd99:100::1".parse::<Ipv6Addr>().unwrap());
        assert_eq!((dns.port, dns.protocol), (0, Protocol::Udp));
        assert_eq!(dns.protocol.number(), lb_common::PROTO_UDP);
        assert_eq!(dns.hash, HashMode::SrcIp);
        assert_eq!(dns.table_size, 1009);
        assert!(dns.backends.iter().all(|b| b.weight == 1));
    }

    #[test]
    fn defaults() {
        let c = Config::from_toml_str(&svc("")).unwrap();
        assert_eq!(c.xdp_mode, XdpModeCfg::Auto);
        assert_eq!(c.udp_timeout, DEFAULT_UDP_TIMEOUT);
        assert_eq!(c.conntrack_size, DEFAULT_CONNTRACK_SIZE);
        let s = &c.services[0];
        assert_eq!(s.protocol, Protocol::Tcp);
        assert_eq!(s.hash, HashMode::FiveTuple);
        assert_eq!(s.forwarding, Forwarding::Dr);
        assert_eq!(s.table_size, lb_common::DEFAULT_TABLE_SIZE);
        assert!(s.backends.is_empty());
        assert_eq!(c.gue_port, 6080);
        assert!(c.tunnel_source.is_empty());
        let c = Config::from_toml_str(&svc("[[service.backend]]\naddress = \"10.0.0.2\"")).unwrap();
        assert_eq!(c.services[0].backends[0].weight, 1);
        // No services at all is a valid (idle) config.
        assert!(Config::from_toml_str(BASE).unwrap().services.is_empty());
    }

    #[test]
    fn all_spellings_accepted() {
        for (m, want) in [
            ("auto", XdpModeCfg::Auto),
            ("native", XdpModeCfg::Native),
            ("generic", XdpModeCfg::Generic),
        ] {
            let c = Config::from_toml_str(&format!("{BASE}xdp_mode = \"{m}\"")).unwrap();
            assert_eq!(c.xdp_mode, want);
            assert_eq!(want.as_str(), m);
        }
        for (h, want) in [
            ("5-tuple", HashMode::FiveTuple),
            ("src-ip", HashMode::SrcIp),
            ("src-ip-port", HashMode::SrcIpPort),
        ] {
            let c = Config::from_toml_str(&svc(&format!("hash = \"{h}\""))).unwrap();
            assert_eq!(c.services[0].hash, want);
            assert_eq!(hash_mode_name(want), h);
        }
        let c = Config::from_toml_str(&svc("protocol = \"udp\"\nforwarding = \"dr\"")).unwrap();
        assert_eq!(c.services[0].protocol, Protocol::Udp);
    }

    #[test]
    fn load_prefixes_the_path() {
        let dir = std::env::temp_dir().join(format!("farmlb-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("farmlb.toml");
        std::fs::write(
            &path,
            svc("[[service.backend]]\naddress = \"10.0.0.2\"\n  weigth = 3\n"),
        )
        .unwrap();
        let msg = Config::load(&path).unwrap_err().to_string();
        assert_eq!(
            msg,
            format!(
                "{} line 9, column 3: unknown field \"weigth\", expected one of \"address\", \"weight\", \"state\", \"check\"",
                path.display()
            )
        );
        std::fs::write(&path, EXAMPLE).unwrap();
        assert_eq!(
            Config::load(&path).unwrap(),
            Config::from_toml_str(EXAMPLE).unwrap()
        );
        let missing = dir.join("nope.toml");
        let msg = Config::load(&missing).unwrap_err().to_string();
        assert!(!msg.contains('\n'));
        assert!(
            msg.starts_with(&format!("cannot read {}: ", missing.display())),
            "{msg}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("1s500ms"), Some(Duration::from_millis(1500)));
        for bad in [
            "",
            "5",
            "s",
            "5x",
            "1.5s",
            " 5s",
            "5s ",
            "99999999999999999999999s",
        ] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn defaults_and_globals() {
        let c = Config::from_toml_str(&svc("[[service.backend]]\naddress = \"10.0.0.2\"")).unwrap();
        assert_eq!(c.api_socket, Path::new(DEFAULT_API_SOCKET));
        assert_eq!(
            c.metrics_address,
            Some(DEFAULT_METRICS_ADDRESS.parse().unwrap())
        );
        let b = &c.services[0].backends[0];
        assert_eq!(b.state, AdminState::Ready);
        assert_eq!(b.check, None, "no check configured: unchecked");
        let c = Config::from_toml_str(
            "interface = \"eth0\"\napi_socket = \"/tmp/f.sock\"\nmetrics_address = \"off\"",
        )
        .unwrap();
        assert_eq!(c.api_socket, Path::new("/tmp/f.sock"));
        assert_eq!(c.metrics_address, None);
        let c = Config::from_toml_str("interface = \"eth0\"\nmetrics_address = \"[::1]:9000\"")
            .unwrap();
        assert_eq!(c.metrics_address, Some("[::1]:9000".parse().unwrap()));
        error(
            "interface = \"eth0\"\napi_socket = \"rel.sock\"",
            "api_socket",
        );
        let long = format!("/{}", "a".repeat(MAX_SOCKET_PATH));
        error(
            &format!("interface = \"eth0\"\napi_socket = \"{long}\""),
            "api_socket",
        );
        let msg = error(
            "interface = \"eth0\"\nmetrics_address = \"localhost:9\"",
            "metrics_address",
        );
        assert!(msg.contains("expected IP:port"), "{msg}");
    }

    #[test]
    fn states_parse() {
        let c = Config::from_toml_str(&svc(
            "[[service.backend]]\naddress = \"10.0.0.2\"\nstate = \"drain\"\n\
             [[service.backend]]\naddress = \"10.0.0.3\"\nstate = \"maint\"\n",
        ))
        .unwrap();
        let s: Vec<AdminState> = c.services[0].backends.iter().map(|b| b.state).collect();
        assert_eq!(s, [AdminState::Drain, AdminState::Maint]);
    }

    #[test]
    fn example_checks() {
        let c = Config::from_toml_str(EXAMPLE).unwrap();
        assert_eq!(c.api_socket, Path::new(DEFAULT_API_SOCKET));
        assert_eq!(
            c.metrics_address,
            Some(DEFAULT_METRICS_ADDRESS.parse().unwrap())
        );
        let web = &c.services[0];
        let http = |port| CheckCfg {
            probe: Probe::Http {
                path: "/healthz".into(),
                host: None,
                status: (200, 399),
            },
            interval: DEFAULT_CHECK_INTERVAL,
            timeout: DEFAULT_CHECK_TIMEOUT,
            rise: 2,
            fall: 3,
            port,
        };
        assert_eq!(web.backends[0].check, Some(http(80)));
        assert_eq!(web.backends[1].check, Some(http(8080)));
        assert!(web.backends.iter().all(|b| b.state == AdminState::Ready));
        let dns = &c.services[1];
        let ch = dns.backends[0].check.clone().unwrap();
        assert_eq!(ch.port, 53);
        assert!(matches!(ch.probe, Probe::Exec { dynamic: true, .. }));
    }

    #[test]
    fn to_toml_round_trips() {
        let full = svc(
            "hash = \"src-ip\"\ntable_size = 1009\n\
             [service.check]\ntype = \"http\"\npath = \"/h\"\nexpect_status = \"200-204\"\n\
             interval = \"1m30s\"\ntimeout = \"1500ms\"\nrise = 3\nfall = 4\nport = 8080\n\
             host = \"a\\\"quoted\\\"host\"\n\
             [[service.backend]]\naddress = \"10.0.0.2\"\nweight = 7\nstate = \"drain\"\n\
             [[service.backend]]\naddress = \"10.0.0.3\"\n\
             check = { type = \"exec\", command = [\"/bin/sh\", \"-c\", \"exit 0\"], dynamic = true }\n\
             [[service.backend]]\naddress = \"10.0.0.4\"\n\
             check = { type = \"udp\", payload = \"p\\n\", expect = \"x\" }\n\
             [[service.backend]]\naddress = \"10.0.0.5\"\ncheck = { type = \"none\" }\n",
        )
        .replace(
            "interface = \"eth0\"\n",
            "interface = \"eth0\"\napi_socket = \"/tmp/a.sock\"\nmetrics_address = \"off\"\n\
             udp_timeout = \"90s\"\n",
        );
        for src in [full.as_str(), EXAMPLE] {
            let c = Config::from_toml_str(src).unwrap();
            let again = Config::from_toml_str(&c.to_toml())
                .unwrap_or_else(|e| panic!("{e}\n{}", c.to_toml()));
            assert_eq!(again, c, "{}", c.to_toml());
        }
        for d in ["1ms", "999ms", "1500ms", "2s", "90s", "2m", "1h", "25h"] {
            assert_eq!(format_duration(parse_duration(d).unwrap()), d);
        }
    }

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("02:00:0a:63:00:0B"),
            Ok([2, 0, 0x0a, 0x63, 0, 0x0b])
        );
        for bad in [
            "02:00:0a:63:00",
            "02:00:0a:63:00:0b:01",
            "zz:00:0a:63:00:0b",
            "",
        ] {
            assert_eq!(parse_mac(bad), Err(BadMac(bad.into())), "{bad:?}");
        }
        assert_eq!(BadMac("x".into()).to_string(), "bad MAC \"x\"");
    }
}
