//! Datapath fixtures for the farm branch: the real XDP program under BPF_PROG_TEST_RUN,
//! checked against the reference model (verdict, output bytes, counters). Socket-aware
//! ownership is exercised with real TCP sockets on 127.0.0.1 in the test's own namespace (a
//! test run's packet arrives on `lo`, so the program's socket lookup sees them). Needs root.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};

use farmlb::config::Config;
use farmlb::dataplane::model::{Action, Twin};
use farmlb::dataplane::{LoadOpts, Maps};
use farmlb::director::{addr_of, Director, Member};
use farmlb::packet::{client, flow_key, PacketBuilder, TCP_ACK, TCP_PSH};
use lb_common::{member_slot, ServiceInfo, ServiceKey, Stat, FWD_FARM, PROTO_TCP, PROTO_UDP};

const OWN_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x21];
const VMAC: [u8; 6] = [0x02, 0xfa, 0x4c, 0x42, 0, 1];
const CLIENT_MAC: [u8; 6] = [0x02, 0x99, 0, 0, 0, 0x02];

const CONFIG: &str = r#"
interface = "eth0"
udp_timeout = "30s"

[farm]
node_id = 1
address = "10.99.0.21"
peers = ["10.99.0.22", "10.99.0.23"]
key_file = "/etc/farmlb/farm.key"

[[service]]
name = "web4"
vip = "10.99.100.1"
port = 80
forwarding = "farm"
table_size = 1009

[[service]]
name = "dns4"
vip = "10.99.100.1"
port = 53
protocol = "udp"
forwarding = "farm"
table_size = 1009

[[service]]
name = "web6"
vip = "fd99:100::1"
port = 80
forwarding = "farm"
table_size = 1009
"#;

/// The listener and the server side of a loopback connection.
type Sockets = (TcpListener, TcpStream);

struct Fixture {
    k: Twin,
    director: Director,
}

const VIP4: SocketAddr = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::new(10, 99, 100, 1)), 80);

/// A TCP SYN from `src`.
fn syn(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    PacketBuilder::tcp(src, dst).syn().build()
}

fn members(nodes: &[(u32, u32)]) -> Vec<Member> {
    nodes
        .iter()
        .map(|&(node, power)| Member { node, power })
        .collect()
}

impl Fixture {
    fn new() -> Self {
        let cfg = Config::from_toml_str(CONFIG).expect("fixture config");
        let mut k = Twin::load(LoadOpts {
            ring_slots: Director::ring_slots_for(&cfg),
            conntrack_size: 4096,
            own_mac: OWN_MAC,
            ..Default::default()
        })
        .expect("load XDP program (are we root?)");
        let mut director = Director::new(k.dp.ring_slots(), OWN_MAC);
        let mut macs: HashMap<IpAddr, [u8; 6]> = HashMap::new();
        director
            .apply(&cfg, &mut k.maps(), &mut macs)
            .expect("apply config");
        // The daemon renews the lease while it runs; fixtures hold one that never ends.
        director
            .set_lease(u64::MAX, &mut k.maps())
            .expect("farm lease");
        let mut f = Fixture { k, director };
        f.members(&[(1, 1), (2, 1), (3, 1)]);
        f
    }

    fn members(&mut self, nodes: &[(u32, u32)]) {
        self.director
            .set_members(&members(nodes), &mut self.k.maps())
            .expect("farm tables");
    }

    /// A real connection on 127.0.0.1 (a test run's packets arrive on `lo`, so the program's
    /// socket lookup sees it) and a farm service on the server's address, sharing web4's
    /// ownership ring, programmed directly (the config refuses loopback VIPs). Returns the
    /// sockets (keep them alive), the server and client addresses.
    fn loopback_service(&mut self) -> (Sockets, TcpStream, SocketAddr, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let server = listener.local_addr().unwrap();
        let conn = TcpStream::connect(server).unwrap();
        let accepted = listener.accept().unwrap().0;
        let local = conn.local_addr().unwrap();
        let web = self.director.services["web4"].info;
        let key = ServiceKey::new(addr_of(server.ip()), server.port(), PROTO_TCP);
        let info = ServiceInfo {
            id: 100,
            fwd_mode: FWD_FARM,
            ..web
        };
        self.k.maps().set_vip_addr(&key.addr).unwrap();
        self.k.maps().set_service(&key, &info).unwrap();
        ((listener, accepted), conn, server, local)
    }

    /// A data segment of the connection `local` → `server` is kept: passed to the stack,
    /// addressed to this node's MAC.
    fn socket_segment_passes(&mut self, local: SocketAddr, server: SocketAddr) {
        let seg = PacketBuilder::tcp(local, server)
            .flags(TCP_ACK)
            .payload(5)
            .build();
        let (action, reason, out) = self.run(&seg);
        assert_eq!((action, reason), (Action::Pass, Stat::FarmPassSocket));
        assert_eq!(&out[0..6], &OWN_MAC);
    }

    /// One packet through kernel and model; they must agree on verdict, bytes and counters.
    fn run(&mut self, pkt: &[u8]) -> (Action, Stat, Vec<u8>) {
        let (d, out) = self
            .k
            .run(pkt)
            .unwrap_or_else(|e| panic!("kernel and model disagree: {e:#}"));
        (d.action, d.reason, out)
    }
}

fn syns_split_by_owner(v6: bool) {
    let mut f = Fixture::new();
    let vip: SocketAddr = if v6 {
        "[fd99:100::1]:80".parse().unwrap()
    } else {
        "10.99.100.1:80".parse().unwrap()
    };
    let (mut passed, n) = (0, 600);
    for i in 0..n {
        let pkt = PacketBuilder::tcp(client(i, 20_000 + i as u16, v6), vip)
            .syn()
            .macs(CLIENT_MAC, VMAC)
            .build();
        let (action, reason, out) = f.run(&pkt);
        match action {
            Action::Pass => {
                assert_eq!(reason, Stat::FarmPassOwner);
                // Addressed to us now; the rest of the frame is untouched.
                assert_eq!(&out[0..6], &OWN_MAC);
                assert_eq!(&out[6..], &pkt[6..]);
                passed += 1;
            }
            Action::Drop => assert_eq!(reason, Stat::FarmDropNotOwner),
            Action::Tx => panic!("farm never transmits"),
        }
    }
    let share = passed as f64 / n as f64;
    assert!((share - 1.0 / 3.0).abs() < 0.08, "owned {passed} of {n}");
}

#[test]
fn ipv4_syns_pass_on_owner_and_drop_elsewhere() {
    syns_split_by_owner(false);
}

#[test]
fn ipv6_syns_pass_on_owner_and_drop_elsewhere() {
    syns_split_by_owner(true);
}

#[test]
fn non_syn_without_socket_is_dropped_even_when_owned() {
    let mut f = Fixture::new();
    let vip = VIP4;
    for i in 0..60 {
        let pkt = PacketBuilder::tcp(client(i, 30_000 + i as u16, false), vip)
            .flags(TCP_ACK | TCP_PSH)
            .payload(10)
            .macs(CLIENT_MAC, VMAC)
            .build();
        let (action, reason, _) = f.run(&pkt);
        assert_eq!((action, reason), (Action::Drop, Stat::FarmDropNoSocket));
    }
}

#[test]
fn no_member_alive_drops_as_no_backend() {
    let mut f = Fixture::new();
    f.members(&[]);
    let vip = VIP4;
    let pkt = syn(client(1, 40_000, false), vip);
    let (action, reason, _) = f.run(&pkt);
    assert_eq!((action, reason), (Action::Drop, Stat::DropNoBackend));
}

#[test]
fn power_zero_node_owns_no_new_flows() {
    let mut f = Fixture::new();
    f.members(&[(1, 0), (2, 1), (3, 1)]);
    let vip = VIP4;
    for i in 0..200 {
        let pkt = syn(client(i, 41_000 + i as u16, false), vip);
        let (action, reason, _) = f.run(&pkt);
        assert_eq!((action, reason), (Action::Drop, Stat::FarmDropNotOwner));
    }
}

/// Real sockets on 127.0.0.1: an established connection is kept whoever owns its flow, while
/// a segment that only matches the listener is not a connection and is dropped.
#[test]
fn established_socket_keeps_its_flow_but_a_listener_does_not() {
    let mut f = Fixture::new();
    let (_listener, conn, server, local) = f.loopback_service();
    // Make sure another node owns everything: only the socket can keep the flow here.
    f.members(&[(1, 0), (2, 1)]);
    f.k.model.sockets.insert(flow_key(local, server, PROTO_TCP));

    // The client's segments towards the server socket (the server's side is the "VIP").
    f.socket_segment_passes(local, server);

    // Same server port, a client port with no connection: the lookup finds the listener.
    let stranger: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let pkt = PacketBuilder::tcp(stranger, server).flags(TCP_ACK).build();
    let (action, reason, _) = f.run(&pkt);
    assert_eq!((action, reason), (Action::Drop, Stat::FarmDropNoSocket));

    // A SYN on that service follows the table (node 2 owns everything).
    let pkt = PacketBuilder::tcp(stranger, server).syn().build();
    let (action, reason, _) = f.run(&pkt);
    assert_eq!((action, reason), (Action::Drop, Stat::FarmDropNotOwner));
    drop(conn);
}

/// UDP: conntrack remembers each flow's owner, on every node (all see every packet), so a
/// rebalance does not move a live flow; when its owner leaves, the flow re-hashes.
#[test]
fn udp_flows_keep_their_owner_until_it_leaves() {
    let mut f = Fixture::new();
    let vip: SocketAddr = "10.99.100.1:53".parse().unwrap();
    // Find flows owned by node 2 and by us.
    let mut theirs = Vec::new();
    let mut ours = Vec::new();
    for i in 0..300 {
        let src = client(i, 50_000 + i as u16, false);
        let pkt = PacketBuilder::udp(src, vip).payload(8).build();
        let (action, reason, _) = f.run(&pkt);
        let key = f.k.model.ct_key(&flow_key(src, vip, PROTO_UDP)).unwrap();
        let owner = f.k.model.conntrack[&key].backend;
        match action {
            Action::Pass => {
                assert_eq!(reason, Stat::FarmPassOwner);
                assert_eq!(owner, member_slot(1));
                ours.push(pkt);
            }
            _ => {
                assert_eq!(reason, Stat::FarmDropNotOwner);
                if owner == member_slot(2) {
                    theirs.push(pkt);
                }
            }
        }
    }
    assert!(!theirs.is_empty() && !ours.is_empty());
    // Node 3 leaves and node 2 gets power 0: node 2's live flows stay on node 2 ...
    f.members(&[(1, 1), (2, 0)]);
    for p in &theirs {
        let (action, reason, _) = f.run(p);
        assert_eq!((action, reason), (Action::Drop, Stat::FarmDropNotOwner));
    }
    // ... and ours on us.
    for p in &ours {
        let (action, reason, _) = f.run(p);
        assert_eq!((action, reason), (Action::Pass, Stat::FarmPassOwner));
    }
    // Node 2 leaves: its flows re-hash, and we are the only member left.
    f.members(&[(1, 1)]);
    for p in &theirs {
        let (action, reason, _) = f.run(p);
        assert_eq!((action, reason), (Action::Pass, Stat::FarmPassOwner));
    }
}

/// A node whose lease ran out (its daemon is gone) takes no new flow, TCP or UDP, whatever
/// the ring says, while a connection with a local socket keeps flowing.
#[test]
fn an_expired_lease_takes_no_new_flows_but_keeps_live_connections() {
    let mut f = Fixture::new();
    let (_listener, conn, server, local) = f.loopback_service();
    // This node owns everything, so only the lease can refuse.
    f.members(&[(1, 1)]);
    f.k.model.sockets.insert(flow_key(local, server, PROTO_TCP));
    let stranger: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let (action, reason, _) = f.run(&syn(stranger, server));
    assert_eq!(
        (action, reason),
        (Action::Pass, Stat::FarmPassOwner),
        "lease running"
    );

    f.director.set_lease(1, &mut f.k.maps()).unwrap();
    let (action, reason, _) = f.run(&syn(stranger, server));
    assert_eq!((action, reason), (Action::Drop, Stat::FarmDropLease));
    let udp = PacketBuilder::udp(client(7, 53_000, false), "10.99.100.1:53".parse().unwrap())
        .payload(8)
        .build();
    let (action, reason, _) = f.run(&udp);
    assert_eq!((action, reason), (Action::Drop, Stat::FarmDropLease));
    f.socket_segment_passes(local, server);

    // Renewed: new flows again.
    f.director.set_lease(u64::MAX, &mut f.k.maps()).unwrap();
    let (action, reason, _) = f.run(&syn(stranger, server));
    assert_eq!((action, reason), (Action::Pass, Stat::FarmPassOwner));
    drop(conn);
}
