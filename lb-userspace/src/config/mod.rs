//! The TOML configuration file (`examples/farmlb.toml`, `docs/config.md`).
//!
//! Parsing goes through "raw" structs whose fields keep their source spans, then every
//! field is checked and converted here, so each error is one line naming the file position
//! and the field, e.g. `farmlb.toml line 14, column 13: service[1] "web":
//! backend[0].address: invalid IP address "10.0.0.x"` (on one line).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use lb_common::HashMode;
use serde::Deserialize;
use toml::Spanned;

use crate::maglev::is_prime;

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
}

impl Forwarding {
    /// `ServiceInfo::fwd_mode` byte.
    pub const fn mode(self) -> u8 {
        match self {
            Forwarding::Dr => lb_common::FWD_DR,
            Forwarding::Farm => lb_common::FWD_FARM,
        }
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
    /// Unix socket of the runtime API.
    pub api_socket: PathBuf,
    /// TCP address of the Prometheus endpoint; `None` = disabled.
    pub metrics_address: Option<SocketAddr>,
    pub services: Vec<ServiceCfg>,
    /// `[farm]`: farm mode / director failover (see `farm_config.rs`).
    pub farm: Option<crate::farm_config::FarmCfg>,
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
    /// The check this backend gets: the service's merged with its own; `None` = unchecked
    /// (always considered up).
    pub check: Option<CheckCfg>,
}

impl BackendCfg {
    /// A ready, unchecked backend (used by tests and the API).
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

/// A `check` table as written. At service level it is the default of every backend; at
/// backend level each field given overrides the service's (a different `type` keeps only the
/// timing fields and `port` of the service's check).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct CheckSpec {
    pub kind: Option<CheckType>,
    pub interval: Option<Duration>,
    pub timeout: Option<Duration>,
    pub rise: Option<u32>,
    pub fall: Option<u32>,
    pub port: Option<u16>,
    pub path: Option<String>,
    pub host: Option<String>,
    pub expect_status: Option<(u16, u16)>,
    pub payload: Option<String>,
    pub expect: Option<String>,
    pub command: Option<ExecCommand>,
    pub dynamic: Option<bool>,
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
        let (base, o) = match (service, backend) {
            (None, None) => return None,
            (Some(s), None) => return Some(s.clone()),
            (None, Some(b)) => return Some(b.clone()),
            (Some(s), Some(b)) => (s, b),
        };
        let mut m = if o.kind.is_none() || o.kind == base.kind {
            base.clone()
        } else {
            CheckSpec {
                interval: base.interval,
                timeout: base.timeout,
                rise: base.rise,
                fall: base.fall,
                port: base.port,
                ..Default::default()
            }
        };
        macro_rules! over {
            ($($f:ident),*) => { $( if o.$f.is_some() { m.$f = o.$f.clone(); } )* };
        }
        over!(
            kind,
            interval,
            timeout,
            rise,
            fall,
            port,
            path,
            host,
            expect_status,
            payload,
            expect,
            command,
            dynamic
        );
        Some(m)
    }

    /// The complete check, or `None` for `type = "none"`. Errors name the field (without
    /// prefix) and the problem.
    pub fn resolve(&self, service_port: u16) -> Result<Option<CheckCfg>, String> {
        let kind = self
            .kind
            .ok_or_else(|| "type: missing required field".to_string())?;
        let only = |field: &str, set: bool, for_kind: &str| -> Result<(), String> {
            if set {
                Err(format!("{field}: only valid for {for_kind} checks"))
            } else {
                Ok(())
            }
        };
        if kind != CheckType::Http {
            only("path", self.path.is_some(), "http")?;
            only("host", self.host.is_some(), "http")?;
            only("expect_status", self.expect_status.is_some(), "http")?;
        }
        if kind != CheckType::Udp {
            only("payload", self.payload.is_some(), "udp")?;
            only("expect", self.expect.is_some(), "udp")?;
        }
        if kind != CheckType::Exec {
            only("command", self.command.is_some(), "exec")?;
            only("dynamic", self.dynamic.is_some(), "exec")?;
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
}

impl ServiceCfg {
    /// The service-level check alone (what a backend without its own `check` gets).
    pub fn default_check(&self) -> Option<CheckCfg> {
        self.check
            .as_ref()
            .and_then(|c| c.resolve(self.port).ok().flatten())
    }
}

// --- enum spellings -----------------------------------------------------------------------

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
spelled!(Forwarding, r#""dr" or "farm""#, "dr" => Forwarding::Dr, "farm" => Forwarding::Farm);
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
    match s {
        "5-tuple" => Ok(HashMode::FiveTuple),
        "src-ip" => Ok(HashMode::SrcIp),
        "src-ip-port" => Ok(HashMode::SrcIpPort),
        _ => Err(BadValue {
            value: s.to_string(),
            expected: HASH_EXPECTED,
        }),
    }
}

impl From<XdpModeCfg> for crate::dataplane::AttachMode {
    fn from(m: XdpModeCfg) -> Self {
        match m {
            XdpModeCfg::Auto => Self::Auto,
            XdpModeCfg::Native => Self::Native,
            XdpModeCfg::Generic => Self::Generic,
        }
    }
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

/// 1-based line and column (in characters) of byte offset `pos` in `src`.
fn line_col(src: &str, pos: usize) -> (usize, usize) {
    let mut pos = pos.min(src.len());
    while !src.is_char_boundary(pos) {
        pos -= 1;
    }
    let before = &src[..pos];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, src[line_start..pos].chars().count() + 1)
}

/// Collapse a possibly multi-line message onto one line.
fn one_line(s: &str) -> String {
    s.split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// serde and toml quote names, values and tokens alike in backticks. Names get double
/// quotes, the value in "invalid type: integer `30`" is shown bare, and tokens that are
/// themselves quotes (toml's "expected `\"`, `'`") keep their backticks.
fn requote(msg: &str) -> String {
    let bare = msg.starts_with("invalid type") || msg.starts_with("invalid value");
    let mut out = String::with_capacity(msg.len());
    for (i, part) in msg.split('`').enumerate() {
        if i % 2 == 0 {
            out.push_str(part);
        } else if part.contains('"') {
            out.push('`');
            out.push_str(part);
            out.push('`');
        } else if bare {
            out.push_str(part);
        } else {
            out.push('"');
            out.push_str(part);
            out.push('"');
        }
    }
    out
}

/// The key whose value (or table header) starts at byte `pos`: used to name the field in
/// errors from the TOML parser, which only give a span.
fn key_at(src: &str, pos: usize) -> Option<String> {
    let bytes = src.as_bytes();
    if bytes.get(pos) == Some(&b'[') {
        // A table header: `[name]` or `[[name]]`.
        let line = &src[pos..];
        let line = &line[..line.find('\n').unwrap_or(line.len())];
        let name = line.trim_start_matches('[');
        let name = &name[..name.find(']')?];
        return Some(name.trim().to_string());
    }
    let mut i = pos;
    let skip_blank = |i: &mut usize| {
        while *i > 0 && matches!(bytes[*i - 1], b' ' | b'\t') {
            *i -= 1;
        }
    };
    skip_blank(&mut i);
    if i == 0 || bytes[i - 1] != b'=' {
        return None;
    }
    i -= 1;
    skip_blank(&mut i);
    let end = i;
    if i > 0 && matches!(bytes[i - 1], b'"' | b'\'') {
        let q = bytes[i - 1];
        let open = src[..i - 1].rfind(q as char)?;
        return Some(src[open + 1..i - 1].to_string());
    }
    while i > 0 && (bytes[i - 1].is_ascii_alphanumeric() || matches!(bytes[i - 1], b'_' | b'-')) {
        i -= 1;
    }
    (i < end).then(|| src[i..end].to_string())
}

/// Accumulates the context (file, source) needed to turn spans into positions.
struct Ctx<'a> {
    src: &'a str,
    file: Option<PathBuf>,
}

impl Ctx<'_> {
    fn err(&self, span: Option<Range<usize>>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.clone(),
            position: span.map(|s| line_col(self.src, s.start)),
            message: one_line(&message.into()),
        }
    }

    fn toml_err(&self, e: toml::de::Error) -> ConfigError {
        let mut msg = requote(&one_line(e.message()))
            .replace("expected i64", "expected an integer")
            .replace(
                "expected a sequence",
                "expected an array of tables ([[...]])",
            )
            .replace(
                "data did not match any variant of untagged enum RawCommand",
                "invalid type, expected a string or an array of strings",
            )
            .replace(
                "data did not match any variant of untagged enum RawStatus",
                "invalid type, expected an integer or a string such as \"200-399\"",
            );
        if let Some(key) = e.span().and_then(|s| key_at(self.src, s.start)) {
            if !msg.contains(&format!("\"{key}\"")) {
                msg = format!("{key}: {msg}");
            }
        }
        self.err(e.span(), msg)
    }
}

// --- raw (as written) -----------------------------------------------------------------

type Field<T> = Option<Spanned<T>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    interface: Field<String>,
    xdp_mode: Field<String>,
    udp_timeout: Field<String>,
    conntrack_size: Field<i64>,
    api_socket: Field<String>,
    metrics_address: Field<String>,
    #[serde(default, rename = "service")]
    services: Vec<Spanned<RawService>>,
    farm: Option<Spanned<crate::farm_config::RawFarm>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Field<String>,
    vip: Field<String>,
    port: Field<i64>,
    protocol: Field<String>,
    hash: Field<String>,
    forwarding: Field<String>,
    table_size: Field<i64>,
    check: Field<RawCheck>,
    #[serde(default, rename = "backend")]
    backends: Vec<Spanned<RawBackend>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    address: Field<String>,
    weight: Field<i64>,
    state: Field<String>,
    check: Field<RawCheck>,
}

/// A `check` table as written (also `[farm] check`, see `farm_config.rs`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCheck {
    #[serde(rename = "type")]
    kind: Field<String>,
    interval: Field<String>,
    timeout: Field<String>,
    rise: Field<i64>,
    fall: Field<i64>,
    port: Field<i64>,
    path: Field<String>,
    host: Field<String>,
    expect_status: Field<RawStatus>,
    payload: Field<String>,
    expect: Field<String>,
    command: Field<RawCommand>,
    dynamic: Field<bool>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawStatus {
    Code(i64),
    Range(String),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawCommand {
    Shell(String),
    Argv(Vec<String>),
}

// --- validation ---------------------------------------------------------------------------

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
        let cx = Ctx { src, file };
        let raw: RawConfig = toml::from_str(src).map_err(|e| cx.toml_err(e))?;
        cx.config(raw)
    }
}

/// Checks `value` against an inclusive range, naming `field` on failure.
fn ranged(
    cx: &Ctx,
    prefix: &str,
    field: &str,
    v: &Spanned<i64>,
    min: u64,
    max: u64,
) -> Result<u32, ConfigError> {
    let n = *v.get_ref();
    if n < 0 || (n as u64) < min || n as u64 > max {
        return Err(cx.err(
            Some(v.span()),
            format!("{prefix}{field}: {n} is out of range {min}..={max}"),
        ));
    }
    Ok(n as u32)
}

/// Parses an enum-like string field, naming `field` on failure.
fn spelled<T>(
    cx: &Ctx,
    prefix: &str,
    field: &str,
    v: &Field<String>,
    parse: impl Fn(&str) -> Result<T, BadValue>,
    default: T,
) -> Result<T, ConfigError> {
    match v {
        None => Ok(default),
        Some(v) => {
            parse(v.get_ref()).map_err(|e| cx.err(Some(v.span()), format!("{prefix}{field}: {e}")))
        }
    }
}

/// Parses a duration field and checks `min..=max`, naming `field` on failure.
fn duration_field(
    cx: &Ctx,
    prefix: &str,
    field: &str,
    v: &Spanned<String>,
    min: Duration,
    max: Duration,
) -> Result<Duration, ConfigError> {
    let span = Some(v.span());
    let d = parse_duration(v.get_ref()).ok_or_else(|| {
        cx.err(
            span.clone(),
            format!(
                "{prefix}{field}: invalid duration {:?}, expected an integer with a unit (ms, \
                 s, m, h), e.g. \"500ms\", \"30s\", \"2m\"",
                v.get_ref()
            ),
        )
    })?;
    if d < min || d > max {
        return Err(cx.err(
            span,
            format!(
                "{prefix}{field}: {:?} is out of range {}..={}",
                v.get_ref(),
                format_duration(min),
                format_duration(max)
            ),
        ));
    }
    Ok(d)
}

fn check_interface(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("must not be empty");
    }
    if name.len() > MAX_IFNAME_LEN {
        return Err("longer than 15 bytes (IFNAMSIZ)");
    }
    if name == "." || name == ".." {
        return Err("not a valid interface name");
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err("must not contain '/', ':', whitespace or control characters");
    }
    Ok(())
}

/// An address usable as a VIP or backend: unicast, not loopback, not unspecified, and IPv6
/// not in the IPv4-mapped form (the data plane stores IPv4 that way, so it would alias).
fn check_addr(ip: IpAddr) -> Result<(), &'static str> {
    if ip.is_unspecified() {
        return Err("unspecified address");
    }
    if ip.is_multicast() {
        return Err("multicast address");
    }
    if ip.is_loopback() {
        return Err("loopback address");
    }
    match ip {
        IpAddr::V4(v4) if v4.is_broadcast() => Err("broadcast address"),
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => {
            Err("IPv4-mapped IPv6 address (write it as plain IPv4)")
        }
        _ => Ok(()),
    }
}

fn family(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() {
        "IPv4"
    } else {
        "IPv6"
    }
}

impl Ctx<'_> {
    fn config(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let interface = match &raw.interface {
            None => return Err(self.err(None, "interface: missing required field")),
            Some(v) => {
                check_interface(v.get_ref()).map_err(|why| {
                    self.err(
                        Some(v.span()),
                        format!("interface: {why}: {:?}", v.get_ref()),
                    )
                })?;
                v.get_ref().clone()
            }
        };
        let xdp_mode = spelled(
            self,
            "",
            "xdp_mode",
            &raw.xdp_mode,
            XdpModeCfg::from_str,
            XdpModeCfg::Auto,
        )?;
        let udp_timeout = match &raw.udp_timeout {
            None => DEFAULT_UDP_TIMEOUT,
            Some(v) => {
                let span = Some(v.span());
                let d = parse_duration(v.get_ref()).ok_or_else(|| {
                    self.err(
                        span.clone(),
                        format!(
                            "udp_timeout: invalid duration {:?}, expected an integer with a \
                             unit (ms, s, m, h), e.g. \"500ms\", \"30s\", \"2m\"",
                            v.get_ref()
                        ),
                    )
                })?;
                if d.is_zero() || d > MAX_UDP_TIMEOUT {
                    return Err(self.err(
                        span,
                        format!(
                            "udp_timeout: {:?} is out of range, expected more than 0 and at \
                             most 24h",
                            v.get_ref()
                        ),
                    ));
                }
                d
            }
        };
        let conntrack_size = match &raw.conntrack_size {
            None => DEFAULT_CONNTRACK_SIZE,
            Some(v) => ranged(
                self,
                "",
                "conntrack_size",
                v,
                MIN_CONNTRACK_SIZE as u64,
                MAX_CONNTRACK_SIZE as u64,
            )?,
        };

        let api_socket = match &raw.api_socket {
            None => PathBuf::from(DEFAULT_API_SOCKET),
            Some(v) => {
                let p = v.get_ref();
                if !p.starts_with('/') || p.len() > MAX_SOCKET_PATH || p.contains('\0') {
                    return Err(self.err(
                        Some(v.span()),
                        format!(
                            "api_socket: {p:?} must be an absolute path of at most \
                             {MAX_SOCKET_PATH} bytes"
                        ),
                    ));
                }
                PathBuf::from(p)
            }
        };
        let metrics_address = match &raw.metrics_address {
            None => Some(DEFAULT_METRICS_ADDRESS.parse().expect("valid default")),
            Some(v) if v.get_ref() == "off" => None,
            Some(v) => Some(v.get_ref().parse::<SocketAddr>().map_err(|_| {
                self.err(
                    Some(v.span()),
                    format!(
                        "metrics_address: invalid address {:?}, expected IP:port (e.g. \
                         \"{DEFAULT_METRICS_ADDRESS}\", \"[::1]:9740\") or \"off\"",
                        v.get_ref()
                    ),
                )
            })?),
        };

        if raw.services.len() > lb_common::MAX_SERVICES as usize {
            let extra = &raw.services[lb_common::MAX_SERVICES as usize];
            return Err(self.err(
                Some(extra.span()),
                format!(
                    "service: {} services, at most {} are supported",
                    raw.services.len(),
                    lb_common::MAX_SERVICES
                ),
            ));
        }
        let mut services: Vec<ServiceCfg> = Vec::with_capacity(raw.services.len());
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut keys: HashMap<(IpAddr, u16, Protocol), usize> = HashMap::new();
        let mut total_backends = 0usize;
        for (i, rs) in raw.services.iter().enumerate() {
            let s = self.service(i, rs)?;
            let prefix = format!("service[{i}] {:?}: ", s.name);
            if s.forwarding == Forwarding::Farm {
                if raw.farm.is_none() {
                    return Err(self.err(
                        rs.get_ref().forwarding.as_ref().map(|f| f.span()),
                        format!("{prefix}forwarding: \"farm\" needs a [farm] section"),
                    ));
                }
                if let Some(b) = rs.get_ref().backends.first() {
                    return Err(self.err(
                        Some(b.span()),
                        format!("{prefix}backend: a farm service has no backends (the farm's nodes serve it)"),
                    ));
                }
            }
            if let Some(&j) = names.get(&s.name) {
                let span = rs.get_ref().name.as_ref().map(|n| n.span());
                return Err(self.err(
                    span,
                    format!("{prefix}name: duplicate service name (also service[{j}])"),
                ));
            }
            names.insert(s.name.clone(), i);
            if let Some(&j) = keys.get(&(s.vip, s.port, s.protocol)) {
                return Err(self.err(
                    Some(rs.span()),
                    format!(
                        "service[{i}] {:?}: duplicate of service {:?} (same vip, port and \
                         protocol)",
                        s.name, services[j].name
                    ),
                ));
            }
            keys.insert((s.vip, s.port, s.protocol), i);
            total_backends += s.backends.len();
            // Backend id 0 is reserved for "no backend".
            if total_backends >= lb_common::MAX_BACKENDS as usize {
                return Err(self.err(
                    Some(rs.span()),
                    format!(
                        "{prefix}backend: too many backends in total, at most {} over all \
                         services",
                        lb_common::MAX_BACKENDS - 1
                    ),
                ));
            }
            services.push(s);
        }
        let farm = match &raw.farm {
            None => None,
            Some(f) => {
                // The node's own check has the syntax of a service's `check`.
                let check = match f.get_ref().check_table() {
                    None => None,
                    Some(rc) => Some((self.check_spec("farm.check.", rc)?, rc.span())),
                };
                Some(
                    f.get_ref()
                        .validate(f.span(), check, &services)
                        .map_err(|(span, msg)| self.err(span, msg))?,
                )
            }
        };

        Ok(Config {
            interface,
            xdp_mode,
            udp_timeout,
            conntrack_size,
            api_socket,
            metrics_address,
            services,
            farm,
        })
    }

    fn service(&self, i: usize, rs: &Spanned<RawService>) -> Result<ServiceCfg, ConfigError> {
        let table_span = Some(rs.span());
        let rs = rs.get_ref();
        let missing = |prefix: &str, field: &str| {
            self.err(
                table_span.clone(),
                format!("{prefix}{field}: missing required field"),
            )
        };

        let name = match &rs.name {
            None => return Err(missing(&format!("service[{i}]: "), "name")),
            Some(n) => n,
        };
        let valid = !name.get_ref().is_empty()
            && name.get_ref().len() <= MAX_NAME_LEN
            && name
                .get_ref()
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !valid {
            return Err(self.err(
                Some(name.span()),
                format!(
                    "service[{i}]: name: invalid name {:?}, expected 1 to {MAX_NAME_LEN} of \
                     A-Z a-z 0-9 _ . -",
                    name.get_ref()
                ),
            ));
        }
        let name = name.get_ref().clone();
        let p = format!("service[{i}] {name:?}: ");

        let vip = match &rs.vip {
            None => return Err(missing(&p, "vip")),
            Some(v) => self.addr(&p, "vip", v)?,
        };
        let port = match &rs.port {
            None => return Err(missing(&p, "port")),
            Some(v) => ranged(self, &p, "port", v, 0, u16::MAX as u64)? as u16,
        };
        let protocol = spelled(
            self,
            &p,
            "protocol",
            &rs.protocol,
            Protocol::from_str,
            Protocol::Tcp,
        )?;
        let hash = spelled(
            self,
            &p,
            "hash",
            &rs.hash,
            parse_hash_mode,
            HashMode::FiveTuple,
        )?;
        let forwarding = spelled(
            self,
            &p,
            "forwarding",
            &rs.forwarding,
            Forwarding::from_str,
            Forwarding::Dr,
        )?;
        let table_size = match &rs.table_size {
            None => DEFAULT_TABLE_SIZE,
            Some(v) => {
                let n = ranged(
                    self,
                    &p,
                    "table_size",
                    v,
                    MIN_TABLE_SIZE as u64,
                    MAX_TABLE_SIZE as u64,
                )?;
                if !is_prime(n) {
                    return Err(self.err(
                        Some(v.span()),
                        format!("{p}table_size: {n} is not prime (e.g. 1009, 65537, 131071)"),
                    ));
                }
                n
            }
        };

        let check = match &rs.check {
            None => None,
            Some(rc) => {
                let cp = format!("{p}check.");
                let spec = self.check_spec(&cp, rc)?;
                spec.resolve(port)
                    .map_err(|e| self.err(Some(rc.span()), format!("{cp}{e}")))?;
                Some(spec)
            }
        };

        let mut backends: Vec<BackendCfg> = Vec::with_capacity(rs.backends.len());
        let mut seen: HashSet<IpAddr> = HashSet::new();
        for (j, rb) in rs.backends.iter().enumerate() {
            let bp = format!("{p}backend[{j}].");
            let span = rb.span();
            let rb = rb.get_ref();
            let address = match &rb.address {
                None => {
                    return Err(self.err(Some(span), format!("{bp}address: missing required field")))
                }
                Some(a) => {
                    let address = self.addr(&bp, "address", a)?;
                    if address.is_ipv4() != vip.is_ipv4() {
                        return Err(self.err(
                            Some(a.span()),
                            format!(
                                "{bp}address: {} address {address} for {} vip {vip} (backends \
                                 must be in the vip's address family)",
                                family(address),
                                family(vip)
                            ),
                        ));
                    }
                    if address == vip {
                        return Err(self.err(
                            Some(a.span()),
                            format!("{bp}address: {address} is the service's own vip"),
                        ));
                    }
                    if !seen.insert(address) {
                        let k = backends.iter().position(|b| b.address == address);
                        return Err(self.err(
                            Some(a.span()),
                            format!(
                                "{bp}address: duplicate backend {address} (also backend[{}])",
                                k.unwrap_or(0)
                            ),
                        ));
                    }
                    address
                }
            };
            let weight = match &rb.weight {
                None => DEFAULT_WEIGHT,
                Some(w) => ranged(self, &bp, "weight", w, 0, MAX_WEIGHT as u64)?,
            };
            let state = spelled(
                self,
                &bp,
                "state",
                &rb.state,
                AdminState::from_str,
                AdminState::Ready,
            )?;
            let check_override = match &rb.check {
                None => None,
                Some(rc) => Some(self.check_spec(&format!("{bp}check."), rc)?),
            };
            let effective = CheckSpec::merged(check.as_ref(), check_override.as_ref());
            let resolved = match effective {
                None => None,
                Some(spec) => spec.resolve(port).map_err(|e| {
                    let span = rb.check.as_ref().map_or(span.clone(), |c| c.span());
                    self.err(Some(span), format!("{bp}check.{e}"))
                })?,
            };
            backends.push(BackendCfg {
                address,
                weight,
                state,
                check_override,
                check: resolved,
            });
        }

        Ok(ServiceCfg {
            name,
            vip,
            port,
            protocol,
            hash,
            forwarding,
            table_size,
            check,
            backends,
        })
    }

    /// Field-level validation of a `check` table (merged-level rules are in
    /// [`CheckSpec::resolve`]). `prefix` ends with `check.`.
    fn check_spec(&self, prefix: &str, rc: &Spanned<RawCheck>) -> Result<CheckSpec, ConfigError> {
        let rc = rc.get_ref();
        let p = prefix;
        let kind = match &rc.kind {
            None => None,
            Some(k) => Some(
                CheckType::from_str(k.get_ref())
                    .map_err(|e| self.err(Some(k.span()), format!("{p}type: {e}")))?,
            ),
        };
        let dur = |field: &str, v: &Field<String>, min: Duration| -> Result<_, ConfigError> {
            v.as_ref()
                .map(|v| duration_field(self, p, field, v, min, MAX_CHECK_INTERVAL))
                .transpose()
        };
        let count = |field: &str, v: &Field<i64>| -> Result<_, ConfigError> {
            v.as_ref()
                .map(|v| ranged(self, p, field, v, 1, MAX_RISE_FALL as u64))
                .transpose()
        };
        let path = match &rc.path {
            Some(v)
                if !v.get_ref().starts_with('/') || v.get_ref().contains(char::is_whitespace) =>
            {
                return Err(self.err(
                    Some(v.span()),
                    format!(
                        "{p}path: {:?} must start with '/' and contain no whitespace",
                        v.get_ref()
                    ),
                ))
            }
            v => v.as_ref().map(|v| v.get_ref().clone()),
        };
        let host = match &rc.host {
            Some(v) if v.get_ref().is_empty() || v.get_ref().contains(char::is_whitespace) => {
                return Err(self.err(
                    Some(v.span()),
                    format!(
                        "{p}host: {:?} must be non-empty without whitespace",
                        v.get_ref()
                    ),
                ))
            }
            v => v.as_ref().map(|v| v.get_ref().clone()),
        };
        let expect_status = match &rc.expect_status {
            None => None,
            Some(v) => {
                let parsed = match v.get_ref() {
                    RawStatus::Code(c) => u16::try_from(*c)
                        .ok()
                        .and_then(|c| parse_status_range(&c.to_string())),
                    RawStatus::Range(r) => parse_status_range(r),
                };
                let shown = match v.get_ref() {
                    RawStatus::Code(c) => c.to_string(),
                    RawStatus::Range(r) => format!("{r:?}"),
                };
                Some(parsed.ok_or_else(|| {
                    self.err(
                        Some(v.span()),
                        format!(
                            "{p}expect_status: invalid status {shown}, expected a status \
                             100..=599 or a range such as \"200-399\""
                        ),
                    )
                })?)
            }
        };
        let command = match &rc.command {
            None => None,
            Some(v) => {
                let c = match v.get_ref() {
                    RawCommand::Shell(s) => ExecCommand::Shell(s.clone()),
                    RawCommand::Argv(a) => ExecCommand::Argv(a.clone()),
                };
                let empty = match &c {
                    ExecCommand::Shell(s) => s.trim().is_empty(),
                    ExecCommand::Argv(a) => a.first().is_none_or(|p| p.is_empty()),
                };
                if empty {
                    return Err(self.err(Some(v.span()), format!("{p}command: must not be empty")));
                }
                Some(c)
            }
        };
        Ok(CheckSpec {
            kind,
            interval: dur("interval", &rc.interval, MIN_CHECK_INTERVAL)?,
            timeout: dur("timeout", &rc.timeout, Duration::from_millis(1))?,
            rise: count("rise", &rc.rise)?,
            fall: count("fall", &rc.fall)?,
            port: rc
                .port
                .as_ref()
                .map(|v| ranged(self, p, "port", v, 1, u16::MAX as u64).map(|n| n as u16))
                .transpose()?,
            path,
            host,
            expect_status,
            payload: rc.payload.as_ref().map(|v| v.get_ref().clone()),
            expect: rc.expect.as_ref().map(|v| v.get_ref().clone()),
            command,
            dynamic: rc.dynamic.as_ref().map(|v| *v.get_ref()),
        })
    }

    fn addr(&self, prefix: &str, field: &str, v: &Spanned<String>) -> Result<IpAddr, ConfigError> {
        let ip: IpAddr = v.get_ref().parse().map_err(|_| {
            self.err(
                Some(v.span()),
                format!("{prefix}{field}: invalid IP address {:?}", v.get_ref()),
            )
        })?;
        check_addr(ip)
            .map_err(|why| self.err(Some(v.span()), format!("{prefix}{field}: {ip}: {why}")))?;
        Ok(ip)
    }
}

// --- writing ------------------------------------------------------------------------------

/// A TOML string literal (quoted and escaped).
fn quote(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

impl Config {
    /// The configuration as a TOML document that [`Config::from_toml_str`] reads back as an
    /// equal `Config`. The runtime API validates a change by editing this document and parsing
    /// it whole, so the file and the API share one rule set. Every struct is destructured
    /// exhaustively: a new field does not compile until it is written here too.
    pub fn to_toml(&self) -> String {
        use std::fmt::Write as _;
        let Config {
            interface,
            xdp_mode,
            udp_timeout,
            conntrack_size,
            api_socket,
            metrics_address,
            services,
            farm,
        } = self;
        let mut s = String::new();
        let _ = writeln!(s, "interface = {}", quote(interface));
        let _ = writeln!(s, "xdp_mode = {}", quote(xdp_mode.as_str()));
        let _ = writeln!(s, "udp_timeout = {}", quote(&format_duration(*udp_timeout)));
        let _ = writeln!(s, "conntrack_size = {conntrack_size}");
        let _ = writeln!(s, "api_socket = {}", quote(&api_socket.to_string_lossy()));
        let metrics = metrics_address.map_or("off".to_string(), |a| a.to_string());
        let _ = writeln!(s, "metrics_address = {}", quote(&metrics));
        for svc in services {
            let ServiceCfg {
                name,
                vip,
                port,
                protocol,
                hash,
                forwarding,
                table_size,
                check,
                backends,
            } = svc;
            let _ = writeln!(s, "\n[[service]]");
            let _ = writeln!(s, "name = {}", quote(name));
            let _ = writeln!(s, "vip = {}", quote(&vip.to_string()));
            let _ = writeln!(s, "port = {port}");
            let _ = writeln!(s, "protocol = {}", quote(protocol.as_str()));
            let _ = writeln!(s, "hash = {}", quote(hash_mode_name(*hash)));
            let _ = writeln!(s, "forwarding = {}", quote(forwarding.as_str()));
            let _ = writeln!(s, "table_size = {table_size}");
            if let Some(c) = check {
                let _ = writeln!(s, "check = {}", c.to_inline_toml());
            }
            for b in backends {
                let BackendCfg {
                    address,
                    weight,
                    state,
                    check_override,
                    check: _, // derived from the service's and the backend's tables
                } = b;
                let _ = writeln!(s, "\n  [[service.backend]]");
                let _ = writeln!(s, "  address = {}", quote(&address.to_string()));
                let _ = writeln!(s, "  weight = {weight}");
                let _ = writeln!(s, "  state = {}", quote(state.as_str()));
                if let Some(c) = check_override {
                    let _ = writeln!(s, "  check = {}", c.to_inline_toml());
                }
            }
        }
        if let Some(f) = farm {
            s += &f.to_toml();
        }
        s
    }
}

impl CheckSpec {
    /// `{ type = "tcp", interval = "2s", ... }` with the fields that are set.
    pub fn to_inline_toml(&self) -> String {
        let CheckSpec {
            kind,
            interval,
            timeout,
            rise,
            fall,
            port,
            path,
            host,
            expect_status,
            payload,
            expect,
            command,
            dynamic,
        } = self;
        let mut f: Vec<String> = Vec::new();
        if let Some(k) = kind {
            f.push(format!("type = {}", quote(k.as_str())));
        }
        if let Some(d) = interval {
            f.push(format!("interval = {}", quote(&format_duration(*d))));
        }
        if let Some(d) = timeout {
            f.push(format!("timeout = {}", quote(&format_duration(*d))));
        }
        if let Some(n) = rise {
            f.push(format!("rise = {n}"));
        }
        if let Some(n) = fall {
            f.push(format!("fall = {n}"));
        }
        if let Some(n) = port {
            f.push(format!("port = {n}"));
        }
        if let Some(v) = path {
            f.push(format!("path = {}", quote(v)));
        }
        if let Some(v) = host {
            f.push(format!("host = {}", quote(v)));
        }
        if let Some((lo, hi)) = expect_status {
            f.push(format!("expect_status = {}", quote(&format!("{lo}-{hi}"))));
        }
        if let Some(v) = payload {
            f.push(format!("payload = {}", quote(v)));
        }
        if let Some(v) = expect {
            f.push(format!("expect = {}", quote(v)));
        }
        match command {
            None => {}
            Some(ExecCommand::Shell(c)) => f.push(format!("command = {}", quote(c))),
            Some(ExecCommand::Argv(a)) => f.push(format!(
                "command = [{}]",
                a.iter().map(|x| quote(x)).collect::<Vec<_>>().join(", ")
            )),
        }
        if let Some(v) = dynamic {
            f.push(format!("dynamic = {v}"));
        }
        format!("{{ {} }}", f.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const EXAMPLE: &str = include_str!("../../../examples/farmlb.toml");

    const BASE: &str = "interface = \"eth0\"\n";

    /// The one-line message of a config that must fail; checks it names `field`.
    fn error(src: &str, field: &str) -> String {
        let e = Config::from_toml_str(src).expect_err("config should be rejected");
        let msg = e.to_string();
        assert!(!msg.contains('\n'), "multi-line error: {msg:?}");
        assert!(msg.contains(field), "{msg:?} does not name {field:?}");
        msg
    }

    fn svc(body: &str) -> String {
        format!("{BASE}\n[[service]]\nname = \"web\"\nvip = \"10.0.0.1\"\nport = 80\n{body}")
    }

    #[test]
    fn example_file_parses() {
        let c = Config::from_toml_str(EXAMPLE).unwrap();
        assert_eq!(c.interface, "eth0");
        assert_eq!(c.xdp_mode, XdpModeCfg::Auto);
        assert_eq!(c.udp_timeout, Duration::from_secs(30));
        assert_eq!(c.conntrack_size, 1_048_576);
        assert_eq!(c.services.len(), 2);
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
    fn unknown_field_reports_position() {
        let src = svc("[[service.backend]]\naddress = \"10.0.0.2\"\n  weigth = 3\n");
        let msg = error(&src, "weigth");
        assert_eq!(
            msg,
            "line 9, column 3: unknown field \"weigth\", expected one of \"address\", \"weight\", \"state\", \"check\""
        );
        let msg = error(&format!("{BASE}colour = \"blue\""), "colour");
        assert!(
            msg.starts_with("line 2, column 1: unknown field \"colour\""),
            "{msg}"
        );
    }

    #[test]
    fn invalid_backend_address() {
        let src = format!(
            "{BASE}[[service]]\nname = \"api\"\nvip = \"10.0.0.1\"\nport = 81\n\
             [[service]]\nname = \"web\"\nvip = \"10.0.0.1\"\nport = 80\n\
             [[service.backend]]\naddress = \"10.0.0.x\"\n"
        );
        assert_eq!(
            error(&src, "backend[0].address"),
            "line 11, column 11: service[1] \"web\": backend[0].address: invalid IP address \
             \"10.0.0.x\""
        );
    }

    #[test]
    fn duplicate_services() {
        let two = |a: &str, b: &str| {
            format!("{BASE}[[service]]\nname = \"web\"\n{a}\n[[service]]\nname = \"api\"\n{b}\n")
        };
        let msg = error(
            &two(
                "vip = \"10.0.0.1\"\nport = 80",
                "vip = \"10.0.0.1\"\nport = 80\nprotocol = \"tcp\"",
            ),
            "service[1] \"api\"",
        );
        assert_eq!(
            msg,
            "line 6, column 1: service[1] \"api\": duplicate of service \"web\" (same vip, port \
             and protocol)"
        );
        // Same vip and port with another protocol, or another port, are distinct services.
        Config::from_toml_str(&two(
            "vip = \"10.0.0.1\"\nport = 80",
            "vip = \"10.0.0.1\"\nport = 80\nprotocol = \"udp\"",
        ))
        .unwrap();
        Config::from_toml_str(&two(
            "vip = \"10.0.0.1\"\nport = 80",
            "vip = \"10.0.0.1\"\nport = 0",
        ))
        .unwrap();
        // Duplicate names.
        let src = format!(
            "{BASE}[[service]]\nname = \"web\"\nvip = \"10.0.0.1\"\nport = 80\n\
             [[service]]\nname = \"web\"\nvip = \"10.0.0.2\"\nport = 80\n"
        );
        let msg = error(&src, "name");
        assert_eq!(
            msg,
            "line 7, column 8: service[1] \"web\": name: duplicate service name (also service[0])"
        );
    }

    #[test]
    fn backend_errors() {
        let msg = error(
            &svc("[[service.backend]]\naddress = \"10.0.0.2\"\n[[service.backend]]\naddress = \"10.0.0.2\""),
            "backend[1].address",
        );
        assert!(
            msg.ends_with("duplicate backend 10.0.0.2 (also backend[0])"),
            "{msg}"
        );
        let msg = error(
            &svc("[[service.backend]]\naddress = \"fd00::2\""),
            "backend[0].address",
        );
        assert!(
            msg.contains("IPv6 address fd00::2 for IPv4 vip 10.0.0.1"),
            "{msg}"
        );
        let msg = error(
            &svc("[[service.backend]]\naddress = \"10.0.0.1\""),
            "address",
        );
        assert!(msg.contains("own vip"), "{msg}");
        let msg = error(
            &svc("[[service.backend]]\nweight = 2"),
            "backend[0].address",
        );
        assert!(msg.contains("missing required field"), "{msg}");
        for w in ["65536", "-1"] {
            let msg = error(
                &svc(&format!(
                    "[[service.backend]]\naddress = \"10.0.0.2\"\nweight = {w}"
                )),
                "backend[0].weight",
            );
            assert!(
                msg.ends_with(&format!("{w} is out of range 0..=65535")),
                "{msg}"
            );
        }
        let c = Config::from_toml_str(&svc(
            "[[service.backend]]\naddress = \"10.0.0.2\"\nweight = 65535",
        ))
        .unwrap();
        assert_eq!(c.services[0].backends[0].weight, 65535);
        // Inline-table form, with a type error: the key is still named.
        let msg = error(
            &svc("backend = [{ address = \"10.0.0.2\", weight = \"2\" }]"),
            "weight",
        );
        assert!(msg.contains("expected an integer"), "{msg}");
    }

    #[test]
    fn table_size_errors() {
        for (v, want) in [
            ("65535", "table_size: 65535 is not prime"),
            ("5", "table_size: 5 is out of range 7..=1048573"),
            ("1048583", "table_size: 1048583 is out of range 7..=1048573"),
            ("0", "out of range"),
        ] {
            let msg = error(&svc(&format!("table_size = {v}")), "table_size");
            assert!(msg.contains(want), "{msg}");
        }
        for ok in [7, 1009, 1_048_573] {
            let c = Config::from_toml_str(&svc(&format!("table_size = {ok}"))).unwrap();
            assert_eq!(c.services[0].table_size, ok);
        }
    }

    #[test]
    fn service_field_errors() {
        let base = |body: &str| format!("{BASE}[[service]]\n{body}\n");
        let msg = error(&base("name = \"web\"\nport = 80"), "vip");
        assert_eq!(
            msg,
            "line 2, column 1: service[0] \"web\": vip: missing required field"
        );
        error(&base("name = \"web\"\nvip = \"10.0.0.1\""), "port");
        error(&base("vip = \"10.0.0.1\"\nport = 80"), "service[0]: name");
        for bad in ["", "a b", "wéb", "x/y"] {
            let msg = error(
                &base(&format!("name = \"{bad}\"\nvip = \"10.0.0.1\"\nport = 80")),
                "name",
            );
            assert!(msg.contains("invalid name"), "{msg}");
        }
        let long = "a".repeat(MAX_NAME_LEN + 1);
        error(
            &base(&format!("name = \"{long}\"\nvip = \"10.0.0.1\"\nport = 1")),
            "name",
        );
        let msg = error(
            &base("name = \"web\"\nvip = \"10.0.0.1\"\nport = 65536"),
            "port",
        );
        assert!(
            msg.ends_with("port: 65536 is out of range 0..=65535"),
            "{msg}"
        );
        let msg = error(
            &base("name = \"web\"\nvip = \"10.0.0.1\"\nport = \"80\""),
            "port",
        );
        assert_eq!(
            msg,
            "line 5, column 8: port: invalid type: string \"80\", expected an integer"
        );
        for (vip, why) in [
            ("10.0.0", "invalid IP address \"10.0.0\""),
            ("224.0.0.1", "multicast"),
            ("0.0.0.0", "unspecified"),
            ("255.255.255.255", "broadcast"),
            ("127.0.0.1", "loopback"),
            ("::ffff:10.0.0.1", "IPv4-mapped"),
        ] {
            let msg = error(
                &base(&format!("name = \"web\"\nvip = \"{vip}\"\nport = 80")),
                "service[0] \"web\": vip",
            );
            assert!(msg.contains(why), "{msg}");
        }
        for (field, value, expected) in [
            ("protocol", "sctp", "\"tcp\" or \"udp\""),
            (
                "hash",
                "dst-ip",
                "\"5-tuple\", \"src-ip\" or \"src-ip-port\"",
            ),
            ("forwarding", "nat", "\"dr\" or \"farm\""),
        ] {
            let msg = error(&svc(&format!("{field} = \"{value}\"")), field);
            assert!(
                msg.ends_with(&format!(
                    "service[0] \"web\": {field}: invalid value \"{value}\", expected {expected}"
                )),
                "{msg}"
            );
        }
        // `[service]` instead of `[[service]]`.
        let msg = error(&format!("{BASE}[service]\nname = \"web\""), "service");
        assert!(msg.contains("array of tables"), "{msg}");
    }

    #[test]
    fn global_field_errors() {
        let msg = error("xdp_mode = \"auto\"", "interface");
        assert_eq!(msg, "interface: missing required field");
        for bad in ["", "a/b", "eth 0", "averyveryverylongname", ".."] {
            error(&format!("interface = \"{bad}\""), "interface");
        }
        let msg = error(&format!("{BASE}xdp_mode = \"fast\""), "xdp_mode");
        assert_eq!(
            msg,
            "line 2, column 12: xdp_mode: invalid value \"fast\", expected \"auto\", \"native\" \
             or \"generic\""
        );
        for bad in ["30", "abc", "1.5s", "30 s", "s", "", "10d", "-1s"] {
            let msg = error(&format!("{BASE}udp_timeout = \"{bad}\""), "udp_timeout");
            assert!(msg.contains("invalid duration"), "{msg}");
        }
        for bad in ["0s", "0ms", "25h", "24h1ms"] {
            let msg = error(&format!("{BASE}udp_timeout = \"{bad}\""), "udp_timeout");
            assert!(msg.contains("out of range"), "{msg}");
        }
        let msg = error(&format!("{BASE}udp_timeout = 30"), "udp_timeout");
        assert!(msg.contains("expected a string"), "{msg}");
        for bad in ["1023", "0", "-5", "67108865"] {
            let msg = error(&format!("{BASE}conntrack_size = {bad}"), "conntrack_size");
            assert!(msg.contains("out of range 1024..=67108864"), "{msg}");
        }
        let msg = error(
            &format!("{BASE}conntrack_size = 99999999999999999999"),
            "conntrack_size",
        );
        assert!(
            msg.starts_with("line 2, column 18: conntrack_size:"),
            "{msg}"
        );
        let c = Config::from_toml_str(&format!("{BASE}conntrack_size = 1024")).unwrap();
        assert_eq!(c.conntrack_size, 1024);
    }

    #[test]
    fn syntax_errors_are_one_line() {
        for src in [
            "interface = \"eth0\n",
            "interface = \"eth0\"\ninterface = \"eth1\"\n",
            "interface = \n",
            "[[service]\n",
            "interface = \"eth0\"\n[[service]]\nname = web\n",
        ] {
            let e = Config::from_toml_str(src).unwrap_err();
            let msg = e.to_string();
            assert!(!msg.contains('\n'), "{msg:?}");
            assert!(msg.starts_with("line "), "{msg:?}");
            assert!(e.position().is_some());
        }
        let msg = error("interface = \"eth0\"\ninterface = \"eth1\"\n", "interface");
        assert!(msg.starts_with("line 2, column 1:"), "{msg}");
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
    fn too_many_backends() {
        let mut src = svc("");
        for i in 0..lb_common::MAX_BACKENDS {
            src.push_str(&format!(
                "[[service.backend]]\naddress = \"10.{}.{}.{}\"\n",
                1 + (i >> 16) as u8,
                (i >> 8) as u8,
                i as u8
            ));
        }
        let msg = error(&src, "backend");
        assert!(msg.contains("at most 4095"), "{msg}");
    }
}

/// Health checks, backend states, API/metrics settings and `to_toml`.
#[cfg(test)]
mod control_tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../../examples/farmlb.toml");

    fn svc(body: &str) -> String {
        format!("interface = \"eth0\"\n[[service]]\nname = \"web\"\nvip = \"10.0.0.1\"\nport = 80\n{body}")
    }

    fn error(src: &str, field: &str) -> String {
        let e = Config::from_toml_str(src).expect_err("config should be rejected");
        let msg = e.to_string();
        assert!(!msg.contains('\n'), "multi-line error: {msg:?}");
        assert!(msg.contains(field), "{msg:?} does not name {field:?}");
        msg
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
}
