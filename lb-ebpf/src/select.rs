//! Which service a packet is for, and which backend gets it. Whoever decides that a backend is
//! valid looks its entry up, once, and hands it on in a [`Dst`] (as Katran's `get_packet_dst`).

use lb_common::{
    service_slot, Backend, FlowKey, ServiceInfo, ServiceKey, Stat, BACKEND_F_VALID, MEMBER_OWNER,
    NO_BACKEND, SERVICE_PROBES, SERVICE_SLOTS,
};

use crate::{
    conntrack,
    maps::{BACKENDS, RING, SERVICE_ENTRIES, SERVICE_INDEX},
};

/// A valid backend: its id (`BACKENDS` index; farm: member slot) and its entry.
pub struct Dst {
    pub id: u32,
    pub backend: &'static Backend,
}

/// The service `flow` is addressed to: the exact port's, else the port-wildcard one.
#[inline(always)]
pub fn service(flow: &FlowKey) -> Option<ServiceInfo> {
    let mut key = ServiceKey::new(flow.dst, flow.dport, flow.proto).words();
    if let Some(s) = find_service(&key) {
        return Some(s);
    }
    key[4] &= !0xffff;
    find_service(&key)
}

/// Walk `SERVICE_INDEX` from the key's home slot to its entry or the first empty slot.
#[inline(always)]
fn find_service(key: &[u32; 5]) -> Option<ServiceInfo> {
    let home = service_slot(key);
    for i in 0..SERVICE_PROBES {
        let at = *SERVICE_INDEX.get((home + i) & (SERVICE_SLOTS - 1))?;
        if at == 0 {
            return None;
        }
        let e = SERVICE_ENTRIES.get(at - 1)?;
        // Word by word: an array `==` may become a `bcmp` call, which BPF does not have.
        let k = &e.key;
        if k[0] == key[0] && k[1] == key[1] && k[2] == key[2] && k[3] == key[3] && k[4] == key[4] {
            return Some(e.info);
        }
    }
    None
}

/// Conntrack first (except for SYNs, which always re-hash so a reused tuple follows the current
/// table), then the service's Maglev ring. Counts nothing: the conntrack outcome (`CtHit`,
/// `CtMissSyn`, `CtMissOther`) comes back for the caller to count with its verdict, in one
/// slot when the packet is forwarded (`Stat::forwarded`).
#[inline(always)]
pub fn backend(svc: &ServiceInfo, flow: &FlowKey, is_syn: bool) -> (Option<Dst>, Stat) {
    let now = conntrack::now(flow);
    let outcome = if is_syn {
        Stat::CtMissSyn
    } else {
        if let Some(ct) = conntrack::lookup(flow, now) {
            // An entry whose backend went away falls through and re-hashes.
            if let Some(dst) = valid_for(svc, ct.backend) {
                conntrack::touch(ct, flow, now);
                return (Some(dst), Stat::CtHit);
            }
        }
        Stat::CtMissOther
    };
    let id = ring_slot(svc, flow);
    // Recorded even if the backend turns out invalid (the model does the same).
    if id != NO_BACKEND {
        conntrack::insert(flow, id, now);
    }
    (valid(id), outcome)
}

/// The backend a flow's packets go to now, without recording anything (ICMP errors about
/// the flow): its live conntrack entry's, else the ring's. Counts nothing.
#[inline(always)]
pub fn existing(svc: &ServiceInfo, flow: &FlowKey) -> Option<Dst> {
    let now = conntrack::now(flow);
    if let Some(ct) = conntrack::lookup(flow, now) {
        if let Some(dst) = valid_for(svc, ct.backend) {
            return Some(dst);
        }
    }
    ring_owner(svc, flow)
}

/// The ring's choice alone, bypassing conntrack (farm TCP SYNs).
#[inline(always)]
pub fn ring_owner(svc: &ServiceInfo, flow: &FlowKey) -> Option<Dst> {
    valid(ring_slot(svc, flow))
}

/// Backend id in the flow's ring slot, `NO_BACKEND` if the service has none.
#[inline(always)]
fn ring_slot(svc: &ServiceInfo, flow: &FlowKey) -> u32 {
    match svc.ring_index(flow).and_then(|i| RING.get(i)) {
        Some(id) => *id,
        None => NO_BACKEND,
    }
}

/// Backend `id` of a conntrack entry, if it may take traffic and is `svc`'s (farm: a
/// member slot). An entry outlives its service and backend, and ids are reused: a stale
/// entry must not send a flow to a backend of another service.
#[inline(always)]
fn valid_for(svc: &ServiceInfo, id: u32) -> Option<Dst> {
    let dst = valid(id)?;
    let owner = dst.backend.service;
    (owner == svc.id || owner == MEMBER_OWNER).then_some(dst)
}

/// Backend `id` with its entry, if it may take traffic.
#[inline(always)]
fn valid(id: u32) -> Option<Dst> {
    if id == NO_BACKEND {
        return None;
    }
    let backend = BACKENDS.get(id)?;
    (backend.flags & BACKEND_F_VALID != 0).then_some(Dst { id, backend })
}
