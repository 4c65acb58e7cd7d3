//! End-to-end farm mode and director failover: one `farmlb run` per node in its own network
//! namespace, all on one bridge with the client, real TCP connections to the VIP. Run as root,
//! one test at a time (`cargo xtask test` does).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use farmlb::farm::FarmStatus;
use lb_tests::{
    cluster::{ms, Extra, Failover, Farm, Prober, FARM_KEY as KEY},
    connect_many,
    farm_rig::*,
    format_distribution, in_netns, ping_all, wait_until, LongConn,
};

const WEB: u16 = 80;
const STICKY: u16 = 81;

fn services() -> Vec<FarmService> {
    vec![
        FarmService::farm("web", IpAddr::V4(FARM_VIP), WEB),
        FarmService {
            hash: "src-ip",
            ..FarmService::farm("sticky", IpAddr::V4(FARM_VIP), STICKY)
        },
    ]
}

fn farm(prefix: &str) -> Result<Farm> {
    farm_with(
        prefix,
        services(),
        Box::new(|_| String::new()),
        Ipv4Addr::UNSPECIFIED.into(),
    )
}

/// Three farm nodes serving `services`, each with an identity server on every service port
/// bound to `bind`, node configs extended by `extra`; returns once every node sees all three.
fn farm_with(prefix: &str, services: Vec<FarmService>, extra: Extra, bind: IpAddr) -> Result<Farm> {
    Farm::up(prefix, services, extra, bind)
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
    let sources = f.rig.client_sources_v4();
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
    let sources = f.rig.client_sources_v4();
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
    let sources = f.rig.client_sources_v4();
    let (counts, failures) = f.rig.connect(vip(WEB), WEB, 300);
    println!(
        "300 connections to the farm:\n{}",
        format_distribution(&counts)
    );
    ensure!(failures.is_empty(), "failures: {failures:?}\n{}", f.logs());
    check_balance(&counts, 3, 0.25)?;
    check_sticky(&f)?;
    let status = lb_userspace_status(&f, "n1")?;
    println!("{status}");
    // `farmlb status --config` lists every member alive with its power and share.
    ensure!(
        status
            .lines()
            .filter(|l| l.contains(":4800") && l.contains("alive"))
            .count()
            == 3,
        "status should list 3 alive members:\n{status}"
    );

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
    let clean = Prober::new(
        &f.rig.ns_client(),
        sources.clone(),
        SocketAddr::new(vip(WEB), WEB),
        Duration::from_millis(150),
    )
    .until_clean(t0, 60, Duration::from_secs(5), |id| id != "n3");
    let streak = clean.streak;
    let redistribution = clean.last_bad.unwrap_or_default();
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
    let (counts, failures) = f.rig.connect(vip(WEB), WEB, 100);
    ensure!(failures.is_empty(), "after failover: {failures:?}");
    ensure!(!counts.contains_key("n3"), "n3 still served: {counts:?}");
    println!("after failover:\n{}", format_distribution(&counts));
    // Every long-lived connection on a survivor still exchanges data.
    let mut survivors: Vec<LongConn> = long.into_iter().filter(|c| c.identity() != "n3").collect();
    ping_all(&mut survivors, "(survivor)")?;
    println!("{} survivor connections still echo", survivors.len());

    // Bring n3 back: it takes a share again; no established connection breaks.
    f.rig.set_link("n3", true)?;
    let t1 = Instant::now();
    f.start_node("n3")?;
    let rejoin = f.wait_members(&f.tags.clone(), 3, Duration::from_secs(10))?;
    println!(
        "n3 rejoined: all nodes see 3 members {:.0} ms after restart",
        (t1.elapsed().max(rejoin)).as_secs_f64() * 1000.0
    );
    thread::sleep(Duration::from_millis(300));
    let (counts, failures) = f.rig.connect(vip(WEB), WEB, 300);
    println!("after rejoin:\n{}", format_distribution(&counts));
    ensure!(
        failures.is_empty(),
        "after rejoin: {failures:?}\n{}",
        f.logs()
    );
    check_balance(&counts, 3, 0.25)?;
    ping_all(&mut survivors, "on rejoin")?;
    println!(
        "{} connections still echo after the rejoin",
        survivors.len()
    );
    let mut again = open_long(&f, 2)?;
    for c in &mut again {
        c.ping()?;
    }
    f.finish()
}

fn lb_userspace_status(f: &Farm, tag: &str) -> Result<String> {
    let out = lb_tests::netns::run(&[
        &lb_tests::farmlb_bin().to_string_lossy(),
        "status",
        "--config",
        &f.nodes[tag].config_path().to_string_lossy(),
    ])?;
    Ok(out)
}

/// Datagrams from a member's address (another port: a misconfigured or forged sender) that
/// fail authentication or replay are ignored and counted. (A stranger's are mostly dropped
/// by the socket's kernel filter before they are read: `farm::sockfilter`.)
#[test]
fn membership_packets_with_a_wrong_key_are_ignored_and_counted() -> Result<()> {
    let f = farm("ef2")?;
    let before = f.status("n1")?;
    let target = SocketAddr::new(IpAddr::V4(f.rig.addr("n1")), MEMBER_PORT);
    let from = SocketAddr::new(IpAddr::V4(f.rig.addr("n2")), 0);
    // Forged: right format, wrong key. Replayed: a correctly keyed datagram sent twice.
    let sent = in_netns(&f.rig.ns("n2"), move || -> Result<()> {
        let s = std::net::UdpSocket::bind(from)?;
        let mut wrong = farmlb::farm::membership::Auth::new(b"not-the-farm-key-at-all".to_vec(), 9);
        for _ in 0..5 {
            s.send_to(&wrong.seal(b"forged"), target)?;
        }
        s.send_to(b"garbage", target)?;
        let mut right = farmlb::farm::membership::Auth::new(KEY.as_bytes().to_vec(), 9);
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
    f.finish()
}

/// Two directors in failover (IPv4 or IPv6 VIP) in front of three backends, once the
/// directors have settled.
fn failover(prefix: &str, v6: bool) -> Result<Failover> {
    let bind: IpAddr = if v6 {
        Ipv6Addr::UNSPECIFIED.into()
    } else {
        Ipv4Addr::UNSPECIFIED.into()
    };
    let f = Failover::up(FarmRig::failover(prefix, 2, 3)?, bind, WEB, |rig| {
        let backends = rig.tags(Role::Backend).into_iter();
        let (name, vip, backends) = if v6 {
            let b = backends.map(|b| IpAddr::V6(rig.addr6(&b))).collect();
            ("web6", IpAddr::V6(FARM_VIP6), b)
        } else {
            let b = backends.map(|b| IpAddr::V4(rig.addr(&b))).collect();
            ("web", IpAddr::V4(FARM_VIP), b)
        };
        vec![FarmService::dr(name, vip, WEB, backends)]
    })?;
    thread::sleep(Duration::from_millis(800));
    Ok(f)
}

/// kill -9 the active director (d1) under a stream of new connections: when (after the kill)
/// they start succeeding for good; afterwards every connection must succeed, and that
/// within 1.5 s. `report` prints the gap first. Its link stays up: the switch keeps delivering frames
/// for d1's MAC to the dead port, so only the standby's gratuitous ARP (IPv6: unsolicited
/// neighbour advertisement) moves the traffic (a cut link would make the switch flood d1's
/// MAC to the standby at once, hiding the takeover).
fn takeover(
    f: &mut Failover,
    dst: SocketAddr,
    sources: &[IpAddr],
    report: impl FnOnce(&Failover, Duration) -> Result<()>,
) -> Result<()> {
    let t0 = Instant::now();
    f.nodes[0].kill9()?;
    let gap = Prober::new(
        &f.rig.ns_client(),
        sources.to_vec(),
        dst,
        Duration::from_millis(100),
    )
    .until_stable(t0, Duration::from_millis(500), Duration::from_secs(6))
    .with_context(|| format!("no connection through the standby\n{}", f.logs()))?;
    report(f, gap)?;
    f.connect_ok(dst, sources, 60, "after failover")?;
    ensure!(
        gap <= Duration::from_millis(1500),
        "failover gap {gap:?} > 1.5 s"
    );
    Ok(())
}

#[test]
fn director_failover_keeps_serving() -> Result<()> {
    let mut f = failover("ef3", false)?;
    let sources = f.rig.client_sources_v4();
    let dst = SocketAddr::new(IpAddr::V4(FARM_VIP), WEB);
    let counts = f.connect_ok(dst, &sources, 60, "before failover")?;
    println!(
        "through the active director:\n{}",
        format_distribution(&counts)
    );
    let mut long = LongConn::open(&f.rig.ns_client(), sources[0], dst.ip(), WEB)?;

    takeover(&mut f, dst, &sources, |_, gap| {
        println!(
            "director failover: new connections resume {:.0} ms after kill -9 of the active \
             director",
            gap.as_secs_f64() * 1000.0
        );
        Ok(())
    })?;
    match long.ping() {
        Ok(_) => println!("a connection opened before the failover still echoes (same backend)"),
        Err(e) => println!("note: pre-failover connection lost: {e:#}"),
    }
    f.finish()
}

/// Node health: a node whose own service stops withdraws (power 0) while its farmlb keeps
/// running. The check is the shared engine's tcp check, configured like a backend's.
#[test]
fn node_check_withdraws_a_node_whose_service_stops() -> Result<()> {
    const INTERVAL_MS: u64 = 500;
    const FALL: u64 = 2;
    const RISE: u64 = 2;
    let check = format!(
        "check = {{ type = \"tcp\", interval = \"{INTERVAL_MS}ms\", timeout = \"300ms\", \
         rise = {RISE}, fall = {FALL} }}\n"
    );
    let mut f = farm_with(
        "ef4",
        services(),
        Box::new(move |_| check.clone()),
        Ipv4Addr::UNSPECIFIED.into(),
    )?;
    for t in f.tags.clone() {
        wait_until(Duration::from_secs(5), "nodes checked and healthy", || {
            Ok(f.status(&t)
                .is_ok_and(|s| s.healthy && s.power == 1 && s.last_check.is_some()))
        })?;
    }
    let st = f.status("n3")?;
    println!(
        "n3: check {}; last {}",
        st.check.clone().unwrap_or_default(),
        st.last_check.clone().unwrap_or_default()
    );
    let sources = f.rig.client_sources_v4();
    let (counts, failures) = f.rig.connect(vip(WEB), WEB, 150);
    ensure!(failures.is_empty(), "before: {failures:?}\n{}", f.logs());
    println!("before:\n{}", format_distribution(&counts));
    ensure!(counts.len() == 3, "not every node served: {counts:?}");
    let long: Vec<LongConn> = open_long(&f, 3)?;
    let mut others: Vec<LongConn> = long.into_iter().filter(|c| c.identity() != "n3").collect();

    // Stop n3's web server; its farmlb keeps running.
    let limit = Duration::from_millis(FALL * INTERVAL_MS + INTERVAL_MS + 1500);
    let (s3, s1) = (status_path(&f.rig, "n3"), status_path(&f.rig, "n1"));
    let t0 = Instant::now();
    f.stop_server("n3", WEB);
    let watcher = thread::spawn(move || {
        let (mut own, mut seen) = (None, None);
        while t0.elapsed() < Duration::from_secs(10) && (own.is_none() || seen.is_none()) {
            if own.is_none() && FarmStatus::read(&s3).is_ok_and(|s| !s.healthy && s.power == 0) {
                own = Some(t0.elapsed());
            }
            if seen.is_none()
                && FarmStatus::read(&s1)
                    .is_ok_and(|s| s.members.iter().any(|m| m.node == 3 && m.power == 0))
            {
                seen = Some(t0.elapsed());
            }
            thread::sleep(Duration::from_millis(5));
        }
        (own, seen)
    });
    let clean = Prober::new(
        &f.rig.ns_client(),
        sources.clone(),
        SocketAddr::new(vip(WEB), WEB),
        Duration::from_millis(300),
    )
    .until_clean(t0, 60, limit + Duration::from_secs(3), |id| id != "n3");
    let (last_bad, bad, streak) = (clean.last_bad, clean.bad, clean.streak);
    let (own, seen) = watcher.join().expect("watcher");
    println!(
        "n3's server stopped: n3 withdrew (unhealthy, power 0) after {}, n1 saw n3 at power 0 \
         after {}; {bad} new connections failed, the last at {}; limit fall×interval + interval \
         + 1.5 s = {} ms",
        ms(own),
        ms(seen),
        ms(last_bad),
        limit.as_millis()
    );
    ensure!(streak >= 60, "new connections kept failing\n{}", f.logs());
    ensure!(
        last_bad.unwrap_or_default() <= limit,
        "new connections still reached n3 after {:?} (limit {limit:?})",
        last_bad
    );
    ensure!(
        own.is_some() && seen.is_some(),
        "n3's withdrawal not published"
    );
    ensure!(
        f.nodes.get_mut("n3").expect("n3").is_running(),
        "n3's farmlb exited"
    );
    let (counts, failures) = f.rig.connect(vip(WEB), WEB, 150);
    println!("while n3 is unhealthy:\n{}", format_distribution(&counts));
    ensure!(failures.is_empty(), "while n3 is down: {failures:?}");
    ensure!(!counts.contains_key("n3"), "n3 still got new connections");
    ensure!(counts.len() == 2, "n1 and n2 should share: {counts:?}");
    ping_all(&mut others, "(established)")?;
    println!(
        "{} established connections on n1/n2 still echo",
        others.len()
    );

    // The server is back: after `rise` good checks n3 takes a share again.
    let t1 = Instant::now();
    f.start_server("n3", WEB)?;
    let back = wait_until(
        Duration::from_secs(10),
        "n3 back at power 1 in n1's view",
        || {
            Ok(FarmStatus::read(&status_path(&f.rig, "n1"))
                .is_ok_and(|s| s.members.iter().any(|m| m.node == 3 && m.power == 1)))
        },
    )?;
    ensure!(f.status("n3")?.healthy);
    println!(
        "n3's server restarted: n1 sees n3 at power 1 again {:.0} ms later (rise {RISE} × {INTERVAL_MS} ms + phase)",
        back.max(t1.elapsed()).as_secs_f64() * 1000.0
    );
    let (counts, failures) = f.rig.connect(vip(WEB), WEB, 300);
    println!("after n3 recovered:\n{}", format_distribution(&counts));
    ensure!(failures.is_empty(), "after recovery: {failures:?}");
    check_balance(&counts, 3, 0.25)?;
    ping_all(&mut others, "on recovery")?;
    f.finish()
}

fn hook_file(prefix: &str, tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("farmlb-{prefix}-{tag}.hooks"))
}

/// One hook line: (event, wall-clock time, key=value fields).
type HookLine = (String, f64, BTreeMap<String, String>);

fn hook_lines(path: &Path) -> Vec<HookLine> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let ev = words.next()?.to_string();
            let kv: BTreeMap<String, String> = words
                .filter_map(|w| w.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let t = kv.get("t")?.parse().ok()?;
            Some((ev, t, kv))
        })
        .collect()
}

fn wall() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64()
}

/// Wait up to `within` for [`find_hook`] to find a line; the line.
fn wait_hook(
    within: Duration,
    path: &Path,
    event: &str,
    since: f64,
    want: &[(&str, &str)],
) -> Result<HookLine> {
    let what = format!("{event} hook in {}", path.display());
    wait_until(within, &what, || {
        Ok(find_hook(path, event, since, want).is_some())
    })?;
    Ok(find_hook(path, event, since, want).expect("found"))
}

/// The first `event` line in `path` at or after `since` whose fields include `want`.
fn find_hook(path: &Path, event: &str, since: f64, want: &[(&str, &str)]) -> Option<HookLine> {
    hook_lines(path).into_iter().find(|(e, t, kv)| {
        e == event
            && *t >= since
            && want
                .iter()
                .all(|(k, v)| kv.get(*k).map(String::as_str) == Some(*v))
    })
}

/// User hooks: start, member down / up and ownership change reach the hooks with their
/// environment when a node is killed and restarted; failing hooks (n2's all exit 1) are
/// logged and change nothing.
#[test]
fn hooks_run_on_farm_events_and_failures_are_not_fatal() -> Result<()> {
    const P: &str = "ef5";
    for t in ["n1", "n2", "n3"] {
        let _ = std::fs::remove_file(hook_file(P, t));
    }
    let extra: Extra = Box::new(|tag: &str| {
        let file = hook_file(P, tag);
        let line = format!(
            "echo \"$FARMLB_EVENT t=$(date +%s.%N) node=$FARMLB_NODE member=${{FARMLB_MEMBER:-}} \
             addr=${{FARMLB_MEMBER_ADDR:-}} members=$FARMLB_MEMBERS share=$FARMLB_SHARE \
             old=${{FARMLB_OLD_SHARE:-}}\" >> {}",
            file.display()
        );
        let cmd = if tag == "n2" {
            format!("{line}; exit 1")
        } else {
            line
        };
        let mut s = String::from("\n[farm.hooks]\n");
        for h in [
            "on_start",
            "on_stop",
            "on_member_up",
            "on_member_down",
            "on_ownership_change",
        ] {
            s += &format!("{h} = '{cmd}'\n");
        }
        s
    });
    let mut f = farm_with(P, services(), extra, Ipv4Addr::UNSPECIFIED.into())?;
    let files: BTreeMap<String, PathBuf> = f
        .tags
        .iter()
        .map(|t| (t.clone(), hook_file(P, t)))
        .collect();
    for (t, file) in &files {
        let id = &t[1..];
        wait_hook(Duration::from_secs(5), file, "start", 0.0, &[("node", id)])?;
    }

    // kill -9 n3: n1 and n2 run member_down (member 3) and ownership_change (their share
    // grows from 1/3 to 1/2).
    let killed = wall();
    f.nodes.get_mut("n3").expect("n3").kill9()?;
    let mut down_ms = Vec::new();
    for t in ["n1", "n2"] {
        let file = &files[t];
        let (_, at, kv) = wait_hook(
            Duration::from_secs(5),
            file,
            "member_down",
            killed,
            &[("member", "3")],
        )
        .with_context(|| f.logs())?;
        ensure!(
            kv["addr"] == format!("{}:{MEMBER_PORT}", f.rig.addr("n3")),
            "{kv:?}"
        );
        ensure!(kv["members"] == "1,2", "{kv:?}");
        down_ms.push(format!("{t} {:.0} ms", (at - killed) * 1000.0));
        let share = [("share", "0.5000")];
        wait_hook(
            Duration::from_secs(3),
            file,
            "ownership_change",
            killed,
            &share,
        )?;
    }
    println!(
        "member_down hooks ran after kill -9 of n3: {}",
        down_ms.join(", ")
    );

    // Restart n3: its start hook runs again, n1 and n2 run member_up and ownership_change.
    let restarted = wall();
    f.start_node("n3")?;
    f.wait_members(&f.tags.clone(), 3, Duration::from_secs(10))?;
    let mut up_ms = Vec::new();
    for t in ["n1", "n2"] {
        let file = &files[t];
        wait_until(
            Duration::from_secs(5),
            &format!("member_up hook on {t}"),
            || {
                Ok(
                    find_hook(file, "member_up", restarted, &[("member", "3")]).is_some()
                        && find_hook(file, "ownership_change", restarted, &[]).is_some(),
                )
            },
        )?;
        let (_, at, _) =
            find_hook(file, "member_up", restarted, &[("member", "3")]).expect("found");
        up_ms.push(format!("{t} {:.0} ms", (at - restarted) * 1000.0));
    }
    let n3 = [("node", "3")];
    wait_hook(
        Duration::from_secs(3),
        &files["n3"],
        "start",
        restarted,
        &n3,
    )?;
    println!(
        "member_up hooks ran after n3's restart: {}",
        up_ms.join(", ")
    );

    // n2's hooks all failed: it is still running and serving.
    ensure!(f.nodes.get_mut("n2").expect("n2").is_running(), "n2 exited");
    ensure!(
        f.nodes["n2"].log().contains("failed: exit status: 1"),
        "n2's failing hooks were not logged:\n{}",
        f.nodes["n2"].log()
    );
    thread::sleep(Duration::from_millis(300));
    let (counts, failures) = f.rig.connect(vip(WEB), WEB, 90);
    ensure!(failures.is_empty(), "{failures:?}");
    ensure!(counts.contains_key("n2"), "n2 stopped serving: {counts:?}");
    println!(
        "n2 (every hook exits 1) still serves:\n{}",
        format_distribution(&counts)
    );
    // A failing stop hook does not make the daemon fail either.
    f.nodes.get_mut("n2").expect("n2").stop()?;
    ensure!(
        find_hook(&files["n2"], "stop", restarted, &[("node", "2")]).is_some(),
        "no stop hook"
    );
    for (t, file) in &files {
        println!("--- hooks of {t} ---");
        for (ev, _, kv) in hook_lines(file) {
            println!(
                "{ev:<17} member={:<2} members={:<6} share={} old={}",
                kv.get("member").map_or("", |s| s),
                kv.get("members").map_or("", |s| s),
                kv.get("share").map_or("", |s| s),
                kv.get("old").map_or("", |s| s)
            );
        }
    }
    f.finish()
}

/// IPv6 farm VIP: the client resolves the VIP with neighbour discovery (answered by the
/// leader with the virtual MAC) and its connections spread over the nodes; after the
/// leader dies the next one answers.
#[test]
fn farm_serves_an_ipv6_vip() -> Result<()> {
    let svc = vec![
        FarmService::farm("web6", IpAddr::V6(FARM_VIP6), WEB),
        FarmService::farm("web", IpAddr::V4(FARM_VIP), WEB),
    ];
    let mut f = farm_with(
        "ef6",
        svc,
        Box::new(|_| String::new()),
        Ipv6Addr::UNSPECIFIED.into(),
    )?;
    let neigh = |f: &Farm| f.rig.client_neighbour(IpAddr::V6(FARM_VIP6));
    ensure!(neigh(&f)?.is_empty(), "client already knows the VIP");
    let sources = f.rig.client_sources_v6();
    let dst = SocketAddr::new(IpAddr::V6(FARM_VIP6), WEB);
    let t0 = Instant::now();
    let first = try_identify(&f.rig.ns_client(), sources[0], dst, Duration::from_secs(3))
        .with_context(|| format!("first IPv6 connection\n{}", f.logs()))?;
    println!(
        "first IPv6 connection (neighbour discovery included): {first} in {:.1} ms; client \
         neighbour entry: {}",
        t0.elapsed().as_secs_f64() * 1000.0,
        neigh(&f)?
    );
    ensure!(
        neigh(&f)?.contains("lladdr 02:fa:4c:42:00:01"),
        "the VIP must resolve to the virtual MAC: {}",
        neigh(&f)?
    );
    let n = 300;
    let (counts, failures) = f.rig.connect(IpAddr::V6(FARM_VIP6), WEB, n);
    println!(
        "{n} IPv6 connections to [{FARM_VIP6}]:{WEB}:\n{}",
        format_distribution(&counts)
    );
    ensure!(
        failures.is_empty(),
        "IPv6 failures: {failures:?}\n{}",
        f.logs()
    );
    check_balance(&counts, 3, 0.35)?;
    wait_until(Duration::from_secs(3), "n1's answer counter", || {
        Ok(f.status("n1").is_ok_and(|s| s.arp_answered > 0))
    })?;
    let st = f.status("n1")?;
    ensure!(st.role == "active", "n1 should answer: {st:?}");
    for t in ["n2", "n3"] {
        ensure!(f.status(t)?.arp_answered == 0, "standby {t} answered");
    }
    println!(
        "n1 (leader) answered {} ARP/ND requests, standbys 0",
        st.arp_answered
    );
    // The IPv4 VIP still works on the same (dual-stack) servers.
    let (_, failures) = f.rig.connect(vip(WEB), WEB, 60);
    ensure!(failures.is_empty(), "IPv4 failures: {failures:?}");

    // The leader dies: n2 takes over the answers. Forget the VIP on the client so it must
    // ask again.
    f.nodes.get_mut("n1").expect("n1").kill9()?;
    f.rig.set_link("n1", false)?;
    let rest = vec!["n2".to_string(), "n3".to_string()];
    let gone = f.wait_members(&rest, 2, Duration::from_secs(5))?;
    lb_tests::netns::run(&[
        "ip",
        "-n",
        &f.rig.ns_client(),
        "-6",
        "neigh",
        "flush",
        "dev",
        "eth0",
    ])?;
    let t1 = Instant::now();
    try_identify(&f.rig.ns_client(), sources[1], dst, Duration::from_secs(3))
        .with_context(|| format!("IPv6 after the leader died\n{}", f.logs()))?;
    let resolve = t1.elapsed();
    let (counts, failures) = f.rig.connect(IpAddr::V6(FARM_VIP6), WEB, 150);
    ensure!(failures.is_empty(), "after the leader died: {failures:?}");
    check_balance(&counts, 2, 0.35)?;
    // The status file refreshes its counters every 2 s.
    wait_until(Duration::from_secs(3), "n2 answering as the leader", || {
        Ok(f.status("n2")
            .is_ok_and(|s| s.role == "active" && s.arp_answered > 0))
    })
    .with_context(|| format!("{:?}", f.status("n2")))?;
    println!(
        "leader n1 killed: n2/n3 saw it gone after {:.0} ms; the client re-resolved the VIP \
         through n2 and connected in {:.1} ms; 150 IPv6 connections:\n{}",
        gone.as_secs_f64() * 1000.0,
        resolve.as_secs_f64() * 1000.0,
        format_distribution(&counts)
    );
    f.finish()
}

/// Director failover for an IPv6 VIP: the active director answers neighbour solicitations
/// with its own MAC; when it dies the standby's unsolicited neighbour advertisement
/// (override set) moves the client to the standby's MAC.
#[test]
fn director_failover_serves_an_ipv6_vip() -> Result<()> {
    let mut f = failover("ef7", true)?;
    let neigh = |f: &Failover| f.rig.client_neighbour(IpAddr::V6(FARM_VIP6));
    let sources = f.rig.client_sources_v6();
    let dst = SocketAddr::new(IpAddr::V6(FARM_VIP6), WEB);
    let counts = f.connect_ok(dst, &sources, 60, "before failover")?;
    println!(
        "IPv6 through the active director (client: {}):\n{}",
        neigh(&f)?,
        format_distribution(&counts)
    );
    ensure!(counts.len() == 3, "not every backend served: {counts:?}");
    ensure!(
        neigh(&f)?.contains("lladdr 02:99:00:00:00:03"),
        "the VIP should resolve to d1's MAC: {}",
        neigh(&f)?
    );

    // kill -9 d1, link up: only d2's unsolicited advertisement moves the client.
    takeover(&mut f, dst, &sources, |f, gap| {
        println!(
            "IPv6 director failover: new connections resume {:.0} ms after kill -9 of the \
             active director; client now: {}",
            gap.as_secs_f64() * 1000.0,
            neigh(f)?
        );
        // d1's pinned data plane keeps forwarding after its daemon died, so connections may
        // never stop: wait for d2's advertisement instead of assuming it came first.
        let moved = wait_until(Duration::from_secs(3), "the VIP to move to d2", || {
            Ok(neigh(f)?.contains("lladdr 02:99:00:00:00:04"))
        });
        moved.with_context(|| {
            format!(
                "the VIP should now resolve to d2's MAC: {}",
                neigh(f).unwrap_or_default()
            )
        })?;
        Ok(())
    })?;
    f.finish()
}
