//! The link emulator itself: does it delay and drop what it is asked to?

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write as _;
use std::path::Path;
use std::time::Duration;

use punch_lab::net::linkem::Impairment;
use punch_lab::net::nat::NatBehaviour;
use punch_lab::net::topology::{Layout, Link, Links, Topology};

fn tool() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_punch-lab-tool"))
}

/// (sent, received, median RTT ms) from `ping` inside hostA.
fn ping(topo: &Topology, dst: &str, count: u32, interval: &str) -> (u32, u32, f64) {
    let p = topo.ping(dst, count, interval).unwrap();
    (p.sent, p.received, p.median_ms)
}

fn lab(name: &str) -> Option<(std::sync::MutexGuard<'static, ()>, Topology)> {
    let (guard, _bins) = punch_lab::harness::prepare(name, env!("CARGO_BIN_EXE_punch-lab-tool"))?;
    let topo = Topology::build(
        &format!("pl-{name}-"),
        Layout::TwoNats(NatBehaviour::Masquerade),
    )
    .unwrap();
    Some((guard, topo))
}

#[test]
fn delay_gives_the_asked_rtt_within_10_percent() {
    let Some((_g, mut topo)) = lab("linkem-rtt") else {
        return;
    };
    let links = Links {
        a: Link::symmetric_ms(20),
        b: Link::symmetric_ms(5),
        rv: Link::NONE,
    };
    topo.emulate(&links, tool(), &std::env::temp_dir()).unwrap();
    // hostA → rendezvous crosses natA's link twice: 40 ms.
    let (_, received, rtt) = ping(&topo, "203.0.113.1", 50, "0.05");
    assert_eq!(received, 50);
    assert!((rtt - 40.0).abs() <= 4.0, "rtt {rtt} ms, want 40 ± 10%");
    // hostA → natB's public address crosses natA's and natB's links: 50 ms.
    let (_, _, rtt_b) = ping(&topo, "203.0.113.3", 50, "0.05");
    assert!((rtt_b - 50.0).abs() <= 5.0, "rtt {rtt_b} ms, want 50 ± 10%");
    let _ = writeln!(
        std::io::stderr(),
        "LAB linkem: asked 40 ms → ping {rtt:.2} ms; asked 50 ms → ping {rtt_b:.2} ms"
    );
}

#[test]
fn loss_drops_the_asked_fraction() {
    let Some((_g, mut topo)) = lab("linkem-loss") else {
        return;
    };
    let lossy = Link {
        up: Impairment {
            loss: 0.10,
            ..Impairment::NONE
        },
        down: Impairment::NONE,
    };
    topo.emulate(
        &Links {
            a: lossy,
            b: Link::NONE,
            rv: Link::NONE,
        },
        tool(),
        &std::env::temp_dir(),
    )
    .unwrap();
    let (sent, received, _) = ping(&topo, "203.0.113.1", 1000, "0.005");
    let lost = f64::from(sent - received) / f64::from(sent) * 100.0;
    assert!(
        (lost - 10.0).abs() <= 3.0,
        "lost {lost:.1}% of {sent}, want 10 ± 3"
    );
    let _ = writeln!(
        std::io::stderr(),
        "LAB linkem: asked 10% loss → {lost:.1}% of {sent} pings lost"
    );
    std::thread::sleep(Duration::from_millis(10));
}
