//! Self-tests of the namespace rig, independent of farmlb. Run as root, serially.
//!
//! If these fail, the end-to-end director tests cannot mean anything.

use std::{net::IpAddr, time::Instant};

use anyhow::{ensure, Result};
use lb_tests::{
    connect_many, netns, start_on_backend, start_on_backends, tally, LongConn, Rig, RigOpts, VIP_V4,
};

#[test]
fn subnet_connectivity_from_every_source() -> Result<()> {
    let rig = Rig::up(RigOpts::new("rgnet", 3))?;
    let _servers = start_on_backends(&rig, 80)?;
    for i in 0..rig.backend_count() {
        for (family, sources, dst) in [
            ("v4", rig.client_sources_v4(), IpAddr::V4(rig.backend_v4(i))),
            ("v6", rig.client_sources_v6(), IpAddr::V6(rig.backend_v6(i))),
        ] {
            let n = sources.len();
            let res = connect_many(&rig.ns_client(), dst, 80, n, &sources);
            let (counts, failures) = tally(&res);
            println!("{family} -> {dst}: {counts:?}, {} failed", failures.len());
            ensure!(failures.is_empty(), "{family} to {dst}: {failures:?}");
            ensure!(
                counts.get(&format!("b{}", i + 1)) == Some(&n),
                "{dst} answered as {counts:?}"
            );
        }
    }
    // The director is reachable on both families.
    rig.exec(&rig.ns_client(), &["ping", "-c1", "-W2", "10.99.0.3"])?;
    rig.exec(&rig.ns_client(), &["ping", "-c1", "-W2", "fd99::3"])?;
    Ok(())
}

#[test]
fn vip_is_not_answered_without_a_director_program() -> Result<()> {
    let rig = Rig::up(RigOpts::new("rgnovip", 1))?;
    let _servers = start_on_backends(&rig, 80)?;
    let t = Instant::now();
    let res = connect_many(
        &rig.ns_client(),
        VIP_V4.into(),
        80,
        1,
        &rig.client_sources_v4(),
    );
    match &res[0] {
        Ok(id) => println!("VIP without XDP answered as {id}"),
        Err(e) => println!("VIP without XDP: {e:#} after {:?}", t.elapsed()),
    }
    ensure!(
        res[0].is_err(),
        "the VIP answered with no XDP program: backends must not answer ARP for it, and the \
         director must not route it"
    );
    Ok(())
}

#[test]
fn add_backend_then_teardown() -> Result<()> {
    let mut rig = Rig::up(RigOpts::new("rgadd", 2))?;
    let i = rig.add_backend()?;
    ensure!(i == 2 && rig.backend_count() == 3);
    ensure!(rig.ns_backend(i) == "rgadd-b3");
    let _server = start_on_backend(&rig, i, 8080)?;
    let res = connect_many(
        &rig.ns_client(),
        IpAddr::V4(rig.backend_v4(i)),
        8080,
        3,
        &rig.client_sources_v4(),
    );
    let (counts, failures) = tally(&res);
    ensure!(
        failures.is_empty() && counts.get("b3") == Some(&3),
        "{res:?}"
    );

    // A stopped server closes its open connections too.
    let mut server = start_on_backend(&rig, 0, 9000)?;
    let mut conn = LongConn::open(
        &rig.ns_client(),
        IpAddr::V4(rig.client_v4()),
        IpAddr::V4(rig.backend_v4(0)),
        9000,
    )?;
    ensure!(conn.ping()? == "b1");
    server.stop();
    ensure!(conn.ping().is_err(), "connection survived stop()");
    let again = connect_many(
        &rig.ns_client(),
        IpAddr::V4(rig.backend_v4(0)),
        9000,
        1,
        &rig.client_sources_v4(),
    );
    ensure!(again[0].is_err(), "listener survived stop()");

    rig.down()?;
    let left: Vec<String> = netns::list()?
        .into_iter()
        .filter(|n| n.starts_with("rgadd-"))
        .collect();
    ensure!(left.is_empty(), "namespaces left: {left:?}");
    rig.down()?; // idempotent
    Ok(())
}
