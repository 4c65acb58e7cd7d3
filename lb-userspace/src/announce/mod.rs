//! VIP announcement for a BGP daemon: the daemon keeps a host route (`/32`, `/128`) per VIP
//! in a dedicated kernel routing table (`[announce] table`) while the VIP has a usable
//! backend and this node's own check passes, and removes it otherwise (and on stop). BIRD's
//! `kernel` protocol imports that table and exports it to the routers (see
//! `contrib/bird/bird.conf`, `docs/scale-out.md`); the routers spread the flows over the
//! directors by ECMP.
//!
//! The owner loop only computes the wanted set ([`wanted`]) and hands it over a watch
//! channel; a task of its own writes the table with `ip -batch` (iproute2 is already what
//! the package depends on and what the neighbour code asks), each run bounded by a timeout,
//! so a slow or stuck `ip` never delays a health check or a map write. The task also
//! re-reads the table every [`RESYNC_EVERY`] and repairs drift (a route deleted by hand, a
//! link that went down and took its routes with it).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

use crate::config::{AnnounceCfg, Config, Forwarding};
use crate::director::Director;

/// `proto` of the routes the daemon writes (`ip route ... proto 250`), so it only ever
/// touches its own routes in the table.
pub const ROUTE_PROTO: u8 = 250;
/// Longest one `ip` run may take before it is killed (and retried at the next change or
/// resync).
const IP_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the table is read back and repaired.
pub const RESYNC_EVERY: Duration = Duration::from_secs(5);

/// Why a VIP is or is not announced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Announced: a service of the VIP has a usable backend and the node's check passes.
    Usable,
    /// Withdrawn: no service of the VIP has a usable backend.
    NoUsableBackend,
    /// Withdrawn: this node's own check fails (or its power is 0).
    NodeDown,
    /// Withdrawn: the daemon is stopping.
    Stopping,
}

impl Reason {
    pub fn announced(self) -> bool {
        self == Reason::Usable
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Usable => "usable backends",
            Reason::NoUsableBackend => "no usable backend",
            Reason::NodeDown => "node check down",
            Reason::Stopping => "stopping",
        }
    }
}

/// Every VIP of `cfg` and whether it should be announced. A VIP shared by several services
/// is announced while any of them has a usable backend (a farm service: while this node is
/// a member with power).
pub fn wanted(cfg: &Config, director: &Director, node_ok: bool) -> BTreeMap<IpAddr, Reason> {
    let mut out: BTreeMap<IpAddr, Reason> = BTreeMap::new();
    for s in &cfg.services {
        let usable = match s.forwarding {
            Forwarding::Farm => node_ok,
            Forwarding::Dr | Forwarding::Ipip | Forwarding::Gue => director
                .services
                .get(&s.name)
                .is_some_and(|st| st.backends.values().any(|b| b.effective_weight() > 0)),
        };
        let e = out.entry(s.vip).or_insert(Reason::NoUsableBackend);
        if usable {
            *e = Reason::Usable;
        }
    }
    if !node_ok {
        out.values_mut().for_each(|r| *r = Reason::NodeDown);
    }
    out
}

/// What the writer task last achieved.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// VIPs whose route is in the table.
    pub installed: Vec<IpAddr>,
    /// The last failure of `ip`, if the last attempt failed.
    pub error: Option<String>,
    /// Routes added and removed since the start.
    pub changes: u64,
}

/// One VIP as `farmlb status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipAnnounceView {
    pub vip: IpAddr,
    /// Wanted in the table.
    pub announced: bool,
    /// In the table now (differs from `announced` until the writer caught up, or while `ip`
    /// fails).
    pub installed: bool,
    pub reason: Reason,
}

/// The announce part of `farmlb status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnnounceView {
    pub table: u32,
    pub vips: Vec<VipAnnounceView>,
    pub changes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl AnnounceView {
    pub fn render(&self) -> String {
        let mut s = format!("announce: table {}", self.table);
        if let Some(e) = &self.error {
            s += &format!("  ERROR: {e}");
        }
        s += "\n";
        for v in &self.vips {
            let state = match (v.announced, v.installed) {
                (true, true) => "announced",
                (false, false) => "withdrawn",
                (true, false) => "announcing",
                (false, true) => "withdrawing",
            };
            s += &format!("  {:<40} {state:<11} {}\n", v.vip, v.reason.as_str());
        }
        s
    }
}

/// Handle of the writer task.
pub struct Announcer {
    table: u32,
    want: watch::Sender<BTreeMap<IpAddr, Reason>>,
    applied: watch::Receiver<Applied>,
}

impl Announcer {
    /// Start the writer for `interface`, wanting `initial` at once. It reads what the table
    /// holds (routes of [`ROUTE_PROTO`] only) and changes just the difference: the routes of
    /// a daemon that was killed or crashed and that are still wanted stay in place, so a
    /// restart does not make the routers withdraw and re-learn them.
    pub fn start(
        cfg: &AnnounceCfg,
        interface: &str,
        initial: BTreeMap<IpAddr, Reason>,
    ) -> Announcer {
        let (want, want_rx) = watch::channel(initial);
        let (applied_tx, applied) = watch::channel(Applied::default());
        let w = Writer {
            table: cfg.table,
            dev: interface.to_string(),
        };
        tokio::spawn(w.run(want_rx, applied_tx));
        Announcer {
            table: cfg.table,
            want,
            applied,
        }
    }

    /// The wanted state (cheap; the writer catches up in the background).
    pub fn set(&self, wanted: BTreeMap<IpAddr, Reason>) {
        self.want.send_if_modified(|w| {
            let changed = *w != wanted;
            *w = wanted;
            changed
        });
    }

    /// Withdraw every VIP and wait (at most `within`) until the table is empty.
    pub async fn withdraw_all(&mut self, within: Duration) {
        let stopping = self
            .want
            .borrow()
            .keys()
            .map(|v| (*v, Reason::Stopping))
            .collect();
        self.set(stopping);
        let done = self.applied.wait_for(|a| a.installed.is_empty());
        if tokio::time::timeout(within, done).await.is_err() {
            tracing::warn!(
                table = self.table,
                "announce: the VIP routes were not all removed within {within:?}"
            );
        } else {
            tracing::info!(table = self.table, "announce: every VIP withdrawn");
        }
    }

    pub fn view(&self) -> AnnounceView {
        let a = self.applied.borrow().clone();
        AnnounceView {
            table: self.table,
            vips: self
                .want
                .borrow()
                .iter()
                .map(|(vip, r)| VipAnnounceView {
                    vip: *vip,
                    announced: r.announced(),
                    installed: a.installed.contains(vip),
                    reason: *r,
                })
                .collect(),
            changes: a.changes,
            error: a.error,
        }
    }
}

fn prefix(vip: IpAddr) -> String {
    match vip {
        IpAddr::V4(v) => format!("{v}/32"),
        IpAddr::V6(v) => format!("{v}/128"),
    }
}

struct Writer {
    table: u32,
    dev: String,
}

impl Writer {
    async fn run(
        self,
        mut want: watch::Receiver<BTreeMap<IpAddr, Reason>>,
        applied: watch::Sender<Applied>,
    ) {
        let mut state = Applied::default();
        // What a previous daemon (killed, crashed) left: kept where still wanted, removed
        // otherwise by the first apply. Unreadable: the first resync reads it again.
        match self.read().await {
            Ok(now) => {
                if !now.is_empty() {
                    tracing::info!(table = self.table, routes = ?now, "announce: routes found in the table");
                }
                state.installed = now;
            }
            Err(e) => tracing::warn!(table = self.table, "announce: reading the table: {e:#}"),
        }
        let mut resync = tokio::time::interval(RESYNC_EVERY);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let wanted: Vec<IpAddr> = want
                .borrow_and_update()
                .iter()
                .filter(|(_, r)| r.announced())
                .map(|(v, _)| *v)
                .collect();
            match self.apply(&wanted, &state.installed).await {
                Ok((installed, n)) => {
                    if installed != state.installed {
                        tracing::info!(table = self.table, routes = ?installed, "announce: table written");
                    }
                    state.installed = installed;
                    state.changes += n;
                    state.error = None;
                }
                Err(e) => {
                    let msg = format!("{e:#}");
                    if state.error.as_deref() != Some(&msg) {
                        tracing::error!(table = self.table, "announce: {msg}");
                    }
                    state.error = Some(msg);
                    // What is really there, as far as we can tell; if even that is unknown,
                    // count the routes just written as present, so a later withdrawal
                    // still deletes them.
                    match self.read().await {
                        Ok(now) => state.installed = now,
                        Err(_) => {
                            for v in &wanted {
                                if !state.installed.contains(v) {
                                    state.installed.push(*v);
                                }
                            }
                            state.installed.sort();
                        }
                    }
                }
            }
            applied.send_if_modified(|a| {
                let changed = *a != state;
                *a = state.clone();
                changed
            });
            tokio::select! {
                r = want.changed() => if r.is_err() { return },
                _ = resync.tick() => {
                    match self.read().await {
                        Ok(now) => state.installed = now,
                        Err(e) => tracing::warn!("announce: reading table {}: {e:#}", self.table),
                    }
                }
            }
        }
    }

    /// Make the table hold exactly `wanted`, given that it holds `have`; returns what it
    /// holds after and the number of routes changed.
    async fn apply(&self, wanted: &[IpAddr], have: &[IpAddr]) -> Result<(Vec<IpAddr>, u64)> {
        let mut batch = String::new();
        let mut n = 0;
        for v in wanted.iter().filter(|v| !have.contains(v)) {
            batch += &format!(
                "route replace {} dev {} table {} proto {}\n",
                prefix(*v),
                self.dev,
                self.table,
                ROUTE_PROTO
            );
            n += 1;
        }
        for v in have.iter().filter(|v| !wanted.contains(v)) {
            batch += &format!(
                "route del {} table {} proto {}\n",
                prefix(*v),
                self.table,
                ROUTE_PROTO
            );
            n += 1;
        }
        if batch.is_empty() {
            return Ok((have.to_vec(), 0));
        }
        ip(&["-force", "-batch", "-"], Some(&batch)).await?;
        let now = self.read().await?;
        let missing: Vec<&IpAddr> = wanted.iter().filter(|v| !now.contains(v)).collect();
        if !missing.is_empty() {
            bail!(
                "adding {missing:?} to table {} failed (is {} up?)",
                self.table,
                self.dev
            );
        }
        Ok((now, n))
    }

    /// The VIP routes in the table now.
    async fn read(&self) -> Result<Vec<IpAddr>> {
        let mut out = Vec::new();
        for fam in ["-4", "-6"] {
            let t = self.table.to_string();
            let p = ROUTE_PROTO.to_string();
            let args = [fam, "-j", "route", "show", "table", &t, "proto", &p];
            let json = match ip(&args, None).await {
                // A table with no route of the family yet (IPv6 says so).
                Err(e) if no_table(&e) => continue,
                r => r?,
            };
            let routes: Vec<serde_json::Value> = serde_json::from_str(json.trim())
                .or_else(|e| {
                    if json.trim().is_empty() {
                        Ok(vec![])
                    } else {
                        Err(e)
                    }
                })
                .context("parsing `ip -j route show`")?;
            for r in routes {
                let dst = r["dst"].as_str().unwrap_or_default();
                let addr = dst.split('/').next().unwrap_or_default();
                if let Ok(a) = addr.parse::<IpAddr>() {
                    out.push(a);
                }
            }
        }
        out.sort();
        Ok(out)
    }
}

/// `ip` refused because the table has no route of that family at all.
fn no_table(e: &anyhow::Error) -> bool {
    format!("{e:#}").contains("FIB table does not exist")
}

/// `ip ARGS` with `input` on stdin, killed after [`IP_TIMEOUT`]; its stdout.
async fn ip(args: &[&str], input: Option<&str>) -> Result<String> {
    let mut cmd = tokio::process::Command::new("ip");
    cmd.args(args)
        .stdin(if input.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let run = async {
        let mut child = cmd.spawn().context("running ip (iproute2)")?;
        if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin.write_all(text.as_bytes()).await?;
        }
        let out = child.wait_with_output().await?;
        if !out.status.success() {
            bail!(
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    tokio::time::timeout(IP_TIMEOUT, run)
        .await
        .with_context(|| format!("ip {} took longer than {IP_TIMEOUT:?}", args.join(" ")))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::neigh::AssumeResolved;

    fn cfg() -> Config {
        Config::from_toml_str(
            "interface = \"eth0\"\n[announce]\ntable = 100\n\
             [[service]]\nname = \"a\"\nvip = \"10.0.100.1\"\nport = 80\n\
               [[service.backend]]\n  address = \"10.0.0.11\"\n\
             [[service]]\nname = \"a443\"\nvip = \"10.0.100.1\"\nport = 443\n\
             [[service]]\nname = \"b\"\nvip = \"fd00:100::1\"\nport = 80\n\
               [[service.backend]]\n  address = \"fd00::11\"\n  state = \"drain\"\n",
        )
        .unwrap()
    }

    #[test]
    fn a_vip_is_wanted_while_any_of_its_services_has_a_usable_backend_and_the_node_is_up() {
        let c = cfg();
        let mut d = Director::new(lb_common::DEFAULT_RING_SLOTS, [2, 0, 0, 0, 0, 1]);
        d.apply(
            &c,
            &mut crate::dataplane::DryRun {
                ring_slots: lb_common::DEFAULT_RING_SLOTS,
            },
            &mut AssumeResolved,
        )
        .unwrap();
        let w = wanted(&c, &d, true);
        let v4: IpAddr = "10.0.100.1".parse().unwrap();
        let v6: IpAddr = "fd00:100::1".parse().unwrap();
        assert_eq!(w[&v4], Reason::Usable);
        assert_eq!(w[&v6], Reason::NoUsableBackend);
        let w = wanted(&c, &d, false);
        assert_eq!((w[&v4], w[&v6]), (Reason::NodeDown, Reason::NodeDown));
        assert_eq!(prefix(v4), "10.0.100.1/32");
        assert_eq!(prefix(v6), "fd00:100::1/128");
    }
}
