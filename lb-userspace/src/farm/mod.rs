//! Farm role (SafeKit-style farm mode and director failover): membership, ARP/ND answers,
//! the node's own check, hooks and the farm's status. A component of the one daemon: the
//! owner loop feeds it membership views and probe results; it hands the alive members to
//! the director, which alone writes the ownership rings.
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
//! backends (same probe types, timers and rise/fall); while the check is down the node's
//! power is 0, which the membership disseminates, so every node moves its share to the
//! others. Established connections stay where they are.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::{mpsc, watch};

use crate::config::{Config, FarmCfg, Forwarding};
use crate::dataplane::Maps;
use crate::director::Director;
use crate::health::ProbeResult;

pub mod arp;
mod check;
mod hooks;
pub mod membership;
mod sockfilter;
mod status;

pub use crate::director::Member;
use arp::{ArpResponder, ArpState};
use check::{node_target, NodeCheck};
pub use hooks::{run_hook, HookEvent};
use membership::{MemberInfo, Membership, View};
pub use status::{FarmStatus, MemberStatus};

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

/// A node's farm membership and everything that follows from it.
pub struct FarmRole {
    farm: FarmCfg,
    interface: String,
    own_mac: [u8; 6],
    membership: Membership,
    view: View,
    arp: ArpResponder,
    check: NodeCheck,
    /// The power announced (0 while the node's check is down).
    power: u32,
    leader: Option<u32>,
    /// Share of the last `ownership_change` hook.
    share: f64,
}

impl FarmRole {
    /// Join the farm of `cfg` and learn its members (waiting up to the settle time for the
    /// peers), so the first tables do not claim flows other nodes own. Returns the role and
    /// the receiver of membership views for the owner loop; node-check results arrive on
    /// `probe_tx`'s channel.
    pub async fn start(
        cfg: &Config,
        own_mac: [u8; 6],
        probe_tx: mpsc::Sender<ProbeResult>,
    ) -> Result<(FarmRole, watch::Receiver<View>)> {
        let farm = cfg.farm.clone().context("no [farm] section")?;
        let key = crate::config::host::read_key(&farm.key_file).map_err(anyhow::Error::msg)?;
        let arp = ArpResponder::start(&cfg.interface, own_mac)?;
        let membership = Membership::start(&farm, key, farm.power).await?;
        let mut view_rx = membership.view.clone();
        let settle = tokio::time::Instant::now() + settle_time(&farm);
        while tokio::time::Instant::now() < settle {
            if view_rx.borrow().members.len() > farm.peers.len() {
                break;
            }
            let _ = tokio::time::timeout_at(settle, view_rx.changed()).await;
        }
        let view = view_rx.borrow_and_update().clone();
        let mut check = NodeCheck::new(probe_tx);
        check.sync(node_target(cfg, &farm));
        let role = FarmRole {
            power: farm.power,
            farm,
            interface: cfg.interface.clone(),
            own_mac,
            membership,
            view,
            arp,
            check,
            leader: None,
            share: -1.0,
        };
        Ok((role, view_rx))
    }

    /// The membership's conntrack sync channels (batches out, batches in), once.
    pub fn take_sync(&mut self) -> Option<crate::sync::Channels> {
        Some(crate::sync::Channels {
            out: self.membership.sync_out.take()?,
            inbox: self.membership.sync_in.take()?,
            dropped_in: std::sync::Arc::clone(&self.membership.sync_in_dropped),
            members: self.membership.view.clone(),
            me: self.farm.address,
        })
    }

    /// Whether this node takes flows: its own check passes and its power is not 0.
    pub fn node_ok(&self) -> bool {
        self.power > 0
    }

    pub fn node_id(&self) -> u32 {
        self.farm.node_id
    }

    /// How long this node takes new flows without its daemon: the time a suspect member
    /// gets before the others declare it down, so by the time they take the share over the
    /// lease has run out here (see `lb_common::FarmConfig::lease_until_ns`).
    pub fn lease(&self) -> std::time::Duration {
        self.farm.suspect_timeout
    }

    pub fn members(&self) -> Vec<Member> {
        members_of(&self.view)
    }

    fn hook(
        &self,
        event: &'static str,
        extra: Vec<(&'static str, String)>,
        share: f64,
        wait: bool,
    ) {
        let members = self.members();
        let mut env = vec![
            ("FARMLB_NODE", self.farm.node_id.to_string()),
            (
                "FARMLB_MEMBERS",
                members
                    .iter()
                    .map(|m| m.node.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            ("FARMLB_SHARE", format!("{share:.4}")),
        ];
        env.extend(extra);
        run_hook(&self.farm.hooks, HookEvent { event, env }, wait);
    }

    /// The node is serving: announce the VIPs if it leads, run the `start` hook.
    pub fn started(&mut self, cfg: &Config, director: &Director) {
        self.publish(cfg, director);
        self.share = director.share();
        self.hook("start", vec![], self.share, false);
    }

    /// A new membership view: new tables (through the director), hooks, ARP role.
    pub fn on_view(
        &mut self,
        view: View,
        cfg: &Config,
        director: &mut Director,
        maps: &mut impl Maps,
    ) -> Result<()> {
        let before = std::mem::replace(&mut self.view, view);
        let members = self.members();
        if members != members_of(&before) {
            let t0 = Instant::now();
            director.set_members(&members, maps)?;
            let share = director.share();
            let old: BTreeMap<u32, &MemberInfo> =
                before.members.iter().map(|m| (m.node, m)).collect();
            let new: BTreeMap<u32, &MemberInfo> =
                self.view.members.iter().map(|m| (m.node, m)).collect();
            for (event, from, to) in [("member_up", &old, &new), ("member_down", &new, &old)] {
                for (n, m) in to.iter().filter(|(n, _)| !from.contains_key(n)) {
                    tracing::info!(member = n, addr = %m.addr, "{}", event.replace('_', " "));
                    let env = vec![
                        ("FARMLB_MEMBER", n.to_string()),
                        ("FARMLB_MEMBER_ADDR", m.addr.to_string()),
                    ];
                    self.hook(event, env, share, false);
                }
            }
            tracing::info!(
                members = ?members, share,
                took_us = t0.elapsed().as_micros() as u64,
                "ownership tables installed"
            );
        }
        self.publish(cfg, director);
        let share = director.share();
        if (share - self.share).abs() > 1e-9 {
            let old = format!("{:.4}", self.share.max(0.0));
            self.hook(
                "ownership_change",
                vec![("FARMLB_OLD_SHARE", old)],
                share,
                false,
            );
            self.share = share;
        }
        Ok(())
    }

    /// A result of the node's own check: may change the power this node announces.
    pub fn on_probe(&mut self, r: &ProbeResult, cfg: &Config, director: &Director) {
        self.check.record(r);
        let p = self.check.power(self.farm.power);
        if p != self.power {
            if p == 0 {
                tracing::warn!(power = p, "withdrawing this node's share");
            } else {
                tracing::info!(power = p, was = self.power, "this node takes a share");
            }
            self.power = p;
            self.membership.set_power(p);
            self.publish(cfg, director);
        }
    }

    /// A reload was applied (`cfg` is the new config): the node check may have changed, the
    /// answered VIPs too.
    pub fn reloaded(&mut self, cfg: &Config, director: &Director) {
        if let Some(f) = &cfg.farm {
            self.farm.check = f.check.clone();
            self.farm.check_address = f.check_address;
            self.check.sync(node_target(cfg, f));
        }
        let p = self.check.power(self.farm.power);
        if p != self.power {
            self.power = p;
            self.membership.set_power(p);
        }
        self.publish(cfg, director);
    }

    /// Re-announce the VIPs (a periodic gratuitous ARP, for switches that forget).
    pub fn gratuitous(&self) {
        self.arp.gratuitous();
    }

    /// Answer ARP/ND for the VIPs if this node leads, and refresh the status file.
    pub fn publish(&mut self, cfg: &Config, director: &Director) {
        let leader = leader(&self.members());
        let active = leader == Some(self.farm.node_id);
        let (vips, vips6) = answered_vips(cfg, self.own_mac, self.farm.virtual_mac);
        let changed = self.arp.set(ArpState {
            active,
            vips,
            vips6,
        }) || self.leader != leader;
        if changed && active {
            tracing::info!(
                node = self.farm.node_id,
                "taking the VIPs: gratuitous ARP / unsolicited neighbour advertisements"
            );
            self.arp.gratuitous();
        }
        if self.leader != leader {
            tracing::info!(?leader, "leader changed");
        }
        self.leader = leader;
        status::write(&self.farm.status_file, &self.status(director));
    }

    /// The farm part of `farmlb status`.
    pub fn status(&self, director: &Director) -> FarmStatus {
        let shares = director.shares();
        let active = self.leader == Some(self.farm.node_id);
        FarmStatus {
            node: self.farm.node_id,
            interface: self.interface.clone(),
            healthy: self.check.healthy(),
            power: self.power,
            share: director.share(),
            leader: self.leader,
            role: if active { "active" } else { "standby" }.into(),
            check: self.check.summary(),
            last_check: self.check.last_str(),
            members: self
                .view
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
            auth_failures: self.view.auth_failures,
            replays: self.view.replays,
            unknown_dropped: self.view.unknown_dropped,
            arp_answered: self.arp.answered.load(Ordering::Relaxed),
        }
    }

    /// Leave the farm (peers take our share at once), stop answering ARP, run `on_stop`.
    pub async fn stop(self, director: &Director) {
        self.membership.leave().await;
        self.arp.set(ArpState::default());
        self.hook("stop", vec![], director.share(), true);
        let _ = std::fs::remove_file(&self.farm.status_file);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leader_prefers_lowest_powered_node() {
        let m = |node, power| Member { node, power };
        assert_eq!(leader(&[]), None);
        assert_eq!(leader(&[m(3, 1), m(2, 1)]), Some(2));
        assert_eq!(leader(&[m(1, 0), m(2, 1)]), Some(2));
        assert_eq!(leader(&[m(1, 0), m(2, 0)]), Some(1));
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
