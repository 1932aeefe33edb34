//! UDP forwarding through the two-NAT lab with dnsmasq, dig and iperf3,
//! on each path (lab, root).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use punch_lab::harness::Binaries;
use punch_lab::suites::udp::{self, Over};

fn case(name: &str, f: impl FnOnce(&Binaries) -> anyhow::Result<String>) {
    punch_lab::harness::preflight::case("udp", name, env!("CARGO_BIN_EXE_punch-lab-tool"), f);
}

#[test]
fn dns_and_iperf3_through_a_udp_forward_over_tcp() {
    case("tcp", |b| udp::check(b, Over::Tcp));
}

#[test]
fn dns_and_iperf3_through_a_udp_forward_over_quic() {
    case("quic", |b| udp::check(b, Over::Quic));
}

#[test]
fn dns_and_iperf3_through_a_udp_forward_over_the_relay() {
    case("relayed", |b| udp::check(b, Over::Relayed));
}

/// The longer figures for BENCHMARKS.md (not in CI):
/// `PUNCH_LAB_UDP_SECS=20 cargo test -p punch-lab --test udp -- --ignored --nocapture`.
#[test]
#[ignore = "a benchmark: prints figures, asserts nothing beyond the runs working"]
fn udp_loss_benchmark() {
    let secs = std::env::var("PUNCH_LAB_UDP_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    case("bench", |b| udp::bench(b, 100, secs));
}
