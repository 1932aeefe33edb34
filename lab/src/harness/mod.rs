//! The harness: the real binaries run on the lab's network, and the checks
//! made on them from outside. The suites use it; it uses [`crate::net`]
//! and never a suite.
//!
//! Read in this order:
//! - [`spec`]: a [`Scenario`] (network, daemon config, [`Expect`]ed
//!   outcome); [`matrix`]: the named ones.
//! - [`run`]: a [`Run`], one scenario up: rendezvous (binary or
//!   [`container`] image), bob's sink, both daemons from [`binaries`];
//!   status, transfers, restarts, and what to print on a failure.
//! - [`status`]: `punchd status --json` read into the daemon's own types,
//!   all imported from punchd in one place: [`punchd_types`].
//! - [`checks`]: a checked run (no LISTEN on the punch port), direct means
//!   direct, the rendezvous under 1 %, checksums, one path after a race;
//!   [`report`]: what a checked run measured.
//! - [`transfer`]: the sink, sender, echo and latency client that
//!   `punch-lab-tool` runs inside namespaces; [`stats`]: quantiles.
//! - [`preflight`]: can the lab run here, one test at a time, Ctrl-C
//!   cleanup.

pub mod binaries;
pub mod checks;
pub mod container;
pub mod matrix;
pub mod preflight;
pub mod punchd_types;
pub mod relay;
pub mod report;
pub mod run;
pub mod spec;
pub mod stats;
pub mod status;
pub mod transfer;

pub use binaries::Binaries;
pub use preflight::prepare;
pub use report::Report;
pub use run::Run;
pub use spec::{Expect, Scenario};
