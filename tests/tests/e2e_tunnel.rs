//! End-to-end tunnel forwarding: the backends sit behind a router (not on the director's
//! segment) and run `farmlb decap`; farmlb reaches them over IPIP (4in4, 6in6, 4in6) and GUE,
//! resolving the router's MAC as their next hop, health-checking them over the routed path.
//! Real TCP connections from the client; path MTU discovery through the tunnel. Run as root,
//! one test at a time.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use lb_tests::{
    backend_id,
    ctl::status_json,
    format_distribution, in_netns,
    process::Process,
    tunnel_rig::{TunnelRig, VIP2_V4},
    wait_until, IdentityServer, VIP_V4, VIP_V6,
};

/// `[[service]]` over the rig's backends (v6: their IPv6 addresses), health-checked.
fn service(
    rig: &TunnelRig,
    name: &str,
    vip: IpAddr,
    port: u16,
    proto: &str,
    fwd: &str,
    v6: bool,
) -> String {
    let mut s = format!(
        "\n[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nport = {port}\nprotocol = \
         \"{proto}\"\nforwarding = \"{fwd}\"\n"
    );
    if proto == "tcp" {
        s += &format!("check = {{ type = \"tcp\", port = {port}, interval = \"500ms\" }}\n");
    }
    for i in 0..rig.backend_count() {
        s += &format!(
            "  [[service.backend]]\n  address = \"{}\"\n",
            rig.backend(i, v6)
        );
    }
    s
}

/// Every backend within `tol` of an equal share.
fn check_balance(what: &str, counts: &BTreeMap<String, usize>, n: usize, tol: f64) -> Result<()> {
    ensure!(
        counts.len() == n,
        "{what}: {counts:?} used, not {n} backends"
    );
    let total: usize = counts.values().sum();
    let fair = total as f64 / n as f64;
    for (id, &c) in counts {
        let dev = (c as f64 - fair) / fair;
        ensure!(
            dev.abs() <= tol,
            "{what}: backend {id} got {c} of {total} ({:+.0}%, allowed ±{:.0}%)",
            dev * 100.0,
            tol * 100.0
        );
    }
    Ok(())
}

struct Setup {
    rig: TunnelRig,
    _servers: Vec<IdentityServer>,
    daemon: Process,
}

fn setup(prefix: &str, services: impl FnOnce(&TunnelRig) -> String) -> Result<Setup> {
    let rig = TunnelRig::up(prefix, 3)?;
    let mut servers = Vec::new();
    for i in 0..3 {
        for port in [80, 81] {
            let any = SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), port);
            servers.push(IdentityServer::start(
                &rig.ns_backend(i),
                any,
                &backend_id(i),
            )?);
        }
    }
    let cfg = rig.farmlb_config(&services(&rig));
    let daemon = rig.start_director(&cfg)?;
    // Every backend resolved (next hop) and healthy over the routed path.
    let sock = rig.api_socket();
    wait_until(Duration::from_secs(10), "tunnel backends up", || {
        let st = status_json(&sock)?;
        Ok(st["services"].as_array().is_some_and(|ss| {
            ss.iter().all(|s| {
                s["backends"].as_array().is_some_and(|bs| {
                    bs.iter()
                        .filter(|b| b["address"] != "192.0.2.99")
                        .all(|b| b["resolved"] == true && b["health"] == "up")
                })
            })
        }))
    })
    .with_context(|| format!("farmlb log:\n{}", daemon.log()))?;
    Ok(Setup {
        rig,
        _servers: servers,
        daemon,
    })
}

fn stat(s: &Setup, name: &str) -> Result<u64> {
    status_json(&s.rig.api_socket())?["stats"][name]
        .as_u64()
        .with_context(|| format!("no {name} in status"))
}

fn finish(mut s: Setup) -> Result<Vec<String>> {
    s.daemon.stop()?;
    let lines = s.rig.stop_decaps()?;
    for l in &lines {
        println!("{l}");
    }
    s.rig.down()?;
    Ok(lines)
}

#[test]
fn connections_balance_over_ipip_ip6ip6_and_gue() -> Result<()> {
    let s = setup("tutun", |rig| {
        let mut svc = [
            service(rig, "ipip4", VIP_V4.into(), 80, "tcp", "ipip", false),
            service(rig, "ip6ip6", VIP_V6.into(), 80, "tcp", "ipip", true),
            service(rig, "ipip46", VIP2_V4.into(), 80, "tcp", "ipip", true),
            service(rig, "gue4", VIP_V4.into(), 81, "tcp", "gue", false),
            service(rig, "gue6", VIP_V6.into(), 81, "tcp", "gue", true),
        ]
        .concat();
        // A backend without a route: held out, shown unresolved.
        svc += "  [[service.backend]]\n  address = \"192.0.2.99\"\n";
        svc
    })?;
    let mut report = Vec::new();
    for (what, vip, port) in [
        ("IPIP 4in4", IpAddr::from(VIP_V4), 80),
        ("IP6IP6", IpAddr::from(VIP_V6), 80),
        ("IPIP 4in6", IpAddr::from(VIP2_V4), 80),
        ("GUE over IPv4", IpAddr::from(VIP_V4), 81),
        ("GUE over IPv6", IpAddr::from(VIP_V6), 81),
    ] {
        // 600 a type: the ±25% bound is then over 4 standard deviations of a fair share.
        let n = 600;
        let (counts, failures) = s.rig.connect(vip, port, n);
        println!(
            "{what}: {n} connections to {vip}:{port}\n{}  failed {}",
            format_distribution(&counts),
            failures.len()
        );
        ensure!(
            failures.is_empty(),
            "{what}: {} of {n} failed, first: {}\nlog:\n{}",
            failures.len(),
            failures[0],
            s.daemon.log()
        );
        check_balance(what, &counts, 3, 0.25)?;
        report.push(format!("{what}: {counts:?}"));
    }
    let st = status_json(&s.rig.api_socket())?;
    let gue6 = st["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "gue6")
        .context("gue6")?
        .clone();
    let unrouted = gue6["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["address"] == "192.0.2.99")
        .context("unrouted backend in status")?
        .clone();
    ensure!(
        unrouted["resolved"] == false && unrouted["effective_weight"] == 0,
        "a backend without a route is held out: {unrouted}"
    );
    ensure!(
        s.daemon.log().contains("192.0.2.99"),
        "the log says why the backend is held out"
    );
    let lines = finish(s)?;
    for l in &lines {
        let n = |k: &str| -> u64 {
            l.split_whitespace()
                .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        ensure!(
            n("decap_ipip") > 0 && n("decap_gue") > 0 && n("drop_malformed") == 0,
            "every backend decapsulated IPIP and GUE: {l}"
        );
    }
    println!("{}", report.join("\n"));
    Ok(())
}

/// `IP_MTU_DISCOVER` / `IPV6_MTU_DISCOVER` = DO: DF on, no local fragmentation.
fn pmtu_do(sock: &UdpSocket, v6: bool) -> Result<()> {
    let (level, opt, val) = if v6 {
        (
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU_DISCOVER,
            libc::IPV6_PMTUDISC_DO,
        )
    } else {
        (
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_DO,
        )
    };
    // SAFETY: setsockopt with an int option on our socket.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            opt,
            &val as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };
    ensure!(r == 0, "setsockopt: {}", std::io::Error::last_os_error());
    Ok(())
}

/// The path MTU the kernel knows for a connected socket (`IP_MTU` / `IPV6_MTU`).
fn path_mtu(sock: &UdpSocket, v6: bool) -> Result<u32> {
    let (level, opt) = if v6 {
        (libc::IPPROTO_IPV6, libc::IPV6_MTU)
    } else {
        (libc::IPPROTO_IP, libc::IP_MTU)
    };
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as u32;
    // SAFETY: getsockopt into a local int.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            level,
            opt,
            &mut v as *mut _ as *mut libc::c_void,
            &mut len,
        )
    };
    ensure!(r == 0, "getsockopt: {}", std::io::Error::last_os_error());
    Ok(v as u32)
}

/// On every backend: accept on `[::]:port`, read until EOF, answer the byte count.
fn start_sinks(rig: &TunnelRig, port: u16, stop: &Arc<AtomicBool>) -> Result<()> {
    for i in 0..rig.backend_count() {
        let l = in_netns(&rig.ns_backend(i), move || {
            TcpListener::bind(SocketAddr::new(
                std::net::Ipv6Addr::UNSPECIFIED.into(),
                port,
            ))
        })??;
        l.set_nonblocking(true)?;
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut c, _)) => {
                        let _ = c.set_nonblocking(false);
                        std::thread::spawn(move || {
                            let mut buf = vec![0u8; 1 << 16];
                            let mut total = 0u64;
                            while let Ok(n) = c.read(&mut buf) {
                                if n == 0 {
                                    break;
                                }
                                total += n as u64;
                            }
                            let _ = c.write_all(format!("{total}\n").as_bytes());
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
    }
    Ok(())
}

#[test]
fn path_mtu_discovery_works_through_the_tunnel() -> Result<()> {
    let s = setup("tupmtu", |rig| {
        [
            service(rig, "dns4", VIP_V4.into(), 53, "udp", "ipip", false),
            service(rig, "dns6", VIP_V6.into(), 53, "udp", "gue", true),
            service(rig, "sink4", VIP_V4.into(), 82, "tcp", "ipip", false),
            service(rig, "sink6", VIP_V6.into(), 82, "tcp", "gue", true),
        ]
        .concat()
    })?;
    // 10 MB over TCP through each tunnel, PMTU discovery on (the Linux default): the
    // client's full-size segments are answered with frag-needed / packet-too-big first.
    let stop = Arc::new(AtomicBool::new(false));
    start_sinks(&s.rig, 82, &stop)?;
    let sent = stat(&s, "icmp_too_big_sent")?;
    for (vip, src) in [
        (IpAddr::from(VIP_V4), s.rig.client_sources_v4()[0]),
        (IpAddr::from(VIP_V6), s.rig.client_sources_v6()[0]),
    ] {
        let t0 = Instant::now();
        let echoed = in_netns(&s.rig.ns_client(), move || -> Result<u64> {
            let sock = socket2::Socket::new(
                socket2::Domain::for_address(SocketAddr::new(vip, 82)),
                socket2::Type::STREAM,
                None,
            )?;
            sock.bind(&SocketAddr::new(src, 0).into())?;
            sock.connect_timeout(&SocketAddr::new(vip, 82).into(), Duration::from_secs(3))?;
            let mut c: TcpStream = sock.into();
            c.set_write_timeout(Some(Duration::from_secs(20)))?;
            c.set_read_timeout(Some(Duration::from_secs(20)))?;
            let chunk = vec![0x5au8; 1 << 16];
            for _ in 0..160 {
                c.write_all(&chunk)?;
            }
            c.shutdown(Shutdown::Write)?;
            let mut reply = String::new();
            c.read_to_string(&mut reply)?;
            Ok(reply.trim().parse()?)
        })??;
        let dt = t0.elapsed();
        println!(
            "{vip}: 10 MiB through the tunnel in {:.2} s ({:.0} Mbit/s)",
            dt.as_secs_f64(),
            (10 << 20) as f64 * 8.0 / dt.as_secs_f64() / 1e6
        );
        ensure!(
            echoed == 10 << 20,
            "{vip}: the backend received {echoed} bytes"
        );
    }
    let answered = stat(&s, "icmp_too_big_sent")? - sent;
    println!("too-big answers during the TCP transfers: {answered}");
    ensure!(
        answered >= 2,
        "each transfer met the tunnel's MTU ({answered} answers)"
    );
    // Forget the path MTUs learned, for the datagram test.
    s.rig
        .exec(&s.rig.ns_client(), &["ip", "route", "flush", "cache"])?;
    s.rig
        .exec(&s.rig.ns_client(), &["ip", "-6", "route", "flush", "cache"])?;
    // A 1500-byte datagram with DF: the director answers frag-needed / packet-too-big with
    // the tunnel's MTU, and the client's kernel lowers its path MTU to it.
    for (vip, v6, want) in [
        (IpAddr::from(VIP_V4), false, 1480u32),
        (IpAddr::from(VIP_V6), true, 1500 - 48),
    ] {
        let got = in_netns(&s.rig.ns_client(), move || -> Result<u32> {
            let bind: SocketAddr = if v6 { "[::]:0" } else { "0.0.0.0:0" }.parse()?;
            let sock = UdpSocket::bind(bind)?;
            sock.connect(SocketAddr::new(vip, 53))?;
            pmtu_do(&sock, v6)?;
            let before = path_mtu(&sock, v6)?;
            ensure!(before == 1500, "path MTU before: {before}");
            let payload = vec![0u8; 1500 - if v6 { 48 } else { 28 }];
            sock.send(&payload)
                .context("sending the 1500-byte datagram")?;
            let deadline = Instant::now() + Duration::from_secs(3);
            loop {
                let m = path_mtu(&sock, v6)?;
                if m != 1500 || Instant::now() > deadline {
                    return Ok(m);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })??;
        println!("{vip}: path MTU after one 1500-byte DF datagram: {got}");
        ensure!(got == want, "{vip}: path MTU {got}, expected {want}");
    }

    stop.store(true, Ordering::Relaxed);
    finish(s)?;
    Ok(())
}

/// A frag-needed / packet-too-big error quoting a live connection reaches, through the
/// tunnel, exactly the backend of that connection (its ICMP counter moves, no other's).
#[test]
fn too_big_errors_reach_the_tunnelled_connections_backend() -> Result<()> {
    use lb_tests::icmp::{icmp_in, send_too_big};
    let s = setup("tuptbt", |rig| {
        [
            service(rig, "ipip4", VIP_V4.into(), 80, "tcp", "ipip", false),
            service(rig, "gue6", VIP_V6.into(), 80, "tcp", "gue", true),
        ]
        .concat()
    })?;
    let mut sent = 0;
    for v6 in [false, true] {
        let (src, vip): (IpAddr, IpAddr) = if v6 {
            (s.rig.client_sources_v6()[0], VIP_V6.into())
        } else {
            (s.rig.client_sources_v4()[0], VIP_V4.into())
        };
        for _ in 0..4 {
            let mut conn = lb_tests::LongConn::open(&s.rig.ns_client(), src, vip, 80)?;
            conn.ping()?;
            let id = conn.identity().to_string();
            let target = id.trim_start_matches('b').parse::<usize>()? - 1;
            let before: Vec<u64> = (0..3)
                .map(|i| Ok(icmp_in(&s.rig.ns_backend(i))?.0))
                .collect::<Result<_>>()?;
            send_too_big(&s.rig.ns_client(), &conn, SocketAddr::new(vip, 80), 1300)?;
            sent += 1;
            wait_until(Duration::from_secs(3), "the error at the backend", || {
                Ok(icmp_in(&s.rig.ns_backend(target))?.0 > before[target])
            })?;
            for (i, b) in before.iter().enumerate() {
                let now = icmp_in(&s.rig.ns_backend(i))?.0;
                ensure!(
                    now - b == (i == target) as u64,
                    "v6={v6}: backend b{} saw {} errors (connection on {id})",
                    i + 1,
                    now - b
                );
            }
            conn.ping()?;
        }
    }
    ensure!(stat(&s, "icmp_too_big_tx")? == sent);
    finish(s)?;
    Ok(())
}
