//! `farmlb run`: the one daemon, whatever the node's roles. It loads the program, programs
//! the maps, attaches, then serves until told to stop.
//!
//! One owner loop ([`owner::Owner`]) holds the data plane (the typed map handles), the
//! director and the running configuration, and applies every change in turn: API requests,
//! health-check results, `SIGHUP` reloads, metrics snapshots, membership views and
//! neighbour-resolution retries all arrive on channels. Roles are components of that loop:
//! every node directs its `dr` services (health-checked by the same supervisor); a node with
//! `[farm]` also runs the farm role (membership, ARP/ND, its own check, hooks). Every node
//! serves the same API socket and `/metrics`, and follows the same reload rules. The API
//! server, the metrics server and the probe tasks run on the runtime's worker threads.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot};

use crate::api::{self, StatusView};
use crate::config::Config;
use crate::dataplane::conntrack::Count;
use crate::dataplane::{Dataplane, LoadOpts};
use crate::director::Director;
use crate::farm::FarmRole;
use crate::health::{ProbeResult, Supervisor};
use crate::metrics::{self, LiveMetrics};
use crate::neigh::{iface_mac, Neighbours, Resolved, RESOLVE_TIMEOUT};

mod notify;
mod owner;
mod state;
mod status;

use owner::Owner;
pub use owner::ReloadError;

/// How often backends whose MAC is still unknown are retried.
const RESOLVE_RETRY: Duration = Duration::from_secs(2);
/// How often the leader re-announces the VIPs, for switches that forget.
const GARP_EVERY: Duration = Duration::from_secs(30);

/// Bounds of the owner loop's queues: a flood of requests waits (or is refused by its
/// server), it never grows memory.
const API_QUEUE: usize = 64;
const PROBE_QUEUE: usize = 4096;
const SNAPSHOT_QUEUE: usize = 16;

pub async fn run(config_path: &Path, replace: bool) -> Result<()> {
    let file_cfg = Config::load(config_path)?;
    // What `check-config` says about this host; a key file that cannot be a key stops here,
    // before anything touches the system.
    for w in crate::config::host::check(&file_cfg).map_err(anyhow::Error::msg)? {
        tracing::warn!("{}: {w}", config_path.display());
    }
    raise_nofile_limit();
    if replace {
        replace_running(&file_cfg.api_socket).await?;
    }
    // API edits and runtime overrides of the previous daemon, if any.
    let state_path = file_cfg.state_file.clone();
    let mut saved = state::RuntimeState::load(&state_path);
    let cfg = owner::replay(file_cfg, &mut saved.edits);
    let own_mac = iface_mac(&cfg.interface)?;
    warn_about_veth(&cfg);
    let pin_dir = cfg.pin_path.clone();
    let mut dp = Dataplane::load(LoadOpts {
        ring_slots: Director::ring_slots_for(&cfg),
        conntrack_size: cfg.conntrack_size,
        pin_dir: Some(pin_dir.clone()),
        own_mac,
    })?;
    let mut director = Director::new(dp.ring_slots(), own_mac);
    // Tunnel services may arrive by reload too: always know the interface's MTU and
    // addresses (a failure leaves tunnels without sources, shown per backend in status).
    director.tunnel = crate::tunnel::TunnelHost::discover(&cfg.interface).unwrap_or_else(|e| {
        tracing::warn!("tunnel forwarding: {e:#}");
        Default::default()
    });
    if dp.adopted() {
        // A data plane is running (the previous daemon died, stopped or is being upgraded):
        // take over its ids and tables, so established flows keep their backends.
        let snap = dp.snapshot()?;
        director.adopt(&cfg, &snap, &mut dp)?;
        tracing::info!(
            pin_path = %pin_dir.display(),
            services = director.services.len(),
            backends = director.services.values().map(|s| s.backends.len()).sum::<usize>(),
            "adopted the running data plane"
        );
    }
    let (mut macs, mut resolved_rx) = Neighbours::start(&cfg.interface);
    // Give the backends' MACs one resolution timeout (all in parallel) before the first
    // apply, so the first packet already sees the full config; later ones join as they
    // resolve.
    macs.prefetch(cfg.services.iter().flat_map(|s| {
        let routed = s.forwarding.is_tunnel();
        s.backends.iter().map(move |b| (b.address, routed))
    }));
    let deadline = tokio::time::Instant::now() + RESOLVE_TIMEOUT + Duration::from_millis(200);
    while macs.pending() > 0 {
        match tokio::time::timeout_at(deadline, resolved_rx.recv()).await {
            Ok(Some(r)) => {
                macs.learned(r);
            }
            _ => break,
        }
    }
    director.apply(&cfg, &mut dp, &mut macs)?;

    let (node_probe_tx, node_probe_rx) = mpsc::channel::<ProbeResult>(64);
    let (farm, view_rx) = match cfg.farm {
        Some(_) => {
            let (role, rx) = FarmRole::start(&cfg, own_mac, node_probe_tx).await?;
            director.set_members(&role.members(), &mut dp)?;
            (Some(role), Some(rx))
        }
        None => (None, None),
    };

    let (api_tx, api_rx) = mpsc::channel::<api::Call>(API_QUEUE);
    let (probe_tx, probe_rx) = mpsc::channel::<ProbeResult>(PROBE_QUEUE);
    let (snap_tx, snap_rx) = mpsc::channel::<oneshot::Sender<StatusView>>(SNAPSHOT_QUEUE);
    let listener = api::bind(&cfg.api_socket)?;
    let api_task = tokio::spawn(api::serve(listener, api_tx));
    let live = LiveMetrics::default();
    let metrics_task = match cfg.metrics_address {
        Some(addr) => {
            let l = metrics::bind(addr).await?;
            tracing::info!(%addr, "serving Prometheus metrics on /metrics");
            Some(tokio::spawn(metrics::serve(l, snap_tx, live.clone())))
        }
        None => None,
    };

    let mut owner = Owner {
        path: config_path.to_path_buf(),
        cfg,
        dp,
        director,
        macs,
        supervisor: Supervisor::new(probe_tx),
        live,
        farm,
        announce: None,
        sync: None,
        conntrack: None,
        reload: api::ReloadView::started(),
        state: state::RuntimeState {
            edits: std::mem::take(&mut saved.edits),
            ..Default::default()
        },
        state_path,
    };
    owner.restore_overrides(&saved.overrides);
    owner.persist();
    owner.sync_checks();
    owner.renew_lease();
    let (count_tx, count_rx) = mpsc::channel::<Count>(1);
    let count_task = tokio::spawn(count_conntrack(pin_dir.clone(), count_tx));
    let attached = owner
        .dp
        .attach(&owner.cfg.interface, owner.cfg.xdp_mode.into());
    let res = match attached {
        Ok(()) => {
            tracing::info!(
                interface = %owner.cfg.interface,
                services = owner.cfg.services.len(),
                checks = owner.supervisor.len(),
                farm_node = owner.farm.as_ref().map(|f| f.node_id()),
                members = owner.director.members().len(),
                share = owner.director.share(),
                api = %owner.cfg.api_socket.display(),
                "XDP program attached"
            );
            owner.started();
            // Announce only once the program forwards: a router must never send flows to a
            // director that cannot serve them yet.
            let initial = owner.wanted_vips();
            owner.announce = (owner.cfg.announce.as_ref())
                .map(|a| crate::announce::Announcer::start(a, &owner.cfg.interface, initial));
            start_sync(&mut owner);
            owner.announce();
            notify::ready();
            let mut inbox = Inbox {
                api: api_rx,
                probe: probe_rx,
                node_probe: node_probe_rx,
                snapshot: snap_rx,
                view: view_rx,
                resolved: resolved_rx,
                count: count_rx,
            };
            serve(&mut owner, &mut inbox).await
        }
        Err(e) => Err(e),
    };

    // Every way out, error or signal, leaves the same way: stop serving, leave the farm (its
    // peers take our share at once), run `on_stop`; then detach if `farmlb stop --detach`
    // asked for it, else leave the pinned data plane forwarding for the next daemon.
    notify::stopping();
    // Withdraw first, so the routers move the flows away while this node still forwards.
    if let Some(a) = &mut owner.announce {
        a.withdraw_all(Duration::from_secs(3)).await;
    }
    owner.supervisor.shutdown();
    count_task.abort();
    api_task.abort();
    if let Some(t) = metrics_task {
        t.abort();
    }
    if let Some(f) = owner.farm.take() {
        // Leaving: the others take our share at once, so take no new flows from now on
        // (live connections stay, through their sockets).
        if let Err(e) = owner.director.set_lease(0, &mut owner.dp) {
            tracing::warn!("ending the farm lease: {e:#}");
        }
        f.stop(&owner.director).await;
    }
    // The socket goes last: `farmlb stop` waits for it to know the daemon is gone.
    let _socket = RemoveOnDrop(owner.cfg.api_socket.clone());
    match res {
        Ok(Exit { detach: true }) => {
            owner.dp.detach().context("detaching XDP program")?;
            tracing::info!("detached and unpinned, exiting");
            Ok(())
        }
        Ok(Exit { detach: false }) => {
            tracing::info!(
                pin_path = %pin_dir.display(),
                "exiting; the data plane keeps forwarding with the last tables \
                 (`farmlb stop --detach` removes it)"
            );
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// `[announce] sync`: read the program's new conntrack entries and exchange them with the
/// farm's peers. A failure to start is logged, never fatal: without sync a moved flow falls
/// back to the ring.
fn start_sync(owner: &mut Owner) {
    let Some(a) = owner.cfg.announce.as_ref().filter(|a| a.sync) else {
        return;
    };
    let rate = a.sync_rate;
    let Some(ch) = owner.farm.as_mut().and_then(|f| f.take_sync()) else {
        tracing::error!("conntrack sync: no farm membership to send on");
        return;
    };
    let started = owner.dp.take_sync_ring().and_then(|ring| {
        let table = crate::sync::Table::of(&owner.director);
        crate::sync::Sync::start(ring, &owner.cfg.pin_path, rate, ch, table)
    });
    match started {
        Ok(s) => {
            tracing::info!(rate, "conntrack sync with the farm's peers started");
            owner.sync = Some(s);
        }
        Err(e) => tracing::error!("conntrack sync not started: {e:#}"),
    }
}

/// A veth behaves unlike a NIC in ways that silently lose traffic; say so at start.
fn warn_about_veth(cfg: &Config) {
    let out = std::process::Command::new("ip")
        .args(["-d", "-j", "link", "show", "dev", &cfg.interface])
        .output();
    let Ok(out) = out else { return };
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    if info[0]["linkinfo"]["info_kind"] != "veth" {
        return;
    }
    use crate::config::{Forwarding, XdpModeCfg};
    if cfg.services.iter().any(|s| s.forwarding == Forwarding::Dr) {
        tracing::warn!(
            interface = %cfg.interface,
            "this is a veth: frames sent back out with XDP_TX reach the peer only if the peer \
             runs an XDP program too (any, e.g. one that passes everything), and clients on \
             veths need tx checksum offload off (`ethtool -K IF tx off`), or the backends \
             drop the forwarded TCP segments"
        );
    }
    let farm = cfg
        .services
        .iter()
        .any(|s| s.forwarding == Forwarding::Farm);
    if farm && cfg.xdp_mode != XdpModeCfg::Generic {
        tracing::warn!(
            interface = %cfg.interface,
            "this is a veth: in native mode it drops frames addressed to the farm's virtual \
             MAC before XDP runs; farm nodes on veths need xdp_mode = \"generic\""
        );
    }
}

/// How often the conntrack table is counted (a walk of every entry).
const CONNTRACK_COUNT_EVERY: Duration = Duration::from_secs(30);

/// Count the pinned conntrack table (entries, flows per backend) now and every
/// [`CONNTRACK_COUNT_EVERY`], on a blocking thread, and send the counts to the owner loop.
async fn count_conntrack(pin_dir: std::path::PathBuf, tx: mpsc::Sender<Count>) {
    let mut tick = tokio::time::interval(CONNTRACK_COUNT_EVERY);
    loop {
        tick.tick().await;
        let dir = pin_dir.clone();
        match tokio::task::spawn_blocking(move || crate::dataplane::conntrack::count(&dir)).await {
            Ok(Ok(n)) => {
                let _ = tx.try_send(n);
            }
            Ok(Err(e)) => tracing::warn!("counting conntrack entries: {e:#}"),
            Err(e) => tracing::warn!("counting conntrack entries: {e}"),
        }
    }
}

/// `--replace`: ask the daemon serving `socket` to exit (its data plane stays) and wait until
/// it is gone, so this one adopts the data plane next.
async fn replace_running(socket: &Path) -> Result<()> {
    if !socket.exists() {
        return Ok(());
    }
    let c = crate::cli::Client::new(socket);
    let body = serde_json::json!({ "detach": false });
    if let Err(e) = c.call("POST", "/v1/stop", Some(&body)).await {
        tracing::warn!(
            "--replace: no daemon answered on {}: {e:#}",
            socket.display()
        );
        return Ok(());
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while socket.exists() {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "--replace: the running daemon did not exit within 15 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tracing::info!("--replace: the running daemon exited; taking over its data plane");
    Ok(())
}

/// Raise the soft RLIMIT_NOFILE to the hard limit: the default 1024 is what a flood of
/// connections would exhaust first (the servers are capped too, see `crate::http`).
fn raise_nofile_limit() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer / in-pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            let want = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            libc::setrlimit(libc::RLIMIT_NOFILE, &want);
        }
    }
}

struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Everything the owner loop receives, one channel per source.
struct Inbox {
    api: mpsc::Receiver<api::Call>,
    probe: mpsc::Receiver<ProbeResult>,
    node_probe: mpsc::Receiver<ProbeResult>,
    snapshot: mpsc::Receiver<oneshot::Sender<StatusView>>,
    view: Option<tokio::sync::watch::Receiver<crate::farm::membership::View>>,
    resolved: mpsc::Receiver<Resolved>,
    count: mpsc::Receiver<Count>,
}

/// How the owner loop ended.
pub struct Exit {
    /// Remove the data plane too (`farmlb stop --detach`).
    pub detach: bool,
}

/// The owner loop, until SIGINT, SIGTERM or `farmlb stop`. A failing change is logged and the
/// loop goes on: the data plane keeps the last tables that were written.
async fn serve(owner: &mut Owner, inbox: &mut Inbox) -> Result<Exit> {
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut retry = tokio::time::interval(RESOLVE_RETRY);
    let mut garp = tokio::time::interval(GARP_EVERY);
    let renew = owner
        .farm
        .as_ref()
        .map_or(Duration::from_secs(3600), |f| f.lease() / 4);
    let mut lease = tokio::time::interval(renew);
    loop {
        tokio::select! {
            _ = sigint.recv() => return Ok(Exit { detach: false }),
            _ = sigterm.recv() => return Ok(Exit { detach: false }),
            _ = sighup.recv() => match owner.reload() {
                Ok(summary) => tracing::info!("SIGHUP: {summary}"),
                Err(e) => tracing::error!("SIGHUP: {}: {e}", owner::REJECTED),
            },
            Some((req, reply)) = inbox.api.recv() => {
                match req {
                    api::ApiRequest::Stop { detach } => {
                        let _ = reply.send(Ok((
                            axum::http::StatusCode::OK,
                            serde_json::json!({ "stopping": true, "detach": detach }),
                        )));
                        return Ok(Exit { detach });
                    }
                    // Listing conntrack walks the whole table: off the owner loop.
                    api::ApiRequest::Conns { service, limit } => {
                        let dir = owner.cfg.pin_path.clone();
                        match crate::conns::Job::new(&owner.director, dir, service.as_deref(), limit) {
                            Ok(job) => {
                                tokio::task::spawn_blocking(move || {
                                    let _ = reply.send(job.run().map(|v| {
                                        let v = serde_json::to_value(v).unwrap_or_default();
                                        (axum::http::StatusCode::OK, v)
                                    }));
                                });
                            }
                            Err(e) => {
                                let _ = reply.send(Err(e));
                            }
                        }
                    }
                    req => {
                        let _ = reply.send(owner.handle(req));
                    }
                }
            }
            Some(p) = inbox.probe.recv() => owner.on_probe(p),
            Some(p) = inbox.node_probe.recv() => owner.on_node_probe(&p),
            Some(otx) = inbox.snapshot.recv() => {
                let _ = otx.send(owner.status());
            }
            changed = async {
                match inbox.view.as_mut() {
                    Some(rx) => rx.changed().await,
                    None => std::future::pending().await,
                }
            } => {
                let Some(rx) = inbox.view.as_mut().filter(|_| changed.is_ok()) else {
                    anyhow::bail!("the membership task stopped");
                };
                let view = rx.borrow_and_update().clone();
                owner.on_view(view);
            }
            Some(r) = inbox.resolved.recv() => owner.on_resolved(r),
            Some(n) = inbox.count.recv() => owner.conntrack = Some(n),
            _ = lease.tick() => owner.renew_lease(),
            _ = retry.tick() => owner.tick(),
            _ = garp.tick() => {
                if let Some(f) = &owner.farm {
                    f.gratuitous();
                }
            }
        }
        // Whatever changed (health, reload, API, membership, node check), the announced
        // set follows; cheap when nothing did.
        owner.announce();
    }
}
