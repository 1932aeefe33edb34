//! The store seam: what the rendezvous knows that another instance could
//! share — who is registered (name, key, observed endpoints, RTT), the punch
//! sessions in flight, their results, and relay pairing (session tokens,
//! which side is waiting).
//!
//! It holds data only. The handles that mean something only in this process
//! (each connection's outbox, its replacement signal, rate buckets, the
//! relay partner's socket) live in [`super::local`], keyed by connection id;
//! the store names connections by [`Recipient`] and the caller delivers.
//!
//! # Why the methods are async and fallible
//!
//! The in-memory store ([`memory::MemoryStore`], the default) never waits
//! and never fails, but a store shared between instances (Redis, next) does
//! both: every operation is a network round trip that can time out or find
//! the server gone. So [`Store`] methods return a boxed future of
//! `Result<_, StoreError>` now, and callers already `.await` them and turn
//! [`StoreError::Unavailable`] into a refusal the daemon retries. Boxed,
//! because the server holds `Arc<dyn Store>`: connection handling does not
//! change (nor become generic) when a second implementation is added. One
//! allocation per registry operation is nothing next to a WebSocket frame.
//!
//! Each method is one atomic step, so a shared implementation can map it to
//! one transaction or script; no caller holds a lock across two of them.
//! Time is passed in as server Unix time in microseconds, a clock instances
//! can agree on (an `Instant` means nothing to another process), which also
//! keeps the in-memory store testable without a clock.

mod memory;
mod redis;

use std::net::SocketAddr;
use std::time::Duration;

use futures::future::BoxFuture;

use crate::protocol::{b64, ErrorCode, PunchOrder};

pub(crate) use memory::MemoryStore;
pub(crate) use redis::{channel, Action, RedisStore, Signal, REFRESH_EVERY};

/// How long a punch session stays known for results and relay pairing.
pub(crate) const SESSION_TTL: Duration = Duration::from_secs(120);

/// How long after its creation a session may still be punching (punch
/// timeouts are seconds); a side leaving within it aborts the session.
pub(crate) const PUNCH_WINDOW: Duration = Duration::from_secs(30);

/// What every store operation returns.
pub(crate) type StoreFuture<'a, T> = BoxFuture<'a, Result<T, StoreError>>;

/// Why a store operation did not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum StoreError {
    /// The request is refused by the registry's rules (name taken, server
    /// full, unknown peer, too many punches); the daemon is told why.
    #[error("{message}")]
    Refused {
        /// What the daemon is told, as a code.
        code: ErrorCode,
        /// And as a sentence that says what to do.
        message: String,
    },
    /// The store could not be reached or answered nonsense (a shared
    /// store's network failure); the request may succeed if retried.
    #[error("the rendezvous registry is unavailable: {0}")]
    Unavailable(String),
    /// A punch bound is reached; the daemon is told `Busy`.
    #[error("{message}")]
    OverBound {
        /// Which bound.
        bound: PunchBound,
        /// What the daemon is told.
        message: String,
    },
}

/// The bound a refused `coordinate` ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PunchBound {
    /// `max_pending_punches` sessions pending on the server.
    Server,
    /// `max_pending_punches_per_daemon` sessions the requester started.
    Requester,
}

/// The limits `coordinate` enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PunchLimits {
    /// Pending sessions in total.
    pub(crate) max_pending: usize,
    /// Pending sessions one daemon requested.
    pub(crate) max_per_requester: usize,
}

impl StoreError {
    pub(crate) fn refused(code: ErrorCode, message: impl Into<String>) -> Self {
        StoreError::Refused {
            code,
            message: message.into(),
        }
    }

    /// The code and sentence a daemon gets: a store outage is `Busy`, which
    /// daemons already retry.
    pub(crate) fn into_refusal(self) -> (ErrorCode, String) {
        match self {
            StoreError::Refused { code, message } => (code, message),
            e @ StoreError::Unavailable(_) => (ErrorCode::Busy, format!("{e}; retry shortly")),
            StoreError::OverBound { message, .. } => (ErrorCode::Busy, message),
        }
    }
}

/// A registered daemon, as any instance may need to know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Registration {
    /// Distinguishes this connection from an earlier one with the same
    /// name, and says which connection's outbox delivers to it.
    pub(crate) conn_id: u64,
    pub(crate) public_key: [u8; 32],
    pub(crate) observed: SocketAddr,
    pub(crate) local_addrs: Vec<SocketAddr>,
    /// The challenge nonce of this registration: UDP probes are signed
    /// over it, so they cannot be replayed into a later registration.
    pub(crate) nonce: [u8; 32],
    /// The daemon's local UDP punch port, if it offers the QUIC path.
    pub(crate) udp_port: Option<u16>,
    /// Its UDP endpoint as the observation socket saw it.
    pub(crate) udp_observed: Option<SocketAddr>,
    /// Its TCP endpoint in the *other* address family than `observed`
    /// (IPv6 when it registered over IPv4, or the reverse), from a second,
    /// observe-only hello the daemon sends from its punch port over that
    /// family (`Hello::observe_only`). `None` until then.
    pub(crate) alt_observed: Option<SocketAddr>,
    /// Its UDP endpoint in the other family, from a probe over it.
    pub(crate) alt_udp_observed: Option<SocketAddr>,
    /// The punch port as its router mapped it, TCP and UDP (checked: on
    /// the observed IP).
    pub(crate) mapped_tcp: Option<SocketAddr>,
    pub(crate) mapped_udp: Option<SocketAddr>,
    /// How its NAT maps, as the daemon measured it (hello `nat`).
    pub(crate) nat: Option<crate::nat::NatSummary>,
    /// Highest probe counter accepted (replay protection).
    pub(crate) probe_counter: u64,
    /// Last RTT the daemon reported, for timing its punches.
    pub(crate) rtt_us: u64,
    /// The instance it is connected to, when that is another one
    /// (a registration read from the shared registry); `None`: this one.
    pub(crate) instance: Option<String>,
}

/// Where a message for a daemon goes: its name, and the connection that
/// registered it (whose outbox is in [`super::local::Local`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Recipient {
    pub(crate) name: String,
    pub(crate) conn_id: u64,
    /// The instance whose connection that is; `None`: this one.
    pub(crate) instance: Option<String>,
}

/// A punch order and whom it is for.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Addressed {
    pub(crate) to: Recipient,
    pub(crate) order: PunchOrder,
}

/// What a registration displaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Registered {
    /// The connection that held the name with the same key until now: it
    /// must be told it was replaced.
    pub(crate) replaced: Option<u64>,
}

/// What the UDP observer needs to check a probe before its signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProbeKey {
    pub(crate) conn_id: u64,
    pub(crate) public_key: [u8; 32],
    pub(crate) nonce: [u8; 32],
    pub(crate) counter: u64,
}

/// A verified probe, to record if it is still current.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Probe {
    /// The registration it was signed for.
    pub(crate) nonce: [u8; 32],
    pub(crate) counter: u64,
    /// The daemon's UDP punch port (0: unchanged).
    pub(crate) local_port: u16,
    /// Where it came from: the daemon's UDP mapping.
    pub(crate) from: SocketAddr,
}

/// What recording a probe did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProbeRecorded {
    /// Replayed, reordered, or for a registration replaced meanwhile.
    Stale,
    /// Recorded; `moved` if the UDP endpoint is new.
    Current { moved: bool },
}

/// Who may join a relay session with a given token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RelayAuth {
    /// No such session (never created, or expired).
    Unknown,
    /// The session exists, the token is neither side's.
    WrongToken,
    /// Side `side` (0 or 1), the daemon `name`.
    Side { side: usize, name: String },
}

/// What joining a relay session found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RelayJoin {
    /// Nobody (or this same side, earlier) is waiting: wait for the other.
    /// The same side's earlier joiner, if any, is `displaced`: the newer
    /// socket waits, the older one is let go.
    Wait { displaced: Option<u64> },
    /// The other side is waiting, as joiner `partner`: hand it the socket.
    /// The session is paired and gone from the store.
    Pair { partner: u64 },
    /// The session is gone (expired, or already paired).
    Gone,
}

/// The registry operations, data only. See the module doc for why they are
/// async and fallible.
pub(crate) trait Store: Send + Sync + std::fmt::Debug {
    /// Adds `name`. The same name with the same key replaces the old
    /// connection (a daemon reconnecting); with another key it is refused,
    /// and so is a new name beyond `max_clients`.
    fn register<'a>(
        &'a self,
        name: &'a str,
        registration: Registration,
        max_clients: usize,
    ) -> StoreFuture<'a, Registered>;

    /// Removes `name` if the entry still belongs to `conn_id` (a replaced
    /// connection's cleanup must not remove its successor). True if removed.
    fn unregister<'a>(&'a self, name: &'a str, conn_id: u64) -> StoreFuture<'a, bool>;

    /// Records the RTT `name` measured, for timing its punches.
    fn set_rtt<'a>(&'a self, name: &'a str, rtt_us: u64) -> StoreFuture<'a, ()>;

    /// What a probe naming `name` must be checked against, if registered.
    fn probe_key<'a>(&'a self, name: &'a str) -> StoreFuture<'a, Option<ProbeKey>>;

    /// Records a verified probe as `name`'s UDP endpoint, unless it is stale.
    fn record_probe<'a>(&'a self, name: &'a str, probe: Probe) -> StoreFuture<'a, ProbeRecorded>;

    /// Records `addr`, seen on an observe-only hello signed by
    /// `public_key`, as `name`'s TCP endpoint in its other address family.
    /// False (nothing recorded) when `name` is not registered with that
    /// key, or `addr` is of the family it registered over.
    fn observe_alt<'a>(
        &'a self,
        name: &'a str,
        public_key: [u8; 32],
        addr: SocketAddr,
    ) -> StoreFuture<'a, bool>;

    /// Creates a punch session between `from` and `peer`: both orders,
    /// addressed. Expired sessions are dropped first; `limits.max_pending`
    /// live ones in total, or `limits.max_per_requester` that `from`
    /// requested, is [`StoreError::OverBound`].
    fn coordinate<'a>(
        &'a self,
        from: &'a str,
        peer: &'a str,
        now_us: u64,
        limits: PunchLimits,
    ) -> StoreFuture<'a, [Addressed; 2]>;

    /// Removes `session` (its orders could not both be delivered), so an
    /// undeliverable punch holds nothing.
    fn withdraw<'a>(&'a self, session: &'a str) -> StoreFuture<'a, ()>;

    /// Records `name`'s result for `session`. False if `name` is not a side
    /// of it. A session both sides finished (and that is not being relayed)
    /// is removed, so it no longer counts against the pending limit.
    fn report<'a>(
        &'a self,
        session: &'a str,
        name: &'a str,
        relayed: bool,
    ) -> StoreFuture<'a, bool>;

    /// Removes the sessions `name` took part in that are young enough to
    /// still be punching, and returns each with its other side, to be told.
    fn take_fresh_sessions_of<'a>(
        &'a self,
        name: &'a str,
        now_us: u64,
    ) -> StoreFuture<'a, Vec<(String, Recipient)>>;

    /// Which side of `session` presents `token`.
    fn relay_auth<'a>(&'a self, session: &'a str, token: &'a str) -> StoreFuture<'a, RelayAuth>;

    /// Side `side` of `session` joins the relay as `joiner` (an id unique
    /// in this process), waiting or pairing.
    fn relay_join<'a>(
        &'a self,
        session: &'a str,
        side: usize,
        joiner: u64,
    ) -> StoreFuture<'a, RelayJoin>;

    /// `joiner` stopped waiting (timeout, shutdown); a later join of the
    /// same side is not undone by it.
    fn relay_leave<'a>(&'a self, session: &'a str, joiner: u64) -> StoreFuture<'a, ()>;

    /// Queues `signal` for the connection task of another instance,
    /// without waiting. False when there is no such path (the in-memory
    /// store knows no other instance) or its bounded queue is full.
    fn send(&self, _instance: &str, _signal: Signal) -> bool {
        false
    }
}

/// Both punch orders of a new session, `a` initiating. Any store builds
/// them the same way from the two registrations; `hop_us` is the extra
/// margin an order to a daemon on another instance needs to get there
/// through the shared store's signalling (0 on one instance).
pub(crate) fn punch_orders(
    session: &str,
    tokens: &[String; 2],
    (a_name, a): (&str, &Registration),
    (b_name, b): (&str, &Registration),
    now_us: u64,
    hop_us: u64,
) -> [Addressed; 2] {
    let at_us = punch_start_us(now_us, a.rtt_us, b.rtt_us) + hop_us;
    let side = |r: &Registration| crate::nat::Side {
        nat: r.nat,
        port_mapped: r.mapped_tcp.is_some() || r.mapped_udp.is_some(),
        ipv6: seen(r).iter().any(|ip| ip.to_canonical().is_ipv6()),
        udp_seen: r.udp_observed.is_some(),
    };
    // Only a strategy other than today's is written into the order, so
    // orders between daemons that measured nothing stay as they were.
    let strategy = |me: &Registration, other: &Registration| match crate::nat::choose_for(
        side(me),
        side(other),
        other.udp_observed,
        Some(other.observed),
    ) {
        crate::nat::Strategy::Timed => None,
        s => Some(s),
    };
    // A daemon's own (LAN) addresses only between daemons in one site:
    // one public IPv4 address, or IPv6 addresses in one /48 (issue #24).
    let lan = crate::server::ipv6::same_site(&seen(a), &seen(b));
    let order =
        |me: (&str, &Registration), other: (&str, &Registration), initiator, token: &str| {
            Addressed {
                to: Recipient {
                    name: me.0.to_owned(),
                    conn_id: me.1.conn_id,
                    instance: me.1.instance.clone(),
                },
                order: PunchOrder {
                    session: session.to_owned(),
                    peer: other.0.to_owned(),
                    public_key: b64(&other.1.public_key),
                    candidates: candidates(other.1, lan),
                    udp_candidates: udp_candidates(other.1, lan),
                    at_us,
                    initiator,
                    relay_token: token.to_owned(),
                    // Set by a shared store for a peer on another instance.
                    relay_url: None,
                    strategy: strategy(me.1, other.1),
                    // Signed on the way out, by the connection that
                    // knows the recipient's registration nonce.
                    signature: None,
                },
            }
        };
    [
        order((a_name, a), (b_name, b), true, &tokens[0]),
        order((b_name, b), (a_name, a), false, &tokens[1]),
    ]
}

/// The router-mapped endpoint first (when the daemon has one), then the
/// observed endpoint, then the daemon's own addresses, without repeats (a
/// host with no NAT reports its observed address as local too).
///
/// Mapped first: it is the one endpoint that takes an unsolicited first
/// packet (the router forwards it; nothing on this side has to open a
/// hole first), so it connects in the first round whatever the other
/// side's NAT does, and it always fits under the cap.
///
/// The endpoint observed over the other family (IPv6 beside IPv4) comes
/// right after the observed one: it is as public, and on IPv6 without NAT
/// it is the daemon's own address and punch port. Which family a peer
/// tries first is its own choice (the daemon's happy-eyeballs head start).
/// The daemon's own addresses follow only with `lan` (the recipient shares
/// its site): from anywhere else they can only lead into the recipient's
/// own LAN, which is how a peer could make it scan there. The exception
/// is a global IPv6 address in a /64 the server saw the daemon in: that
/// is the daemon's own public address, not a LAN's.
fn candidates(c: &Registration, lan: bool) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = c.mapped_tcp.into_iter().collect();
    if !out.contains(&c.observed) {
        out.push(c.observed);
    }
    if let Some(alt) = c.alt_observed.filter(|a| !out.contains(a)) {
        out.push(alt);
    }
    for a in offered_locals(c, lan) {
        if !out.contains(a) && out.len() < 8 {
            out.push(*a);
        }
    }
    out
}

/// The observed UDP endpoint first, then the daemon's own addresses with
/// its UDP port. Before its first probe is seen no public mapping is
/// known: then the first candidate is a guess, the observed TCP address
/// with the UDP port (what a port-preserving NAT gives; at worst a dead
/// candidate on the peer's own address), followed by the local ones, which
/// a peer on the same LAN needs. A punch ordered in that window (the peer
/// registered, its probe not yet in) used to go without QUIC, and on one
/// LAN TCP alone could be refused for the whole punch and end relayed (lab:
/// same-NAT stress); with the local ones alone, a QUIC-only punch between
/// two NATs could only fail (lab: a peer restarted, asked for 13 ms after
/// its registration and before its probe, ended relayed after 10 s).
/// The local ones only with `lan`, as in [`candidates`].
fn udp_candidates(c: &Registration, lan: bool) -> Vec<SocketAddr> {
    let Some(port) = c.udp_port else {
        return Vec::new();
    };
    let first = c
        .udp_observed
        .unwrap_or_else(|| SocketAddr::new(c.observed.ip(), port));
    // The mapped endpoint first, as in `candidates`.
    let mut out: Vec<SocketAddr> = c.mapped_udp.into_iter().collect();
    if !out.contains(&first) {
        out.push(first);
    }
    // The other family likewise: its probe's endpoint, or until one is
    // seen, its observed TCP address with the UDP port (on IPv6 without
    // NAT that is no guess at all).
    let alt = c
        .alt_udp_observed
        .or_else(|| c.alt_observed.map(|a| SocketAddr::new(a.ip(), port)));
    if let Some(alt) = alt.filter(|a| !out.contains(a)) {
        out.push(alt);
    }
    for a in offered_locals(c, lan) {
        let a = SocketAddr::new(a.ip(), port);
        if !out.contains(&a) && out.len() < 8 {
            out.push(a);
        }
    }
    out
}

/// Every address the server has seen the daemon at (both families, TCP
/// and UDP).
fn seen(r: &Registration) -> Vec<std::net::IpAddr> {
    [
        Some(r.observed),
        r.alt_observed,
        r.udp_observed,
        r.alt_udp_observed,
    ]
    .into_iter()
    .flatten()
    .map(|a| a.ip())
    .collect()
}

/// The daemon's self-reported addresses a peer may be given: all of them
/// within its site (`lan`), elsewhere only global IPv6 ones; and a global
/// IPv6 one only in a /64 the server saw the daemon in
/// ([`crate::server::ipv6::vouched_global`]), so a daemon cannot aim its
/// peers at someone else's network. Unique-local and IPv4 LAN addresses
/// name some other network's host anywhere but in the daemon's own site.
fn offered_locals(c: &Registration, lan: bool) -> impl Iterator<Item = &SocketAddr> {
    let seen = seen(c);
    c.local_addrs.iter().filter(move |a| {
        crate::server::ipv6::vouched_global(a.ip(), &seen)
            && (lan || crate::server::ipv6::is_global_v6(a.ip()))
    })
}

/// When both sides should fire, in server microseconds.
///
/// The order reaches each daemon about half its RTT after we send it, so
/// `at` must lie beyond the farther daemon's one-way delay, plus slack for
/// processing and jitter that grows with distance. Both daemons then convert
/// `at` to their own clocks with the offset they measured, so their SYNs
/// leave together whatever their distances to us.
pub(crate) fn punch_start_us(now_us: u64, rtt_a_us: u64, rtt_b_us: u64) -> u64 {
    const MAX_RTT_US: u64 = 3_000_000;
    const BASE_SLACK_US: u64 = 25_000;
    let owd = rtt_a_us.max(rtt_b_us).min(MAX_RTT_US) / 2;
    now_us + owd + owd / 2 + BASE_SLACK_US
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A registration for tests: key, conn id and nonce all `key`.
    pub(crate) fn registration(key: u8, observed: &str, locals: &[&str]) -> Registration {
        Registration {
            conn_id: u64::from(key),
            public_key: [key; 32],
            observed: observed.parse().unwrap(),
            local_addrs: locals.iter().map(|a| a.parse().unwrap()).collect(),
            nonce: [key; 32],
            udp_port: None,
            udp_observed: None,
            alt_observed: None,
            alt_udp_observed: None,
            mapped_tcp: None,
            mapped_udp: None,
            nat: None,
            probe_counter: 0,
            rtt_us: 0,
            instance: None,
        }
    }

    #[test]
    fn two_hard_nats_get_orders_that_say_relay_first_and_others_none() {
        use crate::nat::{Mapping, NatSummary, Strategy, TransportNat};
        let random = TransportNat {
            mapping: Mapping::EndpointDependent,
            port_preserved: false,
            delta: None,
            unsolicited: None,
        };
        let hard = NatSummary {
            tcp: random,
            udp: random,
        };
        let mut a = registration(1, "203.0.113.2:40000", &[]);
        let mut b = registration(2, "203.0.113.3:40000", &[]);
        let tokens = ["t1".to_owned(), "t2".to_owned()];
        let orders = punch_orders("s", &tokens, ("a", &a), ("b", &b), 0, 0);
        assert!(orders.iter().all(|o| o.order.strategy.is_none()));
        a.nat = Some(hard);
        b.nat = Some(hard);
        let orders = punch_orders("s", &tokens, ("a", &a), ("b", &b), 0, 0);
        for o in &orders {
            assert!(matches!(
                o.order.strategy,
                Some(Strategy::RelayFirst { .. })
            ));
        }
        // A router mapping on one side makes a direct path possible again.
        b.mapped_udp = Some("203.0.113.3:40001".parse().unwrap());
        let orders = punch_orders("s", &tokens, ("a", &a), ("b", &b), 0, 0);
        assert!(orders.iter().all(|o| o.order.strategy.is_none()));
    }

    #[test]
    fn udp_candidates_guess_the_public_endpoint_until_it_is_observed() {
        let mut c = registration(1, "203.0.113.2:40000", &["192.0.2.2:40000"]);
        assert!(udp_candidates(&c, true).is_empty(), "no QUIC offered");
        // Without a probe there is no public mapping: the guess (the TCP
        // address with the UDP port) first, then the local address a LAN
        // peer can use.
        c.udp_port = Some(41000);
        let guessed: Vec<SocketAddr> = vec![
            "203.0.113.2:41000".parse().unwrap(),
            "192.0.2.2:41000".parse().unwrap(),
        ];
        assert_eq!(udp_candidates(&c, true), guessed);
        c.udp_observed = Some("203.0.113.2:41000".parse().unwrap());
        let want: Vec<SocketAddr> = vec![
            "203.0.113.2:41000".parse().unwrap(),
            "192.0.2.2:41000".parse().unwrap(),
        ];
        assert_eq!(udp_candidates(&c, true), want);
    }

    #[test]
    fn a_mapped_endpoint_comes_first_and_says_its_own_port() {
        let mut c = registration(1, "203.0.113.2:31337", &["192.0.2.2:40000"]);
        c.udp_port = Some(40000);
        c.udp_observed = Some("203.0.113.2:51234".parse().unwrap());
        // The router gave other external ports than the punch port.
        c.mapped_tcp = Some("203.0.113.2:40001".parse().unwrap());
        c.mapped_udp = Some("203.0.113.2:40002".parse().unwrap());
        let tcp: Vec<SocketAddr> = ["203.0.113.2:40001", "203.0.113.2:31337", "192.0.2.2:40000"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(candidates(&c, true), tcp);
        let udp: Vec<SocketAddr> = ["203.0.113.2:40002", "203.0.113.2:51234", "192.0.2.2:40000"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(udp_candidates(&c, true), udp);
        // A mapping equal to the observed endpoint (port-preserving NAT) is not repeated.
        c.mapped_tcp = Some(c.observed);
        assert_eq!(candidates(&c, true).len(), 2);
    }

    /// Issue #24: a peer's LAN addresses go only to a daemon behind the
    /// same NAT (same public IPv4, or same IPv6 /64); to anyone else only
    /// its public endpoints, so no peer can aim another's punches into
    /// that one's own LAN.
    #[test]
    fn lan_addresses_go_only_to_a_peer_at_the_same_public_ip() {
        let mut a = registration(1, "203.0.113.2:40000", &["192.0.2.2:40000"]);
        a.udp_port = Some(40001);
        let elsewhere = registration(2, "198.51.100.7:40000", &["192.0.2.9:40000"]);
        let tokens = ["t0".to_owned(), "t1".to_owned()];
        let [_, to_b] = punch_orders("s", &tokens, ("a", &a), ("b", &elsewhere), 0, 0);
        let addrs =
            |v: &[&str]| -> Vec<SocketAddr> { v.iter().map(|s| s.parse().unwrap()).collect() };
        assert_eq!(to_b.order.candidates, addrs(&["203.0.113.2:40000"]));
        assert_eq!(to_b.order.udp_candidates, addrs(&["203.0.113.2:40001"]));
        let same_nat = registration(3, "203.0.113.2:40999", &["192.0.2.19:40000"]);
        let [_, to_c] = punch_orders("s", &tokens, ("a", &a), ("c", &same_nat), 0, 0);
        assert_eq!(
            to_c.order.candidates,
            addrs(&["203.0.113.2:40000", "192.0.2.2:40000"])
        );
        assert_eq!(
            to_c.order.udp_candidates,
            addrs(&["203.0.113.2:40001", "192.0.2.2:40001"])
        );
        // IPv6: one /64 is one link, one /48 one site; another /48 is elsewhere.
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        assert!(crate::protocol::same_link(
            ip("2001:db8:1:2::10"),
            ip("2001:db8:1:2::20")
        ));
        assert!(!crate::protocol::same_link(
            ip("2001:db8:1:3::10"),
            ip("2001:db8:1:2::20")
        ));
        assert!(crate::protocol::same_site(
            ip("2001:db8:1:3::10"),
            ip("2001:db8:1:2::20")
        ));
        assert!(!crate::protocol::same_site(
            ip("2001:db8:2:2::10"),
            ip("2001:db8:1:2::20")
        ));
        assert!(!crate::protocol::same_site(
            ip("203.0.113.2"),
            ip("2001:db8:1:2::20")
        ));
        assert!(crate::protocol::same_site(
            "::ffff:203.0.113.2".parse().unwrap(),
            "203.0.113.2".parse().unwrap()
        ));
    }

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn the_other_family_follows_the_observed_endpoint() {
        let mut c = registration(1, "203.0.113.2:31337", &["192.0.2.2:40000"]);
        c.udp_port = Some(40000);
        c.alt_observed = Some("[2001:db8:1::2]:40000".parse().unwrap());
        assert_eq!(
            candidates(&c, true),
            addrs(&[
                "203.0.113.2:31337",
                "[2001:db8:1::2]:40000",
                "192.0.2.2:40000"
            ])
        );
        // No IPv6 probe yet: its TCP address with the UDP port.
        assert_eq!(
            udp_candidates(&c, true),
            addrs(&[
                "203.0.113.2:40000",
                "[2001:db8:1::2]:40000",
                "192.0.2.2:40000"
            ])
        );
        c.alt_udp_observed = Some("[2001:db8:1::2]:40999".parse().unwrap());
        assert_eq!(
            udp_candidates(&c, true)[1],
            "[2001:db8:1::2]:40999".parse().unwrap()
        );
    }

    #[test]
    fn global_ipv6_locals_need_an_observation_and_unique_local_ones_a_site() {
        // Registered over IPv4; offers a global and a unique-local address.
        let mut c = registration(
            1,
            "198.18.0.1:5000",
            &["[2606:4700:10::1]:5000", "[fd00::1]:5000"],
        );
        let far = registration(2, "198.18.9.9:6000", &[]);
        let near = registration(3, "198.18.0.1:7000", &[]);
        let orders = |me: &Registration, c: &Registration| {
            punch_orders("s", &["x".into(), "y".into()], ("me", me), ("c", c), 0, 0)[0]
                .order
                .candidates
                .clone()
        };
        // Nothing vouches for the global one yet; the ULA only in its site.
        assert_eq!(orders(&far, &c), addrs(&["198.18.0.1:5000"]));
        assert_eq!(
            orders(&near, &c),
            addrs(&["198.18.0.1:5000", "[fd00::1]:5000"])
        );
        // Its observe-only hello came from a temporary address in that /64.
        c.alt_observed = Some("[2606:4700:10::beef]:5000".parse().unwrap());
        assert_eq!(
            orders(&far, &c),
            addrs(&[
                "198.18.0.1:5000",
                "[2606:4700:10::beef]:5000",
                "[2606:4700:10::1]:5000"
            ])
        );
    }

    #[test]
    fn start_time_covers_the_farther_side() {
        // Both near: only the base slack.
        assert_eq!(punch_start_us(0, 0, 0), 25_000);
        // One side 150 ms away: its order needs 75 ms to arrive, plus jitter slack.
        let at = punch_start_us(0, 1_000, 150_000);
        assert!(at > 75_000 && at < 150_000, "{at}");
        // Absurd RTT reports are clamped.
        assert!(punch_start_us(0, u64::MAX / 4, 0) <= 3_000_000);
    }

    #[test]
    fn an_outage_is_a_retryable_refusal() {
        let (code, msg) = StoreError::Unavailable("connection reset".into()).into_refusal();
        assert_eq!(code, ErrorCode::Busy);
        assert!(msg.contains("connection reset"), "{msg}");
        let (code, _) = StoreError::refused(ErrorCode::NameTaken, "x").into_refusal();
        assert_eq!(code, ErrorCode::NameTaken);
    }
}
