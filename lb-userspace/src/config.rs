//! The TOML configuration file (`examples/farmlb.toml`, `docs/config.md`).
//!
//! Parsing goes through "raw" structs whose fields keep their source spans, then every
//! field is checked and converted here, so each error is one line naming the file position
//! and the field, e.g. `farmlb.toml line 14, column 13: service[1] "web":
//! backend[0].address: invalid IP address "10.0.0.x"` (on one line).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;
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

/// Forwarding method. Only direct routing for now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Forwarding {
    /// Direct routing: rewrite the destination MAC, backends hold the VIP themselves.
    #[default]
    Dr,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub interface: String,
    pub xdp_mode: XdpModeCfg,
    /// Idle timeout of UDP conntrack entries.
    pub udp_timeout: Duration,
    /// Maximum conntrack entries.
    pub conntrack_size: u32,
    pub services: Vec<ServiceCfg>,
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
    pub backends: Vec<BackendCfg>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendCfg {
    pub address: IpAddr,
    /// 0..=65535; 0 = drain (no new flows, established ones stay).
    pub weight: u32,
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
spelled!(Forwarding, r#""dr""#, "dr" => Forwarding::Dr);

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
    #[serde(default, rename = "service")]
    services: Vec<Spanned<RawService>>,
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
    #[serde(default, rename = "backend")]
    backends: Vec<Spanned<RawBackend>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    address: Field<String>,
    weight: Field<i64>,
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

        Ok(Config {
            interface,
            xdp_mode,
            udp_timeout,
            conntrack_size,
            services,
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
            backends.push(BackendCfg { address, weight });
        }

        Ok(ServiceCfg {
            name,
            vip,
            port,
            protocol,
            hash,
            forwarding,
            table_size,
            backends,
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const EXAMPLE: &str = include_str!("../../examples/farmlb.toml");

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
            "line 9, column 3: unknown field \"weigth\", expected \"address\" or \"weight\""
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
            ("forwarding", "nat", "\"dr\""),
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
                "{} line 9, column 3: unknown field \"weigth\", expected \"address\" or \"weight\"",
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
