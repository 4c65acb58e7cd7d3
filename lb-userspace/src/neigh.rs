//! Backend MAC resolution from the kernel's neighbour table. Operators configure backend IPs
//! only; DR needs their MACs, so we ask the kernel (ARP / NDP) like any other host would.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::director::MacResolver;

/// Resolves through the neighbour table of one interface.
pub struct NeighResolver {
    pub iface: String,
    /// How long to wait for the kernel to resolve an unknown neighbour.
    pub timeout: Duration,
}

impl NeighResolver {
    pub fn new(iface: &str) -> Self {
        Self {
            iface: iface.to_string(),
            timeout: Duration::from_secs(1),
        }
    }

    /// Current entry, if the kernel has a usable one (not FAILED/INCOMPLETE).
    fn lookup(&self, ip: IpAddr) -> Result<Option<[u8; 6]>> {
        // `ip -j` rather than a netlink crate: one stable, documented JSON interface for both
        // address families; this runs only on configuration changes.
        let out = Command::new("ip")
            .args([
                "-j",
                "neigh",
                "show",
                "to",
                &ip.to_string(),
                "dev",
                &self.iface,
            ])
            .output()
            .context("running `ip neigh` (is iproute2 installed?)")?;
        if !out.status.success() {
            bail!(
                "`ip neigh show dev {}` failed: {}",
                self.iface,
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
    fn provoke(&self, ip: IpAddr) {
        let bind: SocketAddr = match ip {
            IpAddr::V4(_) => "0.0.0.0:0".parse().expect("literal"),
            IpAddr::V6(_) => "[::]:0".parse().expect("literal"),
        };
        if let Ok(s) = UdpSocket::bind(bind) {
            let _ = s.send_to(&[], SocketAddr::new(ip, 9));
        }
    }
}

impl MacResolver for NeighResolver {
    fn resolve(&mut self, ip: IpAddr) -> Result<[u8; 6]> {
        if let Some(mac) = self.lookup(ip)? {
            return Ok(mac);
        }
        self.provoke(ip);
        let deadline = Instant::now() + self.timeout;
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            if let Some(mac) = self.lookup(ip)? {
                return Ok(mac);
            }
        }
        Err(anyhow!(
            "{ip} did not resolve on {} within {:?} (is it on the same L2 segment?)",
            self.iface,
            self.timeout
        ))
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
