//! End-to-end ICMP through the director: `ping` to both VIPs is answered by the XDP program
//! (the director's stack does not hold the VIPs, the backends never see the requests), and a
//! fragmentation-needed / packet-too-big error quoting a live connection reaches exactly that
//! connection's backend. Run as root, one test at a time.

use std::{net::IpAddr, time::Duration};

use anyhow::{ensure, Context, Result};
use lb_tests::{
    ctl::status_json, daemon::api_socket, farmlb_config, wait_until, DirectorRig, LongConn, Rig,
    Service, VIP_V4, VIP_V6,
};

const PORT: u16 = 80;

fn setup(prefix: &str) -> Result<DirectorRig> {
    DirectorRig::up(prefix, 3, PORT, |rig| {
        let addrs = |v6: bool| -> Vec<IpAddr> {
            (0..rig.backend_count())
                .map(|i| {
                    if v6 {
                        rig.backend_v6(i).into()
                    } else {
                        rig.backend_v4(i).into()
                    }
                })
                .collect()
        };
        farmlb_config(
            rig,
            &[
                Service::tcp("web4", VIP_V4.into(), PORT).backends(addrs(false)),
                Service::tcp("web6", VIP_V6.into(), PORT).backends(addrs(true)),
            ],
        )
    })
}

fn stat(rig: &Rig, name: &str) -> Result<u64> {
    status_json(&api_socket(rig))?["stats"][name]
        .as_u64()
        .with_context(|| format!("no {name} in farmlb status"))
}

fn icmp_in(_rig: &Rig, ns: &str) -> Result<(u64, u64)> {
    lb_tests::icmp::icmp_in(ns)
}

#[test]
fn ping_to_vips_is_answered_by_the_director() -> Result<()> {
    let s = setup("tuicmp")?;
    let before: Vec<_> = (0..3)
        .map(|i| icmp_in(&s.rig, &s.rig.ns_backend(i)))
        .collect::<Result<_>>()?;
    for (vip, six) in [(VIP_V4.to_string(), false), (VIP_V6.to_string(), true)] {
        let mut args = vec!["ping", "-c", "5", "-i", "0.2", "-W", "2"];
        if six {
            args.push("-6");
        }
        args.push(&vip);
        let out = s.rig.exec(&s.rig.ns_client(), &args)?;
        println!("{out}");
        ensure!(
            out.contains("5 received"),
            "ping {vip}: not all 5 answered:\n{out}"
        );
    }
    ensure!(
        stat(&s.rig, "icmp_echo_reply")? == 10,
        "the program answered {} echo requests, not 10",
        stat(&s.rig, "icmp_echo_reply")?
    );
    for (i, b) in before.iter().enumerate() {
        let now = icmp_in(&s.rig, &s.rig.ns_backend(i))?;
        ensure!(
            now.1 == b.1,
            "backend {i} saw echo requests: {b:?} -> {now:?}"
        );
    }
    s.finish(|_| Ok(()))
}

#[test]
fn too_big_errors_reach_the_connections_backend() -> Result<()> {
    let s = setup("tuptb")?;
    for v6 in [false, true] {
        let (src, vip): (IpAddr, IpAddr) = if v6 {
            (s.rig.client_v6().into(), VIP_V6.into())
        } else {
            (s.rig.client_v4().into(), VIP_V4.into())
        };
        // Several connections, so the errors have different backends to find.
        for _ in 0..4 {
            let mut conn = LongConn::open(&s.rig.ns_client(), src, vip, PORT)?;
            conn.ping()?;
            let id = conn.identity().to_string();
            let target: usize = id.trim_start_matches('b').parse::<usize>()? - 1;
            let before: Vec<u64> = (0..3)
                .map(|i| Ok(icmp_in(&s.rig, &s.rig.ns_backend(i))?.0))
                .collect::<Result<_>>()?;
            let vip_port = std::net::SocketAddr::new(vip, PORT);
            lb_tests::icmp::send_too_big(&s.rig.ns_client(), &conn, vip_port, 1300)?;
            wait_until(Duration::from_secs(3), "the error at the backend", || {
                Ok(icmp_in(&s.rig, &s.rig.ns_backend(target))?.0 > before[target])
            })?;
            for (i, b) in before.iter().enumerate() {
                let now = icmp_in(&s.rig, &s.rig.ns_backend(i))?.0;
                let want = b + (i == target) as u64;
                ensure!(
                    now == want,
                    "v6={v6}: backend b{} saw {} errors, expected {} (connection on {id})",
                    i + 1,
                    now - b,
                    want - b
                );
            }
            conn.ping()?;
        }
    }
    ensure!(stat(&s.rig, "icmp_too_big_tx")? == 8);
    s.finish(|_| Ok(()))
}
