//! Farm mode (SafeKit-style) and director failover.
//!
//! Every node runs `farmlb run` with the same services on its own interface. Farm services
//! (`forwarding = "farm"`) get a weighted Maglev table over the alive members (weight =
//! power); the XDP program delivers the flows this node owns to the local stack and drops the
//! rest (TCP segments of connections that have a socket here are always kept, so rebalancing
//! never breaks a connection). Director services (`forwarding = "dr"`) are forwarded by the
//! active director only: the lowest-numbered healthy member answers ARP for the VIPs and
//! sends gratuitous ARP when it takes over; Maglev tables are identical on every director, so
//! flows land on the same backends after a takeover. IPv6 VIPs are answered the same way with
//! neighbour advertisements.
//!
//! A node with a `check` probes its own service with the health-check engine of director
//! backends (`health.rs`: same probe types, timers and rise/fall); while the check is down
//! the node's power is 0, which the membership disseminates, so every node moves its share
//! to the others. Established connections stay where they are.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use lb_common::{member_slot, Backend, FarmConfig, BACKEND_F_VALID, FWD_FARM, NO_BACKEND};
use serde::Serialize;
use tokio::signal::unix::{signal, SignalKind};

use crate::arp::{ArpResponder, ArpState};
use crate::config::{Config, FarmCfg, Forwarding, HooksCfg, MAX_POWER};
use crate::dataplane::{Dataplane, LoadOpts};
use crate::director::{Director, Maps};
use crate::health::{self, LastProbe, Outcome, ProbeResult, Target, Tracker};
use crate::maglev::{self, MaglevEntry};
use crate::membership::{read_key, Membership, View};
use crate::neigh::{iface_mac, NeighResolver};

/// Map access the farm needs on top of the director's.
pub trait FarmMaps: Maps {
    fn set_farm(&mut self, f: &FarmConfig) -> Result<()>;
}

impl<A: FarmMaps, B: FarmMaps> FarmMaps for crate::director::Tee<'_, A, B> {
    fn set_farm(&mut self, f: &FarmConfig) -> Result<()> {
        self.0.set_farm(f)?;
        self.1.set_farm(f)
    }
}

impl FarmMaps for Dataplane {
    fn set_farm(&mut self, f: &FarmConfig) -> Result<()> {
        Dataplane::set_farm(self, f)
    }
}

/// A member as the tables see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Member {
    pub node: u32,
    pub power: u32,
}

/// The member that answers ARP for farm VIPs / is the active director: the lowest node id
/// among members with power > 0, else the lowest node id. Deterministic on every node that
/// has the same view.
pub fn leader(members: &[Member]) -> Option<u32> {
    members
        .iter()
        .filter(|m| m.power > 0)
        .map(|m| m.node)
        .min()
        .or_else(|| members.iter().map(|m| m.node).min())
}

/// Ownership tables of the farm services as written into the maps.
#[derive(Debug, Default, Clone)]
pub struct FarmTables {
    own_node: u32,
    /// Member slots currently marked valid.
    valid: BTreeSet<u32>,
    /// Per farm service: (ring offset, ring size, table as written).
    rings: BTreeMap<String, (u32, u32, Vec<u32>)>,
    /// Fraction of the (first) farm table owned by this node.
    pub share: f64,
}

impl FarmTables {
    pub fn new(own_node: u32) -> Self {
        Self {
            own_node,
            ..Default::default()
        }
    }

    /// Forget what was written, so the next `apply` rewrites every ring in full (after the
    /// director re-created services on a reload).
    pub fn invalidate(&mut self) {
        self.rings.clear();
    }

    /// Program this node's identity, the member slots and every farm service's table for
    /// `members`. Order keeps live traffic consistent: new members are valid before a ring
    /// slot points at them; departed members are invalidated after the ring moved away.
    pub fn apply(
        &mut self,
        director: &Director,
        members: &[Member],
        maps: &mut impl FarmMaps,
    ) -> Result<()> {
        maps.set_farm(&FarmConfig {
            own_member: member_slot(self.own_node),
            _pad: 0,
        })?;
        let wanted: BTreeSet<u32> = members.iter().map(|m| member_slot(m.node)).collect();
        for &slot in wanted.difference(&self.valid) {
            maps.set_backend(
                slot,
                &Backend {
                    flags: BACKEND_F_VALID,
                    ..Default::default()
                },
            )?;
        }
        let keys: Vec<[u8; 4]> = members.iter().map(|m| m.node.to_be_bytes()).collect();
        let entries: Vec<MaglevEntry> = members
            .iter()
            .zip(&keys)
            .map(|(m, k)| MaglevEntry {
                key: k,
                id: member_slot(m.node),
                weight: m.power,
            })
            .collect();
        let mut first_share = None;
        let mut live = BTreeSet::new();
        for (name, st) in &director.services {
            if st.info.fwd_mode != FWD_FARM {
                continue;
            }
            live.insert(name.clone());
            let (off, size) = (st.info.ring_offset, st.info.ring_size);
            let table = maglev::build_table(&entries, size);
            let changed = match self.rings.get(name) {
                Some((o, s, old)) if *o == off && *s == size => maglev::diff(old, &table),
                _ => table
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| (i as u32, v))
                    .collect(),
            };
            maps.write_ring(off, &changed)?;
            let own = member_slot(self.own_node);
            first_share.get_or_insert(
                table.iter().filter(|&&v| v == own).count() as f64 / size.max(1) as f64,
            );
            self.rings.insert(name.clone(), (off, size, table));
        }
        self.rings.retain(|n, _| live.contains(n));
        for &slot in self.valid.difference(&wanted) {
            maps.set_backend(slot, &Backend::default())?;
        }
        self.valid = wanted;
        self.share = first_share.unwrap_or(0.0);
        Ok(())
    }

    /// Share of every member in the first farm table (for `farmlb status`).
    pub fn shares(&self) -> BTreeMap<u32, f64> {
        let mut out = BTreeMap::new();
        if let Some((_, size, table)) = self.rings.values().next() {
            for &v in table {
                if v != NO_BACKEND {
                    *out.entry(v - member_slot(0)).or_insert(0.0) += 1.0 / *size as f64;
                }
            }
        }
        out
    }
}

// --- hooks ---------------------------------------------------------------------------------

/// A farm event for the user hooks.
#[derive(Clone, Debug)]
pub struct HookEvent {
    pub event: &'static str,
    pub env: Vec<(&'static str, String)>,
}

/// Run the hook for `ev` (if configured) in the background; failures are logged, never fatal.
/// With `wait`, returns once the hook finished (or timed out).
pub fn run_hook(hooks: &HooksCfg, ev: HookEvent, wait: bool) {
    let cmd = match ev.event {
        "start" => &hooks.on_start,
        "stop" => &hooks.on_stop,
        "member_up" => &hooks.on_member_up,
        "member_down" => &hooks.on_member_down,
        "ownership_change" => &hooks.on_ownership_change,
        _ => &None,
    };
    let Some(cmd) = cmd.clone() else { return };
    let timeout = hooks.timeout;
    let job = move || {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(&cmd)
            .env("FARMLB_EVENT", ev.event)
            .stdin(Stdio::null());
        for (k, v) in &ev.env {
            c.env(k, v);
        }
        let mut child = match c.spawn() {
            Ok(ch) => ch,
            Err(e) => {
                tracing::error!(event = ev.event, "hook {cmd:?} could not start: {e}");
                return;
            }
        };
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(st)) if st.success() => return,
                Ok(Some(st)) => {
                    tracing::error!(event = ev.event, "hook {cmd:?} failed: {st}");
                    return;
                }
                Ok(None) if Instant::now() > deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    tracing::error!(event = ev.event, "hook {cmd:?} killed after {timeout:?}");
                    return;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => {
                    tracing::error!(event = ev.event, "hook {cmd:?}: {e}");
                    return;
                }
            }
        }
    };
    if wait {
        job();
    } else {
        let _ = std::thread::Builder::new()
            .name("farm-hook".into())
            .spawn(job);
    }
}

// --- status --------------------------------------------------------------------------------

/// What `farmlb status` shows; written by the daemon as JSON to `farm.status_file`.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct FarmStatus {
    pub node: u32,
    pub interface: String,
    pub healthy: bool,
    pub power: u32,
    /// Share of the farm's flows this node owns (0..=1).
    pub share: f64,
    /// Node answering ARP for farm VIPs / active director.
    pub leader: Option<u32>,
    /// "active" or "standby" (director failover role; in farm mode: ARP responder or not).
    pub role: String,
    /// The node's own check (`tcp 10.0.100.1:80 every 2s …`), if configured.
    #[serde(default)]
    pub check: Option<String>,
    /// Its latest probe: `up (0.4 ms)` or `down: <reason>`.
    #[serde(default)]
    pub last_check: Option<String>,
    pub members: Vec<MemberStatus>,
    pub auth_failures: u64,
    pub replays: u64,
    pub arp_answered: u64,
}

#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct MemberStatus {
    pub node: u32,
    pub address: SocketAddr,
    pub state: String,
    pub power: u32,
    pub share: f64,
}

impl FarmStatus {
    pub fn render(&self) -> String {
        let mut s = format!(
            "farm node {} on {}: {} ({}), power {}, share {:.1}%, leader {}\n\
             check: {}{}\n\
             membership: {} auth failures, {} replays; ARP/ND answered {}\n\
             {:<6} {:<22} {:<8} {:>6} {:>7}\n",
            self.node,
            self.interface,
            self.role,
            if self.healthy { "healthy" } else { "unhealthy" },
            self.power,
            self.share * 100.0,
            self.leader.map_or("none".into(), |l| l.to_string()),
            self.check.as_deref().unwrap_or("none"),
            self.last_check
                .as_ref()
                .map_or(String::new(), |l| format!("; last: {l}")),
            self.auth_failures,
            self.replays,
            self.arp_answered,
            "NODE",
            "ADDRESS",
            "STATE",
            "POWER",
            "SHARE"
        );
        for m in &self.members {
            s += &format!(
                "{:<6} {:<22} {:<8} {:>6} {:>6.1}%\n",
                m.node,
                m.address.to_string(),
                m.state,
                m.power,
                m.share * 100.0
            );
        }
        s
    }

    pub fn read(path: &Path) -> Result<FarmStatus> {
        let s = std::fs::read_to_string(path).with_context(|| {
            format!(
                "reading {} (is `farmlb run` running in farm mode?)",
                path.display()
            )
        })?;
        serde_json::from_str(&s).with_context(|| format!("parsing {}", path.display()))
    }
}

/// `farmlb status`: the farm state published by the daemon running `config`.
pub fn status(config: &Path, json: bool) -> Result<String> {
    let cfg = Config::load(config)?;
    let farm = cfg
        .farm
        .as_ref()
        .with_context(|| format!("{} has no [farm] section", config.display()))?;
    let st = FarmStatus::read(&farm.status_file)?;
    Ok(if json {
        serde_json::to_string_pretty(&st)? + "\n"
    } else {
        st.render()
    })
}

fn write_status(path: &Path, st: &FarmStatus) {
    let res = (|| -> Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(st)?)?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    })();
    if let Err(e) = res {
        tracing::warn!("writing farm status {}: {e:#}", path.display());
    }
}

// --- the node's own check ---------------------------------------------------------------

/// This node's check of its own service: the health engine's probe task (`health::run_task`)
/// and the rise/fall state of its results. Without a check the node counts as healthy.
struct NodeCheck {
    target: Option<Target>,
    generation: u64,
    task: Option<tokio::task::JoinHandle<()>>,
    tracker: Tracker,
    /// Power set by a `dynamic` exec check (exit 2..=255 = power code − 2).
    dynamic_power: Option<u32>,
    last: Option<LastProbe>,
    tx: tokio::sync::mpsc::Sender<ProbeResult>,
}

impl NodeCheck {
    fn new(tx: tokio::sync::mpsc::Sender<ProbeResult>) -> Self {
        Self {
            target: None,
            generation: 0,
            task: None,
            tracker: Tracker::new(1, 1, true, false),
            dynamic_power: None,
            last: None,
            tx,
        }
    }

    /// Probe `target` (or nothing). A changed check restarts its task; the node keeps its
    /// current health (as a director backend whose check changes). Must run inside tokio.
    fn sync(&mut self, target: Option<Target>) {
        if target == self.target {
            return;
        }
        if let Some(t) = self.task.take() {
            t.abort();
        }
        self.generation += 1;
        match &target {
            None => {
                self.tracker = Tracker::new(1, 1, true, false);
                self.dynamic_power = None;
                self.last = None;
            }
            Some(t) => {
                let up = self.tracker.is_up();
                // A node that was already checked and up has proven itself; a new check has
                // not (its first failure withdraws the node).
                let proven = up && self.target.is_some();
                self.tracker = Tracker::new(t.check.rise, t.check.fall, up, proven);
                self.task = Some(tokio::spawn(health::run_task(
                    t.clone(),
                    self.generation,
                    self.tx.clone(),
                )));
                tracing::info!(
                    check = %self.summary_of(t),
                    "checking this node's own service"
                );
            }
        }
        self.target = target;
    }

    fn summary_of(&self, t: &Target) -> String {
        let s = crate::daemon::check_summary(&t.check);
        format!("{s} on {}", t.addr)
    }

    fn summary(&self) -> Option<String> {
        self.target.as_ref().map(|t| self.summary_of(t))
    }

    /// Count a probe result (stale ones are ignored).
    fn record(&mut self, r: &ProbeResult) {
        if r.generation != self.generation || self.target.is_none() {
            return;
        }
        self.last = Some(LastProbe {
            outcome: r.outcome.clone(),
            latency: r.latency,
            at: SystemTime::now(),
        });
        if let Outcome::Up {
            weight: Some(w), ..
        } = r.outcome
        {
            self.dynamic_power = Some(w.min(MAX_POWER));
        }
        match (self.tracker.record(r.outcome.is_up()), &r.outcome) {
            (Some(false), Outcome::Down { reason }) => tracing::warn!(
                "this node's check is DOWN ({} consecutive failures): {reason}",
                self.target.as_ref().map_or(0, |t| t.check.fall)
            ),
            (Some(true), _) => tracing::info!(
                "this node's check is UP ({} consecutive successes)",
                self.target.as_ref().map_or(0, |t| t.check.rise)
            ),
            _ => {}
        }
    }

    fn healthy(&self) -> bool {
        self.target.is_none() || self.tracker.is_up()
    }

    /// The power this node announces: 0 while its check is down, else the dynamic check's,
    /// else the configured one.
    fn power(&self, configured: u32) -> u32 {
        if !self.healthy() {
            0
        } else {
            self.dynamic_power.unwrap_or(configured)
        }
    }

    fn last_str(&self) -> Option<String> {
        self.last.as_ref().map(|l| match &l.outcome {
            Outcome::Up { .. } => format!("up ({:.1} ms)", l.latency.as_secs_f64() * 1000.0),
            Outcome::Down { reason } => format!("down: {reason}"),
        })
    }
}

impl Drop for NodeCheck {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// The node's check for `cfg` (validated when the config was loaded).
fn node_target(cfg: &Config, farm: &FarmCfg) -> Option<Target> {
    match farm.node_check(&cfg.services) {
        Ok(t) => t.map(Target::from),
        Err(e) => {
            tracing::error!("farm check: {e}");
            None
        }
    }
}

/// Whether going from `old` to `new` needs a restart: anything in `[farm]` but the node's
/// check, which a reload applies.
fn farm_needs_restart(old: &FarmCfg, new: &FarmCfg) -> bool {
    old.restart_needed(new).is_err()
}

// --- daemon --------------------------------------------------------------------------------

/// Members as the tables want them, from the membership view.
fn members_of(view: &View) -> Vec<Member> {
    let mut m: Vec<Member> = view
        .members
        .iter()
        .map(|m| Member {
            node: m.node,
            power: m.power,
        })
        .collect();
    m.sort();
    m.dedup_by_key(|m| m.node);
    m
}

/// How long a starting node waits for its peers before taking a share, so it does not claim
/// flows that belong to nodes it has not heard from yet.
fn settle_time(f: &FarmCfg) -> Duration {
    f.probe_interval * 4 + Duration::from_millis(300)
}

/// `farmlb run` with a `[farm]` section.
pub async fn run(config_path: &Path, cfg: Config) -> Result<()> {
    let farm = cfg.farm.clone().context("no [farm] section")?;
    let own_mac = iface_mac(&cfg.interface)?;
    let key = read_key(&farm.key_file)?;
    let mut dp = Dataplane::load(LoadOpts {
        ring_slots: Director::ring_slots_for(&cfg),
        conntrack_size: cfg.conntrack_size,
    })?;
    let mut director = Director::new(dp.ring_slots(), own_mac);
    let mut macs = NeighResolver::new(&cfg.interface);
    director.apply(&cfg, &mut dp, &mut macs)?;
    let mut tables = FarmTables::new(farm.node_id);
    let arp = ArpResponder::start(&cfg.interface, own_mac)?;

    let (probe_tx, mut probe_rx) = tokio::sync::mpsc::channel::<ProbeResult>(64);
    let mut check = NodeCheck::new(probe_tx);
    let mut power = farm.power;
    let membership = Membership::start(&farm, key, power).await?;
    let mut view_rx = membership.view.clone();

    // Learn the farm before serving.
    let settle = tokio::time::Instant::now() + settle_time(&farm);
    while tokio::time::Instant::now() < settle {
        let known = view_rx.borrow().members.len();
        if known > farm.peers.len() {
            break;
        }
        let _ = tokio::time::timeout_at(settle, view_rx.changed()).await;
    }
    let view = view_rx.borrow_and_update().clone();
    let mut members = members_of(&view);
    tables.apply(&director, &members, &mut dp)?;
    dp.attach(&cfg.interface, cfg.xdp_mode.into())?;
    tracing::info!(
        interface = %cfg.interface,
        node = farm.node_id,
        members = members.len(),
        share = tables.share,
        "farm node attached"
    );

    let mut state = LoopState {
        leader: None,
        share: -1.0,
    };
    let env_base = |ev: &'static str, extra: Vec<(&'static str, String)>, m: &[Member], share| {
        let mut env = vec![
            ("FARMLB_NODE", farm.node_id.to_string()),
            (
                "FARMLB_MEMBERS",
                m.iter()
                    .map(|m| m.node.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            ("FARMLB_SHARE", format!("{share:.4}")),
        ];
        env.extend(extra);
        HookEvent { event: ev, env }
    };
    run_hook(
        &farm.hooks,
        env_base("start", vec![], &members, tables.share),
        false,
    );

    let mut cfg = cfg;
    let publish = |cfg: &Config,
                   st: &mut LoopState,
                   tables: &FarmTables,
                   members: &[Member],
                   view: &View,
                   check: &NodeCheck,
                   power: u32| {
        let leader = leader(members);
        let active = leader == Some(farm.node_id);
        let (vips, vips6) = answered_vips(cfg, own_mac, farm.virtual_mac);
        let new_arp = ArpState {
            active,
            vips,
            vips6,
        };
        let changed = arp.set(new_arp) || st.leader != leader;
        if changed && active {
            tracing::info!(
                node = farm.node_id,
                "taking the VIPs: gratuitous ARP / unsolicited neighbour advertisements"
            );
            arp.gratuitous();
        }
        if st.leader != leader {
            tracing::info!(?leader, "leader changed");
        }
        st.leader = leader;
        let shares = tables.shares();
        write_status(
            &farm.status_file,
            &FarmStatus {
                node: farm.node_id,
                interface: cfg.interface.clone(),
                healthy: check.healthy(),
                power,
                share: tables.share,
                leader,
                role: if active { "active" } else { "standby" }.into(),
                check: check.summary(),
                last_check: check.last_str(),
                members: view
                    .members
                    .iter()
                    .map(|m| MemberStatus {
                        node: m.node,
                        address: m.addr,
                        state: m.state.into(),
                        power: m.power,
                        share: shares.get(&m.node).copied().unwrap_or(0.0),
                    })
                    .collect(),
                auth_failures: view.auth_failures,
                replays: view.replays,
                arp_answered: arp.answered.load(std::sync::atomic::Ordering::Relaxed),
            },
        );
    };
    publish(&cfg, &mut state, &tables, &members, &view, &check, power);
    state.share = tables.share;
    let mut view = view;

    check.sync(node_target(&cfg, &farm));
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut retry = tokio::time::interval(Duration::from_secs(2));
    let mut garp = tokio::time::interval(Duration::from_secs(30));
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = sighup.recv() => match Config::load(config_path) {
                Ok(new)
                    if new.interface == cfg.interface
                        && new.farm.as_ref().is_some_and(|f| !farm_needs_restart(&farm, f)) =>
                {
                    match director.apply(&new, &mut dp, &mut macs) {
                        Ok(()) => {
                            let new_farm = new.farm.clone().expect("checked above");
                            check.sync(node_target(&new, &new_farm));
                            cfg = new;
                            tables.invalidate();
                            tables.apply(&director, &members, &mut dp)?;
                            let p = check.power(farm.power);
                            if p != power {
                                power = p;
                                membership.set_power(power);
                            }
                            publish(&cfg, &mut state, &tables, &members, &view, &check, power);
                            tracing::info!("configuration reloaded");
                        }
                        Err(e) => tracing::error!("reload failed: {e:#}"),
                    }
                }
                Ok(_) => tracing::error!("reload rejected: interface and [farm] need a restart"),
                Err(e) => tracing::error!("reload rejected: {e:#}"),
            },
            r = view_rx.changed() => {
                if r.is_err() {
                    anyhow::bail!("membership task stopped");
                }
                let new_view = view_rx.borrow_and_update().clone();
                let new_members = members_of(&new_view);
                if new_members != members {
                    let t0 = Instant::now();
                    tables.apply(&director, &new_members, &mut dp)?;
                    let before: BTreeMap<u32, &crate::membership::MemberInfo> =
                        view.members.iter().map(|m| (m.node, m)).collect();
                    let after: BTreeMap<u32, &crate::membership::MemberInfo> =
                        new_view.members.iter().map(|m| (m.node, m)).collect();
                    for (n, m) in &after {
                        if !before.contains_key(n) {
                            tracing::info!(member = n, addr = %m.addr, "member up");
                            run_hook(&farm.hooks, env_base("member_up", vec![
                                ("FARMLB_MEMBER", n.to_string()),
                                ("FARMLB_MEMBER_ADDR", m.addr.to_string()),
                            ], &new_members, tables.share), false);
                        }
                    }
                    for (n, m) in &before {
                        if !after.contains_key(n) {
                            tracing::info!(member = n, addr = %m.addr, "member down");
                            run_hook(&farm.hooks, env_base("member_down", vec![
                                ("FARMLB_MEMBER", n.to_string()),
                                ("FARMLB_MEMBER_ADDR", m.addr.to_string()),
                            ], &new_members, tables.share), false);
                        }
                    }
                    tracing::info!(
                        members = ?new_members, share = tables.share,
                        took_us = t0.elapsed().as_micros() as u64,
                        "ownership tables installed"
                    );
                    members = new_members;
                }
                view = new_view;
                publish(&cfg, &mut state, &tables, &members, &view, &check, power);
                if (tables.share - state.share).abs() > 1e-9 {
                    run_hook(&farm.hooks, env_base("ownership_change", vec![
                        ("FARMLB_OLD_SHARE", format!("{:.4}", state.share.max(0.0))),
                    ], &members, tables.share), false);
                    state.share = tables.share;
                }
            }
            Some(r) = probe_rx.recv() => {
                check.record(&r);
                let p = check.power(farm.power);
                if p != power {
                    if p == 0 {
                        tracing::warn!(power = p, "withdrawing this node's share");
                    } else {
                        tracing::info!(power = p, was = power, "this node takes a share");
                    }
                    power = p;
                    membership.set_power(power);
                    publish(&cfg, &mut state, &tables, &members, &view, &check, power);
                }
            }
            _ = retry.tick() => {
                if director.unresolved() > 0 {
                    director.apply(&cfg, &mut dp, &mut macs)?;
                }
                // Refresh the counters in the status file.
                publish(&cfg, &mut state, &tables, &members, &view, &check, power);
            }
            _ = garp.tick() => arp.gratuitous(),
        }
    }
    membership.leave().await;
    arp.set(ArpState::default());
    dp.detach().context("detaching XDP program")?;
    run_hook(
        &farm.hooks,
        env_base("stop", vec![], &members, tables.share),
        true,
    );
    let _ = std::fs::remove_file(&farm.status_file);
    tracing::info!("farm node left, detached, exiting");
    Ok(())
}

struct LoopState {
    leader: Option<u32>,
    share: f64,
}

/// VIPs answered by the leader (IPv4 by ARP, IPv6 by neighbour discovery): farm VIPs at the
/// virtual MAC, director VIPs at our own.
type AnsweredVips = (Vec<(Ipv4Addr, [u8; 6])>, Vec<(Ipv6Addr, [u8; 6])>);

fn answered_vips(cfg: &Config, own_mac: [u8; 6], vmac: [u8; 6]) -> AnsweredVips {
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    for s in &cfg.services {
        let mac = if s.forwarding == Forwarding::Farm {
            vmac
        } else {
            own_mac
        };
        match s.vip {
            IpAddr::V4(ip) => v4.push((ip, mac)),
            IpAddr::V6(ip) => v6.push((ip, mac)),
        }
    }
    v4.sort();
    v4.dedup_by_key(|(ip, _)| *ip);
    v6.sort();
    v6.dedup_by_key(|(ip, _)| *ip);
    (v4, v6)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Model;

    #[test]
    fn leader_prefers_lowest_powered_node() {
        let m = |node, power| Member { node, power };
        assert_eq!(leader(&[]), None);
        assert_eq!(leader(&[m(3, 1), m(2, 1)]), Some(2));
        assert_eq!(leader(&[m(1, 0), m(2, 1)]), Some(2));
        assert_eq!(leader(&[m(1, 0), m(2, 0)]), Some(1));
    }

    #[test]
    fn hooks_get_the_event_and_failures_are_not_fatal() {
        let out = std::env::temp_dir().join(format!("farmlb-hook-{}.txt", std::process::id()));
        let hooks = HooksCfg {
            on_member_down: Some(format!(
                "echo \"$FARMLB_EVENT $FARMLB_MEMBER $FARMLB_NODE\" > {}",
                out.display()
            )),
            on_member_up: Some("exit 3".into()),
            timeout: Duration::from_secs(5),
            ..Default::default()
        };
        let ev = |event| HookEvent {
            event,
            env: vec![("FARMLB_MEMBER", "3".into()), ("FARMLB_NODE", "1".into())],
        };
        run_hook(&hooks, ev("member_down"), true);
        assert_eq!(
            std::fs::read_to_string(&out).unwrap().trim(),
            "member_down 3 1"
        );
        let _ = std::fs::remove_file(&out);
        // A failing hook and an unconfigured one only log.
        run_hook(&hooks, ev("member_up"), true);
        run_hook(&hooks, ev("start"), true);
    }

    fn farm_config() -> Config {
        Config::from_toml_str(
            "interface = \"eth0\"\n[farm]\nnode_id = 1\naddress = \"10.0.0.1\"\n\
             key_file = \"/k\"\n[[service]]\nname = \"web\"\nvip = \"10.0.100.1\"\nport = 80\n\
             forwarding = \"farm\"\ntable_size = 1009\n",
        )
        .unwrap()
    }

    #[test]
    fn tables_follow_membership_and_keep_survivor_slots() {
        let cfg = farm_config();
        let mut model = Model::default();
        let mut director = Director::new(1 << 16, [2, 0, 0, 0, 0, 1]);
        let mut macs: std::collections::HashMap<IpAddr, [u8; 6]> = Default::default();
        director.apply(&cfg, &mut model, &mut macs).unwrap();
        let mut t = FarmTables::new(1);
        let three = [
            Member { node: 1, power: 1 },
            Member { node: 2, power: 1 },
            Member { node: 3, power: 1 },
        ];
        t.apply(&director, &three, &mut model).unwrap();
        assert_eq!(model.farm.own_member, member_slot(1));
        let shares = t.shares();
        for n in 1..=3 {
            assert!((shares[&n] - 1.0 / 3.0).abs() < 0.02, "{shares:?}");
        }
        let ring_before: Vec<u32> = (0..1009).map(|i| model.ring[&i]).collect();
        // Node 3 leaves: its slot is invalid, survivors keep (almost) every slot they had.
        t.apply(&director, &three[..2], &mut model).unwrap();
        assert_eq!(model.backends[&member_slot(3)].flags & BACKEND_F_VALID, 0);
        let mut moved = 0;
        for i in 0..1009u32 {
            let b = ring_before[i as usize];
            assert_ne!(model.ring[&i], member_slot(3));
            if b != member_slot(3) && model.ring[&i] != b {
                moved += 1;
            }
        }
        assert!(moved < 1009 / 30, "{moved} survivor slots moved");
        assert!((t.share - 0.5).abs() < 0.02);
        // Power 0: a member keeps its slot valid (its flows stay) but owns nothing new.
        t.apply(
            &director,
            &[Member { node: 1, power: 0 }, Member { node: 2, power: 1 }],
            &mut model,
        )
        .unwrap();
        assert_eq!(t.share, 0.0);
        assert_ne!(model.backends[&member_slot(1)].flags & BACKEND_F_VALID, 0);
    }

    fn checked_config(check: &str) -> Config {
        Config::from_toml_str(&format!(
            "interface = \"eth0\"\n[farm]\nnode_id = 1\naddress = \"10.0.0.1\"\n\
             key_file = \"/k\"\npower = 3\ncheck = {check}\n[[service]]\nname = \"web\"\n\
             vip = \"10.0.100.1\"\nport = 80\nforwarding = \"farm\"\n"
        ))
        .unwrap()
    }

    fn result(generation: u64, outcome: Outcome) -> ProbeResult {
        ProbeResult {
            service: "web".into(),
            addr: "10.0.100.1".parse().unwrap(),
            generation,
            outcome,
            latency: Duration::from_millis(1),
        }
    }

    #[test]
    fn node_check_withdraws_after_fall_and_returns_after_rise() {
        let cfg = checked_config("{ type = \"tcp\", rise = 2, fall = 2 }");
        let farm = cfg.farm.clone().unwrap();
        let (tx, _rx) = tokio::sync::mpsc::channel(4);
        let mut c = NodeCheck::new(tx);
        assert!(c.healthy(), "no check: healthy");
        assert_eq!(c.power(3), 3);
        // As `sync` would set it up for a node that has proven itself, without the task.
        c.target = node_target(&cfg, &farm);
        c.generation = 1;
        c.tracker = Tracker::new(2, 2, true, true);
        let (up, down) = (
            Outcome::Up { weight: None },
            Outcome::Down { reason: "x".into() },
        );
        c.record(&result(1, down.clone()));
        assert_eq!(c.power(3), 3, "one failure of fall = 2");
        c.record(&result(0, down.clone()));
        assert_eq!(c.power(3), 3, "a stale task's result is ignored");
        c.record(&result(1, down.clone()));
        assert!(!c.healthy());
        assert_eq!(c.power(3), 0, "withdrawn");
        assert!(c.last_str().unwrap().starts_with("down: x"));
        c.record(&result(1, up.clone()));
        assert_eq!(c.power(3), 0, "one success of rise = 2");
        c.record(&result(1, up));
        assert_eq!(c.power(3), 3, "back with the configured power");
        // A dynamic exec check's weight becomes the node's power.
        c.record(&result(1, Outcome::Up { weight: Some(7) }));
        assert_eq!(c.power(3), 7);
        assert_eq!(
            c.summary().unwrap(),
            "tcp :80 every 2s timeout 1s rise 2 fall 2 on 10.0.100.1"
        );
    }

    #[test]
    fn node_check_runs_on_the_health_engine() {
        // An exec check that fails: the engine's task probes it, the node withdraws; a
        // reload to a passing check brings it back (health carries over, then rises).
        let failing = checked_config(
            "{ type = \"exec\", command = \"exit 1\", interval = \"50ms\", rise = 2, fall = 1 }",
        );
        let passing = checked_config(
            "{ type = \"exec\", command = \"exit 4\", dynamic = true, interval = \"50ms\", rise = 2, fall = 1 }",
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (tx, mut rx) = tokio::sync::mpsc::channel(16);
            let mut c = NodeCheck::new(tx);
            let farm = failing.farm.clone().unwrap();
            c.sync(node_target(&failing, &farm));
            let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
            while c.healthy() {
                let r = tokio::time::timeout_at(deadline, rx.recv())
                    .await
                    .expect("no probe result within 3 s")
                    .unwrap();
                c.record(&r);
            }
            assert_eq!(c.power(3), 0);
            c.sync(node_target(&passing, passing.farm.as_ref().unwrap()));
            assert!(!c.healthy(), "a changed check keeps the node's health");
            while c.power(3) == 0 {
                let r = tokio::time::timeout_at(deadline, rx.recv())
                    .await
                    .expect("no probe result within 3 s")
                    .unwrap();
                c.record(&r);
            }
            assert_eq!(c.power(3), 2, "dynamic: exit 4 = power 2");
            c.sync(None);
            assert!(c.healthy());
            assert_eq!(c.power(3), 3);
        });
    }

    #[test]
    fn only_the_check_of_the_farm_section_reloads() {
        let a = checked_config("{ type = \"tcp\" }").farm.unwrap();
        let b = checked_config("{ type = \"http\", path = \"/h\" }")
            .farm
            .unwrap();
        assert!(!farm_needs_restart(&a, &b));
        let c = FarmCfg { power: 9, ..b };
        assert!(farm_needs_restart(&a, &c));
    }

    #[test]
    fn the_leader_answers_v4_and_v6_vips() {
        let cfg = Config::from_toml_str(
            "interface = \"eth0\"\n[farm]\nnode_id = 1\naddress = \"10.0.0.1\"\n\
             key_file = \"/k\"\n\
             [[service]]\nname = \"web\"\nvip = \"10.0.100.1\"\nport = 80\nforwarding = \"farm\"\n\
             [[service]]\nname = \"web6\"\nvip = \"fd99:100::1\"\nport = 80\nforwarding = \"farm\"\n\
             [[service]]\nname = \"web6b\"\nvip = \"fd99:100::1\"\nport = 81\nforwarding = \"farm\"\n\
             [[service]]\nname = \"dr6\"\nvip = \"fd99:100::2\"\nport = 80\n",
        )
        .unwrap();
        let (own, vmac) = ([2, 0, 0, 0, 0, 9], [2, 0xfa, 0, 0, 0, 1]);
        let (v4, v6) = answered_vips(&cfg, own, vmac);
        assert_eq!(v4, vec![("10.0.100.1".parse().unwrap(), vmac)]);
        assert_eq!(
            v6,
            vec![
                ("fd99:100::1".parse().unwrap(), vmac),
                ("fd99:100::2".parse().unwrap(), own)
            ]
        );
    }
}
