//! Health checks: one tokio task per checked backend, so a slow or hanging backend only ever
//! delays its own probes. Each task waits a per-backend offset (a hash of the service and the
//! address, modulo the interval) before its first probe, so the checks of many backends are
//! spread over the interval instead of firing together; afterwards it probes every `interval`,
//! each probe bounded by `timeout`, and sends every result to the daemon's owner task.
//!
//! The owner feeds the results to [`Supervisor::record`], which keeps the rise/fall counters
//! ([`Tracker`]) and says when the director must change a backend's health or dynamic weight.
//! Probes run in the daemon's own network namespace, against the backend's real address and
//! the check's port (the VIP sits on the backends' `lo` in direct routing and is not probed).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::config::{CheckCfg, Config, ExecCommand, Probe};
/// Health verdict of a backend. Unchecked backends are always `Up`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Health {
    Up,
    Down,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Up => "up",
            Health::Down => "down",
        }
    }
}

/// What one probe found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Healthy; `weight` is set by a `dynamic` exec check that exited 2..=255.
    Up { weight: Option<u32> },
    /// Unhealthy, with a one-line reason.
    Down { reason: String },
}

impl Outcome {
    pub fn is_up(&self) -> bool {
        matches!(self, Outcome::Up { .. })
    }

    fn down(reason: impl Into<String>) -> Self {
        Outcome::Down {
            reason: reason.into(),
        }
    }
}

/// A backend to probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub service: String,
    pub vip: IpAddr,
    pub addr: IpAddr,
    pub check: CheckCfg,
}

/// A probe result on its way to the owner task.
#[derive(Clone, Debug)]
pub struct ProbeResult {
    pub service: String,
    pub addr: IpAddr,
    /// Identifies the task that sent it: results of a replaced task are ignored.
    pub generation: u64,
    pub outcome: Outcome,
    pub latency: Duration,
}

/// The latest probe of a backend, for `farmlb status`.
#[derive(Clone, Debug)]
pub struct LastProbe {
    pub outcome: Outcome,
    pub latency: Duration,
    pub at: SystemTime,
}

// --- rise / fall ------------------------------------------------------------------------

/// HAProxy-style hysteresis: an up backend goes down after `fall` consecutive failures, a down
/// one comes up after `rise` consecutive successes. A backend starts up; until it has passed
/// one check ("unproven") a single failure takes it down, so a backend that is dead when the
/// daemon starts (or when it is added) never receives flows for `fall` intervals.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tracker {
    rise: u32,
    fall: u32,
    up: bool,
    proven: bool,
    /// Consecutive results contradicting the current state.
    streak: u32,
}

impl Tracker {
    pub fn new(rise: u32, fall: u32, up: bool, proven: bool) -> Self {
        Self {
            rise: rise.max(1),
            fall: fall.max(1),
            up,
            proven: proven && up,
            streak: 0,
        }
    }

    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Count one result; returns the new state when it flips.
    pub fn record(&mut self, ok: bool) -> Option<bool> {
        if ok == self.up {
            self.streak = 0;
            self.proven |= ok;
            return None;
        }
        self.streak += 1;
        let need = match (self.up, self.proven) {
            (true, false) => 1,
            (true, true) => self.fall,
            (false, _) => self.rise,
        };
        if self.streak < need {
            return None;
        }
        self.up = ok;
        self.proven |= ok;
        self.streak = 0;
        Some(ok)
    }
}

// --- probes -------------------------------------------------------------------------------

/// Offset of a backend's first probe within the interval: stable for a backend, spread
/// uniformly over backends.
pub fn spread_offset(service: &str, addr: IpAddr, interval: Duration) -> Duration {
    let ms = interval.as_millis().max(1) as u64;
    let key = format!("{service}/{addr}");
    let h = lb_common::hash_bytes(0x6865_616c, key.as_bytes()) as u64; // "heal"
    Duration::from_millis(h % ms)
}

/// Run one probe of `t`, bounded by its timeout.
pub async fn probe(t: &Target) -> Outcome {
    let c = &t.check;
    let sa = SocketAddr::new(t.addr, c.port);
    let fut = async {
        match &c.probe {
            Probe::Tcp => tcp(sa).await,
            Probe::Http { path, host, status } => http(sa, path, host.as_deref(), *status).await,
            Probe::Udp { payload, expect } => udp(sa, payload, expect.as_deref(), c.timeout).await,
            Probe::Exec { command, dynamic } => exec(t, command, *dynamic).await,
        }
    };
    match tokio::time::timeout(c.timeout, fut).await {
        Ok(o) => o,
        Err(_) => Outcome::down(format!(
            "timed out after {}",
            crate::config::format_duration(c.timeout)
        )),
    }
}

async fn tcp(sa: SocketAddr) -> Outcome {
    match TcpStream::connect(sa).await {
        Ok(_) => Outcome::Up { weight: None },
        Err(e) => Outcome::down(format!("connect {sa}: {e}")),
    }
}

/// `HTTP/1.0 GET`; only the status line is read.
async fn http(sa: SocketAddr, path: &str, host: Option<&str>, status: (u16, u16)) -> Outcome {
    let mut s = match TcpStream::connect(sa).await {
        Ok(s) => s,
        Err(e) => return Outcome::down(format!("connect {sa}: {e}")),
    };
    let host = match (host, sa.ip()) {
        (Some(h), _) => h.to_string(),
        (None, IpAddr::V4(a)) => a.to_string(),
        (None, IpAddr::V6(a)) => format!("[{a}]"),
    };
    let req = format!(
        "GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: farmlb-check\r\nConnection: close\r\n\r\n"
    );
    if let Err(e) = s.write_all(req.as_bytes()).await {
        return Outcome::down(format!("sending request: {e}"));
    }
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.contains(&b'\n') && buf.len() < 1024 {
        match s.read(&mut chunk).await {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Outcome::down(format!("reading response: {e}")),
        }
    }
    match parse_status_line(&buf) {
        None => Outcome::down("no HTTP status line in the response"),
        Some(code) if (status.0..=status.1).contains(&code) => Outcome::Up { weight: None },
        Some(code) => Outcome::down(format!(
            "HTTP status {code}, expected {}",
            range_str(status)
        )),
    }
}

fn range_str((lo, hi): (u16, u16)) -> String {
    if lo == hi {
        lo.to_string()
    } else {
        format!("{lo}-{hi}")
    }
}

/// The status code of `HTTP/1.x NNN ...`.
pub fn parse_status_line(buf: &[u8]) -> Option<u16> {
    let line = buf.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/") {
        return None;
    }
    let code = parts.next()?;
    (code.len() == 3).then_some(())?;
    code.parse().ok()
}

/// Send `payload`. Without `expect`: down only if the port answers ICMP unreachable within
/// a short grace period. With `expect`: a reply containing it must arrive before the timeout.
async fn udp(sa: SocketAddr, payload: &str, expect: Option<&str>, timeout: Duration) -> Outcome {
    let bind: SocketAddr = match sa {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = match UdpSocket::bind(bind).await {
        Ok(s) => s,
        Err(e) => return Outcome::down(format!("udp socket: {e}")),
    };
    if let Err(e) = sock.connect(sa).await {
        return Outcome::down(format!("connect {sa}: {e}"));
    }
    if let Err(e) = sock.send(payload.as_bytes()).await {
        return Outcome::down(format!("send to {sa}: {e}"));
    }
    let mut buf = vec![0u8; 2048];
    match expect {
        None => {
            let grace = (timeout / 2).min(Duration::from_millis(250));
            match tokio::time::timeout(grace, sock.recv(&mut buf)).await {
                Ok(Err(e)) => Outcome::down(format!("{sa}: {e}")),
                _ => Outcome::Up { weight: None },
            }
        }
        Some(want) => match sock.recv(&mut buf).await {
            Ok(n) if contains(&buf[..n], want.as_bytes()) => Outcome::Up { weight: None },
            Ok(n) => Outcome::down(format!(
                "reply {:?} does not contain {want:?}",
                String::from_utf8_lossy(&buf[..n.min(64)])
            )),
            Err(e) => Outcome::down(format!("{sa}: {e}")),
        },
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || hay.windows(needle.len()).any(|w| w == needle)
}

/// Run the command with the backend in its environment: `FARMLB_SERVICE`, `FARMLB_VIP`,
/// `FARMLB_BACKEND` (address) and `FARMLB_PORT`. Killed when the timeout expires.
async fn exec(t: &Target, command: &ExecCommand, dynamic: bool) -> Outcome {
    let mut cmd = match command {
        ExecCommand::Shell(s) => {
            let mut c = tokio::process::Command::new("/bin/sh");
            c.arg("-c").arg(s);
            c
        }
        ExecCommand::Argv(a) => {
            let mut c = tokio::process::Command::new(&a[0]);
            c.args(&a[1..]);
            c
        }
    };
    cmd.env("FARMLB_SERVICE", &t.service)
        .env("FARMLB_VIP", t.vip.to_string())
        .env("FARMLB_BACKEND", t.addr.to_string())
        .env("FARMLB_PORT", t.check.port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return Outcome::down(format!("running the check command: {e}")),
    };
    // When the probe's timeout drops this future, kill the command and everything it started.
    let mut guard = KillGroup(child.id().map(|p| p as libc::pid_t));
    let res = child.wait_with_output().await;
    guard.0 = None;
    match res {
        Err(e) => Outcome::down(format!("running the check command: {e}")),
        Ok(out) => {
            let o = exec_outcome(out.status.code(), dynamic);
            match o {
                Outcome::Down { reason } => {
                    let err = String::from_utf8_lossy(&out.stderr);
                    let first = err.lines().next().unwrap_or("").trim();
                    if first.is_empty() {
                        Outcome::Down { reason }
                    } else {
                        let first: String = first.chars().take(160).collect();
                        Outcome::down(format!("{reason}: {first}"))
                    }
                }
                up => up,
            }
        }
    }
}

/// Kills a process group when dropped while armed.
struct KillGroup(Option<libc::pid_t>);

impl Drop for KillGroup {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            // SAFETY: plain syscall; the group was created for our own child (process_group(0)).
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
    }
}

/// Map an exit code (`None` = killed by a signal). keepalived `misc_dynamic`: 0 = up with the
/// weight unchanged, 1 = down, 2..=255 = up with weight `code - 2`. Otherwise 0 = up, else down.
pub fn exec_outcome(code: Option<i32>, dynamic: bool) -> Outcome {
    match code {
        None => Outcome::down("check command killed by a signal"),
        Some(0) => Outcome::Up { weight: None },
        Some(c) if dynamic && (2..=255).contains(&c) => Outcome::Up {
            weight: Some(c as u32 - 2),
        },
        Some(c) => Outcome::down(format!("check command exited with {c}")),
    }
}

/// Probe `t` every `check.interval` (after its [`spread_offset`]) and send each result, tagged
/// with `generation`, to `tx`; returns when the receiver is gone. The [`Supervisor`] runs one
/// per checked backend; a farm node runs one for its own service (`farm.rs`).
pub async fn run_task(t: Target, generation: u64, tx: mpsc::Sender<ProbeResult>) {
    tokio::time::sleep(spread_offset(&t.service, t.addr, t.check.interval)).await;
    let mut tick = tokio::time::interval(t.check.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let start = Instant::now();
        let outcome = probe(&t).await;
        let r = ProbeResult {
            service: t.service.clone(),
            addr: t.addr,
            generation,
            outcome,
            latency: start.elapsed(),
        };
        if tx.send(r).await.is_err() {
            return;
        }
    }
}

// --- supervisor -------------------------------------------------------------------------

struct Checked {
    target: Target,
    generation: u64,
    task: JoinHandle<()>,
    tracker: Tracker,
    last: Option<LastProbe>,
}

/// What the director must apply after a probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub health: Health,
    /// A dynamic exec check's weight, when the probe reported one.
    pub dynamic_weight: Option<u32>,
    /// The health flipped with this probe.
    pub flipped: bool,
}

/// Owns the probe tasks; lives in the daemon's owner task.
pub struct Supervisor {
    tx: mpsc::Sender<ProbeResult>,
    checks: HashMap<(String, IpAddr), Checked>,
    next_generation: u64,
}

impl Supervisor {
    pub fn new(tx: mpsc::Sender<ProbeResult>) -> Self {
        Self {
            tx,
            checks: HashMap::new(),
            next_generation: 1,
        }
    }

    /// Start, restart or stop tasks so that exactly the checked backends of `cfg` are probed.
    /// A restarted check (its parameters changed) keeps the backend's current health.
    /// `current` gives a backend's current health. Must run inside a tokio runtime.
    pub fn sync(&mut self, cfg: &Config, current: impl Fn(&str, IpAddr) -> Option<Health>) {
        let mut wanted: HashMap<(String, IpAddr), Target> = HashMap::new();
        for s in &cfg.services {
            for b in &s.backends {
                if let Some(check) = &b.check {
                    wanted.insert(
                        (s.name.clone(), b.address),
                        Target {
                            service: s.name.clone(),
                            vip: s.vip,
                            addr: b.address,
                            check: check.clone(),
                        },
                    );
                }
            }
        }
        let mut previously_checked = std::collections::HashSet::new();
        self.checks.retain(|k, c| {
            let keep = wanted.get(k) == Some(&c.target);
            if !keep {
                c.task.abort();
                previously_checked.insert(k.clone());
            }
            keep
        });
        for (k, target) in wanted {
            if self.checks.contains_key(&k) {
                continue;
            }
            let up = current(&k.0, k.1) != Some(Health::Down);
            // A backend that is up and was already being checked has proven itself; a new
            // one has not (one failure takes it down).
            let proven = up && previously_checked.contains(&k);
            let generation = self.next_generation;
            self.next_generation += 1;
            let task = tokio::spawn(run_task(target.clone(), generation, self.tx.clone()));
            let tracker = Tracker::new(target.check.rise, target.check.fall, up, proven);
            self.checks.insert(
                k,
                Checked {
                    target,
                    generation,
                    task,
                    tracker,
                    last: None,
                },
            );
        }
    }

    /// Whether `r` comes from the current task of its backend (not from a replaced one).
    pub fn is_current(&self, r: &ProbeResult) -> bool {
        self.checks
            .get(&(r.service.clone(), r.addr))
            .is_some_and(|c| c.generation == r.generation)
    }

    /// Count a probe result; `None` when it is stale or changes nothing the director uses.
    pub fn record(&mut self, r: &ProbeResult) -> Option<Verdict> {
        let c = self.checks.get_mut(&(r.service.clone(), r.addr))?;
        if c.generation != r.generation {
            return None;
        }
        c.last = Some(LastProbe {
            outcome: r.outcome.clone(),
            latency: r.latency,
            at: SystemTime::now(),
        });
        let flipped = c.tracker.record(r.outcome.is_up());
        match (flipped, &r.outcome) {
            (Some(true), _) => tracing::info!(
                service = %r.service, backend = %r.addr,
                "backend is UP ({} consecutive successful checks)",
                c.target.check.rise
            ),
            (Some(false), Outcome::Down { reason }) => tracing::warn!(
                service = %r.service, backend = %r.addr,
                "backend is DOWN: {reason}"
            ),
            _ => {}
        }
        let weight = match &r.outcome {
            Outcome::Up { weight } => *weight,
            Outcome::Down { .. } => None,
        };
        if flipped.is_none() && weight.is_none() {
            return None;
        }
        Some(Verdict {
            health: if c.tracker.is_up() {
                Health::Up
            } else {
                Health::Down
            },
            dynamic_weight: weight,
            flipped: flipped.is_some(),
        })
    }

    /// The verdict of every checked backend: `(service, address, health)`.
    pub fn verdicts(&self) -> Vec<(String, IpAddr, Health)> {
        self.checks
            .iter()
            .map(|((s, a), c)| {
                let h = if c.tracker.is_up() {
                    Health::Up
                } else {
                    Health::Down
                };
                (s.clone(), *a, h)
            })
            .collect()
    }

    pub fn last(&self, service: &str, addr: IpAddr) -> Option<&LastProbe> {
        self.checks
            .get(&(service.to_string(), addr))
            .and_then(|c| c.last.as_ref())
    }

    /// Number of running probe tasks.
    pub fn len(&self) -> usize {
        self.checks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.checks.is_empty()
    }

    pub fn shutdown(&mut self) {
        for (_, c) in self.checks.drain() {
            c.task.abort();
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fall_then_rise() {
        let mut t = Tracker::new(2, 3, true, true);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(true), None, "a success resets the failure streak");
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), Some(false), "third consecutive failure");
        assert!(!t.is_up());
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(true), None);
        assert_eq!(t.record(false), None, "a failure resets the success streak");
        assert_eq!(t.record(true), None);
        assert_eq!(t.record(true), Some(true), "second consecutive success");
        assert!(t.is_up());
        // Once proven, a single failure no longer takes it down.
        assert_eq!(t.record(false), None);
    }

    #[test]
    fn unproven_backend_goes_down_on_first_failure() {
        let mut t = Tracker::new(2, 3, true, false);
        assert_eq!(t.record(false), Some(false));
        let mut t = Tracker::new(2, 3, true, false);
        assert_eq!(t.record(true), None);
        assert_eq!(t.record(false), None, "proven by one success");
        // Starting down: needs `rise` successes.
        let mut t = Tracker::new(3, 1, false, false);
        assert_eq!(t.record(true), None);
        assert_eq!(t.record(true), None);
        assert_eq!(t.record(true), Some(true));
        assert_eq!(t.record(false), Some(false), "fall = 1");
    }

    #[test]
    fn exec_exit_codes() {
        assert_eq!(exec_outcome(Some(0), false), Outcome::Up { weight: None });
        assert!(!exec_outcome(Some(1), false).is_up());
        assert!(
            !exec_outcome(Some(2), false).is_up(),
            "not dynamic: 2 = down"
        );
        assert!(!exec_outcome(None, true).is_up());
        assert_eq!(exec_outcome(Some(0), true), Outcome::Up { weight: None });
        assert!(!exec_outcome(Some(1), true).is_up());
        assert_eq!(exec_outcome(Some(2), true), Outcome::Up { weight: Some(0) });
        assert_eq!(exec_outcome(Some(7), true), Outcome::Up { weight: Some(5) });
        assert_eq!(
            exec_outcome(Some(255), true),
            Outcome::Up { weight: Some(253) }
        );
        assert!(!exec_outcome(Some(-1), true).is_up());
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status_line(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(
            parse_status_line(b"HTTP/1.0 503 Unavailable\r\nX: y"),
            Some(503)
        );
        assert_eq!(parse_status_line(b"HTTP/1.1 404"), Some(404));
        assert_eq!(parse_status_line(b"b1\n"), None);
        assert_eq!(parse_status_line(b"HTTP/1.1 20 OK\r\n"), None);
        assert_eq!(parse_status_line(b""), None);
    }

    #[test]
    fn offsets_are_stable_and_spread() {
        let iv = Duration::from_secs(2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(spread_offset("web", a, iv), spread_offset("web", a, iv));
        let mut buckets = [0u32; 4];
        for i in 0..400u32 {
            let ip = IpAddr::from([10, 0, (i >> 8) as u8, i as u8]);
            let off = spread_offset("web", ip, iv);
            assert!(off < iv);
            buckets[(off.as_millis() / 500) as usize] += 1;
        }
        for b in buckets {
            assert!((60..140).contains(&b), "{buckets:?}");
        }
    }

    fn target(probe: Probe, timeout_ms: u64) -> Target {
        Target {
            service: "web".into(),
            vip: "10.99.100.1".parse().unwrap(),
            addr: "10.99.0.11".parse().unwrap(),
            check: CheckCfg {
                probe,
                interval: Duration::from_secs(1),
                timeout: Duration::from_millis(timeout_ms),
                rise: 2,
                fall: 3,
                port: 8080,
            },
        }
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn exec_probe_sees_the_backend_and_maps_codes() {
        let sh = |s: &str, dynamic| Probe::Exec {
            command: ExecCommand::Shell(s.into()),
            dynamic,
        };
        let t = target(
            sh(
                "test \"$FARMLB_BACKEND:$FARMLB_PORT:$FARMLB_SERVICE:$FARMLB_VIP\" = \
                 10.99.0.11:8080:web:10.99.100.1",
                false,
            ),
            2000,
        );
        assert_eq!(block_on(probe(&t)), Outcome::Up { weight: None });
        let t = target(sh("exit 6", true), 2000);
        assert_eq!(block_on(probe(&t)), Outcome::Up { weight: Some(4) });
        let t = target(sh("echo broken >&2; exit 1", true), 2000);
        match block_on(probe(&t)) {
            Outcome::Down { reason } => {
                assert!(reason.ends_with("exited with 1: broken"), "{reason}")
            }
            o => panic!("{o:?}"),
        }
        let t = target(
            Probe::Exec {
                command: ExecCommand::Argv(vec!["/bin/true".into()]),
                dynamic: false,
            },
            2000,
        );
        assert!(block_on(probe(&t)).is_up());
    }

    #[test]
    fn a_hanging_backend_does_not_delay_the_others() {
        let cfg = Config::from_toml_str(
            "interface = \"eth0\"\n[[service]]\nname = \"web\"\nvip = \"10.0.0.1\"\nport = 80\n\
             [[service.backend]]\naddress = \"10.0.0.11\"\n\
             check = { type = \"exec\", command = \"sleep 10\", interval = \"1s\", timeout = \"1s\" }\n\
             [[service.backend]]\naddress = \"10.0.0.12\"\n\
             check = { type = \"exec\", command = \"exit 0\", interval = \"100ms\" }\n",
        )
        .unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let results = rt.block_on(async {
            let (tx, mut rx) = mpsc::channel(64);
            let mut sup = Supervisor::new(tx);
            sup.sync(&cfg, |_, _| None);
            assert_eq!(sup.len(), 2);
            let mut got = Vec::new();
            let deadline = tokio::time::Instant::now() + Duration::from_millis(900);
            while let Ok(Some(r)) = tokio::time::timeout_at(deadline, rx.recv()).await {
                got.push(r);
            }
            sup.shutdown();
            got
        });
        let fast = results
            .iter()
            .filter(|r| r.addr == "10.0.0.12".parse::<IpAddr>().unwrap())
            .count();
        let slow = results.len() - fast;
        // 100 ms interval over 0.9 s, first probe within the first 100 ms: at least 7 results,
        // while the other backend's probe hangs for its whole 1 s timeout.
        assert!(fast >= 7, "fast backend probed {fast} times: {results:?}");
        assert_eq!(
            slow, 0,
            "the hanging probe cannot have finished: {results:?}"
        );
        assert!(results.iter().all(|r| r.outcome.is_up()));
    }

    #[test]
    fn slow_probe_times_out_and_is_killed() {
        let t = target(
            Probe::Exec {
                command: ExecCommand::Shell("sleep 5".into()),
                dynamic: false,
            },
            150,
        );
        let start = Instant::now();
        let o = block_on(probe(&t));
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(o, Outcome::down("timed out after 150ms"));
        // Background work the command started dies with it.
        let flag = std::env::temp_dir().join(format!("farmlb-health-{}", std::process::id()));
        let _ = std::fs::remove_file(&flag);
        let t = target(
            Probe::Exec {
                command: ExecCommand::Shell(format!(
                    "(sleep 0.4; touch {}) & wait",
                    flag.display()
                )),
                dynamic: false,
            },
            100,
        );
        assert!(!block_on(probe(&t)).is_up());
        std::thread::sleep(Duration::from_millis(800));
        assert!(!flag.exists(), "the check's child outlived the timeout");
    }
}
