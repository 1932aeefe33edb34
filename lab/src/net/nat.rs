//! NAT flavours as nftables rule sets for a NAT namespace whose outside
//! interface is `wan0`.
//!
//! All of them masquerade outbound traffic. They differ in what happens to
//! an unsolicited inbound SYN (one that matches no mapping and so would be
//! delivered to the NAT box itself) and in how ports are chosen:
//! - `Masquerade`: plain Linux; the NAT's own stack answers with RST.
//! - `DropUnsolicited`: the SYN is dropped silently.
//! - `RejectRst`: an explicit `reject with tcp reset`.
//! - `RandomFully`: ports are randomized for every mapping, which defeats
//!   simultaneous open (the peer cannot know the port).
//! - `Firewall`: drops every unsolicited inbound packet to the NAT itself,
//!   like a home router's WAN firewall. The drop happens before conntrack
//!   confirms an entry, so an early punch (SYN or UDP datagram) leaves no
//!   state behind.
//! - `TcpBlocked`: a firewall that passes TCP only to and from the
//!   rendezvous server, and UDP freely: no TCP path can be punched, the
//!   QUIC path can.
//! - `Predictable`: endpoint-dependent mapping with sequential allocation,
//!   a real kernel data path: nftables `snat to <public>:numgen inc mod
//!   1000 offset 30000` gives every new flow (TCP or UDP) the next port,
//!   and the same 4-tuple keeps its mapping. On these kernels the port
//!   comes out byte-swapped (offset 30000 gave 12405, 12661, 12917: a
//!   step of 256), which is why NAT discovery learns the step rather than
//!   assuming +1. Like `Firewall`, it drops unsolicited inbound packets to
//!   itself before conntrack confirms them: an early punch datagram would
//!   otherwise leave an entry that takes the very port the next flow is
//!   due to get.

/// How a NAT treats traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatBehaviour {
    /// Port-preserving masquerade, no extra rules.
    Masquerade,
    /// Masquerade; unsolicited inbound SYNs are dropped.
    DropUnsolicited,
    /// Masquerade; unsolicited inbound SYNs get a RST.
    RejectRst,
    /// Masquerade with fully random source ports.
    RandomFully,
    /// Masquerade; unsolicited inbound packets of any kind are dropped.
    Firewall,
    /// Masquerade; TCP forwarded only to and from the rendezvous.
    TcpBlocked,
    /// A new, sequentially allocated port per flow (endpoint-dependent,
    /// predictable); needs the NAT's public address ([`ruleset_at`]).
    Predictable,
}

/// The rule set for a NAT namespace.
pub fn ruleset(b: NatBehaviour) -> String {
    ruleset_at(b, None)
}

/// The rule set for a NAT namespace whose public address is `public`
/// (needed by [`NatBehaviour::Predictable`], which falls back to plain
/// masquerade without it).
pub fn ruleset_at(b: NatBehaviour, public: Option<&str>) -> String {
    let masq = match (b, public) {
        (NatBehaviour::RandomFully, _) => "masquerade fully-random".to_owned(),
        (NatBehaviour::Predictable, Some(ip)) => format!(
            "meta l4proto {{ tcp, udp }} snat ip to {ip}:numgen inc mod 1000 offset 30000; oifname \"wan0\" masquerade"
        ),
        _ => "masquerade".to_owned(),
    };
    let unsolicited = match b {
        NatBehaviour::DropUnsolicited => "iifname \"wan0\" tcp flags & (syn | ack) == syn drop",
        NatBehaviour::RejectRst => {
            "iifname \"wan0\" tcp flags & (syn | ack) == syn reject with tcp reset"
        }
        NatBehaviour::Firewall | NatBehaviour::Predictable => "iifname \"wan0\" ct state new drop",
        _ => "",
    };
    let forward = match b {
        NatBehaviour::TcpBlocked => format!(
            "meta l4proto tcp ip daddr != {rv} ip saddr != {rv} drop",
            rv = crate::net::topology::RENDEZVOUS_IP
        ),
        _ => String::new(),
    };
    format!(
        "table ip lab_nat {{\n  chain post {{ type nat hook postrouting priority 100; oifname \"wan0\" {masq}; }}\n}}\n\
         table inet lab_filter {{\n  chain input {{ type filter hook input priority 0; policy accept; {unsolicited}; }}\n\
         \x20 chain forward {{ type filter hook forward priority 0; policy accept; {forward}; }}\n}}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rulesets_differ_where_they_should() {
        assert!(ruleset(NatBehaviour::RandomFully).contains("fully-random"));
        assert!(ruleset(NatBehaviour::DropUnsolicited).contains("drop"));
        assert!(ruleset(NatBehaviour::RejectRst).contains("tcp reset"));
        assert!(!ruleset(NatBehaviour::Masquerade).contains("drop"));
        assert!(ruleset(NatBehaviour::Firewall).contains("ct state new drop"));
        let predictable = ruleset_at(NatBehaviour::Predictable, Some("203.0.113.2"));
        assert!(predictable.contains("snat ip to 203.0.113.2:numgen inc mod 1000 offset 30000"));
        let blocked = ruleset(NatBehaviour::TcpBlocked);
        assert!(blocked.contains("meta l4proto tcp ip daddr != 203.0.113.1"));
    }
}
