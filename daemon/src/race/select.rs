//! Which path the race keeps: the decisions of [`super::punch_direct`]
//! with no sockets, no tasks and no clock (every `now` is passed in), so
//! they are unit-tested the way `punch/plan.rs` is.
//!
//! The shell reports what happened (an engine finished, a TCP connection
//! came up, a handshake or a selection ended) and asks [`Selector::next`]
//! what to do: handshake this TCP connection, wait (until when), or give
//! up. What to do with an authenticated path depends only on the role
//! ([`Selector::on_authenticated`]).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;

use super::{Cause, PunchError, SelectError};
use crate::path::Role;
use crate::punch::plan::CandidateKind;
use crate::tunnel::TunnelError;

/// How long the TLS client waits after the first TCP connection for a
/// better one (a LAN candidate) before choosing.
pub(crate) const CHOOSE_GRACE: Duration = Duration::from_millis(20);

/// Which engines this session runs, or why it cannot run any.
pub(crate) fn engines(tcp_allowed: bool, quic_possible: bool) -> Result<(bool, bool), PunchError> {
    if !tcp_allowed && !quic_possible {
        return Err(PunchError::NothingToTry);
    }
    Ok((tcp_allowed, quic_possible))
}

/// What to do with a path that just authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Keep {
    /// Client: ask the server for this one (`_select:<session>`) now.
    Select,
    /// Server: keep it open until the client asks for it (or another).
    AwaitSelection,
}

/// What the shell should do next.
#[derive(Debug)]
pub(crate) enum Next {
    /// Run TLS on this TCP connection (the id the shell gave it).
    Handshake(u32),
    /// Nothing to start; wake at this instant (the client's grace) or on
    /// the next event.
    Wait(Option<Instant>),
    /// Both engines are done and nothing is in flight.
    GiveUp(PunchError),
}

#[cfg(test)]
impl PartialEq for Next {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Next::Handshake(a), Next::Handshake(b)) => a == b,
            (Next::Wait(a), Next::Wait(b)) => a == b,
            (Next::GiveUp(a), Next::GiveUp(b)) => a.to_string() == b.to_string(),
            _ => false,
        }
    }
}

/// The race's state for one punch session.
#[derive(Debug)]
pub(crate) struct Selector {
    role: Role,
    tcp_done: bool,
    quic_done: bool,
    /// Client: TCP connections not yet handshaked, by id and kind.
    waiting: Vec<(u32, CandidateKind)>,
    /// Client: when the grace after the first TCP connection ends.
    choose_at: Option<Instant>,
    /// TLS handshakes running.
    handshakes: usize,
    /// Server: authenticated paths waiting for the client's choice.
    selecting: usize,
    attempts: u32,
    causes: Vec<Cause>,
}

impl Selector {
    /// A race with the given engines running (`false`: not run at all).
    pub(crate) fn new(role: Role, tcp: bool, quic: bool) -> Self {
        Self {
            role,
            tcp_done: !tcp,
            quic_done: !quic,
            waiting: Vec::new(),
            choose_at: None,
            handshakes: 0,
            selecting: 0,
            attempts: 0,
            causes: Vec::new(),
        }
    }

    /// The TCP engine ended: no more connections will come from it.
    pub(crate) fn tcp_done(&mut self, attempts: u32, last_error: Option<String>) {
        self.tcp_done = true;
        self.attempts = self.attempts.max(attempts);
        if let Some(e) = last_error {
            self.causes.push(Cause::TcpNoConnection(e));
        }
    }

    /// The QUIC engine ended.
    pub(crate) fn quic_done(&mut self, rounds: u32, last_error: Option<String>) {
        self.quic_done = true;
        self.attempts = self.attempts.max(rounds);
        if let Some(e) = last_error {
            self.causes.push(Cause::Quic(e));
        }
    }

    /// A punched TCP connection came up. The server handshakes every one
    /// at once (it cannot know which the client will choose); the client
    /// waits [`CHOOSE_GRACE`] for a better kind.
    pub(crate) fn tcp_connected(&mut self, now: Instant, id: u32, kind: CandidateKind) {
        self.waiting.push((id, kind));
        if self.role == Role::Client {
            self.choose_at.get_or_insert(now + CHOOSE_GRACE);
        }
    }

    /// A TLS handshake failed; the engine may punch that candidate again.
    pub(crate) fn handshake_failed(&mut self, remote: SocketAddr, error: TunnelError) {
        self.handshakes = self.handshakes.saturating_sub(1);
        self.causes.push(Cause::Tls { remote, error });
    }

    /// A path authenticated (a TCP handshake, or a QUIC connection).
    pub(crate) fn on_authenticated(&mut self, tcp: bool) -> Keep {
        if tcp {
            self.handshakes = self.handshakes.saturating_sub(1);
        }
        match self.role {
            Role::Client => Keep::Select,
            Role::Server => {
                self.selecting += 1;
                Keep::AwaitSelection
            }
        }
    }

    /// A selection failed: the client's request was not taken, or (server)
    /// a kept path was not chosen.
    pub(crate) fn selection_failed(&mut self, error: SelectError) {
        if self.role == Role::Server {
            self.selecting = self.selecting.saturating_sub(1);
        }
        self.causes.push(Cause::NotSelected(error));
    }

    /// What to do now. `queued`: the shell still holds reports it has not
    /// fed in (a connection in a channel), so giving up would be early.
    pub(crate) fn next(&mut self, now: Instant, queued: bool) -> Next {
        if let Some(id) = self.pick(now) {
            self.handshakes += 1;
            return Next::Handshake(id);
        }
        let idle = self.handshakes == 0 && self.selecting == 0 && self.waiting.is_empty();
        if self.tcp_done && self.quic_done && idle && !queued {
            return Next::GiveUp(PunchError::Failed {
                causes: std::mem::take(&mut self.causes),
                attempts: self.attempts,
            });
        }
        // Only a grace still to come is worth a timer: once it is over the
        // client picks as soon as its running handshake ends (an event).
        Next::Wait(
            self.choose_at
                .filter(|t| *t > now && !self.waiting.is_empty()),
        )
    }

    /// The next connection to handshake, if one should start now. The TLS
    /// client handshakes one TCP connection at a time, best kind first,
    /// once the grace is over (or no better one can come).
    fn pick(&mut self, now: Instant) -> Option<u32> {
        if self.waiting.is_empty() {
            return None;
        }
        match self.role {
            Role::Server => Some(self.waiting.remove(0).0),
            Role::Client => {
                let chosen = self.handshakes == 0
                    && self.choose_at.is_some_and(|t| now >= t || self.tcp_done);
                if !chosen {
                    return None;
                }
                let best = (0..self.waiting.len()).min_by_key(|&i| self.waiting[i].1)?;
                Some(self.waiting.remove(best).0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr() -> SocketAddr {
        SocketAddr::from(([203, 0, 113, 3], 40000))
    }

    #[test]
    fn nothing_to_try_without_tcp_and_without_a_udp_endpoint() {
        assert!(matches!(
            engines(false, false),
            Err(PunchError::NothingToTry)
        ));
        assert_eq!(engines(true, false).ok(), Some((true, false)));
        assert_eq!(engines(false, true).ok(), Some((false, true)));
    }

    #[test]
    fn client_waits_the_grace_then_handshakes_the_best_kind() {
        let t0 = Instant::now();
        let mut s = Selector::new(Role::Client, true, true);
        s.tcp_connected(t0, 1, CandidateKind::Public);
        // Within the 20 ms grace: wait for a better candidate.
        assert_eq!(s.next(t0, false), Next::Wait(Some(t0 + CHOOSE_GRACE)));
        s.tcp_connected(t0 + Duration::from_millis(5), 2, CandidateKind::Local);
        assert_eq!(
            s.next(t0 + Duration::from_millis(10), false),
            Next::Wait(Some(t0 + CHOOSE_GRACE))
        );
        // Grace over: the LAN candidate first, and only one at a time.
        assert_eq!(s.next(t0 + CHOOSE_GRACE, false), Next::Handshake(2));
        assert_eq!(s.next(t0 + CHOOSE_GRACE, false), Next::Wait(None));
        // That one failed: the next one goes.
        s.handshake_failed(addr(), TunnelError::Closed);
        assert_eq!(s.next(t0 + CHOOSE_GRACE, false), Next::Handshake(1));
    }

    #[test]
    fn client_skips_the_grace_when_the_tcp_engine_is_done() {
        let t0 = Instant::now();
        let mut s = Selector::new(Role::Client, true, false);
        s.tcp_connected(t0, 7, CandidateKind::Public);
        s.tcp_done(3, None);
        assert_eq!(s.next(t0, false), Next::Handshake(7));
    }

    #[test]
    fn server_handshakes_every_connection_and_keeps_every_path_until_chosen() {
        let t0 = Instant::now();
        let mut s = Selector::new(Role::Server, true, true);
        s.tcp_connected(t0, 1, CandidateKind::Public);
        s.tcp_connected(t0, 2, CandidateKind::Local);
        assert_eq!(s.next(t0, false), Next::Handshake(1));
        assert_eq!(s.next(t0, false), Next::Handshake(2));
        assert_eq!(s.on_authenticated(true), Keep::AwaitSelection);
        assert_eq!(s.on_authenticated(false), Keep::AwaitSelection); // QUIC
        s.tcp_done(4, None);
        s.quic_done(2, None);
        s.handshake_failed(addr(), TunnelError::HandshakeTimeout);
        // Two paths kept, waiting for `_select`: not over yet.
        assert_eq!(s.next(t0, false), Next::Wait(None));
        s.selection_failed(SelectError::NotChosenInTime(addr()));
        assert_eq!(s.next(t0, false), Next::Wait(None));
        s.selection_failed(SelectError::NotChosenInTime(addr()));
        assert!(matches!(s.next(t0, false), Next::GiveUp(_)));
    }

    #[test]
    fn client_selects_whichever_path_authenticates_first_tcp_or_quic() {
        let t0 = Instant::now();
        let mut s = Selector::new(Role::Client, true, true);
        s.tcp_connected(t0, 1, CandidateKind::Public);
        // QUIC authenticated during the TCP grace: it is asked for at once.
        assert_eq!(s.on_authenticated(false), Keep::Select);
        // Not taken: the TCP candidate still gets its turn.
        s.selection_failed(SelectError::NoAnswer);
        assert_eq!(s.next(t0 + CHOOSE_GRACE, false), Next::Handshake(1));
        assert_eq!(s.on_authenticated(true), Keep::Select);
    }

    #[test]
    fn gives_up_only_when_both_engines_are_done_and_nothing_is_queued() {
        let t0 = Instant::now();
        let mut s = Selector::new(Role::Client, true, true);
        s.tcp_done(12, Some("Connection refused".into()));
        assert_eq!(s.next(t0, false), Next::Wait(None));
        s.quic_done(3, Some("no answer".into()));
        assert_eq!(s.next(t0, true), Next::Wait(None));
        match s.next(t0, false) {
            Next::GiveUp(e) => {
                assert_eq!(
                    e.to_string(),
                    "tcp: no candidate connected (last error: Connection refused); quic: no answer"
                );
                assert_eq!(e.attempts(), 12);
            }
            other => panic!("{other:?}"),
        }
        let mut s = Selector::new(Role::Server, true, false);
        s.tcp_done(1, None);
        match s.next(t0, false) {
            Next::GiveUp(e) => assert_eq!(e.to_string(), "no connection established"),
            other => panic!("{other:?}"),
        }
    }
}
