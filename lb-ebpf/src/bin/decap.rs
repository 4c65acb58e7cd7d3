//! `farmlb decap`'s program, on a backend: strips the outer headers of IP-in-IP (IPv4 or IPv6
//! outer, protocol 4 or 41) and GUE (variant 1: UDP to `gue_port`, the inner IP packet right
//! behind the UDP header) addressed to this host, and passes the inner packet to the stack,
//! which delivers it to the VIP held on `lo` as in direct routing. It needs no `ipip` / `fou`
//! kernel module. Everything else passes untouched; a tunnel packet to this host whose inner
//! packet does not check out is dropped. One `DECAP_STATS` counter per packet.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod prog {
    use aya_ebpf::{
        bindings::xdp_action,
        helpers::generated::bpf_xdp_adjust_head,
        macros::{map, xdp},
        maps::{Array, HashMap, PerCpuArray},
        programs::XdpContext,
    };
    use lb_common::{
        v4_mapped,
        wire::{ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6},
        Addr, DecapConfig, DecapStat, IPPROTO_IPIP, IPPROTO_IPV6, PROTO_UDP,
    };

    /// This host's addresses: only tunnel packets to one of them are stripped.
    #[map]
    static DECAP_ADDRS: HashMap<Addr, u32> = HashMap::with_max_entries(1024, 0);
    lb_ebpf::check_name!(DECAP_ADDRS, lb_common::maps::DECAP_ADDRS);
    /// Single entry: the GUE port.
    #[map]
    static DECAP_CONFIG: Array<DecapConfig> = Array::with_max_entries(1, 0);
    lb_ebpf::check_name!(DECAP_CONFIG, lb_common::maps::DECAP_CONFIG);
    /// Per-CPU packet counts by `DecapStat`.
    #[map]
    static DECAP_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DecapStat::COUNT, 0);
    lb_ebpf::check_name!(DECAP_STATS, lb_common::maps::DECAP_STATS);

    // Multi-buffer safe: only the first buffer's headers are read and removed.
    #[xdp(frags)]
    pub fn farmlb_decap(ctx: XdpContext) -> u32 {
        let (action, stat) = decap(&ctx);
        if let Some(p) = DECAP_STATS.get_ptr_mut(stat as u32) {
            // SAFETY: per-CPU slot, no concurrent writer on this CPU.
            unsafe { *p += 1 };
        }
        action
    }
    lb_ebpf::check_name!(farmlb_decap, lb_common::maps::DECAP_PROGRAM);

    const PASS: u32 = xdp_action::XDP_PASS;
    const DROP: u32 = xdp_action::XDP_DROP;

    /// # Safety
    /// `p` and `p + 1` are bounds-checked packet bytes.
    #[inline(always)]
    unsafe fn be16(p: *const u8) -> u16 {
        // SAFETY: per the contract.
        unsafe { u16::from_be_bytes(core::ptr::read_unaligned(p as *const [u8; 2])) }
    }

    #[inline(always)]
    fn decap(ctx: &XdpContext) -> (u32, DecapStat) {
        let (start, end) = (ctx.data(), ctx.data_end());
        if start + 18 > end {
            return (PASS, DecapStat::PassNotTunnel);
        }
        let p = start as *const u8;
        // SAFETY: 18 bytes checked above.
        let et = unsafe { be16(p.add(12)) };
        if et == ETH_P_8021Q {
            let et = unsafe { be16(p.add(16)) };
            outer::<18>(ctx, et)
        } else {
            outer::<14>(ctx, et)
        }
    }

    #[inline(always)]
    fn outer<const L2: usize>(ctx: &XdpContext, et: u16) -> (u32, DecapStat) {
        match et {
            ETH_P_IP => outer_ip::<L2, false>(ctx),
            ETH_P_IPV6 => outer_ip::<L2, true>(ctx),
            _ => (PASS, DecapStat::PassNotTunnel),
        }
    }

    /// The outer IP header (`V6` or IPv4 without options) and, for UDP, the port: is this a
    /// tunnel packet for us, and which kind.
    #[inline(always)]
    fn outer_ip<const L2: usize, const V6: bool>(ctx: &XdpContext) -> (u32, DecapStat) {
        let ip_len = if V6 { 40 } else { 20 };
        let (start, end) = (ctx.data(), ctx.data_end());
        // The outer IP header plus a UDP header (or the inner header's first bytes).
        if start + L2 + ip_len + 8 > end {
            return (PASS, DecapStat::PassNotTunnel);
        }
        // SAFETY: every read below lies within the bytes checked above.
        let (proto, dst, payload, frag) = unsafe {
            let ip = (start + L2) as *const u8;
            if V6 {
                if *ip >> 4 != 6 {
                    return (PASS, DecapStat::PassNotTunnel);
                }
                let dst = core::ptr::read_unaligned(ip.add(24) as *const Addr);
                (*ip.add(6), dst, be16(ip.add(4)) as usize, false)
            } else {
                if *ip != 0x45 {
                    return (PASS, DecapStat::PassNotTunnel);
                }
                let dst = v4_mapped(core::ptr::read_unaligned(ip.add(16) as *const [u8; 4]));
                let tot = be16(ip.add(2)) as usize;
                (
                    *ip.add(9),
                    dst,
                    tot.wrapping_sub(20),
                    be16(ip.add(6)) & 0x3fff != 0,
                )
            }
        };
        let gue = match proto {
            IPPROTO_IPIP | IPPROTO_IPV6 => false,
            PROTO_UDP => {
                let port = DECAP_CONFIG.get(0).map_or(0, |c| c.gue_port);
                // SAFETY: the UDP header lies within the bytes checked above.
                let dport = unsafe { be16((start + L2 + ip_len + 2) as *const u8) };
                if port == 0 || dport != port {
                    return (PASS, DecapStat::PassNotTunnel);
                }
                true
            }
            _ => return (PASS, DecapStat::PassNotTunnel),
        };
        // SAFETY: read-only lookup of a plain value.
        if unsafe { DECAP_ADDRS.get(dst) }.is_none() {
            return (PASS, DecapStat::PassNotLocal);
        }
        if frag {
            return (PASS, DecapStat::PassFragment);
        }
        let ok = match (gue, proto) {
            (true, _) => strip::<L2, V6, true>(ctx, payload, 0),
            (false, IPPROTO_IPIP) => strip::<L2, V6, false>(ctx, payload, 4),
            (false, _) => strip::<L2, V6, false>(ctx, payload, 6),
        };
        match (ok, gue) {
            (false, _) => (DROP, DecapStat::DropMalformed),
            (true, true) => (PASS, DecapStat::Gue),
            (true, false) => (PASS, DecapStat::Ipip),
        }
    }

    /// Check the inner packet (IP version `want`, 0 = either as GUE says; its header in the
    /// frame; its length within the outer `payload`) and remove the outer headers: the
    /// Ethernet header (`L2` bytes, VLAN tag included) moves up to the inner packet, with
    /// the inner packet's EtherType.
    #[inline(always)]
    fn strip<const L2: usize, const V6: bool, const GUE: bool>(
        ctx: &XdpContext,
        payload: usize,
        want: u8,
    ) -> bool {
        let hdr = if V6 { 40 } else { 20 } + if GUE { 8 } else { 0 };
        let (start, end) = (ctx.data(), ctx.data_end());
        if start + L2 + hdr + 20 > end {
            return false;
        }
        let inner = (start + L2 + hdr) as *const u8;
        // SAFETY: the inner packet's first 20 bytes are checked above.
        let ver = unsafe { *inner } >> 4;
        if (want != 0 && ver != want) || (ver != 4 && ver != 6) {
            return false;
        }
        let room = payload.wrapping_sub(if GUE { 8 } else { 0 });
        let len = if ver == 6 {
            if start + L2 + hdr + 40 > end {
                return false;
            }
            // SAFETY: 40 bytes checked above.
            unsafe { be16(inner.add(4)) as usize + 40 }
        } else {
            // SAFETY: within the 20 bytes checked above.
            unsafe {
                if *inner & 0x0f < 5 {
                    return false;
                }
                be16(inner.add(2)) as usize
            }
        };
        if len > room || payload > 0xffff {
            return false;
        }
        let et = if ver == 6 { ETH_P_IPV6 } else { ETH_P_IP }.to_be_bytes();
        // SAFETY: [start, start + hdr + L2) is within the bytes checked above; the two
        // L2-byte ranges do not overlap (hdr >= 20 > L2).
        unsafe {
            let p = start as *mut u8;
            let l2 = core::ptr::read_unaligned(p as *const [u8; L2]);
            core::ptr::write_unaligned(p.add(hdr) as *mut [u8; L2], l2);
            core::ptr::write_unaligned(p.add(hdr + L2 - 2) as *mut [u8; 2], et);
            bpf_xdp_adjust_head(ctx.ctx, hdr as i32) == 0
        }
    }
}

lb_ebpf::bpf_boilerplate!();
