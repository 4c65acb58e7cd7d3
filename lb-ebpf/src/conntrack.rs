//! Conntrack: the backend each flow was sent to, so established flows keep it when the ring
//! changes. Entries live until LRU eviction; UDP has no end of connection, so its entries also
//! expire once idle for `udp_timeout_ns`.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{CtEntry, FlowKey, Stat, PROTO_UDP};

use crate::maps::{count, CONNTRACK};

/// Timestamp for the flow's entry. Only UDP entries expire, so TCP skips the helper call and
/// stores 0.
#[inline(always)]
pub fn now(flow: &FlowKey) -> u64 {
    if flow.proto == PROTO_UDP {
        // SAFETY: helper without side effects.
        unsafe { bpf_ktime_get_ns() }
    } else {
        0
    }
}

/// The flow's entry, unless it is a UDP entry idle for longer than `udp_timeout`.
#[inline(always)]
pub fn lookup(flow: &FlowKey, now: u64, udp_timeout: u64) -> Option<&'static mut CtEntry> {
    let ct = CONNTRACK.get_ptr_mut(flow)?;
    // SAFETY: the LRU value stays valid for the duration of this program run.
    let ct = unsafe { &mut *ct };
    let live = flow.proto != PROTO_UDP || now.wrapping_sub(ct.last_seen_ns) <= udp_timeout;
    live.then_some(ct)
}

/// The flow keeps using its entry: restart a UDP entry's idle time.
#[inline(always)]
pub fn touch(ct: &mut CtEntry, flow: &FlowKey, now: u64) {
    if flow.proto == PROTO_UDP {
        ct.last_seen_ns = now;
    }
}

/// Remember that `flow` goes to `backend` (replacing any entry).
#[inline(always)]
pub fn insert(flow: &FlowKey, backend: u32, now: u64) {
    let entry = CtEntry {
        backend,
        _pad: 0,
        last_seen_ns: now,
    };
    if CONNTRACK.insert(flow, entry, 0).is_err() {
        count(Stat::CtInsertFail);
    }
}
