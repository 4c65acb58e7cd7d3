//! SYN flood: 100 established flows, then 100,000 SYNs from distinct clients on the same CPU,
//! then a backend added: how many of the 100 still have their conntrack entry, and how many
//! would now go to another backend. Once with the flood guard engaged (a rate the flood
//! exceeds) and once without it (rate 0), on a conntrack the flood could otherwise fill.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::{anyhow, bail, Result};
use farmlb::{
    config::Config,
    dataplane::{Dataplane, LoadOpts},
    director::Director,
    packet::{flow_key, PacketBuilder, TCP_ACK},
};
use lb_common::PROTO_TCP;
use lb_tests::{daemon::services_toml, Service, VIP_V4};

use super::stats::{Dist, Goal, Metric};

/// Conntrack capacity: 4096 entries, 2048 per CPU's LRU list on a 2-CPU machine, so 100k
/// remembered SYNs would evict everything.
const CT_SIZE: u32 = 4096;
const FLOOD: u32 = 100_000;
const ESTABLISHED: u32 = 100;
/// The guard's rate in the guarded run: the flood (hundreds of thousands of SYNs a second
/// here) is far above it.
const GUARD_RATE: u32 = 200;
const XDP_TX: u32 = 3;
const OWN_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x03];

fn config(rate: u32, backends: u8) -> Result<Config> {
    let web = Service::tcp("web4", VIP_V4.into(), 80)
        .backends((11..11 + backends).map(|h| IpAddr::V4(Ipv4Addr::new(10, 99, 0, h))));
    let toml = format!(
        "interface = \"eth0\"\nflood_guard_rate = {rate}\n{}",
        services_toml(&[web])
    );
    Config::from_toml_str(&toml).map_err(|e| anyhow!("{}", e.message()))
}

fn mac(ip: IpAddr) -> [u8; 6] {
    let IpAddr::V4(a) = ip else { return [0; 6] };
    let o = a.octets();
    [0x02, 0xbb, 0, 0, o[2], o[3]]
}

/// (entries kept, flows moved) after the flood and the added backend, at `rate`.
fn run(rate: u32) -> Result<(u32, u32)> {
    let cfg = config(rate, 3)?;
    let mut dp = Dataplane::load(LoadOpts {
        ring_slots: Director::ring_slots_for(&cfg),
        conntrack_size: CT_SIZE,
        own_mac: OWN_MAC,
        ..Default::default()
    })?;
    let mut director = Director::new(dp.ring_slots(), OWN_MAC);
    let mut macs: HashMap<IpAddr, [u8; 6]> = (11..15)
        .map(|h| IpAddr::V4(Ipv4Addr::new(10, 99, 0, h)))
        .map(|ip| (ip, mac(ip)))
        .collect();
    director.apply(&cfg, &mut dp, &mut macs)?;
    let vip = SocketAddr::new(VIP_V4.into(), 80);
    let flows: Vec<SocketAddr> = (0..ESTABLISHED)
        .map(|i| SocketAddr::new(Ipv4Addr::from(0xc633_6400 + i).into(), 30_000))
        .collect();
    let mut first = HashMap::new();
    for &src in &flows {
        let (action, out) = dp.test_run(&PacketBuilder::tcp(src, vip).syn().build())?;
        if action != XDP_TX {
            bail!("established flow {src}: verdict {action}");
        }
        first.insert(src, out[0..6].to_vec());
    }
    for i in 0..FLOOD {
        let src = SocketAddr::new(
            Ipv4Addr::from(0xc612_0000 | (i >> 4)).into(),
            1024 + (i & 15) as u16,
        );
        dp.test_run(&PacketBuilder::tcp(src, vip).syn().build())?;
    }
    let mut kept = 0;
    for &src in &flows {
        kept += dp.conntrack_of(&flow_key(src, vip, PROTO_TCP))?.is_some() as u32;
    }
    director.apply(&config(rate, 4)?, &mut dp, &mut macs)?;
    let mut moved = 0;
    for &src in &flows {
        let (_, out) = dp.test_run(&PacketBuilder::tcp(src, vip).flags(TCP_ACK).build())?;
        moved += (out[0..6] != first[&src][..]) as u32;
    }
    Ok((kept, moved))
}

/// The flood's metrics; the caller's thread is pinned to one CPU.
pub fn metrics() -> Vec<Metric> {
    let mut out = Vec::new();
    for (rate, label) in [(GUARD_RATE, "guard on"), (0, "guard off")] {
        let key = if rate == 0 { "unguarded" } else { "guarded" };
        let name = format!(
            "SYN flood ({label}): established flows kept after {FLOOD} SYNs on their CPU and a \
             backend added"
        );
        match run(rate) {
            Ok((kept, moved)) => {
                eprintln!("xtask bench: flood, rate {rate}: {kept} kept, {moved} moved");
                let m = Metric::new(&format!("flood.{key}.kept"), &name, "flows")
                    .value(Dist::new(vec![kept as f64]))
                    .note(format!(
                        "{moved} of {ESTABLISHED} moved to another backend; conntrack \
                         {CT_SIZE} entries, flood_guard_rate {rate}"
                    ));
                out.push(if rate == 0 {
                    m
                } else {
                    m.goal(Goal::value_at_least(ESTABLISHED as f64))
                });
            }
            Err(e) => out.push(Metric::unavailable(
                &format!("flood.{key}.kept"),
                &name,
                &format!("{e:#}"),
            )),
        }
    }
    out
}
