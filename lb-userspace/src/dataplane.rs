//! Owns the loaded XDP program and its maps: the only place that talks to the kernel side.

use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{xdp::XdpLinkId, ProgramError, TestRun, TestRunOptions, Xdp, XdpMode},
    Ebpf, EbpfLoader,
};
use lb_common::{
    Addr, Backend, Counter, CtEntry, FlowKey, GlobalConfig, ServiceInfo, ServiceKey, Stat,
};

const PROGRAM: &str = "farmlb_xdp";

/// Sizes chosen by the control plane at load time.
#[derive(Clone, Copy, Debug)]
pub struct LoadOpts {
    /// Slots of the shared Maglev ring array (sum of all services' tables plus headroom).
    pub ring_slots: u32,
    pub conntrack_size: u32,
}

impl Default for LoadOpts {
    fn default() -> Self {
        Self {
            ring_slots: lb_common::DEFAULT_RING_SLOTS,
            conntrack_size: 65536,
        }
    }
}

/// XDP attach mode as configured (`auto` lets the kernel pick native when the driver has it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    Auto,
    Native,
    Generic,
}

impl From<crate::config::XdpModeCfg> for AttachMode {
    fn from(m: crate::config::XdpModeCfg) -> Self {
        use crate::config::XdpModeCfg;
        match m {
            XdpModeCfg::Auto => Self::Auto,
            XdpModeCfg::Native => Self::Native,
            XdpModeCfg::Generic => Self::Generic,
        }
    }
}

impl From<AttachMode> for XdpMode {
    fn from(m: AttachMode) -> Self {
        match m {
            AttachMode::Auto => XdpMode::Default,
            AttachMode::Native => XdpMode::Driver,
            AttachMode::Generic => XdpMode::Skb,
        }
    }
}

pub struct Dataplane {
    ebpf: Ebpf,
    link: Option<XdpLinkId>,
    ring_slots: u32,
}

impl Dataplane {
    /// Load and verify the program without attaching it (datapath tests run it this way).
    pub fn load(opts: LoadOpts) -> Result<Self> {
        bump_memlock_rlimit();
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("RING", opts.ring_slots)
            .map_max_entries("CONNTRACK", opts.conntrack_size)
            .load(crate::EBPF_OBJECT)
            .context("loading the XDP object")?;
        let prog: &mut Xdp = ebpf
            .program_mut(PROGRAM)
            .ok_or_else(|| anyhow!("program {PROGRAM} missing from object"))?
            .try_into()?;
        prog.load().context("verifier rejected the XDP program")?;
        Ok(Self {
            ebpf,
            link: None,
            ring_slots: opts.ring_slots,
        })
    }

    pub fn ring_slots(&self) -> u32 {
        self.ring_slots
    }

    fn prog(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(PROGRAM)
            .expect("checked at load")
            .try_into()
            .expect("checked at load")
    }

    /// Attach to `iface`. The link lives as long as `self`: dropping it detaches.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<()> {
        let id = self
            .prog()
            .attach(iface, mode.into())
            .map_err(|e| match e {
                ProgramError::UnknownInterface { name } => {
                    anyhow!("interface {name:?} does not exist")
                }
                e => anyhow!("attaching XDP to {iface} in {mode:?} mode: {e}"),
            })?;
        self.link = Some(id);
        Ok(())
    }

    pub fn detach(&mut self) -> Result<()> {
        if let Some(id) = self.link.take() {
            self.prog().detach(id)?;
        }
        Ok(())
    }

    fn map(&mut self, name: &str) -> &mut aya::maps::Map {
        self.ebpf
            .map_mut(name)
            .unwrap_or_else(|| panic!("map {name} missing from object"))
    }

    fn services(&mut self) -> Result<HashMap<&mut MapData, ServiceKey, ServiceInfo>> {
        Ok(HashMap::try_from(self.map("SERVICES"))?)
    }

    pub fn set_config(&mut self, cfg: &GlobalConfig) -> Result<()> {
        let mut a: Array<_, GlobalConfig> = Array::try_from(self.map("CONFIG"))?;
        a.set(0, cfg, 0)?;
        Ok(())
    }

    /// Farm mode: this node's member slot (`lb_common::FarmConfig`).
    pub fn set_farm(&mut self, cfg: &lb_common::FarmConfig) -> Result<()> {
        let mut a: Array<_, lb_common::FarmConfig> = Array::try_from(self.map("FARM"))?;
        a.set(0, cfg, 0)?;
        Ok(())
    }

    pub fn set_service(&mut self, key: &ServiceKey, info: &ServiceInfo) -> Result<()> {
        self.services()?.insert(key, info, 0)?;
        Ok(())
    }

    pub fn remove_service(&mut self, key: &ServiceKey) -> Result<()> {
        self.services()?.remove(key)?;
        Ok(())
    }

    pub fn set_vip_addr(&mut self, addr: &Addr) -> Result<()> {
        let mut m: HashMap<_, Addr, u32> = HashMap::try_from(self.map("VIP_ADDRS"))?;
        m.insert(addr, 1, 0)?;
        Ok(())
    }

    pub fn remove_vip_addr(&mut self, addr: &Addr) -> Result<()> {
        let mut m: HashMap<_, Addr, u32> = HashMap::try_from(self.map("VIP_ADDRS"))?;
        m.remove(addr)?;
        Ok(())
    }

    pub fn set_backend(&mut self, id: u32, b: &Backend) -> Result<()> {
        let mut a: Array<_, Backend> = Array::try_from(self.map("BACKENDS"))?;
        a.set(id, b, 0)?;
        Ok(())
    }

    /// Write `(slot, backend id)` pairs into the ring starting at `offset`: only changed
    /// slots are ever passed here, so a table update touches nothing else.
    pub fn write_ring(&mut self, offset: u32, slots: &[(u32, u32)]) -> Result<()> {
        let mut a: Array<_, u32> = Array::try_from(self.map("RING"))?;
        for &(slot, id) in slots {
            a.set(offset + slot, id, 0)
                .with_context(|| format!("writing ring slot {}", offset + slot))?;
        }
        Ok(())
    }

    /// Global reason counters summed over CPUs, indexed by `Stat as usize`.
    pub fn stats(&mut self) -> Result<[u64; Stat::COUNT as usize]> {
        let a: PerCpuArray<_, u64> = PerCpuArray::try_from(self.map("STATS"))?;
        let mut out = [0u64; Stat::COUNT as usize];
        for (i, o) in out.iter_mut().enumerate() {
            *o = a.get(&(i as u32), 0)?.iter().sum();
        }
        Ok(out)
    }

    fn counter(&mut self, map: &str, id: u32) -> Result<Counter> {
        let a: PerCpuArray<_, Counter> = PerCpuArray::try_from(self.map(map))?;
        Ok(a.get(&id, 0)?
            .iter()
            .fold(Counter::default(), |acc, c| Counter {
                packets: acc.packets + c.packets,
                bytes: acc.bytes + c.bytes,
            }))
    }

    pub fn service_counter(&mut self, id: u32) -> Result<Counter> {
        self.counter("SVC_STATS", id)
    }

    pub fn backend_counter(&mut self, id: u32) -> Result<Counter> {
        self.counter("BACKEND_STATS", id)
    }

    /// Zero a backend's counters when its id is handed to a new backend.
    pub fn reset_backend_counter(&mut self, id: u32) -> Result<()> {
        let mut a: PerCpuArray<_, Counter> = PerCpuArray::try_from(self.map("BACKEND_STATS"))?;
        let n = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        a.set(
            id,
            aya::maps::PerCpuValues::try_from(vec![Counter::default(); n])?,
            0,
        )?;
        Ok(())
    }

    /// Zero a service's counters when its id is handed to a new service.
    pub fn reset_service_counter(&mut self, id: u32) -> Result<()> {
        let mut a: PerCpuArray<_, Counter> = PerCpuArray::try_from(self.map("SVC_STATS"))?;
        let n = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        a.set(
            id,
            aya::maps::PerCpuValues::try_from(vec![Counter::default(); n])?,
            0,
        )?;
        Ok(())
    }

    pub fn conntrack_get(&mut self, key: &FlowKey) -> Result<Option<CtEntry>> {
        let m: HashMap<_, FlowKey, CtEntry> = HashMap::try_from(self.map("CONNTRACK"))?;
        match m.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Run the program once on `packet` with BPF_PROG_TEST_RUN; returns the XDP action and
    /// the packet as the program left it.
    pub fn test_run(&mut self, packet: &[u8]) -> Result<(u32, Vec<u8>)> {
        let mut out = vec![0u8; packet.len() + 256];
        let res = self.prog().test_run(TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ..Default::default()
        })?;
        out.truncate(res.data_size_out as usize);
        Ok((res.return_value, out))
    }

    /// Run the program `repeat` times on `packet` in one BPF_PROG_TEST_RUN call; returns the
    /// last XDP action and the kernel's mean time per run (see [`test_run_repeat`]).
    pub fn test_run_repeat(&mut self, packet: &[u8], repeat: u32) -> Result<(u32, Duration)> {
        test_run_repeat(self.prog(), packet, repeat)
    }
}

/// BPF_PROG_TEST_RUN of a loaded XDP program, `repeat` times in one call: returns the last
/// XDP action and the kernel's mean time per run. Without live frames the packet is not reset
/// between repeats, so each run sees the previous run's output. The benchmark times farmlb and
/// its reference program through this one function.
pub fn test_run_repeat(prog: &Xdp, packet: &[u8], repeat: u32) -> Result<(u32, Duration)> {
    let res = prog.test_run(TestRunOptions {
        data_in: Some(packet),
        repeat,
        ..Default::default()
    })?;
    Ok((res.return_value, res.duration))
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lift it so large rings load there too.
fn bump_memlock_rlimit() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer; failure only matters on old kernels.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
}

/// Attach an XDP_PASS program to `iface` (in the caller's network namespace) and pin the link
/// at `pin` so it outlives this process; removing the pin file or the interface detaches it.
/// Test rigs use it on veth peers that must receive frames sent with XDP_TX.
pub fn attach_pass_pinned(iface: &str, pin: &std::path::Path) -> Result<()> {
    use aya::programs::links::FdLink;
    let mut ebpf = Ebpf::load(crate::PASS_OBJECT).context("loading the pass object")?;
    let prog: &mut Xdp = ebpf
        .program_mut("farmlb_pass")
        .ok_or_else(|| anyhow!("program farmlb_pass missing"))?
        .try_into()?;
    prog.load()?;
    let id = prog
        .attach(iface, XdpMode::Driver)
        .with_context(|| format!("attaching XDP pass program to {iface}"))?;
    let link: FdLink = prog.take_link(id)?.try_into()?;
    if let Some(dir) = pin.parent() {
        ensure_bpffs(dir)?;
    }
    let _ = std::fs::remove_file(pin);
    link.pin(pin)
        .with_context(|| format!("pinning XDP link at {}", pin.display()))?;
    Ok(())
}

/// Mount bpffs at /sys/fs/bpf if nothing is mounted there, and create `dir`.
fn ensure_bpffs(dir: &std::path::Path) -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if !mounts.lines().any(|l| l.split(' ').nth(2) == Some("bpf")) {
        let st = std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
            .status()
            .context("mounting bpffs")?;
        anyhow::ensure!(st.success(), "mount -t bpf bpf /sys/fs/bpf failed");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(())
}
