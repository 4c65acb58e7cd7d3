//! End-to-end tests of "the data plane outlives the daemon": the program, its link and its
//! maps are pinned, so `kill -9`, SIGTERM and an upgrade (a new daemon replacing the running
//! program in place) cost no connection; runtime state survives a restart; faults of the
//! control plane (a flood of idle connections on the metrics port, backends whose MAC never
//! resolves, garbage on the membership port) stay in the control plane.
//!
//! Run as root, one test at a time (`cargo xtask test` does).

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use lb_tests::{
    client::{Attempt, Traffic},
    cluster::Farm,
    ctl::{cli, cli_ok, find_backend, status_json},
    daemon::api_socket,
    farm_rig::{FarmService, FARM_VIP, MEMBER_PORT},
    farmlb_config, netns, wait_until, Daemon, DirectorRig, LongConn, Rig, Service, VIP_V4,
};

const PORT: u16 = 80;

fn web(rig: &Rig) -> Service {
    Service::tcp("web", IpAddr::V4(VIP_V4), PORT)
        .backends((0..rig.backend_count()).map(|i| IpAddr::V4(rig.backend_v4(i))))
}

fn up(prefix: &str) -> Result<DirectorRig> {
    DirectorRig::up(prefix, 3, PORT, |rig| farmlb_config(rig, &[web(rig)]))
}

/// Long-lived connections spread over the backends.
fn long_lived(rig: &Rig, n: usize) -> Result<Vec<LongConn>> {
    let sources = rig.client_sources_v4();
    (0..n)
        .map(|i| {
            LongConn::open(
                &rig.ns_client(),
                sources[i % sources.len()],
                IpAddr::V4(VIP_V4),
                PORT,
            )
        })
        .collect()
}

/// New connections back to back from every client source.
fn traffic(rig: &Rig) -> Result<Traffic> {
    Traffic::start(
        &rig.ns_client(),
        rig.client_sources_v4(),
        SocketAddr::new(IpAddr::V4(VIP_V4), PORT),
        Duration::from_secs(2),
    )
}

fn failed(attempts: &[Attempt], from: Duration, to: Duration) -> Vec<&Attempt> {
    attempts
        .iter()
        .filter(|a| a.at >= from && a.at < to && a.result.is_err())
        .collect()
}

/// The XDP program id on the director's interface (`prog/xdp id N` of `ip link`).
fn prog_id(rig: &Rig) -> Result<u64> {
    let out = netns::run(&[
        "ip",
        "-d",
        "-n",
        &rig.ns_lb(),
        "link",
        "show",
        rig.lb_iface(),
    ])?;
    let id = out
        .split_whitespace()
        .skip_while(|w| *w != "prog/xdp")
        .nth(2)
        .and_then(|w| w.parse().ok())
        .with_context(|| format!("no XDP program id in {out}"))?;
    Ok(id)
}

/// Stop the daemon as `how` does, leave the data plane without a daemon for `down`, start a
/// daemon again; meanwhile new connections and long-lived ones keep being checked. Returns
/// (failed new connections while down, after the restart, the program ids before/after).
fn outage(prefix: &str, how: &str, down: Duration) -> Result<()> {
    let mut d = up(prefix)?;
    let mut conns = long_lived(&d.rig, 12)?;
    let before = prog_id(&d.rig)?;
    let t = traffic(&d.rig)?;
    thread::sleep(Duration::from_millis(500));
    let stopped_at = t.elapsed();
    match how {
        "kill -9" => d.daemon.kill9()?,
        "SIGTERM" => {
            d.daemon.exit(libc::SIGTERM)?;
        }
        // An upgrade: the new daemon starts with --replace while the old one still runs; the
        // old one exits at its request, the new one replaces the program on the link.
        "upgrade" => {}
        _ => unreachable!(),
    }
    let path = d.daemon.config_path().to_path_buf();
    let mut gap_pings = 0;
    let deadline = Instant::now() + down;
    while Instant::now() < deadline {
        for c in &mut conns {
            c.ping().with_context(|| {
                format!("{how}: a long-lived connection broke while no daemon ran")
            })?;
        }
        gap_pings += 1;
        thread::sleep(Duration::from_millis(200));
    }
    let restarted_at = t.elapsed();
    let args: &[&str] = if how == "upgrade" {
        &["--replace"]
    } else {
        &[]
    };
    let old = std::mem::replace(&mut d.daemon, Daemon::restart(&d.rig, &path, args)?);
    if how == "upgrade" {
        let mut old = old;
        old.exit(libc::SIGTERM)?;
    }
    let after = prog_id(&d.rig)?;
    thread::sleep(Duration::from_secs(2));
    for c in &mut conns {
        c.ping()
            .with_context(|| format!("{how}: a long-lived connection broke across the restart"))?;
    }
    let attempts = t.stop()?;
    let end = attempts.last().map_or(Duration::ZERO, |a| a.at);
    let during = failed(&attempts, stopped_at, restarted_at);
    let later = failed(&attempts, restarted_at, end + Duration::from_secs(1));
    let n_during = attempts
        .iter()
        .filter(|a| a.at >= stopped_at && a.at < restarted_at)
        .count();
    println!(
        "{how}: {:.1} s from the stop to the new daemon: {} of {n_during} new connections failed, {} failed \
         after the restart ({} attempts in all); 12 long-lived connections pinged {gap_pings} \
         times meanwhile, 0 broke; program id {before} -> {after}",
        (restarted_at - stopped_at).as_secs_f64(),
        during.len(),
        later.len(),
        attempts.len(),
    );
    ensure!(
        during.is_empty() && later.is_empty(),
        "{how}: {} new connections failed without a daemon, {} after; first: {:?}\nlog:\n{}",
        during.len(),
        later.len(),
        during.first().or(later.first()).map(|a| &a.result),
        d.daemon.log()
    );
    ensure!(
        n_during > 50,
        "{how}: too little traffic while down ({n_during})"
    );
    ensure!(
        after != before,
        "{how}: the new daemon did not replace the program (id {before})"
    );
    ensure!(
        d.daemon.log().contains("adopted the running data plane"),
        "{how}: the new daemon did not adopt the data plane:\n{}",
        d.daemon.log()
    );
    d.finish(|_| Ok(()))
}

#[test]
fn kill_9_drops_no_connection() -> Result<()> {
    outage("rs1", "kill -9", Duration::from_secs(5))
}

#[test]
fn sigterm_and_start_drop_no_connection() -> Result<()> {
    outage("rs2", "SIGTERM", Duration::from_secs(5))
}

#[test]
fn upgrade_replaces_the_program_in_place() -> Result<()> {
    outage("rs3", "upgrade", Duration::from_secs(1))
}

/// A drain set at runtime is still in force after kill -9 and a restart, and so is a
/// backend added through the API; `farmlb stop --detach` then removes the data plane.
#[test]
fn runtime_state_survives_kill_9() -> Result<()> {
    let mut d = up("rs4")?;
    let sock = api_socket(&d.rig);
    let b2 = d.rig.backend_v4(1).to_string();
    cli_ok(&sock, &["backend", "set", "web", &b2, "--state", "drain"])?;
    let extra = d.rig.add_backend()?;
    let b4 = d.rig.backend_v4(extra).to_string();
    d.servers
        .push(lb_tests::start_on_backend(&d.rig, extra, PORT)?);
    cli_ok(&sock, &["backend", "add", "web", &b4])?;
    d.connect_to_ok(IpAddr::V4(VIP_V4), PORT, 30, "before the kill")?;
    d.daemon.kill9()?;
    let path = d.daemon.config_path().to_path_buf();
    d.daemon = Daemon::restart(&d.rig, &path, &[])?;
    let st = status_json(&sock)?;
    let drained = find_backend(&st, &b2).context("b2 missing")?;
    ensure!(
        drained["state"] == "drain" && drained["state_runtime"] == true,
        "the runtime drain was lost: {drained}"
    );
    ensure!(
        find_backend(&st, &b4).is_some(),
        "the API-added backend was lost: {st}"
    );
    // The adopted conntrack table still holds the flows of before the kill (counted at start).
    wait_until(Duration::from_secs(5), "a conntrack count", || {
        Ok(status_json(&sock)?["conntrack"]["entries"]
            .as_u64()
            .is_some())
    })?;
    let ct = status_json(&sock)?["conntrack"].clone();
    println!("conntrack after kill -9 + restart: {ct}");
    ensure!(
        ct["entries"].as_u64() > Some(0),
        "the adopted conntrack is empty: {ct}"
    );
    ensure!(ct["capacity"] == 1_048_576, "capacity: {ct}");
    let counts = d.connect_to_ok(IpAddr::V4(VIP_V4), PORT, 120, "after kill -9 + restart")?;
    ensure!(
        !counts.contains_key("b2"),
        "the drained backend took new flows: {counts:?}"
    );
    ensure!(
        counts.contains_key("b4"),
        "the added backend takes no flows: {counts:?}"
    );
    println!("after kill -9 + restart: b2 still drained, b4 (added at runtime) still serving");
    let (ok, _, err) = cli(&sock, &["stop", "--detach"])?;
    ensure!(ok, "farmlb stop --detach failed: {err}");
    ensure!(
        !lb_tests::xdp_attached(&d.rig)?,
        "XDP still attached after stop --detach"
    );
    d.rig.down()
}

/// Idle connections by the thousand on the metrics port, opened by an unprivileged user:
/// no backend is marked down, new connections keep succeeding, the API keeps answering.
#[test]
fn a_flood_of_idle_metrics_connections_stays_in_the_control_plane() -> Result<()> {
    let cfg = |rig: &Rig| {
        let svc = web(rig);
        farmlb_config(rig, &[svc]).replace(
            "protocol = \"tcp\"",
            "protocol = \"tcp\"\ncheck = { type = \"tcp\", interval = \"200ms\", timeout = \"100ms\" }",
        )
    };
    let d = DirectorRig::up("rs5", 3, PORT, cfg)?;
    let sock = api_socket(&d.rig);
    let mut hogs: Vec<Child> = Vec::new();
    for _ in 0..3 {
        // bash opens the connections and holds them idle; as `nobody`, within its own
        // descriptor limit, from inside the director's namespace.
        let script =
            "for i in $(seq 1000); do exec {fd}<>/dev/tcp/127.0.0.1/9740 || break; done; sleep 15";
        hogs.push(
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &d.rig.ns_lb(),
                    "setpriv",
                    "--reuid=65534",
                    "--regid=65534",
                    "--clear-groups",
                    "bash",
                    "-c",
                    script,
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting the connection hogs")?,
        );
    }
    // Long enough for the server's header timeout to close idle connections and the hogs to
    // reconnect: the flood keeps up the whole time.
    thread::sleep(Duration::from_secs(7));
    let ss = [
        "ip",
        "netns",
        "exec",
        &d.rig.ns_lb(),
        "ss",
        "-Htn",
        "( dport = :9740 )",
    ];
    let tries = netns::run(&ss)?.lines().count();
    let pid = d.daemon.pid().context("daemon not running")?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    let t0 = Instant::now();
    let st = status_json(&sock)?;
    let api_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let down: Vec<String> = st["services"][0]["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|b| b["health"] != "up")
        .map(|b| b["address"].to_string())
        .collect();
    let res = d.connect_to_ok(IpAddr::V4(VIP_V4), PORT, 150, "during the flood");
    let hogs_alive = hogs
        .iter_mut()
        .map(|h| matches!(h.try_wait(), Ok(None)))
        .filter(|&alive| alive)
        .count();
    for mut h in hogs {
        let _ = h.kill();
        let _ = h.wait();
    }
    println!(
        "{hogs_alive} unprivileged hogs trying 1000 idle connections each: {tries} client \
         sockets towards the metrics port (the rest wait to connect); the daemon holds {fds} \
         file descriptors; API answered in {api_ms:.1} ms; backends down: {down:?}"
    );
    ensure!(
        tries >= 150,
        "only {tries} connection attempts: the test did not flood"
    );
    ensure!(
        hogs_alive == 3,
        "the hogs gave up ({hogs_alive} of 3 still running)"
    );
    ensure!(
        fds < 200,
        "the daemon holds {fds} file descriptors under the flood"
    );
    ensure!(
        down.is_empty(),
        "backends marked down by the flood: {down:?}\n{}",
        d.daemon.log()
    );
    res?;
    d.finish(|_| Ok(()))
}

/// Three backends whose MAC never resolves: the API still answers within 100 ms.
#[test]
fn unresolvable_backends_never_slow_the_api() -> Result<()> {
    let cfg = |rig: &Rig| {
        let mut svc = web(rig);
        for h in 61..64u8 {
            svc = svc.backend(IpAddr::V4(std::net::Ipv4Addr::new(10, 99, 0, h)), 1);
        }
        farmlb_config(rig, &[svc])
    };
    let d = DirectorRig::up("rs6", 3, PORT, cfg)?;
    let sock = api_socket(&d.rig);
    // Each call runs the CLI (a process start included); the median shows what the daemon
    // costs, the worst what a loaded machine adds. Before, each took 3-6 s.
    let mut took = Vec::new();
    for i in 0..10 {
        let t0 = Instant::now();
        status_json(&sock)?;
        took.push(t0.elapsed());
        let w = if i % 2 == 0 { "3" } else { "1" };
        let t0 = Instant::now();
        cli_ok(
            &sock,
            &["backend", "set", "web", "10.99.0.61", "--weight", w],
        )?;
        took.push(t0.elapsed());
    }
    took.sort();
    let (median, worst) = (took[took.len() / 2], took[took.len() - 1]);
    let st = status_json(&sock)?;
    let unresolved = find_backend(&st, "10.99.0.61").context("missing")?;
    println!(
        "3 unresolvable backends: status / backend set answered in {:.1} ms (median), {:.1} ms \
         (worst of 20)",
        median.as_secs_f64() * 1000.0,
        worst.as_secs_f64() * 1000.0
    );
    ensure!(
        unresolved["resolved"] == false,
        "10.99.0.61 claims to be resolved: {unresolved}"
    );
    ensure!(
        median < Duration::from_millis(100),
        "the API took {median:?} (median)"
    );
    ensure!(worst < Duration::from_secs(1), "a call took {worst:?}");
    d.connect_to_ok(IpAddr::V4(VIP_V4), PORT, 60, "with 3 unresolved backends")?;
    d.finish(|_| Ok(()))
}

/// Garbage datagrams to a farm node's membership port, as fast as the rig sends them for
/// 10 s: no member is ever declared down.
#[test]
fn a_membership_flood_causes_no_false_downs() -> Result<()> {
    let services = vec![FarmService::farm("web", IpAddr::V4(FARM_VIP), PORT)];
    let f = Farm::up(
        "rs7",
        services,
        Box::new(|_| String::new()),
        "0.0.0.0".parse()?,
    )?;
    let target = SocketAddr::new(IpAddr::V4(f.rig.addr("n1")), MEMBER_PORT);
    let sent = netns::in_netns(&f.rig.ns_client(), move || -> Result<u64> {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        let junk = [0x5au8; 96];
        let (mut n, end) = (0u64, Instant::now() + Duration::from_secs(10));
        while Instant::now() < end {
            for _ in 0..256 {
                if s.send_to(&junk, target).is_ok() {
                    n += 1;
                }
            }
        }
        Ok(n)
    })??;
    thread::sleep(Duration::from_secs(1));
    let logs = f.logs();
    let downs = logs.matches("member down").count();
    let st = f.status("n1")?;
    println!(
        "membership flood: {sent} datagrams in 10 s ({:.0}/s) to n1; n1 dropped {} from unknown \
         addresses, {} failed authentication; member-down events: {downs}",
        sent as f64 / 10.0,
        st.unknown_dropped,
        st.auth_failures
    );
    ensure!(
        downs == 0,
        "false member-down events under the flood:\n{logs}"
    );
    ensure!(
        sent > 100_000,
        "the flood was too slow to mean anything ({sent})"
    );
    ensure!(
        st.members.len() == 3,
        "n1 sees {} members",
        st.members.len()
    );
    wait_until(Duration::from_secs(1), "3 members", || {
        Ok(f.member_count("n2") == 3)
    })?;
    f.finish()
}

/// A pinned data plane this configuration cannot adopt (its conntrack has another size) is
/// refused with one line naming the difference, and left forwarding untouched; the API
/// refuses an oversized body with a JSON 413.
#[test]
fn an_incompatible_pinned_data_plane_is_refused_and_left_running() -> Result<()> {
    let mut d = up("rs8")?;
    let sock = api_socket(&d.rig);
    let big = format!("{{\"name\": \"{}\"}}", "x".repeat(80 * 1024));
    let (code, body) = lb_tests::ctl::raw_api(&sock, "POST", "/v1/services", Some(&big))?;
    ensure!(code == 413, "a 80 KiB body got HTTP {code}: {body}");
    ensure!(
        body.contains("\"error\""),
        "the 413 is not a JSON error: {body}"
    );
    println!("an 80 KiB body: HTTP {code} {body}");

    let path = d.daemon.config_path().to_path_buf();
    d.daemon.exit(libc::SIGTERM)?;
    let cfg = std::fs::read_to_string(&path)?;
    std::fs::write(&path, format!("conntrack_size = 65536\n{cfg}"))?;
    let out = netns::run(&[
        "ip",
        "netns",
        "exec",
        &d.rig.ns_lb(),
        &lb_tests::farmlb_bin().to_string_lossy(),
        "run",
        "--config",
        &path.to_string_lossy(),
    ]);
    let err = format!(
        "{:#}",
        out.err()
            .context("farmlb started on an incompatible data plane")?
    );
    let line = err
        .lines()
        .find(|l| l.contains("farmlb: error:"))
        .unwrap_or_default()
        .to_string();
    println!("refused: {line}");
    ensure!(
        line.contains("incompatible") && line.contains("conntrack_size"),
        "the refusal does not name conntrack_size: {err}"
    );
    ensure!(
        lb_tests::xdp_attached(&d.rig)?,
        "the refused start detached the data plane"
    );
    d.connect_to_ok(IpAddr::V4(VIP_V4), PORT, 60, "after the refused start")?;
    std::fs::write(&path, cfg)?;
    d.daemon = Daemon::restart(&d.rig, &path, &[])?;
    d.finish(|_| Ok(()))
}
