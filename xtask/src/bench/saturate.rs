//! The director at saturation. On the rig the director's NAPI thread sleeps between bursts
//! (a quarter busy for farmlb), so its CPU per packet there includes wake-ups. Here the
//! generator runs in the switch namespace and transmits straight into the director's link,
//! and the director's output is left to that link's switch side, which polls at idle
//! priority (and drops what it polls, `bench_sink_xdp`), so the generator's CPU does
//! little but generate. The offered rate rises step by step until
//! the director's NAPI thread is at least [`SATURATED`] busy; the CPU per packet at that
//! rate is the balancer's cost when it has no idle time.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::xdp::XdpLink;
use aya::EbpfLoader;

use super::env::BenchRig;
use super::forward::{xdp, Lb, RunResult, Session, GEN_CPU};
use super::stats::num;
use super::sys;
use super::Plan;

/// Busy share of the director's NAPI thread that counts as saturated.
pub const SATURATED: f64 = 0.95;
/// First offered rate of a sweep (frames/s), and the factor between steps.
pub const START_RATE: f64 = 250_000.0;
pub const STEP: f64 = 1.25;
/// The generator is taken to have reached its limit when the director's ring was offered
/// less than this share of the step's rate.
const KEPT_UP: f64 = 0.9;
/// The director's link, switch side: the generator transmits through it.
const GEN_DEV: &str = "v-lb";

/// One balancer's sweep: (rate asked of the generator, `None` = unpaced; what it measured).
pub struct Sweep {
    pub lb: Lb,
    pub points: Vec<(Option<f64>, RunResult)>,
    /// The first rate at which the thread was saturated; `None` with `saturated` false: not
    /// even the unpaced generator saturated it (the last point is then the unpaced one).
    pub rate: Option<f64>,
    pub saturated: bool,
}

/// The sweeps, then `plan.runs` A/B runs of each balancer a step past its first saturating
/// rate.
pub struct Saturation {
    pub sweeps: Vec<Sweep>,
    pub farm: Vec<RunResult>,
    pub nft: Vec<RunResult>,
}

impl Saturation {
    pub fn sweep(&self, lb: Lb) -> Option<&Sweep> {
        self.sweeps.iter().find(|s| s.lb == lb)
    }
}

pub fn run(env: &BenchRig, plan: &Plan, pkt: &[u8]) -> Result<Saturation> {
    // v-lb runs the rig's XDP_PASS program through a pinned link: the sink takes its place
    // for the sweep, and the pass program gets it back after.
    let pin = lb_tests::rig::pass_pin(super::env::PREFIX);
    swap_program(&pin, farmlb::REFERENCE_OBJECT, "bench_sink_xdp")?;
    let sw = env.rig.ns_switch();
    // Its NAPI thread shares the generator's CPU; at normal priority it takes that CPU in
    // slices of milliseconds to drop the director's output, the generator stalls and the
    // director's ring runs dry (the director idled a quarter of the time while offered
    // over 5M frames/s). At idle priority it barely runs: the director's output fills its
    // ring and the rest is refused there (XDP_TX or `fwd` into a full ring, cheap).
    let res = sys::threaded_napi(&sw, GEN_DEV)
        .and_then(|pid| {
            sys::pin(pid, GEN_CPU)?;
            sys::set_policy(pid, libc::SCHED_IDLE)
        })
        .and_then(|()| measure(env, plan, pkt));
    swap_program(&pin, farmlb::PASS_OBJECT, lb_common::maps::PASS_PROGRAM)
        .context("putting the XDP_PASS program back on v-lb")?;
    res
}

/// Replace the program of the XDP link pinned at `pin` with `prog` of `object`. The link
/// stays pinned, so the program stays attached after this process lets go of it.
fn swap_program(pin: &std::path::Path, object: &[u8], prog: &str) -> Result<()> {
    let link: FdLink = PinnedLink::from_pin(pin)
        .with_context(|| format!("opening the XDP link pinned at {}", pin.display()))?
        .into();
    let link = XdpLink::try_from(link)?;
    let mut ebpf = EbpfLoader::new().load(object)?;
    let p = xdp(&mut ebpf, prog)?;
    p.load()?;
    p.attach_to_link(link)
        .with_context(|| format!("attaching {prog} to the link pinned at {}", pin.display()))?;
    Ok(())
}

/// Step windows are shorter than the A/B runs' (a sweep has many).
fn step_windows(plan: &Plan) -> (Duration, Duration) {
    (Duration::from_millis(300), plan.fwd_window / 3)
}

fn measure(env: &BenchRig, plan: &Plan, pkt: &[u8]) -> Result<Saturation> {
    let sw = env.rig.ns_switch();
    let at = (sw.as_str(), GEN_DEV);
    let mut sweeps = Vec::new();
    for lb in [Lb::Farmlb, Lb::Nft] {
        let s = Session::start(env, lb)?;
        let r = sweep(&s, at, pkt, plan);
        s.stop()?;
        let r = r.with_context(|| format!("{lb:?}: saturation sweep"))?;
        eprintln!(
            "  {lb:?}: {} at {}",
            if r.saturated {
                "saturated"
            } else {
                "NOT saturated"
            },
            r.rate.map_or("the generator's maximum".into(), |x| format!(
                "{} frames/s",
                num(x)
            ))
        );
        sweeps.push(r);
    }
    let (mut farm, mut nft) = (Vec::new(), Vec::new());
    for run in 0..plan.runs {
        for lb in Lb::ab_order(run) {
            // A step past the first saturating rate: right at the threshold, run-to-run
            // noise left some runs short of it.
            let rate = sweeps
                .iter()
                .find(|s| s.lb == lb)
                .and_then(|s| s.rate)
                .map(|r| r * STEP);
            let s = Session::start(env, lb)?;
            let r = s.window(at, pkt, rate, plan.fwd_warmup / 2, plan.fwd_window / 2);
            s.stop()?;
            let r = r.with_context(|| format!("saturated run {run}, {lb:?}"))?;
            if r.received < 1000.0 {
                bail!("{lb:?}: the director took in {} frames", r.received);
            }
            eprintln!(
                "  saturated run {run} {lb:?}: offered {:.0}/s, in {:.0}/s, thread {:.0}% \
                 busy, {:.0} ns/pkt",
                r.offered(),
                r.rate(r.received),
                r.lb_busy() * 100.0,
                r.lb_ns_per_pkt()
            );
            match lb {
                Lb::Farmlb => farm.push(r),
                Lb::Nft => nft.push(r),
            }
        }
    }
    Ok(Saturation { sweeps, farm, nft })
}

fn sweep(s: &Session, at: (&str, &str), pkt: &[u8], plan: &Plan) -> Result<Sweep> {
    let (warm, win) = step_windows(plan);
    let mut points = Vec::new();
    let mut rate = START_RATE;
    loop {
        let r = s.window(at, pkt, Some(rate), warm, win)?;
        let (busy, kept_up) = (r.lb_busy(), r.offered() >= KEPT_UP * rate);
        eprintln!(
            "    asked {:.0}/s: offered {:.0}/s, in {:.0}/s, thread {:.0}% busy, {:.0} ns/pkt",
            rate,
            r.offered(),
            r.rate(r.received),
            busy * 100.0,
            r.lb_ns_per_pkt()
        );
        points.push((Some(rate), r));
        if busy >= SATURATED {
            return Ok(Sweep {
                lb: s.lb,
                points,
                rate: Some(rate),
                saturated: true,
            });
        }
        if !kept_up {
            break;
        }
        rate *= STEP;
    }
    let r = s.window(at, pkt, None, warm, win)?;
    eprintln!(
        "    unpaced: offered {:.0}/s, in {:.0}/s, thread {:.0}% busy, {:.0} ns/pkt",
        r.offered(),
        r.rate(r.received),
        r.lb_busy() * 100.0,
        r.lb_ns_per_pkt()
    );
    let saturated = r.lb_busy() >= SATURATED;
    points.push((None, r));
    Ok(Sweep {
        lb: s.lb,
        points,
        rate: None,
        saturated,
    })
}

/// The sweeps as a markdown table.
pub fn table(sat: &Saturation) -> String {
    let mut t = String::from(
        "| balancer | asked frames/s | offered | in | ring drops | director thread busy | \
         director ns/pkt |\n|---|---|---|---|---|---|---|\n",
    );
    for s in &sat.sweeps {
        for (rate, r) in &s.points {
            t += &format!(
                "| {} | {} | {} | {} | {} | {:.0}% | {:.0} |\n",
                match s.lb {
                    Lb::Farmlb => "farmlb",
                    Lb::Nft => "nftables",
                },
                rate.map_or("unpaced".into(), num),
                num(r.offered()),
                num(r.rate(r.received)),
                num(r.rate(r.ring_dropped)),
                r.lb_busy() * 100.0,
                r.lb_ns_per_pkt(),
            );
        }
    }
    t
}
