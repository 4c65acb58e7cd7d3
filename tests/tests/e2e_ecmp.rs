//! Scale-out end to end: three directors behind a router doing ECMP, each announcing the VIPs
//! with BIRD 2 from the table farmlb writes (`[announce]`), real BGP + BFD sessions, real TCP
//! through real XDP. Run as root, one test at a time.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use lb_tests::{
    client::Traffic,
    ctl::status_json,
    ecmp_rig::{EcmpRig, ServiceSpec, VIP, VIP2, VIP6},
    format_distribution, ping_all, wait_until, IdentityServer, LongConn,
};

const WEB: u16 = 80;
const ALT: u16 = 8080;
const DIRECTORS: usize = 3;
const BACKENDS: usize = 3;

/// The rig with every BIRD and farmlb running and the VIP on 3 next hops at the router.
struct Scale {
    rig: EcmpRig,
    farmlb: Vec<lb_tests::process::Process>,
    /// BIRD index of each director (in `rig.bird`).
    birds: Vec<usize>,
    /// The identity servers on port 80 (held: dropping one stops it).
    _servers: Vec<IdentityServer>,
    alt: Vec<Option<IdentityServer>>,
}

fn services(rig: &EcmpRig, backends: usize) -> Vec<ServiceSpec<'static>> {
    let check =
        "check = { type = \"tcp\", interval = \"200ms\", timeout = \"150ms\", fall = 2, rise = 1 }";
    let all: Vec<IpAddr> = (0..backends).map(|i| rig.backend_addr(i).into()).collect();
    let all6: Vec<IpAddr> = (0..backends).map(|i| rig.backend_addr6(i).into()).collect();
    vec![
        ("web", VIP.into(), WEB, all.clone(), check),
        // VIP2 has its own backends' servers, so a test can fail all of them.
        ("alt", VIP2.into(), ALT, all[..2].to_vec(), check),
        // IPv6: announced into the table like the others (the rig's BGP carries IPv4 only).
        ("web6", VIP6.into(), WEB, all6, check),
    ]
}

impl Scale {
    fn up(prefix: &str, announce_extra: &str) -> Result<Scale> {
        let mut rig = EcmpRig::up(prefix, DIRECTORS, BACKENDS)?;
        let key = rig.write_key()?;
        let any = |p| SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), p);
        let servers = (0..BACKENDS)
            .map(|i| {
                IdentityServer::start(
                    &rig.ns(&EcmpRig::backend_tag(i)),
                    // Dual-stack: the IPv6 service's checks reach it too.
                    SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), WEB),
                    &EcmpRig::backend_tag(i),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let alt = (0..2)
            .map(|i| {
                IdentityServer::start(
                    &rig.ns(&EcmpRig::backend_tag(i)),
                    any(ALT),
                    &EcmpRig::backend_tag(i),
                )
                .map(Some)
            })
            .collect::<Result<Vec<_>>>()?;
        rig.start_router_bird()?;
        let mut birds = Vec::new();
        for i in 0..DIRECTORS {
            birds.push(rig.start_director_bird(i)?);
        }
        let mut farmlb = Vec::new();
        let svcs = services(&rig, BACKENDS);
        for i in 0..DIRECTORS {
            let conf = config_for(&rig, i, &key, announce_extra, &svcs);
            farmlb.push(rig.start_farmlb(i, &conf)?);
        }
        let s = Scale {
            rig,
            farmlb,
            birds,
            _servers: servers,
            alt,
        };
        let want: Vec<Ipv4Addr> = (0..DIRECTORS).map(|i| s.rig.director_addr(i)).collect();
        for vip in [VIP, VIP2] {
            wait_until(
                Duration::from_secs(30),
                "the router's ECMP route over every director",
                || Ok(s.rig.router_next_hops(vip)? == want),
            )
            .with_context(|| s.debug())?;
        }
        Ok(s)
    }

    fn debug(&self) -> String {
        let mut out = String::new();
        out += &format!(
            "router routes:\n{}\n",
            lb_tests::netns::run(&["ip", "-n", &self.rig.ns_router(), "route"]).unwrap_or_default()
        );
        for i in 0..DIRECTORS {
            out += &format!(
                "d{} table 100:\n{}\n",
                i + 1,
                lb_tests::netns::run(&[
                    "ip",
                    "-n",
                    &self.rig.ns(&EcmpRig::director_tag(i)),
                    "route",
                    "show",
                    "table",
                    "100"
                ])
                .unwrap_or_default()
            );
        }
        out
    }

    /// `stats.ct_miss_syn` of every director (new TCP connections it forwarded).
    fn syns(&self) -> Result<Vec<u64>> {
        (0..DIRECTORS)
            .map(|i| {
                if !self.rig.api_socket(i).exists() {
                    return Ok(0);
                }
                let v = status_json(&self.rig.api_socket(i))?;
                Ok(v["stats"]["ct_miss_syn"].as_u64().unwrap_or(0))
            })
            .collect()
    }
}

/// Director `i`'s config: the rig's, with the node's own check on [`down_flag`].
fn config_for(
    rig: &EcmpRig,
    i: usize,
    key: &std::path::Path,
    announce_extra: &str,
    svcs: &[ServiceSpec],
) -> String {
    let conf = rig.director_config(i, key, announce_extra, svcs);
    let check = format!(
        "[farm]\ncheck = {{ type = \"exec\", command = \"test ! -e {}\", \
         interval = \"250ms\", timeout = \"250ms\", fall = 2, rise = 1 }}\n",
        down_flag(rig, i).display()
    );
    conf.replacen("[farm]\n", &check, 1)
}

/// While this file exists, director `i`'s own check fails.
fn down_flag(rig: &EcmpRig, i: usize) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("farmlb-{}-d{}.down", rig.prefix(), i + 1))
}

/// `n` connections from the client's sources (ephemeral ports), tallied by backend.
fn connect(
    rig: &EcmpRig,
    vip: Ipv4Addr,
    port: u16,
    n: usize,
) -> (BTreeMap<String, usize>, Vec<String>) {
    lb_tests::connect_tallied(
        &rig.ns_client(),
        IpAddr::V4(vip),
        port,
        n,
        &rig.client_sources(),
    )
}

fn within(counts: &[usize], tol: f64) -> bool {
    let total: usize = counts.iter().sum();
    let fair = total as f64 / counts.len() as f64;
    counts
        .iter()
        .all(|&n| ((n as f64 - fair) / fair).abs() <= tol)
}

#[test]
fn ecmp_spreads_over_directors_and_backends_and_survives_a_director_death() -> Result<()> {
    let mut s = Scale::up("scecmp", "")?;
    // --- spread: 600 connections ---
    let before = s.syns()?;
    let (counts, failures) = connect(&s.rig, VIP, WEB, 600);
    ensure!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
    let after = s.syns()?;
    let per_director: Vec<usize> = after
        .iter()
        .zip(&before)
        .map(|(a, b)| (a - b) as usize)
        .collect();
    println!("per director (new connections): {per_director:?}");
    println!("per backend:\n{}", format_distribution(&counts));
    ensure!(
        per_director.iter().sum::<usize>() >= 600,
        "{per_director:?}"
    );
    ensure!(
        within(&per_director, 0.25),
        "directors off by more than 25%: {per_director:?}"
    );
    let per_backend: Vec<usize> = counts.values().copied().collect();
    ensure!(
        per_backend.len() == BACKENDS && within(&per_backend, 0.25),
        "backends: {counts:?}"
    );

    // --- long-lived connections, then kill director 1 ---
    let sources = s.rig.client_sources();
    let (mut conns, via) = open_tracked(&s, 60)?;
    ping_all(&mut conns, "before the kill")?;
    let on_dead = via.iter().filter(|&&d| d == 0).count();
    println!(
        "long-lived connections through d1: {on_dead} of {}",
        conns.len()
    );
    let start = Instant::now();
    let loops: Vec<Traffic> = (0..4)
        .map(|k| {
            let src: Vec<IpAddr> = sources.iter().skip(k).step_by(4).copied().collect();
            Traffic::paced(
                &s.rig.ns_client(),
                src,
                SocketAddr::new(IpAddr::V4(VIP), WEB),
                Duration::from_millis(300),
                Duration::from_millis(20),
                start,
            )
        })
        .collect::<Result<_>>()?;
    thread::sleep(Duration::from_secs(1));
    let killed_at = start.elapsed();
    // The link first, as when the machine dies: the router learns it only through BFD (a
    // killed BIRD alone closes its TCP session, which the router would notice at once).
    s.rig.set_director_link(0, false)?;
    s.farmlb[0].kill9()?;
    let b = s.birds[0];
    s.rig.bird(b).kill9()?;
    wait_until(Duration::from_secs(10), "the router to drop d1", || {
        Ok(s.rig.router_next_hops(VIP)?.len() == DIRECTORS - 1)
    })?;
    let withdrawn = start.elapsed() - killed_at;
    thread::sleep(Duration::from_secs(2));
    let mut attempts = Vec::new();
    for l in loops {
        attempts.extend(l.stop()?);
    }
    let failed: Vec<_> = attempts.iter().filter(|a| a.result.is_err()).collect();
    let last_fail = failed.iter().map(|a| a.at).max();
    let recovery = last_fail.map_or(Duration::ZERO, |t| t.saturating_sub(killed_at));
    println!(
        "director killed: route withdrawn at the router after {:.2} s; new connections all \
         succeed again after {:.2} s ({} of {} attempts failed)",
        withdrawn.as_secs_f64(),
        recovery.as_secs_f64(),
        failed.len(),
        attempts.len()
    );
    let mut broken = 0;
    for c in &mut conns {
        if c.ping().is_err() {
            broken += 1;
        }
    }
    println!(
        "long-lived connections broken: {broken} of {} ({on_dead} moved off d1)",
        conns.len()
    );
    ensure!(broken == 0, "{broken} long-lived connections broke");
    ensure!(
        recovery < Duration::from_secs(1),
        "recovery took {recovery:?}"
    );
    Ok(())
}

#[test]
fn a_vip_without_usable_backends_is_withdrawn_and_returns() -> Result<()> {
    let mut s = Scale::up("scwdraw", "")?;
    let all: Vec<Ipv4Addr> = (0..DIRECTORS).map(|i| s.rig.director_addr(i)).collect();
    // Every backend of "alt" fails its check: VIP2 leaves every director's table, so the
    // router has no route; VIP (other service) stays.
    let t0 = Instant::now();
    for a in &mut s.alt {
        if let Some(mut srv) = a.take() {
            srv.stop();
        }
    }
    wait_until(
        Duration::from_secs(10),
        "VIP2 withdrawn at the router",
        || Ok(s.rig.router_next_hops(VIP2)?.is_empty()),
    )
    .with_context(|| s.debug())?;
    println!(
        "VIP2 withdrawn {:.2} s after its backends died",
        t0.elapsed().as_secs_f64()
    );
    ensure!(
        s.rig.router_next_hops(VIP)? == all,
        "VIP must stay: {}",
        s.debug()
    );
    // The IPv6 VIP is in every director's table too (a /128, proto 250).
    for i in 0..DIRECTORS {
        let ns = s.rig.ns(&EcmpRig::director_tag(i));
        let v6 = lb_tests::netns::run(&["ip", "-n", &ns, "-6", "route", "show", "table", "100"])?;
        ensure!(
            v6.contains(&format!("{VIP6} dev eth0 proto 250")),
            "d{}: {v6}",
            i + 1
        );
    }
    let st = status_json(&s.rig.api_socket(1))?;
    let vip2 = st["announce"]["vips"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["vip"] == VIP2.to_string()))
        .cloned()
        .context("VIP2 in status.announce")?;
    ensure!(
        vip2["announced"] == false
            && vip2["installed"] == false
            && vip2["reason"] == "no_usable_backend",
        "{vip2}"
    );
    let text = lb_tests::ctl::cli_ok(&s.rig.api_socket(1), &["status"])?;
    ensure!(
        text.contains("withdrawn") && text.contains("no usable backend"),
        "{text}"
    );
    // One comes back: VIP2 is announced by every director again.
    let t1 = Instant::now();
    let any = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), ALT);
    s.alt[0] = Some(IdentityServer::start(&s.rig.ns("b1"), any, "b1")?);
    wait_until(Duration::from_secs(10), "VIP2 back at the router", || {
        Ok(s.rig.router_next_hops(VIP2)? == all)
    })
    .with_context(|| s.debug())?;
    println!(
        "VIP2 back {:.2} s after a backend recovered",
        t1.elapsed().as_secs_f64()
    );
    let (counts, failures) = connect(&s.rig, VIP2, ALT, 30);
    ensure!(
        failures.is_empty() && counts.keys().all(|k| k == "b1"),
        "{counts:?} {failures:?}"
    );
    // d2's own check fails: it withdraws every VIP, the others keep them.
    let flag = down_flag(&s.rig, 1);
    let t2 = Instant::now();
    std::fs::write(&flag, "")?;
    let without_d2 = vec![all[0], all[2]];
    wait_until(
        Duration::from_secs(10),
        "d2 withdrawn on its node check",
        || {
            Ok(s.rig.router_next_hops(VIP)? == without_d2
                && s.rig.router_next_hops(VIP2)? == without_d2)
        },
    )
    .with_context(|| s.debug())?;
    println!(
        "d2 withdrawn {:.2} s after its own check began to fail",
        t2.elapsed().as_secs_f64()
    );
    let st = status_json(&s.rig.api_socket(1))?;
    ensure!(
        st["announce"]["vips"].as_array().is_some_and(|v| v
            .iter()
            .all(|v| v["reason"] == "node_down" && v["installed"] == false)),
        "{}",
        st["announce"]
    );
    std::fs::remove_file(&flag)?;
    wait_until(
        Duration::from_secs(10),
        "d2 back after its check passes",
        || Ok(s.rig.router_next_hops(VIP)? == all),
    )
    .with_context(|| s.debug())?;
    // A daemon killed with SIGKILL leaves its routes (its data plane keeps forwarding), and
    // the next one keeps them: the router never loses d3 across the restart.
    s.farmlb[2].kill9()?;
    let watch = {
        // Only d3's next hop matters here (the others' own checks may flap under load).
        let (rig_rt, want) = (s.rig.ns_router(), vec![all[2]]);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let t = thread::spawn(move || {
            let mut seen_other = 0;
            let mut polls = 0;
            while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                let out = lb_tests::netns::run(&[
                    "ip",
                    "-n",
                    &rig_rt,
                    "route",
                    "show",
                    &format!("{VIP}/32"),
                ])
                .unwrap_or_default();
                let hops = want
                    .iter()
                    .filter(|h| out.contains(&format!("via {h} ")))
                    .count();
                if hops != want.len() {
                    seen_other += 1;
                }
                polls += 1;
                thread::sleep(Duration::from_millis(10));
            }
            (seen_other, polls)
        });
        (stop, t)
    };
    let left =
        lb_tests::netns::run(&["ip", "-n", &s.rig.ns("d3"), "route", "show", "table", "100"])?;
    ensure!(
        left.contains(&VIP.to_string()),
        "d3's routes after kill -9: {left}"
    );
    let key = s.rig.write_key()?;
    let conf = config_for(&s.rig, 2, &key, "", &services(&s.rig, BACKENDS));
    let old = std::mem::replace(&mut s.farmlb[2], s.rig.start_farmlb(2, &conf)?);
    // Dropping the killed daemon's handle would remove the pins the new one adopts.
    std::mem::forget(old);
    wait_until(
        Duration::from_secs(10),
        "d3's daemon announcing again",
        || {
            // The pinned program is still attached: the new daemon may not serve yet.
            let Ok(st) = status_json(&s.rig.api_socket(2)) else {
                return Ok(false);
            };
            Ok(st["announce"]["vips"].as_array().is_some_and(|v| {
                v.iter()
                    .any(|v| v["vip"] == VIP.to_string() && v["installed"] == true)
            }))
        },
    )?;
    thread::sleep(Duration::from_millis(500));
    watch.0.store(true, std::sync::atomic::Ordering::SeqCst);
    let (missing, polls) = watch.1.join().expect("watcher");
    println!("d3 restarted after kill -9: the router lacked it in {missing} of {polls} polls");
    ensure!(
        missing == 0,
        "the router lost d3 during the restart ({missing} of {polls} polls)"
    );
    // `farmlb stop` withdraws everything this director announced before it exits.
    s.farmlb[2].stop()?;
    let rest = all[..2].to_vec();
    wait_until(Duration::from_secs(5), "d3 withdrawn on stop", || {
        Ok(s.rig.router_next_hops(VIP)? == rest)
    })
    .with_context(|| s.debug())?;
    let left =
        lb_tests::netns::run(&["ip", "-n", &s.rig.ns("d3"), "route", "show", "table", "100"])?;
    ensure!(left.trim().is_empty(), "d3's table after stop: {left}");
    Ok(())
}

/// `contrib/bird/bird.conf` is valid BIRD 2 (`bird -p` parses it and exits).
#[test]
fn contrib_bird_conf_parses() -> Result<()> {
    let src = lb_tests::daemon::workspace_root().join("contrib/bird/bird.conf");
    // Logging to syslog needs no socket for a parse, but keep the check self-contained.
    let text = std::fs::read_to_string(&src)?.replace("log syslog all;", "log stderr all;");
    let tmp = std::env::temp_dir().join("farmlb-scbird-contrib.conf");
    std::fs::write(&tmp, text)?;
    let out = std::process::Command::new("bird")
        .arg("-p")
        .arg("-c")
        .arg(&tmp)
        .output()
        .context("bird (run `cargo xtask setup`)")?;
    ensure!(
        out.status.success(),
        "bird -p {}: {}",
        src.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// (long-lived connections broken after the kill, those through the dead director, those of
/// them the survivors' tables alone would send to another backend).
struct MoveResult {
    broken: usize,
    /// Of `broken`, those that went through the dead director.
    broken_dead: usize,
    on_dead: usize,
    needed_sync: usize,
}

impl MoveResult {
    /// The figures, as the test prints them after `what` ("sync on", "sync off").
    fn summary(&self, what: &str) -> String {
        format!(
            "{what}: {} of 90 long-lived connections broken ({} of the {} through the dead \
             director, {} of which its survivors' tables hash elsewhere; {} of the survivors' \
             own, moved between them when the router's ECMP set shrank)",
            self.broken,
            self.broken_dead,
            self.on_dead,
            self.needed_sync,
            self.broken - self.broken_dead
        )
    }
}

/// Long-lived connections open; then a backend is added and another drained on every
/// director (so the Maglev tables no longer match the flows' backends); then director 1
/// dies. Its flows reach the survivors, which keep them on their backends only if they
/// learned the flows' entries (conntrack sync).
fn add_drain_then_kill(prefix: &str, sync: bool) -> Result<MoveResult> {
    let extra = if sync { "sync = true\n" } else { "" };
    let mut s = Scale::up(prefix, extra)?;
    let (mut conns, via) = open_tracked(&s, 90)?;
    let dead_flows: Vec<usize> = (0..conns.len()).filter(|&i| via[i] == 0).collect();
    // b4 joins, b1 drains, on every director.
    let b4 = s.rig.add_backend()?;
    let any = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), WEB);
    s._servers
        .push(IdentityServer::start(&s.rig.ns("b4"), any, "b4")?);
    let key = s.rig.write_key()?;
    let b1 = s.rig.backend_addr(0).to_string();
    let b4addr = s.rig.backend_addr(b4).to_string();
    for i in 0..DIRECTORS {
        let conf = config_for(&s.rig, i, &key, extra, &services(&s.rig, BACKENDS + 1));
        let conf = conf.replacen(
            &format!("address = \"{b1}\"\n"),
            &format!("address = \"{b1}\"\n  state = \"drain\"\n"),
            1,
        );
        s.farmlb[i].reload(&conf)?;
    }
    for i in 0..DIRECTORS {
        let sock = s.rig.api_socket(i);
        wait_until(Duration::from_secs(10), "b4 usable and b1 drained", || {
            let st = status_json(&sock)?;
            let web = &st["services"][0];
            let b = |a: &str| {
                web["backends"]
                    .as_array()
                    .and_then(|v| v.iter().find(|b| b["address"] == a).cloned())
                    .unwrap_or_default()
            };
            Ok(b(&b4addr)["effective_weight"] == 1 && b(&b1)["state"] == "drain")
        })?;
    }
    ping_all(&mut conns, "after the backend changes")?;
    // Which of d1's flows d2's table alone would send elsewhere (`simulate --syn`: the ring,
    // conntrack ignored).
    let mut needed_sync = 0;
    for &i in &dead_flows {
        let out = std::process::Command::new(lb_tests::farmlb_bin())
            .arg("--socket")
            .arg(s.rig.api_socket(1))
            .args(["simulate", "--syn", "--json", "--src"])
            .arg(conns[i].local_addr().to_string())
            .args(["--dst", &format!("{VIP}:{WEB}")])
            .output()?;
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("simulate --json")?;
        let backend = v["backend"].as_str().unwrap_or_default().to_string();
        let id = format!(
            "b{}",
            backend
                .rsplit('.')
                .next()
                .unwrap_or("0")
                .parse::<u32>()
                .unwrap_or(0)
                - 10
        );
        if id != conns[i].identity() {
            needed_sync += 1;
        }
    }
    if sync {
        let st = status_json(&s.rig.api_socket(1))?;
        println!("d2 sync counters before the kill: {}", st["sync"]);
        let n = |k: &str| st["sync"][k].as_u64().unwrap_or(0);
        ensure!(n("received") > 0 && n("sent") > 0, "{}", st["sync"]);
        ensure!(n("rejected") == 0 && n("dropped") == 0, "{}", st["sync"]);
        let text = lb_tests::ctl::cli_ok(&s.rig.api_socket(1), &["status"])?;
        ensure!(text.contains("conntrack sync: sent"), "{text}");
        // The same on /metrics, which promtool accepts.
        let scrape = lb_tests::ctl::scrape_text(&s.rig.ns("d2"), "127.0.0.1:9740".parse()?)?;
        for want in [
            format!("farmlb_vip_announced{{vip=\"{VIP}\"}} 1"),
            format!(
                "farmlb_conntrack_sync_entries_total{{event=\"received\"}} {}",
                n("received")
            ),
        ] {
            ensure!(
                scrape.lines().any(|l| l == want),
                "missing {want:?}:\n{scrape}"
            );
        }
        promtool_check(&scrape)?;
    }
    s.rig.set_director_link(0, false)?;
    s.farmlb[0].kill9()?;
    let b = s.birds[0];
    s.rig.bird(b).kill9()?;
    wait_until(Duration::from_secs(10), "the router to drop d1", || {
        Ok(s.rig.router_next_hops(VIP)?.len() == DIRECTORS - 1)
    })?;
    let (mut broken, mut broken_dead) = (0, 0);
    for (i, c) in conns.iter_mut().enumerate() {
        if c.ping().is_err() {
            broken += 1;
            broken_dead += usize::from(via[i] == 0);
        }
    }
    Ok(MoveResult {
        broken,
        broken_dead,
        on_dead: dead_flows.len(),
        needed_sync,
    })
}

#[test]
fn with_conntrack_sync_flows_of_a_dead_director_keep_their_backend_after_add_and_drain(
) -> Result<()> {
    let r = add_drain_then_kill("scsync", true)?;
    println!("{}", r.summary("sync on"));
    ensure!(
        r.needed_sync > 0,
        "the backend changes moved none of d1's flows: nothing proven"
    );
    ensure!(r.broken == 0, "{} connections broke", r.broken);
    Ok(())
}

/// The control: the same changes without sync break the moved flows whose slot changed.
#[test]
fn without_sync_the_same_flows_break() -> Result<()> {
    let r = add_drain_then_kill("scnosync", false)?;
    println!("{}", r.summary("sync off"));
    ensure!(
        r.needed_sync > 0 && r.broken >= r.needed_sync,
        "expected the moved flows to break"
    );
    Ok(())
}

/// `n` long-lived connections from the client's sources, one at a time, each with the
/// director that forwarded its SYN (the one whose `ct_miss_syn` moved).
fn open_tracked(s: &Scale, n: usize) -> Result<(Vec<LongConn>, Vec<usize>)> {
    let sources = s.rig.client_sources();
    let (mut conns, mut via) = (Vec::new(), Vec::new());
    let mut before = s.syns()?;
    for i in 0..n {
        conns.push(LongConn::open(
            &s.rig.ns_client(),
            sources[i % sources.len()],
            IpAddr::V4(VIP),
            WEB,
        )?);
        let after = s.syns()?;
        let d = (0..DIRECTORS)
            .find(|&d| after[d] > before[d])
            .context("no director counted the SYN")?;
        via.push(d);
        before = after;
    }
    Ok((conns, via))
}

/// `promtool check metrics` on a scrape.
fn promtool_check(scrape: &str) -> Result<()> {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running promtool (`cargo xtask setup` installs it)")?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(scrape.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// `sync_rate` bounds what a director publishes: beyond the burst (a tenth of a second's
/// worth, at least one batch) and the rate, entries are dropped and counted, and the
/// connections are served all the same.
#[test]
fn sync_rate_bounds_what_each_director_sends() -> Result<()> {
    let s = Scale::up("scrate", "sync = true\nsync_rate = 2\n")?;
    let t0 = Instant::now();
    let (_, failures) = connect(&s.rig, VIP, WEB, 300);
    ensure!(failures.is_empty(), "{failures:?}");
    thread::sleep(Duration::from_millis(100));
    let secs = t0.elapsed().as_secs_f64();
    for i in 0..DIRECTORS {
        let st = status_json(&s.rig.api_socket(i))?;
        let y = &st["sync"];
        let n = |k: &str| y[k].as_u64().unwrap_or(0);
        println!("d{}: {y} after {secs:.1} s", i + 1);
        let bound = 24.0 + 2.0 * secs + 1.0;
        ensure!(
            n("sent") as f64 <= bound,
            "d{} sent {} > {bound:.0}",
            i + 1,
            n("sent")
        );
        ensure!(n("dropped") > 0, "d{}: nothing dropped: {y}", i + 1);
        ensure!(
            st["stats"]["ct_sync_drop"] == 0,
            "ring drops: {}",
            st["stats"]
        );
    }
    Ok(())
}

/// A director that joins (added, or restarted without its data plane) is sent the others'
/// whole tables: flows that the router moves to it when it announces keep their backends
/// even though the backend set changed while it was away.
#[test]
fn a_joining_director_is_sent_the_table_and_takes_moved_flows_over() -> Result<()> {
    let mut s = Scale::up("scjoin", "sync = true\n")?;
    let (d1, d2) = (s.rig.director_addr(0), s.rig.director_addr(1));
    s.farmlb[2].stop()?;
    wait_until(Duration::from_secs(10), "d3 withdrawn", || {
        Ok(s.rig.router_next_hops(VIP)? == vec![d1, d2])
    })?;
    let (mut conns, _) = open_tracked(&s, 90)?;
    // b4 joins and b1 drains while d3 is away.
    s.rig.add_backend()?;
    let any = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), WEB);
    s._servers
        .push(IdentityServer::start(&s.rig.ns("b4"), any, "b4")?);
    let key = s.rig.write_key()?;
    let b1 = s.rig.backend_addr(0).to_string();
    let conf = |i| {
        config_for(
            &s.rig,
            i,
            &key,
            "sync = true\n",
            &services(&s.rig, BACKENDS + 1),
        )
        .replacen(
            &format!("address = \"{b1}\"\n"),
            &format!("address = \"{b1}\"\n  state = \"drain\"\n"),
            1,
        )
    };
    let confs: Vec<String> = (0..DIRECTORS).map(conf).collect();
    for (p, c) in s.farmlb.iter_mut().zip(&confs).take(2) {
        p.reload(c)?;
    }
    thread::sleep(Duration::from_secs(1));
    ping_all(&mut conns, "after the backend changes")?;
    // d3 comes back with an empty table and the new backend set.
    let t0 = Instant::now();
    let old = std::mem::replace(&mut s.farmlb[2], s.rig.start_farmlb(2, &confs[2])?);
    // Dropping the stopped daemon's handle would remove the new one's pins.
    std::mem::forget(old);
    let all: Vec<Ipv4Addr> = (0..DIRECTORS).map(|i| s.rig.director_addr(i)).collect();
    wait_until(Duration::from_secs(15), "d3 announced again", || {
        Ok(s.rig.router_next_hops(VIP)? == all)
    })?;
    println!(
        "d3 back in the ECMP set {:.2} s after its start",
        t0.elapsed().as_secs_f64()
    );
    let sock3 = s.rig.api_socket(2);
    wait_until(Duration::from_secs(10), "d3 to learn the flows", || {
        let Ok(st) = status_json(&sock3) else {
            return Ok(false);
        };
        Ok(st["sync"]["received"].as_u64().unwrap_or(0) >= conns.len() as u64)
    })?;
    // Of the flows, those d3's ring alone would send elsewhere.
    let mut needed = 0;
    for c in &conns {
        let out = std::process::Command::new(lb_tests::farmlb_bin())
            .arg("--socket")
            .arg(&sock3)
            .args(["simulate", "--syn", "--json", "--src"])
            .arg(c.local_addr().to_string())
            .args(["--dst", &format!("{VIP}:{WEB}")])
            .output()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("simulate")?;
        let last: u32 = v["backend"]
            .as_str()
            .and_then(|b| b.rsplit('.').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        if format!("b{}", last.saturating_sub(10)) != c.identity() {
            needed += 1;
        }
    }
    let hits = |st: &serde_json::Value| st["stats"]["ct_hit"].as_u64().unwrap_or(0);
    let before = hits(&status_json(&sock3)?);
    let mut broken = 0;
    for c in &mut conns {
        if c.ping().is_err() {
            broken += 1;
        }
    }
    let st3 = status_json(&sock3)?;
    let bulk: u64 = (0..2)
        .map(|i| {
            status_json(&s.rig.api_socket(i))
                .map(|v| v["sync"]["bulk_sent"].as_u64().unwrap_or(0))
                .unwrap_or(0)
        })
        .sum();
    println!(
        "d3 joined: d1+d2 sent it {bulk} entries of their tables; {} packets of the pings hit \
         d3's learned entries; {needed} of 90 flows hash elsewhere on d3's ring; {broken} broken",
        hits(&st3) - before
    );
    ensure!(bulk >= conns.len() as u64, "bulk sent {bulk}");
    ensure!(hits(&st3) > before, "no flow moved to d3: nothing proven");
    ensure!(
        needed > 0,
        "the backend changes moved no flow: nothing proven"
    );
    ensure!(broken == 0, "{broken} connections broke");
    Ok(())
}
