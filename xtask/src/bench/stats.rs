//! Samples, medians and the metric records every benchmark section produces.

use serde_json::{json, Value};

/// The samples of one quantity (one per run), summarised by median, min and max.
#[derive(Clone, Debug, Default)]
pub struct Dist {
    pub samples: Vec<f64>,
}

impl Dist {
    pub fn new(samples: Vec<f64>) -> Dist {
        Dist { samples }
    }

    fn sorted(&self) -> Vec<f64> {
        let mut v: Vec<f64> = self
            .samples
            .iter()
            .copied()
            .filter(|x| x.is_finite())
            .collect();
        v.sort_by(f64::total_cmp);
        v
    }

    pub fn median(&self) -> f64 {
        median(&self.samples)
    }

    pub fn min(&self) -> f64 {
        self.sorted().first().copied().unwrap_or(f64::NAN)
    }

    pub fn max(&self) -> f64 {
        self.sorted().last().copied().unwrap_or(f64::NAN)
    }

    pub fn json(&self) -> Value {
        json!({
            "median": finite(self.median()),
            "min": finite(self.min()),
            "max": finite(self.max()),
            "n": self.samples.len(),
            "samples": self.samples.iter().map(|&x| finite(x)).collect::<Vec<_>>(),
        })
    }
}

/// Median of the finite values (mean of the middle two for an even count); NaN if none.
pub fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn finite(x: f64) -> Value {
    if x.is_finite() {
        json!(x)
    } else {
        Value::Null
    }
}

/// Direction of a goal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmp {
    AtMost,
    AtLeast,
}

/// What a goal is checked against: the median ratio to the baseline, or the median value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum On {
    Ratio,
    Value,
}

#[derive(Clone, Debug)]
pub struct Goal {
    pub cmp: Cmp,
    pub limit: f64,
    pub on: On,
}

impl Goal {
    pub fn ratio_at_most(limit: f64) -> Goal {
        Goal {
            cmp: Cmp::AtMost,
            limit,
            on: On::Ratio,
        }
    }

    pub fn ratio_at_least(limit: f64) -> Goal {
        Goal {
            cmp: Cmp::AtLeast,
            limit,
            on: On::Ratio,
        }
    }

    pub fn value_at_most(limit: f64) -> Goal {
        Goal {
            cmp: Cmp::AtMost,
            limit,
            on: On::Value,
        }
    }

    pub fn value_at_least(limit: f64) -> Goal {
        Goal {
            cmp: Cmp::AtLeast,
            limit,
            on: On::Value,
        }
    }

    pub fn holds(&self, x: f64) -> bool {
        match self.cmp {
            Cmp::AtMost => x <= self.limit,
            Cmp::AtLeast => x >= self.limit,
        }
    }

    pub fn text(&self, unit: &str) -> String {
        let op = match self.cmp {
            Cmp::AtMost => "≤",
            Cmp::AtLeast => "≥",
        };
        match self.on {
            On::Ratio => format!("{op} {}×", num(self.limit)),
            On::Value => format!("{op} {} {unit}", num(self.limit)),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Met,
    NotMet,
    /// Measured, no goal attached.
    Info,
    /// Not measured; the reason.
    Unavailable(String),
}

impl Outcome {
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Met => "met",
            Outcome::NotMet => "NOT MET",
            Outcome::Info => "info",
            Outcome::Unavailable(_) => "not available",
        }
    }
}

/// One line of the summary.
#[derive(Clone, Debug)]
pub struct Metric {
    /// Stable identifier for the JSON report.
    pub key: String,
    pub name: String,
    pub unit: String,
    pub value: Option<Dist>,
    /// What the value is compared with (e.g. "reference XDP", "nftables").
    pub baseline_name: String,
    pub baseline: Option<Dist>,
    /// Paired ratios value/baseline, one per run.
    pub ratio: Option<Dist>,
    pub goal: Option<Goal>,
    /// Why the metric is unavailable, or a caveat that belongs next to the number.
    pub note: String,
}

impl Metric {
    pub fn new(key: &str, name: &str, unit: &str) -> Metric {
        Metric {
            key: key.into(),
            name: name.into(),
            unit: unit.into(),
            value: None,
            baseline_name: String::new(),
            baseline: None,
            ratio: None,
            goal: None,
            note: String::new(),
        }
    }

    /// A metric that could not be measured, with the reason.
    pub fn unavailable(key: &str, name: &str, reason: &str) -> Metric {
        let mut m = Metric::new(key, name, "");
        m.note = reason.into();
        m
    }

    pub fn value(mut self, d: Dist) -> Metric {
        self.value = Some(d);
        self
    }

    /// Baseline samples paired run by run with the value samples; the ratio samples are
    /// value[i] / baseline[i].
    pub fn against(mut self, name: &str, baseline: Dist) -> Metric {
        if let Some(v) = &self.value {
            let r = v
                .samples
                .iter()
                .zip(&baseline.samples)
                .map(|(a, b)| a / b)
                .collect();
            self.ratio = Some(Dist::new(r));
        }
        self.baseline_name = name.into();
        self.baseline = Some(baseline);
        self
    }

    /// Explicit ratio samples (when the ratio is not value/baseline, e.g. added latencies).
    pub fn ratio(mut self, r: Dist) -> Metric {
        self.ratio = Some(r);
        self
    }

    pub fn goal(mut self, g: Goal) -> Metric {
        self.goal = Some(g);
        self
    }

    pub fn note(mut self, n: impl Into<String>) -> Metric {
        self.note = n.into();
        self
    }

    pub fn outcome(&self) -> Outcome {
        let Some(value) = &self.value else {
            return Outcome::Unavailable(self.note.clone());
        };
        let Some(goal) = &self.goal else {
            return Outcome::Info;
        };
        let x = match goal.on {
            On::Value => value.median(),
            On::Ratio => match &self.ratio {
                Some(r) => r.median(),
                None => f64::NAN,
            },
        };
        if x.is_finite() && goal.holds(x) {
            Outcome::Met
        } else {
            Outcome::NotMet
        }
    }

    /// The one-line human summary.
    pub fn line(&self) -> String {
        let out = self.outcome();
        let Some(v) = &self.value else {
            let why = self.note.split_whitespace().collect::<Vec<_>>().join(" ");
            return format!("{}: not available: {why}", self.name);
        };
        let mut s = format!(
            "{}: {} {} [{}–{}]",
            self.name,
            num(v.median()),
            self.unit,
            num(v.min()),
            num(v.max())
        );
        if let Some(b) = &self.baseline {
            s += &format!(
                " | {} {} {}",
                self.baseline_name,
                num(b.median()),
                self.unit
            );
        } else if !self.baseline_name.is_empty() {
            s += &format!(" | {}", self.baseline_name);
        }
        if let Some(r) = &self.ratio {
            s += &format!(
                " | ratio {}× [{}–{}]",
                num(r.median()),
                num(r.min()),
                num(r.max())
            );
        }
        match &self.goal {
            Some(g) => s += &format!(" | goal {} | {}", g.text(&self.unit), out.label()),
            None => s += " | no goal",
        }
        s
    }

    pub fn json(&self) -> Value {
        let out = self.outcome();
        json!({
            "key": self.key,
            "name": self.name,
            "unit": self.unit,
            "value": self.value.as_ref().map(Dist::json),
            "baseline_name": self.baseline_name,
            "baseline": self.baseline.as_ref().map(Dist::json),
            "ratio": self.ratio.as_ref().map(Dist::json),
            "goal": self.goal.as_ref().map(|g| json!({
                "text": g.text(&self.unit),
                "cmp": match g.cmp { Cmp::AtMost => "at_most", Cmp::AtLeast => "at_least" },
                "limit": g.limit,
                "on": match g.on { On::Ratio => "ratio", On::Value => "value" },
            })),
            "outcome": match &out {
                Outcome::Met => "met",
                Outcome::NotMet => "not_met",
                Outcome::Info => "info",
                Outcome::Unavailable(_) => "not_available",
            },
            "note": self.note,
        })
    }
}

/// One part of the benchmark: its metrics and how they were measured.
#[derive(Clone, Debug)]
pub struct Section {
    pub id: &'static str,
    pub title: &'static str,
    /// Markdown: method, parameters, caveats.
    pub method: String,
    pub metrics: Vec<Metric>,
    /// Extra per-run detail for the report (markdown), e.g. secondary quantities.
    pub details: String,
    /// Raw data for the JSON report.
    pub raw: Value,
}

impl Section {
    pub fn new(id: &'static str, title: &'static str) -> Section {
        Section {
            id,
            title,
            method: String::new(),
            metrics: Vec::new(),
            details: String::new(),
            raw: Value::Null,
        }
    }
}

/// A number with about three significant digits, with k/M suffixes for large values.
pub fn num(x: f64) -> String {
    if !x.is_finite() {
        return "n/a".into();
    }
    let a = x.abs();
    if a >= 10e6 {
        format!("{:.1}M", x / 1e6)
    } else if a >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if a >= 100e3 {
        format!("{:.0}k", x / 1e3)
    } else if a >= 10e3 {
        format!("{:.1}k", x / 1e3)
    } else if a >= 100.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else if a >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        assert_eq!(median(&[f64::NAN, 5.0]), 5.0);
    }

    #[test]
    fn outcomes() {
        let m = Metric::new("k", "n", "ns")
            .value(Dist::new(vec![60.0, 62.0, 61.0]))
            .against("ref", Dist::new(vec![30.0, 31.0, 30.5]))
            .goal(Goal::ratio_at_most(1.5));
        assert_eq!(m.outcome(), Outcome::NotMet);
        assert!((m.ratio.as_ref().unwrap().median() - 2.0).abs() < 1e-9);
        let m = m.goal(Goal::ratio_at_most(2.5));
        assert_eq!(m.outcome(), Outcome::Met);
        let m = Metric::new("k", "n", "ms")
            .value(Dist::new(vec![2.0]))
            .goal(Goal::value_at_most(3.0));
        assert_eq!(m.outcome(), Outcome::Met);
        assert!(m.line().ends_with("goal ≤ 3.00 ms | met"), "{}", m.line());
        let m = Metric::unavailable("k", "n", "needs health checks (#3)");
        assert!(matches!(m.outcome(), Outcome::Unavailable(_)));
        assert_eq!(m.line(), "n: not available: needs health checks (#3)");
    }

    #[test]
    fn numbers() {
        assert_eq!(num(1234567.0), "1.23M");
        assert_eq!(num(812345.0), "812k");
        assert_eq!(num(61.27), "61.3");
        assert_eq!(num(1.5), "1.50");
        assert_eq!(num(0.25), "0.250");
    }
}
