//! ARP and IPv6 neighbour-discovery responder for farm and failover VIPs, on `AF_PACKET`
//! sockets of the farm interface.
//!
//! The VIPs sit on `lo` — IPv4 with `arp_ignore=1`; IPv6 needs nothing, the kernel only
//! answers neighbour solicitations for addresses of the receiving interface — so the kernel
//! never answers for them; the node chosen by the membership answers here instead, with the
//! MAC the VIP must resolve to (the farm's virtual MAC, or in director failover the active
//! director's own MAC), and announces the VIPs when it takes the role (gratuitous ARP for
//! IPv4, unsolicited neighbour advertisements for IPv6). Frames always leave with the
//! interface's real MAC as Ethernet source, so a switch never learns the virtual MAC and
//! keeps flooding it.
//!
//! Every node joins the solicited-node multicast groups of the IPv6 VIPs on the interface
//! (a NIC's multicast filter would otherwise drop the solicitations, since the VIPs are not on
//! it), and a socket filter passes only ICMPv6 neighbour solicitations to the IPv6 socket.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use lb_common::wire::{ETH_HLEN, ETH_P_ARP, ETH_P_IPV6, IPPROTO_ICMPV6, IPV6_HLEN};

const ARP_LEN: usize = ETH_HLEN + 28;
/// `sll_pkttype` of a frame this host sent (seen on a packet socket too).
const PACKET_OUTGOING: u8 = 4;
/// ICMPv6 types and options of neighbour discovery (RFC 4861).
const ND_NEIGHBOR_SOLICIT: u8 = 135;
const ND_NEIGHBOR_ADVERT: u8 = 136;
const ND_OPT_SOURCE_LL: u8 = 1;
const ND_OPT_TARGET_LL: u8 = 2;
/// Ethernet + IPv6 header: where the ICMPv6 message starts.
const ICMP6_OFF: usize = ETH_HLEN + IPV6_HLEN;
/// A neighbour solicitation without options.
const NS_MIN_LEN: usize = 24;
/// Neighbour advertisement flags.
const NA_SOLICITED: u8 = 0x40;
const NA_OVERRIDE: u8 = 0x20;
/// ff02::1, all nodes.
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

/// What the responder answers: nothing unless `active`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ArpState {
    pub active: bool,
    /// IPv4 VIPs: (VIP, MAC it resolves to), answered by ARP.
    pub vips: Vec<(Ipv4Addr, [u8; 6])>,
    /// IPv6 VIPs: (VIP, MAC it resolves to), answered by neighbour advertisements.
    pub vips6: Vec<(Ipv6Addr, [u8; 6])>,
}

/// Runs one receive thread per socket (ARP, IPv6 ND) until dropped.
pub struct ArpResponder {
    fd: Arc<OwnedFd>,
    fd6: Arc<OwnedFd>,
    ifindex: i32,
    own_mac: [u8; 6],
    state: Arc<Mutex<ArpState>>,
    /// Multicast MACs joined on the IPv6 socket.
    joined: Mutex<BTreeSet<[u8; 6]>>,
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
    /// Requests (ARP and neighbour solicitations) answered so far.
    pub answered: Arc<AtomicU64>,
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

/// Classic BPF for the IPv6 socket: accept ICMPv6 (next header right after the fixed
/// header) neighbour solicitations, drop everything else in the kernel.
const NS_FILTER: [libc::sock_filter; 6] = [
    // ldb [20]: IPv6 next header
    bpf_stmt(0x30, 14 + 6),
    // jeq #58, next, drop
    bpf_jump(0x15, IPPROTO_ICMPV6 as u32, 0, 3),
    // ldb [54]: ICMPv6 type
    bpf_stmt(0x30, ICMP6_OFF as u32),
    // jeq #135, accept, drop
    bpf_jump(0x15, ND_NEIGHBOR_SOLICIT as u32, 0, 1),
    // ret #65535
    bpf_stmt(0x06, 0xffff),
    // ret #0
    bpf_stmt(0x06, 0),
];

const fn bpf_stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

const fn bpf_jump(code: u16, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

fn setsockopt<T>(fd: &OwnedFd, level: i32, name: i32, val: &T, what: &str) -> Result<()> {
    // SAFETY: valid option pointer and length for the duration of the call.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            val as *const T as *const libc::c_void,
            std::mem::size_of::<T>() as u32,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context(what.to_string());
    }
    Ok(())
}

/// A raw packet socket bound to `proto` on interface `idx`, with a 200 ms receive timeout
/// (so the receive thread notices when to stop) and `filter` attached before binding.
fn packet_socket(idx: i32, proto: u16, filter: Option<&[libc::sock_filter]>) -> Result<OwnedFd> {
    // SAFETY: plain socket syscall (protocol 0: receives nothing until bound); the descriptor
    // is owned right away.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error()).context("AF_PACKET socket");
    }
    // SAFETY: `raw` is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    if let Some(f) = filter {
        let prog = libc::sock_fprog {
            len: f.len() as u16,
            filter: f.as_ptr() as *mut libc::sock_filter,
        };
        setsockopt(
            &fd,
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            &prog,
            "attaching the neighbour-solicitation filter",
        )?;
    }
    // SAFETY: zeroed sockaddr_ll is valid; fields set below.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto.to_be();
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
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("binding the packet socket (ethertype {proto:#06x})"));
    }
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 200_000,
    };
    setsockopt(
        &fd,
        libc::SOL_SOCKET,
        libc::SO_RCVTIMEO,
        &tv,
        "setting SO_RCVTIMEO",
    )?;
    Ok(fd)
}

impl ArpResponder {
    pub fn start(iface: &str, own_mac: [u8; 6]) -> Result<ArpResponder> {
        let idx = ifindex(iface)?;
        let fd = Arc::new(packet_socket(idx, ETH_P_ARP, None).context("ARP socket")?);
        let fd6 = Arc::new(
            packet_socket(idx, ETH_P_IPV6, Some(&NS_FILTER))
                .context("neighbour discovery socket")?,
        );
        let state = Arc::new(Mutex::new(ArpState::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        for (name, sock, reply) in [
            ("farm-arp", fd.clone(), reply_to as ReplyFn),
            ("farm-nd", fd6.clone(), nd_reply_to as ReplyFn),
        ] {
            let (state, stop, answered) = (state.clone(), stop.clone(), answered.clone());
            threads.push(
                thread::Builder::new()
                    .name(name.into())
                    .spawn(move || receive_loop(&sock, own_mac, &state, &stop, &answered, reply))?,
            );
        }
        Ok(ArpResponder {
            fd,
            fd6,
            ifindex: idx,
            own_mac,
            state,
            joined: Mutex::new(BTreeSet::new()),
            stop,
            threads,
            answered,
        })
    }

    /// Replace what is answered. Returns whether anything changed.
    pub fn set(&self, new: ArpState) -> bool {
        self.join_groups(&new.vips6);
        let mut s = self.state.lock().expect("arp state");
        let changed = *s != new;
        *s = new;
        changed
    }

    /// Be a member of exactly the solicited-node multicast groups of `vips6` on the interface
    /// (whether active or not: a standby that takes over must already receive them).
    fn join_groups(&self, vips6: &[(Ipv6Addr, [u8; 6])]) {
        let wanted: BTreeSet<[u8; 6]> = vips6
            .iter()
            .map(|(ip, _)| multicast_mac(solicited_node(*ip)))
            .collect();
        let mut joined = self.joined.lock().expect("nd groups");
        let change = |mac: &[u8; 6], opt: i32, what: &str| {
            let mut mr = libc::packet_mreq {
                mr_ifindex: self.ifindex,
                mr_type: libc::PACKET_MR_MULTICAST as u16,
                mr_alen: 6,
                mr_address: [0; 8],
            };
            mr.mr_address[..6].copy_from_slice(mac);
            if let Err(e) = setsockopt(&self.fd6, libc::SOL_PACKET, opt, &mr, what) {
                tracing::warn!("{} {}: {e:#}", what, crate::neigh::fmt_mac(mac));
            }
        };
        for mac in wanted.difference(&joined) {
            change(
                mac,
                libc::PACKET_ADD_MEMBERSHIP,
                "joining the solicited-node group",
            );
        }
        for mac in joined.difference(&wanted) {
            change(
                mac,
                libc::PACKET_DROP_MEMBERSHIP,
                "leaving the solicited-node group",
            );
        }
        *joined = wanted;
    }

    /// Announce every VIP, if active: gratuitous ARP (a request and a reply) for IPv4 VIPs,
    /// an unsolicited neighbour advertisement (override set) to all nodes for IPv6 VIPs.
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
        for (vip, mac) in s.vips6 {
            let f = na_frame(
                multicast_mac(ALL_NODES),
                self.own_mac,
                vip,
                ALL_NODES,
                vip,
                mac,
                false,
            );
            send(&self.fd6, &f);
        }
    }
}

impl Drop for ArpResponder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

type ReplyFn = fn(&[u8], [u8; 6], &ArpState) -> Option<Vec<u8>>;

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
        tracing::warn!(
            "sending an ARP / neighbour advertisement: {}",
            std::io::Error::last_os_error()
        );
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

// --- IPv6 neighbour discovery --------------------------------------------------------------

/// The solicited-node multicast address of `ip` (ff02::1:ffXX:XXXX, RFC 4291).
pub fn solicited_node(ip: Ipv6Addr) -> Ipv6Addr {
    let o = ip.octets();
    Ipv6Addr::from([
        0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, o[13], o[14], o[15],
    ])
}

/// The Ethernet multicast MAC of an IPv6 multicast address (33:33 + its last 32 bits).
pub fn multicast_mac(ip: Ipv6Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x33, 0x33, o[12], o[13], o[14], o[15]]
}

/// The ICMPv6 checksum of `msg` (its checksum field counted as written) from `src` to `dst`:
/// the ones' complement sum over the IPv6 pseudo-header and the message (RFC 4443 §2.3).
/// Over a message with a correct checksum, the result is 0.
pub fn icmpv6_checksum(src: Ipv6Addr, dst: Ipv6Addr, msg: &[u8]) -> u16 {
    let mut sum: u64 = 0;
    let mut add = |b: &[u8]| {
        for c in b.chunks(2) {
            sum += u64::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
    };
    add(&src.octets());
    add(&dst.octets());
    add(&(msg.len() as u32).to_be_bytes());
    add(&[0, 0, 0, IPPROTO_ICMPV6]);
    add(msg);
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Ethernet + IPv6 (hop limit 255, as neighbour discovery requires) around ICMPv6 `msg`,
/// with the checksum filled in.
fn icmpv6_frame(
    eth_dst: [u8; 6],
    eth_src: [u8; 6],
    src: Ipv6Addr,
    dst: Ipv6Addr,
    mut msg: Vec<u8>,
) -> Vec<u8> {
    msg[2..4].copy_from_slice(&[0, 0]);
    let sum = icmpv6_checksum(src, dst, &msg);
    msg[2..4].copy_from_slice(&sum.to_be_bytes());
    let mut f = Vec::with_capacity(ICMP6_OFF + msg.len());
    f.extend_from_slice(&eth_dst);
    f.extend_from_slice(&eth_src);
    f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    f.extend_from_slice(&[IPPROTO_ICMPV6, 255]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&msg);
    f
}

/// A neighbour advertisement for `target` at `tll` (target link-layer address option),
/// override flag set; `solicited` for an answer, clear for an unsolicited announcement.
pub fn na_frame(
    eth_dst: [u8; 6],
    eth_src: [u8; 6],
    src: Ipv6Addr,
    dst: Ipv6Addr,
    target: Ipv6Addr,
    tll: [u8; 6],
    solicited: bool,
) -> Vec<u8> {
    let flags = NA_OVERRIDE | if solicited { NA_SOLICITED } else { 0 };
    let mut msg = vec![ND_NEIGHBOR_ADVERT, 0, 0, 0, flags, 0, 0, 0];
    msg.extend_from_slice(&target.octets());
    msg.extend_from_slice(&[ND_OPT_TARGET_LL, 1]);
    msg.extend_from_slice(&tll);
    icmpv6_frame(eth_dst, eth_src, src, dst, msg)
}

/// A neighbour solicitation for `target` from `src` (with a source link-layer address
/// option), multicast to the target's solicited-node group, as a host resolving it sends.
pub fn ns_frame(eth_src: [u8; 6], src: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
    let group = solicited_node(target);
    let mut msg = vec![ND_NEIGHBOR_SOLICIT, 0, 0, 0, 0, 0, 0, 0];
    msg.extend_from_slice(&target.octets());
    msg.extend_from_slice(&[ND_OPT_SOURCE_LL, 1]);
    msg.extend_from_slice(&eth_src);
    icmpv6_frame(multicast_mac(group), eth_src, src, group, msg)
}

/// A valid neighbour solicitation, as the kernel would accept it (RFC 4861 §7.1.1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Solicitation {
    pub eth_src: [u8; 6],
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub target: Ipv6Addr,
    /// The source link-layer address option, if present.
    pub sll: Option<[u8; 6]>,
}

/// Parse an Ethernet frame as a neighbour solicitation: IPv6 with hop limit 255, ICMPv6
/// directly after the fixed header, type 135 code 0, correct checksum, a unicast target and
/// well-formed options.
pub fn parse_ns(f: &[u8]) -> Option<Solicitation> {
    if f.len() < ICMP6_OFF + NS_MIN_LEN || f[12..14] != ETH_P_IPV6.to_be_bytes() {
        return None;
    }
    let ip = &f[14..ICMP6_OFF];
    if ip[0] >> 4 != 6 || ip[6] != IPPROTO_ICMPV6 || ip[7] != 255 {
        return None;
    }
    let plen = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    if plen < NS_MIN_LEN || ICMP6_OFF + plen > f.len() {
        return None;
    }
    let msg = &f[ICMP6_OFF..ICMP6_OFF + plen];
    let src = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[8..24]).ok()?);
    let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[24..40]).ok()?);
    if msg[0] != ND_NEIGHBOR_SOLICIT || msg[1] != 0 || icmpv6_checksum(src, dst, msg) != 0 {
        return None;
    }
    let target = Ipv6Addr::from(<[u8; 16]>::try_from(&msg[8..24]).ok()?);
    if target.is_multicast() {
        return None;
    }
    let mut sll = None;
    let mut opts = &msg[NS_MIN_LEN..];
    while opts.len() >= 2 {
        let len = usize::from(opts[1]) * 8;
        if len == 0 || len > opts.len() {
            return None;
        }
        if opts[0] == ND_OPT_SOURCE_LL && len >= 8 {
            sll = Some(opts[2..8].try_into().ok()?);
        }
        opts = &opts[len..];
    }
    Some(Solicitation {
        eth_src: f[6..12].try_into().ok()?,
        src,
        dst,
        target,
        sll,
    })
}

/// The neighbour advertisement answering solicitation frame `req`, if it asks for one of
/// `state`'s IPv6 VIPs: from the VIP to the asker, solicited and override set, the VIP at its
/// MAC. Duplicate address detection probes (unspecified source) are not questions.
pub fn nd_reply_to(req: &[u8], own_mac: [u8; 6], state: &ArpState) -> Option<Vec<u8>> {
    if !state.active {
        return None;
    }
    let ns = parse_ns(req)?;
    if ns.src.is_unspecified() || ns.src.is_multicast() {
        return None;
    }
    let (_, mac) = state.vips6.iter().find(|(v, _)| *v == ns.target)?;
    Some(na_frame(
        ns.sll.unwrap_or(ns.eth_src),
        own_mac,
        ns.target,
        ns.src,
        ns.target,
        *mac,
        true,
    ))
}

fn receive_loop(
    fd: &OwnedFd,
    own_mac: [u8; 6],
    state: &Mutex<ArpState>,
    stop: &AtomicBool,
    answered: &AtomicU64,
    reply: ReplyFn,
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
        if let Some(r) = reply(&buf[..n as usize], own_mac, &st) {
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
            vips6: vec![],
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

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// A neighbour solicitation Linux 6.18 sent resolving fd99::21 from fd99::2
    /// (02:00:00:00:00:0a), and the advertisement the kernel owning fd99::21
    /// (02:00:00:00:00:0b) answered with, captured with tcpdump (`[icmp6 sum ok]`).
    const KERNEL_NS: &str = "3333ff000021 02000000000a 86dd 60000000 0020 3aff \
        fd990000000000000000000000000002 ff0200000000000000000001ff000021 \
        8700 7c1d 00000000 fd990000000000000000000000000021 0101 02000000000a";
    const KERNEL_NA: &str = "02000000000a 02000000000b 86dd 60000000 0020 3aff \
        fd990000000000000000000000000021 fd990000000000000000000000000002 \
        8800 1a87 60000000 fd990000000000000000000000000021 0201 02000000000b";

    fn v6(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    #[test]
    fn answers_a_kernel_solicitation_exactly_as_the_kernel_does() {
        let ns = hex(KERNEL_NS);
        let p = parse_ns(&ns).expect("valid solicitation");
        assert_eq!(p.src, v6("fd99::2"));
        assert_eq!(p.dst, v6("ff02::1:ff00:21"));
        assert_eq!(p.target, v6("fd99::21"));
        assert_eq!(p.sll, Some([2, 0, 0, 0, 0, 0x0a]));
        let own = [2, 0, 0, 0, 0, 0x0b];
        let st = ArpState {
            active: true,
            vips: vec![],
            vips6: vec![(v6("fd99::21"), own)],
        };
        let r = nd_reply_to(&ns, own, &st).expect("answered");
        assert_eq!(r, hex(KERNEL_NA), "byte for byte the kernel's own answer");
        // Our builders reproduce both captured checksums.
        assert_eq!(
            ns_frame([2, 0, 0, 0, 0, 0x0a], v6("fd99::2"), v6("fd99::21")),
            ns
        );
    }

    #[test]
    fn checksum_verifies_and_catches_corruption() {
        let f = na_frame(
            [0x33, 0x33, 0, 0, 0, 1],
            [2, 0, 0, 0, 0, 9],
            v6("fd99:100::1"),
            ALL_NODES,
            v6("fd99:100::1"),
            [2, 0xfa, 0x4c, 0x42, 0, 1],
            false,
        );
        let msg = &f[ICMP6_OFF..];
        assert_eq!(icmpv6_checksum(v6("fd99:100::1"), ALL_NODES, msg), 0);
        assert_eq!(f[20], IPPROTO_ICMPV6);
        assert_eq!(f[21], 255, "hop limit");
        assert_eq!(&f[18..20], &[0, 32], "payload length");
        // Unsolicited: override only, never solicited (it goes to a multicast address).
        assert_eq!(msg[4], NA_OVERRIDE);
        assert_eq!(&msg[26..32], &[2, 0xfa, 0x4c, 0x42, 0, 1]);
        // An odd-length message pads with a zero byte: by hand, 1 + 2 (addresses) + 3
        // (length) + 58 (next header) + 0x0102 + 0x0300 = 0x0442, complemented.
        assert_eq!(icmpv6_checksum(v6("::1"), v6("::2"), &[1, 2, 3]), !0x0442);
        // Any flipped bit of a solicitation makes it invalid.
        let ns = ns_frame([2, 0, 0, 0, 0, 2], v6("fd99::2"), v6("fd99:100::1"));
        assert!(parse_ns(&ns).is_some());
        for i in ICMP6_OFF..ns.len() {
            let mut bad = ns.clone();
            bad[i] ^= 0x10;
            assert!(parse_ns(&bad).is_none(), "byte {i} flipped still parses");
        }
    }

    #[test]
    fn nd_answers_only_real_questions_for_vips_when_active() {
        let own = [2, 0, 0, 0, 0, 9];
        let vmac = [2, 0xfa, 0, 0, 0, 1];
        let client = [2, 0, 0, 0, 0, 2];
        let vip = v6("fd99:100::1");
        let cip = v6("fd99::2");
        let mut st = ArpState {
            active: false,
            vips: vec![],
            vips6: vec![(vip, vmac)],
        };
        let ns = ns_frame(client, cip, vip);
        assert_eq!(&ns[0..6], &[0x33, 0x33, 0xff, 0, 0, 1]);
        assert!(nd_reply_to(&ns, own, &st).is_none(), "standby stays silent");
        st.active = true;
        let r = nd_reply_to(&ns, own, &st).expect("answered");
        assert_eq!(&r[0..6], &client, "to the asker's link-layer address");
        assert_eq!(&r[6..12], &own, "from our real MAC");
        assert_eq!(&r[22..38], &vip.octets(), "from the VIP");
        assert_eq!(&r[38..54], &cip.octets(), "to the asker");
        let msg = &r[ICMP6_OFF..];
        assert_eq!(msg[0], ND_NEIGHBOR_ADVERT);
        assert_eq!(msg[4], NA_SOLICITED | NA_OVERRIDE);
        assert_eq!(&msg[8..24], &vip.octets());
        assert_eq!(&msg[24..26], &[ND_OPT_TARGET_LL, 1]);
        assert_eq!(&msg[26..32], &vmac, "the VIP is at the virtual MAC");
        assert_eq!(icmpv6_checksum(vip, cip, msg), 0);
        // Another target, a DAD probe, a wrong hop limit, ARP: no answer.
        assert!(nd_reply_to(&ns_frame(client, cip, v6("fd99::99")), own, &st).is_none());
        assert!(nd_reply_to(&ns_frame(client, Ipv6Addr::UNSPECIFIED, vip), own, &st).is_none());
        let mut hops = ns.clone();
        hops[21] = 64;
        assert!(nd_reply_to(&hops, own, &st).is_none());
        let arp = frame(
            [0xff; 6],
            client,
            1,
            client,
            Ipv4Addr::new(1, 2, 3, 4),
            [0; 6],
            Ipv4Addr::new(1, 2, 3, 5),
        );
        assert!(nd_reply_to(&arp, own, &st).is_none());
        // Without a source link-layer option (unicast NUD probe): answer to the frame's source.
        let mut msg = vec![ND_NEIGHBOR_SOLICIT, 0, 0, 0, 0, 0, 0, 0];
        msg.extend_from_slice(&vip.octets());
        let probe = icmpv6_frame(vmac, client, cip, vip, msg);
        let r = nd_reply_to(&probe, own, &st).expect("answered");
        assert_eq!(&r[0..6], &client);
        // A zero-length option is malformed.
        let mut bad = ns.clone();
        bad[ICMP6_OFF + 25] = 0;
        assert!(parse_ns(&bad).is_none());
    }

    #[test]
    fn solicited_node_groups() {
        let ip = v6("fd99:100::ab:cdef");
        assert_eq!(solicited_node(ip), v6("ff02::1:ffab:cdef"));
        assert_eq!(
            multicast_mac(solicited_node(ip)),
            [0x33, 0x33, 0xff, 0xab, 0xcd, 0xef]
        );
        assert_eq!(multicast_mac(ALL_NODES), [0x33, 0x33, 0, 0, 0, 1]);
    }
}
