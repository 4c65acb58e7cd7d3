//! The demo's redistribution (`cargo xtask demo` and `cargo xtask demo farm`) on the rig,
//! shortened: one backend (one farm node) dies under a steady stream of new connections;
//! farmlb must take it out in time, the others must take its share, and the SVG timeline
//! must be well-formed XML with one series per backend that shows the victim going quiet.
//! Run as root, one test at a time.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use lb_tests::demo::{self, DemoOpts, Outcome};

fn opts(prefix: &str) -> DemoOpts {
    DemoOpts {
        prefix: prefix.into(),
        connections: 90,
        rate: 150,
        before: Duration::from_millis(1500),
        after: Duration::from_millis(1500),
        svg: std::env::temp_dir().join(format!("farmlb-{prefix}-timeline.svg")),
    }
}

/// One connection attempt's timeout in the demo (300 ms) and some slack.
const GRACE: Duration = Duration::from_millis(400);

/// Every backend served before the kill; after the removal the victim serves nothing, the
/// others everything, and nothing fails; the removal came within `bound` of the kill.
fn check_redistribution(out: &Outcome, bound: Duration) -> Result<()> {
    let t = &out.timeline;
    ensure!(
        out.balance_failures.is_empty() && out.balance.len() == 3,
        "balance phase: {:?} {:?}",
        out.balance,
        out.balance_failures
    );
    let removed = t.removed.context("the victim was never taken out")?;
    let took = removed - t.killed;
    ensure!(
        took <= bound,
        "taken out {took:?} after the kill (bound {bound:?})"
    );
    let [before, _, _] = t.phases();
    // Attempts under way at the removal may still fail (a dead node's hang until their
    // timeout): judge "after" from the removal plus one attempt's timeout.
    let after = t.between(removed + GRACE, t.end() + Duration::from_millis(1));
    ensure!(
        before.1 == 0 && before.0.values().all(|&n| n > 20),
        "before the kill: {before:?}"
    );
    ensure!(
        after.1 == 0,
        "{} connections failed after the removal",
        after.1
    );
    for (id, n) in &after.0 {
        if *id == t.victim {
            ensure!(*n == 0, "{id} still got {n} connections after the removal");
        } else {
            ensure!(*n > 20, "{id} got only {n} connections after the removal");
        }
    }
    Ok(())
}

/// The SVG parses; it has one series per backend whose points lie in the plot, the kill
/// and removal markers at their times, and the victim's series flat after the removal.
fn check_svg(out: &Outcome, path: &std::path::Path) -> Result<()> {
    let t = &out.timeline;
    let text = std::fs::read_to_string(path)?;
    let doc = roxmltree::Document::parse(&text).context("the SVG is not well-formed XML")?;
    let root = doc.root_element();
    ensure!(
        root.tag_name().name() == "svg",
        "root is {:?}",
        root.tag_name()
    );
    let (w, h): (f64, f64) = (
        root.attribute("width").context("width")?.parse()?,
        root.attribute("height").context("height")?.parse()?,
    );
    let series: Vec<_> = root
        .descendants()
        .filter(|n| n.has_tag_name("polyline") && n.attribute("class") == Some("series"))
        .collect();
    let ids: Vec<&str> = series
        .iter()
        .filter_map(|n| n.attribute("data-id"))
        .collect();
    ensure!(ids == t.ids, "series {ids:?}, backends {:?}", t.ids);
    let points = |n: &roxmltree::Node| -> Result<Vec<(f64, f64)>> {
        n.attribute("points")
            .context("points")?
            .split_whitespace()
            .map(|p| {
                let (x, y) = p.split_once(',').context("x,y")?;
                Ok((x.parse()?, y.parse()?))
            })
            .collect()
    };
    let buckets = lb_tests::svg::rates(t, None).len();
    let mut baseline = 0.0f64;
    for n in &series {
        let pts = points(n)?;
        ensure!(
            pts.len() == buckets,
            "{} points, {buckets} buckets",
            pts.len()
        );
        ensure!(
            pts.iter()
                .all(|&(x, y)| (0.0..=w).contains(&x) && (0.0..=h).contains(&y)),
            "points outside the picture"
        );
        baseline = baseline.max(pts.iter().map(|p| p.1).fold(0.0, f64::max));
    }
    // After the removal (and its bucket) the victim's line lies on the zero line.
    let victim = series[t.ids.iter().position(|i| *i == t.victim).unwrap()];
    let removed = t.removed.unwrap().as_secs_f64();
    let bucket = lb_tests::svg::BUCKET.as_secs_f64();
    let late: Vec<(f64, f64)> = points(&victim)?
        .into_iter()
        .enumerate()
        .filter(|(i, _)| (*i as f64) * bucket > removed + bucket)
        .map(|(_, p)| p)
        .collect();
    ensure!(
        !late.is_empty() && late.iter().all(|p| (p.1 - baseline).abs() < 0.05),
        "the victim's series is not at zero after the removal: {late:?}"
    );
    let events: Vec<f64> = root
        .descendants()
        .filter(|n| n.attribute("class") == Some("event"))
        .filter_map(|n| n.attribute("data-at")?.parse().ok())
        .collect();
    ensure!(
        events.len() == 2
            && (events[0] - t.killed.as_secs_f64()).abs() < 0.01
            && (events[1] - removed).abs() < 0.01,
        "event markers {events:?}"
    );
    println!(
        "SVG {}: {} bytes, {} series of {buckets} points",
        path.display(),
        text.len(),
        series.len()
    );
    Ok(())
}

#[test]
fn demo_director_redistributes_a_dead_backend_and_draws_it() -> Result<()> {
    let o = opts("edemo");
    let out = demo::director(&o)?;
    // tcp check every 250 ms, fall 3: out after 3 failed checks, plus one interval.
    check_redistribution(&out, Duration::from_millis(1000 + 400))?;
    let [_, window, _] = out.timeline.phases();
    ensure!(
        window.1 > 0,
        "connections to the dead backend should fail until it is taken out: {window:?}"
    );
    check_svg(&out, &o.svg)
}

#[test]
fn demo_farm_redistributes_a_dead_node_and_draws_it() -> Result<()> {
    let o = opts("edemof");
    let out = demo::farm(&o)?;
    check_redistribution(&out, Duration::from_millis(2000))?;
    check_svg(&out, &o.svg)
}
