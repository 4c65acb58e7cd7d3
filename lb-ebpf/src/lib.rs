//! What the XDP binaries (`main.rs`, `bin/pass.rs`, `bin/reference.rs`) share: the items every
//! eBPF object needs, and the compile-time check that a program or map is named as `lb-common`
//! says. Also lets `lb-userspace` name this crate as a build-dependency so cargo rebuilds the
//! daemon when the XDP program changes (the aya-template arrangement).
#![no_std]

/// The items every XDP binary of this crate needs, expanded in the binary itself (a `license`
/// section or panic handler left in this library could be dropped at link time): the panic
/// handler (never runs: the verifier rejects its endless loop, so code that can panic does
/// not load), the GPL license the socket-lookup helpers require, and an empty `main` so the
/// binaries also build for the host.
#[macro_export]
macro_rules! bpf_boilerplate {
    () => {
        #[cfg(target_arch = "bpf")]
        #[panic_handler]
        fn panic(_info: &core::panic::PanicInfo) -> ! {
            loop {}
        }

        #[cfg(target_arch = "bpf")]
        #[unsafe(link_section = "license")]
        #[unsafe(no_mangle)]
        static LICENSE: [u8; 4] = *b"GPL\0";

        #[cfg(not(target_arch = "bpf"))]
        fn main() {}
    };
}

/// Fails the build unless `$item` exists and is spelled exactly `$expected`: aya-ebpf names
/// programs and maps after their functions and statics, and userspace finds them by the
/// `lb-common` constants.
#[macro_export]
macro_rules! check_name {
    ($item:ident, $expected:expr) => {
        const _: () = {
            let _ = $item;
            assert!(
                $crate::str_eq(stringify!($item), $expected),
                concat!("`", stringify!($item), "` is not named as lb-common says")
            );
        };
    };
}

/// `a == b`, usable in constant evaluation (`str`'s `PartialEq` is not `const`).
pub const fn str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}
