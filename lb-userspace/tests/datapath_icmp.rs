//! ICMP fixtures: echo requests to VIPs answered by the program, errors quoting a VIP flow
//! forwarded to that flow's backend, everything else to a VIP dropped. Each case runs in
//! the kernel (BPF_PROG_TEST_RUN) and the reference model, which must agree on verdict,
//! output bytes and counters; checksums of the output are verified from scratch here.
//! Needs root.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use farmlb::config::Config;
use farmlb::dataplane::model::{Action, Twin};
use farmlb::director::Director;
use farmlb::packet::{client, fixture_mac, flow_key, service_toml, PacketBuilder};
use lb_common::{csum, Stat, PROTO_TCP, PROTO_UDP};

const OWN_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x03];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const VIP4: &str = "10.99.100.1";
const VIP6: &str = "fd99:100::1";

struct Fixture {
    k: Twin,
    director: Director,
}

impl Fixture {
    fn new() -> Self {
        let (v4, v6) = (
            ["10.99.0.11", "10.99.0.12", "10.99.0.13"],
            ["fd99::11", "fd99::12", "fd99::13"],
        );
        let toml = format!(
            "interface = \"eth0\"\nudp_timeout = \"30s\"\n{}",
            [
                service_toml("web4", VIP4, 80, "tcp", Some(1009), &v4),
                service_toml("dns4", VIP4, 53, "udp", Some(1009), &v4),
                service_toml("web6", VIP6, 80, "tcp", Some(1009), &v6),
                service_toml("empty", "10.99.100.3", 80, "tcp", Some(211), &[]),
            ]
            .concat()
        );
        let cfg = Config::from_toml_str(&toml).expect("fixture config");
        let (k, director) = Twin::programmed(&cfg, OWN_MAC, |_| {});
        Fixture { k, director }
    }

    /// Kernel and model agree (verdict, bytes, counters); returns the decision's parts.
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

fn vip(v6: bool, port: u16) -> SocketAddr {
    SocketAddr::new(if v6 { VIP6 } else { VIP4 }.parse().unwrap(), port)
}

/// The ICMP(v6) message of an untagged frame verifies (pseudo-header for ICMPv6), and so
/// does the IPv4 header.
fn checksums_ok(frame: &[u8]) -> bool {
    if frame[12..14] == [0x08, 0x00] {
        let ip = &frame[14..34];
        csum::fold(csum::sum(ip, 0)) == 0 && csum::fold(csum::sum(&frame[34..], 0)) == 0
    } else {
        let ip = &frame[14..54];
        let msg = &frame[54..];
        let mut ph = ip[8..40].to_vec();
        ph.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        ph.extend_from_slice(&[0, 0, 0, 58]);
        csum::fold(csum::sum(msg, csum::sum(&ph, 0))) == 0
    }
}

#[test]
fn echo_requests_to_vips_are_answered() {
    let mut f = Fixture::new();
    for v6 in [false, true] {
        let src = client(7, 0, v6);
        let pkt = PacketBuilder::ping(src, vip(v6, 0), 0x1234, 9, 56)
            .macs(CLIENT_MAC, OWN_MAC)
            .build();
        assert!(checksums_ok(&pkt), "the request is valid");
        let (action, out, _, reason) = f.run(&pkt);
        assert_eq!((action, reason), (Action::Tx, Stat::IcmpEchoReply));
        assert_eq!(out.len(), pkt.len());
        assert_eq!(out[0..6], pkt[6..12], "back to the sender's MAC");
        assert_eq!(out[6..12], pkt[0..6]);
        // The reply as a host would send it, byte for byte.
        let mut want = PacketBuilder::ping(vip(v6, 0), src, 0x1234, 9, 56);
        want.icmp.as_mut().unwrap().0 = if v6 { 129 } else { 0 };
        let want = want.macs(
            pkt[0..6].try_into().unwrap(),
            pkt[6..12].try_into().unwrap(),
        );
        assert_eq!(out, want.build(), "v6={v6}: reply bytes");
        assert!(checksums_ok(&out), "v6={v6}: reply checksums");
    }
    // A tagged request is answered on its VLAN.
    let pkt = PacketBuilder::ping(client(1, 0, false), vip(false, 0), 1, 1, 8)
        .macs(CLIENT_MAC, OWN_MAC)
        .vlan(42)
        .build();
    let (action, out, _, _) = f.run(&pkt);
    assert_eq!(action, Action::Tx);
    assert_eq!(out[12..18], pkt[12..18], "tag kept");
    assert_eq!(out[30..34], pkt[34..38], "addresses swapped");
    // Sent to another MAC (a farm's virtual MAC reaches every node): not answered.
    let pkt = PacketBuilder::ping(client(1, 0, false), vip(false, 0), 1, 1, 8)
        .macs(CLIENT_MAC, [0x02, 0x99, 0, 0, 0, 0xfa])
        .build();
    assert_eq!(f.run(&pkt).3, Stat::DropIcmp);
    let s = f.k.dp.stats().unwrap();
    assert_eq!(s[Stat::IcmpEchoReply as usize], 3);
}

#[test]
fn pings_to_other_addresses_pass() {
    let mut f = Fixture::new();
    for dst in ["10.99.100.9:0", "[fd99:100::9]:0"] {
        let pkt = PacketBuilder::ping(client(1, 0, dst.starts_with('[')), sa(dst), 1, 1, 8).build();
        let (action, out, _, reason) = f.run(&pkt);
        assert_eq!((action, reason), (Action::Pass, Stat::PassNotVip));
        assert_eq!(out, pkt);
    }
}

#[test]
fn other_icmp_to_vips_is_dropped_and_nd_passes() {
    let mut f = Fixture::new();
    let c4 = client(1, 0, false);
    let c6 = client(1, 0, true);
    let drops = [
        PacketBuilder::icmp(c4, vip(false, 0), 0, 0, [0; 4]).build(), // echo reply
        PacketBuilder::icmp(c4, vip(false, 0), 3, 1, [0; 4]).build(), // host unreachable
        PacketBuilder::icmp(c4, vip(false, 0), 13, 0, [0; 4]).build(), // timestamp
        PacketBuilder::icmp(c4, vip(false, 0), 11, 0, [0; 4]).build(), // time exceeded
        PacketBuilder::icmp(c6, vip(true, 0), 129, 0, [0; 4]).build(), // echo reply
        PacketBuilder::icmp(c6, vip(true, 0), 1, 4, [0; 4]).build(),  // port unreachable
    ];
    for pkt in &drops {
        let (action, _, _, reason) = f.run(pkt);
        assert_eq!((action, reason), (Action::Drop, Stat::DropIcmp));
    }
    // Neighbour solicitation / advertisement addressed to the VIP: the kernel's.
    for ty in [135, 136] {
        let pkt = PacketBuilder::icmp(c6, vip(true, 0), ty, 0, [0; 4]).build();
        let (action, out, _, reason) = f.run(&pkt);
        assert_eq!((action, reason), (Action::Pass, Stat::PassIcmpNd));
        assert_eq!(out, pkt);
    }
    // Cut inside the ICMP header; a fragment; ICMPv6 behind an extension header.
    let mut cut = PacketBuilder::ping(c4, vip(false, 0), 1, 1, 0).build();
    cut.truncate(14 + 20 + 5);
    assert_eq!(f.run(&cut).3, Stat::DropMalformed);
    let frag = PacketBuilder::ping(c4, vip(false, 0), 1, 1, 8)
        .fragment(0x2000)
        .build();
    assert_eq!(f.run(&frag).3, Stat::DropFragment);
    let ext = PacketBuilder::ping(c6, vip(true, 0), 1, 1, 8)
        .ext(farmlb::packet::Ext::DestOpts(0))
        .build();
    assert_eq!(f.run(&ext).3, Stat::PassNotVip);
}

/// The IP packet (no Ethernet) the backend sent for a flow: VIP -> client.
fn reply_ip(client: SocketAddr, vip: SocketAddr, proto: u8, payload: usize) -> Vec<u8> {
    let b = if proto == PROTO_TCP {
        PacketBuilder::tcp(vip, client)
    } else {
        PacketBuilder::udp(vip, client)
    };
    b.payload(payload).build()[14..].to_vec()
}

#[test]
fn too_big_errors_reach_the_flows_backend() {
    let mut f = Fixture::new();
    let router4 = sa("192.0.2.1:0");
    let router6 = sa("[2001:db8:ffff::1]:0");
    for (v6, proto, port) in [
        (false, PROTO_TCP, 80),
        (false, PROTO_UDP, 53),
        (true, PROTO_TCP, 80),
    ] {
        let mut backends = HashMap::new();
        for i in 0..40 {
            let c = client(i, 20_000 + i as u16, v6);
            // The flow's first packet records its backend.
            let first = if proto == PROTO_TCP {
                PacketBuilder::tcp(c, vip(v6, port)).syn().build()
            } else {
                PacketBuilder::udp(c, vip(v6, port)).build()
            };
            let (_, _, id, _) = f.run(&first);
            backends.insert(c, id);
            let router = if v6 { router6 } else { router4 };
            let quote = reply_ip(c, vip(v6, port), proto, 1400);
            // Routers quote as much as fits in a minimum-MTU datagram.
            let quote = &quote[..quote.len().min(if v6 { 1232 } else { 548 })];
            let pkt = PacketBuilder::too_big(router, vip(v6, 0), 1400, quote).build();
            let (action, out, to, reason) = f.run(&pkt);
            assert_eq!((action, reason), (Action::Tx, Stat::IcmpTooBigTx));
            assert_eq!(to, id, "the error goes where the flow goes");
            assert_eq!(out[0..6], fixture_mac(f.backend_ip(to)));
            assert_eq!(out[6..12], OWN_MAC);
            assert_eq!(out[12..], pkt[12..], "the error itself is untouched");
        }
        let distinct: std::collections::HashSet<_> = backends.values().collect();
        assert!(distinct.len() > 1, "flows spread, so the lookup matters");
    }
    // A flow conntrack does not know: the ring's backend (the model's prediction).
    let c = client(99, 33_333, false);
    let quote = reply_ip(c, vip(false, 80), PROTO_TCP, 0);
    let pkt = PacketBuilder::too_big(router4, vip(false, 0), 1400, &quote).build();
    let (action, _, to, _) = f.run(&pkt);
    let svc = f.director.services["web4"].info;
    let expect =
        f.k.model
            .expected_backend(&svc, &flow_key(c, vip(false, 80), PROTO_TCP));
    assert_eq!((action, to), (Action::Tx, expect));
    assert_eq!(f.k.dp.stats().unwrap()[Stat::IcmpTooBigTx as usize], 121);
}

#[test]
fn too_big_errors_without_a_vip_flow_are_dropped() {
    let mut f = Fixture::new();
    let r = sa("192.0.2.1:0");
    let c = client(1, 40_000, false);
    let good = reply_ip(c, vip(false, 80), PROTO_TCP, 0);
    let mut options = good.clone();
    options[0] = 0x46;
    let mut icmp_inside = good.clone();
    icmp_inside[9] = 1;
    let other_port = reply_ip(c, vip(false, 81), PROTO_TCP, 0);
    let other_vip = reply_ip(c, sa("10.99.100.9:80"), PROTO_TCP, 0);
    let v6_quote = reply_ip(client(1, 40_000, true), vip(true, 80), PROTO_TCP, 0);
    let cases: [(&[u8], Stat); 7] = [
        (&good[..20 + 3], Stat::DropIcmp), // ports cut short
        (&good[..12], Stat::DropIcmp),     // quoted header cut short
        (&options, Stat::DropIcmp),
        (&icmp_inside, Stat::DropIcmp),
        (&other_port, Stat::DropIcmp),
        (&other_vip, Stat::DropIcmp),
        (&v6_quote, Stat::DropIcmp), // IPv6 quoted in ICMPv4
    ];
    for (quote, want) in cases {
        let pkt = PacketBuilder::too_big(r, vip(false, 0), 1400, quote).build();
        let (action, _, _, reason) = f.run(&pkt);
        assert_eq!((action, reason), (Action::Drop, want));
    }
    // The flow's service has no backend.
    let empty = reply_ip(c, sa("10.99.100.3:80"), PROTO_TCP, 0);
    let pkt = PacketBuilder::too_big(r, sa("10.99.100.3:0"), 1400, &empty).build();
    assert_eq!(f.run(&pkt).3, Stat::DropNoBackend);
}
