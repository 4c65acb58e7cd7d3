//! `XDP_PASS` for every frame. Test rigs attach it to the switch-side peer of the director's
//! veth: a veth only receives frames another veth sent with XDP_TX when it runs XDP itself.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod prog {
    use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

    #[xdp]
    pub fn farmlb_pass(_ctx: XdpContext) -> u32 {
        xdp_action::XDP_PASS
    }
    lb_ebpf::check_name!(farmlb_pass, lb_common::maps::PASS_PROGRAM);
}

lb_ebpf::bpf_boilerplate!();
