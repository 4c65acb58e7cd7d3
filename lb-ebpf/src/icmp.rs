//! ICMP addressed to a VIP. Echo requests are answered here, so `ping VIP` works without
//! the backends. A fragmentation-needed (IPv4) or packet-too-big (ICMPv6) error about a
//! packet a backend sent goes to that backend, found from the quoted packet as the flow's
//! own packets are (conntrack, else the ring), so path MTU discovery works through the
//! balancer. Neighbour discovery is the kernel's; any other ICMP to a VIP is dropped.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{
    csum,
    wire::{
        ICMPV6_ECHO_REPLY, ICMPV6_ECHO_REQUEST, ICMPV6_ND_FIRST, ICMPV6_ND_LAST, ICMPV6_PKT_TOOBIG,
        ICMP_DEST_UNREACH, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, ICMP_FRAG_NEEDED, OWN_TTL,
    },
    Stat, FWD_FARM,
};

use crate::{
    forward,
    maps::{verdict, CONFIG},
    parse::{IcmpPacket, IpHdr},
    select,
};

#[inline(always)]
pub fn handle(ctx: &XdpContext, pkt: IcmpPacket) -> u32 {
    let (ty, code) = (pkt.icmp.ty, pkt.icmp.code);
    match pkt.ip {
        IpHdr::V6(_) => {
            if (ICMPV6_ND_FIRST..=ICMPV6_ND_LAST).contains(&ty) {
                return verdict(Stat::PassIcmpNd, xdp_action::XDP_PASS);
            }
            if ty == ICMPV6_ECHO_REQUEST {
                return echo_reply(pkt, ICMPV6_ECHO_REPLY);
            }
            if ty == ICMPV6_PKT_TOOBIG {
                return too_big(ctx, pkt);
            }
        }
        IpHdr::V4(_) => {
            if ty == ICMP_ECHO_REQUEST {
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
    // Farm nodes each see the error; which one holds the socket is not known here.
    if svc.fwd_mode == FWD_FARM {
        return drop();
    }
    let Some(cfg) = CONFIG.get(0) else {
        return drop();
    };
    match select::existing(&svc, &flow, cfg) {
        Some(dst) => forward::direct(ctx, pkt.eth, &svc, cfg, &dst, Stat::IcmpTooBigTx),
        None => verdict(Stat::DropNoBackend, xdp_action::XDP_DROP),
    }
}
