//! Decapsulator fixtures (`farmlb decap`'s XDP program, run with BPF_PROG_TEST_RUN): what
//! the director's tunnels send comes back out as the original frame, for every tunnel kind
//! (IPIP 4in4, 6in6, 4in6, 6in4; GUE over IPv4 and IPv6; VLAN-tagged); packets that are not
//! tunnels for this host pass untouched; malformed tunnel packets are dropped. Every case
//! checks the verdict, the bytes and which counter moved. Needs root.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use farmlb::config::Config;
use farmlb::dataplane::model::{Action, Model};
use farmlb::decap::Decap;
use farmlb::director::{addr_of, Director};
use farmlb::packet::{client, fixture_mac, PacketBuilder};
use farmlb::tunnel::TunnelHost;
use lb_common::{hdr, DecapStat};

const PASS: u32 = 2;
const DROP: u32 = 1;
const GUE_PORT: u16 = 6080;

/// The director's side, as the reference model (the kernel program writes the same bytes,
/// as `datapath_tunnel` shows): every tunnel kind, backends 172.16.0.x / fd16::x.
fn director() -> Model {
    let svc = |name: &str, vip: &str, port: u16, proto: &str, fwd: &str, b: &str| {
        format!(
            "\n[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nport = {port}\nprotocol = \
             \"{proto}\"\nforwarding = \"{fwd}\"\ntable_size = 211\n  [[service.backend]]\n  \
             address = \"{b}\"\n"
        )
    };
    let toml = format!(
        "interface = \"eth0\"\n{}",
        [
            svc("i44", "10.99.100.1", 80, "tcp", "ipip", "172.16.0.1"),
            svc("i66", "fd99:100::1", 80, "tcp", "ipip", "fd16::1"),
            svc("i46", "10.99.100.2", 80, "tcp", "ipip", "fd16::1"),
            svc("i64", "fd99:100::2", 80, "tcp", "ipip", "172.16.0.1"),
            svc("g44", "10.99.100.1", 53, "udp", "gue", "172.16.0.1"),
            svc("g66", "fd99:100::1", 53, "udp", "gue", "fd16::1"),
            svc("g46", "10.99.100.2", 53, "udp", "gue", "fd16::1"),
        ]
        .concat()
    );
    let cfg = Config::from_toml_str(&toml).expect("fixture config");
    let mut model = Model::default();
    let mut director = Director::new(1 << 16, [2, 0xaa, 0, 0, 0, 3]);
    director.tunnel = TunnelHost {
        mtu: 9000,
        addr4: Some(Ipv4Addr::new(10, 99, 0, 1)),
        addr6: Some(Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, 1)),
    };
    let mut macs: HashMap<IpAddr, [u8; 6]> = HashMap::new();
    for s in &cfg.services {
        for b in &s.backends {
            macs.insert(b.address, fixture_mac(b.address));
        }
    }
    director.apply(&cfg, &mut model, &mut macs).expect("apply");
    model
}

fn decap() -> Decap {
    let mut d = Decap::load(GUE_PORT).expect("load the decap program (are we root?)");
    let ours: HashSet<_> = ["172.16.0.1", "fd16::1"]
        .iter()
        .map(|a| addr_of(a.parse().unwrap()))
        .collect();
    d.set_addrs(&ours).unwrap();
    d
}

/// Run `pkt`; assert the verdict and that exactly `stat` moved; return the output.
fn run(d: &mut Decap, pkt: &[u8], action: u32, stat: DecapStat) -> Vec<u8> {
    let before = d.stats().unwrap();
    let (a, out) = d.test_run(pkt).unwrap();
    let after = d.stats().unwrap();
    assert_eq!(a, action, "verdict for {stat:?}");
    let mut want = [0u64; DecapStat::COUNT as usize];
    want[stat as usize] = 1;
    let delta: Vec<u64> = after.iter().zip(before).map(|(a, b)| a - b).collect();
    assert_eq!(delta, want, "counters (expected {stat:?})");
    out
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// What the director sends for `pkt` (a frame to a VIP).
fn tunnelled(m: &mut Model, pkt: &[u8]) -> Vec<u8> {
    let (d, out) = m.process(pkt, 1);
    assert_eq!(d.action, Action::Tx, "{d:?}");
    out
}

#[test]
fn every_tunnel_kind_comes_back_as_the_original_frame() {
    let mut m = director();
    let mut d = decap();
    let cases = [
        ("10.99.100.1:80", false, false, DecapStat::Ipip),
        ("[fd99:100::1]:80", true, false, DecapStat::Ipip),
        ("10.99.100.2:80", false, false, DecapStat::Ipip),
        ("[fd99:100::2]:80", true, false, DecapStat::Ipip),
        ("10.99.100.1:53", false, true, DecapStat::Gue),
        ("[fd99:100::1]:53", true, true, DecapStat::Gue),
        ("10.99.100.2:53", false, true, DecapStat::Gue),
    ];
    for (vip, v6, udp, stat) in cases {
        for i in 0..20u32 {
            let c = client(i, 20_000 + i as u16, v6);
            let b = if udp {
                PacketBuilder::udp(c, sa(vip))
            } else {
                PacketBuilder::tcp(c, sa(vip)).syn()
            };
            let b = b.payload(i as usize * 37).tos(0x28);
            let b = if i % 5 == 0 { b.vlan(7) } else { b };
            let pkt = b.build();
            let wrapped = tunnelled(&mut m, &pkt);
            assert!(wrapped.len() > pkt.len());
            let out = run(&mut d, &wrapped, PASS, stat);
            let mut want = wrapped[..12].to_vec();
            want.extend_from_slice(&pkt[12..]);
            assert_eq!(
                out, want,
                "{vip}: the original frame, with the tunnel's MACs"
            );
        }
    }
}

/// An IPv4 tunnel packet to `dst` with protocol `proto` and `payload` after its header.
fn ipv4_frame(dst: [u8; 4], proto: u8, payload: &[u8], frag: u16) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00];
    let mut h = hdr::ipv4(0, (20 + payload.len()) as u16, proto, [10, 99, 0, 1], dst);
    h[6..8].copy_from_slice(&frag.to_be_bytes());
    f.extend_from_slice(&h);
    f.extend_from_slice(payload);
    f
}

#[test]
fn packets_that_are_not_our_tunnels_pass_untouched() {
    let mut d = decap();
    let inner =
        PacketBuilder::tcp(sa("198.51.0.1:1000"), sa("10.99.100.1:80")).build()[14..].to_vec();
    let cases = [
        // Plain traffic, to us and elsewhere.
        (
            PacketBuilder::tcp(sa("198.51.0.1:1000"), sa("172.16.0.1:80")).build(),
            DecapStat::PassNotTunnel,
        ),
        (
            PacketBuilder::udp(sa("198.51.0.1:1000"), sa("172.16.0.1:6081")).build(),
            DecapStat::PassNotTunnel,
        ),
        (
            farmlb::packet::arp_request([2, 0, 0, 0, 0, 9], [10, 0, 0, 1], [10, 0, 0, 2]),
            DecapStat::PassNotTunnel,
        ),
        // A tunnel packet for another host (the stack may route it on).
        (
            ipv4_frame([172, 16, 0, 9], 4, &inner, 0),
            DecapStat::PassNotLocal,
        ),
        // An outer fragment: only the stack can reassemble it.
        (
            ipv4_frame([172, 16, 0, 1], 4, &inner, 0x2000),
            DecapStat::PassFragment,
        ),
    ];
    for (pkt, stat) in cases {
        let out = run(&mut d, &pkt, PASS, stat);
        assert_eq!(out, pkt, "{stat:?}: untouched");
    }
}

#[test]
fn malformed_tunnel_packets_are_dropped() {
    let mut d = decap();
    let us = [172, 16, 0, 1];
    let v4 = PacketBuilder::tcp(sa("198.51.0.1:1000"), sa("10.99.100.1:80"))
        .payload(10)
        .build()[14..]
        .to_vec();
    let v6 =
        PacketBuilder::tcp(sa("[2001:db8::1]:1000"), sa("[fd99:100::1]:80")).build()[14..].to_vec();
    let mut bad_ihl = v4.clone();
    bad_ihl[0] = 0x44;
    let mut long = v4.clone();
    long[2..4].copy_from_slice(&((v4.len() + 1) as u16).to_be_bytes());
    let gue = |inner: &[u8]| {
        let mut p = hdr::udp(50_000, GUE_PORT, (8 + inner.len()) as u16).to_vec();
        p.extend_from_slice(inner);
        p
    };
    let mut variant0 = vec![0u8; 4];
    variant0.extend_from_slice(&v4);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("IPv6 inside protocol 4", ipv4_frame(us, 4, &v6, 0)),
        ("IPv4 inside protocol 41", ipv4_frame(us, 41, &v4, 0)),
        ("inner header cut short", ipv4_frame(us, 4, &v4[..12], 0)),
        ("inner IHL below 5", ipv4_frame(us, 4, &bad_ihl, 0)),
        (
            "inner longer than the outer payload",
            ipv4_frame(us, 4, &long, 0),
        ),
        ("GUE variant 0", ipv4_frame(us, 17, &gue(&variant0), 0)),
        (
            "GUE with nothing inside",
            ipv4_frame(us, 17, &gue(&[0x45; 4]), 0),
        ),
    ];
    for (what, pkt) in cases {
        let before = d.stats().unwrap();
        let (a, _) = d.test_run(&pkt).unwrap();
        let after = d.stats().unwrap();
        assert_eq!(a, DROP, "{what}");
        let i = DecapStat::DropMalformed as usize;
        assert_eq!(after[i] - before[i], 1, "{what}: counted as malformed");
    }
    // The same packets well formed are stripped.
    let out = run(&mut d, &ipv4_frame(us, 4, &v4, 0), PASS, DecapStat::Ipip);
    assert_eq!(&out[14..], &v4[..]);
    let out = run(
        &mut d,
        &ipv4_frame(us, 17, &gue(&v6), 0),
        PASS,
        DecapStat::Gue,
    );
    assert_eq!(out[12..14], [0x86, 0xdd], "inner EtherType");
    assert_eq!(&out[14..], &v6[..]);
}
