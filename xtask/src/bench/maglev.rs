//! Maglev table build time and disruption on removal, timed in this (release-built) process.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use anyhow::Result;
use farmlb::director::addr_of;
use farmlb::maglev::{build_table, diff, MaglevEntry};
use serde_json::json;

use super::stats::{median, Dist, Goal, Metric, Section};
use super::Plan;

const SIZES: [u32; 2] = [65537, 131071];
const COUNTS: [usize; 3] = [10, 100, 1000];

/// Keys as the director makes them: v4-mapped backend addresses.
fn keys(n: usize) -> Vec<[u8; 16]> {
    (0..n)
        .map(|i| {
            addr_of(IpAddr::V4(Ipv4Addr::new(
                10,
                1 + (i >> 16) as u8,
                (i >> 8) as u8,
                i as u8,
            )))
        })
        .collect()
}

/// `k` removal candidates spread over the canonical input order.
fn removals(n: usize, k: usize) -> Vec<usize> {
    let k = k.clamp(1, n);
    (0..k).map(|j| j * n / k).collect()
}

pub fn run(plan: &Plan) -> Result<Section> {
    let mut s = Section::new("maglev", "Maglev table build and disruption");
    let mut raw = Vec::new();
    let mut details = String::from(
        "| M | N | build ms (median [min–max]) | slots moved (median) | ideal M/N | \
         survivors' slots moved (median) |\n|---|---|---|---|---|---|\n",
    );
    let mut time_metrics = Vec::new();
    let mut move_metrics = Vec::new();
    for &m in &SIZES {
        for &n in &COUNTS {
            let k = keys(n);
            let entries: Vec<MaglevEntry> = k
                .iter()
                .enumerate()
                .map(|(i, key)| MaglevEntry {
                    key,
                    id: i as u32 + 1,
                    weight: 1,
                })
                .collect();
            // One untimed build first (allocator, caches).
            let full = build_table(&entries, m);
            let mut ms = Vec::new();
            for _ in 0..plan.maglev_builds {
                let t0 = Instant::now();
                let t = build_table(black_box(&entries), m);
                ms.push(t0.elapsed().as_secs_f64() * 1e3);
                black_box(t);
            }

            let ideal = m as f64 / n as f64;
            let mut moved = Vec::new();
            let mut ideals = Vec::new();
            let mut survivors_moved = Vec::new();
            for r in removals(n, plan.removals) {
                let gone = r as u32 + 1;
                let rest: Vec<MaglevEntry> =
                    entries.iter().copied().filter(|e| e.id != gone).collect();
                let after = build_table(&rest, m);
                moved.push(diff(&full, &after).len() as f64);
                ideals.push(ideal);
                survivors_moved.push(
                    full.iter()
                        .zip(&after)
                        .filter(|&(&b, &a)| b != gone && b != a)
                        .count() as f64,
                );
            }

            let mut t = Metric::new(
                &format!("maglev.build_ms.m{m}.n{n}"),
                &format!("Maglev build M={m} N={n}"),
                "ms",
            )
            .value(Dist::new(ms.clone()));
            if m == 65537 && n == 1000 {
                t = t.goal(Goal::value_at_most(3.0));
            }
            time_metrics.push(t);
            move_metrics.push(
                Metric::new(
                    &format!("maglev.moved.m{m}.n{n}"),
                    &format!("Maglev slots moved on 1 removal M={m} N={n}"),
                    "slots",
                )
                .value(Dist::new(moved.clone()))
                .against("ideal M/N", Dist::new(ideals))
                .goal(Goal::ratio_at_most(1.1)),
            );
            let b = Dist::new(ms.clone());
            details += &format!(
                "| {m} | {n} | {:.3} [{:.3}–{:.3}] | {:.0} | {ideal:.1} | {:.0} |\n",
                b.median(),
                b.min(),
                b.max(),
                median(&moved),
                median(&survivors_moved),
            );
            raw.push(json!({
                "m": m,
                "n": n,
                "build_ms": ms,
                "removed_indices": removals(n, plan.removals),
                "moved_slots": moved,
                "survivor_slots_moved": survivors_moved,
                "ideal": ideal,
            }));
        }
    }
    s.metrics = time_metrics;
    s.metrics.extend(move_metrics);
    s.method = format!(
        "`farmlb::maglev::build_table` called in this process, which `cargo xtask bench` \
         always builds with `--release`. Keys are v4-mapped addresses as the director makes \
         them, weight 1. Build time: {builds} timed builds per (M, N) after one untimed \
         build (median, min, max; wall clock, single thread, sharing the CPU with whatever \
         else runs). Disruption: the table is rebuilt without one backend, for {rem} \
         different removed backends spread over the input order; a sample is the number of \
         slots whose backend changed (`maglev::diff`), the ideal is M/N (only the removed \
         backend's slots move). Maglev trades some disruption for balance: survivors' slots \
         also shift a little (about 0.5% of M in the unit tests), which is small against M/N \
         for small N but dominates for large N.",
        builds = plan.maglev_builds,
        rem = plan.removals,
    );
    s.details = details;
    s.raw = json!(raw);
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removal_candidates() {
        assert_eq!(removals(10, 5), vec![0, 2, 4, 6, 8]);
        assert_eq!(removals(3, 5), vec![0, 1, 2]);
        assert_eq!(removals(1000, 1), vec![0]);
    }
}
