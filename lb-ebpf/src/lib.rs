//! Empty library target: lets `lb-userspace` name this crate as a build-dependency so cargo
//! rebuilds the daemon when the XDP program changes (the aya-template arrangement).
#![no_std]
