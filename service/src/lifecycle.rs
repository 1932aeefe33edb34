//! Process lifecycle shared by both binaries (`punch-rendezvous` and
//! `punchd`): the one shutdown trigger, and readiness reports to a service
//! manager.
//!
//! Under systemd (`Type=notify`) a unit counts as started only once the
//! process says `READY=1`; anything ordered after it (or a health check
//! waiting on it) then knows the listeners are bound. Outside systemd
//! `NOTIFY_SOCKET` is unset and these calls do nothing.

use sd_notify::NotifyState;

/// Watches for Ctrl-C (SIGINT) and SIGTERM; the future resolves on either.
///
/// Both are watched from this call on, not from the future's first poll:
/// a binary calls it before it says READY, because a service manager may
/// send SIGTERM the moment it hears READY (`systemctl stop` right after a
/// start), and a signal not yet watched takes its default action: the
/// process exits at once, with nothing drained and no STOPPING said. (An
/// `async fn` here once installed the handlers on first poll, after READY,
/// and a CI run lost the daemon that way.) Needs a tokio runtime.
pub fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()> + Send + 'static>
{
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    })
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::Duration;

    /// A SIGTERM that arrives after the call and before anything polls
    /// the future is caught, not the end of the process (which would end
    /// this test binary with it).
    #[tokio::test]
    async fn a_sigterm_before_the_first_poll_is_caught() {
        let shutdown = super::shutdown_signal().unwrap();
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &std::process::id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        tokio::time::timeout(Duration::from_secs(10), shutdown)
            .await
            .expect("the SIGTERM was not reported");
    }
}
