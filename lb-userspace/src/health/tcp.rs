//! `type = "tcp"`: up when a TCP connection is established.

use std::net::SocketAddr;

use tokio::net::TcpStream;

use super::Outcome;

pub(super) async fn probe(sa: SocketAddr) -> Outcome {
    match TcpStream::connect(sa).await {
        Ok(_) => Outcome::Up { weight: None },
        Err(e) => Outcome::io(format_args!("connect {sa}"), &e),
    }
}
