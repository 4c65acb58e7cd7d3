//! Running code and commands inside named network namespaces (`/run/netns/<name>`).

use std::{
    fs::File,
    os::fd::AsRawFd,
    process::{Command, Stdio},
    thread,
};

use anyhow::{anyhow, bail, Context, Result};

/// Move the calling thread into namespace `name`. Only the thread changes namespace: sockets it
/// creates afterwards belong to `name` for their whole life, whichever thread later uses them.
fn enter(name: &str) -> Result<()> {
    let path = format!("/run/netns/{name}");
    let f = File::open(&path).with_context(|| format!("opening {path}"))?;
    // SAFETY: plain syscall on a descriptor we own.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("setns into {name}"));
    }
    Ok(())
}

/// Run `f` on a fresh thread that first joins network namespace `name`, and wait for it.
/// Sockets created by `f` stay in that namespace and may be returned to the caller.
pub fn in_netns<F, T>(name: &str, f: F) -> Result<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    spawn_in_netns(name, f)?
        .join()
        .with_context(|| format!("in netns {name}"))
}

/// Handle of a thread started by [`spawn_in_netns`].
pub struct NetnsThread<T>(thread::JoinHandle<Option<T>>);

impl<T> NetnsThread<T> {
    /// Wait for the thread; fails if it panicked.
    pub fn join(self) -> Result<T> {
        match self.0.join() {
            Ok(Some(v)) => Ok(v),
            Ok(None) => bail!("thread never entered its namespace"),
            Err(_) => bail!("thread in network namespace panicked"),
        }
    }

    pub fn is_finished(&self) -> bool {
        self.0.is_finished()
    }
}

/// Like [`in_netns`] but returns the thread's handle instead of waiting. Fails (without running
/// `f`) when the namespace cannot be entered.
pub fn spawn_in_netns<F, T>(name: &str, f: F) -> Result<NetnsThread<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::channel::<Result<()>>();
    let owned = name.to_string();
    let handle = thread::Builder::new()
        .name(format!("netns-{name}"))
        .spawn(move || {
            let entered = enter(&owned);
            let ok = entered.is_ok();
            let _ = tx.send(entered);
            ok.then(f)
        })
        .context("spawning thread")?;
    rx.recv()
        .map_err(|_| anyhow!("netns thread for {name} died"))??;
    Ok(NetnsThread(handle))
}

/// Names of all named network namespaces (`ip netns list`).
pub fn list() -> Result<Vec<String>> {
    let out = run(&["ip", "netns", "list"])?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

/// Run a command, failing with its stderr when it exits non-zero; returns stdout.
pub fn run(args: &[&str]) -> Result<String> {
    run_with_input(args, None)
}

/// Run a command with `input` on its standard input (e.g. `ip -batch -`).
pub fn run_with_input(args: &[&str], input: Option<&str>) -> Result<String> {
    let (prog, rest) = args.split_first().ok_or_else(|| anyhow!("empty command"))?;
    let mut cmd = Command::new(prog);
    cmd.args(rest)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
    let mut child = cmd
        .spawn()
        .with_context(|| format!("spawning {}", args.join(" ")))?;
    if let Some(text) = input {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("piped");
        stdin
            .write_all(text.as_bytes())
            .with_context(|| format!("writing stdin of {}", args.join(" ")))?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Run a command inside namespace `ns` (`ip netns exec ns …`); returns stdout.
pub fn exec(ns: &str, args: &[&str]) -> Result<String> {
    let mut full = vec!["ip", "netns", "exec", ns];
    full.extend_from_slice(args);
    run(&full)
}
