//! Farm mode: every node sees every packet of a farm service and keeps exactly the flows it
//! owns. TCP: a SYN goes to the ring's owner; any other segment is kept exactly when this node
//! has a socket for the connection (so rebalancing never moves a live connection, and a new
//! owner never answers a stranger's segment with a RST). UDP: conntrack remembers each flow's
//! owner until it idles out or its owner leaves. Kept frames go to the local stack with this
//! node's MAC as destination, since they arrived addressed to the farm's virtual MAC.
//! New flows are taken only while the node's lease (renewed by its daemon) runs.

use core::mem::{size_of, MaybeUninit};

use aya_ebpf::{
    bindings::{
        bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 as SockTupleV4,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 as SockTupleV6, xdp_action,
    },
    helpers::generated::{bpf_sk_release, bpf_skc_lookup_tcp},
    programs::XdpContext,
};
use lb_common::{FlowKey, ServiceInfo, Stat, NO_BACKEND, PROTO_TCP, TCP_STATE_LISTEN};

use crate::{
    conntrack,
    maps::{account_delivered, count, drop_for, put_own_mac, verdict, FARM},
    parse::{Aligned, Packet},
    select,
};

#[inline(always)]
pub fn farm(ctx: &XdpContext, pkt: &mut Packet, svc: &ServiceInfo) -> u32 {
    let (own, lease) = match FARM.get(0) {
        Some(f) => (f.own_member, f.lease_until_ns),
        None => (NO_BACKEND, 0),
    };
    if pkt.flow.proto == PROTO_TCP && !pkt.is_syn {
        return if has_socket(ctx, &pkt.flow, pkt.v6) {
            deliver(ctx, pkt, svc, own, Stat::FarmPassSocket)
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
        let (owner, outcome) = select::backend(svc, &pkt.flow, false);
        count(outcome);
        owner
    };
    let Some(owner) = owner else {
        return drop_for(svc.id, Stat::DropNoBackend);
    };
    if owner.id != own {
        return drop_for(svc.id, Stat::FarmDropNotOwner);
    }
    deliver(ctx, pkt, svc, own, Stat::FarmPassOwner)
}

/// Rewrite the destination MAC to our own and pass the frame to the local stack.
#[inline(always)]
fn deliver(ctx: &XdpContext, pkt: &mut Packet, svc: &ServiceInfo, own: u32, reason: Stat) -> u32 {
    // SAFETY: the Ethernet header was bounds-checked by the parser.
    unsafe { put_own_mac(pkt.eth.dst.as_mut_ptr(), 0) };
    account_delivered(ctx, svc.id, own);
    verdict(reason, xdp_action::XDP_PASS)
}

/// Whether the local stack has a TCP socket for this connection other than a listener:
/// an established (or closing / time-wait) socket, or a request sock mid-handshake.
#[inline(always)]
fn has_socket(ctx: &XdpContext, flow: &FlowKey, v6: bool) -> bool {
    use core::ptr::{addr_of_mut, read_unaligned};
    // Not zeroed first (that is a `memset` subprogram call per packet): the member written
    // below covers the `size` bytes the helper reads. 8-aligned, as stack values must be
    // (see `parse::Aligned`).
    let mut tuple = MaybeUninit::<Aligned<bpf_sock_tuple>>::uninit();
    let p: *mut bpf_sock_tuple = tuple.as_mut_ptr().cast();
    // SAFETY: each write stays inside the union member it names; the v4 address is the
    // last 4 bytes of a v4-mapped one.
    let size = unsafe {
        if v6 {
            let t = addr_of_mut!((*p).__bindgen_anon_1.ipv6);
            addr_of_mut!((*t).saddr).write(read_unaligned(flow.src.as_ptr() as *const [u32; 4]));
            addr_of_mut!((*t).daddr).write(read_unaligned(flow.dst.as_ptr() as *const [u32; 4]));
            addr_of_mut!((*t).sport).write(flow.sport.to_be());
            addr_of_mut!((*t).dport).write(flow.dport.to_be());
            size_of::<SockTupleV6>()
        } else {
            let t = addr_of_mut!((*p).__bindgen_anon_1.ipv4);
            addr_of_mut!((*t).saddr).write(read_unaligned(flow.src.as_ptr().add(12) as *const u32));
            addr_of_mut!((*t).daddr).write(read_unaligned(flow.dst.as_ptr().add(12) as *const u32));
            addr_of_mut!((*t).sport).write(flow.sport.to_be());
            addr_of_mut!((*t).dport).write(flow.dport.to_be());
            size_of::<SockTupleV4>()
        }
    };
    // SAFETY: helper call with a stack tuple whose first `size` bytes are written; netns
    // -1 = the device's.
    let sk = unsafe { bpf_skc_lookup_tcp(ctx.ctx as *mut _, p, size as u32, u64::MAX, 0) };
    if sk.is_null() {
        return false;
    }
    // SAFETY: non-null socket from the lookup; `state` is readable on sock_common and the
    // reference is released right after.
    let state = unsafe { (*sk).state };
    unsafe { bpf_sk_release(sk as *mut _) };
    state != TCP_STATE_LISTEN
}
