//! Owns the loaded XDP program and its maps: the only place that talks to the kernel side.
//! Every map is taken from the object once, as a typed handle, when the program loads. With
//! a pin directory the data plane outlives the process (see [`pin`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
        ProgramError, TestRun, TestRunOptions, Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use lb_common::{
    maps as names, svc_drop_index, vip_filter_bit, Addr, Backend, Counter, CtEntry, CtKey,
    FarmConfig, FlowKey, GlobalConfig, ServiceEntry, ServiceInfo, ServiceKey, Stat, TunnelInfo,
    SERVICE_DROP_REASONS, SERVICE_SLOTS, VIP_FILTER_WORDS,
};

pub mod conntrack;
mod maps;
pub mod model;
pub mod pin;
pub mod services;

pub use maps::{CounterKind, DryRun, Maps, Tee};

/// Sizes chosen by the control plane at load time.
#[derive(Clone, Debug)]
pub struct LoadOpts {
    /// Slots of the shared Maglev ring array (sum of all services' tables plus headroom).
    pub ring_slots: u32,
    pub conntrack_size: u32,
    /// Pin program, link and maps here (adopting a data plane already pinned there);
    /// `None`: the data plane lives and dies with this process (datapath tests).
    pub pin_dir: Option<PathBuf>,
    /// The MAC of the interface the program will run on: a constant of the loaded program
    /// (`maps::OWN_MAC`), so the configuration written later must name the same.
    pub own_mac: [u8; 6],
}

impl Default for LoadOpts {
    fn default() -> Self {
        Self {
            ring_slots: lb_common::DEFAULT_RING_SLOTS,
            conntrack_size: 65536,
            pin_dir: None,
            own_mac: [0; 6],
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

/// Typed handles on every map, taken from the object once at load.
struct KernelMaps {
    service_index: Array<MapData, u32>,
    service_entries: Array<MapData, ServiceEntry>,
    vip_addrs: HashMap<MapData, Addr, u32>,
    vip_filter: Array<MapData, u64>,
    ring: Array<MapData, u32>,
    backends: Array<MapData, Backend>,
    conntrack: HashMap<MapData, CtKey, CtEntry>,
    config: Array<MapData, GlobalConfig>,
    farm: Array<MapData, FarmConfig>,
    stats: PerCpuArray<MapData, u64>,
    svc_stats: PerCpuArray<MapData, Counter>,
    svc_drops: PerCpuArray<MapData, u64>,
    backend_stats: PerCpuArray<MapData, Counter>,
    tunnels: Array<MapData, TunnelInfo>,
}

/// Take map `name` out of a loaded object as a typed handle (it is taken once).
pub fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &str,
) -> Result<T> {
    let m = ebpf
        .take_map(name)
        .ok_or_else(|| anyhow!("map {name} missing from the object"))?;
    T::try_from(m).map_err(|e| anyhow!("map {name} has another type or layout: {e}"))
}

impl KernelMaps {
    fn take(ebpf: &mut Ebpf) -> Result<Self> {
        Ok(Self {
            service_index: take(ebpf, names::SERVICE_INDEX)?,
            service_entries: take(ebpf, names::SERVICE_ENTRIES)?,
            vip_addrs: take(ebpf, names::VIP_ADDRS)?,
            vip_filter: take(ebpf, names::VIP_FILTER)?,
            ring: take(ebpf, names::RING)?,
            backends: take(ebpf, names::BACKENDS)?,
            conntrack: take(ebpf, names::CONNTRACK)?,
            config: take(ebpf, names::CONFIG)?,
            farm: take(ebpf, names::FARM)?,
            stats: take(ebpf, names::STATS)?,
            svc_stats: take(ebpf, names::SVC_STATS)?,
            svc_drops: take(ebpf, names::SVC_DROPS)?,
            backend_stats: take(ebpf, names::BACKEND_STATS)?,
            tunnels: take(ebpf, names::TUNNELS)?,
        })
    }
}

pub struct Dataplane {
    ebpf: Ebpf,
    maps: KernelMaps,
    /// What `SERVICE_INDEX`/`SERVICE_ENTRIES` hold (read back from adopted maps).
    services: services::ServiceTable,
    link: Option<XdpLinkId>,
    ring_slots: u32,
    pin_dir: Option<PathBuf>,
    /// The maps were already pinned: they hold a running data plane's state.
    adopted: bool,
    /// Possible CPUs: the length of every per-CPU value.
    cpus: usize,
    /// The program's `OWN_MAC`.
    own_mac: [u8; 6],
}

impl Dataplane {
    /// Load and verify the program without attaching it (datapath tests run it this way).
    /// With a pin directory, maps already pinned there are adopted (after checking that
    /// their layout is this build's) and the others are created and pinned.
    pub fn load(opts: LoadOpts) -> Result<Self> {
        bump_memlock_rlimit();
        let mut ring_slots = opts.ring_slots;
        let mut adopted = false;
        let mut loader = EbpfLoader::new();
        if let Some(dir) = &opts.pin_dir {
            if pin::ensure_bpffs(dir)? && pin::private_mount_namespace() {
                tracing::warn!(
                    "mounted bpffs at /sys/fs/bpf in a private mount namespace (as `ip netns \
                     exec` makes): the pins at {} vanish when this process exits; set pin_path \
                     to a bpffs the host keeps mounted",
                    dir.display()
                );
            }
            if let Some(found) = pin::inspect(dir, opts.ring_slots, opts.conntrack_size)? {
                ring_slots = found.ring_slots;
                adopted = true;
            }
            for name in pin::MAPS {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        let mut own = [0u8; 8];
        own[..6].copy_from_slice(&opts.own_mac);
        let mut ebpf = loader
            .override_global(names::OWN_MAC, &own, true)
            .map_max_entries(names::RING, ring_slots)
            .map_max_entries(names::CONNTRACK, opts.conntrack_size)
            .load(crate::EBPF_OBJECT)
            .context("loading the XDP object")?;
        let prog: &mut Xdp = ebpf
            .program_mut(names::PROGRAM)
            .ok_or_else(|| anyhow!("program {} missing from object", names::PROGRAM))?
            .try_into()?;
        prog.load().context("verifier rejected the XDP program")?;
        if let Some(dir) = &opts.pin_dir {
            let path = dir.join(pin::PROGRAM);
            let _ = std::fs::remove_file(&path);
            prog.pin(&path)
                .with_context(|| format!("pinning the program at {}", path.display()))?;
        }
        let maps = KernelMaps::take(&mut ebpf)?;
        let services = if adopted {
            let index = (0..SERVICE_SLOTS)
                .map(|i| Ok(maps.service_index.get(&i, 0)?))
                .collect::<Result<Vec<u32>>>()?;
            services::ServiceTable::adopt(index, |i| Ok(maps.service_entries.get(&i, 0)?))
                .context("reading the pinned service table")?
        } else {
            services::ServiceTable::default()
        };
        Ok(Self {
            ebpf,
            maps,
            services,
            link: None,
            ring_slots,
            pin_dir: opts.pin_dir,
            adopted,
            cpus: aya::util::nr_cpus().map_err(|(what, e)| anyhow!("{what}: {e}"))?,
            own_mac: opts.own_mac,
        })
    }

    /// Whether the maps came from a data plane that was already pinned (and running).
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    pub fn pin_dir(&self) -> Option<&Path> {
        self.pin_dir.as_deref()
    }

    pub fn ring_slots(&self) -> u32 {
        self.ring_slots
    }

    fn prog(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(names::PROGRAM)
            .expect("checked at load")
            .try_into()
            .expect("checked at load")
    }

    /// Attach to `iface`. Without a pin directory the link lives as long as `self`. With one,
    /// the link is pinned; a link already pinned there (a running data plane) is switched to
    /// this program atomically (`bpf_link_update`): no packet meets a gap.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<()> {
        let link_pin = self.pin_dir.as_ref().map(|d| d.join(pin::LINK));
        if let Some(path) = link_pin.as_ref().filter(|p| p.exists()) {
            let fd: FdLink = PinnedLink::from_pin(path)
                .with_context(|| format!("opening the pinned link {}", path.display()))?
                .into();
            let link = XdpLink::try_from(fd)
                .with_context(|| format!("{} is not an XDP link", path.display()))?;
            let id = self
                .prog()
                .attach_to_link(link)
                .context("replacing the running program (bpf_link_update)")?;
            self.link = Some(id);
            return Ok(());
        }
        let id = attach_xdp(self.prog(), iface, mode, "XDP")?;
        if let Some(path) = link_pin {
            // A pinned link holds the attachment when this process is gone.
            let link = self.prog().take_link(id)?;
            let fd = FdLink::try_from(link).map_err(|_| {
                anyhow!("this kernel attached XDP without a bpf_link: it cannot be pinned")
            })?;
            fd.pin(&path)
                .with_context(|| format!("pinning the XDP link at {}", path.display()))?;
            return Ok(());
        }
        self.link = Some(id);
        Ok(())
    }

    /// Stop forwarding: detach the program and remove every pin.
    pub fn detach(&mut self) -> Result<()> {
        if let Some(id) = self.link.take() {
            self.prog().detach(id)?;
        }
        if let Some(dir) = &self.pin_dir {
            pin::remove(dir)?;
        }
        Ok(())
    }

    /// Everything a restarted director needs to keep its ids, rings and backends: the
    /// services, every backend slot, and each service's ring.
    pub fn snapshot(&self) -> Result<Snapshot> {
        let mut services = Vec::new();
        for (key, info) in self.services.iter() {
            let table = (0..info.ring_size)
                .map(|i| self.maps.ring.get(&(info.ring_offset + i), 0))
                .collect::<Result<Vec<u32>, _>>()?;
            services.push((key, info, table));
        }
        let backends = (0..lb_common::BACKEND_SLOTS)
            .map(|id| Ok((id, self.maps.backends.get(&id, 0)?)))
            .collect::<Result<Vec<(u32, Backend)>>>()?;
        Ok(Snapshot { services, backends })
    }

    /// The reference model holding exactly the map entries the program reads for a packet
    /// of `flow`: every service, the flow's VIP address, the ring slot the flow hashes to in
    /// its service, its conntrack entry and the backends those point at. `Model::process` on
    /// it decides as the program would now (the simulator); nothing is written.
    pub fn model_for_flow(&self, flow: &FlowKey) -> Result<model::Model> {
        let mut m = model::Model {
            config: self.maps.config.get(&0, 0)?,
            farm: self.maps.farm.get(&0, 0)?,
            ..Default::default()
        };
        m.services.extend(self.services.iter());
        if self.maps.vip_addrs.get(&flow.dst, 0).is_ok() {
            m.vip_addrs.insert(flow.dst);
        }
        let mut ids = Vec::new();
        let svc = m.service_for(&flow.dst, flow.dport, flow.proto);
        if let Some(slot) = svc.and_then(|(_, s)| s.ring_index(flow)) {
            let id = self.maps.ring.get(&slot, 0)?;
            m.ring.insert(slot, id);
            ids.push(id);
        }
        if let Some((_, s)) = svc {
            let key = *flow.of_service(s.id).ct_key();
            if let Some(e) = self.conntrack_get(&key)? {
                m.conntrack.insert(key, e);
                ids.push(e.backend);
            }
        }
        if let Some((_, s)) = svc {
            if let Ok(t) = self.maps.tunnels.get(&s.id, 0) {
                m.tunnels.insert(s.id, t);
            }
        }
        for id in ids {
            if let Ok(b) = self.maps.backends.get(&id, 0) {
                m.backends.insert(id, b);
            }
        }
        Ok(m)
    }

    /// Global reason counters summed over CPUs, indexed by `Stat as usize`, the combined
    /// slots folded into their parts (`lb_common::fold_stats`).
    pub fn stats(&self) -> Result<[u64; Stat::COUNT as usize]> {
        Ok(lb_common::fold_stats(&self.raw_stats()?))
    }

    /// `STATS` slot by slot, summed over CPUs, combined slots as the program bumped them.
    pub fn raw_stats(&self) -> Result<[u64; Stat::COUNT as usize]> {
        let mut out = [0u64; Stat::COUNT as usize];
        for (i, o) in out.iter_mut().enumerate() {
            *o = self.maps.stats.get(&(i as u32), 0)?.iter().sum();
        }
        Ok(out)
    }

    /// `VIP_FILTER`'s words (the bits the program passes non-VIP packets by).
    pub fn vip_filter(&self) -> Result<Vec<u64>> {
        (0..VIP_FILTER_WORDS)
            .map(|i| Ok(self.maps.vip_filter.get(&i, 0)?))
            .collect()
    }

    /// Packets/bytes of one `SVC_STATS` or `BACKEND_STATS` slot, summed over CPUs. A
    /// service's traffic is [`Dataplane::service_counter`].
    pub fn counter(&self, kind: CounterKind, id: u32) -> Result<Counter> {
        let a = match kind {
            CounterKind::Service => &self.maps.svc_stats,
            CounterKind::Backend => &self.maps.backend_stats,
        };
        Ok(a.get(&id, 0)?
            .iter()
            .fold(Counter::default(), |acc, c| acc + *c))
    }

    /// Packets/bytes of service `id`, given its current backends' counters (read once by
    /// the caller, which shows them too): the program counts a forwarded frame only for its
    /// backend, so the service's own slot holds what its removed backends carried (and a
    /// farm service's deliveries), and the rest is its backends' sum.
    pub fn service_counter(
        &self,
        id: u32,
        backends: impl IntoIterator<Item = Counter>,
    ) -> Result<Counter> {
        let own = self.counter(CounterKind::Service, id)?;
        Ok(backends.into_iter().fold(own, |acc, c| acc + c))
    }

    /// The conntrack sync ring buffer (`CT_SYNC`), for its one reader; taken once. It is
    /// not pinned: the program it belongs to is replaced at every start, and so is the ring.
    pub fn take_sync_ring(&mut self) -> Result<aya::maps::RingBuf<MapData>> {
        take(&mut self.ebpf, names::CT_SYNC)
    }

    /// Drops of service `id`, summed over CPUs, by `SERVICE_DROP_REASONS` index.
    pub fn service_drops(&self, id: u32) -> Result<[u64; SERVICE_DROP_REASONS.len()]> {
        let mut out = [0u64; SERVICE_DROP_REASONS.len()];
        for (r, o) in out.iter_mut().enumerate() {
            *o = self
                .maps
                .svc_drops
                .get(&svc_drop_index(id, r as u32), 0)?
                .iter()
                .sum();
        }
        Ok(out)
    }

    pub fn conntrack_get(&self, key: &CtKey) -> Result<Option<CtEntry>> {
        match self.maps.conntrack.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Write a conntrack entry, as a peer's synced one is written (fixtures seed stale
    /// entries with it).
    pub fn conntrack_insert(&mut self, key: &CtKey, entry: &CtEntry) -> Result<()> {
        Ok(self.maps.conntrack.insert(key, entry, 0)?)
    }

    /// The conntrack entry of `flow`, keyed by the service it is addressed to now (none
    /// without a service).
    pub fn conntrack_of(&self, flow: &FlowKey) -> Result<Option<CtEntry>> {
        let svc = ServiceKey::candidates(flow.dst, flow.dport, flow.proto)
            .into_iter()
            .find_map(|key| self.services.iter().find(|(k, _)| *k == key))
            .map(|(_, s)| s);
        match svc {
            Some(s) => self.conntrack_get(flow.of_service(s.id).ct_key()),
            None => Ok(None),
        }
    }

    /// Run the program once on `packet` with BPF_PROG_TEST_RUN; returns the XDP action and
    /// the packet as the program left it.
    pub fn test_run(&mut self, packet: &[u8]) -> Result<(u32, Vec<u8>)> {
        test_run(self.prog(), packet)
    }

    /// Run the program `repeat` times on `packet` in one BPF_PROG_TEST_RUN call; returns the
    /// last XDP action and the kernel's mean time per run (see [`test_run_repeat`]).
    pub fn test_run_repeat(&mut self, packet: &[u8], repeat: u32) -> Result<(u32, Duration)> {
        test_run_repeat(self.prog(), packet, repeat)
    }
}

impl Dataplane {
    fn write_services(&mut self, writes: &[services::Write]) -> Result<()> {
        services::apply(
            writes,
            &mut self.maps.service_index,
            &mut self.maps.service_entries,
        )
    }
}

impl Maps for Dataplane {
    fn set_config(&mut self, cfg: &GlobalConfig) -> Result<()> {
        if cfg.own_mac != self.own_mac {
            bail!(
                "own_mac {} differs from the loaded program's {} (it is set at load)",
                crate::neigh::fmt_mac(&cfg.own_mac),
                crate::neigh::fmt_mac(&self.own_mac)
            );
        }
        Ok(self.maps.config.set(0, cfg, 0)?)
    }

    fn set_farm(&mut self, cfg: &FarmConfig) -> Result<()> {
        Ok(self.maps.farm.set(0, cfg, 0)?)
    }

    fn set_service(&mut self, key: &ServiceKey, info: &ServiceInfo) -> Result<()> {
        // The mirror is updated first; a failed write leaves it ahead of the map, which
        // only a failing bpf syscall on an array can cause.
        let writes = self.services.set(key, info)?;
        self.write_services(&writes)
    }

    fn remove_service(&mut self, key: &ServiceKey) -> Result<()> {
        let writes = self.services.remove(key);
        self.write_services(&writes)
    }

    fn set_vip_addr(&mut self, addr: &Addr) -> Result<()> {
        // The filter bit first: while it is clear the program passes the address's packets
        // without looking further (the director adds the services after their address).
        let bit = vip_filter_bit(addr);
        let word = self.maps.vip_filter.get(&(bit / 64), 0)?;
        self.maps
            .vip_filter
            .set(bit / 64, word | 1 << (bit % 64), 0)?;
        Ok(self.maps.vip_addrs.insert(addr, 1, 0)?)
    }

    fn remove_vip_addr(&mut self, addr: &Addr) -> Result<()> {
        self.maps.vip_addrs.remove(addr)?;
        // Rebuilt from the addresses left: a bit stays set while another VIP shares it.
        let mut words = [0u64; VIP_FILTER_WORDS as usize];
        for a in self.maps.vip_addrs.keys() {
            let bit = vip_filter_bit(&a?);
            words[(bit / 64) as usize] |= 1 << (bit % 64);
        }
        for (i, w) in words.into_iter().enumerate() {
            if self.maps.vip_filter.get(&(i as u32), 0)? != w {
                self.maps.vip_filter.set(i as u32, w, 0)?;
            }
        }
        Ok(())
    }

    fn set_backend(&mut self, id: u32, b: &Backend) -> Result<()> {
        Ok(self.maps.backends.set(id, b, 0)?)
    }

    fn write_ring(&mut self, offset: u32, slots: &[(u32, u32)]) -> Result<()> {
        for &(slot, id) in slots {
            self.maps
                .ring
                .set(offset + slot, id, 0)
                .with_context(|| format!("writing ring slot {}", offset + slot))?;
        }
        Ok(())
    }

    fn set_tunnel(&mut self, service: u32, t: &TunnelInfo) -> Result<()> {
        Ok(self.maps.tunnels.set(service, t, 0)?)
    }

    fn reset_counter(&mut self, kind: CounterKind, id: u32) -> Result<()> {
        let a = match kind {
            CounterKind::Service => &mut self.maps.svc_stats,
            CounterKind::Backend => &mut self.maps.backend_stats,
        };
        let zero = aya::maps::PerCpuValues::try_from(vec![Counter::default(); self.cpus])?;
        a.set(id, zero, 0)?;
        if kind == CounterKind::Service {
            for r in 0..SERVICE_DROP_REASONS.len() as u32 {
                let zero = aya::maps::PerCpuValues::try_from(vec![0u64; self.cpus])?;
                self.maps.svc_drops.set(svc_drop_index(id, r), zero, 0)?;
            }
        }
        Ok(())
    }

    fn retire_backend_counter(&mut self, service: u32, backend: u32) -> Result<()> {
        let svc = self.maps.svc_stats.get(&service, 0)?;
        let gone = self.maps.backend_stats.get(&backend, 0)?;
        let sum: Vec<Counter> = svc.iter().zip(gone.iter()).map(|(a, b)| *a + *b).collect();
        self.maps
            .svc_stats
            .set(service, aya::maps::PerCpuValues::try_from(sum)?, 0)?;
        self.reset_counter(CounterKind::Backend, backend)
    }
}

/// Attach `prog` to `iface` (a link that lives as long as the program's owner), with a
/// one-line error naming a missing interface; `what` names the program in other errors.
pub fn attach_xdp(prog: &mut Xdp, iface: &str, mode: AttachMode, what: &str) -> Result<XdpLinkId> {
    prog.attach(iface, mode.into()).map_err(|e| match e {
        ProgramError::UnknownInterface { name } => anyhow!("interface {name:?} does not exist"),
        e => anyhow!("attaching {what} to {iface} in {mode:?} mode: {e}"),
    })
}

/// `CLOCK_MONOTONIC_COARSE` in nanoseconds: the program's clock (`bpf_ktime_get_coarse_ns`),
/// which UDP idle times, flood windows and farm leases are judged by.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The programmed state of a pinned data plane, read back at adoption.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Every service with its ring table.
    pub services: Vec<(ServiceKey, ServiceInfo, Vec<u32>)>,
    /// Every `BACKENDS` slot by id.
    pub backends: Vec<(u32, Backend)>,
}

/// BPF_PROG_TEST_RUN of a loaded XDP program once on `packet`: the XDP action and the frame
/// as the program left it (room for 256 bytes of added headers).
pub fn test_run(prog: &Xdp, packet: &[u8]) -> Result<(u32, Vec<u8>)> {
    let mut out = vec![0u8; packet.len() + 256];
    let res = prog.test_run(TestRunOptions {
        data_in: Some(packet),
        data_out: Some(&mut out),
        ..Default::default()
    })?;
    out.truncate(res.data_size_out as usize);
    Ok((res.return_value, out))
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
pub fn bump_memlock_rlimit() {
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
        .program_mut(names::PASS_PROGRAM)
        .ok_or_else(|| anyhow!("program {} missing", names::PASS_PROGRAM))?
        .try_into()?;
    prog.load()?;
    let id = prog
        .attach(iface, XdpMode::Driver)
        .with_context(|| format!("attaching XDP pass program to {iface}"))?;
    let link: FdLink = prog.take_link(id)?.try_into()?;
    if let Some(dir) = pin.parent() {
        self::pin::ensure_bpffs(dir)?;
    }
    let _ = std::fs::remove_file(pin);
    link.pin(pin)
        .with_context(|| format!("pinning XDP link at {}", pin.display()))?;
    Ok(())
}
