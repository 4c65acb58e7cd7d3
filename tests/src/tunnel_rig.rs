//! The tunnel topology: backends that are not on the director's segment but behind a router,
//! each running `farmlb decap`.
//!
//! ```text
//!   {p}-cl  eth0 ─┐                                  ┌─ eth0  {p}-b1  (172.16.0.11, fd16::11)
//!   {p}-lb  eth0 ─┼─ br0 ── eth0 {p}-rt eth1 ── br1 ─┼─ eth0  {p}-b2
//!                 │  10.99.0.0/24      172.16.0.0/24 └─ eth0  {p}-b3 …
//!                 │  fd99::/64         fd16::/64
//! ```
//!
//! The client routes the VIPs via the director, the director routes the backend prefixes via
//! the router (so farmlb resolves the router's MAC as each backend's next hop), and the
//! backends' default route is the router: their answers go straight back to the client.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context, Result};

use crate::{
    daemon::farmlb_bin,
    netns,
    process::Process,
    rig::{ip_batch, plug_into_switch, Names, EXTRA_SOURCES, VIP_V4, VIP_V6},
    wait::wait_until,
};

/// The second IPv4 VIP, served with IPv6 backends (4in6).
pub const VIP2_V4: Ipv4Addr = Ipv4Addr::new(10, 99, 100, 2);

pub struct TunnelRig {
    names: Names,
    backends: usize,
    decaps: Vec<DecapProcess>,
}

impl std::ops::Deref for TunnelRig {
    type Target = Names;
    fn deref(&self) -> &Names {
        &self.names
    }
}

fn pass_pin(prefix: &str) -> PathBuf {
    PathBuf::from(format!("/sys/fs/bpf/farmlb-rig/{prefix}-tpass"))
}

/// Delete every namespace of a tunnel rig with this prefix (idempotent).
pub fn teardown(prefix: &str) -> Result<()> {
    let _ = fs::remove_file(pass_pin(prefix));
    for ns in netns::list()? {
        if ns.strip_prefix(prefix).is_some_and(|r| r.starts_with('-')) {
            let _ = netns::run(&["ip", "netns", "delete", &ns]);
        }
    }
    crate::pins::clear(prefix)
}

const SYSCTLS: &[&str] = &[
    "net.ipv4.conf.all.rp_filter=0",
    "net.ipv4.conf.default.rp_filter=0",
    "net.ipv6.conf.all.accept_dad=0",
    "net.ipv6.conf.default.accept_dad=0",
];

impl TunnelRig {
    /// Build the topology with `backends` backends, each running `farmlb decap` on eth0.
    pub fn up(prefix: &str, backends: usize) -> Result<TunnelRig> {
        let mut rig = TunnelRig {
            names: Names::claim(prefix, teardown, EXTRA_SOURCES.into())?,
            backends: 0,
            decaps: Vec::new(),
        };
        rig.build_switch()?;
        ip_batch(
            &rig.ns_switch(),
            "link add br1 type bridge stp_state 0 forward_delay 0 mcast_snooping 0\n\
             link set br1 up\n",
        )?;
        rig.add_host(&rig.ns_client(), "cl", 2, &[])?;
        rig.add_host(&rig.ns_lb(), "lb", 3, &[])?;
        rig.add_host(&rig.ns_router(), "rt", 0xfe, &[])?;
        rig.configure()?;
        for _ in 0..backends {
            rig.add_backend()?;
        }
        Ok(rig)
    }

    pub fn ns_lb(&self) -> String {
        self.ns("lb")
    }

    pub fn ns_router(&self) -> String {
        self.ns("rt")
    }

    pub fn ns_backend(&self, i: usize) -> String {
        self.ns(&format!("b{}", i + 1))
    }

    pub fn backend_count(&self) -> usize {
        self.backends
    }

    pub fn backend_v4(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(172, 16, 0, 11 + i as u8)
    }

    pub fn backend_v6(&self, i: usize) -> Ipv6Addr {
        format!("fd16::{}", 11 + i).parse().unwrap()
    }

    pub fn backend(&self, i: usize, v6: bool) -> IpAddr {
        if v6 {
            self.backend_v6(i).into()
        } else {
            self.backend_v4(i).into()
        }
    }

    pub fn exec(&self, ns: &str, args: &[&str]) -> Result<String> {
        netns::exec(ns, args)
    }

    fn configure(&self) -> Result<()> {
        let mut batch =
            "addr add 10.99.0.2/24 dev eth0\naddr add fd99::2/64 dev eth0 nodad\n".to_string();
        for (a4, a6) in self
            .client_sources_v4()
            .iter()
            .zip(self.client_sources_v6())
            .skip(1)
        {
            batch += &format!(
                "addr add {a4}/24 dev eth0\naddr add {a6}/64 dev eth0 nodad preferred_lft 0\n"
            );
        }
        batch += "route add 10.99.100.0/24 via 10.99.0.3\nroute add fd99:100::/64 via fd99::3\n";
        ip_batch(&self.ns_client(), &batch)?;
        // Checksums complete in software (see `Rig::configure_client`).
        self.exec(&self.ns_client(), &["ethtool", "-K", "eth0", "tx", "off"])?;
        ip_batch(
            &self.ns_lb(),
            "addr add 10.99.0.3/24 dev eth0\naddr add fd99::3/64 dev eth0 nodad\n\
             route add 172.16.0.0/24 via 10.99.0.254\nroute add fd16::/64 via fd99::fe\n",
        )?;
        // Frames the director sends with XDP_TX reach the bridge only through an XDP peer.
        self.exec(&self.ns_switch(), &["ethtool", "-K", "v-lb", "gro", "on"])?;
        let (sw, pin) = (self.ns_switch(), pass_pin(self.prefix()));
        netns::in_netns(&sw, move || {
            farmlb::dataplane::attach_pass_pinned("v-lb", &pin)
        })??;
        let rt = self.ns_router();
        self.exec(
            &rt,
            &[
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
            ],
        )?;
        netns::run(&[
            "ip",
            "-n",
            &self.ns_switch(),
            "link",
            "add",
            "v-rt1",
            "type",
            "veth",
            "peer",
            "name",
            "eth1",
            "address",
            "02:98:00:00:00:01",
            "netns",
            &rt,
        ])?;
        ip_batch(
            &self.ns_switch(),
            "link set v-rt1 master br1\nlink set v-rt1 up\n",
        )?;
        ip_batch(
            &rt,
            "link set eth1 up\naddr add 10.99.0.254/24 dev eth0\naddr add fd99::fe/64 dev eth0 \
             nodad\naddr add 172.16.0.1/24 dev eth1\naddr add fd16::1/64 dev eth1 nodad\n",
        )?;
        for a in ["10.99.0.254", "fd99::fe"] {
            self.exec(&self.ns_lb(), &["ping", "-c1", "-W2", "-q", a])?;
        }
        for a in ["10.99.0.3", "fd99::3"] {
            self.exec(&self.ns_client(), &["ping", "-c1", "-W2", "-q", a])?;
        }
        Ok(())
    }

    /// One more backend behind the router: addresses, VIPs on `lo`, default routes via the
    /// router, and `farmlb decap` on its eth0. Returns its index.
    pub fn add_backend(&mut self) -> Result<usize> {
        let i = self.backends;
        let ns = self.ns_backend(i);
        netns::run(&["ip", "netns", "add", &ns])?;
        let mut sysctl = vec!["sysctl", "-qw"];
        sysctl.extend_from_slice(SYSCTLS);
        netns::exec(&ns, &sysctl)?;
        plug_into_switch(
            &self.ns_switch(),
            &ns,
            &format!("b{}", i + 1),
            0x11 + i as u8,
        )?;
        // `plug_into_switch` uses br0: move the port to the backend segment.
        let port = format!("v-b{}", i + 1);
        ip_batch(&self.ns_switch(), &format!("link set {port} master br1\n"))?;
        ip_batch(
            &ns,
            &format!(
                "addr add {v4}/24 dev eth0\naddr add {v6}/64 dev eth0 nodad\n\
                 addr add {VIP_V4}/32 dev lo\naddr add {VIP2_V4}/32 dev lo\n\
                 addr add {VIP_V6}/128 dev lo nodad\n\
                 route add default via 172.16.0.1\nroute add default via fd16::1\n",
                v4 = self.backend_v4(i),
                v6 = self.backend_v6(i),
            ),
        )?;
        self.exec(
            &ns,
            &[
                "sysctl",
                "-qw",
                "net.ipv4.conf.eth0.rp_filter=0",
                "net.ipv4.conf.lo.rp_filter=0",
            ],
        )?;
        self.decaps.push(DecapProcess::start(&ns)?);
        self.backends += 1;
        for a in [
            self.backend_v4(i).to_string(),
            self.backend_v6(i).to_string(),
        ] {
            self.exec(&self.ns_lb(), &["ping", "-c1", "-W2", "-q", &a])
                .with_context(|| format!("the director reaching backend {a}"))?;
        }
        Ok(i)
    }

    /// Stop every backend's `farmlb decap` (each must exit cleanly and detach); their
    /// counter lines, by backend.
    pub fn stop_decaps(&mut self) -> Result<Vec<String>> {
        let mut lines = Vec::new();
        for (i, d) in self.decaps.iter_mut().enumerate() {
            let line = d.stop()?;
            let ns = self.names.ns(&format!("b{}", i + 1));
            let link = netns::exec(&ns, &["ip", "link", "show", "dev", "eth0"])?;
            if link.contains("xdp") {
                bail!("the decapsulator is still attached in {ns} after it exited");
            }
            lines.push(line);
        }
        Ok(lines)
    }

    /// The farmlb config for `services` (TOML `[[service]]` tables) on the director.
    pub fn farmlb_config(&self, services: &str) -> String {
        format!(
            "interface = \"eth0\"\napi_socket = \"{}\"\n{}{services}",
            self.api_socket().display(),
            crate::pins::config_lines(self.prefix(), "lb"),
        )
    }

    /// Start `farmlb run` on the director with `config`; waits until it has attached.
    pub fn start_director(&self, config: &str) -> Result<Process> {
        let path = std::env::temp_dir().join(format!("farmlb-{}.toml", self.prefix()));
        fs::write(&path, config)?;
        let log = std::env::temp_dir().join(format!("farmlb-{}.log", self.prefix()));
        let pins = crate::pins::pin_dir(self.prefix(), "lb");
        let mut p = Process::spawn("farmlb", &self.ns_lb(), &path, &log, &pins, &[])?;
        let ns = self.ns_lb();
        p.wait_attached(Duration::from_secs(15), move || {
            Ok(netns::exec(&ns, &["ip", "link", "show", "dev", "eth0"])?.contains("xdp"))
        })?;
        Ok(p)
    }

    pub fn api_socket(&self) -> PathBuf {
        std::env::temp_dir().join(format!("farmlb-{}.sock", self.prefix()))
    }

    pub fn down(&mut self) -> Result<()> {
        for d in &mut self.decaps {
            let _ = d.stop();
        }
        self.names.down()
    }
}

impl Drop for TunnelRig {
    fn drop(&mut self) {
        for d in &mut self.decaps {
            let _ = d.stop();
        }
    }
}

/// `farmlb decap --interface eth0` in a backend namespace, logging to a file.
pub struct DecapProcess {
    child: Option<Child>,
    log: PathBuf,
    ns: String,
}

impl DecapProcess {
    fn start(ns: &str) -> Result<DecapProcess> {
        let log = std::env::temp_dir().join(format!("farmlb-{ns}-decap.log"));
        let f = fs::File::create(&log)?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(farmlb_bin())
            .args(["decap", "--interface", "eth0"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .context("starting farmlb decap")?;
        let mut d = DecapProcess {
            child: Some(child),
            log,
            ns: ns.into(),
        };
        let ns2 = ns.to_string();
        wait_until(Duration::from_secs(10), "farmlb decap to attach", || {
            if let Some(st) = d.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!(
                    "farmlb decap exited ({st}): {}",
                    fs::read_to_string(&d.log)?
                );
            }
            Ok(netns::exec(&ns2, &["ip", "link", "show", "dev", "eth0"])?.contains("xdp"))
        })?;
        Ok(d)
    }

    /// SIGTERM and wait for a clean exit; the counters line it printed.
    pub fn stop(&mut self) -> Result<String> {
        let Some(mut c) = self.child.take() else {
            return Ok(String::new());
        };
        // SAFETY: signalling our own child (`ip netns exec` execs farmlb in place).
        unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
        let st = c.wait()?;
        let log = fs::read_to_string(&self.log)?;
        if !st.success() {
            bail!("farmlb decap in {} exited with {st}: {log}", self.ns);
        }
        Ok(log
            .lines()
            .find(|l| l.starts_with("decap "))
            .unwrap_or_default()
            .to_string())
    }
}
