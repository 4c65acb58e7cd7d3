//! `farmlb top` in a real pseudo-terminal against a real daemon on the rig with real traffic:
//! what it draws is parsed as a terminal would show it (vt100) and checked for the service,
//! its backends, their health and live rates; a backend killed mid-test must show down, a
//! resize must redraw at the new size, the daemon going away must show and be retried, and
//! `q` (or Ctrl-C) must exit 0 with the terminal restored. Run as root, one test at a time.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{ensure, Result};
use lb_tests::{
    client::{Traffic, TIMEOUT},
    ctl::{self, cli, find_backend},
    daemon::api_socket,
    farmlb_bin, farmlb_config,
    pty::Pty,
    wait_until, Daemon, DirectorRig, Service, VIP_V4,
};

const PORT: u16 = 80;
const CHECK: &str =
    "check = { type = \"tcp\", interval = \"200ms\", timeout = \"100ms\", rise = 2, fall = 3 }";

fn top(sock: &Path, rows: u16, cols: u16) -> Result<Pty> {
    let mut cmd = Command::new(farmlb_bin());
    cmd.arg("--socket")
        .arg(sock)
        .args(["top", "--interval", "0.3"]);
    Pty::spawn(cmd, rows, cols)
}

/// The screen line holding `needle`.
fn row<'a>(screen: &'a str, needle: &str) -> Option<&'a str> {
    screen.lines().find(|l| l.contains(needle))
}

/// The PKT/S cell of the line holding `needle` (read at the header's column): `None` while
/// there is no rate yet.
fn pkt_rate(screen: &str, needle: &str) -> Option<f64> {
    let header = row(screen, "PKT/S")?;
    let at = header[..header.find("PKT/S")?].chars().count();
    let cell: String = row(screen, needle)?
        .chars()
        .skip(at)
        .take_while(|c| !c.is_whitespace())
        .collect();
    let (num, mult) = match cell.strip_suffix('K') {
        Some(n) => (n, 1e3),
        None => match cell.strip_suffix('M') {
            Some(n) => (n, 1e6),
            None => (cell.as_str(), 1.0),
        },
    };
    num.parse::<f64>().ok().map(|v| v * mult)
}

/// Type `key`: top must exit 0, leaving the alternate screen, the cursor shown and the
/// terminal back in cooked mode.
fn quit(top: &mut Pty, key: &[u8]) -> Result<()> {
    top.send(key)?;
    let st = top.wait_exit(Duration::from_secs(3))?;
    ensure!(st.success(), "farmlb top exited with {st}");
    ensure!(
        top.with_screen(|sc| !sc.alternate_screen() && !sc.hide_cursor()),
        "the terminal was not restored (alternate screen or hidden cursor left)"
    );
    ensure!(top.cooked()?, "the terminal was left in raw mode");
    Ok(())
}

#[test]
fn top_shows_live_rates_and_health_and_outlives_the_daemon() -> Result<()> {
    let mut s = DirectorRig::up("etop", 3, PORT, |rig| {
        let web = Service {
            check: Some(CHECK.into()),
            ..Service::tcp("web", IpAddr::V4(VIP_V4), PORT)
        };
        farmlb_config(
            rig,
            &[web.backends((0..3).map(|i| rig.backend_v4(i).into()))],
        )
    })?;
    let sock = api_socket(&s.rig);
    let b = |i: usize| s.rig.backend_v4(i).to_string();
    wait_until(Duration::from_secs(5), "every backend checked up", || {
        let Ok(v) = ctl::status_json(&sock) else {
            return Ok(false);
        };
        Ok((0..3).all(|i| find_backend(&v, &b(i)).is_some_and(|x| x["health"] == "up")))
    })?;
    let traffic = Traffic::paced(
        &s.rig.ns_client(),
        s.rig.client_sources_v4(),
        SocketAddr::new(IpAddr::V4(VIP_V4), PORT),
        TIMEOUT,
        Duration::from_millis(5),
        Instant::now(),
    )?;

    let mut top = top(&sock, 30, 140)?;
    let service = format!("web {VIP_V4}:{PORT}/tcp");
    top.wait_for(Duration::from_secs(10), "backends up with rates", |t| {
        row(t, &service).is_some_and(|r| r.contains("3/3 up"))
            && (0..3).all(|i| {
                row(t, &b(i)).is_some_and(|r| r.contains(" up ") && r.contains("ready"))
                    && pkt_rate(t, &b(i)).is_some_and(|r| r > 0.0)
            })
            && pkt_rate(t, &service).is_some_and(|r| r > 0.0)
            && t.contains("live")
    })?;
    println!("farmlb top under traffic:\n{}", top.text());
    ensure!(
        top.with_screen(|sc| sc.alternate_screen() && sc.hide_cursor()),
        "top should draw on the alternate screen with the cursor hidden"
    );

    // Kill b2's server: its health check fails, top shows it down and its rate falls to 0
    // while the others keep theirs.
    s.servers[1].stop();
    let t0 = Instant::now();
    top.wait_for(Duration::from_secs(5), "b2 shown down", |t| {
        row(t, &b(1)).is_some_and(|r| r.contains("down") && r.contains("1 → 0"))
            && row(t, &service).is_some_and(|r| r.contains("2/3 up"))
    })?;
    let shown = t0.elapsed();
    top.wait_for(Duration::from_secs(5), "b2's rate at 0", |t| {
        pkt_rate(t, &b(1)) == Some(0.0)
            && [0, 2]
                .iter()
                .all(|&i| pkt_rate(t, &b(i)).is_some_and(|r| r > 0.0))
    })?;
    println!(
        "b2 killed: top showed it down after {:.0} ms:\n{}",
        shown.as_secs_f64() * 1e3,
        top.text()
    );

    // A smaller terminal: top redraws at the new size (its footer on the new last row).
    top.resize(20, 100)?;
    top.wait_for(Duration::from_secs(3), "a redraw at 100x20", |t| {
        t.lines().nth(19).is_some_and(|l| l.contains("q quit")) && row(t, &b(2)).is_some()
    })?;
    let attempts = traffic.stop()?;
    ensure!(
        attempts.len() > 100,
        "traffic ran {} attempts",
        attempts.len()
    );

    // The daemon goes away: top says so and keeps running, then finds the next one.
    let config = s.daemon.config_path().to_path_buf();
    s.daemon.stop()?;
    top.wait_for(Duration::from_secs(5), "daemon unreachable", |t| {
        t.contains("daemon unreachable")
    })?;
    println!("daemon stopped:\n{}", top.text());
    s.daemon = Daemon::start(&s.rig, &config)?;
    top.wait_for(Duration::from_secs(10), "the new daemon's data", |t| {
        !t.contains("unreachable") && t.contains("live") && row(t, &b(0)).is_some()
    })?;

    quit(&mut top, b"q")?;
    s.finish(|_| Ok(()))
}

#[test]
fn top_without_a_daemon_retries_and_quits_on_ctrl_c() -> Result<()> {
    let sock = std::env::temp_dir().join("farmlb-no-daemon-here.sock");
    let _ = std::fs::remove_file(&sock);
    let mut top = top(&sock, 24, 90)?;
    top.wait_for(Duration::from_secs(5), "daemon unreachable", |t| {
        t.contains("daemon unreachable") && t.contains("no data yet")
    })?;
    // In raw mode Ctrl-C is a key, not a signal: it must still quit cleanly.
    quit(&mut top, b"\x03")?;

    // Not a terminal, or a bad interval: one clear line each.
    let (ok, _, err) = cli(&sock, &["top"])?;
    ensure!(!ok && err.contains("farmlb top needs a terminal"), "{err}");
    let (ok, _, err) = cli(&sock, &["top", "--interval", "0"])?;
    ensure!(
        !ok && err.contains("--interval: the interval must be between 0.1 and 3600 seconds"),
        "{err}"
    );
    Ok(())
}
