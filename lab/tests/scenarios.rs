//! The NAT scenario matrix, each in its own namespaces, run one at a time
//! (they share the machine's two cores, and the punch timing should not be
//! measured under a neighbour's 64 MiB transfer).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write as _;

use punch_lab::suites::scenarios;

fn scenario(name: &str) {
    let test = format!("lab scenario {name}");
    let Some((_serial, bins)) =
        punch_lab::harness::prepare(&test, env!("CARGO_BIN_EXE_punch-lab-tool"))
    else {
        return;
    };
    match scenarios::run_named(name, &bins) {
        Ok(report) => {
            let _ = writeln!(std::io::stderr(), "LAB {report}");
        }
        Err(e) => panic!("{test} failed: {e:#}"),
    }
}

#[test]
fn both_behind_port_preserving_masquerade_is_direct() {
    scenario("masquerade");
}

#[test]
fn nats_dropping_unsolicited_syns_is_direct() {
    scenario("drop");
}

#[test]
fn nats_answering_unsolicited_syns_with_rst_is_direct() {
    scenario("rst");
}

#[test]
fn both_behind_the_same_nat_is_direct() {
    scenario("same-nat");
}

#[test]
fn one_public_host_is_direct() {
    scenario("public");
}

#[test]
fn double_nat_is_direct() {
    scenario("double-nat");
}

#[test]
fn port_randomizing_nats_fall_back_to_the_relay_which_sees_only_ciphertext() {
    scenario("random");
}

#[test]
fn direct_only_refuses_to_relay_and_says_so() {
    scenario("direct-only");
}

#[test]
fn quic_alone_through_port_preserving_nats_is_direct() {
    scenario("quic");
}

#[test]
fn quic_with_cubic_is_direct() {
    scenario("quic-cubic");
}

#[test]
fn racing_tcp_and_quic_keeps_one_path_and_closes_the_other() {
    scenario("race");
}

#[test]
fn nats_passing_no_tcp_but_udp_are_direct_over_quic() {
    scenario("tcp-blocked");
}

// The shipped default (`transports` unset: TCP raced with QUIC) through
// every direct network.

#[test]
fn default_transports_through_port_preserving_masquerade_is_direct() {
    scenario("masquerade-default");
}

#[test]
fn default_transports_through_nats_dropping_unsolicited_syns_is_direct() {
    scenario("drop-default");
}

#[test]
fn default_transports_through_rst_nats_is_direct() {
    scenario("rst-default");
}

#[test]
fn default_transports_behind_the_same_nat_is_direct() {
    scenario("same-nat-default");
}

#[test]
fn default_transports_with_one_public_host_is_direct() {
    scenario("public-default");
}

#[test]
fn default_transports_through_double_nat_is_direct() {
    scenario("double-nat-default");
}

#[test]
fn quic_alone_through_double_nat_is_direct() {
    scenario("double-nat-quic");
}

#[test]
fn quic_alone_behind_the_same_nat_is_direct() {
    scenario("same-nat-quic");
}
