//! Identity TCP server run inside a backend namespace: says who it is, then echoes lines.

use std::{
    io::{BufRead, BufReader, ErrorKind, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread,
    time::Duration,
};

use anyhow::{Context, Result};

use crate::netns::in_netns;

/// Open connections by serial number, so `stop()` can shut them all down.
type Conns = Arc<Mutex<Vec<(u64, TcpStream)>>>;

/// On accept, writes `"<id>\n"`, then echoes every line it receives until the peer closes.
/// [`IdentityServer::stop`] (or drop) closes the listener and every open connection.
pub struct IdentityServer {
    id: String,
    ns: String,
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    conns: Conns,
    acceptor: Option<thread::JoinHandle<()>>,
}

impl IdentityServer {
    /// Listen on `addr` inside namespace `ns`. `addr` may be the VIP, `0.0.0.0:port`, or
    /// `[::]:port` (dual-stack: also takes IPv4).
    pub fn start(ns: &str, addr: SocketAddr, id: &str) -> Result<IdentityServer> {
        let listener = in_netns(ns, move || -> Result<TcpListener> {
            let l = TcpListener::bind(addr)?;
            l.set_nonblocking(true)?;
            Ok(l)
        })?
        .with_context(|| format!("binding {addr} in {ns}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let acceptor = {
            let (stop, conns, id) = (stop.clone(), conns.clone(), id.to_string());
            thread::Builder::new()
                .name(format!("ident-{id}"))
                .spawn(move || accept_loop(listener, stop, conns, id))?
        };
        Ok(IdentityServer {
            id: id.into(),
            ns: ns.into(),
            addr,
            stop,
            conns,
            acceptor: Some(acceptor),
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn namespace(&self) -> &str {
        &self.ns
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Number of connections accepted and not yet closed.
    pub fn open_connections(&self) -> usize {
        self.conns.lock().unwrap().len()
    }

    /// Close the listener and all existing connections (idempotent).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.acceptor.take() {
            let _ = h.join(); // drops the listener
        }
        for (_, c) in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for IdentityServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(listener: TcpListener, stop: Arc<AtomicBool>, conns: Conns, id: String) {
    let mut serial = 0u64;
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _peer)) => {
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_nodelay(true);
                let Ok(clone) = stream.try_clone() else {
                    continue;
                };
                {
                    let mut list = conns.lock().unwrap();
                    // Re-check under the lock: stop() drains after setting the flag.
                    if stop.load(Ordering::SeqCst) {
                        let _ = stream.shutdown(Shutdown::Both);
                        break;
                    }
                    serial += 1;
                    list.push((serial, clone));
                }
                let (conns, id) = (conns.clone(), id.clone());
                let _ = thread::Builder::new()
                    .name(format!("ident-{id}-conn"))
                    .spawn(move || serve(stream, conns, &id, serial));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(2));
            }
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn serve(stream: TcpStream, conns: Conns, id: &str, serial: u64) {
    let _ = echo(&stream, id);
    let _ = stream.shutdown(Shutdown::Both);
    conns.lock().unwrap().retain(|(n, _)| *n != serial);
}

fn echo(stream: &TcpStream, id: &str) -> std::io::Result<()> {
    let mut w = stream;
    w.write_all(format!("{id}\n").as_bytes())?;
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        w.write_all(line.as_bytes())?;
    }
}

/// A helper thread (a health endpoint, a responder) that runs until dropped: its body polls
/// the flag it is given and returns once it is set.
pub struct Background {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Background {
    pub fn spawn(body: impl FnOnce(&AtomicBool) + Send + 'static) -> Background {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || body(&flag));
        Background {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Start an identity server on `[::]:port` (dual-stack) in every backend namespace of `rig`,
/// named `b1`, `b2`, … like the namespaces.
pub fn start_on_backends(rig: &crate::Rig, port: u16) -> Result<Vec<IdentityServer>> {
    (0..rig.backend_count())
        .map(|i| start_on_backend(rig, i, port))
        .collect()
}

/// Start backend `i`'s identity server (`b{i+1}` on `[::]:port`).
pub fn start_on_backend(rig: &crate::Rig, i: usize, port: u16) -> Result<IdentityServer> {
    let any = SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), port);
    IdentityServer::start(&rig.ns_backend(i), any, &backend_id(i))
}

/// Identity of backend `i` as served by [`start_on_backends`]: `b1` for backend 0.
pub fn backend_id(i: usize) -> String {
    format!("b{}", i + 1)
}
