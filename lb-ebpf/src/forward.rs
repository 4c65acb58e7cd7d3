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
    csum, gue_sport, is_v4_mapped, tunnel_hash, tunnel_overhead, tunnel_src_low,
    wire::{ETH_P_IP, ETH_P_IPV6, OWN_TTL},
    Addr, FlowKey, ServiceInfo, Stat, TunnelInfo, FWD_GUE, FWD_IPIP, IPPROTO_IPIP, IPPROTO_IPV6,
    PROTO_UDP,
};

use crate::{
    icmp,
    maps::{account, count, put_own_mac, verdict, TUNNELS},
    parse::{EthHdr, Inner, IpHdr},
    select::Dst,
};

/// Forward the packet to `dst` by the service's method, counting `reason` (a combined
/// `Stat::forwarded` slot, or `IcmpTooBigTx`). A tunnel exit that sends nothing counts its own
/// reason plus the conntrack outcome `reason` carries.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn send(
    ctx: &XdpContext,
    eth: &mut EthHdr,
    ip: &IpHdr,
    l2_len: usize,
    flow: &FlowKey,
    svc: &ServiceInfo,
    dst: &Dst,
    reason: Stat,
) -> u32 {
    if svc.fwd_mode == FWD_IPIP || svc.fwd_mode == FWD_GUE {
        return tunnel(ctx, &Inner::of(l2_len, ip), flow, svc, dst, reason);
    }
    direct(ctx, eth, dst, reason)
}

#[inline(always)]
pub fn direct(ctx: &XdpContext, eth: &mut EthHdr, dst: &Dst, reason: Stat) -> u32 {
    set_mac(&mut eth.dst, &dst.backend.mac);
    // SAFETY: the Ethernet header was bounds-checked by the parser.
    unsafe { put_own_mac(eth.src.as_mut_ptr(), 0) };
    account(ctx, dst.id);
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
    dst: &Dst,
    reason: Stat,
) -> u32 {
    let Some(t) = TUNNELS.get(svc.id) else {
        return not_sent(reason, Stat::DropEncap, xdp_action::XDP_DROP);
    };
    let outer_v6 = !is_v4_mapped(&dst.backend.addr);
    let gue = svc.fwd_mode == FWD_GUE;
    let overhead = tunnel_overhead(outer_v6, gue) as u32;
    if t.mtu != 0 && inner.len + overhead > t.mtu as u32 {
        if inner.df && reason != Stat::IcmpTooBigTx {
            count_outcome(reason);
            return icmp::send_too_big(ctx, inner, t.mtu as u32 - overhead);
        }
        return not_sent(reason, Stat::DropTooBig, xdp_action::XDP_DROP);
    }
    let hash = tunnel_hash(flow);
    let vlan = inner.l2_len != 14;
    let ok = match (vlan, outer_v6, gue) {
        (false, false, false) => encap::<14, false, false>(ctx, inner, hash, t, dst),
        (false, false, true) => encap::<14, false, true>(ctx, inner, hash, t, dst),
        (false, true, false) => encap::<14, true, false>(ctx, inner, hash, t, dst),
        (false, true, true) => encap::<14, true, true>(ctx, inner, hash, t, dst),
        (true, false, false) => encap::<18, false, false>(ctx, inner, hash, t, dst),
        (true, false, true) => encap::<18, false, true>(ctx, inner, hash, t, dst),
        (true, true, false) => encap::<18, true, false>(ctx, inner, hash, t, dst),
        (true, true, true) => encap::<18, true, true>(ctx, inner, hash, t, dst),
    };
    if !ok {
        return not_sent(reason, Stat::DropEncap, xdp_action::XDP_DROP);
    }
    // Counted as sent: outer headers included.
    account(ctx, dst.id);
    verdict(reason, xdp_action::XDP_TX)
}

/// Exit with `action` for `exit` instead of forwarding as `reason`: the conntrack outcome a
/// combined `reason` carries is still counted.
#[inline(always)]
fn not_sent(reason: Stat, exit: Stat, action: u32) -> u32 {
    count_outcome(reason);
    verdict(exit, action)
}

/// Count the conntrack outcome a combined `reason` carries, on its own.
#[inline(always)]
fn count_outcome(reason: Stat) {
    if let Some((_, ct)) = reason.parts() {
        count(ct);
    }
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
    // Written field by field straight into the frame, no header built on the stack: this
    // path is inlined into the program, whose stack is 512 bytes in all.
    // SAFETY: every access below lies in [start, start + hdr_len + L2), checked above;
    // unaligned reads and writes.
    unsafe {
        if L2 == 18 {
            // The VLAN tag (TPID + TCI) moves with the Ethernet header.
            put::<u32>(p, 12, get::<u32>(p, hdr_len + 12));
        }
        put_mac(p, 0, &dst.backend.mac);
        put_own_mac(p, 6);
        let ip = p.add(L2);
        if V6 {
            put::<u16>(p, L2 - 2, ETH_P_IPV6.to_be());
            let w0 = 0x6000_0000 | (inner.tos as u32) << 20 | (hash & 0x000f_ffff);
            put::<u32>(ip, 0, w0.to_be());
            put::<u16>(ip, 4, ((outer_len - 40) as u16).to_be());
            put::<u8>(ip, 6, next);
            put::<u8>(ip, 7, OWN_TTL);
            put_addr(ip, 8, &t.src6);
            let s = t.src6;
            let low = tunnel_src_low([s[12], s[13], s[14], s[15]], t.src6_mask, hash);
            put::<[u8; 4]>(ip, 20, low);
            put_addr(ip, 24, &dst.backend.addr);
        } else {
            put::<u16>(p, L2 - 2, ETH_P_IP.to_be());
            put::<u16>(ip, 0, u16::from_be_bytes([0x45, inner.tos]).to_be());
            put::<u16>(ip, 2, (outer_len as u16).to_be());
            put::<u32>(ip, 4, 0);
            put::<u16>(ip, 8, u16::from_be_bytes([OWN_TTL, next]).to_be());
            put::<u16>(ip, 10, 0);
            put::<[u8; 4]>(ip, 12, tunnel_src_low(t.src4, t.src4_mask, hash));
            let a = &dst.backend.addr;
            put::<[u8; 4]>(ip, 16, [a[12], a[13], a[14], a[15]]);
            put::<u16>(ip, 10, csum::fold(sum_words::<10>(ip, 0)).to_be());
        }
        if GUE {
            let u = ip.add(ip_len as usize);
            put::<u16>(u, 0, gue_sport(hash).to_be());
            put::<u16>(u, 2, t.gue_port.to_be());
            put::<u16>(u, 4, ((outer_len - ip_len) as u16).to_be());
            put::<u16>(u, 6, 0);
        }
    }
    true
}

/// `to = *from` for a MAC, as one 4-byte and one 2-byte copy: assigning a `[u8; 6]` becomes
/// a call to `memmove` (a byte loop in a BPF subprogram) on this target.
#[inline(always)]
pub fn set_mac(to: &mut [u8; 6], from: &[u8; 6]) {
    // SAFETY: both are 6-byte arrays.
    unsafe { put_mac(to.as_mut_ptr(), 0, from) }
}

/// Store the MAC `m` at `p + off` (see [`set_mac`]).
///
/// # Safety
/// As for [`put`], for 6 bytes.
#[inline(always)]
pub unsafe fn put_mac(p: *mut u8, off: usize, m: &[u8; 6]) {
    // SAFETY: per the contract.
    unsafe {
        put::<u32>(p, off, get::<u32>(m.as_ptr(), 0));
        put::<u16>(p, off + 4, get::<u16>(m.as_ptr(), 4));
    }
}

/// Store the address `a` at `p + off` as two 8-byte copies (see [`set_mac`]).
///
/// # Safety
/// As for [`put`], for 16 bytes.
#[inline(always)]
pub unsafe fn put_addr(p: *mut u8, off: usize, a: &Addr) {
    // SAFETY: per the contract.
    unsafe {
        put::<u64>(p, off, get::<u64>(a.as_ptr(), 0));
        put::<u64>(p, off + 8, get::<u64>(a.as_ptr(), 8));
    }
}

/// Store `v` at `p + off`, unaligned.
///
/// # Safety
/// `p + off .. + size_of::<T>()` lies in bounds-checked packet memory.
#[inline(always)]
pub unsafe fn put<T>(p: *mut u8, off: usize, v: T) {
    // SAFETY: per the contract.
    unsafe { core::ptr::write_unaligned(p.add(off) as *mut T, v) }
}

/// Load a `T` from `p + off`, unaligned.
///
/// # Safety
/// As for [`put`].
#[inline(always)]
pub unsafe fn get<T>(p: *const u8, off: usize) -> T {
    // SAFETY: per the contract.
    unsafe { core::ptr::read_unaligned(p.add(off) as *const T) }
}

/// One's-complement sum (unfolded) of the `N` big-endian 16-bit words at `p`, added to `acc`.
///
/// # Safety
/// As for [`put`], for `2 * N` bytes.
#[inline(always)]
pub unsafe fn sum_words<const N: usize>(p: *const u8, mut acc: u32) -> u32 {
    let mut i = 0;
    while i < N {
        // SAFETY: per the contract.
        acc += u16::from_be(unsafe { get::<u16>(p, 2 * i) }) as u32;
        i += 1;
    }
    acc
}
