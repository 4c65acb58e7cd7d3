//! The direct-routing test topology, built from network namespaces, veths and a bridge.
//!
//! ```text
//!   {p}-cl  eth0 ─┐
//!   {p}-lb  eth0 ─┼── v-cl / v-lb / v-b1 … ── br0   (in namespace {p}-sw)
//!   {p}-b1  eth0 ─┤
//!   {p}-b2  eth0 ─┘  …
//! ```
//!
//! The client routes the VIP prefixes via the director; the director's XDP program rewrites the
//! destination MAC and sends the frame back out (XDP_TX) to a backend, which holds the VIPs on
//! `lo` (ARP-silent) and answers the client directly.

use std::{
    collections::BTreeMap,
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::netns;

/// IPv4 VIP served by the director.
pub const VIP_V4: Ipv4Addr = Ipv4Addr::new(10, 99, 100, 1);
/// IPv6 VIP served by the director.
pub const VIP_V6: Ipv6Addr = Ipv6Addr::new(0xfd99, 0x100, 0, 0, 0, 0, 0, 1);
/// Number of extra client source addresses per family (10.99.0.100–131, fd99::100–11f).
pub const EXTRA_SOURCES: u8 = 32;
/// Highest backend count the address plan allows (10.99.0.11–99).
pub const MAX_BACKENDS: usize = 89;

/// Options for [`Rig::up`].
#[derive(Clone, Debug)]
pub struct RigOpts {
    /// Short prefix of every namespace name (`{prefix}-sw`, `{prefix}-cl`, …): lowercase
    /// letters and digits, at most 10 characters.
    pub prefix: String,
    /// Number of backends created up front (more can be added with [`Rig::add_backend`]).
    pub backends: usize,
}

impl Default for RigOpts {
    fn default() -> Self {
        Self {
            prefix: "flb".into(),
            backends: 3,
        }
    }
}

impl RigOpts {
    pub fn new(prefix: &str, backends: usize) -> Self {
        Self {
            prefix: prefix.into(),
            backends,
        }
    }
}

/// The namespaces of a topology: `{prefix}-sw` (the switch), `{prefix}-cl` (the client) and
/// `{prefix}-{tag}` for every other host. Both rigs dereference to it. Dropping it tears
/// them down (errors ignored) unless the rig's `down` or `keep` came first.
///
/// It also knows the client's source addresses, the same on every rig: 10.99.0.2 and
/// 10.99.0.100–131, fd99::2 and fd99::100 onwards (a number that differs per rig).
#[derive(Debug)]
pub struct Names {
    prefix: String,
    teardown: fn(&str) -> Result<()>,
    up: bool,
    /// Extra IPv6 client sources (fd99::100 …).
    v6_sources: u16,
    /// Held (flock) while this handle lives, so two processes never share a prefix. Dropped
    /// after [`Drop::drop`] has torn the namespaces down.
    _lock: Option<File>,
}

impl Names {
    /// Take `prefix` (waiting while another process holds it), remove what a previous user
    /// left behind with `teardown(prefix)`, and own the namespaces from now on.
    pub(crate) fn claim(
        prefix: &str,
        teardown: fn(&str) -> Result<()>,
        v6_sources: u16,
    ) -> Result<Names> {
        let lock = lock_prefix(prefix)?;
        crate::pins::ensure_test_bpffs()?;
        teardown(prefix)?;
        Ok(Names {
            prefix: prefix.into(),
            teardown,
            up: true,
            v6_sources,
            _lock: Some(lock),
        })
    }

    /// All 33 IPv4 addresses the client can send from: 10.99.0.2 and 10.99.0.100–131.
    pub fn client_sources_v4(&self) -> Vec<IpAddr> {
        std::iter::once(Ipv4Addr::new(10, 99, 0, 2))
            .chain((0..EXTRA_SOURCES).map(|i| Ipv4Addr::new(10, 99, 0, 100 + i)))
            .map(IpAddr::V4)
            .collect()
    }

    /// The IPv6 addresses the client can send from: fd99::2 and fd99::100 onwards.
    pub fn client_sources_v6(&self) -> Vec<IpAddr> {
        std::iter::once(Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, 2))
            .chain((0..self.v6_sources).map(|i| Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, 0x100 + i)))
            .map(IpAddr::V6)
            .collect()
    }

    /// The client's sources of `ip`'s family.
    pub fn client_sources_for(&self, ip: IpAddr) -> Vec<IpAddr> {
        if ip.is_ipv4() {
            self.client_sources_v4()
        } else {
            self.client_sources_v6()
        }
    }

    /// `n` connections from the client's sources (of `vip`'s family) to `vip:port`, one after
    /// the other, tallied by identity.
    pub fn connect(
        &self,
        vip: IpAddr,
        port: u16,
        n: usize,
    ) -> (BTreeMap<String, usize>, Vec<String>) {
        let sources = self.client_sources_for(vip);
        crate::client::connect_tallied(&self.ns_client(), vip, port, n, &sources)
    }

    /// Tear the topology down (idempotent).
    pub(crate) fn down(&mut self) -> Result<()> {
        self.up = false;
        (self.teardown)(&self.prefix)
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn ns_switch(&self) -> String {
        self.ns("sw")
    }

    pub fn ns_client(&self) -> String {
        self.ns("cl")
    }

    /// Namespace of host `tag` (`lb`, `b1`, `n2`, `d1`, …).
    pub fn ns(&self, tag: &str) -> String {
        format!("{}-{tag}", self.prefix)
    }

    /// Create the switch namespace and its bridge.
    pub(crate) fn build_switch(&self) -> Result<()> {
        let sw = self.ns_switch();
        netns::run(&["ip", "netns", "add", &sw])?;
        netns::exec(&sw, &["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"])?;
        ip_batch(
            &sw,
            "link set lo up\n\
             link add br0 type bridge stp_state 0 forward_delay 0 mcast_snooping 0\n\
             link set br0 up\n",
        )
    }

    /// Create namespace `ns` (with the common sysctls and `extra`) and connect its `eth0`
    /// (MAC `02:99:00:00:00:{host}`) to the bridge through `v-{tag}`.
    pub(crate) fn add_host(&self, ns: &str, tag: &str, host: u8, extra: &[&str]) -> Result<()> {
        netns::run(&["ip", "netns", "add", ns])?;
        let mut sysctl = vec!["sysctl", "-qw"];
        sysctl.extend_from_slice(COMMON_SYSCTLS);
        sysctl.extend_from_slice(extra);
        netns::exec(ns, &sysctl)?;
        plug_into_switch(&self.ns_switch(), ns, tag, host)
    }
}

/// A running topology. Dropping it tears it down (errors ignored); call [`Rig::down`] to see them.
#[derive(Debug)]
pub struct Rig {
    names: Names,
    backends: usize,
}

/// How long a rig waits for another process using the same prefix.
const LOCK_WAIT: Duration = Duration::from_secs(300);

/// Take the per-prefix lock, waiting while another live process holds it. A crashed holder
/// releases it automatically, so leftovers can then be cleaned up safely.
fn lock_prefix(prefix: &str) -> Result<File> {
    let path = std::env::temp_dir().join(format!("farmlb-rig-{prefix}.lock"));
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let deadline = Instant::now() + LOCK_WAIT;
    let mut told = false;
    loop {
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(f);
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(err).with_context(|| format!("locking {}", path.display()));
        }
        if Instant::now() > deadline {
            bail!("rig prefix {prefix} stayed in use by another process for {LOCK_WAIT:?}");
        }
        if !told {
            eprintln!("rig {prefix}: in use by another process, waiting");
            told = true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn check_prefix(p: &str) -> Result<()> {
    if p.is_empty()
        || p.len() > 10
        || !p
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
    {
        bail!("rig prefix {p:?} must be 1-10 lowercase letters or digits");
    }
    Ok(())
}

fn is_rig_namespace(prefix: &str, name: &str) -> bool {
    let Some(rest) = name.strip_prefix(prefix).and_then(|r| r.strip_prefix('-')) else {
        return false;
    };
    matches!(rest, "sw" | "cl" | "lb")
        || rest
            .strip_prefix('b')
            .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
}

/// bpffs path of the pinned XDP_PASS link on the director's switch-side veth.
pub fn pass_pin(prefix: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(format!("/sys/fs/bpf/farmlb-rig/{prefix}-pass"))
}

/// Attach farmlb's XDP_PASS program to `ifname` in `ns`, pinned so it outlives this process
/// (`cargo xtask rig up` exits while the rig stays up).
fn attach_xdp_pass(ns: &str, ifname: &str, pin: &std::path::Path) -> Result<()> {
    let (ifname, pin) = (ifname.to_string(), pin.to_path_buf());
    netns::in_netns(ns, move || {
        farmlb::dataplane::attach_pass_pinned(&ifname, &pin)
    })?
}

/// Delete every namespace belonging to a rig with this prefix (idempotent).
pub fn teardown(prefix: &str) -> Result<()> {
    check_prefix(prefix)?;
    // The pinned link dies with the veth; the pin file would stay behind.
    let _ = std::fs::remove_file(pass_pin(prefix));
    let mut errors = Vec::new();
    for ns in netns::list()? {
        if is_rig_namespace(prefix, &ns) {
            if let Err(e) = netns::run(&["ip", "netns", "delete", &ns]) {
                errors.push(format!("{e:#}"));
            }
        }
    }
    // The veths are gone, so are the links; the pinned maps and state stay until removed.
    crate::pins::clear(prefix)?;
    if errors.is_empty() {
        Ok(())
    } else {
        bail!("teardown of rig {prefix}: {}", errors.join("; "))
    }
}

const COMMON_SYSCTLS: &[&str] = &[
    "net.ipv4.conf.all.rp_filter=0",
    "net.ipv4.conf.default.rp_filter=0",
    "net.ipv6.conf.all.accept_dad=0",
    "net.ipv6.conf.default.accept_dad=0",
    "net.ipv6.conf.all.dad_transmits=0",
    "net.ipv6.conf.default.dad_transmits=0",
];

const BACKEND_SYSCTLS: &[&str] = &[
    "net.ipv4.conf.all.arp_ignore=1",
    "net.ipv4.conf.all.arp_announce=2",
    "net.ipv4.conf.default.arp_ignore=1",
    "net.ipv4.conf.default.arp_announce=2",
];

impl Rig {
    /// Build the topology, first removing leftovers that carry the same prefix.
    pub fn up(opts: RigOpts) -> Result<Rig> {
        check_prefix(&opts.prefix)?;
        if opts.backends > MAX_BACKENDS {
            bail!("at most {MAX_BACKENDS} backends");
        }
        // From here on, an early return drops `rig`, which tears down what was built.
        let mut rig = Rig {
            names: Names::claim(&opts.prefix, teardown, EXTRA_SOURCES.into())?,
            backends: 0,
        };
        rig.build_switch()?;
        rig.add_host(&rig.ns_client(), "cl", 2, &[])?;
        rig.add_host(&rig.ns_lb(), "lb", 3, &[])?;
        rig.configure_client()?;
        rig.configure_lb()?;
        for _ in 0..opts.backends {
            rig.add_backend()?;
        }
        Ok(rig)
    }

    /// Tear the topology down (idempotent).
    pub fn down(&mut self) -> Result<()> {
        self.names.down()
    }

    /// Forget this handle but leave the topology running (for `cargo xtask rig up`).
    pub fn keep(mut self) {
        self.names.up = false;
    }

    pub fn ns_lb(&self) -> String {
        self.ns("lb")
    }

    /// Namespace of backend `i` (0-based: backend 0 lives in `{p}-b1`).
    pub fn ns_backend(&self, i: usize) -> String {
        self.ns(&format!("b{}", i + 1))
    }

    pub fn backend_count(&self) -> usize {
        self.backends
    }

    /// The director's interface, the one farmlb attaches to (inside [`Rig::ns_lb`]).
    pub fn lb_iface(&self) -> &'static str {
        "eth0"
    }

    pub fn client_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 99, 0, 2)
    }

    pub fn client_v6(&self) -> Ipv6Addr {
        "fd99::2".parse().unwrap()
    }

    pub fn lb_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 99, 0, 3)
    }

    pub fn lb_v6(&self) -> Ipv6Addr {
        "fd99::3".parse().unwrap()
    }

    /// MAC address of a host's `eth0`: `02:99:00:00:00:XX`, XX = last byte of its IPv4 address.
    pub fn mac_of(&self, v4: Ipv4Addr) -> String {
        format!("02:99:00:00:00:{:02x}", v4.octets()[3])
    }

    /// Backend `i`'s address (0-based: 10.99.0.11, .12, …).
    pub fn backend_v4(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 99, 0, 11 + i as u8)
    }

    /// Backend `i`'s IPv6 address (0-based: fd99::11, fd99::12, …).
    pub fn backend_v6(&self, i: usize) -> Ipv6Addr {
        format!("fd99::{}", 11 + i).parse().unwrap()
    }

    /// Run a command inside namespace `ns`; returns its stdout, fails with its stderr.
    pub fn exec(&self, ns: &str, args: &[&str]) -> Result<String> {
        netns::exec(ns, args)
    }

    /// Add one more backend (namespace, veth, addresses, VIPs on `lo`); returns its index.
    pub fn add_backend(&mut self) -> Result<usize> {
        let i = self.backends;
        if i >= MAX_BACKENDS {
            bail!("at most {MAX_BACKENDS} backends");
        }
        let ns = self.ns_backend(i);
        self.add_host(
            &ns,
            &format!("b{}", i + 1),
            self.backend_v4(i).octets()[3],
            BACKEND_SYSCTLS,
        )?;
        let batch = format!(
            "addr add {v4}/24 dev eth0\n\
             addr add {v6}/64 dev eth0 nodad\n\
             addr add {vip4}/32 dev lo\n\
             addr add {vip6}/128 dev lo nodad\n",
            v4 = self.backend_v4(i),
            v6 = self.backend_v6(i),
            vip4 = VIP_V4,
            vip6 = VIP_V6,
        );
        ip_batch(&ns, &batch)?;
        self.exec(
            &ns,
            &[
                "sysctl",
                "-qw",
                "net.ipv4.conf.eth0.arp_ignore=1",
                "net.ipv4.conf.eth0.arp_announce=2",
                "net.ipv4.conf.eth0.rp_filter=0",
                "net.ipv4.conf.lo.rp_filter=0",
            ],
        )?;
        self.backends += 1;
        // Let the director learn the backend's MAC before any forwarded traffic needs it.
        self.warm(&self.ns_lb(), &self.backend_v4(i).to_string())?;
        self.warm(&self.ns_lb(), &self.backend_v6(i).to_string())?;
        Ok(i)
    }

    fn configure_client(&self) -> Result<()> {
        let ns = self.ns_client();
        let mut batch = format!(
            "addr add {}/24 dev eth0\naddr add {}/64 dev eth0 nodad\n",
            self.client_v4(),
            self.client_v6()
        );
        for (a4, a6) in self
            .client_sources_v4()
            .iter()
            .zip(self.client_sources_v6())
            .skip(1)
        {
            // preferred_lft 0: usable when bound to, never picked as a default source.
            batch += &format!(
                "addr add {a4}/24 dev eth0\n\
                 addr add {a6}/64 dev eth0 nodad preferred_lft 0\n"
            );
        }
        batch += &format!(
            "route add {}/24 via {}\nroute add {}/64 via {}\n",
            Ipv4Addr::new(10, 99, 100, 0),
            self.lb_v4(),
            Ipv6Addr::new(0xfd99, 0x100, 0, 0, 0, 0, 0, 0),
            self.lb_v6()
        );
        ip_batch(&ns, &batch)?;
        // Frames the director bounces with XDP_TX leave as raw frames: a checksum the client
        // left to offload (CHECKSUM_PARTIAL) would never be filled in, so compute it here.
        self.exec(&ns, &["ethtool", "-K", "eth0", "tx", "off"])
            .context("ethtool (run `cargo xtask setup`)")?;
        Ok(())
    }

    fn configure_lb(&self) -> Result<()> {
        let ns = self.ns_lb();
        ip_batch(
            &ns,
            &format!(
                "addr add {}/24 dev eth0\naddr add {}/64 dev eth0 nodad\n",
                self.lb_v4(),
                self.lb_v6()
            ),
        )?;
        // XDP_TX on the director's eth0 puts frames into the XDP ring of its peer v-lb. GRO on
        // v-lb gives it a NAPI context, but the kernel only schedules that NAPI right away
        // when v-lb has an XDP program of its own: without one, bounced frames wait for
        // unrelated traffic. So v-lb gets both (see `xdp`).
        self.exec(&self.ns_switch(), &["ethtool", "-K", "v-lb", "gro", "on"])
            .context("ethtool (run `cargo xtask setup`)")?;
        attach_xdp_pass(&self.ns_switch(), "v-lb", &pass_pin(self.prefix()))?;
        self.warm(&self.ns_client(), &self.lb_v4().to_string())?;
        self.warm(&self.ns_client(), &self.lb_v6().to_string())?;
        Ok(())
    }

    /// One ping from `ns` to `addr`, so neighbour entries exist before tests measure anything.
    fn warm(&self, ns: &str, addr: &str) -> Result<()> {
        self.exec(ns, &["ping", "-c1", "-W2", "-q", addr])
            .with_context(|| format!("ping {addr} from {ns}"))?;
        Ok(())
    }
}

impl std::ops::Deref for Rig {
    type Target = Names;
    fn deref(&self) -> &Names {
        &self.names
    }
}

impl Drop for Names {
    fn drop(&mut self) {
        if self.up {
            let _ = self.down();
        }
    }
}

/// Give namespace `ns` an `eth0` (MAC `02:99:00:00:00:{host}`) whose peer `v-{tag}` is a port
/// of `br0` in the switch namespace `sw`, and bring both up.
pub(crate) fn plug_into_switch(sw: &str, ns: &str, tag: &str, host: u8) -> Result<()> {
    let peer = format!("v-{tag}");
    let mac = format!("02:99:00:00:00:{host:02x}");
    netns::run(&[
        "ip", "-n", sw, "link", "add", &peer, "type", "veth", "peer", "name", "eth0", "address",
        &mac, "netns", ns,
    ])?;
    ip_batch(
        sw,
        &format!("link set {peer} master br0\nlink set {peer} up\n"),
    )?;
    ip_batch(ns, "link set lo up\nlink set eth0 up\n").with_context(|| format!("bringing up {ns}"))
}

pub(crate) fn ip_batch(ns: &str, batch: &str) -> Result<()> {
    netns::run_with_input(&["ip", "-n", ns, "-batch", "-"], Some(batch))
        .with_context(|| format!("ip -batch in {ns}:\n{batch}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_matching() {
        assert!(is_rig_namespace("flb", "flb-sw"));
        assert!(is_rig_namespace("flb", "flb-b12"));
        assert!(!is_rig_namespace("flb", "flb-b"));
        assert!(!is_rig_namespace("flb", "flb2-sw"));
        assert!(!is_rig_namespace("flb", "flb-x-sw"));
        assert!(!is_rig_namespace("flb", "other"));
    }

    #[test]
    fn prefixes() {
        assert!(check_prefix("flb").is_ok());
        assert!(check_prefix("e2e1").is_ok());
        assert!(check_prefix("").is_err());
        assert!(check_prefix("Has-Dash").is_err());
        assert!(check_prefix("waytoolongprefix").is_err());
    }

    #[test]
    fn addresses() {
        let names = Names {
            prefix: "t".into(),
            teardown,
            up: false,
            v6_sources: EXTRA_SOURCES.into(),
            _lock: None,
        };
        let rig = Rig { names, backends: 0 };
        assert_eq!(rig.backend_v6(0).to_string(), "fd99::11");
        assert_eq!(rig.backend_v4(3).to_string(), "10.99.0.14");
        let v4 = rig.client_sources_v4();
        assert_eq!(v4.len(), 33);
        assert_eq!(v4[32].to_string(), "10.99.0.131");
        let v6 = rig.client_sources_v6();
        assert_eq!(v6.len(), 33);
        assert_eq!(v6[1].to_string(), "fd99::100");
        assert_eq!(v6[32].to_string(), "fd99::11f");
        assert_eq!(rig.ns_backend(0), "t-b1");
    }
}
