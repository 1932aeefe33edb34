//! Address families in a punch, with no sockets in it: which of this
//! host's IPv6 addresses to offer as candidates, which of a peer's
//! candidates this host can reach at all, and the happy-eyeballs head
//! start that decides when each family's SYNs go.
//!
//! **Head start.** When a punch order has candidates in both families,
//! IPv6 ones fire at the ordered instant and IPv4 ones [`HEAD_START`]
//! later (RFC 8305's "prefer IPv6, but not for long"). IPv6 goes first
//! because where it exists it usually has no NAT, only a stateful
//! firewall that lets simultaneous open through (RFC 6092, REC-31), so it
//! is the direct path that works even between port-randomizing IPv4 NATs.
//! Both sides apply the same rule to the same order, so their SYNs in each
//! family still leave together (simultaneous open needs that). A broken
//! IPv6 path therefore costs at most `HEAD_START` before IPv4 is tried; a
//! working one usually wins before IPv4 starts. With one family only,
//! nothing is delayed: IPv4-only punches run exactly as before.
//!
//! **Reachable.** A host without a usable IPv6 address (none that is
//! global, or no IPv6 at all) gets `ENETUNREACH` from every IPv6 connect;
//! the plan would retry each such candidate every few milliseconds for the
//! whole punch. Such candidates are dropped before the punch instead.
//!
//! **Which addresses to offer.** Every IPv6 address of global scope that is
//! ready for use (not tentative, deprecated or failed duplicate address
//! detection), stable ones before temporary ones. Stable first because a
//! temporary (RFC 8981 privacy) address is deprecated and replaced every
//! day or so: a peer that learned it would punch an address that stops
//! taking connections within hours, and it changes the identity a
//! long-lived tunnel is tied to for nothing — punchd peers already know
//! each other by key, so the temporary address hides nothing from them.
//! The rendezvous passes a global address on only when it is in the /64
//! it observed us at, so offering it cannot aim peers anywhere else.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

/// How long IPv6 candidates fire before IPv4 ones when an order has both.
pub(crate) const HEAD_START: Duration = Duration::from_millis(250);

/// IPv6 addresses offered as candidates per hello, at most (the hello
/// carries 8 local addresses in all).
pub(crate) const MAX_OFFERED_V6: usize = 3;

// Flags and scopes of `/proc/net/if_inet6` (linux/if_addr.h, net/ipv6.h).
const IFA_F_TEMPORARY: u32 = 0x01;
const IFA_F_DADFAILED: u32 = 0x08;
const IFA_F_DEPRECATED: u32 = 0x20;
const IFA_F_TENTATIVE: u32 = 0x40;
const SCOPE_GLOBAL: u32 = 0x00;

/// The IPv6 addresses to offer, from the text of `/proc/net/if_inet6`
/// (one line per address: 32 hex digits, interface index, prefix length,
/// scope, flags, interface name): global scope, usable now, stable ones
/// first, at most [`MAX_OFFERED_V6`]. Lines that do not parse are skipped.
pub(crate) fn offerable_v6(if_inet6: &str) -> Vec<Ipv6Addr> {
    let mut found: Vec<(bool, Ipv6Addr)> = if_inet6
        .lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let hex = f.next()?;
            let (_index, _plen) = (f.next()?, f.next()?);
            let scope = u32::from_str_radix(f.next()?, 16).ok()?;
            let flags = u32::from_str_radix(f.next()?, 16).ok()?;
            let ip = Ipv6Addr::from(
                u128::from_str_radix(hex, 16)
                    .ok()
                    .filter(|_| hex.len() == 32)?,
            );
            let unusable = IFA_F_DADFAILED | IFA_F_DEPRECATED | IFA_F_TENTATIVE;
            (scope == SCOPE_GLOBAL && flags & unusable == 0 && usable_v6(ip))
                .then_some((flags & IFA_F_TEMPORARY != 0, ip))
        })
        .collect();
    // Stable (false) before temporary (true); otherwise as the kernel lists them.
    found.sort_by_key(|(temporary, _)| *temporary);
    let mut out: Vec<Ipv6Addr> = Vec::new();
    for (_, ip) in found {
        if !out.contains(&ip) && out.len() < MAX_OFFERED_V6 {
            out.push(ip);
        }
    }
    out
}

/// Not link-local, loopback, multicast, unspecified or IPv4-mapped.
fn usable_v6(ip: Ipv6Addr) -> bool {
    !(ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || (ip.segments()[0] & 0xffc0) == 0xfe80
        || ip.to_ipv4_mapped().is_some())
}

/// Whether this host has an IPv4 route, from the text of
/// `/proc/net/route` (a header line, then one line per route of the main
/// table; loopback is in another table). `None` (no such file: not Linux,
/// or no procfs) counts as yes, so IPv4 is never dropped on a guess. An
/// IPv6-only host has no IPv4 route: its IPv4 connects would fail with
/// `ENETUNREACH` at once, and the punch would retry them for its whole
/// timeout.
pub(crate) fn has_ipv4_route(route_table: Option<&str>) -> bool {
    route_table.is_none_or(|t| t.lines().skip(1).any(|l| !l.trim().is_empty()))
}

/// Which families this host can aim a punch order's candidates at,
/// decided once per registration: IPv4 and IPv6 for TCP, and IPv6 for UDP
/// only if the QUIC socket is dual-stack too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Reach {
    /// It reached the server over IPv4, or has an IPv4 route
    /// ([`has_ipv4_route`]).
    pub(crate) v4: bool,
    /// It has an IPv6 address to offer, or reached the server over IPv6.
    pub(crate) v6: bool,
    /// Its QUIC socket takes IPv6 (`quic::socket::bind`).
    pub(crate) quic_v6: bool,
}

impl Reach {
    /// Drops the candidates of a family this host cannot reach.
    pub(crate) fn keep_reachable(self, tcp: &mut Vec<SocketAddr>, udp: &mut Vec<SocketAddr>) {
        reachable(tcp, self.v4, self.v6);
        reachable(udp, self.v4, self.v6 && self.quic_v6);
    }
}

/// The candidates this host can aim at: IPv6 ones only if it has IPv6
/// (`has_v6`), IPv4 ones only if it has IPv4 (`has_v4`).
fn reachable(list: &mut Vec<SocketAddr>, has_v4: bool, has_v6: bool) {
    list.retain(|a| match a.ip().to_canonical() {
        IpAddr::V4(_) => has_v4,
        IpAddr::V6(_) => has_v6,
    });
}

/// How long after the ordered instant each candidate fires: IPv4 ones
/// [`HEAD_START`] late when there are IPv6 ones too, else all at once.
pub(crate) fn delays(candidates: &[SocketAddr]) -> Vec<Duration> {
    let is_v6 = |a: &SocketAddr| a.ip().to_canonical().is_ipv6();
    let both = candidates.iter().any(is_v6) && !candidates.iter().all(is_v6);
    candidates
        .iter()
        .map(|a| {
            if both && !is_v6(a) {
                HEAD_START
            } else {
                Duration::ZERO
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROC: &str = "\
00000000000000000000000000000001 01 80 10 80       lo
fe800000000000000000000000000001 02 40 20 80     eth0
20010db8000100000000000000000002 02 40 00 01     eth0
20010db8000100000000000000000003 02 40 00 80     eth0
20010db8000100000000000000000004 02 40 00 c0     eth0
20010db8000100000000000000000005 02 40 00 20     eth0
fd000000000000000000000000000009 03 40 00 80     wg0
garbage line
20010db80001000000000000000000zz 02 40 00 80     eth0
";

    #[test]
    fn stable_global_addresses_first_and_nothing_unusable() {
        let got = offerable_v6(PROC);
        let want: Vec<Ipv6Addr> = ["2001:db8:1::3", "fd00::9", "2001:db8:1::2"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        // ::1 (host scope), fe80:: (link), ::4 (tentative), ::5
        // (deprecated) and the unparsable lines are left out; the
        // temporary ::2 comes after the stable ones.
        assert_eq!(got, want);
        assert!(offerable_v6("").is_empty());
        let many: String = (1..=9)
            .map(|i| format!("20010db80001000000000000000000{i:02x} 02 40 00 80 eth0\n"))
            .collect();
        assert_eq!(offerable_v6(&many).len(), MAX_OFFERED_V6);
    }

    #[test]
    fn ipv4_is_there_unless_the_route_table_says_it_is_empty() {
        let header =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n";
        assert!(!has_ipv4_route(Some(header)));
        assert!(!has_ipv4_route(Some("")));
        let default =
            format!("{header}eth0\t00000000\t0100000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n");
        assert!(has_ipv4_route(Some(&default)));
        // No procfs: never drop IPv4 on a guess.
        assert!(has_ipv4_route(None));
    }

    #[test]
    fn ipv6_gets_a_head_start_only_when_both_families_are_there() {
        let a = |s: &str| -> SocketAddr { s.parse().unwrap() };
        let mixed = [a("203.0.113.2:1"), a("[2001:db8::2]:1"), a("192.0.2.2:1")];
        assert_eq!(delays(&mixed), vec![HEAD_START, Duration::ZERO, HEAD_START]);
        assert_eq!(delays(&[a("203.0.113.2:1")]), vec![Duration::ZERO]);
        assert_eq!(delays(&[a("[2001:db8::2]:1")]), vec![Duration::ZERO]);
        assert!(delays(&[]).is_empty());
        let mut list = mixed.to_vec();
        reachable(&mut list, true, false);
        assert_eq!(list, vec![a("203.0.113.2:1"), a("192.0.2.2:1")]);
        let mut list = mixed.to_vec();
        reachable(&mut list, false, true);
        assert_eq!(list, vec![a("[2001:db8::2]:1")]);
    }
}
