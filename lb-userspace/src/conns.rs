//! `farmlb conns [SERVICE]` (`GET /v1/conns`): the conntrack table's flows with their
//! service, backend and idle time, like `ipvsadm -Lnc`. The owner loop hands out a [`Job`]
//! (names of the ids the entries hold) and the walk of the pinned table runs on a blocking
//! thread, so a million entries never stall the owner. At most `limit` flows are returned;
//! the answer says how many matched in all.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use lb_common::{CtKey, ServiceKey, MEMBER_BASE, PROTO_TCP};
use serde::{Deserialize, Serialize};

use crate::api::{ApiError, ErrorKind};
use crate::dataplane::conntrack::{self, Flow};
use crate::director::{ip_of, Director};

/// Flows returned when the request names no limit.
pub const DEFAULT_LIMIT: usize = 1000;
/// The most flows one answer holds, whatever the request asks.
pub const MAX_LIMIT: usize = 100_000;

/// One conntrack entry.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ConnView {
    /// `tcp` or `udp`.
    pub protocol: String,
    pub client: SocketAddr,
    /// The VIP and port the client sent to (`None`: the entry's service is gone; an entry
    /// names its service by id, which stands for the VIP address).
    pub vip: Option<SocketAddr>,
    /// The service the flow belongs to (`None`: gone).
    pub service: Option<String>,
    /// The backend the entry sends the flow to (director services).
    pub backend: Option<IpAddr>,
    /// Farm services: the member node the entry names.
    pub member: Option<u32>,
    /// The backend id in the entry (for entries whose backend is gone).
    pub backend_id: u32,
    /// UDP: seconds since the flow's last packet. TCP entries record no time (`None`).
    pub idle_s: Option<f64>,
    /// UDP idle past `udp_timeout`: the program no longer uses it (it waits for eviction).
    pub expired: bool,
}

/// The answer of `GET /v1/conns`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ConnsView {
    pub flows: Vec<ConnView>,
    /// Entries that matched the request (all of the table without a service).
    pub matched: u64,
    /// Matched but not returned (over the limit).
    pub left_out: u64,
}

/// Listings that may walk the table at once; more are refused (503) rather than queued.
const MAX_WALKS: usize = 2;
static WALKS: AtomicUsize = AtomicUsize::new(0);

/// One of the [`MAX_WALKS`] slots, held while a walk runs.
struct Slot;

impl Slot {
    fn take() -> Result<Slot, ApiError> {
        let taken = WALKS.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
            (n < MAX_WALKS).then_some(n + 1)
        });
        match taken {
            Ok(_) => Ok(Slot),
            Err(_) => Err(ApiError::new(
                ErrorKind::Unavailable,
                format!("{MAX_WALKS} conntrack listings are running already; try again"),
            )),
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        WALKS.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What the walk needs from the owner: the pin directory and the names of the ids.
pub struct Job {
    _slot: Slot,
    pin_dir: PathBuf,
    limit: usize,
    /// Service id -> key: an entry's VIP address.
    services: HashMap<u32, ServiceKey>,
    service_names: HashMap<u32, String>,
    backends: HashMap<u32, IpAddr>,
    /// Only flows of this service id.
    only: Option<u32>,
}

impl Job {
    /// A listing of `service`'s flows (every flow without one), at most `limit`.
    pub fn new(
        director: &Director,
        pin_dir: PathBuf,
        service: Option<&str>,
        limit: Option<usize>,
    ) -> Result<Job, ApiError> {
        let only = match service {
            None => None,
            Some(name) => Some(
                director
                    .services
                    .get(name)
                    .ok_or_else(|| {
                        ApiError::not_found(format!("service: no service named {name:?}"))
                    })?
                    .info
                    .id,
            ),
        };
        let mut services = HashMap::new();
        let mut backends = HashMap::new();
        for s in director.services.values() {
            services.insert(s.info.id, s.key);
            backends.extend(s.backends.values().map(|b| (b.id, b.address)));
        }
        Ok(Job {
            _slot: Slot::take()?,
            pin_dir,
            limit: limit.unwrap_or(DEFAULT_LIMIT).min(MAX_LIMIT),
            services,
            service_names: crate::simulate::service_names(director),
            backends,
            only,
        })
    }

    fn service_of(&self, k: &CtKey) -> Option<u32> {
        let id = u32::from(k.svc);
        self.services.contains_key(&id).then_some(id)
    }

    fn view(&self, f: &Flow) -> ConnView {
        let k = &f.key;
        let id = f.entry.backend;
        ConnView {
            protocol: if k.proto == PROTO_TCP { "tcp" } else { "udp" }.into(),
            client: SocketAddr::new(ip_of(k.src), k.sport),
            vip: self
                .services
                .get(&u32::from(k.svc))
                .map(|s| SocketAddr::new(ip_of(s.addr), k.dport)),
            service: self
                .service_of(k)
                .and_then(|s| self.service_names.get(&s).cloned()),
            backend: self.backends.get(&id).copied(),
            member: id.checked_sub(MEMBER_BASE).filter(|n| *n > 0),
            backend_id: id,
            idle_s: f.idle_ns.map(|n| n as f64 / 1e9),
            expired: f.expired,
        }
    }

    /// Walk the table (blocking).
    pub fn run(self) -> Result<ConnsView, ApiError> {
        let keep = |k: &CtKey| self.only.is_none() || self.service_of(k) == self.only;
        let (flows, matched) = conntrack::list(&self.pin_dir, self.limit, keep)
            .map_err(|e| ApiError::internal(format!("reading conntrack: {e:#}")))?;
        let flows: Vec<ConnView> = flows.iter().map(|f| self.view(f)).collect();
        Ok(ConnsView {
            left_out: matched - flows.len() as u64,
            flows,
            matched,
        })
    }
}

/// The table `farmlb conns` prints.
pub fn render(v: &ConnsView) -> String {
    let rows: Vec<Vec<String>> = v
        .flows
        .iter()
        .map(|c| {
            let to = match (c.backend, c.member) {
                (Some(b), _) => b.to_string(),
                (None, Some(n)) => format!("node {n}"),
                (None, None) => format!("gone (id {})", c.backend_id),
            };
            let idle = match c.idle_s {
                None => "-".to_string(),
                Some(s) if c.expired => format!("{s:.1}s expired"),
                Some(s) => format!("{s:.1}s"),
            };
            vec![
                c.protocol.to_uppercase(),
                c.client.to_string(),
                c.vip.map_or("-".into(), |v| v.to_string()),
                c.service.clone().unwrap_or("-".into()),
                to,
                idle,
            ]
        })
        .collect();
    let mut out = crate::cli::table(
        "",
        &["PRO", "CLIENT", "VIP", "SERVICE", "BACKEND", "IDLE"],
        &rows,
    );
    out += &format!("{} flows", v.matched);
    if v.left_out > 0 {
        out += &format!(
            ", {} shown, {} left out (--limit N shows more)",
            v.flows.len(),
            v.left_out
        );
    }
    out += "\nIDLE: UDP only (TCP entries record no time; they stay until evicted, also after the connection closed)\n";
    out
}

/// `farmlb conns [SERVICE] [--limit N]`.
pub async fn cli(
    c: &crate::cli::Client,
    json: bool,
    service: Option<&str>,
    limit: usize,
) -> anyhow::Result<()> {
    let mut path = format!("/v1/conns?limit={limit}");
    if let Some(s) = service {
        anyhow::ensure!(
            s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b)),
            "service: {s:?} is not a service name ([A-Za-z0-9_.-])"
        );
        path += &format!("&service={s}");
    }
    let v = c.call("GET", &path, None).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", render(&serde_json::from_value(v)?));
    }
    Ok(())
}
