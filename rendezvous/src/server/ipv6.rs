//! Which IPv6 addresses a daemon's peers may be told, beyond the rules
//! every address passes in [`super::lan`]. Sans-IO.
//!
//! IPv6 hosts usually have no NAT: a daemon's own global address *is* its
//! public endpoint, and it can report it itself. But a self-reported
//! address is also what lets one daemon aim its peers' punches at any
//! host (see `lan`), so a global address is passed on only when an
//! observation vouches for it: it lies in the same /64 as an address the
//! server saw this daemon at (its registration or observe-only hello over
//! IPv6, or a UDP probe). A /64 is one link's prefix, so such an address
//! is that host's or its neighbour's, never a stranger's network. A
//! host's stable address and its temporary (privacy) addresses share the
//! /64, so a daemon that reached the server from a temporary address can
//! still offer its stable one.
//!
//! Unique-local addresses (fc00::/7) route only inside a site: they reach
//! a peer only when both are in the same site ([`same_site`]), and
//! anywhere else they would name some other network's host. Link-local is
//! refused by `lan` (it needs a scope the peer cannot know).

use std::net::{IpAddr, Ipv6Addr};

use crate::protocol::{self, same_link};

/// Whether `ip` is a global IPv6 address (see [`is_global`]): a host's own
/// public address, which a peer anywhere may be given.
pub(crate) fn is_global_v6(ip: IpAddr) -> bool {
    matches!(ip.to_canonical(), IpAddr::V6(v6) if is_global(v6))
}

/// 2000::/3 outside the documentation prefix 2001:db8::/32 (which `lan`
/// treats as a LAN range: the lab's networks).
fn is_global(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    (s[0] & 0xe000) == 0x2000 && (s[0], s[1]) != (0x2001, 0x0db8)
}

fn v6s(ips: &[IpAddr]) -> impl Iterator<Item = Ipv6Addr> + '_ {
    ips.iter().filter_map(|ip| match ip.to_canonical() {
        IpAddr::V6(v6) => Some(v6),
        IpAddr::V4(_) => None,
    })
}

/// Whether a self-reported `addr` may go to peers given the addresses the
/// server has seen the daemon at (`seen`): true for anything but a global
/// IPv6 address, which needs a `seen` IPv6 address in its /64.
pub(crate) fn vouched_global(addr: IpAddr, seen: &[IpAddr]) -> bool {
    match addr.to_canonical() {
        IpAddr::V6(v6) if is_global(v6) => v6s(seen).any(|s| same_link(s.into(), v6.into())),
        _ => true,
    }
}

/// Whether two daemons, seen at `a` and `b` respectively, are in one
/// site: one public IPv4 address (one NAT), or IPv6 addresses in one /48.
pub(crate) fn same_site(a: &[IpAddr], b: &[IpAddr]) -> bool {
    a.iter()
        .any(|x| b.iter().any(|y| protocol::same_site(*x, *y)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn a_global_address_needs_an_observation_in_its_64() {
        let seen = ips(&["198.18.0.1", "2606:4700:10::aaaa:1"]);
        for (addr, ok) in [
            // The stable address beside the temporary one it connected from.
            ("2606:4700:10::1", true),
            ("2606:4700:10:0:1234:5678:9abc:def0", true),
            // Another /64 of the same site, another network: not vouched for.
            ("2606:4700:10:1::1", false),
            ("2a00:1450::1", false),
            // Not global: other rules decide (lan, same_site).
            ("fd00::1", true),
            ("2001:db8::1", true),
            ("192.0.2.1", true),
        ] {
            assert_eq!(vouched_global(addr.parse().unwrap(), &seen), ok, "{addr}");
        }
        // Seen over IPv4 only: no global IPv6 address is vouched for.
        assert!(!vouched_global(
            "2606:4700:10::1".parse().unwrap(),
            &ips(&["198.18.0.1"])
        ));
    }

    #[test]
    fn one_site_is_one_nat_or_one_48() {
        assert!(same_site(
            &ips(&["198.18.0.1"]),
            &ips(&["198.18.0.1", "2001:db8:1::1"])
        ));
        assert!(same_site(
            &ips(&["2001:db8:1:a::1"]),
            &ips(&["2001:db8:1:b::2"])
        ));
        assert!(!same_site(
            &ips(&["2001:db8:1::1"]),
            &ips(&["2001:db8:2::1"])
        ));
        assert!(!same_site(&ips(&["198.18.0.1"]), &ips(&["198.18.0.2"])));
        assert!(same_site(
            &ips(&["::ffff:198.18.0.1"]),
            &ips(&["198.18.0.1"])
        ));
        assert!(is_global_v6("2606:4700::1".parse().unwrap()));
        assert!(!is_global_v6("fd12::1".parse().unwrap()));
        assert!(!is_global_v6("2001:db8::1".parse().unwrap()));
        assert!(!is_global_v6("192.0.2.1".parse().unwrap()));
    }
}
