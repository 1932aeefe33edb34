//! Racing the direct paths of one punch session (timed TCP simultaneous
//! open, UDP hole punch + QUIC) and agreeing with the peer on one.
//!
//! Both engines run at once, from the same `at`. Every connection that
//! authenticates with the pinned key becomes a candidate tunnel. The two
//! ends must keep the *same* one, and they may see candidates in different
//! orders, so one side decides and says so in-band:
//!
//! - the client (lower key) keeps the first TCP candidate that
//!   authenticates (the best kind after a short grace, LAN before public),
//!   or QUIC when TCP does not authenticate within a grace after it, or
//!   QUIC at once on a long path when QUIC runs BBR (see [`select`]); it
//!   opens a stream on the path asking for
//!   `_select:<session>`, and waits for the yes;
//! - the server keeps every candidate open until one carries that request,
//!   answers it, and drops the rest.
//!
//! Whatever is not chosen is dropped when this returns: losing TCP
//! connections are closed, losing QUIC connections closed with the
//! endpoint's goodbye.
//!
//! The decisions (which connection to handshake and when, what to do with
//! an authenticated path, when to give up) are in [`select`], sans-IO;
//! this file runs the engines, the handshakes and the selection streams.

pub(crate) mod select;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{Future, StreamExt as _};
use punch_config::{PublicKeyBytes, TransportKind};
use punch_rendezvous::protocol::PunchOrder;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::admin::status::PeerStatus;
use crate::identity::Identity;
use crate::path::{Role, Transport};
use crate::punch::plan::PunchPlan;
use crate::punch::{self, Established};
use crate::quic::punch::{QuicEstablished, QuicPunch};
use crate::quic::QuicPath;
use crate::tunnel::header::{read_request, reply, request_service, HeaderError, SELECT_PREFIX};
use crate::tunnel::metered::Metered;
use crate::tunnel::{self, mux, TunnelError, TunnelParts};
use select::{Keep, Next, Selector, Why};

/// How long the chosen side waits for the other's verdict, at least.
const SELECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a punched connection that failed its TLS handshake may take to
/// send its FIN before it is aborted and punched again. Short: when our
/// direction is the dead one the FIN never leaves (it waits behind the
/// unacknowledged handshake), and the peer, which saw the failure at the
/// same moment, is already punching again.
const FAILED_FIN_WAIT: Duration = Duration::from_millis(50);

/// What a race needs from its peer task, borrowed for one session.
pub(crate) struct Race<'a> {
    pub(crate) identity: &'a Identity,
    /// The peer's pinned key.
    pub(crate) key: &'a PublicKeyBytes,
    pub(crate) role: Role,
    /// Direct transports allowed.
    pub(crate) transports: &'a [TransportKind],
    /// The daemon's QUIC endpoint, when QUIC is on and its socket bound.
    pub(crate) quic: Option<&'a Arc<QuicPath>>,
    /// QUIC connections this peer made to us (server role).
    pub(crate) quic_incoming: &'a tokio::sync::Mutex<mpsc::Receiver<quinn::Connection>>,
    pub(crate) status: &'a Arc<PeerStatus>,
    /// The daemon-wide budget of connect attempts (`punch/budget.rs`).
    pub(crate) syn_budget: &'a std::sync::Mutex<crate::punch::budget::SynBudget>,
}

/// The kept direct path.
pub(crate) struct Direct {
    pub(crate) parts: TunnelParts,
    pub(crate) remote: SocketAddr,
    pub(crate) attempts: u32,
}

/// One reason a direct path was not had.
#[derive(Debug)]
#[non_exhaustive]
pub enum Cause {
    /// The TCP engine ended with nothing connected.
    TcpNoConnection(String),
    /// The TCP engine gave up early: every SYN was refused for
    /// [`crate::punch::plan::REFUSED_GIVE_UP`] without a break, which
    /// between two punching peers means stale NAT state for the ports.
    TcpRefusedThroughout(String),
    /// The UDP punch / QUIC handshake failed.
    Quic(String),
    /// A punched TCP connection failed TLS: a wrong key fails at once, a
    /// path whose bytes stopped after the SYNs times out.
    Tls {
        /// Where the connection went.
        remote: SocketAddr,
        /// The handshake's error.
        error: TunnelError,
    },
    /// An authenticated path was not agreed on.
    NotSelected(SelectError),
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cause::TcpNoConnection(e) => write!(f, "tcp: no candidate connected (last error: {e})"),
            Cause::TcpRefusedThroughout(e) => write!(
                f,
                "tcp: every SYN refused for {} s without a break (last error: {e}); something on the path answers for the peer, often a NAT still holding state from a lost tunnel: the punch ports stay quiet {} s so it can expire",
                crate::punch::plan::REFUSED_GIVE_UP.as_secs(),
                crate::punch::plan::STALE_QUIET.as_secs()
            ),
            Cause::Quic(e) => write!(f, "quic: {e}"),
            Cause::Tls { remote, error } => write!(f, "tcp: TLS with {remote} failed: {error}"),
            Cause::NotSelected(e) => e.fmt(f),
        }
    }
}

/// Why a punch session ended without a tunnel. The `Display` text is the
/// status `reason` and the report to the rendezvous; the variants are what
/// the peer task's retry policy looks at.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PunchError {
    /// No allowed transport could even start: no TCP candidate this host
    /// can reach (TCP not allowed, or only candidates of a family it does
    /// not have), and no UDP endpoint of the peer for QUIC (not yet known,
    /// or QUIC off). Worth asking again soon: the UDP endpoint is usually
    /// known a moment later.
    #[error(
        "nothing to punch with: no TCP candidate this host can reach (or TCP not allowed) and no UDP endpoint of the peer for QUIC"
    )]
    NothingToTry,
    /// Every engine ran and nothing was kept.
    #[error("{}", join(causes))]
    Failed {
        /// What went wrong, in the order it happened.
        causes: Vec<Cause>,
        /// Attempts made.
        attempts: u32,
    },
    /// Superseded by a newer order, abandoned, or the daemon stopping.
    #[error("superseded, abandoned (peer left) or shutting down")]
    Cancelled,
    /// The direct punch failed and so did the relayed fallback.
    #[error("{direct}; relay: {relay}")]
    Relay {
        /// Why direct failed.
        direct: Box<PunchError>,
        /// Why the relay failed.
        relay: crate::fallback::FallbackError,
    },
    /// The direct punch failed, and the mode forbids the relay.
    #[error("{0}; no relay fallback (mode = \"direct-only\")")]
    DirectOnly(Box<PunchError>),
    /// Not punched: the order's strategy says go to the relay at once.
    #[error("relayed at once (strategy relay-first): {0}")]
    RelayFirst(punch_rendezvous::nat::RelayReason),
}

fn join(causes: &[Cause]) -> String {
    if causes.is_empty() {
        return "no connection established".to_owned();
    }
    causes
        .iter()
        .map(Cause::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl PunchError {
    /// Attempts made before giving up.
    pub fn attempts(&self) -> u32 {
        match self {
            PunchError::Failed { attempts, .. } => *attempts,
            PunchError::Relay { direct, .. } | PunchError::DirectOnly(direct) => direct.attempts(),
            PunchError::NothingToTry | PunchError::Cancelled | PunchError::RelayFirst(_) => 0,
        }
    }

    /// How long the punch ports should stay quiet before the next punch:
    /// set when TCP gave up on an unbroken run of refusals, whose stale NAT
    /// entries every further SYN would keep alive.
    pub fn quiet_for(&self) -> Option<Duration> {
        match self {
            PunchError::Failed { causes, .. } => causes
                .iter()
                .any(|c| matches!(c, Cause::TcpRefusedThroughout(_)))
                .then_some(crate::punch::plan::STALE_QUIET),
            PunchError::Relay { direct, .. } | PunchError::DirectOnly(direct) => direct.quiet_for(),
            PunchError::NothingToTry | PunchError::Cancelled | PunchError::RelayFirst(_) => None,
        }
    }

    /// Nothing could be tried this time (see [`PunchError::NothingToTry`]).
    pub fn nothing_to_try(&self) -> bool {
        match self {
            PunchError::NothingToTry => true,
            PunchError::DirectOnly(direct) => direct.nothing_to_try(),
            _ => false,
        }
    }
}

/// The QUIC endpoint to punch with this session, if QUIC is allowed, bound,
/// and the peer has a UDP endpoint.
fn quic_path<'a>(race: &Race<'a>, order: &PunchOrder) -> Option<&'a Arc<QuicPath>> {
    let wanted = race.transports.contains(&TransportKind::Quic);
    let quic = race
        .quic
        .filter(|_| wanted)
        .filter(|_| !order.udp_candidates.is_empty());
    if wanted && quic.is_none() {
        info!("no QUIC this time: the peer has no UDP endpoint (QUIC off there, or its probes did not reach the rendezvous)");
    }
    quic
}

/// A TLS handshake on a punched TCP connection: where it went, the
/// attempts it took, and the tunnel or why not.
type Handshake<'a> = BoxFuture<'a, (SocketAddr, u32, Result<TunnelParts, TunnelError>)>;
/// A kept path waiting for the client's choice (server).
type Selection<'a> = BoxFuture<'a, Result<Direct, SelectError>>;

/// Runs TLS on a punched connection.
fn authenticate<'a>(race: &'a Race<'_>, est: Established) -> Handshake<'a> {
    let Established {
        stream,
        remote,
        attempts,
        ..
    } = est;
    let closer = stream.fin_closer();
    let io = Metered::new(stream, race.status.clone());
    Box::pin(async move {
        let r = mux::handshake(io, race.role, race.identity, race.key, Transport::Tcp).await;
        if r.is_err() {
            // Punched again on the same ports next: close with a FIN
            // so that the NATs let the new SYNs reopen their entries.
            if let Some(c) = closer {
                c.close(FAILED_FIN_WAIT).await;
            }
        }
        (remote, attempts, r)
    })
}

/// An authenticated QUIC connection as a candidate path.
fn quic_direct(q: QuicEstablished, path: &Arc<QuicPath>, status: &Arc<PeerStatus>) -> Direct {
    Direct {
        // IPv4 peers show as IPv4-mapped on the dual-stack socket.
        remote: crate::quic::socket::canonical(q.conn.remote_address()),
        parts: crate::quic::tunnel::from_quic(q.conn, status.clone(), path.clone()),
        attempts: q.rounds,
    }
}

/// The race's IO around its [`Selector`]: the connections it reported,
/// the handshakes and selections running.
struct Candidates<'a> {
    race: &'a Race<'a>,
    session: &'a str,
    deadline: Instant,
    sel: Selector,
    next_id: u32,
    connected: Vec<(u32, Established)>,
    handshakes: FuturesUnordered<Handshake<'a>>,
    selecting: FuturesUnordered<Selection<'a>>,
    /// Client: an authenticated QUIC path held while TCP may still come.
    held: Option<Direct>,
}

impl<'a> Candidates<'a> {
    fn tcp_connected(&mut self, est: Established) {
        self.next_id += 1;
        self.sel
            .tcp_connected(Instant::now(), self.next_id, est.kind);
        self.connected.push((self.next_id, est));
    }

    /// A TLS handshake ended: the path, or the candidate back to the
    /// engine to punch again.
    fn handshake_done(
        &mut self,
        (remote, attempts, r): (SocketAddr, u32, Result<TunnelParts, TunnelError>),
        repunch: &mpsc::Sender<SocketAddr>,
    ) -> Option<Direct> {
        match r {
            Ok(parts) => Some(Direct {
                parts,
                remote,
                attempts,
            }),
            Err(e) => {
                // A wrong key fails at once; a connection whose bytes
                // stopped somewhere after the SYNs got through (a NAT
                // that mistracked it) times out. Either way both ends
                // see it fail within a round trip, and the engine
                // punches that candidate again if it may.
                warn!(%remote, error = %e, "connection punched but not authenticated; dropping it");
                self.sel.handshake_failed(remote, e);
                let _ = repunch.try_send(remote);
                None
            }
        }
    }

    /// A path authenticated: the client asks for it now (and returns it if
    /// the server agrees) or holds it (QUIC while TCP may come), the server
    /// keeps it until asked.
    async fn authenticated(
        &mut self,
        d: Direct,
        tcp: bool,
        quic_rtt: Option<Duration>,
    ) -> Option<(Direct, Why)> {
        match self.sel.on_authenticated(Instant::now(), tcp, quic_rtt) {
            Keep::Select(why) => return self.select(d, why).await,
            Keep::Hold => {
                info!(remote = %d.remote, rtt_ms = quic_rtt.map(|r| r.as_millis() as u64), "QUIC path up; holding it briefly in case TCP authenticates too");
                self.held = Some(d);
            }
            Keep::AwaitSelection => {
                let (session, deadline) = (self.session, self.deadline);
                self.selecting
                    .push(Box::pin(await_selection(d, session, deadline)));
            }
        }
        None
    }

    /// Client: asks the server for `d`; returns it if the server agrees.
    async fn select(&mut self, mut d: Direct, why: Why) -> Option<(Direct, Why)> {
        match select_path(&mut d, self.session).await {
            Ok(()) => Some((d, why)),
            Err(e) => {
                warn!(remote = %d.remote, error = %e, "peer did not take the path we chose; trying others");
                self.sel.selection_failed(e);
                None
            }
        }
    }

    /// Starts what the selector says to (asking for the held QUIC path
    /// when it says so); returns when to wake, the kept path, or why the
    /// race is lost.
    async fn advance(&mut self, queued: bool) -> Result<Advance, PunchError> {
        loop {
            match self.sel.next(Instant::now(), queued) {
                Next::Handshake(id) => {
                    if let Some(at) = self.connected.iter().position(|(i, _)| *i == id) {
                        let est = self.connected.remove(at).1;
                        self.handshakes.push(authenticate(self.race, est));
                    }
                }
                Next::SelectHeld(why) => {
                    if let Some(d) = self.held.take() {
                        if let Some(kept) = self.select(d, why).await {
                            return Ok(Advance::Kept(kept));
                        }
                    }
                }
                Next::Wait(until) => return Ok(Advance::Wait(until)),
                Next::GiveUp(e) => return Err(e),
            }
        }
    }
}

/// What [`Candidates::advance`] ended with.
enum Advance {
    Wait(Option<Instant>),
    Kept((Direct, Why)),
}

/// Records why the path was kept (status `path_kept`) and returns it.
fn kept(race: &Race<'_>, (d, why): (Direct, Why)) -> Direct {
    info!(remote = %d.remote, why = %why, "path kept");
    race.status.update(|s| s.path_kept = Some(why.to_string()));
    d
}

/// Punches every allowed transport and returns the path both ends keep.
pub(crate) async fn punch_direct(
    race: &Race<'_>,
    order: &PunchOrder,
    fire_at: Instant,
    deadline: Instant,
    port: u16,
) -> Result<Direct, PunchError> {
    let quic = quic_path(race, order);
    // No TCP candidate left (none of a family this host has, say an
    // IPv4-only peer of an IPv6-only host): nothing to open, so no engine
    // waiting out the punch timeout; with no QUIC either, the relay at once.
    let (use_tcp, _) = select::engines(
        race.transports.contains(&TransportKind::Tcp) && !order.candidates.is_empty(),
        quic.is_some(),
    )?;
    info!(tcp = ?use_tcp.then_some(&order.candidates), quic = ?quic.map(|_| &order.udp_candidates), in_ms = fire_at.saturating_duration_since(Instant::now()).as_millis() as u64, "punching");

    let (tcp_tx, mut tcp_rx) = mpsc::channel::<Established>(4);
    let (repunch_tx, repunch_rx) = mpsc::channel::<SocketAddr>(4);
    let tcp_engine = async {
        let plan = PunchPlan::new(
            punch::birthday::timed_candidates(order.strategy.as_ref(), &order.candidates),
            fire_at.into_std(),
            deadline.into_std(),
        );
        // Birthday probing over TCP (a random NAT against an easy one)
        // runs beside the timed punch, into the same channel.
        let birthday = punch::birthday::run_tcp(
            race.syn_budget,
            port,
            order.strategy.as_ref(),
            &order.candidates,
            fire_at.into_std(),
            deadline.into_std(),
            tcp_tx.clone(),
        );
        let timed = punch::run(
            race.syn_budget,
            port,
            plan,
            fire_at.into_std(),
            tcp_tx,
            repunch_rx,
        );
        let (mut stats, birthday) = tokio::join!(timed, birthday);
        if let Some(why) = birthday {
            stats.last_error = Some(match stats.last_error.take() {
                Some(e) => format!("{e}; {why}"),
                None => why,
            });
        }
        stats
    };
    let mut tcp_engine = std::pin::pin!(tcp_engine);
    let mut tcp_running = use_tcp;

    let (quic_tx, mut quic_rx) = mpsc::channel::<QuicEstablished>(4);
    let mut incoming = match (quic, race.role) {
        (Some(_), Role::Server) => Some(race.quic_incoming.lock().await),
        _ => None,
    };
    // Port prediction (NAT discovery): the peer's next mappings too, after
    // the order's own candidates. Checked against our limits on arrival.
    let udp_candidates: Vec<std::net::SocketAddr> = match &order.strategy {
        Some(punch_rendezvous::nat::Strategy::PredictUdp(p)) if quic.is_some() => {
            info!(base = %p.base, delta = p.delta, count = p.count, "the peer's NAT allocates UDP ports in steps: punching its next ports too");
            // Predictions first, in the order the peer's NAT allocates:
            // when our NAT allocates in steps too, our k-th new mapping
            // (toward its k-th prediction) is the one it predicts k-th.
            p.endpoints()
                .chain(order.udp_candidates.iter().copied())
                .collect()
        }
        _ => order.udp_candidates.clone(),
    };
    let quic_engine = async {
        let path = quic?;
        let p = QuicPunch {
            path,
            session: &order.session,
            peer: race.key,
            role: race.role,
            candidates: &udp_candidates,
            fire_at: fire_at.into_std(),
            deadline: deadline.into_std(),
            strategy: order.strategy.as_ref(),
        };
        Some(crate::quic::punch::run(p, incoming.as_deref_mut(), quic_tx).await)
    };
    let mut quic_engine = std::pin::pin!(quic_engine);
    let mut quic_running = quic.is_some();

    let mut c = Candidates {
        race,
        session: &order.session,
        deadline,
        sel: Selector::new(race.role, use_tcp, quic.is_some())
            .quic_runs_bbr(quic.is_some_and(|q| q.runs_bbr())),
        next_id: 0,
        connected: Vec::new(),
        handshakes: FuturesUnordered::new(),
        selecting: FuturesUnordered::new(),
        held: None,
    };
    let mut wake = None;
    loop {
        let mut authenticated: Option<(Direct, bool, Option<Duration>)> = None;
        tokio::select! {
            s = &mut tcp_engine, if tcp_running => {
                tcp_running = false;
                c.sel.tcp_done(s.attempts, s.last_error, s.refused_throughout);
            }
            s = &mut quic_engine, if quic_running => {
                quic_running = false;
                let s = s.unwrap_or_default();
                if s.heard == 0 {
                    if let Some(path) = quic { path.rebind_if_idle("UDP punch heard nothing"); }
                }
                c.sel.quic_done(s.rounds, s.last_error);
            }
            Some(est) = tcp_rx.recv() => c.tcp_connected(est),
            Some(q) = quic_rx.recv() => {
                let rtt = q.conn.rtt();
                authenticated = quic.map(|path| (quic_direct(q, path, race.status), false, Some(rtt)));
            }
            _ = tokio::time::sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => {}
            Some(done) = c.handshakes.next() => {
                authenticated = c.handshake_done(done, &repunch_tx).map(|d| (d, true, None));
            }
            Some(r) = c.selecting.next() => match r {
                Ok(d) => return Ok(kept(race, (d, Why::PeerChose))),
                Err(e) => c.sel.selection_failed(e),
            },
        }
        if let Some((d, tcp, rtt)) = authenticated {
            if let Some(k) = c.authenticated(d, tcp, rtt).await {
                return Ok(kept(race, k));
            }
        }
        match c.advance(!tcp_rx.is_empty() || !quic_rx.is_empty()).await? {
            Advance::Wait(until) => wake = until,
            Advance::Kept(k) => return Ok(kept(race, k)),
        }
    }
}

/// Why a path was not agreed on (the `_select` exchange).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SelectError {
    /// The selection stream could not be opened.
    #[error("{0}")]
    Open(#[from] tunnel::TunnelError),
    /// The client's request was refused or garbled.
    #[error("selecting the path: {0}")]
    Refused(#[source] HeaderError),
    /// The stream header could not be read or answered.
    #[error("{0}")]
    Header(#[from] HeaderError),
    /// The answer could not be sent.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The tunnel closed before the path was chosen.
    #[error("tunnel closed before the path was chosen")]
    DriverEnded,
    /// The tunnel closed while waiting for the request.
    #[error("tunnel closed")]
    Closed,
    /// The server did not answer the client's request.
    #[error("no answer to the path selection")]
    NoAnswer,
    /// The client asked for another session on this path.
    #[error("peer asked for {0:?} on a fresh path")]
    WrongSession(String),
    /// Server: this path failed while waiting.
    #[error("path at {remote} not chosen: {source}")]
    NotChosen {
        /// The path's remote end.
        remote: SocketAddr,
        /// Why.
        source: Box<SelectError>,
    },
    /// Server: the client chose another path, or none, in time.
    #[error("path at {0} not chosen in time")]
    NotChosenInTime(SocketAddr),
}

/// Runs `f` on a fresh tunnel while keeping its driver polled (streams
/// move only while it runs); the tunnel closing first is an error.
async fn with_driver<T>(
    parts: &mut TunnelParts,
    f: impl AsyncFnOnce(
        &tunnel::Tunnel,
        &mut mpsc::Receiver<tunnel::StreamIo>,
    ) -> Result<T, SelectError>,
) -> Result<T, SelectError> {
    let TunnelParts {
        tunnel,
        inbound,
        driver,
    } = parts;
    tokio::select! {
        r = f(tunnel, inbound) => r,
        () = driver => Err(SelectError::DriverEnded),
    }
}

/// Client: tells the server this is the path, and waits for its yes.
async fn select_path(d: &mut Direct, session: &str) -> Result<(), SelectError> {
    let ask = format!("{SELECT_PREFIX}{session}");
    let choose = with_driver(&mut d.parts, async |tunnel, _| {
        let mut s = tunnel.open().await?;
        s.uncount();
        request_service(&mut s, &ask)
            .await
            .map_err(SelectError::Refused)
    });
    tokio::time::timeout(SELECT_TIMEOUT, choose)
        .await
        .map_err(|_| SelectError::NoAnswer)?
}

/// Server: waits (until the punch deadline, at least [`SELECT_TIMEOUT`])
/// for the client to choose this path.
fn await_selection(
    mut d: Direct,
    session: &str,
    deadline: Instant,
) -> impl Future<Output = Result<Direct, SelectError>> + '_ {
    let until = deadline.max(Instant::now() + SELECT_TIMEOUT);
    async move {
        let expected = format!("{SELECT_PREFIX}{session}");
        let wait = with_driver(&mut d.parts, async |_, inbound| {
            let mut s = inbound.recv().await.ok_or(SelectError::Closed)?;
            s.uncount();
            let asked = read_request(&mut s).await?;
            if asked != expected {
                let _ = reply(&mut s, Err("not the path of this session")).await;
                return Err(SelectError::WrongSession(asked));
            }
            Ok(reply(&mut s, Ok(())).await?)
        });
        match tokio::time::timeout_at(until, wait).await {
            Ok(Ok(())) => Ok(d),
            Ok(Err(e)) => Err(SelectError::NotChosen {
                remote: d.remote,
                source: Box::new(e),
            }),
            Err(_) => Err(SelectError::NotChosenInTime(d.remote)),
        }
    }
}
