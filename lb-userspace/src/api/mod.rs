//! Runtime API: HTTP/1.1 + JSON on a unix socket (mode 0600, so root only), served with axum.
//!
//! | Method and path | Does |
//! |---|---|
//! | `GET /v1/status` (also `/v1/stats`, `/v1/services`) | every service and backend: health, state, weights, counters; global counters |
//! | `GET /v1/services/{name}` | one service |
//! | `POST /v1/services` | add a service (body: a `[[service]]` table as JSON, `backends` may replace `backend`) |
//! | `DELETE /v1/services/{name}` | remove a service |
//! | `POST /v1/services/{name}/backends` | add a backend (body: a `[[service.backend]]` table as JSON) |
//! | `DELETE /v1/services/{name}/backends/{addr}` | remove a backend |
//! | `PATCH /v1/services/{name}/backends/{addr}` | `{"weight": N}` and/or `{"state": "ready"\|"drain"\|"maint"}` |
//! | `POST /v1/reload` | re-read the config file and apply the difference |
//! | `GET /v1/config` | the running configuration as TOML (`{"config": "..."}`) |
//! | `GET /v1/conns?service=NAME&limit=N` | conntrack flows with service, backend and idle time (`crate::conns`; at most `limit`, default 1000, says how many were left out) |
//! | `POST /v1/simulate` | which backend a flow gets and why (`crate::simulate`; body `{"src": "IP:PORT", "dst": "VIP:PORT", "protocol": "tcp", "syn": false}`) |
//! | `POST /v1/stop` | exit the daemon (`{"detach": true}`: remove the data plane too) |
//!
//! Errors are `{"error": "<one line naming the field>"}` and change nothing. The status
//! follows from the error's kind ([`ErrorKind`]): 400 a field or rule of the config file is
//! broken, 404 no such service, backend or endpoint, 409 a duplicate (service name, vip/port/
//! protocol or backend) or a reload that changes a field only a restart applies, 405, 503
//! while shutting down, 500 when the kernel refused a map update. Request bodies are
//! validated by the config file's own table validators, and additions and removals by the
//! file's rules over the whole candidate configuration (`config/edit.rs`), before anything is
//! applied.
//!
//! The handlers only parse requests (`body.rs`); every request goes to the daemon's owner
//! task over a channel (see `daemon/`), which owns the data plane and applies changes one
//! at a time. Connections are bounded (`crate::http`): a body over the limit is a 413 with
//! the same JSON error.

pub mod body;
mod error;
mod views;

use std::net::IpAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

use anyhow::{bail, Context, Result};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path as UrlPath, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use axum::{Json, Router};
use serde_json::Value;
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};

use crate::config::{AdminState, BackendCfg, ServiceCfg};

pub use body::{parse_addr, parse_set};
pub use error::{ApiError, ErrorKind};
pub use views::{BackendView, CheckView, ConntrackView, ReloadView, ServiceView, StatusView};

// --- requests to the owner task ---------------------------------------------------------

/// What the API asks of the daemon. Bodies are already parsed and validated as far as they
/// can be without the running state.
#[derive(Debug)]
pub enum ApiRequest {
    Status,
    Service(String),
    /// The parsed service and the body as received (kept in the state file).
    AddService(ServiceCfg, Value),
    DelService(String),
    AddBackend(String, BackendCfg, Value),
    DelBackend(String, IpAddr),
    SetBackend {
        service: String,
        addr: IpAddr,
        weight: Option<u32>,
        state: Option<AdminState>,
    },
    Reload,
    Config,
    /// List conntrack flows (of one service), at most `limit`.
    Conns {
        service: Option<String>,
        limit: Option<usize>,
    },
    /// Decide one flow on the live maps.
    Simulate(crate::simulate::Query),
    /// Exit the daemon; with `detach`, remove the data plane too.
    Stop {
        detach: bool,
    },
}

/// A successful reply: status code and JSON body.
pub type ApiReply = (StatusCode, Value);

/// A request with the channel its answer comes back on.
pub type Call = (ApiRequest, oneshot::Sender<Result<ApiReply, ApiError>>);

// --- server -----------------------------------------------------------------------------

/// Bind the API socket: create its directory (0700) if missing, refuse when another daemon
/// answers on it, remove a stale socket, and make the new one 0600.
pub fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            bail!("{} exists and is not a socket", path.display());
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "another farmlb daemon is serving its API on {}",
                path.display()
            );
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    // SAFETY: umask only changes the mode of files this process creates; restored below.
    let old = unsafe { libc::umask(0o177) };
    let l = std::os::unix::net::UnixListener::bind(path);
    unsafe { libc::umask(old) };
    let l = l.with_context(|| format!("binding the API socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    l.set_nonblocking(true)?;
    Ok(UnixListener::from_std(l)?)
}

type Tx = mpsc::Sender<Call>;

/// A request body, or why it could not be read (too large: 413), as a JSON error.
type Body = Result<Bytes, ApiError>;

/// A body that parsed as an object, as a JSON value.
fn raw(b: &[u8]) -> Value {
    serde_json::from_slice(b).unwrap_or_default()
}

fn read(b: Result<Bytes, BytesRejection>) -> Body {
    b.map_err(|e| {
        let kind = if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ErrorKind::TooLarge
        } else {
            ErrorKind::BadRequest
        };
        ApiError::new(kind, format!("body: {}", e.body_text()))
    })
}

/// Send a parsed request to the owner task and answer with its reply; a request that did not
/// parse is answered with its error.
async fn call(tx: &Tx, req: Result<ApiRequest, ApiError>) -> Response {
    let req = match req {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let (otx, orx) = oneshot::channel();
    if tx.send((req, otx)).await.is_err() {
        return ApiError::new(ErrorKind::Unavailable, "the daemon is shutting down")
            .into_response();
    }
    match orx.await {
        Ok(Ok((status, body))) => (status, Json(body)).into_response(),
        Ok(Err(e)) => e.into_response(),
        Err(_) => ApiError::internal("the daemon dropped the request").into_response(),
    }
}

/// The API's routes, answering through `tx`.
pub fn router(tx: Tx) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/stats", get(status))
        .route("/v1/services", get(status).post(add_service))
        .route("/v1/services/{name}", get(service).delete(del_service))
        .route("/v1/services/{name}/backends", post(add_backend))
        .route(
            "/v1/services/{name}/backends/{addr}",
            patch(set_backend).delete(del_backend),
        )
        .route("/v1/reload", post(reload))
        .route("/v1/config", get(config))
        .route("/v1/conns", get(conns))
        .route("/v1/simulate", post(simulate))
        .route("/v1/stop", post(stop))
        .fallback(|method: Method, uri: Uri| async move {
            ApiError::not_found(format!("no such endpoint: {method} {uri}"))
        })
        .method_not_allowed_fallback(|method: Method, uri: Uri| async move {
            ApiError::new(
                ErrorKind::MethodNotAllowed,
                format!("method {method} is not allowed on {uri}"),
            )
        })
        .with_state(tx)
}

async fn status(State(tx): State<Tx>) -> Response {
    call(&tx, Ok(ApiRequest::Status)).await
}

async fn service(State(tx): State<Tx>, UrlPath(name): UrlPath<String>) -> Response {
    call(&tx, Ok(ApiRequest::Service(name))).await
}

async fn add_service(State(tx): State<Tx>, b: Result<Bytes, BytesRejection>) -> Response {
    let req = read(b).and_then(|b| Ok(ApiRequest::AddService(body::service(&b)?, raw(&b))));
    call(&tx, req).await
}

async fn del_service(State(tx): State<Tx>, UrlPath(name): UrlPath<String>) -> Response {
    call(&tx, Ok(ApiRequest::DelService(name))).await
}

async fn add_backend(
    State(tx): State<Tx>,
    UrlPath(name): UrlPath<String>,
    b: Result<Bytes, BytesRejection>,
) -> Response {
    let req = read(b).and_then(|b| {
        let cfg = body::backend(&name, &b)?;
        Ok(ApiRequest::AddBackend(name, cfg, raw(&b)))
    });
    call(&tx, req).await
}

type BackendPath = UrlPath<(String, String)>;

async fn del_backend(State(tx): State<Tx>, UrlPath((name, addr)): BackendPath) -> Response {
    let req = parse_addr(&addr).map(|a| ApiRequest::DelBackend(name, a));
    call(&tx, req).await
}

async fn set_backend(
    State(tx): State<Tx>,
    UrlPath((name, addr)): BackendPath,
    b: Result<Bytes, BytesRejection>,
) -> Response {
    let req = parse_addr(&addr).and_then(|addr| {
        let (weight, state) = parse_set(&read(b)?)?;
        Ok(ApiRequest::SetBackend {
            service: name,
            addr,
            weight,
            state,
        })
    });
    call(&tx, req).await
}

async fn reload(State(tx): State<Tx>) -> Response {
    call(&tx, Ok(ApiRequest::Reload)).await
}

async fn config(State(tx): State<Tx>) -> Response {
    call(&tx, Ok(ApiRequest::Config)).await
}

/// `?service=NAME&limit=N` (service names are `[A-Za-z0-9_.-]`: nothing to unescape).
fn conns_query(q: &str) -> Result<ApiRequest, ApiError> {
    let bad = |m: String| ApiError::new(ErrorKind::BadRequest, m);
    let (mut service, mut limit) = (None, None);
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("service", v)) => service = Some(v.to_string()),
            Some(("limit", v)) => {
                let n = v
                    .parse()
                    .map_err(|_| bad(format!("limit: {v:?} is not a non-negative integer")))?;
                limit = Some(n);
            }
            _ => {
                return Err(bad(format!(
                    "query: unknown parameter {pair:?} (service, limit)"
                )))
            }
        }
    }
    Ok(ApiRequest::Conns { service, limit })
}

async fn conns(State(tx): State<Tx>, uri: Uri) -> Response {
    call(&tx, conns_query(uri.query().unwrap_or(""))).await
}

async fn simulate(State(tx): State<Tx>, b: Result<Bytes, BytesRejection>) -> Response {
    let req = read(b).and_then(|b| {
        let q: crate::simulate::Query = serde_json::from_slice(&b)
            .map_err(|e| ApiError::new(ErrorKind::BadRequest, format!("body: {e}")))?;
        q.flow()
            .map_err(|e| ApiError::new(ErrorKind::BadRequest, format!("{e:#}")))?;
        Ok(ApiRequest::Simulate(q))
    });
    call(&tx, req).await
}

async fn stop(State(tx): State<Tx>, b: Result<Bytes, BytesRejection>) -> Response {
    let req = read(b)
        .and_then(|b| body::stop(&b))
        .map(|detach| ApiRequest::Stop { detach });
    call(&tx, req).await
}

/// Serve the API until the task is aborted, within [`crate::http::LIMITS`].
pub async fn serve(listener: UnixListener, tx: Tx) {
    let accept = || async { listener.accept().await.map(|(s, _)| s) };
    crate::http::serve("API", accept, router(tx), crate::http::LIMITS).await
}
