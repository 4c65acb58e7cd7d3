//! What an operator running farmlb under systemd sees (issue #12): the readiness protocol
//! on a real `NOTIFY_SOCKET` (READY=1 only once the data plane serves, RELOADING=1 /
//! READY=1 around `farmlb reload` and SIGHUP, STOPPING=1 on SIGTERM), the log as journald,
//! a file and a JSON consumer get it, and negative numbers on the command line reaching the
//! API's range checks. Run as root, one test at a time (`cargo xtask test`).

use std::{
    fs,
    os::unix::{fs::MetadataExt, net::UnixDatagram},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, ensure, Context, Result};
use lb_tests::{
    ctl::{cli, cli_ok},
    daemon::api_socket,
    process::Process,
    start_on_backends, write_config, xdp_attached, Daemon, Rig, RigOpts, VIP_V4,
};
use serde_json::Value;

const PORT: u16 = 80;

fn config(rig: &Rig, backends: usize) -> String {
    let mut s = format!(
        "interface = \"{}\"\napi_socket = \"{}\"\nmetrics_address = \"off\"\n{}\n\
         [[service]]\nname = \"web\"\nvip = \"{VIP_V4}\"\nport = {PORT}\ntable_size = 1009\n",
        rig.lb_iface(),
        api_socket(rig).display(),
        lb_tests::pins::config_lines(rig.prefix(), "lb"),
    );
    for i in 0..backends {
        s += &format!(
            "\n  [[service.backend]]\n  address = \"{}\"\n",
            rig.backend_v4(i)
        );
    }
    s
}

/// The service manager's end of `NOTIFY_SOCKET`: a datagram socket the test binds.
struct Notify {
    sock: UnixDatagram,
    path: PathBuf,
}

impl Notify {
    fn bind(rig: &Rig) -> Result<Notify> {
        let path = std::env::temp_dir().join(format!("farmlb-{}.notify", rig.prefix()));
        let _ = fs::remove_file(&path);
        let sock = UnixDatagram::bind(&path).with_context(|| format!("bind {}", path.display()))?;
        sock.set_read_timeout(Some(Duration::from_secs(20)))?;
        Ok(Notify { sock, path })
    }

    /// The next datagram, as text.
    fn next(&self, waiting_for: &str) -> Result<String> {
        let mut buf = [0u8; 4096];
        let n = self
            .sock
            .recv(&mut buf)
            .with_context(|| format!("no notification while waiting for {waiting_for}"))?;
        let msg = String::from_utf8_lossy(&buf[..n]).trim_end().to_string();
        println!("notify: {msg:?}");
        Ok(msg)
    }

    /// The next datagram must be RELOADING=1 with a current MONOTONIC_USEC, the one after it
    /// READY=1.
    fn reload_pair(&self) -> Result<()> {
        let msg = self.next("RELOADING=1")?;
        let mut lines = msg.lines();
        ensure!(lines.next() == Some("RELOADING=1"), "got {msg:?}");
        let usec: u64 = lines
            .next()
            .and_then(|l| l.strip_prefix("MONOTONIC_USEC="))
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("RELOADING=1 without MONOTONIC_USEC: {msg:?}"))?;
        let now = monotonic_usec();
        ensure!(
            usec <= now && now - usec < 10_000_000,
            "MONOTONIC_USEC={usec} is not the time of the reload (now {now})"
        );
        let msg = self.next("READY=1 after the reload")?;
        ensure!(msg == "READY=1", "after RELOADING=1: {msg:?}");
        Ok(())
    }
}

impl Drop for Notify {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}

/// Create `path` (empty) and return `JOURNAL_STREAM` naming it, as systemd sets it for a
/// service whose stderr is a journal stream.
fn journal_stream(path: &Path) -> Result<String> {
    fs::write(path, "")?;
    let m = fs::metadata(path)?;
    Ok(format!("{}:{}", m.dev(), m.ino()))
}

#[test]
fn systemd_readiness_reload_and_stop_on_a_notify_socket() -> Result<()> {
    let mut rig = Rig::up(RigOpts::new("opsn", 2))?;
    let _servers = start_on_backends(&rig, PORT)?;
    let good = config(&rig, 2);
    let path = write_config(&rig, &good)?;
    let notify = Notify::bind(&rig)?;
    let log = std::env::temp_dir().join(format!("farmlb-{}.log", rig.prefix()));
    let env = [
        ("NOTIFY_SOCKET", notify.path.display().to_string()),
        ("JOURNAL_STREAM", journal_stream(&log)?),
    ];
    let pins = lb_tests::pins::pin_dir(rig.prefix(), "lb");
    let mut p = Process::spawn_env("farmlb", &rig.ns_lb(), &path, &log, &pins, &[], &env)?;

    // READY=1 is the first word, and by then the program is attached and the API answers.
    let msg = notify.next("READY=1")?;
    ensure!(
        msg == "READY=1",
        "first notification {msg:?}\nlog:\n{}",
        p.log()
    );
    ensure!(
        xdp_attached(&rig)?,
        "READY=1 before the XDP program was attached"
    );
    let sock = api_socket(&rig);
    cli_ok(&sock, &["status"])?;
    let (counts, failures) = rig.connect(VIP_V4.into(), PORT, 20);
    ensure!(
        failures.is_empty(),
        "connections after READY=1: {failures:?}"
    );
    println!("after READY=1: {counts:?}");

    // `farmlb reload` (the unit's ExecReload), a refused reload, and SIGHUP: each one
    // RELOADING=1 then READY=1, so systemd's reload job ends either way.
    fs::write(&path, config(&rig, 1))?;
    cli_ok(&sock, &["reload"])?;
    notify.reload_pair()?;
    fs::write(&path, "interface = 5\n")?;
    let (ok, _, err) = cli(&sock, &["reload"])?;
    ensure!(!ok, "a broken file reloaded: {err}");
    notify.reload_pair()?;
    fs::write(&path, &good)?;
    p.signal(libc::SIGHUP)?;
    notify.reload_pair()?;

    // Under journald: `<N>` priorities, no timestamps, no colour.
    let text = p.log();
    check_journal_lines(&text)?;
    ensure!(
        text.lines()
            .any(|l| l.starts_with("<6>") && l.contains("XDP program attached")),
        "no <6> line for the attach:\n{text}"
    );
    ensure!(
        text.lines()
            .any(|l| l.starts_with("<4>") && l.contains("this is a veth")),
        "the veth warning is not at priority 4:\n{text}"
    );

    let st = p.exit(libc::SIGTERM)?;
    println!("exited: {st:?}");
    let msg = notify.next("STOPPING=1")?;
    ensure!(msg == "STOPPING=1", "on SIGTERM: {msg:?}");
    drop(p);
    rig.down()
}

/// Every line of a journald-bound log: `<0>`..`<7>`, then no timestamp and no escape codes.
fn check_journal_lines(text: &str) -> Result<()> {
    ensure!(!text.trim().is_empty(), "empty log");
    for line in text.lines() {
        let rest = line
            .strip_prefix('<')
            .and_then(|r| r.split_once('>'))
            .filter(|(n, _)| n.len() == 1 && ("0".."8").contains(n))
            .map(|(_, rest)| rest);
        let Some(rest) = rest else {
            bail!("no syslog priority prefix: {line:?}");
        };
        ensure!(!line.contains('\x1b'), "escape codes: {line:?}");
        ensure!(
            !rest.starts_with(|c: char| c.is_ascii_digit()),
            "a timestamp journald would duplicate: {line:?}"
        );
    }
    Ok(())
}

#[test]
fn logs_are_plain_in_a_file_and_json_on_request() -> Result<()> {
    let mut rig = Rig::up(RigOpts::new("opsl", 1))?;
    let _servers = start_on_backends(&rig, PORT)?;
    let path = write_config(&rig, &config(&rig, 1))?;

    // stderr is a file: timestamped text, no colour.
    let mut d = Daemon::start(&rig, &path)?;
    let text = d.log();
    d.stop()?;
    ensure!(
        !text.contains('\x1b'),
        "ANSI escapes in a log file:\n{text:?}"
    );
    let attach = text
        .lines()
        .find(|l| l.contains("XDP program attached"))
        .with_context(|| format!("no attach line:\n{text}"))?;
    ensure!(
        attach.starts_with("20") && attach.contains(" INFO "),
        "not a timestamped INFO line: {attach:?}"
    );
    // JOURNAL_STREAM naming another file: still plain text (a child whose stderr was
    // redirected inherits the variable, not the stream).
    let other = std::env::temp_dir().join("farmlb-opsl.other");
    let mut d = Daemon::start_with(
        &rig,
        &path,
        &[],
        &[("JOURNAL_STREAM", journal_stream(&other)?)],
    )?;
    let text = d.log();
    d.stop()?;
    let _ = fs::remove_file(&other);
    ensure!(
        text.lines().all(|l| !l.starts_with('<')),
        "JOURNAL_STREAM of another file was taken as the journal:\n{text}"
    );

    // --log-format json: every line one object.
    let mut d = Daemon::start_with(&rig, &path, &["--log-format", "json"], &[])?;
    let text = d.log();
    d.stop()?;
    let mut attached = false;
    for line in text.lines() {
        let v: Value = serde_json::from_str(line)
            .with_context(|| format!("--log-format json: not JSON: {line:?}"))?;
        ensure!(
            v["timestamp"].is_string() && v["level"].is_string(),
            "no timestamp/level: {line}"
        );
        if v["fields"]["message"] == "XDP program attached" {
            attached = true;
            ensure!(v["level"] == "INFO", "{line}");
            ensure!(v["fields"]["interface"] == rig.lb_iface(), "{line}");
        }
    }
    ensure!(attached, "no JSON attach line:\n{text}");
    rig.down()
}

#[test]
fn negative_numbers_reach_the_range_checks() -> Result<()> {
    let mut rig = Rig::up(RigOpts::new("opsi", 2))?;
    let _servers = start_on_backends(&rig, PORT)?;
    let path = write_config(&rig, &config(&rig, 1))?;
    let mut d = Daemon::start(&rig, &path)?;
    let sock = api_socket(&rig);
    lb_tests::wait_until(Duration::from_secs(5), "the API socket", || {
        Ok(cli(&sock, &["status"])?.0)
    })?;
    let b1 = rig.backend_v4(0).to_string();
    let b2 = rig.backend_v4(1).to_string();
    let err = |args: &[&str]| -> Result<String> {
        let (ok, _, err) = cli(&sock, args)?;
        ensure!(!ok, "farmlb {} succeeded", args.join(" "));
        Ok(err.trim().to_string())
    };
    let set = err(&["backend", "set", "web", &b1, "--weight", "-1"])?;
    let add = err(&["backend", "add", "web", &b2, "--weight", "-5"])?;
    // The same range check answers both, naming the field and the value.
    let range = "weight: {} is out of range 0..=65535 (HTTP 400)";
    ensure!(
        set == format!("farmlb: error: {}", range.replace("{}", "-1")),
        "backend set: {set}"
    );
    ensure!(
        add == format!(
            "farmlb: error: service \"web\": backend.{}",
            range.replace("{}", "-5")
        ),
        "backend add --weight -5: {add:?} is not the range error of backend set: {set:?}"
    );
    let table = err(&[
        "service",
        "add",
        "x",
        "10.99.100.9",
        "81",
        "--table-size",
        "-7",
    ])?;
    ensure!(
        table.ends_with("table_size: -7 is out of range 7..=1048573 (HTTP 400)"),
        "{table}"
    );
    let port = err(&["service", "add", "x", "10.99.100.9", "-80"])?;
    ensure!(
        port.ends_with("port: -80 is out of range 0..=65535 (HTTP 400)"),
        "{port}"
    );
    let watch = err(&["stats", "--watch", "-1"])?;
    ensure!(
        watch == "farmlb: error: --watch: the interval must be between 0.1 and 3600 seconds",
        "{watch}"
    );
    // Nothing was half-applied.
    let status = cli_ok(&sock, &["status", "--json"])?;
    let v: Value = serde_json::from_str(&status)?;
    ensure!(
        v["services"].as_array().map(Vec::len) == Some(1),
        "{status}"
    );
    ensure!(
        v["services"][0]["backends"].as_array().map(Vec::len) == Some(1),
        "{status}"
    );
    d.stop()?;
    rig.down()
}
