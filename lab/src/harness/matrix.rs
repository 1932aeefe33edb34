//! The scenario matrix from DESIGN.md, by name: the networks the lab knows
//! and what each must end in. Kept in the harness because the scenario
//! suite, the realism suite (its direct ones on emulated links) and
//! `punch-lab-tool run/check/punches` all pick from it.

use crate::harness::punchd_types::Transport;
use crate::harness::spec::{Expect, Scenario};
use crate::net::nat::NatBehaviour as N;
use crate::net::topology::{Layout as L, Links};

/// Every named scenario.
pub fn scenarios() -> Vec<Scenario> {
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
        Scenario::new("quic-bbr", L::TwoNats(N::Masquerade), Expect::Direct)
            .with_transports(&[Quic])
            .with_punch("quic_congestion = \"bbr\"")
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
