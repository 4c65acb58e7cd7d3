//! Prometheus metrics (`GET /metrics` on `metrics_address`), encoded with `prometheus-client`.
//! A client whose `Accept` names `application/openmetrics-text` (Prometheus does) gets
//! OpenMetrics; any other (curl, `promtool check metrics`) the classic text format 0.0.4.
//!
//! Counters that live in BPF maps and the director's state are read fresh on every scrape:
//! the scrape handler asks the owner task for a [`StatusView`] and encodes it. Only the health
//! check histogram and result counters are kept here ([`LiveMetrics`]), fed as probes finish.
//!
//! | Metric | Labels |
//! |---|---|
//! | `farmlb_service_packets_total`, `farmlb_service_bytes_total` | service |
//! | `farmlb_backend_packets_total`, `farmlb_backend_bytes_total` | service, backend |
//! | `farmlb_backend_up` (1 = passes its check or unchecked) | service, backend |
//! | `farmlb_backend_weight` (effective: what the Maglev table uses) | service, backend |
//! | `farmlb_backend_configured_weight` (runtime, dynamic or file weight) | service, backend |
//! | `farmlb_backend_state` (1 for the current state) | service, backend, state |
//! | `farmlb_service_backends`, `farmlb_service_up_backends`, `farmlb_service_usable_backends` | service |
//! | `farmlb_check_duration_seconds` (histogram) | service, backend |
//! | `farmlb_checks_total` | service, backend, result (`up`/`down`/`error`: a local fault, counted neither way) |
//! | `farmlb_conntrack_lookups_total` | result (`hit`, `miss_syn`, `miss_other`) |
//! | `farmlb_drops_total` | reason (`no_backend`, `malformed`, `fragment`, `ip_options`, `farm_not_owner`, ...): every drop, also those before a service is known |
//! | `farmlb_service_drops_total` | service, reason (`no_backend`; farm services also `farm_not_owner`, `farm_no_socket`, `farm_lease`) |
//! | `farmlb_passed_total` | reason (`not_ip`, `not_vip`, `malformed`, ...) |
//! | `farmlb_forwarded_packets_total` | |
//! | `farmlb_datapath_events_total` (any other data-plane counter) | event |
//! | `farmlb_conntrack_entries`, `farmlb_conntrack_capacity`, `farmlb_conntrack_evicted_at_most` | |
//! | `farmlb_backend_flows` (conntrack entries naming the backend, counted every 30 s) | service, backend |
//! | `farmlb_build_info` (always 1) | version, layout |
//! | `farmlb_config_last_reload_successful`, `farmlb_config_last_reload_success_timestamp_seconds` | |
//! | `farmlb_farm_member_up`, `farmlb_farm_member_power` (farm role) | node |
//! | `farmlb_farm_members`, `farmlb_farm_share`, `farmlb_farm_active` (farm role) | |
//! | `farmlb_farm_membership_rejected_total` (farm role) | reason (`auth`, `replay`, `unknown_source`) |
//! | `farmlb_vip_announced` (`[announce]`: 1 while the VIP's route is in the table) | vip |
//! | `farmlb_conntrack_sync_entries_total` (`[announce] sync`) | event (`sent`, `received`, `dropped`, `rejected`) |
//! | `farmlb_conntrack_sync_lag_seconds` (`[announce] sync`: the last batch's) | |

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

use crate::api::StatusView;
use crate::farm::FarmStatus;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub service: String,
    pub backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CheckLabels {
    pub service: String,
    pub backend: String,
    pub result: String,
}

fn check_histogram() -> Histogram {
    // 0.25 ms .. ~8 s.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.000_25, 2.0, 16,
    ))
}

/// Metrics updated as events happen (everything else is read at scrape time).
#[derive(Clone, Debug)]
pub struct LiveMetrics {
    pub check_duration: Family<BackendLabels, Histogram, fn() -> Histogram>,
    pub checks: Family<CheckLabels, Counter>,
}

impl Default for LiveMetrics {
    fn default() -> Self {
        Self {
            check_duration: Family::new_with_constructor(check_histogram),
            checks: Family::default(),
        }
    }
}

impl LiveMetrics {
    /// One probe: `result` is `up`, `down` or `error` (a local fault, see `health`).
    pub fn observe_check(&self, service: &str, backend: &str, result: &str, latency: Duration) {
        self.check_duration
            .get_or_create(&BackendLabels {
                service: service.into(),
                backend: backend.into(),
            })
            .observe(latency.as_secs_f64());
        self.checks
            .get_or_create(&CheckLabels {
                service: service.into(),
                backend: backend.into(),
                result: result.into(),
            })
            .inc();
    }

    /// Drop the series of a backend that is no longer checked.
    pub fn forget(&self, service: &str, backend: &str) {
        let l = BackendLabels {
            service: service.into(),
            backend: backend.into(),
        };
        self.check_duration.remove(&l);
        for result in ["up", "down"] {
            self.checks.remove(&CheckLabels {
                service: service.into(),
                backend: backend.into(),
                result: result.into(),
            });
        }
    }
}

/// Encodes a [`StatusView`] snapshot.
#[derive(Debug)]
struct Snapshot(StatusView);

type Labels<'a> = Vec<(&'static str, &'a str)>;

/// The `reason` label of a drop counter (`drop_no_backend` -> `no_backend`,
/// `farm_drop_not_owner` -> `farm_not_owner`); `None` for counters that are not drops.
fn drop_reason(stat: &str) -> Option<String> {
    if let Some(r) = stat.strip_prefix("drop_") {
        Some(r.to_string())
    } else {
        stat.strip_prefix("farm_drop_").map(|r| format!("farm_{r}"))
    }
}

fn family<'a, M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    rows: impl IntoIterator<Item = (Labels<'a>, M)>,
) -> std::fmt::Result {
    let mut rows = rows.into_iter().peekable();
    if rows.peek().is_none() {
        return Ok(());
    }
    let mut fam = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, m) in rows {
        m.encode(fam.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let v = &self.0;
        let counter = |n: u64| ConstCounter::new(n);
        let gauge = |n: i64| ConstGauge::new(n);
        fn svc(s: &str) -> Labels<'_> {
            vec![("service", s)]
        }
        family(
            &mut enc,
            "farmlb_service_packets",
            "Packets forwarded for the service",
            MetricType::Counter,
            v.services
                .iter()
                .map(|s| (svc(&s.name), counter(s.packets))),
        )?;
        family(
            &mut enc,
            "farmlb_service_bytes",
            "Bytes forwarded for the service",
            MetricType::Counter,
            v.services.iter().map(|s| (svc(&s.name), counter(s.bytes))),
        )?;
        let svc_drops: Vec<(&str, String, u64)> = v
            .services
            .iter()
            .flat_map(|s| {
                s.drops
                    .iter()
                    .filter_map(|(k, n)| Some((s.name.as_str(), drop_reason(k)?, *n)))
            })
            .collect();
        family(
            &mut enc,
            "farmlb_service_drops",
            "Packets of the service dropped, by reason",
            MetricType::Counter,
            svc_drops
                .iter()
                .map(|(s, r, n)| (vec![("service", *s), ("reason", r.as_str())], counter(*n))),
        )?;
        family(
            &mut enc,
            "farmlb_service_backends",
            "Backends configured",
            MetricType::Gauge,
            v.services
                .iter()
                .map(|s| (svc(&s.name), gauge(s.backends.len() as i64))),
        )?;
        family(
            &mut enc,
            "farmlb_service_up_backends",
            "Backends passing their health check (0 = every backend is down)",
            MetricType::Gauge,
            v.services
                .iter()
                .map(|s| (svc(&s.name), gauge(s.backends_up as i64))),
        )?;
        family(
            &mut enc,
            "farmlb_service_usable_backends",
            "Backends taking new flows (0 = new flows are dropped)",
            MetricType::Gauge,
            v.services
                .iter()
                .map(|s| (svc(&s.name), gauge(s.backends_usable as i64))),
        )?;

        let backends: Vec<(&str, String, &crate::api::BackendView)> = v
            .services
            .iter()
            .flat_map(|s| {
                s.backends
                    .iter()
                    .map(move |b| (s.name.as_str(), b.address.to_string(), b))
            })
            .collect();
        let labels = |s: &(&str, String, &crate::api::BackendView)| -> Vec<(&'static str, String)> {
            vec![("service", s.0.to_string()), ("backend", s.1.clone())]
        };
        let mut rows = |name: &str,
                        help: &str,
                        kind: MetricType,
                        f: &dyn Fn(&crate::api::BackendView) -> i64|
         -> std::fmt::Result {
            if backends.is_empty() {
                return Ok(());
            }
            let mut fam = enc.encode_descriptor(name, help, None, kind)?;
            for b in &backends {
                let l = labels(b);
                let value = f(b.2);
                match kind {
                    MetricType::Counter => counter(value as u64).encode(fam.encode_family(&l)?)?,
                    _ => gauge(value).encode(fam.encode_family(&l)?)?,
                }
            }
            Ok(())
        };
        rows(
            "farmlb_backend_packets",
            "Packets forwarded to the backend",
            MetricType::Counter,
            &|b| b.packets as i64,
        )?;
        rows(
            "farmlb_backend_bytes",
            "Bytes forwarded to the backend",
            MetricType::Counter,
            &|b| b.bytes as i64,
        )?;
        rows(
            "farmlb_backend_up",
            "1 if the backend passes its health check (or is not checked)",
            MetricType::Gauge,
            &|b| (b.health == "up") as i64,
        )?;
        rows(
            "farmlb_backend_weight",
            "Effective weight: what the Maglev table uses (0 unless ready and up)",
            MetricType::Gauge,
            &|b| b.effective_weight as i64,
        )?;
        rows(
            "farmlb_backend_configured_weight",
            "Weight before state and health: runtime, else dynamic check, else file",
            MetricType::Gauge,
            &|b| b.weight_runtime.or(b.weight_dynamic).unwrap_or(b.weight) as i64,
        )?;
        if v.conntrack.is_some() {
            rows(
                "farmlb_backend_flows",
                "Conntrack entries naming the backend at the last count, every 30 s (TCP entries \
                 stay until evicted: recently closed connections count too)",
                MetricType::Gauge,
                &|b| b.flows.unwrap_or(0) as i64,
            )?;
        }
        if !backends.is_empty() {
            let mut fam = enc.encode_descriptor(
                "farmlb_backend_state",
                "Administrative state: 1 for the current one",
                None,
                MetricType::Gauge,
            )?;
            for b in &backends {
                for st in ["ready", "drain", "maint"] {
                    let mut l = labels(b);
                    l.push(("state", st.to_string()));
                    gauge((b.2.state == st) as i64).encode(fam.encode_family(&l)?)?;
                }
            }
        }

        // Global data-plane counters, by what they count.
        let stat = |k: &str| v.stats.get(k).copied().unwrap_or(0);
        let mut conntrack = Vec::new();
        let mut drops = Vec::new();
        let mut passes = Vec::new();
        let mut other = Vec::new();
        for (k, &n) in &v.stats {
            if let Some(r) = k.strip_prefix("ct_") {
                if r == "insert_fail" {
                    other.push((k.as_str(), n));
                } else {
                    conntrack.push((r, n));
                }
            } else if let Some(r) = drop_reason(k) {
                drops.push((r, n));
            } else if let Some(r) = k.strip_prefix("pass_") {
                passes.push((r, n));
            } else if k != "tx" {
                other.push((k.as_str(), n));
            }
        }
        family(
            &mut enc,
            "farmlb_conntrack_lookups",
            "Conntrack lookups: hit, miss on a SYN (always re-hashed), other miss",
            MetricType::Counter,
            conntrack
                .iter()
                .map(|(r, n)| (vec![("result", *r)], counter(*n))),
        )?;
        family(
            &mut enc,
            "farmlb_drops",
            "Packets dropped by the data plane, by reason",
            MetricType::Counter,
            drops
                .iter()
                .map(|(r, n)| (vec![("reason", r.as_str())], counter(*n))),
        )?;
        family(
            &mut enc,
            "farmlb_passed",
            "Packets passed to the kernel stack, by reason",
            MetricType::Counter,
            passes
                .iter()
                .map(|(r, n)| (vec![("reason", *r)], counter(*n))),
        )?;
        scalar(
            &mut enc,
            "farmlb_forwarded_packets",
            "Packets forwarded to a backend (XDP_TX)",
            MetricType::Counter,
            counter(stat("tx")),
        )?;
        family(
            &mut enc,
            "farmlb_datapath_events",
            "Other data-plane counters",
            MetricType::Counter,
            other
                .iter()
                .map(|(r, n)| (vec![("event", *r)], counter(*n))),
        )?;
        if let Some(f) = &v.farm {
            encode_farm(&mut enc, f)?;
        }
        encode_scale_out(&mut enc, v)?;
        let layout = lb_common::LAYOUT_VERSION.to_string();
        family(
            &mut enc,
            "farmlb_build_info",
            "Always 1: the running farmlb's version and map layout",
            MetricType::Gauge,
            [(
                vec![
                    ("version", env!("CARGO_PKG_VERSION")),
                    ("layout", layout.as_str()),
                ],
                gauge(1),
            )],
        )?;
        if let Some(r) = &v.reload {
            let g = MetricType::Gauge;
            let ok = ConstGauge::new(r.ok as i64);
            let help =
                "1 if the last reload (SIGHUP, farmlb reload) succeeded; the start counts as one";
            scalar(
                &mut enc,
                "farmlb_config_last_reload_successful",
                help,
                g,
                ok,
            )?;
            let at = ConstGauge::new(r.last_success_unix);
            let help = "Unix time of the last successful reload (or of the start)";
            scalar(
                &mut enc,
                "farmlb_config_last_reload_success_timestamp_seconds",
                help,
                g,
                at,
            )?;
        }
        if let Some(ct) = &v.conntrack {
            let g = MetricType::Gauge;
            let entries = ConstGauge::new(ct.entries as i64);
            scalar(
                &mut enc,
                "farmlb_conntrack_entries",
                "Conntrack entries at the last count (every 30 s)",
                g,
                entries,
            )?;
            let cap = ConstGauge::new(ct.capacity as i64);
            scalar(
                &mut enc,
                "farmlb_conntrack_capacity",
                "Conntrack capacity (conntrack_size)",
                g,
                cap,
            )?;
            let ev = ConstGauge::new(ct.evicted_at_most as i64);
            let help =
                "Upper bound of the conntrack entries evicted since the data plane was created";
            scalar(&mut enc, "farmlb_conntrack_evicted_at_most", help, g, ev)?;
        }
        Ok(())
    }
}

/// A metric without labels.
fn scalar(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    m: impl EncodeMetric,
) -> std::fmt::Result {
    m.encode(enc.encode_descriptor(name, help, None, kind)?)
}

/// `[announce]` and its conntrack sync.
fn encode_scale_out(enc: &mut DescriptorEncoder, v: &StatusView) -> std::fmt::Result {
    if let Some(a) = &v.announce {
        let vips: Vec<String> = a.vips.iter().map(|x| x.vip.to_string()).collect();
        family(
            enc,
            "farmlb_vip_announced",
            "1 while the VIP's route is in the announce table (exported by the BGP daemon)",
            MetricType::Gauge,
            a.vips.iter().zip(&vips).map(|(x, ip)| {
                (
                    vec![("vip", ip.as_str())],
                    ConstGauge::new(x.installed as i64),
                )
            }),
        )?;
    }
    if let Some(y) = &v.sync {
        family(
            enc,
            "farmlb_conntrack_sync_entries",
            "Conntrack entries sent to and received from the other directors, dropped before \
             sending (rate, queue) and refused on receipt",
            MetricType::Counter,
            [
                ("sent", y.sent),
                ("received", y.received),
                ("dropped", y.dropped),
                ("rejected", y.rejected),
            ]
            .map(|(e, n)| (vec![("event", e)], ConstCounter::new(n))),
        )?;
        scalar(
            enc,
            "farmlb_conntrack_sync_lag_seconds",
            "Time from the last received batch's sending to its insertion here",
            MetricType::Gauge,
            ConstGauge::new(y.lag_ms_last / 1000.0),
        )?;
    }
    Ok(())
}

/// The farm role's families: membership as this node sees it, and its own share.
fn encode_farm(enc: &mut DescriptorEncoder, f: &FarmStatus) -> std::fmt::Result {
    let nodes: Vec<String> = f.members.iter().map(|m| m.node.to_string()).collect();
    let alive = |m: &crate::farm::MemberStatus| m.state == "alive";
    family(
        enc,
        "farmlb_farm_member_up",
        "1 while the member is alive in this node's view, 0 while suspect or down",
        MetricType::Gauge,
        f.members
            .iter()
            .zip(&nodes)
            .map(|(m, n)| (vec![("node", n.as_str())], ConstGauge::new(alive(m) as i64))),
    )?;
    family(
        enc,
        "farmlb_farm_member_power",
        "Power the member announces (0: it takes no new flows)",
        MetricType::Gauge,
        f.members
            .iter()
            .zip(&nodes)
            .map(|(m, n)| (vec![("node", n.as_str())], ConstGauge::new(m.power as i64))),
    )?;
    let in_view = f.members.len() as i64;
    let gauge = MetricType::Gauge;
    let (members, share) = (
        "Members in this node's view (alive or suspect: those the ownership tables share the flows among)",
        "Fraction of the farm's flows this node owns",
    );
    scalar(
        enc,
        "farmlb_farm_members",
        members,
        gauge,
        ConstGauge::new(in_view),
    )?;
    scalar(
        enc,
        "farmlb_farm_share",
        share,
        gauge,
        ConstGauge::new(f.share),
    )?;
    let active = ConstGauge::new((f.role == "active") as i64);
    let help = "1 while this node answers ARP/ND for the VIPs (leader / active director)";
    scalar(enc, "farmlb_farm_active", help, gauge, active)?;
    family(
        enc,
        "farmlb_farm_membership_rejected",
        "Membership datagrams dropped, by reason",
        MetricType::Counter,
        [
            (vec![("reason", "auth")], ConstCounter::new(f.auth_failures)),
            (vec![("reason", "replay")], ConstCounter::new(f.replays)),
            (
                vec![("reason", "unknown_source")],
                ConstCounter::new(f.unknown_dropped),
            ),
        ],
    )
}

/// The exposition formats `/metrics` serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `application/openmetrics-text; version=1.0.0` (what Prometheus asks for first).
    OpenMetrics,
    /// The classic `text/plain; version=0.0.4` (anything else: curl, `promtool check metrics`).
    Text,
}

impl Format {
    /// The format an `Accept` header asks for: OpenMetrics only when it names it.
    pub fn from_accept(accept: Option<&str>) -> Format {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Text,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Text => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// OpenMetrics text as the classic text format: a counter family is named after its
/// `_total` samples, `# UNIT` and `# EOF` go. (prometheus-client writes OpenMetrics only;
/// every family farmlb serves is a counter, gauge or histogram, which both formats share.)
fn to_text_format(om: &str) -> String {
    let mut out = String::with_capacity(om.len());
    let mut help: Option<&str> = None;
    for line in om.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let name = if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_string()
            };
            if let Some(h) = help.take() {
                let text = h.split_once(' ').map_or("", |(_, t)| t);
                out += &format!("# HELP {name} {text}\n");
            }
            out += &format!("# TYPE {name} {kind}\n");
            continue;
        }
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        out += line;
        out.push('\n');
    }
    out
}

/// The exposition text for one scrape.
pub fn render(view: StatusView, live: &LiveMetrics, format: Format) -> String {
    let mut reg = Registry::default();
    reg.register(
        "farmlb_check_duration_seconds",
        "Health check probe duration",
        live.check_duration.clone(),
    );
    reg.register(
        "farmlb_checks",
        "Health check probes by result",
        live.checks.clone(),
    );
    reg.register_collector(Box::new(Snapshot(view)));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &reg).expect("writing to a String");
    match format {
        Format::OpenMetrics => out,
        Format::Text => to_text_format(&out),
    }
}

/// Asks the owner task for a fresh snapshot.
pub type SnapshotTx = mpsc::Sender<oneshot::Sender<StatusView>>;

#[derive(Clone)]
struct Ctx {
    tx: SnapshotTx,
    live: LiveMetrics,
}

async fn scrape(
    axum::extract::State(cx): axum::extract::State<Ctx>,
    headers: axum::http::HeaderMap,
) -> Response {
    let accept = headers.get(header::ACCEPT).and_then(|a| a.to_str().ok());
    let format = Format::from_accept(accept);
    let (otx, orx) = oneshot::channel();
    let view = match cx.tx.send(otx).await {
        Ok(()) => orx.await.ok(),
        Err(_) => None,
    };
    match view {
        None => (StatusCode::SERVICE_UNAVAILABLE, "daemon shutting down\n").into_response(),
        Some(v) => (
            [(header::CONTENT_TYPE, format.content_type())],
            render(v, &cx.live, format),
        )
            .into_response(),
    }
}

pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding metrics_address {addr}"))
}

/// Serve `/metrics` until the task is aborted, within [`crate::http::LIMITS`].
pub async fn serve(listener: TcpListener, tx: SnapshotTx, live: LiveMetrics) {
    let app = Router::new()
        .route("/metrics", get(scrape))
        .with_state(Ctx { tx, live });
    let accept = || async { listener.accept().await.map(|(s, _)| s) };
    crate::http::serve("metrics", accept, app, crate::http::LIMITS).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{BackendView, ServiceView};

    fn view() -> StatusView {
        let b = |a: &str, health: &str, state: &str, eff: u32, packets: u64| BackendView {
            address: a.parse().unwrap(),
            health: health.into(),
            checked: true,
            state: state.into(),
            state_runtime: false,
            weight: 2,
            weight_runtime: None,
            weight_dynamic: None,
            effective_weight: eff,
            slots: 3,
            resolved: true,
            last_check: None,
            packets,
            bytes: packets * 60,
            flows: Some(packets / 2),
        };
        StatusView {
            reload: Some(crate::api::ReloadView {
                ok: false,
                last_attempt_unix: 1700000100.0,
                last_success_unix: 1700000000.5,
                error: Some("bad".into()),
            }),
            farm: None,
            announce: None,
            sync: None,
            conntrack: Some(crate::api::ConntrackView {
                entries: 5,
                capacity: 1024,
                evicted_at_most: 0,
            }),
            services: vec![ServiceView {
                name: "web".into(),
                vip: "10.0.0.1".parse().unwrap(),
                port: 80,
                protocol: "tcp".into(),
                hash: "5-tuple".into(),
                forwarding: "dr".into(),
                table_size: 7,
                check: None,
                backends_up: 1,
                backends_usable: 1,
                packets: 12,
                bytes: 720,
                drops: [("drop_no_backend".to_string(), 3)].into(),
                backends: vec![
                    b("10.0.0.11", "up", "ready", 2, 10),
                    b("10.0.0.12", "down", "drain", 0, 2),
                ],
            }],
            stats: [
                ("tx", 12),
                ("ct_hit", 7),
                ("ct_miss_syn", 5),
                ("drop_no_backend", 3),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        }
    }

    #[test]
    fn a_farm_node_exports_membership_and_share() {
        let member = |node, state: &str, power| crate::farm::MemberStatus {
            node,
            address: format!("10.0.0.{node}:4800").parse().unwrap(),
            state: state.into(),
            power,
            share: 0.5,
        };
        let mut v = view();
        v.farm = Some(FarmStatus {
            node: 1,
            interface: "eth0".into(),
            healthy: true,
            power: 1,
            share: 0.5,
            leader: Some(1),
            role: "active".into(),
            check: None,
            last_check: None,
            members: vec![member(1, "alive", 1), member(2, "suspect", 0)],
            auth_failures: 4,
            replays: 1,
            unknown_dropped: 0,
            arp_answered: 0,
        });
        let text = render(v, &LiveMetrics::default(), Format::OpenMetrics);
        for line in [
            "farmlb_farm_member_up{node=\"1\"} 1",
            "farmlb_farm_member_up{node=\"2\"} 0",
            "farmlb_farm_member_power{node=\"2\"} 0",
            "farmlb_farm_members 2",
            "farmlb_farm_share 0.5",
            "farmlb_farm_active 1",
            "farmlb_farm_membership_rejected_total{reason=\"auth\"} 4",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(
            !render(view(), &LiveMetrics::default(), Format::OpenMetrics).contains("farmlb_farm_")
        );
    }

    #[test]
    fn announce_and_sync_are_exported() {
        let mut v = view();
        assert!(!render(v.clone(), &LiveMetrics::default(), Format::Text).contains("sync"));
        v.announce = Some(crate::announce::AnnounceView {
            table: 100,
            vips: vec![crate::announce::VipAnnounceView {
                vip: "10.0.100.1".parse().unwrap(),
                announced: true,
                installed: true,
                reason: crate::announce::Reason::Usable,
            }],
            changes: 1,
            error: None,
        });
        v.sync = Some(crate::sync::SyncView {
            sent: 7,
            received: 5,
            lag_ms_last: 2.5,
            ..Default::default()
        });
        let text = render(v, &LiveMetrics::default(), Format::Text);
        for line in [
            "farmlb_vip_announced{vip=\"10.0.100.1\"} 1",
            "farmlb_conntrack_sync_entries_total{event=\"sent\"} 7",
            "farmlb_conntrack_sync_entries_total{event=\"received\"} 5",
            "farmlb_conntrack_sync_lag_seconds 0.0025",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }

    #[test]
    fn exposition_has_every_family() {
        let live = LiveMetrics::default();
        live.observe_check("web", "10.0.0.11", "up", Duration::from_millis(2));
        let text = render(view(), &live, Format::OpenMetrics);
        for line in [
            "farmlb_service_packets_total{service=\"web\"} 12",
            "farmlb_service_up_backends{service=\"web\"} 1",
            "farmlb_backend_packets_total{service=\"web\",backend=\"10.0.0.11\"} 10",
            "farmlb_backend_up{service=\"web\",backend=\"10.0.0.12\"} 0",
            "farmlb_backend_weight{service=\"web\",backend=\"10.0.0.11\"} 2",
            "farmlb_backend_state{service=\"web\",backend=\"10.0.0.12\",state=\"drain\"} 1",
            "farmlb_backend_state{service=\"web\",backend=\"10.0.0.12\",state=\"ready\"} 0",
            "farmlb_conntrack_lookups_total{result=\"hit\"} 7",
            "farmlb_drops_total{reason=\"no_backend\"} 3",
            "farmlb_service_drops_total{service=\"web\",reason=\"no_backend\"} 3",
            "farmlb_forwarded_packets_total 12",
            "farmlb_conntrack_entries 5",
            "farmlb_conntrack_capacity 1024",
            "farmlb_checks_total{service=\"web\",backend=\"10.0.0.11\",result=\"up\"} 1",
            "farmlb_check_duration_seconds_count{service=\"web\",backend=\"10.0.0.11\"} 1",
            "farmlb_backend_flows{service=\"web\",backend=\"10.0.0.11\"} 5",
            "farmlb_config_last_reload_successful 0",
            "farmlb_config_last_reload_success_timestamp_seconds 1700000000.5",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(text.ends_with("# EOF\n"));
        live.forget("web", "10.0.0.11");
        let text = render(view(), &live, Format::OpenMetrics);
        assert!(!text.contains("farmlb_checks_total{"), "{text}");
    }

    #[test]
    fn the_text_format_names_counter_families_after_their_samples() {
        let live = LiveMetrics::default();
        live.observe_check("web", "10.0.0.11", "up", Duration::from_millis(2));
        let text = render(view(), &live, Format::Text);
        assert!(
            !text.contains("# EOF") && !text.contains("# UNIT"),
            "{text}"
        );
        let version = env!("CARGO_PKG_VERSION");
        let info = format!(
            "farmlb_build_info{{version=\"{version}\",layout=\"{}\"}} 1",
            lb_common::LAYOUT_VERSION
        );
        assert!(text.lines().any(|l| l == info), "{text}");
        // Every sample belongs to a family declared just before with HELP and TYPE.
        let mut declared: Vec<(String, String)> = Vec::new();
        let mut helped = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(r) = line.strip_prefix("# HELP ") {
                helped.insert(r.split(' ').next().unwrap().to_string());
            } else if let Some(r) = line.strip_prefix("# TYPE ") {
                let (n, k) = r.split_once(' ').unwrap();
                assert!(helped.contains(n), "TYPE without HELP: {line}");
                declared.push((n.to_string(), k.to_string()));
            } else {
                let name = line.split(['{', ' ']).next().unwrap();
                let (fam, kind) = declared.last().expect("a sample before any TYPE");
                let ok = match kind.as_str() {
                    "histogram" => [
                        format!("{fam}_bucket"),
                        format!("{fam}_sum"),
                        format!("{fam}_count"),
                    ]
                    .contains(&name.to_string()),
                    _ => name == fam,
                };
                assert!(ok, "sample {name} under family {fam} ({kind})");
            }
        }
        assert!(declared.contains(&("farmlb_drops_total".into(), "counter".into())));
        assert_eq!(
            Format::from_accept(Some(
                "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"
            )),
            Format::OpenMetrics
        );
        assert_eq!(Format::from_accept(Some("*/*")), Format::Text);
        assert_eq!(Format::from_accept(None), Format::Text);
    }
}
