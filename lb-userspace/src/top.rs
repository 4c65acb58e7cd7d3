//! `farmlb top`: a full-screen live view of the running daemon's services and backends
//! (ratatui on crossterm). It polls `GET /v1/status` every `--interval`, computes packet and
//! byte rates from successive polls, and keeps a short rate history per row for sparklines.
//! The daemon going away is shown (and retried) rather than fatal; `q`, Esc, Ctrl-C, SIGINT
//! and SIGTERM quit, and the terminal is restored on every exit, panics included.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::IsTerminal;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ratatui::crossterm::{cursor, execute};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Cell, Paragraph, Row, Sparkline, Table};
use ratatui::{DefaultTerminal, Frame};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::api::{BackendView, ServiceView, StatusView};
use crate::cli::{endpoint, health_str, human, weight_str, Client};

/// Rate samples kept per row (more than any terminal is wide).
const HISTORY: usize = 512;
/// How long one poll of the daemon may take before it counts as unreachable.
const POLL_TIMEOUT: Duration = Duration::from_secs(2);

/// Run the live view until the operator quits.
pub async fn run(client: Client, socket: &std::path::Path, every: Duration) -> Result<()> {
    if !std::io::stdout().is_terminal() || !std::io::stdin().is_terminal() {
        bail!(
            "farmlb top needs a terminal (`farmlb stats --watch` prints rates to a pipe or file)"
        );
    }
    let mut polls = poller(client, every);
    let keys = keys();
    let mut view = Model::new(socket.display().to_string(), every);
    let mut term = Screen::enter()?;
    let res = view_loop(&mut term.0, &mut view, &mut polls, keys).await;
    drop(term);
    res
}

async fn view_loop(
    term: &mut DefaultTerminal,
    view: &mut Model,
    polls: &mut mpsc::Receiver<(Instant, Result<Value>)>,
    mut keys: mpsc::Receiver<Event>,
) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    loop {
        term.draw(|f| view.render(f))?;
        tokio::select! {
            Some((at, res)) = polls.recv() => view.update(at, res),
            ev = keys.recv() => match ev {
                Some(Event::Key(k)) if quits(&k) => return Ok(()),
                // A resize (or anything else) just redraws; ratatui resizes on draw.
                Some(_) => {}
                None => bail!("the terminal's input closed"),
            },
            _ = sigterm.recv() => return Ok(()),
            _ = sigint.recv() => return Ok(()),
        }
    }
}

fn quits(k: &KeyEvent) -> bool {
    k.kind == KeyEventKind::Press
        && (matches!(k.code, KeyCode::Char('q') | KeyCode::Esc)
            || (k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL)))
}

/// Poll the daemon every `every` on a task of its own, so a slow daemon never delays a key.
/// The channel holds one answer: a view that falls behind skips polls instead of queueing.
fn poller(client: Client, every: Duration) -> mpsc::Receiver<(Instant, Result<Value>)> {
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let res = tokio::time::timeout(POLL_TIMEOUT, client.call("GET", "/v1/status", None))
                .await
                .unwrap_or_else(|_| bail!("no answer within {POLL_TIMEOUT:?}"));
            if tx.send((Instant::now(), res)).await.is_err() {
                return;
            }
        }
    });
    rx
}

/// Terminal events from a thread blocked in crossterm's reader (the process exits with it).
fn keys() -> mpsc::Receiver<Event> {
    let (tx, rx) = mpsc::channel(16);
    std::thread::spawn(move || {
        while let Ok(ev) = event::read() {
            if tx.blocking_send(ev).is_err() {
                return;
            }
        }
    });
    rx
}

/// Raw mode and the alternate screen while it lives; restored on drop and (through the
/// panic hook ratatui's `try_init` installs, extended here to show the cursor) on a panic.
struct Screen(DefaultTerminal);

impl Screen {
    fn enter() -> Result<Screen> {
        let term = ratatui::try_init().context("setting up the terminal")?;
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let _ = execute!(std::io::stdout(), cursor::Show);
            hook(info);
        }));
        Ok(Screen(term))
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        ratatui::restore();
        let _ = execute!(std::io::stdout(), cursor::Show);
    }
}

/// One row's counters and rates.
#[derive(Default)]
struct Series {
    last: Option<(u64, u64, Instant)>,
    /// Packets and bytes per second over the last interval (`None` until two polls).
    rate: Option<(f64, f64)>,
    /// Packets per second, oldest first.
    history: VecDeque<u64>,
}

impl Series {
    fn observe(&mut self, packets: u64, bytes: u64, at: Instant) {
        self.rate = match self.last {
            // Counters that went down belong to a new data plane: start over.
            Some((p, b, t)) if packets >= p && bytes >= b && at > t => {
                let dt = at.duration_since(t).as_secs_f64();
                Some(((packets - p) as f64 / dt, (bytes - b) as f64 / dt))
            }
            _ => None,
        };
        if let Some((pps, _)) = self.rate {
            if self.history.len() == HISTORY {
                self.history.pop_front();
            }
            self.history.push_back(pps.round() as u64);
        }
        self.last = Some((packets, bytes, at));
    }
}

/// A row: a service, or one of its backends.
type Key = (String, Option<IpAddr>);

/// What the view shows: the last status, the rates, and whether the daemon answers.
struct Model {
    socket: String,
    every: Duration,
    status: Option<StatusView>,
    /// `flows` per backend row, when the daemon reports them.
    flows: HashMap<Key, u64>,
    series: HashMap<Key, Series>,
    total: Series,
    /// Last successful poll.
    updated: Option<Instant>,
    /// Why the last poll failed (cleared by the next good one).
    unreachable: Option<String>,
}

impl Model {
    fn new(socket: String, every: Duration) -> Model {
        Model {
            socket,
            every,
            status: None,
            flows: HashMap::new(),
            series: HashMap::new(),
            total: Series::default(),
            updated: None,
            unreachable: None,
        }
    }

    fn update(&mut self, at: Instant, res: Result<Value>) {
        let parsed = res.and_then(|v| {
            let flows = active_flows(&v);
            Ok((serde_json::from_value::<StatusView>(v)?, flows))
        });
        let (status, flows) = match parsed {
            Ok(p) => p,
            Err(e) => {
                self.unreachable = Some(format!("{e:#}"));
                return;
            }
        };
        let mut seen = HashSet::new();
        let (mut tp, mut tb) = (0, 0);
        for s in &status.services {
            tp += s.packets;
            tb += s.bytes;
            let rows = std::iter::once(((s.name.clone(), None), s.packets, s.bytes)).chain(
                s.backends
                    .iter()
                    .map(|b| ((s.name.clone(), Some(b.address)), b.packets, b.bytes)),
            );
            for (key, p, b) in rows {
                self.series
                    .entry(key.clone())
                    .or_default()
                    .observe(p, b, at);
                seen.insert(key);
            }
        }
        self.total.observe(tp, tb, at);
        self.series.retain(|k, _| seen.contains(k));
        self.flows = flows;
        self.status = Some(status);
        self.updated = Some(at);
        self.unreachable = None;
    }

    fn render(&self, f: &mut Frame) {
        let [title, summary, spark, table, footer] = Layout::vertical([
            Constraint::Length(1),
            Constraint::Length(1),
            Constraint::Length(3),
            Constraint::Fill(1),
            Constraint::Length(1),
        ])
        .areas(f.area());
        f.render_widget(Paragraph::new(self.title_line()), title);
        f.render_widget(Paragraph::new(self.summary_line()), summary);
        let window = tail(&self.total.history, spark.width);
        f.render_widget(
            Sparkline::default()
                .data(&window)
                .max(window.iter().copied().max().unwrap_or(0).max(1))
                .style(Style::new().fg(Color::Cyan)),
            spark,
        );
        self.render_table(f, table);
        let help = format!(
            "q quit · every {:.1}s · rates from successive polls · sparklines: packets/s",
            self.every.as_secs_f64()
        );
        f.render_widget(
            Paragraph::new(help).style(Style::new().add_modifier(Modifier::DIM)),
            footer,
        );
    }

    fn title_line(&self) -> Line<'_> {
        let head = Span::styled(
            format!("farmlb top · {}", self.socket),
            Style::new().add_modifier(Modifier::BOLD),
        );
        let state = match (&self.unreachable, self.updated) {
            (Some(_), last) => Span::styled(
                format!(
                    "  daemon unreachable (retrying; {})",
                    last.map_or("no data yet".to_string(), |t| {
                        format!("data {}s old", t.elapsed().as_secs())
                    })
                ),
                Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
            ),
            (None, None) => Span::raw("  connecting…"),
            (None, Some(_)) => Span::styled("  live", Color::Green),
        };
        Line::from(vec![head, state])
    }

    /// Totals, or why the daemon does not answer.
    fn summary_line(&self) -> Line<'_> {
        if let Some(e) = &self.unreachable {
            return Line::styled(e.as_str(), Color::Red);
        }
        let Some(s) = &self.status else {
            return Line::default();
        };
        let mut parts = vec![format!(
            "{} services · {} pkt/s · {}B/s",
            s.services.len(),
            rate(self.total.rate.map(|r| r.0)),
            rate(self.total.rate.map(|r| r.1)),
        )];
        if let Some(ct) = &s.conntrack {
            parts.push(format!(
                "conntrack {} of {}",
                human(ct.entries),
                human(ct.capacity.into())
            ));
        }
        if let Some(farm) = &s.farm {
            parts.push(format!("farm: {} members", farm.members.len()));
        }
        Line::from(parts.join(" · "))
    }

    fn render_table(&self, f: &mut Frame, area: Rect) {
        let Some(status) = &self.status else {
            return;
        };
        let with_flows = !self.flows.is_empty();
        let mut header = vec!["SERVICE / BACKEND", "HEALTH", "STATE", "WEIGHT"];
        let names = status.services.iter().flat_map(|s| {
            let addrs = s.backends.iter().map(|b| b.address.to_string().len() + 2);
            std::iter::once(s.name.len() + endpoint(s).len() + s.protocol.len() + 2).chain(addrs)
        });
        let name_width = names.max().unwrap_or(0).clamp(header[0].len(), 48) as u16;
        let mut widths = vec![name_width, 14, 10, 11];
        if with_flows {
            header.push("FLOWS");
            widths.push(8);
        }
        header.extend(["PKT/S", "BYTES/S", "PACKETS"]);
        widths.extend([9, 9, 9]);
        let mut rows = Vec::new();
        let mut history = Vec::new();
        for s in &status.services {
            let key = (s.name.clone(), None);
            let flows = with_flows.then(|| {
                s.backends
                    .iter()
                    .filter_map(|b| self.flows.get(&(s.name.clone(), Some(b.address))))
                    .sum::<u64>()
            });
            rows.push(self.service_row(s, &key, flows));
            history.push(key);
            for b in &s.backends {
                let key = (s.name.clone(), Some(b.address));
                let flows = with_flows.then(|| self.flows.get(&key).copied()).flatten();
                rows.push(self.backend_row(b, &key, with_flows, flows));
                history.push(key);
            }
        }
        let spacing = 1;
        let fixed: u16 = widths.iter().sum::<u16>() + spacing * widths.len() as u16;
        let [left, right] =
            Layout::horizontal([Constraint::Length(fixed), Constraint::Fill(1)]).areas(area);
        let table = Table::new(rows, widths.iter().map(|w| Constraint::Length(*w)))
            .header(Row::new(header).style(Style::new().add_modifier(Modifier::BOLD)))
            .column_spacing(spacing);
        f.render_widget(table, left);
        if right.width == 0 {
            return;
        }
        f.render_widget(
            Paragraph::new("HISTORY").style(Style::new().add_modifier(Modifier::BOLD)),
            Rect { height: 1, ..right },
        );
        // One sparkline per visible row, beside the table; each scaled to its own peak.
        for (i, key) in history.iter().enumerate() {
            let y = right.y + 1 + i as u16;
            if y >= right.bottom() {
                break;
            }
            let window = self
                .series
                .get(key)
                .map(|s| tail(&s.history, right.width))
                .unwrap_or_default();
            let color = if key.1.is_none() {
                Color::Cyan
            } else {
                Color::Blue
            };
            f.render_widget(
                Sparkline::default()
                    .data(&window)
                    .max(window.iter().copied().max().unwrap_or(0).max(1))
                    .style(Style::new().fg(color)),
                Rect {
                    y,
                    height: 1,
                    ..right
                },
            );
        }
    }

    fn rates(&self, key: &Key) -> (String, String) {
        let r = self.series.get(key).and_then(|s| s.rate);
        (rate(r.map(|r| r.0)), rate(r.map(|r| r.1)))
    }

    fn service_row(&self, s: &ServiceView, key: &Key, flows: Option<u64>) -> Row<'static> {
        let (pps, bps) = self.rates(key);
        let usable = if !s.backends.is_empty() && s.backends_usable == 0 {
            Cell::from("NO BACKEND").style(Style::new().fg(Color::Red))
        } else {
            Cell::from(format!("{} usable", s.backends_usable))
        };
        let mut cells = vec![
            Cell::from(format!("{} {}/{}", s.name, endpoint(s), s.protocol)),
            Cell::from(format!("{}/{} up", s.backends_up, s.backends.len())),
            usable,
            Cell::from(""),
        ];
        if let Some(n) = flows {
            cells.push(Cell::from(n.to_string()));
        }
        cells.extend([pps, bps, human(s.packets)].map(Cell::from));
        Row::new(cells).style(Style::new().add_modifier(Modifier::BOLD))
    }

    fn backend_row(
        &self,
        b: &BackendView,
        key: &Key,
        with_flows: bool,
        flows: Option<u64>,
    ) -> Row<'static> {
        let (pps, bps) = self.rates(key);
        let health_color = match (b.resolved, b.health.as_str()) {
            (false, _) => Color::Yellow,
            (true, "up") => Color::Green,
            _ => Color::Red,
        };
        let weight = if b.effective_weight.to_string() == weight_str(b) {
            weight_str(b)
        } else {
            format!("{} → {}", weight_str(b), b.effective_weight)
        };
        let mut cells = vec![
            Cell::from(format!("  {}", b.address)),
            Cell::from(health_str(b)).style(Style::new().fg(health_color)),
            Cell::from(b.state.clone()),
            Cell::from(weight),
        ];
        if with_flows {
            cells.push(Cell::from(flows.map_or("-".into(), |n| n.to_string())));
        }
        cells.extend([pps, bps, human(b.packets)].map(Cell::from));
        Row::new(cells)
    }
}

/// `flows` of each backend, when the daemon reports it (counted from conntrack by
/// newer daemons; absent from older ones, whose view then has no FLOWS column).
fn active_flows(v: &Value) -> HashMap<Key, u64> {
    let mut out = HashMap::new();
    for s in v["services"].as_array().into_iter().flatten() {
        let name = s["name"].as_str().unwrap_or_default();
        for b in s["backends"].as_array().into_iter().flatten() {
            let addr = b["address"].as_str().and_then(|a| a.parse().ok());
            if let (Some(addr), Some(n)) = (addr, b["flows"].as_u64()) {
                out.insert((name.to_string(), Some(addr)), n);
            }
        }
    }
    out
}

/// The last `width` samples.
fn tail(h: &VecDeque<u64>, width: u16) -> Vec<u64> {
    h.iter()
        .skip(h.len().saturating_sub(width.into()))
        .copied()
        .collect()
}

/// A per-second rate: `-` until known, `0`, `12.5`, `1.2K`.
fn rate(r: Option<f64>) -> String {
    match r {
        None => "-".into(),
        Some(r) if r >= 1000.0 => human(r as u64),
        Some(0.0) => "0".into(),
        Some(r) => format!("{r:.1}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ratatui::backend::TestBackend;
    use ratatui::Terminal;
    use serde_json::json;

    fn status(packets: [u64; 2], health: [&str; 2], flows: Option<[u64; 2]>) -> Value {
        let backend = |i: usize| {
            let mut b = json!({
                "address": format!("10.0.0.{}", 11 + i), "health": health[i], "checked": true,
                "state": "ready", "state_runtime": false, "weight": 1, "weight_runtime": null,
                "weight_dynamic": null, "effective_weight": u32::from(health[i] == "up"),
                "slots": 7, "resolved": true, "last_check": null,
                "packets": packets[i], "bytes": packets[i] * 100,
            });
            if let Some(f) = flows {
                b["flows"] = json!(f[i]);
            }
            b
        };
        json!({
            "services": [{
                "name": "web", "vip": "10.0.0.1", "port": 80, "protocol": "tcp",
                "hash": "5-tuple", "table_size": 7, "check": null,
                "backends_up": health.iter().filter(|h| **h == "up").count(),
                "backends_usable": health.iter().filter(|h| **h == "up").count(),
                "packets": packets[0] + packets[1], "bytes": (packets[0] + packets[1]) * 100,
                "backends": [backend(0), backend(1)],
            }],
            "stats": {},
        })
    }

    fn screen(m: &Model) -> String {
        let mut t = Terminal::new(TestBackend::new(120, 16)).unwrap();
        t.draw(|f| m.render(f)).unwrap();
        let buf = t.backend().buffer();
        (0..buf.area.height)
            .map(|y| {
                (0..buf.area.width)
                    .map(|x| buf[(x, y)].symbol())
                    .collect::<String>()
                    + "\n"
            })
            .collect()
    }

    fn line<'a>(screen: &'a str, has: &str) -> &'a str {
        screen.lines().find(|l| l.contains(has)).unwrap_or("")
    }

    #[test]
    fn rates_come_from_successive_polls() {
        let mut m = Model::new("s".into(), Duration::from_secs(1));
        let t0 = Instant::now();
        m.update(t0, Ok(status([100, 50], ["up", "up"], None)));
        let s = screen(&m);
        assert!(line(&s, "10.0.0.11").contains(" - "), "{s}");
        m.update(
            t0 + Duration::from_secs(2),
            Ok(status([300, 50], ["up", "down"], None)),
        );
        let s = screen(&m);
        // 200 packets in 2 s; 20000 bytes in 2 s.
        let b1 = line(&s, "10.0.0.11");
        assert!(b1.contains("100.0") && b1.contains("10.0K"), "{s}");
        let b2 = line(&s, "10.0.0.12");
        assert!(b2.contains("down") && b2.contains("1 → 0"), "{s}");
        assert!(line(&s, "web 10.0.0.1:80/tcp").contains("1/2 up"), "{s}");
        assert!(!s.contains("FLOWS"), "no flows reported, no column: {s}");
        // A counter that went down (a new data plane) gives no rate rather than a huge one.
        m.update(
            t0 + Duration::from_secs(3),
            Ok(status([10, 50], ["up", "down"], None)),
        );
        assert!(line(&screen(&m), "10.0.0.11").contains(" - "));
    }

    #[test]
    fn flows_column_appears_when_reported() {
        let mut m = Model::new("s".into(), Duration::from_secs(1));
        m.update(
            Instant::now(),
            Ok(status([1, 2], ["up", "up"], Some([42, 7]))),
        );
        let s = screen(&m);
        assert!(line(&s, "SERVICE").contains("FLOWS"), "{s}");
        assert!(line(&s, "10.0.0.11").contains(" 42 "), "{s}");
        assert!(line(&s, "web ").contains(" 49 "), "{s}");
    }

    #[test]
    fn an_unreachable_daemon_is_shown_with_the_last_data() {
        let mut m = Model::new("s".into(), Duration::from_secs(1));
        m.update(Instant::now(), Ok(status([1, 2], ["up", "up"], None)));
        m.update(Instant::now(), Err(anyhow::anyhow!("connection refused")));
        let s = screen(&m);
        assert!(
            s.contains("daemon unreachable (retrying; data 0s old)"),
            "{s}"
        );
        assert!(
            line(&s, "connection refused").starts_with("connection refused"),
            "{s}"
        );
        assert!(s.contains("10.0.0.12"), "{s}");
        m.update(Instant::now(), Ok(status([1, 2], ["up", "up"], None)));
        assert!(!screen(&m).contains("unreachable"));
    }

    #[test]
    fn history_keeps_a_bounded_window() {
        let mut s = Series::default();
        let t0 = Instant::now();
        for i in 0..(HISTORY as u64 + 10) {
            s.observe(i * 10, i, t0 + Duration::from_secs(i));
        }
        assert_eq!(s.history.len(), HISTORY);
        assert_eq!(tail(&s.history, 3), vec![10, 10, 10]);
        assert_eq!(rate(Some(0.0)), "0");
        assert_eq!(rate(Some(2500.0)), "2.5K");
    }
}
