//! farmlb XDP data plane: service lookup, conntrack, weighted Maglev, direct-routing forward,
//! and farm mode (local delivery of the flows this node owns, socket-aware for TCP).
//!
//! Every exit path bumps exactly one reason counter in `STATS`, so packet accounting adds up
//! (`sum(STATS) == packets seen`), which the datapath tests rely on.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod parse;

#[cfg(target_arch = "bpf")]
mod prog {
    use aya_ebpf::{
        bindings::{bpf_sock_tuple, xdp_action},
        helpers::{
            bpf_ktime_get_ns,
            generated::{bpf_sk_release, bpf_skc_lookup_tcp},
        },
        macros::xdp,
        programs::XdpContext,
    };
    use lb_common::{
        flow_hash, Addr, CtEntry, FlowKey, GlobalConfig, HashMode, ServiceInfo, ServiceKey, Stat,
        BACKEND_F_VALID, FWD_FARM, NO_BACKEND, PROTO_TCP, PROTO_UDP, TCP_STATE_LISTEN,
    };

    use crate::maps::{
        account, count, verdict, BACKENDS, CONFIG, CONNTRACK, FARM, RING, SERVICES, VIP_ADDRS,
    };
    use crate::parse::{self, Packet, Unparsed};

    #[xdp]
    pub fn farmlb_xdp(ctx: XdpContext) -> u32 {
        process(&ctx)
    }
    lb_ebpf::check_name!(farmlb_xdp, lb_common::maps::PROGRAM);

    /// Rare path: the packet cannot be balanced (fragment, options, truncated L4). Drop and
    /// count it if it was addressed to a VIP, otherwise leave it to the kernel.
    #[inline(always)]
    fn for_vip_or_pass(dst: &Addr, reason: Stat) -> u32 {
        // SAFETY: read-only lookup of a plain value.
        if unsafe { VIP_ADDRS.get(dst) }.is_some() {
            verdict(reason, xdp_action::XDP_DROP)
        } else {
            verdict(Stat::PassNotVip, xdp_action::XDP_PASS)
        }
    }

    #[inline(always)]
    fn process(ctx: &XdpContext) -> u32 {
        let mut pkt = match parse::parse(ctx) {
            Ok(p) => p,
            Err(Unparsed::Pass(reason)) => return verdict(reason, xdp_action::XDP_PASS),
            Err(Unparsed::DropIfVip { dst, reason }) => return for_vip_or_pass(&dst, reason),
        };
        let flow = pkt.flow;
        let is_syn = pkt.is_syn;

        let mut key = ServiceKey::new(flow.dst, flow.dport, flow.proto);
        // SAFETY: read-only lookups; the value is copied out immediately.
        let svc: ServiceInfo = match unsafe { SERVICES.get(&key) } {
            Some(s) => *s,
            None => {
                key.port = 0;
                match unsafe { SERVICES.get(&key) } {
                    Some(s) => *s,
                    None => return verdict(Stat::PassNotVip, xdp_action::XDP_PASS),
                }
            }
        };

        let Some(cfg) = CONFIG.get(0) else {
            return verdict(Stat::PassNotVip, xdp_action::XDP_PASS);
        };
        if svc.fwd_mode == FWD_FARM {
            return farm(ctx, &mut pkt, &svc, cfg);
        }
        let backend_id = pick_backend(&svc, &flow, is_syn, cfg.udp_timeout_ns);
        let Some(be) = BACKENDS.get(backend_id) else {
            return verdict(Stat::DropNoBackend, xdp_action::XDP_DROP);
        };
        if backend_id == NO_BACKEND || be.flags & BACKEND_F_VALID == 0 {
            return verdict(Stat::DropNoBackend, xdp_action::XDP_DROP);
        }

        // Direct routing: only the MACs change; the backend holds the VIP on `lo`.
        pkt.eth.dst = be.mac;
        pkt.eth.src = cfg.own_mac;
        account(ctx, svc.id, backend_id);
        verdict(Stat::Tx, xdp_action::XDP_TX)
    }

    /// Farm branch. TCP: a SYN goes to the ring's owner; any other segment is kept exactly
    /// when this node has a socket for the connection (so rebalancing never moves a live
    /// connection, and a new owner never answers a stranger's segment with a RST). UDP:
    /// conntrack remembers each flow's owner (every node sees every packet) until it idles
    /// out or its owner leaves. Delivered frames get this node's MAC as destination, since
    /// they arrived addressed to the farm's virtual MAC.
    #[inline(always)]
    fn farm(ctx: &XdpContext, pkt: &mut Packet, svc: &ServiceInfo, cfg: &GlobalConfig) -> u32 {
        let (flow, is_syn, v6) = (&pkt.flow, pkt.is_syn, pkt.v6);
        let own = match FARM.get(0) {
            Some(f) => f.own_member,
            None => NO_BACKEND,
        };
        let owner = if flow.proto == PROTO_TCP {
            if !is_syn {
                return if has_socket(ctx, flow, v6) {
                    deliver(ctx, pkt, svc, cfg, own, Stat::FarmPassSocket)
                } else {
                    verdict(Stat::FarmDropNoSocket, xdp_action::XDP_DROP)
                };
            }
            ring_lookup(svc, flow)
        } else {
            pick_backend(svc, flow, false, cfg.udp_timeout_ns)
        };
        if owner == NO_BACKEND || !backend_valid(owner) {
            return verdict(Stat::DropNoBackend, xdp_action::XDP_DROP);
        }
        if owner != own {
            return verdict(Stat::FarmDropNotOwner, xdp_action::XDP_DROP);
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
        s: Stat,
    ) -> u32 {
        pkt.eth.dst = cfg.own_mac;
        account(ctx, svc.id, own);
        verdict(s, xdp_action::XDP_PASS)
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
            core::mem::size_of::<aya_ebpf::bindings::bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2>()
        } else {
            // SAFETY: as above, ipv4 member; the v4 address is the last 4 bytes.
            unsafe {
                let t = &mut tuple.__bindgen_anon_1.ipv4;
                t.saddr = core::ptr::read_unaligned(flow.src.as_ptr().add(12) as *const u32);
                t.daddr = core::ptr::read_unaligned(flow.dst.as_ptr().add(12) as *const u32);
                t.sport = flow.sport.to_be();
                t.dport = flow.dport.to_be();
            }
            core::mem::size_of::<aya_ebpf::bindings::bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>()
        };
        // SAFETY: helper call with a stack tuple of the stated size; netns -1 = the device's.
        let sk =
            unsafe { bpf_skc_lookup_tcp(ctx.ctx as *mut _, &mut tuple, size as u32, u64::MAX, 0) };
        if sk.is_null() {
            return false;
        }
        // SAFETY: non-null socket from the lookup; `state` is readable on sock_common and the
        // reference is released right after.
        let state = unsafe { (*sk).state };
        unsafe { bpf_sk_release(sk as *mut _) };
        state != TCP_STATE_LISTEN
    }

    /// Ring slot of a flow on the service's current table.
    #[inline(always)]
    fn ring_lookup(svc: &ServiceInfo, flow: &FlowKey) -> u32 {
        if svc.ring_size == 0 {
            return NO_BACKEND;
        }
        let hash = flow_hash(
            HashMode::from_u8(svc.hash_mode),
            &flow.src,
            flow.sport,
            flow.dport,
            flow.proto,
        );
        match RING.get(svc.ring_offset + hash % svc.ring_size) {
            Some(b) => *b,
            None => NO_BACKEND,
        }
    }

    /// Conntrack first (except for SYNs, which always re-hash so a reused tuple follows the
    /// current table), then the service's Maglev ring. Returns `NO_BACKEND` if none.
    #[inline(always)]
    fn pick_backend(svc: &ServiceInfo, flow: &FlowKey, is_syn: bool, udp_timeout: u64) -> u32 {
        let udp = flow.proto == PROTO_UDP;
        // SAFETY: helper without side effects.
        let now = if udp {
            unsafe { bpf_ktime_get_ns() }
        } else {
            0
        };
        if !is_syn {
            if let Some(ct) = CONNTRACK.get_ptr_mut(flow) {
                // SAFETY: the LRU value stays valid for the duration of this program run.
                let ct = unsafe { &mut *ct };
                let live = !udp || now.wrapping_sub(ct.last_seen_ns) <= udp_timeout;
                if live && backend_valid(ct.backend) {
                    if udp {
                        ct.last_seen_ns = now;
                    }
                    count(Stat::CtHit);
                    return ct.backend;
                }
            }
            count(Stat::CtMissOther);
        } else {
            count(Stat::CtMissSyn);
        }

        let backend = ring_lookup(svc, flow);
        if backend != NO_BACKEND {
            let entry = CtEntry {
                backend,
                _pad: 0,
                last_seen_ns: now,
            };
            if CONNTRACK.insert(flow, &entry, 0).is_err() {
                count(Stat::CtInsertFail);
            }
        }
        backend
    }

    #[inline(always)]
    fn backend_valid(id: u32) -> bool {
        match BACKENDS.get(id) {
            Some(b) => id != NO_BACKEND && b.flags & BACKEND_F_VALID != 0,
            None => false,
        }
    }
}

lb_ebpf::bpf_boilerplate!();
