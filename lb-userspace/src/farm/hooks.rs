//! User hooks (SafeKit's farm scripts): a shell command per farm event, run in the
//! background with a timeout; a failing hook is logged, never fatal.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::config::HooksCfg;

/// A farm event for the user hooks.
#[derive(Clone, Debug)]
pub struct HookEvent {
    pub event: &'static str,
    pub env: Vec<(&'static str, String)>,
}

/// Run the hook for `ev` (if configured) in the background; failures are logged, never fatal.
/// With `wait`, returns once the hook finished (or timed out).
pub fn run_hook(hooks: &HooksCfg, ev: HookEvent, wait: bool) {
    let cmd = match ev.event {
        "start" => &hooks.on_start,
        "stop" => &hooks.on_stop,
        "member_up" => &hooks.on_member_up,
        "member_down" => &hooks.on_member_down,
        "ownership_change" => &hooks.on_ownership_change,
        _ => &None,
    };
    let Some(cmd) = cmd.clone() else { return };
    let timeout = hooks.timeout;
    let job = move || {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(&cmd)
            .env("FARMLB_EVENT", ev.event)
            .stdin(Stdio::null());
        for (k, v) in &ev.env {
            c.env(k, v);
        }
        let mut child = match c.spawn() {
            Ok(ch) => ch,
            Err(e) => {
                tracing::error!(event = ev.event, "hook {cmd:?} could not start: {e}");
                return;
            }
        };
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(st)) if st.success() => return,
                Ok(Some(st)) => {
                    tracing::error!(event = ev.event, "hook {cmd:?} failed: {st}");
                    return;
                }
                Ok(None) if Instant::now() > deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    tracing::error!(event = ev.event, "hook {cmd:?} killed after {timeout:?}");
                    return;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => {
                    tracing::error!(event = ev.event, "hook {cmd:?}: {e}");
                    return;
                }
            }
        }
    };
    if wait {
        job();
    } else {
        let _ = std::thread::Builder::new()
            .name("farm-hook".into())
            .spawn(job);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hooks_get_the_event_and_failures_are_not_fatal() {
        let out = std::env::temp_dir().join(format!("farmlb-hook-{}.txt", std::process::id()));
        let hooks = HooksCfg {
            on_member_down: Some(format!(
                "echo \"$FARMLB_EVENT $FARMLB_MEMBER $FARMLB_NODE\" > {}",
                out.display()
            )),
            on_member_up: Some("exit 3".into()),
            timeout: Duration::from_secs(5),
            ..Default::default()
        };
        let ev = |event| HookEvent {
            event,
            env: vec![("FARMLB_MEMBER", "3".into()), ("FARMLB_NODE", "1".into())],
        };
        run_hook(&hooks, ev("member_down"), true);
        assert_eq!(
            std::fs::read_to_string(&out).unwrap().trim(),
            "member_down 3 1"
        );
        let _ = std::fs::remove_file(&out);
        // A failing hook and an unconfigured one only log.
        run_hook(&hooks, ev("member_up"), true);
        run_hook(&hooks, ev("start"), true);
    }
}
