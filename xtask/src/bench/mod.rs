//! `cargo xtask bench [--quick]`: farmlb against baselines measured in the same run, on the
//! same machine, side by side (issue #5).
//!
//! 1. Per-packet cost with BPF_PROG_TEST_RUN against a minimal reference XDP program, the
//!    stateful floors (conntrack hit, conntrack insert) and the previous version of farmlb's
//!    program (`--baseline REV`, default the tag `bench-baseline` or `HEAD~1`) ([`pkt`],
//!    [`baseline`]).
//! 2. Forwarding on the namespace rig against an nftables balancer ([`forward`]).
//! 3. TCP connections/s and added latency against HAProxy ([`conns`]).
//! 4. Maglev build time and disruption ([`maglev`]).
//! 5. Failure handling: dead backend (against HAProxy's checks) and lost farm node
//!    ([`failure`]).
//!
//! The command rebuilds xtask and the daemon with `--release` and re-runs itself from that
//! build, so Maglev timings are of optimised code. It prints one line per metric and writes
//! `bench/report.md`, `bench/report.json` and `bench/ratios.svg`. Goals are reported, never
//! asserted.
//!
//! 1b. The tunnel modes' per-packet cost beside DR, and the decapsulator's ([`tunnel`]).
//!
//! For work on the benchmark itself, `FARMLB_BENCH_ONLY=pkt,tun,maglev,conn,fwd` (any subset)
//! (and `fail`) runs only those parts and prints their lines without writing the report.

mod baseline;
mod conns;
mod env;
mod failure;
mod flood;
mod forward;
mod maglev;
mod pkt;
mod report;
mod saturate;
mod stats;
mod sys;
mod tunnel;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{cargo, dpkg_installed, run as run_cmd, workspace_root};
use stats::{Metric, Outcome, Section};

/// How much to measure.
pub struct Plan {
    pub quick: bool,
    /// A/B runs per comparison (≥ 5).
    pub runs: usize,
    /// Runs of the per-packet probes: a run takes a few seconds, and the per-run ratios of
    /// this machine spread by ±15%, so more of them steady the median.
    pub pkt_runs: usize,
    /// BPF_PROG_TEST_RUN runs per per-packet sample (the probes of `pkt` split them into
    /// `CHUNKS` calls).
    pub repeat: u32,
    pub fwd_warmup: Duration,
    pub fwd_window: Duration,
    /// Connections per connections/s sample, and client threads.
    pub conn_count: usize,
    pub conn_threads: usize,
    /// Sequential connections per latency sample.
    pub lat_count: usize,
    pub maglev_builds: usize,
    pub removals: usize,
    /// Runs of each failure scenario (each takes about 10 s).
    pub failure_runs: usize,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                quick,
                runs: 5,
                pkt_runs: 5,
                repeat: 200_000,
                fwd_warmup: Duration::from_millis(500),
                fwd_window: Duration::from_millis(1500),
                conn_count: 4000,
                conn_threads: 4,
                lat_count: 300,
                maglev_builds: 5,
                removals: 3,
                failure_runs: 1,
            }
        } else {
            Plan {
                quick,
                runs: 9,
                pkt_runs: 15,
                repeat: 2_000_000,
                fwd_warmup: Duration::from_secs(1),
                fwd_window: Duration::from_secs(4),
                conn_count: 20000,
                conn_threads: 4,
                lat_count: 2000,
                maglev_builds: 15,
                removals: 7,
                failure_runs: 5,
            }
        }
    }

    fn mode(&self) -> &'static str {
        if self.quick {
            "quick"
        } else {
            "full"
        }
    }

    /// Rough length of the measuring part (not the build), for the banner.
    fn estimate(&self) -> &'static str {
        if self.quick {
            "about 3 minutes"
        } else {
            "about 10 minutes"
        }
    }
}

pub fn run(quick: bool, baseline: Option<String>) -> Result<()> {
    if cfg!(debug_assertions) {
        relaunch_release(quick, baseline)
    } else {
        measure(quick, baseline)
    }
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Build xtask (this command) and the daemon with optimisations and run the benchmark
/// from that build.
fn relaunch_release(quick: bool, baseline: Option<String>) -> Result<()> {
    run_cmd(cargo().args([
        "build",
        "--release",
        "--package",
        "lb-userspace",
        "--package",
        "xtask",
        "--features",
        "xtask/lab",
    ]))?;
    let target = target_dir().join("release");
    let mut cmd = Command::new(target.join("xtask"));
    cmd.arg("bench");
    if quick {
        cmd.arg("--quick");
    }
    if let Some(rev) = baseline {
        cmd.args(["--baseline", &rev]);
    }
    let st = cmd
        .env("FARMLB_BIN", target.join("farmlb"))
        .current_dir(workspace_root())
        .status()
        .context("running the release build of xtask")?;
    if !st.success() {
        bail!("benchmark failed ({st})");
    }
    Ok(())
}

fn ensure_tools() -> Result<()> {
    let missing: Vec<&str> = ["nftables", "haproxy", "ethtool", "iproute2"]
        .into_iter()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if !missing.is_empty() {
        run_cmd(Command::new("apt-get").arg("update"))?;
        run_cmd(
            Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["install", "-y"])
                .args(&missing),
        )?;
    }
    Ok(())
}

/// A part of the benchmark: (name for FARMLB_BENCH_ONLY, section id, title, the metrics
/// (key, name) reported as not available if it fails).
type Part = (
    &'static str,
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
);

/// A part that failed to run: its metrics, marked not available with the error.
fn failed(p: Part, e: &anyhow::Error) -> Section {
    let (_, id, title, keys) = p;
    eprintln!("xtask bench: {title}: {e:#}");
    let mut s = Section::new(id, title);
    let reason = format!("measurement failed: {e:#}");
    s.metrics = keys
        .iter()
        .map(|(k, n)| Metric::unavailable(k, n, &reason))
        .collect();
    s.method = reason;
    s
}

fn utc_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn machine() -> Vec<(String, String)> {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default();
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(workspace_root())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let dirty = if git(&["status", "--porcelain"]).is_empty() {
        ""
    } else {
        " (with uncommitted changes)"
    };
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    vec![
        ("kernel".into(), sys::first_line(&["uname", "-r"])),
        ("CPU".into(), format!("{cpu} × {}", sys::cpu_count())),
        (
            "git".into(),
            format!("{}{dirty}", git(&["rev-parse", "--short", "HEAD"])),
        ),
        (
            "load average at start".into(),
            load.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
        ),
        ("build".into(), "release (xtask and farmlb)".into()),
    ]
}

fn measure(quick: bool, baseline: Option<String>) -> Result<()> {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmark needs root (XDP, network namespaces)");
    }
    ensure_tools()?;
    let plan = Plan::new(quick);
    let started = Instant::now();
    let started_utc = utc_now();
    let mut machine = machine();
    machine.push((
        "runs".into(),
        format!(
            "{} per comparison (A/B alternating; per-packet probes: {}), {} per failure \
             scenario",
            plan.runs, plan.pkt_runs, plan.failure_runs
        ),
    ));
    eprintln!(
        "xtask bench: {} run, {} runs per comparison; takes {}",
        plan.mode(),
        plan.runs,
        plan.estimate()
    );

    let only = std::env::var("FARMLB_BENCH_ONLY").ok();
    let want = |p: &str| only.as_deref().is_none_or(|o| o.split(',').any(|x| x == p));
    // (part name, section id, title, metric keys and names reported if the part fails)
    const FWD: Part = (
        "fwd",
        "forwarding",
        "Forwarding on the veth rig",
        &[
            ("fwd.pps", "Forwarded packets/s, farmlb"),
            (
                "fwd.lb_cpu_per_pkt",
                "Director CPU per packet at saturation, farmlb",
            ),
            (
                "fwd.capacity",
                "Director capacity (frames taken in per second at saturation), farmlb",
            ),
            (
                "fwd.lb_cpu_per_pkt_rig",
                "Director CPU per packet at the rig's load (wake-ups included), farmlb",
            ),
        ],
    );
    const CONN: Part = (
        "conn",
        "connections",
        "TCP connections through the balancer",
        &[
            ("conn.rate", "TCP connections/s through farmlb"),
            (
                "conn.added_latency",
                "Added connect+first-byte latency, farmlb",
            ),
        ],
    );
    const FAIL: Part = (
        "fail",
        "failure",
        "Failure handling",
        &[
            (
                "fail.backend_kill_to_last_conn",
                "Backend killed → last new connection sent to it, farmlb",
            ),
            (
                "fail.node_loss_redistribution",
                "Farm node lost → last new connection sent to it",
            ),
        ],
    );
    const PKT: Part = (
        "pkt",
        "per_packet",
        "Per-packet cost (BPF_PROG_TEST_RUN)",
        &[("pkt", "Per-packet cost")],
    );
    const TUN: Part = (
        "tun",
        "per_packet_tunnel",
        "Per-packet cost of the tunnel modes",
        &[("pkt.tunnel", "Per-packet cost of IPIP and GUE")],
    );
    const MAGLEV: Part = (
        "maglev",
        "maglev",
        "Maglev table build and disruption",
        &[("maglev", "Maglev build and disruption")],
    );
    let part = |p: Part, f: &mut dyn FnMut() -> Result<Section>| -> Section {
        if !want(p.0) {
            let mut s = Section::new(p.1, p.2);
            s.metrics = vec![Metric::unavailable(p.1, p.2, "skipped (FARMLB_BENCH_ONLY)")];
            return s;
        }
        f().unwrap_or_else(|e| failed(p, &e))
    };

    eprintln!("xtask bench: [1/5] per-packet cost (BPF_PROG_TEST_RUN)");
    let pkt_sec = part(PKT, &mut || pkt::run(&plan, baseline.as_deref()));
    eprintln!("xtask bench: [1b/5] per-packet cost of the tunnel modes (repeat-1 calls)");
    let tun_sec = part(TUN, &mut || tunnel::run(&plan));
    eprintln!("xtask bench: [2/5] Maglev");
    let maglev_sec = part(MAGLEV, &mut || maglev::run(&plan));
    let rig = if want("conn") || want("fail") || want("fwd") {
        eprintln!("xtask bench: setting up the rig `{}`", env::PREFIX);
        env::BenchRig::up()
    } else {
        Err(anyhow::anyhow!("skipped (FARMLB_BENCH_ONLY)"))
    };
    let (conn_sec, fail_sec, fwd_sec) = match rig {
        Ok(mut rig) => {
            eprintln!("xtask bench: [3/5] TCP connections: farmlb vs HAProxy");
            let c = part(CONN, &mut || conns::run(&rig, &plan));
            eprintln!("xtask bench: [4/5] failure handling");
            let fl = part(FAIL, &mut || failure::run(&mut rig, &plan));
            // Forwarding changes NAPI and offload settings of the rig: it runs last.
            eprintln!("xtask bench: [5/5] forwarding: farmlb vs nftables");
            let f = part(FWD, &mut || forward::run(&rig, &plan));
            drop(rig);
            (c, fl, f)
        }
        Err(e) => {
            let e = e.context("setting up the rig");
            (failed(CONN, &e), failed(FAIL, &e), failed(FWD, &e))
        }
    };
    // Report in the issue's order.
    let sections = vec![pkt_sec, tun_sec, fwd_sec, conn_sec, maglev_sec, fail_sec];

    let duration = started.elapsed();
    let info = report::RunInfo {
        mode: plan.mode(),
        started_utc,
        duration_s: duration.as_secs_f64(),
        machine,
    };
    println!(
        "\nfarmlb bench ({} run, {:.0} s; medians [min–max] of {} alternating runs, {} per \
         failure scenario)",
        plan.mode(),
        duration.as_secs_f64(),
        plan.runs,
        plan.failure_runs
    );
    let (mut met, mut not_met, mut unavailable) = (0, 0, 0);
    for m in sections.iter().flat_map(|s| &s.metrics) {
        println!("  {}", m.line());
        match m.outcome() {
            Outcome::Met => met += 1,
            Outcome::NotMet => not_met += 1,
            Outcome::Unavailable(_) => unavailable += 1,
            Outcome::Info => {}
        }
    }
    println!("goals: {met} met, {not_met} not met, {unavailable} not available");
    if only.is_some() {
        println!("FARMLB_BENCH_ONLY is set: partial run, report not written");
        return Ok(());
    }
    let dir = workspace_root().join("bench");
    report::write_all(&dir, &info, &sections)?;
    println!(
        "report: {0}/report.md, {0}/report.json, {0}/ratios.svg",
        dir.display()
    );
    Ok(())
}
