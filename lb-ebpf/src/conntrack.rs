//! Conntrack: the backend each flow was sent to, so established flows keep it when the ring
//! changes. Entries live until LRU eviction; UDP has no end of connection, so its entries also
//! expire once idle for `udp_timeout_ns`.

use aya_ebpf::helpers::generated::{bpf_jiffies64, bpf_ktime_get_coarse_ns};
use lb_common::{
    ClockCache, CtEntry, CtSyncEvent, FlowKey, GlobalConfig, Stat, FLOOD_CLOCK_EVERY, PROTO_UDP,
};

use crate::maps::{config, count, CLOCK, CONNTRACK, CT_SYNC, FLOOD};

/// `BPF_RB_NO_WAKEUP`: the daemon reads the ring on a timer, so no event pays for a wakeup.
const BPF_RB_NO_WAKEUP: u64 = 1;

/// The program's clock: `CLOCK_MONOTONIC_COARSE` (userspace's `monotonic_ns`). It lags the
/// fine clock by at most a tick, which idle timeouts, one-second flood windows and leases do
/// not notice. Reading it costs about 20 ns here (half of `bpf_ktime_get_ns`, which reads
/// the clocksource); it changes only at a tick, so it is read once per jiffy and CPU
/// (`bpf_jiffies64` is a plain load) and kept in `CLOCK`. The tick bumps jiffies just before
/// the coarse clock: a read in between keeps the previous tick's value one tick longer.
#[inline(always)]
pub fn clock_ns() -> u64 {
    // SAFETY: helper without side effects.
    let jiffies = unsafe { bpf_jiffies64() };
    match CLOCK.get_ptr_mut(0) {
        Some(c) => {
            // SAFETY: per-CPU slot, no concurrent writer on this CPU.
            let c = unsafe { &mut *c };
            if c.jiffies != jiffies {
                *c = ClockCache {
                    jiffies,
                    ns: coarse_ns(),
                };
            }
            c.ns
        }
        None => coarse_ns(),
    }
}

#[inline(always)]
fn coarse_ns() -> u64 {
    // SAFETY: helper without side effects.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Timestamp for the flow's entry. Only UDP entries expire, so TCP skips the helper call and
/// stores 0.
#[inline(always)]
pub fn now(flow: &FlowKey) -> u64 {
    if flow.proto == PROTO_UDP {
        clock_ns()
    } else {
        0
    }
}

/// The flow's entry (`flow.svc` set), unless it is a UDP entry idle for longer than
/// `udp_timeout_ns` (read from `CONFIG` for UDP only).
#[inline(always)]
pub fn lookup(flow: &FlowKey, now: u64) -> Option<&'static mut CtEntry> {
    let ct = CONNTRACK.get_ptr_mut(flow.ct_key())?;
    // SAFETY: the LRU value stays valid for the duration of this program run.
    let ct = unsafe { &mut *ct };
    // Saturating: an entry stamped ahead of this clock (a peer's, by conntrack sync) is fresh.
    let live =
        flow.proto != PROTO_UDP || now.saturating_sub(ct.last_seen_ns) <= config().udp_timeout_ns;
    live.then_some(ct)
}

/// The flow keeps using its entry: restart a UDP entry's idle time.
#[inline(always)]
pub fn touch(ct: &mut CtEntry, flow: &FlowKey, now: u64) {
    if flow.proto == PROTO_UDP {
        ct.last_seen_ns = now;
    }
}

/// Remember that `flow` (`svc` set) goes to `backend`. An entry the flow already has (a SYN reusing a
/// tuple, an expired or orphaned entry) is rewritten in place: an LRU update would take a
/// fresh node and could evict another flow. Above `flood_rate` new entries per second on
/// this CPU the flow is not remembered (counted): a flood of new flows must not evict the
/// established ones. With sync on, every entry made or rewritten is published (`CT_SYNC`).
#[inline(always)]
pub fn insert(flow: &FlowKey, backend: u32, now: u64) {
    let cfg = &config();
    if let Some(ct) = CONNTRACK.get_ptr_mut(flow.ct_key()) {
        // SAFETY: the LRU value stays valid for the duration of this program run.
        let ct = unsafe { &mut *ct };
        ct.backend = backend;
        ct.last_seen_ns = now;
        publish(cfg, flow, backend);
        return;
    }
    if flooded(cfg.flood_rate) {
        count(Stat::CtFloodSkip);
        return;
    }
    let entry = CtEntry {
        backend,
        _pad: 0,
        last_seen_ns: now,
    };
    if CONNTRACK.insert(flow.ct_key(), entry, 0).is_err() {
        count(Stat::CtInsertFail);
        return;
    }
    publish(cfg, flow, backend);
}

/// Conntrack sync: hand the entry to the daemon; a full ring drops it (counted), and a peer
/// that takes the flow over then hashes it on its ring.
#[inline(always)]
fn publish(cfg: &GlobalConfig, flow: &FlowKey, backend: u32) {
    if cfg.sync == 0 {
        return;
    }
    let ev = CtSyncEvent {
        flow: *flow,
        backend,
        _pad: 0,
    };
    if CT_SYNC
        .output::<CtSyncEvent>(&ev, BPF_RB_NO_WAKEUP)
        .is_err()
    {
        count(Stat::CtSyncDrop);
    }
}

/// Count one new entry in this CPU's one-second window; whether it is over `rate`.
///
/// Even cached, the clock is a helper call and a map access, so it is read only where the
/// answer can change: at a window's first entry, every [`FLOOD_CLOCK_EVERY`] entries, and
/// once over `rate`. A window thus ends at the first check after its second is up.
#[inline(always)]
fn flooded(rate: u32) -> bool {
    if rate == 0 {
        return false;
    }
    let Some(w) = FLOOD.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: per-CPU slot, no concurrent writer on this CPU.
    let w = unsafe { &mut *w };
    w.count += 1;
    if w.count == 1 || w.count > rate as u64 || w.count % FLOOD_CLOCK_EVERY == 0 {
        let now = clock_ns();
        if w.count == 1 || now.wrapping_sub(w.start_ns) >= 1_000_000_000 {
            w.start_ns = now;
            w.count = 1;
        }
    }
    w.count > rate as u64
}
