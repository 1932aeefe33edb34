//! The suites: what the lab asserts or measures, each built on the
//! [`crate::harness`] alone, never on another suite.
//!
//! - [`scenarios`]: the NAT matrix end to end (`tests/scenarios.rs`).
//! - [`realism`]: the matrix on delayed, lossy links; punch timing
//!   (`tests/realism.rs`, `punch-lab-tool punches`).
//! - [`recovery`]: NAT state flushed, peer and rendezvous restarted,
//!   SIGTERM, a dead punched connection (`tests/recovery.rs`).
//! - [`soak`]: checked streams both ways for minutes while faults hit at
//!   seeded random times (`tests/soak.rs`, `punch-lab-tool soak`).
//! - [`bench`](mod@bench): throughput and latency side by side (plain TCP,
//!   punchd direct and relayed, `ssh -L`, rathole), in the lab and on
//!   loopback, printed (`punch-lab-tool bench`).
//! - [`loadgen`]: many signed rendezvous clients, for scale benchmarks
//!   (`punch-lab-tool loadgen`).

pub mod bench;
pub mod loadgen;
pub mod realism;
pub mod recovery;
pub mod scenarios;
pub mod soak;
