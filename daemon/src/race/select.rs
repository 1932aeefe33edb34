//! Which path the race keeps: the decisions of [`super::punch_direct`]
//! with no sockets, no tasks and no clock (every `now` is passed in), so
//! they are unit-tested the way `punch/plan.rs` is.
//!
//! The shell reports what happened (an engine finished, a TCP connection
//! came up, a handshake or a selection ended) and asks [`Selector::next`]
//! what to do: handshake this TCP connection, wait (until when), ask for
//! the QUIC path it holds, or give up. What to do with an authenticated
//! path depends on the role and, for the client, on whether TCP may still
//! come ([`Selector::on_authenticated`]).
//!
//! The client prefers TCP on short paths and QUIC on long ones. QUIC's
//! handshake is a round trip shorter, so it authenticated first in most
//! races and was kept, yet on the lab bench at 0–40 ms QUIC (quinn,
//! userspace congestion control and crypto on one core) had 1.8× TCP's
//! round-trip time and 0.44–0.87× its throughput. So an authenticated QUIC
//! path is held for [`prefer_tcp_grace`] while TCP may still connect; TCP
//! is asked for when it authenticates, QUIC when the grace ends or TCP
//! cannot come any more. On a long path ([`LONG_PATH_RTT`] and up) with
//! QUIC running BBR the order turns: QUIC is asked for as soon as it
//! authenticates. There the two moved bulk data alike in every recorded
//! run (at 100 and 200 ms RTT, 0.7–2.9× plain TCP each), but a 64-byte
//! round trip beside a bulk download waited −0.1 to +8 ms on QUIC against
//! +4 to +202 ms on TCP, whose one byte stream holds every stream's data
//! behind each lost segment (BENCHMARKS.md). Status says which happened
//! ([`Why`]).

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

/// From this QUIC handshake round-trip time up, a QUIC path that runs BBR
/// is kept as soon as it authenticates. Between the bench's 40 ms (TCP
/// ahead in bulk and under load) and 100 ms (QUIC at par in bulk and
/// far ahead under load); a path measured at 80 ms or more is a long one.
pub(crate) const LONG_PATH_RTT: Duration = Duration::from_millis(80);

/// Least and most time the client holds an authenticated QUIC path for
/// TCP to authenticate.
const PREFER_TCP_GRACE_MIN: Duration = Duration::from_millis(100);
const PREFER_TCP_GRACE_MAX: Duration = Duration::from_secs(1);

/// How long the client holds an authenticated QUIC path while TCP may
/// still authenticate: TCP needs about one round trip more (its own
/// connect before TLS), so three of QUIC's measured round trips plus
/// 50 ms of scheduling slack, within 100 ms..1 s. A path that stays on
/// QUIC because TCP is blocked pays this once per punch.
pub(crate) fn prefer_tcp_grace(quic_rtt: Option<Duration>) -> Duration {
    quic_rtt
        .map_or(PREFER_TCP_GRACE_MAX, |r| r * 3 + Duration::from_millis(50))
        .clamp(PREFER_TCP_GRACE_MIN, PREFER_TCP_GRACE_MAX)
}

/// Why the race kept the path it kept (status `path_kept`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Why {
    /// TCP authenticated, and TCP is preferred when both connect.
    TcpPreferred,
    /// Only one transport ran in this race.
    OnlyTransport,
    /// QUIC, held for the grace; TCP did not authenticate within it.
    QuicTcpTooSlow,
    /// QUIC, once TCP could not come any more (engine ended, or its
    /// handshakes and selection failed).
    QuicNoTcp,
    /// QUIC with BBR on a long path ([`LONG_PATH_RTT`]), kept at once.
    QuicLongPath,
    /// Server: the client (lower key) chose it.
    PeerChose,
}

impl std::fmt::Display for Why {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Why::TcpPreferred => "tcp authenticated; tcp is preferred when both transports connect",
            Why::OnlyTransport => "the only transport raced",
            Why::QuicTcpTooSlow => "quic; tcp did not authenticate within the grace after quic",
            Why::QuicNoTcp => "quic; no tcp path could be had",
            Why::QuicLongPath => "quic (bbr) on a long path (rtt >= 80 ms): its streams do not wait behind each other's losses",
            Why::PeerChose => "chosen by the peer (the client decides)",
        })
    }
}

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
    Select(Why),
    /// Client: a QUIC path while TCP may still come; hold it until
    /// [`Next::SelectHeld`].
    Hold,
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
    /// Client: ask for the QUIC path held since [`Keep::Hold`] now.
    SelectHeld(Why),
    /// Both engines are done and nothing is in flight.
    GiveUp(PunchError),
}

#[cfg(test)]
impl PartialEq for Next {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Next::Handshake(a), Next::Handshake(b)) => a == b,
            (Next::Wait(a), Next::Wait(b)) => a == b,
            (Next::SelectHeld(a), Next::SelectHeld(b)) => a == b,
            (Next::GiveUp(a), Next::GiveUp(b)) => a.to_string() == b.to_string(),
            _ => false,
        }
    }
}

/// The race's state for one punch session.
#[derive(Debug)]
pub(crate) struct Selector {
    role: Role,
    /// Client: QUIC runs BBR, so it is kept at once on a long path.
    long_path_quic: bool,
    /// Which engines run in this race.
    tcp_ran: bool,
    quic_ran: bool,
    tcp_done: bool,
    quic_done: bool,
    /// Client: TCP connections not yet handshaked, by id and kind.
    waiting: Vec<(u32, CandidateKind)>,
    /// Client: when the grace after the first TCP connection ends.
    choose_at: Option<Instant>,
    /// TLS handshakes running.
    handshakes: usize,
    /// Client: a QUIC path is held, until this instant at the latest.
    held_until: Option<Instant>,
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
            long_path_quic: false,
            tcp_ran: tcp,
            quic_ran: quic,
            tcp_done: !tcp,
            quic_done: !quic,
            waiting: Vec::new(),
            choose_at: None,
            handshakes: 0,
            held_until: None,
            selecting: 0,
            attempts: 0,
            causes: Vec::new(),
        }
    }

    /// QUIC runs BBR (`quic::congestion`): on a long path the client keeps
    /// it as soon as it authenticates. Under CUBIC QUIC is not preferred
    /// anywhere: on the lab's 40 ms path with 1 % loss it moved 0.01–0.02×
    /// plain TCP.
    pub(crate) fn quic_runs_bbr(mut self, bbr: bool) -> Self {
        self.long_path_quic = bbr;
        self
    }

    /// The TCP engine ended: no more connections will come from it.
    pub(crate) fn tcp_done(
        &mut self,
        attempts: u32,
        last_error: Option<String>,
        refused_throughout: bool,
    ) {
        self.tcp_done = true;
        self.attempts = self.attempts.max(attempts);
        if let Some(e) = last_error {
            self.causes.push(if refused_throughout {
                Cause::TcpRefusedThroughout(e)
            } else {
                Cause::TcpNoConnection(e)
            });
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

    /// Client: a TCP path may still authenticate.
    fn tcp_may_come(&self) -> bool {
        !self.tcp_done || !self.waiting.is_empty() || self.handshakes > 0
    }

    /// A path authenticated (a TCP handshake, or a QUIC connection with
    /// the round-trip time its handshake measured).
    pub(crate) fn on_authenticated(
        &mut self,
        now: Instant,
        tcp: bool,
        quic_rtt: Option<Duration>,
    ) -> Keep {
        if tcp {
            self.handshakes = self.handshakes.saturating_sub(1);
        }
        match self.role {
            Role::Client if tcp && self.quic_ran => Keep::Select(Why::TcpPreferred),
            Role::Client if tcp || !self.tcp_ran => Keep::Select(Why::OnlyTransport),
            Role::Client if self.long_path_quic && quic_rtt.is_some_and(|r| r >= LONG_PATH_RTT) => {
                Keep::Select(Why::QuicLongPath)
            }
            Role::Client if self.tcp_may_come() => {
                self.held_until = Some(now + prefer_tcp_grace(quic_rtt));
                Keep::Hold
            }
            Role::Client => Keep::Select(Why::QuicNoTcp),
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
        if let Some(until) = self.held_until {
            // `queued`: a TCP connection may be in the channel.
            if now >= until {
                self.held_until = None;
                return Next::SelectHeld(Why::QuicTcpTooSlow);
            }
            if !self.tcp_may_come() && !queued {
                self.held_until = None;
                return Next::SelectHeld(Why::QuicNoTcp);
            }
        }
        let idle = self.handshakes == 0
            && self.selecting == 0
            && self.waiting.is_empty()
            && self.held_until.is_none();
        if self.tcp_done && self.quic_done && idle && !queued {
            return Next::GiveUp(PunchError::Failed {
                causes: std::mem::take(&mut self.causes),
                attempts: self.attempts,
            });
        }
        // Only a grace still to come is worth a timer: once it is over the
        // client picks as soon as its running handshake ends (an event).
        let grace = self
            .choose_at
            .filter(|t| *t > now && !self.waiting.is_empty());
        Next::Wait(match (grace, self.held_until) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        })
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
        s.tcp_done(3, None, false);
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
        assert_eq!(s.on_authenticated(t0, true, None), Keep::AwaitSelection);
        assert_eq!(s.on_authenticated(t0, false, None), Keep::AwaitSelection); // QUIC
        s.tcp_done(4, None, false);
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
    fn client_holds_quic_and_keeps_tcp_when_it_authenticates_within_the_grace() {
        let t0 = Instant::now();
        let rtt = Duration::from_millis(40);
        let mut s = Selector::new(Role::Client, true, true);
        s.tcp_connected(t0, 1, CandidateKind::Public);
        // QUIC authenticated during the TCP grace: held, not asked for.
        assert_eq!(s.on_authenticated(t0, false, Some(rtt)), Keep::Hold);
        let until = t0 + prefer_tcp_grace(Some(rtt));
        assert_eq!(until, t0 + Duration::from_millis(170));
        assert_eq!(s.next(t0, false), Next::Wait(Some(t0 + CHOOSE_GRACE)));
        assert_eq!(s.next(t0 + CHOOSE_GRACE, false), Next::Handshake(1));
        // The TLS handshake runs: wake for the end of the hold.
        assert_eq!(s.next(t0 + CHOOSE_GRACE, false), Next::Wait(Some(until)));
        assert_eq!(
            s.on_authenticated(t0 + Duration::from_millis(90), true, None),
            Keep::Select(Why::TcpPreferred)
        );
        // The server did not take TCP: the held QUIC path is asked for at
        // once, since no other TCP path can come.
        s.tcp_done(2, None, false);
        s.selection_failed(SelectError::NoAnswer);
        assert_eq!(
            s.next(t0 + Duration::from_millis(100), false),
            Next::SelectHeld(Why::QuicNoTcp)
        );
    }

    #[test]
    fn client_keeps_quic_with_bbr_at_once_on_a_long_path() {
        let t0 = Instant::now();
        let long = LONG_PATH_RTT;
        let short = LONG_PATH_RTT - Duration::from_millis(1);
        let mut s = Selector::new(Role::Client, true, true).quic_runs_bbr(true);
        s.tcp_connected(t0, 1, CandidateKind::Public);
        assert_eq!(
            s.on_authenticated(t0, false, Some(long)),
            Keep::Select(Why::QuicLongPath)
        );
        // Below the threshold, or with no RTT measured: held for TCP.
        let mut s = Selector::new(Role::Client, true, true).quic_runs_bbr(true);
        assert_eq!(s.on_authenticated(t0, false, Some(short)), Keep::Hold);
        let mut s = Selector::new(Role::Client, true, true).quic_runs_bbr(true);
        assert_eq!(s.on_authenticated(t0, false, None), Keep::Hold);
        // Under CUBIC: held for TCP on any path.
        let mut s = Selector::new(Role::Client, true, true).quic_runs_bbr(false);
        assert_eq!(s.on_authenticated(t0, false, Some(long * 3)), Keep::Hold);
        // TCP first on a long path: TCP, as on any path.
        let mut s = Selector::new(Role::Client, true, true).quic_runs_bbr(true);
        assert_eq!(
            s.on_authenticated(t0, true, None),
            Keep::Select(Why::TcpPreferred)
        );
        // The server never chooses.
        let mut s = Selector::new(Role::Server, true, true).quic_runs_bbr(true);
        assert_eq!(
            s.on_authenticated(t0, false, Some(long)),
            Keep::AwaitSelection
        );
    }

    #[test]
    fn client_takes_the_held_quic_path_when_the_grace_ends() {
        let t0 = Instant::now();
        let mut s = Selector::new(Role::Client, true, true);
        assert_eq!(s.on_authenticated(t0, false, None), Keep::Hold);
        // No RTT measured: the longest hold.
        assert_eq!(
            s.next(t0, false),
            Next::Wait(Some(t0 + PREFER_TCP_GRACE_MAX))
        );
        assert_eq!(
            s.next(t0 + PREFER_TCP_GRACE_MAX, false),
            Next::SelectHeld(Why::QuicTcpTooSlow)
        );
        // Nothing held any more: nothing to do but wait for the engines.
        assert_eq!(s.next(t0 + PREFER_TCP_GRACE_MAX, false), Next::Wait(None));
    }

    #[test]
    fn client_does_not_hold_quic_when_tcp_cannot_come() {
        let t0 = Instant::now();
        let mut s = Selector::new(Role::Client, true, true);
        s.tcp_done(5, Some("Connection refused".into()), false);
        assert_eq!(
            s.on_authenticated(t0, false, Some(Duration::from_millis(5))),
            Keep::Select(Why::QuicNoTcp)
        );
        let mut s = Selector::new(Role::Client, false, true);
        assert_eq!(
            s.on_authenticated(t0, false, None),
            Keep::Select(Why::OnlyTransport)
        );
        let mut s = Selector::new(Role::Client, true, false);
        assert_eq!(
            s.on_authenticated(t0, true, None),
            Keep::Select(Why::OnlyTransport)
        );
    }

    #[test]
    fn held_quic_is_released_when_the_tcp_engine_ends_with_nothing() {
        let t0 = Instant::now();
        let mut s = Selector::new(Role::Client, true, true);
        assert_eq!(
            s.on_authenticated(t0, false, Some(Duration::from_millis(200))),
            Keep::Hold
        );
        s.tcp_done(9, Some("timed out".into()), false);
        // A connection still in the channel: wait for it.
        assert_eq!(
            s.next(t0, true),
            Next::Wait(Some(t0 + Duration::from_millis(650)))
        );
        assert_eq!(s.next(t0, false), Next::SelectHeld(Why::QuicNoTcp));
    }

    #[test]
    fn grace_follows_the_measured_rtt_within_bounds() {
        assert_eq!(
            prefer_tcp_grace(Some(Duration::from_millis(1))),
            PREFER_TCP_GRACE_MIN
        );
        assert_eq!(
            prefer_tcp_grace(Some(Duration::from_millis(100))),
            Duration::from_millis(350)
        );
        assert_eq!(
            prefer_tcp_grace(Some(Duration::from_millis(400))),
            PREFER_TCP_GRACE_MAX
        );
    }

    #[test]
    fn gives_up_only_when_both_engines_are_done_and_nothing_is_queued() {
        let t0 = Instant::now();
        let mut s = Selector::new(Role::Client, true, true);
        s.tcp_done(12, Some("Connection refused".into()), false);
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
                assert_eq!(e.quiet_for(), None);
            }
            other => panic!("{other:?}"),
        }
        let mut s = Selector::new(Role::Server, true, false);
        s.tcp_done(1, None, false);
        match s.next(t0, false) {
            Next::GiveUp(e) => assert_eq!(e.to_string(), "no connection established"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn tcp_refused_throughout_asks_for_quiet_ports_even_behind_the_relay() {
        let t0 = Instant::now();
        let mut s = Selector::new(Role::Client, true, false);
        s.tcp_done(800, Some("Connection refused".into()), true);
        let Next::GiveUp(e) = s.next(t0, false) else {
            panic!("TCP alone, done: the race gives up");
        };
        assert!(e.to_string().contains("every SYN refused"), "{e}");
        let quiet = Some(crate::punch::plan::STALE_QUIET);
        assert_eq!(e.quiet_for(), quiet);
        let direct_only = PunchError::DirectOnly(Box::new(e));
        assert_eq!(direct_only.quiet_for(), quiet);
    }
}
