//! Types shared by the XDP program (`lb-ebpf`) and the control plane (`lb-userspace`).
//!
//! Every map key/value is `#[repr(C)]` with explicit padding so both sides agree on the
//! layout byte for byte; the size asserts below catch any drift at compile time.
//! The flow hash lives here too: the kernel and the userspace reference model must
//! compute exactly the same value, so there is a single implementation.
#![cfg_attr(not(test), no_std)]

/// Names of the program and of every map, shared by the kernel object and the loader.
/// aya-ebpf names programs and maps after their functions and statics, so the kernel side
/// checks each identifier against the constant of the same name here at compile time
/// (`lb_ebpf::check_name!`): a rename on either side fails the build. Map roles are documented
/// at the statics (`lb-ebpf/src/maps.rs`).
pub mod maps {
    /// `pub const NAME: &str = "NAME";` for each map.
    macro_rules! names {
        ($($name:ident),* $(,)?) => { $(pub const $name: &str = stringify!($name);)* };
    }

    pub const PROGRAM: &str = "farmlb_xdp";
    /// The backend-side decapsulator (`lb-ebpf/src/bin/decap.rs`) and its maps.
    pub const DECAP_PROGRAM: &str = "farmlb_decap";
    pub const DECAP_ADDRS: &str = "DECAP_ADDRS";
    pub const DECAP_CONFIG: &str = "DECAP_CONFIG";
    pub const DECAP_STATS: &str = "DECAP_STATS";
    /// The test rigs' pass-everything program (`lb-ebpf/src/bin/pass.rs`).
    pub const PASS_PROGRAM: &str = "farmlb_pass";
    names!(
        SERVICE_INDEX,
        SERVICE_ENTRIES,
        VIP_ADDRS,
        RING,
        BACKENDS,
        CONNTRACK,
        CONFIG,
        STATS,
        SVC_STATS,
        BACKEND_STATS,
        FARM,
        FLOOD,
        CT_SYNC,
        SVC_DROPS,
        TUNNELS,
        VIP_FILTER,
        CLOCK,
    );
    /// Load-time global (read-only data the loader sets; fixed while the program runs):
    /// the MAC of the interface the program is attached to, as `[u8; 8]` (2 bytes padding).
    pub const OWN_MAC: &str = "OWN_MAC";
}

/// Wire constants every parser and builder of frames uses (the program, the reference model,
/// the fixtures' packet builder, the ARP/ND responder).
pub mod wire {
    pub const ETH_HLEN: usize = 14;
    pub const ETH_P_IP: u16 = 0x0800;
    pub const ETH_P_ARP: u16 = 0x0806;
    pub const ETH_P_8021Q: u16 = 0x8100;
    pub const ETH_P_IPV6: u16 = 0x86dd;
    pub const IPV6_HLEN: usize = 40;
    pub const NEXTHDR_HOP: u8 = 0;
    pub const NEXTHDR_ROUTING: u8 = 43;
    pub const NEXTHDR_FRAGMENT: u8 = 44;
    pub const NEXTHDR_DEST: u8 = 60;
    /// IPv6 extension headers (hop-by-hop, routing, destination options) the parser walks
    /// before giving up on a packet as malformed.
    pub const MAX_IPV6_EXT_HDRS: usize = 4;
    pub const IPPROTO_ICMP: u8 = 1;
    pub const IPPROTO_ICMPV6: u8 = 58;
    pub const ICMP_ECHO_REPLY: u8 = 0;
    pub const ICMP_DEST_UNREACH: u8 = 3;
    /// Destination unreachable code: fragmentation needed and DF set.
    pub const ICMP_FRAG_NEEDED: u8 = 4;
    pub const ICMP_ECHO_REQUEST: u8 = 8;
    pub const ICMPV6_PKT_TOOBIG: u8 = 2;
    pub const ICMPV6_ECHO_REQUEST: u8 = 128;
    pub const ICMPV6_ECHO_REPLY: u8 = 129;
    /// Router solicitation .. redirect: neighbour discovery, always the kernel's.
    pub const ICMPV6_ND_FIRST: u8 = 133;
    pub const ICMPV6_ND_LAST: u8 = 137;
    /// TTL / hop limit of packets the program originates (echo replies, outer headers).
    pub const OWN_TTL: u8 = 64;
    pub const TCP_FIN: u8 = 0x01;
    pub const TCP_SYN: u8 = 0x02;
    pub const TCP_RST: u8 = 0x04;
    pub const TCP_PSH: u8 = 0x08;
    pub const TCP_ACK: u8 = 0x10;
}

/// Internet checksum arithmetic (RFC 1071 / 1624), shared so the program and the reference
/// model produce identical bytes.
pub mod csum {
    /// One's-complement sum of `data` (big-endian 16-bit words, odd tail padded), not folded
    /// into 16 bits.
    #[inline(always)]
    pub const fn sum(data: &[u8], mut acc: u32) -> u32 {
        let mut i = 0;
        while i + 1 < data.len() {
            acc += ((data[i] as u32) << 8) | data[i + 1] as u32;
            i += 2;
        }
        if i < data.len() {
            acc += (data[i] as u32) << 8;
        }
        acc
    }

    /// Fold a 32-bit sum into the 16-bit checksum field value (complemented).
    #[inline(always)]
    pub const fn fold(mut acc: u32) -> u16 {
        acc = (acc & 0xffff) + (acc >> 16);
        acc = (acc & 0xffff) + (acc >> 16);
        !(acc as u16)
    }

    /// The checksum `check` after one 16-bit word of the covered data changed from `old` to
    /// `new` (RFC 1624, eqn. 3): `~(~HC + ~m + m')`.
    #[inline(always)]
    pub const fn replace(check: [u8; 2], old: u16, new: u16) -> [u8; 2] {
        let hc = u16::from_be_bytes(check);
        fold((!hc) as u32 + (!old) as u32 + new as u32).to_be_bytes()
    }
}

/// Outer headers the program writes (tunnels, ICMP it originates), shared with the model so
/// both produce identical bytes; the datapath fixtures check the fields independently.
pub mod hdr {
    use super::{csum, Addr};
    use crate::wire::OWN_TTL;

    /// IPv4 header without options: no ID, DF clear (as Katran; a too-big inner packet with
    /// DF is answered before it is wrapped), TTL [`OWN_TTL`], checksum filled in.
    #[inline(always)]
    pub fn ipv4(tos: u8, total_len: u16, proto: u8, src: [u8; 4], dst: [u8; 4]) -> [u8; 20] {
        let l = total_len.to_be_bytes();
        let mut h = [
            0x45, tos, l[0], l[1], 0, 0, 0, 0, OWN_TTL, proto, 0, 0, src[0], src[1], src[2],
            src[3], dst[0], dst[1], dst[2], dst[3],
        ];
        let c = csum::fold(csum::sum(&h, 0)).to_be_bytes();
        h[10] = c[0];
        h[11] = c[1];
        h
    }

    /// IPv6 header: traffic class `tc`, the low 20 bits of `label` as flow label, hop limit
    /// [`OWN_TTL`].
    #[inline(always)]
    pub fn ipv6(
        tc: u8,
        label: u32,
        payload_len: u16,
        next: u8,
        src: &Addr,
        dst: &Addr,
    ) -> [u8; 40] {
        let mut h = [0u8; 40];
        h[0] = 0x60 | (tc >> 4);
        h[1] = (tc << 4) | ((label >> 16) as u8 & 0x0f);
        h[2] = (label >> 8) as u8;
        h[3] = label as u8;
        let l = payload_len.to_be_bytes();
        h[4] = l[0];
        h[5] = l[1];
        h[6] = next;
        h[7] = OWN_TTL;
        let mut i = 0;
        while i < 16 {
            h[8 + i] = src[i];
            h[24 + i] = dst[i];
            i += 1;
        }
        h
    }

    /// UDP header with no checksum (allowed for tunnels over IPv6 too, RFC 6935).
    #[inline(always)]
    pub fn udp(sport: u16, dport: u16, len: u16) -> [u8; 8] {
        let (s, d, l) = (sport.to_be_bytes(), dport.to_be_bytes(), len.to_be_bytes());
        [s[0], s[1], d[0], d[1], l[0], l[1], 0, 0]
    }
}

/// Bytes of the offending packet an ICMP too-big answer quotes (IPv4: its header and 44
/// more bytes; IPv6: header and 88): enough for the sender to find its socket.
pub const TOO_BIG_QUOTE_V4: usize = 64;
pub const TOO_BIG_QUOTE_V6: usize = 128;

/// Addresses are 16 bytes on both sides; IPv4 is stored v4-mapped (`::ffff:a.b.c.d`).
pub type Addr = [u8; 16];

/// Backend id 0 means "no backend" in the Maglev ring.
pub const NO_BACKEND: u32 = 0;
pub const MAX_SERVICES: u32 = 512;
pub const MAX_BACKENDS: u32 = 4096;
/// Distinct VIP addresses (used only on the rare path: fragments, options, truncation).
pub const MAX_VIP_ADDRS: u32 = 1024;
/// Bits of `VIP_FILTER`, the bitmap of VIP addresses' [`vip_filter_bit`]s (64 per entry).
/// 4096 bits keep a false positive (a non-VIP address taking the full lookup) near
/// `VIPs / 4096`: 1 in 4096 per VIP address.
pub const VIP_FILTER_BITS: u32 = 4096;
/// `VIP_FILTER` entries.
pub const VIP_FILTER_WORDS: u32 = VIP_FILTER_BITS / 64;

/// `addr`'s bit in `VIP_FILTER`: set for every VIP address, so a clear bit means "not a VIP"
/// without a service lookup. A multiplicative hash of the address's words: a few
/// instructions, as it runs for every IP packet.
#[inline(always)]
pub const fn vip_filter_bit(addr: &Addr) -> u32 {
    let w = word(addr, 0) ^ word(addr, 4) ^ word(addr, 8) ^ word(addr, 12);
    w.wrapping_mul(0x9e37_79b1) >> (32 - VIP_FILTER_BITS.trailing_zeros())
}
pub const DEFAULT_TABLE_SIZE: u32 = 65537;
/// Default capacity of the shared ring map; the loader resizes it to what the config needs.
pub const DEFAULT_RING_SLOTS: u32 = 4 * 65537;
/// Conntrack entries (shared hash, per-CPU LRU lists).
pub const CT_MAX_ENTRIES: u32 = 1 << 20;
/// `BPF_F_NO_COMMON_LRU`: each CPU evicts from its own LRU list (Katran's per-CPU LRU) while
/// lookups still see every entry, so a flow whose packets hop CPUs keeps its backend.
pub const BPF_F_NO_COMMON_LRU: u32 = 1 << 1;
pub const DEFAULT_UDP_TIMEOUT_NS: u64 = 30_000_000_000;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// How a service hashes a flow onto its Maglev ring.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HashMode {
    /// Source address + ports + protocol (destination is fixed by the service).
    FiveTuple = 0,
    /// Client address only: a client always lands on the same backend.
    SrcIp = 1,
    /// Client address and port.
    SrcIpPort = 2,
}

impl HashMode {
    pub const fn from_u8(v: u8) -> Self {
        match v {
            1 => HashMode::SrcIp,
            2 => HashMode::SrcIpPort,
            _ => HashMode::FiveTuple,
        }
    }
}

/// Forwarding methods. The byte is kept in the map so tunnel modes can be added without
/// changing the layout.
pub const FWD_DR: u8 = 0;
/// Farm mode: the ring holds member slots (see [`member_slot`]); the node that owns a flow
/// delivers it to its own stack, every other node drops it.
pub const FWD_FARM: u8 = 1;
/// IP-in-IP: IPv4 in IPv4 (protocol 4), IPv6 in IPv6 (41), or across families (4in6, 6in4).
pub const FWD_IPIP: u8 = 2;
/// GUE (variant 1): the inner IP packet right after a UDP header to `gue_port`.
pub const FWD_GUE: u8 = 3;
/// Default `GlobalConfig::gue_port`.
pub const DEFAULT_GUE_PORT: u16 = 6080;
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_IPV6: u8 = 41;

/// Outer headers of a tunnel: the outer IP header and, for GUE, the UDP header.
#[inline(always)]
pub const fn tunnel_overhead(outer_v6: bool, gue: bool) -> usize {
    (if outer_v6 { 40 } else { 20 }) + if gue { 8 } else { 0 }
}

/// Whether `a` is a v4-mapped (IPv4) address.
#[inline(always)]
pub const fn is_v4_mapped(a: &Addr) -> bool {
    a[0] == 0
        && a[1] == 0
        && a[2] == 0
        && a[3] == 0
        && a[4] == 0
        && a[5] == 0
        && a[6] == 0
        && a[7] == 0
        && a[8] == 0
        && a[9] == 0
        && a[10] == 0xff
        && a[11] == 0xff
}

/// The flow-derived values of a tunnel's outer headers: the hash (five-tuple, whatever the
/// service's hash mode), the GUE source port, and the IPv6 flow label.
#[inline(always)]
pub const fn tunnel_hash(flow: &FlowKey) -> u32 {
    flow_hash(
        HashMode::FiveTuple,
        &flow.src,
        flow.sport,
        flow.dport,
        flow.proto,
    )
}

/// GUE source port for a flow hash: in the ephemeral range, varying with the flow.
#[inline(always)]
pub const fn gue_sport(hash: u32) -> u16 {
    0xc000 | (hash as u16 & 0x3fff)
}

/// The last 32 bits of an outer source address: `base`'s, with the `mask` bits from `hash`.
#[inline(always)]
pub const fn tunnel_src_low(base: [u8; 4], mask: u32, hash: u32) -> [u8; 4] {
    ((u32::from_be_bytes(base) & !mask) | (hash & mask)).to_be_bytes()
}

/// Farm members are identified by a node id `1..=MAX_MEMBERS` in the configuration and live in
/// the `BACKENDS` array after the director's backends, at `MEMBER_BASE + node_id`, so farm
/// conntrack entries are invalidated exactly like backend ones when a member goes away.
pub const MAX_MEMBERS: u32 = 255;
pub const MEMBER_BASE: u32 = MAX_BACKENDS;
/// Size of the `BACKENDS` array (and its stats): director backends, then farm members.
pub const BACKEND_SLOTS: u32 = MAX_BACKENDS + MAX_MEMBERS + 1;

/// `BACKENDS` index of farm node `node_id`.
#[inline(always)]
pub const fn member_slot(node_id: u32) -> u32 {
    MEMBER_BASE + node_id
}

/// A service's identity: VIP, port (0 = a port-wildcard service) and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceKey {
    pub addr: Addr,
    /// Host byte order.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

impl ServiceKey {
    /// Key of the service at `addr:port/proto`; `port` 0 is the port-wildcard service.
    #[inline(always)]
    pub const fn new(addr: Addr, port: u16, proto: u8) -> Self {
        Self {
            addr,
            port,
            proto,
            _pad: 0,
        }
    }

    /// The keys that may serve a packet to `addr:port/proto`, in the order the program
    /// tries them: the exact port's, then the port-wildcard one.
    pub const fn candidates(addr: Addr, port: u16, proto: u8) -> [Self; 2] {
        [Self::new(addr, port, proto), Self::new(addr, 0, proto)]
    }

    /// The key as the words `SERVICE_ENTRIES` stores and the program compares: the address
    /// in four words, then port and protocol.
    #[inline(always)]
    pub const fn words(&self) -> [u32; 5] {
        [
            word(&self.addr, 0),
            word(&self.addr, 4),
            word(&self.addr, 8),
            word(&self.addr, 12),
            self.port as u32 | (self.proto as u32) << 16,
        ]
    }

    /// The key whose [`ServiceKey::words`] are `w`.
    pub fn from_words(w: &[u32; 5]) -> Self {
        let mut addr = [0u8; 16];
        for (i, x) in w[..4].iter().enumerate() {
            addr[i * 4..i * 4 + 4].copy_from_slice(&x.to_le_bytes());
        }
        Self::new(addr, w[4] as u16, (w[4] >> 16) as u8)
    }
}

/// Slots of `SERVICE_INDEX`, an open-addressing table (linear probing) that finds a
/// service in one or two array reads where a hash map lookup cost ~40 ns a packet. Eight
/// slots per service keep probe runs short; a power of two so the slot is a shift.
pub const SERVICE_SLOTS: u32 = 8 * MAX_SERVICES;
/// Longest probe run the program walks (the control plane places every key within it).
pub const SERVICE_PROBES: u32 = 16;
const _: () = assert!(SERVICE_SLOTS.is_power_of_two());
/// `SERVICE_ENTRIES` holds two entries per service id (`2 * id`, `2 * id + 1`): a change
/// is written to the one not in use, then the index slot is pointed at it (a 4-byte
/// write), so the program never reads a half-written entry.
pub const SERVICE_ENTRY_SLOTS: u32 = 2 * MAX_SERVICES;

/// Home slot of a key in `SERVICE_INDEX` (from its [`ServiceKey::words`]).
#[inline(always)]
pub const fn service_slot(w: &[u32; 5]) -> u32 {
    let h = (w[0] ^ w[1] ^ w[2] ^ w[3]).wrapping_mul(0x9e37_79b1) ^ w[4];
    h.wrapping_mul(0x85eb_ca6b) >> (32 - SERVICE_SLOTS.trailing_zeros())
}

/// Value of `SERVICE_ENTRIES`: a service's key (as words) and what the program needs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceEntry {
    pub key: [u32; 5],
    pub info: ServiceInfo,
}

/// What the program needs of a service (in its `SERVICE_ENTRIES` entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceInfo {
    /// Index into the per-service stats array.
    pub id: u32,
    /// First slot of this service's Maglev table in the shared `RING` array.
    pub ring_offset: u32,
    /// Number of slots (prime).
    pub ring_size: u32,
    pub hash_mode: u8,
    pub fwd_mode: u8,
    pub flags: u8,
    pub _pad: u8,
}

impl ServiceInfo {
    /// `RING` index of the slot `flow` hashes to on this service's current table, `None` if
    /// the table is empty.
    #[inline(always)]
    pub const fn ring_index(&self, flow: &FlowKey) -> Option<u32> {
        if self.ring_size == 0 {
            return None;
        }
        let hash = flow_hash(
            HashMode::from_u8(self.hash_mode),
            &flow.src,
            flow.sport,
            flow.dport,
            flow.proto,
        );
        Some(self.ring_offset + hash % self.ring_size)
    }
}

/// Backend is usable: established flows may keep using it.
pub const BACKEND_F_VALID: u8 = 1;

/// Value of the `BACKENDS` array, indexed by backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Backend {
    pub addr: Addr,
    pub mac: [u8; 6],
    pub flags: u8,
    pub _pad: u8,
    /// Id of the service the backend belongs to ([`MEMBER_OWNER`] for farm members). The
    /// program follows a conntrack entry only to a backend of the flow's service; a
    /// restarted control plane rebuilds its id map from it, so a backend keeps its id (and
    /// its established flows) across restarts.
    pub service: u32,
}

/// `Backend::service` of a farm member slot.
pub const MEMBER_OWNER: u32 = u32::MAX;

/// Version of the maps' layout and meaning. A control plane adopts a pinned data plane only
/// if the version matches (and every map's key, value and size does); bump it whenever a map
/// type or the meaning of a field changes.
pub const LAYOUT_VERSION: u32 = 6;

/// A flow, client to VIP, as the program parsed it. Its first 24 bytes are the flow's
/// conntrack key ([`CtKey`], [`FlowKey::ct_key`]) once `svc` is set.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub src: Addr,
    /// Host byte order.
    pub sport: u16,
    pub dport: u16,
    /// `ServiceInfo::id` of the flow's service: 0 until the service is known (the program
    /// sets it right after the service lookup).
    pub svc: u16,
    pub proto: u8,
    pub _pad: u8,
    pub dst: Addr,
}

impl FlowKey {
    /// The flow `src:sport -> dst:dport` (ports in host byte order), service not yet known,
    /// padding zeroed so equal flows hash to the same conntrack slot.
    #[inline(always)]
    pub const fn new(src: Addr, dst: Addr, sport: u16, dport: u16, proto: u8) -> Self {
        Self {
            src,
            sport,
            dport,
            svc: 0,
            proto,
            _pad: 0,
            dst,
        }
    }

    /// The same flow, of service `svc`.
    #[inline(always)]
    pub const fn of_service(mut self, svc: u32) -> Self {
        self.svc = svc as u16;
        self
    }

    /// The flow's conntrack key: a view of its first 24 bytes, no copy.
    #[inline(always)]
    pub const fn ct_key(&self) -> &CtKey {
        // SAFETY: both are repr(C); `CtKey`'s fields are `FlowKey`'s first fields, same types,
        // same offsets (asserted below), and `FlowKey` is at least as aligned.
        unsafe { &*(self as *const FlowKey as *const CtKey) }
    }
}

/// Conntrack key. The service id stands for the VIP address (and the protocol rides
/// along for readers): 24 bytes where the whole flow takes 40, which makes the table's
/// hash and key compare, the biggest part of a conntrack hit, shorter. The destination
/// port stays: a port-wildcard service sees many per client port.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CtKey {
    pub src: Addr,
    /// Host byte order.
    pub sport: u16,
    pub dport: u16,
    pub svc: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// Conntrack value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtEntry {
    pub backend: u32,
    pub _pad: u32,
    /// The program's clock (`bpf_ktime_get_coarse_ns`) at the last packet; used for UDP idle
    /// expiry.
    pub last_seen_ns: u64,
}

/// Single entry of the `CONFIG` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct GlobalConfig {
    pub udp_timeout_ns: u64,
    /// The MAC of the interface the program is attached to. The program reads its own
    /// copy, the load-time global `maps::OWN_MAC` (the interface is fixed for a daemon's
    /// life): this one is for readers of the maps and must equal it.
    pub own_mac: [u8; 6],
    /// [`LAYOUT_VERSION`] of the control plane that programmed the maps (0: never
    /// programmed). The program ignores it.
    pub layout_version: u16,
    /// Flood guard: above this many new conntrack entries per second on one CPU, new flows
    /// are forwarded by the ring without an entry (a SYN flood must not evict established
    /// flows); 0 = no guard.
    pub flood_rate: u32,
    /// Conntrack sync (`[announce] sync`): nonzero = publish every entry the program makes
    /// to `CT_SYNC`, for the daemon to send to the other directors. Zero costs the insert
    /// path one branch. (It took the place of the struct's trailing padding, so the map's
    /// value keeps its size and older programs, which ignore it, can still be programmed.)
    pub sync: u32,
}

/// A conntrack entry the program made (a new flow, or a SYN rewriting its tuple's entry),
/// as written to the `CT_SYNC` ring buffer when `GlobalConfig::sync` is set.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtSyncEvent {
    pub flow: FlowKey,
    /// This director's backend id (peers are told the backend's address instead).
    pub backend: u32,
    pub _pad: u32,
}

/// Entry of `TUNNELS`, by `ServiceInfo::id` (written for IPIP / GUE services only).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TunnelInfo {
    /// Outer source addresses (the director's own, or a prefix). The `*_mask` bits of the
    /// address's last 32 bits are taken from the flow hash, so a backend's NIC spreads
    /// flows over its RX queues.
    pub src6: Addr,
    pub src4: [u8; 4],
    pub src4_mask: u32,
    pub src6_mask: u32,
    /// The interface's L3 MTU; an encapsulated packet above it is answered with
    /// frag-needed / packet-too-big (DF set, all IPv6) or dropped. 0 = not checked.
    pub mtu: u16,
    /// Destination UDP port of the service's GUE packets.
    pub gue_port: u16,
}
/// Bytes of the `CT_SYNC` ring buffer: 16 Ki events of 48 bytes plus headers, about 100 ms
/// of new flows at 100 k/s between two reads of the daemon (every 10 ms). When it is full
/// the event is dropped and counted (`ct_sync_drop`); the flow is forwarded all the same.
pub const CT_SYNC_BYTES: u32 = 1 << 20;

/// Default `GlobalConfig::flood_rate` (Katran's default cap on new flows per CPU).
pub const DEFAULT_FLOOD_RATE: u32 = 125_000;

/// The flood guard reads the clock every this many new entries (and at a window's first,
/// and above the rate), not on every one.
pub const FLOOD_CLOCK_EVERY: u64 = 64;

/// The single per-CPU entry of `FLOOD`: new conntrack entries in the current one-second
/// window.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FloodWindow {
    pub start_ns: u64,
    pub count: u64,
}

/// The single per-CPU entry of `CLOCK`: the program's clock as last read, and the jiffies
/// it was read at.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ClockCache {
    pub jiffies: u64,
    pub ns: u64,
}

/// Single entry of the `FARM` array: this node's identity in farm mode.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FarmConfig {
    /// `member_slot(node id)` of this node; 0 = not a farm member (every farm flow dropped).
    pub own_member: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_coarse_ns` until which this node takes new flows. The daemon renews it
    /// well within the time the other members need to declare this node down, so a node whose
    /// daemon died stops taking new flows by the time the others take its share over,
    /// while its live connections (those with a local socket) stay.
    pub lease_until_ns: u64,
}

/// Linux `TCP_LISTEN` / `TCP_NEW_SYN_RECV`: a socket lookup that lands on a listener is not a
/// connection; a request sock (handshake in progress) is.
pub const TCP_STATE_LISTEN: u32 = 10;

/// The drop reasons that are also counted per service (`SVC_DROPS`), in index order: the
/// exits taken after the packet's service is known.
pub const SERVICE_DROP_REASONS: [Stat; 4] = [
    Stat::DropNoBackend,
    Stat::FarmDropNotOwner,
    Stat::FarmDropNoSocket,
    Stat::FarmDropLease,
];

/// `SVC_DROPS` index of service `svc`'s count of `SERVICE_DROP_REASONS[reason]`.
#[inline(always)]
pub const fn svc_drop_index(svc: u32, reason: u32) -> u32 {
    svc * SERVICE_DROP_REASONS.len() as u32 + reason
}

impl Stat {
    /// This reason's index in [`SERVICE_DROP_REASONS`], if it is counted per service.
    #[inline(always)]
    pub const fn service_drop(self) -> Option<u32> {
        match self {
            Stat::DropNoBackend => Some(0),
            Stat::FarmDropNotOwner => Some(1),
            Stat::FarmDropNoSocket => Some(2),
            Stat::FarmDropLease => Some(3),
            _ => None,
        }
    }
}

/// Packets/bytes pair for per-service and per-backend per-CPU counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

impl core::ops::Add for Counter {
    type Output = Counter;
    fn add(self, o: Counter) -> Counter {
        Counter {
            packets: self.packets.wrapping_add(o.packets),
            bytes: self.bytes.wrapping_add(o.bytes),
        }
    }
}

/// Declares `Stat` from one table of `Variant = "snake_name"` rows, so the enum, `COUNT`,
/// `ALL` and `name()` cannot drift apart. Rows are in index order: the discriminants are the
/// `STATS` array indices the kernel and userspace share.
macro_rules! stats {
    ($($(#[doc = $doc:literal])* $variant:ident = $name:literal,)*) => {
        /// Indices of the global per-CPU `STATS` array.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Stat {
            $($(#[doc = $doc])* $variant,)*
        }

        impl Stat {
            pub const COUNT: u32 = [$(Stat::$variant),*].len() as u32;
            pub const ALL: [Stat; Self::COUNT as usize] = [$(Stat::$variant),*];

            /// Stable snake_case name used in CLI output and metrics labels.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Stat::$variant => $name,)*
                }
            }
        }
    };
}

stats! {
    /// Not IPv4/IPv6 (ARP, LLDP, ...).
    PassNotIp = "pass_not_ip",
    /// IP but not addressed to a configured service.
    PassNotVip = "pass_not_vip",
    /// Truncated Ethernet/IP header or bad IHL, not for a VIP (or not identifiable).
    PassMalformed = "pass_malformed",
    /// Addressed to a VIP but the L4 header is truncated.
    DropMalformed = "drop_malformed",
    /// IPv4/IPv6 fragment addressed to a VIP.
    DropFragment = "drop_fragment",
    /// IPv4 with options addressed to a VIP.
    DropIpOptions = "drop_ip_options",
    /// Service has no usable backend.
    DropNoBackend = "drop_no_backend",
    /// Forwarded with XDP_TX.
    Tx = "tx",
    /// Flow found in conntrack.
    CtHit = "ct_hit",
    /// TCP SYN: always re-hashed.
    CtMissSyn = "ct_miss_syn",
    /// Non-SYN packet without a (live) conntrack entry: hashed on the current table.
    CtMissOther = "ct_miss_other",
    /// A new flow was forwarded by the ring without a conntrack entry: this CPU is above
    /// `flood_guard_rate` new flows per second (flood guard).
    CtFloodSkip = "ct_flood_skip",
    /// Conntrack insert failed (map full beyond LRU eviction, should not happen).
    CtInsertFail = "ct_insert_fail",
    /// Farm: this node owns the flow (TCP SYN or UDP): passed to the local stack.
    FarmPassOwner = "farm_pass_owner",
    /// Farm: non-SYN TCP packet of a connection with a local socket: passed to the local stack.
    FarmPassSocket = "farm_pass_socket",
    /// Farm: another member owns the flow.
    FarmDropNotOwner = "farm_drop_not_owner",
    /// Farm: non-SYN TCP packet without a local socket (the connection lives elsewhere).
    FarmDropNoSocket = "farm_drop_no_socket",
    /// Farm: a new flow (TCP SYN, UDP) while this node's lease has run out (no daemon
    /// renews it): the other members own its share by now; live connections stay.
    FarmDropLease = "farm_drop_lease",
    /// ICMP echo request (ping) to a VIP: answered from XDP.
    IcmpEchoReply = "icmp_echo_reply",
    /// ICMP fragmentation-needed / ICMPv6 packet-too-big quoting a VIP flow: forwarded to
    /// that flow's backend.
    IcmpTooBigTx = "icmp_too_big_tx",
    /// Any other ICMP to a VIP (or an error whose quote names no VIP flow): dropped.
    DropIcmp = "drop_icmp",
    /// ICMPv6 neighbour discovery to a VIP: left to the kernel.
    PassIcmpNd = "pass_icmp_nd",
    /// Tunnel modes: the packet would exceed the MTU once encapsulated and may be
    /// fragmented (IPv4, DF clear): dropped.
    DropTooBig = "drop_too_big",
    /// Tunnel modes: the packet would exceed the MTU once encapsulated and must not be
    /// fragmented: the client was sent frag-needed / packet-too-big naming MTU - overhead.
    IcmpTooBigSent = "icmp_too_big_sent",
    /// Tunnel modes: the frame could not be grown for the outer headers.
    DropEncap = "drop_encap",
    /// Conntrack sync: the `CT_SYNC` ring buffer was full, the new entry is not published
    /// (a peer that takes the flow over hashes it on its ring).
    CtSyncDrop = "ct_sync_drop",
    /// Forwarded after a conntrack hit: `tx` + `ct_hit` in one slot (see [`Stat::parts`]).
    TxCtHit = "tx_ct_hit",
    /// Forwarded SYN: `tx` + `ct_miss_syn` in one slot.
    TxCtMissSyn = "tx_ct_miss_syn",
    /// Forwarded after another conntrack miss: `tx` + `ct_miss_other` in one slot.
    TxCtMissOther = "tx_ct_miss_other",
}

impl Stat {
    /// A combined slot's two counters (verdict, conntrack outcome). The forward path bumps
    /// one slot instead of a `tx` and a conntrack counter per packet; readers of `STATS` see
    /// the two through [`fold_stats`], never the combined slot.
    #[inline(always)]
    pub const fn parts(self) -> Option<(Stat, Stat)> {
        match self {
            Stat::TxCtHit => Some((Stat::Tx, Stat::CtHit)),
            Stat::TxCtMissSyn => Some((Stat::Tx, Stat::CtMissSyn)),
            Stat::TxCtMissOther => Some((Stat::Tx, Stat::CtMissOther)),
            _ => None,
        }
    }

    /// The combined slot for forwarding a packet whose conntrack outcome is `self`; `self`
    /// for any other counter.
    #[inline(always)]
    pub const fn forwarded(self) -> Stat {
        match self {
            Stat::CtHit => Stat::TxCtHit,
            Stat::CtMissSyn => Stat::TxCtMissSyn,
            Stat::CtMissOther => Stat::TxCtMissOther,
            s => s,
        }
    }
}

/// `STATS` as readers see it: each combined slot's count moved into its two counters (and the
/// slot left at 0), so `tx`, `ct_hit`, ... mean what their names say whichever slot the
/// program bumped.
pub fn fold_stats(raw: &[u64; Stat::COUNT as usize]) -> [u64; Stat::COUNT as usize] {
    let mut out = *raw;
    for s in Stat::ALL {
        if let Some((a, b)) = s.parts() {
            out[a as usize] += raw[s as usize];
            out[b as usize] += raw[s as usize];
            out[s as usize] = 0;
        }
    }
    out
}

/// Single entry of `DECAP_CONFIG`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DecapConfig {
    /// UDP port whose datagrams (to a local address) are GUE.
    pub gue_port: u16,
    pub _pad: u16,
}

/// Counters of the decapsulator (`DECAP_STATS` indices): one per packet.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecapStat {
    /// Not IP-in-IP, nor UDP to the GUE port: left to the stack.
    PassNotTunnel,
    /// A tunnel packet for another host: left to the stack (it may route it).
    PassNotLocal,
    /// An outer IPv4 fragment: left to the stack.
    PassFragment,
    /// IP-in-IP stripped, the inner packet passed to the stack.
    Ipip,
    /// GUE stripped, the inner packet passed to the stack.
    Gue,
    /// A tunnel packet to this host whose inner packet is cut short, of another IP version
    /// than the outer header says, or longer than the outer payload: dropped.
    DropMalformed,
}

impl DecapStat {
    pub const ALL: [DecapStat; 6] = [
        DecapStat::PassNotTunnel,
        DecapStat::PassNotLocal,
        DecapStat::PassFragment,
        DecapStat::Ipip,
        DecapStat::Gue,
        DecapStat::DropMalformed,
    ];
    pub const COUNT: u32 = Self::ALL.len() as u32;

    pub const fn name(self) -> &'static str {
        match self {
            DecapStat::PassNotTunnel => "pass_not_tunnel",
            DecapStat::PassNotLocal => "pass_not_local",
            DecapStat::PassFragment => "pass_fragment",
            DecapStat::Ipip => "decap_ipip",
            DecapStat::Gue => "decap_gue",
            DecapStat::DropMalformed => "drop_malformed",
        }
    }
}

const _: () = {
    assert!(core::mem::size_of::<DecapConfig>() == 4);
    let mut i = 0;
    while i < DecapStat::ALL.len() {
        assert!(DecapStat::ALL[i] as usize == i);
        i += 1;
    }
    assert!(core::mem::size_of::<ServiceKey>() == 20);
    assert!(core::mem::size_of::<ServiceInfo>() == 16);
    assert!(core::mem::size_of::<ServiceEntry>() == 36);
    assert!(core::mem::size_of::<Backend>() == 28);
    assert!(core::mem::size_of::<FlowKey>() == 40);
    assert!(core::mem::size_of::<CtKey>() == 24);
    // `FlowKey::ct_key`: `CtKey` is `FlowKey`'s prefix.
    assert!(core::mem::offset_of!(FlowKey, sport) == core::mem::offset_of!(CtKey, sport));
    assert!(core::mem::offset_of!(FlowKey, dport) == core::mem::offset_of!(CtKey, dport));
    assert!(core::mem::offset_of!(FlowKey, svc) == core::mem::offset_of!(CtKey, svc));
    assert!(core::mem::offset_of!(FlowKey, proto) == core::mem::offset_of!(CtKey, proto));
    assert!(core::mem::offset_of!(FlowKey, _pad) == core::mem::offset_of!(CtKey, _pad));
    assert!(core::mem::align_of::<FlowKey>() >= core::mem::align_of::<CtKey>());
    // Service ids fit `CtKey::svc`.
    assert!(MAX_SERVICES <= u16::MAX as u32 + 1);
    assert!(core::mem::size_of::<CtEntry>() == 16);
    assert!(core::mem::size_of::<GlobalConfig>() == 24);
    assert!(core::mem::size_of::<TunnelInfo>() == 32);
    assert!(core::mem::size_of::<CtSyncEvent>() == 48);
    assert!(core::mem::size_of::<FloodWindow>() == 16);
    assert!(core::mem::size_of::<ClockCache>() == 16);
    assert!(core::mem::size_of::<Counter>() == 16);
    assert!(core::mem::size_of::<FarmConfig>() == 16);
    // `ALL[i]` is the stat with index `i`.
    let mut i = 0;
    while i < Stat::ALL.len() {
        assert!(Stat::ALL[i] as usize == i);
        i += 1;
    }
};

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), contain only integers/byte arrays and have explicit
    // padding fields, so every bit pattern is valid and there are no uninitialised bytes.
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceInfo {}
    unsafe impl aya::Pod for super::ServiceEntry {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::CtKey {}
    unsafe impl aya::Pod for super::CtEntry {}
    unsafe impl aya::Pod for super::GlobalConfig {}
    unsafe impl aya::Pod for super::Counter {}
    unsafe impl aya::Pod for super::FarmConfig {}
    unsafe impl aya::Pod for super::FloodWindow {}
    unsafe impl aya::Pod for super::DecapConfig {}
    unsafe impl aya::Pod for super::TunnelInfo {}
    unsafe impl aya::Pod for super::CtSyncEvent {}
}

/// v4-mapped form of an IPv4 address given as its 4 wire bytes.
#[inline(always)]
pub const fn v4_mapped(a: [u8; 4]) -> Addr {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
    ]
}

// --- flow hash -------------------------------------------------------------------------
// MurmurHash3 (x86, 32-bit) over a fixed number of words: cheap, well mixed, no tables,
// and straight-line code the verifier accepts without loops.

const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;
/// Seed shared by every node so all of them compute identical hashes.
pub const HASH_SEED: u32 = 0x6661_726d; // "farm"

#[inline(always)]
const fn mix(h: u32, k: u32) -> u32 {
    let k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
const fn fmix(mut h: u32, len_words: u32) -> u32 {
    h ^= len_words * 4;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

#[inline(always)]
const fn word(a: &Addr, i: usize) -> u32 {
    u32::from_le_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]])
}

#[inline(always)]
const fn addr_hash(seed: u32, a: &Addr) -> u32 {
    let h = mix(seed, word(a, 0));
    let h = mix(h, word(a, 4));
    let h = mix(h, word(a, 8));
    mix(h, word(a, 12))
}

/// Hash of a client flow as used to index a service's Maglev ring (and, in farm mode, the
/// ownership ring). Ports are host byte order.
#[inline(always)]
pub const fn flow_hash(mode: HashMode, src: &Addr, sport: u16, dport: u16, proto: u8) -> u32 {
    let h = addr_hash(HASH_SEED, src);
    match mode {
        HashMode::SrcIp => fmix(h, 4),
        HashMode::SrcIpPort => fmix(mix(h, sport as u32), 5),
        HashMode::FiveTuple => {
            let h = mix(h, ((sport as u32) << 16) | dport as u32);
            fmix(mix(h, proto as u32), 6)
        }
    }
}

/// Generic 32-bit hash of arbitrary bytes with a seed (control plane: Maglev permutations).
pub fn hash_bytes(seed: u32, data: &[u8]) -> u32 {
    let mut h = seed;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        h = mix(h, u32::from_le_bytes([c[0], c[1], c[2], c[3]]));
    }
    let rem = chunks.remainder();
    if !rem.is_empty() {
        let mut last = [0u8; 4];
        last[..rem.len()].copy_from_slice(rem);
        let k = u32::from_le_bytes(last)
            .wrapping_mul(C1)
            .rotate_left(15)
            .wrapping_mul(C2);
        h ^= k;
    }
    let mut h = h ^ data.len() as u32;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_modes_differ_and_are_stable() {
        let a = v4_mapped([10, 0, 0, 1]);
        let h1 = flow_hash(HashMode::FiveTuple, &a, 1000, 80, PROTO_TCP);
        let h2 = flow_hash(HashMode::FiveTuple, &a, 1001, 80, PROTO_TCP);
        assert_ne!(h1, h2);
        // src-ip ignores ports.
        assert_eq!(
            flow_hash(HashMode::SrcIp, &a, 1, 80, PROTO_TCP),
            flow_hash(HashMode::SrcIp, &a, 2, 443, PROTO_UDP)
        );
        // src-ip-port ignores the destination port and protocol.
        assert_eq!(
            flow_hash(HashMode::SrcIpPort, &a, 7, 80, PROTO_TCP),
            flow_hash(HashMode::SrcIpPort, &a, 7, 443, PROTO_UDP)
        );
        assert_ne!(
            flow_hash(HashMode::SrcIpPort, &a, 7, 80, PROTO_TCP),
            flow_hash(HashMode::SrcIpPort, &a, 8, 80, PROTO_TCP)
        );
    }

    #[test]
    fn ring_index_stays_in_the_services_table() {
        let mut svc = ServiceInfo {
            ring_offset: 1009,
            ring_size: 0,
            ..Default::default()
        };
        let flow = FlowKey::new(v4_mapped([10, 0, 0, 1]), [0; 16], 1000, 80, PROTO_TCP);
        assert_eq!(svc.ring_index(&flow), None);
        svc.ring_size = 13;
        let h = flow_hash(HashMode::FiveTuple, &flow.src, 1000, 80, PROTO_TCP);
        assert_eq!(svc.ring_index(&flow), Some(1009 + h % 13));
    }

    #[test]
    fn stat_names_are_unique_snake_case() {
        for (i, s) in Stat::ALL.iter().enumerate() {
            let n = s.name();
            assert!(
                n.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{n}"
            );
            assert!(Stat::ALL[..i].iter().all(|o| o.name() != n), "{n} twice");
        }
    }

    #[test]
    fn flow_hash_spreads_sequential_ports() {
        let a = v4_mapped([192, 0, 2, 7]);
        let mut buckets = [0u32; 8];
        for p in 0..8000u16 {
            buckets[(flow_hash(HashMode::FiveTuple, &a, p, 80, PROTO_TCP) % 8) as usize] += 1;
        }
        for b in buckets {
            assert!((900..1100).contains(&b), "{buckets:?}");
        }
    }
}
