//! Desired state → map writes: turns the configured services and backends (and, in farm
//! mode, the alive members) into map contents (service entries, backend slots, Maglev rings)
//! and applies later changes as differences, so an update only rewrites the ring slots that
//! move and never disturbs established flows. It is the only writer of the rings: a farm
//! service's ring holds member slots, built here from the membership the farm role reports.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use anyhow::{bail, Result};
use lb_common::{
    member_slot, v4_mapped, Addr, Backend, FarmConfig, GlobalConfig, ServiceInfo, ServiceKey,
    BACKEND_F_VALID, FWD_FARM, MAX_BACKENDS, MAX_SERVICES, MEMBER_OWNER, NO_BACKEND,
};

use crate::config::{AdminState, BackendCfg, Config, ServiceCfg};
use crate::dataplane::{CounterKind, Maps};
use crate::maglev::{self, MaglevEntry};
use crate::neigh::MacResolver;

mod ids;
use ids::Ids;

pub use crate::health::Health;

pub fn addr_of(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The address a map holds, as an `IpAddr` (v4-mapped ones as IPv4).
pub fn ip_of(a: Addr) -> IpAddr {
    std::net::Ipv6Addr::from(a).to_canonical()
}

pub fn service_key(s: &ServiceCfg) -> ServiceKey {
    ServiceKey {
        addr: addr_of(s.vip),
        port: s.port,
        proto: s.protocol.number(),
        _pad: 0,
    }
}

/// One backend as the director sees it: its configured entry plus the runtime layers on top.
///
/// The weight used for new flows is [`BackendState::effective_weight`]: 0 unless the backend
/// is `ready`, healthy and resolved; otherwise the operator's runtime weight, else the weight
/// an exec `dynamic` check reported, else the configured weight.
#[derive(Debug, Clone)]
pub struct BackendState {
    pub id: u32,
    pub address: IpAddr,
    /// `None` while the neighbour is unresolved: the backend stays out of the table.
    pub mac: Option<[u8; 6]>,
    /// The backend's entry in the running configuration.
    pub cfg: BackendCfg,
    /// Runtime `set --weight`: kept across reloads until the configured weight changes.
    pub weight_override: Option<u32>,
    /// Runtime `set --state`: kept across reloads until the configured state changes.
    pub state_override: Option<AdminState>,
    /// Latest health verdict.
    pub health: Health,
    /// Weight reported by a `dynamic` exec check (exit code - 2).
    pub dynamic_weight: Option<u32>,
    /// Whether the `BACKENDS` entry is programmed with `BACKEND_F_VALID`.
    valid: bool,
    /// Slots this backend owns in the programmed table.
    pub slots: u32,
}

impl BackendState {
    /// Whether the program may send established flows to it (`BACKEND_F_VALID`).
    pub fn is_valid(&self) -> bool {
        self.valid
    }

    pub fn state(&self) -> AdminState {
        self.state_override.unwrap_or(self.cfg.state)
    }

    /// The weight in force before state and health are taken into account.
    pub fn weight(&self) -> u32 {
        self.weight_override
            .or(self.dynamic_weight)
            .unwrap_or(self.cfg.weight)
    }

    /// The weight the Maglev table is built with.
    pub fn effective_weight(&self) -> u32 {
        if self.state() == AdminState::Ready && self.health == Health::Up && self.mac.is_some() {
            self.weight()
        } else {
            0
        }
    }

    /// Established flows may keep using the backend: everything but a failed health check
    /// (drain and maint keep their flows; a dead backend's flows re-hash and fail fast).
    fn wants_valid(&self) -> bool {
        self.mac.is_some() && self.health == Health::Up
    }
}

#[derive(Debug, Clone)]
pub struct ServiceState {
    pub cfg: ServiceCfg,
    pub key: ServiceKey,
    pub info: ServiceInfo,
    pub table: Vec<u32>,
    pub backends: BTreeMap<IpAddr, BackendState>,
    /// The service has backends but none takes new flows (logged once per transition).
    pub no_backend: bool,
    /// Tunnel services: the `TUNNELS` entry as last written.
    pub tunnel: Option<lb_common::TunnelInfo>,
}

impl ServiceState {
    /// Backends with an effective weight above 0.
    pub fn usable(&self) -> usize {
        self.backends
            .values()
            .filter(|b| b.effective_weight() > 0)
            .count()
    }
}

/// Why a runtime change was refused.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("service: no service named {0:?}")]
    NoService(String),
    #[error("backend: service {0:?} has no backend {1}")]
    NoBackend(String, IpAddr),
}

/// A farm member as the ownership rings see it: its node id and the power it announces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Member {
    pub node: u32,
    pub power: u32,
}

/// What a service's ring is built from: its backends, or for a farm service the members
/// (keyed by node id, so every node builds the same table).
fn ring_entries(st: &ServiceState, members: &[Member]) -> Vec<(Vec<u8>, u32, u32)> {
    if st.info.fwd_mode == FWD_FARM {
        members
            .iter()
            .map(|m| (m.node.to_be_bytes().to_vec(), member_slot(m.node), m.power))
            .collect()
    } else {
        st.backends
            .values()
            .map(|b| (addr_of(b.address).to_vec(), b.id, b.effective_weight()))
            .collect()
    }
}

/// Bring one service's programmed state in line with its backends' effective weights (or
/// the members' powers): validate backends that become usable, rewrite only the ring slots
/// that change, then invalidate backends whose established flows must re-hash.
fn sync_service(st: &mut ServiceState, members: &[Member], maps: &mut impl Maps) -> Result<()> {
    for b in st.backends.values_mut() {
        if b.wants_valid() && !b.valid {
            maps.set_backend(b.id, &backend_entry(st.info.id, b, BACKEND_F_VALID))?;
            b.valid = true;
        }
    }
    let keys = ring_entries(st, members);
    let entries: Vec<MaglevEntry> = keys
        .iter()
        .map(|(k, id, w)| MaglevEntry {
            key: k,
            id: *id,
            weight: *w,
        })
        .collect();
    let table = maglev::build_table(&entries, st.cfg.table_size);
    let changed = maglev::diff(&st.table, &table);
    maps.write_ring(st.info.ring_offset, &changed)?;
    st.table = table;
    let mut slots: HashMap<u32, u32> = HashMap::new();
    for &id in &st.table {
        *slots.entry(id).or_default() += 1;
    }
    for b in st.backends.values_mut() {
        b.slots = slots.get(&b.id).copied().unwrap_or(0);
        if !b.wants_valid() && b.valid {
            maps.set_backend(b.id, &backend_entry(st.info.id, b, 0))?;
            b.valid = false;
        }
    }

    let usable = st.usable();
    let no_backend = usable == 0 && !st.backends.is_empty();
    if no_backend && !st.no_backend {
        let down = st
            .backends
            .values()
            .filter(|b| b.health == Health::Down)
            .count();
        tracing::error!(
            service = %st.cfg.name,
            backends = st.backends.len(),
            down,
            "service has NO usable backend: new flows are dropped (drop_no_backend)"
        );
    } else if !no_backend && st.no_backend {
        tracing::info!(service = %st.cfg.name, usable, "service has usable backends again");
    }
    st.no_backend = no_backend;
    Ok(())
}

fn backend_entry(service: u32, b: &BackendState, flags: u8) -> Backend {
    Backend {
        addr: addr_of(b.address),
        mac: b.mac.unwrap_or_default(),
        flags,
        _pad: 0,
        service,
    }
}

/// The director's view of what is programmed into the maps.
#[derive(Debug, Clone)]
pub struct Director {
    ring_slots: u32,
    own_mac: [u8; 6],
    /// Allocated ring ranges: offset -> size.
    ring_used: BTreeMap<u32, u32>,
    svc_ids: Ids,
    backend_ids: Ids,
    pub services: BTreeMap<String, ServiceState>,
    /// Farm mode: this node's id (from `[farm]`), the alive members, and the member slots
    /// programmed valid.
    own_node: Option<u32>,
    members: Vec<Member>,
    valid_members: BTreeSet<u32>,
    /// Backend slots of an adopted data plane that no service claims: cleared by the next
    /// `apply`, once the rings point elsewhere.
    stale: Vec<u32>,
    /// Farm mode: until when this node takes new flows (see `FarmConfig::lease_until_ns`).
    lease_until_ns: u64,
    /// Tunnel modes: the interface's MTU and addresses (the daemon discovers them).
    pub tunnel: crate::tunnel::TunnelHost,
    /// Tunnel modes: the configured `tunnel_source` prefixes and `gue_port` (set by
    /// `apply`).
    tunnel_sources: Vec<crate::config::Cidr>,
    gue_port: u16,
}

impl Director {
    /// `own_mac` is the source MAC of forwarded frames (the attached interface's address).
    pub fn new(ring_slots: u32, own_mac: [u8; 6]) -> Self {
        Self {
            ring_slots,
            own_mac,
            ring_used: BTreeMap::new(),
            svc_ids: Ids::new(0, MAX_SERVICES),
            // Backend id 0 is NO_BACKEND.
            backend_ids: Ids::new(1, MAX_BACKENDS),
            services: BTreeMap::new(),
            own_node: None,
            members: Vec::new(),
            valid_members: BTreeSet::new(),
            stale: Vec::new(),
            lease_until_ns: 0,
            tunnel: Default::default(),
            tunnel_sources: Vec::new(),
            gue_port: lb_common::DEFAULT_GUE_PORT,
        }
    }

    /// The address of the backend with id `id`, in whichever service.
    pub fn backend_address(&self, id: u32) -> Option<IpAddr> {
        self.services
            .values()
            .flat_map(|s| s.backends.values())
            .find(|b| b.id == id)
            .map(|b| b.address)
    }

    /// Ring slots a config needs, with headroom so services can be added at runtime.
    pub fn ring_slots_for(cfg: &Config) -> u32 {
        let need: u64 = cfg.services.iter().map(|s| s.table_size as u64).sum();
        (need * 2).clamp(lb_common::DEFAULT_RING_SLOTS as u64, u32::MAX as u64 / 2) as u32
    }

    fn alloc_ring(&mut self, size: u32) -> Result<u32> {
        let mut start = 0u32;
        for (&off, &len) in &self.ring_used {
            if off - start >= size {
                break;
            }
            start = off + len;
        }
        if start as u64 + size as u64 > self.ring_slots as u64 {
            bail!(
                "no room for a {size}-slot table in the {}-slot ring (restart to grow it)",
                self.ring_slots
            );
        }
        self.ring_used.insert(start, size);
        Ok(start)
    }

    /// Take over a pinned data plane's state (`snap`) for `cfg`: services whose key, table
    /// size and forwarding are unchanged keep their ids, ring ranges and tables, and their
    /// backends keep their ids, MACs and validity, so established flows keep their backend
    /// and the following [`Director::apply`] writes only what differs. A checked backend that
    /// was invalid (down) restarts down, to rise again by its checks. Everything else pinned
    /// is removed from the maps.
    pub fn adopt(
        &mut self,
        cfg: &Config,
        snap: &crate::dataplane::Snapshot,
        maps: &mut impl Maps,
    ) -> Result<()> {
        for (key, info, table) in &snap.services {
            let wanted = cfg.services.iter().find(|s| {
                service_key(s) == *key
                    && s.table_size == info.ring_size
                    && s.forwarding.mode() == info.fwd_mode
                    && !self.services.contains_key(&s.name)
            });
            let Some(s) = wanted else {
                maps.remove_service(key)?;
                if !cfg.services.iter().any(|c| service_key(c).addr == key.addr) {
                    maps.remove_vip_addr(&key.addr)?;
                }
                continue;
            };
            self.svc_ids.reserve(info.id);
            self.ring_used.insert(info.ring_offset, info.ring_size);
            let mut st = ServiceState {
                cfg: s.clone(),
                key: *key,
                info: *info,
                table: table.clone(),
                backends: BTreeMap::new(),
                no_backend: false,
                tunnel: None,
            };
            for (id, b) in snap.backends.iter().filter(|(_, b)| b.service == info.id) {
                let Some(bc) = s.backends.iter().find(|c| addr_of(c.address) == b.addr) else {
                    continue;
                };
                let valid = b.flags & BACKEND_F_VALID != 0;
                self.backend_ids.reserve(*id);
                st.backends.insert(
                    bc.address,
                    BackendState {
                        id: *id,
                        address: bc.address,
                        mac: Some(b.mac),
                        cfg: bc.clone(),
                        weight_override: None,
                        state_override: None,
                        health: if valid || bc.check.is_none() {
                            Health::Up
                        } else {
                            Health::Down
                        },
                        dynamic_weight: None,
                        valid,
                        slots: 0,
                    },
                );
            }
            self.services.insert(s.name.clone(), st);
        }
        // Backend slots no adopted service claims are stale.
        let kept: BTreeSet<u32> = self
            .services
            .values()
            .flat_map(|s| s.backends.values().map(|b| b.id))
            .collect();
        let adopted: BTreeSet<u32> = self.services.values().map(|s| s.info.id).collect();
        for (id, b) in &snap.backends {
            if b.service == MEMBER_OWNER && b.flags & BACKEND_F_VALID != 0 {
                self.valid_members.insert(*id);
            } else if *b != Backend::default() && !kept.contains(id) {
                // A backend dropped from the config while the daemon was down: its traffic
                // stays its (adopted) service's. Frames it takes until its ring slots move
                // go uncounted.
                if adopted.contains(&b.service) {
                    maps.retire_backend_counter(b.service, *id)?;
                }
                // Its id is held until it is invalidated: a new backend must not take it
                // before (member slots are not in the pool).
                if *id < MAX_BACKENDS {
                    self.backend_ids.reserve(*id);
                }
                self.stale.push(*id);
            }
        }
        Ok(())
    }

    /// Bring the maps from the current state to `cfg`. Order matters for live traffic:
    /// backends are written before ring slots point at them, and ring slots are moved away
    /// before a backend is invalidated.
    pub fn apply(
        &mut self,
        cfg: &Config,
        maps: &mut impl Maps,
        macs: &mut impl MacResolver,
    ) -> Result<()> {
        maps.set_config(&GlobalConfig {
            udp_timeout_ns: cfg.udp_timeout.as_nanos().min(u64::MAX as u128) as u64,
            own_mac: self.own_mac,
            layout_version: lb_common::LAYOUT_VERSION as u16,
            flood_rate: cfg.flood_guard_rate,
            sync: u32::from(cfg.announce.as_ref().is_some_and(|a| a.sync)),
        })?;
        self.tunnel_sources = cfg.tunnel_source.clone();
        self.gue_port = cfg.gue_port;
        self.own_node = cfg.farm.as_ref().map(|f| f.node_id);
        self.write_farm(maps)?;
        let wanted: BTreeMap<&str, &ServiceCfg> =
            cfg.services.iter().map(|s| (s.name.as_str(), s)).collect();

        // Removed services, or ones whose identity (key, table size, forwarding) changed.
        let stale: Vec<String> = self
            .services
            .iter()
            .filter(|(name, st)| match wanted.get(name.as_str()) {
                None => true,
                // A new forwarding mode means a different kind of ring: rebuild it whole.
                Some(c) => {
                    service_key(c) != st.key
                        || c.table_size != st.cfg.table_size
                        || c.forwarding != st.cfg.forwarding
                }
            })
            .map(|(n, _)| n.clone())
            .collect();
        for name in stale {
            self.remove_service(&name, maps)?;
        }

        for s in &cfg.services {
            if !self.services.contains_key(&s.name) {
                self.add_service(s, maps)?;
            }
            self.update_service(s, maps, macs)?;
        }
        for id in std::mem::take(&mut self.stale) {
            maps.set_backend(id, &Backend::default())?;
            if id < MAX_BACKENDS {
                self.backend_ids.release(id);
            }
        }
        Ok(())
    }

    fn add_service(&mut self, s: &ServiceCfg, maps: &mut impl Maps) -> Result<()> {
        let id = self.svc_ids.alloc("services")?;
        let ring_offset = match self.alloc_ring(s.table_size) {
            Ok(o) => o,
            Err(e) => {
                self.svc_ids.release(id);
                return Err(e);
            }
        };
        let info = ServiceInfo {
            id,
            ring_offset,
            ring_size: s.table_size,
            hash_mode: s.hash as u8,
            fwd_mode: s.forwarding.mode(),
            flags: 0,
            _pad: 0,
        };
        let table = vec![NO_BACKEND; s.table_size as usize];
        // A reused ring range may hold an old service's ids: clear it before publishing.
        let clear: Vec<(u32, u32)> = (0..s.table_size).map(|i| (i, 0)).collect();
        maps.write_ring(ring_offset, &clear)?;
        maps.reset_counter(CounterKind::Service, id)?;
        let key = service_key(s);
        maps.set_vip_addr(&key.addr)?;
        maps.set_service(&key, &info)?;
        self.services.insert(
            s.name.clone(),
            ServiceState {
                cfg: s.clone(),
                key,
                info,
                table,
                backends: BTreeMap::new(),
                no_backend: false,
                tunnel: None,
            },
        );
        Ok(())
    }

    fn remove_service(&mut self, name: &str, maps: &mut impl Maps) -> Result<()> {
        let Some(st) = self.services.remove(name) else {
            return Ok(());
        };
        maps.remove_service(&st.key)?;
        if !self.services.values().any(|o| o.key.addr == st.key.addr) {
            maps.remove_vip_addr(&st.key.addr)?;
        }
        for b in st.backends.values() {
            maps.set_backend(b.id, &Backend::default())?;
            self.backend_ids.release(b.id);
        }
        self.ring_used.remove(&st.info.ring_offset);
        self.svc_ids.release(st.info.id);
        Ok(())
    }

    fn update_service(
        &mut self,
        s: &ServiceCfg,
        maps: &mut impl Maps,
        macs: &mut impl MacResolver,
    ) -> Result<()> {
        let st = self.services.get_mut(&s.name).expect("added above");
        // Before any ring slot points at a backend: the program reads it for every packet.
        if s.forwarding.is_tunnel() {
            let t = self
                .tunnel
                .info(&self.tunnel_sources, s.gue_port.unwrap_or(self.gue_port));
            if st.tunnel != Some(t) {
                maps.set_tunnel(st.info.id, &t)?;
                st.tunnel = Some(t);
            }
        }
        if st.cfg.hash != s.hash {
            st.info.hash_mode = s.hash as u8;
            maps.set_service(&st.key, &st.info)?;
        }
        st.cfg = s.clone();

        for b in &s.backends {
            let entry = match st.backends.get_mut(&b.address) {
                Some(e) => {
                    // A runtime override lasts until the file changes that same field.
                    if e.cfg.weight != b.weight {
                        e.weight_override = None;
                    }
                    if e.cfg.state != b.state {
                        e.state_override = None;
                    }
                    if e.cfg.check != b.check {
                        let dynamic = matches!(
                            b.check.as_ref().map(|c| &c.probe),
                            Some(crate::config::Probe::Exec { dynamic: true, .. })
                        );
                        if !dynamic {
                            e.dynamic_weight = None;
                        }
                        if b.check.is_none() {
                            e.health = Health::Up;
                        }
                    }
                    e.cfg = b.clone();
                    e
                }
                None => {
                    let id = self.backend_ids.alloc("backends")?;
                    maps.reset_counter(CounterKind::Backend, id)?;
                    st.backends.entry(b.address).or_insert(BackendState {
                        id,
                        address: b.address,
                        mac: None,
                        cfg: b.clone(),
                        weight_override: None,
                        state_override: None,
                        health: Health::Up,
                        dynamic_weight: None,
                        valid: false,
                        slots: 0,
                    })
                }
            };
            if entry.mac.is_some() && s.forwarding.is_tunnel() {
                // A tunnel backend's next hop may change (routes, router failover): the
                // resolver re-checks it, and a new MAC is written over the old one.
                if let Ok(mac) = macs.resolve_next_hop(b.address) {
                    if entry.mac != Some(mac) {
                        tracing::info!(
                            service = %s.name, backend = %b.address,
                            "next hop changed: now {}",
                            mac.map(|x| format!("{x:02x}")).join(":")
                        );
                        entry.mac = Some(mac);
                        if entry.valid {
                            maps.set_backend(
                                entry.id,
                                &backend_entry(st.info.id, entry, BACKEND_F_VALID),
                            )?;
                        }
                    }
                }
            }
            if entry.mac.is_none() {
                // Tunnels reach the backend through its route: the MAC is the next hop's.
                let resolved = if !s.forwarding.is_tunnel() {
                    macs.resolve(b.address)
                } else if !self.tunnel.can_reach(&self.tunnel_sources, b.address) {
                    Err(anyhow::anyhow!(
                        "no outer source address of the backend's family: the interface has \
                         none and tunnel_source gives none"
                    ))
                } else {
                    macs.resolve_next_hop(b.address)
                };
                match resolved {
                    Ok(mac) => entry.mac = Some(mac),
                    // The resolver reports failures; `farmlb status` shows it unresolved.
                    Err(e) => tracing::debug!(
                        service = %s.name, backend = %b.address,
                        "backend kept out of the table until its MAC resolves: {e:#}"
                    ),
                }
            }
        }

        // Backends no longer configured leave the table first, then are invalidated so their
        // conntrack entries re-hash, then their counts move to the service's own slot (the
        // service's total stays whole), then their ids are freed.
        let gone: Vec<BackendState> = st
            .backends
            .keys()
            .filter(|a| !s.backends.iter().any(|b| b.address == **a))
            .copied()
            .collect::<Vec<_>>()
            .into_iter()
            .filter_map(|a| st.backends.remove(&a))
            .collect();
        sync_service(st, &self.members, maps)?;
        for e in gone {
            maps.set_backend(e.id, &Backend::default())?;
            maps.retire_backend_counter(st.info.id, e.id)?;
            self.backend_ids.release(e.id);
        }
        Ok(())
    }

    fn backend_mut(
        &mut self,
        service: &str,
        addr: IpAddr,
    ) -> Result<&mut BackendState, LookupError> {
        let st = self.services.get_mut(service);
        let st = st.ok_or_else(|| LookupError::NoService(service.into()))?;
        st.backends
            .get_mut(&addr)
            .ok_or_else(|| LookupError::NoBackend(service.into(), addr))
    }

    /// Look a backend up (for the API: 404 on unknown names).
    pub fn backend(&self, service: &str, addr: IpAddr) -> Result<&BackendState, LookupError> {
        let st = self.services.get(service);
        let st = st.ok_or_else(|| LookupError::NoService(service.into()))?;
        st.backends
            .get(&addr)
            .ok_or_else(|| LookupError::NoBackend(service.into(), addr))
    }

    /// Runtime weight and/or state of one backend (`farmlb backend set`). Only the ring slots
    /// that change are rewritten. The caller validated the weight's range.
    pub fn set_admin(
        &mut self,
        service: &str,
        addr: IpAddr,
        weight: Option<u32>,
        state: Option<AdminState>,
        maps: &mut impl Maps,
    ) -> Result<()> {
        let b = self.backend_mut(service, addr)?;
        if let Some(w) = weight {
            b.weight_override = Some(w);
        }
        if let Some(st) = state {
            b.state_override = Some(st);
        }
        self.resync(service, maps)
    }

    /// Record a health verdict (and a dynamic weight, when the check reports one). Returns
    /// whether anything the table depends on changed.
    pub fn set_health(
        &mut self,
        service: &str,
        addr: IpAddr,
        health: Health,
        dynamic_weight: Option<u32>,
        maps: &mut impl Maps,
    ) -> Result<bool> {
        let b = self.backend_mut(service, addr)?;
        let mut changed = b.health != health;
        b.health = health;
        if dynamic_weight.is_some() && b.dynamic_weight != dynamic_weight {
            b.dynamic_weight = dynamic_weight;
            changed = true;
        }
        if changed {
            self.resync(service, maps)?;
        }
        Ok(changed)
    }

    fn resync(&mut self, service: &str, maps: &mut impl Maps) -> Result<()> {
        let st = self
            .services
            .get_mut(service)
            .ok_or_else(|| LookupError::NoService(service.to_string()))?;
        sync_service(st, &self.members, maps)
    }

    /// Farm mode: the alive members changed. Order keeps live traffic consistent: new
    /// members are valid before a ring slot points at them; departed members are invalidated
    /// after the rings moved away (their conntrack entries then re-hash).
    pub fn set_members(&mut self, members: &[Member], maps: &mut impl Maps) -> Result<()> {
        let wanted: BTreeSet<u32> = members.iter().map(|m| member_slot(m.node)).collect();
        for &slot in wanted.difference(&self.valid_members) {
            maps.set_backend(
                slot,
                &Backend {
                    flags: BACKEND_F_VALID,
                    service: MEMBER_OWNER,
                    ..Default::default()
                },
            )?;
        }
        self.members = members.to_vec();
        for st in self.services.values_mut() {
            if st.info.fwd_mode == FWD_FARM {
                sync_service(st, &self.members, maps)?;
            }
        }
        for &slot in self.valid_members.difference(&wanted) {
            maps.set_backend(slot, &Backend::default())?;
        }
        self.valid_members = wanted;
        Ok(())
    }

    /// Farm mode: this node takes new flows until `until_ns` (`CLOCK_MONOTONIC_COARSE`); the
    /// daemon renews it while it runs.
    pub fn set_lease(&mut self, until_ns: u64, maps: &mut impl Maps) -> Result<()> {
        self.lease_until_ns = until_ns;
        self.write_farm(maps)
    }

    fn write_farm(&self, maps: &mut impl Maps) -> Result<()> {
        maps.set_farm(&FarmConfig {
            own_member: self.own_node.map_or(0, member_slot),
            _pad: 0,
            lease_until_ns: self.lease_until_ns,
        })
    }

    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// Share of every member in the first farm table (for `farmlb status`).
    pub fn shares(&self) -> BTreeMap<u32, f64> {
        let mut out = BTreeMap::new();
        if let Some(st) = self.services.values().find(|s| s.info.fwd_mode == FWD_FARM) {
            for &v in &st.table {
                if v != NO_BACKEND {
                    *out.entry(v - member_slot(0)).or_insert(0.0) += 1.0 / st.table.len() as f64;
                }
            }
        }
        out
    }

    /// Fraction of the (first) farm table this node owns.
    pub fn share(&self) -> f64 {
        self.own_node
            .and_then(|n| self.shares().get(&n).copied())
            .unwrap_or(0.0)
    }

    /// Backends still waiting for a MAC (the daemon retries them).
    pub fn unresolved(&self) -> usize {
        self.services
            .values()
            .flat_map(|s| s.backends.values())
            .filter(|b| b.mac.is_none())
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::model::Model;

    /// The model, plus a log of what each change wrote.
    #[derive(Default)]
    struct Rec {
        model: Model,
        ring_writes: Vec<(u32, u32)>,
        backend_writes: Vec<(u32, Backend)>,
        retired: Vec<(u32, u32)>,
    }

    impl Maps for Rec {
        fn set_config(&mut self, c: &GlobalConfig) -> Result<()> {
            self.model.set_config(c)
        }
        fn set_farm(&mut self, f: &FarmConfig) -> Result<()> {
            self.model.set_farm(f)
        }
        fn reset_counter(&mut self, k: CounterKind, id: u32) -> Result<()> {
            self.model.reset_counter(k, id)
        }
        fn retire_backend_counter(&mut self, s: u32, b: u32) -> Result<()> {
            self.retired.push((s, b));
            self.model.retire_backend_counter(s, b)
        }
        fn set_service(&mut self, k: &ServiceKey, i: &ServiceInfo) -> Result<()> {
            self.model.set_service(k, i)
        }
        fn remove_service(&mut self, k: &ServiceKey) -> Result<()> {
            self.model.remove_service(k)
        }
        fn set_vip_addr(&mut self, a: &Addr) -> Result<()> {
            self.model.set_vip_addr(a)
        }
        fn remove_vip_addr(&mut self, a: &Addr) -> Result<()> {
            self.model.remove_vip_addr(a)
        }
        fn set_backend(&mut self, id: u32, b: &Backend) -> Result<()> {
            self.backend_writes.push((id, *b));
            self.model.set_backend(id, b)
        }
        fn write_ring(&mut self, o: u32, s: &[(u32, u32)]) -> Result<()> {
            self.ring_writes.extend_from_slice(s);
            self.model.write_ring(o, s)
        }
    }

    const A: &str = "10.0.0.11";
    const B: &str = "10.0.0.12";
    const C: &str = "10.0.0.13";

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn cfg(backends: &str) -> Config {
        Config::from_toml_str(&format!(
            "interface = \"eth0\"\n[[service]]\nname = \"web\"\nvip = \"10.0.0.1\"\nport = 80\n\
             table_size = 1009\n{backends}"
        ))
        .unwrap()
    }

    fn three() -> Config {
        cfg(&format!(
            "[[service.backend]]\naddress = \"{A}\"\n[[service.backend]]\naddress = \"{B}\"\n\
             [[service.backend]]\naddress = \"{C}\"\n"
        ))
    }

    fn macs(c: &Config) -> HashMap<IpAddr, [u8; 6]> {
        c.services
            .iter()
            .flat_map(|s| s.backends.iter())
            .map(|b| (b.address, [2, 0, 0, 0, 0, addr_of(b.address)[15]]))
            .collect()
    }

    fn setup(c: &Config) -> (Director, Rec, HashMap<IpAddr, [u8; 6]>) {
        let mut d = Director::new(lb_common::DEFAULT_RING_SLOTS, [2, 0, 0, 0, 0, 1]);
        let mut rec = Rec::default();
        let mut m = macs(c);
        d.apply(c, &mut rec, &mut m).unwrap();
        rec.ring_writes.clear();
        rec.backend_writes.clear();
        (d, rec, m)
    }

    fn id(d: &Director, a: &str) -> u32 {
        d.services["web"].backends[&ip(a)].id
    }

    fn slots_of(d: &Director, a: &str) -> usize {
        let id = id(d, a);
        d.services["web"].table.iter().filter(|&&x| x == id).count()
    }

    fn valid(rec: &Rec, id: u32) -> bool {
        rec.model.backends[&id].flags & BACKEND_F_VALID != 0
    }

    /// Every written slot changed value and every slot that changed was written; apart from
    /// the slots `moved` gains or loses, only Maglev's small reshuffle among the others
    /// (under 3% of the table here) changes owner.
    fn only_affected_slots(before: &[u32], after: &[u32], writes: &[(u32, u32)], moved: u32) {
        let changed: Vec<(u32, u32)> = maglev::diff(before, after);
        let mut w = writes.to_vec();
        w.sort_unstable();
        assert_eq!(w, changed, "exactly the changed slots are written");
        let own = changed
            .iter()
            .filter(|&&(i, a)| a == moved || before[i as usize] == moved)
            .count();
        let others = changed.len() - own;
        assert!(own > 0);
        assert!(
            others * 100 < before.len() * 3,
            "{others} of {} slots changed between other backends",
            before.len()
        );
        assert!(
            changed.len() < before.len() / 2,
            "{} slots rewritten",
            changed.len()
        );
    }

    /// A backend dropped from the config while the daemon was down: its counts go to its
    /// service, and its id is not handed to a new backend before it is invalidated (the
    /// new one would be invalidated with it).
    #[test]
    fn adopting_retires_a_backend_the_config_dropped_and_holds_its_id() {
        let c = three();
        let (d, mut rec, _) = setup(&c);
        let st = &d.services["web"];
        let snap = crate::dataplane::Snapshot {
            services: vec![(st.key, st.info, st.table.clone())],
            backends: rec.model.backends.iter().map(|(i, b)| (*i, *b)).collect(),
        };
        let (svc, gone) = (st.info.id, id(&d, C));
        let next = cfg(&format!(
            "[[service.backend]]\naddress = \"{A}\"\n[[service.backend]]\naddress = \"{B}\"\n\
             [[service.backend]]\naddress = \"10.0.0.14\"\n"
        ));
        let mut d2 = Director::new(lb_common::DEFAULT_RING_SLOTS, [2, 0, 0, 0, 0, 1]);
        d2.adopt(&next, &snap, &mut rec).unwrap();
        assert_eq!(rec.retired, [(svc, gone)]);
        d2.apply(&next, &mut rec, &mut macs(&next)).unwrap();
        let new = id(&d2, "10.0.0.14");
        assert_ne!(
            new, gone,
            "the dropped backend's id was handed out before it was cleared"
        );
        assert!(valid(&rec, new));
        assert_eq!(rec.model.backends[&gone], Backend::default());
        assert!(!d2.services["web"].table.contains(&gone));
    }

    #[test]
    fn drain_moves_only_its_slots_and_keeps_established_flows() {
        let c = three();
        let (mut d, mut rec, _) = setup(&c);
        let before = d.services["web"].table.clone();
        let b_id = id(&d, B);
        d.set_admin("web", ip(B), None, Some(AdminState::Drain), &mut rec)
            .unwrap();
        let after = d.services["web"].table.clone();
        only_affected_slots(&before, &after, &rec.ring_writes, b_id);
        assert_eq!(slots_of(&d, B), 0);
        assert!(
            valid(&rec, b_id),
            "drain keeps VALID: conntrack hits continue"
        );
        assert!(rec.backend_writes.is_empty(), "no backend entry rewritten");
        let b = d.backend("web", ip(B)).unwrap();
        assert_eq!((b.effective_weight(), b.weight()), (0, 1));
        // Back to ready: the original table, byte for byte.
        d.set_admin("web", ip(B), None, Some(AdminState::Ready), &mut rec)
            .unwrap();
        assert_eq!(d.services["web"].table, before);
        // maint behaves the same for new flows and keeps VALID too.
        d.set_admin("web", ip(B), None, Some(AdminState::Maint), &mut rec)
            .unwrap();
        assert_eq!(slots_of(&d, B), 0);
        assert!(valid(&rec, b_id));
    }

    #[test]
    fn health_down_invalidates_after_the_ring_moves() {
        let c = three();
        let (mut d, mut rec, _) = setup(&c);
        let before = d.services["web"].table.clone();
        let a_id = id(&d, A);
        assert!(d
            .set_health("web", ip(A), Health::Down, None, &mut rec)
            .unwrap());
        only_affected_slots(&before, &d.services["web"].table, &rec.ring_writes, a_id);
        assert_eq!(slots_of(&d, A), 0);
        assert!(!valid(&rec, a_id), "down clears VALID: its flows re-hash");
        assert_eq!(rec.backend_writes.len(), 1);
        // Same verdict again: nothing is written.
        rec.ring_writes.clear();
        assert!(!d
            .set_health("web", ip(A), Health::Down, None, &mut rec)
            .unwrap());
        assert!(rec.ring_writes.is_empty());
        // Up again: VALID before the ring points at it, and the original table.
        rec.backend_writes.clear();
        d.set_health("web", ip(A), Health::Up, None, &mut rec)
            .unwrap();
        assert!(valid(&rec, a_id));
        assert_eq!(d.services["web"].table, before);
    }

    #[test]
    fn weight_change_rewrites_only_affected_slots() {
        let c = three();
        let (mut d, mut rec, _) = setup(&c);
        let before = d.services["web"].table.clone();
        let c_id = id(&d, C);
        d.set_admin("web", ip(C), Some(3), None, &mut rec).unwrap();
        only_affected_slots(&before, &d.services["web"].table, &rec.ring_writes, c_id);
        let (a, c3) = (slots_of(&d, A), slots_of(&d, C));
        assert!(c3 > 2 * a, "weight 3 vs 1: {c3} vs {a} slots");
        assert_eq!(d.services["web"].backends[&ip(C)].slots as usize, c3);
        // Weight 0 behaves like drain.
        d.set_admin("web", ip(C), Some(0), None, &mut rec).unwrap();
        assert_eq!(slots_of(&d, C), 0);
        assert!(valid(&rec, c_id));
        // Unknown names are refused with a lookup error.
        let e = d
            .set_admin("web", ip("10.0.0.99"), Some(1), None, &mut rec)
            .unwrap_err();
        assert!(e.to_string().contains("has no backend 10.0.0.99"), "{e}");
        assert!(d.set_admin("nope", ip(A), Some(1), None, &mut rec).is_err());
    }

    #[test]
    fn configured_weight_zero_is_drain() {
        let c = cfg(&format!(
            "[[service.backend]]\naddress = \"{A}\"\nweight = 0\n\
             [[service.backend]]\naddress = \"{B}\"\n"
        ));
        let (d, rec, _) = setup(&c);
        assert_eq!(slots_of(&d, A), 0);
        assert!(valid(&rec, id(&d, A)));
        assert_eq!(slots_of(&d, B), 1009);
    }

    #[test]
    fn runtime_overrides_last_until_the_file_changes_that_field() {
        let c = three();
        let (mut d, mut rec, mut m) = setup(&c);
        d.set_admin("web", ip(A), Some(5), Some(AdminState::Drain), &mut rec)
            .unwrap();
        // Reload of the same file: both overrides stay.
        d.apply(&c, &mut rec, &mut m).unwrap();
        let a = d.backend("web", ip(A)).unwrap();
        assert_eq!((a.state(), a.weight()), (AdminState::Drain, 5));
        assert_eq!(slots_of(&d, A), 0);
        // The file changes A's weight: the weight override goes, the drain stays.
        let c2 = cfg(&format!(
            "[[service.backend]]\naddress = \"{A}\"\nweight = 2\n[[service.backend]]\n\
             address = \"{B}\"\n[[service.backend]]\naddress = \"{C}\"\n"
        ));
        d.apply(&c2, &mut rec, &mut m).unwrap();
        let a = d.backend("web", ip(A)).unwrap();
        assert_eq!(
            (a.state(), a.weight(), a.weight_override),
            (AdminState::Drain, 2, None)
        );
        // The file changes A's state: the state override goes too.
        let c3 = cfg(&format!(
            "[[service.backend]]\naddress = \"{A}\"\nweight = 2\nstate = \"maint\"\n\
             [[service.backend]]\naddress = \"{B}\"\n[[service.backend]]\naddress = \"{C}\"\n"
        ));
        d.apply(&c3, &mut rec, &mut m).unwrap();
        assert_eq!(d.backend("web", ip(A)).unwrap().state(), AdminState::Maint);
        d.apply(&c2, &mut rec, &mut m).unwrap();
        let a = d.backend("web", ip(A)).unwrap();
        assert_eq!(a.state(), AdminState::Ready);
        assert_eq!(
            slots_of(&d, A),
            d.services["web"].backends[&ip(A)].slots as usize
        );
        assert!(slots_of(&d, A) > 0);
        // Removal forgets everything: re-adding starts from the file.
        d.set_admin("web", ip(B), None, Some(AdminState::Drain), &mut rec)
            .unwrap();
        let only_a = cfg(&format!("[[service.backend]]\naddress = \"{A}\"\n"));
        d.apply(&only_a, &mut rec, &mut m).unwrap();
        d.apply(&c2, &mut rec, &mut m).unwrap();
        assert_eq!(d.backend("web", ip(B)).unwrap().state(), AdminState::Ready);
    }

    #[test]
    fn health_survives_reload_and_resets_when_unchecked() {
        let checked = |check: &str| {
            cfg(&format!(
                "check = {{ type = \"{check}\" }}\n[[service.backend]]\naddress = \"{A}\"\n\
                 [[service.backend]]\naddress = \"{B}\"\n"
            ))
        };
        let c = checked("tcp");
        let (mut d, mut rec, mut m) = setup(&c);
        d.set_health("web", ip(A), Health::Down, None, &mut rec)
            .unwrap();
        d.apply(&c, &mut rec, &mut m).unwrap();
        assert_eq!(d.backend("web", ip(A)).unwrap().health, Health::Down);
        assert_eq!(slots_of(&d, A), 0);
        d.apply(&checked("none"), &mut rec, &mut m).unwrap();
        assert_eq!(d.backend("web", ip(A)).unwrap().health, Health::Up);
        assert!(slots_of(&d, A) > 0);
        assert!(valid(&rec, id(&d, A)));
    }

    #[test]
    fn every_backend_down_empties_the_table() {
        let c = three();
        let (mut d, mut rec, _) = setup(&c);
        for a in [A, B, C] {
            assert!(!d.services["web"].no_backend);
            d.set_health("web", ip(a), Health::Down, None, &mut rec)
                .unwrap();
        }
        let st = &d.services["web"];
        assert!(st.no_backend);
        assert_eq!(st.usable(), 0);
        assert!(st.table.iter().all(|&x| x == NO_BACKEND));
        assert!(rec.model.ring.values().all(|&x| x == NO_BACKEND));
        d.set_health("web", ip(B), Health::Up, None, &mut rec)
            .unwrap();
        assert!(!d.services["web"].no_backend);
        assert_eq!(slots_of(&d, B), 1009);
    }

    #[test]
    fn dynamic_weight_applies_unless_the_operator_set_one() {
        let c = three();
        let (mut d, mut rec, _) = setup(&c);
        d.set_health("web", ip(A), Health::Up, Some(4), &mut rec)
            .unwrap();
        assert_eq!(d.backend("web", ip(A)).unwrap().effective_weight(), 4);
        let four = slots_of(&d, A);
        assert!(four > 2 * slots_of(&d, B), "{four}");
        // Dynamic weight 0 (exit code 2): up but no new flows.
        d.set_health("web", ip(A), Health::Up, Some(0), &mut rec)
            .unwrap();
        assert_eq!(slots_of(&d, A), 0);
        assert!(valid(&rec, id(&d, A)));
        // The operator's weight wins over the check's.
        d.set_admin("web", ip(A), Some(2), None, &mut rec).unwrap();
        d.set_health("web", ip(A), Health::Up, Some(7), &mut rec)
            .unwrap();
        assert_eq!(d.backend("web", ip(A)).unwrap().effective_weight(), 2);
    }

    fn farm_config() -> Config {
        farm_node_config("farm")
    }

    fn farm_node_config(forwarding: &str) -> Config {
        Config::from_toml_str(&format!(
            "interface = \"eth0\"\n[farm]\nnode_id = 1\naddress = \"10.0.0.1\"\n\
             key_file = \"/k\"\n[[service]]\nname = \"web\"\nvip = \"10.0.100.1\"\nport = 80\n\
             forwarding = \"{forwarding}\"\ntable_size = 1009\n",
        ))
        .unwrap()
    }

    #[test]
    fn tables_follow_membership_and_keep_survivor_slots() {
        let cfg = farm_config();
        let mut model = Model::default();
        let mut director = Director::new(1 << 16, [2, 0, 0, 0, 0, 1]);
        let mut macs: std::collections::HashMap<IpAddr, [u8; 6]> = Default::default();
        director.apply(&cfg, &mut model, &mut macs).unwrap();
        let three = [
            Member { node: 1, power: 1 },
            Member { node: 2, power: 1 },
            Member { node: 3, power: 1 },
        ];
        director.set_members(&three, &mut model).unwrap();
        assert_eq!(model.farm.own_member, member_slot(1));
        let shares = director.shares();
        for n in 1..=3 {
            assert!((shares[&n] - 1.0 / 3.0).abs() < 0.02, "{shares:?}");
        }
        let ring_before: Vec<u32> = (0..1009).map(|i| model.ring[&i]).collect();
        // Node 3 leaves: its slot is invalid, survivors keep (almost) every slot they had.
        director.set_members(&three[..2], &mut model).unwrap();
        assert_eq!(model.backends[&member_slot(3)].flags & BACKEND_F_VALID, 0);
        let mut moved = 0;
        for i in 0..1009u32 {
            let b = ring_before[i as usize];
            assert_ne!(model.ring[&i], member_slot(3));
            if b != member_slot(3) && model.ring[&i] != b {
                moved += 1;
            }
        }
        assert!(moved < 1009 / 30, "{moved} survivor slots moved");
        assert!((director.share() - 0.5).abs() < 0.02);
        // Power 0: a member keeps its slot valid (its flows stay) but owns nothing new.
        director
            .set_members(
                &[Member { node: 1, power: 0 }, Member { node: 2, power: 1 }],
                &mut model,
            )
            .unwrap();
        assert_eq!(director.share(), 0.0);
        assert_ne!(model.backends[&member_slot(1)].flags & BACKEND_F_VALID, 0);
    }

    #[test]
    fn a_reload_that_changes_forwarding_rebuilds_the_ring() {
        let farm = farm_config();
        let dr = farm_node_config("dr");
        let mut model = Model::default();
        let mut d = Director::new(1 << 16, [2, 0, 0, 0, 0, 1]);
        let mut none: HashMap<IpAddr, [u8; 6]> = HashMap::new();
        let members = [Member { node: 1, power: 1 }, Member { node: 2, power: 1 }];
        d.apply(&farm, &mut model, &mut none).unwrap();
        d.set_members(&members, &mut model).unwrap();
        let farm_ring = d.services["web"].table.clone();
        assert!(farm_ring
            .iter()
            .all(|&v| v == member_slot(1) || v == member_slot(2)));
        // dr without backends: an empty ring, not the members' slots.
        d.apply(&dr, &mut model, &mut none).unwrap();
        assert_eq!(d.services["web"].info.fwd_mode, lb_common::FWD_DR);
        assert!(d.services["web"].table.iter().all(|&v| v == NO_BACKEND));
        // Back to farm: the members' table again, in full.
        d.apply(&farm, &mut model, &mut none).unwrap();
        assert_eq!(d.services["web"].info.fwd_mode, FWD_FARM);
        assert_eq!(d.services["web"].table, farm_ring);
        let st = &d.services["web"];
        for i in 0..st.info.ring_size {
            assert_eq!(
                model.ring[&(st.info.ring_offset + i)],
                farm_ring[i as usize]
            );
        }
    }
}
