//! Minimal packet builder for datapath fixtures and benchmarks (Katran-style: build a frame,
//! run the program on it, compare verdict, bytes and counters).

use std::net::{IpAddr, SocketAddr};

use lb_common::FlowKey;

use crate::director::addr_of;

use lb_common::wire::{ETH_P_8021Q, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6};
pub use lb_common::wire::{TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN};

#[derive(Clone, Debug)]
pub struct PacketBuilder {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub vlan: Option<u16>,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub proto: u8,
    pub tcp_flags: u8,
    pub payload: usize,
    /// Extra IPv4 option words (IHL = 5 + n).
    pub ip_option_words: u8,
    /// IPv4 fragment field (flags + offset), or an IPv6 fragment header when non-zero (first,
    /// before `ext`).
    pub frag: u16,
    /// IPv6 extension headers between the IPv6 header and L4, in order.
    pub ext: Vec<Ext>,
    /// ICMP / ICMPv6 message (with `proto` 1 / 58): type, code, the 4 type-specific bytes
    /// and the body; the checksum is computed (with the pseudo-header for ICMPv6).
    pub icmp: Option<(u8, u8, [u8; 4], Vec<u8>)>,
    /// IPv4 ToS / IPv6 traffic class.
    pub tos: u8,
}

/// An IPv6 extension header for [`PacketBuilder::ext`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ext {
    /// Hop-by-hop options with this `hdr_ext_len` (`(len + 1) * 8` bytes of PadN).
    HopByHop(u8),
    /// Routing header (type 253, experimental; segments left 0) with this `hdr_ext_len`.
    Routing(u8),
    /// Destination options with this `hdr_ext_len`.
    DestOpts(u8),
    /// Fragment header with this offset/flags field (`0x0001` = more fragments).
    Fragment(u16),
}

impl Ext {
    /// The next-header value that announces this header.
    pub fn code(self) -> u8 {
        match self {
            Ext::HopByHop(_) => 0,
            Ext::Routing(_) => 43,
            Ext::Fragment(_) => 44,
            Ext::DestOpts(_) => 60,
        }
    }

    /// The header's bytes, announcing `next` after it.
    pub fn bytes(self, next: u8) -> Vec<u8> {
        match self {
            Ext::HopByHop(len) | Ext::DestOpts(len) | Ext::Routing(len) => {
                let total = (len as usize + 1) * 8;
                let mut h = vec![0u8; total];
                h[0] = next;
                h[1] = len;
                if let Ext::Routing(_) = self {
                    h[2] = 253;
                } else {
                    // One PadN option fills the header.
                    h[2] = 1;
                    h[3] = (total - 4) as u8;
                }
                h
            }
            Ext::Fragment(frag) => {
                let mut h = vec![next, 0];
                h.extend_from_slice(&frag.to_be_bytes());
                h.extend_from_slice(&[0, 0, 0, 1]);
                h
            }
        }
    }
}

/// Builder methods that set one field.
macro_rules! setters {
    ($($(#[$doc:meta])* $name:ident($field:ident: $ty:ty);)*) => {
        impl PacketBuilder {
            $($(#[$doc])* pub fn $name(mut self, v: $ty) -> Self {
                self.$field = v;
                self
            })*
        }
    };
}

setters! {
    flags(tcp_flags: u8);
    payload(payload: usize);
    ip_options(ip_option_words: u8);
    /// IPv4: raw flags/offset field (0x2000 = MF). IPv6: adds a fragment header.
    fragment(frag: u16);
    /// IPv4 ToS / IPv6 traffic class (DSCP and ECN).
    tos(tos: u8);
}

impl PacketBuilder {
    fn new(proto: u8, src: SocketAddr, dst: SocketAddr) -> Self {
        Self {
            src_mac: [0x02, 0, 0, 0, 0, 0x01],
            dst_mac: [0x02, 0, 0, 0, 0, 0x02],
            vlan: None,
            src,
            dst,
            proto,
            tcp_flags: TCP_ACK,
            payload: 0,
            ip_option_words: 0,
            frag: 0,
            ext: Vec::new(),
            icmp: None,
            tos: 0,
        }
    }

    /// An ICMP (IPv4) or ICMPv6 (IPv6) message from `src` to `dst` (ports ignored).
    pub fn icmp(src: SocketAddr, dst: SocketAddr, ty: u8, code: u8, rest: [u8; 4]) -> Self {
        let proto = if src.is_ipv6() { 58 } else { 1 };
        Self {
            icmp: Some((ty, code, rest, Vec::new())),
            ..Self::new(proto, src, dst)
        }
    }

    /// An echo request (ping) with identifier `id`, sequence `seq` and `len` payload bytes.
    pub fn ping(src: SocketAddr, dst: SocketAddr, id: u16, seq: u16, len: usize) -> Self {
        let ty = if src.is_ipv6() { 128 } else { 8 };
        let mut rest = [0u8; 4];
        rest[..2].copy_from_slice(&id.to_be_bytes());
        rest[2..].copy_from_slice(&seq.to_be_bytes());
        Self::icmp(src, dst, ty, 0, rest).icmp_body((0..len).map(|i| i as u8).collect())
    }

    /// A fragmentation-needed (IPv4) / packet-too-big (ICMPv6) error naming `mtu`, quoting
    /// `quoted` (an IP packet, no Ethernet header).
    pub fn too_big(src: SocketAddr, dst: SocketAddr, mtu: u16, quoted: &[u8]) -> Self {
        let (ty, code, rest) = if src.is_ipv6() {
            (2, 0, (mtu as u32).to_be_bytes())
        } else {
            let m = mtu.to_be_bytes();
            (3, 4, [0, 0, m[0], m[1]])
        };
        Self::icmp(src, dst, ty, code, rest).icmp_body(quoted.to_vec())
    }

    /// The body of the ICMP message (after its 8-byte header).
    pub fn icmp_body(mut self, body: Vec<u8>) -> Self {
        if let Some(m) = self.icmp.as_mut() {
            m.3 = body;
        }
        self
    }

    /// A TCP segment (ACK set: an established-flow packet).
    pub fn tcp(src: SocketAddr, dst: SocketAddr) -> Self {
        Self::new(6, src, dst)
    }

    pub fn udp(src: SocketAddr, dst: SocketAddr) -> Self {
        Self::new(17, src, dst)
    }

    /// Any other IP protocol (e.g. 1 = ICMP), with an 8-byte zero header.
    pub fn ip_proto(proto: u8, src: SocketAddr, dst: SocketAddr) -> Self {
        Self::new(proto, src, dst)
    }

    pub fn syn(self) -> Self {
        self.flags(TCP_SYN)
    }

    pub fn vlan(mut self, id: u16) -> Self {
        self.vlan = Some(id);
        self
    }

    /// Append an IPv6 extension header to the chain (ignored for IPv4).
    pub fn ext(mut self, e: Ext) -> Self {
        self.ext.push(e);
        self
    }

    pub fn macs(mut self, src: [u8; 6], dst: [u8; 6]) -> Self {
        self.src_mac = src;
        self.dst_mac = dst;
        self
    }

    fn l4(&self) -> Vec<u8> {
        if let Some((ty, code, rest, body)) = &self.icmp {
            let mut m = vec![*ty, *code, 0, 0];
            m.extend_from_slice(rest);
            m.extend_from_slice(body);
            let acc = match (self.src.ip(), self.dst.ip()) {
                (IpAddr::V6(s), IpAddr::V6(d)) => {
                    let mut ph = Vec::with_capacity(40);
                    ph.extend_from_slice(&s.octets());
                    ph.extend_from_slice(&d.octets());
                    ph.extend_from_slice(&(m.len() as u32).to_be_bytes());
                    ph.extend_from_slice(&[0, 0, 0, 58]);
                    lb_common::csum::sum(&ph, 0)
                }
                _ => 0,
            };
            let c = lb_common::csum::fold(lb_common::csum::sum(&m, acc));
            m[2..4].copy_from_slice(&c.to_be_bytes());
            return m;
        }
        let (sp, dp) = (self.src.port().to_be_bytes(), self.dst.port().to_be_bytes());
        let mut h = match self.proto {
            6 => {
                let mut t = vec![0u8; 20];
                t[0..2].copy_from_slice(&sp);
                t[2..4].copy_from_slice(&dp);
                t[4..8].copy_from_slice(&1u32.to_be_bytes());
                t[12] = 5 << 4;
                t[13] = self.tcp_flags;
                t[14..16].copy_from_slice(&65535u16.to_be_bytes());
                t
            }
            17 => {
                let mut u = vec![0u8; 8];
                u[0..2].copy_from_slice(&sp);
                u[2..4].copy_from_slice(&dp);
                u[4..6].copy_from_slice(&((8 + self.payload) as u16).to_be_bytes());
                u
            }
            _ => vec![0u8; 8],
        };
        h.extend((0..self.payload).map(|i| i as u8));
        h
    }

    pub fn build(&self) -> Vec<u8> {
        let mut p = Vec::with_capacity(128 + self.payload);
        p.extend_from_slice(&self.dst_mac);
        p.extend_from_slice(&self.src_mac);
        if let Some(id) = self.vlan {
            p.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
            p.extend_from_slice(&(id & 0x0fff).to_be_bytes());
        }
        let l4 = self.l4();
        match (self.src.ip(), self.dst.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                p.extend_from_slice(&ETH_P_IP.to_be_bytes());
                let hlen = 20 + 4 * self.ip_option_words as usize;
                let mut h = vec![0u8; hlen];
                h[0] = 0x40 | (5 + self.ip_option_words);
                h[1] = self.tos;
                h[2..4].copy_from_slice(&((hlen + l4.len()) as u16).to_be_bytes());
                h[6..8].copy_from_slice(&self.frag.to_be_bytes());
                h[8] = 64;
                h[9] = self.proto;
                h[12..16].copy_from_slice(&s.octets());
                h[16..20].copy_from_slice(&d.octets());
                for o in h[20..].iter_mut() {
                    *o = 1; // NOP options
                }
                let c = checksum(&h);
                h[10..12].copy_from_slice(&c.to_be_bytes());
                p.extend_from_slice(&h);
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                p.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
                let mut chain = self.ext.clone();
                if self.frag != 0 {
                    chain.insert(0, Ext::Fragment(self.frag));
                }
                let mut exts = Vec::new();
                for (i, e) in chain.iter().enumerate() {
                    let next = chain.get(i + 1).map_or(self.proto, |n| n.code());
                    exts.extend(e.bytes(next));
                }
                let plen = exts.len() + l4.len();
                let mut h = vec![0u8; 40];
                h[0] = 0x60 | (self.tos >> 4);
                h[1] = self.tos << 4;
                h[4..6].copy_from_slice(&(plen as u16).to_be_bytes());
                h[6] = chain.first().map_or(self.proto, |e| e.code());
                h[7] = 64;
                h[8..24].copy_from_slice(&s.octets());
                h[24..40].copy_from_slice(&d.octets());
                p.extend_from_slice(&h);
                p.extend_from_slice(&exts);
            }
            _ => panic!("mixed address families"),
        }
        p.extend_from_slice(&l4);
        p
    }
}

/// RFC 1071 checksum.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ARP request frame (who-has `target` tell `sender`).
pub fn arp_request(src_mac: [u8; 6], sender: [u8; 4], target: [u8; 4]) -> Vec<u8> {
    let mut p = vec![0xff; 6];
    p.extend_from_slice(&src_mac);
    p.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    p.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
    p.extend_from_slice(&src_mac);
    p.extend_from_slice(&sender);
    p.extend_from_slice(&[0; 6]);
    p.extend_from_slice(&target);
    p
}

/// The `i`-th test client address (2001:db8::/32 or 198.51.0.0/16) with `port`.
pub fn client(i: u32, port: u16, v6: bool) -> SocketAddr {
    if v6 {
        SocketAddr::new(
            format!("2001:db8::{:x}", i + 1).parse().expect("literal"),
            port,
        )
    } else {
        SocketAddr::new(IpAddr::from([198, 51, (i >> 8) as u8, i as u8]), port)
    }
}

/// The conntrack key of a client's flow to `dst`.
pub fn flow_key(src: SocketAddr, dst: SocketAddr, proto: u8) -> FlowKey {
    FlowKey::new(
        addr_of(src.ip()),
        addr_of(dst.ip()),
        src.port(),
        dst.port(),
        proto,
    )
}

/// A `[[service]]` table with its backends, for fixture configs.
pub fn service_toml(
    name: &str,
    vip: &str,
    port: u16,
    protocol: &str,
    table_size: Option<u32>,
    backends: &[&str],
) -> String {
    let mut t = format!(
        "\n[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nport = {port}\nprotocol = \"{protocol}\"\n"
    );
    if let Some(n) = table_size {
        t += &format!("table_size = {n}\n");
    }
    for b in backends {
        t += &format!("  [[service.backend]]\n  address = \"{b}\"\n");
    }
    t
}

/// The MAC fixtures give the backend at `ip`.
pub fn fixture_mac(ip: IpAddr) -> [u8; 6] {
    let a = addr_of(ip);
    [0x02, 0xbb, a[12], a[13], a[14], a[15]]
}
