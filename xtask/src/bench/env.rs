//! The namespace rig the forwarding and connection benchmarks share, and the balancers that
//! take turns on its director: farmlb, an nftables netdev balancer, HAProxy.

use std::fs;
use std::io::{ErrorKind, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lb_tests::{
    backend_id, farmlb_config, netns, write_config, Daemon, Rig, RigOpts, Service, VIP_V4,
};

/// Namespace prefix of the benchmark's rig.
pub const PREFIX: &str = "bench";
pub const BACKENDS: usize = 3;
/// TCP service (identity servers on the backends).
pub const TCP_PORT: u16 = 80;
/// UDP service of the forwarding benchmark (dropped and counted at the backends).
pub const UDP_PORT: u16 = 9;

pub struct BenchRig {
    pub rig: Rig,
    /// One per backend (`None` only if a restart failed).
    servers: Vec<Option<LineServer>>,
    config: PathBuf,
    /// The same services, with HAProxy-like default TCP health checks on the TCP service.
    checked_config: PathBuf,
}

/// Accepting threads per backend.
const SERVER_THREADS: usize = 2;

/// The benchmark's backend: on every connection, writes the backend's identity line and
/// closes. (lb-tests' `IdentityServer` polls its listener every 2 ms, which would dominate
/// the latencies measured here.)
pub struct LineServer {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl LineServer {
    pub fn start(ns: &str, port: u16, id: &str) -> Result<LineServer> {
        let addr = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port);
        let listener = netns::in_netns(ns, move || -> Result<TcpListener> {
            let l = TcpListener::bind(addr)?;
            l.set_nonblocking(true)?;
            Ok(l)
        })?
        .with_context(|| format!("binding {addr} in {ns}"))?;
        let listener = Arc::new(listener);
        let stop = Arc::new(AtomicBool::new(false));
        let line = format!("{id}\n");
        let threads = (0..SERVER_THREADS)
            .map(|_| {
                let (l, stop, line) = (listener.clone(), stop.clone(), line.clone());
                thread::spawn(move || serve(&l, &stop, line.as_bytes()))
            })
            .collect();
        Ok(LineServer { stop, threads })
    }
}

fn serve(l: &TcpListener, stop: &AtomicBool, line: &[u8]) {
    let mut pfd = libc::pollfd {
        fd: l.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: one valid pollfd; wakes at once on a connection, else every 100 ms.
        unsafe { libc::poll(&mut pfd, 1, 100) };
        match l.accept() {
            Ok((mut s, _)) => {
                let _ = s.set_nodelay(true);
                let _ = s.write_all(line);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(_) => thread::sleep(Duration::from_millis(1)),
        }
    }
}

impl LineServer {
    /// Close the listener (idempotent); waits for the accepting threads to let it go.
    pub fn stop(&self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(2);
        while !self.stopped() {
            if Instant::now() > deadline {
                bail!("backend server threads did not stop");
            }
            thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    pub fn stopped(&self) -> bool {
        self.threads.iter().all(|t| t.is_finished())
    }
}

impl Drop for LineServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl BenchRig {
    pub fn up() -> Result<BenchRig> {
        let rig = Rig::up(RigOpts::new(PREFIX, BACKENDS))?;
        let servers = (0..BACKENDS)
            .map(|i| LineServer::start(&rig.ns_backend(i), TCP_PORT, &backend_id(i)).map(Some))
            .collect::<Result<Vec<_>>>()?;
        let backends: Vec<IpAddr> = (0..BACKENDS)
            .map(|i| IpAddr::V4(rig.backend_v4(i)))
            .collect();
        let tcp = Service::tcp("web", IpAddr::V4(VIP_V4), TCP_PORT).backends(backends.clone());
        let mut udp = Service::tcp("sink", IpAddr::V4(VIP_V4), UDP_PORT).backends(backends);
        udp.protocol = "udp".into();
        let text = farmlb_config(&rig, &[tcp, udp]);
        let config = write_config(&rig, &text)?;
        // Health checks with every timer at its default (interval 2 s, timeout 1 s, rise 2,
        // fall 3) on the TCP service, for the failure benchmark.
        let anchor = "name = \"web\"\n";
        let at = text
            .find(anchor)
            .and_then(|i| text[i..].find("table_size = ").map(|j| i + j))
            .and_then(|i| text[i..].find('\n').map(|j| i + j + 1))
            .context("unexpected farmlb_config layout")?;
        let checked = format!(
            "{}check = {{ type = \"tcp\" }}\n{}",
            &text[..at],
            &text[at..]
        );
        let checked_config = std::env::temp_dir().join(format!("farmlb-{PREFIX}-checked.toml"));
        fs::write(&checked_config, checked)
            .with_context(|| format!("writing {}", checked_config.display()))?;
        // Many short connections: wide port ranges, reuse of TIME_WAIT ports.
        for ns in [rig.ns_client(), rig.ns_lb()] {
            rig.exec(
                &ns,
                &[
                    "sysctl",
                    "-qw",
                    "net.ipv4.ip_local_port_range=1024 65000",
                    "net.ipv4.tcp_tw_reuse=1",
                ],
            )?;
        }
        Ok(BenchRig {
            rig,
            servers,
            config,
            checked_config,
        })
    }

    pub fn backend_addrs(&self) -> Vec<Ipv4Addr> {
        (0..BACKENDS).map(|i| self.rig.backend_v4(i)).collect()
    }

    pub fn backend_macs(&self) -> Vec<String> {
        self.backend_addrs()
            .into_iter()
            .map(|a| self.rig.mac_of(a))
            .collect()
    }

    pub fn lb_mac(&self) -> String {
        self.rig.mac_of(self.rig.lb_v4())
    }

    pub fn client_mac(&self) -> String {
        self.rig.mac_of(self.rig.client_v4())
    }

    /// Run `nft -f -` with `script` inside `ns`.
    pub fn nft(&self, ns: &str, script: &str) -> Result<String> {
        netns::run_with_input(&["ip", "netns", "exec", ns, "nft", "-f", "-"], Some(script))
            .with_context(|| format!("nft in {ns}:\n{script}"))
    }

    pub fn start_farmlb(&self) -> Result<Daemon> {
        Daemon::start(&self.rig, &self.config)
    }

    /// farmlb with default TCP health checks on the TCP service.
    pub fn start_farmlb_checked(&self) -> Result<Daemon> {
        Daemon::start(&self.rig, &self.checked_config)
    }

    /// Stop backend `i`'s server: its listener is closed, so the kernel refuses connections
    /// as after a crash. Returns once the listener is gone.
    pub fn stop_backend(&self, i: usize) -> Result<()> {
        match &self.servers[i] {
            Some(s) => s.stop(),
            None => Ok(()),
        }
    }

    /// Start backend `i`'s server again if it was stopped.
    pub fn restart_backend(&mut self, i: usize) -> Result<()> {
        if self.servers[i].as_ref().is_none_or(LineServer::stopped) {
            self.servers[i] = Some(LineServer::start(
                &self.rig.ns_backend(i),
                TCP_PORT,
                &backend_id(i),
            )?);
        }
        Ok(())
    }

    /// The nftables baseline: a netdev-ingress rule on the director's interface that picks a
    /// backend by jhash of (source address, source port) and forwards the frame back out with
    /// the backend's MAC — direct routing like farmlb, no NAT, no conntrack.
    pub fn nft_lb_script(&self) -> String {
        let map: Vec<String> = self
            .backend_macs()
            .iter()
            .enumerate()
            .map(|(i, m)| format!("{i} : {m}"))
            .collect();
        format!(
            "table netdev benchlb {{\n\
             \tchain ingress {{\n\
             \t\ttype filter hook ingress device \"{dev}\" priority 0; policy accept;\n\
             \t\tip daddr {vip} udp dport {udp} ether daddr set jhash ip saddr . udp sport mod {n} map {{ {map} }} ether saddr set {lb} fwd to \"{dev}\"\n\
             \t\tip daddr {vip} tcp dport {tcp} ether daddr set jhash ip saddr . tcp sport mod {n} map {{ {map} }} ether saddr set {lb} fwd to \"{dev}\"\n\
             \t}}\n\
             }}\n",
            dev = self.rig.lb_iface(),
            vip = VIP_V4,
            udp = UDP_PORT,
            tcp = TCP_PORT,
            n = BACKENDS,
            map = map.join(", "),
            lb = self.lb_mac(),
        )
    }

    pub fn start_nft_lb(&self) -> Result<NftLb<'_>> {
        self.nft(&self.rig.ns_lb(), &self.nft_lb_script())?;
        Ok(NftLb { env: self })
    }

    /// HAProxy in `mode tcp` on the VIP (added to the director's `lo` while it runs),
    /// round-robin over the backends.
    pub fn start_haproxy(&self) -> Result<Haproxy<'_>> {
        self.haproxy(false)
    }

    /// HAProxy with `check` on every server and its default timers (`inter 2s rise 2
    /// fall 3`).
    pub fn start_haproxy_checked(&self) -> Result<Haproxy<'_>> {
        self.haproxy(true)
    }

    fn haproxy(&self, checks: bool) -> Result<Haproxy<'_>> {
        let check = if checks { " check" } else { "" };
        let servers: String = self
            .backend_addrs()
            .iter()
            .enumerate()
            .map(|(i, a)| format!("    server b{} {a}:{TCP_PORT}{check}\n", i + 1))
            .collect();
        let cfg = format!(
            "global\n    maxconn 5000\n\n\
             defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 10s\n    timeout server 10s\n\n\
             frontend vip\n    bind {VIP_V4}:{TCP_PORT}\n    default_backend servers\n\n\
             backend servers\n    balance roundrobin\n{servers}"
        );
        let path = std::env::temp_dir().join(format!("farmlb-{PREFIX}-haproxy.cfg"));
        fs::write(&path, &cfg).with_context(|| format!("writing {}", path.display()))?;
        let ns = self.rig.ns_lb();
        netns::run(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{VIP_V4}/32"),
            "dev",
            "lo",
        ])?;
        let log = std::env::temp_dir().join(format!("farmlb-{PREFIX}-haproxy.log"));
        let logf = fs::File::create(&log)?;
        let child = Command::new("ip")
            .args(["netns", "exec", &ns, "haproxy", "-db", "-f"])
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .spawn()
            .context("starting haproxy")?;
        let mut h = Haproxy {
            env: self,
            child: Some(child),
            log,
        };
        h.wait_ready()?;
        Ok(h)
    }
}

impl Drop for BenchRig {
    fn drop(&mut self) {
        self.servers.clear();
        let _ = self.rig.down();
    }
}

pub struct NftLb<'a> {
    env: &'a BenchRig,
}

impl Drop for NftLb<'_> {
    fn drop(&mut self) {
        let _ = self
            .env
            .nft(&self.env.rig.ns_lb(), "delete table netdev benchlb\n");
    }
}

pub struct Haproxy<'a> {
    env: &'a BenchRig,
    child: Option<Child>,
    log: PathBuf,
}

impl Haproxy<'_> {
    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let dst = SocketAddr::new(IpAddr::V4(VIP_V4), TCP_PORT);
        let ns = self.env.rig.ns_client();
        loop {
            if let Some(st) = self.child.as_mut().expect("running").try_wait()? {
                self.child = None;
                bail!("haproxy exited ({st}): {}", log_tail(&self.log));
            }
            let ok = netns::in_netns(&ns, move || {
                std::net::TcpStream::connect_timeout(&dst, Duration::from_millis(200)).is_ok()
            })?;
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "haproxy did not accept connections within 10 s: {}",
                    log_tail(&self.log)
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The last few lines of a log, on one line.
fn log_tail(p: &std::path::Path) -> String {
    let text = fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(3)..].join(" / ")
}

impl Drop for Haproxy<'_> {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child, not yet reaped.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = netns::run(&[
            "ip",
            "-n",
            &self.env.rig.ns_lb(),
            "addr",
            "del",
            &format!("{VIP_V4}/32"),
            "dev",
            "lo",
        ]);
    }
}
