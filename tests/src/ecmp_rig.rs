//! Scale-out topology: N directors behind a router that spreads the VIPs' flows over them by
//! ECMP, every director announcing the VIPs over BGP with BIRD 2 (`[announce]`).
//!
//! ```text
//!   {p}-cl eth0 ── eth1 {p}-rt eth0 ─┐            router: BIRD, eBGP to each director (BFD),
//!   10.98.0.2       10.98.0.1        │            ECMP (fib_multipath_hash_policy = 1)
//!   (+ .100-.131)   10.99.0.1        │
//!                   {p}-d1 eth0 ─────┼── br0 ({p}-sw)   directors 10.99.0.3, .4, …: BIRD +
//!                   {p}-d2 eth0 ─────┤                  farmlb (DR, XDP_TX back to br0)
//!                   {p}-d3 eth0 ─────┤
//!                   {p}-b1 eth0 ─────┤                  backends 10.99.0.11, …: VIPs on `lo`,
//!                   {p}-b2 eth0 ─────┘                  answer the client via the router
//! ```
//!
//! Each BIRD runs in its namespace with its own control socket, config and log under the
//! temp dir (`farmlb-{p}-{tag}.bird.*`); the rig kills them when it goes down.

use std::{
    fmt::Write as _,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    ops::Deref,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context, Result};

use crate::{
    daemon::service_table,
    netns,
    process::Process,
    rig::{ip_batch, Names},
};

/// First VIP (the identity service) and a second one (for withdraw tests).
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 99, 100, 1);
pub const VIP2: Ipv4Addr = Ipv4Addr::new(10, 99, 100, 2);
/// An IPv6 VIP on every backend's `lo` (announced into the table; the rig's BGP is IPv4).
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd99, 0x100, 0, 0, 0, 0, 0, 1);
/// `[[service]]` of a director config: name, VIP, port, backends, `check = …` line.
pub type ServiceSpec<'a> = (&'a str, IpAddr, u16, Vec<IpAddr>, &'a str);
/// The routing table farmlb writes and BIRD imports on every director.
pub const TABLE: u32 = 100;
pub const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
pub const MEMBER_PORT: u16 = 4800;
const ROUTER_AS: u32 = 65000;
const CLIENT_SOURCES: u8 = 32;

/// A running BIRD (`bird -f`) in one namespace.
pub struct Bird {
    tag: String,
    child: Option<Child>,
    pub ctl: PathBuf,
    pub log: PathBuf,
}

impl Bird {
    /// `birdc -s CTL ARGS`.
    pub fn birdc(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("birdc")
            .arg("-s")
            .arg(&self.ctl)
            .args(args)
            .output()
            .context("birdc (run `cargo xtask setup`)")?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// SIGKILL: no BGP notification, the peer notices through BFD.
    pub fn kill9(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }
}

impl Drop for Bird {
    fn drop(&mut self) {
        let _ = self.kill9();
        let _ = fs::remove_file(&self.ctl);
        let _ = &self.tag;
    }
}

/// The scale-out rig: client, router, `directors` directors and `backends` backends.
pub struct EcmpRig {
    names: Names,
    pub directors: usize,
    pub backends: usize,
    birds: Vec<Bird>,
}

/// Kill the BIRDs a previous run of this prefix left (their pid files), delete its
/// namespaces and pins (idempotent).
pub fn teardown(prefix: &str) -> Result<()> {
    if let Ok(dir) = fs::read_dir(std::env::temp_dir()) {
        let want = format!("farmlb-{prefix}-");
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&want) && name.ends_with(".bird.pid") {
                if let Some(pid) = fs::read_to_string(e.path())
                    .ok()
                    .and_then(|s| s.trim().parse::<i32>().ok())
                {
                    // Only if it still is a bird: a recycled pid is left alone.
                    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                    if comm.trim() == "bird" {
                        // SAFETY: signalling a process this rig started (its pid file).
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
                let _ = fs::remove_file(e.path());
            }
        }
    }
    let _ = fs::remove_dir_all(format!("/sys/fs/bpf/farmlb-ecmprig-{prefix}"));
    for ns in netns::list()? {
        if ns.strip_prefix(prefix).is_some_and(|r| r.starts_with('-')) {
            let _ = netns::run(&["ip", "netns", "delete", &ns]);
        }
    }
    crate::pins::clear(prefix)
}

impl EcmpRig {
    pub fn up(prefix: &str, directors: usize, backends: usize) -> Result<EcmpRig> {
        let mut rig = EcmpRig {
            names: Names::claim(prefix, teardown, 0)?,
            directors: 0,
            backends: 0,
            birds: Vec::new(),
        };
        rig.build_switch()?;
        // Router: on the bridge, and a point-to-point link to the client.
        let rt = rig.ns("rt");
        rig.add_host(
            &rt,
            "rt",
            1,
            &[
                "net.ipv4.ip_forward=1",
                "net.ipv4.fib_multipath_hash_policy=1",
                "net.ipv4.conf.all.send_redirects=0",
                "net.ipv4.conf.default.send_redirects=0",
            ],
        )?;
        let cl = rig.ns_client();
        netns::run(&["ip", "netns", "add", &cl])?;
        netns::run(&[
            "ip", "-n", &rt, "link", "add", "eth1", "type", "veth", "peer", "name", "eth0",
            "netns", &cl,
        ])?;
        ip_batch(
            &rt,
            &format!(
                "addr add {ROUTER}/24 dev eth0\naddr add 10.98.0.1/24 dev eth1\nlink set eth1 up\n"
            ),
        )?;
        let mut batch =
            String::from("link set lo up\nlink set eth0 up\naddr add 10.98.0.2/24 dev eth0\n");
        for i in 0..CLIENT_SOURCES {
            let _ = writeln!(batch, "addr add 10.98.0.{}/24 dev eth0", 100 + i);
        }
        batch += "route add default via 10.98.0.1\n";
        ip_batch(&cl, &batch)?;
        // Checksums left to a veth's peer (CHECKSUM_PARTIAL) travel with the frame the
        // director bounces; finish them at the source.
        netns::exec(&cl, &["ethtool", "-K", "eth0", "tx", "off"])
            .context("ethtool (run `cargo xtask setup`)")?;
        netns::exec(&rt, &["ethtool", "-K", "eth0", "tx", "off"])?;
        for _ in 0..backends {
            rig.add_backend()?;
        }
        for _ in 0..directors {
            rig.add_director()?;
        }
        Ok(rig)
    }

    pub fn director_addr(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 99, 0, 3 + i as u8)
    }

    pub fn backend_addr(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 99, 0, 11 + i as u8)
    }

    /// Backend `i`'s IPv6 address (fd99::11, …).
    pub fn backend_addr6(&self, i: usize) -> Ipv6Addr {
        Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, 0x11 + i as u16)
    }

    /// Director `i` (0-based) lives in `{p}-d{i+1}`.
    pub fn director_tag(i: usize) -> String {
        format!("d{}", i + 1)
    }

    pub fn backend_tag(i: usize) -> String {
        format!("b{}", i + 1)
    }

    pub fn ns_router(&self) -> String {
        self.ns("rt")
    }

    /// The client's source addresses: 10.98.0.2 and 10.98.0.100–131.
    pub fn client_sources(&self) -> Vec<IpAddr> {
        std::iter::once(Ipv4Addr::new(10, 98, 0, 2))
            .chain((0..CLIENT_SOURCES).map(|i| Ipv4Addr::new(10, 98, 0, 100 + i)))
            .map(IpAddr::V4)
            .collect()
    }

    /// One more backend: VIPs on `lo` (ARP-silent), default route via the router.
    pub fn add_backend(&mut self) -> Result<usize> {
        let i = self.backends;
        let tag = Self::backend_tag(i);
        let ns = self.ns(&tag);
        let host = self.backend_addr(i).octets()[3];
        self.add_host(&ns, &tag, host, &[])?;
        netns::exec(
            &ns,
            &[
                "sysctl",
                "-qw",
                "net.ipv4.conf.all.arp_ignore=1",
                "net.ipv4.conf.all.arp_announce=2",
                "net.ipv4.conf.eth0.arp_ignore=1",
                "net.ipv4.conf.eth0.arp_announce=2",
                "net.ipv4.conf.eth0.rp_filter=0",
                "net.ipv4.conf.lo.rp_filter=0",
            ],
        )?;
        ip_batch(
            &ns,
            &format!(
                "addr add {}/24 dev eth0\naddr add {VIP}/32 dev lo\naddr add {VIP2}/32 dev lo\n\
                 addr add {}/64 dev eth0 nodad\naddr add {VIP6}/128 dev lo nodad\n\
                 route add default via {ROUTER}\n",
                self.backend_addr(i),
                self.backend_addr6(i)
            ),
        )?;
        self.backends += 1;
        Ok(i)
    }

    fn add_director(&mut self) -> Result<()> {
        let i = self.directors;
        let tag = Self::director_tag(i);
        let ns = self.ns(&tag);
        self.add_host(&ns, &tag, self.director_addr(i).octets()[3], &[])?;
        ip_batch(
            &ns,
            &format!(
                "addr add {}/24 dev eth0\naddr add fd99::{:x}/64 dev eth0 nodad\n",
                self.director_addr(i),
                3 + i
            ),
        )?;
        // No unknown-unicast flooding to directors: once a dead director's port is gone
        // from the bridge's table, frames still routed to its MAC must not be flooded to
        // the live directors (whose XDP would forward them and hide the failure).
        let sw = self.ns_switch();
        netns::run(&[
            "bridge",
            "-n",
            &sw,
            "link",
            "set",
            "dev",
            &format!("v-{tag}"),
            "flood",
            "off",
        ])?;
        // XDP_TX frames reach the bridge only if the switch-side veth runs XDP too.
        let ifname = format!("v-{tag}");
        let pin = PathBuf::from(format!(
            "/sys/fs/bpf/farmlb-ecmprig-{}/{tag}-pass",
            self.prefix()
        ));
        netns::in_netns(&sw, move || {
            farmlb::dataplane::attach_pass_pinned(&ifname, &pin)
        })??;
        self.directors += 1;
        Ok(())
    }

    /// Take director `i`'s link to the switch down (or up).
    pub fn set_director_link(&self, i: usize, up: bool) -> Result<()> {
        let state = if up { "up" } else { "down" };
        ip_batch(
            &self.ns_switch(),
            &format!("link set v-{} {state}\n", Self::director_tag(i)),
        )
    }

    fn temp(&self, tag: &str, ext: &str) -> PathBuf {
        std::env::temp_dir().join(format!("farmlb-{}-{tag}.{ext}", self.prefix()))
    }

    /// Start BIRD in the router namespace (peering with every director) and return its
    /// index in [`EcmpRig::bird`].
    pub fn start_router_bird(&mut self) -> Result<usize> {
        let peers: Vec<(Ipv4Addr, u32)> = (0..self.directors)
            .map(|i| (self.director_addr(i), director_as(i)))
            .collect();
        let conf = router_bird_conf(&peers);
        self.start_bird("rt", &conf)
    }

    /// Start BIRD on director `i` (imports table [`TABLE`], exports it to the router).
    pub fn start_director_bird(&mut self, i: usize) -> Result<usize> {
        let conf = director_bird_conf(self.director_addr(i), director_as(i));
        self.start_bird(&Self::director_tag(i), &conf)
    }

    fn start_bird(&mut self, tag: &str, conf: &str) -> Result<usize> {
        let ns = self.ns(tag);
        let (cfg, ctl, log, pid) = (
            self.temp(tag, "bird.conf"),
            self.temp(tag, "bird.ctl"),
            self.temp(tag, "bird.log"),
            self.temp(tag, "bird.pid"),
        );
        let conf = conf.replace("@LOG@", &log.to_string_lossy());
        fs::write(&cfg, conf)?;
        let _ = fs::remove_file(&log);
        let child = Command::new("ip")
            .args(["netns", "exec", &ns, "bird", "-f", "-c"])
            .arg(&cfg)
            .arg("-s")
            .arg(&ctl)
            .arg("-P")
            .arg(&pid)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting bird (run `cargo xtask setup`: Debian's bird2)")?;
        let mut bird = Bird {
            tag: tag.into(),
            child: Some(child),
            ctl,
            log,
        };
        crate::wait::wait_until(Duration::from_secs(10), "bird's control socket", || {
            if let Some(c) = bird.child.as_mut() {
                if let Some(st) = c.try_wait()? {
                    bail!(
                        "bird in {ns} exited ({st}): {}",
                        fs::read_to_string(&bird.log).unwrap_or_default()
                    );
                }
            }
            Ok(bird.ctl.exists())
        })?;
        bird.child.as_ref().map(Child::id);
        self.birds.push(bird);
        Ok(self.birds.len() - 1)
    }

    pub fn bird(&mut self, idx: usize) -> &mut Bird {
        &mut self.birds[idx]
    }

    /// The router's next hops for `vip` (`ip route show VIP`), sorted; empty if it has no
    /// route.
    pub fn router_next_hops(&self, vip: Ipv4Addr) -> Result<Vec<Ipv4Addr>> {
        let out = netns::run(&[
            "ip",
            "-n",
            &self.ns_router(),
            "route",
            "show",
            &format!("{vip}/32"),
        ])?;
        let mut hops: Vec<Ipv4Addr> = out
            .split_whitespace()
            .collect::<Vec<_>>()
            .windows(2)
            .filter(|w| w[0] == "via")
            .filter_map(|w| w[1].parse().ok())
            .collect();
        hops.sort();
        hops.dedup();
        Ok(hops)
    }

    /// Write the shared membership key and return its path.
    pub fn write_key(&self) -> Result<PathBuf> {
        let p = self.temp("farm", "key");
        fs::write(&p, "ecmp-rig shared key, 32 bytes!!")?;
        Ok(p)
    }

    pub fn api_socket(&self, i: usize) -> PathBuf {
        self.temp(&Self::director_tag(i), "sock")
    }

    /// Director `i`'s farmlb config: `[announce]` into [`TABLE`] (`announce_extra` appended
    /// to the section), `[farm]` membership with the other directors, and `services`
    /// (`(name, vip, port, backends, check line)`).
    pub fn director_config(
        &self,
        i: usize,
        key: &std::path::Path,
        announce_extra: &str,
        services: &[ServiceSpec],
    ) -> String {
        let tag = Self::director_tag(i);
        let mut s = String::from("interface = \"eth0\"\nxdp_mode = \"native\"\n");
        let _ = writeln!(s, "api_socket = \"{}\"", self.api_socket(i).display());
        s += &crate::pins::config_lines(self.prefix(), &tag);
        let _ = writeln!(s, "\n[announce]\ntable = {TABLE}\n{announce_extra}");
        let _ = writeln!(s, "[farm]\nnode_id = {}", i + 1);
        let _ = writeln!(s, "address = \"{}:{MEMBER_PORT}\"", self.director_addr(i));
        let peers: Vec<String> = (0..self.directors)
            .filter(|j| *j != i)
            .map(|j| format!("\"{}:{MEMBER_PORT}\"", self.director_addr(j)))
            .collect();
        let _ = writeln!(s, "peers = [{}]", peers.join(", "));
        let _ = writeln!(s, "key_file = \"{}\"", key.display());
        let _ = writeln!(
            s,
            "status_file = \"{}\"",
            self.temp(&tag, "status.json").display()
        );
        for (name, vip, port, backends, check) in services {
            service_table(&mut s, name, *vip, *port, "5-tuple", 16381);
            if !check.is_empty() {
                let _ = writeln!(s, "{check}");
            }
            for b in backends {
                let _ = writeln!(s, "  [[service.backend]]\n  address = \"{b}\"");
            }
        }
        s
    }

    /// Start farmlb on director `i` with `config`; waits until its program is attached.
    pub fn start_farmlb(&self, i: usize, config: &str) -> Result<Process> {
        let tag = Self::director_tag(i);
        let ns = self.ns(&tag);
        let path = self.temp(&tag, "toml");
        fs::write(&path, config)?;
        let pins = crate::pins::pin_dir(self.prefix(), &tag);
        let log = self.temp(&tag, "log");
        let mut p = Process::spawn(&format!("farmlb on {tag}"), &ns, &path, &log, &pins, &[])?;
        p.wait_attached(Duration::from_secs(20), || {
            Ok(netns::run(&["ip", "-n", &ns, "link", "show", "eth0"])?.contains("xdp"))
        })?;
        Ok(p)
    }

    pub fn down(&mut self) -> Result<()> {
        self.birds.clear();
        self.names.down()
    }
}

impl Deref for EcmpRig {
    type Target = Names;
    fn deref(&self) -> &Names {
        &self.names
    }
}

impl Drop for EcmpRig {
    fn drop(&mut self) {
        // BIRDs first (they hold the namespaces' sockets), then the namespaces (Names).
        self.birds.clear();
    }
}

/// Director `i`'s AS: eBGP with one AS per director, so the router's paths differ only by
/// neighbour and BIRD merges them into one multipath route.
fn director_as(i: usize) -> u32 {
    65001 + i as u32
}

/// BFD timers of the rig: 100 ms × 3, so a dead director is noticed in ~0.3 s.
const BFD: &str = "protocol bfd {\n  interface \"eth0\" {\n    min rx interval 100 ms;\n    \
                   min tx interval 100 ms;\n    idle tx interval 300 ms;\n    multiplier 3;\n  };\n}\n";

/// The router: eBGP to every director, BFD, multipath routes into the main table.
pub fn router_bird_conf(peers: &[(Ipv4Addr, u32)]) -> String {
    let mut s = format!(
        "log \"@LOG@\" all;\nrouter id {ROUTER};\nprotocol device {{ scan time 10; }}\n\
         protocol kernel {{\n  merge paths on;\n  ipv4 {{ import none; export all; }};\n}}\n{BFD}"
    );
    for (i, (addr, asn)) in peers.iter().enumerate() {
        let _ = write!(
            s,
            "protocol bgp d{n} {{\n  local {ROUTER} as {ROUTER_AS};\n  neighbor {addr} as {asn};\n  \
             bfd on;\n  hold time 3;\n  connect retry time 1;\n  error wait time 1, 2;\n  \
             ipv4 {{ import all; export none; }};\n}}\n",
            n = i + 1
        );
    }
    s
}

/// A director: the VIP routes farmlb keeps in [`TABLE`] go to the router, next hop self.
/// Same shape as `contrib/bird/bird.conf`.
pub fn director_bird_conf(me: Ipv4Addr, asn: u32) -> String {
    format!(
        "log \"@LOG@\" all;\nrouter id {me};\nprotocol device {{ scan time 10; }}\n\
         protocol kernel farmlb_vips {{\n  kernel table {TABLE};\n  learn;\n  scan time 2;\n  \
         ipv4 {{ import all; export none; }};\n}}\n{BFD}\
         protocol bgp uplink {{\n  local {me} as {asn};\n  neighbor {ROUTER} as {ROUTER_AS};\n  \
         bfd on;\n  hold time 3;\n  connect retry time 1;\n  error wait time 1, 2;\n  \
         ipv4 {{ import none; export where proto = \"farmlb_vips\"; next hop self; }};\n}}\n"
    )
}
