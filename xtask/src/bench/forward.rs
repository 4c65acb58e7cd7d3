//! Forwarding on the rig: a live-frames XDP generator in the client namespace floods UDP flows
//! at the VIP; the director forwards them to the backends, which count and drop them at
//! ingress. farmlb and an nftables netdev balancer take turns on the director.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use aya::{
    programs::{TestRun, Xdp, XdpMode},
    Ebpf, EbpfLoader, TestRunAttrs, TestRunOptions,
};
use farmlb::packet::PacketBuilder;
use lb_tests::{netns, VIP_V4};
use serde_json::json;

use super::env::{BenchRig, BACKENDS, UDP_PORT};
use super::stats::{median, num, Dist, Goal, Metric, Section};
use super::sys;
use super::Plan;

/// CPU of the generator (and, through softirqs, of the client side of the switch).
pub const GEN_CPU: usize = 0;
/// CPU of the director's receive processing (its threaded NAPI kthread).
pub const LB_CPU: usize = 1;
/// Frames per live-frames batch: the most the kernel takes (fewer flushes per frame; 64
/// offered 3.8M frames/s at most, 256 over 6M).
pub const GEN_BATCH: u32 = 256;
/// Runs per call: a live-frames call has a fixed cost of some 20 ms (page pool set-up and
/// tear-down), which calls of 65536 runs left the generator idle for half the time. Calls
/// of about a second: a paced run that drops its frame costs a fraction of one that sends.
const GEN_CALL_RUNS: u32 = 1 << 23;
const GEN_PACED_CALL_RUNS: u32 = 1 << 24;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lb {
    Farmlb,
    Nft,
}

impl Lb {
    /// The balancers in run `run`'s order (A/B alternation).
    pub fn ab_order(run: usize) -> [Lb; 2] {
        if run.is_multiple_of(2) {
            [Lb::Farmlb, Lb::Nft]
        } else {
            [Lb::Nft, Lb::Farmlb]
        }
    }
}

#[derive(Debug, Default, Clone)]
pub struct RunResult {
    pub secs: f64,
    /// Frames the director's NAPI took in (veth peer `tx packets`).
    pub received: f64,
    /// Frames the director's receive ring refused (veth peer `tx dropped`).
    pub ring_dropped: f64,
    /// Frames the director sent back out that the switch port took (veth peer `rx packets`).
    pub out_taken: f64,
    /// Director output the switch port's ring refused (director `tx dropped`).
    pub out_refused: f64,
    /// Frames the switch delivered to the backends' ports.
    pub delivered: f64,
    pub lb_thread_ns: f64,
    pub softirq_ns: f64,
    pub system_ns: f64,
}

impl RunResult {
    /// Frames offered to the director's receive ring (taken in or refused).
    pub fn offered(&self) -> f64 {
        self.rate(self.received + self.ring_dropped)
    }
    /// Frames the director forwarded (sent out, whether or not the switch had room).
    pub fn forwarded(&self) -> f64 {
        self.out_taken + self.out_refused
    }
    pub fn pps(&self) -> f64 {
        self.forwarded() / self.secs
    }
    pub fn lb_ns_per_pkt(&self) -> f64 {
        self.lb_thread_ns / self.received
    }
    pub fn lb_busy(&self) -> f64 {
        self.lb_thread_ns / (self.secs * 1e9)
    }
    pub fn rate(&self, x: f64) -> f64 {
        x / self.secs
    }
}

fn sink_script() -> String {
    format!(
        "table netdev benchsink {{\n\tchain ingress {{\n\t\ttype filter hook ingress device \
         \"eth0\" priority 0; policy accept;\n\t\tudp dport {UDP_PORT} counter drop\n\t}}\n}}\n"
    )
}

/// Rig changes for this benchmark (the rig is torn down afterwards, nothing is undone):
/// backends drop the UDP flood at ingress; the director's interface always has a NAPI (GRO
/// on, for the nftables case, which has no XDP program there); the switch side of the
/// director's link polls in its own kthread, on the generator's CPU, so the director's NAPI
/// thread does only the director's work and has the other CPU to itself. Returns the
/// redirect program on the client's switch port, attached while it lives.
fn prepare(env: &BenchRig) -> Result<Ebpf> {
    for i in 0..BACKENDS {
        env.nft(&env.rig.ns_backend(i), &sink_script())?;
    }
    env.rig
        .exec(&env.rig.ns_lb(), &["ethtool", "-K", "eth0", "gro", "on"])?;
    let sw = env.rig.ns_switch();
    let vlb = sys::threaded_napi(&sw, "v-lb")?;
    sys::pin(vlb, GEN_CPU)?;
    netns::in_netns(&sw, || -> Result<Ebpf> {
        let ifindex = ifindex("v-lb")?;
        let mut ebpf = load_reference("bench_redirect_xdp", "REDIRECT_IFINDEX", &ifindex)?;
        xdp(&mut ebpf, "bench_redirect_xdp")?
            .attach("v-cl", XdpMode::Driver)
            .context("attaching bench_redirect_xdp to v-cl")?;
        Ok(ebpf)
    })?
}

/// Index of interface `name` in this thread's namespace.
pub fn ifindex(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: NUL-terminated name.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => bail!("no interface {name} in this namespace"),
        i => Ok(i),
    }
}

/// The reference object with `global` set to `value`, its program `prog` loaded.
pub fn load_reference<T: aya::Pod>(prog: &str, global: &str, value: &T) -> Result<Ebpf> {
    let mut ebpf = EbpfLoader::new()
        .override_global(global, value, true)
        .load(farmlb::REFERENCE_OBJECT)?;
    xdp(&mut ebpf, prog)?.load()?;
    Ok(ebpf)
}

pub fn xdp<'a>(ebpf: &'a mut Ebpf, prog: &str) -> Result<&'a mut Xdp> {
    Ok(ebpf
        .program_mut(prog)
        .with_context(|| format!("{prog} missing from the reference object"))?
        .try_into()?)
}

fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let v: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("bad MAC {s:?}"))?;
    v.try_into().map_err(|_| anyhow::anyhow!("bad MAC {s:?}"))
}

/// The generator's frame: client → VIP:UDP_PORT, 60 bytes, UDP checksum 0 (the program
/// rewrites the source port).
pub fn frame(env: &BenchRig) -> Result<Vec<u8>> {
    let src = parse_mac(&env.client_mac())?;
    let dst = parse_mac(&env.lb_mac())?;
    Ok(PacketBuilder::udp(
        (env.rig.client_v4(), 20000).into(),
        (VIP_V4, UDP_PORT).into(),
    )
    .macs(src, dst)
    .payload(18)
    .build())
}

/// Run the generator in namespace `ns` until `stop`, its frames leaving through `dev`, at
/// `rate` frames/s (`None`: as fast as it can); returns the program runs (frames sent or,
/// paced, dropped unsent).
pub fn generate(
    ns: &str,
    dev: &str,
    pkt: Vec<u8>,
    rate: Option<f64>,
    stop: Arc<AtomicBool>,
) -> Result<netns::NetnsThread<Result<u64>>> {
    let dev = dev.to_string();
    netns::spawn_in_netns(ns, move || -> Result<u64> {
        sys::pin(0, GEN_CPU)?;
        let ifindex = ifindex(&dev)?;
        let mut macs = [0u8; 12];
        macs.copy_from_slice(&pkt[..12]);
        let interval: u64 = rate.map_or(0, |r| (1e9 / r).round().max(1.0) as u64);
        let mut ebpf = EbpfLoader::new()
            .override_global("GEN_MACS", &macs, true)
            .override_global("GEN_INTERVAL_NS", &interval, true)
            .load(farmlb::REFERENCE_OBJECT)?;
        let prog = xdp(&mut ebpf, "bench_gen_xdp")?;
        prog.load()?;
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress.
        let mut ctx = [0u8; 24];
        ctx[4..8].copy_from_slice(&(pkt.len() as u32).to_ne_bytes());
        ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
        let mut sent = 0u64;
        let runs = if rate.is_some() {
            GEN_PACED_CALL_RUNS
        } else {
            GEN_CALL_RUNS
        };
        while !stop.load(Ordering::Relaxed) {
            prog.test_run(TestRunOptions {
                data_in: Some(&pkt),
                ctx_in: Some(&ctx),
                repeat: runs,
                attrs: TestRunAttrs::new().xdp_live_frames(GEN_BATCH),
                ..Default::default()
            })
            .context("live-frames BPF_PROG_TEST_RUN")?;
            sent += runs as u64;
        }
        Ok(sent)
    })
}

struct Snap {
    t: Instant,
    /// Counters of the director's switch port `v-lb` and the backends' ports.
    vlb: sys::LinkCounters,
    /// The director's interface.
    lb: sys::LinkCounters,
    backends: u64,
    lb_ns: u64,
    cpu: Vec<Vec<u64>>,
}

fn snap(env: &BenchRig, lb_pid: i32) -> Result<Snap> {
    let links = sys::link_counters(&env.rig.ns_switch())?;
    let t = Instant::now();
    let lb = sys::link_counters(&env.rig.ns_lb())?
        .into_iter()
        .find(|(n, _)| n == env.rig.lb_iface())
        .map(|(_, c)| c)
        .context("no director interface")?;
    let lb_ns = sys::task_runtime_ns(lb_pid)?;
    let cpu = sys::cpu_times()?;
    let vlb = links
        .iter()
        .find(|(n, _)| n == "v-lb")
        .map(|(_, c)| *c)
        .context("no v-lb in the switch")?;
    let backends = links
        .iter()
        .filter(|(n, _)| n.starts_with("v-b"))
        .map(|(_, c)| c.tx_packets)
        .sum();
    Ok(Snap {
        t,
        vlb,
        lb,
        backends,
        lb_ns,
        cpu,
    })
}

/// A balancer running on the director, its NAPI thread found and pinned; stopped on drop.
pub struct Session<'a> {
    env: &'a BenchRig,
    daemon: Option<lb_tests::Daemon>,
    _nft: Option<super::env::NftLb<'a>>,
    pub lb: Lb,
    pub lb_pid: i32,
}

impl<'a> Session<'a> {
    pub fn start(env: &'a BenchRig, lb: Lb) -> Result<Session<'a>> {
        let (daemon, nft) = match lb {
            Lb::Farmlb => (Some(env.start_farmlb()?), None),
            Lb::Nft => (None, Some(env.start_nft_lb()?)),
        };
        let lb_pid = sys::threaded_napi(&env.rig.ns_lb(), env.rig.lb_iface())?;
        sys::pin(lb_pid, LB_CPU)?;
        Ok(Session {
            env,
            daemon,
            _nft: nft,
            lb,
            lb_pid,
        })
    }

    /// Generate from `ns` out of `dev` at `rate` for `warmup`, then measure for `window`.
    pub fn window(
        &self,
        (ns, dev): (&str, &str),
        pkt: &[u8],
        rate: Option<f64>,
        warmup: std::time::Duration,
        window: std::time::Duration,
    ) -> Result<RunResult> {
        let stop = Arc::new(AtomicBool::new(false));
        let gen = generate(ns, dev, pkt.to_vec(), rate, stop.clone())?;
        let res = (|| -> Result<RunResult> {
            thread::sleep(warmup);
            if gen.is_finished() {
                bail!("the generator stopped early");
            }
            let a = snap(self.env, self.lb_pid)?;
            thread::sleep(window);
            let b = snap(self.env, self.lb_pid)?;
            let d = |f: fn(&sys::LinkCounters) -> u64| (f(&b.vlb) - f(&a.vlb)) as f64;
            Ok(RunResult {
                secs: (b.t - a.t).as_secs_f64(),
                received: d(|c| c.tx_packets),
                ring_dropped: d(|c| c.tx_dropped),
                out_taken: d(|c| c.rx_packets),
                out_refused: (b.lb.tx_dropped - a.lb.tx_dropped) as f64,
                delivered: (b.backends - a.backends) as f64,
                lb_thread_ns: (b.lb_ns - a.lb_ns) as f64,
                softirq_ns: sys::delta_ns(&a.cpu, &b.cpu, sys::SOFTIRQ),
                system_ns: sys::delta_ns(&a.cpu, &b.cpu, sys::SYSTEM),
            })
        })();
        stop.store(true, Ordering::Relaxed);
        gen.join()?.context("generator")?;
        res
    }

    pub fn stop(mut self) -> Result<()> {
        let _ = sys::unthread_napi(&self.env.rig.ns_lb(), self.env.rig.lb_iface());
        self._nft.take();
        if let Some(mut d) = self.daemon.take() {
            d.stop()?;
        }
        Ok(())
    }
}

fn measure(env: &BenchRig, lb: Lb, plan: &Plan, pkt: &[u8]) -> Result<RunResult> {
    let s = Session::start(env, lb)?;
    let res = s.window(
        (&env.rig.ns_client(), "eth0"),
        pkt,
        None,
        plan.fwd_warmup,
        plan.fwd_window,
    );
    s.stop()?;
    let r = res?;
    if r.forwarded() < 1000.0 || r.delivered < 1000.0 {
        bail!(
            "{lb:?}: in {:.1} s the director took in {} frames ({} refused by its ring) and \
             sent out {}; the backends got {}",
            r.secs,
            r.received,
            r.ring_dropped,
            r.forwarded(),
            r.delivered
        );
    }
    Ok(r)
}

pub fn run(env: &BenchRig, plan: &Plan) -> Result<Section> {
    if sys::cpu_count() < 2 {
        bail!("needs 2 CPUs (generator and director on different CPUs)");
    }
    let redirect = prepare(env)?;
    let res = measure_all(env, plan).and_then(|runs| {
        eprintln!("  saturation sweep");
        Ok((runs, super::saturate::run(env, plan, &frame(env)?)?))
    });
    drop(redirect);
    let ((farm, nft), sat) = res?;
    report(plan, &farm, &nft, &sat)
}

type Runs = (Vec<RunResult>, Vec<RunResult>);

fn measure_all(env: &BenchRig, plan: &Plan) -> Result<Runs> {
    let pkt = frame(env)?;
    let mut farm = Vec::new();
    let mut nft = Vec::new();
    for run in 0..plan.runs {
        for lb in Lb::ab_order(run) {
            let r = measure(env, lb, plan, &pkt).with_context(|| format!("run {run}, {lb:?}"))?;
            eprintln!(
                "  run {run} {lb:?}: director in {:.0} pkt/s, out {:.0} pkt/s ({:.0} taken by \
                 the switch), backends got {:.0} pkt/s; director {:.0} ns/pkt, thread {:.0}% \
                 busy",
                r.rate(r.received),
                r.pps(),
                r.rate(r.out_taken),
                r.rate(r.delivered),
                r.lb_ns_per_pkt(),
                r.lb_busy() * 100.0
            );
            match lb {
                Lb::Farmlb => farm.push(r),
                Lb::Nft => nft.push(r),
            }
        }
    }
    Ok((farm, nft))
}

/// Where each balancer saturated, or that it did not.
fn saturation_note(sat: &super::saturate::Saturation) -> String {
    let sat_pct = super::saturate::SATURATED * 100.0;
    [Lb::Farmlb, Lb::Nft]
        .iter()
        .filter_map(|&lb| sat.sweep(lb))
        .map(|s| {
            let (name, runs) = match s.lb {
                Lb::Farmlb => ("farmlb", &sat.farm),
                Lb::Nft => ("nftables", &sat.nft),
            };
            let sweep = match (s.saturated, s.rate) {
                (true, Some(r)) => format!(
                    "{name} saturated (≥ {sat_pct:.0}% busy) at {} frames/s asked",
                    num(r)
                ),
                (true, None) => format!("{name} saturated only by the unpaced generator"),
                (false, _) => format!(
                    "{name} NOT saturated: {:.0}% busy at the generator's maximum, so its \
                     figure is at that load",
                    s.points.last().map_or(0.0, |(_, r)| r.lb_busy() * 100.0)
                ),
            };
            let busy: Vec<f64> = runs.iter().map(RunResult::lb_busy).collect();
            let held = busy
                .iter()
                .filter(|b| **b >= super::saturate::SATURATED)
                .count();
            format!(
                "{sweep}, then {held} of {} runs ≥ {sat_pct:.0}% busy (median {:.0}%)",
                busy.len(),
                median(&busy) * 100.0
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn report(
    plan: &Plan,
    farm: &[RunResult],
    nft: &[RunResult],
    sat: &super::saturate::Saturation,
) -> Result<Section> {
    let col = |v: &[RunResult], f: fn(&RunResult) -> f64| Dist::new(v.iter().map(f).collect());
    let busy_note = {
        let med = |v: &[RunResult], f: &dyn Fn(&RunResult) -> f64| {
            median(&v.iter().map(f).collect::<Vec<_>>())
        };
        let offered = RunResult::offered;
        let (fb, nb) = (
            med(farm, &RunResult::lb_busy) * 100.0,
            med(nft, &RunResult::lb_busy) * 100.0,
        );
        if fb < 90.0 && nb < 90.0 {
            format!(
                "neither director thread was saturated (farmlb {fb:.0}% busy, nftables \
                 {nb:.0}%) although the generator offered about {} (farmlb runs) and {} \
                 (nftables runs) frames/s: the thread sleeps between bursts and its receive \
                 ring overflows while it wakes up, so this rate measures how fast each \
                 balancer drains bursts on this rig, not its full capacity; the director CPU \
                 per packet is the balancer-specific figure",
                num(med(farm, &offered)),
                num(med(nft, &offered)),
            )
        } else if fb < 90.0 {
            format!(
                "farmlb's director thread was {fb:.0}% busy (nftables {nb:.0}%): farmlb's rate \
                 is bounded by the rig, not by farmlb"
            )
        } else {
            String::new()
        }
    };
    let mut s = Section::new("forwarding", "Forwarding on the veth rig");
    s.metrics = vec![
        Metric::new("fwd.pps", "Forwarded packets/s, farmlb", "pkt/s")
            .value(col(farm, RunResult::pps))
            .against("nftables", col(nft, RunResult::pps))
            .goal(Goal::ratio_at_least(3.0))
            .note(busy_note),
        Metric::new(
            "fwd.lb_cpu_per_pkt",
            "Director CPU per packet at saturation, farmlb",
            "ns/pkt",
        )
        .value(col(&sat.farm, RunResult::lb_ns_per_pkt))
        .against("nftables", col(&sat.nft, RunResult::lb_ns_per_pkt))
        .goal(Goal::ratio_at_most(0.3))
        .note(saturation_note(sat)),
        Metric::new(
            "fwd.capacity",
            "Director capacity (frames taken in per second at saturation), farmlb",
            "pkt/s",
        )
        .value(col(&sat.farm, |r| r.rate(r.received)))
        .against("nftables", col(&sat.nft, |r| r.rate(r.received))),
        Metric::new(
            "fwd.lb_cpu_per_pkt_rig",
            "Director CPU per packet at the rig's load (wake-ups included), farmlb",
            "ns/pkt",
        )
        .value(col(farm, RunResult::lb_ns_per_pkt))
        .against("nftables", col(nft, RunResult::lb_ns_per_pkt)),
    ];
    let row = |name: &str, v: &[RunResult]| {
        let f = |g: &dyn Fn(&RunResult) -> f64| median(&v.iter().map(g).collect::<Vec<_>>());
        format!(
            "| {name} | {} | {} | {} | {} | {} | {:.0} | {:.0}% | {:.0} | {:.0} |\n",
            num(f(&|r| r.rate(r.received))),
            num(f(&|r| r.rate(r.ring_dropped))),
            num(f(&RunResult::pps)),
            num(f(&|r| r.rate(r.out_refused))),
            num(f(&|r| r.rate(r.delivered))),
            f(&RunResult::lb_ns_per_pkt),
            f(&RunResult::lb_busy) * 100.0,
            f(&|r| r.softirq_ns / r.forwarded()),
            f(&|r| (r.softirq_ns + r.system_ns) / r.forwarded()),
        )
    };
    s.details = String::from(
        "Medians over runs, per second unless noted. *In*: frames the director's NAPI took \
         in; *ring drops*: frames its receive ring refused; *out*: frames it sent back out \
         (the forwarded rate above); *out refused*: the part of *out* the switch port's ring \
         had no room for; *backends*: frames the switch delivered to the backends. \
         *softirq*, *softirq+system*: all CPUs (/proc/stat, tick-sampled), per forwarded \
         packet; they include the generator, the switch and the backends.\n\n\
         | balancer | in | ring drops | out | out refused | backends | director ns/pkt | \
         director thread busy | softirq ns/pkt | softirq+system ns/pkt |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    s.details += &row("farmlb", farm);
    s.details += &row("nftables", nft);
    s.details +=
        "\n**Saturation sweep** (one per balancer; the A/B runs then run one step past the \
                  first saturating rate):\n\n";
    s.details += &super::saturate::table(sat);
    let nft_version = sys::first_line(&["nft", "--version"]);
    s.method = format!(
        "Rig `{prefix}`. Generator: `bench_gen_xdp` (in the reference object) run with \
         BPF_PROG_TEST_RUN in live-frames mode (`BPF_F_TEST_XDP_LIVE_FRAMES`, batch \
         {batch}) from a thread in the client namespace pinned to CPU {gen}, with the \
         client's `eth0` as ingress device: each frame (60-byte Ethernet/IPv4/UDP to \
         VIP:{udp}, one of 1024 source ports) leaves with XDP_TX through the client's veth. \
         On the switch, `bench_redirect_xdp` hands it from the client's port straight to \
         the director's port (XDP redirect), so it reaches the director as a raw frame, as \
         from a NIC, not as a bridged socket buffer (which would force veth to convert it \
         for XDP). The director's output goes through the bridge to the {nb} backends, \
         whose netdev-ingress rule drops the flood. Balancers, alternating A/B each run: \
         farmlb (the daemon, XDP native mode on the director's veth) and nftables ({nft}) \
         with the anchors' direct-routing rule in a netdev ingress chain on the same \
         interface (`ether daddr set jhash ip saddr . udp sport mod {nb} map {{ backend \
         MACs }} ether saddr set <director MAC> fwd to \"eth0\"`: same DR semantics, no \
         NAT, no conntrack). The director's interface runs threaded NAPI, its kthread \
         pinned to CPU {lbcpu}; the switch side of that link has its own NAPI thread, \
         pinned to CPU {gen} with the generator, so the director has a CPU to itself and \
         everything else shares the other. *Forwarded packets/s* = frames the director \
         sent back out (XDP_TX or `fwd`), counted on its interface, including those the \
         switch port then had no room for. *Director CPU per packet* = run time of the \
         director's NAPI kthread (`/proc/<pid>/schedstat`) / frames it took in, at the \
         load the rig offers (a thread that sleeps between batches pays its wake-ups): all \
         the director's per-packet work (farmlb: the program and XDP_TX; nftables: building \
         the socket buffer, GRO, the netdev hook, `fwd`). {runs} runs × ({warm:.1} s \
         warm-up + {win:.1} s window) per balancer. *At saturation*: the same director \
         and balancers, but the generator runs in the switch namespace and transmits \
         straight into the director's link (`v-lb`, live frames, batch {batch}), paced \
         inside the program (one frame per 1/rate s, the rest dropped unsent); `v-lb`'s NAPI \
         thread runs at idle priority on the generator's CPU, so the director's output \
         piles up in its ring and the rest is refused there (what it does poll, \
         `bench_sink_xdp`, swapped in for the rig's XDP_PASS program, drops): the \
         generator's CPU does little else (at normal priority that thread took it in \
         millisecond slices, and the director's ring ran dry while it did). One sweep per \
         balancer raises the rate from {start} frames/s by ×{step} until the director's \
         NAPI thread is ≥ {sat:.0}% busy (the generator falling behind the asked rate ends \
         the paced steps; one unpaced step follows); then {runs} A/B runs ({sw:.1} s \
         warm-up + {swin:.1} s window) of each balancer one step past its first saturating \
         rate (or unpaced) give *Director CPU per packet at saturation* (thread run time / frames \
         taken in) and the *capacity* (frames taken in per second).",
        prefix = super::env::PREFIX,
        batch = GEN_BATCH,
        gen = GEN_CPU,
        udp = UDP_PORT,
        nb = BACKENDS,
        nft = nft_version,
        lbcpu = LB_CPU,
        runs = plan.runs,
        warm = plan.fwd_warmup.as_secs_f64(),
        win = plan.fwd_window.as_secs_f64(),
        start = num(super::saturate::START_RATE),
        step = super::saturate::STEP,
        sat = super::saturate::SATURATED * 100.0,
        sw = (plan.fwd_warmup / 2).as_secs_f64(),
        swin = (plan.fwd_window / 2).as_secs_f64(),
    );
    let raw = |v: &[RunResult]| {
        v.iter()
            .map(|r| {
                json!({
                    "secs": r.secs,
                    "director_in": r.received,
                    "director_ring_dropped": r.ring_dropped,
                    "director_out": r.forwarded(),
                    "director_out_refused": r.out_refused,
                    "backends_got": r.delivered,
                    "director_thread_ns": r.lb_thread_ns,
                    "softirq_ns_all_cpus": r.softirq_ns,
                    "system_ns_all_cpus": r.system_ns,
                })
            })
            .collect::<Vec<_>>()
    };
    s.raw = json!({
        "farmlb": raw(farm),
        "nftables": raw(nft),
        "farmlb_saturated": raw(&sat.farm),
        "nftables_saturated": raw(&sat.nft),
    });
    Ok(s)
}
