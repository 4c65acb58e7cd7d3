//! Farm-mode and director-failover topologies, and a runner for one `farmlb` per node.
//!
//! ```text
//!   {p}-cl  eth0 ─┐                                       farm: every node holds the VIP on
//!   {p}-n1  eth0 ─┼── v-cl / v-n1 / … ── br0 ({p}-sw)     `lo`; the VIP resolves to a virtual
//!   {p}-n2  eth0 ─┤                                       MAC the bridge floods to all nodes
//!   {p}-n3  eth0 ─┘
//! ```
//!
//! The failover variant has directors `{p}-d1`, `{p}-d2` and backends `{p}-b1…` on the same
//! bridge; the active director answers ARP for the VIP with its own MAC.
//!
//! The client reaches the VIPs on-link (it ARPs for them, and sends neighbour solicitations
//! for the IPv6 VIP), unlike the director rig where it routes them via the director.
//!
//! Addresses: client 10.99.0.2 (+ .100–.131) and fd99::2 (+ fd99::100–fd99::107); node with
//! host byte `h` 10.99.0.h and fd99::h; VIPs 10.99.100.1 and fd99:100::1.

use std::{
    fmt::Write as _,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    ops::{Deref, DerefMut},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result};

pub use crate::client::try_identify;
use crate::{
    daemon::service_table,
    netns,
    process::Process,
    rig::{ip_batch, Names},
};

/// The farm's VIP (held by every farm node on `lo`).
pub const FARM_VIP: Ipv4Addr = Ipv4Addr::new(10, 99, 100, 1);
/// The farm's IPv6 VIP (also on every farm node's `lo`).
pub const FARM_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd99, 0x100, 0, 0, 0, 0, 0, 1);
/// Number of extra IPv6 client sources (fd99::100 …).
const CLIENT_V6_SOURCES: u16 = 8;
/// Membership port.
pub const MEMBER_PORT: u16 = 4800;

/// Kind of node on the bridge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Farm node: VIP on `lo`, runs farmlb in farm mode and the service itself.
    Farm,
    /// Director (failover rig): runs farmlb in director mode with `[farm]` membership.
    Director,
    /// Director that also holds the VIP on `lo` (ARP-silent) like a farm node, so that the
    /// same nodes can serve a service either as directors (`dr`) or themselves (`farm`).
    ServingDirector,
    /// DR backend: VIP on `lo`, ARP-silent.
    Backend,
}

impl Role {
    /// Whether farmlb runs on it (and forwards with XDP_TX, which needs the switch side of
    /// its link to run XDP too).
    fn directs(self) -> bool {
        matches!(self, Role::Director | Role::ServingDirector)
    }
}

/// A topology of one client and several nodes on one bridge. Dropping it tears it down.
pub struct FarmRig {
    names: Names,
    /// (namespace suffix, last address byte, role)
    nodes: Vec<(String, u8, Role)>,
}

/// Delete every namespace `{prefix}-*` (idempotent).
pub fn teardown(prefix: &str) -> Result<()> {
    let _ = fs::remove_dir_all(format!("/sys/fs/bpf/farmlb-farmrig-{prefix}"));
    for ns in netns::list()? {
        if ns.strip_prefix(prefix).is_some_and(|r| r.starts_with('-')) {
            let _ = netns::run(&["ip", "netns", "delete", &ns]);
        }
    }
    crate::pins::clear(prefix)
}

impl FarmRig {
    /// A farm rig: client + `n` farm nodes (10.99.0.21, .22, …).
    pub fn farm(prefix: &str, n: usize) -> Result<FarmRig> {
        let mut rig = Self::base(prefix)?;
        for i in 0..n {
            rig.add(&format!("n{}", i + 1), 21 + i as u8, Role::Farm)?;
        }
        Ok(rig)
    }

    /// A failover rig: client + `directors` directors (10.99.0.3, .4, …) + `backends`
    /// backends (10.99.0.11, …).
    pub fn failover(prefix: &str, directors: usize, backends: usize) -> Result<FarmRig> {
        Self::with_directors(prefix, directors, backends, Role::Director)
    }

    /// A failover rig whose directors also hold the VIP ([`Role::ServingDirector`]).
    pub fn failover_serving(prefix: &str, directors: usize, backends: usize) -> Result<FarmRig> {
        Self::with_directors(prefix, directors, backends, Role::ServingDirector)
    }

    fn with_directors(
        prefix: &str,
        directors: usize,
        backends: usize,
        role: Role,
    ) -> Result<FarmRig> {
        let mut rig = Self::base(prefix)?;
        for i in 0..backends {
            rig.add(&format!("b{}", i + 1), 11 + i as u8, Role::Backend)?;
        }
        for i in 0..directors {
            rig.add(&format!("d{}", i + 1), 3 + i as u8, role)?;
        }
        Ok(rig)
    }

    fn base(prefix: &str) -> Result<FarmRig> {
        let rig = FarmRig {
            names: Names::claim(prefix, teardown, CLIENT_V6_SOURCES)?,
            nodes: Vec::new(),
        };
        rig.build_switch()?;
        rig.add_host(&rig.ns_client(), "cl", 2, &[])?;
        let mut batch = String::from("addr add 10.99.0.2/24 dev eth0\n");
        for i in 0..32u8 {
            let _ = writeln!(batch, "addr add 10.99.0.{}/24 dev eth0", 100 + i);
        }
        batch += "addr add fd99::2/64 dev eth0 nodad\n";
        for i in 0..CLIENT_V6_SOURCES {
            let _ = writeln!(batch, "addr add fd99::{:x}/64 dev eth0 nodad", 0x100 + i);
        }
        // The VIPs are on-link: the client resolves them with ARP / neighbour discovery.
        batch += "route add 10.99.100.0/24 dev eth0\n";
        batch += "route add fd99:100::/64 dev eth0\n";
        ip_batch(&rig.ns_client(), &batch)?;
        netns::exec(&rig.ns_client(), &["ethtool", "-K", "eth0", "tx", "off"])
            .context("ethtool (run `cargo xtask setup`)")?;
        Ok(rig)
    }

    fn add(&mut self, tag: &str, host: u8, role: Role) -> Result<()> {
        let ns = self.ns(tag);
        self.add_host(&ns, tag, host, &[])?;
        let mut batch = format!("addr add 10.99.0.{host}/24 dev eth0\n");
        let _ = writeln!(batch, "addr add fd99::{host}/64 dev eth0 nodad");
        if role != Role::Director {
            let _ = writeln!(batch, "addr add {FARM_VIP}/32 dev lo");
            // The kernel answers neighbour solicitations only for addresses of the receiving
            // interface, so a VIP on `lo` is silent on eth0 without further sysctls.
            let _ = writeln!(batch, "addr add {FARM_VIP6}/128 dev lo");
            netns::exec(
                &ns,
                &[
                    "sysctl",
                    "-qw",
                    "net.ipv4.conf.all.arp_ignore=1",
                    "net.ipv4.conf.all.arp_announce=2",
                    "net.ipv4.conf.eth0.arp_ignore=1",
                    "net.ipv4.conf.eth0.arp_announce=2",
                    "net.ipv4.conf.lo.rp_filter=0",
                    "net.ipv4.conf.eth0.rp_filter=0",
                ],
            )?;
        }
        ip_batch(&ns, &batch)?;
        if role.directs() {
            // XDP_TX frames reach the bridge only if the switch-side veth runs XDP too.
            let sw = self.ns_switch();
            netns::exec(&sw, &["ethtool", "-K", &format!("v-{tag}"), "gro", "on"])?;
            let (ifname, pin) = (
                format!("v-{tag}"),
                PathBuf::from(format!(
                    "/sys/fs/bpf/farmlb-farmrig-{}/{tag}-pass",
                    self.prefix()
                )),
            );
            netns::in_netns(&sw, move || {
                farmlb::dataplane::attach_pass_pinned(&ifname, &pin)
            })??;
        }
        self.nodes.push((tag.into(), host, role));
        Ok(())
    }

    fn node(&self, tag: &str) -> (u8, Role) {
        self.nodes
            .iter()
            .find(|(t, _, _)| t == tag)
            .map(|(_, h, r)| (*h, *r))
            .unwrap_or_else(|| panic!("no node {tag}"))
    }

    pub fn role(&self, tag: &str) -> Role {
        self.node(tag).1
    }

    pub fn addr(&self, tag: &str) -> Ipv4Addr {
        Ipv4Addr::new(10, 99, 0, self.node(tag).0)
    }

    /// Node `tag`'s IPv6 address (fd99::h, `h` written as in the IPv4 address).
    pub fn addr6(&self, tag: &str) -> Ipv6Addr {
        format!("fd99::{}", self.addr(tag).octets()[3])
            .parse()
            .expect("valid address")
    }

    /// Tags of the nodes with `role`, in creation order.
    pub fn tags(&self, role: Role) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|(_, _, r)| *r == role)
            .map(|(t, _, _)| t.clone())
            .collect()
    }

    /// Take node `tag`'s link to the switch down (or up again).
    pub fn set_link(&self, tag: &str, up: bool) -> Result<()> {
        ip_batch(
            &self.ns_switch(),
            &format!("link set v-{tag} {}\n", if up { "up" } else { "down" }),
        )
    }

    /// Write the shared membership key and return its path.
    pub fn write_key(&self, key: &str) -> Result<PathBuf> {
        let p = std::env::temp_dir().join(format!("farmlb-{}.key", self.prefix()));
        fs::write(&p, key)?;
        Ok(p)
    }

    /// The client's neighbour entry for `ip` (`ip neigh show`), empty if it has none.
    pub fn client_neighbour(&self, ip: IpAddr) -> Result<String> {
        let out = netns::run(&[
            "ip",
            "-n",
            &self.ns_client(),
            "neigh",
            "show",
            &ip.to_string(),
        ])?;
        Ok(out.trim().to_string())
    }

    /// Tear the topology down (idempotent; dropping the rig does it too).
    pub fn down(&mut self) -> Result<()> {
        self.names.down()
    }
}

impl Deref for FarmRig {
    type Target = Names;
    fn deref(&self) -> &Names {
        &self.names
    }
}

/// One `[[service]]` of a farm/failover config (`FarmService { hash, ..FarmService::farm(…) }`
/// for other settings).
#[derive(Clone, Debug)]
pub struct FarmService {
    pub name: String,
    /// [`FARM_VIP`] or [`FARM_VIP6`] (or any other VIP the nodes hold).
    pub vip: IpAddr,
    pub port: u16,
    pub hash: &'static str,
    pub forwarding: &'static str,
    /// DR backends (director failover), in the VIP's family.
    pub backends: Vec<IpAddr>,
    /// The service's `check = { … }` line, if any.
    pub check: Option<String>,
}

impl FarmService {
    /// A 5-tuple farm service (served by the nodes themselves).
    pub fn farm(name: &str, vip: IpAddr, port: u16) -> FarmService {
        FarmService {
            name: name.into(),
            vip,
            port,
            hash: "5-tuple",
            forwarding: "farm",
            backends: Vec::new(),
            check: None,
        }
    }

    /// A 5-tuple direct-routing service over `backends`.
    pub fn dr(name: &str, vip: IpAddr, port: u16, backends: Vec<IpAddr>) -> FarmService {
        FarmService {
            forwarding: "dr",
            backends,
            ..FarmService::farm(name, vip, port)
        }
    }
}

/// A node's config: `[farm]` over `members` (tags), `extra` appended to the section.
pub fn node_config(
    rig: &FarmRig,
    tag: &str,
    node_id: u32,
    members: &[String],
    key: &Path,
    services: &[FarmService],
    extra: &str,
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "interface = \"eth0\"");
    // Farm nodes deliver locally (XDP_PASS after rewriting the destination MAC). A veth in
    // native mode has classified the frame (PACKET_OTHERHOST, for the virtual MAC) before
    // XDP runs and does not re-classify it, so the stack would drop it; generic mode does.
    // On a NIC the skb is built after XDP, so native mode is fine there. Directors use
    // native mode for XDP_TX, unless they may serve a farm service themselves.
    let mode = if members.iter().all(|m| rig.role(m) == Role::Director) {
        "native"
    } else {
        "generic"
    };
    let _ = writeln!(s, "xdp_mode = \"{mode}\"");
    // Namespaces share the filesystem: every node needs its own API socket. Metrics keep the
    // default 127.0.0.1:9740, which is per namespace.
    let _ = writeln!(s, "api_socket = \"{}\"", api_socket(rig, tag).display());
    s += &crate::pins::config_lines(rig.prefix(), tag);
    let _ = writeln!(s, "\n[farm]\nnode_id = {node_id}");
    let _ = writeln!(s, "address = \"{}:{MEMBER_PORT}\"", rig.addr(tag));
    let peers: Vec<String> = members
        .iter()
        .map(|t| format!("\"{}:{MEMBER_PORT}\"", rig.addr(t)))
        .collect();
    let _ = writeln!(s, "peers = [{}]", peers.join(", "));
    let _ = writeln!(s, "key_file = \"{}\"", key.display());
    let _ = writeln!(s, "status_file = \"{}\"", status_path(rig, tag).display());
    s += extra;
    for svc in services {
        service_table(&mut s, &svc.name, svc.vip, svc.port, svc.hash, 16381);
        let _ = writeln!(s, "forwarding = \"{}\"", svc.forwarding);
        if let Some(c) = &svc.check {
            let _ = writeln!(s, "{c}");
        }
        for b in &svc.backends {
            let _ = writeln!(s, "  [[service.backend]]\n  address = \"{b}\"");
        }
    }
    s
}

/// Where node `tag` publishes its farm status.
pub fn status_path(rig: &FarmRig, tag: &str) -> PathBuf {
    temp_file(rig, tag, "status.json")
}

/// Node `tag`'s API socket.
pub fn api_socket(rig: &FarmRig, tag: &str) -> PathBuf {
    temp_file(rig, tag, "sock")
}

/// `farmlb-{prefix}-{tag}.{ext}` in the temp dir.
fn temp_file(rig: &FarmRig, tag: &str, ext: &str) -> PathBuf {
    std::env::temp_dir().join(format!("farmlb-{}-{tag}.{ext}", rig.prefix()))
}

/// `farmlb run` in one node's namespace; everything else is [`Process`]'s.
pub struct FarmNode {
    pub tag: String,
    process: Process,
}

fn xdp_on(ns: &str) -> Result<bool> {
    Ok(netns::run(&["ip", "-n", ns, "link", "show", "eth0"])?.contains("xdp"))
}

impl FarmNode {
    /// Write `config` and start farmlb; waits until its XDP program is attached.
    pub fn start(rig: &FarmRig, tag: &str, config: &str) -> Result<FarmNode> {
        let ns = rig.ns(tag);
        let config_path = temp_file(rig, tag, "toml");
        fs::write(&config_path, config)?;
        let name = format!("farmlb on {tag}");
        let pins = crate::pins::pin_dir(rig.prefix(), tag);
        let log = temp_file(rig, tag, "log");
        let mut process = Process::spawn(&name, &ns, &config_path, &log, &pins, &[])?;
        process.wait_attached(Duration::from_secs(20), || xdp_on(&ns))?;
        Ok(FarmNode {
            tag: tag.into(),
            process,
        })
    }

    /// Stop farmlb and remove its data plane (nothing to do if it is not running).
    pub fn stop(&mut self) -> Result<()> {
        self.process.stop().map(drop)
    }
}

impl Deref for FarmNode {
    type Target = Process;
    fn deref(&self) -> &Process {
        &self.process
    }
}

impl DerefMut for FarmNode {
    fn deref_mut(&mut self) -> &mut Process {
        &mut self.process
    }
}
