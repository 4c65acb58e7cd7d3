//! Talking to a running daemon the way an operator does: the `farmlb` CLI, raw requests on
//! the API socket, and Prometheus scrapes from inside the daemon's namespace.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::net::UnixStream,
    path::Path,
    process::Command,
    time::Duration,
};

use anyhow::{ensure, Context, Result};
use serde_json::Value;

use crate::{daemon::farmlb_bin, netns::in_netns};

/// Run the `farmlb` CLI against `sock`: (success, stdout, stderr). Prints the exchange.
pub fn cli(sock: &Path, args: &[&str]) -> Result<(bool, String, String)> {
    let (code, so, se) = farmlb_with(Some(sock), args)?;
    Ok((code == 0, so, se))
}

/// Run `farmlb ARGS`: (exit code, stdout, stderr). Prints the exchange.
pub fn farmlb(args: &[&str]) -> Result<(i32, String, String)> {
    farmlb_with(None, args)
}

fn farmlb_with(sock: Option<&Path>, args: &[&str]) -> Result<(i32, String, String)> {
    let mut cmd = Command::new(farmlb_bin());
    if let Some(sock) = sock {
        cmd.arg("--socket").arg(sock);
    }
    let out = cmd.args(args).output().context("running farmlb")?;
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    println!("$ farmlb {}\n{so}{se}", args.join(" "));
    Ok((out.status.code().unwrap_or(-1), so, se))
}

/// [`cli`] that must succeed; its stdout.
pub fn cli_ok(sock: &Path, args: &[&str]) -> Result<String> {
    let (ok, so, se) = cli(sock, args)?;
    ensure!(ok, "farmlb {} failed: {se}", args.join(" "));
    Ok(so)
}

/// `farmlb --socket SOCK status --json`, quietly (for polling): the parsed JSON.
pub fn status_json(sock: &Path) -> Result<Value> {
    let out = Command::new(farmlb_bin())
        .arg("--socket")
        .arg(sock)
        .args(["status", "--json"])
        .output()
        .context("running farmlb")?;
    ensure!(
        out.status.success(),
        "farmlb status --json failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    serde_json::from_slice(&out.stdout).context("farmlb status --json printed no JSON")
}

/// The backend with address `addr` in a status JSON (any service).
pub fn find_backend(status: &Value, addr: &str) -> Option<Value> {
    status["services"]
        .as_array()?
        .iter()
        .flat_map(|s| s["backends"].as_array().cloned().unwrap_or_default())
        .find(|b| b["address"] == addr)
}

/// One raw HTTP/1.1 request on the API socket: (status, JSON body).
pub fn api(sock: &Path, method: &str, path: &str, body: Option<&str>) -> Result<(u16, Value)> {
    let (code, text) = raw_api(sock, method, path, body)?;
    let v: Value = serde_json::from_str(&text)
        .with_context(|| format!("{method} {path}: HTTP {code} body is not JSON: {text:?}"))?;
    Ok((code, v))
}

/// One raw HTTP/1.1 request on the API socket: (status, body).
pub fn raw_api(sock: &Path, method: &str, path: &str, body: Option<&str>) -> Result<(u16, String)> {
    let mut s = UnixStream::connect(sock).with_context(|| format!("connect {}", sock.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: farmlb\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let code: u16 = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("bad HTTP response {resp:?}"))?;
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

/// Samples of a scrape: `name{labels}` → value.
pub type Metrics = BTreeMap<String, f64>;

/// What Prometheus 2.x sends: OpenMetrics first.
pub const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,\
     application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// `GET /metrics` as Prometheus asks for it (see [`PROMETHEUS_ACCEPT`]) over plain TCP from
/// inside namespace `ns`, as HTTP/`version` (`1.0` or `1.1`); checks the status line, the
/// OpenMetrics content type and the `# EOF` trailer.
pub fn scrape(ns: &str, addr: SocketAddr, version: &str) -> Result<Metrics> {
    let (head, body) = get_metrics(ns, addr, version, Some(PROMETHEUS_ACCEPT))?;
    ensure!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    ensure!(body.trim_end().ends_with("# EOF"), "no # EOF in {body}");
    parse_samples(&body)
}

/// `GET /metrics` without an `Accept` header (as curl or a script asks): the classic text
/// format's body, after checking its content type.
pub fn scrape_text(ns: &str, addr: SocketAddr) -> Result<String> {
    let (head, body) = get_metrics(ns, addr, "1.1", None)?;
    ensure!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    Ok(body)
}

/// One `GET /metrics`: the response head and body.
fn get_metrics(
    ns: &str,
    addr: SocketAddr,
    version: &str,
    accept: Option<&str>,
) -> Result<(String, String)> {
    let accept = accept.map_or(String::new(), |a| format!("Accept: {a}\r\n"));
    let request =
        format!("GET /metrics HTTP/{version}\r\nHost: x\r\n{accept}Connection: close\r\n\r\n");
    let text = in_netns(ns, move || -> Result<String> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .with_context(|| format!("connect {addr}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(request.as_bytes())?;
        let mut r = String::new();
        s.read_to_string(&mut r)?;
        Ok(r)
    })??;
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP body")?;
    ensure!(
        head.starts_with(&format!("HTTP/{version} 200")),
        "scrape: {head}"
    );
    Ok((head.to_string(), body.to_string()))
}

/// The samples of an exposition (either format): `name{labels}` → value.
pub fn parse_samples(body: &str) -> Result<Metrics> {
    let mut m = Metrics::new();
    for line in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (key, value) = line
            .rsplit_once(' ')
            .with_context(|| format!("bad sample line {line:?}"))?;
        let v: f64 = value
            .parse()
            .with_context(|| format!("bad value in {line:?}"))?;
        m.insert(key.to_string(), v);
    }
    Ok(m)
}

/// One sample of a scrape; fails listing what there is.
pub fn metric(m: &Metrics, key: &str) -> Result<f64> {
    m.get(key).copied().with_context(|| {
        format!(
            "metric {key} missing; have: {:?}",
            m.keys().collect::<Vec<_>>()
        )
    })
}
