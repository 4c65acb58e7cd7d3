//! Tunnel fixtures: IPIP (4in4, 6in6, 4in6) and GUE forwarding, the outer headers checked
//! field by field here (addresses, lengths, ToS, TTL, checksums, ports), the kernel against
//! the reference model on every packet (verdict, bytes, counters); packets too big for the
//! tunnel answered with frag-needed / packet-too-big or dropped. Needs root.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use farmlb::config::Config;
use farmlb::dataplane::model::{Action, Twin};
use farmlb::dataplane::LoadOpts;
use farmlb::director::Director;
use farmlb::packet::{client, fixture_mac, flow_key, PacketBuilder};
use farmlb::tunnel::TunnelHost;
use lb_common::{csum, tunnel_hash, Stat, PROTO_TCP, PROTO_UDP};

const OWN_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x03];
const OWN4: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const OWN6: Ipv6Addr = Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, 1);
const MTU: u16 = 1500;

struct Fixture {
    k: Twin,
    director: Director,
}

/// A service's `[[service]]` table with tunnel forwarding.
fn service(name: &str, vip: &str, port: u16, proto: &str, fwd: &str, backends: &[&str]) -> String {
    let mut t = format!(
        "\n[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nport = {port}\nprotocol = \
         \"{proto}\"\nforwarding = \"{fwd}\"\ntable_size = 1009\n"
    );
    for b in backends {
        t += &format!("  [[service.backend]]\n  address = \"{b}\"\n");
    }
    t
}

const B4: [&str; 3] = ["172.16.1.11", "172.16.2.12", "172.16.3.13"];
const B6: [&str; 3] = ["fd16:1::11", "fd16:2::12", "fd16:3::13"];

impl Fixture {
    fn new(globals: &str) -> Self {
        let toml = format!(
            "interface = \"eth0\"\n{globals}\n{}",
            [
                service("ipip4", "10.99.100.1", 80, "tcp", "ipip", &B4),
                service("ipip6", "fd99:100::1", 80, "tcp", "ipip", &B6),
                service("ipip46", "10.99.100.2", 80, "tcp", "ipip", &B6),
                service("gue4", "10.99.100.1", 53, "udp", "gue", &B4),
                service("gue6", "fd99:100::1", 53, "udp", "gue", &B6),
                service("gue46", "10.99.100.2", 53, "udp", "gue", &B6),
                service("dr", "10.99.100.3", 80, "tcp", "dr", &["10.99.0.11"]),
            ]
            .concat()
        );
        let cfg = Config::from_toml_str(&toml).expect("fixture config");
        let (k, director) = Twin::programmed(&cfg, OWN_MAC, |d| {
            d.tunnel = TunnelHost {
                mtu: MTU,
                addr4: Some(OWN4),
                addr6: Some(OWN6),
            }
        });
        Fixture { k, director }
    }

    fn run(&mut self, pkt: &[u8]) -> (Action, Vec<u8>, u32, Stat) {
        let (d, out) = self
            .k
            .run(pkt)
            .unwrap_or_else(|e| panic!("kernel and model disagree: {e:#}"));
        (d.action, out, d.backend, d.reason)
    }

    fn backend_ip(&self, id: u32) -> IpAddr {
        self.director.backend_address(id).expect("known backend id")
    }
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn octets(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// Checks the outer headers of `out` (wrapping `inner`, a frame) field by field; returns
/// the outer source address.
fn check_outer(out: &[u8], inner: &[u8], backend: IpAddr, gue: Option<u16>, tos: u8) -> IpAddr {
    assert_eq!(out[0..6], fixture_mac(backend), "next hop's MAC");
    assert_eq!(out[6..12], OWN_MAC);
    let inner_ip = &inner[14..];
    let v6 = backend.is_ipv6();
    let ip_len = if v6 { 40 } else { 20 };
    let udp = if gue.is_some() { 8 } else { 0 };
    assert_eq!(
        out.len(),
        inner.len() + ip_len + udp,
        "grown by the outer headers"
    );
    assert_eq!(
        &out[14 + ip_len + udp..],
        inner_ip,
        "inner packet untouched"
    );
    let h = &out[14..14 + ip_len];
    let next = match (gue, inner_ip[0] >> 4) {
        (Some(_), _) => 17,
        (None, 6) => 41,
        (None, _) => 4,
    };
    let total = (ip_len + udp + inner_ip.len()) as u16;
    let src: IpAddr = if v6 {
        assert_eq!(out[12..14], [0x86, 0xdd]);
        assert_eq!(h[0] >> 4, 6);
        assert_eq!((h[0] << 4) | (h[1] >> 4), tos, "traffic class copied");
        assert_eq!(u16::from_be_bytes([h[4], h[5]]), total - 40);
        assert_eq!((h[6], h[7]), (next, 64), "next header, hop limit");
        assert_eq!(h[24..40], octets(backend)[..]);
        IpAddr::from(<[u8; 16]>::try_from(&h[8..24]).unwrap())
    } else {
        assert_eq!(out[12..14], [0x08, 0x00]);
        assert_eq!((h[0], h[1]), (0x45, tos), "version/IHL, ToS copied");
        assert_eq!(u16::from_be_bytes([h[2], h[3]]), total);
        assert_eq!(h[6..8], [0, 0], "DF clear, no offset");
        assert_eq!((h[8], h[9]), (64, next), "TTL, protocol");
        assert_eq!(csum::fold(csum::sum(h, 0)), 0, "outer IPv4 checksum");
        assert_eq!(h[16..20], octets(backend)[..]);
        IpAddr::from(<[u8; 4]>::try_from(&h[12..16]).unwrap())
    };
    if let Some(port) = gue {
        let u = &out[14 + ip_len..14 + ip_len + 8];
        let sport = u16::from_be_bytes([u[0], u[1]]);
        assert!(
            sport >= 0xc000,
            "GUE source port {sport} in the ephemeral range"
        );
        assert_eq!(u16::from_be_bytes([u[2], u[3]]), port);
        assert_eq!(u16::from_be_bytes([u[4], u[5]]), total - ip_len as u16);
        assert_eq!(u[6..8], [0, 0], "no UDP checksum");
    }
    src
}

/// 200 flows to `vip` over a tunnel service: each wrapped correctly towards the backend the
/// model picked, every backend used, the outer source the director's address.
fn tunnels(vip: &str, udp: bool, v6_client: bool, v6_backends: bool, gue: Option<u16>) {
    let mut f = Fixture::new("");
    let vip = sa(vip);
    let mut seen: HashMap<u32, u32> = HashMap::new();
    let mut sports = HashSet::new();
    for i in 0..200 {
        let src = client(i, 10_000 + i as u16, v6_client);
        let b = if udp {
            PacketBuilder::udp(src, vip)
        } else {
            PacketBuilder::tcp(src, vip).syn()
        };
        let pkt = b.tos(0xb8).payload(40).build();
        let (action, out, id, reason) = f.run(&pkt);
        assert_eq!((action, reason), (Action::Tx, Stat::Tx));
        let ip = f.backend_ip(id);
        assert_eq!(ip.is_ipv6(), v6_backends);
        let src_addr = check_outer(&out, &pkt, ip, gue, 0xb8);
        let own: IpAddr = if v6_backends {
            OWN6.into()
        } else {
            OWN4.into()
        };
        assert_eq!(src_addr, own, "outer source is the director's address");
        if gue.is_some() {
            sports.insert(u16::from_be_bytes([out[34 + 20 * v6_backends as usize], 0]));
        }
        *seen.entry(id).or_default() += 1;
    }
    assert_eq!(seen.len(), 3, "every backend used: {seen:?}");
    if gue.is_some() {
        assert!(sports.len() > 10, "GUE source ports vary with the flow");
    }
}

#[test]
fn ipip_4in4_6in6_4in6() {
    tunnels("10.99.100.1:80", false, false, false, None);
    tunnels("[fd99:100::1]:80", false, true, true, None);
    tunnels("10.99.100.2:80", false, false, true, None);
}

#[test]
fn gue_over_ipv4_and_ipv6() {
    tunnels("10.99.100.1:53", true, false, false, Some(6080));
    tunnels("[fd99:100::1]:53", true, true, true, Some(6080));
    tunnels("10.99.100.2:53", true, false, true, Some(6080));
}

#[test]
fn gue_port_and_per_flow_sources_come_from_the_config() {
    let mut f =
        Fixture::new("gue_port = 7000\ntunnel_source = [\"192.0.2.0/28\", \"2001:db8:5::/124\"]");
    let mut sources4 = HashSet::new();
    let mut sources6 = HashSet::new();
    for i in 0..100 {
        for (vip, v6) in [("10.99.100.1:53", false), ("[fd99:100::1]:53", true)] {
            let c = client(i, 30_000 + i as u16, v6);
            let pkt = PacketBuilder::udp(c, sa(vip)).payload(8).build();
            let (action, out, id, _) = f.run(&pkt);
            assert_eq!(action, Action::Tx);
            let src = check_outer(&out, &pkt, f.backend_ip(id), Some(7000), 0);
            // The host bits are the flow hash's.
            let h = tunnel_hash(&flow_key(c, sa(vip), PROTO_UDP));
            match src {
                IpAddr::V4(a) => {
                    assert_eq!(a.octets()[..3], [192, 0, 2]);
                    assert_eq!(a.octets()[3] as u32, h & 15);
                    sources4.insert(a);
                }
                IpAddr::V6(a) => {
                    assert_eq!(a.segments()[..7], [0x2001, 0xdb8, 5, 0, 0, 0, 0]);
                    assert_eq!(a.segments()[7] as u32, h & 15);
                    sources6.insert(a);
                }
            }
        }
    }
    assert!(
        sources4.len() > 8 && sources6.len() > 8,
        "flows spread over the prefixes"
    );
}

#[test]
fn tagged_frames_keep_their_tag() {
    let mut f = Fixture::new("");
    let pkt = PacketBuilder::tcp(client(1, 5555, false), sa("10.99.100.1:80"))
        .syn()
        .vlan(42)
        .build();
    let (action, out, id, _) = f.run(&pkt);
    assert_eq!(action, Action::Tx);
    assert_eq!(out[12..16], pkt[12..16], "tag kept");
    assert_eq!(out[16..18], [0x08, 0x00]);
    assert_eq!(out[18 + 16..18 + 20], octets(f.backend_ip(id))[..]);
    assert_eq!(&out[18 + 20..], &pkt[18..]);
}

#[test]
fn too_big_for_the_tunnel_is_answered_or_dropped() {
    let mut f = Fixture::new("");
    // 1500-byte IPv4 datagrams with DF: frag-needed naming 1480 (IPIP) / 1472 (GUE).
    for (vip, port, mtu, v6) in [
        ("10.99.100.1", 80, 1480u32, false),
        ("10.99.100.1", 53, 1472, false),
        ("10.99.100.2", 80, 1460, false), // 4in6
        ("fd99:100::1", 80, 1460, true),
        ("fd99:100::1", 53, 1452, true),
    ] {
        let c = client(3, 40_000, v6);
        let dst = SocketAddr::new(vip.parse().unwrap(), port);
        let ip_len = if v6 { 40 } else { 20 };
        let l4 = if port == 80 { 20 } else { 8 };
        let b = if port == 80 {
            PacketBuilder::tcp(c, dst)
        } else {
            PacketBuilder::udp(c, dst)
        };
        let b = b.payload(1500 - ip_len - l4);
        let pkt = if v6 {
            b.build()
        } else {
            b.fragment(0x4000).build()
        };
        assert_eq!(pkt.len(), 1514);
        let (action, out, _, reason) = f.run(&pkt);
        assert_eq!(
            (action, reason),
            (Action::Tx, Stat::IcmpTooBigSent),
            "{vip}:{port}"
        );
        assert_eq!(out[0..6], pkt[6..12], "back to the sender");
        assert_eq!(out[6..12], pkt[0..6]);
        let h = &out[14..];
        let quote = if v6 { 128 } else { 64 };
        assert_eq!(out.len(), 14 + ip_len + 8 + quote);
        if v6 {
            assert_eq!(h[6], 58);
            assert_eq!(h[8..24], octets(dst.ip())[..], "from the VIP");
            assert_eq!(h[24..40], octets(c.ip())[..], "to the client");
            let m = &h[40..];
            assert_eq!((m[0], m[1]), (2, 0), "packet too big");
            assert_eq!(u32::from_be_bytes([m[4], m[5], m[6], m[7]]), mtu);
            assert_eq!(&m[8..], &pkt[14..14 + quote], "quotes the packet");
            let mut ph = h[8..40].to_vec();
            ph.extend_from_slice(&(m.len() as u32).to_be_bytes());
            ph.extend_from_slice(&[0, 0, 0, 58]);
            assert_eq!(
                csum::fold(csum::sum(m, csum::sum(&ph, 0))),
                0,
                "ICMPv6 checksum"
            );
        } else {
            assert_eq!(csum::fold(csum::sum(&h[..20], 0)), 0, "IPv4 checksum");
            assert_eq!((h[8], h[9]), (64, 1));
            assert_eq!(u16::from_be_bytes([h[2], h[3]]) as usize, 20 + 8 + quote);
            assert_eq!(h[12..16], octets(dst.ip())[..], "from the VIP");
            assert_eq!(h[16..20], octets(c.ip())[..], "to the client");
            let m = &h[20..];
            assert_eq!((m[0], m[1]), (3, 4), "fragmentation needed");
            assert_eq!(u16::from_be_bytes([m[6], m[7]]) as u32, mtu);
            assert_eq!(&m[8..], &pkt[14..14 + quote], "quotes the packet");
            assert_eq!(csum::fold(csum::sum(m, 0)), 0, "ICMP checksum");
        }
    }
    // Without DF the packet may be fragmented on the way: not ours to answer, dropped.
    let pkt = PacketBuilder::udp(client(3, 40_001, false), sa("10.99.100.1:53"))
        .payload(1500 - 28)
        .build();
    assert_eq!(f.run(&pkt).3, Stat::DropTooBig);
    // Exactly at the limit: forwarded.
    let pkt = PacketBuilder::udp(client(3, 40_002, false), sa("10.99.100.1:53"))
        .payload(1472 - 28)
        .fragment(0x4000)
        .build();
    let (action, out, _, _) = f.run(&pkt);
    assert_eq!(action, Action::Tx);
    assert_eq!(out.len() - 14, 1500);
    // DR services are not checked (nothing grows).
    let pkt = PacketBuilder::tcp(client(3, 40_003, false), sa("10.99.100.3:80"))
        .payload(1500 - 40)
        .fragment(0x4000)
        .build();
    assert_eq!(f.run(&pkt).3, Stat::Tx);
    let s = f.k.dp.stats().unwrap();
    assert_eq!(s[Stat::IcmpTooBigSent as usize], 5);
    assert_eq!(s[Stat::DropTooBig as usize], 1);
}

#[test]
fn icmp_errors_about_tunnelled_flows_are_tunnelled() {
    let mut f = Fixture::new("");
    for (vip, v6) in [("10.99.100.1:80", false), ("[fd99:100::1]:80", true)] {
        let c = client(9, 44_000, v6);
        let (_, _, id, _) = f.run(&PacketBuilder::tcp(c, sa(vip)).syn().build());
        let quote = PacketBuilder::tcp(sa(vip), c).payload(100).build()[14..].to_vec();
        let router = if v6 {
            "[2001:db8:ff::1]:0"
        } else {
            "192.0.2.254:0"
        };
        let vip0 = SocketAddr::new(sa(vip).ip(), 0);
        let pkt = PacketBuilder::too_big(sa(router), vip0, 1400, &quote).build();
        let (action, out, to, reason) = f.run(&pkt);
        assert_eq!((action, reason), (Action::Tx, Stat::IcmpTooBigTx));
        assert_eq!(to, id, "to the flow's backend");
        check_outer(&out, &pkt, f.backend_ip(to), None, 0);
    }
    // The echo reply path is the same whatever the forwarding.
    let pkt = PacketBuilder::ping(client(1, 0, false), sa("10.99.100.1:0"), 1, 1, 8)
        .macs([2, 0, 0, 0, 0, 1], OWN_MAC)
        .build();
    assert_eq!(f.run(&pkt).3, Stat::IcmpEchoReply);
    let _ = PROTO_TCP;
}

/// A GUE service's own `gue_port` beats the global one, and a reload rewrites it.
#[test]
fn a_service_may_have_its_own_gue_port() {
    let toml = format!(
        "interface = \"eth0\"\ngue_port = 7000\n{}{}",
        service("g1", "10.99.100.1", 53, "udp", "gue", &B4),
        service("g2", "10.99.100.1", 54, "udp", "gue", &B4).replace(
            "forwarding = \"gue\"",
            "forwarding = \"gue\"\ngue_port = 7100"
        ),
    );
    let cfg = Config::from_toml_str(&toml).expect("config");
    let mut k = Twin::load(LoadOpts {
        ring_slots: Director::ring_slots_for(&cfg),
        conntrack_size: 4096,
        own_mac: OWN_MAC,
        ..Default::default()
    })
    .unwrap();
    let mut director = Director::new(k.dp.ring_slots(), OWN_MAC);
    director.tunnel = TunnelHost {
        mtu: MTU,
        addr4: Some(OWN4),
        addr6: None,
    };
    let mut macs: HashMap<IpAddr, [u8; 6]> = B4
        .iter()
        .map(|b| (b.parse().unwrap(), fixture_mac(b.parse().unwrap())))
        .collect();
    director.apply(&cfg, &mut k.maps(), &mut macs).unwrap();
    let dport = |out: &[u8]| u16::from_be_bytes([out[36], out[37]]);
    for (port, gue) in [(53, 7000), (54, 7100)] {
        let dst = SocketAddr::new([10, 99, 100, 1].into(), port);
        let pkt = PacketBuilder::udp(client(1, 999, false), dst).build();
        let (d, out) = k.run(&pkt).unwrap();
        assert_eq!(d.action, Action::Tx);
        assert_eq!(dport(&out), gue, "service port {port}");
    }
    let cfg = Config::from_toml_str(&toml.replace("7100", "7200")).unwrap();
    director.apply(&cfg, &mut k.maps(), &mut macs).unwrap();
    let pkt = PacketBuilder::udp(client(2, 999, false), sa("10.99.100.1:54")).build();
    let (_, out) = k.run(&pkt).unwrap();
    assert_eq!(dport(&out), 7200, "rewritten on reload");
}
