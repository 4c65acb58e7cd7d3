//! The file as written: serde structs whose fields keep their source spans, and [`Ctx`], the
//! field validators that turn them into the validated types, each error one line naming the
//! position and the field. The runtime API's request bodies go through the same validators
//! (`edit.rs`), with [`Naming::Named`]: no positions, no indices.

use std::borrow::Borrow;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use lb_common::HashMode;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use toml::Spanned;

use super::announce::RawAnnounce;
use super::check::RawCheck;
use super::farm::RawFarm;
use super::rules::{self, InConfig, InService, Naming};
use super::*;
use crate::maglev::is_prime;

pub(super) type Field<T> = Option<Spanned<T>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    interface: Field<String>,
    xdp_mode: Field<String>,
    udp_timeout: Field<String>,
    conntrack_size: Field<i64>,
    flood_guard_rate: Field<i64>,
    api_socket: Field<String>,
    metrics_address: Field<String>,
    pin_path: Field<String>,
    state_file: Field<String>,
    gue_port: Field<i64>,
    tunnel_source: Field<OneOrMany>,
    #[serde(default, rename = "service")]
    services: Vec<Spanned<RawService>>,
    farm: Option<Spanned<RawFarm>>,
    announce: Option<Spanned<RawAnnounce>>,
}

/// A string or an array of strings.
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// `tunnel_source`: prefixes, at most one per address family.
fn tunnel_sources(v: &OneOrMany) -> Result<Vec<Cidr>, String> {
    let list = match v {
        OneOrMany::One(s) => vec![s.clone()],
        OneOrMany::Many(l) => l.clone(),
    };
    let cidrs = list
        .iter()
        .map(|s| s.parse::<Cidr>())
        .collect::<Result<Vec<_>, _>>()?;
    for fam in [true, false] {
        if cidrs.iter().filter(|c| c.addr.is_ipv4() == fam).count() > 1 {
            return Err(format!(
                "more than one {} prefix (at most one per address family)",
                if fam { "IPv4" } else { "IPv6" }
            ));
        }
    }
    Ok(cidrs)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawService {
    name: Field<String>,
    vip: Field<String>,
    port: Field<i64>,
    protocol: Field<String>,
    hash: Field<String>,
    forwarding: Field<String>,
    gue_port: Field<i64>,
    table_size: Field<i64>,
    check: Field<RawCheck>,
    #[serde(default, rename = "backend")]
    backends: Vec<Spanned<RawBackend>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackend {
    address: Field<String>,
    weight: Field<i64>,
    state: Field<String>,
    check: Field<RawCheck>,
}

// --- positions and messages ---------------------------------------------------------------

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

/// The source being validated and how its errors name things.
pub(super) struct Ctx<'a> {
    src: &'a str,
    file: Option<PathBuf>,
    naming: Naming,
}

impl<'a> Ctx<'a> {
    pub(super) fn new(src: &'a str, file: Option<PathBuf>, naming: Naming) -> Self {
        Self { src, file, naming }
    }

    /// The whole source, deserialized.
    pub(super) fn parse<T: DeserializeOwned>(&self) -> Result<T, ConfigError> {
        toml::from_str(self.src).map_err(|e| self.toml_err(e))
    }

    pub(super) fn err(
        &self,
        span: Option<Range<usize>>,
        message: impl Into<String>,
    ) -> ConfigError {
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
                "data did not match any variant of untagged enum OneOrMany",
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

    /// `v` read by `read`, which says what is wrong with it; the error names `{prefix}{key}`
    /// at the value.
    pub(super) fn one<R: Borrow<Q>, Q: ?Sized, T>(
        &self,
        prefix: &str,
        key: &str,
        v: &Spanned<R>,
        read: impl FnOnce(&Q) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        read(v.get_ref().borrow())
            .map_err(|e| self.err(Some(v.span()), format!("{prefix}{key}: {e}")))
    }

    /// An optional field read by `read` (see [`Ctx::one`]).
    pub(super) fn opt<R: Borrow<Q>, Q: ?Sized, T>(
        &self,
        prefix: &str,
        key: &str,
        v: &Field<R>,
        read: impl FnOnce(&Q) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        v.as_ref()
            .map(|v| self.one(prefix, key, v, read))
            .transpose()
    }

    /// A required field of the table at `table` read by `read` (see [`Ctx::one`]).
    pub(super) fn req<R: Borrow<Q>, Q: ?Sized, T>(
        &self,
        prefix: &str,
        key: &str,
        v: &Field<R>,
        table: Option<Range<usize>>,
        read: impl FnOnce(&Q) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        self.opt(prefix, key, v, read)?
            .ok_or_else(|| self.err(table, format!("{prefix}{key}: missing required field")))
    }
}

// --- the file's tables ----------------------------------------------------------------------

impl Ctx<'_> {
    pub(super) fn config(&self, raw: &RawConfig) -> Result<Config, ConfigError> {
        let interface = self.req("", "interface", &raw.interface, None, interface)?;
        let xdp_mode = self.opt("", "xdp_mode", &raw.xdp_mode, spelled(XdpModeCfg::from_str))?;
        let udp_timeout = positive_duration(MAX_UDP_TIMEOUT);
        let udp_timeout = self.opt("", "udp_timeout", &raw.udp_timeout, udp_timeout)?;
        let conntrack_size = int(MIN_CONNTRACK_SIZE, MAX_CONNTRACK_SIZE);
        let conntrack_size = self.opt("", "conntrack_size", &raw.conntrack_size, conntrack_size)?;
        let flood = int(0u32, u32::MAX);
        let flood_guard_rate = self.opt("", "flood_guard_rate", &raw.flood_guard_rate, flood)?;
        let api_socket = self.opt("", "api_socket", &raw.api_socket, api_socket)?;
        let metrics = self.opt("", "metrics_address", &raw.metrics_address, metrics_address)?;
        let pin_path = self.opt("", "pin_path", &raw.pin_path, absolute_path)?;
        let state_file = self.opt("", "state_file", &raw.state_file, absolute_path)?;
        let gue_port = self.opt("", "gue_port", &raw.gue_port, int(1, u16::MAX))?;
        let tunnel_source = self.opt("", "tunnel_source", &raw.tunnel_source, tunnel_sources)?;
        let services = (raw.services.iter().enumerate())
            .map(|(i, rs)| self.service(i, rs))
            .collect::<Result<Vec<_>, _>>()?;
        let farm = raw.farm.as_ref().map(|f| self.farm(f)).transpose()?;
        let announce = (raw.announce.as_ref())
            .map(|a| self.announce(a, farm.is_some()))
            .transpose()?;
        rules::check_services(&services, farm.as_ref(), self.naming).map_err(|(at, e)| {
            let service = |i: usize| raw.services[i].get_ref();
            let span = match at {
                InConfig::Service(i) => Some(raw.services[i].span()),
                InConfig::Name(i) => service(i).name.as_ref().map(Spanned::span),
                InConfig::Forwarding(i) => service(i).forwarding.as_ref().map(Spanned::span),
                InConfig::FarmCheck => raw
                    .farm
                    .as_ref()
                    .and_then(|f| f.get_ref().check_table())
                    .map(Spanned::span),
            };
            self.err(span, e.to_string())
        })?;
        let pin_path = pin_path.unwrap_or_else(|| Path::new(DEFAULT_PIN_DIR).join(&interface));
        let state_file = state_file.unwrap_or_else(|| {
            Path::new(DEFAULT_STATE_DIR).join(format!("{interface}.state.json"))
        });
        Ok(Config {
            interface,
            xdp_mode: xdp_mode.unwrap_or_default(),
            udp_timeout: udp_timeout.unwrap_or(DEFAULT_UDP_TIMEOUT),
            conntrack_size: conntrack_size.unwrap_or(DEFAULT_CONNTRACK_SIZE),
            flood_guard_rate: flood_guard_rate.unwrap_or(lb_common::DEFAULT_FLOOD_RATE),
            api_socket: api_socket.unwrap_or_else(|| PathBuf::from(DEFAULT_API_SOCKET)),
            metrics_address: metrics
                .unwrap_or_else(|| Some(DEFAULT_METRICS_ADDRESS.parse().expect("valid default"))),
            pin_path,
            state_file,
            gue_port: gue_port.unwrap_or(lb_common::DEFAULT_GUE_PORT),
            tunnel_source: tunnel_source.unwrap_or_default(),
            services,
            farm,
            announce,
        })
    }

    /// Service `i` with its backends, each admitted by [`rules::admit`].
    pub(super) fn service(
        &self,
        i: usize,
        rs: &Spanned<RawService>,
    ) -> Result<ServiceCfg, ConfigError> {
        let table = Some(rs.span());
        let rs = rs.get_ref();
        let unnamed = format!("{}: ", self.naming.service(i, None));
        let name = self.req(&unnamed, "name", &rs.name, table.clone(), service_name)?;
        let p = format!("{}: ", self.naming.service(i, Some(&name)));
        let vip = self.req(&p, "vip", &rs.vip, table.clone(), ip)?;
        let port = self.req(&p, "port", &rs.port, table, int(0, u16::MAX))?;
        let protocol = self.opt(&p, "protocol", &rs.protocol, spelled(Protocol::from_str))?;
        let hash = self.opt(&p, "hash", &rs.hash, spelled(parse_hash_mode))?;
        let forwarding = spelled(Forwarding::from_str);
        let forwarding = self.opt(&p, "forwarding", &rs.forwarding, forwarding)?;
        let gue_port = self.opt(&p, "gue_port", &rs.gue_port, int(1, u16::MAX))?;
        let fwd = forwarding.unwrap_or_default();
        if gue_port.is_some() && fwd != Forwarding::Gue {
            let span = rs.gue_port.as_ref().map(Spanned::span);
            let msg = format!("{p}gue_port: only for forwarding = \"gue\" (this one is \"{fwd}\")");
            return Err(self.err(span, msg));
        }
        let table_size = self.opt(&p, "table_size", &rs.table_size, table_size)?;
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
        let mut svc = ServiceCfg {
            name,
            vip,
            port,
            protocol: protocol.unwrap_or_default(),
            hash: hash.unwrap_or(HashMode::FiveTuple),
            forwarding: forwarding.unwrap_or_default(),
            gue_port,
            table_size: table_size.unwrap_or(DEFAULT_TABLE_SIZE),
            check,
            backends: Vec::with_capacity(rs.backends.len()),
        };
        for (j, rb) in rs.backends.iter().enumerate() {
            let b = self.backend(&self.naming.backend(i, &svc.name, j), rb)?;
            let b = rules::admit(&svc, b, self.naming, i).map_err(|(at, e)| {
                let span = match at {
                    InService::Table => None,
                    InService::Address => rb.get_ref().address.as_ref().map(Spanned::span),
                    InService::Check => rb.get_ref().check.as_ref().map(Spanned::span),
                };
                self.err(span.or(Some(rb.span())), e.to_string())
            })?;
            svc.backends.push(b);
        }
        Ok(svc)
    }

    /// A backend's own fields; `prefix` ends with `backend[j].`. Its `check` is left for
    /// [`rules::admit`], which merges the service's.
    pub(super) fn backend(
        &self,
        prefix: &str,
        rb: &Spanned<RawBackend>,
    ) -> Result<BackendCfg, ConfigError> {
        let p = prefix;
        let r = rb.get_ref();
        let weight = self.opt(p, "weight", &r.weight, int(0, MAX_WEIGHT))?;
        let state = self.opt(p, "state", &r.state, spelled(AdminState::from_str))?;
        let check_override = (r.check.as_ref())
            .map(|rc| self.check_spec(&format!("{p}check."), rc))
            .transpose()?;
        Ok(BackendCfg {
            address: self.req(p, "address", &r.address, Some(rb.span()), ip)?,
            weight: weight.unwrap_or(DEFAULT_WEIGHT),
            state: state.unwrap_or_default(),
            check_override,
            check: None,
        })
    }
}

// --- values ---------------------------------------------------------------------------------
//
// Readers: the raw value to the validated one, or what is wrong with it; `Ctx` names the
// field and the position.

/// An integer in `min..=max`.
pub(super) fn int<T>(min: T, max: T) -> impl Fn(&i64) -> Result<T, String>
where
    T: Copy + Into<i64> + TryFrom<i64> + fmt::Display,
{
    move |&n| {
        (min.into()..=max.into())
            .contains(&n)
            .then(|| T::try_from(n).ok())
            .flatten()
            .ok_or_else(|| format!("{n} is out of range {min}..={max}"))
    }
}

/// One of the spellings `parse` accepts.
pub(super) fn spelled<T>(
    parse: impl Fn(&str) -> Result<T, BadValue>,
) -> impl Fn(&str) -> Result<T, String> {
    move |s| parse(s).map_err(|e| e.to_string())
}

/// A duration in `min..=max`.
pub(super) fn duration(min: Duration, max: Duration) -> impl Fn(&str) -> Result<Duration, String> {
    move |s| {
        let d = parse_duration(s).ok_or_else(|| {
            format!(
                "invalid duration {s:?}, expected an integer with a unit (ms, s, m, h), e.g. \
                 \"500ms\", \"30s\", \"2m\""
            )
        })?;
        if d < min || d > max {
            return Err(format!(
                "{s:?} is out of range {}..={}",
                format_duration(min),
                format_duration(max)
            ));
        }
        Ok(d)
    }
}

/// A duration more than 0 (they have millisecond resolution) and at most `max`.
pub(super) fn positive_duration(max: Duration) -> impl Fn(&str) -> Result<Duration, String> {
    duration(Duration::from_millis(1), max)
}

fn interface(name: &str) -> Result<String, String> {
    check_interface(name).map_err(|why| format!("{why}: {name:?}"))?;
    Ok(name.to_string())
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

/// A VIP or backend address (see [`check_addr`]).
fn ip(s: &str) -> Result<IpAddr, String> {
    let ip: IpAddr = s.parse().map_err(|_| format!("invalid IP address {s:?}"))?;
    check_addr(ip).map_err(|why| format!("{ip}: {why}"))?;
    Ok(ip)
}

fn service_name(s: &str) -> Result<String, String> {
    let valid = !s.is_empty()
        && s.len() <= MAX_NAME_LEN
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !valid {
        return Err(format!(
            "invalid name {s:?}, expected 1 to {MAX_NAME_LEN} of A-Z a-z 0-9 _ . -"
        ));
    }
    Ok(s.to_string())
}

fn table_size(n: &i64) -> Result<u32, String> {
    let n = int(MIN_TABLE_SIZE, MAX_TABLE_SIZE)(n)?;
    if !is_prime(n) {
        return Err(format!("{n} is not prime (e.g. 1009, 65537, 131071)"));
    }
    Ok(n)
}

fn absolute_path(p: &str) -> Result<PathBuf, String> {
    if !p.starts_with('/') || p.contains('\0') || p.ends_with('/') && p.len() > 1 {
        return Err(format!(
            "{p:?} must be an absolute path (not ending in '/')"
        ));
    }
    Ok(PathBuf::from(p))
}

fn api_socket(p: &str) -> Result<PathBuf, String> {
    if !p.starts_with('/') || p.len() > MAX_SOCKET_PATH || p.contains('\0') {
        return Err(format!(
            "{p:?} must be an absolute path of at most {MAX_SOCKET_PATH} bytes"
        ));
    }
    Ok(PathBuf::from(p))
}

/// `None` for `"off"`.
fn metrics_address(s: &str) -> Result<Option<SocketAddr>, String> {
    if s == "off" {
        return Ok(None);
    }
    s.parse().map(Some).map_err(|_| {
        format!(
            "invalid address {s:?}, expected IP:port (e.g. \"{DEFAULT_METRICS_ADDRESS}\", \
             \"[::1]:9740\") or \"off\""
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::*;

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
            ("forwarding", "nat", "\"dr\", \"farm\", \"ipip\" or \"gue\""),
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
