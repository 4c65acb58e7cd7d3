//! Datapath fixtures: the real XDP program run with BPF_PROG_TEST_RUN on built packets.
//! Every case asserts the verdict, the output bytes (MACs) and the counters, and checks the
//! kernel against the pure-Rust reference model. Needs root (CI runs as root).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use farmlb::config::Config;
use farmlb::dataplane::model::{Action, Twin};
use farmlb::dataplane::{CounterKind, LoadOpts};
use farmlb::director::{addr_of, Director};
use farmlb::packet::{
    arp_request, client, fixture_mac, flow_key, service_toml, PacketBuilder, TCP_ACK, TCP_SYN,
};
use lb_common::{vip_filter_bit, CtEntry, ServiceInfo, Stat, PROTO_TCP, PROTO_UDP};

const OWN_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x03];

struct Fixture {
    k: Twin,
    director: Director,
    macs: HashMap<IpAddr, [u8; 6]>,
}

/// `cfg` with a fourth backend, 10.99.0.14, added to its `i`-th service.
fn with_fourth_backend(cfg: &Config, i: usize) -> Config {
    let mut c = cfg.clone();
    let mut extra = c.services[i].backends[0].clone();
    extra.address = "10.99.0.14".parse().unwrap();
    c.services[i].backends.push(extra);
    c
}

/// Services on two VIPs, both families and protocols, a port-wildcard service and one
/// without backends; 1009/211-slot tables keep the fixtures fast.
fn base_config(udp_timeout: &str) -> Config {
    let (v4, v6) = (
        ["10.99.0.11", "10.99.0.12", "10.99.0.13"],
        ["fd99::11", "fd99::12", "fd99::13"],
    );
    let services = [
        service_toml("web4", "10.99.100.1", 80, "tcp", Some(1009), &v4),
        service_toml("dns4", "10.99.100.1", 53, "udp", Some(1009), &v4),
        service_toml("web6", "fd99:100::1", 80, "tcp", Some(1009), &v6),
        service_toml("dns6", "fd99:100::1", 53, "udp", Some(1009), &v6[..2]),
        service_toml("any-port", "10.99.100.2", 0, "tcp", Some(211), &v4[..2]),
        service_toml("empty", "10.99.100.3", 80, "tcp", Some(211), &[]),
    ];
    let toml = format!(
        "interface = \"eth0\"\nudp_timeout = \"{udp_timeout}\"\n{}",
        services.concat()
    );
    Config::from_toml_str(&toml).expect("fixture config")
}

impl Fixture {
    fn new(cfg: &Config) -> Self {
        let k = Twin::load(LoadOpts {
            ring_slots: Director::ring_slots_for(cfg),
            conntrack_size: 4096,
            own_mac: OWN_MAC,
            ..Default::default()
        })
        .expect("load XDP program (are we root?)");
        let mut f = Fixture {
            director: Director::new(k.dp.ring_slots(), OWN_MAC),
            k,
            macs: HashMap::new(),
        };
        f.apply(cfg);
        f
    }

    fn apply(&mut self, cfg: &Config) {
        for s in &cfg.services {
            for b in &s.backends {
                self.macs.insert(b.address, fixture_mac(b.address));
            }
        }
        self.director
            .apply(cfg, &mut self.k.maps(), &mut self.macs)
            .expect("apply config");
    }

    /// Run one packet through kernel and model; assert they agree on verdict, bytes and
    /// counters; return the action, output frame and chosen backend id.
    fn run(&mut self, pkt: &[u8]) -> (Action, Vec<u8>, u32) {
        let (d, out) = self
            .k
            .run(pkt)
            .unwrap_or_else(|e| panic!("kernel and model disagree: {e:#}"));
        (d.action, out, d.backend)
    }

    /// The flows (by client address) the current table sends elsewhere than `first` says.
    fn moved(
        &self,
        svc: &ServiceInfo,
        first: &HashMap<SocketAddr, u32>,
        vip: SocketAddr,
        proto: u8,
    ) -> Vec<SocketAddr> {
        let mut v: Vec<SocketAddr> = first
            .iter()
            .filter(|&(&src, &b)| {
                self.k
                    .model
                    .expected_backend(svc, &flow_key(src, vip, proto))
                    != b
            })
            .map(|(&src, _)| src)
            .collect();
        v.sort();
        v
    }

    fn backend_ip(&self, id: u32) -> IpAddr {
        for s in self.director.services.values() {
            for b in s.backends.values() {
                if b.id == id {
                    return b.address;
                }
            }
        }
        panic!("unknown backend id {id}")
    }

    fn service(&self, name: &str) -> ServiceInfo {
        self.director.services[name].info
    }

    /// A service's packets/bytes as the daemon reports them.
    fn service_total(&self, name: &str) -> lb_common::Counter {
        let st = &self.director.services[name];
        let dp = &self.k.dp;
        let backends = st.backends.values();
        let counters = backends.map(|b| dp.counter(CounterKind::Backend, b.id).unwrap());
        dp.service_counter(st.info.id, counters).unwrap()
    }
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Many flows to `vip`: each is forwarded to the backend the model predicts, with the MACs
/// rewritten and the IP packet untouched; every backend gets a share.
fn balances(vip: &str, udp: bool, v6: bool, backends: usize) {
    let mut f = Fixture::new(&base_config("30s"));
    let vip = sa(vip);
    let mut seen: HashMap<u32, u32> = HashMap::new();
    for i in 0..300 {
        let src = client(i, 10_000 + i as u16, v6);
        let b = if udp {
            PacketBuilder::udp(src, vip)
        } else {
            PacketBuilder::tcp(src, vip).syn()
        };
        let pkt = b.payload(32).build();
        let (action, out, id) = f.run(&pkt);
        assert_eq!(action, Action::Tx);
        let ip = f.backend_ip(id);
        assert_eq!(
            out[0..6],
            fixture_mac(ip),
            "destination MAC is the backend's"
        );
        assert_eq!(out[6..12], OWN_MAC, "source MAC is the director's");
        assert_eq!(out[12..], pkt[12..], "IP packet untouched (DR)");
        assert_eq!(ip.is_ipv6(), v6);
        *seen.entry(id).or_default() += 1;
    }
    assert_eq!(seen.len(), backends, "every backend used: {seen:?}");
    for (&id, &n) in &seen {
        assert!(n >= 40, "backend {id} got only {n} of 300 flows: {seen:?}");
    }
}

/// TCP and UDP, IPv4 and IPv6: each flow goes where the model says.
#[test]
fn tcp_and_udp_to_vips_are_forwarded_to_model_backends() {
    balances("10.99.100.1:80", false, false, 3);
    balances("10.99.100.1:53", true, false, 3);
    balances("[fd99:100::1]:80", false, true, 3);
    balances("[fd99:100::1]:53", true, true, 2);
}

#[test]
fn non_vip_traffic_passes_untouched() {
    let mut f = Fixture::new(&base_config("30s"));
    let cases = [
        PacketBuilder::tcp(sa("198.51.0.1:1000"), sa("10.99.100.9:80")).build(), // other address
        PacketBuilder::tcp(sa("198.51.0.1:1000"), sa("10.99.100.1:81")).build(), // other port
        PacketBuilder::udp(sa("198.51.0.1:1000"), sa("10.99.100.1:80")).build(), // other proto
        PacketBuilder::ip_proto(47, sa("198.51.0.1:0"), sa("10.99.100.1:0")).build(), // GRE
        PacketBuilder::tcp(sa("[2001:db8::1]:1000"), sa("[fd99:100::9]:80")).build(),
    ];
    for pkt in cases {
        let (action, out, _) = f.run(&pkt);
        assert_eq!(action, Action::Pass);
        assert_eq!(out, pkt, "passed packets are not modified");
    }
    assert_eq!(f.k.dp.stats().unwrap()[Stat::PassNotVip as usize], 5);
}

/// An address of 10.200.0.0/16 whose `VIP_FILTER` bit is `bit`.
fn address_on_bit(bit: u32, skip: &str) -> String {
    (0..=u16::MAX)
        .map(|i| format!("10.200.{}.{}", i >> 8, i & 0xff))
        .find(|a| a != skip && vip_filter_bit(&addr_of(a.parse().unwrap())) == bit)
        .expect("4096 bits, 65536 addresses")
}

fn filter_has(f: &Fixture, a: &str) -> bool {
    let bit = vip_filter_bit(&addr_of(a.parse().unwrap()));
    f.k.dp.vip_filter().unwrap()[(bit / 64) as usize] & 1 << (bit % 64) != 0
}

/// The VIP filter passes packets for other addresses before any lookup; a non-VIP address
/// that shares a VIP's bit takes the full lookup to the same verdict (TCP, a fragment, a
/// truncated header); removing a VIP clears its bit only when no other VIP shares it.
#[test]
fn vip_filter_rows() {
    let vip = "10.99.100.1";
    let bit = vip_filter_bit(&addr_of(vip.parse().unwrap()));
    let twin = address_on_bit(bit, "");
    let mut f = Fixture::new(&base_config("30s"));
    let vips = [vip, "fd99:100::1", "10.99.100.2", "10.99.100.3"];
    assert!(vips.iter().all(|a| filter_has(&f, a)));
    let bits: std::collections::HashSet<u32> = vips
        .iter()
        .map(|a| vip_filter_bit(&addr_of(a.parse().unwrap())))
        .collect();
    let set: u32 =
        f.k.dp
            .vip_filter()
            .unwrap()
            .iter()
            .map(|w| w.count_ones())
            .sum();
    assert_eq!(set as usize, bits.len(), "exactly the VIP addresses' bits");
    let client = sa("198.51.0.1:1000");
    let to = |a: &str| sa(&format!("{a}:80"));
    let rows = [
        PacketBuilder::tcp(client, to(&twin)).build(),
        PacketBuilder::tcp(client, to(&twin))
            .fragment(0x2000)
            .build(),
        PacketBuilder::tcp(client, to(&twin)).build()[..14 + 20 + 10].to_vec(),
        PacketBuilder::tcp(client, to("10.200.255.255")).build(),
    ];
    let before = f.k.dp.stats().unwrap()[Stat::PassNotVip as usize];
    for pkt in &rows {
        let (action, out, _) = f.run(pkt);
        assert_eq!((action, &out), (Action::Pass, pkt), "passed untouched");
    }
    assert_eq!(
        f.k.dp.stats().unwrap()[Stat::PassNotVip as usize] - before,
        rows.len() as u64
    );

    // Two VIPs on one bit: removing one keeps the other's packets balanced.
    let backends = ["10.99.0.11", "10.99.0.12"];
    let cfg = |vips: &[&str]| {
        let services: Vec<String> = vips
            .iter()
            .enumerate()
            .map(|(i, v)| service_toml(&format!("s{i}"), v, 80, "tcp", Some(211), &backends))
            .collect();
        Config::from_toml_str(&format!("interface = \"eth0\"\n{}", services.concat())).unwrap()
    };
    let mut f = Fixture::new(&cfg(&[vip, &twin]));
    f.apply(&cfg(&[vip]));
    assert!(filter_has(&f, vip), "the bit stays while {vip} uses it");
    let syn = |a: &str| PacketBuilder::tcp(client, to(a)).syn().build();
    assert_eq!(f.run(&syn(vip)).0, Action::Tx);
    assert_eq!(f.run(&syn(&twin)).0, Action::Pass);
    f.apply(&cfg(&["10.99.100.7"]));
    assert!(!filter_has(&f, vip), "no VIP left on the bit");
    assert!(filter_has(&f, "10.99.100.7"));
    assert_eq!(f.run(&syn(vip)).0, Action::Pass);
    assert_eq!(f.run(&syn("10.99.100.7")).0, Action::Tx);
}

/// Services whose keys share a home slot of the service table (three runs of ten, one of
/// them wrapping past the last slot), port-wildcard services beside exact ones on the same
/// VIP, and both families: each is found by the kernel as by the model, also after every
/// other one was removed (the removals shift the runs back) and re-added.
#[test]
fn colliding_services_are_found_through_adds_and_removes() {
    use lb_common::{service_slot, v4_mapped, ServiceKey, SERVICE_SLOTS};
    let mut keys: Vec<(String, u16, &str)> = Vec::new();
    for home in [100, 2000, SERVICE_SLOTS - 1] {
        let mut n = 0;
        for i in 0..u32::MAX {
            let ip = [10, 96, (i >> 8) as u8, i as u8];
            if service_slot(&ServiceKey::new(v4_mapped(ip), 80, PROTO_TCP).words()) == home {
                keys.push((std::net::Ipv4Addr::from(ip).to_string(), 80, "tcp"));
                n += 1;
                if n == 10 {
                    break;
                }
            }
        }
    }
    for i in 0..20u16 {
        keys.push((format!("10.95.0.{}", i + 1), 0, "tcp"));
        keys.push((format!("10.95.0.{}", i + 1), 443, "tcp"));
        keys.push((format!("fd95::{:x}", i + 1), 53, "udp"));
    }
    let toml = |keep: &dyn Fn(usize) -> bool| {
        let services: String = keys
            .iter()
            .enumerate()
            .filter(|(i, _)| keep(*i))
            .map(|(i, (vip, port, proto))| {
                let b: &[&str] = if vip.contains(':') {
                    &["fd99::11", "fd99::12"]
                } else {
                    &["10.99.0.11", "10.99.0.12"]
                };
                service_toml(&format!("s{i}"), vip, *port, proto, Some(7), b)
            })
            .collect();
        Config::from_toml_str(&format!("interface = \"eth0\"\n{services}")).unwrap()
    };
    let probe = |f: &mut Fixture, live: &dyn Fn(usize) -> bool| {
        for (i, (vip, port, proto)) in keys.iter().enumerate() {
            let dst = SocketAddr::new(vip.parse().unwrap(), if *port == 0 { 8080 } else { *port });
            let src = if dst.is_ipv6() {
                sa("[2001:db8::7]:4000")
            } else {
                sa("198.51.0.7:4000")
            };
            let pkt = if *proto == "udp" {
                PacketBuilder::udp(src, dst).build()
            } else {
                PacketBuilder::tcp(src, dst).syn().build()
            };
            let (action, _, _) = f.run(&pkt);
            // A removed exact-port service of a VIP that keeps its wildcard one still lands
            // on the wildcard.
            let wildcard_left = *port == 443 && live(i - 1);
            let want = if live(i) || wildcard_left {
                Action::Tx
            } else {
                Action::Pass
            };
            assert_eq!(action, want, "service s{i} {vip}:{port}/{proto}");
        }
    };
    let all = |_: usize| true;
    let even = |i: usize| i.is_multiple_of(2);
    let mut f = Fixture::new(&toml(&all));
    probe(&mut f, &all);
    f.apply(&toml(&even));
    probe(&mut f, &even);
    f.apply(&toml(&all));
    probe(&mut f, &all);
}

#[test]
fn arp_passes() {
    let mut f = Fixture::new(&base_config("30s"));
    let pkt = arp_request([2, 0, 0, 0, 0, 9], [10, 99, 0, 2], [10, 99, 100, 1]);
    let (action, out, _) = f.run(&pkt);
    assert_eq!(action, Action::Pass);
    assert_eq!(out, pkt);
    assert_eq!(f.k.dp.stats().unwrap()[Stat::PassNotIp as usize], 1);
}

#[test]
fn port_wildcard_service_takes_any_port() {
    let mut f = Fixture::new(&base_config("30s"));
    for port in [1u16, 22, 80, 443, 8080, 65535] {
        let pkt = PacketBuilder::tcp(
            sa("198.51.0.7:4000"),
            SocketAddr::new("10.99.100.2".parse().unwrap(), port),
        )
        .syn()
        .build();
        let (action, _, id) = f.run(&pkt);
        assert_eq!(action, Action::Tx, "port {port}");
        assert!(f.director.services["any-port"]
            .backends
            .values()
            .any(|b| b.id == id));
    }
    // UDP is not part of the wildcard TCP service.
    let pkt = PacketBuilder::udp(sa("198.51.0.7:4000"), sa("10.99.100.2:53")).build();
    assert_eq!(f.run(&pkt).0, Action::Pass);
}

#[test]
fn vlan_tagged_frames_are_balanced() {
    let mut f = Fixture::new(&base_config("30s"));
    let pkt = PacketBuilder::tcp(sa("198.51.0.7:4000"), sa("10.99.100.1:80"))
        .syn()
        .vlan(42)
        .build();
    let (action, out, _) = f.run(&pkt);
    assert_eq!(action, Action::Tx);
    assert_eq!(out[12..16], [0x81, 0x00, 0, 42], "tag preserved");
}

#[test]
fn service_without_backends_drops_and_counts() {
    let mut f = Fixture::new(&base_config("30s"));
    let pkt = PacketBuilder::tcp(sa("198.51.0.7:4000"), sa("10.99.100.3:80"))
        .syn()
        .build();
    assert_eq!(f.run(&pkt).0, Action::Drop);
    assert_eq!(f.k.dp.stats().unwrap()[Stat::DropNoBackend as usize], 1);
}

#[test]
fn fragments_options_and_truncation_are_counted() {
    let mut f = Fixture::new(&base_config("30s"));
    let vip4 = sa("10.99.100.1:80");
    let other4 = sa("10.99.100.9:80");
    let vip6 = sa("[fd99:100::1]:80");
    let c4 = sa("198.51.0.1:1000");
    let c6 = sa("[2001:db8::1]:1000");
    let frag = PacketBuilder::tcp(c4, vip4).fragment(0x2000).build(); // MF
    assert_eq!(f.run(&frag).0, Action::Drop);
    let later_frag = PacketBuilder::tcp(c4, vip4).fragment(0x0010).build(); // offset
    assert_eq!(f.run(&later_frag).0, Action::Drop);
    let frag_other = PacketBuilder::tcp(c4, other4).fragment(0x2000).build();
    assert_eq!(f.run(&frag_other).0, Action::Pass);
    let frag6 = PacketBuilder::tcp(c6, vip6).fragment(0x0001).build();
    assert_eq!(f.run(&frag6).0, Action::Drop);
    let opts = PacketBuilder::tcp(c4, vip4).ip_options(2).build();
    assert_eq!(f.run(&opts).0, Action::Drop);
    let opts_other = PacketBuilder::tcp(c4, other4).ip_options(1).build();
    assert_eq!(f.run(&opts_other).0, Action::Pass);

    // Truncated TCP header to a VIP: dropped; truncated IPv4/IPv6 header: passed.
    let full = PacketBuilder::tcp(c4, vip4).build();
    assert_eq!(f.run(&full[..14 + 20 + 10]).0, Action::Drop);
    assert_eq!(f.run(&full[..14 + 12]).0, Action::Pass);
    let full6 = PacketBuilder::tcp(c6, vip6).build();
    assert_eq!(f.run(&full6[..14 + 30]).0, Action::Pass);
    let udp = PacketBuilder::udp(sa("198.51.0.1:1000"), sa("10.99.100.1:53")).build();
    assert_eq!(f.run(&udp[..14 + 20 + 4]).0, Action::Drop);
    // Bad IHL and wrong IP version: passed as malformed.
    let mut bad_ihl = full.clone();
    bad_ihl[14] = 0x43;
    assert_eq!(f.run(&bad_ihl).0, Action::Pass);
    let mut bad_ver = full.clone();
    bad_ver[14] = 0x55;
    assert_eq!(f.run(&bad_ver).0, Action::Pass);
    // Truncated VLAN header.
    let mut vlan_short = full[..14].to_vec();
    vlan_short[12..14].copy_from_slice(&[0x81, 0x00]);
    vlan_short.extend_from_slice(&[0, 1]);
    assert_eq!(f.run(&vlan_short).0, Action::Pass);

    let s = f.k.dp.stats().unwrap();
    assert_eq!(s[Stat::DropFragment as usize], 3);
    assert_eq!(s[Stat::DropIpOptions as usize], 1);
    assert_eq!(s[Stat::DropMalformed as usize], 2);
    assert_eq!(s[Stat::PassMalformed as usize], 5);
    assert_eq!(s[Stat::PassNotVip as usize], 2);
    assert_eq!(s[Stat::Tx as usize], 0);
}

/// After the table changes, established flows stay on their backend through conntrack while
/// a SYN of the same tuple follows the new table.
#[test]
fn established_flow_keeps_backend_after_table_change() {
    let cfg = base_config("30s");
    let mut f = Fixture::new(&cfg);
    let vip = sa("10.99.100.1:80");
    let web = f.service("web4");
    let flows: Vec<SocketAddr> = (0..400).map(|i| client(i, 20_000, false)).collect();
    let mut first = HashMap::new();
    for &src in &flows {
        let (a, _, id) = f.run(&PacketBuilder::tcp(src, vip).syn().build());
        assert_eq!(a, Action::Tx);
        first.insert(src, id);
    }

    // Add a fourth backend: roughly a quarter of the flows now hash to it.
    let cfg2 = with_fourth_backend(&cfg, 0);
    f.apply(&cfg2);
    let moved = f.moved(&web, &first, vip, PROTO_TCP);
    assert!(
        moved.len() > 40 && moved.len() < 200,
        "adding 1 backend to 3 should move ~25% of 400 flows, moved {}",
        moved.len()
    );
    let hits_before = f.k.dp.stats().unwrap()[Stat::CtHit as usize];
    for &src in &moved {
        let (a, _, id) = f.run(
            &PacketBuilder::tcp(src, vip)
                .flags(TCP_ACK)
                .payload(10)
                .build(),
        );
        assert_eq!(a, Action::Tx);
        assert_eq!(id, first[&src], "established flow kept its backend");
    }
    assert_eq!(
        f.k.dp.stats().unwrap()[Stat::CtHit as usize] - hits_before,
        moved.len() as u64
    );
    // A new SYN on the same tuple re-hashes onto the new table (mostly the new backend;
    // Maglev may also shuffle a few survivor slots).
    let mut to_new = 0;
    for &src in &moved {
        let (_, _, id) = f.run(&PacketBuilder::tcp(src, vip).flags(TCP_SYN).build());
        assert_ne!(id, first[&src]);
        assert_eq!(
            id,
            f.k.model
                .expected_backend(&web, &flow_key(src, vip, PROTO_TCP))
        );
        if f.backend_ip(id) == "10.99.0.14".parse::<IpAddr>().unwrap() {
            to_new += 1;
        }
        // ...and the conntrack entry now points at the new backend.
        let ct =
            f.k.dp
                .conntrack_of(&flow_key(src, vip, PROTO_TCP))
                .unwrap()
                .unwrap();
        assert_eq!(ct.backend, id);
    }
    assert!(
        to_new * 10 >= moved.len() * 9,
        "{to_new} of {} moved flows went to the new backend",
        moved.len()
    );
}

/// Removing a backend invalidates it: its established flows re-hash instead of being
/// forwarded to a backend that is gone.
#[test]
fn removed_backend_flows_rehash() {
    let cfg = base_config("30s");
    let mut f = Fixture::new(&cfg);
    let vip = sa("10.99.100.1:80");
    let gone: IpAddr = "10.99.0.13".parse().unwrap();
    let mut on_gone = vec![];
    for i in 0..200 {
        let src = client(i, 30_000, false);
        let (_, _, id) = f.run(&PacketBuilder::tcp(src, vip).syn().build());
        if f.backend_ip(id) == gone {
            on_gone.push(src);
        }
    }
    assert!(!on_gone.is_empty());
    let mut cfg2 = cfg.clone();
    cfg2.services[0].backends.retain(|b| b.address != gone);
    f.apply(&cfg2);
    let before = f.k.dp.stats().unwrap()[Stat::CtMissOther as usize];
    for &src in &on_gone {
        let (a, _, id) = f.run(&PacketBuilder::tcp(src, vip).build());
        assert_eq!(a, Action::Tx);
        assert_ne!(f.backend_ip(id), gone);
    }
    assert_eq!(
        f.k.dp.stats().unwrap()[Stat::CtMissOther as usize] - before,
        on_gone.len() as u64
    );
}

/// Entries outlive their service and backends, and ids are reused: an entry naming a valid
/// backend of another service is not followed (the flow re-hashes on its own ring).
#[test]
fn a_stale_entry_never_sends_a_flow_to_another_services_backend() {
    let cfg = base_config("30s");
    let mut f = Fixture::new(&cfg);
    let web = f.service("web4");
    let stranger = f.director.services["dns4"]
        .backends
        .values()
        .next()
        .unwrap()
        .id;
    let own: Vec<u32> = f.director.services["web4"]
        .backends
        .values()
        .map(|b| b.id)
        .collect();
    assert!(!own.contains(&stranger));
    let vip = sa("10.99.100.1:80");
    for i in 0..20 {
        let src = client(i, 31_000, false);
        let key = f.k.model.ct_key(&flow_key(src, vip, PROTO_TCP)).unwrap();
        assert_eq!(key.svc as u32, web.id);
        let stale = CtEntry {
            backend: stranger,
            ..Default::default()
        };
        f.k.dp.conntrack_insert(&key, &stale).unwrap();
        f.k.model.conntrack.insert(key, stale);
        let before = f.k.dp.stats().unwrap();
        let (a, _, id) = f.run(&PacketBuilder::tcp(src, vip).build());
        assert_eq!(a, Action::Tx);
        assert_eq!(
            id,
            f.k.model
                .expected_backend(&web, &flow_key(src, vip, PROTO_TCP))
        );
        let after = f.k.dp.stats().unwrap();
        assert_eq!(
            after[Stat::CtMissOther as usize] - before[Stat::CtMissOther as usize],
            1
        );
        // Re-hashed and recorded: the entry is the flow's own now, and followed.
        assert_eq!(f.k.dp.conntrack_get(&key).unwrap().unwrap().backend, id);
        let (_, _, again) = f.run(&PacketBuilder::tcp(src, vip).build());
        assert_eq!(again, id);
    }
}

/// The interface MAC is a constant of the loaded program: a configuration naming another is
/// refused whole, with both MACs in the error.
#[test]
fn own_mac_is_fixed_at_load() {
    use farmlb::dataplane::{Dataplane, Maps};
    let mut dp = Dataplane::load(LoadOpts {
        own_mac: OWN_MAC,
        ..Default::default()
    })
    .expect("load XDP program (are we root?)");
    let ok = lb_common::GlobalConfig {
        own_mac: OWN_MAC,
        udp_timeout_ns: 7,
        ..Default::default()
    };
    dp.set_config(&ok).unwrap();
    let other = [0x02, 0, 0, 0, 0, 0x09];
    let err = dp
        .set_config(&lb_common::GlobalConfig {
            own_mac: other,
            udp_timeout_ns: 9,
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
    assert!(err.contains("02:00:00:00:00:09"), "{err}");
    assert!(err.contains(&farmlb::neigh::fmt_mac(&OWN_MAC)), "{err}");
    let now = dp.model_for_flow(&lb_common::FlowKey::default()).unwrap();
    assert_eq!(
        now.config.udp_timeout_ns, 7,
        "the refused config was written"
    );
}

#[test]
fn udp_conntrack_entries_expire_after_idle_timeout() {
    let cfg = base_config("300ms");
    let mut f = Fixture::new(&cfg);
    let vip = sa("10.99.100.1:53");
    let dns = f.service("dns4");
    let flows: Vec<SocketAddr> = (0..200).map(|i| client(i, 5353, false)).collect();
    let mut first = HashMap::new();
    for &src in &flows {
        first.insert(src, f.run(&PacketBuilder::udp(src, vip).build()).2);
    }
    let cfg2 = with_fourth_backend(&cfg, 1);
    f.apply(&cfg2);
    let moved = f.moved(&dns, &first, vip, PROTO_UDP);
    assert!(!moved.is_empty());
    // Within the timeout: conntrack keeps them.
    for &src in &moved {
        assert_eq!(f.run(&PacketBuilder::udp(src, vip).build()).2, first[&src]);
    }
    std::thread::sleep(Duration::from_millis(450));
    let before = f.k.dp.stats().unwrap()[Stat::CtMissOther as usize];
    for &src in &moved {
        let id = f.run(&PacketBuilder::udp(src, vip).build()).2;
        assert_ne!(id, first[&src], "idle UDP entry expired and re-hashed");
    }
    assert_eq!(
        f.k.dp.stats().unwrap()[Stat::CtMissOther as usize] - before,
        moved.len() as u64
    );
}

#[test]
fn per_service_and_backend_counters() {
    let mut f = Fixture::new(&base_config("30s"));
    let vip = sa("10.99.100.1:80");
    let mut per_backend: HashMap<u32, (u64, u64)> = HashMap::new();
    let mut total_bytes = 0;
    for i in 0..50 {
        let pkt = PacketBuilder::tcp(client(i, 40_000, false), vip)
            .syn()
            .payload(i as usize)
            .build();
        let id = f.run(&pkt).2;
        let e = per_backend.entry(id).or_default();
        e.0 += 1;
        e.1 += pkt.len() as u64;
        total_bytes += pkt.len() as u64;
    }
    let svc = f.service_total("web4");
    assert_eq!((svc.packets, svc.bytes), (50, total_bytes));
    // The program counts forwarded frames only per backend: the service's own slot is empty.
    let own = f.k.dp.counter(CounterKind::Service, f.service("web4").id);
    assert_eq!(own.unwrap(), lb_common::Counter::default());
    for (&id, &(p, b)) in &per_backend {
        let c = f.k.dp.counter(CounterKind::Backend, id).unwrap();
        assert_eq!((c.packets, c.bytes), (p, b));
    }
    assert_eq!(f.service_total("dns4").packets, 0);
    // A removed backend's traffic stays in the service's total, and its freed id starts
    // from zero when a new backend takes it.
    let mut cfg = base_config("30s");
    let gone = cfg.services[0].backends.remove(0).address;
    let gone_id = f.director.services["web4"].backends[&gone].id;
    f.apply(&cfg);
    let svc = f.service_total("web4");
    assert_eq!((svc.packets, svc.bytes), (50, total_bytes));
    let own = f.k.dp.counter(CounterKind::Service, f.service("web4").id);
    let (p, b) = per_backend[&gone_id];
    assert_eq!(
        own.unwrap(),
        lb_common::Counter {
            packets: p,
            bytes: b
        }
    );
    f.apply(&with_fourth_backend(&cfg, 0));
    let new_id = f.director.services["web4"].backends[&sa("10.99.0.14:0").ip()].id;
    assert_eq!(new_id, gone_id, "the freed id is reused");
    let fresh = f.k.dp.counter(CounterKind::Backend, new_id).unwrap();
    assert_eq!(fresh, lb_common::Counter::default());
    assert_eq!(f.service_total("web4").packets, 50);
}

/// Run this thread on CPU 0 only: the flood guard counts per CPU, the model stands for one.
fn pin_to_cpu0() {
    // SAFETY: a zeroed cpu_set_t with one bit set, for the calling thread (pid 0).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0
        );
    }
}

/// Flood guard engaged: above `flood_guard_rate` new flows in a second (on this CPU), new
/// flows are still forwarded by the ring but get no conntrack entry (`ct_flood_skip`), so the
/// established ones are never evicted; a flow that already has an entry (a SYN reusing its
/// tuple) is rewritten in place, whatever the rate. Disengaged (rate 0): every flow is
/// remembered.
#[test]
fn flood_guard_keeps_new_flows_out_of_conntrack_above_its_rate() {
    pin_to_cpu0();
    let toml = |rate: u32| {
        format!(
            "interface = \"eth0\"\nflood_guard_rate = {rate}\n{}",
            service_toml(
                "web4",
                "10.99.100.1",
                80,
                "tcp",
                Some(1009),
                &["10.99.0.11", "10.99.0.12"]
            )
        )
    };
    let cfg = Config::from_toml_str(&toml(10)).unwrap();
    let mut f = Fixture::new(&cfg);
    let vip = sa("10.99.100.1:80");
    let (mut kept, mut skipped) = (Vec::new(), Vec::new());
    for i in 0..25 {
        let src = client(i, 20_000 + i as u16, false);
        let (action, _, _) = f.run(&PacketBuilder::tcp(src, vip).syn().build());
        assert_eq!(
            action,
            Action::Tx,
            "flows over the rate are still forwarded"
        );
        match f.k.dp.conntrack_of(&flow_key(src, vip, PROTO_TCP)).unwrap() {
            Some(_) => kept.push(src),
            None => skipped.push(src),
        }
    }
    assert_eq!((kept.len(), skipped.len()), (10, 15), "{kept:?}");
    // A remembered flow's SYN again (same tuple): rewritten in place, not refused.
    let (action, _, _) = f.run(&PacketBuilder::tcp(kept[0], vip).syn().build());
    assert_eq!(action, Action::Tx);
    assert!(f
        .k
        .dp
        .conntrack_of(&flow_key(kept[0], vip, PROTO_TCP))
        .unwrap()
        .is_some());
    // The second is up: the next new flow reads the clock (it is over the rate), starts a
    // new window and is remembered again.
    std::thread::sleep(std::time::Duration::from_millis(1050));
    let late = client(60, 20_060, false);
    f.run(&PacketBuilder::tcp(late, vip).syn().build());
    assert!(
        f.k.dp
            .conntrack_of(&flow_key(late, vip, PROTO_TCP))
            .unwrap()
            .is_some(),
        "a new window remembers flows again"
    );
    // Established packets of the remembered flows hit conntrack.
    for &src in &kept {
        let (action, _, _) = f.run(&PacketBuilder::tcp(src, vip).flags(TCP_ACK).build());
        assert_eq!(action, Action::Tx);
    }

    // Disengaged: rate 0 remembers every flow.
    f.apply(&Config::from_toml_str(&toml(0)).unwrap());
    for i in 100..140 {
        let src = client(i, 21_000 + i as u16, false);
        f.run(&PacketBuilder::tcp(src, vip).syn().build());
        assert!(f
            .k
            .dp
            .conntrack_of(&flow_key(src, vip, PROTO_TCP))
            .unwrap()
            .is_some());
    }
}

/// One IPv6 extension-header row: the packet, the verdict and the reason counter expected.
/// The flood: 100 established flows, then 100,000 SYNs from distinct clients on one
/// CPU, then a backend added. With the guard engaged (200 new flows/s) the flood leaves every
/// established entry in place and none of the flows moves; without it (rate 0) the flood
/// evicts them and the new table moves about a quarter.
#[test]
fn syn_flood_above_the_guard_rate_evicts_no_established_flow() {
    pin_to_cpu0();
    let vip = sa("10.99.100.1:80");
    let toml = |rate: u32, backends: &[&str]| {
        let svc = service_toml("web4", "10.99.100.1", 80, "tcp", Some(1009), backends);
        Config::from_toml_str(&format!(
            "interface = \"eth0\"\nflood_guard_rate = {rate}\n{svc}"
        ))
        .unwrap()
    };
    let three = ["10.99.0.11", "10.99.0.12", "10.99.0.13"];
    let four = ["10.99.0.11", "10.99.0.12", "10.99.0.13", "10.99.0.14"];
    let mut figures = Vec::new();
    for rate in [200, 0] {
        let mut f = Fixture::new(&toml(rate, &three));
        let flows: Vec<SocketAddr> = (0..100).map(|i| client(i, 30_000, false)).collect();
        let mut first = HashMap::new();
        for &src in &flows {
            let (a, _, id) = f.run(&PacketBuilder::tcp(src, vip).syn().build());
            assert_eq!(a, Action::Tx);
            first.insert(src, f.backend_ip(id));
        }
        // The flood goes to the kernel alone: the model would keep what the kernel evicts.
        for i in 0..100_000u32 {
            let src = SocketAddr::new(
                std::net::Ipv4Addr::from(0xc612_0000 | (i >> 4)).into(),
                1024 + (i & 15) as u16,
            );
            let (action, _) =
                f.k.dp
                    .test_run(&PacketBuilder::tcp(src, vip).syn().build())
                    .unwrap();
            assert_eq!(action, 3, "flood SYN {i} forwarded (XDP_TX)");
        }
        let kept = flows
            .iter()
            .filter(|&&src| {
                f.k.dp
                    .conntrack_of(&flow_key(src, vip, PROTO_TCP))
                    .unwrap()
                    .is_some()
            })
            .count();
        f.apply(&toml(rate, &four));
        let moved = flows
            .iter()
            .filter(|&&src| {
                let (_, out) =
                    f.k.dp
                        .test_run(&PacketBuilder::tcp(src, vip).flags(TCP_ACK).build())
                        .unwrap();
                out[0..6] != fixture_mac(first[&src])
            })
            .count();
        eprintln!("flood_guard_rate {rate}: {kept} of 100 established entries kept, {moved} moved");
        figures.push((kept, moved));
    }
    assert_eq!(
        figures[0],
        (100, 0),
        "guarded: every established flow kept and in place"
    );
    assert!(
        figures[1].0 < 50 && figures[1].1 > 5,
        "unguarded, the flood should evict and the new table move flows: {:?}",
        figures[1]
    );
}

fn ext_row(f: &mut Fixture, what: &str, pkt: &[u8], action: Action, reason: Stat) -> Vec<u8> {
    let (d, out) =
        f.k.run(pkt)
            .unwrap_or_else(|e| panic!("{what}: kernel and model disagree: {e:#}"));
    assert_eq!((d.action, d.reason), (action, reason), "{what}");
    if action == Action::Tx {
        assert_eq!(out[12..], pkt[12..], "{what}: only the MACs change");
    } else {
        assert_eq!(out, pkt, "{what}: not modified");
    }
    out
}

/// TCP and UDP behind hop-by-hop, routing and destination-options headers are balanced as
/// without them (same backend); fragments anywhere in the chain, chains longer than four and
/// cut-short headers are dropped when addressed to a VIP and passed otherwise.
#[test]
fn ipv6_extension_headers() {
    use farmlb::packet::Ext::{DestOpts, Fragment, HopByHop, Routing};
    let mut f = Fixture::new(&base_config("30s"));
    let vip = sa("[fd99:100::1]:80");
    let dns = sa("[fd99:100::1]:53");
    let other = sa("[fd99:100::9]:80");
    let web = f.service("web6");
    let dns6 = f.service("dns6");
    let chains: [(&str, Vec<_>); 6] = [
        ("hop-by-hop", vec![HopByHop(0)]),
        ("routing", vec![Routing(2)]),
        ("destination options", vec![DestOpts(1)]),
        ("HBH+DST+RT", vec![HopByHop(0), DestOpts(3), Routing(1)]),
        (
            "4 headers",
            vec![HopByHop(1), DestOpts(0), Routing(0), DestOpts(2)],
        ),
        ("255-long header", vec![DestOpts(255)]),
    ];
    for (i, (what, chain)) in chains.iter().enumerate() {
        let src = client(i as u32, 7000, true);
        let mut b = PacketBuilder::tcp(src, vip).syn().payload(16);
        for &e in chain {
            b = b.ext(e);
        }
        let pkt = b.build();
        ext_row(&mut f, what, &pkt, Action::Tx, Stat::Tx);
        let d =
            f.k.model
                .expected_backend(&web, &flow_key(src, vip, PROTO_TCP));
        let plain = PacketBuilder::tcp(src, vip).syn().payload(16).build();
        assert_eq!(f.run(&plain).2, d, "{what}: same backend as without");
    }
    let udp = PacketBuilder::udp(client(9, 5300, true), dns)
        .ext(DestOpts(0))
        .ext(HopByHop(1))
        .payload(20)
        .build();
    ext_row(&mut f, "UDP behind DST+HBH", &udp, Action::Tx, Stat::Tx);
    assert!(dns6.ring_size > 0);

    let c = client(20, 7100, true);
    let five = || {
        PacketBuilder::tcp(c, vip)
            .ext(HopByHop(0))
            .ext(DestOpts(0))
            .ext(Routing(0))
            .ext(DestOpts(0))
            .ext(DestOpts(0))
    };
    ext_row(
        &mut f,
        "5 headers",
        &five().build(),
        Action::Drop,
        Stat::DropMalformed,
    );
    let mut five_other = five();
    five_other.dst = other;
    let five_other = five_other.build();
    ext_row(
        &mut f,
        "5 headers, not a VIP",
        &five_other,
        Action::Pass,
        Stat::PassNotVip,
    );

    let long = PacketBuilder::tcp(c, vip).ext(HopByHop(3)).build(); // 32-byte header
    let cut = &long[..14 + 40 + 20];
    ext_row(
        &mut f,
        "header cut short",
        cut,
        Action::Drop,
        Stat::DropMalformed,
    );
    let cut2 = &long[..14 + 40 + 1];
    ext_row(
        &mut f,
        "header start cut",
        cut2,
        Action::Drop,
        Stat::DropMalformed,
    );
    let l4_cut = &long[..14 + 40 + 32 + 10];
    ext_row(
        &mut f,
        "TCP cut after ext",
        l4_cut,
        Action::Drop,
        Stat::DropMalformed,
    );
    let long_other = PacketBuilder::tcp(c, other).ext(HopByHop(3)).build();
    ext_row(
        &mut f,
        "header cut short, not a VIP",
        &long_other[..14 + 40 + 20],
        Action::Pass,
        Stat::PassNotVip,
    );

    let frag_after = |dst| {
        PacketBuilder::tcp(c, dst)
            .ext(HopByHop(0))
            .ext(Fragment(0x0001))
            .build()
    };
    let (fv, fo) = (frag_after(vip), frag_after(other));
    ext_row(
        &mut f,
        "fragment after HBH",
        &fv,
        Action::Drop,
        Stat::DropFragment,
    );
    ext_row(
        &mut f,
        "fragment after HBH, not a VIP",
        &fo,
        Action::Pass,
        Stat::PassNotVip,
    );
    let frag_fifth = PacketBuilder::tcp(c, vip)
        .ext(HopByHop(0))
        .ext(DestOpts(0))
        .ext(Routing(0))
        .ext(DestOpts(0))
        .ext(Fragment(0x0008))
        .build();
    ext_row(
        &mut f,
        "fragment 5th",
        &frag_fifth,
        Action::Drop,
        Stat::DropFragment,
    );
    let icmp = PacketBuilder::ip_proto(58, c, vip).ext(DestOpts(0)).build();
    ext_row(
        &mut f,
        "ICMPv6 behind DST",
        &icmp,
        Action::Pass,
        Stat::PassNotVip,
    );

    let s = f.k.dp.stats().unwrap();
    assert_eq!(s[Stat::DropFragment as usize], 2);
    assert_eq!(s[Stat::DropMalformed as usize], 4);
    assert_eq!(s[Stat::PassNotVip as usize], 4);
    assert_eq!(s[Stat::Tx as usize], 13);
}

/// Frames larger than a page: BPF_PROG_TEST_RUN gives the program a 3,520-byte first buffer
/// and the rest as fragments. The byte counters still see the whole frame, and headers past
/// the first buffer count as truncated (kernel and model agree on both).
#[test]
fn frames_larger_than_a_page() {
    use farmlb::dataplane::model::TEST_RUN_LINEAR_MAX;
    use farmlb::packet::Ext::DestOpts;
    let mut f = Fixture::new(&base_config("30s"));
    let mut rows = 0;
    for (vip, v6) in [("10.99.100.1:80", false), ("[fd99:100::1]:80", true)] {
        for payload in [TEST_RUN_LINEAR_MAX, 6000, 9000, 60_000] {
            let src = client(payload as u32, 8000, v6);
            let pkt = PacketBuilder::tcp(src, sa(vip))
                .syn()
                .payload(payload)
                .build();
            let (d, out) = f.k.run(&pkt).unwrap_or_else(|e| panic!("{payload}: {e:#}"));
            assert_eq!(d.action, Action::Tx);
            assert_eq!(d.bytes, pkt.len() as u64, "whole frame counted");
            assert_eq!(out[12..], pkt[12..]);
            rows += 1;
        }
    }
    // Four 2 KiB destination-options headers put TCP past the first buffer.
    let mut b = PacketBuilder::tcp(client(1, 8001, true), sa("[fd99:100::1]:80")).syn();
    for _ in 0..4 {
        b = b.ext(DestOpts(255));
    }
    let pkt = b.build();
    assert!(pkt.len() > TEST_RUN_LINEAR_MAX);
    ext_row(
        &mut f,
        "headers past the first buffer",
        &pkt,
        Action::Drop,
        Stat::DropMalformed,
    );
    let svc = f.service_total("web4");
    assert_eq!(svc.packets, 4);
    assert!(svc.bytes > 4 * 4096 && rows == 8);
}

/// Every event waiting in the sync ring buffer.
fn drain(ring: &mut aya::maps::RingBuf<aya::maps::MapData>) -> Vec<lb_common::CtSyncEvent> {
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        assert_eq!(item.len(), std::mem::size_of::<lb_common::CtSyncEvent>());
        // SAFETY: the program writes whole `CtSyncEvent`s (repr(C), plain integers).
        out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) });
    }
    out
}

/// Conntrack sync: with `GlobalConfig::sync` off the ring stays empty; with it on, every entry
/// the program makes (a SYN, a non-SYN packet without an entry, a SYN rewriting its tuple) is
/// published, exactly as the model lists them, and conntrack hits publish nothing.
#[test]
fn conntrack_sync_publishes_every_new_entry_only_when_enabled() {
    use farmlb::dataplane::Maps;
    let cfg = base_config("30s");
    let mut f = Fixture::new(&cfg);
    let mut ring = f.k.dp.take_sync_ring().unwrap();
    let vip = sa("10.99.100.1:80");
    let dns = sa("10.99.100.1:53");
    // Off (the default): nothing published.
    f.run(
        &PacketBuilder::tcp(client(0, 30_000, false), vip)
            .syn()
            .build(),
    );
    assert!(drain(&mut ring).is_empty());
    assert!(f.k.model.synced.is_empty());
    let mut gc = f.k.model.config;
    gc.sync = 1;
    f.k.maps().set_config(&gc).unwrap();
    for i in 0..20u16 {
        let src = client(u32::from(i), 31_000 + i, false);
        // New flow, then an established packet (a hit: nothing), then a SYN reusing it.
        f.run(&PacketBuilder::tcp(src, vip).syn().build());
        f.run(
            &PacketBuilder::tcp(src, vip)
                .flags(TCP_ACK)
                .payload(5)
                .build(),
        );
        f.run(&PacketBuilder::tcp(src, vip).syn().build());
    }
    // A flow met mid-stream (no entry here: another director had it) and UDP.
    f.run(
        &PacketBuilder::tcp(client(3, 40_000, false), vip)
            .flags(TCP_ACK)
            .payload(5)
            .build(),
    );
    f.run(
        &PacketBuilder::udp(client(4, 40_001, false), dns)
            .payload(8)
            .build(),
    );
    let got = drain(&mut ring);
    assert_eq!(got.len(), 42);
    assert_eq!(
        got, f.k.model.synced,
        "kernel and model published different entries"
    );
    for e in &got {
        assert_eq!(
            f.k.dp
                .conntrack_get(e.flow.ct_key())
                .unwrap()
                .map(|c| c.backend),
            Some(e.backend)
        );
    }
    assert_eq!(f.k.dp.stats().unwrap()[Stat::CtSyncDrop as usize], 0);
}
