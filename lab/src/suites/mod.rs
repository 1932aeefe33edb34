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
//! - [`integrity`]: tunnels cut mid-download (NAT flushed, path
//!   blackholed, peer killed) on TCP, QUIC and the relay: intact or an
//!   error, never a clean EOF on less (`tests/integrity.rs`).
//! - [`same_nat`]: two hosts behind one NAT restarted N times, the punch
//!   racing the peer's UDP observation; none may end relayed
//!   (`tests/integrity.rs`, `punch-lab-tool same-nat-stress`).
//! - [`udp`]: UDP forwarding with `dnsmasq`/`dig` and `iperf3 -u` on the
//!   TCP, QUIC and relayed paths (`tests/udp.rs`).
//! - [`loadgen`]: many signed rendezvous clients, for scale benchmarks
//!   (`punch-lab-tool loadgen`).
//! - [`attack`]: a peer gone rogue claims addresses on alice's LAN and a
//!   third party's; alice must send them nothing (`tests/attack.rs`,
//!   `punch-lab-tool rogue`).

pub mod attack;
pub mod bench;
pub mod integrity;
pub mod ipv6;
pub mod loadgen;
pub mod netcheck;
pub mod portmap;
pub mod realism;
pub mod recovery;
pub mod same_nat;
pub mod scenarios;
pub mod soak;
pub mod trust;
pub mod udp;
