//! NAT discovery results and the punch strategy a pair of them calls for.
//!
//! A daemon measures how its NAT maps (`punchd netcheck`, and the daemon
//! itself at start and on a gateway change) by asking the rendezvous's two
//! endpoints — `listen` and `observe_port` — which source address they
//! see, over TCP and over UDP. What it found travels in the hello
//! ([`crate::protocol::Hello::nat`]) as a [`NatSummary`]; when two daemons
//! are paired, [`choose`] (sans IO, the same on every instance) picks the
//! [`Strategy`] the punch orders carry.
//!
//! Beyond today's timed punch:
//! - [`Strategy::RelayFirst`]: when both sides map every transport
//!   endpoint-dependently with ports no one can predict, and neither has a
//!   router mapping, no timed punch can meet, so waiting out the punch
//!   timeout before the relay only costs time. The daemons then go to the
//!   relay at once and keep trying direct in the background, as after any
//!   relayed punch.
//! - [`Strategy::PredictUdp`]: the peer's NAT allocates in steps, so its
//!   next mappings can be aimed at.
//! - Birthday probing ([`Strategy::BirthdayOpen`] to the random side,
//!   [`Strategy::BirthdayProbe`] to the easy side): one side's NAT maps UDP
//!   at random, the other's endpoint-independently. The random side opens
//!   many mappings toward the easy side at once; the easy side sends to
//!   random ports of the random side's IP until one lands on an open
//!   mapping. With 256 mappings open among 64,512 ports, 1,024 probes hit
//!   with p ≈ 98 %, 2,048 with p ≈ 99.97 % (Tailscale's numbers, and
//!   [`birthday_hit_probability`]).

use serde::{Deserialize, Serialize};

/// How a NAT maps one transport (the DESIGN.md "NAT discovery" words).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mapping {
    /// The same public endpoint whatever the destination (or no NAT): a
    /// peer can reach the endpoint the rendezvous observed.
    EndpointIndependent,
    /// A new public endpoint per destination: what the rendezvous observed
    /// is not what a peer will see.
    EndpointDependent,
    /// No answer over this transport at all.
    Blocked,
    /// Not measured, or only one endpoint answered.
    #[default]
    Unknown,
}

impl Mapping {
    /// The name used in JSON and in the human report.
    pub fn as_str(self) -> &'static str {
        match self {
            Mapping::EndpointIndependent => "endpoint-independent",
            Mapping::EndpointDependent => "endpoint-dependent",
            Mapping::Blocked => "blocked",
            Mapping::Unknown => "unknown",
        }
    }
}

/// What a NAT did with an unsolicited SYN to one of its mappings (the
/// rendezvous's inbound test; TCP only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Unsolicited {
    /// Nothing came back: the NAT drops it (most home routers, carrier
    /// NATs).
    Dropped,
    /// Refused with RST (a Linux NAT without a firewall, OpenWrt's
    /// `REJECT`, or the host behind a NAT that let it through).
    Rst,
    /// It connected: the mapping takes unsolicited connections.
    Reached,
    /// An ICMP error came back.
    Unreachable,
}

impl Unsolicited {
    /// The word on the wire and in `punchd netcheck`.
    pub fn as_str(self) -> &'static str {
        match self {
            Unsolicited::Dropped => "dropped",
            Unsolicited::Rst => "rst",
            Unsolicited::Reached => "reached",
            Unsolicited::Unreachable => "unreachable",
        }
    }

    /// Parses [`Self::as_str`]'s words.
    pub fn parse(s: &str) -> Option<Self> {
        [
            Unsolicited::Dropped,
            Unsolicited::Rst,
            Unsolicited::Reached,
            Unsolicited::Unreachable,
        ]
        .into_iter()
        .find(|u| u.as_str() == s)
    }
}

/// What discovery found for one transport.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportNat {
    /// How the NAT maps.
    #[serde(default)]
    pub mapping: Mapping,
    /// The public port equals the local port (every observation).
    #[serde(default)]
    pub port_preserved: bool,
    /// For an endpoint-dependent mapping, the constant step between
    /// consecutive new mappings (mod 65536, as a signed step), when every
    /// observed step was the same: the allocation is predictable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<i32>,
    /// What the NAT did with an unsolicited SYN (TCP only; `None`: not
    /// measured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unsolicited: Option<Unsolicited>,
}

impl TransportNat {
    /// Endpoint-dependent with no predictable step: the port a peer would
    /// have to aim at is unknown (random allocation), or nothing gets
    /// through at all.
    pub fn is_hard(&self) -> bool {
        match self.mapping {
            Mapping::EndpointDependent => self.delta.is_none(),
            Mapping::Blocked => true,
            Mapping::EndpointIndependent | Mapping::Unknown => false,
        }
    }
}

/// Both transports, as carried in the hello.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatSummary {
    /// The TCP punch path.
    #[serde(default)]
    pub tcp: TransportNat,
    /// The UDP (QUIC) path.
    #[serde(default)]
    pub udp: TransportNat,
}

impl NatSummary {
    /// Hard on both transports.
    pub fn is_hard(&self) -> bool {
        self.tcp.is_hard() && self.udp.is_hard()
    }
}

/// How the two daemons of a punch session try to meet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Strategy {
    /// Today's timed simultaneous open on every transport.
    Timed,
    /// Go to the relay at once (no direct punch first); the daemons keep
    /// trying direct in the background.
    RelayFirst {
        /// Why, for status and logs.
        reason: RelayReason,
    },
    /// The peer's NAT maps UDP endpoint-dependently but sequentially: its
    /// mapping toward us will be one of the next few ports after the last
    /// one seen. Punch those too, first and in order (the QUIC path). Sent
    /// to a side facing a predictable peer; a predictable peer facing an
    /// easy side punches as usual, which opens that very mapping.
    PredictUdp(Box<Prediction>),
    /// Birthday probing, the side whose NAT maps UDP at random: open this
    /// many extra UDP sockets and send a punch datagram from each to the
    /// peer's UDP endpoint, each making a new mapping on our NAT that
    /// accepts the peer's endpoint; then wait for one of them to hear the
    /// peer's probe.
    BirthdayOpen(Box<BirthdayOpen>),
    /// Birthday probing, the easy side: send punch datagrams to random
    /// ports of the peer's public IP, at most `probes` of them at
    /// `per_second`, until one lands on a mapping the peer opened.
    BirthdayProbe(Box<BirthdayProbe>),
}

/// The random side's share of birthday probing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BirthdayOpen {
    /// Extra sockets (so NAT mappings) to open toward the peer, per
    /// transport.
    pub sockets: u16,
    /// Over UDP (the QUIC path): datagrams from each socket.
    #[serde(default = "yes")]
    pub udp: bool,
    /// Over TCP: a SYN from each socket, whose connection completes as a
    /// simultaneous open when the peer's probe lands on its mapping.
    #[serde(default)]
    pub tcp: bool,
    /// Send the first SYNs and datagrams with a small TTL, so they open
    /// our NAT but expire before the peer's: unless the peer's NAT is
    /// known to drop unsolicited SYNs, they could draw its RST (which
    /// ends the SYN_SENT socket and the mapping it opened).
    #[serde(default = "yes")]
    pub ttl_limited: bool,
}

/// The easy side's share of birthday probing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BirthdayProbe {
    /// The peer's public IP (its endpoint as observed).
    pub ip: std::net::IpAddr,
    /// Distinct random ports to probe, at most, per transport.
    pub probes: u16,
    /// Probes a second, per transport.
    pub per_second: u16,
    /// Probe with punch datagrams (the QUIC path).
    #[serde(default = "yes")]
    pub udp: bool,
    /// Probe with SYNs from the punch port.
    #[serde(default)]
    pub tcp: bool,
}

fn yes() -> bool {
    true
}

/// Mappings the random side opens (Tailscale's figure: 256 sockets; a
/// daemon needs that many file descriptors for the punch's length).
pub const BIRTHDAY_SOCKETS: u16 = 256;
/// Probes the easy side sends at most per punch: with 256 mappings open,
/// 2,048 probes miss all of them with p ≈ 0.03 %.
pub const BIRTHDAY_PROBES: u16 = 2048;
/// Probe rate: 2,048 probes take about 2 s; a hit is expected after
/// ~250 probes (a quarter second).
pub const BIRTHDAY_RATE: u16 = 1000;
/// The ports a NAT allocates from without a configured range (Linux's
/// default for source ports ≥ 1024): what the probes draw from.
pub const BIRTHDAY_PORTS: std::ops::RangeInclusive<u16> = 1024..=65535;

/// The chance that `probes` distinct random ports out of `range` ports
/// hit at least one of `open` mappings (sampling without replacement).
pub fn birthday_hit_probability(open: u32, probes: u32, range: u32) -> f64 {
    let mut miss = 1.0f64;
    for k in 0..probes.min(range) {
        let left = f64::from(range - k);
        miss *= (left - f64::from(open)).max(0.0) / left;
    }
    1.0 - miss
}

/// Where to aim when the peer's NAT allocates ports in steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prediction {
    /// The peer's last mapping seen (its UDP endpoint as observed).
    pub base: std::net::SocketAddr,
    /// The step between consecutive new mappings (NAT discovery's delta).
    pub delta: i32,
    /// How many next ports to punch: `base + delta × 1 ..= count`.
    pub count: u16,
}

/// Ports predicted per punch: the peer's NAT gives its flows toward us
/// (TCP and UDP punches, its rendezvous link) the next ports, so a window
/// of 16 covers them on a quiet NAT; busier NATs need the relay.
pub const PREDICT_COUNT: u16 = 16;

impl Prediction {
    /// The endpoints to punch, in the order the NAT will allocate them.
    pub fn endpoints(&self) -> impl Iterator<Item = std::net::SocketAddr> + '_ {
        (1..=self.count).map(move |k| {
            let step = (self.delta as i16 as u16).wrapping_mul(k);
            std::net::SocketAddr::new(self.base.ip(), self.base.port().wrapping_add(step))
        })
    }
}

/// Why a pair goes to the relay at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RelayReason {
    /// Both sides map every transport endpoint-dependently with ports no
    /// one can predict (or block it), and neither has a router mapping.
    BothUnpredictable,
}

impl std::fmt::Display for RelayReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RelayReason::BothUnpredictable => {
                "both NATs map endpoint-dependently with unpredictable ports (netcheck) \
                 and neither has a router port mapping: no timed punch can meet"
            }
        })
    }
}

/// One side of a pair as [`choose`] sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Side {
    /// What the daemon measured, if it said.
    pub nat: Option<NatSummary>,
    /// Its router mapped the punch port (UPnP, NAT-PMP, PCP): reachable
    /// whatever the NAT's own mapping does.
    pub port_mapped: bool,
    /// The server has seen it over IPv6. The NAT facts are IPv4's (NAT
    /// discovery runs over IPv4); IPv6 usually has no NAT at all.
    pub ipv6: bool,
    /// The server has observed its UDP endpoint (a peer probing it has an
    /// IP to aim at).
    pub udp_seen: bool,
}

impl Side {
    fn hard(&self) -> bool {
        !self.port_mapped && self.nat.is_some_and(|n| n.is_hard())
    }
}

/// Maps at random (endpoint-dependent, no step): nobody can know the next
/// mapping. A side with a router mapping is never random: peers reach
/// that mapping.
fn random(t: TransportNat) -> bool {
    t.mapping == Mapping::EndpointDependent && t.delta.is_none()
}

/// Maps endpoint-independently: the observed endpoint is the one a peer
/// reaches.
fn easy(t: TransportNat) -> bool {
    t.mapping == Mapping::EndpointIndependent
}

/// Whether one transport calls for birthday probing, `me` against
/// `other`, and which part `me` plays: `Some(true)` open, `Some(false)`
/// probe. Sides with a router mapping need none (the timed punch reaches
/// the mapping).
fn birthday_part(me: Side, other: Side, pick: fn(&NatSummary) -> TransportNat) -> Option<bool> {
    if me.port_mapped || other.port_mapped {
        return None;
    }
    let (m, o) = (pick(&me.nat?), pick(&other.nat?));
    match (random(m) && easy(o), easy(m) && random(o)) {
        (true, _) => Some(true),
        (_, true) => Some(false),
        _ => None,
    }
}

/// Birthday probing between a random side and an easy one, over IPv4, per
/// transport (two sides that both have IPv6 punch there first, with no NAT
/// to beat). The probing side needs the random side's public IPv4: its UDP
/// endpoint as observed for the UDP part, its TCP one for the TCP part.
fn birthday(
    me: Side,
    other: Side,
    other_udp: Option<std::net::SocketAddr>,
    other_tcp: Option<std::net::SocketAddr>,
) -> Option<Strategy> {
    if me.ipv6 && other.ipv6 {
        return None;
    }
    let udp = birthday_part(me, other, |n| n.udp);
    let tcp = birthday_part(me, other, |n| n.tcp);
    let v4 = |a: Option<std::net::SocketAddr>| a.map(|a| a.ip()).filter(|ip| ip.is_ipv4());
    // Opening: over UDP only once the server saw our UDP endpoint (the
    // peer probes that IP).
    let open_udp = udp == Some(true) && me.udp_seen;
    let open_tcp = tcp == Some(true);
    if open_udp || open_tcp {
        let drops = other
            .nat
            .is_some_and(|n| n.tcp.unsolicited == Some(Unsolicited::Dropped));
        return Some(Strategy::BirthdayOpen(Box::new(BirthdayOpen {
            sockets: BIRTHDAY_SOCKETS,
            udp: open_udp,
            tcp: open_tcp,
            ttl_limited: !drops,
        })));
    }
    let ip = v4(other_udp)
        .filter(|_| udp == Some(false))
        .or(v4(other_tcp))?;
    let probe_udp = udp == Some(false) && v4(other_udp) == Some(ip);
    let probe_tcp = tcp == Some(false) && v4(other_tcp) == Some(ip);
    (probe_udp || probe_tcp).then(|| {
        Strategy::BirthdayProbe(Box::new(BirthdayProbe {
            ip,
            probes: BIRTHDAY_PROBES,
            per_second: BIRTHDAY_RATE,
            udp: probe_udp,
            tcp: probe_tcp,
        }))
    })
}

/// The strategy for `me`'s order against `other`, whose UDP endpoint was
/// last seen at `other_udp` (the rendezvous's observation): relay-first
/// for two hard sides ([`choose`]), port prediction when `other`'s UDP
/// mapping is endpoint-dependent with a known step and `me`'s is not
/// random, birthday probing between a random side and an easy one (per
/// transport; `other_tcp` is `other`'s TCP endpoint as observed), else
/// today's timed punch. Two predictable sides both predict: each sends to
/// the other's predicted ports first, in order, so each one's k-th new
/// mapping meets the other's k-th.
pub fn choose_for(
    me: Side,
    other: Side,
    other_udp: Option<std::net::SocketAddr>,
    other_tcp: Option<std::net::SocketAddr>,
) -> Strategy {
    let s = choose(me, other);
    if s != Strategy::Timed {
        return s;
    }
    if let Some(b) = birthday(me, other, other_udp, other_tcp) {
        return b;
    }
    // Not a random side: its own mapping toward the predicted ports must
    // be one the peer can know (fixed, or itself predicted by the peer).
    let me_easy = me.port_mapped || me.nat.is_some_and(|n| !n.udp.is_hard());
    match (other.nat, other_udp) {
        (Some(n), Some(base))
            if me_easy
                && !other.port_mapped
                && n.udp.mapping == Mapping::EndpointDependent
                && n.udp.delta.is_some_and(|d| d != 0) =>
        {
            Strategy::PredictUdp(Box::new(Prediction {
                base,
                delta: n.udp.delta.unwrap_or(1),
                count: PREDICT_COUNT,
            }))
        }
        _ => Strategy::Timed,
    }
}

/// The strategy for a pair; symmetric, so both orders agree.
///
/// Two hard IPv4 sides that both have IPv6 still punch: the race tries
/// IPv6 first, where there is no NAT to be hard (lab: `v6-random`, both
/// IPv4 NATs fully random, direct over IPv6).
pub fn choose(a: Side, b: Side) -> Strategy {
    if a.hard() && b.hard() && !(a.ipv6 && b.ipv6) {
        Strategy::RelayFirst {
            reason: RelayReason::BothUnpredictable,
        }
    } else {
        Strategy::Timed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(mapping: Mapping, delta: Option<i32>) -> TransportNat {
        TransportNat {
            mapping,
            port_preserved: false,
            delta,
            unsolicited: None,
        }
    }

    fn side(tcp: TransportNat, udp: TransportNat, port_mapped: bool) -> Side {
        Side {
            nat: Some(NatSummary { tcp, udp }),
            port_mapped,
            ipv6: false,
            udp_seen: true,
        }
    }

    #[test]
    fn a_random_side_and_an_easy_one_get_birthday_probing() {
        use Mapping::*;
        let random = t(EndpointDependent, None);
        let easy = t(EndpointIndependent, None);
        let predictable = t(EndpointDependent, Some(1));
        let r = side(random, random, false);
        let e = side(easy, easy, false);
        let seen: std::net::SocketAddr = "203.0.113.3:40000".parse().unwrap();
        // The random side opens mappings; the easy side probes its IP.
        assert_eq!(
            choose_for(r, e, Some(seen), Some(seen)),
            Strategy::BirthdayOpen(Box::new(BirthdayOpen {
                sockets: BIRTHDAY_SOCKETS,
                udp: true,
                tcp: true,
                ttl_limited: true,
            }))
        );
        // Against an easy NAT known to drop unsolicited SYNs, no TTL
        // limit (a host several hops behind its NAT opens it at once).
        let dropping = side(
            TransportNat {
                unsolicited: Some(Unsolicited::Dropped),
                ..easy
            },
            easy,
            false,
        );
        assert!(matches!(
            choose_for(r, dropping, Some(seen), Some(seen)),
            Strategy::BirthdayOpen(b) if !b.ttl_limited
        ));
        let Strategy::BirthdayProbe(b) = choose_for(e, r, Some(seen), Some(seen)) else {
            panic!("the easy side does not probe");
        };
        assert_eq!(
            (b.ip, b.probes, b.per_second, b.udp, b.tcp),
            (seen.ip(), BIRTHDAY_PROBES, BIRTHDAY_RATE, true, true)
        );
        // Per transport: random on TCP only (UDP easy on both sides), or
        // the UDP endpoint not seen yet, birthday over TCP alone.
        let tcp_only = side(random, easy, false);
        let Strategy::BirthdayProbe(b) = choose_for(e, tcp_only, Some(seen), Some(seen)) else {
            panic!("no TCP birthday");
        };
        assert!(b.tcp && !b.udp);
        let Strategy::BirthdayProbe(b) = choose_for(e, r, None, Some(seen)) else {
            panic!("no TCP birthday without the UDP endpoint");
        };
        assert!(b.tcp && !b.udp);
        assert_eq!(
            choose_for(tcp_only, e, Some(seen), Some(seen)),
            Strategy::BirthdayOpen(Box::new(BirthdayOpen {
                sockets: BIRTHDAY_SOCKETS,
                udp: false,
                tcp: true,
                ttl_limited: true,
            }))
        );
        // Not when either side has a router mapping (the timed punch
        // reaches it), nor against a predictable peer, nor without the
        // random side's UDP endpoint, nor when both have IPv6.
        for (me, other) in [
            (e, side(random, random, true)),
            (side(easy, easy, true), r),
            (e, side(predictable, predictable, false)),
        ] {
            assert!(
                !matches!(
                    choose_for(me, other, Some(seen), Some(seen)),
                    Strategy::BirthdayOpen(_) | Strategy::BirthdayProbe(_)
                ),
                "{me:?} vs {other:?}"
            );
        }
        assert_eq!(choose_for(e, r, None, None), Strategy::Timed);
        let unseen = Side {
            udp_seen: false,
            ..side(random, random, false)
        };
        let udp_only_random = Side {
            udp_seen: false,
            ..side(easy, random, false)
        };
        assert_eq!(
            choose_for(udp_only_random, e, Some(seen), Some(seen)),
            Strategy::Timed
        );
        assert!(matches!(
            choose_for(unseen, e, Some(seen), Some(seen)),
            Strategy::BirthdayOpen(b) if b.tcp && !b.udp
        ));
        let (r6, e6) = (Side { ipv6: true, ..r }, Side { ipv6: true, ..e });
        assert_eq!(choose_for(r6, e6, Some(seen), Some(seen)), Strategy::Timed);
        assert_eq!(choose_for(e6, r6, Some(seen), Some(seen)), Strategy::Timed);
        // Two random sides still go to the relay at once.
        assert!(matches!(
            choose_for(r, r, Some(seen), Some(seen)),
            Strategy::RelayFirst { .. }
        ));
    }

    #[test]
    fn the_birthday_budget_hits_as_stated() {
        let range = u32::from(*BIRTHDAY_PORTS.end() - *BIRTHDAY_PORTS.start()) + 1;
        let open = u32::from(BIRTHDAY_SOCKETS);
        let p = |n| birthday_hit_probability(open, n, range);
        assert!((0.98..0.99).contains(&p(1024)), "{}", p(1024));
        assert!(p(u32::from(BIRTHDAY_PROBES)) > 0.9996);
        assert!((0.60..0.65).contains(&p(250)), "{}", p(250));
        assert_eq!(p(0), 0.0);
        let json = serde_json::to_string(&choose_for(
            side(
                t(Mapping::EndpointIndependent, None),
                t(Mapping::EndpointIndependent, None),
                false,
            ),
            side(
                t(Mapping::EndpointDependent, None),
                t(Mapping::EndpointDependent, None),
                false,
            ),
            Some("203.0.113.3:1".parse().unwrap()),
            None,
        ))
        .unwrap();
        assert_eq!(
            json,
            r#"{"kind":"birthday-probe","ip":"203.0.113.3","probes":2048,"per_second":1000,"udp":true,"tcp":false}"#
        );
        // An order from a server that predates TCP birthday probing.
        let old: Strategy =
            serde_json::from_str(r#"{"kind":"birthday-open","sockets":256}"#).unwrap();
        assert_eq!(
            old,
            Strategy::BirthdayOpen(Box::new(BirthdayOpen {
                sockets: 256,
                udp: true,
                tcp: false,
                ttl_limited: true,
            }))
        );
    }

    #[test]
    fn only_two_unpredictable_unmapped_sides_go_to_the_relay_first() {
        use Mapping::*;
        let random = t(EndpointDependent, None);
        let predictable = t(EndpointDependent, Some(256));
        let easy = t(EndpointIndependent, None);
        let hard = side(random, random, false);
        assert!(matches!(choose(hard, hard), Strategy::RelayFirst { .. }));
        // Blocked counts as hard too.
        let blocked_udp = side(random, t(Blocked, None), false);
        assert!(matches!(
            choose(hard, blocked_udp),
            Strategy::RelayFirst { .. }
        ));
        for other in [
            side(easy, easy, false),
            side(predictable, predictable, false),
            side(random, easy, false),
            // A router mapping makes the side reachable.
            side(random, random, true),
            // Not measured: no shortcut.
            Side::default(),
            side(t(Unknown, None), t(Unknown, None), false),
        ] {
            assert_eq!(choose(hard, other), Strategy::Timed, "{other:?}");
            assert_eq!(choose(other, hard), Strategy::Timed, "{other:?}");
        }
        // Both also on IPv6: punch (IPv6 first), no relay shortcut; one
        // side on IPv6 alone cannot reach the other over it.
        let v6 = Side { ipv6: true, ..hard };
        assert_eq!(choose(v6, v6), Strategy::Timed);
        assert!(matches!(choose(v6, hard), Strategy::RelayFirst { .. }));
    }

    #[test]
    fn a_predictable_peer_gets_predicted_from_the_easy_side_only() {
        use Mapping::*;
        let predictable = t(EndpointDependent, Some(256));
        let easy = t(EndpointIndependent, None);
        let random = t(EndpointDependent, None);
        let base: std::net::SocketAddr = "203.0.113.3:12405".parse().unwrap();
        let p = side(predictable, predictable, false);
        let e = side(easy, easy, false);
        let Strategy::PredictUdp(pred) = choose_for(e, p, Some(base), None) else {
            panic!("no prediction");
        };
        assert_eq!(pred.delta, 256);
        let ports: Vec<u16> = pred.endpoints().map(|a| a.port()).collect();
        assert_eq!(ports.len(), usize::from(PREDICT_COUNT));
        assert_eq!(&ports[..3], &[12661, 12917, 13173]);
        assert!(pred.endpoints().all(|a| a.ip() == base.ip()));
        // The predictable side punches as usual; so does a random side,
        // or one without the peer's endpoint, or a mapped peer.
        assert_eq!(choose_for(p, e, Some(base), None), Strategy::Timed);
        // Two predictable sides predict each other.
        assert!(matches!(
            choose_for(p, p, Some(base), None),
            Strategy::PredictUdp(_)
        ));
        assert_eq!(
            choose_for(side(random, random, false), p, Some(base), None),
            Strategy::Timed
        );
        assert_eq!(choose_for(e, p, None, None), Strategy::Timed);
        assert_eq!(
            choose_for(e, side(predictable, predictable, true), Some(base), None),
            Strategy::Timed
        );
        // Steps wrap around 65535.
        let wrap = Prediction {
            base: "203.0.113.3:65535".parse().unwrap(),
            delta: 1,
            count: 2,
        };
        assert_eq!(
            wrap.endpoints().map(|a| a.port()).collect::<Vec<_>>(),
            vec![0, 1]
        );
    }

    #[test]
    fn the_wire_words_are_the_design_words() {
        let n = NatSummary {
            tcp: t(Mapping::EndpointDependent, Some(-256)),
            udp: t(Mapping::Blocked, None),
        };
        let json = serde_json::to_string(&n).unwrap();
        assert!(
            json.contains("\"endpoint-dependent\"") && json.contains("\"blocked\""),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<NatSummary>(&json).unwrap(), n);
        for m in [
            Mapping::EndpointIndependent,
            Mapping::EndpointDependent,
            Mapping::Blocked,
            Mapping::Unknown,
        ] {
            assert_eq!(
                serde_json::to_string(&m).unwrap(),
                format!("\"{}\"", m.as_str())
            );
        }
        let s = serde_json::to_string(&Strategy::RelayFirst {
            reason: RelayReason::BothUnpredictable,
        })
        .unwrap();
        assert_eq!(s, r#"{"kind":"relay-first","reason":"both-unpredictable"}"#);
    }
}
