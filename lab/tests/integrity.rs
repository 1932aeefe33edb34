//! No silent truncation when a tunnel is cut, and the same-NAT punch that
//! races the UDP observation (lab, root).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use punch_lab::harness::Binaries;
use punch_lab::suites::integrity::{self, Over};
use punch_lab::suites::same_nat;

fn case(name: &str, f: impl FnOnce(&Binaries) -> anyhow::Result<String>) {
    punch_lab::harness::preflight::case("integrity", name, env!("CARGO_BIN_EXE_punch-lab-tool"), f);
}

#[test]
fn cut_tcp_tunnels_end_downloads_intact_or_in_an_error() {
    case("tcp", |b| integrity::cuts(b, Over::Tcp));
}

#[test]
fn cut_quic_tunnels_end_downloads_intact_or_in_an_error() {
    case("quic", |b| integrity::cuts(b, Over::Quic));
}

#[test]
fn cut_relayed_tunnels_end_downloads_intact_or_in_an_error() {
    case("relayed", |b| integrity::cuts(b, Over::Relayed));
}

#[test]
fn same_nat_punches_racing_the_udp_observation_end_direct() {
    case("same-nat-stress", |b| same_nat::none_relayed(b, 8));
}
