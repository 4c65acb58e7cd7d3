//! Rig, demo (and benchmarks): the commands that link farmlb and the namespace rig.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::{bail, Result};
use lb_tests::{
    connect_many, farmlb_config, format_distribution, tally, write_config, Daemon, IdentityServer,
    Rig, RigOpts, Service, VIP_V4,
};

use crate::{cargo, run, RigAction};

pub fn rig(action: RigAction) -> Result<()> {
    match action {
        RigAction::Up { prefix, backends } => {
            let rig = Rig::up(RigOpts::new(&prefix, backends))?;
            println!("rig {prefix} is up:");
            println!(
                "  client   {}  (eth0: {} + 10.99.0.100-131, {})",
                rig.ns_client(),
                rig.client_v4(),
                rig.client_v6()
            );
            println!(
                "  director {}  (eth0: {}, {})",
                rig.ns_lb(),
                rig.lb_v4(),
                rig.lb_v6()
            );
            for i in 0..rig.backend_count() {
                println!(
                    "  backend  {}  (eth0: {}, {}; VIPs on lo)",
                    rig.ns_backend(i),
                    rig.backend_v4(i),
                    rig.backend_v6(i)
                );
            }
            println!("  switch   {}  (br0)", rig.ns_switch());
            println!(
                "  VIPs {} and {} routed via the director",
                VIP_V4,
                lb_tests::VIP_V6
            );
            rig.keep();
        }
        RigAction::Down { prefix } => {
            lb_tests::rig::teardown(&prefix)?;
            println!("rig {prefix} is down");
        }
    }
    Ok(())
}

pub fn demo(connections: usize, prefix: &str) -> Result<()> {
    run(cargo().args(["build", "-p", "lb-userspace"]))?;
    let mut rig = Rig::up(RigOpts::new(prefix, 3))?;
    let port = 80;
    let mut servers = Vec::new();
    for i in 0..rig.backend_count() {
        let any = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port);
        servers.push(IdentityServer::start(
            &rig.ns_backend(i),
            any,
            &format!("b{}", i + 1),
        )?);
    }
    let backends = (0..rig.backend_count()).map(|i| IpAddr::V4(rig.backend_v4(i)));
    let config = farmlb_config(
        &rig,
        &[Service::tcp("web", IpAddr::V4(VIP_V4), port).backends(backends)],
    );
    let path = write_config(&rig, &config)?;
    println!("config ({}):\n{config}", path.display());
    let mut daemon = Daemon::start(&rig, &path)?;
    let link = rig.exec(&rig.ns_lb(), &["ip", "link", "show", rig.lb_iface()])?;
    let mode = if link.contains("xdpgeneric") {
        "generic"
    } else {
        "native"
    };
    println!(
        "farmlb attached to {} in {} ({mode} XDP; log: {})",
        rig.lb_iface(),
        rig.ns_lb(),
        daemon.log_path().display()
    );

    let sources = rig.client_sources_v4();
    let results = connect_many(
        &rig.ns_client(),
        IpAddr::V4(VIP_V4),
        port,
        connections,
        &sources,
    );
    let (counts, failures) = tally(&results);
    println!(
        "{} connections from {} source addresses to {VIP_V4}:{port}:",
        connections,
        sources.len()
    );
    print!("{}", format_distribution(&counts));
    println!("  failed {:>5}", failures.len());
    for f in failures.iter().take(5) {
        println!("    {f}");
    }

    let stopped = daemon.stop();
    drop(servers);
    rig.down()?;
    stopped?;
    if !failures.is_empty() || connections == 0 {
        bail!("{} of {connections} connections failed", failures.len());
    }
    Ok(())
}
