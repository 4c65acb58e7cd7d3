//! Per-packet cost: farmlb's XDP program against the reference program
//! (`lb-ebpf/src/bin/reference.rs`: parse Ethernet + IP, swap MACs, XDP_TX), against the
//! stateful floors of the same object (parse, then one conntrack lookup that hits or one
//! insert, then MAC swap and XDP_TX) and against the previous version of farmlb's program
//! ([`super::baseline`]), all timed by the kernel with BPF_PROG_TEST_RUN and a large repeat
//! count, in alternating order.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{HashMap as BpfHashMap, MapData},
    programs::Xdp,
    Ebpf, EbpfLoader,
};
use farmlb::{
    config::Config,
    dataplane::{test_run_repeat, Dataplane, LoadOpts},
    director::{addr_of, Director},
    packet::PacketBuilder,
};
use lb_common::{CtEntry, CtKey, FlowKey, Stat, PROTO_TCP};
use lb_tests::{daemon::services_toml, Service, VIP_V4, VIP_V6};
use serde_json::json;

use super::baseline::{self, OldDataplane, Rev};
use super::stats::{Dist, Goal, Metric, Section};
use super::Plan;

const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const OWN_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x03];
/// Calls a sample is split into, taking turns with the same packet's other programs.
const CHUNKS: u32 = 10;

/// Conntrack size of farmlb and of the floors' map.
const CT_SIZE: u32 = 65536;
/// The established flows' 5-tuples (`packets()`), pre-filled in the hit floor's map.
const EST_FLOWS: [(&str, &str); 2] = [
    ("198.51.100.7:40000", "10.99.100.1:80"),
    ("[2001:db8::7]:40000", "[fd99:100::1]:80"),
];

/// The services the program is timed with: what the rig and the examples use (3 backends,
/// 65537-slot tables).
fn config() -> String {
    let backends = |net: &'static str| {
        (11..=13).map(move |h| format!("{net}{h}").parse().expect("literal address"))
    };
    let web4 = Service::tcp("web4", VIP_V4.into(), 80).backends(backends("10.99.0."));
    let dns4 = Service {
        protocol: "udp".into(),
        ..Service::tcp("dns4", VIP_V4.into(), 53)
    }
    .backends(backends("10.99.0."));
    let web6 = Service::tcp("web6", VIP_V6.into(), 80).backends(backends("fd99::"));
    format!(
        "interface = \"eth0\"\n{}",
        services_toml(&[web4, dns4, web6])
    )
}

fn mac_for(ip: IpAddr) -> [u8; 6] {
    let a = addr_of(ip);
    [0x02, 0xbb, a[12], a[13], a[14], a[15]]
}

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("literal socket address")
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Prog {
    Farmlb,
    Reference,
    /// `floor_hit_xdp`: parse + conntrack hit + MAC swap.
    FloorHit,
    /// `floor_insert_xdp`: parse + conntrack insert + MAC swap.
    FloorInsert,
    /// The previous version of farmlb's program.
    Old,
}

/// One timed (program, packet) combination.
struct Probe {
    key: &'static str,
    prog: Prog,
    packet: Vec<u8>,
    action: u32,
    /// farmlb reason counter that must grow by exactly `repeat` per call: proves every
    /// repeat took the intended path although the packet is not reset between repeats.
    path: Option<Stat>,
}

/// The floor each farmlb probe is compared with, if any.
fn floor_of(key: &str) -> Option<Prog> {
    match key {
        "v4_est" | "v6_est" => Some(Prog::FloorHit),
        "v4_syn" | "v6_syn" => Some(Prog::FloorInsert),
        _ => None,
    }
}

fn packets() -> Vec<(&'static str, Vec<u8>, u32, Stat)> {
    let v4 = sa(EST_FLOWS[0].0);
    let v6 = sa(EST_FLOWS[1].0);
    vec![
        (
            "v4_est",
            PacketBuilder::tcp(v4, sa("10.99.100.1:80")).build(),
            XDP_TX,
            Stat::CtHit,
        ),
        (
            "v6_est",
            PacketBuilder::tcp(v6, sa("[fd99:100::1]:80")).build(),
            XDP_TX,
            Stat::CtHit,
        ),
        (
            "v4_syn",
            PacketBuilder::tcp(v4, sa("10.99.100.1:80")).syn().build(),
            XDP_TX,
            Stat::CtMissSyn,
        ),
        (
            "v6_syn",
            PacketBuilder::tcp(v6, sa("[fd99:100::1]:80")).syn().build(),
            XDP_TX,
            Stat::CtMissSyn,
        ),
        (
            "v4_udp",
            PacketBuilder::udp(v4, sa("10.99.100.1:53"))
                .payload(32)
                .build(),
            XDP_TX,
            Stat::CtHit,
        ),
        (
            "v4_pass",
            PacketBuilder::tcp(v4, sa("10.99.100.9:80")).build(),
            XDP_PASS,
            Stat::PassNotVip,
        ),
    ]
}

fn probes(with_old: bool) -> Vec<Probe> {
    let mut out = Vec::new();
    for (key, packet, action, stat) in packets() {
        out.push(Probe {
            key,
            prog: Prog::Farmlb,
            packet: packet.clone(),
            action,
            path: Some(stat),
        });
        if with_old {
            out.push(Probe {
                key,
                prog: Prog::Old,
                packet: packet.clone(),
                action,
                path: Some(stat),
            });
        }
        if let Some(floor) = floor_of(key) {
            out.push(Probe {
                key,
                prog: floor,
                packet: packet.clone(),
                action: XDP_TX,
                path: None,
            });
        }
        out.push(Probe {
            key,
            prog: Prog::Reference,
            packet,
            action: XDP_TX,
            path: None,
        });
    }
    out
}

/// Name of each program of the reference object the benchmark times.
fn ref_prog(p: Prog) -> &'static str {
    match p {
        Prog::FloorHit => "floor_hit_xdp",
        Prog::FloorInsert => "floor_insert_xdp",
        _ => "reference_xdp",
    }
}

struct Programs {
    dp: Dataplane,
    /// The reference object: `reference_xdp` and the floors, loaded.
    reference: Ebpf,
    /// The previous version, or why it is not available.
    old: std::result::Result<OldDataplane, String>,
}

impl Programs {
    fn load(old: std::result::Result<Vec<u8>, String>) -> Result<Programs> {
        let cfg = Config::from_toml_str(&config()).map_err(|e| anyhow!("{}", e.message()))?;
        let ring_slots = Director::ring_slots_for(&cfg);
        let mut dp = Dataplane::load(LoadOpts {
            ring_slots,
            conntrack_size: CT_SIZE,
            own_mac: OWN_MAC,
            ..Default::default()
        })
        .context("loading farmlb's XDP program (needs root)")?;
        let mut director = Director::new(dp.ring_slots(), OWN_MAC);
        let mut macs: HashMap<IpAddr, [u8; 6]> = cfg
            .services
            .iter()
            .flat_map(|s| &s.backends)
            .map(|b| (b.address, mac_for(b.address)))
            .collect();
        director.apply(&cfg, &mut dp, &mut macs)?;

        let mut reference = EbpfLoader::new()
            .map_max_entries("FLOOR_CT", CT_SIZE)
            .load(farmlb::REFERENCE_OBJECT)
            .context("loading the reference object")?;
        for name in ["reference_xdp", "floor_hit_xdp", "floor_insert_xdp"] {
            let prog: &mut Xdp = reference
                .program_mut(name)
                .with_context(|| format!("{name} missing from the reference object"))?
                .try_into()?;
            prog.load()
                .with_context(|| format!("verifier rejected {name}"))?;
        }
        // The hit floor's map holds the established probes' flows (as farmlb's conntrack
        // will after the warm-up run).
        let mut ct: BpfHashMap<MapData, CtKey, CtEntry> = BpfHashMap::try_from(
            reference
                .take_map("FLOOR_CT")
                .context("FLOOR_CT missing from the reference object")?,
        )?;
        for (src, dst) in EST_FLOWS {
            let (src, dst) = (sa(src), sa(dst));
            // The floors know no service: their keys' `svc` is 0.
            let key = *FlowKey::new(
                addr_of(src.ip()),
                addr_of(dst.ip()),
                src.port(),
                dst.port(),
                PROTO_TCP,
            )
            .ct_key();
            let entry = CtEntry {
                backend: 1,
                _pad: 0,
                last_seen_ns: 0,
            };
            ct.insert(key, entry, 0)
                .context("pre-filling the hit floor's conntrack")?;
        }

        let old = old.and_then(|obj| {
            OldDataplane::load(&obj, &cfg, ring_slots, CT_SIZE, OWN_MAC, &mut macs)
                .map_err(|e| format!("{e:#}"))
        });
        Ok(Programs { dp, reference, old })
    }

    fn reference(&self, p: Prog) -> &Xdp {
        self.reference
            .program(ref_prog(p))
            .expect("loaded")
            .try_into()
            .expect("loaded as XDP")
    }

    /// One BPF_PROG_TEST_RUN call of `repeat` runs; mean ns per run. Checks the verdict and,
    /// for farmlb, that every run took the probe's path.
    fn time(&mut self, p: &Probe, repeat: u32) -> Result<f64> {
        let (action, dt) = match p.prog {
            Prog::Reference | Prog::FloorHit | Prog::FloorInsert => {
                test_run_repeat(self.reference(p.prog), &p.packet, repeat)?
            }
            Prog::Old => {
                let old = self.old.as_ref().map_err(|e| anyhow!("{e}"))?;
                let before = old.stats()?;
                let r = old.test_run_repeat(&p.packet, repeat)?;
                let after = old.stats()?;
                let path = p.path.expect("farmlb probes name their path");
                // A version that counts forwarded packets in combined slots bumps the
                // path's `Stat::forwarded` slot instead; older ones have no such slot.
                let delta = |i: usize| {
                    after.get(i).copied().unwrap_or(0) - before.get(i).copied().unwrap_or(0)
                };
                let (stat, combined) = (path as usize, path.forwarded() as usize);
                let grew = delta(stat) + if combined != stat { delta(combined) } else { 0 };
                if grew != repeat as u64 {
                    bail!(
                        "{}: the baseline's counter {stat} (today's {:?}) grew by {grew} over \
                         {repeat} runs: not the intended path, or counters numbered differently",
                        p.key,
                        p.path.expect("set")
                    );
                }
                r
            }
            Prog::Farmlb => {
                let before = self.dp.stats()?;
                let r = self.dp.test_run_repeat(&p.packet, repeat)?;
                let after = self.dp.stats()?;
                let stat = p.path.expect("farmlb probes name their path");
                let grew = after[stat as usize] - before[stat as usize];
                if grew != repeat as u64 {
                    bail!(
                        "farmlb {}: {stat:?} grew by {grew} over {repeat} runs: the packet \
                         did not stay on the intended path",
                        p.key
                    );
                }
                r
            }
        };
        if action != p.action {
            bail!(
                "{} on {}: verdict {action}, expected {}",
                prog_name(p.prog),
                p.key,
                p.action
            );
        }
        Ok(dt.as_nanos() as f64)
    }
}

fn prog_name(p: Prog) -> &'static str {
    match p {
        Prog::Farmlb => "farmlb",
        Prog::Reference => "reference",
        Prog::FloorHit => "floor_hit",
        Prog::FloorInsert => "floor_insert",
        Prog::Old => "baseline",
    }
}

/// CPU the measurements run on.
const CPU: usize = 0;

/// Measure on a thread pinned to one CPU: a flow's conntrack entry then lives on the CPU
/// that handles its packets, as with a NIC's RSS (the conntrack LRU keeps per-CPU lists).
pub fn run(plan: &Plan, baseline_rev: Option<&str>) -> Result<Section> {
    // Built before the thread is pinned: the build uses every CPU.
    let rev = baseline::resolve(baseline_rev).map_err(|e| format!("{e:#}"));
    let old = rev.clone().and_then(|r| {
        eprintln!(
            "xtask bench: baseline {} ({})",
            r.name,
            &r.commit[..r.commit.len().min(12)]
        );
        baseline::object(&r).map_err(|e| format!("{e:#}"))
    });
    std::thread::scope(|s| {
        s.spawn(|| {
            super::sys::pin(0, CPU)?;
            measure(plan, rev, old)
        })
        .join()
        .map_err(|_| anyhow!("per-packet benchmark thread panicked"))?
    })
}

fn measure(
    plan: &Plan,
    rev: std::result::Result<Rev, String>,
    old: std::result::Result<Vec<u8>, String>,
) -> Result<Section> {
    let mut progs = Programs::load(old)?;
    let mut probes = probes(progs.old.is_ok());
    // Warm-up: creates the conntrack entries of the established-flow probes (their first run
    // is a miss), faults in code and maps. A baseline probe that fails is left out, its
    // reason reported.
    let mut old_unavailable: HashMap<&str, String> = HashMap::new();
    for p in &probes {
        if p.prog == Prog::Old {
            let r = progs
                .old
                .as_ref()
                .map_err(|e| anyhow!("{e}"))
                .and_then(|o| o.test_run_repeat(&p.packet, 1))
                .and_then(|_| progs.time(p, 1000));
            if let Err(e) = r {
                old_unavailable.insert(p.key, format!("{e:#}"));
            }
            continue;
        }
        if p.prog == Prog::Farmlb {
            progs.dp.test_run(&p.packet)?;
        }
        progs.time(p, 1000)?;
    }
    probes.retain(|p| !(p.prog == Prog::Old && old_unavailable.contains_key(p.key)));

    // samples[key][prog] = ns per packet, one per run.
    let mut samples: HashMap<(&str, Prog), Vec<f64>> = HashMap::new();
    for run in 0..plan.pkt_runs {
        // Alternate the order every run so neither packet always goes first.
        let mut groups: Vec<&[Probe]> = probes.chunk_by(|a, b| a.key == b.key).collect();
        if run % 2 == 1 {
            groups.reverse();
        }
        // A packet's programs take turns in `CHUNKS` short calls (order reversed every
        // turn), so a sample and its baselines share the machine's slow spells.
        for g in groups {
            let mut sum = vec![0.0; g.len()];
            for c in 0..CHUNKS {
                for i in 0..g.len() {
                    let i = if c % 2 == 0 { i } else { g.len() - 1 - i };
                    sum[i] += progs.time(&g[i], plan.repeat / CHUNKS)?;
                }
            }
            for (p, ns) in g.iter().zip(sum) {
                let ns = ns / CHUNKS as f64;
                samples.entry((p.key, p.prog)).or_default().push(ns);
            }
        }
    }
    let d = |k: &str, p: Prog| Dist::new(samples[&(k, p)].clone());
    let f = |k: &str| d(k, Prog::Farmlb);
    let r = |k: &str| d(k, Prog::Reference);

    let mut s = Section::new("per_packet", "Per-packet cost (BPF_PROG_TEST_RUN)");
    let unit = "ns/pkt";
    // (probe, metric key after `pkt.`, name, goal: at most this × the baseline)
    let rows = [
        (
            "v4_est",
            "ipv4_tcp_established",
            "IPv4 TCP established (conntrack hit)",
            Some(1.5),
        ),
        (
            "v6_est",
            "ipv6_tcp_established",
            "IPv6 TCP established (conntrack hit)",
            Some(1.5),
        ),
        (
            "v4_syn",
            "ipv4_tcp_syn",
            "IPv4 TCP SYN (conntrack miss + Maglev)",
            Some(1.5),
        ),
        (
            "v6_syn",
            "ipv6_tcp_syn",
            "IPv6 TCP SYN (conntrack miss + Maglev)",
            Some(1.5),
        ),
        ("v4_udp", "ipv4_udp", "IPv4 UDP (conntrack hit)", None),
        (
            "v4_pass",
            "ipv4_non_vip_pass",
            "IPv4 non-VIP (XDP_PASS)",
            Some(1.2),
        ),
    ];
    // A SYN costs a Maglev lookup more than farmlb's own established path; everything else
    // is compared with the reference program.
    let baseline = |probe: &str| match probe {
        "v4_syn" => ("farmlb IPv4 established", f("v4_est")),
        "v6_syn" => ("farmlb IPv6 established", f("v6_est")),
        _ => ("reference XDP", r(probe)),
    };
    s.metrics = rows
        .iter()
        .map(|&(probe, key, name, goal)| {
            let (label, base) = baseline(probe);
            let m = Metric::new(&format!("pkt.{key}"), name, unit)
                .value(f(probe))
                .against(label, base);
            match goal {
                Some(g) => m.goal(Goal::ratio_at_most(g)),
                None => m,
            }
        })
        .collect();
    // farmlb against the stateful floors: the least a balancer with a conntrack map does.
    for &(probe, key, name, _) in &rows {
        let Some(floor) = floor_of(probe) else {
            continue;
        };
        let label = match floor {
            Prog::FloorHit => "stateful floor, hit",
            _ => "floor, insert",
        };
        s.metrics.push(
            Metric::new(
                &format!("pkt.{key}.vs_floor"),
                &format!("{name} vs floor"),
                unit,
            )
            .value(f(probe))
            .against(label, d(probe, floor))
            .goal(Goal::ratio_at_most(1.25)),
        );
    }
    // Today's program against the previous version, on every probe.
    let rev_label = match &rev {
        Ok(r) => format!(
            "farmlb at {} ({})",
            r.name,
            &r.commit[..r.commit.len().min(12)]
        ),
        Err(_) => "farmlb baseline".to_string(),
    };
    for &(probe, key, name, _) in &rows {
        let mkey = format!("pkt.{key}.vs_baseline");
        let mname = format!("{name}, new vs previous version");
        let why = match (&progs.old, old_unavailable.get(probe)) {
            (Err(e), _) => Some(e.clone()),
            (Ok(_), Some(e)) => Some(e.clone()),
            _ => None,
        };
        s.metrics.push(match why {
            Some(e) => {
                let line = e.lines().next().unwrap_or("").to_string();
                Metric::unavailable(&mkey, &mname, &line)
            }
            None => Metric::new(&mkey, &mname, unit)
                .value(f(probe))
                .against(&rev_label, d(probe, Prog::Old))
                .goal(Goal::ratio_at_most(0.6)),
        });
    }

    s.metrics.extend(super::flood::metrics());

    let mut details = String::from(
        "| probe | farmlb ns/pkt (median [min–max]) | reference ns/pkt | floor ns/pkt | \
         previous version ns/pkt |\n",
    );
    details += "|---|---|---|---|---|\n";
    let cell = |x: Option<Dist>| match x {
        Some(x) => format!("{:.0} [{:.0}–{:.0}]", x.median(), x.min(), x.max()),
        None => "–".to_string(),
    };
    for (key, ..) in packets() {
        let floor = floor_of(key).map(|p| d(key, p));
        let old = samples.get(&(key, Prog::Old)).map(|v| Dist::new(v.clone()));
        details += &format!(
            "| {key} | {} | {} | {} | {} |\n",
            cell(Some(f(key))),
            cell(Some(r(key))),
            cell(floor),
            cell(old)
        );
    }
    s.details = details;
    s.method = format!(
        "All programs are loaded in this process; farmlb's maps are programmed by its own \
         `Director` from a fixed config (3 services, 3 backends each, 65537-slot Maglev \
         tables, fixed backend MACs). Each sample is the mean of {chunks} `BPF_PROG_TEST_RUN` \
         calls with repeat = {chunk_repeat} ({repeat} runs in all), each the kernel's mean \
         time per run (1 ns resolution); the programs timed on one packet take turns call by \
         call (order reversed every turn), so a sample and its baselines share the machine's \
         slow spells. \
         Without live frames the kernel does not reset the packet between repeats: farmlb's \
         direct-routing rewrite only changes the MACs and the reference only swaps them, so \
         the packet stays a valid input for every repeat. Every timed farmlb call checks \
         that its path counter grew by exactly `repeat` (established/UDP: conntrack hit, \
         primed by one run beforehand; SYN: a SYN re-hashes and rewrites its conntrack \
         entry every time, so each repeat is a miss + Maglev lookup; non-VIP: pass). \
         {runs} runs; each run times all {n} (program, packet) pairs, the packets in reverse \
         order every other run (A/B alternation); a ratio sample is farmlb/baseline within \
         one run. The \
         reference is timed on the same packet as farmlb. Everything runs on one thread \
         pinned to CPU {cpu}, so a flow's conntrack entry lives on the CPU that handles its \
         packets, as with a NIC's RSS (conntrack is an LRU map with per-CPU lists). Seen \
         while building this benchmark: the SYN path's cost can be bimodal (two levels some \
         70 ns apart, mostly fixed for one probe within one process but differing between \
         processes and between the IPv4 and IPv6 probes; cause not pinned down, the LRU \
         map's rewrite of the entry is the likely place); the min–max range shows which \
         mode(s) this run hit. The reference object is built as farmlb's (the same crate, \
         flags and bpf-linker). Floors (reference object): *stateful floor, hit* \
         (`floor_hit_xdp`) parses Ethernet, \
         IPv4 without options or IPv6 without extension headers and the ports into a \
         `FlowKey`, looks its conntrack key up in its own LRU hash (`CtKey -> CtEntry`, \
         farmlb's types and `BPF_F_NO_COMMON_LRU`, service id 0, {ct} entries like farmlb's conntrack here; the benchmark \
         pre-fills it with the two established flows), swaps the MACs and returns XDP_TX \
         (XDP_PASS on a miss, so the verdict check proves every repeat hit); *floor, insert* \
         (`floor_insert_xdp`) does the same parse, one `bpf_map_update_elem` of the flow \
         (the repeated SYN re-inserts an existing key: the LRU map takes a fresh node and \
         frees the old one, where farmlb rewrites its existing entry in place), MAC swap, \
         XDP_TX. Neither changes the packet's length, so repeat = N timing applies. \
         Previous version: {old}.",
        repeat = plan.repeat,
        chunks = CHUNKS,
        chunk_repeat = plan.repeat / CHUNKS,
        ct = CT_SIZE,
        old = match (&rev, &progs.old) {
            (Ok(r), Ok(_)) => format!(
                "`farmlb_xdp` of {} ({}), built from a temporary git worktree of that commit \
                 with the eBPF crate's own build as of that commit (nightly, \
                 `-Z build-std=core`, bpfel-unknown-none, as aya-build does, and that \
                 commit's build.rs link arguments; cached by commit in \
                 target/bench-baseline/), loaded with its own maps sized as today's and \
                 programmed by today's `Director` with the same config; each farmlb probe \
                 checks the path counter of today's numbering",
                r.name, r.commit
            ),
            (_, Err(e)) => format!("not available: {e}"),
            (Err(e), _) => format!("not available: {e}"),
        },
        runs = plan.pkt_runs,
        n = probes.len(),
        cpu = CPU,
    );
    s.raw = json!({
        "repeat": plan.repeat,
        "runs": plan.pkt_runs,
        "samples_ns": samples
            .iter()
            .map(|((k, p), v)| (format!("{}.{k}", prog_name(*p)), json!(v)))
            .collect::<serde_json::Map<_, _>>(),
    });
    Ok(s)
}

#[cfg(test)]
mod tests {
    use farmlb::config::Config;

    /// The generated config is the rig's: three services of three backends, default tables.
    #[test]
    fn config_has_the_rig_services() {
        let cfg = Config::from_toml_str(&super::config()).expect("valid config");
        let names: Vec<&str> = cfg.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["web4", "dns4", "web6"]);
        for s in &cfg.services {
            assert_eq!(s.backends.len(), 3, "{}", s.name);
            assert_eq!(s.table_size, 65537, "{}", s.name);
        }
        assert_eq!(cfg.services[2].backends[2].address.to_string(), "fd99::13");
    }
}
