//! A classic BPF filter on the membership socket: datagrams from the peers and known members
//! are queued; of anyone else's only one in [`OTHERS_ONE_IN`] (chosen at random) is, before it
//! takes room in the receive buffer. A flood from a stranger then cannot fill the buffer and
//! crowd out the probes and acks that keep members alive (SWIM would declare them down), while
//! a node that is in nobody's peer list still gets its announcements through.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::os::fd::AsRawFd;

use libc::sock_filter;

/// One datagram in this many from other addresses reaches the socket (and the daemon's own
/// per-second budget for them).
pub const OTHERS_ONE_IN: u32 = 16;

/// `SKF_NET_OFF`: loads relative to the network header.
const NET: u32 = (-0x0010_0000i32) as u32;
/// `SKF_AD_OFF + SKF_AD_RANDOM`: a random 32-bit number.
const RANDOM: u32 = (-0x1000i32 + 56) as u32;

const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const AND_K: u16 = (libc::BPF_ALU | libc::BPF_AND | libc::BPF_K) as u16;
const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;

fn ins(code: u16, jt: u8, jf: u8, k: u32) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// The filter for a socket of `v6` family admitting `allowed` (addresses of the other family
/// are left out: they cannot arrive on it).
pub fn program(v6: bool, allowed: &BTreeSet<IpAddr>) -> Vec<sock_filter> {
    // Per address: its words, compared in turn; a mismatch skips to the next address.
    let words: Vec<Vec<u32>> = allowed
        .iter()
        .filter_map(|a| match (a, v6) {
            (IpAddr::V4(a), false) => Some(vec![u32::from(*a)]),
            (IpAddr::V6(a), true) => Some(
                a.octets()
                    .chunks(4)
                    .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            _ => None,
        })
        .collect();
    let src = if v6 { 8 } else { 12 };
    let mut p = Vec::new();
    // Each address block: (load word, compare) per word. Jumps are relative, so the block's
    // distance to "accept" is computed from the instructions still to come.
    let per_addr = if v6 { 8 } else { 2 };
    let tail = 4; // ld rand, and, jeq, ret 0
    let n = words.len();
    for (i, w) in words.iter().enumerate() {
        for (j, &word) in w.iter().enumerate() {
            p.push(ins(LD_W_ABS, 0, 0, NET.wrapping_add(src + 4 * j as u32)));
            // Instructions after this compare up to (excluding) the accept instruction.
            let rest_block = per_addr - 2 * (j + 1);
            let after = rest_block + (n - i - 1) * per_addr + tail;
            let next_addr = rest_block;
            let last = j + 1 == w.len();
            let jt = if last { after } else { 0 };
            p.push(ins(JEQ_K, jt as u8, next_addr as u8, word));
        }
    }
    p.push(ins(LD_W_ABS, 0, 0, RANDOM));
    p.push(ins(AND_K, 0, 0, OTHERS_ONE_IN - 1));
    p.push(ins(JEQ_K, 1, 0, 0));
    p.push(ins(RET_K, 0, 0, 0));
    p.push(ins(RET_K, 0, 0, u32::MAX));
    p
}

/// Attach (or replace) the filter on `sock`. Best effort, like the buffer size: without it
/// the daemon's own budget still drops strangers' datagrams, only later.
pub fn attach(sock: &impl AsRawFd, v6: bool, allowed: &BTreeSet<IpAddr>) {
    // Jump offsets are 8-bit: a long list is not filtered in the kernel.
    if allowed.len() > 24 {
        return;
    }
    let mut prog = program(v6, allowed);
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_mut_ptr(),
    };
    // SAFETY: valid fd; `fprog` points at `prog`, alive for the call (the kernel copies it).
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&fprog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        tracing::warn!(
            "membership socket filter not attached: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::time::Duration;

    /// Jumps land inside the program and every path ends in a return.
    #[test]
    fn jumps_stay_in_the_program() {
        for v6 in [false, true] {
            for n in 0..6u8 {
                let set: BTreeSet<IpAddr> = (0..n)
                    .map(|i| {
                        if v6 {
                            IpAddr::V6(std::net::Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, i as u16))
                        } else {
                            IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, i))
                        }
                    })
                    .collect();
                let p = program(v6, &set);
                for (i, f) in p.iter().enumerate() {
                    if f.code == JEQ_K {
                        assert!(i + 1 + (f.jt as usize) < p.len());
                        assert!(i + 1 + (f.jf as usize) < p.len());
                    }
                }
                assert_eq!(p.last().unwrap().k, u32::MAX);
                assert_eq!(p[p.len() - 2].k, 0);
            }
        }
    }

    /// On loopback: a listed sender's datagrams all arrive; an unlisted one's about one in
    /// `OTHERS_ONE_IN`.
    #[test]
    fn strangers_are_thinned_in_the_kernel() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let listed = UdpSocket::bind("127.0.0.2:0").unwrap();
        let other = UdpSocket::bind("127.0.0.3:0").unwrap();
        attach(&rx, false, &["127.0.0.2".parse().unwrap()].into());
        let to = rx.local_addr().unwrap();
        let count = |s: &UdpSocket, n: usize| {
            for _ in 0..n {
                s.send_to(b"x", to).unwrap();
            }
            let mut got = 0;
            let mut buf = [0u8; 8];
            while rx.recv_from(&mut buf).is_ok() {
                got += 1;
            }
            got
        };
        assert_eq!(count(&listed, 200), 200);
        let n = count(&other, 1600);
        assert!(
            (40..=200).contains(&n),
            "{n} of 1600 from a stranger got through"
        );
    }
}
