//! Sending a packet on to its backend. Direct routing changes only the MACs: the backend holds
//! the VIP on `lo` and answers the client itself. Tunnel encapsulation will land here.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{GlobalConfig, ServiceInfo, Stat};

use crate::{
    maps::{account, verdict},
    parse::EthHdr,
    select::Dst,
};

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
