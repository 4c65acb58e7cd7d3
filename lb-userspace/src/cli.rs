//! The operator commands (`farmlb status`, `stats`, `top`, `service`, `backend`, `reload`): a small
//! HTTP/1.1 client (hyper) on the daemon's unix socket, printing tables or, with `--json`,
//! the API's JSON.

use std::io::IsTerminal;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::net::UnixStream;

use crate::api::{BackendView, ServiceView, StatusView};

/// The whole command line of `farmlb` (here, not in `main.rs`, so that the packaging builds
/// man pages and completions from the same definitions).
#[derive(Parser)]
#[command(
    name = "farmlb",
    version,
    about = "XDP layer-4 load balancer",
    after_long_help = "Configuration: /etc/farmlb/farmlb.toml (reference: \
        /usr/share/doc/farmlb/config.md). Deployment, systemd, upgrades: \
        /usr/share/doc/farmlb/deploying.md. Logs: RUST_LOG sets the level (default info)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
    #[command(flatten)]
    pub ctl: CtlOpts,
    /// Log lines as text (coloured on a terminal, syslog-prefixed under journald) or JSON.
    #[arg(long, global = true, value_enum, default_value_t)]
    pub log_format: crate::logging::LogFormat,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Load the XDP program onto the configured interface and serve until SIGINT/SIGTERM.
    Run {
        #[arg(long, short, default_value = "/etc/farmlb/farmlb.toml")]
        config: PathBuf,
        /// Take over from a daemon already running this config (an upgrade): ask it to exit,
        /// leaving the data plane forwarding, then adopt the data plane and replace its
        /// program in place.
        #[arg(long)]
        replace: bool,
    },
    /// Validate a configuration file; warn about what this host lacks (the interface, an exec
    /// check's program).
    CheckConfig {
        file: PathBuf,
        /// Treat warnings as errors (exit non-zero).
        #[arg(long)]
        strict: bool,
    },
    /// Operator commands, talking to the running daemon's API socket.
    #[command(flatten)]
    Ctl(CtlCmd),
    /// The same as `farmlb status --config FILE`: services, and on a farm node its members,
    /// their state and power, and this node's share.
    #[command(name = "farm-status")]
    Status {
        #[arg(long, short, default_value = "/etc/farmlb/farmlb.toml")]
        config: PathBuf,
    },
    /// Print the shell completion script for SHELL (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// On a backend of an IPIP/GUE service: strip the tunnel headers of packets to this
    /// host arriving on INTERFACE in XDP and pass the inner packets on (the VIP on `lo`, as
    /// for DR), until SIGINT/SIGTERM; then detach and print the counters.
    Decap {
        /// The interface the tunnelled packets arrive on.
        #[arg(long, short)]
        interface: String,
        /// UDP port of GUE packets (the director's `gue_port`).
        #[arg(long, default_value_t = lb_common::DEFAULT_GUE_PORT,
              value_parser = clap::value_parser!(u16).range(1..))]
        gue_port: u16,
        /// XDP attach mode.
        #[arg(long, value_enum, default_value_t = DecapMode::Auto)]
        xdp_mode: DecapMode,
    },
}

/// `farmlb decap --xdp-mode`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecapMode {
    Auto,
    Native,
    Generic,
}

impl From<DecapMode> for crate::dataplane::AttachMode {
    fn from(m: DecapMode) -> Self {
        match m {
            DecapMode::Auto => Self::Auto,
            DecapMode::Native => Self::Native,
            DecapMode::Generic => Self::Generic,
        }
    }
}

/// The command definition every consumer uses (parsing, man pages, completions): every
/// value may be a negative number, so `--weight -5` reaches the range check that names the
/// field instead of failing as an unknown flag.
pub fn command() -> clap::Command {
    fn negatives(cmd: clap::Command) -> clap::Command {
        cmd.mut_args(|a| {
            let takes = a.get_action().takes_values();
            a.allow_negative_numbers(takes)
        })
        .mut_subcommands(negatives)
    }
    negatives(<Cli as clap::CommandFactory>::command())
}

/// Parse the process's arguments (exits with clap's message on a usage error).
pub fn parse() -> Cli {
    let m = command().get_matches();
    <Cli as clap::FromArgMatches>::from_arg_matches(&m).unwrap_or_else(|e| e.exit())
}

/// `farmlb completions SHELL`.
pub fn completions(shell: clap_complete::Shell, out: &mut dyn std::io::Write) {
    clap_complete::generate(shell, &mut command(), "farmlb", out);
}

/// Options shared by every operator command.
#[derive(Args, Debug, Clone)]
pub struct CtlOpts {
    /// The daemon's API socket (`api_socket` in the config).
    #[arg(
        long,
        global = true,
        env = "FARMLB_SOCKET",
        default_value = crate::config::DEFAULT_API_SOCKET
    )]
    pub socket: PathBuf,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum CtlCmd {
    /// Services and backends: health, state, weights, last check, counters; on a farm node
    /// also the members, their state and power, and this node's share.
    Status {
        /// Ask the daemon running this config file (at its `api_socket`).
        #[arg(long, short)]
        config: Option<std::path::PathBuf>,
    },
    /// Data-plane counters; with --watch, refreshed with per-second rates.
    Stats {
        /// Refresh every SECONDS (default 1) until interrupted.
        #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "1")]
        watch: Option<f64>,
    },
    /// Full-screen live view of services and backends: rates, health, weights, sparklines
    /// (`q` quits).
    Top {
        /// Seconds between polls of the daemon.
        #[arg(long, value_name = "SECONDS", default_value_t = 1.0)]
        interval: f64,
    },
    /// Add or remove a service (runtime only: `reload` makes the running set match the file).
    #[command(subcommand)]
    Service(ServiceCmd),
    /// Add, remove or set a backend.
    #[command(subcommand)]
    Backend(BackendCmd),
    /// Re-read the config file and apply the difference (like SIGHUP); established flows stay.
    Reload,
    /// Conntrack flows with their service, backend and idle time (like `ipvsadm -Lnc`).
    Conns {
        /// Only this service's flows.
        service: Option<String>,
        /// At most this many flows (at most 100000; the answer says how many were left out).
        #[arg(long, default_value_t = crate::conns::DEFAULT_LIMIT)]
        limit: usize,
    },
    /// Which backend a flow gets and why (conntrack entry, ring slot, no backend, not a
    /// VIP), from the running daemon's maps or, with --config, from a config file alone.
    Simulate(crate::simulate::SimulateArgs),
    /// Stop the daemon. The data plane keeps forwarding with the last tables (as on SIGTERM)
    /// unless `--detach` is given, which removes it (and its connection table) too, also when
    /// no daemon runs.
    Stop {
        /// Detach the XDP program and remove its pins.
        #[arg(long)]
        detach: bool,
        /// The configuration naming the interface / pin_path (when no daemon answers).
        #[arg(long, short, default_value = "/etc/farmlb/farmlb.toml")]
        config: std::path::PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum ServiceCmd {
    /// Add a service: `farmlb service add web 10.0.0.1 80 --backend 10.0.0.11 --backend 10.0.0.12=2`.
    Add {
        name: String,
        vip: String,
        port: i64,
        #[arg(long)]
        protocol: Option<String>,
        /// 5-tuple, src-ip or src-ip-port.
        #[arg(long)]
        hash: Option<String>,
        #[arg(long)]
        table_size: Option<i64>,
        /// ADDRESS or ADDRESS=WEIGHT; repeat for several backends.
        #[arg(long = "backend", value_name = "ADDR[=WEIGHT]")]
        backends: Vec<String>,
        /// Health check as a JSON object, e.g. '{"type":"tcp","interval":"2s"}'.
        #[arg(long, value_name = "JSON")]
        check: Option<String>,
    },
    /// Remove a service.
    Del { name: String },
}

#[derive(Subcommand, Debug)]
pub enum BackendCmd {
    /// Add a backend to a service.
    Add {
        service: String,
        address: String,
        #[arg(long)]
        weight: Option<i64>,
        /// ready, drain or maint.
        #[arg(long)]
        state: Option<String>,
        /// Health check override as a JSON object, e.g. '{"port":8080}'.
        #[arg(long, value_name = "JSON")]
        check: Option<String>,
    },
    /// Remove a backend (its established flows re-hash).
    Del { service: String, address: String },
    /// Set a backend's weight and/or state at runtime (kept across reloads until the file
    /// changes that field).
    Set {
        service: String,
        address: String,
        #[arg(long)]
        weight: Option<i64>,
        /// ready, drain (no new flows, established ones continue) or maint.
        #[arg(long)]
        state: Option<String>,
    },
}

/// A connection-per-request client of the API socket.
pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_path_buf(),
        }
    }

    /// Send a request; returns the status and the JSON body.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value)> {
        let stream = UnixStream::connect(&self.socket).await.map_err(|e| {
            anyhow!(
                "cannot reach the farmlb daemon at {}: {e} (is `farmlb run` running? \
                 --socket or FARMLB_SOCKET selects another socket)",
                self.socket.display()
            )
        })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("HTTP handshake with the daemon")?;
        tokio::spawn(conn);
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "farmlb")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))?;
        let resp = sender
            .send_request(req)
            .await
            .context("talking to the daemon")?;
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await?.to_bytes();
        let v: Value = serde_json::from_slice(&bytes)
            .with_context(|| format!("the daemon answered {status} with non-JSON"))?;
        Ok((status, v))
    }

    /// Like [`Client::request`] but a non-2xx answer is an error carrying the API's reason.
    pub async fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let (status, v) = self.request(method, path, body).await?;
        if !(200..300).contains(&status) {
            let reason = v["error"].as_str().unwrap_or("(no reason given)");
            bail!("{reason} (HTTP {status})");
        }
        Ok(v)
    }
}

/// Path segment escaping (service names are `[A-Za-z0-9_.-]`, addresses may hold `:`).
fn seg(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b':' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A JSON object of the fields that are set.
fn object<const N: usize>(fields: [(&str, Option<Value>); N]) -> Value {
    let set = fields
        .into_iter()
        .filter_map(|(k, v)| Some((k.to_string(), v?)));
    Value::Object(set.collect())
}

fn set(v: impl Serialize) -> Option<Value> {
    Some(json!(v))
}

fn opt(v: &Option<impl Serialize>) -> Option<Value> {
    v.as_ref().map(|v| json!(v))
}

/// `--backend ADDRESS[=WEIGHT]`.
fn backend_arg(b: &str) -> Result<Value> {
    let (address, weight) = match b.split_once('=') {
        None => (b, None),
        Some((a, w)) => {
            let w: i64 = (w.parse())
                .map_err(|_| anyhow!("--backend {b}: weight {w:?} is not an integer"))?;
            (a, Some(w))
        }
    };
    Ok(object([
        ("address", set(address)),
        ("weight", opt(&weight)),
    ]))
}

fn json_arg(s: &Option<String>, what: &str) -> Result<Option<Value>> {
    s.as_ref()
        .map(|s| serde_json::from_str(s).with_context(|| format!("--{what}: not valid JSON")))
        .transpose()
}

/// Run one operator command.
pub async fn run(opts: &CtlOpts, cmd: &CtlCmd) -> Result<()> {
    // `status --config FILE` asks the daemon running FILE, at its `api_socket`.
    let socket = match cmd {
        CtlCmd::Status { config: Some(path) } => crate::config::Config::load(path)?.api_socket,
        _ => opts.socket.clone(),
    };
    let c = Client::new(&socket);
    match cmd {
        CtlCmd::Top { interval } => {
            let every = period(*interval, "--interval")?;
            crate::top::run(c, &socket, every).await?
        }
        CtlCmd::Stop { detach, config } => {
            let body = json!({ "detach": detach });
            match c.call("POST", "/v1/stop", Some(&body)).await {
                Ok(v) => {
                    // The daemon removes its socket last: wait for it, so a script that
                    // stops and then starts farmlb never races the old one.
                    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
                    while socket.exists() && std::time::Instant::now() < deadline {
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    }
                    let msg = if *detach {
                        "daemon stopped, data plane detached"
                    } else {
                        "daemon stopped; the data plane keeps forwarding"
                    };
                    done(opts, &v, msg)?
                }
                // No daemon: the pins are all that is left to remove.
                Err(e) if *detach && !socket.exists() => {
                    let dir = crate::config::Config::load(config)
                        .map(|c| c.pin_path)
                        .map_err(|ce| {
                            anyhow::anyhow!("{e:#}; and reading {}: {ce}", config.display())
                        })?;
                    if crate::dataplane::pin::remove(&dir)? {
                        println!("removed the data plane pinned at {}", dir.display());
                    } else {
                        println!("nothing pinned at {}", dir.display());
                    }
                }
                Err(e) => return Err(e),
            }
        }
        CtlCmd::Status { .. } => {
            let v = c.call("GET", "/v1/status", None).await?;
            if opts.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let s: StatusView = serde_json::from_value(v)?;
                print!("{}", render_status(&s));
            }
        }
        CtlCmd::Stats { watch } => match watch {
            None => {
                let v = c.call("GET", "/v1/stats", None).await?;
                if opts.json {
                    println!("{}", serde_json::to_string_pretty(&v)?);
                } else {
                    print!("{}", render_stats(&serde_json::from_value(v)?, None));
                }
            }
            Some(secs) => watch_stats(&c, opts.json, *secs).await?,
        },
        CtlCmd::Service(ServiceCmd::Add {
            name,
            vip,
            port,
            protocol,
            hash,
            table_size,
            backends,
            check,
        }) => {
            let backends = backends
                .iter()
                .map(|b| backend_arg(b))
                .collect::<Result<Vec<_>>>()?;
            let o = object([
                ("name", set(name)),
                ("vip", set(vip)),
                ("port", set(port)),
                ("protocol", opt(protocol)),
                ("hash", opt(hash)),
                ("table_size", opt(table_size)),
                ("check", json_arg(check, "check")?),
                (
                    "backend",
                    (!backends.is_empty()).then_some(Value::Array(backends)),
                ),
            ]);
            let v = c.call("POST", "/v1/services", Some(&o)).await?;
            done(opts, &v, &format!("service {name} added"))?;
        }
        CtlCmd::Service(ServiceCmd::Del { name }) => {
            let v = c
                .call("DELETE", &format!("/v1/services/{}", seg(name)), None)
                .await?;
            done(opts, &v, &format!("service {name} removed"))?;
        }
        CtlCmd::Backend(BackendCmd::Add {
            service,
            address,
            weight,
            state,
            check,
        }) => {
            let o = object([
                ("address", set(address)),
                ("weight", opt(weight)),
                ("state", opt(state)),
                ("check", json_arg(check, "check")?),
            ]);
            let path = format!("/v1/services/{}/backends", seg(service));
            let v = c.call("POST", &path, Some(&o)).await?;
            done(opts, &v, &format!("backend {address} added to {service}"))?;
        }
        CtlCmd::Backend(BackendCmd::Del { service, address }) => {
            let path = format!("/v1/services/{}/backends/{}", seg(service), seg(address));
            let v = c.call("DELETE", &path, None).await?;
            done(
                opts,
                &v,
                &format!("backend {address} removed from {service}"),
            )?;
        }
        CtlCmd::Backend(BackendCmd::Set {
            service,
            address,
            weight,
            state,
        }) => {
            if weight.is_none() && state.is_none() {
                bail!("backend set: give --weight N and/or --state ready|drain|maint");
            }
            let o = object([("weight", opt(weight)), ("state", opt(state))]);
            let path = format!("/v1/services/{}/backends/{}", seg(service), seg(address));
            let v = c.call("PATCH", &path, Some(&o)).await?;
            if opts.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let b: BackendView = serde_json::from_value(v)?;
                println!(
                    "{service} {}: state {}, weight {}, effective weight {}, health {}",
                    b.address,
                    b.state,
                    weight_str(&b),
                    b.effective_weight,
                    b.health
                );
            }
        }
        CtlCmd::Conns { service, limit } => {
            crate::conns::cli(&c, opts.json, service.as_deref(), *limit).await?
        }
        CtlCmd::Simulate(a) => crate::simulate::cli(&c, opts.json, a).await?,
        CtlCmd::Reload => {
            let v = c.call("POST", "/v1/reload", None).await?;
            done(opts, &v, v["reloaded"].as_str().unwrap_or("reloaded"))?;
        }
    }
    Ok(())
}

fn done(opts: &CtlOpts, v: &Value, msg: &str) -> Result<()> {
    if opts.json {
        println!("{}", serde_json::to_string_pretty(v)?);
    } else {
        println!("{msg}");
    }
    Ok(())
}

/// A refresh period given in seconds on the command line (`flag` names it in the error).
fn period(secs: f64, flag: &str) -> Result<Duration> {
    if !(secs.is_finite() && (0.1..=3600.0).contains(&secs)) {
        bail!("{flag}: the interval must be between 0.1 and 3600 seconds");
    }
    Ok(Duration::from_secs_f64(secs))
}

async fn watch_stats(c: &Client, json: bool, secs: f64) -> Result<()> {
    let every = period(secs, "--watch")?;
    let tty = std::io::stdout().is_terminal();
    let mut prev: Option<(StatusView, Instant)> = None;
    loop {
        let v = c.call("GET", "/v1/stats", None).await?;
        let now = Instant::now();
        if json {
            println!("{v}");
        } else {
            let s: StatusView = serde_json::from_value(v)?;
            let rates = prev
                .as_ref()
                .map(|(p, t)| (p, now.duration_since(*t).as_secs_f64()));
            if tty {
                print!("\x1b[H\x1b[2J");
            }
            print!("{}", render_stats(&s, rates));
            if !tty {
                println!();
            }
            prev = Some((s, now));
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

// --- rendering ----------------------------------------------------------------------------

/// Left-aligned columns, two spaces apart, each row prefixed by `indent`.
pub fn table(indent: &str, header: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < w.len() {
                w[i] = w[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = indent.to_string();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<width$}  ", width = w[i]));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out += &line(r.iter().map(String::as_str).collect());
    }
    out
}

pub(crate) fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["", "K", "M", "G", "T"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < UNITS.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        n.to_string()
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}

pub(crate) fn endpoint(s: &ServiceView) -> String {
    match s.vip {
        IpAddr::V4(a) => format!("{a}:{}", s.port),
        IpAddr::V6(a) => format!("[{a}]:{}", s.port),
    }
}

/// `1`, `3*` (runtime), `4 (dynamic)`.
pub(crate) fn weight_str(b: &BackendView) -> String {
    match (b.weight_runtime, b.weight_dynamic) {
        (Some(w), _) => format!("{w}*"),
        (None, Some(w)) => format!("{w} (dyn)"),
        (None, None) => b.weight.to_string(),
    }
}

/// `up`, `down`, `unresolved` (no MAC yet), `up (unchecked)`.
pub(crate) fn health_str(b: &BackendView) -> String {
    match (b.checked, b.resolved) {
        (_, false) => "unresolved".to_string(),
        (false, true) => format!("{} (unchecked)", b.health),
        (true, true) => b.health.clone(),
    }
}

pub fn render_status(s: &StatusView) -> String {
    let mut farm = s.farm.as_ref().map(|f| f.render()).unwrap_or_default();
    if let Some(a) = &s.announce {
        farm += &a.render();
    }
    if let Some(y) = &s.sync {
        farm += &format!(
            "conntrack sync: sent {} received {} dropped {} rejected {} ring drops {} \
             batches dropped in {}, lag {:.1} ms (max {:.1})\n",
            y.sent,
            y.received,
            y.dropped,
            y.rejected,
            s.stats.get("ct_sync_drop").copied().unwrap_or(0),
            y.dropped_batches_in,
            y.lag_ms_last,
            y.lag_ms_max
        );
    }
    if s.services.is_empty() {
        return format!("{farm}no services configured\n");
    }
    let mut out = farm;
    let mut runtime = false;
    for svc in &s.services {
        let alarm = if !svc.backends.is_empty() && svc.backends_usable == 0 {
            "  NO USABLE BACKEND: new flows are dropped"
        } else {
            ""
        };
        out += &format!(
            "{} {} {} hash {} table {}  up {}/{} usable {}{alarm}\n",
            svc.name,
            svc.protocol,
            endpoint(svc),
            svc.hash,
            svc.table_size,
            svc.backends_up,
            svc.backends.len(),
            svc.backends_usable,
        );
        if let Some(c) = &svc.check {
            out += &format!("  check {c}\n");
        }
        if svc.backends.is_empty() {
            out += "  (no backends)\n";
            continue;
        }
        let rows: Vec<Vec<String>> = svc
            .backends
            .iter()
            .map(|b| {
                runtime |= b.state_runtime || b.weight_runtime.is_some();
                let last = b.last_check.as_ref().map_or("-".to_string(), |c| {
                    if c.ok {
                        format!("{} {:.1}ms", c.detail, c.latency_ms)
                    } else {
                        c.detail.clone()
                    }
                });
                vec![
                    b.address.to_string(),
                    health_str(b),
                    format!("{}{}", b.state, if b.state_runtime { "*" } else { "" }),
                    weight_str(b),
                    b.effective_weight.to_string(),
                    b.slots.to_string(),
                    flows_str(b),
                    human(b.packets),
                    human(b.bytes),
                    last,
                ]
            })
            .collect();
        out += &table(
            "  ",
            &[
                "BACKEND",
                "HEALTH",
                "STATE",
                "WEIGHT",
                "EFFECTIVE",
                "SLOTS",
                "FLOWS",
                "PACKETS",
                "BYTES",
                "LAST CHECK",
            ],
            &rows,
        );
    }
    if runtime {
        out += "* set at runtime: kept across reloads until the config file changes that field\n";
    }
    out
}

/// Conntrack entries naming the backend at the daemon's last count, `-` before the first.
fn flows_str(b: &BackendView) -> String {
    b.flows.map_or("-".into(), human)
}

/// Counters; with the previous snapshot and the seconds since, per-second rates too.
pub fn render_stats(s: &StatusView, prev: Option<(&StatusView, f64)>) -> String {
    let rate = |now: u64, before: Option<u64>| -> String {
        match (prev, before) {
            (Some((_, dt)), Some(b)) if dt > 0.0 => {
                format!("{:.1}/s", now.saturating_sub(b) as f64 / dt)
            }
            _ => "-".into(),
        }
    };
    let with_rates = prev.is_some();
    let mut out = String::new();
    // Name, what, counters and the counters of the previous snapshot.
    let row = |name: String, what: String, (packets, bytes), before: Option<(u64, u64)>| {
        let mut r = vec![name, what, human(packets), human(bytes)];
        if with_rates {
            r.push(rate(packets, before.map(|b| b.0)));
            r.push(rate(bytes, before.map(|b| b.1)));
        }
        r
    };
    if let Some(ct) = &s.conntrack {
        let pct = ct.entries as f64 * 100.0 / ct.capacity.max(1) as f64;
        out += &format!(
            "conntrack: {} of {} entries ({pct:.1}%), at most {} evicted\n",
            human(ct.entries),
            human(ct.capacity as u64),
            human(ct.evicted_at_most)
        );
    }
    let mut rows = Vec::new();
    for svc in &s.services {
        let p = prev.and_then(|(p, _)| p.services.iter().find(|x| x.name == svc.name));
        let before = p.map(|x| (x.packets, x.bytes));
        rows.push(row(
            svc.name.clone(),
            endpoint(svc),
            (svc.packets, svc.bytes),
            before,
        ));
        for b in &svc.backends {
            let pb = p.and_then(|x| x.backends.iter().find(|y| y.address == b.address));
            rows.push(row(
                format!("  -> {}", b.address),
                format!(
                    "{} w{} flows {}",
                    b.health,
                    b.effective_weight,
                    flows_str(b)
                ),
                (b.packets, b.bytes),
                pb.map(|x| (x.packets, x.bytes)),
            ));
        }
    }
    let mut header = vec!["SERVICE/BACKEND", "", "PACKETS", "BYTES"];
    if with_rates {
        header.extend(["PKT/S", "BYTES/S"]);
    }
    out += &table("", &header, &rows);
    out += "\n";
    let rows: Vec<Vec<String>> = s
        .stats
        .iter()
        .map(|(k, v)| {
            let mut r = vec![k.clone(), v.to_string()];
            if with_rates {
                r.push(rate(*v, prev.and_then(|(p, _)| p.stats.get(k).copied())));
            }
            r
        })
        .collect();
    let mut header = vec!["DATA PLANE", "TOTAL"];
    if with_rates {
        header.push("RATE");
    }
    out += &table("", &header, &rows);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align() {
        let t = table(
            "  ",
            &["A", "LONGER"],
            &[
                vec!["xxxx".into(), "1".into()],
                vec!["y".into(), "22".into()],
            ],
        );
        assert_eq!(t, "  A     LONGER\n  xxxx  1\n  y     22\n");
        assert_eq!(human(999), "999");
        assert_eq!(human(1500), "1.5K");
        assert_eq!(human(2_500_000), "2.5M");
        assert_eq!(seg("fd00::1"), "fd00::1");
        assert_eq!(seg("a b/c"), "a%20b%2Fc");
    }

    #[test]
    fn status_flags_a_service_without_usable_backends() {
        let s: StatusView = serde_json::from_value(json!({
            "services": [{
                "name": "web", "vip": "10.0.0.1", "port": 80, "protocol": "tcp",
                "hash": "5-tuple", "table_size": 7,
                "check": "tcp :80 every 2s timeout 1s rise 2 fall 3",
                "backends_up": 0, "backends_usable": 0, "packets": 0, "bytes": 0,
                "backends": [{
                    "address": "10.0.0.11", "health": "down", "checked": true,
                    "state": "drain", "state_runtime": true, "weight": 1,
                    "weight_runtime": null, "weight_dynamic": null, "effective_weight": 0,
                    "slots": 0, "resolved": true, "last_check": null, "packets": 0, "bytes": 0,
                }],
            }],
            "stats": {},
        }))
        .unwrap();
        let out = render_status(&s);
        assert!(out.contains("NO USABLE BACKEND"), "{out}");
        assert!(out.contains("drain*"), "{out}");
        assert!(out.contains("* set at runtime"), "{out}");
        assert!(out.contains("  check tcp :80 every 2s"), "{out}");
    }

    #[test]
    fn negative_numbers_parse_as_values() {
        command().debug_assert();
        let parse = |args: &[&str]| {
            let m = command()
                .try_get_matches_from(args)
                .map_err(|e| e.to_string())?;
            <Cli as clap::FromArgMatches>::from_arg_matches(&m).map_err(|e| e.to_string())
        };
        let cli = parse(&[
            "farmlb",
            "backend",
            "add",
            "web",
            "10.0.0.13",
            "--weight",
            "-5",
        ]);
        let Ok(Cli {
            cmd: Cmd::Ctl(CtlCmd::Backend(BackendCmd::Add { weight, .. })),
            ..
        }) = cli
        else {
            panic!("not parsed as backend add");
        };
        assert_eq!(weight, Some(-5));
        let cli = parse(&["farmlb", "service", "add", "x", "10.0.0.1", "-80"]);
        assert!(
            matches!(
                cli,
                Ok(Cli {
                    cmd: Cmd::Ctl(CtlCmd::Service(ServiceCmd::Add { port: -80, .. })),
                    ..
                })
            ),
            "positional -80"
        );
        // A flag-like word is still refused as a value.
        assert!(parse(&["farmlb", "backend", "add", "w", "a", "--weight", "-x"]).is_err());
    }

    #[test]
    fn request_bodies_hold_what_is_set() {
        assert_eq!(
            backend_arg("10.0.0.2=3").unwrap(),
            json!({"address": "10.0.0.2", "weight": 3})
        );
        assert_eq!(
            backend_arg("10.0.0.2").unwrap(),
            json!({"address": "10.0.0.2"})
        );
        let e = backend_arg("10.0.0.2=x").unwrap_err().to_string();
        assert_eq!(e, "--backend 10.0.0.2=x: weight \"x\" is not an integer");
        assert_eq!(
            object([("a", set(1)), ("b", opt(&None::<u32>))]),
            json!({"a": 1})
        );
    }
}
