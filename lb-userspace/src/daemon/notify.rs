//! systemd readiness protocol (`Type=notify`, sd_notify(3)): READY=1 once the data plane is
//! attached and the loop serves, RELOADING=1 / READY=1 around every reload, STOPPING=1 on the
//! way out. Without `NOTIFY_SOCKET` (not started by systemd) every call does nothing.

use sd_notify::NotifyState;

fn send(states: &[NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("telling systemd {states:?}: {e}");
    }
}

pub fn ready() {
    send(&[NotifyState::Ready]);
}

pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// RELOADING=1 (with the MONOTONIC_USEC= systemd 253+ requires) now, READY=1 when dropped:
/// whether the reload was applied or refused, the daemon serves again afterwards.
pub struct Reloading(());

impl Reloading {
    pub fn start() -> Reloading {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => send(&[NotifyState::Reloading, now]),
            Err(_) => send(&[NotifyState::Reloading]),
        }
        Reloading(())
    }
}

impl Drop for Reloading {
    fn drop(&mut self) {
        ready();
    }
}
