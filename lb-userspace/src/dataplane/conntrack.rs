//! Reading the pinned conntrack table off the owner loop: the periodic count (entries, and
//! flows per backend) and the bounded listing behind `farmlb conns`. Both walk every entry,
//! about a second per million: run them on a blocking thread.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData};
use lb_common::{maps as names, CtEntry, CtKey, GlobalConfig, PROTO_UDP};

/// A conntrack entry as the program would treat it now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    /// The client's address and port, the VIP's port, the service id and the protocol:
    /// the VIP address is the service's.
    pub key: CtKey,
    pub entry: CtEntry,
    /// UDP: nanoseconds since its last packet (TCP entries record no time: `None`).
    pub idle_ns: Option<u64>,
    /// A UDP entry idle past `udp_timeout`: the program ignores it (re-hashes the flow) until
    /// the LRU evicts it.
    pub expired: bool,
}

/// The table at one walk.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Count {
    /// Every entry, expired or not.
    pub entries: u64,
    /// Entries the program still uses (all TCP ones, unexpired UDP ones) by backend id: a
    /// TCP entry stays until the LRU evicts it, so this counts recently closed connections
    /// too.
    pub by_backend: HashMap<u32, u64>,
}

/// The pinned table, with the clock and `udp_timeout` the program judges entries by.
struct Table {
    map: BpfHashMap<MapData, CtKey, CtEntry>,
    udp_timeout_ns: u64,
    now_ns: u64,
}

impl Table {
    fn open(dir: &Path) -> Result<Table> {
        let map = MapData::from_pin(dir.join(names::CONNTRACK))
            .with_context(|| format!("opening the pinned {}", names::CONNTRACK))?;
        let map = BpfHashMap::try_from(Map::LruHashMap(map))?;
        let config = MapData::from_pin(dir.join(names::CONFIG))
            .with_context(|| format!("opening the pinned {}", names::CONFIG))?;
        let config: Array<MapData, GlobalConfig> = Array::try_from(Map::Array(config))?;
        Ok(Table {
            map,
            udp_timeout_ns: config.get(&0, 0)?.udp_timeout_ns,
            now_ns: super::monotonic_ns(),
        })
    }

    /// Every entry that is still there when read (entries vanish under the walk: skipped).
    fn flows(&self) -> impl Iterator<Item = Flow> + '_ {
        self.map.iter().filter_map(Result::ok).map(|(key, entry)| {
            let idle_ns =
                (key.proto == PROTO_UDP).then(|| self.now_ns.saturating_sub(entry.last_seen_ns));
            Flow {
                key,
                entry,
                idle_ns,
                expired: idle_ns.is_some_and(|i| i > self.udp_timeout_ns),
            }
        })
    }
}

/// Count the table pinned under `dir`.
pub fn count(dir: &Path) -> Result<Count> {
    let t = Table::open(dir)?;
    let mut c = Count::default();
    for f in t.flows() {
        c.entries += 1;
        if !f.expired {
            *c.by_backend.entry(f.entry.backend).or_default() += 1;
        }
    }
    Ok(c)
}

/// The first `limit` entries `keep` accepts, and how many it accepted in all.
pub fn list(dir: &Path, limit: usize, keep: impl Fn(&CtKey) -> bool) -> Result<(Vec<Flow>, u64)> {
    let t = Table::open(dir)?;
    let mut out = Vec::new();
    let mut matched = 0u64;
    for f in t.flows().filter(|f| keep(&f.key)) {
        matched += 1;
        if out.len() < limit {
            out.push(f);
        }
    }
    Ok((out, matched))
}
