//! Placement of services in the program's open-addressing service table (`SERVICE_INDEX`
//! slots pointing at `SERVICE_ENTRIES`): linear probing from `service_slot`, deletion by
//! backward shift (no tombstones, so a miss stops at the first empty slot). Pure: it returns
//! the writes, in an order that keeps every other service findable after each one, and the
//! caller applies them to whichever maps it holds.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use aya::maps::{Array, MapData};
use lb_common::{
    service_slot, ServiceEntry, ServiceInfo, ServiceKey, MAX_SERVICES, SERVICE_PROBES,
    SERVICE_SLOTS,
};

/// One map write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Write {
    /// `SERVICE_ENTRIES[i] = entry`.
    Entry(u32, ServiceEntry),
    /// `SERVICE_INDEX[slot] = value` (entry index + 1, 0 = empty).
    Index(u32, u32),
}

#[derive(Clone, Copy, Debug)]
struct Placed {
    slot: u32,
    entry: u32,
    info: ServiceInfo,
}

/// What the service maps hold, mirrored.
#[derive(Clone, Debug)]
pub struct ServiceTable {
    /// `SERVICE_INDEX` as written.
    index: Vec<u32>,
    /// The key in each occupied slot.
    keys: Vec<Option<ServiceKey>>,
    placed: HashMap<ServiceKey, Placed>,
}

impl Default for ServiceTable {
    fn default() -> Self {
        Self {
            index: vec![0; SERVICE_SLOTS as usize],
            keys: vec![None; SERVICE_SLOTS as usize],
            placed: HashMap::new(),
        }
    }
}

const MASK: u32 = SERVICE_SLOTS - 1;

fn home(key: &ServiceKey) -> u32 {
    service_slot(&key.words())
}

impl ServiceTable {
    /// The mirror of maps a running data plane holds: `index` is `SERVICE_INDEX`, `entry`
    /// reads `SERVICE_ENTRIES`.
    pub fn adopt(
        index: Vec<u32>,
        mut entry: impl FnMut(u32) -> Result<ServiceEntry>,
    ) -> Result<Self> {
        if index.len() != SERVICE_SLOTS as usize {
            bail!(
                "service index has {} slots, not {SERVICE_SLOTS}",
                index.len()
            );
        }
        let mut t = Self {
            index,
            ..Self::default()
        };
        for slot in 0..SERVICE_SLOTS {
            let v = t.index[slot as usize];
            if v == 0 {
                continue;
            }
            let e = entry(v - 1)?;
            let key = ServiceKey::from_words(&e.key);
            t.keys[slot as usize] = Some(key);
            t.placed.insert(
                key,
                Placed {
                    slot,
                    entry: v - 1,
                    info: e.info,
                },
            );
        }
        Ok(t)
    }

    /// Every service and its info.
    pub fn iter(&self) -> impl Iterator<Item = (ServiceKey, ServiceInfo)> + '_ {
        self.placed.iter().map(|(k, p)| (*k, p.info))
    }

    /// Add `key` or change its info: the new entry goes to the entry of the id's pair not
    /// in use, then the slot points at it.
    pub fn set(&mut self, key: &ServiceKey, info: &ServiceInfo) -> Result<Vec<Write>> {
        if info.id >= MAX_SERVICES {
            bail!("service id {} out of range", info.id);
        }
        let (slot, entry) = match self.placed.get(key) {
            Some(p) if p.entry / 2 == info.id => (p.slot, p.entry ^ 1),
            Some(p) => (p.slot, 2 * info.id),
            None => (self.free_slot(key)?, 2 * info.id),
        };
        let e = ServiceEntry {
            key: key.words(),
            info: *info,
        };
        self.index[slot as usize] = entry + 1;
        self.keys[slot as usize] = Some(*key);
        self.placed.insert(
            *key,
            Placed {
                slot,
                entry,
                info: *info,
            },
        );
        Ok(vec![Write::Entry(entry, e), Write::Index(slot, entry + 1)])
    }

    fn free_slot(&self, key: &ServiceKey) -> Result<u32> {
        let h = home(key);
        (0..SERVICE_PROBES)
            .map(|i| (h + i) & MASK)
            .find(|&s| self.index[s as usize] == 0)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "service table: no free slot within {SERVICE_PROBES} of slot {h} for {}:{}",
                    std::net::Ipv6Addr::from(key.addr),
                    key.port
                )
            })
    }

    /// Remove `key` (nothing if absent). Each later key of its probe run that may move
    /// closer to home is copied into the gap before its old slot is reused or cleared, so
    /// no key is ever missing from its run; only the last gap is cleared.
    pub fn remove(&mut self, key: &ServiceKey) -> Vec<Write> {
        let Some(p) = self.placed.remove(key) else {
            return Vec::new();
        };
        let mut writes = Vec::new();
        let mut gap = p.slot;
        let mut j = gap;
        loop {
            j = (j + 1) & MASK;
            let Some(k) = self.keys[j as usize] else {
                break;
            };
            let h = home(&k);
            // `k` stays if its home lies cyclically in (gap, j].
            let stays = if gap <= j {
                gap < h && h <= j
            } else {
                gap < h || h <= j
            };
            if stays {
                continue;
            }
            let v = self.index[j as usize];
            self.index[gap as usize] = v;
            self.keys[gap as usize] = Some(k);
            self.placed.get_mut(&k).expect("placed").slot = gap;
            writes.push(Write::Index(gap, v));
            gap = j;
        }
        self.index[gap as usize] = 0;
        self.keys[gap as usize] = None;
        writes.push(Write::Index(gap, 0));
        writes
    }
}

/// Apply `writes`, in order, to the two kernel maps.
pub fn apply(
    writes: &[Write],
    index: &mut Array<MapData, u32>,
    entries: &mut Array<MapData, ServiceEntry>,
) -> Result<()> {
    for w in writes {
        match *w {
            Write::Entry(i, e) => entries
                .set(i, e, 0)
                .with_context(|| format!("writing service entry {i}"))?,
            Write::Index(slot, v) => index
                .set(slot, v, 0)
                .with_context(|| format!("writing service index slot {slot}"))?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::{v4_mapped, PROTO_TCP};

    /// What the program does: probe from home to a match or an empty slot.
    fn lookup(
        index: &[u32],
        entries: &HashMap<u32, ServiceEntry>,
        key: &ServiceKey,
    ) -> Option<u32> {
        let w = key.words();
        let h = service_slot(&w);
        for i in 0..SERVICE_PROBES {
            let v = index[((h + i) & MASK) as usize];
            if v == 0 {
                return None;
            }
            let e = entries[&(v - 1)];
            if e.key == w {
                return Some(e.info.id);
            }
        }
        None
    }

    fn apply(index: &mut [u32], entries: &mut HashMap<u32, ServiceEntry>, w: &[Write]) {
        for w in w {
            match *w {
                Write::Entry(i, e) => {
                    entries.insert(i, e);
                }
                Write::Index(s, v) => index[s as usize] = v,
            }
        }
    }

    #[test]
    fn every_key_stays_findable_through_adds_changes_and_removes() {
        let mut t = ServiceTable::default();
        let mut index = vec![0u32; SERVICE_SLOTS as usize];
        let mut entries = HashMap::new();
        let key = |i: u32| {
            ServiceKey::new(
                v4_mapped([10, 0, (i / 200) as u8, 1]),
                (i % 200) as u16,
                PROTO_TCP,
            )
        };
        let info = |id: u32, ring: u32| ServiceInfo {
            id,
            ring_offset: ring,
            ..Default::default()
        };
        let mut live: HashMap<u32, u32> = HashMap::new(); // key number -> id
        let mut rng = 0x1234_5678u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for step in 0..20_000u32 {
            let k = (next() % 700) as u32;
            if let Some(&id) = live.get(&k) {
                if next() % 3 == 0 {
                    let w = t.set(&key(k), &info(id, step)).unwrap();
                    // Between the two writes the old entry still answers.
                    apply(&mut index, &mut entries, &w[..1]);
                    assert_eq!(lookup(&index, &entries, &key(k)), Some(id));
                    apply(&mut index, &mut entries, &w[1..]);
                } else {
                    let w = t.remove(&key(k));
                    live.remove(&k);
                    // After every single write, every other key is still found.
                    for wr in &w {
                        apply(&mut index, &mut entries, std::slice::from_ref(wr));
                        for (&o, &id) in &live {
                            assert_eq!(lookup(&index, &entries, &key(o)), Some(id), "step {step}");
                        }
                    }
                    assert_eq!(lookup(&index, &entries, &key(k)), None);
                }
            } else if live.len() < MAX_SERVICES as usize {
                let used: std::collections::HashSet<u32> = live.values().copied().collect();
                let id = (0..MAX_SERVICES).find(|i| !used.contains(i)).unwrap();
                let w = t.set(&key(k), &info(id, step)).unwrap();
                apply(&mut index, &mut entries, &w);
                live.insert(k, id);
            }
            if step % 1000 == 0 {
                for (&o, &id) in &live {
                    assert_eq!(lookup(&index, &entries, &key(o)), Some(id));
                }
                assert_eq!(t.iter().count(), live.len());
            }
        }
        // The mirror rebuilt from the maps is the same table.
        let a = ServiceTable::adopt(index.clone(), |i| Ok(entries[&i])).unwrap();
        let mut x: Vec<_> = a.iter().collect();
        let mut y: Vec<_> = t.iter().collect();
        x.sort_by_key(|(k, _)| k.words());
        y.sort_by_key(|(k, _)| k.words());
        assert_eq!(x, y);
    }

    #[test]
    fn words_round_trip() {
        let k = ServiceKey::new(v4_mapped([192, 0, 2, 9]), 8080, PROTO_TCP);
        assert_eq!(ServiceKey::from_words(&k.words()), k);
    }
}
