//! `type = "exec"`: run a command; exit 0 = up (keepalived MISC_CHECK, with `misc_dynamic`).

use std::process::Stdio;

use crate::config::ExecCommand;

use super::{Outcome, Target};

/// Run the command with the backend in its environment: `FARMLB_SERVICE`, `FARMLB_VIP`,
/// `FARMLB_BACKEND` (address) and `FARMLB_PORT`. Killed when the timeout expires.
pub(super) async fn probe(t: &Target, command: &ExecCommand, dynamic: bool) -> Outcome {
    let mut cmd = match command {
        ExecCommand::Shell(s) => {
            let mut c = tokio::process::Command::new("/bin/sh");
            c.arg("-c").arg(s);
            c
        }
        ExecCommand::Argv(a) => {
            let mut c = tokio::process::Command::new(&a[0]);
            c.args(&a[1..]);
            c
        }
    };
    cmd.env("FARMLB_SERVICE", &t.service)
        .env("FARMLB_VIP", t.vip.to_string())
        .env("FARMLB_BACKEND", t.addr.to_string())
        .env("FARMLB_PORT", t.check.port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return Outcome::io("running the check command", &e),
    };
    // When the probe's timeout drops this future, kill the command and everything it started.
    let mut guard = KillGroup(child.id().map(|p| p as libc::pid_t));
    let res = child.wait_with_output().await;
    guard.0 = None;
    let out = match res {
        Err(e) => return Outcome::io("running the check command", &e),
        Ok(out) => out,
    };
    match exec_outcome(out.status.code(), dynamic) {
        Outcome::Down { reason } => {
            let err = String::from_utf8_lossy(&out.stderr);
            match err.lines().next().map(str::trim).filter(|l| !l.is_empty()) {
                None => Outcome::Down { reason },
                Some(first) => {
                    let first: String = first.chars().take(160).collect();
                    Outcome::down(format!("{reason}: {first}"))
                }
            }
        }
        up => up,
    }
}

/// Kills a process group when dropped while armed.
struct KillGroup(Option<libc::pid_t>);

impl Drop for KillGroup {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            // SAFETY: plain syscall; the group was created for our own child (process_group(0)).
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
    }
}

/// Map an exit code (`None` = killed by a signal). keepalived `misc_dynamic`: 0 = up with the
/// weight unchanged, 1 = down, 2..=255 = up with weight `code - 2`. Otherwise 0 = up, else down.
pub fn exec_outcome(code: Option<i32>, dynamic: bool) -> Outcome {
    match code {
        None => Outcome::down("check command killed by a signal"),
        Some(0) => Outcome::Up { weight: None },
        Some(c) if dynamic && (2..=255).contains(&c) => Outcome::Up {
            weight: Some(c as u32 - 2),
        },
        Some(c) => Outcome::down(format!("check command exited with {c}")),
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::config::{CheckCfg, Probe};
    use crate::health::probe;

    #[test]
    fn exec_exit_codes() {
        assert_eq!(exec_outcome(Some(0), false), Outcome::Up { weight: None });
        assert!(!exec_outcome(Some(1), false).is_up());
        assert!(
            !exec_outcome(Some(2), false).is_up(),
            "not dynamic: 2 = down"
        );
        assert!(!exec_outcome(None, true).is_up());
        assert_eq!(exec_outcome(Some(0), true), Outcome::Up { weight: None });
        assert!(!exec_outcome(Some(1), true).is_up());
        assert_eq!(exec_outcome(Some(2), true), Outcome::Up { weight: Some(0) });
        assert_eq!(exec_outcome(Some(7), true), Outcome::Up { weight: Some(5) });
        assert_eq!(
            exec_outcome(Some(255), true),
            Outcome::Up { weight: Some(253) }
        );
        assert!(!exec_outcome(Some(-1), true).is_up());
    }

    /// An exec check of `web`'s backend 10.99.0.11, port 8080.
    fn target(command: ExecCommand, dynamic: bool, timeout_ms: u64) -> Target {
        Target {
            service: "web".into(),
            vip: "10.99.100.1".parse().unwrap(),
            addr: "10.99.0.11".parse().unwrap(),
            check: CheckCfg {
                probe: Probe::Exec { command, dynamic },
                interval: Duration::from_secs(1),
                timeout: Duration::from_millis(timeout_ms),
                rise: 2,
                fall: 3,
                port: 8080,
            },
        }
    }

    fn sh(s: &str) -> ExecCommand {
        ExecCommand::Shell(s.into())
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn exec_probe_sees_the_backend_and_maps_codes() {
        let t = target(
            sh(
                "test \"$FARMLB_BACKEND:$FARMLB_PORT:$FARMLB_SERVICE:$FARMLB_VIP\" = \
                10.99.0.11:8080:web:10.99.100.1",
            ),
            false,
            2000,
        );
        assert_eq!(block_on(probe(&t)), Outcome::Up { weight: None });
        let t = target(sh("exit 6"), true, 2000);
        assert_eq!(block_on(probe(&t)), Outcome::Up { weight: Some(4) });
        let t = target(sh("echo broken >&2; exit 1"), true, 2000);
        match block_on(probe(&t)) {
            Outcome::Down { reason } => {
                assert!(reason.ends_with("exited with 1: broken"), "{reason}")
            }
            o => panic!("{o:?}"),
        }
        let t = target(ExecCommand::Argv(vec!["/bin/true".into()]), false, 2000);
        assert!(block_on(probe(&t)).is_up());
    }

    #[test]
    fn slow_probe_times_out_and_is_killed() {
        let t = target(sh("sleep 5"), false, 150);
        let start = Instant::now();
        let o = block_on(probe(&t));
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(o, Outcome::down("timed out after 150ms"));
        // Background work the command started dies with it.
        let flag = std::env::temp_dir().join(format!("farmlb-health-{}", std::process::id()));
        let _ = std::fs::remove_file(&flag);
        let t = target(
            sh(&format!("(sleep 0.4; touch {}) & wait", flag.display())),
            false,
            100,
        );
        assert!(!block_on(probe(&t)).is_up());
        std::thread::sleep(Duration::from_millis(800));
        assert!(!flag.exists(), "the check's child outlived the timeout");
    }
}
