//! What a punch order may make this daemon do: the limits on an order,
//! with no sockets in it.
//!
//! An order aims our SYNs and datagrams. Whoever can send one (the server,
//! or anyone on an unpinned link to it) must not be able to turn a daemon
//! into a SYN flood or a LAN scanner, so before anything is sent:
//!
//! - at most [`MAX_CANDIDATES`] candidates per transport (the server sends
//!   the observed endpoint and up to 7 local addresses);
//! - no unspecified, multicast or broadcast address, no port 0;
//! - at most [`MAX_PORTS`] distinct ports per transport: the peer's observed
//!   port, its punch port, and the port its router mapped for it (UPnP
//!   IGD, NAT-PMP or PCP: a router may grant another port than the punch
//!   port). Local candidates are the peer's own addresses
//!   on its punch port, so an order can reach at most a handful of hosts on
//!   one port, never sweep ports;
//! - per peer, a budget of [`ORDER_BURST`] orders, refilled one per
//!   [`ORDER_REFILL`]: a server that repeats orders gets them dropped;
//! - only the peer's own addresses ([`keep_peer_addresses`]): its public
//!   IP (the first candidate of each list: the observed or router-mapped
//!   endpoint, which the server lists first) on any kept port, and its
//!   other (LAN) addresses only when it is at our own public IP, i.e.
//!   behind the same NAT, the one case where they can lead anywhere. So
//!   neither a peer nor whoever rewrites orders can aim us at our own LAN
//!   from elsewhere, or at a third host beside the peer's public IP.
//!
//! Each attempt within an order is bounded by the punch plan
//! (`punch/plan.rs`), and the firing time by `clock::MAX_AHEAD`.
//!
//! The hard-NAT strategies an order may carry ([`check_strategy`]) reach
//! further, and only ever the peer's own public IP: port prediction adds
//! at most [`MAX_PREDICTED`] ports; birthday probing, against a peer whose
//! NAT maps at random, sends to up to [`MAX_BIRTHDAY_PROBES`] random ports
//! of that one IP at most [`MAX_BIRTHDAY_RATE`] a second (a sweep of the
//! peer's NAT, which is what it takes to find one of the mappings the peer
//! opened toward us), or has us open up to [`MAX_BIRTHDAY_SOCKETS`]
//! sockets. Both kinds are also budgeted daemon-wide ([`OrderGate`]).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use punch_rendezvous::protocol::{same_link, same_site};

use crate::admin::status::Limit;
use punch_rendezvous::protocol::PunchOrder;

/// Candidates kept per transport.
pub(crate) const MAX_CANDIDATES: usize = 8;
/// Distinct ports kept per transport.
pub(crate) const MAX_PORTS: usize = 3;
/// Orders a peer may have in a burst...
pub(crate) const ORDER_BURST: u32 = 6;
/// ...and one more each this long.
pub(crate) const ORDER_REFILL: Duration = Duration::from_secs(1);
/// Peers whose budgets are tracked at once (names come from the server:
/// the map must not grow with them).
const MAX_TRACKED: usize = 1024;

/// Whether an address is one an order may aim at.
fn aimable(a: &SocketAddr) -> bool {
    let ip_ok = match a.ip() {
        IpAddr::V4(v4) => !(v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast()),
        IpAddr::V6(v6) => !(v6.is_unspecified() || v6.is_multicast()),
    };
    ip_ok && a.port() != 0
}

/// Keeps what an order may aim at, in order; returns the limits that
/// dropped something (one entry per dropped candidate, one for a cut list).
pub(crate) fn trim_candidates(list: &mut Vec<SocketAddr>) -> Vec<Limit> {
    let mut hits = Vec::new();
    let mut ports: Vec<u16> = Vec::with_capacity(MAX_PORTS);
    let mut kept = Vec::with_capacity(list.len().min(MAX_CANDIDATES));
    for a in list.iter() {
        if !aimable(a) {
            hits.push(Limit::CandidateAddress);
            continue;
        }
        if !ports.contains(&a.port()) {
            if ports.len() == MAX_PORTS {
                hits.push(Limit::CandidateAddress);
                continue;
            }
            ports.push(a.port());
        }
        if kept.contains(a) {
            continue; // a duplicate costs nothing, and gains nothing
        }
        if kept.len() == MAX_CANDIDATES {
            hits.push(Limit::Candidates);
            break;
        }
        kept.push(*a);
    }
    *list = kept;
    hits
}

/// Predicted ports one order may add (NAT discovery's port prediction,
/// `Strategy::PredictUdp`): the server asks for
/// [`punch_rendezvous::nat::PREDICT_COUNT`] (16); more is refused.
pub(crate) const MAX_PREDICTED: u16 = 32;

/// Checks the order's strategy against this daemon's own limits: a port
/// prediction must aim at the peer's own UDP IP (one of the order's UDP
/// candidates), with a non-zero step and at most [`MAX_PREDICTED`] ports.
/// Anything else is dropped (the punch runs as a plain timed punch) and
/// the limit returned, so a compromised server cannot turn predictions
/// into a scan of another host or a flood.
///
/// Birthday probing: probes only toward the peer's public IPv4 (the first
/// IPv4 candidate of each transport probed, the endpoint the server
/// observed), at most [`MAX_BIRTHDAY_PROBES`] per transport at most
/// [`MAX_BIRTHDAY_RATE`] a second; opening at most
/// [`MAX_BIRTHDAY_SOCKETS`] sockets per transport, and only with an IPv4
/// candidate of that transport to open them toward.
pub(crate) fn check_strategy(order: &mut PunchOrder) -> Option<Limit> {
    use punch_rendezvous::nat::Strategy;
    let first_v4 = |list: &[SocketAddr]| list.iter().find(|c| c.is_ipv4()).copied();
    let (udp_v4, tcp_v4) = (first_v4(&order.udp_candidates), first_v4(&order.candidates));
    let within = match order.strategy.as_ref()? {
        Strategy::PredictUdp(p) => {
            let peers_ip = order.udp_candidates.iter().any(|c| c.ip() == p.base.ip());
            p.count <= MAX_PREDICTED && p.delta != 0 && peers_ip && aimable(&p.base)
        }
        Strategy::BirthdayProbe(b) => {
            let on_peer = |c: Option<SocketAddr>| c.is_some_and(|c| c.ip() == b.ip && aimable(&c));
            (b.udp || b.tcp)
                && (!b.udp || on_peer(udp_v4))
                && (!b.tcp || on_peer(tcp_v4))
                && (1..=MAX_BIRTHDAY_PROBES).contains(&b.probes)
                && (1..=MAX_BIRTHDAY_RATE).contains(&b.per_second)
        }
        Strategy::BirthdayOpen(b) => {
            (b.udp || b.tcp)
                && (!b.udp || udp_v4.is_some())
                && (!b.tcp || tcp_v4.is_some())
                && (1..=MAX_BIRTHDAY_SOCKETS).contains(&b.sockets)
        }
        Strategy::Timed | Strategy::RelayFirst { .. } => true,
    };
    if within {
        return None;
    }
    order.strategy = None;
    Some(Limit::Candidates)
}

/// Sockets a birthday-opening punch may open (the server asks for
/// [`punch_rendezvous::nat::BIRTHDAY_SOCKETS`], 256).
pub(crate) const MAX_BIRTHDAY_SOCKETS: u16 = 256;
/// Probes a birthday-probing punch may send (the server asks for 2,048).
pub(crate) const MAX_BIRTHDAY_PROBES: u16 = 4096;
/// Probes a second (the server asks for 1,000).
pub(crate) const MAX_BIRTHDAY_RATE: u16 = 2000;
/// Birthday punches per daemon, both kinds together: a burst of
/// [`BIRTHDAY_BURST`], then one per [`BIRTHDAY_REFILL`]. So a daemon
/// sends at most 2 × 4,096 + 4 × 4,096 = 24,576 probes in its first
/// minute and ≤ 16,384 a minute after, whatever the server orders, and
/// holds at most a few hundred extra sockets at a time.
pub(crate) const BIRTHDAY_BURST: u32 = 2;
pub(crate) const BIRTHDAY_REFILL: Duration = Duration::from_secs(15);

/// Predicting punches per daemon, all peers together: a burst of
/// [`PREDICT_BURST`], then one per [`PREDICT_REFILL`] (≤ 28 in a minute).
/// Each sends at most [`MAX_PREDICTED`] × 25 rounds = 800 extra datagrams
/// (400 with the server's 16), so a daemon sends at most ~22,400
/// predicted datagrams a minute whatever the server orders; beyond the
/// budget, orders run as plain timed punches.
pub(crate) const PREDICT_BURST: u32 = 4;
pub(crate) const PREDICT_REFILL: Duration = Duration::from_millis(2500);

/// Keeps the candidates on the peer's public IPs (`public`: the first
/// candidate of each address family in each of the order's lists), IPv6
/// ones on the link of a public IPv6 one ([`same_link`], one /64: the
/// peer's stable address beside the temporary one the server saw; the
/// server only passes those it vouched for), and, only when the peer is
/// in our site (our public IP `ours`; [`same_site`]: one NAT or one IPv6
/// /48, the server's own rule for offering them), its other addresses;
/// the rest are dropped, one [`Limit::CandidateNotPeer`] each.
/// Run before [`trim_candidates`], so a stuffed list cannot crowd out the
/// real ones.
pub(crate) fn keep_peer_addresses(
    list: &mut Vec<SocketAddr>,
    public: &[IpAddr],
    ours: Option<IpAddr>,
) -> Vec<Limit> {
    let canon = |ip: IpAddr| ip.to_canonical();
    let our_site = ours.is_some_and(|o| public.iter().any(|p| same_site(*p, o)));
    let before = list.len();
    let peers = |ip: IpAddr| {
        public
            .iter()
            .any(|p| canon(*p) == canon(ip) || (p.is_ipv6() && ip.is_ipv6() && same_link(*p, ip)))
    };
    list.retain(|c| our_site || peers(c.ip()));
    vec![Limit::CandidateNotPeer; before - list.len()]
}

/// The peer's public IPs in an order: the first candidate of each address
/// family in each list (the server lists the router-mapped endpoint, else
/// the observed one, first, then the one observed over the other family;
/// all are on addresses it saw the peer at).
pub(crate) fn peer_public_ips(tcp: &[SocketAddr], udp: &[SocketAddr]) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = Vec::with_capacity(4);
    let first = |list: &[SocketAddr], v6: bool| list.iter().find(|c| c.is_ipv6() == v6).copied();
    let firsts = [
        first(tcp, false),
        first(tcp, true),
        first(udp, false),
        first(udp, true),
    ];
    for c in firsts.into_iter().flatten() {
        if !ips.contains(&c.ip()) {
            ips.push(c.ip());
        }
    }
    ips
}

/// Per-peer order budgets (a token bucket each), and the daemon-wide
/// budgets of the costly strategies.
#[derive(Debug, Default)]
pub(crate) struct OrderGate {
    buckets: HashMap<String, Bucket>,
    predict: Option<Bucket>,
    birthday: Option<Bucket>,
}

/// A token bucket: tokens left, and when they were counted.
type Bucket = (f64, Instant);

/// Refills `bucket` (up to `burst`, one token per `refill`) and spends a
/// token if one is there.
fn take(bucket: &mut Bucket, burst: u32, refill: Duration, now: Instant) -> bool {
    let (tokens, last) = bucket;
    let gained = now.saturating_duration_since(*last).as_secs_f64() / refill.as_secs_f64();
    *tokens = (*tokens + gained).min(f64::from(burst));
    *last = now;
    if *tokens >= 1.0 {
        *tokens -= 1.0;
        true
    } else {
        false
    }
}

impl OrderGate {
    /// Whether the order's strategy, if a costly one (port prediction,
    /// birthday probing), is within its daemon-wide budget at `now` (and
    /// spends it if so). When it is not, the strategy is dropped and the
    /// order runs as a plain timed punch: `Some(limit)` to count.
    pub(crate) fn admit_strategy(&mut self, order: &mut PunchOrder, now: Instant) -> Option<Limit> {
        use punch_rendezvous::nat::Strategy;
        let (slot, burst, refill) = match order.strategy {
            Some(Strategy::PredictUdp(_)) => (&mut self.predict, PREDICT_BURST, PREDICT_REFILL),
            Some(Strategy::BirthdayOpen(_) | Strategy::BirthdayProbe(_)) => {
                (&mut self.birthday, BIRTHDAY_BURST, BIRTHDAY_REFILL)
            }
            _ => return None,
        };
        let bucket = slot.get_or_insert((f64::from(burst), now));
        if take(bucket, burst, refill, now) {
            None
        } else {
            order.strategy = None;
            Some(Limit::Candidates)
        }
    }

    /// Whether an order for `peer` arriving at `now` is within budget
    /// (and spends it if so).
    pub(crate) fn admit(&mut self, peer: &str, now: Instant) -> bool {
        if self.buckets.len() >= MAX_TRACKED && !self.buckets.contains_key(peer) {
            // Forget the rest rather than grow: each forgotten peer gets a
            // fresh burst, still bounded per order by the plan.
            self.buckets.clear();
        }
        let burst = f64::from(ORDER_BURST);
        let bucket = self.buckets.entry(peer.to_owned()).or_insert((burst, now));
        take(bucket, ORDER_BURST, ORDER_REFILL, now)
    }
}

/// An order to bob with nothing in it, for unit tests to fill in.
#[cfg(test)]
pub(crate) fn blank_order() -> PunchOrder {
    PunchOrder {
        session: "s".into(),
        peer: "bob".into(),
        public_key: String::new(),
        candidates: vec![],
        udp_candidates: vec![],
        at_us: 0,
        initiator: true,
        relay_token: String::new(),
        relay_url: None,
        strategy: None,
        signature: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prediction_beyond_our_limits_or_off_the_peer_is_dropped() {
        use punch_rendezvous::nat::{Prediction, Strategy};
        let mut order = PunchOrder {
            udp_candidates: vec!["203.0.113.3:12405".parse().unwrap()],
            ..blank_order()
        };
        let with = |base: &str, delta, count| {
            Some(Strategy::PredictUdp(Box::new(Prediction {
                base: base.parse().unwrap(),
                delta,
                count,
            })))
        };
        order.strategy = with("203.0.113.3:12405", 256, 16);
        assert_eq!(check_strategy(&mut order), None);
        assert!(order.strategy.is_some());
        // The daemon-wide budget: a burst, then one per refill period.
        let mut gate = OrderGate::default();
        let t0 = Instant::now();
        let mut admitted = 0;
        for _ in 0..10 {
            let mut o = order.clone();
            if gate.admit_strategy(&mut o, t0).is_none() {
                assert!(o.strategy.is_some());
                admitted += 1;
            } else {
                assert_eq!(o.strategy, None, "a refused prediction is dropped");
            }
        }
        assert_eq!(admitted, PREDICT_BURST);
        let mut o = order.clone();
        assert_eq!(gate.admit_strategy(&mut o, t0 + PREDICT_REFILL), None);
        // Orders without a prediction never spend it.
        let mut plain = order.clone();
        plain.strategy = None;
        assert_eq!(gate.admit_strategy(&mut plain, t0), None);
        for bad in [
            with("203.0.113.3:12405", 256, MAX_PREDICTED + 1),
            with("203.0.113.3:12405", 0, 16),
            with("192.0.2.99:12405", 1, 16),
        ] {
            order.strategy = bad;
            assert_eq!(check_strategy(&mut order), Some(Limit::Candidates));
            assert_eq!(order.strategy, None);
        }
    }

    #[test]
    fn birthday_probing_stays_on_the_peer_and_within_our_budgets() {
        use punch_rendezvous::nat::{BirthdayOpen, BirthdayProbe, Strategy};
        let order = PunchOrder {
            udp_candidates: vec![a("203.0.113.3:12405"), a("198.51.100.2:4001")],
            candidates: vec![a("203.0.113.3:4000"), a("198.51.100.2:4000")],
            ..blank_order()
        };
        let probe_on = |ip: &str, probes, per_second, udp, tcp| {
            Some(Strategy::BirthdayProbe(Box::new(BirthdayProbe {
                ip: ip.parse().unwrap(),
                probes,
                per_second,
                udp,
                tcp,
            })))
        };
        let probe = |ip: &str, probes, per_second| probe_on(ip, probes, per_second, true, true);
        let open_on = |sockets, udp, tcp| {
            Some(Strategy::BirthdayOpen(Box::new(BirthdayOpen {
                sockets,
                udp,
                tcp,
                ttl_limited: true,
            })))
        };
        let open = |sockets| open_on(sockets, true, true);
        for good in [
            probe("203.0.113.3", 2048, 1000),
            probe_on("203.0.113.3", 2048, 1000, false, true),
            open(256),
            open_on(256, true, false),
        ] {
            let mut o = PunchOrder {
                strategy: good,
                ..order.clone()
            };
            assert_eq!(check_strategy(&mut o), None);
            assert!(o.strategy.is_some());
        }
        for bad in [
            // Another host than the peer's public IP, even its LAN one.
            probe("192.0.2.99", 2048, 1000),
            probe("198.51.100.2", 2048, 1000),
            probe("203.0.113.3", MAX_BIRTHDAY_PROBES + 1, 1000),
            probe("203.0.113.3", 2048, MAX_BIRTHDAY_RATE + 1),
            probe("203.0.113.3", 2048, 0),
            open(MAX_BIRTHDAY_SOCKETS + 1),
            open(0),
            // Neither transport: nothing to do, so not a birthday order.
            probe_on("203.0.113.3", 2048, 1000, false, false),
            open_on(256, false, false),
        ] {
            let mut o = PunchOrder {
                strategy: bad.clone(),
                ..order.clone()
            };
            assert_eq!(check_strategy(&mut o), Some(Limit::Candidates), "{bad:?}");
            assert_eq!(o.strategy, None);
        }
        // Nothing to open mappings toward without an IPv4 candidate of
        // the transport, nor to probe on another IP than its first one.
        let mut o = PunchOrder {
            strategy: open(256),
            udp_candidates: vec![a("[2001:db8::2]:4000")],
            ..order.clone()
        };
        assert_eq!(check_strategy(&mut o), Some(Limit::Candidates));
        let mut o = PunchOrder {
            strategy: probe_on("203.0.113.3", 2048, 1000, false, true),
            candidates: vec![a("203.0.113.9:4000")],
            ..order.clone()
        };
        assert_eq!(check_strategy(&mut o), Some(Limit::Candidates));
        // Daemon-wide: a burst of both kinds together, then one per refill;
        // the predictions' budget is apart.
        let mut gate = OrderGate::default();
        let t0 = Instant::now();
        let mut admitted = 0;
        for s in [probe("203.0.113.3", 2048, 1000), open(256)]
            .into_iter()
            .cycle()
            .take(6)
        {
            let mut o = PunchOrder {
                strategy: s,
                ..order.clone()
            };
            match gate.admit_strategy(&mut o, t0) {
                None => admitted += 1,
                Some(_) => assert_eq!(o.strategy, None),
            }
        }
        assert_eq!(admitted, BIRTHDAY_BURST);
        let mut o = PunchOrder {
            strategy: open(256),
            ..order.clone()
        };
        assert!(gate
            .admit_strategy(&mut o, t0 + BIRTHDAY_REFILL / 2)
            .is_some());
        let mut o = PunchOrder {
            strategy: open(256),
            ..order.clone()
        };
        assert_eq!(gate.admit_strategy(&mut o, t0 + BIRTHDAY_REFILL), None);
    }

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap_or_else(|_| panic!("{s}"))
    }

    #[test]
    fn ten_thousand_candidates_are_cut_to_the_cap() {
        let mut list: Vec<SocketAddr> = (0..10_000u32)
            .map(|i| SocketAddr::from(([198, 51, 100, (i % 250) as u8 + 1], 40000)))
            .collect();
        let hits = trim_candidates(&mut list);
        assert_eq!(list.len(), MAX_CANDIDATES);
        assert_eq!(hits, vec![Limit::Candidates]);
    }

    #[test]
    fn a_port_sweep_keeps_three_ports_and_bad_addresses_go() {
        let mut list = vec![
            a("203.0.113.3:40000"),
            a("0.0.0.0:40000"),
            a("224.0.0.1:40000"),
            a("255.255.255.255:40000"),
            a("198.51.100.2:0"),
            a("198.51.100.2:40001"),
            a("198.51.100.2:22"),
            a("198.51.100.3:40001"),
            a("198.51.100.3:23"),
            a("[::]:40000"),
            a("[ff02::1]:40000"),
        ];
        let hits = trim_candidates(&mut list);
        assert_eq!(
            list,
            vec![
                a("203.0.113.3:40000"),
                a("198.51.100.2:40001"),
                a("198.51.100.2:22"),
                a("198.51.100.3:40001")
            ]
        );
        assert_eq!(hits.len(), 7);
        assert!(hits.iter().all(|h| *h == Limit::CandidateAddress));
    }

    #[test]
    fn an_honest_order_is_untouched() {
        let honest = vec![
            a("203.0.113.3:40000"),
            a("198.51.100.2:40000"),
            a("127.0.0.1:40000"),
        ];
        let mut list = honest.clone();
        assert!(trim_candidates(&mut list).is_empty());
        assert_eq!(list, honest);
    }

    #[test]
    fn the_order_budget_refills_and_is_per_peer() {
        let t0 = Instant::now();
        let mut g = OrderGate::default();
        for _ in 0..ORDER_BURST {
            assert!(g.admit("bob", t0));
        }
        assert!(!g.admit("bob", t0));
        assert!(g.admit("carol", t0));
        assert!(g.admit("bob", t0 + ORDER_REFILL));
        assert!(!g.admit("bob", t0 + ORDER_REFILL));
    }

    #[test]
    fn lan_candidates_only_reach_a_peer_behind_our_own_nat() {
        // The peer at 203.0.113.3 (observed and mapped), with LAN addresses.
        let order = vec![
            a("203.0.113.3:41000"),
            a("203.0.113.3:40000"),
            a("192.0.2.20:40000"),
            a("192.0.2.5:40000"),
        ];
        let public = peer_public_ips(&order, &[a("203.0.113.3:40001")]);
        assert_eq!(public, vec!["203.0.113.3".parse::<IpAddr>().unwrap()]);
        // We are elsewhere: only its public endpoints.
        let mut list = order.clone();
        let hits = keep_peer_addresses(&mut list, &public, Some("198.51.100.9".parse().unwrap()));
        assert_eq!(list, order[..2]);
        assert_eq!(hits, vec![Limit::CandidateNotPeer; 2]);
        // Behind the same NAT: its LAN addresses too.
        let mut list = order.clone();
        assert!(
            keep_peer_addresses(&mut list, &public, Some("203.0.113.3".parse().unwrap()))
                .is_empty()
        );
        assert_eq!(list, order);
        // Not yet knowing our own public IP: no LAN addresses.
        let mut list = order.clone();
        keep_peer_addresses(&mut list, &public, None);
        assert_eq!(list, order[..2]);
    }

    #[test]
    fn a_dual_stack_peer_keeps_its_ipv6_endpoint_and_its_own_64() {
        // Observed over IPv4, then over IPv6 (the observe-only hello), then
        // its stable global address in that /64, a victim in another /64,
        // and a LAN address.
        let order = vec![
            a("203.0.113.3:40000"),
            a("[2001:db8:2::2]:40000"),
            a("[2001:db8:2::1234]:40000"),
            a("[2001:db8:9::66]:40000"),
            a("192.0.2.5:40000"),
        ];
        let public = peer_public_ips(&order, &[]);
        assert_eq!(
            public,
            vec![
                "203.0.113.3".parse::<IpAddr>().unwrap(),
                "2001:db8:2::2".parse().unwrap()
            ]
        );
        let mut list = order.clone();
        let hits = keep_peer_addresses(&mut list, &public, Some("198.51.100.9".parse().unwrap()));
        assert_eq!(list, order[..3]);
        assert_eq!(hits.len(), 2);
    }

    #[test]
    fn a_peer_in_our_ipv6_site_keeps_its_local_addresses() {
        // We are at 2001:db8:1:1::10; the peer, in another /64 of our /48
        // (the server's rule for offering local addresses), offers a
        // unique-local one.
        let order = vec![a("[2001:db8:1:2::20]:40000"), a("[fd00:1::20]:40000")];
        let public = peer_public_ips(&order, &[]);
        let mut list = order.clone();
        let ours = Some("2001:db8:1:1::10".parse().unwrap());
        assert!(keep_peer_addresses(&mut list, &public, ours).is_empty());
        assert_eq!(list, order);
        // Seen from another site, the local address is dropped.
        let ours = Some("2001:db8:7:1::10".parse().unwrap());
        assert_eq!(keep_peer_addresses(&mut list, &public, ours).len(), 1);
        assert_eq!(list, order[..1]);
    }

    #[test]
    fn a_third_host_beside_the_peer_is_dropped() {
        // A rewritten order: the peer's endpoint, then a victim's.
        let mut list = vec![a("203.0.113.3:40000"), a("198.51.100.80:22")];
        let udp = vec![a("203.0.113.3:40001"), a("198.51.100.80:53")];
        let public = peer_public_ips(&list, &udp);
        let mut udp_list = udp.clone();
        let ours = Some("192.0.2.1".parse().unwrap());
        assert_eq!(keep_peer_addresses(&mut list, &public, ours).len(), 1);
        assert_eq!(keep_peer_addresses(&mut udp_list, &public, ours).len(), 1);
        assert_eq!(list, vec![a("203.0.113.3:40000")]);
        assert_eq!(udp_list, vec![a("203.0.113.3:40001")]);
        // An IPv4-mapped spelling of the same IPs is the same site.
        let mut list = vec![a("203.0.113.3:40000"), a("192.0.2.5:40000")];
        let public = peer_public_ips(&list, &[]);
        keep_peer_addresses(
            &mut list,
            &public,
            Some("::ffff:203.0.113.3".parse().unwrap()),
        );
        assert_eq!(list.len(), 2);
    }

    proptest::proptest! {
        /// Over any arrival pattern, admitted orders never exceed the burst
        /// plus one per refill interval.
        #[test]
        fn the_order_budget_never_exceeds_its_rate(
            gaps_ms in proptest::collection::vec(0u64..3_000, 1..200),
        ) {
            let t0 = Instant::now();
            let mut g = OrderGate::default();
            let mut now = t0;
            let mut admitted = 0u64;
            for gap in gaps_ms {
                now += Duration::from_millis(gap);
                admitted += u64::from(g.admit("bob", now));
            }
            let span = now.duration_since(t0).as_secs_f64() / ORDER_REFILL.as_secs_f64();
            proptest::prop_assert!(admitted as f64 <= f64::from(ORDER_BURST) + span + 1e-9);
        }

        /// Any candidate list comes out within the caps, with nothing new.
        #[test]
        fn trimmed_lists_stay_within_the_caps(
            raw in proptest::collection::vec((proptest::prelude::any::<[u8; 4]>(), proptest::prelude::any::<u16>()), 0..64),
        ) {
            let orig: Vec<SocketAddr> = raw.iter().map(|(ip, p)| SocketAddr::from((*ip, *p))).collect();
            let mut list = orig.clone();
            trim_candidates(&mut list);
            proptest::prop_assert!(list.len() <= MAX_CANDIDATES);
            let mut ports: Vec<u16> = list.iter().map(SocketAddr::port).collect();
            ports.sort_unstable();
            ports.dedup();
            proptest::prop_assert!(ports.len() <= MAX_PORTS);
            proptest::prop_assert!(list.iter().all(|c| orig.contains(c) && aimable(c)));
        }
    }
}
