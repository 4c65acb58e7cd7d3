//! Frame -> [`Packet`]: Ethernet, at most one 802.1Q tag, IPv4 without options or IPv6 (behind
//! at most `MAX_IPV6_EXT_HDRS` hop-by-hop / routing / destination-options headers), then the
//! TCP or UDP ports. Headers are typed views handed out by a cursor that bounds-checks each
//! one against the end of the frame, as the verifier requires before any packet access.
//! A packet whose destination the VIP filter rules out is passed right after its IP header
//! (`PassNotVip`, as the full lookup would): most of a director's own traffic costs no
//! more than that.

use core::{marker::PhantomData, mem::size_of};

use aya_ebpf::programs::XdpContext;
use lb_common::{
    wire::{
        ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, IPPROTO_ICMP, IPPROTO_ICMPV6, MAX_IPV6_EXT_HDRS,
        NEXTHDR_DEST, NEXTHDR_FRAGMENT, NEXTHDR_HOP, NEXTHDR_ROUTING, TCP_ACK, TCP_SYN,
    },
    Addr, FlowKey, Stat, PROTO_TCP, PROTO_UDP,
};

use crate::maps::maybe_vip;

/// `T` at an 8-byte aligned address. The program is built with misaligned memory access
/// allowed (`build.rs`), so LLVM moves a byte array like an address in 8-byte loads and
/// stores; the verifier accepts misaligned ones on packet and map memory but never on the
/// stack, so a byte array kept in a stack value must sit at an 8-byte boundary.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub struct Aligned<T>(pub T);

/// A packet the pipeline can balance.
pub struct Packet<'a> {
    /// Rewritten in place on the way out.
    pub eth: &'a mut EthHdr,
    pub flow: FlowKey,
    /// TCP SYN without ACK: the start of a connection.
    pub is_syn: bool,
    pub v6: bool,
    /// For tunnels, read only there ([`Inner::of`]).
    pub ip: IpHdr<'a>,
    /// Ethernet header with its VLAN tag, if any: 14 or 18 bytes.
    pub l2_len: usize,
}

/// What a tunnel needs to know of the IP packet it wraps.
#[derive(Clone, Copy)]
pub struct Inner {
    /// Ethernet header with its VLAN tag, if any: 14 or 18 bytes.
    pub l2_len: usize,
    pub v6: bool,
    /// IPv4 ToS / IPv6 traffic class.
    pub tos: u8,
    /// The IP packet's length by its header (Ethernet padding after it excluded).
    pub len: u32,
    /// May not be fragmented: IPv4 with DF set, or any IPv6.
    pub df: bool,
}

impl Inner {
    #[inline(always)]
    pub fn of(l2_len: usize, ip: &IpHdr) -> Self {
        match ip {
            IpHdr::V4(h) => Inner {
                l2_len,
                v6: false,
                tos: h.tos,
                len: u16::from_be_bytes(h.tot_len) as u32,
                df: h.frag_off[0] & 0x40 != 0,
            },
            IpHdr::V6(h) => Inner {
                l2_len,
                v6: true,
                tos: (h.ver_tc_flow[0] << 4) | (h.ver_tc_flow[1] >> 4),
                len: u16::from_be_bytes(h.payload_len) as u32 + 40,
                df: true,
            },
        }
    }
}

/// Why a frame is not a [`Packet`], and what to count for it.
pub enum Unparsed<'a> {
    /// Not ours to balance (not IP, malformed, not TCP/UDP): leave it to the kernel.
    Pass(Stat),
    /// Cannot be balanced (fragment, IP options, truncated L4 or IPv6 extension header, too many
    /// extension headers): drop it, counting `reason`, if it was addressed to a VIP, otherwise
    /// leave it to the kernel.
    DropIfVip { dst: Aligned<Addr>, reason: Stat },
    /// ICMP (IPv4) or ICMPv6 with its 8-byte header: `icmp::handle` decides, if it is
    /// addressed to a VIP.
    Icmp(IcmpPacket<'a>),
}

/// An ICMP or ICMPv6 message (IPv4 without options, or IPv6 without extension headers), with
/// the cursor left after its header for reading the quoted packet of an error.
pub struct IcmpPacket<'a> {
    pub eth: &'a mut EthHdr,
    pub ip: IpHdr<'a>,
    pub icmp: &'a mut IcmpHdr,
    pub l2_len: usize,
    cur: Cursor<'a>,
}

/// The outer IP header of an [`IcmpPacket`].
pub enum IpHdr<'a> {
    V4(&'a mut Ipv4Hdr),
    V6(&'a mut Ipv6Hdr),
}

impl IpHdr<'_> {
    /// Destination address (IPv4 v4-mapped).
    #[inline(always)]
    pub fn dst(&self) -> Addr {
        match self {
            IpHdr::V4(ip) => mapped(&ip.dst),
            IpHdr::V6(ip) => ip.dst,
        }
    }
}

impl IcmpPacket<'_> {
    /// The client-to-VIP flow an ICMP error is about. The quoted packet is one the flow's
    /// backend sent (VIP -> client), so addresses and ports are swapped back. `None` if the
    /// quote is cut short, of the other family, carries IPv4 options or IPv6 extension
    /// headers, or is neither TCP nor UDP.
    #[inline(always)]
    pub fn quoted_flow(&mut self) -> Option<FlowKey> {
        let (src, dst, proto) = match self.ip {
            IpHdr::V4(_) => {
                let q: &Ipv4Hdr = self.cur.take()?;
                if q.ver_ihl != 0x45 {
                    return None;
                }
                (mapped(&q.src), mapped(&q.dst), q.proto)
            }
            IpHdr::V6(_) => {
                let q: &Ipv6Hdr = self.cur.take()?;
                if q.ver_tc_flow[0] >> 4 != 6 {
                    return None;
                }
                (q.src, q.dst, q.next_hdr)
            }
        };
        if proto != PROTO_TCP && proto != PROTO_UDP {
            return None;
        }
        let ports: &Ports = self.cur.take()?;
        Some(FlowKey::new(
            dst,
            src,
            u16::from_be_bytes(ports.dport),
            u16::from_be_bytes(ports.sport),
            proto,
        ))
    }
}

#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Packet<'_>, Unparsed<'_>> {
    use Unparsed::*;
    // SAFETY: the only cursor over this frame.
    let mut cur = unsafe { Cursor::new(ctx) };
    let eth: &mut EthHdr = cur.take().ok_or(Pass(Stat::PassMalformed))?;
    let mut eth_type = u16::from_be_bytes(eth.proto);
    let mut l2_len = size_of::<EthHdr>();
    if eth_type == ETH_P_8021Q {
        l2_len += size_of::<VlanHdr>();
        let vlan: &VlanHdr = cur.take().ok_or(Pass(Stat::PassMalformed))?;
        eth_type = u16::from_be_bytes(vlan.proto);
    }

    let (src, dst, proto, v6, ip_hdr) = match eth_type {
        ETH_P_IP => {
            let ip: &mut Ipv4Hdr = cur.take().ok_or(Pass(Stat::PassMalformed))?;
            let ihl = ip.ver_ihl & 0x0f;
            if ip.ver_ihl >> 4 != 4 || ihl < 5 {
                return Err(Pass(Stat::PassMalformed));
            }
            let dst = mapped(&ip.dst);
            if !maybe_vip(&dst) {
                return Err(Pass(Stat::PassNotVip));
            }
            // MF flag or a non-zero offset: any fragment.
            if u16::from_be_bytes(ip.frag_off) & 0x3fff != 0 {
                return Err(DropIfVip {
                    dst: Aligned(dst),
                    reason: Stat::DropFragment,
                });
            }
            // Options would put the L4 header at a variable offset: not supported.
            if ihl != 5 {
                return Err(DropIfVip {
                    dst: Aligned(dst),
                    reason: Stat::DropIpOptions,
                });
            }
            (mapped(&ip.src), dst, ip.proto, false, IpHdr::V4(ip))
        }
        ETH_P_IPV6 => {
            let ip: &mut Ipv6Hdr = cur.take().ok_or(Pass(Stat::PassMalformed))?;
            if ip.ver_tc_flow[0] >> 4 != 6 {
                return Err(Pass(Stat::PassMalformed));
            }
            if !maybe_vip(&ip.dst) {
                return Err(Pass(Stat::PassNotVip));
            }
            let mut next = ip.next_hdr;
            // The walk stays off the common path: only a packet with an extension header (or
            // a fragment header) enters it.
            if is_ext_hdr(next) || next == NEXTHDR_FRAGMENT {
                next = skip_ext_hdrs(&mut cur, next).map_err(|reason| DropIfVip {
                    dst: Aligned(ip.dst),
                    reason,
                })?;
                // ICMPv6 behind extension headers is left to the kernel (no VIP answers it).
                if next == IPPROTO_ICMPV6 {
                    return Err(Pass(Stat::PassNotVip));
                }
            }
            (ip.src, ip.dst, next, true, IpHdr::V6(ip))
        }
        _ => return Err(Pass(Stat::PassNotIp)),
    };

    let (sport, dport, is_syn) = match proto {
        PROTO_TCP => {
            let Some(tcp) = cur.take::<TcpHdr>() else {
                return Err(DropIfVip {
                    dst: Aligned(dst),
                    reason: Stat::DropMalformed,
                });
            };
            let syn = tcp.flags & TCP_SYN != 0 && tcp.flags & TCP_ACK == 0;
            (
                u16::from_be_bytes(tcp.sport),
                u16::from_be_bytes(tcp.dport),
                syn,
            )
        }
        PROTO_UDP => {
            let Some(udp) = cur.take::<UdpHdr>() else {
                return Err(DropIfVip {
                    dst: Aligned(dst),
                    reason: Stat::DropMalformed,
                });
            };
            (
                u16::from_be_bytes(udp.sport),
                u16::from_be_bytes(udp.dport),
                false,
            )
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 if (proto == IPPROTO_ICMPV6) == v6 => {
            let Some(icmp) = cur.take::<IcmpHdr>() else {
                return Err(DropIfVip {
                    dst: Aligned(dst),
                    reason: Stat::DropMalformed,
                });
            };
            return Err(Icmp(IcmpPacket {
                eth,
                ip: ip_hdr,
                icmp,
                l2_len,
                cur,
            }));
        }
        _ => return Err(Pass(Stat::PassNotVip)),
    };

    Ok(Packet {
        eth,
        flow: FlowKey::new(src, dst, sport, dport, proto),
        is_syn,
        v6,
        ip: ip_hdr,
        l2_len,
    })
}

/// `lb_common::v4_mapped(*a)` built from one 4-byte load and two words: the byte-wise
/// construction costs a load, a shift and an or per byte, and its zeroed bytes a `memset`
/// subprogram call, for both addresses of every IPv4 packet.
#[inline(always)]
fn mapped(a: &[u8; 4]) -> Addr {
    // SAFETY: reads the 4 bytes of `a`.
    let v = unsafe { core::ptr::read_unaligned(a.as_ptr() as *const u32) } as u64;
    // Little-endian words: bytes 10 and 11 are 0xff, the IPv4 address follows.
    let w: [u64; 2] = [0, 0xffff_0000 | v << 32];
    // SAFETY: same size, and any bytes are a valid `Addr`.
    unsafe { core::mem::transmute::<[u64; 2], Addr>(w) }
}

#[inline(always)]
fn is_ext_hdr(next: u8) -> bool {
    matches!(next, NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST)
}

/// Walks hop-by-hop, routing and destination-options headers (each `(len + 1) * 8` bytes) and
/// returns the protocol behind them. A fragment header anywhere in the chain (even right after
/// the last one walked) means a fragment; more than `MAX_IPV6_EXT_HDRS` headers, or one the
/// frame cuts short, is malformed. The loop has a constant bound, as the verifier wants.
#[inline(always)]
fn skip_ext_hdrs(cur: &mut Cursor, mut next: u8) -> Result<u8, Stat> {
    for _ in 0..MAX_IPV6_EXT_HDRS {
        if next == NEXTHDR_FRAGMENT {
            return Err(Stat::DropFragment);
        }
        if !is_ext_hdr(next) {
            return Ok(next);
        }
        let h: &ExtHdr = cur.take().ok_or(Stat::DropMalformed)?;
        next = h.next_hdr;
        // The two bytes just taken are part of the header's length.
        if !cur.skip((h.hdr_ext_len as usize + 1) * 8 - size_of::<ExtHdr>()) {
            return Err(Stat::DropMalformed);
        }
    }
    if next == NEXTHDR_FRAGMENT {
        Err(Stat::DropFragment)
    } else if is_ext_hdr(next) {
        Err(Stat::DropMalformed)
    } else {
        Ok(next)
    }
}

/// Hands out the frame's headers front to back, each only once the frame is known to hold it
/// entirely. Views never overlap, which is what makes handing out `&mut` sound.
struct Cursor<'a> {
    pos: usize,
    end: usize,
    _frame: PhantomData<&'a XdpContext>,
}

impl<'a> Cursor<'a> {
    /// SAFETY: at most one cursor may exist per frame (two would hand out aliasing views).
    #[inline(always)]
    unsafe fn new(ctx: &'a XdpContext) -> Self {
        Self {
            pos: ctx.data(),
            end: ctx.data_end(),
            _frame: PhantomData,
        }
    }

    /// The next `T` of the frame, or `None` if the frame ends first.
    #[inline(always)]
    fn take<T: Header>(&mut self) -> Option<&'a mut T> {
        const { assert!(core::mem::align_of::<T>() == 1) };
        // Packet pointer + size against the end: the bounds check the verifier tracks.
        if self.pos + size_of::<T>() > self.end {
            return None;
        }
        let p = self.pos as *mut T;
        self.pos += size_of::<T>();
        // SAFETY: in bounds (checked above), alignment 1 (asserted), any bit pattern is a valid
        // `T` (`Header`), and no other view covers these bytes (the cursor moved past them).
        Some(unsafe { &mut *p })
    }

    /// Moves past `n` bytes the frame must hold (their content is not needed); `false` if the
    /// frame ends first, leaving the cursor where it was.
    #[inline(always)]
    fn skip(&mut self, n: usize) -> bool {
        if self.pos + n > self.end {
            return false;
        }
        self.pos += n;
        true
    }
}

/// A wire header: packet data (unaligned, any content) is always a valid value of it.
///
/// # Safety
///
/// Implement only for `#[repr(C)]` structs of `u8` and `[u8; N]` fields.
unsafe trait Header {}

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    proto: [u8; 2],
}

#[repr(C)]
struct VlanHdr {
    _tci: [u8; 2],
    proto: [u8; 2],
}

#[repr(C)]
pub struct Ipv4Hdr {
    pub ver_ihl: u8,
    pub tos: u8,
    pub tot_len: [u8; 2],
    pub id: [u8; 2],
    pub frag_off: [u8; 2],
    pub ttl: u8,
    pub proto: u8,
    pub check: [u8; 2],
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

#[repr(C)]
pub struct Ipv6Hdr {
    pub ver_tc_flow: [u8; 4],
    pub payload_len: [u8; 2],
    pub next_hdr: u8,
    pub hop_limit: u8,
    pub src: Addr,
    pub dst: Addr,
}

/// ICMP / ICMPv6 header: type, code, checksum, and the type's 4 bytes (echo: id and
/// sequence; frag-needed: next-hop MTU in the low half; PTB: the MTU).
#[repr(C)]
pub struct IcmpHdr {
    pub ty: u8,
    pub code: u8,
    pub check: [u8; 2],
    pub rest: [u8; 4],
}

/// The ports at the start of a quoted TCP or UDP header.
#[repr(C)]
struct Ports {
    sport: [u8; 2],
    dport: [u8; 2],
}

/// The common start of the hop-by-hop, routing and destination-options headers.
#[repr(C)]
struct ExtHdr {
    next_hdr: u8,
    hdr_ext_len: u8,
}

#[repr(C)]
struct TcpHdr {
    sport: [u8; 2],
    dport: [u8; 2],
    _seq: [u8; 4],
    _ack_seq: [u8; 4],
    _doff: u8,
    flags: u8,
    _window: [u8; 2],
    _check: [u8; 2],
    _urg_ptr: [u8; 2],
}

#[repr(C)]
struct UdpHdr {
    sport: [u8; 2],
    dport: [u8; 2],
    _len: [u8; 2],
    _check: [u8; 2],
}

// SAFETY: all of the above are repr(C) structs of u8 and [u8; N] fields.
unsafe impl Header for EthHdr {}
unsafe impl Header for VlanHdr {}
unsafe impl Header for Ipv4Hdr {}
unsafe impl Header for Ipv6Hdr {}
unsafe impl Header for ExtHdr {}
unsafe impl Header for TcpHdr {}
unsafe impl Header for UdpHdr {}
unsafe impl Header for IcmpHdr {}
unsafe impl Header for Ports {}

const _: () = {
    assert!(size_of::<EthHdr>() == 14);
    assert!(size_of::<VlanHdr>() == 4);
    assert!(size_of::<Ipv4Hdr>() == 20);
    assert!(size_of::<Ipv6Hdr>() == 40);
    assert!(size_of::<ExtHdr>() == 2);
    assert!(size_of::<TcpHdr>() == 20);
    assert!(size_of::<UdpHdr>() == 8);
    assert!(size_of::<IcmpHdr>() == 8);
    assert!(size_of::<Ports>() == 4);
};
