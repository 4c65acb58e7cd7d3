//! Per-packet cost of the tunnel modes (IPIP, GUE) beside direct routing, and of the
//! backend-side decapsulator. Encapsulation changes the packet's length, so the repeat-N
//! timing of [`super::pkt`] (the kernel does not reset the packet between repeats) does not
//! apply: every sample is one `BPF_PROG_TEST_RUN` call with repeat = 1 on a fresh copy of the
//! packet, net of the same call of an empty program (`farmlb_pass`), which carries the
//! test-run machinery's own cost.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::{anyhow, bail, Context, Result};
use aya::{programs::Xdp, Ebpf};
use farmlb::{
    config::Config,
    dataplane::{test_run_repeat, Dataplane, LoadOpts},
    decap::Decap,
    director::{addr_of, Director},
    packet::PacketBuilder,
    tunnel::TunnelHost,
};
use lb_common::Stat;
use serde_json::json;

use super::stats::{median, Dist, Metric, Section};
use super::Plan;

const XDP_TX: u32 = 3;
const XDP_PASS: u32 = 2;
const OWN_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x03];
/// Calls per program per run; the run's value is their median.
const CALLS: usize = 4000;

/// Three services on one VIP, one per forwarding mode, over the same three backends.
fn config() -> String {
    let svc = |name: &str, port: u16, fwd: &str| {
        let mut s = format!(
            "\n[[service]]\nname = \"{name}\"\nvip = \"10.99.100.1\"\nport = {port}\n\
             forwarding = \"{fwd}\"\n"
        );
        for h in 11..=13 {
            s += &format!("  [[service.backend]]\n  address = \"10.99.0.{h}\"\n");
        }
        s
    };
    format!(
        "interface = \"eth0\"\n{}{}{}",
        svc("dr", 80, "dr"),
        svc("ipip", 81, "ipip"),
        svc("gue", 82, "gue")
    )
}

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("literal socket address")
}

struct Programs {
    dp: Dataplane,
    /// `farmlb_pass`: the empty program the samples are net of.
    empty: Ebpf,
    decap: Decap,
}

impl Programs {
    fn load() -> Result<Programs> {
        let cfg = Config::from_toml_str(&config()).map_err(|e| anyhow!("{}", e.message()))?;
        let mut dp = Dataplane::load(LoadOpts {
            ring_slots: Director::ring_slots_for(&cfg),
            conntrack_size: 65536,
            own_mac: OWN_MAC,
            ..Default::default()
        })
        .context("loading farmlb's XDP program (needs root)")?;
        let mut director = Director::new(dp.ring_slots(), OWN_MAC);
        director.tunnel = TunnelHost {
            mtu: 1500,
            addr4: Some(Ipv4Addr::new(10, 99, 0, 3)),
            addr6: None,
        };
        let mut macs: HashMap<IpAddr, [u8; 6]> = cfg
            .services
            .iter()
            .flat_map(|s| &s.backends)
            .map(|b| (b.address, [2, 0xbb, 0, 0, 0, addr_of(b.address)[15]]))
            .collect();
        director.apply(&cfg, &mut dp, &mut macs)?;
        let mut empty = Ebpf::load(farmlb::PASS_OBJECT).context("loading the pass object")?;
        let prog: &mut Xdp = empty
            .program_mut(lb_common::maps::PASS_PROGRAM)
            .context("farmlb_pass missing")?
            .try_into()?;
        prog.load()?;
        let mut decap = Decap::load(lb_common::DEFAULT_GUE_PORT)?;
        let ours = (11..=13)
            .map(|h| addr_of(IpAddr::from([10, 99, 0, h])))
            .collect();
        decap.set_addrs(&ours)?;
        Ok(Programs { dp, empty, decap })
    }

    fn empty(&self) -> &Xdp {
        self.empty
            .program(lb_common::maps::PASS_PROGRAM)
            .expect("loaded")
            .try_into()
            .expect("XDP")
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Probe {
    Empty,
    Dr,
    Ipip,
    Gue,
    DecapIpip,
    DecapGue,
}

/// Median ns of `CALLS` repeat-1 calls of `probe`, each on a fresh copy of its packet
/// (`test_run` copies the input), each checked for its verdict.
fn sample(p: &mut Programs, probe: Probe, pkts: &HashMap<Probe, Vec<u8>>) -> Result<f64> {
    let pkt = &pkts[&probe];
    let mut v = Vec::with_capacity(CALLS);
    for _ in 0..CALLS {
        let (action, dt) = match probe {
            Probe::Empty => test_run_repeat(p.empty(), pkt, 1)?,
            Probe::Dr | Probe::Ipip | Probe::Gue => p.dp.test_run_repeat(pkt, 1)?,
            Probe::DecapIpip | Probe::DecapGue => p.decap.test_run_repeat(pkt, 1)?,
        };
        let want = match probe {
            Probe::Empty | Probe::DecapIpip | Probe::DecapGue => XDP_PASS,
            _ => XDP_TX,
        };
        if action != want {
            bail!("{probe:?}: verdict {action}, expected {want}");
        }
        v.push(dt.as_nanos() as f64);
    }
    Ok(median(&v))
}

pub fn run(plan: &Plan) -> Result<Section> {
    std::thread::scope(|s| {
        s.spawn(|| {
            super::sys::pin(0, 0)?;
            measure(plan)
        })
        .join()
        .map_err(|_| anyhow!("tunnel benchmark thread panicked"))?
    })
}

fn measure(plan: &Plan) -> Result<Section> {
    let mut p = Programs::load()?;
    let client = sa("198.51.100.7:40000");
    let est = |port: u16| {
        PacketBuilder::tcp(client, SocketAddr::new([10, 99, 100, 1].into(), port))
            .payload(64)
            .build()
    };
    let mut pkts: HashMap<Probe, Vec<u8>> = HashMap::new();
    pkts.insert(Probe::Empty, est(80));
    pkts.insert(Probe::Dr, est(80));
    pkts.insert(Probe::Ipip, est(81));
    pkts.insert(Probe::Gue, est(82));
    // Prime conntrack (the established probes hit it) and take the tunnels' output as the
    // decapsulator's input.
    for probe in [Probe::Dr, Probe::Ipip, Probe::Gue] {
        let (action, out) = p.dp.test_run(&pkts[&probe])?;
        if action != XDP_TX {
            bail!("{probe:?}: priming run verdict {action}");
        }
        match probe {
            Probe::Ipip => {
                pkts.insert(Probe::DecapIpip, out);
            }
            Probe::Gue => {
                pkts.insert(Probe::DecapGue, out);
            }
            _ => {}
        }
    }
    let before = p.dp.stats()?;
    let order = [
        Probe::Empty,
        Probe::Dr,
        Probe::Ipip,
        Probe::Gue,
        Probe::DecapIpip,
        Probe::DecapGue,
    ];
    let mut samples: HashMap<Probe, Vec<f64>> = HashMap::new();
    for run in 0..plan.runs {
        let seq: Vec<Probe> = if run % 2 == 0 {
            order.to_vec()
        } else {
            order.iter().rev().copied().collect()
        };
        for probe in seq {
            samples
                .entry(probe)
                .or_default()
                .push(sample(&mut p, probe, &pkts)?);
        }
    }
    // Calibration: DR with the per-packet section's repeat-N method (valid for DR: it
    // leaves the packet's length alone), as the same runs see it.
    let mut dr_repeat = Vec::new();
    for _ in 0..plan.runs {
        let (action, dt) = p.dp.test_run_repeat(&pkts[&Probe::Dr], plan.repeat)?;
        if action != XDP_TX {
            bail!("DR repeat-N: verdict {action}");
        }
        dr_repeat.push(dt.as_nanos() as f64);
    }
    let after = p.dp.stats()?;
    let calls = (3 * CALLS * plan.runs) as u64 + plan.repeat as u64 * plan.runs as u64;
    let hits = after[Stat::CtHit as usize] - before[Stat::CtHit as usize];
    let tx = after[Stat::Tx as usize] - before[Stat::Tx as usize];
    if hits != calls || tx != calls {
        bail!("{calls} timed director calls, but {hits} conntrack hits and {tx} tx");
    }
    // Net of the empty program, run by run.
    let net = |probe: Probe| {
        Dist::new(
            samples[&probe]
                .iter()
                .zip(&samples[&Probe::Empty])
                .map(|(a, e)| (a - e).max(0.5))
                .collect(),
        )
    };
    let mut s = Section::new("per_packet_tunnel", "Per-packet cost of the tunnel modes");
    let unit = "ns/pkt";
    s.metrics = vec![
        Metric::new(
            "pkt.tunnel.dr",
            "IPv4 TCP established, DR (repeat-1, net of an empty program)",
            unit,
        )
        .value(net(Probe::Dr)),
        Metric::new(
            "pkt.tunnel.ipip",
            "IPv4 TCP established, IPIP (repeat-1, net)",
            unit,
        )
        .value(net(Probe::Ipip))
        .against("DR, same method", net(Probe::Dr)),
        Metric::new(
            "pkt.tunnel.gue",
            "IPv4 TCP established, GUE (repeat-1, net)",
            unit,
        )
        .value(net(Probe::Gue))
        .against("DR, same method", net(Probe::Dr)),
        Metric::new(
            "pkt.tunnel.dr_repeat_n",
            "IPv4 TCP established, DR, repeat-N (calibration: the warm-loop cost)",
            unit,
        )
        .value(Dist::new(dr_repeat.clone())),
        Metric::new(
            "pkt.tunnel.decap_ipip",
            "Backend: farmlb decap, IPIP (repeat-1, net)",
            unit,
        )
        .value(net(Probe::DecapIpip)),
        Metric::new(
            "pkt.tunnel.decap_gue",
            "Backend: farmlb decap, GUE (repeat-1, net)",
            unit,
        )
        .value(net(Probe::DecapGue)),
    ];
    let mut details = String::from("| probe | gross ns (median [min–max] of run medians) |\n");
    details += "|---|---|\n";
    for probe in order {
        let d = Dist::new(samples[&probe].clone());
        details += &format!(
            "| {probe:?} | {:.0} [{:.0}–{:.0}] |\n",
            d.median(),
            d.min(),
            d.max()
        );
    }
    s.details = details;
    s.method = format!(
        "Encapsulation grows the packet (IPIP +20 bytes, GUE +28), so the repeat-N timing of \
         the per-packet section cannot be used (the kernel does not reset the packet between \
         repeats: the second run would wrap the first's output). Every sample here is one \
         `BPF_PROG_TEST_RUN` call with repeat = 1 on a fresh copy of the packet (a 118-byte \
         IPv4 TCP segment of an established flow, conntrack primed), whose kernel-measured \
         duration includes the test-run machinery's fixed cost; each run takes the median of \
         {CALLS} such calls per program, and the value is that median minus the same \
         median of the empty program `farmlb_pass` in the same run. Programs alternate \
         order every run; {runs} runs. DR, IPIP and GUE are three services of one loaded \
         farmlb program (same VIP, ports 80/81/82, 3 backends); every call's verdict is \
         checked (XDP_TX), and the conntrack-hit and tx counters must grow by exactly the \
         number of timed calls. The decapsulator is timed on the tunnels' own output. \
         A repeat-1 call runs the program cold (caches and branch predictors disturbed by \
         the syscall around it), so its net cost is well above the warm-loop cost of the \
         repeat-N method: DR is also timed with repeat = {repeat} (`dr_repeat_n`) for \
         calibration. Compare the modes with each other under the same method, not across \
         methods.",
        runs = plan.runs,
        repeat = plan.repeat
    );
    s.raw = json!({
        "calls_per_run": CALLS,
        "runs": plan.runs,
        "run_medians_ns": samples
            .iter()
            .map(|(k, v)| (format!("{k:?}"), json!(v)))
            .collect::<serde_json::Map<_, _>>(),
    });
    Ok(s)
}
