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
}

/// The rule set for a NAT namespace.
pub fn ruleset(b: NatBehaviour) -> String {
    let masq = match b {
        NatBehaviour::RandomFully => "masquerade fully-random",
        _ => "masquerade",
    };
    let unsolicited = match b {
        NatBehaviour::DropUnsolicited => "iifname \"wan0\" tcp flags & (syn | ack) == syn drop",
        NatBehaviour::RejectRst => {
            "iifname \"wan0\" tcp flags & (syn | ack) == syn reject with tcp reset"
        }
        NatBehaviour::Firewall => "iifname \"wan0\" ct state new drop",
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
        let blocked = ruleset(NatBehaviour::TcpBlocked);
        assert!(blocked.contains("meta l4proto tcp ip daddr != 203.0.113.1"));
    }
}
