//! Polling until a condition holds, for every rig, runner and test.

use std::{
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};

/// Poll `f` every 10 ms until it holds; the time it took, or an error naming `what` once
/// `within` has passed. An error from `f` ends the wait at once.
pub fn wait_until(
    within: Duration,
    what: &str,
    f: impl FnMut() -> Result<bool>,
) -> Result<Duration> {
    poll(within, Duration::from_millis(10), what, f)
}

/// [`wait_until`] with another polling period (for conditions that spawn a command).
pub fn poll(
    within: Duration,
    every: Duration,
    what: &str,
    mut f: impl FnMut() -> Result<bool>,
) -> Result<Duration> {
    let t0 = Instant::now();
    loop {
        if f()? {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > within {
            bail!("timed out after {within:?} waiting for {what}");
        }
        thread::sleep(every);
    }
}
