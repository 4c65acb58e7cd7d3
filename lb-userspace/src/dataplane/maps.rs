//! The one write interface to the data plane's maps. The director is generic over it, so the
//! same code programs the kernel (`Dataplane`), the reference model (`Model`), both at once
//! (`Tee`, datapath tests) or nothing but the bounds (`DryRun`, rehearsing a change).

use anyhow::{ensure, Result};
use lb_common::{
    Addr, Backend, FarmConfig, GlobalConfig, ServiceInfo, ServiceKey, TunnelInfo, BACKEND_SLOTS,
    MAX_SERVICES,
};

/// Which per-id packet/byte counter array.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CounterKind {
    Service,
    Backend,
}

/// Write access to the data plane's maps.
pub trait Maps {
    fn set_config(&mut self, cfg: &GlobalConfig) -> Result<()>;
    /// Farm mode: this node's member slot.
    fn set_farm(&mut self, f: &FarmConfig) -> Result<()>;
    /// Program a service. Its address must be a VIP address already (`set_vip_addr`): the
    /// program passes the packets of any other address without looking up its services.
    fn set_service(&mut self, key: &ServiceKey, info: &ServiceInfo) -> Result<()>;
    fn remove_service(&mut self, key: &ServiceKey) -> Result<()>;
    fn set_vip_addr(&mut self, addr: &Addr) -> Result<()>;
    fn remove_vip_addr(&mut self, addr: &Addr) -> Result<()>;
    fn set_backend(&mut self, id: u32, b: &Backend) -> Result<()>;
    /// Write `(slot, backend id)` pairs into the ring starting at `offset`.
    fn write_ring(&mut self, offset: u32, slots: &[(u32, u32)]) -> Result<()>;
    /// Zero an id's packet/byte counters (the id is handed to a new service or backend).
    fn reset_counter(&mut self, kind: CounterKind, id: u32) -> Result<()>;
    /// Backend `backend` leaves `service` (already invalidated): its packet/byte counts move
    /// into the service's own slot, which keeps the service's total (see
    /// `Dataplane::service_counter`), and its slot is zeroed.
    fn retire_backend_counter(&mut self, service: u32, backend: u32) -> Result<()>;
    /// A tunnel service's outer-header parameters, by service id. The default writes
    /// nothing: for map sets without tunnels (a previous version's, in the benchmark).
    fn set_tunnel(&mut self, _service: u32, _t: &TunnelInfo) -> Result<()> {
        Ok(())
    }
}

/// Writes every update to two map sets: datapath tests program the kernel and the reference
/// model in one `apply` so both hold exactly the same state.
pub struct Tee<'a, A, B>(pub &'a mut A, pub &'a mut B);

macro_rules! tee {
    ($($name:ident($($arg:ident: $ty:ty),*);)*) => {
        impl<A: Maps, B: Maps> Maps for Tee<'_, A, B> {
            $(fn $name(&mut self, $($arg: $ty),*) -> Result<()> {
                self.0.$name($($arg),*)?;
                self.1.$name($($arg),*)
            })*
        }
    };
}

tee! {
    set_config(c: &GlobalConfig);
    set_farm(f: &FarmConfig);
    set_service(k: &ServiceKey, i: &ServiceInfo);
    remove_service(k: &ServiceKey);
    set_vip_addr(a: &Addr);
    remove_vip_addr(a: &Addr);
    set_backend(id: u32, b: &Backend);
    write_ring(o: u32, s: &[(u32, u32)]);
    reset_counter(kind: CounterKind, id: u32);
    retire_backend_counter(service: u32, backend: u32);
    set_tunnel(service: u32, t: &TunnelInfo);
}

/// A sink that writes nothing but refuses what the kernel maps would refuse (an index out of
/// range): a change is rehearsed on a copy of the director against it before the real maps
/// see a single write.
#[derive(Clone, Copy, Debug)]
pub struct DryRun {
    pub ring_slots: u32,
}

impl Maps for DryRun {
    fn set_config(&mut self, _: &GlobalConfig) -> Result<()> {
        Ok(())
    }
    fn set_farm(&mut self, _: &FarmConfig) -> Result<()> {
        Ok(())
    }
    fn set_service(&mut self, _: &ServiceKey, info: &ServiceInfo) -> Result<()> {
        ensure!(
            info.id < MAX_SERVICES,
            "service id {} out of range",
            info.id
        );
        Ok(())
    }
    fn remove_service(&mut self, _: &ServiceKey) -> Result<()> {
        Ok(())
    }
    fn set_vip_addr(&mut self, _: &Addr) -> Result<()> {
        Ok(())
    }
    fn remove_vip_addr(&mut self, _: &Addr) -> Result<()> {
        Ok(())
    }
    fn set_backend(&mut self, id: u32, _: &Backend) -> Result<()> {
        ensure!(id < BACKEND_SLOTS, "backend id {id} out of range");
        Ok(())
    }
    fn write_ring(&mut self, offset: u32, slots: &[(u32, u32)]) -> Result<()> {
        for &(slot, _) in slots {
            ensure!(
                (offset as u64 + slot as u64) < self.ring_slots as u64,
                "ring slot {} beyond the {}-slot ring",
                offset as u64 + slot as u64,
                self.ring_slots
            );
        }
        Ok(())
    }
    fn reset_counter(&mut self, _: CounterKind, _: u32) -> Result<()> {
        Ok(())
    }
    fn retire_backend_counter(&mut self, service: u32, backend: u32) -> Result<()> {
        ensure!(service < MAX_SERVICES, "service id {service} out of range");
        ensure!(backend < BACKEND_SLOTS, "backend id {backend} out of range");
        Ok(())
    }
    fn set_tunnel(&mut self, service: u32, _: &TunnelInfo) -> Result<()> {
        ensure!(service < MAX_SERVICES, "service id {service} out of range");
        Ok(())
    }
}
