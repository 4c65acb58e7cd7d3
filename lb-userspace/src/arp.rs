//! ARP responder for farm and failover VIPs, on an `AF_PACKET` socket of the farm interface.
//!
//! The VIPs sit on `lo` with `arp_ignore=1`, so the kernel never answers for them; the node
//! chosen by the membership answers here instead, with the MAC the VIP must resolve to (the
//! farm's virtual MAC, or in director failover the active director's own MAC), and sends
//! gratuitous ARP when it takes the role. Frames always leave with the interface's real MAC
//! as Ethernet source, so a switch never learns the virtual MAC and keeps flooding it.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use anyhow::{bail, Context, Result};

const ETH_P_ARP: u16 = 0x0806;
const ARP_LEN: usize = 14 + 28;
const PACKET_OUTGOING: u8 = 4;

/// What the responder answers: nothing unless `active`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ArpState {
    pub active: bool,
    /// (VIP, MAC it resolves to).
    pub vips: Vec<(Ipv4Addr, [u8; 6])>,
}

/// Runs a receive thread until dropped.
pub struct ArpResponder {
    fd: Arc<OwnedFd>,
    own_mac: [u8; 6],
    state: Arc<Mutex<ArpState>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
    /// Requests answered so far.
    pub answered: Arc<std::sync::atomic::AtomicU64>,
}

fn ifindex(iface: &str) -> Result<i32> {
    let name = std::ffi::CString::new(iface)?;
    // SAFETY: valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if idx == 0 {
        bail!("interface {iface:?} does not exist");
    }
    Ok(idx as i32)
}

impl ArpResponder {
    pub fn start(iface: &str, own_mac: [u8; 6]) -> Result<ArpResponder> {
        let idx = ifindex(iface)?;
        // SAFETY: plain socket syscall; the descriptor is owned right away.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                (ETH_P_ARP.to_be()) as i32,
            )
        };
        if raw < 0 {
            return Err(std::io::Error::last_os_error()).context("AF_PACKET socket for ARP");
        }
        // SAFETY: `raw` is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: zeroed sockaddr_ll is valid; fields set below.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ETH_P_ARP.to_be();
        sll.sll_ifindex = idx;
        // SAFETY: valid pointer and length.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sll as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("binding the ARP socket");
        }
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        // SAFETY: valid option pointer and length.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        let fd = Arc::new(fd);
        let state = Arc::new(Mutex::new(ArpState::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let thread = {
            let (fd, state, stop, answered) =
                (fd.clone(), state.clone(), stop.clone(), answered.clone());
            thread::Builder::new()
                .name("farm-arp".into())
                .spawn(move || receive_loop(&fd, own_mac, &state, &stop, &answered))?
        };
        Ok(ArpResponder {
            fd,
            own_mac,
            state,
            stop,
            thread: Some(thread),
            answered,
        })
    }

    /// Replace what is answered. Returns whether anything changed.
    pub fn set(&self, new: ArpState) -> bool {
        let mut s = self.state.lock().expect("arp state");
        let changed = *s != new;
        *s = new;
        changed
    }

    /// Broadcast gratuitous ARP (a request and a reply) for every VIP, if active.
    pub fn gratuitous(&self) {
        let s = self.state.lock().expect("arp state").clone();
        if !s.active {
            return;
        }
        for (vip, mac) in s.vips {
            for op in [1u16, 2] {
                let f = frame(
                    [0xff; 6],
                    self.own_mac,
                    op,
                    mac,
                    vip,
                    if op == 1 { [0; 6] } else { [0xff; 6] },
                    vip,
                );
                send(&self.fd, &f);
            }
        }
    }
}

impl Drop for ArpResponder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn send(fd: &OwnedFd, f: &[u8]) {
    // SAFETY: valid buffer; the socket is bound to the interface.
    let n = unsafe {
        libc::send(
            fd.as_raw_fd(),
            f.as_ptr() as *const libc::c_void,
            f.len(),
            0,
        )
    };
    if n < 0 {
        tracing::warn!("sending ARP: {}", std::io::Error::last_os_error());
    }
}

/// An Ethernet + ARP (IPv4 over Ethernet) frame.
pub fn frame(
    eth_dst: [u8; 6],
    eth_src: [u8; 6],
    op: u16,
    sha: [u8; 6],
    spa: Ipv4Addr,
    tha: [u8; 6],
    tpa: Ipv4Addr,
) -> Vec<u8> {
    let mut f = Vec::with_capacity(ARP_LEN);
    f.extend_from_slice(&eth_dst);
    f.extend_from_slice(&eth_src);
    f.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&sha);
    f.extend_from_slice(&spa.octets());
    f.extend_from_slice(&tha);
    f.extend_from_slice(&tpa.octets());
    f
}

/// The reply to an ARP request frame `req`, if it asks for one of `state`'s VIPs.
pub fn reply_to(req: &[u8], own_mac: [u8; 6], state: &ArpState) -> Option<Vec<u8>> {
    if !state.active || req.len() < ARP_LEN || req[12..14] != ETH_P_ARP.to_be_bytes() {
        return None;
    }
    let a = &req[14..];
    if a[0..6] != [0, 1, 0x08, 0x00, 6, 4] || a[6..8] != [0, 1] {
        return None;
    }
    let sha: [u8; 6] = a[8..14].try_into().ok()?;
    let spa = Ipv4Addr::new(a[14], a[15], a[16], a[17]);
    let tpa = Ipv4Addr::new(a[24], a[25], a[26], a[27]);
    // Gratuitous ARP of another node (sender = target) and probes are not questions.
    if spa == tpa || spa.is_unspecified() {
        return None;
    }
    let (_, mac) = state.vips.iter().find(|(v, _)| *v == tpa)?;
    Some(frame(sha, own_mac, 2, *mac, tpa, sha, spa))
}

fn receive_loop(
    fd: &OwnedFd,
    own_mac: [u8; 6],
    state: &Mutex<ArpState>,
    stop: &AtomicBool,
    answered: &std::sync::atomic::AtomicU64,
) {
    let mut buf = [0u8; 1600];
    while !stop.load(Ordering::SeqCst) {
        // SAFETY: zeroed sockaddr_ll is valid output space.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        // SAFETY: valid buffers and lengths.
        let n = unsafe {
            libc::recvfrom(
                fd.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                0,
                &mut from as *mut _ as *mut libc::sockaddr,
                &mut len,
            )
        };
        if n <= 0 || from.sll_pkttype == PACKET_OUTGOING {
            continue;
        }
        let st = state.lock().expect("arp state").clone();
        if let Some(r) = reply_to(&buf[..n as usize], own_mac, &st) {
            send(fd, &r);
            answered.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Keep re-sending gratuitous ARP a few times after a role change (a lost frame would leave
/// clients on the old answer until their entry ages out).
pub fn announce_burst(r: &ArpResponder, times: usize, every: Duration) {
    for i in 0..times {
        if i > 0 {
            thread::sleep(every);
        }
        r.gratuitous();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_only_for_vips_when_active() {
        let own = [2, 0, 0, 0, 0, 9];
        let vmac = [2, 0xfa, 0, 0, 0, 1];
        let client = [2, 0, 0, 0, 0, 2];
        let vip = Ipv4Addr::new(10, 99, 100, 1);
        let cip = Ipv4Addr::new(10, 99, 0, 2);
        let req = frame([0xff; 6], client, 1, client, cip, [0; 6], vip);
        let mut st = ArpState {
            active: false,
            vips: vec![(vip, vmac)],
        };
        assert!(reply_to(&req, own, &st).is_none());
        st.active = true;
        let r = reply_to(&req, own, &st).unwrap();
        assert_eq!(&r[0..6], &client); // to the asker
        assert_eq!(&r[6..12], &own); // from our real MAC
        assert_eq!(&r[14 + 8..14 + 14], &vmac); // VIP is at the virtual MAC
        assert_eq!(&r[14 + 14..14 + 18], &vip.octets());
        assert_eq!(&r[14 + 24..14 + 28], &cip.octets());
        let other = frame(
            [0xff; 6],
            client,
            1,
            client,
            cip,
            [0; 6],
            Ipv4Addr::new(10, 9, 9, 9),
        );
        assert!(reply_to(&other, own, &st).is_none());
        let garp = frame([0xff; 6], client, 1, client, vip, [0; 6], vip);
        assert!(reply_to(&garp, own, &st).is_none());
    }
}
