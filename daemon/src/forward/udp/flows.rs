//! The flow table of one UDP forward: which local client address has a
//! flow, the cap on flows, and who makes room. Pure (time is passed in);
//! the listener owns one and keeps the flow handles in it.
//!
//! A UDP "connection" is only ever implied: a client address that sends
//! gets a flow (its own tunnel stream and, on the exposing side, its own
//! socket toward the target, so replies find their way back). A flow ends
//! when it has been idle for [`super::FLOW_IDLE`] (its task decides, as it
//! sees both directions) or when the table is full and a new client
//! arrives: then the flow whose client was heard from longest ago makes
//! room, as a NAT's table does. Refusing the newcomer instead would let
//! 1,000 one-shot DNS queries (each from a new port) lock a forward for a
//! minute.

use std::collections::HashMap;
use std::net::SocketAddr;
use tokio::time::Instant;

/// One flow: its handle (what the listener uses to reach its task), its
/// id (to tell a flow from a later one of the same client) and when its
/// client last sent.
#[derive(Debug)]
struct Entry<H> {
    id: u64,
    handle: H,
    last: Instant,
}

/// What [`FlowTable::admit`] decided.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Admit<H> {
    /// The client has a flow: this one.
    Existing,
    /// A new flow with this id; make its handle with [`FlowTable::insert`].
    /// `evicted` is the flow that made room (its handle: drop it to end it).
    New { id: u64, evicted: Option<H> },
}

/// Flows by client address, at most `max`.
#[derive(Debug)]
pub(crate) struct FlowTable<H> {
    flows: HashMap<SocketAddr, Entry<H>>,
    max: usize,
    next_id: u64,
}

impl<H> FlowTable<H> {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            flows: HashMap::new(),
            max: max.max(1),
            next_id: 1,
        }
    }

    /// A datagram from `client` at `now`: its flow, or room for a new one.
    pub(crate) fn admit(&mut self, client: SocketAddr, now: Instant) -> Admit<H> {
        if let Some(e) = self.flows.get_mut(&client) {
            e.last = now;
            return Admit::Existing;
        }
        let evicted = if self.flows.len() >= self.max {
            let oldest = self
                .flows
                .iter()
                .min_by_key(|(_, e)| e.last)
                .map(|(a, _)| *a);
            oldest.and_then(|a| self.flows.remove(&a)).map(|e| e.handle)
        } else {
            None
        };
        let id = self.next_id;
        self.next_id += 1;
        Admit::New { id, evicted }
    }

    /// Records the new flow `id` (from [`Admit::New`]) for `client`.
    pub(crate) fn insert(&mut self, client: SocketAddr, id: u64, handle: H, now: Instant) {
        self.flows.insert(
            client,
            Entry {
                id,
                handle,
                last: now,
            },
        );
    }

    /// The handle of `client`'s flow.
    pub(crate) fn get(&self, client: &SocketAddr) -> Option<&H> {
        self.flows.get(client).map(|e| &e.handle)
    }

    /// Flow `id` of `client` ended (idle, or its stream failed). A newer
    /// flow of the same client is left alone.
    pub(crate) fn ended(&mut self, client: SocketAddr, id: u64) -> Option<H> {
        if self.flows.get(&client).is_some_and(|e| e.id == id) {
            self.flows.remove(&client).map(|e| e.handle)
        } else {
            None
        }
    }

    /// Flows now.
    pub(crate) fn len(&self) -> usize {
        self.flows.len()
    }
}

/// When an idle flow ends: `timeout` after the last datagram either way.
/// Pure, so the rule is tested without waiting.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Idle {
    last: Instant,
    timeout: std::time::Duration,
}

impl Idle {
    pub(crate) fn new(now: Instant, timeout: std::time::Duration) -> Self {
        Self { last: now, timeout }
    }

    /// A datagram passed (either way).
    pub(crate) fn touch(&mut self, now: Instant) {
        self.last = self.last.max(now);
    }

    /// When the flow expires unless touched again.
    pub(crate) fn deadline(&self) -> Instant {
        self.last + self.timeout
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn one_flow_per_client_address() {
        let t0 = Instant::now();
        let mut t = FlowTable::new(4);
        let Admit::New { id, evicted: None } = t.admit(addr(1), t0) else {
            panic!("first datagram makes a flow")
        };
        t.insert(addr(1), id, "a", t0);
        assert_eq!(t.admit(addr(1), t0), Admit::Existing);
        assert_eq!(t.get(&addr(1)), Some(&"a"));
        let Admit::New { id: id2, .. } = t.admit(addr(2), t0) else {
            panic!("another port is another flow")
        };
        assert_ne!(id, id2);
        t.insert(addr(2), id2, "b", t0);
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn a_full_table_evicts_the_client_heard_from_longest_ago() {
        let t0 = Instant::now();
        let mut t = FlowTable::new(2);
        for (i, port) in [1u16, 2].into_iter().enumerate() {
            let at = t0 + Duration::from_secs(i as u64);
            let Admit::New { id, .. } = t.admit(addr(port), at) else {
                panic!()
            };
            t.insert(addr(port), id, port, at);
        }
        // Client 1 speaks again: now 2 is the oldest.
        assert_eq!(
            t.admit(addr(1), t0 + Duration::from_secs(5)),
            Admit::Existing
        );
        let Admit::New { id, evicted } = t.admit(addr(3), t0 + Duration::from_secs(6)) else {
            panic!()
        };
        assert_eq!(evicted, Some(2));
        t.insert(addr(3), id, 3, t0 + Duration::from_secs(6));
        assert_eq!(t.len(), 2);
        assert!(t.get(&addr(2)).is_none());
        assert!(t.get(&addr(1)).is_some());
    }

    #[test]
    fn an_ended_flow_leaves_only_if_it_is_still_the_current_one() {
        let t0 = Instant::now();
        let mut t = FlowTable::new(8);
        let Admit::New { id: old, .. } = t.admit(addr(1), t0) else {
            panic!()
        };
        t.insert(addr(1), old, "old", t0);
        assert_eq!(t.ended(addr(1), old), Some("old"));
        let Admit::New { id: new, .. } = t.admit(addr(1), t0) else {
            panic!("the client's next datagram makes a new flow")
        };
        t.insert(addr(1), new, "new", t0);
        // A late "ended" of the old flow must not remove the new one.
        assert_eq!(t.ended(addr(1), old), None);
        assert_eq!(t.get(&addr(1)), Some(&"new"));
        assert_eq!(t.ended(addr(9), 1), None);
    }

    #[test]
    fn idle_expiry_counts_from_the_last_datagram_either_way() {
        let t0 = Instant::now();
        let mut idle = Idle::new(t0, Duration::from_secs(60));
        assert_eq!(idle.deadline(), t0 + Duration::from_secs(60));
        idle.touch(t0 + Duration::from_secs(30));
        assert_eq!(idle.deadline(), t0 + Duration::from_secs(90));
        // An older timestamp never moves the deadline back.
        idle.touch(t0);
        assert_eq!(idle.deadline(), t0 + Duration::from_secs(90));
    }
}
