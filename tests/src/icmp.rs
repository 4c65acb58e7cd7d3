//! ICMP helpers of the end-to-end tests: a namespace's ICMP counters, and a too-big error
//! about a live connection sent from the client's side.

use std::net::{IpAddr, SocketAddr};

use anyhow::{Context, Result};
use farmlb::packet::PacketBuilder;
use socket2::{Domain, Protocol, Socket, Type};

use crate::{netns, LongConn};

/// ICMP counters of namespace `ns`: (IPv4 destination-unreachables + IPv6 packet-too-bigs
/// in, echo requests in of both families).
pub fn icmp_in(ns: &str) -> Result<(u64, u64)> {
    let snmp = netns::exec(ns, &["nstat", "-az", "--json"])?;
    let v: serde_json::Value = serde_json::from_str(&snmp).context("nstat --json")?;
    let k = &v["kernel"];
    let n = |key: &str| k[key].as_u64().unwrap_or(0);
    Ok((
        n("IcmpInDestUnreachs") + n("Icmp6InPktTooBigs"),
        n("IcmpInEchos") + n("Icmp6InEchos"),
    ))
}

/// A fragmentation-needed / packet-too-big error naming `mtu`, quoting the packet the
/// backend sent on `conn` (`vip` -> the connection's client address), sent to the VIP
/// through a raw socket in namespace `ns` (the client's side of the network).
pub fn send_too_big(ns: &str, conn: &LongConn, vip: SocketAddr, mtu: u16) -> Result<()> {
    let local = conn.local_addr();
    let v6 = vip.is_ipv6();
    let quoted = PacketBuilder::tcp(vip, local).build()[14..14 + if v6 { 48 } else { 28 }].to_vec();
    let src = SocketAddr::new(local.ip(), 0);
    let frame = PacketBuilder::too_big(src, vip, mtu, &quoted).build();
    // The ICMP message alone: the kernel writes the IP header (and the ICMPv6 checksum).
    let msg = frame[14 + if v6 { 40 } else { 20 }..].to_vec();
    let to: IpAddr = vip.ip();
    netns::in_netns(ns, move || -> Result<()> {
        let (domain, proto) = if v6 {
            (Domain::IPV6, Protocol::ICMPV6)
        } else {
            (Domain::IPV4, Protocol::ICMPV4)
        };
        let sock = Socket::new(domain, Type::RAW, Some(proto))?;
        sock.send_to(&msg, &SocketAddr::new(to, 0).into())?;
        Ok(())
    })?
}
