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
//!
//! Errors are `{"error": "<one line naming the field>"}` with a 4xx status, and change
//! nothing: additions and removals are validated by building the whole candidate
//! configuration and parsing it with the config file's own rules before anything is applied.
//!
//! The handlers only parse requests; every request goes to the daemon's owner task over a
//! channel (see `daemon.rs`), which owns the data plane and applies changes one at a time.

mod error;
mod views;

use std::net::IpAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

use anyhow::{bail, Context, Result};
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use axum::{Json, Router};
use serde_json::Value;
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};

use crate::config::{AdminState, Config, MAX_WEIGHT};

pub use error::{ApiError, ErrorKind};
pub use views::{BackendView, CheckView, ServiceView, StatusView};

// --- requests to the owner task ---------------------------------------------------------

/// What the API asks of the daemon. Bodies are already parsed as far as they can be without
/// the running state.
#[derive(Debug)]
pub enum ApiRequest {
    Status,
    Service(String),
    AddService(serde_json::Map<String, Value>),
    DelService(String),
    AddBackend(String, serde_json::Map<String, Value>),
    DelBackend(String, IpAddr),
    SetBackend {
        service: String,
        addr: IpAddr,
        weight: Option<u32>,
        state: Option<AdminState>,
    },
    Reload,
    Config,
}

/// A successful reply: status code and JSON body.
pub type ApiReply = (StatusCode, Value);

/// A request with the channel its answer comes back on.
pub type Call = (ApiRequest, oneshot::Sender<Result<ApiReply, ApiError>>);

// --- candidate configurations -----------------------------------------------------------

/// JSON → TOML value, refusing what TOML cannot express.
fn to_toml(v: &Value, field: &str) -> Result<toml::Value, ApiError> {
    Ok(match v {
        Value::Null => {
            return Err(ApiError::bad_request(format!(
                "{field}: null is not allowed"
            )))
        }
        Value::Bool(b) => toml::Value::Boolean(*b),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => toml::Value::Integer(i),
            (None, Some(f)) if n.is_f64() => toml::Value::Float(f),
            _ => {
                return Err(ApiError::bad_request(format!(
                    "{field}: {n} is out of range"
                )))
            }
        },
        Value::String(s) => toml::Value::String(s.clone()),
        Value::Array(a) => toml::Value::Array(
            a.iter()
                .enumerate()
                .map(|(i, x)| to_toml(x, &format!("{field}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(o) => toml::Value::Table(table(o, field)?),
    })
}

fn table(o: &serde_json::Map<String, Value>, field: &str) -> Result<toml::Table, ApiError> {
    o.iter()
        .map(|(k, v)| {
            let name = if field.is_empty() {
                k.clone()
            } else {
                format!("{field}.{k}")
            };
            Ok((k.clone(), to_toml(v, &name)?))
        })
        .collect()
}

/// `service[3] "api": backend[0].address: ...` → `service "api": backend.address: ...`: the
/// indices are positions in a document the client never saw.
fn strip_indices(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut rest = msg;
    while let Some(i) = rest.find('[') {
        let (head, tail) = rest.split_at(i);
        out.push_str(head);
        let digits = tail[1..].bytes().take_while(u8::is_ascii_digit).count();
        let named = head.ends_with("service") || head.ends_with("backend");
        if named && digits > 0 && tail.as_bytes().get(1 + digits) == Some(&b']') {
            rest = &tail[digits + 2..];
        } else {
            out.push('[');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// Parse a candidate document with the config file's rules.
fn validate(doc: &toml::Table) -> Result<Config, ApiError> {
    let text = toml::to_string(doc).map_err(|e| ApiError::internal(e.to_string()))?;
    Config::from_toml_str(&text).map_err(|e| ApiError::invalid(strip_indices(&e.message())))
}

fn document(running: &Config) -> toml::Table {
    toml::from_str(&running.to_toml()).expect("Config::to_toml output parses")
}

fn services_mut(doc: &mut toml::Table) -> &mut Vec<toml::Value> {
    doc.entry("service")
        .or_insert_with(|| toml::Value::Array(Vec::new()))
        .as_array_mut()
        .expect("service is an array of tables")
}

/// `running` plus one service given as a JSON object (`backends` is accepted for `backend`).
pub fn with_service(
    running: &Config,
    obj: &serde_json::Map<String, Value>,
) -> Result<Config, ApiError> {
    let mut obj = obj.clone();
    if let Some(b) = obj.remove("backends") {
        if obj.contains_key("backend") {
            return Err(ApiError::bad_request(
                "backends: give either \"backends\" or \"backend\", not both",
            ));
        }
        obj.insert("backend".into(), b);
    }
    let svc = table(&obj, "")?;
    let mut doc = document(running);
    services_mut(&mut doc).push(toml::Value::Table(svc));
    validate(&doc)
}

/// `running` plus one backend of service `name`.
pub fn with_backend(
    running: &Config,
    name: &str,
    obj: &serde_json::Map<String, Value>,
) -> Result<Config, ApiError> {
    let i = running
        .services
        .iter()
        .position(|s| s.name == name)
        .ok_or_else(|| ApiError::not_found(format!("service: no service named {name:?}")))?;
    let b = table(obj, "")?;
    let mut doc = document(running);
    let svc = services_mut(&mut doc)[i]
        .as_table_mut()
        .expect("service is a table");
    svc.entry("backend")
        .or_insert_with(|| toml::Value::Array(Vec::new()))
        .as_array_mut()
        .expect("backend is an array of tables")
        .push(toml::Value::Table(b));
    validate(&doc)
}

/// `running` without service `name`.
pub fn without_service(running: &Config, name: &str) -> Result<Config, ApiError> {
    let mut c = running.clone();
    let before = c.services.len();
    c.services.retain(|s| s.name != name);
    if c.services.len() == before {
        return Err(ApiError::not_found(format!(
            "service: no service named {name:?}"
        )));
    }
    validate(&document(&c))
}

/// `running` without backend `addr` of service `name`.
pub fn without_backend(running: &Config, name: &str, addr: IpAddr) -> Result<Config, ApiError> {
    let mut c = running.clone();
    let s = c
        .services
        .iter_mut()
        .find(|s| s.name == name)
        .ok_or_else(|| ApiError::not_found(format!("service: no service named {name:?}")))?;
    let before = s.backends.len();
    s.backends.retain(|b| b.address != addr);
    if s.backends.len() == before {
        return Err(ApiError::not_found(format!(
            "backend: service {name:?} has no backend {addr}"
        )));
    }
    validate(&document(&c))
}

// --- request parsing --------------------------------------------------------------------

fn json_object(body: &[u8]) -> Result<serde_json::Map<String, Value>, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("body: malformed JSON: {e}")))?;
    match v {
        Value::Object(o) => Ok(o),
        other => Err(ApiError::bad_request(format!(
            "body: expected a JSON object, got {}",
            kind(&other)
        ))),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

pub fn parse_addr(s: &str) -> Result<IpAddr, ApiError> {
    s.parse()
        .map_err(|_| ApiError::bad_request(format!("address: invalid IP address {s:?}")))
}

/// Body of `PATCH .../backends/{addr}`.
pub fn parse_set(body: &[u8]) -> Result<(Option<u32>, Option<AdminState>), ApiError> {
    let o = json_object(body)?;
    let mut weight = None;
    let mut state = None;
    for (k, v) in &o {
        match k.as_str() {
            "weight" => {
                let w = match v {
                    Value::Number(n) if n.as_i64().is_some() => n.as_i64().unwrap_or(-1),
                    Value::Number(n) if n.as_u64().is_some() => i64::MAX,
                    other => {
                        return Err(ApiError::bad_request(format!(
                            "weight: expected an integer, got {}",
                            kind(other)
                        )))
                    }
                };
                if !(0..=MAX_WEIGHT as i64).contains(&w) {
                    return Err(ApiError::bad_request(format!(
                        "weight: {v} is out of range 0..={MAX_WEIGHT}"
                    )));
                }
                weight = Some(w as u32);
            }
            "state" => {
                let s = v.as_str().ok_or_else(|| {
                    ApiError::bad_request(format!("state: expected a string, got {}", kind(v)))
                })?;
                state = Some(
                    s.parse::<AdminState>()
                        .map_err(|e| ApiError::bad_request(format!("state: {e}")))?,
                );
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown field {other:?}, expected \"weight\" or \"state\""
                )))
            }
        }
    }
    if weight.is_none() && state.is_none() {
        return Err(ApiError::bad_request(
            "body: expected \"weight\" and/or \"state\"",
        ));
    }
    Ok((weight, state))
}

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

async fn call(tx: &Tx, req: ApiRequest) -> Response {
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
    call(&tx, ApiRequest::Status).await
}

async fn service(State(tx): State<Tx>, UrlPath(name): UrlPath<String>) -> Response {
    call(&tx, ApiRequest::Service(name)).await
}

async fn add_service(State(tx): State<Tx>, body: Bytes) -> Response {
    match json_object(&body) {
        Ok(o) => call(&tx, ApiRequest::AddService(o)).await,
        Err(e) => e.into_response(),
    }
}

async fn del_service(State(tx): State<Tx>, UrlPath(name): UrlPath<String>) -> Response {
    call(&tx, ApiRequest::DelService(name)).await
}

async fn add_backend(
    State(tx): State<Tx>,
    UrlPath(name): UrlPath<String>,
    body: Bytes,
) -> Response {
    match json_object(&body) {
        Ok(o) => call(&tx, ApiRequest::AddBackend(name, o)).await,
        Err(e) => e.into_response(),
    }
}

async fn del_backend(
    State(tx): State<Tx>,
    UrlPath((name, addr)): UrlPath<(String, String)>,
) -> Response {
    match parse_addr(&addr) {
        Ok(a) => call(&tx, ApiRequest::DelBackend(name, a)).await,
        Err(e) => e.into_response(),
    }
}

async fn set_backend(
    State(tx): State<Tx>,
    UrlPath((name, addr)): UrlPath<(String, String)>,
    body: Bytes,
) -> Response {
    let parsed = parse_addr(&addr).and_then(|a| Ok((a, parse_set(&body)?)));
    match parsed {
        Ok((addr, (weight, state))) => {
            call(
                &tx,
                ApiRequest::SetBackend {
                    service: name,
                    addr,
                    weight,
                    state,
                },
            )
            .await
        }
        Err(e) => e.into_response(),
    }
}

async fn reload(State(tx): State<Tx>) -> Response {
    call(&tx, ApiRequest::Reload).await
}

async fn config(State(tx): State<Tx>) -> Response {
    call(&tx, ApiRequest::Config).await
}

/// Serve the API until the task is aborted.
pub async fn serve(listener: UnixListener, tx: Tx) {
    if let Err(e) = axum::serve(listener, router(tx)).await {
        tracing::error!("API server stopped: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
interface = "eth0"
api_socket = "/tmp/x.sock"
[[service]]
name = "web"
vip = "10.0.0.1"
port = 80
table_size = 7
check = { type = "tcp", interval = "200ms" }
  [[service.backend]]
  address = "10.0.0.11"
  [[service.backend]]
  address = "10.0.0.12"
  weight = 3
  state = "drain"
  check = { type = "http", path = "/health", expect_status = "200-299" }
"#;

    fn obj(v: Value) -> serde_json::Map<String, Value> {
        match v {
            Value::Object(o) => o,
            _ => panic!(),
        }
    }

    #[test]
    fn add_and_remove_through_the_config_rules() {
        let running = Config::from_toml_str(BASE).unwrap();
        let c = with_backend(
            &running,
            "web",
            &obj(serde_json::json!({"address": "10.0.0.13", "weight": 2})),
        )
        .unwrap();
        assert_eq!(c.services[0].backends.len(), 3);
        assert_eq!(c.services[0].backends[2].weight, 2);
        // The new backend inherits the service's check.
        assert_eq!(
            c.services[0].backends[2].check,
            c.services[0].backends[0].check
        );
        assert!(c.services[0].backends[0].check.is_some());
        let c = with_service(
            &c,
            &obj(serde_json::json!({
                "name": "api", "vip": "10.0.0.2", "port": 81,
                "backends": [{"address": "10.0.0.21"}],
            })),
        )
        .unwrap();
        assert_eq!(c.services.len(), 2);
        assert_eq!(c.services[1].backends.len(), 1);
        let c = without_backend(&c, "web", "10.0.0.11".parse().unwrap()).unwrap();
        assert_eq!(c.services[0].backends.len(), 2);
        let c = without_service(&c, "api").unwrap();
        assert_eq!(c.services.len(), 1);
    }

    #[test]
    fn invalid_requests_name_the_field() {
        let running = Config::from_toml_str(BASE).unwrap();
        let e = with_backend(
            &running,
            "web",
            &obj(serde_json::json!({"address": "10.0.0.x"})),
        )
        .unwrap_err();
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            e.message,
            "service \"web\": backend.address: invalid IP address \"10.0.0.x\""
        );
        let e = with_backend(
            &running,
            "web",
            &obj(serde_json::json!({"address": "10.0.0.13", "weight": -1})),
        )
        .unwrap_err();
        assert!(
            e.message.ends_with("weight: -1 is out of range 0..=65535"),
            "{e:?}"
        );
        let e = with_backend(
            &running,
            "web",
            &obj(serde_json::json!({"address": "10.0.0.11"})),
        )
        .unwrap_err();
        assert_eq!(e.status(), StatusCode::CONFLICT, "{e:?}");
        let e = with_backend(&running, "nope", &obj(serde_json::json!({}))).unwrap_err();
        assert_eq!(e.status(), StatusCode::NOT_FOUND);
        let e = with_service(
            &running,
            &obj(serde_json::json!({"name": "web2", "vip": "10.0.0.1", "port": 80})),
        )
        .unwrap_err();
        assert_eq!(e.status(), StatusCode::CONFLICT, "{e:?}");
        let e = with_service(
            &running,
            &obj(serde_json::json!({"name": "x", "vip": "10.0.0.5", "prot": 80})),
        )
        .unwrap_err();
        assert!(e.message.contains("unknown field \"prot\""), "{e:?}");
        let e = with_service(
            &running,
            &obj(serde_json::json!({"name": "x", "vip": null, "port": 80})),
        )
        .unwrap_err();
        assert_eq!(e.message, "vip: null is not allowed");
        assert!(without_service(&running, "nope").is_err());
        assert_eq!(
            without_backend(&running, "web", "10.0.0.99".parse().unwrap())
                .unwrap_err()
                .status(),
            StatusCode::NOT_FOUND
        );
    }

    #[test]
    fn set_bodies() {
        assert_eq!(parse_set(br#"{"weight": 5}"#).unwrap(), (Some(5), None));
        assert_eq!(
            parse_set(br#"{"state": "drain", "weight": 0}"#).unwrap(),
            (Some(0), Some(AdminState::Drain))
        );
        for (body, want) in [
            (
                &br#"{"weight": -1}"#[..],
                "weight: -1 is out of range 0..=65535",
            ),
            (
                br#"{"weight": 65536}"#,
                "weight: 65536 is out of range 0..=65535",
            ),
            (
                br#"{"weight": 1.5}"#,
                "weight: expected an integer, got a number",
            ),
            (
                br#"{"weight": "2"}"#,
                "weight: expected an integer, got a string",
            ),
            (
                br#"{"state": "up"}"#,
                "state: invalid value \"up\", expected \"ready\", \"drain\" or \"maint\"",
            ),
            (
                br#"{"wieght": 1}"#,
                "unknown field \"wieght\", expected \"weight\" or \"state\"",
            ),
            (br#"{}"#, "body: expected \"weight\" and/or \"state\""),
            (br#"[1]"#, "body: expected a JSON object, got an array"),
        ] {
            assert_eq!(parse_set(body).unwrap_err().message, want);
        }
        let e = parse_set(b"{\"weight\": ").unwrap_err();
        assert!(e.message.starts_with("body: malformed JSON: "), "{e:?}");
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert!(parse_addr("10.0.0.1").is_ok());
        assert_eq!(
            parse_addr("10.0.0.x").unwrap_err().message,
            "address: invalid IP address \"10.0.0.x\""
        );
    }

    #[test]
    fn indices_are_stripped() {
        assert_eq!(
            strip_indices("service[3] \"api\": backend[12].weight: x [1] a[2]"),
            "service \"api\": backend.weight: x [1] a[2]"
        );
    }
}
