//! A program running in a real pseudo-terminal (openpty), its output parsed into a screen
//! (vt100) as a terminal would show it: for driving full-screen commands like `farmlb top`.

use std::{
    fs::File,
    io::{Read, Write},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    os::unix::process::CommandExt,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

use anyhow::{bail, Context, Result};

use crate::wait::poll;

/// A child on the slave side of a pty; the parent holds the master and mirrors the screen.
pub struct Pty {
    child: Child,
    master: File,
    /// Kept open so the terminal's modes can be read after the child exits.
    slave: OwnedFd,
    screen: Arc<Mutex<vt100::Parser>>,
}

fn winsize(rows: u16, cols: u16) -> libc::winsize {
    libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

fn nz(n: u16) -> std::num::NonZeroU16 {
    std::num::NonZeroU16::new(n.max(1)).expect("not zero")
}

impl Pty {
    /// Start `cmd` as the session leader of a new `rows`×`cols` terminal (its controlling
    /// terminal, stdin, stdout and stderr).
    pub fn spawn(mut cmd: Command, rows: u16, cols: u16) -> Result<Pty> {
        let (mut m, mut s) = (0, 0);
        let ws = winsize(rows, cols);
        // SAFETY: openpty writes two descriptors we then own.
        let rc =
            unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), &ws) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("openpty");
        }
        // SAFETY: fresh descriptors from openpty.
        let (master, slave) = unsafe { (File::from_raw_fd(m), OwnedFd::from_raw_fd(s)) };
        let stdio = |fd: &OwnedFd| -> Result<Stdio> { Ok(Stdio::from(fd.try_clone()?)) };
        cmd.stdin(stdio(&slave)?)
            .stdout(stdio(&slave)?)
            .stderr(stdio(&slave)?)
            .env("TERM", "xterm-256color");
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().context("starting the program in the pty")?;
        let screen = Arc::new(Mutex::new(vt100::Parser::new(nz(rows), nz(cols), 0)));
        let mut reader = master.try_clone()?;
        let sink = screen.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 8192];
            // Ends with EIO once the pty is closed on every side.
            while let Ok(n @ 1..) = reader.read(&mut buf) {
                sink.lock().unwrap().process(&buf[..n]);
            }
        });
        Ok(Pty {
            child,
            master,
            slave,
            screen,
        })
    }

    /// Type `bytes` on the terminal.
    pub fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.master.write_all(bytes).context("writing to the pty")
    }

    /// Change the terminal's size (the child gets SIGWINCH) and the mirrored screen's.
    pub fn resize(&mut self, rows: u16, cols: u16) -> Result<()> {
        self.screen.lock().unwrap().set_size(nz(rows), nz(cols));
        let ws = winsize(rows, cols);
        // SAFETY: TIOCSWINSZ reads a winsize from the pointer.
        if unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &ws) } != 0 {
            return Err(std::io::Error::last_os_error()).context("TIOCSWINSZ");
        }
        Ok(())
    }

    /// The screen's text, one line per row.
    pub fn text(&self) -> String {
        self.screen.lock().unwrap().screen().contents()
    }

    /// Run `f` on the mirrored screen.
    pub fn with_screen<T>(&self, f: impl FnOnce(&vt100::Screen) -> T) -> T {
        f(self.screen.lock().unwrap().screen())
    }

    /// Wait until the screen's text satisfies `ok`; the time it took. Fails with the screen.
    pub fn wait_for(
        &mut self,
        within: Duration,
        what: &str,
        mut ok: impl FnMut(&str) -> bool,
    ) -> Result<Duration> {
        let res = poll(within, Duration::from_millis(20), what, || {
            if let Some(st) = self.child.try_wait()? {
                bail!("the program exited ({st}) while waiting for {what}");
            }
            Ok(ok(&self.text()))
        });
        res.with_context(|| format!("screen:\n{}", self.text()))
    }

    /// Wait for the child to exit; kills it after `within`.
    pub fn wait_exit(&mut self, within: Duration) -> Result<ExitStatus> {
        let child = &mut self.child;
        let waited = poll(
            within,
            Duration::from_millis(10),
            "the program to exit",
            || Ok(child.try_wait()?.is_some()),
        );
        if let Err(e) = waited {
            let _ = self.child.kill();
            let _ = self.child.wait();
            return Err(e.context(format!("screen:\n{}", self.text())));
        }
        // Let the reader catch up with the last output.
        thread::sleep(Duration::from_millis(100));
        Ok(self.child.wait()?)
    }

    /// Whether the terminal is back in cooked mode (canonical input with echo), as a shell
    /// expects it after a full-screen program.
    pub fn cooked(&self) -> Result<bool> {
        // SAFETY: tcgetattr fills the termios we pass.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        if unsafe { libc::tcgetattr(self.slave.as_raw_fd(), &mut t) } != 0 {
            return Err(std::io::Error::last_os_error()).context("tcgetattr");
        }
        Ok(t.c_lflag & libc::ICANON != 0 && t.c_lflag & libc::ECHO != 0)
    }
}

impl Drop for Pty {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
