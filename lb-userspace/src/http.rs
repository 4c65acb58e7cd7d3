//! Bounded HTTP/1 serving for the API socket and `/metrics`: a fault of a client (idle
//! connections by the thousand, a slow sender, a huge body) costs at most a few file
//! descriptors and never reaches the owner loop, the health checks or the data plane.
//!
//! - at most `max_connections` at once: past that, new connections wait in the kernel's
//!   accept backlog (holding none of our file descriptors) until one closes;
//! - request headers must arrive within `header_timeout` (also between keep-alive requests);
//! - a connection lives at most `max_lifetime`;
//! - bodies are capped at `body_limit` (413).

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub max_lifetime: Duration,
    pub body_limit: usize,
}

/// The API's and the metrics endpoint's limits: far above what an operator, a CLI in a loop
/// or a Prometheus server needs, far below the daemon's file descriptors.
pub const LIMITS: Limits = Limits {
    max_connections: 64,
    header_timeout: Duration::from_secs(5),
    max_lifetime: Duration::from_secs(60),
    body_limit: 64 * 1024,
};

/// Serve `app` on the connections `accept` yields, within `limits`, until the task is
/// aborted. An accept error (EMFILE…) is logged and retried after a pause, never fatal.
pub async fn serve<I, F, Fut>(what: &'static str, mut accept: F, app: Router, limits: Limits)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = io::Result<I>>,
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let app = app.layer(DefaultBodyLimit::max(limits.body_limit));
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let io = match accept().await {
            Ok(io) => io,
            Err(e) => {
                tracing::warn!("{what}: accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let svc = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(TokioIo::new(io), svc);
            let _ = tokio::time::timeout(limits.max_lifetime, conn).await;
            drop(permit);
        });
    }
}
