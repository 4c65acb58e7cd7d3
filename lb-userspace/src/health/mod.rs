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
//! One file per probe kind: `tcp.rs`, `http.rs`, `udp.rs`, `exec.rs`.
//!
//! Of the crate this module uses only `config`.

mod exec;
mod http;
mod tcp;
mod tracker;
mod udp;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::config::{CheckCfg, Config, NodeCheckCfg, Probe};

pub use exec::exec_outcome;
pub use http::parse_status_line;
pub use tracker::Tracker;

/// Health verdict of a backend (or of a farm node's own check). Unchecked backends are
/// always `Up`.
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
    /// The probe could not run because of a fault here, not at the backend (out of file
    /// descriptors or buffers, no route from this host, ...): it counts neither way, so a
    /// fault of the control plane never takes a backend out.
    Error { reason: String },
}

impl Outcome {
    pub fn is_up(&self) -> bool {
        matches!(self, Outcome::Up { .. })
    }

    /// The label of the result in metrics and status: `up`, `down` or `error`.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Up { .. } => "up",
            Outcome::Down { .. } => "down",
            Outcome::Error { .. } => "error",
        }
    }

    fn down(reason: impl Into<String>) -> Self {
        Outcome::Down {
            reason: reason.into(),
        }
    }

    /// A failed I/O step: a local fault ([`is_local`]) is a check error, anything else says
    /// the backend is down.
    fn io(what: impl std::fmt::Display, e: &std::io::Error) -> Self {
        let reason = format!("{what}: {e}");
        if is_local(e) {
            Outcome::Error { reason }
        } else {
            Outcome::Down { reason }
        }
    }
}

/// Errors that come from this host rather than from the backend.
pub fn is_local(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::EMFILE
                | libc::ENFILE
                | libc::ENOBUFS
                | libc::ENOMEM
                | libc::EAGAIN
                | libc::EADDRNOTAVAIL
                | libc::ENETUNREACH
                | libc::ENETDOWN
                | libc::EPERM
                | libc::EACCES
        )
    )
}

/// A backend to probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub service: String,
    pub vip: IpAddr,
    pub addr: IpAddr,
    pub check: CheckCfg,
}

impl From<NodeCheckCfg> for Target {
    /// A farm node's own check: probes its service's address.
    fn from(n: NodeCheckCfg) -> Self {
        Target {
            service: n.service,
            vip: n.vip,
            addr: n.addr,
            check: n.check,
        }
    }
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
            Probe::Tcp => tcp::probe(sa).await,
            Probe::Http { path, host, status } => {
                http::probe(sa, path, host.as_deref(), *status).await
            }
            Probe::Udp { payload, expect } => {
                udp::probe(sa, payload, expect.as_deref(), c.timeout).await
            }
            Probe::Exec { command, dynamic } => exec::probe(t, command, *dynamic).await,
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

/// Probe `t` every `check.interval` (after its [`spread_offset`]) and send each result, tagged
/// with `generation`, to `tx`; returns when the receiver is gone. The [`Supervisor`] runs one
/// per checked backend; a farm node runs one for its own service (`farm/check.rs`).
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
        if let Outcome::Error { reason } = &r.outcome {
            // Neither a success nor a failure: the backend keeps its state.
            tracing::warn!(
                service = %r.service, backend = %r.addr,
                "check error (counted neither way, the backend keeps its state): {reason}"
            );
            return None;
        }
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
            Outcome::Down { .. } | Outcome::Error { .. } => None,
        };
        if flipped.is_none() && weight.is_none() {
            return None;
        }
        Some(Verdict {
            health: c.tracker.health(),
            dynamic_weight: weight,
            flipped: flipped.is_some(),
        })
    }

    /// The verdict of every checked backend: `(service, address, health)`.
    pub fn verdicts(&self) -> Vec<(String, IpAddr, Health)> {
        self.checks
            .iter()
            .map(|((s, a), c)| (s.clone(), *a, c.tracker.health()))
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
    fn local_faults_are_check_errors_and_count_neither_way() {
        let emfile = std::io::Error::from_raw_os_error(libc::EMFILE);
        let refused = std::io::Error::from_raw_os_error(libc::ECONNREFUSED);
        assert_eq!(Outcome::io("connect", &emfile).label(), "error");
        assert_eq!(Outcome::io("connect", &refused).label(), "down");
        assert!(!is_local(&std::io::Error::from_raw_os_error(
            libc::EHOSTUNREACH
        )));

        let cfg = Config::from_toml_str(
            "interface = \"eth0\"\n[[service]]\nname = \"web\"\nvip = \"10.0.0.1\"\nport = 80\n\
             check = { type = \"tcp\", rise = 1, fall = 1 }\n\
             [[service.backend]]\naddress = \"10.0.0.11\"\n",
        )
        .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (tx, _rx) = mpsc::channel(4);
            let mut sup = Supervisor::new(tx);
            sup.sync(&cfg, |_, _| Some(Health::Up));
            let addr: IpAddr = "10.0.0.11".parse().unwrap();
            let generation = sup.checks[&("web".to_string(), addr)].generation;
            let result = |outcome| ProbeResult {
                service: "web".into(),
                addr,
                generation,
                outcome,
                latency: Duration::ZERO,
            };
            for _ in 0..10 {
                let err = Outcome::io("connect", &std::io::Error::from_raw_os_error(libc::EMFILE));
                assert!(
                    sup.record(&result(err)).is_none(),
                    "an error changes nothing"
                );
            }
            assert_eq!(sup.verdicts()[0].2, Health::Up);
            let down = sup
                .record(&result(Outcome::down("refused")))
                .expect("fall = 1");
            assert_eq!(down.health, Health::Down);
            sup.shutdown();
        });
    }
}
