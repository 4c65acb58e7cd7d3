//! The built XDP object, inspected without loading it (no root needed).

use aya_obj::{generated::BPF_PSEUDO_CALL, Object};

/// `farmlb_xdp` is one flat function: a BPF-to-BPF call (an entry point that does not
/// inline its body, a `memset` / `memmove` for a byte array) costs a call and a stack frame
/// on every packet that reaches it; one per packet was measured at about 7 ns.
#[test]
fn farmlb_xdp_calls_no_subprograms() {
    let obj = Object::parse(farmlb::EBPF_OBJECT).expect("parse the XDP object");
    let prog = &obj.programs[lb_common::maps::PROGRAM];
    let f = &obj.functions[&(prog.section_index, prog.address)];
    let calls = f
        .instructions
        .iter()
        .filter(|i| i.code == 0x85 && u32::from(i.src_reg()) == BPF_PSEUDO_CALL)
        .count();
    assert!(f.instructions.len() > 1000, "the program body is inlined");
    assert_eq!(calls, 0, "BPF-to-BPF calls in farmlb_xdp");
}
