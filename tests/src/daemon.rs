//! Writing farmlb configs for a rig and running the daemon inside the director namespace.

use std::{
    fmt::Write as _,
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{netns, rig::Rig};

/// How a service hashes flows onto its Maglev table (`hash = …` in the config).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HashMode {
    FiveTuple,
    SrcIp,
    SrcIpPort,
}

impl HashMode {
    pub fn as_str(self) -> &'static str {
        match self {
            HashMode::FiveTuple => "5-tuple",
            HashMode::SrcIp => "src-ip",
            HashMode::SrcIpPort => "src-ip-port",
        }
    }
}

/// One `[[service.backend]]` entry.
#[derive(Clone, Debug)]
pub struct BackendSpec {
    pub address: IpAddr,
    pub weight: u32,
}

/// One `[[service]]` entry.
#[derive(Clone, Debug)]
pub struct Service {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: String,
    pub hash: HashMode,
    pub table_size: u32,
    pub backends: Vec<BackendSpec>,
}

impl Service {
    /// A TCP service with 5-tuple hashing, a 65537-slot table and no backends yet.
    pub fn tcp(name: &str, vip: IpAddr, port: u16) -> Service {
        Service {
            name: name.into(),
            vip,
            port,
            protocol: "tcp".into(),
            hash: HashMode::FiveTuple,
            table_size: 65537,
            backends: Vec::new(),
        }
    }

    pub fn hash(mut self, hash: HashMode) -> Service {
        self.hash = hash;
        self
    }

    pub fn table_size(mut self, size: u32) -> Service {
        self.table_size = size;
        self
    }

    pub fn backend(mut self, address: IpAddr, weight: u32) -> Service {
        self.backends.push(BackendSpec { address, weight });
        self
    }

    /// Add each address with weight 1.
    pub fn backends(mut self, addrs: impl IntoIterator<Item = IpAddr>) -> Service {
        self.backends.extend(
            addrs
                .into_iter()
                .map(|address| BackendSpec { address, weight: 1 }),
        );
        self
    }
}

/// The TOML farmlb reads, for `services` on the rig's director interface.
pub fn farmlb_config(rig: &Rig, services: &[Service]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "interface = \"{}\"", rig.lb_iface());
    let _ = writeln!(s, "xdp_mode = \"auto\"");
    let _ = writeln!(s, "udp_timeout = \"30s\"");
    // The API socket is a filesystem path: one per rig so concurrent rigs never share it.
    let _ = writeln!(s, "api_socket = \"{}\"", api_socket(rig).display());
    for svc in services {
        let _ = writeln!(s, "\n[[service]]");
        let _ = writeln!(s, "name = \"{}\"", svc.name);
        let _ = writeln!(s, "vip = \"{}\"", svc.vip);
        let _ = writeln!(s, "port = {}", svc.port);
        let _ = writeln!(s, "protocol = \"{}\"", svc.protocol);
        let _ = writeln!(s, "hash = \"{}\"", svc.hash.as_str());
        let _ = writeln!(s, "table_size = {}", svc.table_size);
        for b in &svc.backends {
            let _ = writeln!(s, "\n  [[service.backend]]");
            let _ = writeln!(s, "  address = \"{}\"", b.address);
            let _ = writeln!(s, "  weight = {}", b.weight);
        }
    }
    s
}

/// The daemon's API socket for this rig (see [`farmlb_config`]).
pub fn api_socket(rig: &Rig) -> PathBuf {
    std::env::temp_dir().join(format!("farmlb-{}.sock", rig.prefix()))
}

/// Write `contents` to this rig's config file (in the temp dir) and return its path.
pub fn write_config(rig: &Rig, contents: &str) -> Result<PathBuf> {
    let path = std::env::temp_dir().join(format!("farmlb-{}.toml", rig.prefix()));
    fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Path of the farmlb binary: `$FARMLB_BIN`, else `$CARGO_TARGET_DIR/debug/farmlb`, else
/// `<workspace>/target/debug/farmlb`.
pub fn farmlb_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FARMLB_BIN") {
        return p.into();
    }
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        return Path::new(&t).join("debug/farmlb");
    }
    workspace_root().join("target/debug/farmlb")
}

/// The cargo workspace this crate belongs to.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Whether an XDP program is attached to the director's interface.
pub fn xdp_attached(rig: &Rig) -> Result<bool> {
    let out = netns::run(&["ip", "-n", &rig.ns_lb(), "link", "show", rig.lb_iface()])?;
    Ok(out.contains("xdp"))
}

/// `farmlb run` inside the director namespace. Stopped with SIGINT on [`Daemon::stop`] or drop.
pub struct Daemon {
    child: Option<Child>,
    config_path: PathBuf,
    log_path: PathBuf,
}

/// How long the daemon gets to attach, and to exit after SIGINT.
const START_TIMEOUT: Duration = Duration::from_secs(15);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

impl Daemon {
    /// Start `farmlb run --config <config_path>` in the rig's director namespace, logging to a
    /// file, and wait until its XDP program shows on the interface.
    pub fn start(rig: &Rig, config_path: &Path) -> Result<Daemon> {
        let bin = farmlb_bin();
        if !bin.exists() {
            bail!(
                "farmlb binary {} not found (build it with `cargo build -p lb-userspace`, \
                 or set FARMLB_BIN)",
                bin.display()
            );
        }
        if xdp_attached(rig)? {
            bail!("an XDP program is already attached in {}", rig.ns_lb());
        }
        let log_path = std::env::temp_dir().join(format!("farmlb-{}.log", rig.prefix()));
        let log = fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &rig.ns_lb()])
            .arg(&bin)
            .arg("run")
            .arg("--config")
            .arg(config_path)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or("info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut d = Daemon {
            child: Some(child),
            config_path: config_path.to_path_buf(),
            log_path,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(st) = d.child_mut().try_wait()? {
                d.child = None;
                bail!("farmlb exited ({st}) before attaching; log:\n{}", d.log());
            }
            if xdp_attached(rig)? {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "farmlb did not attach within {START_TIMEOUT:?}; log:\n{}",
                    d.log()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
        // The program is attached; give the daemon a moment in case it fills maps afterwards.
        thread::sleep(Duration::from_millis(200));
        if let Some(st) = d.child_mut().try_wait()? {
            d.child = None;
            bail!(
                "farmlb exited ({st}) right after attaching; log:\n{}",
                d.log()
            );
        }
        Ok(d)
    }

    fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("daemon running")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the daemon printed so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_else(|e| format!("(no log: {e})"))
    }

    fn signal(&self, sig: libc::c_int) -> Result<()> {
        let pid = self.pid().context("daemon not running")?;
        // SAFETY: signalling our own child, which has not been reaped yet.
        if unsafe { libc::kill(pid as libc::pid_t, sig) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(())
    }

    /// Rewrite the config file with `contents` and send SIGHUP; fails if the daemon is gone
    /// shortly afterwards.
    pub fn reload(&mut self, contents: &str) -> Result<()> {
        fs::write(&self.config_path, contents)
            .with_context(|| format!("writing {}", self.config_path.display()))?;
        self.signal(libc::SIGHUP)?;
        thread::sleep(Duration::from_millis(500));
        if let Some(st) = self.child_mut().try_wait()? {
            self.child = None;
            bail!("farmlb exited ({st}) on SIGHUP; log:\n{}", self.log());
        }
        Ok(())
    }

    /// Send SIGINT and wait for the exit (SIGKILL after 10 s). Fails unless it exits cleanly.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("daemon already stopped");
        };
        // SAFETY: as in `signal`.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        let status = loop {
            if let Some(st) = child.try_wait()? {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let st = child.wait()?;
                bail!(
                    "farmlb ignored SIGINT for {STOP_TIMEOUT:?} ({st}); log:\n{}",
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(20));
        };
        if !status.success() {
            bail!("farmlb exited with {status}; log:\n{}", self.log());
        }
        Ok(status)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
    }
}
