//! Client side: connections from chosen source addresses inside the client namespace.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use socket2::{Domain, Protocol, Socket, Type};

use crate::netns::{in_netns, spawn_in_netns, NetnsThread};

/// Connect and read timeouts of the client helpers.
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// Open a TCP connection from `src` (ephemeral port) to `dst`, `timeout` for the connect and
/// every later read and write. Must run inside the namespace that owns `src`.
fn connect_from(src: IpAddr, dst: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    let sock = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
    sock.bind(&SocketAddr::new(src, 0).into())
        .with_context(|| format!("bind {src}"))?;
    sock.connect_timeout(&dst.into(), timeout)
        .with_context(|| format!("connect {src} -> {dst}"))?;
    let stream: TcpStream = sock.into();
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

fn read_line(r: &mut impl BufRead, what: &str) -> Result<String> {
    let mut line = String::new();
    let n = r
        .read_line(&mut line)
        .with_context(|| format!("reading {what}"))?;
    if n == 0 || !line.ends_with('\n') {
        bail!("connection closed while reading {what} (got {line:?})");
    }
    line.pop();
    Ok(line)
}

/// Connect once and return the identity line the server sent.
fn identify(src: IpAddr, dst: SocketAddr, timeout: Duration) -> Result<String> {
    identify_flow(src, dst, timeout).map(|(_, id)| id)
}

/// Connect once: the connection's client address and the identity line the server sent.
fn identify_flow(src: IpAddr, dst: SocketAddr, timeout: Duration) -> Result<(SocketAddr, String)> {
    let stream = connect_from(src, dst, timeout)?;
    let local = stream.local_addr()?;
    let id = read_line(&mut BufReader::new(&stream), "identity")
        .with_context(|| format!("{local} -> {dst}"))?;
    Ok((local, id))
}

/// Like [`connect_many`], with each connection's client address (source IP and port) next
/// to the identity that answered: the flows a test can look up afterwards.
pub fn connect_flows(
    ns: &str,
    dst: SocketAddr,
    n: usize,
    sources: &[IpAddr],
) -> Result<Vec<(SocketAddr, String)>> {
    anyhow::ensure!(!sources.is_empty(), "no source address");
    let sources = sources.to_vec();
    in_netns(ns, move || {
        (0..n)
            .map(|i| identify_flow(sources[i % sources.len()], dst, TIMEOUT))
            .collect::<Result<Vec<_>>>()
    })?
}

/// One connection from `src` to `dst` in `ns`, `timeout` for connecting and for the
/// identity line; the identity.
pub fn try_identify(ns: &str, src: IpAddr, dst: SocketAddr, timeout: Duration) -> Result<String> {
    in_netns(ns, move || identify(src, dst, timeout))?
}

/// Open `n` connections one after the other from namespace `ns` to `vip:port`, connection `i`
/// bound to `sources[i % len]` and an ephemeral port; each reads the identity line (2 s timeout)
/// and closes. Returns one result per connection, in order.
pub fn connect_many(
    ns: &str,
    vip: IpAddr,
    port: u16,
    n: usize,
    sources: &[IpAddr],
) -> Vec<Result<String>> {
    if sources.is_empty() {
        return (0..n).map(|_| Err(anyhow!("no source address"))).collect();
    }
    let sources = sources.to_vec();
    let dst = SocketAddr::new(vip, port);
    match in_netns(ns, move || {
        (0..n)
            .map(|i| identify(sources[i % sources.len()], dst, TIMEOUT))
            .collect::<Vec<_>>()
    }) {
        Ok(v) => v,
        Err(e) => {
            let msg = format!("{e:#}");
            (0..n).map(|_| Err(anyhow!("{msg}"))).collect()
        }
    }
}

/// One attempt of a [`Traffic`] loop: when it ended (since the loop started) and the identity
/// that answered, or why none did.
#[derive(Clone, Debug)]
pub struct Attempt {
    pub at: Duration,
    pub result: std::result::Result<String, String>,
}

/// New connections, one after the other, on a thread of their own until [`Traffic::stop`]:
/// traffic that keeps flowing while a test changes something.
/// Dropping it without [`Traffic::stop`] still ends the loop.
pub struct Traffic {
    start: Instant,
    stop: Arc<AtomicBool>,
    thread: Option<NetnsThread<Vec<Attempt>>>,
}

impl Traffic {
    /// Connect from `ns` to `dst` from `sources` in turn, each connection given `timeout` for
    /// the connect and the identity line.
    pub fn start(
        ns: &str,
        sources: Vec<IpAddr>,
        dst: SocketAddr,
        timeout: Duration,
    ) -> Result<Traffic> {
        Self::paced(ns, sources, dst, timeout, Duration::ZERO, Instant::now())
    }

    /// [`Traffic::start`] at most one attempt per `gap` (a steady rate of new connections
    /// while attempts take less; a slow one delays the next, no burst catches up), its
    /// [`Attempt::at`] counted from `start` (several loops can share one clock).
    pub fn paced(
        ns: &str,
        sources: Vec<IpAddr>,
        dst: SocketAddr,
        timeout: Duration,
        gap: Duration,
        start: Instant,
    ) -> Result<Traffic> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = spawn_in_netns(ns, move || {
            let mut attempts = Vec::new();
            let mut next = Instant::now();
            for src in sources.iter().cycle() {
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                next = next.max(Instant::now()) + gap;
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                let result = identify(*src, dst, timeout).map_err(|e| format!("{e:#}"));
                attempts.push(Attempt {
                    at: start.elapsed(),
                    result,
                });
            }
            attempts
        })?;
        Ok(Traffic {
            start,
            stop,
            thread: Some(thread),
        })
    }

    /// Time since the traffic started (the clock of [`Attempt::at`]).
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Stop and return every attempt, in order.
    pub fn stop(mut self) -> Result<Vec<Attempt>> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().expect("running").join()
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// `n` connections as [`connect_many`] does, tallied by identity.
pub fn connect_tallied(
    ns: &str,
    vip: IpAddr,
    port: u16,
    n: usize,
    sources: &[IpAddr],
) -> (BTreeMap<String, usize>, Vec<String>) {
    crate::tally(&connect_many(ns, vip, port, n, sources))
}

/// Ping every connection; fails naming the first that broke (`when`: `on rejoin`, …).
pub fn ping_all(conns: &mut [LongConn], when: &str) -> Result<()> {
    for c in conns {
        c.ping()
            .with_context(|| format!("connection on {} broke {when}", c.identity()))?;
    }
    Ok(())
}

/// A connection kept open, to check that its flow keeps reaching the same backend.
pub struct LongConn {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    identity: String,
    local: SocketAddr,
    seq: u64,
}

impl LongConn {
    /// Connect from `src` (ephemeral port) inside `ns` to `vip:port` and read the identity.
    pub fn open(ns: &str, src: IpAddr, vip: IpAddr, port: u16) -> Result<LongConn> {
        let dst = SocketAddr::new(vip, port);
        let stream = in_netns(ns, move || connect_from(src, dst, TIMEOUT))??;
        let local = stream.local_addr()?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let identity =
            read_line(&mut reader, "identity").with_context(|| format!("{local} -> {dst}"))?;
        Ok(LongConn {
            stream,
            reader,
            identity,
            local,
            seq: 0,
        })
    }

    /// Backend identity read when the connection opened.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Client-side address of the connection.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Send a line and expect it echoed back (2 s timeout); returns the backend identity.
    pub fn ping(&mut self) -> Result<String> {
        self.seq += 1;
        let msg = format!("ping {} from {}", self.seq, self.local);
        (&self.stream)
            .write_all(format!("{msg}\n").as_bytes())
            .with_context(|| format!("sending on {}", self.local))?;
        let echo = read_line(&mut self.reader, "echo").with_context(|| {
            format!(
                "connection {} (backend {}) lost its echo",
                self.local, self.identity
            )
        })?;
        if echo != msg {
            bail!("{}: expected echo {msg:?}, got {echo:?}", self.local);
        }
        Ok(self.identity.clone())
    }
}
