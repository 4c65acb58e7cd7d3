//! Programs for `cargo xtask bench`, built into their own object next to farmlb's.
//!
//! - `reference_xdp`: the least a direct-routing balancer does per packet — parse Ethernet and
//!   the IPv4/IPv6 header, swap the MACs, `XDP_TX` — the baseline farmlb's per-packet cost is
//!   compared with. Swapping the MACs leaves a packet that is still valid input, so it can be
//!   timed with a large `BPF_PROG_TEST_RUN` repeat count, like farmlb's DR rewrite.
//! - `bench_gen_xdp`: the traffic generator of the forwarding benchmark, run with live frames
//!   (`BPF_F_TEST_XDP_LIVE_FRAMES`) in the client namespace: it gives each frame (Ethernet +
//!   IPv4 without options + UDP) the MACs in `GEN_MACS` and one of 1024 source ports, so the
//!   balancers see many flows, and transmits it (`XDP_TX` out of the device named in the
//!   context). Live-frame pages are recycled without being reset, and a balancer that rewrites
//!   MACs in place writes into them, so the generator rewrites both MACs every time.
//! - `bench_redirect_xdp`: on the client's switch port, hands every frame straight to the
//!   director's switch port (`bpf_redirect` to `REDIRECT_IFINDEX`), so generated frames reach
//!   the director as raw frames, as from a NIC, instead of as bridged socket buffers.
//! - `bench_sink_xdp`: drops everything; on the director's switch port during the saturation
//!   sweep, so the director's output costs the generator's CPU as little as possible.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod prog {
    use aya_ebpf::{
        bindings::xdp_action,
        helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_redirect},
        macros::{map, xdp},
        maps::{Array, LruHashMap},
        programs::XdpContext,
    };
    use lb_common::{
        v4_mapped, CtEntry, CtKey, FlowKey, BPF_F_NO_COMMON_LRU, CT_MAX_ENTRIES, PROTO_TCP,
        PROTO_UDP,
    };

    const ETH_HLEN: usize = 14;
    const ETH_P_IP: u16 = 0x0800;
    const ETH_P_IPV6: u16 = 0x86dd;
    /// Source ports used by the generator: `GEN_PORT_BASE + (random & GEN_PORT_MASK)`.
    const GEN_PORT_BASE: u16 = 20000;
    const GEN_PORT_MASK: u32 = 1023;

    /// Destination then source MAC of the generator's frames, set by the loader
    /// (`EbpfLoader::override_global`).
    #[unsafe(no_mangle)]
    static GEN_MACS: [u8; 12] = [0; 12];

    /// Pacing of the generator, set by the loader: at most one frame per this many ns, the
    /// others dropped (0: every frame sent). A live-frames call costs a fixed ~20 ms (the
    /// kernel sets up and tears down a page pool per call), so calls must be long and the
    /// rate is kept inside the program.
    #[unsafe(no_mangle)]
    static GEN_INTERVAL_NS: u64 = 0;
    /// Frames a paced generator that fell behind may send at once to catch up; further
    /// behind (between calls), it starts again from now.
    const GEN_CATCH_UP: u64 = 64;

    /// The paced generator's state: the send time of its next frame (`bpf_ktime_get_ns`)
    /// and the frames already due. The clock is read only when nothing is due, so near its
    /// top rate the generator reads it once per burst, not once per frame.
    #[repr(C)]
    pub struct GenPace {
        next_ns: u64,
        due: u64,
    }
    #[map]
    static GEN_PACE: Array<GenPace> = Array::with_max_entries(1, 0);

    #[xdp]
    pub fn reference_xdp(ctx: XdpContext) -> u32 {
        let start = ctx.data();
        let end = ctx.data_end();
        if start + ETH_HLEN > end {
            return xdp_action::XDP_PASS;
        }
        let p = start as *mut u8;
        // SAFETY: the Ethernet header is bounds-checked above.
        let eth_type = unsafe { u16::from_be_bytes([*p.add(12), *p.add(13)]) };
        let (ip_len, version) = match eth_type {
            ETH_P_IP => (20, 4),
            ETH_P_IPV6 => (40, 6),
            _ => return xdp_action::XDP_PASS,
        };
        if start + ETH_HLEN + ip_len > end {
            return xdp_action::XDP_PASS;
        }
        // SAFETY: the IP header is bounds-checked above.
        if unsafe { *p.add(ETH_HLEN) } >> 4 != version {
            return xdp_action::XDP_PASS;
        }
        // SAFETY: the Ethernet header is bounds-checked above.
        unsafe { swap_macs(p) };
        xdp_action::XDP_TX
    }

    /// The floors' conntrack: farmlb's key, value and flags (the loader sets its size). The
    /// floors look up no service, so their keys' `svc` is 0.
    #[map]
    static FLOOR_CT: LruHashMap<CtKey, CtEntry> =
        LruHashMap::with_max_entries(CT_MAX_ENTRIES, BPF_F_NO_COMMON_LRU);

    /// Ethernet + IPv4 (no options) or IPv6 (no extension headers) + TCP/UDP ports → the
    /// flow's key; `None` for anything else.
    #[inline(always)]
    fn flow(ctx: &XdpContext) -> Option<FlowKey> {
        let start = ctx.data();
        let end = ctx.data_end();
        if start + ETH_HLEN > end {
            return None;
        }
        let p = start as *const u8;
        // SAFETY: the Ethernet header is bounds-checked above.
        let eth_type = unsafe { u16::from_be_bytes([*p.add(12), *p.add(13)]) };
        let ip = ETH_HLEN;
        let (src, dst, proto, l4) = match eth_type {
            ETH_P_IP => {
                if start + ip + 20 > end {
                    return None;
                }
                // SAFETY: the 20-byte IPv4 header is bounds-checked above.
                unsafe {
                    if *p.add(ip) != 0x45 {
                        return None;
                    }
                    let src = core::ptr::read_unaligned(p.add(ip + 12) as *const [u8; 4]);
                    let dst = core::ptr::read_unaligned(p.add(ip + 16) as *const [u8; 4]);
                    (v4_mapped(src), v4_mapped(dst), *p.add(ip + 9), ip + 20)
                }
            }
            ETH_P_IPV6 => {
                if start + ip + 40 > end {
                    return None;
                }
                // SAFETY: the 40-byte IPv6 header is bounds-checked above.
                unsafe {
                    if *p.add(ip) >> 4 != 6 {
                        return None;
                    }
                    let src = core::ptr::read_unaligned(p.add(ip + 8) as *const [u8; 16]);
                    let dst = core::ptr::read_unaligned(p.add(ip + 24) as *const [u8; 16]);
                    (src, dst, *p.add(ip + 6), ip + 40)
                }
            }
            _ => return None,
        };
        if proto != PROTO_TCP && proto != PROTO_UDP {
            return None;
        }
        if start + l4 + 4 > end {
            return None;
        }
        // SAFETY: the ports are bounds-checked above.
        let (sport, dport) = unsafe {
            (
                u16::from_be_bytes([*p.add(l4), *p.add(l4 + 1)]),
                u16::from_be_bytes([*p.add(l4 + 2), *p.add(l4 + 3)]),
            )
        };
        Some(FlowKey::new(src, dst, sport, dport, proto))
    }

    /// Swap destination and source MAC.
    ///
    /// # Safety
    /// `p` points at an Ethernet header inside the frame (12 bytes bounds-checked).
    #[inline(always)]
    unsafe fn swap_macs(p: *mut u8) {
        // SAFETY: per the contract; unaligned accesses.
        unsafe {
            let dst = core::ptr::read_unaligned(p as *const [u8; 6]);
            let src = core::ptr::read_unaligned(p.add(6) as *const [u8; 6]);
            core::ptr::write_unaligned(p as *mut [u8; 6], src);
            core::ptr::write_unaligned(p.add(6) as *mut [u8; 6], dst);
        }
    }

    /// Swap the MACs and transmit (the frame was bounds-checked by `flow`).
    #[inline(always)]
    fn swap_tx(ctx: &XdpContext) -> u32 {
        let start = ctx.data();
        if start + ETH_HLEN > ctx.data_end() {
            return xdp_action::XDP_PASS;
        }
        let p = start as *mut u8;
        // SAFETY: the Ethernet header is bounds-checked above.
        unsafe { swap_macs(p) };
        xdp_action::XDP_TX
    }

    #[xdp]
    pub fn floor_hit_xdp(ctx: XdpContext) -> u32 {
        let Some(key) = flow(&ctx) else {
            return xdp_action::XDP_PASS;
        };
        // SAFETY: read-only lookup of a plain value.
        match unsafe { FLOOR_CT.get(key.ct_key()) } {
            Some(ct) if ct.backend != 0 => swap_tx(&ctx),
            _ => xdp_action::XDP_PASS,
        }
    }

    #[xdp]
    pub fn floor_insert_xdp(ctx: XdpContext) -> u32 {
        let Some(key) = flow(&ctx) else {
            return xdp_action::XDP_PASS;
        };
        let entry = CtEntry {
            backend: 1,
            _pad: 0,
            last_seen_ns: 0,
        };
        if FLOOR_CT.insert(key.ct_key(), entry, 0).is_err() {
            return xdp_action::XDP_PASS;
        }
        swap_tx(&ctx)
    }

    #[xdp]
    pub fn bench_gen_xdp(ctx: XdpContext) -> u32 {
        // SAFETY: plain read-only global, read volatile so the loader's value is used.
        let interval = unsafe { core::ptr::read_volatile(&GEN_INTERVAL_NS) };
        if let Some(step) = core::num::NonZeroU64::new(interval) {
            let Some(st) = GEN_PACE.get_ptr_mut(0) else {
                return xdp_action::XDP_DROP;
            };
            // SAFETY: one generator thread uses the slot; helper without side effects.
            let st = unsafe { &mut *st };
            if st.due == 0 {
                let now = unsafe { bpf_ktime_get_ns() };
                if now < st.next_ns {
                    return xdp_action::XDP_DROP;
                }
                let behind = (now - st.next_ns) / step + 1;
                if behind > GEN_CATCH_UP {
                    st.due = GEN_CATCH_UP;
                    st.next_ns = now + interval;
                } else {
                    st.due = behind;
                    st.next_ns += behind * interval;
                }
            }
            st.due -= 1;
        }
        let start = ctx.data();
        // Ethernet + IPv4 (no options) + UDP source port.
        let sport = ETH_HLEN + 20;
        if start + sport + 2 > ctx.data_end() {
            return xdp_action::XDP_DROP;
        }
        // SAFETY: helper without side effects.
        let r = unsafe { bpf_get_prandom_u32() } & GEN_PORT_MASK;
        let port = (GEN_PORT_BASE + r as u16).to_be_bytes();
        let p = start as *mut u8;
        // SAFETY: bounds-checked above (the MACs lie before the port); GEN_MACS is a plain
        // read-only global, read volatile so the loader's value is used.
        unsafe {
            let macs = core::ptr::read_volatile(&GEN_MACS);
            core::ptr::write_unaligned(p as *mut [u8; 12], macs);
            *p.add(sport) = port[0];
            *p.add(sport + 1) = port[1];
        }
        xdp_action::XDP_TX
    }

    /// Interface `bench_redirect_xdp` sends every frame to, set by the loader.
    #[unsafe(no_mangle)]
    static REDIRECT_IFINDEX: u32 = 0;

    #[xdp]
    pub fn bench_redirect_xdp(_ctx: XdpContext) -> u32 {
        // SAFETY: plain read-only global; helper call with valid arguments.
        unsafe { bpf_redirect(core::ptr::read_volatile(&REDIRECT_IFINDEX), 0) as u32 }
    }

    #[xdp]
    pub fn bench_sink_xdp(_ctx: XdpContext) -> u32 {
        xdp_action::XDP_DROP
    }
}

lb_ebpf::bpf_boilerplate!();
