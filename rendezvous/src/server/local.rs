//! Handles that only mean something in this process, keyed by connection
//! id: each registered daemon's outbox and replacement signal, its probe
//! rate bucket, relay sides waiting for their partner's socket, and the
//! relay sockets this process holds (its own resource bound).
//!
//! The [`super::store`] says *who* a message is for ([`Recipient`]); this
//! table is how it gets there. A shared store adds a way to reach daemons
//! connected to other instances; this table stays as it is.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use axum::extract::ws::WebSocket;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::lock::unpoisoned;
use super::ratelimit::TokenBucket;
use super::store::Recipient;
use crate::protocol::ServerMsg;

/// Probes recorded per second for one daemon: it sends one every 15 s
/// (five in its first 4 s). Spent only by probes whose signature verified,
/// so forged probes naming a daemon cannot use up its budget.
const PROBES_PER_DAEMON_PER_SECOND: u32 = 1;
const PROBE_BURST_PER_DAEMON: u32 = 8;

/// One registered daemon's connection task, as others reach it.
#[derive(Debug)]
struct Attached {
    /// Messages to the connection task (bounded).
    outbox: mpsc::Sender<ServerMsg>,
    /// Fired when a newer registration replaces this one.
    replaced: CancellationToken,
    /// Verified probes recorded for this daemon (forged ones never reach
    /// this bucket; `udp` limits them per source and server-wide).
    probe_bucket: TokenBucket,
}

#[derive(Debug, Default)]
struct Tables {
    attached: HashMap<u64, Attached>,
    /// Relay sides waiting for their partner's socket, by joiner id.
    relay_partners: HashMap<u64, oneshot::Sender<Handoff>>,
    /// Relay sockets held, per daemon name.
    relays_per_daemon: HashMap<String, usize>,
    /// Relay sockets held in total (two per paired session).
    relays_total: usize,
}

/// Why a message was not delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Undelivered {
    /// The connection is gone from this process.
    Gone,
    /// Its outbox is full: the daemon is not reading.
    Full,
}

/// What a waiting relay side is sent.
pub(crate) enum Handoff {
    /// The other side's socket, with what that side holds for the relay
    /// (its capacity slot): the waiting side keeps both until the relay
    /// ends, so the second side counts against the caps as long as the
    /// first does.
    Partner {
        /// Boxed: a socket is large, and most handoffs are `Displaced`
        /// or never sent.
        socket: Box<WebSocket>,
        held: Box<dyn Send>,
    },
    /// A newer join of the same side took this one's place.
    Displaced,
}

impl std::fmt::Debug for Handoff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Handoff::Partner { .. } => f.write_str("Partner"),
            Handoff::Displaced => f.write_str("Displaced"),
        }
    }
}

/// Which relay bound a claim ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RelayCap {
    /// `max_relays`: the server holds as many relay sockets as it may.
    Server,
    /// `max_relays_per_daemon`: this daemon holds as many as it may.
    Daemon,
}

/// The table. One short lock per call, never held across an await nor
/// together with the store's.
#[derive(Debug, Default)]
pub(crate) struct Local {
    tables: Mutex<Tables>,
}

impl Local {
    fn lock(&self) -> MutexGuard<'_, Tables> {
        unpoisoned(&self.tables)
    }

    /// Makes connection `conn_id` reachable (before it is registered, so an
    /// order can never find a registration without an outbox).
    pub(crate) fn attach(
        &self,
        conn_id: u64,
        outbox: mpsc::Sender<ServerMsg>,
        replaced: CancellationToken,
        now: Instant,
    ) {
        let probe_bucket =
            TokenBucket::new(PROBES_PER_DAEMON_PER_SECOND, PROBE_BURST_PER_DAEMON, now);
        self.lock().attached.insert(
            conn_id,
            Attached {
                outbox,
                replaced,
                probe_bucket,
            },
        );
    }

    pub(crate) fn detach(&self, conn_id: u64) {
        self.lock().attached.remove(&conn_id);
    }

    /// Queues `msg` for `to` without waiting.
    pub(crate) fn deliver(&self, to: &Recipient, msg: ServerMsg) -> Result<(), Undelivered> {
        let outbox = match self.lock().attached.get(&to.conn_id) {
            Some(a) => a.outbox.clone(),
            None => return Err(Undelivered::Gone),
        };
        outbox.try_send(msg).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => Undelivered::Full,
            mpsc::error::TrySendError::Closed(_) => Undelivered::Gone,
        })
    }

    /// Tells connection `conn_id` a newer registration took its name.
    pub(crate) fn replace(&self, conn_id: u64) {
        if let Some(a) = self.lock().attached.get(&conn_id) {
            a.replaced.cancel();
        }
    }

    /// Takes one probe check from `conn_id`'s budget.
    pub(crate) fn allow_probe(&self, conn_id: u64, now: Instant) -> bool {
        self.lock()
            .attached
            .get_mut(&conn_id)
            .is_some_and(|a| a.probe_bucket.allow(now))
    }

    /// Takes a relay socket slot for `name` if under both limits; release
    /// it with [`Local::release_relay`]. The daemon's own bound is checked
    /// first: a daemon over its share is told so even when the server is
    /// full too.
    pub(crate) fn claim_relay(
        &self,
        name: &str,
        max_total: usize,
        max_per_daemon: usize,
    ) -> Result<(), RelayCap> {
        let mut t = self.lock();
        let used = t.relays_per_daemon.get(name).copied().unwrap_or(0);
        if used >= max_per_daemon {
            return Err(RelayCap::Daemon);
        }
        if t.relays_total >= max_total {
            return Err(RelayCap::Server);
        }
        *t.relays_per_daemon.entry(name.to_owned()).or_default() += 1;
        t.relays_total += 1;
        Ok(())
    }

    pub(crate) fn release_relay(&self, name: &str) {
        let mut t = self.lock();
        if let Some(n) = t.relays_per_daemon.get_mut(name) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                t.relays_per_daemon.remove(name);
            }
        }
        t.relays_total = t.relays_total.saturating_sub(1);
    }

    /// Joiner `joiner` waits for its partner's socket on the receiver.
    pub(crate) fn await_partner(&self, joiner: u64) -> oneshot::Receiver<Handoff> {
        let (tx, rx) = oneshot::channel();
        self.lock().relay_partners.insert(joiner, tx);
        rx
    }

    /// Stops `joiner` waiting (its receiver sees the sender dropped).
    pub(crate) fn forget_partner(&self, joiner: u64) {
        self.lock().relay_partners.remove(&joiner);
    }

    /// Tells the waiting `joiner` a newer join of its side replaced it, so
    /// it can close with that reason rather than look like a timeout.
    pub(crate) fn displace(&self, joiner: u64) {
        if let Some(tx) = self.lock().relay_partners.remove(&joiner) {
            let _ = tx.send(Handoff::Displaced);
        }
    }

    /// Hands `socket` (and `held`, kept for the relay's lifetime) to the
    /// waiting `joiner`. False (and both dropped, the socket closed) if
    /// that side gave up just now.
    pub(crate) fn hand_to_partner(
        &self,
        joiner: u64,
        socket: WebSocket,
        held: Box<dyn Send>,
    ) -> bool {
        let partner = self.lock().relay_partners.remove(&joiner);
        partner.is_some_and(|tx| {
            tx.send(Handoff::Partner {
                socket: Box::new(socket),
                held,
            })
            .is_ok()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipient(conn_id: u64) -> Recipient {
        Recipient {
            name: "alice".into(),
            conn_id,
            instance: None,
        }
    }

    #[test]
    fn delivery_goes_to_the_attached_connection_and_is_bounded() {
        let local = Local::default();
        let (tx, mut rx) = mpsc::channel(1);
        let replaced = CancellationToken::new();
        local.attach(1, tx, replaced.clone(), Instant::now());
        let msg = || ServerMsg::PunchAborted {
            session: "s".into(),
            peer: "bob".into(),
        };
        assert_eq!(local.deliver(&recipient(2), msg()), Err(Undelivered::Gone));
        assert_eq!(local.deliver(&recipient(1), msg()), Ok(()));
        assert_eq!(local.deliver(&recipient(1), msg()), Err(Undelivered::Full));
        assert!(rx.try_recv().is_ok());
        local.replace(1);
        assert!(replaced.is_cancelled());
        local.detach(1);
        assert_eq!(local.deliver(&recipient(1), msg()), Err(Undelivered::Gone));
    }

    #[test]
    fn probe_budget_is_per_connection() {
        let local = Local::default();
        let now = Instant::now();
        local.attach(1, mpsc::channel(1).0, CancellationToken::new(), now);
        let allowed = (0..20).filter(|_| local.allow_probe(1, now)).count();
        assert_eq!(allowed, PROBE_BURST_PER_DAEMON as usize);
        assert!(!local.allow_probe(2, now), "unknown connections get none");
    }

    #[test]
    fn relay_slots_are_bounded_in_total_and_per_daemon() {
        let local = Local::default();
        assert!(local.claim_relay("alice", 3, 2).is_ok());
        assert!(local.claim_relay("alice", 3, 2).is_ok());
        assert_eq!(
            local.claim_relay("alice", 3, 2),
            Err(RelayCap::Daemon),
            "per daemon"
        );
        assert!(local.claim_relay("bob", 3, 2).is_ok());
        assert_eq!(
            local.claim_relay("carol", 3, 2),
            Err(RelayCap::Server),
            "in total"
        );
        local.release_relay("alice");
        assert!(local.claim_relay("carol", 3, 2).is_ok());
    }
}
