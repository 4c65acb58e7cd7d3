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

/// A resolution result: the address and its MAC, or why not.
pub type Resolved = (IpAddr, Result<[u8; 6], String>);

/// The owner loop's view of the neighbour table: what is known is answered at once; what is
/// not is handed to a background task (never a wait on the owner loop), whose results arrive
/// on the receiver that [`Neighbours::start`] returns; the owner then applies again.
pub struct Neighbours {
    iface: String,
    known: HashMap<IpAddr, [u8; 6]>,
    pending: HashSet<IpAddr>,
    tx: mpsc::Sender<IpAddr>,
}

impl Neighbours {
    /// Start the resolver task for `iface` (inside a tokio runtime).
    pub fn start(iface: &str) -> (Neighbours, mpsc::Receiver<Resolved>) {
        let (tx, rx) = mpsc::channel::<IpAddr>(QUEUE);
        let (done_tx, done_rx) = mpsc::channel::<Resolved>(QUEUE);
        tokio::spawn(resolver(iface.to_string(), rx, done_tx));
        let n = Neighbours {
            iface: iface.to_string(),
            known: HashMap::new(),
            pending: HashSet::new(),
            tx,
        };
        (n, done_rx)
    }

    /// Record a result of the task. Returns whether a MAC was learned.
    pub fn learned(&mut self, (ip, res): Resolved) -> bool {
        self.pending.remove(&ip);
        match res {
            Ok(mac) => {
                self.known.insert(ip, mac);
                true
            }
            Err(e) => {
                tracing::warn!(backend = %ip, "{e}");
                false
            }
        }
    }

    /// Start resolving `ips` now (all in parallel), so a first `apply` finds them known.
    pub fn prefetch(&mut self, ips: impl IntoIterator<Item = IpAddr>) {
        for ip in ips {
            let _ = self.resolve(ip);
        }
    }

    /// Addresses being resolved.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

impl MacResolver for Neighbours {
    fn resolve(&mut self, ip: IpAddr) -> Result<[u8; 6]> {
        if let Some(mac) = self.known.get(&ip) {
            return Ok(*mac);
        }
        if !self.pending.contains(&ip) && self.tx.try_send(ip).is_ok() {
            self.pending.insert(ip);
        }
        Err(anyhow!("{ip} is being resolved on {} (ARP/ND)", self.iface))
    }
}

/// Resolve every address sent on `rx`, up to [`CONCURRENCY`] at once.
async fn resolver(iface: String, mut rx: mpsc::Receiver<IpAddr>, done: mpsc::Sender<Resolved>) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    while let Some(ip) = rx.recv().await {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (iface, done) = (iface.clone(), done.clone());
        tokio::spawn(async move {
            let res = resolve_one(&iface, ip).await.map_err(|e| format!("{e:#}"));
            let _ = done.send((ip, res)).await;
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
