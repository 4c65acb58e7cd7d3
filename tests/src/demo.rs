//! The demo's story, shared by `cargo xtask demo [farm]` and its end-to-end test: balance
//! connections over three backends (or farm nodes), then kill one under a steady stream of
//! new connections, time when farmlb took it out, count connections per backend before and
//! after and the failures in between, and draw the timeline as SVG.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use farmlb::farm::FarmStatus;

use crate::{
    client::{Attempt, Traffic},
    cluster::Farm,
    connect_many, ctl,
    daemon::api_socket,
    farm_rig::{status_path, FarmService, FARM_VIP},
    farmlb_config, format_distribution, start_on_backends, tally,
    wait::wait_until,
    write_config, Daemon, Rig, RigOpts, Service, VIP_V4,
};

const PORT: u16 = 80;
/// The director demo's check: a dead backend is out after about `fall` × `interval`.
const CHECK: &str =
    "check = { type = \"tcp\", interval = \"250ms\", timeout = \"200ms\", rise = 2, fall = 3 }";
/// How long a new connection may take in the failure phase (a dead farm node's share hangs
/// until then).
const ATTEMPT: Duration = Duration::from_millis(300);
/// Connection loops of the failure phase (fewer than the client's 33 source addresses).
const LOOPS: usize = 16;
/// Give up waiting for farmlb to take the victim out after this long.
const REMOVAL_LIMIT: Duration = Duration::from_secs(10);

/// What to run.
#[derive(Clone, Debug)]
pub struct DemoOpts {
    /// Namespace prefix of the rig.
    pub prefix: String,
    /// Connections of the balance phase.
    pub connections: usize,
    /// New connections per second in the failure phase.
    pub rate: u32,
    /// Traffic before the kill, and after farmlb took the victim out.
    pub before: Duration,
    pub after: Duration,
    /// Where the SVG timeline is written.
    pub svg: PathBuf,
}

/// What a demo run saw.
pub struct Outcome {
    /// Connections per backend of the balance phase, and its failures.
    pub balance: BTreeMap<String, usize>,
    pub balance_failures: Vec<String>,
    pub timeline: Timeline,
}

/// The failure phase: every connection attempt, when the victim was killed and when farmlb
/// took it out (times since the traffic started).
pub struct Timeline {
    /// What ran, for the report's and the SVG's title.
    pub title: String,
    /// Every backend (or node) identity, in order.
    pub ids: Vec<String>,
    pub victim: String,
    /// How the victim died, and who took it out (`the health check marked it down`).
    pub kill: String,
    pub removal: String,
    pub killed: Duration,
    /// `None`: not taken out within the limit.
    pub removed: Option<Duration>,
    pub attempts: Vec<Attempt>,
}

/// Connections per identity and failures among `attempts`.
pub type Counts = (BTreeMap<String, usize>, usize);

impl Timeline {
    /// When the traffic ended.
    pub fn end(&self) -> Duration {
        self.attempts.last().map_or(Duration::ZERO, |a| a.at)
    }

    /// Attempts that ended in `[from, to)`, by identity, and how many failed.
    pub fn between(&self, from: Duration, to: Duration) -> Counts {
        let mut counts: BTreeMap<String, usize> =
            self.ids.iter().map(|id| (id.clone(), 0)).collect();
        let mut failed = 0;
        for a in self.attempts.iter().filter(|a| a.at >= from && a.at < to) {
            match &a.result {
                Ok(id) => *counts.entry(id.clone()).or_insert(0) += 1,
                Err(_) => failed += 1,
            }
        }
        (counts, failed)
    }

    /// Before the kill; between the kill and the removal; after the removal.
    pub fn phases(&self) -> [Counts; 3] {
        let removed = self.removed.unwrap_or(self.end());
        [
            self.between(Duration::ZERO, self.killed),
            self.between(self.killed, removed),
            self.between(removed, self.end() + Duration::from_millis(1)),
        ]
    }

    /// When the last failed attempt ended.
    pub fn last_failure(&self) -> Option<Duration> {
        self.attempts
            .iter()
            .rev()
            .find(|a| a.result.is_err())
            .map(|a| a.at)
    }

    /// The redistribution as text: timing, then connections per backend per phase.
    pub fn report(&self) -> String {
        let s = |d: Duration| format!("{:.2} s", d.as_secs_f64());
        let mut out = format!("{}\n", self.title);
        let _ = writeln!(out, "  {} at {}", self.kill, s(self.killed));
        match self.removed {
            Some(r) => {
                let _ = writeln!(
                    out,
                    "  {} {} later (at {})",
                    self.removal,
                    s(r - self.killed),
                    s(r)
                );
            }
            None => {
                let _ = writeln!(out, "  NOT taken out within {REMOVAL_LIMIT:?}");
            }
        }
        if let Some(f) = self.last_failure() {
            let _ = writeln!(out, "  last failed connection ended at {}", s(f));
        }
        let phases = self.phases();
        let _ = writeln!(
            out,
            "  {:<8} {:>12} {:>14} {:>14}",
            "", "before kill", "kill→removal", "after removal"
        );
        for id in &self.ids {
            let n = |p: &Counts| p.0.get(id).copied().unwrap_or(0);
            let _ = writeln!(
                out,
                "  {id:<8} {:>12} {:>14} {:>14}",
                n(&phases[0]),
                n(&phases[1]),
                n(&phases[2])
            );
        }
        let _ = writeln!(
            out,
            "  {:<8} {:>12} {:>14} {:>14}",
            "failed", phases[0].1, phases[1].1, phases[2].1
        );
        out
    }

    /// Connections per second of each identity (and failures) over time, as an SVG.
    pub fn svg(&self) -> String {
        crate::svg::timeline(self)
    }
}

/// New connections at `rate` per second from `sources` to `dst` in `ns`: `before`, then
/// `kill()`, then until `removed()` holds (polled), then `after`. The connections come from
/// [`LOOPS`] paced loops, as from many clients: the attempts a dead node swallows wait out
/// their timeout without holding up the rest.
fn kill_under_traffic(
    ns: &str,
    sources: Vec<IpAddr>,
    dst: SocketAddr,
    o: &DemoOpts,
    kill: impl FnOnce() -> Result<()>,
    removed: impl FnMut() -> Result<bool>,
) -> Result<(Vec<Attempt>, Duration, Option<Duration>)> {
    let gap = Duration::from_secs(1) * LOOPS as u32 / o.rate.max(1);
    let start = Instant::now();
    let loops = (0..LOOPS)
        .map(|k| {
            let mine = sources.iter().skip(k).step_by(LOOPS).copied().collect();
            Traffic::paced(ns, mine, dst, ATTEMPT, gap, start)
        })
        .collect::<Result<Vec<_>>>()?;
    thread::sleep(o.before);
    let killed = start.elapsed();
    kill()?;
    let out = wait_until(REMOVAL_LIMIT, "the victim to be taken out", removed).ok();
    let removed = out.map(|_| start.elapsed());
    thread::sleep(o.after);
    let mut attempts = Vec::new();
    for l in loops {
        attempts.extend(l.stop()?);
    }
    attempts.sort_by_key(|a| a.at);
    Ok((attempts, killed, removed))
}

/// The director demo: farmlb in front of three backends; backend b2's server is stopped
/// mid-run and its health check takes it out.
pub fn director(o: &DemoOpts) -> Result<Outcome> {
    let mut rig = Rig::up(RigOpts::new(&o.prefix, 3))?;
    let mut servers = start_on_backends(&rig, PORT)?;
    let backends = (0..rig.backend_count()).map(|i| IpAddr::V4(rig.backend_v4(i)));
    let web = Service {
        check: Some(CHECK.into()),
        ..Service::tcp("web", IpAddr::V4(VIP_V4), PORT)
    }
    .backends(backends);
    let config = farmlb_config(&rig, &[web]);
    let path = write_config(&rig, &config)?;
    println!("config ({}):\n{config}", path.display());
    let mut daemon = Daemon::start(&rig, &path)?;
    let link = rig.exec(&rig.ns_lb(), &["ip", "link", "show", rig.lb_iface()])?;
    let mode = if link.contains("xdpgeneric") {
        "generic"
    } else {
        "native"
    };
    let sock = api_socket(&rig);
    println!(
        "farmlb attached to {} in {} ({mode} XDP; log: {}; watch it live with \
         `farmlb --socket {} top`)",
        rig.lb_iface(),
        rig.ns_lb(),
        daemon.log_path().display(),
        sock.display()
    );
    let victim = rig.backend_v4(1).to_string();
    let health = |addr: &str| -> Result<String> {
        let (_, v) = ctl::api(&sock, "GET", "/v1/status", None)?;
        let b = ctl::find_backend(&v, addr).with_context(|| format!("{addr} not in {v}"))?;
        Ok(b["health"].as_str().unwrap_or("?").to_string())
    };
    wait_until(Duration::from_secs(5), "every backend checked up", || {
        Ok((0..3).all(|i| health(&rig.backend_v4(i).to_string()).is_ok_and(|h| h == "up")))
    })?;

    let sources = rig.client_sources_v4();
    let results = connect_many(
        &rig.ns_client(),
        IpAddr::V4(VIP_V4),
        PORT,
        o.connections,
        &sources,
    );
    let (balance, balance_failures) = tally(&results);
    print_balance(o.connections, sources.len(), &balance, &balance_failures);

    let (attempts, killed, removed) = kill_under_traffic(
        &rig.ns_client(),
        sources,
        SocketAddr::new(IpAddr::V4(VIP_V4), PORT),
        o,
        || {
            servers[1].stop();
            Ok(())
        },
        || Ok(health(&victim)? == "down"),
    )?;
    let timeline = Timeline {
        title: format!(
            "director: {} new connections/s to {VIP_V4}:{PORT}; backend b2 ({victim}) killed",
            o.rate
        ),
        ids: (1..=3).map(|i| format!("b{i}")).collect(),
        victim: "b2".into(),
        kill: format!("b2's server ({victim}) stopped"),
        removal: "the health check (tcp every 250ms, fall 3) marked it down".into(),
        killed,
        removed,
        attempts,
    };
    let stopped = daemon.stop();
    servers.clear();
    rig.down()?;
    stopped?;
    finish(o, balance, balance_failures, timeline)
}

/// The farm demo: three farm nodes serve the VIP themselves; n3 is killed (kill -9, link
/// down) mid-run and the others take its share once membership declares it down.
pub fn farm(o: &DemoOpts) -> Result<Outcome> {
    let web = FarmService::farm("web", IpAddr::V4(FARM_VIP), PORT);
    let mut f = Farm::up(
        &o.prefix,
        vec![web],
        Box::new(|_| String::new()),
        Ipv4Addr::UNSPECIFIED.into(),
    )?;
    println!(
        "farm of {} nodes up, each running farmlb and serving {FARM_VIP}:{PORT} itself; \
         node n1's config:\n{}",
        f.tags.len(),
        f.config("n1")?
    );
    let (balance, balance_failures) = f.rig.connect(IpAddr::V4(FARM_VIP), PORT, o.connections);
    let sources = f.rig.client_sources_v4();
    print_balance(o.connections, sources.len(), &balance, &balance_failures);

    let ns = f.rig.ns_client();
    let dst = SocketAddr::new(IpAddr::V4(FARM_VIP), PORT);
    // The survivors' published statuses: they took n3's share once both list two members.
    let statuses = ["n1", "n2"].map(|t| status_path(&f.rig, t));
    let (attempts, killed, removed) = kill_under_traffic(
        &ns,
        sources,
        dst,
        o,
        || {
            f.node("n3").kill9()?;
            f.rig.set_link("n3", false)
        },
        || {
            Ok(statuses
                .iter()
                .all(|p| FarmStatus::read(p).is_ok_and(|s| s.members.len() == 2)))
        },
    )?;
    let timeline = Timeline {
        title: format!(
            "farm: {} new connections/s to {FARM_VIP}:{PORT}; node n3 killed",
            o.rate
        ),
        ids: f.tags.clone(),
        victim: "n3".into(),
        kill: "n3 killed (kill -9 of its farmlb, its link down)".into(),
        removal: "n1 and n2 declared it down and took its share".into(),
        killed,
        removed,
        attempts,
    };
    f.finish()?;
    finish(o, balance, balance_failures, timeline)
}

fn print_balance(n: usize, sources: usize, counts: &BTreeMap<String, usize>, failures: &[String]) {
    println!("{n} connections from {sources} source addresses:");
    print!("{}", format_distribution(counts));
    println!("  failed {:>5}", failures.len());
    for f in failures.iter().take(5) {
        println!("    {f}");
    }
}

/// Print the report, write the SVG.
fn finish(
    o: &DemoOpts,
    balance: BTreeMap<String, usize>,
    balance_failures: Vec<String>,
    timeline: Timeline,
) -> Result<Outcome> {
    print!("{}", timeline.report());
    if let Some(dir) = o.svg.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&o.svg, timeline.svg())
        .with_context(|| format!("writing {}", o.svg.display()))?;
    println!("  timeline of connections per backend: {}", o.svg.display());
    Ok(Outcome {
        balance,
        balance_failures,
        timeline,
    })
}
