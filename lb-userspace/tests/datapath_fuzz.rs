//! Parser fuzzing against the reference model: thousands of seeded, deterministic mutations of
//! valid VIP packets (random IPv6 extension-header chains, fragments, VLAN tags, IPv4 options,
//! random truncation points, random bytes; pings, ICMP errors, tunnel services with a small
//! MTU) run through the real XDP program with
//! BPF_PROG_TEST_RUN; every one must agree with the model on verdict, output bytes and counters.
//! Needs root.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use farmlb::config::Config;
use farmlb::dataplane::model::Twin;
use farmlb::dataplane::LoadOpts;
use farmlb::director::Director;
use farmlb::packet::{client, fixture_mac, service_toml, Ext, PacketBuilder};
use lb_common::Stat;

/// xorshift64*: deterministic and dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}

/// A tunnel service's `[[service]]` table.
/// The fuzzed director's interface MAC.
const FUZZ_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x03];

fn tunnel(name: &str, vip: &str, port: u16, proto: &str, fwd: &str, backends: &[&str]) -> String {
    service_toml(name, vip, port, proto, Some(211), backends).replacen(
        "table_size",
        &format!("forwarding = \"{fwd}\"\ntable_size"),
        1,
    )
}

fn twin() -> Twin {
    let v4 = ["10.99.0.11", "10.99.0.12", "10.99.0.13"];
    let v6 = ["fd99::11", "fd99::12", "fd99::13"];
    let toml = format!(
        "interface = \"eth0\"\nudp_timeout = \"30s\"\n{}",
        [
            service_toml("web4", "10.99.100.1", 80, "tcp", Some(1009), &v4),
            service_toml("dns4", "10.99.100.1", 53, "udp", Some(1009), &v4),
            service_toml("web6", "fd99:100::1", 80, "tcp", Some(1009), &v6),
            service_toml("dns6", "fd99:100::1", 53, "udp", Some(1009), &v6[..2]),
            service_toml("any-port", "10.99.100.2", 0, "tcp", Some(211), &v4[..2]),
            tunnel("ipip4", "10.99.100.4", 80, "tcp", "ipip", &v4),
            tunnel("gue4", "10.99.100.4", 53, "udp", "gue", &v6),
            tunnel("ipip64", "fd99:100::4", 80, "tcp", "ipip", &v4),
            tunnel("gue6", "fd99:100::4", 53, "udp", "gue", &v6),
        ]
        .concat()
    );
    let cfg = Config::from_toml_str(&toml).expect("fuzz config");
    // Conntrack far larger than the flows the fuzzer makes: LRU eviction (per-CPU lists) has
    // no counterpart in the model.
    let mut k = Twin::load(LoadOpts {
        ring_slots: Director::ring_slots_for(&cfg),
        conntrack_size: 1 << 16,
        own_mac: FUZZ_MAC,
        ..Default::default()
    })
    .expect("load XDP program (are we root?)");
    let mut director = Director::new(k.dp.ring_slots(), FUZZ_MAC);
    // A small MTU, so fuzzed lengths reach the too-big branches too.
    director.tunnel = farmlb::tunnel::TunnelHost {
        mtu: 200,
        addr4: Some("10.99.0.3".parse().unwrap()),
        addr6: Some("fd99::3".parse().unwrap()),
    };
    let mut macs: HashMap<IpAddr, [u8; 6]> = HashMap::new();
    for s in &cfg.services {
        for b in &s.backends {
            macs.insert(b.address, fixture_mac(b.address));
        }
    }
    director
        .apply(&cfg, &mut k.maps(), &mut macs)
        .expect("apply config");
    k
}

fn random_ext(r: &mut Rng) -> Ext {
    // Mostly short headers, sometimes up to the 2 KiB maximum.
    let len = if r.chance(10) {
        r.below(256) as u8
    } else {
        r.below(4) as u8
    };
    match r.below(10) {
        0..=2 => Ext::HopByHop(len),
        3..=5 => Ext::DestOpts(len),
        6..=8 => Ext::Routing(len),
        _ => Ext::Fragment(if r.chance(50) { 0x0001 } else { 0x0008 }),
    }
}

/// What the fuzzer did to a packet, for the summary.
#[derive(Default, Debug)]
struct Made {
    ipv6_ext_chains: usize,
    random_bytes: usize,
    truncated: usize,
}

/// A valid packet to one of the services (sometimes to no VIP), then mutated.
fn random_packet(r: &mut Rng, made: &mut Made) -> Vec<u8> {
    let v6 = r.chance(60);
    let i = r.below(256) as u32;
    let src = client(i, 1024 + r.below(60_000) as u16, v6);
    let (ip, udp): (&str, bool) = match (v6, r.below(10)) {
        (true, 0) => ("fd99:100::9", false),
        (true, n @ (2 | 5)) => ("fd99:100::4", n == 5),
        (false, n @ (2 | 5)) => ("10.99.100.4", n == 5),
        (true, n) => ("fd99:100::1", n % 3 == 0),
        (false, 0) => ("10.99.100.9", false),
        (false, 1) => ("10.99.100.2", false),
        (false, n) => ("10.99.100.1", n % 3 == 0),
    };
    let port = if udp { 53 } else { 80 };
    let dst = SocketAddr::new(ip.parse().unwrap(), port);
    let mut b = match r.below(20) {
        // Long enough for the tunnels' MTU check.
        3 if udp => PacketBuilder::udp(src, dst).payload(100 + r.below(200)),
        0 => PacketBuilder::ip_proto(if v6 { 58 } else { 1 }, src, dst),
        // Mostly to the director's MAC (answered), sometimes to another (dropped).
        1 => {
            let to = if r.chance(80) {
                FUZZ_MAC
            } else {
                [2, 0, 0, 0, 0, 2]
            };
            PacketBuilder::ping(src, dst, 7, r.below(100) as u16, r.below(64))
                .macs([2, 0, 0, 0, 0, 1], to)
        }
        2 => {
            // An error quoting the flow's reply (VIP -> client).
            let quoted = PacketBuilder::tcp(dst, src).build()[14..].to_vec();
            let router = client(500, 0, v6);
            PacketBuilder::too_big(router, dst, 1280, &quoted)
        }
        _ if udp => PacketBuilder::udp(src, dst),
        _ if r.chance(30) => PacketBuilder::tcp(src, dst).syn(),
        _ => PacketBuilder::tcp(src, dst),
    };
    if b.payload == 0 {
        b = b.payload(r.below(64));
    }
    if r.chance(10) {
        b = b.vlan(r.below(4095) as u16);
    }
    if v6 {
        let n = r.below(7);
        made.ipv6_ext_chains += (n > 0) as usize;
        for _ in 0..n {
            b = b.ext(random_ext(r));
        }
    } else {
        if r.chance(10) {
            b = b.ip_options(1 + r.below(3) as u8);
        }
        if r.chance(10) {
            b = b.fragment(if r.chance(50) { 0x2000 } else { 0x0010 });
        }
    }
    let mut p = b.build();
    // Random bytes, mostly in the headers, where the parser looks.
    if r.chance(30) {
        made.random_bytes += 1;
        let hdrs = p.len().min(14 + 4 + 40 + 64 + 20);
        for _ in 0..1 + r.below(4) {
            let at = 12 + r.below(hdrs - 12);
            p[at] = r.next() as u8;
        }
    }
    if r.chance(35) {
        made.truncated += 1;
        // BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header.
        p.truncate(14 + r.below(p.len() - 13));
    }
    p
}

#[test]
fn random_and_truncated_packets_agree_with_model() {
    let mut k = twin();
    let mut r = Rng(0x5eed_f00d_1234_5678);
    let mut reasons: HashMap<&str, usize> = HashMap::new();
    let mut made = Made::default();
    const N: usize = 3000;
    for n in 0..N {
        let pkt = random_packet(&mut r, &mut made);
        let (d, _) = k.run(&pkt).unwrap_or_else(|e| {
            panic!("packet {n} ({pkt:02x?}): kernel and model disagree: {e:#}")
        });
        *reasons.entry(d.reason.name()).or_default() += 1;
    }
    let mut table: Vec<_> = reasons.iter().map(|(s, n)| (*s, *n)).collect();
    table.sort();
    eprintln!("{N} fuzzed packets ({made:?}) by exit reason: {table:?}");
    assert!(made.ipv6_ext_chains >= 1000 && made.truncated >= 500 && made.random_bytes >= 500);
    for s in [
        Stat::Tx,
        Stat::PassNotVip,
        Stat::PassMalformed,
        Stat::DropMalformed,
        Stat::DropFragment,
        Stat::DropIpOptions,
    ] {
        assert!(
            reasons.get(s.name()).copied().unwrap_or(0) >= 20,
            "{s:?} too rare: {table:?}"
        );
    }
    // ICMP answered, errors forwarded, tunnels' too-big answers: each seen.
    for s in [
        Stat::IcmpEchoReply,
        Stat::IcmpTooBigTx,
        Stat::IcmpTooBigSent,
        Stat::DropIcmp,
    ] {
        assert!(
            reasons.get(s.name()).copied().unwrap_or(0) >= 5,
            "{s:?} too rare: {table:?}"
        );
    }
}

/// Prints the program's size and the verifier's work (compare across parser changes).
#[test]
fn program_size() {
    let mut ebpf = aya::EbpfLoader::new()
        .map_max_entries(lb_common::maps::RING, 1024)
        .map_max_entries(lb_common::maps::CONNTRACK, 1024)
        .load(farmlb::EBPF_OBJECT)
        .expect("object");
    let prog: &mut aya::programs::Xdp = ebpf
        .program_mut(lb_common::maps::PROGRAM)
        .expect("program")
        .try_into()
        .expect("xdp");
    prog.load().expect("verifier accepts the program");
    let info = prog.info().expect("info");
    eprintln!(
        "farmlb_xdp: {:?} instructions, {:?} processed by the verifier",
        info.size_translated().map(|b| b / 8),
        info.verified_instruction_count()
    );
}
