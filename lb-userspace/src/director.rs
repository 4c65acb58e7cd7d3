//! Director mode: turns the configured services and backends into map contents (service
//! entries, backend slots, Maglev rings) and applies later changes as differences, so an
//! update only rewrites the ring slots that move and never disturbs established flows.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use anyhow::{bail, Context, Result};
use lb_common::{
    v4_mapped, Addr, Backend, GlobalConfig, ServiceInfo, ServiceKey, BACKEND_F_VALID, FWD_DR,
    MAX_BACKENDS, MAX_SERVICES,
};

use crate::config::{Config, ServiceCfg};
use crate::maglev::{self, MaglevEntry};

/// Write access to the data plane's maps; implemented by the real `Dataplane` and by the
/// reference `Model`, so tests can program both identically.
pub trait Maps {
    fn set_config(&mut self, cfg: &GlobalConfig) -> Result<()>;
    fn set_service(&mut self, key: &ServiceKey, info: &ServiceInfo) -> Result<()>;
    fn remove_service(&mut self, key: &ServiceKey) -> Result<()>;
    fn set_vip_addr(&mut self, addr: &Addr) -> Result<()>;
    fn remove_vip_addr(&mut self, addr: &Addr) -> Result<()>;
    fn set_backend(&mut self, id: u32, b: &Backend) -> Result<()>;
    fn write_ring(&mut self, offset: u32, slots: &[(u32, u32)]) -> Result<()>;
}

impl Maps for crate::dataplane::Dataplane {
    fn set_config(&mut self, cfg: &GlobalConfig) -> Result<()> {
        Self::set_config(self, cfg)
    }
    fn set_service(&mut self, key: &ServiceKey, info: &ServiceInfo) -> Result<()> {
        Self::set_service(self, key, info)
    }
    fn remove_service(&mut self, key: &ServiceKey) -> Result<()> {
        Self::remove_service(self, key)
    }
    fn set_vip_addr(&mut self, addr: &Addr) -> Result<()> {
        Self::set_vip_addr(self, addr)
    }
    fn remove_vip_addr(&mut self, addr: &Addr) -> Result<()> {
        Self::remove_vip_addr(self, addr)
    }
    fn set_backend(&mut self, id: u32, b: &Backend) -> Result<()> {
        Self::set_backend(self, id, b)
    }
    fn write_ring(&mut self, offset: u32, slots: &[(u32, u32)]) -> Result<()> {
        Self::write_ring(self, offset, slots)
    }
}

/// Finds a backend's MAC address (DR rewrites the destination MAC only).
pub trait MacResolver {
    fn resolve(&mut self, ip: IpAddr) -> Result<[u8; 6]>;
}

/// Fixed MACs, for tests and the model.
impl MacResolver for HashMap<IpAddr, [u8; 6]> {
    fn resolve(&mut self, ip: IpAddr) -> Result<[u8; 6]> {
        self.get(&ip)
            .copied()
            .with_context(|| format!("no MAC known for {ip}"))
    }
}

pub fn addr_of(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

pub fn service_key(s: &ServiceCfg) -> ServiceKey {
    ServiceKey {
        addr: addr_of(s.vip),
        port: s.port,
        proto: s.protocol.number(),
        _pad: 0,
    }
}

#[derive(Debug, Clone)]
pub struct BackendState {
    pub id: u32,
    pub address: IpAddr,
    pub weight: u32,
    /// `None` while the neighbour is unresolved: the backend stays out of the table.
    pub mac: Option<[u8; 6]>,
}

#[derive(Debug, Clone)]
pub struct ServiceState {
    pub cfg: ServiceCfg,
    pub key: ServiceKey,
    pub info: ServiceInfo,
    pub table: Vec<u32>,
    pub backends: BTreeMap<IpAddr, BackendState>,
}

/// Free-list allocator for small integer ids (service stats slots, backend slots).
#[derive(Debug, Clone)]
struct Ids {
    next: u32,
    max: u32,
    free: Vec<u32>,
}

impl Ids {
    fn new(first: u32, max: u32) -> Self {
        Self {
            next: first,
            max,
            free: Vec::new(),
        }
    }
    fn alloc(&mut self, what: &str) -> Result<u32> {
        if let Some(id) = self.free.pop() {
            return Ok(id);
        }
        if self.next >= self.max {
            bail!("too many {what} (limit {})", self.max);
        }
        self.next += 1;
        Ok(self.next - 1)
    }
    fn release(&mut self, id: u32) {
        self.free.push(id);
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
        }
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
            _pad: [0; 2],
        })?;
        let wanted: BTreeMap<&str, &ServiceCfg> =
            cfg.services.iter().map(|s| (s.name.as_str(), s)).collect();

        // Removed services, or ones whose identity (key, table size) changed.
        let stale: Vec<String> = self
            .services
            .iter()
            .filter(|(name, st)| match wanted.get(name.as_str()) {
                None => true,
                Some(c) => service_key(c) != st.key || c.table_size != st.cfg.table_size,
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
            fwd_mode: FWD_DR,
            flags: 0,
            _pad: 0,
        };
        let table = vec![lb_common::NO_BACKEND; s.table_size as usize];
        // A reused ring range may hold an old service's ids: clear it before publishing.
        let clear: Vec<(u32, u32)> = (0..s.table_size).map(|i| (i, 0)).collect();
        maps.write_ring(ring_offset, &clear)?;
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
        if st.cfg.hash != s.hash {
            st.info.hash_mode = s.hash as u8;
            maps.set_service(&st.key, &st.info)?;
        }
        st.cfg = s.clone();

        // New backends: allocate, resolve, publish their slot before the ring uses them.
        for b in &s.backends {
            let entry = match st.backends.get_mut(&b.address) {
                Some(e) => e,
                None => {
                    let id = self.backend_ids.alloc("backends")?;
                    st.backends.entry(b.address).or_insert(BackendState {
                        id,
                        address: b.address,
                        weight: b.weight,
                        mac: None,
                    })
                }
            };
            entry.weight = b.weight;
            if entry.mac.is_none() {
                match macs.resolve(b.address) {
                    Ok(mac) => {
                        entry.mac = Some(mac);
                        maps.set_backend(
                            entry.id,
                            &Backend {
                                addr: addr_of(b.address),
                                mac,
                                flags: BACKEND_F_VALID,
                                _pad: 0,
                            },
                        )?;
                    }
                    Err(e) => tracing::warn!(
                        service = %s.name, backend = %b.address,
                        "backend kept out of the table until its MAC resolves: {e:#}"
                    ),
                }
            }
        }

        // Rebuild the table from the wanted set and write only the slots that changed.
        let keys: Vec<(Vec<u8>, u32, u32)> = s
            .backends
            .iter()
            .filter_map(|b| {
                let e = &st.backends[&b.address];
                e.mac.map(|_| (addr_of(b.address).to_vec(), e.id, b.weight))
            })
            .collect();
        let entries: Vec<MaglevEntry> = keys
            .iter()
            .map(|(k, id, w)| MaglevEntry {
                key: k,
                id: *id,
                weight: *w,
            })
            .collect();
        let table = maglev::build_table(&entries, s.table_size);
        let changed = maglev::diff(&st.table, &table);
        maps.write_ring(st.info.ring_offset, &changed)?;
        st.table = table;

        // Backends no longer configured: the ring no longer points at them; invalidate them
        // so conntrack entries re-hash, then free the id.
        let gone: Vec<IpAddr> = st
            .backends
            .keys()
            .filter(|a| !s.backends.iter().any(|b| b.address == **a))
            .copied()
            .collect();
        for a in gone {
            let e = st.backends.remove(&a).expect("listed above");
            maps.set_backend(e.id, &Backend::default())?;
            self.backend_ids.release(e.id);
        }
        Ok(())
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
