//! Every map of the program, one role comment each, and the counter helpers that write the
//! statistics maps. Userspace opens the maps by the names in `lb_common::maps`; each static
//! is declared through `maps!`, which checks its name against that constant at compile time.

use crate::parse::Aligned;
use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::bpf_xdp_get_buff_len,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::XdpContext,
};
use lb_common::{
    svc_drop_index, vip_filter_bit, Addr, Backend, ClockCache, Counter, CtEntry, CtKey, FarmConfig,
    FloodWindow, GlobalConfig, ServiceEntry, Stat, TunnelInfo, BACKEND_SLOTS, BPF_F_NO_COMMON_LRU,
    CT_MAX_ENTRIES, CT_SYNC_BYTES, DEFAULT_RING_SLOTS, MAX_SERVICES, MAX_VIP_ADDRS,
    SERVICE_DROP_REASONS, SERVICE_ENTRY_SLOTS, SERVICE_SLOTS, VIP_FILTER_WORDS,
};

/// Declares `#[map]` statics (aya-ebpf takes the map name from the static's identifier) and
/// fails the build if an identifier is not the `lb_common::maps` constant of the same name.
macro_rules! maps {
    ($($(#[doc = $doc:literal])* $name:ident: $ty:ty = $init:expr;)*) => {$(
        $(#[doc = $doc])*
        #[map]
        pub static $name: $ty = $init;
        lb_ebpf::check_name!($name, lb_common::maps::$name);
    )*};
}

maps! {
    /// Services by VIP, port (0 = any port) and protocol, read for every IP packet: an
    /// open-addressing table of `SERVICE_ENTRIES` indices + 1 (0 = empty) that the program
    /// probes from `service_slot` until a match or an empty slot.
    SERVICE_INDEX: Array<u32> = Array::with_max_entries(SERVICE_SLOTS, 0);
    /// The services' keys and `ServiceInfo`, two entries per service id (see
    /// `SERVICE_ENTRY_SLOTS`).
    SERVICE_ENTRIES: Array<ServiceEntry> = Array::with_max_entries(SERVICE_ENTRY_SLOTS, 0);
    /// Bitmap of the VIP addresses' `vip_filter_bit`s, read for every IP packet right after
    /// its IP header: a clear bit passes the packet as not ours before anything else is
    /// parsed or looked up. A set bit proves nothing (collisions): the lookups decide.
    VIP_FILTER: Array<u64> = Array::with_max_entries(VIP_FILTER_WORDS, 0);
    /// VIP addresses, consulted only on rare paths (fragments, options, truncated L4) to
    /// decide between "drop, it was for us" and "pass, not ours".
    VIP_ADDRS: HashMap<Addr, u32> = HashMap::with_max_entries(MAX_VIP_ADDRS, 0);
    /// All services' Maglev tables back to back; `ServiceInfo::ring_offset` locates each.
    /// Slots hold backend ids (farm: member slots); the loader sizes it to the config.
    RING: Array<u32> = Array::with_max_entries(DEFAULT_RING_SLOTS, 0);
    /// Backend id -> MAC and validity; farm members follow the director's backends.
    BACKENDS: Array<Backend> = Array::with_max_entries(BACKEND_SLOTS, 0);
    /// Flow (`FlowKey::ct_key`) -> the backend it was sent to, so established flows
    /// survive ring changes. Per-CPU LRU lists; UDP entries also expire after
    /// `udp_timeout_ns` idle.
    CONNTRACK: LruHashMap<CtKey, CtEntry> =
        LruHashMap::with_max_entries(CT_MAX_ENTRIES, BPF_F_NO_COMMON_LRU);
    /// Single entry: the settings a reload may change (UDP idle timeout, flood guard rate,
    /// conntrack sync), read only by the paths that use them.
    CONFIG: Array<GlobalConfig> = Array::with_max_entries(1, 0);
    /// Per-CPU packet counts by `Stat`: one exit reason per packet plus conntrack events.
    STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Stat::COUNT, 0);
    /// Per-CPU packets/bytes by `ServiceInfo::id`: a farm service's deliveries; a director
    /// service's removed backends' traffic (userspace folds it in; the program counts
    /// forwarded frames only in `BACKEND_STATS`).
    SVC_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);
    /// Per-CPU drops of the reasons in `SERVICE_DROP_REASONS`, by service id
    /// (`svc_drop_index`): consulted only on those drop paths.
    SVC_DROPS: PerCpuArray<u64> =
        PerCpuArray::with_max_entries(MAX_SERVICES * SERVICE_DROP_REASONS.len() as u32, 0);
    /// Per-CPU packets/bytes forwarded or delivered, by backend id (farm: member slot).
    BACKEND_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(BACKEND_SLOTS, 0);
    /// Farm mode: this node's member slot (consulted only on the farm branch).
    FARM: Array<FarmConfig> = Array::with_max_entries(1, 0);
    /// The program's clock, per CPU: the coarse clock as read at the current jiffy (see
    /// `conntrack::clock_ns`). Only the program uses it (not pinned: it lives with the
    /// program).
    CLOCK: PerCpuArray<ClockCache> = PerCpuArray::with_max_entries(1, 0);
    /// Flood guard: per CPU, the new conntrack entries of the current second (consulted
    /// only when a flow is about to be inserted).
    FLOOD: PerCpuArray<FloodWindow> = PerCpuArray::with_max_entries(1, 0);
    /// Tunnel services' outer-header parameters by `ServiceInfo::id` (consulted only on the
    /// tunnel branch of `forward`).
    TUNNELS: Array<TunnelInfo> = Array::with_max_entries(MAX_SERVICES, 0);
    /// Conntrack sync: the entries the program makes (`CtSyncEvent`), written only while
    /// `GlobalConfig::sync` is set; the daemon reads them and sends them to its peers.
    CT_SYNC: RingBuf = RingBuf::with_byte_size(CT_SYNC_BYTES, 0);
}

/// The interface's MAC, set by the loader (`lb_common::maps::OWN_MAC`): a constant of the
/// loaded program, so the paths that only need it (a TCP conntrack hit) look nothing up.
#[unsafe(no_mangle)]
static OWN_MAC: Aligned<[u8; 8]> = Aligned([0; 8]);
lb_ebpf::check_name!(OWN_MAC, lb_common::maps::OWN_MAC);

/// The interface's MAC as its first 4 and last 2 bytes, read volatile: the compiler would
/// otherwise fold the static's zeros into the code, and the loader's value never be used.
#[inline(always)]
fn own_mac_words() -> (u32, u16) {
    let p = &OWN_MAC as *const Aligned<[u8; 8]> as *const u8;
    // SAFETY: in bounds of the 8-aligned 8-byte static.
    unsafe {
        (
            core::ptr::read_volatile(p as *const u32),
            core::ptr::read_volatile(p.add(4) as *const u16),
        )
    }
}

/// Store the interface's MAC at `p + off`.
///
/// # Safety
/// `p + off .. + 6` lies in bounds-checked packet memory.
#[inline(always)]
pub unsafe fn put_own_mac(p: *mut u8, off: usize) {
    let (hi, lo) = own_mac_words();
    // SAFETY: per the contract; unaligned stores.
    unsafe {
        core::ptr::write_unaligned(p.add(off) as *mut u32, hi);
        core::ptr::write_unaligned(p.add(off + 4) as *mut u16, lo);
    }
}

/// Whether `m` is the interface's MAC.
#[inline(always)]
pub fn is_own_mac(m: &[u8; 6]) -> bool {
    let (hi, lo) = own_mac_words();
    let p = m.as_ptr();
    // SAFETY: 6 bytes; unaligned loads.
    unsafe {
        core::ptr::read_unaligned(p as *const u32) == hi
            && core::ptr::read_unaligned(p.add(4) as *const u16) == lo
    }
}

/// The `CONFIG` entry, for the paths that need the runtime settings (UDP timeout, flood
/// guard, sync); zeroes if it were missing (it cannot be: an array's entries always exist).
#[inline(always)]
pub fn config() -> GlobalConfig {
    CONFIG.get(0).copied().unwrap_or_default()
}

/// Whether `addr` may be a VIP address (its `VIP_FILTER` bit is set).
#[inline(always)]
pub fn maybe_vip(addr: &Addr) -> bool {
    let bit = vip_filter_bit(addr);
    match VIP_FILTER.get(bit / 64) {
        Some(w) => w & (1 << (bit % 64)) != 0,
        None => true,
    }
}

/// Bump a `STATS` counter.
#[inline(always)]
pub fn count(s: Stat) {
    if let Some(p) = STATS.get_ptr_mut(s as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *p += 1 };
    }
}

/// Exit with `action`, counting `reason`: every exit path goes through here exactly once.
#[inline(always)]
pub fn verdict(reason: Stat, action: u32) -> u32 {
    count(reason);
    action
}

/// Drop a packet of service `svc` for `reason`, counted globally and, for the reasons in
/// `SERVICE_DROP_REASONS`, per service.
#[inline(always)]
pub fn drop_for(svc: u32, reason: Stat) -> u32 {
    if let Some(r) = reason.service_drop() {
        if let Some(p) = SVC_DROPS.get_ptr_mut(svc_drop_index(svc, r)) {
            // SAFETY: per-CPU slot.
            unsafe { *p += 1 };
        }
    }
    verdict(reason, xdp_action::XDP_DROP)
}

/// Count the frame, as it leaves for backend `id`, in that backend's counters: a director
/// service's traffic is the sum of its backends' (userspace adds them up, and folds a
/// removed backend's counts into the service's `SVC_STATS` slot), so one counter access
/// serves both.
#[inline(always)]
pub fn account(ctx: &XdpContext, id: u32) {
    add(&BACKEND_STATS, id, frame_len(ctx));
}

/// Count a frame delivered locally (farm) in its service's and member slot's counters: a
/// member slot serves every farm service, so the service keeps its own count.
#[inline(always)]
pub fn account_delivered(ctx: &XdpContext, svc: u32, member: u32) {
    let bytes = frame_len(ctx);
    add(&SVC_STATS, svc, bytes);
    add(&BACKEND_STATS, member, bytes);
}

/// The whole frame: `data_end - data` is only the first buffer of a multi-buffer frame.
#[inline(always)]
fn frame_len(ctx: &XdpContext) -> u64 {
    // SAFETY: read-only helper on the program's own context.
    unsafe { bpf_xdp_get_buff_len(ctx.ctx) }
}

#[inline(always)]
fn add(map: &PerCpuArray<Counter>, idx: u32, bytes: u64) {
    if let Some(p) = map.get_ptr_mut(idx) {
        // SAFETY: per-CPU slot.
        unsafe {
            (*p).packets += 1;
            (*p).bytes += bytes;
        }
    }
}
