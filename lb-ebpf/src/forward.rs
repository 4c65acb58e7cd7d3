//! Sending a packet on to its backend. Direct routing changes only the MACs: the backend holds
//! the VIP on `lo` and answers the client itself. Tunnel encapsulation will land here.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{GlobalConfig, ServiceInfo, Stat};

use crate::{
    maps::{account, verdict},
    parse::Packet,
    select::Dst,
};

#[inline(always)]
pub fn direct(
    ctx: &XdpContext,
    pkt: &mut Packet,
    svc: &ServiceInfo,
    cfg: &GlobalConfig,
    dst: &Dst,
) -> u32 {
    pkt.eth.dst = dst.backend.mac;
    pkt.eth.src = cfg.own_mac;
    account(ctx, svc.id, dst.id);
    verdict(Stat::Tx, xdp_action::XDP_TX)
}
