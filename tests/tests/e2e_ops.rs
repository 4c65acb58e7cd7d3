//! End-to-end tests of what an operator watches farmlb with: `/metrics` as `promtool` and
//! Prometheus read it, the shipped alert rules and Grafana dashboard against a live scrape,
//! `farmlb conns` against real connections, and `farmlb simulate` against the backends real
//! connections reached. Run as root, one test at a time (`cargo xtask test` does).

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write,
    net::{IpAddr, SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::Ordering,
    time::Duration,
};

use anyhow::{bail, ensure, Context, Result};
use lb_tests::{
    client::connect_flows,
    ctl::{self, cli, cli_ok, metric, Metrics},
    daemon::{api_socket, workspace_root},
    farmlb_config, wait_until, write_config, DirectorRig, LongConn, Rig, Service, VIP_V4,
};
use serde_json::Value;

const PORT: u16 = 80;
const METRICS: &str = "127.0.0.1:9740";
const FAST_CHECK: &str =
    "check = { type = \"tcp\", interval = \"200ms\", timeout = \"100ms\", rise = 2, fall = 3 }";

fn vip() -> IpAddr {
    IpAddr::V4(VIP_V4)
}

/// `web` on the VIP over every backend of the rig.
fn web(rig: &Rig) -> Service {
    Service {
        table_size: 1009,
        ..Service::tcp("web", vip(), PORT)
    }
    .backends((0..rig.backend_count()).map(|i| IpAddr::V4(rig.backend_v4(i))))
}

/// The backend address an identity (`b2`) stands for.
fn backend_of(rig: &Rig, id: &str) -> Result<IpAddr> {
    let i: usize = id
        .strip_prefix('b')
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("identity {id:?}"))?;
    Ok(IpAddr::V4(rig.backend_v4(i - 1)))
}

fn contrib(path: &str) -> PathBuf {
    workspace_root().join("contrib").join(path)
}

/// Run `promtool ARGS` (feeding `input` on stdin); fails with its output unless it exits 0.
fn promtool(args: &[&str], input: Option<&str>) -> Result<String> {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running promtool (`cargo xtask setup` installs it)")?;
    let mut stdin = child.stdin.take().expect("piped");
    if let Some(i) = input {
        stdin.write_all(i.as_bytes())?;
    }
    drop(stdin);
    let out = child.wait_with_output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.status.success(),
        "promtool {} exited {}:\n{text}",
        args.join(" "),
        out.status
    );
    Ok(text)
}

/// Every `farmlb_*` name in `text` (a PromQL expression, a rules file, a dashboard).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("farmlb_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        // Not the tail of a longer identifier (`xfarmlb_`), nor the dashboard's own uid.
        let before = rest[..i].chars().last();
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            names.insert(tail[..end].to_string());
        }
        rest = &tail[end..];
    }
    names
}

/// The sample names of a scrape (`name` of every `name{labels}`).
fn sample_names(m: &Metrics) -> BTreeSet<String> {
    m.keys()
        .map(|k| k.split('{').next().unwrap_or(k).to_string())
        .collect()
}

/// Every PromQL expression of the dashboard, after checking its shape: panels with ids,
/// titles and positions, each non-row panel with at least one target.
fn dashboard_exprs(dash: &Value) -> Result<Vec<String>> {
    ensure!(dash["title"] == "farmlb", "title: {}", dash["title"]);
    let panels = dash["panels"].as_array().context("no panels array")?;
    ensure!(panels.len() >= 10, "only {} panels", panels.len());
    let mut ids = BTreeSet::new();
    let mut exprs = Vec::new();
    for p in panels {
        let id = p["id"]
            .as_u64()
            .with_context(|| format!("panel without id: {p}"))?;
        ensure!(ids.insert(id), "panel id {id} twice");
        ensure!(
            p["title"].as_str().is_some_and(|t| !t.is_empty()),
            "untitled panel {id}"
        );
        ensure!(
            p["gridPos"]["w"].as_u64().is_some(),
            "panel {id} has no gridPos"
        );
        if p["type"] == "row" {
            continue;
        }
        let targets = p["targets"].as_array().filter(|t| !t.is_empty());
        let targets = targets.with_context(|| format!("panel {id} has no targets"))?;
        for t in targets {
            let e = t["expr"]
                .as_str()
                .with_context(|| format!("target without expr in {id}"))?;
            ensure!(
                e.contains("farmlb_"),
                "panel {id} reads no farmlb metric: {e}"
            );
            exprs.push(e.to_string());
        }
    }
    let vars: Vec<&str> = dash["templating"]["list"]
        .as_array()
        .context("no templating")?
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    ensure!(
        vars == ["datasource", "instance", "service"],
        "variables {vars:?}"
    );
    Ok(exprs)
}

/// A `[farm]` of one node (itself) on the director: the farm families appear in the scrape
/// next to the director's.
fn farm_section(rig: &Rig) -> Result<String> {
    let key = std::env::temp_dir().join(format!("farmlb-{}.key", rig.prefix()));
    std::fs::write(&key, "0123456789abcdef0123456789abcdef\n")?;
    Ok(format!(
        "\n[farm]\nnode_id = 1\naddress = \"{}:4800\"\npeers = []\nkey_file = \"{}\"\n",
        rig.lb_v4(),
        key.display()
    ))
}

/// The config of the metrics test: globals, `[farm]`, `[announce]`, then `web` with a fast
/// check.
fn metrics_config(rig: &Rig) -> String {
    let base = farmlb_config(rig, &[]);
    let farm = farm_section(rig).expect("writing the farm key");
    let mut svc = lb_tests::daemon::services_toml(&[web(rig)]);
    svc = svc.replacen(
        "protocol = \"tcp\"\n",
        &format!("protocol = \"tcp\"\n{FAST_CHECK}\n"),
        1,
    );
    // `[announce]` with sync: the scale-out families (announced VIPs, sync counters) that the
    // shipped rules and dashboard read.
    let announce = "[announce]\ntable = 100\nsync = true\n";
    format!("metrics_address = \"{METRICS}\"\n{base}{farm}{announce}{svc}")
}

/// `/metrics` of a running director, every family populated (checks, traffic, conntrack
/// counted, a rejected and a successful reload), is clean under `promtool check metrics` in
/// the classic text format a client without `Accept` gets, and OpenMetrics for Prometheus;
/// `farmlb_backend_flows` counts the connections each backend got; the shipped rules pass
/// `promtool check rules` and their unit tests; and every metric the rules and the
/// dashboard read is in the live scrape.
#[test]
fn metrics_rules_and_dashboard_agree_with_a_live_daemon() -> Result<()> {
    let s = DirectorRig::up("opsmet", 3, PORT, metrics_config)?;
    let sock = api_socket(&s.rig);
    let addr: SocketAddr = METRICS.parse()?;
    let ns = s.rig.ns_lb();
    wait_until(Duration::from_secs(5), "every backend checked up", || {
        let m = ctl::scrape(&ns, addr, "1.1")?;
        Ok((0..3).all(|i| {
            let k = format!(
                "farmlb_backend_up{{service=\"web\",backend=\"{}\"}}",
                s.rig.backend_v4(i)
            );
            m.get(&k) == Some(&1.0)
        }) && m.contains_key(
            "farmlb_checks_total{service=\"web\",backend=\"10.99.0.11\",result=\"up\"}",
        ))
    })?;
    let flows = connect_flows(
        &s.rig.ns_client(),
        SocketAddr::new(vip(), PORT),
        60,
        &s.rig.client_sources_v4(),
    )?;
    let mut per_backend: BTreeMap<IpAddr, u64> = BTreeMap::new();
    for (_, id) in &flows {
        *per_backend.entry(backend_of(&s.rig, id)?).or_default() += 1;
    }
    println!("60 connections: {per_backend:?}");

    // A rejected reload, then a good one.
    let path = write_config(&s.rig, "interface = \"eth0\"\n[[service]]\nname = 1\n")?;
    let (ok, _, err) = cli(&sock, &["reload"])?;
    ensure!(!ok, "a broken file reloaded");
    let m = ctl::scrape(&ns, addr, "1.1")?;
    ensure!(
        metric(&m, "farmlb_config_last_reload_successful")? == 0.0,
        "{err}"
    );
    let rejected_at = metric(&m, "farmlb_config_last_reload_success_timestamp_seconds")?;
    std::fs::write(&path, metrics_config(&s.rig))?;
    cli_ok(&sock, &["reload"])?;

    // The conntrack count runs every 30 s: wait for one that saw the connections.
    let mut m = Metrics::new();
    let flow_key = |b: &IpAddr| format!("farmlb_backend_flows{{service=\"web\",backend=\"{b}\"}}");
    wait_until(
        Duration::from_secs(35),
        "a conntrack count with the connections",
        || {
            m = ctl::scrape(&ns, addr, "1.1")?;
            Ok(per_backend
                .keys()
                .all(|b| m.get(&flow_key(b)).is_some_and(|v| *v > 0.0)))
        },
    )?;
    for (b, n) in &per_backend {
        // Every connection left an entry (the health checks' go to the backends directly).
        let got = metric(&m, &flow_key(b))?;
        ensure!(
            got == *n as f64,
            "{b}: farmlb_backend_flows {got}, {n} connections made"
        );
    }
    // `farmlb status` shows the same count in its FLOWS column (cells are left-aligned under
    // their header).
    let status = cli_ok(&sock, &["status"])?;
    let col = status
        .lines()
        .find_map(|l| {
            l.trim_start()
                .starts_with("BACKEND")
                .then(|| l.find("FLOWS"))?
        })
        .with_context(|| format!("no FLOWS column:\n{status}"))?;
    for (b, n) in &per_backend {
        let row = status
            .lines()
            .find(|l| l.split_whitespace().next() == Some(&b.to_string()))
            .with_context(|| format!("no row for {b}:\n{status}"))?;
        let shown = row.get(col..).and_then(|c| c.split_whitespace().next());
        ensure!(
            shown == Some(&n.to_string()),
            "{b}: FLOWS {shown:?}, {n} connections made:\n{status}"
        );
    }
    ensure!(metric(&m, "farmlb_conntrack_entries")? >= 60.0);
    ensure!(metric(&m, "farmlb_config_last_reload_successful")? == 1.0);
    let ok_at = metric(&m, "farmlb_config_last_reload_success_timestamp_seconds")?;
    ensure!(
        ok_at > rejected_at,
        "success timestamp {ok_at} not after {rejected_at}"
    );
    let version = env!("CARGO_PKG_VERSION");
    ensure!(
        m.keys().any(|k| k.starts_with("farmlb_build_info{")
            && k.contains(&format!("version=\"{version}\""))),
        "no farmlb_build_info with version {version}"
    );
    ensure!(metric(&m, "farmlb_farm_member_up{node=\"1\"}")? == 1.0);

    // promtool reads the classic text format (what a client without Accept gets).
    let text = ctl::scrape_text(&ns, addr)?;
    let out = promtool(&["check", "metrics"], Some(&text))?;
    ensure!(
        out.trim().is_empty(),
        "promtool check metrics complained:\n{out}"
    );
    let classic = ctl::parse_samples(&text)?;
    ensure!(
        sample_names(&classic) == sample_names(&m),
        "the two formats hold different samples"
    );
    println!(
        "promtool check metrics: clean on a {}-line scrape ({} samples)",
        text.lines().count(),
        classic.len()
    );

    // The rules and the dashboard read only metrics the daemon serves.
    let rules = contrib("prometheus/farmlb-rules.yml");
    promtool(&["check", "rules", &rules.to_string_lossy()], None)?;
    let tests = contrib("prometheus/farmlb-rules.test.yml");
    promtool(&["test", "rules", &tests.to_string_lossy()], None)?;
    let dash: Value =
        serde_json::from_str(&std::fs::read_to_string(contrib("grafana/farmlb.json"))?)
            .context("contrib/grafana/farmlb.json is not JSON")?;
    let exprs = dashboard_exprs(&dash)?;
    let served = sample_names(&m);
    let mut used = metric_names(&std::fs::read_to_string(&rules)?);
    let in_rules = used.len();
    for e in &exprs {
        used.extend(metric_names(e));
    }
    let missing: Vec<&String> = used.iter().filter(|n| !served.contains(*n)).collect();
    ensure!(
        missing.is_empty(),
        "the rules or the dashboard read metrics the daemon does not serve: {missing:?}\nserved: {served:?}"
    );
    println!(
        "rules ({in_rules} metrics) and dashboard ({} panels' {} queries) read {} metrics, all in the live scrape",
        dash["panels"].as_array().map_or(0, Vec::len),
        exprs.len(),
        used.len()
    );
    s.finish(|_| Ok(()))
}

const DNS: u16 = 53;

/// `web`, and `dns` (UDP) over the same backends.
fn web_and_dns(rig: &Rig) -> Vec<Service> {
    let dns = Service {
        protocol: "udp".into(),
        table_size: 1009,
        ..Service::tcp("dns", vip(), DNS)
    }
    .backends((0..rig.backend_count()).map(|i| IpAddr::V4(rig.backend_v4(i))));
    vec![web(rig), dns]
}

/// A UDP server on `[::]:53` in every backend namespace answering each datagram with the
/// backend's identity (from the VIP it holds on `lo`, straight to the client).
fn udp_responders(rig: &Rig) -> Result<Vec<lb_tests::Background>> {
    (0..rig.backend_count())
        .map(|i| {
            let any = SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), DNS);
            let sock = lb_tests::in_netns(&rig.ns_backend(i), move || UdpSocket::bind(any))??;
            sock.set_read_timeout(Some(Duration::from_millis(50)))?;
            let id = lb_tests::backend_id(i);
            Ok(lb_tests::Background::spawn(move |stop| {
                let mut buf = [0u8; 512];
                while !stop.load(Ordering::SeqCst) {
                    if let Ok((_, peer)) = sock.recv_from(&mut buf) {
                        let _ = sock.send_to(id.as_bytes(), peer);
                    }
                }
            }))
        })
        .collect()
}

/// One datagram from `src` (ephemeral port) to the VIP's DNS port: the client address and the
/// identity that answered.
fn udp_ask(rig: &Rig, src: IpAddr) -> Result<(SocketAddr, String)> {
    let dst = SocketAddr::new(vip(), DNS);
    lb_tests::in_netns(&rig.ns_client(), move || -> Result<(SocketAddr, String)> {
        let s = UdpSocket::bind(SocketAddr::new(src, 0))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.send_to(b"who", dst)?;
        let mut buf = [0u8; 64];
        let n = s
            .recv(&mut buf)
            .with_context(|| format!("no UDP answer to {src}"))?;
        Ok((
            s.local_addr()?,
            String::from_utf8_lossy(&buf[..n]).into_owned(),
        ))
    })?
}

/// `farmlb simulate --json` for one flow (with `extra` arguments).
fn simulate(sock: &Path, src: SocketAddr, dst: SocketAddr, extra: &[&str]) -> Result<Value> {
    let (src, dst) = (src.to_string(), dst.to_string());
    let mut args = vec!["simulate", "--json", "--src", &src, "--dst", &dst];
    args.extend_from_slice(extra);
    let out = Command::new(lb_tests::farmlb_bin())
        .arg("--socket")
        .arg(sock)
        .args(&args)
        .output()?;
    ensure!(
        out.status.success(),
        "farmlb {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    serde_json::from_slice(&out.stdout).context("simulate --json printed no JSON")
}

/// Real connections through the director: `farmlb conns` lists the open ones with the
/// backend their server saw (and `--limit` says how many it left out); `farmlb simulate`
/// names, for each of 120 connections, the backend that served it, from the daemon's
/// conntrack, from its ring (`--syn`) and from the config file alone (`--config`); a
/// destination that is no VIP and a service without usable backends get their reasons.
#[test]
fn conns_and_simulate_agree_with_real_connections() -> Result<()> {
    let s = DirectorRig::up("opssim", 3, PORT, |rig| {
        farmlb_config(rig, &web_and_dns(rig))
    })?;
    let sock = api_socket(&s.rig);
    let sources = s.rig.client_sources_v4();
    let mut open = Vec::new();
    for i in 0..24 {
        open.push(LongConn::open(
            &s.rig.ns_client(),
            sources[i % sources.len()],
            vip(),
            PORT,
        )?);
    }
    let v: Value = serde_json::from_str(&cli_ok(&sock, &["conns", "web", "--json"])?)?;
    let listed: BTreeMap<String, &Value> = v["flows"]
        .as_array()
        .context("no flows")?
        .iter()
        .filter_map(|f| Some((f["client"].as_str()?.to_string(), f)))
        .collect();
    for c in &open {
        let f = listed
            .get(&c.local_addr().to_string())
            .with_context(|| format!("{} not listed by farmlb conns: {v}", c.local_addr()))?;
        let want = backend_of(&s.rig, c.identity())?.to_string();
        ensure!(
            f["backend"] == want.as_str(),
            "{}: listed {f}, the server was {want}",
            c.local_addr()
        );
        ensure!(
            f["vip"] == format!("{VIP_V4}:{PORT}").as_str() && f["service"] == "web",
            "{f}"
        );
        ensure!(f["protocol"] == "tcp" && f["idle_s"].is_null(), "{f}");
    }
    let matched = v["matched"].as_u64().context("matched")?;
    ensure!(matched as usize >= open.len() && v["left_out"] == 0, "{v}");
    let table = cli_ok(&sock, &["conns"])?;
    let c0 = open[0].local_addr().to_string();
    ensure!(
        table.starts_with("PRO") && table.lines().any(|l| l.contains(&c0) && l.contains("web")),
        "{c0} missing from:\n{table}"
    );
    let few: Value = serde_json::from_str(&cli_ok(&sock, &["conns", "--limit", "5", "--json"])?)?;
    let shown = few["flows"].as_array().map_or(0, Vec::len) as u64;
    ensure!(
        shown == 5 && few["left_out"].as_u64() == Some(few["matched"].as_u64().unwrap_or(0) - 5),
        "{few}"
    );
    let (ok, _, err) = cli(&sock, &["conns", "nosuch"])?;
    ensure!(!ok && err.contains("no service named \"nosuch\""), "{err}");
    println!(
        "farmlb conns: the {} open connections listed with their servers' backends",
        open.len()
    );
    drop(open);

    // UDP flows: listed with their idle time, and simulated from their conntrack entries.
    let _responders = udp_responders(&s.rig)?;
    let udp: Vec<(SocketAddr, String)> = sources
        .iter()
        .take(12)
        .map(|&src| udp_ask(&s.rig, src))
        .collect::<Result<_>>()?;
    std::thread::sleep(Duration::from_millis(1500));
    let v: Value = serde_json::from_str(&cli_ok(&sock, &["conns", "dns", "--json"])?)?;
    let dns = v["flows"].as_array().context("no flows")?;
    ensure!(
        dns.len() == udp.len() && dns.iter().all(|f| f["service"] == "dns"),
        "{v}"
    );
    for (client, id) in &udp {
        let want = backend_of(&s.rig, id)?.to_string();
        let f = dns
            .iter()
            .find(|f| f["client"] == client.to_string().as_str())
            .with_context(|| format!("UDP flow {client} not listed: {v}"))?;
        let idle = f["idle_s"]
            .as_f64()
            .with_context(|| format!("no idle time: {f}"))?;
        ensure!(
            f["backend"] == want.as_str()
                && f["protocol"] == "udp"
                && (1.4..10.0).contains(&idle)
                && f["expired"] == false,
            "{client}: listed {f}, answered by {want} 1.5 s ago"
        );
        let sim = simulate(
            &sock,
            *client,
            SocketAddr::new(vip(), DNS),
            &["--proto", "udp"],
        )?;
        ensure!(
            sim["why"] == "conntrack" && sim["backend"] == want.as_str(),
            "{client}: {sim}"
        );
    }
    println!(
        "farmlb conns dns: {} UDP flows listed with their backends, idle >= 1.5 s",
        udp.len()
    );

    // 120 connections; each flow simulated three ways.
    let dst = SocketAddr::new(vip(), PORT);
    let flows = connect_flows(&s.rig.ns_client(), dst, 120, &sources)?;
    let config = write_config(&s.rig, &farmlb_config(&s.rig, &web_and_dns(&s.rig)))?;
    let config = config.to_string_lossy().into_owned();
    let mut per: BTreeMap<String, usize> = BTreeMap::new();
    let mut slots = BTreeSet::new();
    for (src, id) in &flows {
        let want = backend_of(&s.rig, id)?.to_string();
        let live = simulate(&sock, *src, dst, &[])?;
        ensure!(
            live["why"] == "conntrack" && live["backend"] == want.as_str(),
            "{src}: {live}, served by {want}"
        );
        let ring = simulate(&sock, *src, dst, &["--syn"])?;
        ensure!(
            ring["why"] == "ring" && ring["backend"] == want.as_str(),
            "{src} --syn: {ring}, served by {want}"
        );
        let file = simulate(&sock, *src, dst, &["--syn", "--config", &config])?;
        ensure!(
            file["from"] == "config"
                && file["backend"] == want.as_str()
                && file["slot"] == ring["slot"],
            "{src} --config: {file}, daemon said {ring}"
        );
        slots.insert(ring["slot"].as_u64().context("slot")?);
        *per.entry(id.clone()).or_default() += 1;
    }
    ensure!(per.len() == 3, "the 120 connections reached {per:?}");
    println!(
        "farmlb simulate: 120 of 120 flows named their server's backend (conntrack, ring and \
         config file; {} distinct slots), spread {per:?}",
        slots.len()
    );
    let text = cli_ok(
        &sock,
        &[
            "simulate",
            "--src",
            &flows[0].0.to_string(),
            "--dst",
            &dst.to_string(),
        ],
    )?;
    ensure!(
        text.contains("conntrack entry") && text.contains("service web"),
        "{text}"
    );

    // Not a VIP; and no usable backend once every backend is in maintenance.
    let other = SocketAddr::new(IpAddr::V4(s.rig.lb_v4()), 22);
    for extra in [&[][..], &["--config", &config][..]] {
        let v = simulate(&sock, flows[0].0, other, extra)?;
        ensure!(
            v["action"] == "pass" && v["why"] == "not_vip" && v["service"].is_null(),
            "{v}"
        );
    }
    for i in 0..3 {
        cli_ok(
            &sock,
            &[
                "backend",
                "set",
                "web",
                &s.rig.backend_v4(i).to_string(),
                "--state",
                "maint",
            ],
        )?;
    }
    let v = simulate(&sock, flows[0].0, dst, &["--syn"])?;
    ensure!(
        v["action"] == "drop" && v["why"] == "no_backend" && v["service"] == "web",
        "{v}"
    );
    let (ok, _, err) = cli(
        &sock,
        &["simulate", "--src", "10.99.0.2:1", "--dst", "[fd99::1]:80"],
    )?;
    ensure!(!ok && err.contains("different address families"), "{err}");
    if s.daemon.log().contains("panicked") {
        bail!("the daemon panicked:\n{}", s.daemon.log());
    }
    s.finish(|_| Ok(()))
}
