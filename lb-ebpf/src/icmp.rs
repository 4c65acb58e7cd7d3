//! ICMP addressed to a VIP. Echo requests are answered here, so `ping VIP` works without
//! the backends. A fragmentation-needed (IPv4) or packet-too-big (ICMPv6) error about a
//! packet a backend sent goes to that backend, found from the quoted packet as the flow's
//! own packets are (conntrack, else the ring), so path MTU discovery works through the
//! balancer. Neighbour discovery is the kernel's; any other ICMP to a VIP is dropped, and
//! so is an echo request not sent to this node's own MAC (a farm's virtual MAC).

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail, bpf_xdp_get_buff_len},
    programs::XdpContext,
};
use lb_common::{
    csum,
    wire::{
        ICMPV6_ECHO_REPLY, ICMPV6_ECHO_REQUEST, ICMPV6_ND_FIRST, ICMPV6_ND_LAST, ICMPV6_PKT_TOOBIG,
        ICMP_DEST_UNREACH, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, ICMP_FRAG_NEEDED, IPPROTO_ICMP,
        IPPROTO_ICMPV6, OWN_TTL,
    },
    Addr, Stat, FWD_FARM, TOO_BIG_QUOTE_V4, TOO_BIG_QUOTE_V6,
};

use crate::{
    forward::{self, get, put, sum_words},
    maps::{drop_for, is_own_mac, verdict},
    parse::{IcmpPacket, Inner, IpHdr},
    select,
};

#[inline(always)]
pub fn handle(ctx: &XdpContext, pkt: IcmpPacket) -> u32 {
    let (ty, code) = (pkt.icmp.ty, pkt.icmp.code);
    // Only requests sent to this node's MAC are answered: a farm's virtual MAC reaches
    // every node, and all of them answering would duplicate every reply.
    let to_us = is_own_mac(&pkt.eth.dst);
    match pkt.ip {
        IpHdr::V6(_) => {
            if (ICMPV6_ND_FIRST..=ICMPV6_ND_LAST).contains(&ty) {
                return verdict(Stat::PassIcmpNd, xdp_action::XDP_PASS);
            }
            if ty == ICMPV6_ECHO_REQUEST && to_us {
                return echo_reply(pkt, ICMPV6_ECHO_REPLY);
            }
            if ty == ICMPV6_PKT_TOOBIG {
                return too_big(ctx, pkt);
            }
        }
        IpHdr::V4(_) => {
            if ty == ICMP_ECHO_REQUEST && to_us {
                return echo_reply(pkt, ICMP_ECHO_REPLY);
            }
            if ty == ICMP_DEST_UNREACH && code == ICMP_FRAG_NEEDED {
                return too_big(ctx, pkt);
            }
        }
    }
    verdict(Stat::DropIcmp, xdp_action::XDP_DROP)
}

/// Turn the request into its reply in place and send it back where it came from: swap MACs
/// and addresses, reset the TTL, change the type. Checksums are updated incrementally (the
/// ICMPv6 pseudo-header sum does not change when the addresses swap).
#[inline(always)]
fn echo_reply(pkt: IcmpPacket, reply: u8) -> u32 {
    let eth = pkt.eth;
    core::mem::swap(&mut eth.dst, &mut eth.src);
    match pkt.ip {
        IpHdr::V4(ip) => {
            core::mem::swap(&mut ip.src, &mut ip.dst);
            let old = u16::from_be_bytes([ip.ttl, ip.proto]);
            ip.ttl = OWN_TTL;
            ip.check = csum::replace(ip.check, old, u16::from_be_bytes([ip.ttl, ip.proto]));
        }
        IpHdr::V6(ip) => {
            core::mem::swap(&mut ip.src, &mut ip.dst);
            ip.hop_limit = OWN_TTL;
        }
    }
    let icmp = pkt.icmp;
    let old = u16::from_be_bytes([icmp.ty, icmp.code]);
    icmp.ty = reply;
    icmp.check = csum::replace(icmp.check, old, u16::from_be_bytes([icmp.ty, icmp.code]));
    verdict(Stat::IcmpEchoReply, xdp_action::XDP_TX)
}

/// Forward a too-big error to the backend of the flow it quotes; the error itself is
/// forwarded unchanged (DR), so the backend's stack lowers that connection's path MTU.
#[inline(always)]
fn too_big(ctx: &XdpContext, mut pkt: IcmpPacket) -> u32 {
    let drop = || verdict(Stat::DropIcmp, xdp_action::XDP_DROP);
    let Some(flow) = pkt.quoted_flow() else {
        return drop();
    };
    let Some(svc) = select::service(&flow) else {
        return drop();
    };
    let flow = flow.of_service(svc.id);
    // Farm nodes each see the error; which one holds the socket is not known here.
    if svc.fwd_mode == FWD_FARM {
        return drop();
    }
    match select::existing(&svc, &flow) {
        Some(dst) => forward::send(
            ctx,
            pkt.eth,
            &pkt.ip,
            pkt.l2_len,
            &flow,
            &svc,
            &dst,
            Stat::IcmpTooBigTx,
        ),
        None => drop_for(svc.id, Stat::DropNoBackend),
    }
}

/// Answer a packet too big for the tunnel with fragmentation-needed (IPv4) / packet-too-big
/// (IPv6) naming `mtu`, from the VIP it was sent to, quoting its first bytes; sent back
/// where it came from.
#[inline(always)]
pub fn send_too_big(ctx: &XdpContext, inner: &Inner, mtu: u32) -> u32 {
    let ok = match (inner.l2_len != 14, inner.v6) {
        (false, false) => too_big_reply::<14, false>(ctx, mtu),
        (false, true) => too_big_reply::<14, true>(ctx, mtu),
        (true, false) => too_big_reply::<18, false>(ctx, mtu),
        (true, true) => too_big_reply::<18, true>(ctx, mtu),
    };
    if ok {
        verdict(Stat::IcmpTooBigSent, xdp_action::XDP_TX)
    } else {
        verdict(Stat::DropEncap, xdp_action::XDP_DROP)
    }
}

/// Rebuild the frame as the ICMP answer: `L2` bytes of Ethernet (+ VLAN) with the MACs
/// swapped, a new IP header and ICMP header in front of the offending packet, cut to
/// its first `TOO_BIG_QUOTE_*` bytes.
#[inline(always)]
fn too_big_reply<const L2: usize, const V6: bool>(ctx: &XdpContext, mtu: u32) -> bool {
    let ip_len: usize = if V6 { 40 } else { 20 };
    let quote = if V6 {
        TOO_BIG_QUOTE_V6
    } else {
        TOO_BIG_QUOTE_V4
    };
    let grow = ip_len + 8;
    // SAFETY: helpers on the program's own context; pointers are re-read after each.
    let len = unsafe { bpf_xdp_get_buff_len(ctx.ctx) } as usize;
    let keep = L2 + grow + quote;
    if len + grow < keep {
        return false;
    }
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(grow as i32)) } != 0 {
        return false;
    }
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, keep as i32 - (len + grow) as i32) } != 0 {
        return false;
    }
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + keep > end {
        return false;
    }
    let p = start as *mut u8;
    let icmp_at = L2 + ip_len;
    let msg_len = 8 + quote;
    // Written field by field into the frame (no header on the stack: see `forward::encap`).
    // SAFETY: every access lies in [start, start + keep), checked above.
    unsafe {
        // MACs swapped; the VLAN tag and EtherType (unchanged) follow.
        let (d, s) = (get::<[u8; 6]>(p, grow), get::<[u8; 6]>(p, grow + 6));
        put::<[u8; 6]>(p, 0, s);
        put::<[u8; 6]>(p, 6, d);
        if L2 == 18 {
            put::<u32>(p, 12, get::<u32>(p, grow + 12));
        }
        put::<u16>(p, L2 - 2, get::<u16>(p, grow + L2 - 2));
        let ip = p.add(L2);
        let q = p.add(L2 + grow);
        let mut acc = 0u32;
        if V6 {
            put::<u32>(ip, 0, 0x6000_0000u32.to_be());
            put::<u16>(ip, 4, (msg_len as u16).to_be());
            put::<u8>(ip, 6, IPPROTO_ICMPV6);
            put::<u8>(ip, 7, OWN_TTL);
            // From the VIP (the quote's destination) to the client (its source).
            put::<Addr>(ip, 8, get::<Addr>(q, 24));
            put::<Addr>(ip, 24, get::<Addr>(q, 8));
            // Pseudo-header: addresses, length, next header.
            acc = sum_words::<16>(ip.add(8), msg_len as u32 + IPPROTO_ICMPV6 as u32);
            put::<u32>(
                ip,
                icmp_at - L2,
                u32::from_be_bytes([ICMPV6_PKT_TOOBIG, 0, 0, 0]).to_be(),
            );
            put::<u32>(ip, icmp_at - L2 + 4, mtu.to_be());
        } else {
            put::<u16>(ip, 0, 0x4500u16.to_be());
            put::<u16>(ip, 2, ((20 + msg_len) as u16).to_be());
            put::<u32>(ip, 4, 0);
            put::<u16>(ip, 8, u16::from_be_bytes([OWN_TTL, IPPROTO_ICMP]).to_be());
            put::<u16>(ip, 10, 0);
            put::<[u8; 4]>(ip, 12, get::<[u8; 4]>(q, 16));
            put::<[u8; 4]>(ip, 16, get::<[u8; 4]>(q, 12));
            put::<u16>(ip, 10, csum::fold(sum_words::<10>(ip, 0)).to_be());
            let head = u32::from_be_bytes([ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, 0, 0]);
            put::<u32>(ip, 20, head.to_be());
            put::<u32>(ip, 24, (mtu & 0xffff).to_be());
        }
        // The ICMP message: its header (checksum still 0) and the quote.
        let m = p.add(icmp_at);
        let sum = if V6 {
            sum_words::<{ (8 + TOO_BIG_QUOTE_V6) / 2 }>(m, acc)
        } else {
            sum_words::<{ (8 + TOO_BIG_QUOTE_V4) / 2 }>(m, acc)
        };
        put::<u16>(m, 2, csum::fold(sum).to_be());
    }
    true
}
