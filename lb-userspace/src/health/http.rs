//! `type = "http"`: an `HTTP/1.0 GET` whose status must be in the expected range.

use std::net::{IpAddr, SocketAddr};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::Outcome;

/// Only the status line is read.
pub(super) async fn probe(
    sa: SocketAddr,
    path: &str,
    host: Option<&str>,
    status: (u16, u16),
) -> Outcome {
    let mut s = match TcpStream::connect(sa).await {
        Ok(s) => s,
        Err(e) => return Outcome::io(format_args!("connect {sa}"), &e),
    };
    let host = match (host, sa.ip()) {
        (Some(h), _) => h.to_string(),
        (None, IpAddr::V4(a)) => a.to_string(),
        (None, IpAddr::V6(a)) => format!("[{a}]"),
    };
    let req = format!(
        "GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: farmlb-check\r\nConnection: close\r\n\r\n"
    );
    if let Err(e) = s.write_all(req.as_bytes()).await {
        return Outcome::io("sending request", &e);
    }
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.contains(&b'\n') && buf.len() < 1024 {
        match s.read(&mut chunk).await {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Outcome::io("reading response", &e),
        }
    }
    match parse_status_line(&buf) {
        None => Outcome::down("no HTTP status line in the response"),
        Some(code) if (status.0..=status.1).contains(&code) => Outcome::Up { weight: None },
        Some(code) => Outcome::down(format!(
            "HTTP status {code}, expected {}",
            range_str(status)
        )),
    }
}

fn range_str((lo, hi): (u16, u16)) -> String {
    if lo == hi {
        lo.to_string()
    } else {
        format!("{lo}-{hi}")
    }
}

/// The status code of `HTTP/1.x NNN ...`.
pub fn parse_status_line(buf: &[u8]) -> Option<u16> {
    let line = buf.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/") {
        return None;
    }
    let code = parts.next()?;
    (code.len() == 3).then_some(())?;
    code.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(parse_status_line(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(
            parse_status_line(b"HTTP/1.0 503 Unavailable\r\nX: y"),
            Some(503)
        );
        assert_eq!(parse_status_line(b"HTTP/1.1 404"), Some(404));
        assert_eq!(parse_status_line(b"b1\n"), None);
        assert_eq!(parse_status_line(b"HTTP/1.1 20 OK\r\n"), None);
        assert_eq!(parse_status_line(b""), None);
        assert_eq!(range_str((200, 200)), "200");
        assert_eq!(range_str((200, 399)), "200-399");
    }
}
