//! IPv6 and dual stack in the lab (issue #20), one scenario per test, run
//! one at a time. Each prints an `IPV6` line: family and transport that
//! won, time to direct.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write as _;

use punch_lab::suites::ipv6;

fn scenario(name: &str) -> Option<punch_lab::harness::Report> {
    let test = format!("lab ipv6 {name}");
    let (_serial, bins) = punch_lab::harness::prepare(&test, env!("CARGO_BIN_EXE_punch-lab-tool"))?;
    match ipv6::run_named(name, &bins) {
        Ok(report) => {
            let _ = writeln!(std::io::stderr(), "LAB {report}");
            Some(report)
        }
        Err(e) => panic!("{test} failed: {e:#}"),
    }
}

#[test]
fn port_randomizing_nats_with_ipv6_go_direct_over_ipv6() {
    scenario("v6-random");
}

#[test]
fn a_rendezvous_name_with_a_and_aaaa_records_registers_both_families() {
    scenario("v6-name");
}

#[test]
fn ipv6_firewalls_that_reject_unsolicited_inbound_still_let_the_punch_through() {
    scenario("v6-random-reject");
}

#[test]
fn quic_punches_over_ipv6_where_ipv4_nats_randomize() {
    scenario("v6-random-quic");
}

#[test]
fn tcp_raced_with_quic_wins_over_ipv6_where_ipv4_nats_randomize() {
    scenario("v6-random-default");
}

#[test]
fn ipv6_only_hosts_go_direct() {
    scenario("v6-only");
}

#[test]
fn broken_ipv6_costs_at_most_the_head_start_before_ipv4() {
    let Some(base) = scenario("v6-broken-baseline") else {
        return;
    };
    let broken = scenario("v6-broken").expect("the lab ran the baseline");
    println!(
        "IPV6 head start: punch {} ms with IPv6 broken against {} ms IPv4 alone ({} ms more; the stated bound is 250 ms)",
        broken.punch_ms,
        base.punch_ms,
        broken.punch_ms as i64 - base.punch_ms as i64
    );
}

#[test]
fn an_ipv6_only_host_and_an_ipv4_only_host_are_relayed_by_a_dual_stack_rendezvous() {
    scenario("v6-mixed");
}

fn recovery(upset: ipv6::Upset) {
    let test = format!("lab ipv6 recovery {upset:?}");
    let Some((_serial, bins)) =
        punch_lab::harness::prepare(&test, env!("CARGO_BIN_EXE_punch-lab-tool"))
    else {
        return;
    };
    match ipv6::recovery(&bins, upset) {
        Ok(line) => {
            let _ = writeln!(std::io::stderr(), "LAB {line}");
        }
        Err(e) => panic!("{test} failed: {e:#}"),
    }
}

#[test]
fn a_restarted_peer_is_direct_over_ipv6_again_soon() {
    recovery(ipv6::Upset::PeerRestart);
}

#[test]
fn flushed_ipv6_firewall_state_ends_in_a_working_ipv6_tunnel() {
    recovery(ipv6::Upset::FirewallFlush);
}
