//! Rig, demo (and benchmarks): the commands that link farmlb and the namespace rig.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use lb_tests::demo::{self, DemoOpts};
use lb_tests::{Rig, RigOpts, VIP_V4};

use crate::{cargo, run, DemoKind, RigAction};

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

pub fn demo(
    kind: DemoKind,
    connections: usize,
    rate: u32,
    prefix: String,
    svg: Option<PathBuf>,
) -> Result<()> {
    run(cargo().args(["build", "-p", "lb-userspace"]))?;
    let name = match kind {
        DemoKind::Director => "director",
        DemoKind::Farm => "farm",
    };
    let svg = svg.unwrap_or_else(|| {
        crate::workspace_root().join(format!("target/demo/timeline-{name}.svg"))
    });
    let opts = DemoOpts {
        prefix,
        connections,
        rate,
        before: Duration::from_secs(3),
        after: Duration::from_secs(3),
        svg,
    };
    let out = match kind {
        DemoKind::Director => demo::director(&opts)?,
        DemoKind::Farm => demo::farm(&opts)?,
    };
    if !out.balance_failures.is_empty() || connections == 0 {
        bail!(
            "{} of {connections} connections failed",
            out.balance_failures.len()
        );
    }
    if out.timeline.removed.is_none() {
        bail!("farmlb did not take {} out", out.timeline.victim);
    }
    Ok(())
}
