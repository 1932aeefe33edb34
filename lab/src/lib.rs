//! punch-lab: a NAT lab built from Linux network namespaces, for testing
//! punchd against real NAT behaviour.
//!
//! Where to start reading:
//! - [`netns`]: one namespace, commands and processes inside it, removal.
//! - [`topology`]: the address plan and the scenario layouts (two NATs,
//!   same NAT, one public host, double NAT) with their NAT flavours.
//! - [`nat`]: the nftables rule sets for each NAT flavour.
//! - [`scenario`]: runs the real binaries in a topology, moves a
//!   checksummed transfer and checks the guarantees from outside.
//! - [`realism`]: the matrix on delayed, lossy links; punch timing.
//! - [`recovery`]: NAT state flushed, peer and rendezvous restarted,
//!   SIGTERM, each checked from outside.
//! - [`bench`](mod@bench): throughput and latency side by side (plain TCP, punchd
//!   direct and relayed, `ssh -L`, rathole), in the lab and on loopback,
//!   printed.
//! - [`container`]: the rendezvous run from its container image inside
//!   the lab (what `deploy/test.sh` checks).
//! - [`linkem`]: delay, jitter and loss on a NAT's outside link (NFQUEUE).
//! - [`loadgen`]: many signed rendezvous clients, for scale benchmarks.
//! - [`transfer`]: the sink and sender used for that transfer, and the
//!   echo and request/response client of the latency benchmark (run inside
//!   namespaces by the `punch-lab-tool` binary).
//!
//! Everything a run creates carries a per-scenario prefix and is removed
//! when the [`topology::Topology`] is dropped (also on panic), on Ctrl-C,
//! and, after a crash, at the start of the next run with the same prefix.

pub mod bench;
pub mod container;
pub mod linkem;
pub mod loadgen;
pub mod nat;
pub mod netns;
pub mod realism;
pub mod recovery;
pub mod scenario;
pub mod topology;
pub mod transfer;

use std::path::Path;

/// Environment variable that turns a lab skip into a failure (set in CI).
pub const REQUIRE_ENV: &str = "PUNCH_LAB_REQUIRE";

/// Why the lab cannot run here, if it cannot.
pub fn unavailable() -> Option<String> {
    let uid = std::process::Command::new("id")
        .arg("-u")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    if uid.as_deref() != Some("0") {
        return Some("the NAT lab needs root (network namespaces and nftables)".to_owned());
    }
    for tool in ["ip", "nft", "ss", "conntrack"] {
        if !on_path(tool) {
            return Some(format!(
                "`{tool}` is not installed (apt-get install iproute2 nftables conntrack)"
            ));
        }
    }
    None
}

/// The scenario matrix from DESIGN.md, by name.
pub fn scenarios() -> Vec<scenario::Scenario> {
    use nat::NatBehaviour as N;
    use scenario::{Expect, Scenario};
    use topology::Layout as L;
    vec![
        Scenario::new("masquerade", L::TwoNats(N::Masquerade), Expect::Direct),
        Scenario::new("drop", L::TwoNats(N::DropUnsolicited), Expect::Direct),
        Scenario::new("rst", L::TwoNats(N::RejectRst), Expect::Direct),
        Scenario::new("same-nat", L::SameNat, Expect::Direct),
        Scenario::new("public", L::OnePublic, Expect::Direct),
        Scenario::new("double-nat", L::DoubleNat, Expect::Direct),
        // Neither TCP nor UDP can be punched through port-randomizing NATs.
        Scenario::new("random", L::TwoNats(N::RandomFully), Expect::Relayed)
            .with_timeout("3s")
            .with_transports(&["tcp", "quic"]),
        Scenario::new(
            "direct-only",
            L::TwoNats(N::RandomFully),
            Expect::PunchFails,
        )
        .with_timeout("3s")
        .with_punch("mode = \"direct-only\""),
        // The QUIC path: alone through plain NATs, raced against TCP, and
        // the way through when the NATs let no TCP through but the
        // rendezvous connection. With a little delay on each NAT's link
        // (10 ms host to host): at the lab's ~50 µs the two first UDP
        // datagrams often do not cross in flight, and a plain Linux NAT
        // then keeps a conntrack entry for the early one that makes it
        // re-map the local side's port (lab/README.md, "UDP and conntrack").
        Scenario::new("quic", L::TwoNats(N::Masquerade), Expect::Direct)
            .with_transports(&["quic"])
            .with_links(topology::Links::near()),
        Scenario::new("quic-bbr", L::TwoNats(N::Masquerade), Expect::Direct)
            .with_transports(&["quic"])
            .with_punch("quic_congestion = \"bbr\"")
            .with_links(topology::Links::near()),
        Scenario::new("race", L::TwoNats(N::Masquerade), Expect::Direct)
            .with_transports(&["tcp", "quic"])
            .with_links(topology::Links::near()),
        Scenario::new("tcp-blocked", L::TwoNats(N::TcpBlocked), Expect::Direct)
            .with_transports(&["tcp", "quic"])
            .expecting_transport("quic")
            .with_links(topology::Links::near()),
    ]
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| Path::new(&d).join(tool).is_file()))
}

/// Everything a lab test needs before it starts: the lab available (or a
/// printed skip), its turn (lab tests in one binary run one at a time:
/// they share two cores, and timing should not be measured under a
/// neighbour's transfer), the Ctrl-C cleanup, and the binaries beside
/// `tool` (`env!("CARGO_BIN_EXE_punch-lab-tool")`).
pub fn prepare(
    test: &str,
    tool: &str,
) -> Option<(std::sync::MutexGuard<'static, ()>, scenario::Binaries)> {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    if !available_or_skip(test) {
        return None;
    }
    let guard = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    scenario::cleanup_on_ctrl_c();
    match scenario::Binaries::beside(Path::new(tool)) {
        Ok(bins) => Some((guard, bins)),
        Err(e) => panic!("{test}: {e:#}"),
    }
}

/// Returns true if the lab can run; otherwise prints why and returns false,
/// or panics when [`REQUIRE_ENV`] is set (so CI cannot silently skip).
pub fn available_or_skip(test: &str) -> bool {
    match unavailable() {
        None => true,
        Some(reason) if std::env::var_os(REQUIRE_ENV).is_some() => {
            panic!(
                "{test}: the NAT lab is required ({REQUIRE_ENV} is set) but cannot run: {reason}"
            )
        }
        Some(reason) => {
            eprintln!("SKIP {test}: {reason}");
            false
        }
    }
}
