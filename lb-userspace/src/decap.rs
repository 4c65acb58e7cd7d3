//! `farmlb decap`: on a backend of a tunnel service, attach the decapsulator (see
//! `lb-ebpf/src/bin/decap.rs`) to the interface the tunnelled packets arrive on, keep its
//! table of this host's addresses current, and detach on SIGINT/SIGTERM, printing what it
//! did. It replaces the `ipip` / `fou` modules many hosts do not have.

use std::collections::HashSet;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{xdp::XdpLinkId, Xdp},
    Ebpf,
};
use lb_common::{maps as names, Addr, DecapConfig, DecapStat};

use crate::dataplane::{attach_xdp, take, AttachMode};
use crate::director::addr_of;

/// How often the address table is brought up to date with the host's.
const REFRESH: Duration = Duration::from_secs(1);

/// The loaded decapsulator and its maps.
pub struct Decap {
    ebpf: Ebpf,
    addrs: HashMap<MapData, Addr, u32>,
    stats: PerCpuArray<MapData, u64>,
    link: Option<XdpLinkId>,
}

impl Decap {
    /// Load and verify the program, GUE on `gue_port`; not attached.
    pub fn load(gue_port: u16) -> Result<Decap> {
        let mut ebpf = Ebpf::load(crate::DECAP_OBJECT).context("loading the decap object")?;
        let prog: &mut Xdp = ebpf
            .program_mut(names::DECAP_PROGRAM)
            .ok_or_else(|| anyhow!("program {} missing", names::DECAP_PROGRAM))?
            .try_into()?;
        prog.load().context("verifier rejected the decap program")?;
        let mut config: Array<MapData, DecapConfig> = take(&mut ebpf, names::DECAP_CONFIG)?;
        config.set(0, DecapConfig { gue_port, _pad: 0 }, 0)?;
        Ok(Decap {
            addrs: take(&mut ebpf, names::DECAP_ADDRS)?,
            stats: take(&mut ebpf, names::DECAP_STATS)?,
            ebpf,
            link: None,
        })
    }

    fn prog(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(names::DECAP_PROGRAM)
            .expect("checked at load")
            .try_into()
            .expect("checked at load")
    }

    /// Make the address table hold exactly `want` (this host's addresses).
    pub fn set_addrs(&mut self, want: &HashSet<Addr>) -> Result<()> {
        let have: HashSet<Addr> = self.addrs.keys().collect::<Result<_, _>>()?;
        for a in want.difference(&have) {
            self.addrs.insert(a, 1, 0)?;
        }
        for a in have.difference(want) {
            self.addrs.remove(a)?;
        }
        Ok(())
    }

    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<()> {
        let id = attach_xdp(self.prog(), iface, mode, "the decapsulator")?;
        self.link = Some(id);
        Ok(())
    }

    pub fn detach(&mut self) -> Result<()> {
        if let Some(id) = self.link.take() {
            self.prog().detach(id)?;
        }
        Ok(())
    }

    /// Counters summed over CPUs, by `DecapStat as usize`.
    pub fn stats(&self) -> Result<[u64; DecapStat::COUNT as usize]> {
        let mut out = [0u64; DecapStat::COUNT as usize];
        for (i, o) in out.iter_mut().enumerate() {
            *o = self.stats.get(&(i as u32), 0)?.iter().sum();
        }
        Ok(out)
    }

    /// `repeat` runs on `packet` in one BPF_PROG_TEST_RUN call: the last verdict and the
    /// kernel's mean time per run.
    pub fn test_run_repeat(&mut self, packet: &[u8], repeat: u32) -> Result<(u32, Duration)> {
        crate::dataplane::test_run_repeat(self.prog(), packet, repeat)
    }

    /// Run the program once on `packet` (BPF_PROG_TEST_RUN): the XDP action and the frame as
    /// the program left it.
    pub fn test_run(&mut self, packet: &[u8]) -> Result<(u32, Vec<u8>)> {
        crate::dataplane::test_run(self.prog(), packet)
    }
}

/// Every address of this host (all interfaces; VIPs on `lo` included, harmlessly), but
/// link-local ones, which no director tunnels to.
pub fn host_addrs() -> Result<HashSet<Addr>> {
    let out = std::process::Command::new("ip")
        .args(["-j", "addr", "show"])
        .output()
        .context("running `ip addr` (is iproute2 installed?)")?;
    let links: Vec<serde_json::Value> =
        serde_json::from_slice(&out.stdout).context("parsing `ip -j addr` output")?;
    let mut set = HashSet::new();
    for l in links {
        for a in l["addr_info"].as_array().into_iter().flatten() {
            if a["scope"] == "link" {
                continue;
            }
            if let Some(ip) = a["local"].as_str().and_then(|s| s.parse::<IpAddr>().ok()) {
                set.insert(addr_of(ip));
            }
        }
    }
    Ok(set)
}

/// One line of counters: `name=value ...`.
pub fn format_stats(s: &[u64; DecapStat::COUNT as usize]) -> String {
    DecapStat::ALL
        .iter()
        .map(|d| format!("{}={}", d.name(), s[*d as usize]))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `farmlb decap`: attach to `iface` and serve until SIGINT/SIGTERM, then detach.
pub fn run(iface: &str, gue_port: u16, mode: AttachMode) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    crate::dataplane::bump_memlock_rlimit();
    let mut d = Decap::load(gue_port)?;
    d.set_addrs(&host_addrs()?)?;
    d.attach(iface, mode)?;
    tracing::info!(
        interface = iface,
        gue_port,
        "decapsulating IPIP, IP6IP6 and GUE"
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let res: Result<()> = rt.block_on(async {
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut tick = tokio::time::interval(REFRESH);
        loop {
            tokio::select! {
                _ = sigint.recv() => return Ok(()),
                _ = sigterm.recv() => return Ok(()),
                _ = tick.tick() => {
                    // A failed refresh keeps the previous table: decapsulation goes on.
                    match host_addrs() {
                        Ok(a) => if let Err(e) = d.set_addrs(&a) {
                            tracing::warn!("updating the address table: {e:#}");
                        },
                        Err(e) => tracing::warn!("reading this host's addresses: {e:#}"),
                    }
                }
            }
        }
    });
    let stats = d.stats().map(|s| format_stats(&s));
    d.detach()?;
    println!("decap {iface}: {}", stats?);
    res
}
