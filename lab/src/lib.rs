//! punch-lab: a NAT lab built from Linux network namespaces, for testing
//! punchd against real NAT behaviour.
//!
//! Three parts, imports running one way (net ← harness ← suites):
//!
//! - [`net`]: building the network. Namespaces, the address plan and its
//!   layouts, the NATs' nftables rule sets, the link emulator (NFQUEUE).
//!   Knows nothing of punchd.
//! - [`harness`]: the real binaries on that network. A [`harness::Run`]
//!   is one scenario up (rendezvous, bob's sink, both daemons); status is
//!   read into the daemon's own types; the checks every suite shares
//!   (direct means direct, no LISTEN on the punch port, the rendezvous
//!   under 1 %, checksums) live here once.
//! - [`suites`]: what is asserted or measured: the scenario matrix,
//!   realism (delay, loss, punch timing), recovery, the fault-injecting
//!   soak, benchmarks, the rendezvous load generator. Each uses the
//!   harness, never another suite.
//!
//! `bin/punch-lab-tool.rs` is the CLI: the sink, sender and link emulator
//! that run inside namespaces, and the suites by hand.
//!
//! Where to start reading: [`harness::spec`] (what a scenario is), then
//! [`harness::run`] (how one comes up) and [`harness::checks`] (what is
//! checked from outside), then [`suites::scenarios`].
//!
//! Everything a run creates carries a per-scenario prefix and is removed
//! when the [`net::topology::Topology`] is dropped (also on panic), on
//! Ctrl-C, and, after a crash, at the start of the next run with the same
//! prefix.

pub mod harness;
pub mod net;
pub mod suites;
