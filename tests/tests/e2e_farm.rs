//! End-to-end farm mode and director failover: one `farmlb run` per node in its own network
//! namespace, all on one bridge with the client, real TCP connections to the VIP. Run as root,
//! one test at a time (`cargo xtask test` does).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use farmlb::farm::FarmStatus;
use lb_tests::{
    connect_many, farm_rig::*, format_distribution, in_netns, tally, IdentityServer, LongConn,
};

const KEY: &str = "farm-test-key-0123456789abcdef";
const WEB: u16 = 80;
const STICKY: u16 = 81;

fn services() -> Vec<FarmService> {
    vec![
        FarmService {
            name: "web".into(),
            port: WEB,
            hash: "5-tuple",
            forwarding: "farm",
            backends: vec![],
        },
        FarmService {
            name: "sticky".into(),
            port: STICKY,
            hash: "src-ip",
            forwarding: "farm",
            backends: vec![],
        },
    ]
}

struct Farm {
    rig: FarmRig,
    nodes: BTreeMap<String, FarmNode>,
    _servers: Vec<IdentityServer>,
    tags: Vec<String>,
}

impl Farm {
    fn config(&self, tag: &str) -> Result<String> {
        let id: u32 = tag[1..].parse()?;
        let key = self.rig.write_key(KEY)?;
        Ok(node_config(
            &self.rig,
            tag,
            id,
            &self.tags,
            &key,
            &services(),
            "",
        ))
    }

    fn start_node(&mut self, tag: &str) -> Result<()> {
        let cfg = self.config(tag)?;
        let node = FarmNode::start(&self.rig, tag, &cfg)?;
        self.nodes.insert(tag.into(), node);
        Ok(())
    }

    fn status(&self, tag: &str) -> Result<FarmStatus> {
        FarmStatus::read(&status_path(&self.rig, tag))
    }

    fn member_count(&self, tag: &str) -> usize {
        self.status(tag).map(|s| s.members.len()).unwrap_or(0)
    }

    fn logs(&self) -> String {
        self.nodes
            .values()
            .map(|n| format!("--- {} ---\n{}", n.tag, n.log()))
            .collect()
    }
}

fn farm(prefix: &str) -> Result<Farm> {
    let rig = FarmRig::farm(prefix, 3)?;
    let tags = rig.tags(Role::Farm);
    let mut servers = Vec::new();
    for t in &tags {
        for port in [WEB, STICKY] {
            let any = SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), port);
            servers.push(IdentityServer::start(&rig.ns(t), any, t)?);
        }
    }
    let mut f = Farm {
        rig,
        nodes: BTreeMap::new(),
        _servers: servers,
        tags: tags.clone(),
    };
    for t in &tags {
        f.start_node(t)?;
    }
    wait_members(&f, &tags, 3, Duration::from_secs(10))?;
    Ok(f)
}

fn wait_members(f: &Farm, tags: &[String], n: usize, within: Duration) -> Result<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < within {
        if tags.iter().all(|t| f.member_count(t) == n) {
            return Ok(t0.elapsed());
        }
        thread::sleep(Duration::from_millis(20));
    }
    anyhow::bail!(
        "members did not converge to {n} within {within:?}; logs:\n{}",
        f.logs()
    )
}

fn vip(port: u16) -> IpAddr {
    let _ = port;
    IpAddr::V4(FARM_VIP)
}

fn check_balance(counts: &BTreeMap<String, usize>, nodes: usize, tol: f64) -> Result<()> {
    let total: usize = counts.values().sum();
    let fair = total as f64 / nodes as f64;
    ensure!(counts.len() == nodes, "not every node served: {counts:?}");
    for (id, &n) in counts {
        let dev = (n as f64 - fair) / fair;
        ensure!(
            dev.abs() <= tol,
            "node {id} got {n} of {total} ({:+.1}%, allowed ±{:.0}%)",
            dev * 100.0,
            tol * 100.0
        );
    }
    Ok(())
}

/// Connections from every source, several each on the src-ip service: one node per source.
fn check_sticky(f: &Farm) -> Result<()> {
    let sources = f.rig.client_sources();
    let results = connect_many(
        &f.rig.ns_client(),
        vip(STICKY),
        STICKY,
        sources.len() * 4,
        &sources,
    );
    let mut per_src: BTreeMap<IpAddr, BTreeSet<String>> = BTreeMap::new();
    for (i, r) in results.iter().enumerate() {
        let id = r.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))?;
        per_src
            .entry(sources[i % sources.len()])
            .or_default()
            .insert(id.clone());
    }
    let nodes: BTreeSet<&String> = per_src.values().flatten().collect();
    for (src, ids) in &per_src {
        ensure!(
            ids.len() == 1,
            "source {src} reached several nodes: {ids:?}"
        );
    }
    println!(
        "src-ip: {} sources each stuck to one node; nodes used: {nodes:?}",
        per_src.len()
    );
    ensure!(nodes.len() == 3, "src-ip mode did not use every node");
    Ok(())
}

fn open_long(f: &Farm, per_node: usize) -> Result<Vec<LongConn>> {
    let mut conns = Vec::new();
    let mut got: BTreeMap<String, usize> = BTreeMap::new();
    let sources = f.rig.client_sources();
    for i in 0..400 {
        if f.tags
            .iter()
            .all(|t| got.get(t).copied().unwrap_or(0) >= per_node)
        {
            break;
        }
        let c = LongConn::open(
            &f.rig.ns_client(),
            sources[i % sources.len()],
            vip(WEB),
            WEB,
        )?;
        let n = got.entry(c.identity().to_string()).or_insert(0);
        if *n < per_node {
            *n += 1;
            conns.push(c);
        }
    }
    ensure!(
        got.len() == 3,
        "long-lived connections did not reach every node: {got:?}"
    );
    Ok(conns)
}

#[test]
fn farm_balances_survives_failure_and_rejoin() -> Result<()> {
    let mut f = farm("ef1")?;

    // Balance: 300 connections, 5-tuple.
    let sources = f.rig.client_sources();
    let results = connect_many(&f.rig.ns_client(), vip(WEB), WEB, 300, &sources);
    let (counts, failures) = tally(&results);
    println!(
        "300 connections to the farm:\n{}",
        format_distribution(&counts)
    );
    ensure!(failures.is_empty(), "failures: {failures:?}\n{}", f.logs());
    check_balance(&counts, 3, 0.25)?;
    check_sticky(&f)?;
    println!("{}", lb_userspace_status(&f, "n1")?);

    // Long-lived connections on every node.
    let mut long = open_long(&f, 4)?;
    for c in &mut long {
        c.ping()?;
    }

    // Kill n3 hard and cut its link; watch n1's view for the detection time meanwhile.
    let status_n1 = status_path(&f.rig, "n1");
    let t0 = Instant::now();
    f.nodes.get_mut("n3").expect("n3").kill9()?;
    f.rig.set_link("n3", false)?;
    let detector = thread::spawn(move || {
        while t0.elapsed() < Duration::from_secs(5) {
            if FarmStatus::read(&status_n1).is_ok_and(|s| s.members.len() == 2) {
                return Some(t0.elapsed());
            }
            thread::sleep(Duration::from_millis(5));
        }
        None
    });
    let (mut last_fail, mut streak) = (None::<Duration>, 0);
    let mut i = 0usize;
    while t0.elapsed() < Duration::from_secs(5) && streak < 60 {
        let src = sources[i % sources.len()];
        i += 1;
        match try_identify(
            &f.rig.ns_client(),
            src,
            SocketAddr::new(vip(WEB), WEB),
            Duration::from_millis(150),
        ) {
            Ok(id) if id != "n3" => streak += 1,
            _ => {
                last_fail = Some(t0.elapsed());
                streak = 0;
            }
        }
    }
    let redistribution = last_fail.unwrap_or_default();
    let detected = detector.join().expect("detector thread");
    println!(
        "kill -9 of n3: n1 declared it down and installed new tables {} ms after the kill; new \
         connections all succeed from {:.0} ms on (last failed attempt)",
        detected.map_or("(never)".into(), |d| format!(
            "{:.0}",
            d.as_secs_f64() * 1000.0
        )),
        redistribution.as_secs_f64() * 1000.0,
    );
    ensure!(
        detected.is_some_and(|d| d <= Duration::from_millis(1500)),
        "n3 not declared down within 1.5 s"
    );
    ensure!(streak >= 60, "new connections kept failing\n{}", f.logs());
    ensure!(
        redistribution <= Duration::from_millis(1500),
        "redistribution took {redistribution:?} (limit 1.5 s)"
    );
    let results = connect_many(&f.rig.ns_client(), vip(WEB), WEB, 100, &sources);
    let (counts, failures) = tally(&results);
    ensure!(failures.is_empty(), "after failover: {failures:?}");
    ensure!(!counts.contains_key("n3"), "n3 still served: {counts:?}");
    println!("after failover:\n{}", format_distribution(&counts));
    // Every long-lived connection on a survivor still exchanges data.
    let mut survivors: Vec<LongConn> = long.into_iter().filter(|c| c.identity() != "n3").collect();
    for c in &mut survivors {
        c.ping()
            .with_context(|| format!("survivor connection on {} broke", c.identity()))?;
    }
    println!("{} survivor connections still echo", survivors.len());

    // Bring n3 back: it takes a share again; no established connection breaks.
    f.rig.set_link("n3", true)?;
    let t1 = Instant::now();
    f.start_node("n3")?;
    let rejoin = wait_members(&f, &f.tags.clone(), 3, Duration::from_secs(10))?;
    println!(
        "n3 rejoined: all nodes see 3 members {:.0} ms after restart",
        (t1.elapsed().max(rejoin)).as_secs_f64() * 1000.0
    );
    thread::sleep(Duration::from_millis(300));
    let results = connect_many(&f.rig.ns_client(), vip(WEB), WEB, 300, &sources);
    let (counts, failures) = tally(&results);
    println!("after rejoin:\n{}", format_distribution(&counts));
    ensure!(
        failures.is_empty(),
        "after rejoin: {failures:?}\n{}",
        f.logs()
    );
    check_balance(&counts, 3, 0.25)?;
    for c in &mut survivors {
        c.ping()
            .with_context(|| format!("connection on {} broke on rejoin", c.identity()))?;
    }
    println!(
        "{} connections still echo after the rejoin",
        survivors.len()
    );
    let mut again = open_long(&f, 2)?;
    for c in &mut again {
        c.ping()?;
    }
    for n in f.nodes.values_mut() {
        n.stop()?;
    }
    f.rig.down()
}

fn lb_userspace_status(f: &Farm, tag: &str) -> Result<String> {
    let out = lb_tests::netns::run(&[
        &lb_tests::farmlb_bin().to_string_lossy(),
        "farm-status",
        "--config",
        &f.nodes[tag].config_path.to_string_lossy(),
    ])?;
    Ok(out)
}

#[test]
fn membership_packets_with_a_wrong_key_are_ignored_and_counted() -> Result<()> {
    let mut f = farm("ef2")?;
    let before = f.status("n1")?;
    let target = SocketAddr::new(IpAddr::V4(f.rig.addr("n1")), MEMBER_PORT);
    // Forged: right format, wrong key. Replayed: a correctly keyed datagram sent twice.
    let sent = in_netns(&f.rig.ns_client(), move || -> Result<()> {
        let s = std::net::UdpSocket::bind("10.99.0.2:0")?;
        let mut wrong = farmlb::membership::Auth::new(b"not-the-farm-key-at-all".to_vec(), 9);
        for _ in 0..5 {
            s.send_to(&wrong.seal(b"forged"), target)?;
        }
        s.send_to(b"garbage", target)?;
        let mut right = farmlb::membership::Auth::new(KEY.as_bytes().to_vec(), 9);
        let pkt = right.seal(b"not swim");
        s.send_to(&pkt, target)?;
        s.send_to(&pkt, target)?;
        Ok(())
    })?;
    sent?;
    thread::sleep(Duration::from_millis(500));
    let after = f.status("n1")?;
    println!(
        "n1: auth_failures {} -> {}, replays {} -> {}",
        before.auth_failures, after.auth_failures, before.replays, after.replays
    );
    ensure!(after.auth_failures >= before.auth_failures + 6);
    ensure!(after.replays > before.replays);
    ensure!(
        after.members == before.members,
        "membership changed: {after:?}"
    );
    for n in f.nodes.values_mut() {
        n.stop()?;
    }
    f.rig.down()
}

#[test]
fn director_failover_keeps_serving() -> Result<()> {
    let mut rig = FarmRig::failover("ef3", 2, 3)?;
    let backends = rig.tags(Role::Backend);
    let directors = rig.tags(Role::Director);
    let mut servers = Vec::new();
    for b in &backends {
        let any = SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), WEB);
        servers.push(IdentityServer::start(&rig.ns(b), any, b)?);
    }
    // Directors must know the backends' MACs: warm their neighbour tables.
    for d in &directors {
        for b in &backends {
            lb_tests::netns::exec(
                &rig.ns(d),
                &["ping", "-c1", "-W2", "-q", &rig.addr(b).to_string()],
            )?;
        }
    }
    let key = rig.write_key(KEY)?;
    let svc = vec![FarmService {
        name: "web".into(),
        port: WEB,
        hash: "5-tuple",
        forwarding: "dr",
        backends: backends.iter().map(|b| rig.addr(b)).collect(),
    }];
    let mut nodes = Vec::new();
    for (i, d) in directors.iter().enumerate() {
        let cfg = node_config(&rig, d, i as u32 + 1, &directors, &key, &svc, "");
        nodes.push(FarmNode::start(&rig, d, &cfg)?);
    }
    thread::sleep(Duration::from_millis(800));
    let sources = rig.client_sources();
    let dst = SocketAddr::new(IpAddr::V4(FARM_VIP), WEB);
    let results = connect_many(&rig.ns_client(), dst.ip(), WEB, 60, &sources);
    let (counts, failures) = tally(&results);
    let logs = |nodes: &Vec<FarmNode>| -> String {
        nodes
            .iter()
            .map(|n| format!("--- {} ---\n{}", n.tag, n.log()))
            .collect()
    };
    ensure!(
        failures.is_empty(),
        "before failover: {failures:?}\n{}",
        logs(&nodes)
    );
    println!(
        "through the active director:\n{}",
        format_distribution(&counts)
    );
    let mut long = LongConn::open(&rig.ns_client(), sources[0], dst.ip(), WEB)?;

    // Kill the active director (node 1 = d1) under a stream of new connections. Its link
    // stays up: the switch keeps delivering frames for d1's MAC to the dead port, so only the
    // standby's gratuitous ARP moves the traffic (a cut link would make the switch flood
    // d1's MAC to the standby at once, hiding the takeover).
    let t0 = Instant::now();
    nodes[0].kill9()?;
    let mut first_ok = None;
    let mut i = 0;
    while t0.elapsed() < Duration::from_secs(6) {
        let ok = try_identify(
            &rig.ns_client(),
            sources[i % sources.len()],
            dst,
            Duration::from_millis(100),
        )
        .is_ok();
        i += 1;
        if ok && first_ok.is_none() {
            first_ok = Some(t0.elapsed());
        }
        if first_ok.is_some() && !ok {
            first_ok = None; // not yet stable
        }
        if first_ok.is_some_and(|t| t0.elapsed() - t > Duration::from_millis(500)) {
            break;
        }
    }
    let gap = first_ok.context(format!(
        "no connection through the standby\n{}",
        logs(&nodes)
    ))?;
    println!(
        "director failover: new connections resume {:.0} ms after kill -9 of the active director",
        gap.as_secs_f64() * 1000.0
    );
    let results = connect_many(&rig.ns_client(), dst.ip(), WEB, 60, &sources);
    let (_, failures) = tally(&results);
    ensure!(
        failures.is_empty(),
        "after failover: {failures:?}\n{}",
        logs(&nodes)
    );
    ensure!(
        gap <= Duration::from_millis(1500),
        "failover gap {gap:?} > 1.5 s"
    );
    match long.ping() {
        Ok(_) => println!("a connection opened before the failover still echoes (same backend)"),
        Err(e) => println!("note: pre-failover connection lost: {e:#}"),
    }
    for n in &mut nodes {
        n.stop()?;
    }
    drop(servers);
    rig.down()
}
