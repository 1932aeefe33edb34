//! The in-memory store, the default: one process's registry in two maps
//! behind one mutex, held only for the map operations of one call (never
//! across an await).
//!
//! [`Registry`] is the plain, synchronous state machine, tested here without
//! a runtime; [`MemoryStore`] wraps it in the mutex and the [`Store`] trait.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard};

use super::{
    punch_orders, Addressed, Probe, ProbeKey, ProbeRecorded, PunchBound, PunchLimits, Recipient,
    Registered, Registration, RelayAuth, RelayJoin, Store, StoreError, StoreFuture, PUNCH_WINDOW,
    SESSION_TTL,
};
use crate::protocol::ErrorCode;
use crate::server::auth::{constant_time_eq, random_id};
use crate::server::lock::unpoisoned;

/// One side of a session as the relay needs it.
#[derive(Debug, Clone)]
struct SessionSide {
    name: String,
    /// Its connection when the session was made: how a side on another
    /// instance is reached (a local one is looked up again, it may have
    /// reconnected since).
    to: Recipient,
    /// The capability this side must present to `/v1/relay/{session}`.
    relay_token: String,
}

/// A punch session the server created.
#[derive(Debug)]
struct Session {
    sides: [SessionSide; 2],
    created_us: u64,
    /// Which sides have reported a result.
    reported: [bool; 2],
    /// A side reported `relayed`: keep the session for relay pairing.
    relaying: bool,
    /// The side waiting at the relay for its partner, and its joiner id.
    waiting: Option<(usize, u64)>,
}

/// Who is registered, and the punch sessions in flight.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    clients: HashMap<String, Registration>,
    sessions: HashMap<String, Session>,
}

fn age_us(now_us: u64, created_us: u64) -> u64 {
    now_us.saturating_sub(created_us)
}

fn micros(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl Registry {
    pub(crate) fn register(
        &mut self,
        name: &str,
        registration: Registration,
        max_clients: usize,
    ) -> Result<Registered, StoreError> {
        let replaced = match self.clients.get(name) {
            Some(old) if old.public_key != registration.public_key => {
                return Err(StoreError::refused(
                    ErrorCode::NameTaken,
                    format!("the name {name} is registered with another key; pick another name or stop the other daemon"),
                ));
            }
            Some(old) => Some(old.conn_id),
            None if self.clients.len() >= max_clients => {
                return Err(StoreError::refused(
                    ErrorCode::TooManyClients,
                    "the rendezvous server is full; try again later",
                ));
            }
            None => None,
        };
        self.clients.insert(name.to_owned(), registration);
        Ok(Registered { replaced })
    }

    pub(crate) fn unregister(&mut self, name: &str, conn_id: u64) -> bool {
        if self.clients.get(name).is_some_and(|c| c.conn_id == conn_id) {
            self.clients.remove(name);
            true
        } else {
            false
        }
    }

    pub(crate) fn set_rtt(&mut self, name: &str, rtt_us: u64) {
        if let Some(c) = self.clients.get_mut(name) {
            c.rtt_us = rtt_us;
        }
    }

    pub(crate) fn probe_key(&self, name: &str) -> Option<ProbeKey> {
        self.clients.get(name).map(|c| ProbeKey {
            conn_id: c.conn_id,
            public_key: c.public_key,
            nonce: c.nonce,
            counter: c.probe_counter,
        })
    }

    pub(crate) fn record_probe(&mut self, name: &str, probe: Probe) -> ProbeRecorded {
        let Some(c) = self.clients.get_mut(name) else {
            return ProbeRecorded::Stale;
        };
        // The registration may have been replaced while the caller verified.
        if c.nonce != probe.nonce || probe.counter <= c.probe_counter {
            return ProbeRecorded::Stale;
        }
        c.probe_counter = probe.counter;
        if probe.local_port != 0 {
            c.udp_port = Some(probe.local_port);
        }
        // A probe over the family the daemon registered with is its UDP
        // endpoint as before; one over the other family (IPv6 beside
        // IPv4) is kept beside it, not in its place.
        let slot = if probe.from.is_ipv4() == c.observed.is_ipv4() {
            &mut c.udp_observed
        } else {
            &mut c.alt_udp_observed
        };
        let moved = *slot != Some(probe.from);
        *slot = Some(probe.from);
        ProbeRecorded::Current { moved }
    }

    /// See [`Store::observe_alt`].
    pub(crate) fn observe_alt(
        &mut self,
        name: &str,
        public_key: [u8; 32],
        addr: SocketAddr,
    ) -> bool {
        match self.clients.get_mut(name) {
            Some(c) if c.public_key == public_key && addr.is_ipv4() != c.observed.is_ipv4() => {
                c.alt_observed = Some(addr);
                true
            }
            _ => false,
        }
    }

    pub(crate) fn coordinate(
        &mut self,
        from: &str,
        peer: &str,
        now_us: u64,
        limits: PunchLimits,
    ) -> Result<[Addressed; 2], StoreError> {
        self.coordinate_with(from, peer, None, now_us, limits, 0)
    }

    /// A registered daemon's entry.
    pub(crate) fn get(&self, name: &str) -> Option<&Registration> {
        self.clients.get(name)
    }

    /// Every registration, for a shared store to refresh.
    pub(crate) fn snapshot(&self) -> Vec<(String, Registration)> {
        self.clients
            .iter()
            .map(|(n, r)| (n.clone(), r.clone()))
            .collect()
    }

    /// [`Registry::coordinate`] where `peer` may be `remote`, a daemon on
    /// another instance (read from the shared registry), whose order needs
    /// `hop_us` more to get there. The session lives here, on the
    /// coordinating instance, whichever instance the peer is on.
    pub(crate) fn coordinate_with(
        &mut self,
        from: &str,
        peer: &str,
        remote: Option<&Registration>,
        now_us: u64,
        limits: PunchLimits,
        hop_us: u64,
    ) -> Result<[Addressed; 2], StoreError> {
        if from == peer {
            return Err(StoreError::refused(
                ErrorCode::SelfConnect,
                "a daemon cannot punch to itself",
            ));
        }
        let ttl = micros(SESSION_TTL);
        self.sessions
            .retain(|_, s| age_us(now_us, s.created_us) < ttl);
        if self.sessions.len() >= limits.max_pending {
            return Err(StoreError::OverBound {
                bound: PunchBound::Server,
                message: "too many punches in flight on this server; retry shortly".to_owned(),
            });
        }
        // Sessions this daemon started and that still wait for a result
        // or a relay: a daemon that asks again and again for peers that
        // never answer runs into its own bound, not the server's.
        let mine = self
            .sessions
            .values()
            .filter(|s| s.sides[0].name == from)
            .count();
        if mine >= limits.max_per_requester {
            return Err(StoreError::OverBound {
                bound: PunchBound::Requester,
                message: format!(
                    "{mine} of your punches are still pending (at most {}); wait for their results",
                    limits.max_per_requester
                ),
            });
        }
        let (Some(a), Some(b)) = (self.clients.get(from), remote.or(self.clients.get(peer))) else {
            return Err(StoreError::refused(
                ErrorCode::UnknownPeer,
                format!("peer {peer} is not connected to this rendezvous; check that its daemon runs and uses the same server"),
            ));
        };
        let session = random_id();
        let tokens = [random_id(), random_id()];
        let orders = punch_orders(&session, &tokens, (from, a), (peer, b), now_us, hop_us);
        let [t0, t1] = tokens;
        self.sessions.insert(
            session,
            Session {
                sides: [
                    SessionSide {
                        name: from.to_owned(),
                        to: orders[0].to.clone(),
                        relay_token: t0,
                    },
                    SessionSide {
                        name: peer.to_owned(),
                        to: orders[1].to.clone(),
                        relay_token: t1,
                    },
                ],
                created_us: now_us,
                reported: [false, false],
                relaying: false,
                waiting: None,
            },
        );
        Ok(orders)
    }

    pub(crate) fn withdraw(&mut self, session: &str) {
        self.sessions.remove(session);
    }

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

    pub(crate) fn take_fresh_sessions_of(
        &mut self,
        name: &str,
        now_us: u64,
    ) -> Vec<(String, Recipient)> {
        let window = micros(PUNCH_WINDOW);
        let fresh: Vec<String> = self
            .sessions
            .iter()
            .filter(|(_, s)| {
                age_us(now_us, s.created_us) < window && s.sides.iter().any(|x| x.name == name)
            })
            .map(|(id, _)| id.clone())
            .collect();
        let mut out = Vec::new();
        for id in fresh {
            if let Some(s) = self.sessions.remove(&id) {
                for side in s.sides.iter().filter(|x| x.name != name) {
                    if let Some(to) = self.reach(side) {
                        out.push((id.clone(), to));
                    }
                }
            }
        }
        out
    }

    /// `name`, a side of `session` on another instance, left while the
    /// session may still be punching: the session is removed and its
    /// other side returned, to be told. `None` if there is nothing to do.
    pub(crate) fn side_left(
        &mut self,
        session: &str,
        name: &str,
        now_us: u64,
    ) -> Option<Recipient> {
        let s = self.sessions.get(session)?;
        if age_us(now_us, s.created_us) >= micros(PUNCH_WINDOW)
            || !s.sides.iter().any(|x| x.name == name)
        {
            return None;
        }
        let s = self.sessions.remove(session)?;
        let other = s.sides.iter().find(|x| x.name != name)?;
        self.reach(other)
    }

    /// How to reach a side now: a local daemon by its current connection
    /// (it may have reconnected), one elsewhere as recorded.
    fn reach(&self, side: &SessionSide) -> Option<Recipient> {
        if side.to.instance.is_some() {
            return Some(side.to.clone());
        }
        self.clients.get(&side.name).map(|c| Recipient {
            name: side.name.clone(),
            conn_id: c.conn_id,
            instance: None,
        })
    }

    pub(crate) fn relay_auth(&self, session: &str, token: &str) -> RelayAuth {
        let Some(s) = self.sessions.get(session) else {
            return RelayAuth::Unknown;
        };
        match s
            .sides
            .iter()
            .position(|x| constant_time_eq(x.relay_token.as_bytes(), token.as_bytes()))
        {
            Some(side) => RelayAuth::Side {
                side,
                name: s.sides[side].name.clone(),
            },
            None => RelayAuth::WrongToken,
        }
    }

    pub(crate) fn relay_join(&mut self, session: &str, side: usize, joiner: u64) -> RelayJoin {
        let Some(s) = self.sessions.get_mut(session) else {
            return RelayJoin::Gone;
        };
        match s.waiting {
            Some((waiting_side, partner)) if waiting_side != side => {
                // Paired: the session has served its purpose.
                self.sessions.remove(session);
                RelayJoin::Pair { partner }
            }
            // Nobody, or the same side twice: the newer socket waits.
            earlier => {
                s.waiting = Some((side, joiner));
                RelayJoin::Wait {
                    displaced: earlier.map(|(_, j)| j),
                }
            }
        }
    }

    pub(crate) fn relay_leave(&mut self, session: &str, joiner: u64) {
        if let Some(s) = self.sessions.get_mut(session) {
            if s.waiting.is_some_and(|(_, j)| j == joiner) {
                s.waiting = None;
            }
        }
    }
}

/// [`Registry`] behind a mutex, as a [`Store`]. Each call does its work
/// when called and returns a ready future.
#[derive(Debug, Default)]
pub(crate) struct MemoryStore {
    registry: Mutex<Registry>,
}

impl MemoryStore {
    fn lock(&self) -> MutexGuard<'_, Registry> {
        unpoisoned(&self.registry)
    }
}

fn ready<'a, T: Send + 'a>(r: Result<T, StoreError>) -> StoreFuture<'a, T> {
    Box::pin(std::future::ready(r))
}

impl Store for MemoryStore {
    fn register<'a>(
        &'a self,
        name: &'a str,
        registration: Registration,
        max_clients: usize,
    ) -> StoreFuture<'a, Registered> {
        ready(self.lock().register(name, registration, max_clients))
    }

    fn unregister<'a>(&'a self, name: &'a str, conn_id: u64) -> StoreFuture<'a, bool> {
        ready(Ok(self.lock().unregister(name, conn_id)))
    }

    fn set_rtt<'a>(&'a self, name: &'a str, rtt_us: u64) -> StoreFuture<'a, ()> {
        self.lock().set_rtt(name, rtt_us);
        ready(Ok(()))
    }

    fn probe_key<'a>(&'a self, name: &'a str) -> StoreFuture<'a, Option<ProbeKey>> {
        ready(Ok(self.lock().probe_key(name)))
    }

    fn record_probe<'a>(&'a self, name: &'a str, probe: Probe) -> StoreFuture<'a, ProbeRecorded> {
        ready(Ok(self.lock().record_probe(name, probe)))
    }

    fn observe_alt<'a>(
        &'a self,
        name: &'a str,
        public_key: [u8; 32],
        addr: SocketAddr,
    ) -> StoreFuture<'a, bool> {
        ready(Ok(self.lock().observe_alt(name, public_key, addr)))
    }

    fn coordinate<'a>(
        &'a self,
        from: &'a str,
        peer: &'a str,
        now_us: u64,
        limits: PunchLimits,
    ) -> StoreFuture<'a, [Addressed; 2]> {
        ready(self.lock().coordinate(from, peer, now_us, limits))
    }

    fn withdraw<'a>(&'a self, session: &'a str) -> StoreFuture<'a, ()> {
        self.lock().withdraw(session);
        ready(Ok(()))
    }

    fn report<'a>(
        &'a self,
        session: &'a str,
        name: &'a str,
        relayed: bool,
    ) -> StoreFuture<'a, bool> {
        ready(Ok(self.lock().report(session, name, relayed)))
    }

    fn take_fresh_sessions_of<'a>(
        &'a self,
        name: &'a str,
        now_us: u64,
    ) -> StoreFuture<'a, Vec<(String, Recipient)>> {
        ready(Ok(self.lock().take_fresh_sessions_of(name, now_us)))
    }

    fn relay_auth<'a>(&'a self, session: &'a str, token: &'a str) -> StoreFuture<'a, RelayAuth> {
        ready(Ok(self.lock().relay_auth(session, token)))
    }

    fn relay_join<'a>(
        &'a self,
        session: &'a str,
        side: usize,
        joiner: u64,
    ) -> StoreFuture<'a, RelayJoin> {
        ready(Ok(self.lock().relay_join(session, side, joiner)))
    }

    fn relay_leave<'a>(&'a self, session: &'a str, joiner: u64) -> StoreFuture<'a, ()> {
        self.lock().relay_leave(session, joiner);
        ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::registration;
    use super::*;

    const SEC: u64 = 1_000_000;

    fn pair() -> Registry {
        let mut r = Registry::default();
        r.register("alice", registration(1, "203.0.113.2:1", &[]), 10)
            .unwrap();
        r.register("bob", registration(2, "203.0.113.3:1", &[]), 10)
            .unwrap();
        r
    }

    fn code(e: StoreError) -> ErrorCode {
        e.into_refusal().0
    }

    fn lim(n: usize) -> PunchLimits {
        PunchLimits {
            max_pending: n,
            max_per_requester: n,
        }
    }

    #[test]
    fn the_other_family_is_kept_beside_the_registered_one() {
        let mut r = pair();
        let probe = |counter, from: &str| Probe {
            nonce: [1; 32],
            counter,
            local_port: 0,
            from: from.parse().unwrap(),
        };
        let v4 = r.record_probe("alice", probe(1, "203.0.113.2:9"));
        let v6 = r.record_probe("alice", probe(2, "[2001:db8::2]:9"));
        assert_eq!(
            (v4, v6),
            (
                ProbeRecorded::Current { moved: true },
                ProbeRecorded::Current { moved: true }
            )
        );
        let a = r.get("alice").unwrap();
        assert_eq!(a.udp_observed, Some("203.0.113.2:9".parse().unwrap()));
        assert_eq!(a.alt_udp_observed, Some("[2001:db8::2]:9".parse().unwrap()));
        // Observe-only: the other family, the registered key.
        let six: SocketAddr = "[2001:db8::2]:1".parse().unwrap();
        assert!(!r.observe_alt("alice", [9; 32], six), "another key");
        assert!(
            !r.observe_alt("alice", [1; 32], "203.0.113.9:1".parse().unwrap()),
            "same family"
        );
        assert!(!r.observe_alt("carol", [1; 32], six), "not registered");
        assert!(r.observe_alt("alice", [1; 32], six));
        assert_eq!(r.get("alice").unwrap().alt_observed, Some(six));
    }

    #[test]
    fn one_requester_fills_only_its_own_share_and_withdrawn_sessions_free_it() {
        let mut r = Registry::default();
        for (i, name) in ["mallory", "victim", "alice", "bob"].iter().enumerate() {
            let ip = format!("203.0.113.{}:1", i + 2);
            r.register(name, registration(i as u8 + 1, &ip, &[]), 10)
                .unwrap();
        }
        let limits = PunchLimits {
            max_pending: 100,
            max_per_requester: 3,
        };
        let mut sessions = Vec::new();
        for _ in 0..3 {
            let [a, _] = r.coordinate("mallory", "victim", 0, limits).unwrap();
            sessions.push(a.order.session);
        }
        let over = r.coordinate("mallory", "victim", 0, limits).unwrap_err();
        assert!(matches!(
            over,
            StoreError::OverBound {
                bound: PunchBound::Requester,
                ..
            }
        ));
        assert_eq!(code(over), ErrorCode::Busy);
        // Others are not affected, and may even punch the same victim.
        assert!(r.coordinate("alice", "bob", 0, limits).is_ok());
        assert!(r.coordinate("victim", "mallory", 0, limits).is_ok());
        r.withdraw(&sessions[0]);
        assert!(r.coordinate("mallory", "victim", 0, limits).is_ok());
    }

    #[test]
    fn same_key_replaces_other_key_is_refused() {
        let mut r = Registry::default();
        let first = r.register("alice", registration(1, "203.0.113.2:1", &[]), 10);
        assert_eq!(first, Ok(Registered { replaced: None }));
        let mut again = registration(1, "203.0.113.2:2", &[]);
        again.conn_id = 7;
        assert_eq!(
            r.register("alice", again, 10),
            Ok(Registered { replaced: Some(1) }),
            "the old connection is named so it can be told"
        );
        let err = r.register("alice", registration(2, "203.0.113.9:1", &[]), 10);
        assert_eq!(code(err.unwrap_err()), ErrorCode::NameTaken);
        // The old connection's cleanup must not remove the new entry.
        assert!(!r.unregister("alice", 1));
        assert!(r.probe_key("alice").is_some());
        assert!(r.unregister("alice", 7));
        assert!(r.probe_key("alice").is_none());
    }

    #[test]
    fn full_server_refuses_new_names() {
        let mut r = Registry::default();
        r.register("a", registration(1, "203.0.113.2:1", &[]), 1)
            .unwrap();
        let err = r.register("b", registration(2, "203.0.113.3:1", &[]), 1);
        assert_eq!(code(err.unwrap_err()), ErrorCode::TooManyClients);
        // Reconnecting under a known name is not a new name.
        assert!(r
            .register("a", registration(1, "203.0.113.2:2", &[]), 1)
            .is_ok());
    }

    #[test]
    fn coordinate_builds_mirrored_orders_addressed_by_name() {
        let mut r = Registry::default();
        r.register(
            "alice",
            registration(1, "203.0.113.2:40000", &["192.0.2.2:40000"]),
            10,
        )
        .unwrap();
        r.register(
            "bob",
            registration(2, "203.0.113.3:40000", &["203.0.113.3:40000"]),
            10,
        )
        .unwrap();
        r.set_rtt("bob", 150_000);
        let [a, b] = r.coordinate("alice", "bob", SEC, lim(10)).unwrap();
        assert_eq!((a.to.name.as_str(), a.to.conn_id), ("alice", 1));
        assert_eq!((b.to.name.as_str(), b.to.conn_id), ("bob", 2));
        let (to_a, to_b) = (a.order, b.order);
        assert_eq!(to_a.session, to_b.session);
        assert_eq!(to_a.at_us, to_b.at_us);
        assert!(to_a.at_us > SEC + 75_000, "bob's RTT is accounted for");
        assert!(to_a.initiator && !to_b.initiator);
        assert_eq!(to_a.peer, "bob");
        assert_eq!(to_a.candidates, vec!["203.0.113.3:40000".parse().unwrap()]);
        // alice's LAN address stays out of bob's order: he is not behind
        // her NAT (issue #24).
        assert_eq!(to_b.candidates, vec!["203.0.113.2:40000".parse().unwrap()]);
        assert_ne!(to_a.relay_token, to_b.relay_token);
        assert_eq!(r.sessions.len(), 1);
    }

    #[test]
    fn coordinate_refuses_self_unknown_and_overload() {
        let mut r = Registry::default();
        r.register("alice", registration(1, "203.0.113.2:1", &[]), 10)
            .unwrap();
        let refuse = |r: &mut Registry, p: &str, now, max| {
            code(r.coordinate("alice", p, now, lim(max)).unwrap_err())
        };
        assert_eq!(refuse(&mut r, "alice", 0, 10), ErrorCode::SelfConnect);
        assert_eq!(refuse(&mut r, "bob", 0, 10), ErrorCode::UnknownPeer);
        r.register("bob", registration(2, "203.0.113.3:1", &[]), 10)
            .unwrap();
        r.coordinate("alice", "bob", 0, lim(1)).unwrap();
        assert_eq!(refuse(&mut r, "bob", SEC, 1), ErrorCode::Busy);
        // Old sessions expire and free their slot.
        let later = micros(SESSION_TTL) + SEC;
        assert!(r.coordinate("alice", "bob", later, lim(1)).is_ok());
        assert_eq!(r.sessions.len(), 1, "the expired one is gone");
    }

    #[test]
    fn finished_sessions_free_their_slot_unless_relaying() {
        let mut r = pair();
        let [a, _] = r.coordinate("alice", "bob", 0, lim(1)).unwrap();
        let s = a.order.session;
        assert!(!r.report(&s, "mallory", false));
        assert!(!r.report("no-such-session", "alice", false));
        assert!(r.report(&s, "alice", false));
        assert_eq!(r.sessions.len(), 1);
        assert!(r.report(&s, "bob", false));
        assert!(r.sessions.is_empty());
        // With the slot free again, the limit of 1 admits another.
        let [a, _] = r.coordinate("alice", "bob", 0, lim(1)).unwrap();
        r.report(&a.order.session, "alice", true);
        r.report(&a.order.session, "bob", true);
        assert_eq!(r.sessions.len(), 1, "a relayed session stays for pairing");
    }

    #[test]
    fn a_side_leaving_aborts_only_fresh_sessions() {
        let mut r = pair();
        let [old, _] = r.coordinate("alice", "bob", 0, lim(10)).unwrap();
        let now = micros(PUNCH_WINDOW) + SEC;
        let [fresh, _] = r.coordinate("alice", "bob", now, lim(10)).unwrap();
        let told = r.take_fresh_sessions_of("alice", now);
        let bob = Recipient {
            name: "bob".into(),
            conn_id: 2,
            instance: None,
        };
        assert_eq!(told, vec![(fresh.order.session.clone(), bob)]);
        assert!(!r.sessions.contains_key(&fresh.order.session));
        assert!(
            r.sessions.contains_key(&old.order.session),
            "past the punch window a session stays for results and the relay"
        );
    }

    #[test]
    fn probes_record_the_udp_endpoint_once_per_counter() {
        let mut r = pair();
        let key = r.probe_key("alice").unwrap();
        assert_eq!((key.conn_id, key.counter), (1, 0));
        let from = "203.0.113.2:41000".parse().unwrap();
        let probe = Probe {
            nonce: key.nonce,
            counter: 1,
            local_port: 41000,
            from,
        };
        assert_eq!(
            r.record_probe("alice", probe),
            ProbeRecorded::Current { moved: true }
        );
        assert_eq!(
            r.record_probe("alice", probe),
            ProbeRecorded::Stale,
            "replay"
        );
        let next = Probe {
            counter: 2,
            ..probe
        };
        assert_eq!(
            r.record_probe("alice", next),
            ProbeRecorded::Current { moved: false }
        );
        // Signed for an earlier registration: stale.
        let replaced = Probe {
            nonce: [9; 32],
            counter: 3,
            ..probe
        };
        assert_eq!(r.record_probe("alice", replaced), ProbeRecorded::Stale);
        assert_eq!(r.record_probe("carol", next), ProbeRecorded::Stale);
        // The endpoint now reaches bob's orders.
        let [_, to_bob] = r.coordinate("alice", "bob", 0, lim(10)).unwrap();
        assert_eq!(to_bob.order.udp_candidates, vec![from]);
    }

    #[test]
    fn relay_tokens_name_their_side() {
        let mut r = pair();
        let [a, b] = r.coordinate("alice", "bob", 0, lim(10)).unwrap();
        let s = &a.order.session;
        assert_eq!(
            r.relay_auth(s, &a.order.relay_token),
            RelayAuth::Side {
                side: 0,
                name: "alice".into()
            }
        );
        assert_eq!(
            r.relay_auth(s, &b.order.relay_token),
            RelayAuth::Side {
                side: 1,
                name: "bob".into()
            }
        );
        assert_eq!(r.relay_auth(s, "guess"), RelayAuth::WrongToken);
        assert_eq!(
            r.relay_auth("nope", &a.order.relay_token),
            RelayAuth::Unknown
        );
    }

    /// A session alice and bob punched, with alice (joiner 100) waiting at
    /// the relay.
    fn alice_waiting() -> (Registry, String) {
        let mut r = pair();
        let [a, _] = r.coordinate("alice", "bob", 0, lim(10)).unwrap();
        let s = a.order.session;
        assert_eq!(
            r.relay_join(&s, 0, 100),
            RelayJoin::Wait { displaced: None }
        );
        (r, s)
    }

    #[test]
    fn relay_pairs_the_two_sides_once() {
        let (mut r, s) = alice_waiting();
        let s = &s;
        // The same side again: the newer one waits, and the older one
        // giving up does not undo that.
        assert_eq!(
            r.relay_join(s, 0, 101),
            RelayJoin::Wait {
                displaced: Some(100)
            }
        );
        r.relay_leave(s, 100);
        assert_eq!(r.relay_join(s, 1, 102), RelayJoin::Pair { partner: 101 });
        assert_eq!(
            r.relay_join(s, 0, 103),
            RelayJoin::Gone,
            "paired sessions are gone"
        );
    }

    #[test]
    fn a_relay_side_that_left_is_not_paired_with() {
        let (mut r, s) = alice_waiting();
        r.relay_leave(&s, 100);
        assert_eq!(
            r.relay_join(&s, 1, 101),
            RelayJoin::Wait { displaced: None }
        );
    }

    #[tokio::test]
    async fn memory_store_serves_the_trait() {
        let store: std::sync::Arc<dyn Store> = std::sync::Arc::new(MemoryStore::default());
        store
            .register("alice", registration(1, "203.0.113.2:1", &[]), 10)
            .await
            .unwrap();
        store
            .register("bob", registration(2, "203.0.113.3:1", &[]), 10)
            .await
            .unwrap();
        let [a, _] = store.coordinate("alice", "bob", 0, lim(10)).await.unwrap();
        assert!(store
            .report(&a.order.session, "alice", false)
            .await
            .unwrap());
        assert!(store.unregister("alice", 1).await.unwrap());
        let err = store
            .coordinate("alice", "bob", 0, lim(10))
            .await
            .unwrap_err();
        assert_eq!(code(err), ErrorCode::UnknownPeer);
    }
}
