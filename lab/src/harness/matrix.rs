//! The scenario matrix from DESIGN.md, by name: the networks the lab knows
//! and what each must end in. Kept in the harness because the scenario
//! suite, the realism suite (its direct ones on emulated links) and
//! `punch-lab-tool run/check/punches` all pick from it.

use crate::harness::punchd_types::Transport;
use crate::harness::spec::{Expect, Scenario};
use crate::net::nat::NatBehaviour as N;
use crate::net::topology::{Layout as L, Links};

/// The networks every transport setting runs through, all expected direct.
fn direct_networks() -> Vec<(&'static str, L)> {
    vec![
        ("masquerade", L::TwoNats(N::Masquerade)),
        ("drop", L::TwoNats(N::DropUnsolicited)),
        ("rst", L::TwoNats(N::RejectRst)),
        ("same-nat", L::SameNat),
        ("public", L::OnePublic),
        ("double-nat", L::DoubleNat),
    ]
}

/// Every named scenario.
pub fn scenarios() -> Vec<Scenario> {
    use Transport::{Quic, Tcp};
    let mut all = named();
    // What ships: `transports` unset races TCP against QUIC. Each direct
    // network again with the default, at the same zero delay as its
    // TCP-only run: either may win, both ends must name the same one and
    // the loser must be closed (`checks::one_path_kept`).
    for (name, layout) in direct_networks() {
        all.push(
            Scenario::new(&format!("{name}-default"), layout, Expect::Direct)
                .with_transports(&[Tcp, Quic]),
        );
    }
    // QUIC alone where its UDP mapping differs from the masquerade case:
    // through two NATs in a row, and between two hosts of one LAN (5 ms
    // links, as for every QUIC scenario: lab/README.md, "UDP and
    // conntrack").
    for (name, layout) in [
        ("double-nat-quic", L::DoubleNat),
        ("same-nat-quic", L::SameNat),
    ] {
        all.push(
            Scenario::new(name, layout, Expect::Direct)
                .with_transports(&[Quic])
                .with_links(Links::near()),
        );
    }
    all
}

/// The scenarios named one by one, without the transport variants of
/// [`scenarios`]: what the realism suite runs again on emulated links.
pub fn named() -> Vec<Scenario> {
    use Transport::{Quic, Tcp};
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
            .with_transports(&[Tcp, Quic]),
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
            .with_transports(&[Quic])
            .with_links(Links::near()),
        // `quic` runs the default controller, the host's TCP choice (BBR on
        // the lab's hosts); this one pins the other, CUBIC.
        Scenario::new("quic-cubic", L::TwoNats(N::Masquerade), Expect::Direct)
            .with_transports(&[Quic])
            .with_punch("quic_congestion = \"cubic\"")
            .with_links(Links::near()),
        Scenario::new("race", L::TwoNats(N::Masquerade), Expect::Direct)
            .with_transports(&[Tcp, Quic])
            .with_links(Links::near()),
        Scenario::new("tcp-blocked", L::TwoNats(N::TcpBlocked), Expect::Direct)
            .with_transports(&[Tcp, Quic])
            .expecting_transport(Quic)
            .with_links(Links::near()),
    ]
}

/// The scenario called `name`.
pub fn by_name(name: &str) -> Option<Scenario> {
    scenarios().into_iter().find(|s| s.name == name)
}
