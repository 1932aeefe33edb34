//! Which of a daemon's self-reported `local_addrs` may become punch
//! candidates for its peers.
//!
//! A peer obeys a punch order by sending SYNs and QUIC packets to every
//! candidate, so an address the server passes on unchecked lets one daemon
//! make another flood or scan any host. Only addresses that can only mean
//! "somewhere on the announcer's own LAN" are passed on:
//!
//! - IPv4 private (10/8, 172.16/12, 192.168/16) and shared (100.64/10,
//!   carrier-grade NAT) space;
//! - IPv6 unique-local (fc00::/7);
//! - the documentation ranges (192.0.2/24, 198.51.100/24, 203.0.113/24,
//!   2001:db8::/32): never routed on the Internet, and what the lab's
//!   namespaces use as LANs;
//! - loopback, only from a daemon that itself connected over loopback (it
//!   shares this host, and so does whatever it could reach there);
//! - the daemon's own observed IP (it adds nothing new);
//! - IPv6 global unicast (2000::/3), provisionally: IPv6 hosts rarely sit
//!   behind a NAT, so a daemon's own global address is its public one. It
//!   is passed on only once an observation vouches for it, and a
//!   unique-local one only within a site ([`super::ipv6`]).
//!
//! Refused: public unicast (`not_lan`), link-local (needs a scope the peer
//! cannot know), multicast and broadcast, unspecified addresses and port 0.
//! Sans-IO: [`check`] decides, the connection counts and logs.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::metrics::AddrRefusal;

/// Local addresses one hello may carry; more is a malformed hello.
pub(crate) const MAX_LOCAL_ADDRS: usize = 8;

/// Whether `addr`, reported by a daemon the server sees at `observed`, may
/// be handed to its peers as a candidate.
pub(crate) fn check(addr: SocketAddr, observed: IpAddr) -> Result<SocketAddr, AddrRefusal> {
    let ip = addr.ip().to_canonical();
    let addr = SocketAddr::new(ip, addr.port());
    if addr.port() == 0 || ip.is_unspecified() {
        return Err(AddrRefusal::Unspecified);
    }
    if ip.is_multicast() || ip == IpAddr::V4(Ipv4Addr::BROADCAST) {
        return Err(AddrRefusal::Multicast);
    }
    if ip.is_loopback() {
        return if observed.to_canonical().is_loopback() {
            Ok(addr)
        } else {
            Err(AddrRefusal::Loopback)
        };
    }
    if ip == observed.to_canonical() {
        return Ok(addr);
    }
    let lan = match ip {
        IpAddr::V4(v4) => {
            if v4.is_link_local() {
                return Err(AddrRefusal::LinkLocal);
            }
            lan_v4(v4)
        }
        IpAddr::V6(v6) => {
            if (v6.segments()[0] & 0xffc0) == 0xfe80 {
                return Err(AddrRefusal::LinkLocal);
            }
            lan_v6(v6)
        }
    };
    if lan {
        Ok(addr)
    } else {
        Err(AddrRefusal::NotLan)
    }
}

fn lan_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    ip.is_private()
        || (a == 100 && (64..128).contains(&b))
        || (a, b, c) == (192, 0, 2)
        || (a, b, c) == (198, 51, 100)
        || (a, b, c) == (203, 0, 113)
}

fn lan_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    (s[0] & 0xfe00) == 0xfc00 || (s[0], s[1]) == (0x2001, 0x0db8) || (s[0] & 0xe000) == 0x2000
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(addr: &str, observed: &str) -> Result<(), AddrRefusal> {
        let addr: SocketAddr = addr.parse().unwrap();
        check(addr, observed.parse().unwrap()).map(|_| ())
    }

    #[test]
    fn lan_ranges_pass_and_everything_else_is_refused_with_its_reason() {
        let remote = "198.18.0.1";
        for ok in [
            "10.1.2.3:4000",
            "172.16.0.1:1",
            "172.31.255.254:1",
            "192.168.1.1:22",
            "100.64.0.7:9",
            "100.127.255.1:9",
            "192.0.2.10:40000",
            "198.51.100.3:1",
            "203.0.113.9:1",
            "[fd00::1]:443",
            "[2001:db8::5]:1",
            // Global IPv6: kept here, vouched for at order time (ipv6.rs).
            "[2606:4700::1]:443",
            "[::ffff:10.0.0.1]:80",
        ] {
            assert_eq!(verdict(ok, remote), Ok(()), "{ok}");
        }
        let refused = [
            ("8.8.8.8:53", AddrRefusal::NotLan),
            ("172.32.0.1:1", AddrRefusal::NotLan),
            ("100.128.0.1:1", AddrRefusal::NotLan),
            ("[4000::1]:443", AddrRefusal::NotLan),
            ("[64:ff9b::808:808]:53", AddrRefusal::NotLan),
            ("127.0.0.1:22", AddrRefusal::Loopback),
            ("[::1]:22", AddrRefusal::Loopback),
            ("169.254.1.1:80", AddrRefusal::LinkLocal),
            ("[fe80::1]:80", AddrRefusal::LinkLocal),
            ("224.0.0.1:5353", AddrRefusal::Multicast),
            ("255.255.255.255:9", AddrRefusal::Multicast),
            ("[ff02::1]:9", AddrRefusal::Multicast),
            ("0.0.0.0:80", AddrRefusal::Unspecified),
            ("10.0.0.1:0", AddrRefusal::Unspecified),
        ];
        for (addr, why) in refused {
            assert_eq!(verdict(addr, remote), Err(why), "{addr}");
        }
    }

    #[test]
    fn loopback_only_from_this_host_and_the_own_ip_always() {
        assert_eq!(verdict("127.0.0.1:4000", "127.0.0.1"), Ok(()));
        assert_eq!(verdict("127.0.0.1:4000", "::ffff:127.0.0.1"), Ok(()));
        assert_eq!(verdict("8.8.8.8:4000", "8.8.8.8"), Ok(()));
        assert_eq!(verdict("8.8.4.4:4000", "8.8.8.8"), Err(AddrRefusal::NotLan));
    }
}
