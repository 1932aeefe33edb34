//! Process lifecycle shared by both binaries (`punch-rendezvous` and
//! `punchd`): the one shutdown trigger, and readiness reports to a service
//! manager.
//!
//! Under systemd (`Type=notify`) a unit counts as started only once the
//! process says `READY=1`; anything ordered after it (or a health check
//! waiting on it) then knows the listeners are bound. Outside systemd
//! `NOTIFY_SOCKET` is unset and these calls do nothing.

use sd_notify::NotifyState;

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
}

/// SIGHUP, the conventional "re-read your configuration" (systemd's
/// `ExecReload=kill -HUP $MAINPID`). Each signal is one `recv()`.
pub fn reload_signals() -> std::io::Result<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
}

/// Tells the service manager (if any) that a reload started; follow with
/// [`notify_ready`] when it is done.
pub fn notify_reloading() {
    notify(&[NotifyState::Reloading]);
}

/// Tells the service manager (if any) that start-up is complete, with a
/// one-line status shown by `systemctl status`.
pub fn notify_ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Tells the service manager (if any) that the process is shutting down, so
/// a slow drain is not mistaken for a hang.
pub fn notify_stopping(status: &str) {
    notify(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

fn notify(states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "could not notify the service manager (NOTIFY_SOCKET is set); systemd may time the unit out");
    }
}
