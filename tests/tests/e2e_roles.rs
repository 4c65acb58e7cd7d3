//! End-to-end tests of "one daemon for every role": a farm member, an active and a standby
//! director with `[farm]` run the same daemon as a plain director. Each node serves the
//! runtime API (`api_socket`, one per node: the namespaces share the filesystem) and metrics
//! (`127.0.0.1:9740` inside its namespace); the health checks of `dr` services run on
//! failover directors; restart-only fields are rejected on every role; and a reload that
//! switches a service between `dr` and `farm` rebuilds it under traffic.
//!
//! Run as root, one test at a time (`cargo xtask test` does).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, ensure, Context, Result};
use lb_tests::{
    client::{Attempt, Traffic},
    cluster::{ms, Failover, Farm},
    ctl::{self, cli, cli_ok, find_backend, metric, status_json, Metrics},
    farm_rig::{api_socket, FarmRig, FarmService, FARM_VIP, MEMBER_PORT},
    farmlb_config, format_distribution,
    process::Process,
    wait_until, DirectorRig, IdentityServer, Service, VIP_V4,
};
use serde_json::Value;

const WEB: u16 = 80;
const METRICS: &str = "127.0.0.1:9740";
const FAST_CHECK: &str =
    "check = { type = \"tcp\", interval = \"200ms\", timeout = \"100ms\", rise = 2, fall = 3 }";
const INTERVAL: Duration = Duration::from_millis(200);
const RISE: u32 = 2;
const FALL: u32 = 3;

fn web_vip() -> IpAddr {
    IpAddr::V4(FARM_VIP)
}

/// Wait until the daemon behind `sock` answers `farmlb status --json`; the last error if it
/// never does.
fn wait_api(sock: &Path, within: Duration) -> Result<()> {
    let mut last = String::new();
    let res = wait_until(within, &format!("the API on {}", sock.display()), || {
        Ok(match status_json(sock) {
            Ok(_) => true,
            Err(e) => {
                last = format!("{e:#}");
                false
            }
        })
    });
    res.map(drop).with_context(|| format!("last error: {last}"))
}

fn health(status: &Value, addr: &str) -> Option<String> {
    find_backend(status, addr)?["health"]
        .as_str()
        .map(str::to_string)
}

fn drop_no_backend(sock: &Path) -> Result<u64> {
    let v = status_json(sock)?;
    v["stats"]["drop_no_backend"]
        .as_u64()
        .with_context(|| format!("no stats.drop_no_backend in {v}"))
}

// --- (1) status and metrics on a farm node --------------------------------------------------

/// The farm section of a node's `status --json`: its own identity and role, and every member
/// alive with power 1; returns the node's share.
fn check_farm_json(v: &Value, node: u64, members: usize) -> Result<f64> {
    let names: Vec<&str> = v["services"]
        .as_array()
        .context("no services array")?
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    ensure!(names == ["web", "sticky"], "services {names:?} in {v}");
    ensure!(
        v["stats"]["drop_no_backend"].is_u64(),
        "no data-plane stats: {v}"
    );
    let farm = &v["farm"];
    ensure!(farm.is_object(), "no farm section in status --json: {v}");
    ensure!(farm["node"] == node, "farm.node: {farm}");
    let role = if node == 1 { "active" } else { "standby" };
    ensure!(farm["role"] == role, "node {node} should be {role}: {farm}");
    ensure!(farm["leader"] == 1, "the leader is node 1: {farm}");
    let share = farm["share"].as_f64().context("farm.share")?;
    let fair = 1.0 / members as f64;
    ensure!(
        (share - fair).abs() < 0.05,
        "node {node}'s share {share} (fair {fair:.3})"
    );
    let list = farm["members"].as_array().context("farm.members")?;
    ensure!(list.len() == members, "{members} members expected: {farm}");
    let mut total = 0.0;
    for m in list {
        ensure!(m["state"] == "alive" && m["power"] == 1, "member {m}");
        let addr = m["address"].as_str().context("member address")?;
        ensure!(addr.ends_with(&format!(":{MEMBER_PORT}")), "member {m}");
        let s = m["share"].as_f64().context("member share")?;
        if m["node"] == node {
            ensure!(
                (s - share).abs() < 0.01,
                "own member entry {m} vs share {share}"
            );
        }
        total += s;
    }
    ensure!((total - 1.0).abs() < 0.02, "member shares sum to {total}");
    Ok(share)
}

/// The farm families of a node's `/metrics` next to the usual ones.
fn check_farm_metrics(m: &Metrics, members: &[u32], share: f64) -> Result<()> {
    for key in [
        "farmlb_service_packets_total{service=\"web\"}",
        "farmlb_drops_total{reason=\"no_backend\"}",
        "farmlb_conntrack_lookups_total{result=\"hit\"}",
        "farmlb_forwarded_packets_total",
    ] {
        metric(m, key)?;
    }
    for n in members {
        let up = metric(m, &format!("farmlb_farm_member_up{{node=\"{n}\"}}"))?;
        ensure!(up == 1.0, "member {n} up = {up}");
    }
    let count = metric(m, "farmlb_farm_members")?;
    ensure!(count == members.len() as f64, "farmlb_farm_members {count}");
    let scraped = metric(m, "farmlb_farm_share")?;
    ensure!(
        (scraped - share).abs() < 0.01,
        "farmlb_farm_share {scraped}, status says {share}"
    );
    Ok(())
}

/// Every farm node answers `farmlb --socket PATH status` (the service table and a farm
/// section listing the members) and `status --json` (`services`, `stats` and `farm`), and
/// serves `/metrics` with `farmlb_farm_member_up`, `farmlb_farm_share` and
/// `farmlb_farm_members`; after a member dies, the survivors' API and metrics follow.
#[test]
fn farm_node_serves_status_and_metrics() -> Result<()> {
    let services = vec![
        FarmService::farm("web", web_vip(), WEB),
        FarmService {
            hash: "src-ip",
            ..FarmService::farm("sticky", web_vip(), 81)
        },
    ];
    let mut f = Farm::up(
        "er1",
        services,
        Box::new(|_| String::new()),
        Ipv4Addr::UNSPECIFIED.into(),
    )?;
    let (counts, failures) = f.rig.connect(web_vip(), WEB, 60);
    ensure!(failures.is_empty(), "{failures:?}\n{}", f.logs());
    println!(
        "60 connections to the farm:\n{}",
        format_distribution(&counts)
    );
    let scrape = |f: &Farm, tag: &str| ctl::scrape(&f.rig.ns(tag), METRICS.parse()?, "1.0");

    for (i, tag) in f.tags.iter().enumerate() {
        let sock = api_socket(&f.rig, tag);
        wait_api(&sock, Duration::from_secs(5))
            .with_context(|| format!("farm node {tag} serves no API; logs:\n{}", f.logs()))?;
        let table = cli_ok(&sock, &["status"])?;
        for svc in ["web ", "sticky "] {
            ensure!(
                table.lines().any(|l| l.starts_with(svc)),
                "{tag}: no service line {svc:?} in:\n{table}"
            );
        }
        let alive = table
            .lines()
            .filter(|l| l.contains(&format!(":{MEMBER_PORT}")) && l.contains("alive"))
            .count();
        ensure!(alive == 3, "{tag}: 3 alive members expected in:\n{table}");
        let share = check_farm_json(&status_json(&sock)?, i as u64 + 1, 3)
            .with_context(|| format!("{tag}'s status --json"))?;
        let m = scrape(&f, tag)?;
        check_farm_metrics(&m, &[1, 2, 3], share).with_context(|| format!("{tag}'s /metrics"))?;
        println!("{tag}: status and /metrics agree: 3 members alive, share {share:.4}");
    }

    // n3 dies: n1's API and metrics see two members, each with half the flows.
    let t0 = Instant::now();
    f.node("n3").kill9()?;
    f.rig.set_link("n3", false)?;
    wait_until(
        Duration::from_secs(5),
        "n1's metrics to show 2 members",
        || Ok(scrape(&f, "n1").is_ok_and(|m| m.get("farmlb_farm_members") == Some(&2.0))),
    )?;
    let took = t0.elapsed();
    let m = scrape(&f, "n1")?;
    let n3_up = m.get("farmlb_farm_member_up{node=\"3\"}").copied();
    ensure!(
        n3_up.is_none_or(|v| v == 0.0),
        "a dead member must read 0 (or be gone): {n3_up:?}"
    );
    let v = status_json(&api_socket(&f.rig, "n1"))?;
    let share = check_farm_json(&v, 1, 2)?;
    check_farm_metrics(&m, &[1, 2], share)?;
    println!(
        "kill -9 of n3: n1's /metrics showed 2 members after {} (member_up for node 3: {n3_up:?}), \
         share {share:.4}",
        ms(Some(took))
    );
    f.finish()
}

// --- (2) health checks of a dr service on failover directors --------------------------------

/// The `dr` service `web` on the VIP, over every backend of the failover rig.
fn web_dr(rig: &FarmRig) -> FarmService {
    let backends = rig
        .tags(lb_tests::farm_rig::Role::Backend)
        .iter()
        .map(|b| IpAddr::V4(rig.addr(b)))
        .collect();
    FarmService::dr("web", web_vip(), WEB, backends)
}

/// Two directors with `[farm]` in front of three backends checked with a fast tcp check:
/// b2's server stops, both directors (active and standby) show it `down` in
/// `status --json` within fall×interval + interval, and new connections avoid it; it
/// returns after `rise` good checks.
#[test]
fn failover_directors_health_check_dr_backends() -> Result<()> {
    let mut f = Failover::up(
        FarmRig::failover("er2", 2, 3)?,
        Ipv4Addr::UNSPECIFIED.into(),
        WEB,
        |rig| {
            vec![FarmService {
                check: Some(FAST_CHECK.into()),
                ..web_dr(rig)
            }]
        },
    )?;
    // The directors settle (as in e2e_farm's failover tests) and every backend passes its
    // first checks. Nothing is asked of the API yet, so that a node without checks fails on
    // the traffic below, not on a missing socket.
    thread::sleep(Duration::from_millis(800).max(INTERVAL * 4));
    let dst = SocketAddr::new(web_vip(), WEB);
    let sources = f.rig.client_sources_v4();
    let counts = f.connect_ok(dst, &sources, 99, "before the failure")?;
    ensure!(counts.len() == 3, "every backend should serve: {counts:?}");
    let b2 = f.rig.addr("b2").to_string();
    let socks: Vec<_> = f.directors.iter().map(|d| api_socket(&f.rig, d)).collect();

    f.servers[1].stop();
    let t0 = Instant::now();
    let mut down: Vec<Option<Duration>> = vec![None; socks.len()];
    let mut api_error = String::new();
    let mut clean = None;
    while t0.elapsed() < INTERVAL * (FALL + 4) && (clean.is_none() || down.contains(&None)) {
        for (i, sock) in socks.iter().enumerate() {
            if down[i].is_none() {
                match status_json(sock) {
                    Ok(v) if health(&v, &b2).as_deref() == Some("down") => {
                        down[i] = Some(t0.elapsed())
                    }
                    Ok(_) => {}
                    Err(e) => api_error = format!("{e:#}"),
                }
            }
        }
        if clean.is_none() {
            let (counts, failures) = f.rig.connect(web_vip(), WEB, 24);
            if failures.is_empty() && !counts.contains_key("b2") {
                clean = Some(t0.elapsed());
            }
        }
        thread::sleep(Duration::from_millis(10));
    }
    let bound = INTERVAL * (FALL + 1);
    let margin = INTERVAL / 2 + Duration::from_millis(300);
    println!(
        "b2's server stopped: shown down by d1 after {}, by d2 after {}; new connections avoid \
         it after {} (bound fall×interval + interval = {} + margin {}){}",
        ms(down[0]),
        ms(down[1]),
        ms(clean),
        ms(Some(bound)),
        ms(Some(margin)),
        if api_error.is_empty() {
            String::new()
        } else {
            format!("; last API error: {api_error}")
        }
    );
    ensure!(
        clean.is_some_and(|c| c <= bound + margin),
        "new connections kept reaching b2 (or failing) after its server stopped: they avoid \
         it after {}, allowed {} + {}; the dr service's check did not take b2 out on the \
         active director\n{}",
        ms(clean),
        ms(Some(bound)),
        ms(Some(margin)),
        f.logs()
    );
    for (i, d) in f.directors.iter().enumerate() {
        ensure!(
            down[i].is_some_and(|t| t <= bound + margin),
            "{d}'s status --json did not show b2 down within {} (took {}){}",
            ms(Some(bound + margin)),
            ms(down[i]),
            if api_error.is_empty() {
                String::new()
            } else {
                format!("; last API error: {api_error}")
            }
        );
    }
    let b = find_backend(&status_json(&socks[0])?, &b2).context("b2 in d1's status")?;
    ensure!(
        b["effective_weight"] == 0 && b["last_check"]["ok"] == false,
        "{b}"
    );
    let counts = f.connect_ok(dst, &sources, 99, "b2 down")?;
    ensure!(
        counts.len() == 2 && !counts.contains_key("b2"),
        "b2 still chosen: {counts:?}"
    );

    let any = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), WEB);
    f.servers[1] = IdentityServer::start(&f.rig.ns("b2"), any, "b2")?;
    let t1 = Instant::now();
    let up = wait_until(INTERVAL * (RISE + 4), "b2 up again on d1", || {
        Ok(health(&status_json(&socks[0])?, &b2).as_deref() == Some("up"))
    })?;
    let bound = INTERVAL * (RISE + 1);
    println!(
        "b2's server restarted: d1 shows it up after {} (bound rise×interval + interval = {})",
        ms(Some(up)),
        ms(Some(bound))
    );
    ensure!(
        t1.elapsed() <= bound + margin,
        "b2 came back after {:?}",
        t1.elapsed()
    );
    let counts = f.connect_ok(dst, &sources, 99, "b2 back")?;
    ensure!(
        counts.get("b2").copied().unwrap_or(0) > 10,
        "b2 gets no new flows after coming back: {counts:?}"
    );
    f.finish()
}

// --- (3) reload dr -> farm -> dr under traffic ----------------------------------------------

/// How long new connections may fail after a reload that changes `forwarding`.
const SETTLE: Duration = Duration::from_millis(1500);
/// How long each configuration serves the traffic.
const PHASE: Duration = Duration::from_secs(4);

/// Write every director's config for `services` and SIGHUP them together; when (on the
/// traffic's clock) the signals went out.
/// docs/deploying.md's third way for one machine: a lone director with a one-node `[farm]`
/// (no peers) answers ARP for the VIP itself, so on-link clients reach the backends through it
/// with nothing else holding the VIP.
#[test]
fn a_lone_director_answers_arp_for_its_vip_as_a_one_node_farm() -> Result<()> {
    let f = Failover::up(
        FarmRig::failover("er5", 1, 2)?,
        Ipv4Addr::UNSPECIFIED.into(),
        WEB,
        |rig| vec![web_dr(rig)],
    )?;
    let dst = SocketAddr::new(web_vip(), WEB);
    let sources = f.rig.client_sources_v4();
    let counts = f.connect_ok(dst, &sources, 60, "through the lone director")?;
    println!("a one-node farm director: {}", format_distribution(&counts));
    ensure!(counts.len() == 2, "both backends should serve: {counts:?}");
    // The client resolved the VIP itself, to the director's MAC.
    let neigh = lb_tests::netns::exec(
        &f.rig.ns_client(),
        &["ip", "neigh", "show", &web_vip().to_string()],
    )?;
    let link = lb_tests::netns::exec(
        &f.rig.ns(&f.directors[0]),
        &["ip", "-br", "link", "show", "eth0"],
    )?;
    let mac = link
        .split_whitespace()
        .nth(2)
        .unwrap_or_default()
        .to_string();
    ensure!(
        !mac.is_empty() && neigh.contains(&mac),
        "the client's neighbour entry for the VIP ({}) is not the director's MAC {mac}",
        neigh.trim()
    );
    f.finish()
}

fn reload_all(f: &Failover, services: &[FarmService], traffic: &Traffic) -> Result<Duration> {
    for i in 0..f.nodes.len() {
        let cfg = f.config(i, services, "");
        std::fs::write(f.nodes[i].config_path(), cfg)?;
    }
    for n in &f.nodes {
        n.signal(libc::SIGHUP)?;
    }
    Ok(traffic.elapsed())
}

fn sleep_until(traffic: &Traffic, t: Duration) {
    if let Some(d) = t.checked_sub(traffic.elapsed()) {
        thread::sleep(d);
    }
}

/// `drop_no_backend` of every director (an error if its API does not answer).
fn drops(f: &Failover) -> Vec<Result<u64>> {
    f.directors
        .iter()
        .map(|d| drop_no_backend(&api_socket(&f.rig, d)))
        .collect()
}

/// One configuration's share of the traffic.
struct Phase {
    name: &'static str,
    /// Reload time (traffic clock); 0 for the initial configuration.
    from: Duration,
    to: Duration,
    /// Who may answer.
    serve: Vec<String>,
    /// `drop_no_backend` per director at `from + SETTLE` and at `to`.
    drops: (Vec<Result<u64>>, Vec<Result<u64>>),
}

impl Phase {
    /// Check the attempts of this phase: after `settle` (none for the initial one) every
    /// connection succeeds and is answered by one of `serve` (all of them take a share), and
    /// `drop_no_backend` stays put.
    fn check(&self, attempts: &[Attempt], settle: Duration) -> Result<()> {
        let mine: Vec<&Attempt> = attempts
            .iter()
            .filter(|a| a.at >= self.from && a.at < self.to)
            .collect();
        let good = |a: &Attempt| matches!(&a.result, Ok(id) if self.serve.contains(id));
        let bad: Vec<&Attempt> = mine.iter().copied().filter(|a| !good(a)).collect();
        let last_bad = bad.last().map(|a| a.at - self.from);
        let after: Vec<&Attempt> = mine
            .iter()
            .copied()
            .filter(|a| a.at >= self.from + settle)
            .collect();
        let bad_after = after.iter().filter(|a| !good(a)).count();
        let mut ids: BTreeMap<String, usize> = BTreeMap::new();
        for a in &after {
            if let Ok(id) = &a.result {
                *ids.entry(id.clone()).or_default() += 1;
            }
        }
        let errors: Vec<String> = after
            .iter()
            .filter(|a| !good(a))
            .take(3)
            .map(|a| match &a.result {
                Ok(id) => format!("answered by {id}"),
                Err(e) => e.clone(),
            })
            .collect();
        println!(
            "{} (from {:.2} s): {} new connections, {} bad (the last {} after the start of the \
             phase); after {}: {} good, {bad_after} bad; drop_no_backend {:?} -> {:?}\n{}",
            self.name,
            self.from.as_secs_f64(),
            mine.len(),
            bad.len(),
            last_bad.map_or("-".into(), |d| ms(Some(d))),
            ms(Some(settle)),
            after.len() - bad_after,
            self.drops
                .0
                .iter()
                .map(|d| d.as_ref().ok())
                .collect::<Vec<_>>(),
            self.drops
                .1
                .iter()
                .map(|d| d.as_ref().ok())
                .collect::<Vec<_>>(),
            format_distribution(&ids)
        );
        ensure!(
            bad_after == 0 && after.len() >= 20,
            "{}: {bad_after} of {} new connections failed (or reached the wrong nodes) more \
             than {} after the start of the phase, the last {} in; the first of those: {errors:?}",
            self.name,
            after.len(),
            ms(Some(settle)),
            ms(last_bad)
        );
        ensure!(
            ids.len() == self.serve.len(),
            "{}: not every one of {:?} served: {ids:?}",
            self.name,
            self.serve
        );
        for (i, (a, b)) in self.drops.0.iter().zip(&self.drops.1).enumerate() {
            let (a, b) = match (a, b) {
                (Ok(a), Ok(b)) => (*a, *b),
                (Err(e), _) | (_, Err(e)) => {
                    bail!("{}: director {}'s drops: {e:#}", self.name, i + 1)
                }
            };
            ensure!(
                a == b,
                "{}: director {}'s drop_no_backend grew after settling: {a} -> {b}",
                self.name,
                i + 1
            );
        }
        Ok(())
    }
}

/// A service switched from `dr` to `farm` and back by reloads (SIGHUP), with new connections
/// flowing all along.
///
/// Topology: [`FarmRig::failover_serving`], two directors in failover in front of three
/// backends, but the directors also hold the VIP on `lo` (ARP-silent) and run identity
/// servers of their own, and use generic XDP (which farm delivery needs on a veth; XDP_TX
/// works there too). As `dr`, the active director d1 answers ARP for the VIP and forwards
/// to b1–b3; as `farm`, d1 and d2 serve the VIP themselves and d1 answers ARP with the
/// virtual MAC. After each reload new connections must succeed again within 1.5 s (the
/// leader's gratuitous ARP moves the client), be answered only by the new mode's servers
/// (all of them), and `drop_no_backend` must not grow after that.
#[test]
fn reload_switches_a_service_between_dr_and_farm_under_traffic() -> Result<()> {
    let dr = |rig: &FarmRig| {
        let backends = ["b1", "b2", "b3"]
            .iter()
            .map(|b| IpAddr::V4(rig.addr(b)))
            .collect();
        vec![FarmService::dr("web", web_vip(), WEB, backends)]
    };
    let mut f = Failover::up(
        FarmRig::failover_serving("er3", 2, 3)?,
        Ipv4Addr::UNSPECIFIED.into(),
        WEB,
        dr,
    )?;
    let (as_dr, as_farm) = (dr(&f.rig), vec![FarmService::farm("web", web_vip(), WEB)]);
    thread::sleep(Duration::from_millis(800));
    let dst = SocketAddr::new(web_vip(), WEB);
    let counts = f.connect_ok(dst, &f.rig.client_sources_v4(), 60, "as dr")?;
    println!("before the reloads (dr):\n{}", format_distribution(&counts));

    let traffic = Traffic::start(
        &f.rig.ns_client(),
        f.rig.client_sources_v4(),
        dst,
        Duration::from_millis(300),
    )?;
    let backends: Vec<String> = f.backends.clone();
    let mut phases = vec![Phase {
        name: "dr (initial)",
        from: Duration::ZERO,
        to: Duration::from_secs(2),
        serve: backends.clone(),
        drops: (Vec::new(), Vec::new()),
    }];
    sleep_until(&traffic, Duration::from_secs(2));
    for (name, services, serve) in [
        ("reload to farm", &as_farm, f.directors.clone()),
        ("reload back to dr", &as_dr, backends),
    ] {
        let from = reload_all(&f, services, &traffic)?;
        sleep_until(&traffic, from + SETTLE);
        let settled = drops(&f);
        sleep_until(&traffic, from + PHASE);
        let end = drops(&f);
        for n in &mut f.nodes {
            n.exited("after a reload")?;
        }
        phases.push(Phase {
            name,
            from,
            to: from + PHASE,
            serve,
            drops: (settled, end),
        });
    }
    let attempts = traffic.stop()?;
    let mut res = phases[0].check(&attempts, Duration::ZERO);
    for p in &phases[1..] {
        res = res.and(p.check(&attempts, SETTLE));
    }
    res.map_err(|e| anyhow!("{e:#}\nlogs:\n{}", f.logs()))?;
    f.finish()
}

// --- (4) restart-only fields ----------------------------------------------------------------

/// A node under test for [`rejects_restart_only_change`].
struct Node<'a> {
    what: &'a str,
    sock: &'a Path,
    process: &'a mut Process,
    /// The file it runs.
    config: String,
    /// Connections that must keep succeeding.
    serves: &'a dyn Fn() -> Result<()>,
}

/// `conntrack_size` changed in the file: SIGHUP and `farmlb reload` are rejected with
/// `conntrack_size: changing it needs a restart (running A, new B)`, the daemon keeps running
/// the old configuration and serving; the unchanged file reloads fine.
fn rejects_restart_only_change(n: &mut Node, running: u32, new: u32) -> Result<()> {
    ensure!(
        !n.config.contains("conntrack_size"),
        "the test changes conntrack_size from its default"
    );
    let changed = format!("conntrack_size = {new}\n{}", n.config);
    let message =
        format!("conntrack_size: changing it needs a restart (running {running}, new {new})");
    std::fs::write(n.process.config_path(), &changed)?;
    n.process.signal(libc::SIGHUP)?;
    let logged = wait_until(Duration::from_secs(3), "the rejection in the log", || {
        Ok(n.process.log().contains(&message))
    });
    n.process.exited("after SIGHUP")?;
    logged.with_context(|| {
        format!(
            "{}: a SIGHUP with a changed conntrack_size was not rejected; log:\n{}",
            n.what,
            n.process.log()
        )
    })?;
    (n.serves)().context("serving after the rejected SIGHUP")?;

    let (ok, _, err) = cli(n.sock, &["reload"])?;
    ensure!(
        !ok && err.contains(&message),
        "{}: farmlb reload of a changed conntrack_size: exit ok = {ok}, stderr {err:?} (want \
         {message:?})",
        n.what
    );
    let (code, v) = ctl::api(n.sock, "GET", "/v1/config", None)?;
    let cfg = v["config"].as_str().unwrap_or_default();
    ensure!(
        code == 200 && cfg.contains(&format!("conntrack_size = {running}\n")),
        "{}: the running config changed: HTTP {code} {v}",
        n.what
    );
    n.process.exited("after farmlb reload")?;
    (n.serves)().context("serving after the rejected farmlb reload")?;

    std::fs::write(n.process.config_path(), &n.config)?;
    let out = cli_ok(n.sock, &["reload"])?;
    println!(
        "{}: rejected as restart-only: {message:?}; the unchanged file: {out}",
        n.what
    );
    (n.serves)()
}

/// A reload that changes `conntrack_size` is rejected whole on a plain director and on a
/// farm node alike (and on the farm node, so is another `[farm]` field than its check, while
/// a changed check is applied).
#[test]
fn restart_only_changes_are_rejected_on_every_role() -> Result<()> {
    const DEFAULT_CONNTRACK: u32 = 1_048_576;
    // A plain director.
    let vip = IpAddr::V4(VIP_V4);
    let config = |rig: &lb_tests::Rig| {
        let backends = (0..3).map(|i| IpAddr::V4(rig.backend_v4(i)));
        farmlb_config(rig, &[Service::tcp("web", vip, WEB).backends(backends)])
    };
    let mut d = DirectorRig::up("er4", 3, WEB, config)?;
    let sock = lb_tests::daemon::api_socket(&d.rig);
    wait_api(&sock, Duration::from_secs(5))?;
    let cfg = config(&d.rig);
    let DirectorRig { daemon, rig, .. } = &mut d;
    let rig: &lb_tests::Rig = rig;
    let serves = || -> Result<()> {
        let (_, failures) = rig.connect(vip, WEB, 30);
        ensure!(failures.is_empty(), "{failures:?}");
        Ok(())
    };
    rejects_restart_only_change(
        &mut Node {
            what: "director",
            sock: &sock,
            process: daemon,
            config: cfg,
            serves: &serves,
        },
        DEFAULT_CONNTRACK,
        65536,
    )?;
    d.finish(|_| Ok(()))?;

    // A farm node.
    let mut f = Farm::up(
        "er4f",
        vec![FarmService::farm("web", web_vip(), WEB)],
        Box::new(|_| String::new()),
        Ipv4Addr::UNSPECIFIED.into(),
    )?;
    let sock = api_socket(&f.rig, "n1");
    let cfg = f.config("n1")?;
    let Farm { rig, nodes, .. } = &mut f;
    let rig: &FarmRig = rig;
    let serves = || -> Result<()> {
        let (counts, failures) = rig.connect(web_vip(), WEB, 30);
        ensure!(
            failures.is_empty() && counts.len() == 3,
            "{counts:?} {failures:?}"
        );
        Ok(())
    };
    let n1 = nodes.get_mut("n1").expect("n1");
    rejects_restart_only_change(
        &mut Node {
            what: "farm node n1",
            sock: &sock,
            process: n1,
            config: cfg.clone(),
            serves: &serves,
        },
        DEFAULT_CONNTRACK,
        65536,
    )?;
    // Another [farm] field needs a restart too; the node's own check reloads.
    let power = cfg.replacen("[farm]\n", "[farm]\npower = 2\n", 1);
    std::fs::write(n1.config_path(), &power)?;
    let (ok, _, err) = cli(&sock, &["reload"])?;
    ensure!(
        !ok && err.contains("needs a restart"),
        "farm node: a changed [farm] power was not rejected as restart-only: {err:?}"
    );
    let check = cfg.replacen("[farm]\n", "[farm]\ncheck = { type = \"tcp\" }\n", 1);
    std::fs::write(n1.config_path(), &check)?;
    cli_ok(&sock, &["reload"]).context("a changed [farm] check must reload")?;
    serves()?;
    f.finish()
}
