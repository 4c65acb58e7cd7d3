//! farmlb XDP data plane: service lookup, conntrack, weighted Maglev, direct-routing forward,
//! and farm mode (local delivery of the flows this node owns, socket-aware for TCP).
//!
//! The pipeline is `parse` -> `select::service` -> `select::backend` (conntrack, then the ring)
//! -> `forward`, or `farm` for farm services. Every exit path bumps exactly one reason counter
//! in `STATS` (through `maps::verdict`), plus the conntrack outcome where there is one: a
//! forwarded packet bumps one combined slot for both (`Stat::forwarded`), which readers
//! split again (`lb_common::fold_stats`).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod conntrack;
#[cfg(target_arch = "bpf")]
mod farm;
#[cfg(target_arch = "bpf")]
mod forward;
#[cfg(target_arch = "bpf")]
mod icmp;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod select;

#[cfg(target_arch = "bpf")]
mod prog {
    use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
    use lb_common::{Addr, Stat, FWD_FARM};

    use crate::{
        farm, forward, icmp,
        maps::{count, drop_for, verdict, VIP_ADDRS},
        parse::{self, Unparsed},
        select,
    };

    // `frags` (BPF_F_XDP_HAS_FRAGS): the program is multi-buffer safe (it reads headers from
    // the first buffer only, rewrites only the MACs, and `account` counts every fragment), and
    // without it native mode refuses devices whose MTU exceeds a page (jumbo frames).
    #[xdp(frags)]
    // Into the entry point the macro wraps it in: left a BPF-to-BPF call (LLVM does not
    // inline a function this large on its own), every packet paid for a call and a frame.
    #[inline(always)]
    pub fn farmlb_xdp(ctx: XdpContext) -> u32 {
        let mut pkt = match parse::parse(&ctx) {
            Ok(p) => p,
            Err(Unparsed::Pass(reason)) => return verdict(reason, xdp_action::XDP_PASS),
            Err(Unparsed::DropIfVip { dst, reason }) => return drop_if_vip(&dst.0, reason),
            Err(Unparsed::Icmp(p)) => {
                // SAFETY: read-only lookup of a plain value.
                if unsafe { VIP_ADDRS.get(p.ip.dst()) }.is_none() {
                    return verdict(Stat::PassNotVip, xdp_action::XDP_PASS);
                }
                return icmp::handle(&ctx, p);
            }
        };
        let Some(svc) = select::service(&pkt.flow) else {
            return verdict(Stat::PassNotVip, xdp_action::XDP_PASS);
        };
        // Completes the flow's conntrack key.
        pkt.flow.svc = svc.id as u16;
        if svc.fwd_mode == FWD_FARM {
            return farm::farm(&ctx, &mut pkt, &svc);
        }
        match select::backend(&svc, &pkt.flow, pkt.is_syn) {
            (Some(dst), outcome) => forward::send(
                &ctx,
                pkt.eth,
                &pkt.ip,
                pkt.l2_len,
                &pkt.flow,
                &svc,
                &dst,
                outcome.forwarded(),
            ),
            (None, outcome) => {
                count(outcome);
                drop_for(svc.id, Stat::DropNoBackend)
            }
        }
    }
    lb_ebpf::check_name!(farmlb_xdp, lb_common::maps::PROGRAM);

    /// Rare path (fragment, options, truncated L4): without the ports there is no service to
    /// look up, so `VIP_ADDRS` tells "drop, it was for us" from "pass, not ours".
    #[inline(always)]
    fn drop_if_vip(dst: &Addr, reason: Stat) -> u32 {
        // SAFETY: read-only lookup of a plain value.
        if unsafe { VIP_ADDRS.get(dst) }.is_some() {
            verdict(reason, xdp_action::XDP_DROP)
        } else {
            verdict(Stat::PassNotVip, xdp_action::XDP_PASS)
        }
    }
}

lb_ebpf::bpf_boilerplate!();
