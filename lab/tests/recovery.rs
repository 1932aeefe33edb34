//! Staying connected when the network or a process breaks (lab, root).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write as _;

use punch_lab::harness::Binaries;
use punch_lab::net::nat::NatBehaviour;
use punch_lab::suites::recovery::{self, Over};

fn case(name: &str, f: impl FnOnce(&Binaries) -> anyhow::Result<String>) {
    let test = format!("lab recovery {name}");
    let Some((_serial, bins)) =
        punch_lab::harness::prepare(&test, env!("CARGO_BIN_EXE_punch-lab-tool"))
    else {
        return;
    };
    match f(&bins) {
        // Written straight to stderr so the figure shows even when the
        // test harness captures output.
        Ok(line) => {
            let _ = writeln!(std::io::stderr(), "LAB recovery: {line}");
        }
        Err(e) => panic!("{test} failed: {e:#}"),
    }
}

#[test]
fn nat_mappings_flushed_mid_transfer_end_in_a_working_tunnel() {
    case("conntrack-flush", |b| {
        recovery::conntrack_flush(b, Over::Tcp)
    });
}

#[test]
fn nat_mappings_flushed_under_quic_end_in_a_working_tunnel() {
    case("conntrack-flush-quic", |b| {
        recovery::conntrack_flush(b, Over::Quic)
    });
}

#[test]
fn a_nat_holding_stale_state_for_the_punch_ports_is_waited_out() {
    case("stale-entry", recovery::stale_nat_entry);
}

#[test]
fn a_punched_connection_that_carries_nothing_is_punched_again() {
    case("dead-connection", |b| {
        recovery::dead_connection_is_punched_again(b, NatBehaviour::DropUnsolicited)
    });
}

/// Not in CI: between two RST-answering Linux NATs at zero delay the
/// re-punch sometimes meets the SYN_SENT2 lock-out (BENCHMARKS.md, punch
/// timing): 4 of 6 runs direct in 5.04–5.09 s, 2 of 6 took 13.3 s and 24.5 s
/// (relay, then upgrade). A test that fails one CI run in three holds
/// nothing; run it by hand with `--ignored` to see the rate.
#[test]
#[ignore = "fails ~1 run in 3 between RST NATs at zero delay (SYN_SENT2 lock-out); run with --ignored"]
fn a_punched_connection_that_carries_nothing_is_punched_again_through_rst_nats() {
    case("dead-connection-rst", |b| {
        recovery::dead_connection_is_punched_again(b, NatBehaviour::RejectRst)
    });
}

#[test]
fn a_restarted_peer_is_reachable_again_soon() {
    case("peer-restart", |b| recovery::peer_restart(b, Over::Tcp));
}

#[test]
fn a_restarted_peer_is_reachable_again_soon_over_quic() {
    case("peer-restart-quic", |b| {
        recovery::peer_restart(b, Over::Quic)
    });
}

#[test]
fn a_restarted_rendezvous_leaves_direct_tunnels_up_and_daemons_re_register() {
    case("rendezvous-restart", recovery::rendezvous_restart);
}

#[test]
fn a_killed_rendezvous_instance_fails_its_daemons_over_to_the_next() {
    case("rendezvous-failover", recovery::rendezvous_failover);
}

#[test]
fn a_rendezvous_cluster_punches_across_instances_and_survives_an_instance_and_redis() {
    case("rendezvous-cluster", recovery::rendezvous_cluster);
}

#[test]
fn sigterm_drains_open_streams_and_exits_0() {
    case("sigterm", recovery::sigterm_drains);
}
