//! This node's check of its own service (`[farm] check`): the health engine's probe task and
//! the rise/fall state of its results; while it is down the node announces power 0.

use std::time::SystemTime;

use tokio::sync::mpsc::Sender;

use crate::config::{Config, FarmCfg, MAX_POWER};
use crate::health::{self, LastProbe, Outcome, ProbeResult, Target, Tracker};

/// This node's check of its own service: the health engine's probe task (`health::run_task`)
/// and the rise/fall state of its results. Without a check the node counts as healthy.
pub struct NodeCheck {
    target: Option<Target>,
    generation: u64,
    task: Option<tokio::task::JoinHandle<()>>,
    tracker: Tracker,
    /// Power set by a `dynamic` exec check (exit 2..=255 = power code − 2).
    dynamic_power: Option<u32>,
    last: Option<LastProbe>,
    tx: Sender<ProbeResult>,
}

impl NodeCheck {
    pub fn new(tx: Sender<ProbeResult>) -> Self {
        Self {
            target: None,
            generation: 0,
            task: None,
            tracker: Tracker::new(1, 1, true, false),
            dynamic_power: None,
            last: None,
            tx,
        }
    }

    /// Probe `target` (or nothing). A changed check restarts its task; the node keeps its
    /// current health (as a director backend whose check changes). Must run inside tokio.
    pub fn sync(&mut self, target: Option<Target>) {
        if target == self.target {
            return;
        }
        if let Some(t) = self.task.take() {
            t.abort();
        }
        self.generation += 1;
        match &target {
            None => {
                self.tracker = Tracker::new(1, 1, true, false);
                self.dynamic_power = None;
                self.last = None;
            }
            Some(t) => {
                let up = self.tracker.is_up();
                // A node that was already checked and up has proven itself; a new check has
                // not (its first failure withdraws the node).
                let proven = up && self.target.is_some();
                self.tracker = Tracker::new(t.check.rise, t.check.fall, up, proven);
                self.task = Some(tokio::spawn(health::run_task(
                    t.clone(),
                    self.generation,
                    self.tx.clone(),
                )));
                tracing::info!(
                    check = %self.summary_of(t),
                    "checking this node's own service"
                );
            }
        }
        self.target = target;
    }

    fn summary_of(&self, t: &Target) -> String {
        let s = t.check.summary();
        format!("{s} on {}", t.addr)
    }

    pub fn summary(&self) -> Option<String> {
        self.target.as_ref().map(|t| self.summary_of(t))
    }

    /// Count a probe result (stale ones are ignored).
    pub fn record(&mut self, r: &ProbeResult) {
        if r.generation != self.generation || self.target.is_none() {
            return;
        }
        self.last = Some(LastProbe {
            outcome: r.outcome.clone(),
            latency: r.latency,
            at: SystemTime::now(),
        });
        if let Outcome::Up {
            weight: Some(w), ..
        } = r.outcome
        {
            self.dynamic_power = Some(w.min(MAX_POWER));
        }
        if let Outcome::Error { reason } = &r.outcome {
            tracing::warn!("this node's check could not run (counted neither way): {reason}");
            return;
        }
        match (self.tracker.record(r.outcome.is_up()), &r.outcome) {
            (Some(false), Outcome::Down { reason }) => tracing::warn!(
                "this node's check is DOWN ({} consecutive failures): {reason}",
                self.target.as_ref().map_or(0, |t| t.check.fall)
            ),
            (Some(true), _) => tracing::info!(
                "this node's check is UP ({} consecutive successes)",
                self.target.as_ref().map_or(0, |t| t.check.rise)
            ),
            _ => {}
        }
    }

    pub fn healthy(&self) -> bool {
        self.target.is_none() || self.tracker.is_up()
    }

    /// The power this node announces: 0 while its check is down, else the dynamic check's,
    /// else the configured one.
    pub fn power(&self, configured: u32) -> u32 {
        if !self.healthy() {
            0
        } else {
            self.dynamic_power.unwrap_or(configured)
        }
    }

    pub fn last_str(&self) -> Option<String> {
        self.last.as_ref().map(|l| match &l.outcome {
            Outcome::Up { .. } => format!("up ({:.1} ms)", l.latency.as_secs_f64() * 1000.0),
            Outcome::Down { reason } => format!("down: {reason}"),
            Outcome::Error { reason } => format!("check error: {reason}"),
        })
    }
}

impl Drop for NodeCheck {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// The node's check for `cfg` (validated when the config was loaded).
pub fn node_target(cfg: &Config, farm: &FarmCfg) -> Option<Target> {
    match farm.node_check(&cfg.services) {
        Ok(t) => t.map(Target::from),
        Err(e) => {
            tracing::error!("farm check: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn checked_config(check: &str) -> Config {
        Config::from_toml_str(&format!(
            "interface = \"eth0\"\n[farm]\nnode_id = 1\naddress = \"10.0.0.1\"\n\
             key_file = \"/k\"\npower = 3\ncheck = {check}\n[[service]]\nname = \"web\"\n\
             vip = \"10.0.100.1\"\nport = 80\nforwarding = \"farm\"\n"
        ))
        .unwrap()
    }
    fn result(generation: u64, outcome: Outcome) -> ProbeResult {
        ProbeResult {
            service: "web".into(),
            addr: "10.0.100.1".parse().unwrap(),
            generation,
            outcome,
            latency: Duration::from_millis(1),
        }
    }
    #[test]
    fn node_check_withdraws_after_fall_and_returns_after_rise() {
        let cfg = checked_config("{ type = \"tcp\", rise = 2, fall = 2 }");
        let farm = cfg.farm.clone().unwrap();
        let (tx, _rx) = tokio::sync::mpsc::channel(4);
        let mut c = NodeCheck::new(tx);
        assert!(c.healthy(), "no check: healthy");
        assert_eq!(c.power(3), 3);
        // As `sync` would set it up for a node that has proven itself, without the task.
        c.target = node_target(&cfg, &farm);
        c.generation = 1;
        c.tracker = Tracker::new(2, 2, true, true);
        let (up, down) = (
            Outcome::Up { weight: None },
            Outcome::Down { reason: "x".into() },
        );
        c.record(&result(1, down.clone()));
        assert_eq!(c.power(3), 3, "one failure of fall = 2");
        c.record(&result(0, down.clone()));
        assert_eq!(c.power(3), 3, "a stale task's result is ignored");
        c.record(&result(1, down.clone()));
        assert!(!c.healthy());
        assert_eq!(c.power(3), 0, "withdrawn");
        assert!(c.last_str().unwrap().starts_with("down: x"));
        c.record(&result(1, up.clone()));
        assert_eq!(c.power(3), 0, "one success of rise = 2");
        c.record(&result(1, up));
        assert_eq!(c.power(3), 3, "back with the configured power");
        // A dynamic exec check's weight becomes the node's power.
        c.record(&result(1, Outcome::Up { weight: Some(7) }));
        assert_eq!(c.power(3), 7);
        assert_eq!(
            c.summary().unwrap(),
            "tcp :80 every 2s timeout 1s rise 2 fall 2 on 10.0.100.1"
        );
    }
    #[test]
    fn node_check_runs_on_the_health_engine() {
        // An exec check that fails: the engine's task probes it, the node withdraws; a
        // reload to a passing check brings it back (health carries over, then rises).
        let failing = checked_config(
            "{ type = \"exec\", command = \"exit 1\", interval = \"50ms\", rise = 2, fall = 1 }",
        );
        let passing = checked_config(
            "{ type = \"exec\", command = \"exit 4\", dynamic = true, interval = \"50ms\", rise = 2, fall = 1 }",
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (tx, mut rx) = tokio::sync::mpsc::channel(16);
            let mut c = NodeCheck::new(tx);
            let farm = failing.farm.clone().unwrap();
            c.sync(node_target(&failing, &farm));
            let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
            while c.healthy() {
                let r = tokio::time::timeout_at(deadline, rx.recv())
                    .await
                    .expect("no probe result within 3 s")
                    .unwrap();
                c.record(&r);
            }
            assert_eq!(c.power(3), 0);
            c.sync(node_target(&passing, passing.farm.as_ref().unwrap()));
            assert!(!c.healthy(), "a changed check keeps the node's health");
            while c.power(3) == 0 {
                let r = tokio::time::timeout_at(deadline, rx.recv())
                    .await
                    .expect("no probe result within 3 s")
                    .unwrap();
                c.record(&r);
            }
            assert_eq!(c.power(3), 2, "dynamic: exit 4 = power 2");
            c.sync(None);
            assert!(c.healthy());
            assert_eq!(c.power(3), 3);
        });
    }
}
