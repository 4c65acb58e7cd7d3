//! End-to-end: farmlb in the director namespace, real TCP connections from the client namespace
//! through the VIP to identity servers on the backends. Run as root, one test at a time
//! (`cargo xtask test` does both). Each test builds its own rig under its own prefix.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use anyhow::{ensure, Context, Result};
use lb_tests::{
    connect_many, farmlb_config, format_distribution, start_on_backend, tally, DirectorRig,
    HashMode, LongConn, Rig, Service, VIP_V4, VIP_V6,
};

const PORT: u16 = 80;

/// A rig with identity servers on every backend and farmlb running one service over all of them.
type Setup = DirectorRig;

fn backend_addrs(rig: &Rig, v6: bool) -> Vec<IpAddr> {
    (0..rig.backend_count())
        .map(|i| {
            if v6 {
                IpAddr::V6(rig.backend_v6(i))
            } else {
                IpAddr::V4(rig.backend_v4(i))
            }
        })
        .collect()
}

fn service(rig: &Rig, v6: bool, hash: HashMode) -> Service {
    let vip = if v6 {
        IpAddr::V6(VIP_V6)
    } else {
        IpAddr::V4(VIP_V4)
    };
    Service {
        hash,
        ..Service::tcp("web", vip, PORT)
    }
    .backends(backend_addrs(rig, v6))
}

fn setup(prefix: &str, v6: bool, hash: HashMode) -> Result<Setup> {
    DirectorRig::up(prefix, 3, PORT, |rig| {
        farmlb_config(rig, &[service(rig, v6, hash)])
    })
}

/// Stop farmlb (must exit cleanly and detach), then the servers, then the rig.
fn finish(s: Setup) -> Result<()> {
    s.finish(|rig| {
        let attached = lb_tests::xdp_attached(rig)?;
        ensure!(!attached, "XDP program still attached after farmlb exited");
        Ok(())
    })
}

/// Assert every backend got within `tol` (fraction) of an equal share of `total`.
fn check_balance(counts: &BTreeMap<String, usize>, backends: usize, tol: f64) -> Result<()> {
    let total: usize = counts.values().sum();
    let fair = total as f64 / backends as f64;
    ensure!(
        counts.len() == backends,
        "{} of {backends} backends received connections: {counts:?}",
        counts.len()
    );
    for (id, &n) in counts {
        let dev = (n as f64 - fair) / fair;
        ensure!(
            dev.abs() <= tol,
            "backend {id} got {n} of {total} connections ({:+.1}% from an equal share of \
             {fair:.1}; allowed ±{:.0}%)",
            dev * 100.0,
            tol * 100.0
        );
    }
    Ok(())
}

fn balance_test(prefix: &str, v6: bool, n: usize, tol: f64) -> Result<()> {
    let s = setup(prefix, v6, HashMode::FiveTuple)?;
    let vip = if v6 {
        IpAddr::V6(VIP_V6)
    } else {
        IpAddr::V4(VIP_V4)
    };
    let counts = s.connect_to_ok(vip, PORT, n, &format!("to {vip}:{PORT} (5-tuple hash)"))?;
    check_balance(&counts, 3, tol)?;
    finish(s)
}

#[test]
fn balances_300_connections() -> Result<()> {
    // 330 = 10 connections from each of the 33 client addresses, each from a fresh port.
    balance_test("e2ebal", false, 330, 0.25)
}

#[test]
fn ipv6_vip_balances() -> Result<()> {
    // 165 = 5 per source address: with fewer, an honest hash still strays past ±35% on
    // about one run in 25 (binomial spread); at 165 it is about one in 250.
    balance_test("e2ev6", true, 165, 0.35)
}

#[test]
fn src_ip_mode_sticks() -> Result<()> {
    let s = setup("e2esrc", false, HashMode::SrcIp)?;
    let sources = s.rig.client_sources_v4();
    ensure!(sources.len() >= 16);
    let per_source = 5;
    let mut placement: BTreeMap<IpAddr, BTreeSet<String>> = BTreeMap::new();
    for &src in &sources {
        let results = connect_many(
            &s.rig.ns_client(),
            IpAddr::V4(VIP_V4),
            PORT,
            per_source,
            &[src],
        );
        let (counts, failures) = tally(&results);
        ensure!(
            failures.is_empty(),
            "from {src}: {} of {per_source} failed, first: {}",
            failures.len(),
            failures[0]
        );
        placement.insert(src, counts.into_keys().collect());
    }
    let mut per_backend: BTreeMap<String, usize> = BTreeMap::new();
    for ids in placement.values() {
        for id in ids {
            *per_backend.entry(id.clone()).or_default() += 1;
        }
    }
    println!(
        "src-ip hash: {} sources × {per_source} connections; sources per backend:\n{}",
        sources.len(),
        format_distribution(&per_backend)
    );
    let split: Vec<_> = placement.iter().filter(|(_, ids)| ids.len() != 1).collect();
    ensure!(
        split.is_empty(),
        "sources whose connections landed on several backends: {split:?}"
    );
    ensure!(
        per_backend.len() >= 2,
        "all {} sources landed on one backend: {per_backend:?}",
        sources.len()
    );
    finish(s)
}

#[test]
fn long_lived_connection_survives_backend_add() -> Result<()> {
    let mut s = setup("e2elong", false, HashMode::FiveTuple)?;
    let sources = s.rig.client_sources_v4();
    let mut conns = Vec::new();
    for i in 0..20 {
        let mut c = LongConn::open(
            &s.rig.ns_client(),
            sources[i % sources.len()],
            IpAddr::V4(VIP_V4),
            PORT,
        )
        .with_context(|| format!("opening long connection {i}"))?;
        c.ping()?;
        conns.push(c);
    }
    let before: Vec<String> = conns.iter().map(|c| c.identity().to_string()).collect();
    let mut spread: BTreeMap<String, usize> = BTreeMap::new();
    for id in &before {
        *spread.entry(id.clone()).or_default() += 1;
    }
    println!(
        "20 long-lived connections before the change:\n{}",
        format_distribution(&spread)
    );

    // Add b4 to the rig and to the running daemon's configuration.
    let b4 = s.rig.add_backend()?;
    s.servers.push(start_on_backend(&s.rig, b4, PORT)?);
    let config = farmlb_config(&s.rig, &[service(&s.rig, false, HashMode::FiveTuple)]);
    ensure!(config.contains(&s.rig.backend_v4(b4).to_string()));
    s.daemon.reload(&config)?;

    for (i, c) in conns.iter_mut().enumerate() {
        let id = c.ping().with_context(|| {
            format!(
                "long connection {i} ({}, was on {}) after adding b4",
                c.local_addr(),
                before[i]
            )
        })?;
        ensure!(
            id == before[i],
            "connection {i} moved from {} to {id}",
            before[i]
        );
    }

    // The reload really happened: new connections reach b4 too.
    let results = connect_many(&s.rig.ns_client(), IpAddr::V4(VIP_V4), PORT, 200, &sources);
    let (counts, failures) = tally(&results);
    println!(
        "200 new connections after adding b4:\n{}  failed {}",
        format_distribution(&counts),
        failures.len()
    );
    ensure!(
        failures.is_empty(),
        "new connections failed: {}",
        failures[0]
    );
    ensure!(
        counts.get("b4").copied().unwrap_or(0) > 0,
        "no new connection reached b4: {counts:?}"
    );

    // And the old connections are still served by their original backends.
    for (i, c) in conns.iter_mut().enumerate() {
        ensure!(c.ping()? == before[i]);
    }
    drop(conns);
    finish(s)
}
