//! Writing farmlb configs for a rig and running the daemon inside the director namespace.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    net::IpAddr,
    ops::{Deref, DerefMut},
    path::{Path, PathBuf},
    process::ExitStatus,
    thread,
    time::Duration,
};

use anyhow::{bail, ensure, Context, Result};

use crate::{
    format_distribution, netns, process::Process, rig::Rig, rig::RigOpts,
    server::start_on_backends, IdentityServer,
};

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

/// One `[[service]]` entry (`Service { hash, ..Service::tcp(…) }` for other settings).
#[derive(Clone, Debug)]
pub struct Service {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: String,
    pub hash: HashMode,
    pub table_size: u32,
    pub backends: Vec<BackendSpec>,
    /// The service's `check = { … }` line, if any.
    pub check: Option<String>,
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
            check: None,
        }
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
    s += &crate::pins::config_lines(rig.prefix(), "lb");
    s + &services_toml(services)
}

/// The `[[service]]` tables of `services` (for a config's end).
pub fn services_toml(services: &[Service]) -> String {
    let mut s = String::new();
    for svc in services {
        let hash = svc.hash.as_str();
        service_table(&mut s, &svc.name, svc.vip, svc.port, hash, svc.table_size);
        let _ = writeln!(s, "protocol = \"{}\"", svc.protocol);
        if let Some(c) = &svc.check {
            let _ = writeln!(s, "{c}");
        }
        for b in &svc.backends {
            let _ = writeln!(s, "\n  [[service.backend]]");
            let _ = writeln!(s, "  address = \"{}\"", b.address);
            let _ = writeln!(s, "  weight = {}", b.weight);
        }
    }
    s
}

/// Open a `[[service]]` table with the keys every rig's services set.
pub(crate) fn service_table(
    s: &mut String,
    name: &str,
    vip: IpAddr,
    port: u16,
    hash: &str,
    table_size: u32,
) {
    let _ = writeln!(s, "\n[[service]]");
    let _ = writeln!(s, "name = \"{name}\"");
    let _ = writeln!(s, "vip = \"{vip}\"");
    let _ = writeln!(s, "port = {port}");
    let _ = writeln!(s, "hash = \"{hash}\"");
    let _ = writeln!(s, "table_size = {table_size}");
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

/// `farmlb run` inside the director namespace. Stopped (and its data plane removed) on
/// [`Daemon::stop`] or drop.
/// Everything else is [`Process`]'s.
pub struct Daemon(Process);

/// How long the daemon gets to attach.
const START_TIMEOUT: Duration = Duration::from_secs(15);

impl Daemon {
    /// Start `farmlb run --config <config_path>` in the rig's director namespace, logging to a
    /// file, and wait until its XDP program shows on the interface.
    pub fn start(rig: &Rig, config_path: &Path) -> Result<Daemon> {
        Self::start_with(rig, config_path, &[], &[])
    }

    /// [`Daemon::start`] with more arguments (`--log-format json`) and environment variables
    /// (`NOTIFY_SOCKET`, `JOURNAL_STREAM`); the log is [`Daemon::log_path_for`].
    pub fn start_with(
        rig: &Rig,
        config_path: &Path,
        args: &[&str],
        env: &[(&str, String)],
    ) -> Result<Daemon> {
        if xdp_attached(rig)? {
            bail!("an XDP program is already attached in {}", rig.ns_lb());
        }
        let log_path = Self::log_path_for(rig);
        let pins = crate::pins::pin_dir(rig.prefix(), "lb");
        let mut p = Process::spawn_env(
            "farmlb",
            &rig.ns_lb(),
            config_path,
            &log_path,
            &pins,
            args,
            env,
        )?;
        p.wait_attached(START_TIMEOUT, || xdp_attached(rig))?;
        // The program is attached; give the daemon a moment in case it fills maps afterwards.
        thread::sleep(Duration::from_millis(200));
        p.exited("right after attaching")?;
        Ok(Daemon(p))
    }

    /// The log file [`Daemon::start`] writes (truncated, same inode, on every start).
    pub fn log_path_for(rig: &Rig) -> PathBuf {
        std::env::temp_dir().join(format!("farmlb-{}.log", rig.prefix()))
    }

    /// Start farmlb (with `args`, e.g. `--replace`) on a rig whose data plane is still
    /// pinned and forwarding (after a kill, a SIGTERM, or for an upgrade): it adopts it;
    /// waits until it says it is attached. It logs to a file of its own.
    pub fn restart(rig: &Rig, config_path: &Path, args: &[&str]) -> Result<Daemon> {
        let log_path = std::env::temp_dir().join(format!("farmlb-{}.restart.log", rig.prefix()));
        let pins = crate::pins::pin_dir(rig.prefix(), "lb");
        let mut p = Process::spawn("farmlb", &rig.ns_lb(), config_path, &log_path, &pins, args)?;
        let log = log_path.clone();
        p.wait_attached(START_TIMEOUT, move || {
            Ok(fs::read_to_string(&log)?.contains("XDP program attached"))
        })?;
        Ok(Daemon(p))
    }

    /// Stop farmlb and remove its data plane (see [`Process::stop`]).
    pub fn stop(&mut self) -> Result<ExitStatus> {
        self.0.stop()?.context("daemon already stopped")
    }
}

impl Deref for Daemon {
    type Target = Process;
    fn deref(&self) -> &Process {
        &self.0
    }
}

impl DerefMut for Daemon {
    fn deref_mut(&mut self) -> &mut Process {
        &mut self.0
    }
}

/// A director rig with an identity server on every backend and farmlb running.
pub struct DirectorRig {
    pub rig: Rig,
    pub servers: Vec<IdentityServer>,
    pub daemon: Daemon,
}

impl DirectorRig {
    /// `backends` backends serving `port`, and farmlb running `config(&rig)`.
    pub fn up(
        prefix: &str,
        backends: usize,
        port: u16,
        config: impl FnOnce(&Rig) -> String,
    ) -> Result<DirectorRig> {
        let rig = Rig::up(RigOpts::new(prefix, backends))?;
        let servers = start_on_backends(&rig, port)?;
        let path = write_config(&rig, &config(&rig))?;
        let daemon = Daemon::start(&rig, &path)?;
        Ok(DirectorRig {
            rig,
            servers,
            daemon,
        })
    }

    /// Stop farmlb (it must exit cleanly), run `check` on what it left behind, then stop the
    /// servers and tear the rig down.
    pub fn finish(mut self, check: impl FnOnce(&Rig) -> Result<()>) -> Result<()> {
        self.daemon.stop()?;
        check(&self.rig)?;
        self.servers.clear();
        self.rig.down()
    }

    /// [`Names::connect`](crate::rig::Names::connect), printing the distribution; every connection must succeed.
    pub fn connect_to_ok(
        &self,
        vip: IpAddr,
        port: u16,
        n: usize,
        what: &str,
    ) -> Result<BTreeMap<String, usize>> {
        let (counts, failures) = self.rig.connect(vip, port, n);
        println!(
            "{what}: {n} connections\n{}  failed {}",
            format_distribution(&counts),
            failures.len()
        );
        ensure!(
            failures.is_empty(),
            "{what}: {} of {n} connections failed, first: {}\nfarmlb log:\n{}",
            failures.len(),
            failures[0],
            self.daemon.log()
        );
        Ok(counts)
    }
}
