//! Backend MAC resolution from the kernel's neighbour table. Operators configure backend IPs
//! only; DR needs their MACs, so we ask the kernel (ARP / NDP) like any other host would,
//! in a background task so an unresolvable backend never stalls the owner loop.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tokio::sync::mpsc;

/// Finds a backend's MAC address (DR rewrites the destination MAC only).
pub trait MacResolver {
    fn resolve(&mut self, ip: IpAddr) -> Result<[u8; 6]>;
    /// The MAC of the next hop towards `ip` by the routing table (tunnel modes: the
    /// backend need not be on-link). Fixed tables give it under the backend's address.
    fn resolve_next_hop(&mut self, ip: IpAddr) -> Result<[u8; 6]> {
        self.resolve(ip)
    }
}

/// Fixed MACs, for tests and the model.
impl MacResolver for HashMap<IpAddr, [u8; 6]> {
    fn resolve(&mut self, ip: IpAddr) -> Result<[u8; 6]> {
        self.get(&ip)
            .copied()
            .with_context(|| format!("no MAC known for {ip}"))
    }
}

/// Resolves every address (to the zero MAC): rehearsing a change must not wait for, or
/// depend on, the neighbour table.
pub struct AssumeResolved;

impl MacResolver for AssumeResolved {
    fn resolve(&mut self, _: IpAddr) -> Result<[u8; 6]> {
        Ok([0; 6])
    }
}

/// Bound of the queue of addresses waiting to be resolved.
const QUEUE: usize = 4096;
/// Resolutions in flight at once.
const CONCURRENCY: usize = 32;
/// How long one resolution waits for the kernel.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(1);

/// What is resolved: an address on the link, or (`routed`) the next hop towards it.
pub type Target = (IpAddr, bool);

/// A resolution result: the target and its MAC, or why not.
pub type Resolved = (Target, Result<[u8; 6], String>);

/// The owner loop's view of the neighbour table: what is known is answered at once; what is
/// not is handed to a background task (never a wait on the owner loop), whose results arrive
/// on the receiver that [`Neighbours::start`] returns; the owner then applies again.
pub struct Neighbours {
    iface: String,
    known: HashMap<Target, [u8; 6]>,
    pending: HashSet<Target>,
    tx: mpsc::Sender<Target>,
    last_recheck: std::time::Instant,
}

/// How often known next hops of tunnel backends are resolved again.
pub const RECHECK_EVERY: Duration = Duration::from_secs(10);

impl Neighbours {
    /// Start the resolver task for `iface` (inside a tokio runtime).
    pub fn start(iface: &str) -> (Neighbours, mpsc::Receiver<Resolved>) {
        let (tx, rx) = mpsc::channel::<Target>(QUEUE);
        let (done_tx, done_rx) = mpsc::channel::<Resolved>(QUEUE);
        tokio::spawn(resolver(iface.to_string(), rx, done_tx));
        let n = Neighbours {
            iface: iface.to_string(),
            known: HashMap::new(),
            pending: HashSet::new(),
            tx,
            last_recheck: std::time::Instant::now(),
        };
        (n, done_rx)
    }

    /// Record a result of the task. Returns whether a MAC was learned.
    /// A re-check that finds the same MAC learns nothing; one that fails keeps the last
    /// good MAC (a control-plane hiccup must not take a backend's traffic away).
    pub fn learned(&mut self, (target, res): Resolved) -> bool {
        self.pending.remove(&target);
        match res {
            Ok(mac) => self.known.insert(target, mac) != Some(mac),
            Err(e) => {
                tracing::warn!(backend = %target.0, "{e}");
                false
            }
        }
    }

    /// Start resolving `targets` now (all in parallel), so a first `apply` finds them known.
    pub fn prefetch(&mut self, targets: impl IntoIterator<Item = Target>) {
        for t in targets {
            let _ = self.lookup_or_queue(t);
        }
    }

    fn lookup_or_queue(&mut self, t: Target) -> Result<[u8; 6]> {
        if let Some(mac) = self.known.get(&t) {
            return Ok(*mac);
        }
        if !self.pending.contains(&t) && self.tx.try_send(t).is_ok() {
            self.pending.insert(t);
        }
        let how = if t.1 { "next hop of " } else { "" };
        Err(anyhow!(
            "{how}{} is being resolved on {} (ARP/ND)",
            t.0,
            self.iface
        ))
    }

    /// Addresses being resolved.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Resolve every known next hop again (routes and neighbours change: a new router, a
    /// failover), at most every [`RECHECK_EVERY`]; a changed MAC arrives as a result like
    /// any other, and the director rewrites the backends concerned.
    pub fn recheck_routed(&mut self) {
        if self.last_recheck.elapsed() < RECHECK_EVERY {
            return;
        }
        self.last_recheck = std::time::Instant::now();
        let targets: Vec<Target> = self.known.keys().filter(|t| t.1).copied().collect();
        for t in targets {
            if !self.pending.contains(&t) && self.tx.try_send(t).is_ok() {
                self.pending.insert(t);
            }
        }
    }
}

impl MacResolver for Neighbours {
    fn resolve(&mut self, ip: IpAddr) -> Result<[u8; 6]> {
        self.lookup_or_queue((ip, false))
    }
    fn resolve_next_hop(&mut self, ip: IpAddr) -> Result<[u8; 6]> {
        self.lookup_or_queue((ip, true))
    }
}

/// Resolve every address sent on `rx`, up to [`CONCURRENCY`] at once.
async fn resolver(iface: String, mut rx: mpsc::Receiver<Target>, done: mpsc::Sender<Resolved>) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    while let Some(target) = rx.recv().await {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (iface, done) = (iface.clone(), done.clone());
        tokio::spawn(async move {
            let res = match target {
                (ip, false) => resolve_one(&iface, ip).await,
                (ip, true) => resolve_routed(&iface, ip).await,
            };
            let _ = done.send((target, res.map_err(|e| format!("{e:#}")))).await;
            drop(permit);
        });
    }
}

async fn resolve_one(iface: &str, ip: IpAddr) -> Result<[u8; 6]> {
    if let Some(mac) = lookup(iface, ip).await? {
        return Ok(mac);
    }
    provoke(ip);
    let deadline = tokio::time::Instant::now() + RESOLVE_TIMEOUT;
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if let Some(mac) = lookup(iface, ip).await? {
            return Ok(mac);
        }
    }
    Err(anyhow!(
        "backend kept out of the table: {ip} did not resolve on {iface} within {:?} (is it on \
         the same L2 segment?); retrying",
        RESOLVE_TIMEOUT
    ))
}

/// The MAC of the next hop towards `ip`: the gateway of its route, or `ip` itself if the
/// route is on-link. The route must leave through `iface`, where the program sends.
async fn resolve_routed(iface: &str, ip: IpAddr) -> Result<[u8; 6]> {
    let out = tokio::process::Command::new("ip")
        .args(["-j", "route", "get", &ip.to_string()])
        .output()
        .await
        .context("running `ip route get` (is iproute2 installed?)")?;
    if !out.status.success() {
        bail!(
            "backend kept out of the table: no route to {ip} ({}); retrying",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let routes: Vec<serde_json::Value> =
        serde_json::from_slice(&out.stdout).context("parsing `ip -j route get` output")?;
    let r = routes.first().context("`ip route get` printed no route")?;
    let dev = r["dev"].as_str().unwrap_or("");
    if dev != iface {
        bail!(
            "backend kept out of the table: the route to {ip} leaves through {dev:?}, not              {iface:?} where farmlb sends; retrying"
        );
    }
    let hop = match r["gateway"].as_str() {
        Some(g) => g
            .parse()
            .with_context(|| format!("gateway {g:?} of the route to {ip}"))?,
        None => ip,
    };
    resolve_one(iface, hop)
        .await
        .with_context(|| format!("next hop {hop} towards {ip}"))
}

/// Current entry, if the kernel has a usable one (not FAILED/INCOMPLETE).
async fn lookup(iface: &str, ip: IpAddr) -> Result<Option<[u8; 6]>> {
    // `ip -j` rather than a netlink crate: one stable, documented JSON interface for both
    // address families, run off the owner loop.
    let out = tokio::process::Command::new("ip")
        .args(["-j", "neigh", "show", "to", &ip.to_string(), "dev", iface])
        .output()
        .await
        .context("running `ip neigh` (is iproute2 installed?)")?;
    if !out.status.success() {
        bail!(
            "`ip neigh show dev {iface}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let entries: Vec<serde_json::Value> =
        serde_json::from_slice(&out.stdout).context("parsing `ip -j neigh` output")?;
    for e in entries {
        let state_ok = e["state"].as_array().is_none_or(|s| {
            !s.iter()
                .any(|v| matches!(v.as_str(), Some("FAILED" | "INCOMPLETE")))
        });
        if let (Some(mac), true) = (e["lladdr"].as_str(), state_ok) {
            return Ok(Some(parse_mac(mac)?));
        }
    }
    Ok(None)
}

/// Make the kernel resolve `ip`: a datagram to the discard port triggers ARP/NDP.
fn provoke(ip: IpAddr) {
    let bind: SocketAddr = match ip {
        IpAddr::V4(_) => "0.0.0.0:0".parse().expect("literal"),
        IpAddr::V6(_) => "[::]:0".parse().expect("literal"),
    };
    if let Ok(s) = UdpSocket::bind(bind) {
        let _ = s.set_nonblocking(true);
        let _ = s.send_to(&[], SocketAddr::new(ip, 9));
    }
}

pub use crate::config::parse_mac;

/// MAC address of a local interface.
pub fn iface_mac(iface: &str) -> Result<[u8; 6]> {
    let path = format!("/sys/class/net/{iface}/address");
    let s = std::fs::read_to_string(&path)
        .map_err(|_| anyhow!("interface {iface:?} does not exist"))?;
    Ok(parse_mac(s.trim())?)
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn fmt_mac(m: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

#[cfg(test)]
mod tests {
    use super::parse_mac;

    #[test]
    fn mac_parsing() {
        assert_eq!(
            parse_mac("02:00:0a:63:00:0b").unwrap(),
            [2, 0, 0x0a, 0x63, 0, 0x0b]
        );
        assert!(parse_mac("02:00:0a:63:00").is_err());
        assert!(parse_mac("02:00:0a:63:00:0b:01").is_err());
        assert!(parse_mac("zz:00:0a:63:00:0b").is_err());
    }
}
