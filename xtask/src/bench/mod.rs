//! `cargo xtask bench [--quick]`: farmlb against baselines measured in the same run, on the
//! same machine, side by side (issue #5).
//!
//! 1. Per-packet cost with BPF_PROG_TEST_RUN against a minimal reference XDP program
//!    ([`pkt`]).
//! 2. Forwarding on the namespace rig against an nftables balancer ([`forward`]).
//! 3. TCP connections/s and added latency against HAProxy ([`conns`]).
//! 4. Maglev build time and disruption ([`maglev`]).
//! 5. Failure handling (needs health checks; reported as not available until they exist).
//!
//! The command rebuilds xtask and the daemon with `--release` and re-runs itself from that
//! build, so Maglev timings are of optimised code. It prints one line per metric and writes
//! `bench/report.md`, `bench/report.json` and `bench/ratios.svg`. Goals are reported, never
//! asserted.
//!
//! For work on the benchmark itself, `FARMLB_BENCH_ONLY=pkt,maglev,conn,fwd` (any subset)
//! runs only those parts and prints their lines without writing the report.

mod conns;
mod env;
mod forward;
mod maglev;
mod pkt;
mod report;
mod stats;
mod sys;

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
    /// BPF_PROG_TEST_RUN repeat count per per-packet sample.
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
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                quick,
                runs: 5,
                repeat: 200_000,
                fwd_warmup: Duration::from_millis(500),
                fwd_window: Duration::from_millis(1500),
                conn_count: 600,
                conn_threads: 4,
                lat_count: 150,
                maglev_builds: 5,
                removals: 3,
            }
        } else {
            Plan {
                quick,
                runs: 9,
                repeat: 2_000_000,
                fwd_warmup: Duration::from_secs(1),
                fwd_window: Duration::from_secs(4),
                conn_count: 3000,
                conn_threads: 4,
                lat_count: 600,
                maglev_builds: 15,
                removals: 7,
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
            "about 1.5 minutes"
        } else {
            "about 8 minutes"
        }
    }
}

pub fn run(quick: bool) -> Result<()> {
    if cfg!(debug_assertions) {
        relaunch_release(quick)
    } else {
        measure(quick)
    }
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Build xtask (this command) and the daemon with optimisations and run the benchmark
/// from that build.
fn relaunch_release(quick: bool) -> Result<()> {
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

/// A section that failed to run: its metrics, marked not available with the error.
fn failed(
    id: &'static str,
    title: &'static str,
    keys: &[(&str, &str)],
    e: &anyhow::Error,
) -> Section {
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

fn failure_handling() -> Section {
    let mut s = Section::new("failure", "Failure handling");
    s.metrics = vec![
        Metric::unavailable(
            "fail.backend_kill_to_last_conn",
            "Backend killed → last new connection sent to it",
            "needs health checks (#3)",
        ),
        Metric::unavailable(
            "fail.node_loss_redistribution",
            "Farm node lost → traffic redistributed",
            "needs farm mode",
        ),
    ];
    s.method = "Needs health checks (#3), which farmlb does not have yet: without them a \
                killed backend keeps its Maglev slots until the configuration changes, so \
                there is no detection time to measure. Farm-mode redistribution likewise \
                waits for farm mode."
        .into();
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

fn measure(quick: bool) -> Result<()> {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmark needs root (XDP, network namespaces)");
    }
    ensure_tools()?;
    let plan = Plan::new(quick);
    let started = Instant::now();
    let started_utc = utc_now();
    let machine = machine();
    eprintln!(
        "xtask bench: {} run, {} runs per comparison; takes {}",
        plan.mode(),
        plan.runs,
        plan.estimate()
    );

    let only = std::env::var("FARMLB_BENCH_ONLY").ok();
    let want = |part: &str| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|x| x == part))
    };
    let skipped = |id, title| {
        let mut s = Section::new(id, title);
        s.metrics = vec![Metric::unavailable(
            id,
            title,
            "skipped (FARMLB_BENCH_ONLY)",
        )];
        s
    };

    let mut sections = Vec::new();
    eprintln!("xtask bench: [1/5] per-packet cost (BPF_PROG_TEST_RUN)");
    let pkt_sec = if want("pkt") {
        pkt::run(&plan)
    } else {
        Ok(skipped("per_packet", "Per-packet cost"))
    };
    sections.push(pkt_sec.unwrap_or_else(|e| {
        failed(
            "per_packet",
            "Per-packet cost (BPF_PROG_TEST_RUN)",
            &[("pkt", "Per-packet cost")],
            &e,
        )
    }));
    eprintln!("xtask bench: [2/5] Maglev");
    let maglev_sec = if want("maglev") {
        maglev::run(&plan)
    } else {
        Ok(skipped("maglev", "Maglev"))
    };
    sections.push(maglev_sec.unwrap_or_else(|e| {
        failed(
            "maglev",
            "Maglev table build and disruption",
            &[("maglev", "Maglev build and disruption")],
            &e,
        )
    }));

    eprintln!("xtask bench: setting up the rig `{}`", env::PREFIX);
    let rig = if want("conn") || want("fwd") {
        env::BenchRig::up()
    } else {
        Err(anyhow::anyhow!("skipped (FARMLB_BENCH_ONLY)"))
    };
    let (conn_sec, fwd_sec) = match rig {
        Ok(rig) => {
            eprintln!("xtask bench: [3/5] TCP connections: farmlb vs HAProxy");
            let c = if want("conn") {
                conns::run(&rig, &plan)
            } else {
                Ok(skipped("connections", "TCP connections"))
            };
            let c = c.unwrap_or_else(|e| {
                failed(
                    "connections",
                    "TCP connections through the balancer",
                    &[
                        ("conn.rate", "TCP connections/s through farmlb"),
                        (
                            "conn.added_latency",
                            "Added connect+first-byte latency, farmlb",
                        ),
                    ],
                    &e,
                )
            });
            // Forwarding changes NAPI and offload settings of the rig: it runs last.
            eprintln!("xtask bench: [4/5] forwarding: farmlb vs nftables");
            let f = if want("fwd") {
                forward::run(&rig, &plan)
            } else {
                Ok(skipped("forwarding", "Forwarding"))
            };
            let f = f.unwrap_or_else(|e| {
                failed(
                    "forwarding",
                    "Forwarding on the veth rig",
                    &[
                        ("fwd.pps", "Forwarded packets/s, farmlb"),
                        (
                            "fwd.lb_cpu_per_pkt",
                            "Director CPU per packet, farmlb",
                        ),
                    ],
                    &e,
                )
            });
            drop(rig);
            (c, f)
        }
        Err(e) => {
            let e = e.context("setting up the rig");
            (
                failed(
                    "connections",
                    "TCP connections through the balancer",
                    &[("conn", "TCP connections")],
                    &e,
                ),
                failed(
                    "forwarding",
                    "Forwarding on the veth rig",
                    &[("fwd", "Forwarding")],
                    &e,
                ),
            )
        }
    };
    // Report in the issue's order.
    let maglev_sec = sections.pop().expect("pushed above");
    sections.push(fwd_sec);
    sections.push(conn_sec);
    sections.push(maglev_sec);
    eprintln!("xtask bench: [5/5] failure handling");
    sections.push(failure_handling());

    let duration = started.elapsed();
    let info = report::RunInfo {
        mode: plan.mode(),
        started_utc,
        duration_s: duration.as_secs_f64(),
        machine,
    };
    println!(
        "\nfarmlb bench ({} run, {:.0} s; medians of {} alternating runs, [min–max])",
        plan.mode(),
        duration.as_secs_f64(),
        plan.runs
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
