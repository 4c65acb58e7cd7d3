//! Conntrack sync between directors that share VIPs behind ECMP (`[announce] sync = true`),
//! like IPVS's connection sync daemon, over the farm's authenticated membership channel: a
//! flow that a router moves to another director (its director died, the ECMP set changed)
//! keeps its backend there even when the backend set changed since the flow began, when
//! the Maglev table alone would send it elsewhere.
//!
//! Out: the program writes every conntrack entry it makes to the `CT_SYNC` ring buffer
//! (only while `GlobalConfig::sync` is set). This task reads the ring every
//! [`READ_EVERY`], names each entry's backend by its service key and address (peers number
//! their backends differently), and sends batches of at most [`BATCH`] entries, at most
//! `sync_rate` entries a second (the rest dropped and counted), to every other member.
//!
//! In: a peer's entry is written to our conntrack table only if its service exists here
//! with the same key, the flow is addressed to that service, and the backend is one of that
//! service's backends that the program may use: our id for it goes in. Anything else is
//! rejected and counted, so a late or lost entry only ever leaves the flow to our ring,
//! never to a backend of another service.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use aya::maps::{HashMap as BpfHashMap, Map, MapData, RingBuf};
use lb_common::{maps as names, Addr, CtEntry, CtKey, CtSyncEvent, FlowKey, ServiceKey, PROTO_UDP};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::director::Director;

/// What the sync task gets of the membership.
pub struct Channels {
    /// Batches to send: to one member, or to every other (`None`).
    pub out: mpsc::Sender<(Option<SocketAddr>, Vec<u8>)>,
    /// Batches received.
    pub inbox: mpsc::Receiver<Vec<u8>>,
    /// Received batches the membership dropped because `inbox` was full.
    pub dropped_in: Arc<std::sync::atomic::AtomicU64>,
    /// The membership view: a member that appears is sent this director's whole table.
    pub members: watch::Receiver<crate::farm::membership::View>,
    /// This node's membership address (not a peer).
    pub me: SocketAddr,
}

/// At most this many entries of the table go to a member that joins.
const BULK_MAX: usize = 1 << 20;

/// How often the ring buffer is read (the program does not wake us per event).
pub const READ_EVERY: Duration = Duration::from_millis(10);
/// Entries per datagram: 10 + 24 × 55 bytes of payload, under a 1500-byte MTU sealed.
pub const BATCH: usize = 24;
/// Events read from the ring per wake-up at most (the rest wait for the next one).
const READ_MAX: usize = 65536;
const VERSION: u8 = 1;
const HEADER: usize = 1 + 1 + 8;
const ENTRY: usize = 16 + 16 + 2 + 2 + 1 + 2 + 16;

/// One entry on the wire: the flow, its service's port (0: port-wildcard service) and the
/// backend's address. The service's VIP and protocol are the flow's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WireEntry {
    pub flow: FlowKey,
    pub svc_port: u16,
    pub backend: Addr,
}

/// A batch: its send time (Unix ns, for the lag) and entries.
pub fn encode(sent_unix_ns: u64, entries: &[WireEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + entries.len() * ENTRY);
    out.push(VERSION);
    out.push(entries.len() as u8);
    out.extend_from_slice(&sent_unix_ns.to_be_bytes());
    for e in entries {
        out.extend_from_slice(&e.flow.src);
        out.extend_from_slice(&e.flow.dst);
        out.extend_from_slice(&e.flow.sport.to_be_bytes());
        out.extend_from_slice(&e.flow.dport.to_be_bytes());
        out.push(e.flow.proto);
        out.extend_from_slice(&e.svc_port.to_be_bytes());
        out.extend_from_slice(&e.backend);
    }
    out
}

/// The batch, or `None` if it is not one this version reads (wrong version or length).
pub fn decode(b: &[u8]) -> Option<(u64, Vec<WireEntry>)> {
    if b.len() < HEADER || b[0] != VERSION {
        return None;
    }
    let n = b[1] as usize;
    if b.len() != HEADER + n * ENTRY {
        return None;
    }
    let sent = u64::from_be_bytes(b[2..10].try_into().ok()?);
    let addr = |s: &[u8]| -> Addr { s.try_into().expect("16 bytes") };
    let u16at = |s: &[u8]| u16::from_be_bytes([s[0], s[1]]);
    let entries = b[HEADER..]
        .chunks_exact(ENTRY)
        .map(|e| WireEntry {
            flow: FlowKey::new(
                addr(&e[0..16]),
                addr(&e[16..32]),
                u16at(&e[32..]),
                u16at(&e[34..]),
                e[36],
            ),
            svc_port: u16at(&e[37..]),
            backend: addr(&e[39..55]),
        })
        .collect();
    Some((sent, entries))
}

/// Token bucket of entries that may be sent: refilled at `rate` a second, holding at most a
/// tenth of a second's worth (at least one batch), so a burst is sent at once and a flood is
/// cut to the rate.
#[derive(Clone, Debug, PartialEq)]
pub struct Bucket {
    rate: f64,
    cap: f64,
    tokens: f64,
}

impl Bucket {
    pub fn new(rate: u32) -> Bucket {
        let cap = (f64::from(rate) / 10.0).max(BATCH as f64);
        Bucket {
            rate: f64::from(rate),
            cap,
            tokens: cap,
        }
    }

    pub fn refill(&mut self, dt: Duration) {
        self.tokens = (self.tokens + self.rate * dt.as_secs_f64()).min(self.cap);
    }

    /// Take one token, if there is one.
    pub fn take(&mut self) -> bool {
        self.take_n(1)
    }

    /// Take `n` tokens if there are that many (nothing otherwise). `n` up to a batch always
    /// fits the bucket's capacity, so a waiting sender eventually gets it.
    pub fn take_n(&mut self, n: usize) -> bool {
        if self.tokens < n as f64 {
            return false;
        }
        self.tokens -= n as f64;
        true
    }
}

/// What the sync task needs of the director, rebuilt by the owner loop when it changes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Table {
    /// Our backend id → its service's key and its address (naming outgoing entries).
    pub by_id: HashMap<u32, (ServiceKey, Addr)>,
    /// Service key → our id for the service, and the addresses of its backends the
    /// program may use with our ids (validating incoming entries).
    pub by_service: HashMap<ServiceKey, (u32, HashMap<Addr, u32>)>,
}

fn addr16(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v) => lb_common::v4_mapped(v.octets()),
        IpAddr::V6(v) => v.octets(),
    }
}

impl Table {
    pub fn of(director: &Director) -> Table {
        let mut t = Table::default();
        for st in director.services.values() {
            if st.info.fwd_mode == lb_common::FWD_FARM {
                continue;
            }
            let (_, usable) = t
                .by_service
                .entry(st.key)
                .or_insert_with(|| (st.info.id, HashMap::new()));
            for b in st.backends.values() {
                let a = addr16(b.address);
                t.by_id.insert(b.id, (st.key, a));
                if b.is_valid() {
                    usable.insert(a, b.id);
                }
            }
        }
        t
    }

    /// Our outgoing form of an event, `None` if its backend is not (or no longer) ours.
    pub fn outgoing(&self, ev: &CtSyncEvent) -> Option<WireEntry> {
        let (key, addr) = self.by_id.get(&ev.backend)?;
        Some(WireEntry {
            flow: ev.flow,
            svc_port: key.port,
            backend: *addr,
        })
    }

    /// Our outgoing form of an entry of the table (the VIP is its backend's service's).
    pub fn outgoing_entry(&self, key: &CtKey, backend: u32) -> Option<WireEntry> {
        let (svc, _) = self.by_id.get(&backend)?;
        let flow = FlowKey::new(key.src, svc.addr, key.sport, key.dport, key.proto);
        self.outgoing(&CtSyncEvent {
            flow,
            backend,
            _pad: 0,
        })
    }

    /// Our conntrack key and backend id for a peer's entry, `None` (rejected) unless the
    /// service exists here, the flow is addressed to it, and the backend is a usable
    /// backend of that service.
    pub fn incoming(&self, e: &WireEntry) -> Option<(CtKey, u32)> {
        let f = &e.flow;
        if e.svc_port != 0 && e.svc_port != f.dport {
            return None;
        }
        let key = ServiceKey::new(f.dst, e.svc_port, f.proto);
        let (svc, usable) = self.by_service.get(&key)?;
        let id = usable.get(&e.backend).copied()?;
        Some((*f.of_service(*svc).ct_key(), id))
    }
}

/// `farmlb status`'s sync counters.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SyncView {
    /// Entries sent to the peers (each batch goes to every peer; counted once).
    pub sent: u64,
    /// Entries received from peers and written to our conntrack table.
    pub received: u64,
    /// Entries not sent: over `sync_rate`, the send queue full, or the backend unknown.
    /// The program's own drops (ring buffer full) are `ct_sync_drop` in the stats.
    pub dropped: u64,
    /// Entries received but refused: unknown service, flow not for it, backend not one of
    /// its usable backends, or a malformed batch.
    pub rejected: u64,
    /// Received batches dropped unread because this task lagged behind (a full queue).
    #[serde(default)]
    pub dropped_batches_in: u64,
    /// Entries of the whole table sent to members that joined (one walk per join, paced at
    /// `sync_rate`), and the number of such joins.
    #[serde(default)]
    pub bulk_sent: u64,
    #[serde(default)]
    pub bulk_joins: u64,
    /// Time from a batch's sending to its insertion here, in milliseconds: the last one and
    /// the highest seen (the clocks of the directors are assumed in sync, e.g. by NTP).
    pub lag_ms_last: f64,
    pub lag_ms_max: f64,
}

/// Handle of the running sync task.
pub struct Sync {
    table: watch::Sender<Arc<Table>>,
    pub view: watch::Receiver<SyncView>,
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64
}

impl Sync {
    /// Start the task: `ring` is the program's `CT_SYNC`, `pin_dir` where its conntrack
    /// table is pinned, `out`/`inbox` the membership's sync channels.
    /// `table` is the director's now, so batches that queued while the daemon started are
    /// judged against it.
    pub fn start(
        ring: RingBuf<MapData>,
        pin_dir: &Path,
        rate: u32,
        ch: Channels,
        table: Table,
    ) -> Result<Sync> {
        let Channels {
            out,
            inbox,
            dropped_in,
            members,
            me,
        } = ch;
        let ct = MapData::from_pin(pin_dir.join(names::CONNTRACK))
            .with_context(|| format!("opening the pinned {}", names::CONNTRACK))?;
        let ct: BpfHashMap<MapData, CtKey, CtEntry> = BpfHashMap::try_from(Map::LruHashMap(ct))?;
        let (table, table_rx) = watch::channel(Arc::new(table));
        // Members already there when we start have had our entries as they were made.
        let known: HashSet<SocketAddr> = members.borrow().members.iter().map(|m| m.addr).collect();
        let (view_tx, view) = watch::channel(SyncView::default());
        let task = Task {
            ring,
            ct,
            out,
            table: table_rx,
            view: SyncView::default(),
            view_tx,
            budget: Bucket::new(rate),
            dropped_in,
            rate,
            pin_dir: pin_dir.to_path_buf(),
            members,
            known,
            me,
            bulk_sent: Arc::default(),
        };
        tokio::spawn(task.run(inbox));
        Ok(Sync { table, view })
    }

    /// The director changed: new ids, services or validity (a no-op when equal).
    pub fn set_table(&self, t: Table) {
        self.table.send_if_modified(|cur| {
            if **cur == t {
                return false;
            }
            *cur = Arc::new(t);
            true
        });
    }
}

struct Task {
    ring: RingBuf<MapData>,
    ct: BpfHashMap<MapData, CtKey, CtEntry>,
    out: mpsc::Sender<(Option<SocketAddr>, Vec<u8>)>,
    table: watch::Receiver<Arc<Table>>,
    view: SyncView,
    view_tx: watch::Sender<SyncView>,
    budget: Bucket,
    dropped_in: Arc<std::sync::atomic::AtomicU64>,
    rate: u32,
    pin_dir: std::path::PathBuf,
    members: watch::Receiver<crate::farm::membership::View>,
    known: HashSet<SocketAddr>,
    me: SocketAddr,
    bulk_sent: Arc<std::sync::atomic::AtomicU64>,
}

impl Task {
    async fn run(mut self, mut inbox: mpsc::Receiver<Vec<u8>>) {
        let mut tick = tokio::time::interval(READ_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    self.publish();
                    self.view.dropped_batches_in =
                        self.dropped_in.load(std::sync::atomic::Ordering::Relaxed);
                    self.view.bulk_sent =
                        self.bulk_sent.load(std::sync::atomic::Ordering::Relaxed);
                }
                r = self.members.changed() => {
                    if r.is_err() {
                        return;
                    }
                    self.on_members();
                }
                b = inbox.recv() => match b {
                    Some(b) => self.insert(&b),
                    None => return,
                },
            }
            self.view_tx.send_if_modified(|v| {
                let changed = *v != self.view;
                *v = self.view.clone();
                changed
            });
        }
    }

    /// Read the ring and send what the rate allows.
    fn publish(&mut self) {
        self.budget.refill(READ_EVERY);
        let table = self.table.borrow().clone();
        let mut batch = Vec::with_capacity(BATCH);
        let mut read = 0;
        while read < READ_MAX {
            let Some(item) = self.ring.next() else { break };
            read += 1;
            if item.len() != std::mem::size_of::<CtSyncEvent>() {
                self.view.dropped += 1;
                continue;
            }
            // SAFETY: the program writes whole `CtSyncEvent`s (repr(C), integers only).
            let ev: CtSyncEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            drop(item);
            // Farm services' UDP entries name member slots: their owner follows the
            // membership, nothing to share.
            if ev.backend >= lb_common::MEMBER_BASE {
                continue;
            }
            let Some(e) = table.outgoing(&ev) else {
                self.view.dropped += 1;
                continue;
            };
            if !self.budget.take() {
                self.view.dropped += 1;
                continue;
            }
            batch.push(e);
            if batch.len() == BATCH {
                self.send(&mut batch);
            }
        }
        if !batch.is_empty() {
            self.send(&mut batch);
        }
    }

    /// New members get the whole table (a restarted or added director knows no flow yet);
    /// members that left are forgotten, so they get it again when they come back.
    fn on_members(&mut self) {
        let now: HashSet<SocketAddr> = self
            .members
            .borrow_and_update()
            .members
            .iter()
            .map(|m| m.addr)
            .filter(|a| *a != self.me)
            .collect();
        for &addr in now.difference(&self.known) {
            self.view.bulk_joins += 1;
            tracing::info!(member = %addr, "conntrack sync: sending the table to a new member");
            tokio::spawn(bulk(
                addr,
                self.pin_dir.clone(),
                self.table.borrow().clone(),
                self.out.clone(),
                self.rate,
                self.bulk_sent.clone(),
            ));
        }
        self.known = now;
    }

    fn send(&mut self, batch: &mut Vec<WireEntry>) {
        let n = batch.len() as u64;
        match self.out.try_send((None, encode(unix_ns(), batch))) {
            Ok(()) => self.view.sent += n,
            Err(_) => self.view.dropped += n,
        }
        batch.clear();
    }

    /// A peer's batch: validate each entry and write it.
    fn insert(&mut self, b: &[u8]) {
        let Some((sent, entries)) = decode(b) else {
            self.view.rejected += 1;
            return;
        };
        let table = self.table.borrow().clone();
        let now = crate::dataplane::monotonic_ns();
        for e in &entries {
            let Some((key, id)) = table.incoming(e) else {
                self.view.rejected += 1;
                continue;
            };
            let entry = CtEntry {
                backend: id,
                _pad: 0,
                last_seen_ns: if e.flow.proto == PROTO_UDP { now } else { 0 },
            };
            match self.ct.insert(key, entry, 0) {
                Ok(()) => self.view.received += 1,
                Err(err) => {
                    tracing::debug!("conntrack sync: inserting a peer's entry: {err}");
                    self.view.rejected += 1;
                }
            }
        }
        let lag = unix_ns().saturating_sub(sent) as f64 / 1e6;
        self.view.lag_ms_last = lag;
        self.view.lag_ms_max = self.view.lag_ms_max.max(lag);
    }
}

/// Send the live entries of the conntrack table pinned under `pin_dir` to `to`, paced at
/// `rate` entries a second (the walk runs on a blocking thread).
async fn bulk(
    to: SocketAddr,
    pin_dir: std::path::PathBuf,
    table: Arc<Table>,
    out: mpsc::Sender<(Option<SocketAddr>, Vec<u8>)>,
    rate: u32,
    sent: Arc<std::sync::atomic::AtomicU64>,
) {
    let walk = tokio::task::spawn_blocking(move || {
        crate::dataplane::conntrack::list(&pin_dir, BULK_MAX, |_| true)
    });
    let flows = match walk.await {
        Ok(Ok((flows, _))) => flows,
        Ok(Err(e)) => return tracing::warn!("conntrack sync: reading the table: {e:#}"),
        Err(e) => return tracing::warn!("conntrack sync: reading the table: {e}"),
    };
    let entries: Vec<WireEntry> = flows
        .iter()
        .filter(|f| !f.expired)
        .filter_map(|f| table.outgoing_entry(&f.key, f.entry.backend))
        .collect();
    let mut bucket = Bucket::new(rate);
    for chunk in entries.chunks(BATCH) {
        while !bucket.take_n(chunk.len()) {
            tokio::time::sleep(READ_EVERY).await;
            bucket.refill(READ_EVERY);
        }
        if out
            .send((Some(to), encode(unix_ns(), chunk)))
            .await
            .is_err()
        {
            return;
        }
        sent.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
    }
    tracing::info!(member = %to, entries = entries.len(), "conntrack sync: table sent");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::neigh::AssumeResolved;

    fn director() -> Director {
        let c = Config::from_toml_str(
            "interface = \"eth0\"\n\
             [[service]]\nname = \"web\"\nvip = \"10.0.100.1\"\nport = 80\ntable_size = 1009\n\
               [[service.backend]]\n  address = \"10.0.0.11\"\n\
               [[service.backend]]\n  address = \"10.0.0.12\"\n\
             [[service]]\nname = \"api\"\nvip = \"10.0.100.1\"\nport = 443\ntable_size = 1009\n\
               [[service.backend]]\n  address = \"10.0.0.21\"\n\
             [[service]]\nname = \"any\"\nvip = \"10.0.100.2\"\nport = 0\ntable_size = 1009\n\
               [[service.backend]]\n  address = \"10.0.0.31\"\n",
        )
        .unwrap();
        let mut d = Director::new(lb_common::DEFAULT_RING_SLOTS, [2, 0, 0, 0, 0, 1]);
        let mut dry = crate::dataplane::DryRun {
            ring_slots: lb_common::DEFAULT_RING_SLOTS,
        };
        d.apply(&c, &mut dry, &mut AssumeResolved).unwrap();
        d
    }

    fn a(s: &str) -> Addr {
        addr16(s.parse().unwrap())
    }

    fn flow(dst: &str, dport: u16) -> FlowKey {
        FlowKey::new(a("10.98.0.2"), a(dst), 40000, dport, lb_common::PROTO_TCP)
    }

    #[test]
    fn the_bucket_allows_a_burst_then_the_rate() {
        let mut b = Bucket::new(1000);
        let burst = (0..1000).filter(|_| b.take()).count();
        assert_eq!(burst, 100, "a tenth of a second's worth at once");
        // One second of 10 ms refills: the rate, not more.
        let mut sent = 0;
        for _ in 0..100 {
            b.refill(READ_EVERY);
            sent += (0..1000).filter(|_| b.take()).count();
        }
        assert!((990..=1000).contains(&sent), "{sent}");
        // A low rate still lets one batch through, and a whole batch again once refilled.
        let mut low = Bucket::new(5);
        assert_eq!((0..100).filter(|_| low.take()).count(), BATCH);
        assert!(!low.take_n(BATCH));
        for _ in 0..470 {
            assert!(!low.take_n(BATCH));
            low.refill(READ_EVERY);
        }
        for _ in 0..20 {
            low.refill(READ_EVERY);
        }
        assert!(low.take_n(BATCH), "4.9 s at 5/s refills a batch of 24");
    }

    #[test]
    fn batches_round_trip_and_garbage_is_refused() {
        let e = |p| WireEntry {
            flow: flow("10.0.100.1", p),
            svc_port: p,
            backend: a("10.0.0.11"),
        };
        let entries: Vec<WireEntry> = (0..BATCH as u16).map(e).collect();
        let b = encode(42, &entries);
        assert!(b.len() + 14 + 32 <= 1472, "{} bytes", b.len());
        assert_eq!(decode(&b), Some((42, entries)));
        assert_eq!(decode(&b[..b.len() - 1]), None);
        let mut v2 = b.clone();
        v2[0] = 2;
        assert_eq!(decode(&v2), None);
        assert_eq!(decode(&[]), None);
    }

    #[test]
    fn entries_are_named_by_address_and_only_land_on_a_backend_of_their_own_service() {
        let d = director();
        let t = Table::of(&d);
        let id = |svc: &str, ip: &str| d.services[svc].backends[&ip.parse::<IpAddr>().unwrap()].id;
        // Out: our id becomes (service port, address).
        let ev = CtSyncEvent {
            flow: flow("10.0.100.1", 80),
            backend: id("web", "10.0.0.12"),
            _pad: 0,
        };
        let w = t.outgoing(&ev).unwrap();
        assert_eq!((w.svc_port, w.backend), (80, a("10.0.0.12")));
        assert_eq!(t.incoming(&w).map(|(_, b)| b), Some(id("web", "10.0.0.12")));
        // Keyed by our id for the service.
        assert_eq!(
            t.incoming(&w).map(|(k, _)| k.svc as u32),
            Some(d.services["web"].info.id)
        );
        assert_eq!(
            t.outgoing(&CtSyncEvent {
                backend: 4000,
                ..ev
            }),
            None
        );
        // In: a backend of another service of the same VIP is refused...
        let other = WireEntry {
            backend: a("10.0.0.21"),
            ..w
        };
        assert_eq!(t.incoming(&other), None);
        // ...so is a service we do not have, a flow not addressed to the service, an
        // unknown backend.
        assert_eq!(t.incoming(&WireEntry { svc_port: 81, ..w }), None);
        let wrong_port = WireEntry {
            flow: flow("10.0.100.1", 443),
            ..w
        };
        assert_eq!(t.incoming(&wrong_port), None);
        assert_eq!(
            t.incoming(&WireEntry {
                backend: a("10.0.0.99"),
                ..w
            }),
            None
        );
        // A port-wildcard service takes its flows on any port.
        let any = WireEntry {
            flow: flow("10.0.100.2", 5555),
            svc_port: 0,
            backend: a("10.0.0.31"),
        };
        assert_eq!(
            t.incoming(&any).map(|(_, b)| b),
            Some(id("any", "10.0.0.31"))
        );
    }
}
