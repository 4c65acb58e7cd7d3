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
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{
    daemon::farmlb_bin,
    netns,
    rig::{ip_batch, plug_into_switch},
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
    /// DR backend: VIP on `lo`, ARP-silent.
    Backend,
}

/// A topology of one client and several nodes on one bridge. Dropping it tears it down.
pub struct FarmRig {
    prefix: String,
    /// (namespace suffix, last address byte, role)
    nodes: Vec<(String, u8, Role)>,
    up: bool,
}

/// Delete every namespace `{prefix}-*` (idempotent).
pub fn teardown(prefix: &str) -> Result<()> {
    let _ = fs::remove_dir_all(format!("/sys/fs/bpf/farmlb-farmrig-{prefix}"));
    for ns in netns::list()? {
        if ns.strip_prefix(prefix).is_some_and(|r| r.starts_with('-')) {
            let _ = netns::run(&["ip", "netns", "delete", &ns]);
        }
    }
    Ok(())
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
        let mut rig = Self::base(prefix)?;
        for i in 0..backends {
            rig.add(&format!("b{}", i + 1), 11 + i as u8, Role::Backend)?;
        }
        for i in 0..directors {
            rig.add(&format!("d{}", i + 1), 3 + i as u8, Role::Director)?;
        }
        Ok(rig)
    }

    fn base(prefix: &str) -> Result<FarmRig> {
        teardown(prefix)?;
        let rig = FarmRig {
            prefix: prefix.into(),
            nodes: Vec::new(),
            up: true,
        };
        let sw = rig.ns_switch();
        netns::run(&["ip", "netns", "add", &sw])?;
        ip_batch(
            &sw,
            "link set lo up\n\
             link add br0 type bridge stp_state 0 forward_delay 0 mcast_snooping 0\n\
             link set br0 up\n",
        )?;
        rig.host(&rig.ns_client(), "cl", 2)?;
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

    fn host(&self, ns: &str, tag: &str, host: u8) -> Result<()> {
        netns::run(&["ip", "netns", "add", ns])?;
        netns::exec(
            ns,
            &[
                "sysctl",
                "-qw",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0",
            ],
        )?;
        plug_into_switch(&self.ns_switch(), ns, tag, host)
    }

    fn add(&mut self, tag: &str, host: u8, role: Role) -> Result<()> {
        let ns = format!("{}-{tag}", self.prefix);
        self.host(&ns, tag, host)?;
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
        if role == Role::Director {
            // XDP_TX frames reach the bridge only if the switch-side veth runs XDP too.
            let sw = self.ns_switch();
            netns::exec(&sw, &["ethtool", "-K", &format!("v-{tag}"), "gro", "on"])?;
            let (ifname, pin) = (
                format!("v-{tag}"),
                PathBuf::from(format!(
                    "/sys/fs/bpf/farmlb-farmrig-{}/{tag}-pass",
                    self.prefix
                )),
            );
            netns::in_netns(&sw, move || {
                farmlb::dataplane::attach_pass_pinned(&ifname, &pin)
            })??;
        }
        self.nodes.push((tag.into(), host, role));
        Ok(())
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn ns_switch(&self) -> String {
        format!("{}-sw", self.prefix)
    }

    pub fn ns_client(&self) -> String {
        format!("{}-cl", self.prefix)
    }

    /// Namespace of node `tag` (`n1`, `d2`, `b3`, …).
    pub fn ns(&self, tag: &str) -> String {
        format!("{}-{tag}", self.prefix)
    }

    pub fn addr(&self, tag: &str) -> Ipv4Addr {
        let host = self
            .nodes
            .iter()
            .find(|(t, _, _)| t == tag)
            .map(|(_, h, _)| *h)
            .unwrap_or_else(|| panic!("no node {tag}"));
        Ipv4Addr::new(10, 99, 0, host)
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

    /// The client's source addresses (10.99.0.2 and 10.99.0.100–131).
    pub fn client_sources(&self) -> Vec<IpAddr> {
        std::iter::once(Ipv4Addr::new(10, 99, 0, 2))
            .chain((0..32).map(|i| Ipv4Addr::new(10, 99, 0, 100 + i)))
            .map(IpAddr::V4)
            .collect()
    }

    /// The client's IPv6 source addresses (fd99::2 and fd99::100–107).
    pub fn client_sources6(&self) -> Vec<IpAddr> {
        std::iter::once(Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, 2))
            .chain(
                (0..CLIENT_V6_SOURCES).map(|i| Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, 0x100 + i)),
            )
            .map(IpAddr::V6)
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
        let p = std::env::temp_dir().join(format!("farmlb-{}.key", self.prefix));
        fs::write(&p, key)?;
        Ok(p)
    }

    pub fn down(&mut self) -> Result<()> {
        self.up = false;
        teardown(&self.prefix)
    }
}

impl Drop for FarmRig {
    fn drop(&mut self) {
        if self.up {
            let _ = self.down();
        }
    }
}

/// One `[[service]]` of a farm/failover config.
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
    // native mode for XDP_TX.
    let mode = if members.iter().all(|m| m.starts_with('d')) {
        "native"
    } else {
        "generic"
    };
    let _ = writeln!(s, "xdp_mode = \"{mode}\"");
    let _ = writeln!(
        s,
        "api_socket = \"/tmp/farmlb-{}-{tag}.sock\"",
        rig.prefix()
    );
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
        let _ = writeln!(s, "\n[[service]]");
        let _ = writeln!(s, "name = \"{}\"", svc.name);
        let _ = writeln!(s, "vip = \"{}\"", svc.vip);
        let _ = writeln!(s, "port = {}", svc.port);
        let _ = writeln!(s, "hash = \"{}\"", svc.hash);
        let _ = writeln!(s, "forwarding = \"{}\"", svc.forwarding);
        let _ = writeln!(s, "table_size = 16381");
        for b in &svc.backends {
            let _ = writeln!(s, "  [[service.backend]]\n  address = \"{b}\"");
        }
    }
    s
}

/// Where node `tag` publishes its farm status.
pub fn status_path(rig: &FarmRig, tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("farmlb-{}-{tag}.status.json", rig.prefix()))
}

/// `farmlb run` in one node's namespace.
pub struct FarmNode {
    pub tag: String,
    ns: String,
    child: Option<Child>,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
}

fn xdp_on(ns: &str) -> Result<bool> {
    Ok(netns::run(&["ip", "-n", ns, "link", "show", "eth0"])?.contains("xdp"))
}

impl FarmNode {
    /// Write `config` and start farmlb; waits until its XDP program is attached.
    pub fn start(rig: &FarmRig, tag: &str, config: &str) -> Result<FarmNode> {
        let ns = rig.ns(tag);
        let config_path = std::env::temp_dir().join(format!("farmlb-{}-{tag}.toml", rig.prefix()));
        fs::write(&config_path, config)?;
        let log_path = std::env::temp_dir().join(format!("farmlb-{}-{tag}.log", rig.prefix()));
        let log = fs::File::create(&log_path)?;
        let bin = farmlb_bin();
        let child = Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(&bin)
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or("info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut n = FarmNode {
            tag: tag.into(),
            ns,
            child: Some(child),
            config_path,
            log_path,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = n.child.as_mut().expect("running").try_wait()? {
                n.child = None;
                bail!("farmlb on {tag} exited ({st}); log:\n{}", n.log());
            }
            if xdp_on(&n.ns)? {
                return Ok(n);
            }
            if Instant::now() > deadline {
                bail!("farmlb on {tag} did not attach; log:\n{}", n.log());
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Whether the farmlb process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILL (no goodbye to the farm).
    pub fn kill9(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// SIGINT and wait for a clean exit.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut c) = self.child.take() else {
            return Ok(());
        };
        // SAFETY: signalling our own unreaped child.
        unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = c.try_wait()? {
                if !st.success() {
                    bail!(
                        "farmlb on {} exited with {st}; log:\n{}",
                        self.tag,
                        self.log()
                    );
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                bail!(
                    "farmlb on {} ignored SIGINT; log:\n{}",
                    self.tag,
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for FarmNode {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
    }
}

/// Try one connection from `src` to `dst` in `ns` with a short timeout; the identity line.
pub fn try_identify(ns: &str, src: IpAddr, dst: SocketAddr, timeout: Duration) -> Result<String> {
    netns::in_netns(ns, move || -> Result<String> {
        use std::io::{BufRead, BufReader};
        let sock = socket2::Socket::new(
            socket2::Domain::for_address(dst),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        sock.bind(&SocketAddr::new(src, 0).into())?;
        sock.connect_timeout(&dst.into(), timeout)?;
        let stream: std::net::TcpStream = sock.into();
        stream.set_read_timeout(Some(timeout))?;
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line)?;
        if !line.ends_with('\n') {
            bail!("no identity line");
        }
        line.pop();
        Ok(line)
    })?
}
