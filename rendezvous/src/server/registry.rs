//! Who is registered, and the punch sessions in flight.
//!
//! Plain data behind one mutex, held only for map operations (never across
//! an await). The connection tasks own their sockets; the registry holds a
//! bounded sender to each, so coordinating a punch is a lookup plus two
//! `try_send`s.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::protocol::{b64, ErrorCode, PunchOrder, ServerMsg};

/// How long a punch session stays known for results and relay pairing.
pub(crate) const SESSION_TTL: Duration = Duration::from_secs(120);

/// How long after its creation a session may still be punching (punch
/// timeouts are seconds); a side leaving within it aborts the session.
pub(crate) const PUNCH_WINDOW: Duration = Duration::from_secs(30);

/// A registered daemon.
#[derive(Debug)]
pub(crate) struct Client {
    /// Distinguishes this connection from an earlier one with the same name.
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
    /// Highest probe counter accepted (replay protection).
    pub(crate) probe_counter: u64,
    /// Probe signature checks allowed for this daemon: a flood of forged
    /// probes naming it costs the server little and other daemons nothing.
    pub(crate) probe_bucket: super::ratelimit::TokenBucket,
    /// Last RTT the daemon reported, for timing its punches.
    pub(crate) rtt_us: u64,
    /// Messages to the connection task (bounded).
    pub(crate) tx: mpsc::Sender<ServerMsg>,
    /// Fired when a newer registration replaces this one.
    pub(crate) replaced: CancellationToken,
}

/// One side of a session as the relay needs it.
#[derive(Debug, Clone)]
pub(crate) struct SessionSide {
    pub(crate) name: String,
    /// The capability this side must present to `/v1/relay/{session}`.
    pub(crate) relay_token: String,
}

/// A punch session the server created.
#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) sides: [SessionSide; 2],
    pub(crate) created: Instant,
    /// Which sides have reported a result.
    pub(crate) reported: [bool; 2],
    /// A side reported `relayed`: keep the session for relay pairing.
    pub(crate) relaying: bool,
}

/// The registry.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    pub(crate) clients: HashMap<String, Client>,
    pub(crate) sessions: HashMap<String, Session>,
    /// Relay sides waiting for their partner, by session.
    pub(crate) relays_waiting: HashMap<String, super::relay::Waiting>,
    /// Relay sockets held, per daemon name.
    pub(crate) relays_per_daemon: HashMap<String, usize>,
    /// Relay sockets held in total (two per paired session).
    pub(crate) relays_total: usize,
}

/// Why a registration was refused.
pub(crate) type Refusal = (ErrorCode, String);

impl Registry {
    /// Adds a client. The same name with the same key replaces the old
    /// connection (a daemon reconnecting); with another key it is refused.
    pub(crate) fn register(
        &mut self,
        name: &str,
        client: Client,
        max_clients: usize,
    ) -> Result<(), Refusal> {
        if let Some(old) = self.clients.get(name) {
            if old.public_key != client.public_key {
                return Err((
                    ErrorCode::NameTaken,
                    format!("the name {name} is registered with another key; pick another name or stop the other daemon"),
                ));
            }
            old.replaced.cancel();
        } else if self.clients.len() >= max_clients {
            return Err((
                ErrorCode::TooManyClients,
                "the rendezvous server is full; try again later".to_owned(),
            ));
        }
        self.clients.insert(name.to_owned(), client);
        Ok(())
    }

    /// Sessions `name` took part in that are young enough to still be
    /// punching: their other sides and the senders to tell them.
    pub(crate) fn take_fresh_sessions_of(
        &mut self,
        name: &str,
        now: Instant,
    ) -> Vec<(String, mpsc::Sender<ServerMsg>)> {
        let fresh: Vec<String> = self
            .sessions
            .iter()
            .filter(|(_, s)| {
                now.saturating_duration_since(s.created) < PUNCH_WINDOW
                    && s.sides.iter().any(|x| x.name == name)
            })
            .map(|(id, _)| id.clone())
            .collect();
        let mut out = Vec::new();
        for id in fresh {
            if let Some(s) = self.sessions.remove(&id) {
                for side in s.sides.iter().filter(|x| x.name != name) {
                    if let Some(c) = self.clients.get(&side.name) {
                        out.push((id.clone(), c.tx.clone()));
                    }
                }
            }
        }
        out
    }

    /// Records `name`'s result for `session`. Returns false if `name` is not
    /// a side of it. A session both sides finished (and that is not being
    /// relayed) is removed, so it no longer counts against the pending
    /// limit.
    pub(crate) fn report(&mut self, session: &str, name: &str, relayed: bool) -> bool {
        let Some(s) = self.sessions.get_mut(session) else {
            return false;
        };
        let Some(i) = s.sides.iter().position(|x| x.name == name) else {
            return false;
        };
        s.reported[i] = true;
        s.relaying |= relayed;
        if s.reported == [true, true] && !s.relaying {
            self.sessions.remove(session);
        }
        true
    }

    /// Removes a client if the entry still belongs to this connection.
    pub(crate) fn unregister(&mut self, name: &str, conn_id: u64) -> bool {
        if self.clients.get(name).is_some_and(|c| c.conn_id == conn_id) {
            self.clients.remove(name);
            true
        } else {
            false
        }
    }

    /// Creates a session between `from` and `peer` and returns both orders
    /// with the senders to deliver them on.
    pub(crate) fn coordinate(
        &mut self,
        from: &str,
        peer: &str,
        now: Instant,
        now_us: u64,
        max_pending: usize,
    ) -> Result<[(mpsc::Sender<ServerMsg>, PunchOrder); 2], Refusal> {
        if from == peer {
            return Err((
                ErrorCode::SelfConnect,
                "a daemon cannot punch to itself".to_owned(),
            ));
        }
        self.sessions
            .retain(|_, s| now.saturating_duration_since(s.created) < SESSION_TTL);
        if self.sessions.len() >= max_pending {
            return Err((
                ErrorCode::Busy,
                "too many punches in flight on this server; retry shortly".to_owned(),
            ));
        }
        let (Some(a), Some(b)) = (self.clients.get(from), self.clients.get(peer)) else {
            return Err((
                ErrorCode::UnknownPeer,
                format!("peer {peer} is not connected to this rendezvous; check that its daemon runs and uses the same server"),
            ));
        };
        let at_us = punch_start_us(now_us, a.rtt_us, b.rtt_us);
        let session = random_id();
        let tokens = [random_id(), random_id()];
        let order = |me: &Client, other: &Client, other_name: &str, initiator, token: &str| {
            let order = PunchOrder {
                session: session.clone(),
                peer: other_name.to_owned(),
                public_key: b64(&other.public_key),
                candidates: candidates(other),
                udp_candidates: udp_candidates(other),
                at_us,
                initiator,
                relay_token: token.to_owned(),
            };
            (me.tx.clone(), order)
        };
        let orders = [
            order(a, b, peer, true, &tokens[0]),
            order(b, a, from, false, &tokens[1]),
        ];
        self.sessions.insert(
            session,
            Session {
                sides: [
                    SessionSide {
                        name: from.to_owned(),
                        relay_token: tokens[0].clone(),
                    },
                    SessionSide {
                        name: peer.to_owned(),
                        relay_token: tokens[1].clone(),
                    },
                ],
                created: now,
                reported: [false, false],
                relaying: false,
            },
        );
        Ok(orders)
    }
}

/// The observed endpoint first, then the daemon's own addresses, without
/// repeats (a host with no NAT reports its observed address as local too).
fn candidates(c: &Client) -> Vec<SocketAddr> {
    let mut out = vec![c.observed];
    for a in &c.local_addrs {
        if !out.contains(a) && out.len() < 8 {
            out.push(*a);
        }
    }
    out
}

/// The observed UDP endpoint first, then the daemon's own addresses with
/// its UDP port. Empty until a probe was seen: no UDP mapping is known, so
/// there is nothing to punch to.
fn udp_candidates(c: &Client) -> Vec<SocketAddr> {
    let (Some(observed), Some(port)) = (c.udp_observed, c.udp_port) else {
        return Vec::new();
    };
    let mut out = vec![observed];
    for a in &c.local_addrs {
        let a = SocketAddr::new(a.ip(), port);
        if !out.contains(&a) && out.len() < 8 {
            out.push(a);
        }
    }
    out
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

/// 128 random bits as hex: session ids and relay tokens.
pub(crate) fn random_id() -> String {
    let mut bytes = [0u8; 16];
    // getrandom only fails if the OS has no entropy source at all; a
    // predictable id would be worse than a crash, so fall back to the clock
    // mixed with the address of a stack value, which is still unique.
    if getrandom::fill(&mut bytes).is_err() {
        let t = crate::protocol::unix_time_us();
        bytes[..8].copy_from_slice(&t.to_le_bytes());
        bytes[8..].copy_from_slice(&(&t as *const u64 as u64).to_le_bytes());
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(key: u8, observed: &str, locals: &[&str]) -> (Client, mpsc::Receiver<ServerMsg>) {
        let (tx, rx) = mpsc::channel(4);
        (
            Client {
                conn_id: u64::from(key),
                public_key: [key; 32],
                observed: observed.parse().unwrap(),
                local_addrs: locals.iter().map(|a| a.parse().unwrap()).collect(),
                nonce: [key; 32],
                udp_port: None,
                udp_observed: None,
                probe_counter: 0,
                probe_bucket: super::super::ratelimit::TokenBucket::new(1, 8, Instant::now()),
                rtt_us: 0,
                tx,
                replaced: CancellationToken::new(),
            },
            rx,
        )
    }

    #[test]
    fn udp_candidates_need_an_observed_udp_endpoint() {
        let (mut c, _rx) = client(1, "203.0.113.2:40000", &["192.0.2.2:40000"]);
        // Offering QUIC is not enough: without a probe there is no mapping.
        c.udp_port = Some(41000);
        assert!(udp_candidates(&c).is_empty());
        c.udp_observed = Some("203.0.113.2:41000".parse().unwrap());
        let want: Vec<SocketAddr> = vec![
            "203.0.113.2:41000".parse().unwrap(),
            "192.0.2.2:41000".parse().unwrap(),
        ];
        assert_eq!(udp_candidates(&c), want);
    }

    #[test]
    fn same_key_replaces_other_key_is_refused() {
        let mut r = Registry::default();
        let (a, _rx) = client(1, "203.0.113.2:1", &[]);
        let first = a.replaced.clone();
        r.register("alice", a, 10).unwrap();
        let (a2, _rx2) = client(1, "203.0.113.2:2", &[]);
        r.register("alice", a2, 10).unwrap();
        assert!(first.is_cancelled());
        let (m, _rx3) = client(2, "203.0.113.9:1", &[]);
        assert_eq!(
            r.register("alice", m, 10).unwrap_err().0,
            ErrorCode::NameTaken
        );
        // The old connection's cleanup must not remove the new entry.
        assert!(!r.unregister("alice", 99));
        assert!(r.clients.contains_key("alice"));
    }

    #[test]
    fn full_server_refuses_new_names() {
        let mut r = Registry::default();
        let (a, _ra) = client(1, "203.0.113.2:1", &[]);
        r.register("a", a, 1).unwrap();
        let (b, _rb) = client(2, "203.0.113.3:1", &[]);
        assert_eq!(
            r.register("b", b, 1).unwrap_err().0,
            ErrorCode::TooManyClients
        );
    }

    #[test]
    fn coordinate_builds_mirrored_orders() {
        let mut r = Registry::default();
        let (a, _ra) = client(1, "203.0.113.2:40000", &["192.0.2.2:40000"]);
        let (b, _rb) = client(2, "203.0.113.3:40000", &["203.0.113.3:40000"]);
        r.register("alice", a, 10).unwrap();
        r.register("bob", b, 10).unwrap();
        let [(_, to_a), (_, to_b)] = r
            .coordinate("alice", "bob", Instant::now(), 1_000_000, 10)
            .unwrap();
        assert_eq!(to_a.session, to_b.session);
        assert_eq!(to_a.at_us, to_b.at_us);
        assert!(to_a.initiator && !to_b.initiator);
        assert_eq!(to_a.peer, "bob");
        assert_eq!(to_a.candidates, vec!["203.0.113.3:40000".parse().unwrap()]);
        assert_eq!(
            to_b.candidates,
            vec![
                "203.0.113.2:40000".parse().unwrap(),
                "192.0.2.2:40000".parse().unwrap()
            ]
        );
        assert_ne!(to_a.relay_token, to_b.relay_token);
        assert_eq!(r.sessions.len(), 1);
    }

    #[test]
    fn coordinate_refuses_self_unknown_and_overload() {
        let mut r = Registry::default();
        let (a, _ra) = client(1, "203.0.113.2:1", &[]);
        r.register("alice", a, 10).unwrap();
        let now = Instant::now();
        let code =
            |r: &mut Registry, p: &str, max| r.coordinate("alice", p, now, 0, max).unwrap_err().0;
        assert_eq!(code(&mut r, "alice", 10), ErrorCode::SelfConnect);
        assert_eq!(code(&mut r, "bob", 10), ErrorCode::UnknownPeer);
        let (b, _rb) = client(2, "203.0.113.3:1", &[]);
        r.register("bob", b, 10).unwrap();
        r.coordinate("alice", "bob", now, 0, 1).unwrap();
        assert_eq!(code(&mut r, "bob", 1), ErrorCode::Busy);
        // Old sessions expire and free their slot.
        assert!(r
            .coordinate(
                "alice",
                "bob",
                now + SESSION_TTL + Duration::from_secs(1),
                0,
                1
            )
            .is_ok());
    }

    #[test]
    fn finished_sessions_free_their_slot_unless_relaying() {
        let mut r = Registry::default();
        let (a, _ra) = client(1, "203.0.113.2:1", &[]);
        let (b, _rb) = client(2, "203.0.113.3:1", &[]);
        r.register("alice", a, 10).unwrap();
        r.register("bob", b, 10).unwrap();
        let now = Instant::now();
        let [(_, o), _] = r.coordinate("alice", "bob", now, 0, 1).unwrap();
        assert!(!r.report(&o.session, "mallory", false));
        assert!(r.report(&o.session, "alice", false));
        assert_eq!(r.sessions.len(), 1);
        assert!(r.report(&o.session, "bob", false));
        assert!(r.sessions.is_empty());
        // With the slot free again, the limit of 1 admits another.
        let [(_, o), _] = r.coordinate("alice", "bob", now, 0, 1).unwrap();
        r.report(&o.session, "alice", true);
        r.report(&o.session, "bob", true);
        assert_eq!(r.sessions.len(), 1, "a relayed session stays for pairing");
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
    fn ids_are_random_hex() {
        let a = random_id();
        assert_eq!(a.len(), 32);
        assert_ne!(a, random_id());
    }
}
