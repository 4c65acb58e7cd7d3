//! Sending a packet on to its backend. Direct routing changes only the MACs: the backend holds
//! the VIP on `lo` and answers the client itself. Tunnels (IPIP, GUE) wrap the IP packet in an
//! outer IP (and UDP) header addressed to the backend, which may sit anywhere routable; the
//! destination MAC is then the next hop's, which the control plane resolved into the
//! backend's entry. The backend strips the outer headers (`farmlb decap`) and answers the
//! client directly, as in DR.

use aya_ebpf::{
    bindings::xdp_action, helpers::generated::bpf_xdp_adjust_head, programs::XdpContext,
};
use lb_common::{
    gue_sport, hdr, is_v4_mapped, tunnel_hash, tunnel_overhead, tunnel_src_low,
    wire::{ETH_P_IP, ETH_P_IPV6},
    FlowKey, GlobalConfig, ServiceInfo, Stat, TunnelInfo, FWD_GUE, FWD_IPIP, IPPROTO_IPIP,
    IPPROTO_IPV6, PROTO_UDP,
};

use crate::{
    icmp,
    maps::{account, verdict, TUNNELS},
    parse::{EthHdr, Inner, IpHdr},
    select::Dst,
};

/// Forward the packet to `dst` by the service's method, counting `reason`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn send(
    ctx: &XdpContext,
    eth: &mut EthHdr,
    ip: &IpHdr,
    l2_len: usize,
    flow: &FlowKey,
    svc: &ServiceInfo,
    cfg: &GlobalConfig,
    dst: &Dst,
    reason: Stat,
) -> u32 {
    if svc.fwd_mode == FWD_IPIP || svc.fwd_mode == FWD_GUE {
        return tunnel(ctx, &Inner::of(l2_len, ip), flow, svc, cfg, dst, reason);
    }
    direct(ctx, eth, svc, cfg, dst, reason)
}

#[inline(always)]
pub fn direct(
    ctx: &XdpContext,
    eth: &mut EthHdr,
    svc: &ServiceInfo,
    cfg: &GlobalConfig,
    dst: &Dst,
    reason: Stat,
) -> u32 {
    eth.dst = dst.backend.mac;
    eth.src = cfg.own_mac;
    account(ctx, svc.id, dst.id);
    verdict(reason, xdp_action::XDP_TX)
}

/// Wrap and send. A packet the outer headers would take past the MTU is answered with
/// frag-needed / packet-too-big if it may not be fragmented (so the client's PMTU discovery
/// works through the balancer), else dropped; ICMP errors are never answered with one.
#[inline(always)]
fn tunnel(
    ctx: &XdpContext,
    inner: &Inner,
    flow: &FlowKey,
    svc: &ServiceInfo,
    cfg: &GlobalConfig,
    dst: &Dst,
    reason: Stat,
) -> u32 {
    let Some(t) = TUNNELS.get(svc.id) else {
        return verdict(Stat::DropEncap, xdp_action::XDP_DROP);
    };
    let outer_v6 = !is_v4_mapped(&dst.backend.addr);
    let gue = svc.fwd_mode == FWD_GUE;
    let overhead = tunnel_overhead(outer_v6, gue) as u32;
    if t.mtu != 0 && inner.len + overhead > t.mtu as u32 {
        if inner.df && reason == Stat::Tx {
            return icmp::send_too_big(ctx, inner, t.mtu as u32 - overhead);
        }
        return verdict(Stat::DropTooBig, xdp_action::XDP_DROP);
    }
    let hash = tunnel_hash(flow);
    let vlan = inner.l2_len != 14;
    let ok = match (vlan, outer_v6, gue) {
        (false, false, false) => encap::<14, false, false>(ctx, inner, hash, cfg, t, dst),
        (false, false, true) => encap::<14, false, true>(ctx, inner, hash, cfg, t, dst),
        (false, true, false) => encap::<14, true, false>(ctx, inner, hash, cfg, t, dst),
        (false, true, true) => encap::<14, true, true>(ctx, inner, hash, cfg, t, dst),
        (true, false, false) => encap::<18, false, false>(ctx, inner, hash, cfg, t, dst),
        (true, false, true) => encap::<18, false, true>(ctx, inner, hash, cfg, t, dst),
        (true, true, false) => encap::<18, true, false>(ctx, inner, hash, cfg, t, dst),
        (true, true, true) => encap::<18, true, true>(ctx, inner, hash, cfg, t, dst),
    };
    if !ok {
        return verdict(Stat::DropEncap, xdp_action::XDP_DROP);
    }
    // Counted as sent: outer headers included.
    account(ctx, svc.id, dst.id);
    verdict(reason, xdp_action::XDP_TX)
}

/// Grow the frame at the front by the outer headers and write them: the Ethernet header
/// (and VLAN tag, `L2` bytes) moves to the new front with the next hop's MAC, then the outer
/// IPv4/IPv6 header (`V6`) and, for GUE, the UDP header. Every offset is a constant of the
/// instance, as the verifier wants after `bpf_xdp_adjust_head`.
#[inline(always)]
fn encap<const L2: usize, const V6: bool, const GUE: bool>(
    ctx: &XdpContext,
    inner: &Inner,
    hash: u32,
    cfg: &GlobalConfig,
    t: &TunnelInfo,
    dst: &Dst,
) -> bool {
    let ip_len = if V6 { 40 } else { 20 };
    let hdr_len = tunnel_overhead(V6, GUE);
    // SAFETY: helper on the program's own context; pointers are re-read below.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(hdr_len as i32)) } != 0 {
        return false;
    }
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + hdr_len + L2 > end {
        return false;
    }
    let p = start as *mut u8;
    let outer_len = inner.len + hdr_len as u32;
    let next = if GUE {
        PROTO_UDP
    } else if inner.v6 {
        IPPROTO_IPV6
    } else {
        IPPROTO_IPIP
    };
    // SAFETY: every access below lies in [start, start + hdr_len + L2), checked above;
    // unaligned reads and writes of byte arrays.
    unsafe {
        let l2 = core::ptr::read_unaligned(p.add(hdr_len) as *const [u8; L2]);
        core::ptr::write_unaligned(p as *mut [u8; L2], l2);
        core::ptr::write_unaligned(p as *mut [u8; 6], dst.backend.mac);
        core::ptr::write_unaligned(p.add(6) as *mut [u8; 6], cfg.own_mac);
        let et = if V6 { ETH_P_IPV6 } else { ETH_P_IP }.to_be_bytes();
        core::ptr::write_unaligned(p.add(L2 - 2) as *mut [u8; 2], et);
        if V6 {
            let mut src = t.src6;
            let low = tunnel_src_low([src[12], src[13], src[14], src[15]], t.src6_mask, hash);
            src[12..].copy_from_slice(&low);
            let h = hdr::ipv6(
                inner.tos,
                hash,
                (outer_len - 40) as u16,
                next,
                &src,
                &dst.backend.addr,
            );
            core::ptr::write_unaligned(p.add(L2) as *mut [u8; 40], h);
        } else {
            let src = tunnel_src_low(t.src4, t.src4_mask, hash);
            let a = &dst.backend.addr;
            let h = hdr::ipv4(
                inner.tos,
                outer_len as u16,
                next,
                src,
                [a[12], a[13], a[14], a[15]],
            );
            core::ptr::write_unaligned(p.add(L2) as *mut [u8; 20], h);
        }
        if GUE {
            let u = hdr::udp(gue_sport(hash), t.gue_port, (outer_len - ip_len) as u16);
            core::ptr::write_unaligned(p.add(L2 + ip_len as usize) as *mut [u8; 8], u);
        }
    }
    true
}
