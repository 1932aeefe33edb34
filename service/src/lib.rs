//! punch-service: the few things both binaries (`punchd` and
//! `punch-rendezvous`) need to run as a service, kept apart from either so
//! the daemon links no rendezvous server code.
//!
//! - [`lifecycle`]: the one shutdown trigger (Ctrl-C / SIGTERM), the reload
//!   trigger (SIGHUP) and
//!   readiness reports to systemd (`Type=notify`).
//! - [`prometheus`]: the one writer of the Prometheus text exposition format
//!   behind both `/metrics` endpoints.
//! - [`secret_file`]: reading and writing keys and tokens (the 0600 rule).

pub mod lifecycle;
pub mod prometheus;
pub mod secret_file;

pub use lifecycle::{
    notify_ready, notify_reloading, notify_stopping, reload_signals, shutdown_signal,
};
