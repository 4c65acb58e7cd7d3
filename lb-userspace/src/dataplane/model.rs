//! Pure-Rust reference model of the XDP program: same maps, same parse rules, same hash, same
//! conntrack semantics. Datapath tests run packets through both and compare; fuzzers and the
//! simulator reuse it. Keep it in step with `lb-ebpf/src/`.

use std::collections::{HashMap, HashSet};

use lb_common::{
    gue_sport, hdr, is_v4_mapped, tunnel_hash, tunnel_overhead, v4_mapped, Addr, Backend, CtEntry,
    CtKey, FarmConfig, FloodWindow, FlowKey, GlobalConfig, ServiceInfo, ServiceKey, Stat,
    TunnelInfo, BACKEND_F_VALID, FLOOD_CLOCK_EVERY, FWD_DR, FWD_FARM, FWD_GUE, FWD_IPIP,
    IPPROTO_IPIP, IPPROTO_IPV6, MEMBER_OWNER, NO_BACKEND, PROTO_TCP, PROTO_UDP, TOO_BIG_QUOTE_V4,
    TOO_BIG_QUOTE_V6,
};

use lb_common::wire::{
    ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, ICMPV6_ECHO_REPLY, ICMPV6_ECHO_REQUEST, ICMPV6_ND_FIRST,
    ICMPV6_ND_LAST, ICMPV6_PKT_TOOBIG, ICMP_DEST_UNREACH, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST,
    ICMP_FRAG_NEEDED, IPPROTO_ICMP, IPPROTO_ICMPV6, MAX_IPV6_EXT_HDRS, NEXTHDR_DEST,
    NEXTHDR_FRAGMENT, NEXTHDR_HOP, NEXTHDR_ROUTING, OWN_TTL, TCP_ACK, TCP_SYN,
};

use crate::dataplane::{CounterKind, Maps};

/// What the program does with a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Pass,
    Drop,
    Tx,
}

impl Action {
    /// The XDP return code.
    pub fn xdp(self) -> u32 {
        match self {
            Action::Drop => 1,
            Action::Pass => 2,
            Action::Tx => 3,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    /// The reason counter the program bumps for this exit.
    pub reason: Stat,
    /// Chosen backend id for `Tx`.
    pub backend: u32,
    /// Conntrack counter bumped on the way (hit / miss-syn / miss-other), if any.
    pub ct: Option<Stat>,
    /// The flood guard kept the new flow out of conntrack (`ct_flood_skip` bumped).
    pub flood_skip: bool,
    /// Service id whose traffic the packet adds to (farm: in the service's own slot; else
    /// through `backend`'s), meaningful when `bytes` is non-zero; and whose per-service drop
    /// counter a drop of a reason in `SERVICE_DROP_REASONS` bumps.
    pub service: u32,
    /// Bytes added to the backend's (farm: and the service's) counters: the whole frame
    /// (every fragment of a multi-buffer frame), or 0 for exits that count no traffic.
    pub bytes: u64,
    /// The service's forwarding mode (`FWD_*`) for `Tx` and the tunnel exits.
    pub fwd: u8,
    /// Tunnels: the flow's `tunnel_hash` (outer source, GUE port, flow label).
    pub hash: u32,
}

impl Decision {
    fn exit(action: Action, reason: Stat) -> Self {
        Self {
            action,
            reason,
            backend: NO_BACKEND,
            ct: None,
            flood_skip: false,
            service: 0,
            bytes: 0,
            fwd: FWD_DR,
            hash: 0,
        }
    }
}

/// In-memory mirror of the program's maps.
#[derive(Default, Debug, Clone)]
pub struct Model {
    pub services: HashMap<ServiceKey, ServiceInfo>,
    pub vip_addrs: HashSet<Addr>,
    pub ring: HashMap<u32, u32>,
    pub backends: HashMap<u32, Backend>,
    pub conntrack: HashMap<CtKey, CtEntry>,
    pub config: GlobalConfig,
    /// Farm mode: this node's member slot.
    pub farm: FarmConfig,
    /// The flood guard's window (the program keeps one per CPU).
    pub flood: FloodWindow,
    /// Farm mode: connections that have a local (non-listener) TCP socket, standing in for
    /// the kernel's socket lookup.
    pub sockets: HashSet<FlowKey>,
    /// Tunnel services' outer-header parameters by service id.
    pub tunnels: HashMap<u32, TunnelInfo>,
    /// Conntrack sync: the entries the program would publish to `CT_SYNC` (made or rewritten
    /// while `config.sync` is set), in order. The model's ring never fills.
    pub synced: Vec<lb_common::CtSyncEvent>,
}

impl Maps for Model {
    fn set_farm(&mut self, f: &FarmConfig) -> anyhow::Result<()> {
        self.farm = *f;
        Ok(())
    }
    fn reset_counter(&mut self, _: CounterKind, _: u32) -> anyhow::Result<()> {
        // The model keeps no per-id counters.
        Ok(())
    }
    fn retire_backend_counter(&mut self, _: u32, _: u32) -> anyhow::Result<()> {
        Ok(())
    }
    fn set_config(&mut self, cfg: &GlobalConfig) -> anyhow::Result<()> {
        self.config = *cfg;
        Ok(())
    }
    fn set_service(&mut self, key: &ServiceKey, info: &ServiceInfo) -> anyhow::Result<()> {
        self.services.insert(*key, *info);
        Ok(())
    }
    fn remove_service(&mut self, key: &ServiceKey) -> anyhow::Result<()> {
        self.services.remove(key);
        Ok(())
    }
    fn set_vip_addr(&mut self, addr: &Addr) -> anyhow::Result<()> {
        self.vip_addrs.insert(*addr);
        Ok(())
    }
    fn remove_vip_addr(&mut self, addr: &Addr) -> anyhow::Result<()> {
        self.vip_addrs.remove(addr);
        Ok(())
    }
    fn set_backend(&mut self, id: u32, b: &Backend) -> anyhow::Result<()> {
        self.backends.insert(id, *b);
        Ok(())
    }
    fn write_ring(&mut self, offset: u32, slots: &[(u32, u32)]) -> anyhow::Result<()> {
        for &(s, id) in slots {
            self.ring.insert(offset + s, id);
        }
        Ok(())
    }
    fn set_tunnel(&mut self, service: u32, t: &TunnelInfo) -> anyhow::Result<()> {
        self.tunnels.insert(service, *t);
        Ok(())
    }
}

/// The linear part BPF_PROG_TEST_RUN gives an XDP program: a page minus the XDP headroom (256)
/// and the aligned `skb_shared_info` (320 on x86-64); the rest of a larger frame goes to
/// fragments, which `bpf_xdp_get_buff_len` counts but the parser cannot see.
pub const TEST_RUN_LINEAR_MAX: usize = 4096 - 256 - 320;

fn be16(p: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([p[off], p[off + 1]])
}

fn is_ext_hdr(next: u8) -> bool {
    matches!(next, NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST)
}

/// IPv6 extension headers from `off` (see `skip_ext_hdrs` in `lb-ebpf/src/parse.rs`): the
/// protocol behind them and its offset, or the reason to drop a packet to a VIP.
fn skip_ext_hdrs(p: &[u8], mut off: usize, mut next: u8) -> Result<(u8, usize), Stat> {
    for _ in 0..MAX_IPV6_EXT_HDRS {
        if next == NEXTHDR_FRAGMENT {
            return Err(Stat::DropFragment);
        }
        if !is_ext_hdr(next) {
            return Ok((next, off));
        }
        if p.len() < off + 2 {
            return Err(Stat::DropMalformed);
        }
        let len = (p[off + 1] as usize + 1) * 8;
        if p.len() < off + len {
            return Err(Stat::DropMalformed);
        }
        next = p[off];
        off += len;
    }
    match next {
        NEXTHDR_FRAGMENT => Err(Stat::DropFragment),
        n if is_ext_hdr(n) => Err(Stat::DropMalformed),
        n => Ok((n, off)),
    }
}

impl Model {
    fn rare(&self, dst: &Addr, reason: Stat) -> Decision {
        if self.vip_addrs.contains(dst) {
            Decision::exit(Action::Drop, reason)
        } else {
            Decision::exit(Action::Pass, Stat::PassNotVip)
        }
    }

    /// The service a packet to `dst:dport/proto` belongs to, as the program looks it up:
    /// the exact port first, then the port-wildcard service.
    pub fn service_for(
        &self,
        dst: &Addr,
        dport: u16,
        proto: u8,
    ) -> Option<(ServiceKey, ServiceInfo)> {
        ServiceKey::candidates(*dst, dport, proto)
            .into_iter()
            .find_map(|key| self.services.get(&key).map(|s| (key, *s)))
    }

    /// `flow`'s conntrack key, under the service it is addressed to (none without one).
    pub fn ct_key(&self, flow: &FlowKey) -> Option<CtKey> {
        let (_, s) = self.service_for(&flow.dst, flow.dport, flow.proto)?;
        Some(*flow.of_service(s.id).ct_key())
    }

    /// A conntrack entry's backend the program follows: valid and `svc`'s (or a farm
    /// member slot).
    fn backend_valid_for(&self, svc: &ServiceInfo, id: u32) -> bool {
        self.backend_valid(id)
            && self
                .backends
                .get(&id)
                .is_some_and(|b| b.service == svc.id || b.service == MEMBER_OWNER)
    }

    fn backend_valid(&self, id: u32) -> bool {
        id != NO_BACKEND
            && self
                .backends
                .get(&id)
                .is_some_and(|b| b.flags & BACKEND_F_VALID != 0)
    }

    /// Decide what the program does with `pkt` at time `now_ns`, updating conntrack like the
    /// program does. Returns the decision and, for `Tx`, the rewritten frame.
    pub fn process(&mut self, pkt: &[u8], now_ns: u64) -> (Decision, Vec<u8>) {
        // The program sees only the first buffer of a larger frame (BPF_PROG_TEST_RUN puts the
        // rest in fragments); headers past it count as truncated.
        let mut d = self.decide(&pkt[..pkt.len().min(TEST_RUN_LINEAR_MAX)], now_ns);
        let tunnel = matches!(d.fwd, FWD_IPIP | FWD_GUE);
        let overhead = match self.backends.get(&d.backend) {
            Some(b) if tunnel => tunnel_overhead(!is_v4_mapped(&b.addr), d.fwd == FWD_GUE),
            _ => 0,
        };
        if matches!(
            d.reason,
            Stat::Tx | Stat::FarmPassOwner | Stat::FarmPassSocket | Stat::IcmpTooBigTx
        ) {
            d.bytes = (pkt.len() + overhead) as u64;
        }
        match d.reason {
            Stat::IcmpEchoReply => return (d, echo_reply(pkt)),
            Stat::IcmpTooBigSent => {
                let mtu = self.tunnels[&d.service].mtu as u32 - overhead as u32;
                return (d, too_big_answer(pkt, mtu));
            }
            _ => {}
        }
        if d.action == Action::Tx && tunnel {
            return (d, self.encap(pkt, &d));
        }
        let mut out = pkt.to_vec();
        if d.action == Action::Tx {
            out[0..6].copy_from_slice(&self.backends[&d.backend].mac);
            out[6..12].copy_from_slice(&self.config.own_mac);
        }
        if matches!(d.reason, Stat::FarmPassOwner | Stat::FarmPassSocket) {
            out[0..6].copy_from_slice(&self.config.own_mac);
        }
        (d, out)
    }

    fn decide(&mut self, p: &[u8], now: u64) -> Decision {
        use Action::*;
        if p.len() < 14 {
            return Decision::exit(Pass, Stat::PassMalformed);
        }
        let mut eth_type = be16(p, 12);
        let mut l3 = 14;
        if eth_type == ETH_P_8021Q {
            if p.len() < 18 {
                return Decision::exit(Pass, Stat::PassMalformed);
            }
            eth_type = be16(p, 16);
            l3 = 18;
        }
        let (src, dst, proto, l4) = match eth_type {
            ETH_P_IP => {
                if p.len() < l3 + 20 {
                    return Decision::exit(Pass, Stat::PassMalformed);
                }
                let h = &p[l3..];
                let ihl = h[0] & 0x0f;
                if h[0] >> 4 != 4 || ihl < 5 {
                    return Decision::exit(Pass, Stat::PassMalformed);
                }
                let dst = v4_mapped([h[16], h[17], h[18], h[19]]);
                if be16(h, 6) & 0x3fff != 0 {
                    return self.rare(&dst, Stat::DropFragment);
                }
                if ihl != 5 {
                    return self.rare(&dst, Stat::DropIpOptions);
                }
                (v4_mapped([h[12], h[13], h[14], h[15]]), dst, h[9], l3 + 20)
            }
            ETH_P_IPV6 => {
                if p.len() < l3 + 40 {
                    return Decision::exit(Pass, Stat::PassMalformed);
                }
                let h = &p[l3..];
                let src: Addr = h[8..24].try_into().unwrap();
                let dst: Addr = h[24..40].try_into().unwrap();
                if h[0] >> 4 != 6 {
                    return Decision::exit(Pass, Stat::PassMalformed);
                }
                match skip_ext_hdrs(p, l3 + 40, h[6]) {
                    Ok((next, l4)) => (src, dst, next, l4),
                    Err(reason) => return self.rare(&dst, reason),
                }
            }
            _ => return Decision::exit(Pass, Stat::PassNotIp),
        };
        let v6 = eth_type == ETH_P_IPV6;
        if proto == if v6 { IPPROTO_ICMPV6 } else { IPPROTO_ICMP } {
            // ICMPv6 behind extension headers is the kernel's.
            if v6 && l4 != l3 + 40 {
                return Decision::exit(Pass, Stat::PassNotVip);
            }
            if p.len() < l4 + 8 {
                return self.rare(&dst, Stat::DropMalformed);
            }
            if !self.vip_addrs.contains(&dst) {
                return Decision::exit(Pass, Stat::PassNotVip);
            }
            return self.icmp(p, l3, l4, v6, now);
        }
        let (sport, dport, syn) = match proto {
            PROTO_TCP => {
                if p.len() < l4 + 20 {
                    return self.rare(&dst, Stat::DropMalformed);
                }
                let f = p[l4 + 13];
                (
                    be16(p, l4),
                    be16(p, l4 + 2),
                    f & TCP_SYN != 0 && f & TCP_ACK == 0,
                )
            }
            PROTO_UDP => {
                if p.len() < l4 + 8 {
                    return self.rare(&dst, Stat::DropMalformed);
                }
                (be16(p, l4), be16(p, l4 + 2), false)
            }
            _ => return Decision::exit(Pass, Stat::PassNotVip),
        };
        let Some((_, svc)) = self.service_for(&dst, dport, proto) else {
            return Decision::exit(Pass, Stat::PassNotVip);
        };
        let flow = FlowKey::new(src, dst, sport, dport, proto);
        if svc.fwd_mode == FWD_FARM {
            return Decision {
                service: svc.id,
                ..self.farm(&svc, &flow, syn, now)
            };
        }
        let (backend, ct, flood_skip) = self.pick_backend(&svc, &flow, syn, now);
        if !self.backend_valid(backend) {
            return Decision {
                ct: Some(ct),
                flood_skip,
                service: svc.id,
                ..Decision::exit(Drop, Stat::DropNoBackend)
            };
        }
        Decision {
            ct: Some(ct),
            flood_skip,
            ..self.send(p, l3, &svc, backend, &flow, Stat::Tx)
        }
    }

    /// ICMP to a VIP: see `lb-ebpf/src/icmp.rs`.
    fn icmp(&self, p: &[u8], l3: usize, l4: usize, v6: bool, now: u64) -> Decision {
        let (ty, code) = (p[l4], p[l4 + 1]);
        let to_us = p[0..6] == self.config.own_mac;
        if v6 {
            if (ICMPV6_ND_FIRST..=ICMPV6_ND_LAST).contains(&ty) {
                return Decision::exit(Action::Pass, Stat::PassIcmpNd);
            }
            if ty == ICMPV6_ECHO_REQUEST && to_us {
                return Decision::exit(Action::Tx, Stat::IcmpEchoReply);
            }
            if ty == ICMPV6_PKT_TOOBIG {
                return self.too_big(p, l3, l4 + 8, v6, now);
            }
        } else {
            if ty == ICMP_ECHO_REQUEST && to_us {
                return Decision::exit(Action::Tx, Stat::IcmpEchoReply);
            }
            if ty == ICMP_DEST_UNREACH && code == ICMP_FRAG_NEEDED {
                return self.too_big(p, l3, l4 + 8, v6, now);
            }
        }
        Decision::exit(Action::Drop, Stat::DropIcmp)
    }

    /// The flow an ICMP error quotes (at `q`), swapped back to client -> VIP, and its
    /// backend: live conntrack entry, else the ring; nothing recorded.
    fn too_big(&self, p: &[u8], l3: usize, q: usize, v6: bool, clock: u64) -> Decision {
        let drop = Decision::exit(Action::Drop, Stat::DropIcmp);
        let (src, dst, proto, ports): (Addr, Addr, u8, usize) = if v6 {
            if p.len() < q + 40 || p[q] >> 4 != 6 {
                return drop;
            }
            (
                p[q + 8..q + 24].try_into().unwrap(),
                p[q + 24..q + 40].try_into().unwrap(),
                p[q + 6],
                q + 40,
            )
        } else {
            if p.len() < q + 20 || p[q] != 0x45 {
                return drop;
            }
            (
                v4_mapped(p[q + 12..q + 16].try_into().unwrap()),
                v4_mapped(p[q + 16..q + 20].try_into().unwrap()),
                p[q + 9],
                q + 20,
            )
        };
        if (proto != PROTO_TCP && proto != PROTO_UDP) || p.len() < ports + 4 {
            return drop;
        }
        let flow = FlowKey::new(dst, src, be16(p, ports + 2), be16(p, ports), proto);
        let Some((_, svc)) = self.service_for(&flow.dst, flow.dport, proto) else {
            return drop;
        };
        if svc.fwd_mode == FWD_FARM {
            return drop;
        }
        let now = if proto == PROTO_UDP { clock } else { 0 };
        let tracked = self
            .conntrack
            .get(flow.of_service(svc.id).ct_key())
            .filter(|e| {
                (proto != PROTO_UDP
                    || now.saturating_sub(e.last_seen_ns) <= self.config.udp_timeout_ns)
                    && self.backend_valid_for(&svc, e.backend)
            });
        let backend = match tracked {
            Some(e) => e.backend,
            None => self.expected_backend(&svc, &flow),
        };
        if !self.backend_valid(backend) {
            return Decision {
                service: svc.id,
                ..Decision::exit(Action::Drop, Stat::DropNoBackend)
            };
        }
        self.send(p, l3, &svc, backend, &flow, Stat::IcmpTooBigTx)
    }

    /// Forward to `backend` by the service's method (see `lb-ebpf/src/forward.rs`): `Tx`
    /// counted as `reason`, or a tunnel's too-big exit.
    fn send(
        &self,
        p: &[u8],
        l3: usize,
        svc: &ServiceInfo,
        backend: u32,
        flow: &FlowKey,
        reason: Stat,
    ) -> Decision {
        let d = Decision {
            backend,
            service: svc.id,
            fwd: svc.fwd_mode,
            ..Decision::exit(Action::Tx, reason)
        };
        if !matches!(svc.fwd_mode, FWD_IPIP | FWD_GUE) {
            return d;
        }
        let Some(t) = self.tunnels.get(&svc.id) else {
            return Decision::exit(Action::Drop, Stat::DropEncap);
        };
        let outer_v6 = !is_v4_mapped(&self.backends[&backend].addr);
        let overhead = tunnel_overhead(outer_v6, svc.fwd_mode == FWD_GUE) as u32;
        let (_, len, df) = inner_ip(p, l3);
        let mtu = t.mtu as u32;
        if mtu != 0 && len + overhead > mtu {
            if !(df && reason == Stat::Tx) {
                return Decision::exit(Action::Drop, Stat::DropTooBig);
            }
            let quote = if p[l3] >> 4 == 6 {
                TOO_BIG_QUOTE_V6
            } else {
                TOO_BIG_QUOTE_V4
            };
            if p.len() < l3 + quote {
                return Decision::exit(Action::Drop, Stat::DropEncap);
            }
            return Decision {
                backend,
                service: svc.id,
                fwd: svc.fwd_mode,
                ..Decision::exit(Action::Tx, Stat::IcmpTooBigSent)
            };
        }
        Decision {
            hash: tunnel_hash(flow),
            ..d
        }
    }

    /// The frame wrapped for the tunnel to `d.backend` (see `encap` in `forward.rs`).
    fn encap(&self, pkt: &[u8], d: &Decision) -> Vec<u8> {
        let l2 = if be16(pkt, 12) == ETH_P_8021Q { 18 } else { 14 };
        let b = &self.backends[&d.backend];
        let (outer_v6, gue) = (!is_v4_mapped(&b.addr), d.fwd == FWD_GUE);
        let (tos, len, _) = inner_ip(pkt, l2);
        let inner_v6 = pkt[l2] >> 4 == 6;
        let outer_len = len + tunnel_overhead(outer_v6, gue) as u32;
        let mut out = Vec::with_capacity(pkt.len() + 48);
        out.extend_from_slice(&b.mac);
        out.extend_from_slice(&self.config.own_mac);
        out.extend_from_slice(&pkt[12..l2 - 2]);
        out.extend_from_slice(&if outer_v6 { ETH_P_IPV6 } else { ETH_P_IP }.to_be_bytes());
        let next = match (gue, inner_v6) {
            (true, _) => PROTO_UDP,
            (false, true) => IPPROTO_IPV6,
            (false, false) => IPPROTO_IPIP,
        };
        let t = &self.tunnels[&d.service];
        let src = crate::tunnel::outer_source(t, outer_v6, d.hash);
        let ip_len = if outer_v6 {
            out.extend_from_slice(&hdr::ipv6(
                tos,
                d.hash,
                (outer_len - 40) as u16,
                next,
                &src,
                &b.addr,
            ));
            40
        } else {
            let (s4, d4) = (&src[12..], &b.addr[12..]);
            out.extend_from_slice(&hdr::ipv4(
                tos,
                outer_len as u16,
                next,
                s4.try_into().unwrap(),
                d4.try_into().unwrap(),
            ));
            20
        };
        if gue {
            let udp_len = (outer_len - ip_len) as u16;
            out.extend_from_slice(&hdr::udp(gue_sport(d.hash), t.gue_port, udp_len));
        }
        out.extend_from_slice(&pkt[l2..]);
        out
    }

    /// Farm branch: see `lb-ebpf/src/farm.rs`.
    fn farm(&mut self, svc: &ServiceInfo, flow: &FlowKey, syn: bool, now: u64) -> Decision {
        let own = self.farm.own_member;
        let pass = |reason| Decision {
            backend: own,
            ..Decision::exit(Action::Pass, reason)
        };
        if flow.proto == PROTO_TCP && !syn {
            return if self.sockets.contains(flow) {
                pass(Stat::FarmPassSocket)
            } else {
                Decision::exit(Action::Drop, Stat::FarmDropNoSocket)
            };
        }
        if now > self.farm.lease_until_ns {
            return Decision::exit(Action::Drop, Stat::FarmDropLease);
        }
        let (owner, ct, flood_skip) = if flow.proto == PROTO_TCP {
            let owner = if svc.ring_size == 0 {
                NO_BACKEND
            } else {
                self.expected_backend(svc, flow)
            };
            (owner, None, false)
        } else {
            let (o, ct, skip) = self.pick_backend(svc, flow, false, now);
            (o, Some(ct), skip)
        };
        let exit = |reason| Decision {
            ct,
            flood_skip,
            ..Decision::exit(Action::Drop, reason)
        };
        if !self.backend_valid(owner) {
            return exit(Stat::DropNoBackend);
        }
        if owner != own {
            return exit(Stat::FarmDropNotOwner);
        }
        Decision {
            ct,
            flood_skip,
            ..pass(Stat::FarmPassOwner)
        }
    }

    /// The backend for `flow`, the conntrack counter bumped, and whether the flood guard
    /// kept a new entry out. `clock` is the program's (`bpf_ktime_get_coarse_ns`).
    fn pick_backend(
        &mut self,
        svc: &ServiceInfo,
        flow: &FlowKey,
        syn: bool,
        clock: u64,
    ) -> (u32, Stat, bool) {
        let udp = flow.proto == PROTO_UDP;
        let now = if udp { clock } else { 0 };
        let flow = &flow.of_service(svc.id);
        let key = flow.ct_key();
        let ct_stat = if syn {
            Stat::CtMissSyn
        } else {
            if let Some(e) = self.conntrack.get(key).copied() {
                let live = !udp || now.saturating_sub(e.last_seen_ns) <= self.config.udp_timeout_ns;
                if live && self.backend_valid_for(svc, e.backend) {
                    if udp {
                        self.conntrack.get_mut(key).unwrap().last_seen_ns = now;
                    }
                    return (e.backend, Stat::CtHit, false);
                }
            }
            Stat::CtMissOther
        };
        if svc.ring_size == 0 {
            return (NO_BACKEND, ct_stat, false);
        }
        let backend = self.expected_backend(svc, flow);
        let mut skipped = false;
        if backend != NO_BACKEND {
            let entry = CtEntry {
                backend,
                _pad: 0,
                last_seen_ns: now,
            };
            // An existing entry is rewritten in place; only new ones meet the flood guard.
            if let Some(e) = self.conntrack.get_mut(key) {
                *e = entry;
            } else if self.flooded(clock) {
                skipped = true;
            } else {
                self.conntrack.insert(*key, entry);
            }
            if !skipped && self.config.sync != 0 {
                self.synced.push(lb_common::CtSyncEvent {
                    flow: *flow,
                    backend,
                    _pad: 0,
                });
            }
        }
        (backend, ct_stat, skipped)
    }

    /// The program's per-CPU flood window (the model stands for one CPU).
    fn flooded(&mut self, clock: u64) -> bool {
        let rate = self.config.flood_rate;
        if rate == 0 {
            return false;
        }
        let w = &mut self.flood;
        w.count += 1;
        if (w.count == 1 || w.count > rate as u64 || w.count.is_multiple_of(FLOOD_CLOCK_EVERY))
            && (w.count == 1 || clock.wrapping_sub(w.start_ns) >= 1_000_000_000)
        {
            w.start_ns = clock;
            w.count = 1;
        }
        w.count > rate as u64
    }

    /// Backend the current table gives a new flow (ignoring conntrack).
    pub fn expected_backend(&self, svc: &ServiceInfo, flow: &FlowKey) -> u32 {
        svc.ring_index(flow)
            .and_then(|i| self.ring.get(&i).copied())
            .unwrap_or(NO_BACKEND)
    }
}

/// The program's echo reply to the echo request `pkt`: MACs and addresses swapped, TTL /
/// hop limit reset, type changed, checksums updated incrementally as the program does.
fn echo_reply(pkt: &[u8]) -> Vec<u8> {
    let mut o = pkt.to_vec();
    o[0..6].copy_from_slice(&pkt[6..12]);
    o[6..12].copy_from_slice(&pkt[0..6]);
    let l3 = if be16(pkt, 12) == ETH_P_8021Q { 18 } else { 14 };
    let (l4, reply) = if be16(pkt, l3 - 2) == ETH_P_IP {
        o[l3 + 12..l3 + 16].copy_from_slice(&pkt[l3 + 16..l3 + 20]);
        o[l3 + 16..l3 + 20].copy_from_slice(&pkt[l3 + 12..l3 + 16]);
        let old = be16(&o, l3 + 8);
        o[l3 + 8] = OWN_TTL;
        let c = lb_common::csum::replace([o[l3 + 10], o[l3 + 11]], old, be16(&o, l3 + 8));
        o[l3 + 10..l3 + 12].copy_from_slice(&c);
        (l3 + 20, ICMP_ECHO_REPLY)
    } else {
        o[l3 + 8..l3 + 24].copy_from_slice(&pkt[l3 + 24..l3 + 40]);
        o[l3 + 24..l3 + 40].copy_from_slice(&pkt[l3 + 8..l3 + 24]);
        o[l3 + 7] = OWN_TTL;
        (l3 + 40, ICMPV6_ECHO_REPLY)
    };
    let old = be16(&o, l4);
    o[l4] = reply;
    let c = lb_common::csum::replace([o[l4 + 2], o[l4 + 3]], old, be16(&o, l4));
    o[l4 + 2..l4 + 4].copy_from_slice(&c);
    o
}

/// ToS / traffic class, length by the header, and "may not be fragmented" of the IP packet
/// at `l3` (see `Inner::of` in `parse.rs`).
fn inner_ip(p: &[u8], l3: usize) -> (u8, u32, bool) {
    let h = &p[l3..];
    if h[0] >> 4 == 6 {
        ((h[0] << 4) | (h[1] >> 4), be16(h, 4) as u32 + 40, true)
    } else {
        (h[1], be16(h, 2) as u32, h[6] & 0x40 != 0)
    }
}

/// The program's frag-needed / packet-too-big answer to the frame `pkt` naming `mtu` (see
/// `too_big_reply` in `icmp.rs`).
fn too_big_answer(pkt: &[u8], mtu: u32) -> Vec<u8> {
    let l2 = if be16(pkt, 12) == ETH_P_8021Q { 18 } else { 14 };
    let v6 = pkt[l2] >> 4 == 6;
    let q = if v6 {
        TOO_BIG_QUOTE_V6
    } else {
        TOO_BIG_QUOTE_V4
    };
    let quote = &pkt[l2..l2 + q];
    let mut out = pkt[6..12].to_vec();
    out.extend_from_slice(&pkt[0..6]);
    out.extend_from_slice(&pkt[12..l2]);
    let mut msg;
    let acc;
    if v6 {
        let (client, vip): (Addr, Addr) = (
            quote[8..24].try_into().unwrap(),
            quote[24..40].try_into().unwrap(),
        );
        let h = hdr::ipv6(0, 0, (8 + q) as u16, IPPROTO_ICMPV6, &vip, &client);
        out.extend_from_slice(&h);
        acc = lb_common::csum::sum(&h[8..40], 0) + (8 + q) as u32 + IPPROTO_ICMPV6 as u32;
        msg = vec![ICMPV6_PKT_TOOBIG, 0, 0, 0];
        msg.extend_from_slice(&mtu.to_be_bytes());
    } else {
        let h = hdr::ipv4(
            0,
            (28 + q) as u16,
            IPPROTO_ICMP,
            quote[16..20].try_into().unwrap(),
            quote[12..16].try_into().unwrap(),
        );
        out.extend_from_slice(&h);
        acc = 0;
        msg = vec![ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, 0, 0, 0, 0];
        msg.extend_from_slice(&(mtu as u16).to_be_bytes());
    }
    msg.extend_from_slice(quote);
    let c = lb_common::csum::fold(lb_common::csum::sum(&msg, acc));
    msg[2..4].copy_from_slice(&c.to_be_bytes());
    out.extend_from_slice(&msg);
    out
}

/// The kernel program and the model side by side, programmed identically through
/// [`Twin::maps`]: datapath tests and fuzzers send packets through both with [`Twin::run`].
pub struct Twin {
    pub dp: crate::dataplane::Dataplane,
    pub model: Model,
}

impl Twin {
    /// The datapath fixtures' start: the program loaded for `cfg` (4,096 conntrack entries)
    /// and a director (`setup` adjusts it first) that programmed kernel and model alike from
    /// `cfg`, every backend's MAC being `packet::fixture_mac` of its address.
    pub fn programmed(
        cfg: &crate::config::Config,
        own_mac: [u8; 6],
        setup: impl FnOnce(&mut crate::director::Director),
    ) -> (Twin, crate::director::Director) {
        let mut k = Twin::load(crate::dataplane::LoadOpts {
            ring_slots: crate::director::Director::ring_slots_for(cfg),
            conntrack_size: 4096,
            own_mac,
            ..Default::default()
        })
        .expect("load XDP program (are we root?)");
        let mut director = crate::director::Director::new(k.dp.ring_slots(), own_mac);
        setup(&mut director);
        let mut macs: HashMap<std::net::IpAddr, [u8; 6]> = cfg
            .services
            .iter()
            .flat_map(|s| &s.backends)
            .map(|b| (b.address, crate::packet::fixture_mac(b.address)))
            .collect();
        director
            .apply(cfg, &mut k.maps(), &mut macs)
            .expect("apply config");
        (k, director)
    }

    /// Load the program (verified, not attached) with an empty model beside it.
    pub fn load(opts: crate::dataplane::LoadOpts) -> anyhow::Result<Twin> {
        Ok(Twin {
            dp: crate::dataplane::Dataplane::load(opts)?,
            model: Model::default(),
        })
    }

    /// Map writes that reach both.
    pub fn maps(&mut self) -> crate::dataplane::Tee<'_, crate::dataplane::Dataplane, Model> {
        crate::dataplane::Tee(&mut self.dp, &mut self.model)
    }

    /// `pkt` through both at the current monotonic time (see [`run_both`]).
    pub fn run(&mut self, pkt: &[u8]) -> anyhow::Result<(Decision, Vec<u8>)> {
        run_both(
            &mut self.dp,
            &mut self.model,
            pkt,
            crate::dataplane::monotonic_ns(),
        )
    }
}

/// Run `pkt` through the loaded program (BPF_PROG_TEST_RUN) and through `model` at `now_ns`,
/// and check they agree on verdict, output bytes and exactly which counters moved. Datapath
/// tests and fuzzers call this; an `Err` says what differed.
pub fn run_both(
    dp: &mut crate::dataplane::Dataplane,
    model: &mut Model,
    pkt: &[u8],
    now_ns: u64,
) -> anyhow::Result<(Decision, Vec<u8>)> {
    use crate::dataplane::CounterKind::{Backend, Service};
    let (d, model_out) = model.process(pkt, now_ns);
    let traffic = |dp: &crate::dataplane::Dataplane| -> anyhow::Result<_> {
        if d.bytes == 0 {
            return Ok(None);
        }
        Ok(Some((
            dp.counter(Service, d.service)?,
            dp.counter(Backend, d.backend)?,
        )))
    };
    let svc_drop = |dp: &crate::dataplane::Dataplane| -> anyhow::Result<Option<u64>> {
        d.reason
            .service_drop()
            .map(|r| Ok(dp.service_drops(d.service)?[r as usize]))
            .transpose()
    };
    let before = dp.raw_stats()?;
    let traffic_before = traffic(dp)?;
    let drops_before = svc_drop(dp)?;
    let (action, out) = dp.test_run(pkt)?;
    let after = dp.raw_stats()?;
    let traffic_after = traffic(dp)?;
    let drops_after = svc_drop(dp)?;
    anyhow::ensure!(
        action == d.action.xdp(),
        "verdict {action} differs from model: {d:?}"
    );
    anyhow::ensure!(out == model_out, "output bytes differ from model ({d:?})");
    // Slot by slot as the program bumps them: a forwarded packet's verdict and conntrack
    // outcome share one combined slot.
    let mut expect = [0u64; Stat::COUNT as usize];
    match d.ct {
        Some(ct) if d.reason == Stat::Tx => expect[ct.forwarded() as usize] += 1,
        Some(ct) => {
            expect[d.reason as usize] += 1;
            expect[ct as usize] += 1;
        }
        None => expect[d.reason as usize] += 1,
    }
    if d.flood_skip {
        expect[Stat::CtFloodSkip as usize] += 1;
    }
    let delta: Vec<u64> = after.iter().zip(before).map(|(a, b)| a - b).collect();
    anyhow::ensure!(
        delta == expect,
        "counter deltas {delta:?}, model expects {expect:?} ({d:?})"
    );
    if let (Some(a), Some(b)) = (drops_before, drops_after) {
        anyhow::ensure!(
            b - a == 1,
            "service {}'s {:?} drops moved by {}, model expects 1",
            d.service,
            d.reason,
            b - a
        );
    }
    if let (Some((s0, b0)), Some((s1, b1))) = (traffic_before, traffic_after) {
        let moved = [
            (s1.packets - s0.packets, s1.bytes - s0.bytes),
            (b1.packets - b0.packets, b1.bytes - b0.bytes),
        ];
        // A forwarded frame is counted for its backend only (the service's total is its
        // backends' sum); a farm delivery for the service and the member slot.
        let farm = matches!(d.reason, Stat::FarmPassOwner | Stat::FarmPassSocket);
        let svc = if farm { (1, d.bytes) } else { (0, 0) };
        anyhow::ensure!(
            moved == [svc, (1, d.bytes)],
            "service/backend slots moved by {moved:?}, model expects {svc:?} and 1 packet of \
             {} bytes ({d:?})",
            d.bytes
        );
    }
    Ok((d, out))
}
