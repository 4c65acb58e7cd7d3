//! The demo's timeline as a small hand-written SVG: connections per second of each backend
//! (one `<polyline class="series" data-id="b1">` each), failed connections, and markers for
//! the kill and the removal.

use std::{fmt::Write as _, time::Duration};

use crate::demo::Timeline;

/// Width of a time bucket.
pub const BUCKET: Duration = Duration::from_millis(250);

const W: f64 = 860.0;
const H: f64 = 420.0;
const LEFT: f64 = 60.0;
const RIGHT: f64 = 110.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 50.0;
const COLORS: [&str; 6] = [
    "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf",
];
const FAILED: &str = "#d62728";

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Per whole bucket (a partial last one is left out): connections per second of `id`
/// (`None`: the failures).
pub fn rates(t: &Timeline, id: Option<&str>) -> Vec<f64> {
    let n = (t.end().as_secs_f64() / BUCKET.as_secs_f64())
        .floor()
        .max(1.0) as usize;
    let mut v = vec![0.0; n];
    for a in &t.attempts {
        let hit = match (&a.result, id) {
            (Ok(got), Some(id)) => got == id,
            (Err(_), None) => true,
            _ => false,
        };
        let i = (a.at.as_secs_f64() / BUCKET.as_secs_f64()) as usize;
        if hit && i < n {
            v[i] += 1.0 / BUCKET.as_secs_f64();
        }
    }
    v
}

/// A round step for about five ticks up to `max`.
fn step(max: f64) -> f64 {
    let raw = max / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag)
}

pub fn timeline(t: &Timeline) -> String {
    let series: Vec<(String, &str, Vec<f64>)> = t
        .ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.clone(), COLORS[i % COLORS.len()], rates(t, Some(id))))
        .collect();
    let failed = rates(t, None);
    let ymax = series
        .iter()
        .flat_map(|s| s.2.iter())
        .chain(&failed)
        .fold(1.0f64, |m, v| m.max(*v));
    let ystep = step(ymax);
    let ymax = (ymax / ystep).ceil() * ystep;
    let end = (t.end().as_secs_f64()).max(BUCKET.as_secs_f64());
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let x = |secs: f64| LEFT + secs / end * pw;
    let y = |v: f64| TOP + ph - v / ymax * ph;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="20" font-size="14" font-weight="bold">{}</text>"#,
        esc(&t.title)
    );
    let _ = writeln!(
        s,
        r##"<text x="{LEFT}" y="38" fill="#555">new connections per second by backend ({} ms buckets)</text>"##,
        BUCKET.as_millis()
    );
    // Axes, grid and ticks.
    let mut v = 0.0;
    while v <= ymax + 1e-9 {
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{yv:.1}" x2="{:.1}" y2="{yv:.1}" stroke="#e5e5e5"/><text x="{:.1}" y="{:.1}" text-anchor="end">{v}</text>"##,
            LEFT + pw,
            LEFT - 6.0,
            y(v) + 4.0,
            yv = y(v)
        );
        v += ystep;
    }
    let tstep = step(end).max(0.5);
    let mut secs = 0.0;
    while secs <= end + 1e-9 {
        let _ = writeln!(
            s,
            r##"<line x1="{xs:.1}" y1="{:.1}" x2="{xs:.1}" y2="{:.1}" stroke="#999"/><text x="{xs:.1}" y="{:.1}" text-anchor="middle">{secs}</text>"##,
            TOP + ph,
            TOP + ph + 5.0,
            TOP + ph + 18.0,
            xs = x(secs)
        );
        secs += tstep;
    }
    let _ = writeln!(
        s,
        r##"<path d="M{LEFT},{TOP} V{:.1} H{:.1}" fill="none" stroke="#333"/><text x="{:.1}" y="{:.1}" text-anchor="middle">seconds</text>"##,
        TOP + ph,
        LEFT + pw,
        LEFT + pw / 2.0,
        H - 12.0
    );
    // The kill and the removal.
    let mut marker = |at: Duration, label: &str, color: &str| {
        let xm = x(at.as_secs_f64());
        let _ = writeln!(
            s,
            r#"<g class="event" data-at="{:.3}"><line x1="{xm:.1}" y1="{TOP}" x2="{xm:.1}" y2="{:.1}" stroke="{color}" stroke-dasharray="4 3"/><text x="{:.1}" y="{:.1}" fill="{color}">{}</text></g>"#,
            at.as_secs_f64(),
            TOP + ph,
            xm + 3.0,
            TOP + 12.0,
            esc(label)
        );
    };
    marker(t.killed, &format!("{} killed", t.victim), FAILED);
    if let Some(r) = t.removed {
        marker(r, &format!("{} taken out", t.victim), "#333");
    }
    // Series: a point at the middle of each bucket.
    let points = |vals: &[f64]| {
        vals.iter()
            .enumerate()
            .map(|(i, v)| {
                let mid = (i as f64 + 0.5) * BUCKET.as_secs_f64();
                format!("{:.1},{:.1}", x(mid.min(end)), y(*v))
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    for (id, color, vals) in &series {
        let _ = writeln!(
            s,
            r#"<polyline class="series" data-id="{}" fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
            esc(id),
            points(vals)
        );
    }
    let _ = writeln!(
        s,
        r#"<polyline class="failures" fill="none" stroke="{FAILED}" stroke-width="1.5" stroke-dasharray="2 2" points="{}"/>"#,
        points(&failed)
    );
    // Legend.
    let names = series
        .iter()
        .map(|(id, c, _)| (id.as_str(), *c))
        .chain([("failed", FAILED)]);
    for (i, (id, color)) in names.enumerate() {
        let ly = TOP + 10.0 + i as f64 * 18.0;
        let lx = LEFT + pw + 12.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="{ly}" x2="{:.1}" y2="{ly}" stroke="{color}" stroke-width="3"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 18.0,
            lx + 24.0,
            ly + 4.0,
            esc(id)
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::Attempt;

    #[test]
    fn buckets_and_steps() {
        let ok = |ms: u64, id: &str| Attempt {
            at: Duration::from_millis(ms),
            result: Ok(id.into()),
        };
        let t = Timeline {
            title: "t <&>".into(),
            ids: vec!["b1".into(), "b2".into()],
            victim: "b2".into(),
            kill: String::new(),
            removal: String::new(),
            killed: Duration::from_millis(300),
            removed: Some(Duration::from_millis(600)),
            attempts: vec![
                ok(10, "b1"),
                ok(20, "b2"),
                ok(260, "b1"),
                Attempt {
                    at: Duration::from_millis(400),
                    result: Err("refused".into()),
                },
                ok(700, "b1"),
            ],
        };
        // The partial last bucket (500-700 ms) is left out.
        assert_eq!(rates(&t, Some("b1")), vec![4.0, 4.0]);
        assert_eq!(rates(&t, Some("b2")), vec![4.0, 0.0]);
        assert_eq!(rates(&t, None), vec![0.0, 4.0]);
        assert_eq!(step(37.0), 10.0);
        assert_eq!(step(4.0), 1.0);
        let svg = timeline(&t);
        assert!(svg.contains("t &lt;&amp;&gt;"), "{svg}");
        assert_eq!(svg.matches(r#"class="series""#).count(), 2);
        let p = t.phases();
        assert_eq!(p[0].0["b2"], 1);
        assert_eq!(p[1].1, 1);
        assert_eq!(p[2].0["b1"], 1);
    }
}
