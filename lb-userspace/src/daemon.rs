//! `farmlb run`: load, program, attach, then serve signals until told to stop.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, SignalKind};

use crate::config::Config;
use crate::dataplane::{Dataplane, LoadOpts};
use crate::director::Director;
use crate::neigh::{iface_mac, NeighResolver};

/// How often backends whose MAC is still unknown are retried.
const RESOLVE_RETRY: Duration = Duration::from_secs(2);

pub async fn run(config_path: &Path) -> Result<()> {
    let cfg = Config::load(config_path)?;
    let own_mac = iface_mac(&cfg.interface)?;
    let mut dp = Dataplane::load(LoadOpts {
        ring_slots: Director::ring_slots_for(&cfg),
        conntrack_size: cfg.conntrack_size,
    })?;
    let mut director = Director::new(dp.ring_slots(), own_mac);
    let mut macs = NeighResolver::new(&cfg.interface);
    // Program every map before attaching, so the first packet already sees the full config.
    director.apply(&cfg, &mut dp, &mut macs)?;
    dp.attach(&cfg.interface, cfg.xdp_mode.into())?;
    tracing::info!(
        interface = %cfg.interface,
        services = cfg.services.len(),
        "XDP program attached"
    );

    let mut cfg = cfg;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut retry = tokio::time::interval(RESOLVE_RETRY);
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = sighup.recv() => match reload(config_path, &cfg, &mut director, &mut dp, &mut macs) {
                Ok(new) => {
                    tracing::info!(services = new.services.len(), "configuration reloaded");
                    cfg = new;
                }
                Err(e) => tracing::error!("reload rejected, keeping the running configuration: {e:#}"),
            },
            _ = retry.tick() => {
                if director.unresolved() > 0 {
                    director.apply(&cfg, &mut dp, &mut macs)?;
                }
            }
        }
    }
    dp.detach().context("detaching XDP program")?;
    tracing::info!("detached, exiting");
    Ok(())
}

fn reload(
    path: &Path,
    running: &Config,
    director: &mut Director,
    dp: &mut Dataplane,
    macs: &mut NeighResolver,
) -> Result<Config> {
    let new = Config::load(path)?;
    if new.interface != running.interface
        || new.xdp_mode != running.xdp_mode
        || new.conntrack_size != running.conntrack_size
    {
        anyhow::bail!("interface, xdp_mode and conntrack_size need a restart to change");
    }
    // Rehearse on a copy against the model first, so a change that cannot be applied
    // (e.g. the ring is full) is rejected before anything reaches the kernel.
    let mut trial = director.clone();
    let mut model = crate::model::Model::default();
    let mut fixed: std::collections::HashMap<std::net::IpAddr, [u8; 6]> = Default::default();
    for s in &new.services {
        for b in &s.backends {
            fixed.insert(b.address, [0; 6]);
        }
    }
    trial.apply(&new, &mut model, &mut fixed)?;
    director.apply(&new, dp, macs)?;
    Ok(new)
}
