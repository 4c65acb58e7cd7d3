//! One `farmlb run` process inside a network namespace: the core that both the director
//! runner ([`crate::Daemon`]) and the farm node runner ([`crate::farm_rig::FarmNode`]) wrap.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::Duration,
};

use anyhow::{bail, Context, Result};

use crate::{
    daemon::farmlb_bin,
    wait::{poll, wait_until},
};

/// How long a process gets to exit after a signal before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A running (or stopped) `farmlb run --config FILE`, its output going to a log file.
pub struct Process {
    /// `farmlb` or `farmlb on n1`: how error messages name it.
    name: String,
    child: Option<Child>,
    config_path: PathBuf,
    log_path: PathBuf,
    /// The daemon's `pin_path`: [`Process::stop`] removes its data plane too.
    pin_dir: PathBuf,
}

impl Process {
    /// Start `farmlb run --config <config_path> <args>` in namespace `ns`, logging to
    /// `log_path`.
    pub fn spawn(
        name: &str,
        ns: &str,
        config_path: &Path,
        log_path: &Path,
        pin_dir: &Path,
        args: &[&str],
    ) -> Result<Process> {
        Self::spawn_env(name, ns, config_path, log_path, pin_dir, args, &[])
    }

    /// [`Process::spawn`] with extra environment variables (e.g. `NOTIFY_SOCKET`).
    pub fn spawn_env(
        name: &str,
        ns: &str,
        config_path: &Path,
        log_path: &Path,
        pin_dir: &Path,
        args: &[&str],
        env: &[(&str, String)],
    ) -> Result<Process> {
        let bin = farmlb_bin();
        if !bin.exists() {
            bail!(
                "farmlb binary {} not found (build it with `cargo build -p lb-userspace`, \
                 or set FARMLB_BIN)",
                bin.display()
            );
        }
        let log = fs::File::create(log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(&bin)
            .arg("run")
            .arg("--config")
            .arg(config_path)
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or("info".into()),
            )
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Process {
            name: name.into(),
            child: Some(child),
            config_path: config_path.to_path_buf(),
            log_path: log_path.to_path_buf(),
            pin_dir: pin_dir.to_path_buf(),
        })
    }

    /// Wait until `attached` holds (the XDP program shows on the interface); fails with the
    /// log if the process exits first or `within` passes.
    pub fn wait_attached(
        &mut self,
        within: Duration,
        mut attached: impl FnMut() -> Result<bool>,
    ) -> Result<()> {
        let what = format!("{} to attach", self.name);
        let res = poll(within, Duration::from_millis(50), &what, || {
            self.exited("before attaching")?;
            attached()
        });
        res.map(drop)
            .with_context(|| format!("log of {}:\n{}", self.name, self.log()))
    }

    /// Fail (with the log) if the process has exited; `when` says when that was noticed.
    pub fn exited(&mut self, when: &str) -> Result<()> {
        let Some(child) = self.child.as_mut() else {
            bail!("{} is not running", self.name);
        };
        if let Some(st) = child.try_wait()? {
            self.child = None;
            bail!("{} exited ({st}) {when}; log:\n{}", self.name, self.log());
        }
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the process printed so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_else(|e| format!("(no log: {e})"))
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn signal(&self, sig: libc::c_int) -> Result<()> {
        let pid = self
            .pid()
            .with_context(|| format!("{} not running", self.name))?;
        // SAFETY: signalling our own child, which has not been reaped yet.
        if unsafe { libc::kill(pid as libc::pid_t, sig) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(())
    }

    /// Rewrite the config file with `contents` and send SIGHUP; fails if the process is gone
    /// shortly afterwards.
    pub fn reload(&mut self, contents: &str) -> Result<()> {
        fs::write(&self.config_path, contents)
            .with_context(|| format!("writing {}", self.config_path.display()))?;
        self.signal(libc::SIGHUP)?;
        thread::sleep(Duration::from_millis(500));
        self.exited("on SIGHUP")
    }

    /// SIGKILL (a farm node says no goodbye to the farm; the data plane stays pinned).
    pub fn kill9(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// Stop farmlb and its data plane, as an operator taking it out of service does
    /// (`farmlb stop --detach`): SIGTERM, wait for the exit, remove the pins. `None` if it
    /// was not running; fails unless it exits cleanly.
    pub fn stop(&mut self) -> Result<Option<ExitStatus>> {
        let st = self.exit(libc::SIGTERM)?;
        farmlb::dataplane::pin::remove(&self.pin_dir)?;
        Ok(st)
    }

    /// Send `sig` (SIGTERM, SIGINT) and wait for a clean exit; the data plane stays pinned
    /// and forwarding. `None` if it was not running.
    pub fn exit(&mut self, sig: libc::c_int) -> Result<Option<ExitStatus>> {
        let Some(mut child) = self.child.take() else {
            return Ok(None);
        };
        // SAFETY: as in `signal`.
        unsafe { libc::kill(child.id() as libc::pid_t, sig) };
        let exited = wait_until(STOP_TIMEOUT, "exit after the signal", || {
            Ok(child.try_wait()?.is_some())
        });
        if exited.is_err() {
            let _ = child.kill();
            let st = child.wait()?;
            bail!(
                "{} ignored signal {sig} for {STOP_TIMEOUT:?} ({st}); log:\n{}",
                self.name,
                self.log()
            );
        }
        let status = child.wait()?;
        if !status.success() {
            bail!("{} exited with {status}; log:\n{}", self.name, self.log());
        }
        Ok(Some(status))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
