//! `type = "udp"`: send a datagram; down on ICMP unreachable, or without the expected reply.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::net::UdpSocket;

use super::Outcome;

/// Send `payload`. Without `expect`: down only if the port answers ICMP unreachable within
/// a short grace period. With `expect`: a reply containing it must arrive before the timeout.
pub(super) async fn probe(
    sa: SocketAddr,
    payload: &str,
    expect: Option<&str>,
    timeout: Duration,
) -> Outcome {
    let bind: SocketAddr = match sa {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = match UdpSocket::bind(bind).await {
        Ok(s) => s,
        Err(e) => return Outcome::io("udp socket", &e),
    };
    if let Err(e) = sock.connect(sa).await {
        return Outcome::io(format_args!("connect {sa}"), &e);
    }
    if let Err(e) = sock.send(payload.as_bytes()).await {
        return Outcome::io(format_args!("send to {sa}"), &e);
    }
    let mut buf = vec![0u8; 2048];
    match expect {
        None => {
            let grace = (timeout / 2).min(Duration::from_millis(250));
            match tokio::time::timeout(grace, sock.recv(&mut buf)).await {
                Ok(Err(e)) => Outcome::io(sa, &e),
                _ => Outcome::Up { weight: None },
            }
        }
        Some(want) => match sock.recv(&mut buf).await {
            Ok(n) if contains(&buf[..n], want.as_bytes()) => Outcome::Up { weight: None },
            Ok(n) => Outcome::down(format!(
                "reply {:?} does not contain {want:?}",
                String::from_utf8_lossy(&buf[..n.min(64)])
            )),
            Err(e) => Outcome::io(sa, &e),
        },
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || hay.windows(needle.len()).any(|w| w == needle)
}
