//! Farm mode: every node sees every packet of a farm service and keeps exactly the flows it
//! owns. TCP: a SYN goes to the ring's owner; any other segment is kept exactly when this node
//! has a socket for the connection (so rebalancing never moves a live connection, and a new
//! owner never answers a stranger's segment with a RST). UDP: conntrack remembers each flow's
//! owner until it idles out or its owner leaves. Kept frames go to the local stack with this
//! node's MAC as destination, since they arrived addressed to the farm's virtual MAC.
//! New flows are taken only while the node's lease (renewed by its daemon) runs.

use aya_ebpf::{
    bindings::{
        bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 as SockTupleV4,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 as SockTupleV6, xdp_action,
    },
    helpers::generated::{bpf_sk_release, bpf_skc_lookup_tcp},
    programs::XdpContext,
};
use lb_common::{
    FlowKey, GlobalConfig, ServiceInfo, Stat, NO_BACKEND, PROTO_TCP, TCP_STATE_LISTEN,
};

use crate::{
    conntrack, forward,
    maps::{account, count, drop_for, verdict, FARM},
    parse::Packet,
    select,
};

#[inline(always)]
pub fn farm(ctx: &XdpContext, pkt: &mut Packet, svc: &ServiceInfo, cfg: &GlobalConfig) -> u32 {
    let (own, lease) = match FARM.get(0) {
        Some(f) => (f.own_member, f.lease_until_ns),
        None => (NO_BACKEND, 0),
    };
    if pkt.flow.proto == PROTO_TCP && !pkt.is_syn {
        return if has_socket(ctx, &pkt.flow, pkt.v6) {
            deliver(ctx, pkt, svc, cfg, own, Stat::FarmPassSocket)
        } else {
            drop_for(svc.id, Stat::FarmDropNoSocket)
        };
    }
    if conntrack::clock_ns() > lease {
        return drop_for(svc.id, Stat::FarmDropLease);
    }
    let owner = if pkt.flow.proto == PROTO_TCP {
        select::ring_owner(svc, &pkt.flow)
    } else {
        let (owner, outcome) = select::backend(svc, &pkt.flow, false, cfg);
        count(outcome);
        owner
    };
    let Some(owner) = owner else {
        return drop_for(svc.id, Stat::DropNoBackend);
    };
    if owner.id != own {
        return drop_for(svc.id, Stat::FarmDropNotOwner);
    }
    deliver(ctx, pkt, svc, cfg, own, Stat::FarmPassOwner)
}

/// Rewrite the destination MAC to our own and pass the frame to the local stack.
#[inline(always)]
fn deliver(
    ctx: &XdpContext,
    pkt: &mut Packet,
    svc: &ServiceInfo,
    cfg: &GlobalConfig,
    own: u32,
    reason: Stat,
) -> u32 {
    forward::set_mac(&mut pkt.eth.dst, &cfg.own_mac);
    account(ctx, svc.id, own);
    verdict(reason, xdp_action::XDP_PASS)
}

/// Whether the local stack has a TCP socket for this connection other than a listener:
/// an established (or closing / time-wait) socket, or a request sock mid-handshake.
#[inline(always)]
fn has_socket(ctx: &XdpContext, flow: &FlowKey, v6: bool) -> bool {
    // SAFETY: all-zero is a valid bpf_sock_tuple.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let size = if v6 {
        // SAFETY: writing plain integers into the union's ipv6 member.
        unsafe {
            let t = &mut tuple.__bindgen_anon_1.ipv6;
            t.saddr = core::ptr::read_unaligned(flow.src.as_ptr() as *const [u32; 4]);
            t.daddr = core::ptr::read_unaligned(flow.dst.as_ptr() as *const [u32; 4]);
            t.sport = flow.sport.to_be();
            t.dport = flow.dport.to_be();
        }
        core::mem::size_of::<SockTupleV6>()
    } else {
        // SAFETY: as above, ipv4 member; the v4 address is the last 4 bytes.
        unsafe {
            let t = &mut tuple.__bindgen_anon_1.ipv4;
            t.saddr = core::ptr::read_unaligned(flow.src.as_ptr().add(12) as *const u32);
            t.daddr = core::ptr::read_unaligned(flow.dst.as_ptr().add(12) as *const u32);
            t.sport = flow.sport.to_be();
            t.dport = flow.dport.to_be();
        }
        core::mem::size_of::<SockTupleV4>()
    };
    // SAFETY: helper call with a stack tuple of the stated size; netns -1 = the device's.
    let sk = unsafe { bpf_skc_lookup_tcp(ctx.ctx as *mut _, &mut tuple, size as u32, u64::MAX, 0) };
    if sk.is_null() {
        return false;
    }
    // SAFETY: non-null socket from the lookup; `state` is readable on sock_common and the
    // reference is released right after.
    let state = unsafe { (*sk).state };
    unsafe { bpf_sk_release(sk as *mut _) };
    state != TCP_STATE_LISTEN
}
