//! Tunnel forwarding (IPIP, GUE) on the control-plane side: what the program needs of the
//! host to write outer headers (the interface's MTU and own addresses), combined with the
//! configuration's `gue_port` and `tunnel_source` into each tunnel service's `TUNNELS`
//! entry.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context, Result};
use lb_common::{v4_mapped, TunnelInfo};

use crate::config::Cidr;

/// The director's interface as the tunnel modes see it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TunnelHost {
    /// L3 MTU; 0 = unknown (the program then does not check sizes).
    pub mtu: u16,
    /// First global address of each family on the interface.
    pub addr4: Option<Ipv4Addr>,
    pub addr6: Option<Ipv6Addr>,
}

impl TunnelHost {
    /// Read `iface`'s MTU and addresses (`ip -j addr`).
    pub fn discover(iface: &str) -> Result<TunnelHost> {
        let mtu = std::fs::read_to_string(format!("/sys/class/net/{iface}/mtu"))
            .with_context(|| format!("reading the MTU of {iface}"))?
            .trim()
            .parse::<u32>()
            .with_context(|| format!("the MTU of {iface}"))?
            .min(u16::MAX as u32) as u16;
        let out = std::process::Command::new("ip")
            .args(["-j", "addr", "show", "dev", iface])
            .output()
            .context("running `ip addr` (is iproute2 installed?)")?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let mut host = TunnelHost {
            mtu,
            ..Default::default()
        };
        let infos = v[0]["addr_info"].as_array().cloned().unwrap_or_default();
        for a in infos {
            if a["scope"] != "global" {
                continue;
            }
            match a["local"].as_str().and_then(|s| s.parse::<IpAddr>().ok()) {
                Some(IpAddr::V4(x)) if host.addr4.is_none() => host.addr4 = Some(x),
                Some(IpAddr::V6(x)) if host.addr6.is_none() => host.addr6 = Some(x),
                _ => {}
            }
        }
        Ok(host)
    }

    /// Whether outer headers can be written towards a backend of `ip`'s family: there is a
    /// source address (the interface's, or a `tunnel_source` prefix) of that family.
    pub fn can_reach(&self, sources: &[Cidr], ip: IpAddr) -> bool {
        let configured = sources.iter().any(|c| c.addr.is_ipv4() == ip.is_ipv4());
        configured
            || match ip {
                IpAddr::V4(_) => self.addr4.is_some(),
                IpAddr::V6(_) => self.addr6.is_some(),
            }
    }

    /// A tunnel service's `TUNNELS` entry: this interface's MTU, the outer sources (the
    /// interface's addresses, overridden per family by the `sources` prefixes) and the GUE
    /// port.
    pub fn info(&self, sources: &[Cidr], gue_port: u16) -> TunnelInfo {
        let mut t = TunnelInfo {
            mtu: self.mtu,
            gue_port,
            ..Default::default()
        };
        if let Some(a) = self.addr4 {
            t.src4 = a.octets();
        }
        if let Some(a) = self.addr6 {
            t.src6 = a.octets();
        }
        for c in sources {
            match c.addr {
                IpAddr::V4(a) => {
                    t.src4 = a.octets();
                    t.src4_mask = c.host_mask();
                }
                IpAddr::V6(a) => {
                    t.src6 = a.octets();
                    t.src6_mask = c.host_mask();
                }
            }
        }
        t
    }
}

/// The outer source address the program writes for a flow hash (the model, tests).
pub fn outer_source(t: &TunnelInfo, v6: bool, hash: u32) -> lb_common::Addr {
    if v6 {
        let mut a = t.src6;
        let low = lb_common::tunnel_src_low([a[12], a[13], a[14], a[15]], t.src6_mask, hash);
        a[12..].copy_from_slice(&low);
        a
    } else {
        v4_mapped(lb_common::tunnel_src_low(t.src4, t.src4_mask, hash))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn cfg(extra: &str) -> Config {
        Config::from_toml_str(&format!("interface = \"eth0\"\n{extra}")).unwrap()
    }

    #[test]
    fn sources_come_from_the_interface_or_the_prefixes() {
        let host = TunnelHost {
            mtu: 1500,
            addr4: Some("10.0.0.5".parse().unwrap()),
            addr6: None,
        };
        let c0 = cfg("");
        let g = host.info(&c0.tunnel_source, c0.gue_port);
        assert_eq!(
            (g.mtu, g.gue_port, g.src4, g.src4_mask),
            (1500, 6080, [10, 0, 0, 5], 0)
        );
        assert!(!host.can_reach(&[], "fd00::1".parse().unwrap()));
        let c = cfg("gue_port = 7000\ntunnel_source = [\"192.0.2.0/28\", \"fd00:1::/120\"]");
        assert!(host.can_reach(&c.tunnel_source, "fd00::1".parse().unwrap()));
        let g = host.info(&c.tunnel_source, c.gue_port);
        assert_eq!(
            (g.gue_port, g.src4, g.src4_mask),
            (7000, [192, 0, 2, 0], 15)
        );
        assert_eq!(g.src6_mask, 0xff);
        assert_eq!(
            outer_source(&g, false, 0x1234_5677),
            v4_mapped([192, 0, 2, 7])
        );
    }

    /// A tunnel backend's next hop is resolved on every apply: a new MAC (another router)
    /// replaces the old one in its entry; a DR backend's MAC is its own and stays.
    #[test]
    fn a_changed_next_hop_is_written_over_the_old_one() {
        use crate::dataplane::model::Model;
        use crate::director::Director;
        let cfg = cfg(
            "[[service]]\nname = \"t\"\nvip = \"10.0.0.1\"\nport = 80\nforwarding = \"ipip\"\n\
             table_size = 211\n[[service.backend]]\naddress = \"172.16.0.5\"\n\
             [[service]]\nname = \"d\"\nvip = \"10.0.0.2\"\nport = 80\ntable_size = 211\n\
             [[service.backend]]\naddress = \"10.0.0.7\"\n",
        );
        let mut d = Director::new(1 << 12, [2, 0, 0, 0, 0, 1]);
        d.tunnel = TunnelHost {
            mtu: 1500,
            addr4: Some("10.0.0.3".parse().unwrap()),
            addr6: None,
        };
        let mut m = Model::default();
        let (t, dr): (IpAddr, IpAddr) =
            ("172.16.0.5".parse().unwrap(), "10.0.0.7".parse().unwrap());
        let mut macs = std::collections::HashMap::from([
            (t, [2, 0, 0, 0, 0, 0xa]),
            (dr, [2, 0, 0, 0, 0, 0xd]),
        ]);
        d.apply(&cfg, &mut m, &mut macs).unwrap();
        let id = |d: &Director, s: &str, a: IpAddr| d.services[s].backends[&a].id;
        let (ti, di) = (id(&d, "t", t), id(&d, "d", dr));
        assert_eq!(m.backends[&ti].mac, [2, 0, 0, 0, 0, 0xa]);
        macs.insert(t, [2, 0, 0, 0, 0, 0xb]);
        macs.insert(dr, [2, 0, 0, 0, 0, 0xe]);
        d.apply(&cfg, &mut m, &mut macs).unwrap();
        assert_eq!(
            m.backends[&ti].mac,
            [2, 0, 0, 0, 0, 0xb],
            "the new next hop"
        );
        assert_eq!(m.backends[&ti].flags, lb_common::BACKEND_F_VALID);
        assert_eq!(
            m.backends[&di].mac,
            [2, 0, 0, 0, 0, 0xd],
            "DR keeps its MAC"
        );
    }

    #[test]
    fn only_tunnels_cross_address_families() {
        let svc = |fwd: &str| {
            format!(
                "interface = \"eth0\"\n[[service]]\nname = \"s\"\nvip = \"10.0.0.1\"\nport = \
                 80\nforwarding = \"{fwd}\"\n[[service.backend]]\naddress = \"fd00::2\"\n"
            )
        };
        crate::config::testing::error(&svc("dr"), "address");
        for fwd in ["ipip", "gue"] {
            let c = Config::from_toml_str(&svc(fwd)).unwrap();
            assert!(c.services[0].forwarding.is_tunnel());
            // Written back and read again unchanged.
            assert_eq!(Config::from_toml_str(&c.to_toml()).unwrap(), c);
        }
    }

    #[test]
    fn bad_tunnel_sources_are_one_line_errors() {
        use crate::config::testing::error;
        for (v, what) in [
            ("\"10.0.0.1\"", "not a prefix"),
            ("\"10.0.0.1/24\"", "host bits"),
            ("\"fd00::/64\"", "out of range 96..=128"),
            (
                "[\"10.0.0.0/24\", \"10.1.0.0/24\"]",
                "at most one per address family",
            ),
            ("3", "expected a string or an array of strings"),
        ] {
            let msg = error(
                &format!("interface = \"eth0\"\ntunnel_source = {v}\n"),
                "tunnel_source",
            );
            assert!(msg.contains(what), "{msg}");
        }
        error("interface = \"eth0\"\ngue_port = 0\n", "gue_port");
        let svc =
            "interface = \"eth0\"\n[[service]]\nname = \"s\"\nvip = \"10.0.0.1\"\nport = 80\n";
        let msg = error(&format!("{svc}gue_port = 7000\n"), "gue_port");
        assert!(msg.contains("only for forwarding = \"gue\""), "{msg}");
        error(
            &format!("{svc}forwarding = \"ipip\"\ngue_port = 7000\n"),
            "gue_port",
        );
        error(
            &format!("{svc}forwarding = \"gue\"\ngue_port = 70000\n"),
            "gue_port",
        );
        let c = Config::from_toml_str(&format!("{svc}forwarding = \"gue\"\ngue_port = 7001\n"));
        assert_eq!(c.unwrap().services[0].gue_port, Some(7001));
    }
}
