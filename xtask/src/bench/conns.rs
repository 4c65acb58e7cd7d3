//! TCP connections/s and added latency: farmlb vs HAProxy (`mode tcp`) on the same rig and
//! backends, with direct client→backend connections as the latency floor.

use std::io::Read;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lb_tests::{netns, VIP_V4};
use serde_json::json;
use socket2::{Domain, Protocol, Socket, Type};

use super::env::{BenchRig, TCP_PORT};
use super::stats::{median, Dist, Goal, Metric, Section};
use super::Plan;

const TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Direct,
    Farmlb,
    Haproxy,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Farmlb => "farmlb",
            Target::Haproxy => "haproxy",
        }
    }
}

/// Connect from `src`, read the identity line, close; returns connect + first-line time.
fn connect_once(src: IpAddr, dst: SocketAddr) -> Result<Duration> {
    let sock = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
    sock.bind(&SocketAddr::new(src, 0).into())
        .with_context(|| format!("bind {src}"))?;
    let t0 = Instant::now();
    sock.connect_timeout(&dst.into(), TIMEOUT)
        .with_context(|| format!("connect {src} -> {dst}"))?;
    let mut stream: TcpStream = sock.into();
    stream.set_read_timeout(Some(TIMEOUT))?;
    let mut buf = [0u8; 64];
    let mut got = 0;
    loop {
        let n = stream
            .read(&mut buf[got..])
            .with_context(|| format!("{src} -> {dst}: reading identity"))?;
        if n == 0 {
            bail!("{src} -> {dst}: closed before the identity line");
        }
        got += n;
        if buf[..got].contains(&b'\n') || got == buf.len() {
            break;
        }
    }
    Ok(t0.elapsed())
}

/// Destinations of connection `i`: the VIP, or the backends in turn.
fn dst(env: &BenchRig, t: Target) -> Vec<SocketAddr> {
    match t {
        Target::Direct => env
            .backend_addrs()
            .into_iter()
            .map(|a| SocketAddr::new(IpAddr::V4(a), TCP_PORT))
            .collect(),
        _ => vec![SocketAddr::new(IpAddr::V4(VIP_V4), TCP_PORT)],
    }
}

/// `n` connections from `threads` client threads at once; returns (connections/s, failures).
fn rate(env: &BenchRig, t: Target, n: usize, threads: usize) -> Result<(f64, usize)> {
    let sources = env.rig.client_sources_v4();
    let dsts = dst(env, t);
    let per = n.div_ceil(threads);
    let t0 = Instant::now();
    let mut handles = Vec::new();
    for k in 0..threads {
        let (sources, dsts) = (sources.clone(), dsts.clone());
        handles.push(netns::spawn_in_netns(&env.rig.ns_client(), move || {
            let mut ok = 0usize;
            let mut failed = 0usize;
            for i in 0..per {
                let j = k * per + i;
                let src = sources[j % sources.len()];
                match connect_once(src, dsts[j % dsts.len()]) {
                    Ok(_) => ok += 1,
                    Err(_) => failed += 1,
                }
            }
            (ok, failed)
        })?);
    }
    let (mut ok, mut failed) = (0, 0);
    for h in handles {
        let (o, f) = h.join()?;
        ok += o;
        failed += f;
    }
    Ok((ok as f64 / t0.elapsed().as_secs_f64(), failed))
}

/// `n` sequential connections; returns the median connect + first-line time in µs.
fn latency(env: &BenchRig, t: Target, n: usize) -> Result<(f64, usize)> {
    let sources = env.rig.client_sources_v4();
    let dsts = dst(env, t);
    let (us, failed) = netns::in_netns(&env.rig.ns_client(), move || {
        let mut us = Vec::with_capacity(n);
        let mut failed = 0;
        for j in 0..n {
            match connect_once(sources[j % sources.len()], dsts[j % dsts.len()]) {
                Ok(d) => us.push(d.as_secs_f64() * 1e6),
                Err(_) => failed += 1,
            }
        }
        (us, failed)
    })?;
    Ok((median(&us), failed))
}

#[derive(Default)]
struct Samples {
    rate: Vec<f64>,
    lat: Vec<f64>,
    failed: usize,
}

fn measure(env: &BenchRig, t: Target, plan: &Plan, s: &mut Samples) -> Result<()> {
    // Keep the balancer up only while its numbers are taken.
    let daemon = match t {
        Target::Farmlb => Some(env.start_farmlb()?),
        _ => None,
    };
    let haproxy = match t {
        Target::Haproxy => Some(env.start_haproxy()?),
        _ => None,
    };
    // A few connections first: ARP/neighbour entries, accept queues, caches.
    let (_, warm_failed) = latency(env, t, 20)?;
    let (r, f1) = rate(env, t, plan.conn_count, plan.conn_threads)?;
    let (l, f2) = latency(env, t, plan.lat_count)?;
    s.rate.push(r);
    s.lat.push(l);
    s.failed += warm_failed + f1 + f2;
    drop(haproxy);
    if let Some(mut d) = daemon {
        d.stop()?;
    }
    Ok(())
}

pub fn run(env: &BenchRig, plan: &Plan) -> Result<Section> {
    let targets = [Target::Direct, Target::Farmlb, Target::Haproxy];
    let mut samples: [Samples; 3] = Default::default();
    for run in 0..plan.runs {
        // Rotate the order so no target always runs first or last.
        for k in 0..targets.len() {
            let i = (run + k) % targets.len();
            let x = &mut samples[i];
            measure(env, targets[i], plan, x)
                .with_context(|| format!("run {run}, {}", targets[i].name()))?;
            eprintln!(
                "  run {run} {}: {:.0} conn/s, median connect+first line {:.0} µs",
                targets[i].name(),
                x.rate.last().copied().unwrap_or(f64::NAN),
                x.lat.last().copied().unwrap_or(f64::NAN)
            );
        }
    }
    let [direct, farm, ha] = &samples;
    let added =
        |x: &Samples| -> Vec<f64> { x.lat.iter().zip(&direct.lat).map(|(a, d)| a - d).collect() };
    let (farm_added, ha_added) = (added(farm), added(ha));
    // A ratio only means something when HAProxy measurably adds latency in that run.
    let added_ratio: Vec<f64> = farm_added
        .iter()
        .zip(&ha_added)
        .map(|(f, h)| if *h > 0.0 { f / h } else { f64::NAN })
        .collect();

    let mut s = Section::new("connections", "TCP connections through the balancer");
    let failures = direct.failed + farm.failed + ha.failed;
    let fail_note = if failures > 0 {
        format!(
            "{failures} connection attempts failed (direct {}, farmlb {}, HAProxy {})",
            direct.failed, farm.failed, ha.failed
        )
    } else {
        String::new()
    };
    let mut lat_notes = Vec::new();
    if median(&farm_added) <= 0.0 {
        lat_notes.push("farmlb's added latency is within the noise of the direct path (≤ 0)");
    }
    if ha_added.iter().any(|h| *h <= 0.0) {
        lat_notes.push("runs where HAProxy added no measurable latency have no ratio");
    }
    let neg_note = lat_notes.join("; ");
    s.metrics = vec![
        Metric::new("conn.rate", "TCP connections/s through farmlb", "conn/s")
            .value(Dist::new(farm.rate.clone()))
            .against("HAProxy", Dist::new(ha.rate.clone()))
            .goal(Goal::ratio_at_least(3.0))
            .note(fail_note.clone()),
        Metric::new(
            "conn.added_latency",
            "Added connect+first-byte latency, farmlb",
            "µs",
        )
        .value(Dist::new(farm_added.clone()))
        .against("HAProxy", Dist::new(ha_added.clone()))
        .ratio(Dist::new(added_ratio.clone()))
        .goal(Goal::ratio_at_most(0.3))
        .note(neg_note),
    ];
    let d = |v: &[f64]| Dist::new(v.to_vec());
    let row = |name: &str, x: &Samples| {
        let (r, l) = (d(&x.rate), d(&x.lat));
        format!(
            "| {name} | {:.0} [{:.0}–{:.0}] | {:.1} [{:.1}–{:.1}] | {} |\n",
            r.median(),
            r.min(),
            r.max(),
            l.median(),
            l.min(),
            l.max(),
            x.failed
        )
    };
    s.details = String::from(
        "| path | connections/s (median [min–max]) | connect+first line µs (median of run \
         medians [min–max]) | failed |\n|---|---|---|---|\n",
    );
    s.details += &row("direct to backends", direct);
    s.details += &row("through farmlb", farm);
    s.details += &row("through HAProxy", ha);
    s.method = format!(
        "Rig `{prefix}` (client, director, {nb} backends on a bridge; identity servers on the \
         backends answer each connection with one line). Targets: farmlb (daemon started \
         for the target's turn, direct routing, replies bypass the director), HAProxy {ha} \
         (`mode tcp`, `balance roundrobin` over the same backends, listening on the VIP \
         added to the director's `lo` for its turn), and direct connections to the backends \
         (round-robin, the latency floor). {runs} runs; each run measures the three targets \
         in rotated order. The backends run a minimal server that writes its identity line \
         on accept and closes. Connections/s: {n} connections (connect, read the identity line, \
         close) from {th} client threads at once, bound to the client's 33 source addresses \
         in turn; rate = successful connections / wall time. Latency: {lat} sequential \
         connections, time from `connect()` to the first line; a run's sample is the median. \
         Added latency = through-balancer median − direct median of the same run; the ratio \
         is farmlb's added latency / HAProxy's, per run. Every host shares the same 2 vCPUs, \
         so connections/s also includes the client's and backends' costs.",
        prefix = super::env::PREFIX,
        nb = super::env::BACKENDS,
        ha = super::sys::first_line(&["haproxy", "-v"])
            .split_whitespace()
            .nth(2)
            .unwrap_or("(version unknown)"),
        runs = plan.runs,
        n = plan.conn_count,
        th = plan.conn_threads,
        lat = plan.lat_count,
    );
    s.raw = json!({
        "runs": plan.runs,
        "connections_per_rate_sample": plan.conn_count,
        "client_threads": plan.conn_threads,
        "latency_connections_per_sample": plan.lat_count,
        "rate_per_s": { "direct": direct.rate, "farmlb": farm.rate, "haproxy": ha.rate },
        "latency_median_us": { "direct": direct.lat, "farmlb": farm.lat, "haproxy": ha.lat },
        "added_latency_us": { "farmlb": farm_added, "haproxy": ha_added },
        "failed": { "direct": direct.failed, "farmlb": farm.failed, "haproxy": ha.failed },
    });
    Ok(s)
}
