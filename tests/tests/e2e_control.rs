//! End-to-end tests of the control plane (issue #3): health checks taking failed backends out
//! of the table and back, drain through the CLI, exec checks with dynamic weights, the runtime
//! API's validation, reload, and the Prometheus endpoint. farmlb runs in the director
//! namespace of a rig; the CLI talks to it over its unix socket; clients connect from the
//! client namespace. Run as root, one test at a time (`cargo xtask test`).

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use lb_tests::{
    connect_many,
    ctl::{self, cli, cli_ok, find_backend, metric, Metrics},
    daemon::api_socket as socket_path,
    farmlb_bin, in_netns, start_on_backend, tally, wait_until as wait_for, Background, DirectorRig,
    IdentityServer, LongConn, Rig, VIP_V4,
};
use serde_json::Value;

const PORT: u16 = 80;
const METRICS: &str = "127.0.0.1:9740";

// --- helpers ------------------------------------------------------------------------------

/// A config for the rig: globals, then `services` (TOML text).
fn config(rig: &Rig, services: &str) -> String {
    format!(
        "interface = \"{}\"\napi_socket = \"{}\"\nmetrics_address = \"{METRICS}\"\n{}\n{services}",
        rig.lb_iface(),
        socket_path(rig).display(),
        lb_tests::pins::config_lines(rig.prefix(), "lb"),
    )
}

/// `[[service]] web` on VIP_V4:80 with the given `check = {...}` line (may be empty) and
/// backends `(index, weight)`.
fn web(rig: &Rig, check: &str, backends: &[(usize, u32)]) -> String {
    let mut s = format!(
        "[[service]]\nname = \"web\"\nvip = \"{VIP_V4}\"\nport = {PORT}\ntable_size = 1009\n{check}\n"
    );
    for &(i, w) in backends {
        s += &format!(
            "\n  [[service.backend]]\n  address = \"{}\"\n  weight = {w}\n",
            rig.backend_v4(i)
        );
    }
    s
}

const FAST_CHECK: &str =
    "check = { type = \"tcp\", interval = \"200ms\", timeout = \"100ms\", rise = 2, fall = 3 }";

type Setup = DirectorRig;

fn setup(prefix: &str, backends: usize, services: impl Fn(&Rig) -> String) -> Result<Setup> {
    let s = DirectorRig::up(prefix, backends, PORT, |rig| config(rig, &services(rig)))?;
    wait_for(Duration::from_secs(5), "the API socket", || {
        Ok(api(&s.rig, "GET", "/v1/status", None).is_ok())
    })?;
    Ok(s)
}

/// The usual setup: `web` over three backends of weight 1 with [`FAST_CHECK`].
fn setup_web3(prefix: &str) -> Result<Setup> {
    setup(prefix, 3, |r| web(r, FAST_CHECK, &[(0, 1), (1, 1), (2, 1)]))
}

/// What the control-plane tests ask of a running director.
trait Control {
    fn finish_clean(self) -> Result<()>;
    fn sock(&self) -> PathBuf;
    fn b(&self, i: usize) -> String;
    fn connect(&self, n: usize) -> (BTreeMap<String, usize>, Vec<String>);
    fn connect_ok(&self, n: usize, what: &str) -> Result<BTreeMap<String, usize>>;
    fn status(&self) -> Result<Value>;
    fn backend(&self, addr: &str) -> Result<Value>;
    fn health(&self, i: usize) -> Result<String>;
}

impl Control for Setup {
    fn finish_clean(self) -> Result<()> {
        self.finish(|rig| {
            ensure!(
                !socket_path(rig).exists(),
                "the API socket was not removed on exit"
            );
            Ok(())
        })
    }

    fn sock(&self) -> PathBuf {
        socket_path(&self.rig)
    }

    fn b(&self, i: usize) -> String {
        self.rig.backend_v4(i).to_string()
    }

    fn connect(&self, n: usize) -> (BTreeMap<String, usize>, Vec<String>) {
        self.rig.connect(IpAddr::V4(VIP_V4), PORT, n)
    }

    /// `n` connections that must all succeed.
    fn connect_ok(&self, n: usize, what: &str) -> Result<BTreeMap<String, usize>> {
        self.connect_to_ok(IpAddr::V4(VIP_V4), PORT, n, what)
    }

    fn status(&self) -> Result<Value> {
        let (code, v) = api(&self.rig, "GET", "/v1/status", None)?;
        ensure!(code == 200, "status: HTTP {code}: {v}");
        Ok(v)
    }

    /// The backend's entry in `GET /v1/status`.
    fn backend(&self, addr: &str) -> Result<Value> {
        let s = self.status()?;
        find_backend(&s, addr).with_context(|| format!("backend {addr} not in status: {s}"))
    }

    fn health(&self, i: usize) -> Result<String> {
        Ok(self.backend(&self.b(i))?["health"]
            .as_str()
            .unwrap_or("?")
            .to_string())
    }
}

/// One raw HTTP/1.1 request on the rig's API socket: (status, JSON body).
fn api(rig: &Rig, method: &str, path: &str, body: Option<&str>) -> Result<(u16, Value)> {
    ctl::api(&socket_path(rig), method, path, body)
}

/// Scrape `/metrics` inside the director namespace; returns `name{labels}` → value.
fn scrape(rig: &Rig) -> Result<Metrics> {
    ctl::scrape(&rig.ns_lb(), METRICS.parse()?, "1.1")
}

// --- health checks --------------------------------------------------------------------------

/// Kill b2's server, measure until new connections stop reaching it (and until the API says
/// down), restart it and measure until it is back; print both times.
fn detection(s: &mut Setup, interval: Duration, rise: u32, fall: u32) -> Result<()> {
    wait_for(interval * 4, "every backend checked and up", || {
        let st = s.status()?;
        Ok((0..3).all(|i| {
            find_backend(&st, &s.b(i))
                .is_some_and(|b| b["health"] == "up" && b["last_check"]["ok"] == true)
        }))
    })?;
    s.connect_ok(99, "before the failure")?;

    s.servers[1].stop();
    let t0 = Instant::now();
    let mut api_down = None;
    let mut clean = None;
    while clean.is_none() || api_down.is_none() {
        if api_down.is_none() && s.health(1)? == "down" {
            api_down = Some(t0.elapsed());
        }
        if clean.is_none() {
            let (counts, failures) = s.connect(24);
            if failures.is_empty() && !counts.contains_key("b2") {
                clean = Some(t0.elapsed());
            }
        }
        ensure!(
            t0.elapsed() < interval * (fall + 4),
            "b2 still in the table after {:?} (API health {})",
            t0.elapsed(),
            s.health(1)?
        );
        thread::sleep(Duration::from_millis(10));
    }
    let (api_down, clean) = (api_down.unwrap(), clean.unwrap());
    let bound = interval * (fall + 1);
    let margin = interval / 2 + Duration::from_millis(300);
    println!(
        "DETECTION (interval {interval:?}, fall {fall}): b2 marked down after {:.0} ms; new \
         connections avoid it after {:.0} ms (bound fall×interval + interval = {:.0} ms, \
         margin {:.0} ms)",
        api_down.as_secs_f64() * 1e3,
        clean.as_secs_f64() * 1e3,
        bound.as_secs_f64() * 1e3,
        margin.as_secs_f64() * 1e3
    );
    ensure!(
        clean <= bound + margin,
        "new connections reached b2 for {clean:?}, more than {bound:?} + {margin:?}"
    );
    let counts = s.connect_ok(99, "b2 down")?;
    ensure!(!counts.contains_key("b2"), "b2 still chosen: {counts:?}");
    ensure!(counts.len() == 2, "{counts:?}");
    let b2 = s.backend(&s.b(1))?;
    ensure!(b2["effective_weight"] == 0 && b2["slots"] == 0, "{b2}");
    ensure!(b2["last_check"]["ok"] == false, "{b2}");

    s.servers[1] = start_on_backend(&s.rig, 1, PORT)?;
    let t1 = Instant::now();
    let up = wait_for(interval * (rise + 4), "b2 up again", || {
        Ok(s.health(1)? == "up")
    })?;
    let bound = interval * (rise + 1);
    println!(
        "RECOVERY (interval {interval:?}, rise {rise}): b2 marked up after {:.0} ms (bound \
         rise×interval + interval = {:.0} ms)",
        up.as_secs_f64() * 1e3,
        bound.as_secs_f64() * 1e3
    );
    ensure!(
        t1.elapsed() <= bound + margin,
        "b2 came back after {:?}",
        t1.elapsed()
    );
    ensure!(
        up + interval / 4 >= interval * (rise - 1),
        "b2 came back after {up:?}: faster than rise = {rise} checks allow"
    );
    let counts = s.connect_ok(99, "b2 back")?;
    ensure!(
        counts.get("b2").copied().unwrap_or(0) > 10,
        "b2 gets no new flows after coming back: {counts:?}"
    );
    Ok(())
}

#[test]
fn failed_backend_leaves_the_table_and_returns() -> Result<()> {
    let mut s = setup_web3("ctlhc")?;
    detection(&mut s, Duration::from_millis(200), 2, 3)?;
    ensure!(
        s.daemon.log().contains("backend is DOWN") && s.daemon.log().contains("backend is UP"),
        "transitions not logged:\n{}",
        s.daemon.log()
    );
    s.finish_clean()
}

#[test]
fn detection_time_with_default_timers() -> Result<()> {
    // interval 2s, timeout 1s, rise 2, fall 3 (the defaults).
    let mut s = setup("ctldef", 3, |r| {
        web(r, "check = { type = \"tcp\" }", &[(0, 1), (1, 1), (2, 1)])
    })?;
    let b = s.backend(&s.b(0))?;
    ensure!(b["checked"] == true, "{b}");
    let svc = &s.status()?["services"][0]["check"];
    ensure!(
        svc == "tcp :80 every 2s timeout 1s rise 2 fall 3",
        "default check: {svc}"
    );
    detection(&mut s, Duration::from_secs(2), 2, 3)?;
    s.finish_clean()
}

#[test]
fn every_backend_down_drops_loudly() -> Result<()> {
    let mut s = setup("ctlall", 2, |r| web(r, FAST_CHECK, &[(0, 1), (1, 1)]))?;
    s.connect_ok(20, "both up")?;
    for srv in &mut s.servers {
        srv.stop();
    }
    wait_for(Duration::from_secs(3), "both down", || {
        Ok(s.health(0)? == "down" && s.health(1)? == "down")
    })?;
    let before = scrape(&s.rig)?;
    ensure!(metric(&before, "farmlb_service_up_backends{service=\"web\"}")? == 0.0);
    ensure!(metric(&before, "farmlb_service_usable_backends{service=\"web\"}")? == 0.0);
    let (_, failures) = s.connect(2);
    ensure!(
        failures.len() == 2,
        "connections succeeded with every backend down"
    );
    let after = scrape(&s.rig)?;
    let drops = |m: &BTreeMap<String, f64>| metric(m, "farmlb_drops_total{reason=\"no_backend\"}");
    ensure!(
        drops(&after)? >= drops(&before)? + 2.0,
        "drop_no_backend did not grow: {} -> {}",
        drops(&before)?,
        drops(&after)?
    );
    let log = s.daemon.log();
    ensure!(
        log.matches("NO usable backend").count() == 1,
        "expected one error line for the transition:\n{log}"
    );
    let status = cli_ok(&s.sock(), &["status"])?;
    ensure!(status.contains("NO USABLE BACKEND"), "{status}");
    s.servers[0] = start_on_backend(&s.rig, 0, PORT)?;
    wait_for(Duration::from_secs(3), "b1 up", || Ok(s.health(0)? == "up"))?;
    let counts = s.connect_ok(20, "b1 back")?;
    ensure!(counts.get("b1") == Some(&20), "{counts:?}");
    ensure!(s.daemon.log().contains("usable backends again"));
    s.finish_clean()
}

// --- drain --------------------------------------------------------------------------------

#[test]
fn drain_through_cli_keeps_established_connection() -> Result<()> {
    let s = setup_web3("ctldrn")?;
    let sources = s.rig.client_sources_v4();
    // Open connections until one lands on b2.
    let mut on_b2 = None;
    for (i, src) in sources.iter().cycle().take(60).enumerate() {
        let mut c = LongConn::open(&s.rig.ns_client(), *src, IpAddr::V4(VIP_V4), PORT)
            .with_context(|| format!("long connection {i}"))?;
        c.ping()?;
        if c.identity() == "b2" {
            on_b2 = Some(c);
            break;
        }
    }
    let mut conn = on_b2.context("no connection landed on b2 in 60 tries")?;

    let out = cli_ok(
        &s.sock(),
        &["backend", "set", "web", &s.b(1), "--state", "drain"],
    )?;
    ensure!(
        out.contains("state drain") && out.contains("effective weight 0"),
        "{out}"
    );
    let status = cli_ok(&s.sock(), &["status"])?;
    ensure!(status.contains("drain*"), "{status}");
    let json: Value = serde_json::from_str(&cli_ok(&s.sock(), &["status", "--json"])?)?;
    let b2 = find_backend(&json, &s.b(1)).context("b2 in status --json")?;
    ensure!(
        b2["state"] == "drain" && b2["state_runtime"] == true && b2["effective_weight"] == 0,
        "{b2}"
    );

    for round in 0..5 {
        let id = conn
            .ping()
            .with_context(|| format!("established connection to b2, ping {round} after drain"))?;
        ensure!(id == "b2");
        let counts = s.connect_ok(30, &format!("new connections after drain, round {round}"))?;
        ensure!(
            !counts.contains_key("b2"),
            "a new connection reached drained b2: {counts:?}"
        );
        ensure!(counts.len() == 2, "{counts:?}");
    }

    cli_ok(
        &s.sock(),
        &["backend", "set", "web", &s.b(1), "--state", "ready"],
    )?;
    let counts = s.connect_ok(99, "after ready")?;
    ensure!(counts.get("b2").copied().unwrap_or(0) > 10, "{counts:?}");
    ensure!(conn.ping()? == "b2");
    // Weight 0 drains too.
    cli_ok(
        &s.sock(),
        &["backend", "set", "web", &s.b(1), "--weight", "0"],
    )?;
    let counts = s.connect_ok(30, "weight 0")?;
    ensure!(!counts.contains_key("b2"), "{counts:?}");
    ensure!(conn.ping()? == "b2");
    drop(conn);
    s.finish_clean()
}

// --- exec check with dynamic weight ---------------------------------------------------------

#[test]
fn exec_check_dynamic_weight_moves_the_share() -> Result<()> {
    let dir = std::env::temp_dir().join("farmlb-ctlexe");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let set_code = |i: usize, code: u8| -> Result<()> {
        let path = dir.join(format!("10.99.0.{}", 11 + i));
        Ok(std::fs::write(path, format!("{code}\n"))?)
    };
    for i in 0..3 {
        set_code(i, 3)?; // weight 1
    }
    let check = format!(
        "check = {{ type = \"exec\", dynamic = true, interval = \"200ms\", timeout = \"150ms\", \
         command = \"exit $(cat {}/$FARMLB_BACKEND)\" }}",
        dir.display()
    );
    let s = setup("ctlexe", 3, |r| web(r, &check, &[(0, 1), (1, 1), (2, 1)]))?;
    let weights = |s: &Setup| -> Result<Vec<i64>> {
        (0..3)
            .map(|i| {
                s.backend(&s.b(i))
                    .map(|b| b["effective_weight"].as_i64().unwrap_or(-1))
            })
            .collect()
    };
    wait_for(Duration::from_secs(3), "dynamic weights 1,1,1", || {
        Ok(weights(&s)? == [1, 1, 1])
    })?;
    let counts = s.connect_ok(198, "exec weights 1:1:1")?;
    ensure!(
        counts.len() == 3 && counts.values().all(|&n| n > 35),
        "{counts:?}"
    );

    set_code(0, 10)?; // b1: weight 8
    wait_for(Duration::from_secs(3), "b1 weight 8", || {
        Ok(weights(&s)? == [8, 1, 1])
    })?;
    let counts = s.connect_ok(200, "exec weights 8:1:1")?;
    let b1 = counts.get("b1").copied().unwrap_or(0);
    ensure!(b1 > 130, "b1 (weight 8 of 10) got {b1} of 200: {counts:?}");
    let b = s.backend(&s.b(0))?;
    ensure!(b["weight_dynamic"] == 8 && b["weight"] == 1, "{b}");

    set_code(2, 2)?; // b3: up, weight 0
    wait_for(Duration::from_secs(3), "b3 weight 0", || {
        Ok(weights(&s)? == [8, 1, 0])
    })?;
    ensure!(s.health(2)? == "up");
    let counts = s.connect_ok(100, "exec weights 8:1:0")?;
    ensure!(!counts.contains_key("b3"), "{counts:?}");

    set_code(1, 1)?; // b2: down
    wait_for(Duration::from_secs(3), "b2 down", || {
        Ok(s.health(1)? == "down")
    })?;
    let counts = s.connect_ok(60, "exec b2 down")?;
    ensure!(counts.keys().collect::<Vec<_>>() == ["b1"], "{counts:?}");
    let b2 = s.backend(&s.b(1))?;
    ensure!(
        b2["last_check"]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("exited with 1")),
        "{b2}"
    );
    s.finish_clean()?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

// --- API ----------------------------------------------------------------------------------

#[test]
fn api_rejects_bad_requests_and_changes_nothing() -> Result<()> {
    // No daemon: a clear error.
    let (ok, _, err) = cli(Path::new("/tmp/farmlb-nonexistent.sock"), &["status"])?;
    ensure!(
        !ok && err.contains("cannot reach the farmlb daemon"),
        "{err}"
    );

    let mut s = setup("ctlapi", 3, |r| {
        web(r, FAST_CHECK, &[(0, 1), (1, 2), (2, 1)])
    })?;
    /// The running config, and (address, state, effective weight, slots) of every backend.
    type Snapshot = (Value, Vec<(String, String, i64, i64)>);
    let snapshot = |s: &Setup| -> Result<Snapshot> {
        let (code, cfg) = api(&s.rig, "GET", "/v1/config", None)?;
        ensure!(code == 200);
        let st = s.status()?;
        let mut view = Vec::new();
        for svc in st["services"].as_array().cloned().unwrap_or_default() {
            for b in svc["backends"].as_array().cloned().unwrap_or_default() {
                view.push((
                    b["address"].to_string(),
                    b["state"].to_string(),
                    b["effective_weight"].as_i64().unwrap_or(-1),
                    b["slots"].as_i64().unwrap_or(-1),
                ));
            }
        }
        Ok((cfg, view))
    };
    let before = snapshot(&s)?;
    ensure!(before.1.len() == 3, "{:?}", before.1);
    {
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        let meta = std::fs::metadata(s.sock())?;
        ensure!(meta.file_type().is_socket());
        ensure!(
            meta.permissions().mode() & 0o777 == 0o600,
            "API socket mode {:o}",
            meta.permissions().mode() & 0o777
        );
    }
    let b1 = s.b(0);
    let bad: Vec<(&str, String, Option<&str>, u16, &str)> = vec![
        (
            "PATCH",
            "/v1/services/nope/backends/10.99.0.11".into(),
            Some(r#"{"weight":2}"#),
            404,
            "service",
        ),
        (
            "PATCH",
            "/v1/services/web/backends/10.99.0.99".into(),
            Some(r#"{"weight":2}"#),
            404,
            "backend",
        ),
        (
            "PATCH",
            "/v1/services/web/backends/10.99.0.x".into(),
            Some(r#"{"weight":2}"#),
            400,
            "address",
        ),
        (
            "PATCH",
            format!("/v1/services/web/backends/{b1}"),
            Some(r#"{"weight":-1}"#),
            400,
            "weight",
        ),
        (
            "PATCH",
            format!("/v1/services/web/backends/{b1}"),
            Some(r#"{"weight":70000}"#),
            400,
            "weight",
        ),
        (
            "PATCH",
            format!("/v1/services/web/backends/{b1}"),
            Some(r#"{"state":"down"}"#),
            400,
            "state",
        ),
        (
            "PATCH",
            format!("/v1/services/web/backends/{b1}"),
            Some(r#"{"weight": "#),
            400,
            "malformed JSON",
        ),
        (
            "PATCH",
            format!("/v1/services/web/backends/{b1}"),
            Some("{}"),
            400,
            "weight",
        ),
        (
            "POST",
            "/v1/services/web/backends".into(),
            Some(r#"{"address":"10.99.0.x"}"#),
            400,
            "address",
        ),
        (
            "POST",
            "/v1/services/web/backends".into(),
            Some(r#"{"address":"10.99.0.20","weight":-3}"#),
            400,
            "weight",
        ),
        (
            "POST",
            "/v1/services/web/backends".into(),
            Some(r#"{"address":"10.99.0.11"}"#),
            409,
            "duplicate",
        ),
        (
            "POST",
            "/v1/services/web/backends".into(),
            Some(r#"{"address":"fd99::20"}"#),
            400,
            "address",
        ),
        (
            "POST",
            "/v1/services/web/backends".into(),
            Some(r#"["x"]"#),
            400,
            "body",
        ),
        (
            "POST",
            "/v1/services/nope/backends".into(),
            Some(r#"{"address":"10.99.0.20"}"#),
            404,
            "service",
        ),
        (
            "POST",
            "/v1/services".into(),
            Some(r#"{"name":"api","vip":"10.99.100.1","port":80}"#),
            409,
            "duplicate",
        ),
        (
            "POST",
            "/v1/services".into(),
            Some(r#"{"name":"web","vip":"10.99.100.9","port":80}"#),
            409,
            "name",
        ),
        (
            "POST",
            "/v1/services".into(),
            Some(r#"{"name":"x","vip":"10.99.100.9"}"#),
            400,
            "port",
        ),
        (
            "POST",
            "/v1/services".into(),
            Some(r#"{"name":"x","vip":"10.99.100.9","port":1,"colour":1}"#),
            400,
            "colour",
        ),
        (
            "POST",
            "/v1/services".into(),
            Some(r#"{"name":"x","vip":"#),
            400,
            "malformed JSON",
        ),
        ("DELETE", "/v1/services/nope".into(), None, 404, "service"),
        (
            "DELETE",
            "/v1/services/web/backends/10.99.0.99".into(),
            None,
            404,
            "backend",
        ),
        (
            "DELETE",
            "/v1/services/web/backends/zzz".into(),
            None,
            400,
            "address",
        ),
        ("GET", "/v1/nope".into(), None, 404, "endpoint"),
        ("DELETE", "/v1/status".into(), None, 405, "method"),
    ];
    for (method, path, body, want, field) in &bad {
        let (code, v) = api(&s.rig, method, path, *body)?;
        let msg = v["error"].as_str().unwrap_or_default().to_string();
        println!("{method} {path} {} -> {code} {msg}", body.unwrap_or(""));
        ensure!(
            code == *want,
            "{method} {path}: HTTP {code}, expected {want}: {v}"
        );
        ensure!(
            !msg.is_empty() && !msg.contains('\n'),
            "{method} {path}: reason {v}"
        );
        ensure!(
            msg.contains(field),
            "{method} {path}: {msg:?} does not name {field:?}"
        );
        let now = snapshot(&s)?;
        ensure!(
            now == before,
            "{method} {path} changed the state:\n{:?}\n{:?}",
            before,
            now
        );
    }
    // The CLI reports the API's reason and fails.
    let (ok, _, err) = cli(&s.sock(), &["backend", "set", "web", &b1, "--weight", "-1"])?;
    ensure!(
        !ok && err.contains("weight: -1 is out of range 0..=65535"),
        "{err}"
    );
    let (ok, _, err) = cli(
        &s.sock(),
        &["backend", "set", "nope", &b1, "--state", "drain"],
    )?;
    ensure!(
        !ok && err.contains("no service named \"nope\"") && err.contains("404"),
        "{err}"
    );
    ensure!(snapshot(&s)? == before);
    s.connect_ok(60, "after the bad requests")?;

    // Valid changes through the CLI: add and remove a backend and a service.
    let b4 = s.rig.add_backend()?;
    s.servers.push(start_on_backend(&s.rig, b4, PORT)?);
    let a4 = s.b(b4);
    cli_ok(&s.sock(), &["backend", "add", "web", &a4, "--weight", "2"])?;
    let b = s.backend(&a4)?;
    ensure!(
        b["weight"] == 2 && b["checked"] == true,
        "inherits the service check: {b}"
    );
    let counts = s.connect_ok(120, "after backend add")?;
    ensure!(counts.get("b4").copied().unwrap_or(0) > 10, "{counts:?}");
    cli_ok(&s.sock(), &["backend", "del", "web", &a4])?;
    let counts = s.connect_ok(60, "after backend del")?;
    ensure!(!counts.contains_key("b4"), "{counts:?}");

    let alt = IdentityServer::start(
        &s.rig.ns_backend(0),
        SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 8080),
        "alt1",
    )?;
    cli_ok(
        &s.sock(),
        &[
            "service",
            "add",
            "alt",
            &VIP_V4.to_string(),
            "8080",
            "--backend",
            &s.b(0),
            "--check",
            r#"{"type":"tcp"}"#,
        ],
    )?;
    let res = connect_many(
        &s.rig.ns_client(),
        IpAddr::V4(VIP_V4),
        8080,
        10,
        &s.rig.client_sources_v4(),
    );
    let (counts, failures) = tally(&res);
    ensure!(
        failures.is_empty() && counts.get("alt1") == Some(&10),
        "{counts:?} {failures:?}"
    );
    let st = s.status()?;
    ensure!(st["services"].as_array().map(Vec::len) == Some(2), "{st}");
    cli_ok(&s.sock(), &["service", "del", "alt"])?;
    ensure!(s.status()?["services"].as_array().map(Vec::len) == Some(1));
    drop(alt);
    ensure!(snapshot(&s)?.1 == before.1, "state after add/del differs");
    s.finish_clean()
}

// --- reload -------------------------------------------------------------------------------

#[test]
fn reload_applies_the_file_and_rejects_a_broken_one() -> Result<()> {
    let mut s = setup_web3("ctlrld")?;
    let sources = s.rig.client_sources_v4();
    let mut conns = Vec::new();
    for src in &sources[..12] {
        let mut c = LongConn::open(&s.rig.ns_client(), *src, IpAddr::V4(VIP_V4), PORT)?;
        c.ping()?;
        conns.push(c);
    }
    let ids: Vec<String> = conns.iter().map(|c| c.identity().to_string()).collect();
    let pings = |conns: &mut Vec<LongConn>, when: &str| -> Result<()> {
        for (i, c) in conns.iter_mut().enumerate() {
            let id = c
                .ping()
                .with_context(|| format!("connection {i} ({}) {when}", ids[i]))?;
            ensure!(
                id == ids[i],
                "connection {i} moved from {} to {id} {when}",
                ids[i]
            );
        }
        Ok(())
    };

    // An operator drain made at runtime...
    cli_ok(
        &s.sock(),
        &["backend", "set", "web", &s.b(2), "--state", "drain"],
    )?;

    // ...then the file changes weights (b1: 3) and adds b4.
    let b4 = s.rig.add_backend()?;
    s.servers.push(start_on_backend(&s.rig, b4, PORT)?);
    let new = config(
        &s.rig,
        &web(&s.rig, FAST_CHECK, &[(0, 3), (1, 1), (2, 1), (3, 1)]),
    );
    std::fs::write(s.daemon.config_path(), &new)?;
    let out = cli_ok(&s.sock(), &["reload"])?;
    ensure!(out.contains("4 backends"), "{out}");
    pings(&mut conns, "after reload")?;
    let b = s.backend(&s.b(0))?;
    ensure!(b["weight"] == 3, "{b}");
    let b3 = s.backend(&s.b(2))?;
    ensure!(
        b3["state"] == "drain" && b3["state_runtime"] == true,
        "runtime drain lost: {b3}"
    );
    wait_for(Duration::from_secs(2), "b4 checked", || {
        Ok(s.backend(&s.b(3))?["last_check"]["ok"] == true)
    })?;
    let counts = s.connect_ok(400, "after reload (3:1:drain:1)")?;
    ensure!(counts.get("b4").copied().unwrap_or(0) > 10, "{counts:?}");
    ensure!(!counts.contains_key("b3"), "{counts:?}");
    let b1n = counts.get("b1").copied().unwrap_or(0);
    ensure!(
        b1n > counts.get("b2").copied().unwrap_or(0) * 2,
        "b1 weight 3: {counts:?}"
    );

    // A broken file is rejected whole: the CLI fails naming the field, nothing changes.
    let (_, before_cfg) = api(&s.rig, "GET", "/v1/config", None)?;
    let broken = new.replacen("weight = 3", "weight = 3\n  weigth = 2", 1);
    std::fs::write(s.daemon.config_path(), &broken)?;
    let (ok, _, err) = cli(&s.sock(), &["reload"])?;
    ensure!(!ok, "a broken config was accepted");
    ensure!(
        err.contains("reload rejected")
            && err.contains("unknown field \"weigth\"")
            && err.contains("line "),
        "{err}"
    );
    let bad_value = new.replacen("weight = 3", "weight = 70000", 1);
    std::fs::write(s.daemon.config_path(), &bad_value)?;
    let (ok, _, err) = cli(&s.sock(), &["reload"])?;
    ensure!(
        !ok && err.contains("backend[0].weight: 70000 is out of range"),
        "{err}"
    );
    let (_, after_cfg) = api(&s.rig, "GET", "/v1/config", None)?;
    ensure!(
        after_cfg == before_cfg,
        "a rejected reload changed the running config"
    );
    // SIGHUP with a broken file: logged, daemon keeps running the old config.
    s.daemon.reload(&broken)?;
    ensure!(
        s.daemon.log().contains("SIGHUP: reload rejected"),
        "{}",
        s.daemon.log()
    );
    let (_, after_cfg) = api(&s.rig, "GET", "/v1/config", None)?;
    ensure!(after_cfg == before_cfg);
    pings(&mut conns, "after the rejected reloads")?;
    s.connect_ok(60, "after the rejected reloads")?;

    // SIGHUP with a good file (b4 removed, b1 back to 1): applied.
    s.daemon.reload(&config(
        &s.rig,
        &web(&s.rig, FAST_CHECK, &[(0, 1), (1, 1), (2, 1)]),
    ))?;
    let st = s.status()?;
    ensure!(find_backend(&st, &s.b(3)).is_none(), "b4 still there: {st}");
    pings(&mut conns, "after SIGHUP")?;
    drop(conns);
    s.finish_clean()
}

// --- metrics ------------------------------------------------------------------------------

#[test]
fn metrics_counters_grow_with_traffic() -> Result<()> {
    let s = setup_web3("ctlmet")?;
    wait_for(Duration::from_secs(2), "checks ran", || {
        Ok(s.backend(&s.b(2))?["last_check"]["ok"] == true)
    })?;
    let m0 = scrape(&s.rig)?;
    let bl = |i: usize| format!("service=\"web\",backend=\"{}\"", s.b(i));
    for i in 0..3 {
        ensure!(metric(&m0, &format!("farmlb_backend_up{{{}}}", bl(i)))? == 1.0);
        ensure!(metric(&m0, &format!("farmlb_backend_weight{{{}}}", bl(i)))? == 1.0);
        ensure!(
            metric(
                &m0,
                &format!("farmlb_backend_state{{{},state=\"ready\"}}", bl(i))
            )? == 1.0
        );
        ensure!(
            metric(
                &m0,
                &format!("farmlb_check_duration_seconds_count{{{}}}", bl(i))
            )? >= 1.0
        );
        ensure!(
            metric(
                &m0,
                &format!("farmlb_checks_total{{{},result=\"up\"}}", bl(i))
            )? >= 1.0
        );
    }
    ensure!(metric(&m0, "farmlb_service_up_backends{service=\"web\"}")? == 3.0);
    let svc_p = "farmlb_service_packets_total{service=\"web\"}";
    let svc_b = "farmlb_service_bytes_total{service=\"web\"}";
    let syn = "farmlb_conntrack_lookups_total{result=\"miss_syn\"}";
    let hit = "farmlb_conntrack_lookups_total{result=\"hit\"}";
    let fwd = "farmlb_forwarded_packets_total";

    let n = 60;
    let counts = s.connect_ok(n, "metrics traffic")?;
    let m1 = scrape(&s.rig)?;
    let grew = |k: &str| -> Result<f64> { Ok(metric(&m1, k)? - metric(&m0, k).unwrap_or(0.0)) };
    println!(
        "after {n} connections: service packets +{}, bytes +{}, SYN misses +{}, hits +{}, \
         forwarded +{}",
        grew(svc_p)?,
        grew(svc_b)?,
        grew(syn)?,
        grew(hit)?,
        grew(fwd)?
    );
    // Each connection: SYN, ACK, data ACKs, FIN... all from the client through the director.
    ensure!(
        grew(svc_p)? >= 3.0 * n as f64,
        "service packets grew {}",
        grew(svc_p)?
    );
    ensure!(
        grew(svc_b)? >= 3.0 * 54.0 * n as f64,
        "service bytes grew {}",
        grew(svc_b)?
    );
    ensure!(grew(syn)? >= n as f64, "SYN misses grew {}", grew(syn)?);
    ensure!(grew(hit)? >= n as f64, "conntrack hits grew {}", grew(hit)?);
    ensure!(grew(fwd)? >= 3.0 * n as f64);
    for i in 0..3 {
        let k = format!("farmlb_backend_packets_total{{{}}}", bl(i));
        let got = counts.get(&format!("b{}", i + 1)).copied().unwrap_or(0) as f64;
        ensure!(
            grew(&k)? >= 3.0 * got,
            "{k} grew {} for {got} connections",
            grew(&k)?
        );
    }
    // Drained and failed backends show in the gauges.
    cli_ok(
        &s.sock(),
        &["backend", "set", "web", &s.b(0), "--state", "drain"],
    )?;
    let m2 = scrape(&s.rig)?;
    ensure!(
        metric(
            &m2,
            &format!("farmlb_backend_state{{{},state=\"drain\"}}", bl(0))
        )? == 1.0
    );
    ensure!(metric(&m2, &format!("farmlb_backend_weight{{{}}}", bl(0)))? == 0.0);
    ensure!(
        metric(
            &m2,
            &format!("farmlb_backend_configured_weight{{{}}}", bl(0))
        )? == 1.0
    );
    ensure!(metric(&m2, "farmlb_service_usable_backends{service=\"web\"}")? == 2.0);
    // The CLI's stats agree with the counters.
    let stats = cli_ok(&s.sock(), &["stats"])?;
    ensure!(
        stats.contains("ct_miss_syn") && stats.contains("-> 10.99.0.11"),
        "{stats}"
    );
    let watch = Command::new(farmlb_bin())
        .args(["--socket"])
        .arg(s.sock())
        .args(["stats", "--watch", "0.2"])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    thread::sleep(Duration::from_millis(700));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(watch.id() as libc::pid_t, libc::SIGINT) };
    let out = watch.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        text.matches("DATA PLANE").count() >= 2 && text.contains("PKT/S"),
        "{text}"
    );
    s.finish_clean()
}

// --- http and udp checks ------------------------------------------------------------------

/// A minimal HTTP server in a namespace answering every request with the status in `status`;
/// it closes when dropped.
fn http_health(
    ns: &str,
    port: u16,
    status: std::sync::Arc<std::sync::atomic::AtomicU16>,
) -> Result<Background> {
    use std::sync::atomic::Ordering;
    let l = in_netns(ns, move || std::net::TcpListener::bind(("0.0.0.0", port)))??;
    l.set_nonblocking(true)?;
    Ok(Background::spawn(move |stop| {
        while !stop.load(Ordering::SeqCst) {
            match l.accept() {
                Ok((mut c, _)) => {
                    let _ = c.set_nonblocking(false);
                    let _ = c.set_read_timeout(Some(Duration::from_secs(1)));
                    let mut buf = [0u8; 1024];
                    let _ = c.read(&mut buf);
                    let code = status.load(Ordering::SeqCst);
                    let _ = write!(c, "HTTP/1.0 {code} X\r\nContent-Length: 0\r\n\r\n");
                }
                Err(_) => thread::sleep(Duration::from_millis(5)),
            }
        }
    }))
}

/// A UDP responder in a namespace: replies with the current `reply` to every datagram; the
/// socket closes (so the port answers ICMP unreachable) when dropped.
fn udp_responder(
    ns: &str,
    port: u16,
    reply: std::sync::Arc<std::sync::Mutex<String>>,
) -> Result<Background> {
    let sock = in_netns(ns, move || std::net::UdpSocket::bind(("0.0.0.0", port)))??;
    sock.set_read_timeout(Some(Duration::from_millis(20)))?;
    Ok(Background::spawn(move |stop| {
        let mut buf = [0u8; 512];
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            if let Ok((_, peer)) = sock.recv_from(&mut buf) {
                let r = reply.lock().unwrap().clone();
                let _ = sock.send_to(r.as_bytes(), peer);
            }
        }
    }))
}

#[test]
fn http_and_udp_checks_follow_the_backend() -> Result<()> {
    use std::sync::{atomic::AtomicU16, atomic::Ordering, Arc, Mutex};
    let timers = "interval = \"200ms\", timeout = \"150ms\", rise = 2, fall = 2";
    let s = setup("ctlhu", 2, |r| {
        format!(
            "[[service]]\nname = \"web\"\nvip = \"{VIP_V4}\"\nport = {PORT}\ntable_size = 1009\n\
             [[service.backend]]\naddress = \"{}\"\n\
             check = {{ type = \"http\", port = 8081, path = \"/health\", expect_status = \"200-299\", {timers} }}\n\
             [[service.backend]]\naddress = \"{}\"\n\
             check = {{ type = \"udp\", port = 5353, payload = \"ping\", expect = \"pong\", {timers} }}\n",
            r.backend_v4(0),
            r.backend_v4(1)
        )
    })?;
    let status = Arc::new(AtomicU16::new(200));
    let http = http_health(&s.rig.ns_backend(0), 8081, status.clone())?;
    let reply = Arc::new(Mutex::new("pong".to_string()));
    let udp = udp_responder(&s.rig.ns_backend(1), 5353, reply.clone())?;
    let detail = |i: usize| -> Result<String> {
        Ok(s.backend(&s.b(i))?["last_check"]["detail"]
            .as_str()
            .unwrap_or("")
            .to_string())
    };
    let limit = Duration::from_secs(3);
    // Wait until backend `i` is down; the detail of its last check.
    let down = |i: usize, what: &str| -> Result<String> {
        wait_for(limit, what, || Ok(s.health(i)? == "down"))?;
        detail(i)
    };
    wait_for(limit, "both checked ok", || {
        Ok(
            s.health(0)? == "up"
                && s.health(1)? == "up"
                && detail(0)? == "ok"
                && detail(1)? == "ok",
        )
    })?;
    s.connect_ok(40, "http+udp checks up")?;

    status.store(503, Ordering::SeqCst);
    let d = down(0, "b1 down on HTTP 503")?;
    ensure!(d == "HTTP status 503, expected 200-299", "{d}");
    let counts = s.connect_ok(40, "b1 down (HTTP 503)")?;
    ensure!(counts.keys().collect::<Vec<_>>() == ["b2"], "{counts:?}");
    status.store(204, Ordering::SeqCst);
    wait_for(limit, "b1 up on HTTP 204", || Ok(s.health(0)? == "up"))?;

    *reply.lock().unwrap() = "nope".into();
    let d = down(1, "b2 down on a wrong reply")?;
    ensure!(d.contains("does not contain \"pong\""), "{d}");
    let counts = s.connect_ok(40, "b2 down (wrong UDP reply)")?;
    ensure!(counts.keys().collect::<Vec<_>>() == ["b1"], "{counts:?}");
    *reply.lock().unwrap() = "pong".into();
    wait_for(limit, "b2 up again", || Ok(s.health(1)? == "up"))?;
    drop(udp);
    let d = down(1, "b2 down on a closed port")?;
    ensure!(d.contains("refused"), "ICMP port unreachable expected: {d}");
    drop(http);
    let d = down(0, "b1 down on a closed port")?;
    ensure!(d.contains("refused"), "{d}");
    s.finish_clean()
}
