//! Running farmlb on every node of a [`FarmRig`]: a farm of nodes that serve the VIP
//! themselves ([`Farm`]), or directors in failover in front of DR backends ([`Failover`]),
//! with identity servers, and the connection loops their tests measure with.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Result};
use farmlb::farm::FarmStatus;

use crate::{
    client::{connect_tallied, try_identify},
    farm_rig::{node_config, status_path, FarmNode, FarmRig, FarmService, Role},
    netns,
    server::IdentityServer,
    wait::wait_until,
};

/// The membership key every test node shares.
pub const FARM_KEY: &str = "farm-test-key-0123456789abcdef";

/// Extra `[farm]` lines of a node (by tag).
pub type Extra = Box<dyn Fn(&str) -> String>;

/// Three farm nodes `n1`–`n3`, each running farmlb and an identity server (named after the
/// node) on every service port.
pub struct Farm {
    pub rig: FarmRig,
    pub nodes: BTreeMap<String, FarmNode>,
    /// Identity servers by (node, port).
    pub servers: BTreeMap<(String, u16), IdentityServer>,
    pub tags: Vec<String>,
    pub services: Vec<FarmService>,
    pub extra: Extra,
    /// Address the identity servers bind (`0.0.0.0`, or `::` for dual-stack).
    pub bind: IpAddr,
}

impl Farm {
    /// Three farm nodes serving `services`, node configs extended by `extra`; returns once
    /// every node sees all three.
    pub fn up(
        prefix: &str,
        services: Vec<FarmService>,
        extra: Extra,
        bind: IpAddr,
    ) -> Result<Farm> {
        let rig = FarmRig::farm(prefix, 3)?;
        let tags = rig.tags(Role::Farm);
        let ports: BTreeSet<u16> = services.iter().map(|s| s.port).collect();
        let mut f = Farm {
            rig,
            nodes: BTreeMap::new(),
            servers: BTreeMap::new(),
            tags: tags.clone(),
            services,
            extra,
            bind,
        };
        for t in &tags {
            for &port in &ports {
                f.start_server(t, port)?;
            }
        }
        for t in &tags {
            f.start_node(t)?;
        }
        f.wait_members(&tags, 3, Duration::from_secs(10))?;
        Ok(f)
    }

    /// Node `tag`'s config (node id = the tag's number).
    pub fn config(&self, tag: &str) -> Result<String> {
        let id: u32 = tag[1..].parse()?;
        let key = self.rig.write_key(FARM_KEY)?;
        Ok(node_config(
            &self.rig,
            tag,
            id,
            &self.tags,
            &key,
            &self.services,
            &(self.extra)(tag),
        ))
    }

    /// (Re)start node `tag`'s identity server on `port`.
    pub fn start_server(&mut self, tag: &str, port: u16) -> Result<()> {
        let addr = SocketAddr::new(self.bind, port);
        let srv = IdentityServer::start(&self.rig.ns(tag), addr, tag)?;
        self.servers.insert((tag.into(), port), srv);
        Ok(())
    }

    /// Stop node `tag`'s identity server on `port` (its farmlb keeps running).
    pub fn stop_server(&mut self, tag: &str, port: u16) {
        if let Some(mut s) = self.servers.remove(&(tag.to_string(), port)) {
            s.stop();
        }
    }

    pub fn start_node(&mut self, tag: &str) -> Result<()> {
        let cfg = self.config(tag)?;
        let node = FarmNode::start(&self.rig, tag, &cfg)?;
        self.nodes.insert(tag.into(), node);
        Ok(())
    }

    pub fn node(&mut self, tag: &str) -> &mut FarmNode {
        self.nodes
            .get_mut(tag)
            .unwrap_or_else(|| panic!("no node {tag}"))
    }

    /// Node `tag`'s published farm status.
    pub fn status(&self, tag: &str) -> Result<FarmStatus> {
        FarmStatus::read(&status_path(&self.rig, tag))
    }

    pub fn member_count(&self, tag: &str) -> usize {
        self.status(tag).map(|s| s.members.len()).unwrap_or(0)
    }

    /// Wait until every node in `tags` sees `n` members; the time it took.
    pub fn wait_members(&self, tags: &[String], n: usize, within: Duration) -> Result<Duration> {
        wait_until(within, &format!("members to converge to {n}"), || {
            Ok(tags.iter().all(|t| self.member_count(t) == n))
        })
        .map_err(|e| e.context(format!("logs:\n{}", self.logs())))
    }

    pub fn logs(&self) -> String {
        logs(self.nodes.values())
    }

    /// Stop every node (each must exit cleanly) and tear the rig down.
    pub fn finish(mut self) -> Result<()> {
        for n in self.nodes.values_mut() {
            n.stop()?;
        }
        self.rig.down()
    }
}

/// Every node's log, headed by its tag.
pub fn logs<'a>(nodes: impl IntoIterator<Item = &'a FarmNode>) -> String {
    nodes
        .into_iter()
        .map(|n| format!("--- {} ---\n{}", n.tag, n.log()))
        .collect()
}

/// Directors `d1`, `d2`, … with `[farm]` membership in front of backends `b1`, … on one
/// bridge. Every backend runs an identity server, and so does every director of a
/// [`FarmRig::failover_serving`] rig.
pub struct Failover {
    pub rig: FarmRig,
    pub directors: Vec<String>,
    pub backends: Vec<String>,
    pub servers: Vec<IdentityServer>,
    /// The directors' farmlb, in the order of `directors` (node ids 1, 2, …).
    pub nodes: Vec<FarmNode>,
    key: PathBuf,
}

impl Failover {
    /// Identity servers on `bind:port` (its family is the one the directors' neighbour
    /// tables are warmed for), then farmlb on every director with `services`.
    pub fn up(
        rig: FarmRig,
        bind: IpAddr,
        port: u16,
        services: impl FnOnce(&FarmRig) -> Vec<FarmService>,
    ) -> Result<Failover> {
        let backends = rig.tags(Role::Backend);
        let mut directors = rig.tags(Role::Director);
        directors.extend(rig.tags(Role::ServingDirector));
        let mut servers = Vec::new();
        for t in backends.iter().chain(&rig.tags(Role::ServingDirector)) {
            servers.push(IdentityServer::start(
                &rig.ns(t),
                SocketAddr::new(bind, port),
                t,
            )?);
        }
        // Directors must know the backends' MACs: warm their neighbour tables.
        for d in &directors {
            for b in &backends {
                let (flag, addr) = match bind {
                    IpAddr::V4(_) => ("-4", rig.addr(b).to_string()),
                    IpAddr::V6(_) => ("-6", rig.addr6(b).to_string()),
                };
                netns::exec(&rig.ns(d), &["ping", flag, "-c1", "-W2", "-q", &addr])?;
            }
        }
        let key = rig.write_key(FARM_KEY)?;
        let services = services(&rig);
        let mut f = Failover {
            rig,
            directors,
            backends,
            servers,
            nodes: Vec::new(),
            key,
        };
        for i in 0..f.directors.len() {
            let cfg = f.config(i, &services, "");
            f.nodes
                .push(FarmNode::start(&f.rig, &f.directors[i], &cfg)?);
        }
        Ok(f)
    }

    /// Director `i`'s config with `services` and `extra` `[farm]` lines.
    pub fn config(&self, i: usize, services: &[FarmService], extra: &str) -> String {
        node_config(
            &self.rig,
            &self.directors[i],
            i as u32 + 1,
            &self.directors,
            &self.key,
            services,
            extra,
        )
    }

    /// The backends' IPv4 addresses.
    pub fn backend_addrs(&self) -> Vec<IpAddr> {
        self.backends
            .iter()
            .map(|b| IpAddr::V4(self.rig.addr(b)))
            .collect()
    }

    pub fn logs(&self) -> String {
        logs(&self.nodes)
    }

    /// `n` connections from `sources` to `dst`, which must all succeed; by identity.
    pub fn connect_ok(
        &self,
        dst: SocketAddr,
        sources: &[IpAddr],
        n: usize,
        what: &str,
    ) -> Result<BTreeMap<String, usize>> {
        let (counts, failures) =
            connect_tallied(&self.rig.ns_client(), dst.ip(), dst.port(), n, sources);
        ensure!(failures.is_empty(), "{what}: {failures:?}\n{}", self.logs());
        Ok(counts)
    }

    /// Stop every director (each must exit cleanly), the servers, then the rig.
    pub fn finish(mut self) -> Result<()> {
        for n in &mut self.nodes {
            n.stop()?;
        }
        self.servers.clear();
        self.rig.down()
    }
}

/// New connections, one after the other (each given `attempt`), from `sources` in turn.
pub struct Prober {
    pub ns: String,
    pub sources: Vec<IpAddr>,
    pub dst: SocketAddr,
    pub attempt: Duration,
    next: usize,
}

/// What [`Prober::until_clean`] saw.
#[derive(Debug, Default)]
pub struct Clean {
    /// When (since the start) the last bad attempt ended.
    pub last_bad: Option<Duration>,
    pub bad: usize,
    /// Good attempts in a row at the end.
    pub streak: usize,
}

impl Prober {
    pub fn new(ns: &str, sources: Vec<IpAddr>, dst: SocketAddr, attempt: Duration) -> Prober {
        Prober {
            ns: ns.into(),
            sources,
            dst,
            attempt,
            next: 0,
        }
    }

    /// One attempt from the next source: the identity that answered.
    pub fn attempt(&mut self) -> Result<String> {
        let src = self.sources[self.next % self.sources.len()];
        self.next += 1;
        try_identify(&self.ns, src, self.dst, self.attempt)
    }

    /// Attempts until `streak` in a row are answered by a node `good` accepts, or until
    /// `limit` has passed since `t0`.
    pub fn until_clean(
        &mut self,
        t0: Instant,
        streak: usize,
        limit: Duration,
        good: impl Fn(&str) -> bool,
    ) -> Clean {
        let mut c = Clean::default();
        while c.streak < streak && t0.elapsed() < limit {
            match self.attempt() {
                Ok(id) if good(&id) => c.streak += 1,
                _ => {
                    c.last_bad = Some(t0.elapsed());
                    c.bad += 1;
                    c.streak = 0;
                }
            }
        }
        c
    }

    /// Attempts until they have all succeeded for `stable`: when (since `t0`) that run of
    /// successes began (also if `limit` cut it short), `None` if the last attempt failed.
    pub fn until_stable(
        &mut self,
        t0: Instant,
        stable: Duration,
        limit: Duration,
    ) -> Option<Duration> {
        let mut first_ok = None;
        while t0.elapsed() < limit {
            let ok = self.attempt().is_ok();
            if !ok {
                first_ok = None; // not yet stable
            } else if first_ok.is_none() {
                first_ok = Some(t0.elapsed());
            }
            if first_ok.is_some_and(|t| t0.elapsed() - t > stable) {
                break;
            }
        }
        first_ok
    }
}

/// Milliseconds for a report line, or `never`.
pub fn ms(d: Option<Duration>) -> String {
    d.map_or("never".into(), |d| {
        format!("{:.0} ms", d.as_secs_f64() * 1000.0)
    })
}

/// Fails naming `what` unless every node in `ids` is in `allowed`.
pub fn only_from(ids: &BTreeMap<String, usize>, allowed: &[String], what: &str) -> Result<()> {
    if let Some(other) = ids.keys().find(|id| !allowed.contains(id)) {
        bail!("{what}: {other} answered, expected only {allowed:?}: {ids:?}");
    }
    Ok(())
}
