//! One task per configured peer: it owns that peer's tunnel.
//!
//! What flows in and out:
//! - [`PeerCmd::Punch`] from the rendezvous client: punch now. A punch runs
//!   as its own task ([`punch_session`]) and reports back on the internal
//!   event channel; a newer order supersedes an older one.
//! - [`PeerCmd::Open`] from forward listeners: a stream, please. With a
//!   tunnel it is opened at once; without one the request waits (bounded in
//!   number and time) and, if this side initiates, a punch is requested.
//! - Internal events: a punch finished, a tunnel closed.
//!
//! The side that has forwards to a peer initiates (asks the rendezvous to
//! `connect`) at start-up and whenever the tunnel is lost, with backoff. The
//! other side only answers punch orders, so it never dials anyone who did
//! not ask for it.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use punch_config::{Expose, PublicKeyBytes, PunchMode, TransportKind};
use punch_rendezvous::protocol::{PathKind, PunchOrder, PunchResult};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use crate::backoff::Backoff;
use crate::identity::Identity;
use crate::metered::Metered;
use crate::punch::plan::Role;
use crate::quic::QuicPath;
use crate::race;
use crate::relay::{self, PING_SERVICE};
use crate::relay_transport;
use crate::rendezvous_client::RvCmd;
use crate::status::{LastPunch, PathState, PeerStatus, Transport};
use crate::tunnel::{self, StreamIo, Tunnel, TunnelError, TunnelParts};

/// Local connections waiting for a tunnel, per peer.
const MAX_WAITERS: usize = 256;
/// How often to ask the rendezvous again when no punch order came back
/// (peer offline, server busy): cheap, and it bounds how long a restarted
/// peer waits for us.
const CONNECT_RETRY: Duration = Duration::from_secs(2);
/// Upgrade attempts while relayed: first after this, then doubling...
const UPGRADE_FIRST: Duration = Duration::from_secs(15);
/// ... up to this.
const UPGRADE_MAX: Duration = Duration::from_secs(300);
/// A replaced tunnel stays open this long at most for its streams to end.
const DRAIN_MAX: Duration = Duration::from_secs(600);

/// How long the punch 4-tuple must stay quiet after a direct tunnel on it
/// closed, before a new punch may use it: long enough for the last packets
/// of the old connection (the peer's FIN, ACKs, a RST) to have crossed both
/// NATs. A straggler that reaches a NAT after the new SYN has reopened the
/// mapping is out of window there: Linux conntrack marks it invalid, the
/// NAT answers it with its own RST, and that RST poisons the peer's fresh
/// mapping; the resulting CLOSE entries are refreshed by every retry and
/// can block the tuple for as long as the punch keeps trying (measured in
/// the lab at 150 ms RTT: re-punches right after a close failed for the
/// whole 10 s timeout in ~1 of 10 rounds). Two round trips, bounded.
fn quiet_after_close(rtt: Option<Duration>) -> Duration {
    match rtt {
        Some(rtt) => (rtt * 2 + Duration::from_millis(50))
            .clamp(Duration::from_millis(100), Duration::from_secs(1)),
        None => Duration::from_millis(500),
    }
}

/// Why a stream could not be had.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// No tunnel came up in time.
    #[error("no tunnel to {peer} within {waited:?}; last punch: {last}")]
    NoTunnel {
        /// Peer name.
        peer: String,
        /// How long we waited.
        waited: Duration,
        /// The last punch outcome, for the log.
        last: String,
    },
    /// Too many connections are already waiting.
    #[error("too many connections waiting for a tunnel to {0}")]
    Busy(String),
    /// The tunnel failed while opening.
    #[error(transparent)]
    Tunnel(#[from] TunnelError),
    /// The daemon is stopping.
    #[error("daemon shutting down")]
    ShuttingDown,
}

type OpenReply = oneshot::Sender<Result<StreamIo, OpenError>>;

/// A punch to perform, as the rendezvous client hands it over.
#[derive(Debug)]
pub(crate) struct PunchJob {
    pub(crate) order: PunchOrder,
    /// `order.at_us` on our clock.
    pub(crate) fire_at: Instant,
    /// Local punch port.
    pub(crate) port: u16,
    /// When the order arrived, for the elapsed time.
    pub(crate) received: Instant,
}

/// Messages to a peer task.
#[derive(Debug)]
pub(crate) enum PeerCmd {
    /// Punch per this order.
    Punch(Box<PunchJob>),
    /// Open a stream to this peer.
    Open(OpenReply),
    /// Registered with the rendezvous (again): initiators may connect now.
    RendezvousUp,
    /// The peer left the rendezvous before punching this session.
    Abort(String),
    /// Drop the current tunnel and punch again now (admin API).
    Repunch,
}

/// What a peer task needs to know, fixed for its lifetime.
#[derive(Debug)]
pub(crate) struct PeerContext {
    pub(crate) identity: Identity,
    pub(crate) name: String,
    pub(crate) key: PublicKeyBytes,
    pub(crate) role: Role,
    /// We have forwards to this peer, so we ask for punches.
    pub(crate) initiator: bool,
    pub(crate) punch_timeout: Duration,
    /// `auto` may fall back to the relay; `direct-only` never does.
    pub(crate) mode: PunchMode,
    /// The rendezvous URL, for the relay.
    pub(crate) rendezvous_url: String,
    /// Ping interval and dead-path timeout.
    pub(crate) keepalive: (Duration, Duration),
    pub(crate) exposes: Arc<Vec<Expose>>,
    pub(crate) status: Arc<PeerStatus>,
    pub(crate) rendezvous: mpsc::Sender<RvCmd>,
    /// Direct transports to race.
    pub(crate) transports: Vec<TransportKind>,
    /// The daemon's QUIC endpoint, when QUIC is on and its socket bound.
    pub(crate) quic: Option<Arc<QuicPath>>,
    /// QUIC connections this peer made to us, authenticated by the accept
    /// loop (server role; a punch session holds the lock while it runs).
    pub(crate) quic_incoming: tokio::sync::Mutex<mpsc::Receiver<quinn::Connection>>,
}

/// A cloneable way to reach a peer task.
#[derive(Debug, Clone)]
pub(crate) struct PeerHandle {
    name: Arc<str>,
    tx: mpsc::Sender<PeerCmd>,
    status: Arc<PeerStatus>,
}

impl PeerHandle {
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn status(&self) -> &Arc<PeerStatus> {
        &self.status
    }

    pub(crate) async fn send(&self, cmd: PeerCmd) {
        let _ = self.tx.send(cmd).await;
    }

    /// A new stream to this peer, waiting for a tunnel if need be.
    pub(crate) async fn open_stream(&self) -> Result<StreamIo, OpenError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(PeerCmd::Open(tx))
            .await
            .map_err(|_| OpenError::ShuttingDown)?;
        rx.await.unwrap_or(Err(OpenError::ShuttingDown))
    }
}

/// Events from the peer task's own helpers.
enum Internal {
    PunchDone {
        generation: u64,
        outcome: Result<Box<Punched>, PunchFailure>,
    },
    TunnelClosed {
        generation: u64,
    },
}

/// A successful punch.
struct Punched {
    parts: TunnelParts,
    remote: SocketAddr,
    attempts: u32,
    /// Direct, or relayed after the punch failed.
    path: PathState,
    /// When relayed: why the direct punch failed.
    relay_reason: Option<String>,
}

/// A failed punch.
#[derive(Debug)]
struct PunchFailure {
    reason: String,
    attempts: u32,
    /// Nothing could be tried this time (see [`race::NoDirect`]).
    nothing_to_try: bool,
}

/// Starts a peer task; returns its handle.
pub(crate) fn spawn(
    ctx: PeerContext,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) -> PeerHandle {
    let (tx, rx) = mpsc::channel(256);
    let handle = PeerHandle {
        name: Arc::from(ctx.name.as_str()),
        tx,
        status: ctx.status.clone(),
    };
    let span = tracing::info_span!("peer", peer = %ctx.name);
    let actor = PeerActor::new(Arc::new(ctx), cancel, tracker.clone());
    tracker.spawn(actor.run(rx).instrument(span));
    handle
}

struct PeerActor {
    ctx: Arc<PeerContext>,
    cancel: CancellationToken,
    tracker: TaskTracker,
    events_tx: mpsc::Sender<Internal>,
    events_rx: mpsc::Receiver<Internal>,
    tunnel: Option<(u64, Tunnel)>,
    /// Identifies the current punch or tunnel, so stale reports are ignored.
    generation: u64,
    /// The running punch: its generation and a token to stop it.
    punching: Option<(u64, CancellationToken)>,
    /// The session id of the running punch.
    punch_session: Option<String>,
    waiters: VecDeque<(Instant, OpenReply)>,
    rendezvous_up: bool,
    next_connect: Option<Instant>,
    /// No punch starts before this: the last direct tunnel's packets are
    /// still draining from the punch 4-tuple (see [`quiet_after_close`]).
    quiet_until: Instant,
    backoff: Backoff,
    /// Spacing of attempts to go direct while relayed.
    upgrade: Backoff,
    last_failure: String,
    /// Punches in a row that had nothing to try (see [`race::NoDirect`]).
    nothing_to_try: u32,
}

impl PeerActor {
    fn new(ctx: Arc<PeerContext>, cancel: CancellationToken, tracker: TaskTracker) -> Self {
        let (events_tx, events_rx) = mpsc::channel(16);
        Self {
            ctx,
            cancel,
            tracker,
            events_tx,
            events_rx,
            tunnel: None,
            generation: 0,
            punching: None,
            punch_session: None,
            waiters: VecDeque::new(),
            rendezvous_up: false,
            next_connect: None,
            quiet_until: Instant::now(),
            backoff: Backoff::new(Duration::from_millis(500), Duration::from_secs(30)),
            upgrade: Backoff::new(UPGRADE_FIRST, UPGRADE_MAX),
            last_failure: "none yet".to_owned(),
            nothing_to_try: 0,
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<PeerCmd>) {
        if self.ctx.initiator {
            // The higher key waits a moment so two initiators rarely ask at once.
            let delay = match self.ctx.role {
                Role::Client => Duration::ZERO,
                Role::Server => Duration::from_millis(300),
            };
            self.next_connect = Some(Instant::now() + delay);
        }
        loop {
            let wake = self.next_wake();
            tokio::select! {
                _ = self.cancel.cancelled() => break,
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.on_command(cmd),
                    None => break,
                },
                Some(ev) = self.events_rx.recv() => self.on_event(ev),
                _ = tokio::time::sleep_until(wake.into()) => self.on_timer(),
            }
        }
        if let Some((_, t)) = self.tunnel.take() {
            t.close();
        }
        for (_, reply) in self.waiters.drain(..) {
            let _ = reply.send(Err(OpenError::ShuttingDown));
        }
    }

    fn next_wake(&self) -> Instant {
        let far = Instant::now() + Duration::from_secs(3600);
        let connect = self
            .next_connect
            .filter(|_| self.rendezvous_up && self.punching.is_none())
            .map(|t| t.max(self.quiet_until));
        let waiter = self.waiters.front().map(|(deadline, _)| *deadline);
        [connect, waiter].into_iter().flatten().min().unwrap_or(far)
    }

    fn on_command(&mut self, cmd: PeerCmd) {
        match cmd {
            PeerCmd::Punch(job) => self.start_punch(*job),
            PeerCmd::Open(reply) => match &self.tunnel {
                Some((_, tunnel)) => self.open_on(tunnel.clone(), reply),
                None if self.waiters.len() >= MAX_WAITERS => {
                    let _ = reply.send(Err(OpenError::Busy(self.ctx.name.clone())));
                }
                None => {
                    let wait = self.ctx.punch_timeout + Duration::from_secs(5);
                    self.waiters.push_back((Instant::now() + wait, reply));
                    if self.ctx.initiator && self.punching.is_none() {
                        // Someone is waiting: skip the rest of any backoff.
                        self.next_connect = Some(Instant::now());
                    }
                }
            },
            PeerCmd::Abort(session) => {
                if let Some((_, stop)) = self
                    .punching
                    .as_ref()
                    .filter(|_| self.punch_session.as_deref() == Some(session.as_str()))
                {
                    info!(%session, "peer left before punching; abandoning this session");
                    stop.cancel();
                }
            }
            PeerCmd::Repunch => {
                info!("re-punch requested");
                if let Some((_, t)) = self.tunnel.take() {
                    t.close();
                    self.tunnel_gone(t.transport);
                }
                self.backoff.reset();
                self.next_connect = Some(Instant::now());
            }
            PeerCmd::RendezvousUp => {
                self.rendezvous_up = true;
                if self.ctx.initiator && self.tunnel.is_none() && self.next_connect.is_none() {
                    self.next_connect = Some(Instant::now());
                }
            }
        }
    }

    fn on_timer(&mut self) {
        let now = Instant::now();
        while self
            .waiters
            .front()
            .is_some_and(|(deadline, _)| *deadline <= now)
        {
            if let Some((_, reply)) = self.waiters.pop_front() {
                let _ = reply.send(Err(OpenError::NoTunnel {
                    peer: self.ctx.name.clone(),
                    waited: self.ctx.punch_timeout + Duration::from_secs(5),
                    last: self.last_failure.clone(),
                }));
            }
        }
        if self
            .next_connect
            .is_some_and(|t| t.max(self.quiet_until) <= now)
            && self.rendezvous_up
            && self.punching.is_none()
        {
            let relayed = self.tunnel.is_some();
            if self
                .tunnel
                .as_ref()
                .is_none_or(|(_, t)| t.transport == Transport::Relay)
            {
                info!(relayed, "asking the rendezvous for a punch");
                if self
                    .ctx
                    .rendezvous
                    .try_send(RvCmd::Connect(self.ctx.name.clone()))
                    .is_err()
                {
                    debug!("rendezvous client busy; will retry");
                }
                // If no order comes back (peer offline, server refused), ask again.
                self.next_connect = Some(now + CONNECT_RETRY);
            } else {
                self.next_connect = None;
            }
        }
    }

    fn on_event(&mut self, ev: Internal) {
        match ev {
            Internal::PunchDone {
                generation,
                outcome,
            } => {
                if self.punching.as_ref().is_none_or(|(g, _)| *g != generation) {
                    return; // superseded
                }
                self.punching = None;
                match outcome {
                    Ok(p) => {
                        self.nothing_to_try = 0;
                        self.install(generation, *p);
                    }
                    Err(f) => {
                        self.last_failure = f.reason.clone();
                        self.nothing_to_try = if f.nothing_to_try {
                            self.nothing_to_try + 1
                        } else {
                            0
                        };
                        let relayed = self.tunnel.is_some();
                        if self.ctx.initiator || !self.waiters.is_empty() {
                            let wait = if relayed {
                                self.upgrade.next()
                            } else {
                                self.backoff.next()
                            };
                            self.next_connect = Some(Instant::now() + wait);
                        }
                    }
                }
            }
            Internal::TunnelClosed { generation } => {
                if self.tunnel.as_ref().is_some_and(|(g, _)| *g == generation) {
                    if let Some((_, t)) = self.tunnel.take() {
                        self.tunnel_gone(t.transport);
                    }
                    warn!("tunnel lost; will punch again");
                    let _ = self.ctx.rendezvous.try_send(RvCmd::Probe);
                    if self.ctx.initiator {
                        self.next_connect = Some(Instant::now() + self.backoff.next());
                    }
                }
            }
        }
    }

    /// Status and timing after the current tunnel went away.
    fn tunnel_gone(&mut self, transport: Transport) {
        let rtt = self
            .ctx
            .status
            .state()
            .rtt_ms
            .map(|ms| Duration::from_secs_f64(ms.max(0.0) / 1000.0));
        if transport != Transport::Relay {
            self.quiet_until = Instant::now() + quiet_after_close(rtt);
        }

        self.ctx.status.update(|s| {
            s.path = PathState::None;
            s.transport = None;
            s.rtt_ms = None;
        });
    }

    fn start_punch(&mut self, job: PunchJob) {
        if let Some((_, stop)) = self.punching.take() {
            stop.cancel(); // a newer order wins
        }
        self.generation += 1;
        let generation = self.generation;
        let stop = self.cancel.child_token();
        self.punching = Some((generation, stop.clone()));
        self.punch_session = Some(job.order.session.clone());

        // With a relay already up, a punch is an upgrade attempt: no second relay.
        // A punch that had nothing to try is asked again (the peer's UDP
        // endpoint is usually known a moment later); after three in a row
        // the relay is allowed as usual.
        let allow_relay = self.tunnel.is_none() && self.nothing_to_try < 3;
        let ctx = self.ctx.clone();
        let events = self.events_tx.clone();
        let span = tracing::info_span!("punch", session = %job.order.session);
        self.tracker.spawn(
            async move {
                let outcome = tokio::select! {
                    r = punch_session(&ctx, job, allow_relay) => r,
                    _ = stop.cancelled() => Err(PunchFailure { reason: "superseded, abandoned (peer left) or shutting down".into(), attempts: 0, nothing_to_try: false }),
                };
                let _ = events.send(Internal::PunchDone { generation, outcome }).await;
            }
            .instrument(span),
        );
    }

    /// Puts a fresh tunnel in service: driver, inbound streams, keepalive,
    /// then every waiting connection.
    fn install(&mut self, generation: u64, p: Punched) {
        let Punched {
            parts,
            remote,
            attempts,
            path,
            ..
        } = p;
        let TunnelParts {
            tunnel,
            mut inbound,
            driver,
        } = parts;
        if let Some((_, old)) = self.tunnel.replace((generation, tunnel.clone())) {
            // New streams use the new tunnel; the old one closes when its
            // streams are done (an ssh session survives the upgrade).
            self.tracker.spawn(drain(old).in_current_span());
        }
        self.backoff.reset();
        self.next_connect = None;
        if path == PathState::Relayed {
            if self.ctx.initiator {
                self.next_connect = Some(Instant::now() + self.upgrade.next());
            }
        } else {
            self.upgrade.reset();
        }
        self.ctx.status.update(|s| {
            s.path = path;
            s.transport = Some(tunnel.transport);
            s.remote = Some(remote);
        });
        info!(%remote, attempts, ?path, "tunnel up");
        let events = self.events_tx.clone();
        self.tracker.spawn(
            async move {
                driver.await;
                let _ = events.send(Internal::TunnelClosed { generation }).await;
            }
            .in_current_span(),
        );
        let (ctx, cancel, tracker) = (self.ctx.clone(), self.cancel.clone(), self.tracker.clone());
        self.tracker.spawn(
            async move {
                while let Some(stream) = inbound.recv().await {
                    let handler = relay::serve_inbound(
                        stream,
                        ctx.name.clone(),
                        ctx.exposes.clone(),
                        ctx.status.clone(),
                        cancel.clone(),
                    );
                    tracker.spawn(handler.in_current_span());
                }
            }
            .in_current_span(),
        );
        self.tracker.spawn(
            keepalive(tunnel.clone(), self.ctx.clone(), self.cancel.clone()).in_current_span(),
        );
        for (_, reply) in std::mem::take(&mut self.waiters) {
            self.open_on(tunnel.clone(), reply);
        }
    }

    fn open_on(&self, tunnel: Tunnel, reply: OpenReply) {
        self.tracker.spawn(async move {
            let _ = reply.send(tunnel.open().await.map_err(OpenError::from));
        });
    }
}

/// Punches (every allowed transport, raced: see [`crate::race`]), falls
/// back to the relay if allowed, and reports the result to the rendezvous
/// either way.
async fn punch_session(
    ctx: &PeerContext,
    job: PunchJob,
    allow_relay: bool,
) -> Result<Box<Punched>, PunchFailure> {
    let PunchJob {
        order,
        fire_at,
        port,
        received,
    } = job;
    let deadline = fire_at + ctx.punch_timeout;
    let result = race::punch_direct(ctx, &order, fire_at, deadline, port)
        .await
        .map(|d| {
            Box::new(Punched {
                parts: d.parts,
                remote: d.remote,
                attempts: d.attempts,
                path: PathState::Direct,
                relay_reason: None,
            })
        })
        .map_err(|f| PunchFailure {
            reason: f.reason,
            attempts: f.attempts,
            nothing_to_try: f.nothing_to_try,
        });
    let result = match result {
        Err(f) if allow_relay && ctx.mode == PunchMode::Auto => {
            warn!(reason = %f.reason, "no direct path; falling back to the relay (end-to-end encrypted)");
            relay_fallback(ctx, &order, f).await
        }
        Err(f) if ctx.mode == PunchMode::DirectOnly => Err(PunchFailure {
            reason: format!("{}; no relay fallback (mode = \"direct-only\")", f.reason),
            attempts: f.attempts,
            nothing_to_try: f.nothing_to_try,
        }),
        other => other,
    };
    let elapsed = received.elapsed();
    let (path, attempts, reason) = match &result {
        Ok(p) if p.path == PathState::Relayed => {
            (PathKind::Relayed, p.attempts, p.relay_reason.clone())
        }
        Ok(p) => (PathKind::Direct, p.attempts, None),
        Err(f) => (PathKind::None, f.attempts, Some(f.reason.clone())),
    };
    match &reason {
        None => info!(
            elapsed_ms = elapsed.as_millis() as u64,
            attempts, "punch succeeded"
        ),
        Some(why) => {
            warn!(elapsed_ms = elapsed.as_millis() as u64, attempts, reason = %why, "punch failed; the peer may be offline or behind a NAT that cannot be punched")
        }
    }
    ctx.status.record_punch(LastPunch {
        result: if path == PathKind::Direct {
            "ok"
        } else {
            "failed"
        }
        .to_owned(),
        elapsed_ms: elapsed.as_millis() as u64,
        attempts,
        reason: reason.clone(),
        finished_unix_ms: punch_rendezvous::protocol::unix_time_us() / 1000,
    });
    let report = PunchResult {
        session: order.session,
        path,
        elapsed_ms: elapsed.as_millis() as u64,
        attempts,
        reason,
    };
    let _ = ctx.rendezvous.try_send(RvCmd::Report(report));
    result
}

/// Pings over a dedicated stream; a missed answer closes the tunnel so the
/// peer task punches again. Also the source of `rtt_ms`.
async fn keepalive(tunnel: Tunnel, ctx: Arc<PeerContext>, cancel: CancellationToken) {
    let (interval, timeout) = ctx.keepalive;
    let status = &ctx.status;
    let result: Result<(), String> = async {
        let mut s = tunnel.open().await.map_err(|e| e.to_string())?;
        s.uncount();
        relay::request_service(&mut s, PING_SERVICE)
            .await
            .map_err(|e| e.to_string())?;
        let mut seq = 0u64;
        loop {
            seq += 1;
            let t0 = Instant::now();
            let mut echo = [0u8; 8];
            let exchange = async {
                s.write_all(&seq.to_be_bytes()).await?;
                s.flush().await?;
                s.read_exact(&mut echo).await
            };
            match tokio::time::timeout(timeout, exchange).await {
                Ok(Ok(_)) if u64::from_be_bytes(echo) == seq => {}
                Ok(Ok(_)) => return Err("keepalive echo out of order".to_owned()),
                Ok(Err(e)) => return Err(format!("keepalive stream failed: {e}")),
                Err(_) => return Err(format!("no keepalive answer within {timeout:?}")),
            }
            let rtt = t0.elapsed().as_secs_f64() * 1000.0;
            status.update(|st| st.rtt_ms = Some((rtt * 1000.0).round() / 1000.0));
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = tunnel.closed() => return Ok(()),
                _ = cancel.cancelled() => return Ok(()),
            }
        }
    }
    .await;
    if let Err(why) = result {
        if !tunnel.is_closed() {
            warn!(reason = %why, "path looks dead; closing the tunnel");
            tunnel.close_lost();
        }
    }
}

/// The fallback: the same TLS + mux, over the rendezvous relay. Both sides
/// reach this at the same deadline; the server pairs them by session.
async fn relay_fallback(
    ctx: &PeerContext,
    order: &PunchOrder,
    failed: PunchFailure,
) -> Result<Box<Punched>, PunchFailure> {
    let fail = |why: String| PunchFailure {
        reason: format!("{}; relay: {why}", failed.reason),
        attempts: failed.attempts,
        nothing_to_try: false,
    };
    let (io, remote) =
        relay_transport::connect(&ctx.rendezvous_url, &order.session, &order.relay_token)
            .await
            .map_err(|e| fail(e.to_string()))?;
    let io = Metered::new(io, ctx.status.clone());
    let parts = tunnel::handshake(io, ctx.role, &ctx.identity, &ctx.key, Transport::Relay)
        .await
        .map_err(|e| fail(e.to_string()))?;
    Ok(Box::new(Punched {
        parts,
        remote,
        attempts: failed.attempts,
        path: PathState::Relayed,
        relay_reason: Some(failed.reason),
    }))
}

/// Keeps a replaced tunnel open until its streams end, then closes it.
async fn drain(old: Tunnel) {
    let started = Instant::now();
    while !old.is_closed() && old.active_streams() > 0 && started.elapsed() < DRAIN_MAX {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = old.closed() => {}
        }
    }
    debug!(
        waited_ms = started.elapsed().as_millis() as u64,
        "replaced tunnel drained; closing it"
    );
    old.close();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_period_covers_two_round_trips_within_bounds() {
        let ms = Duration::from_millis;
        // A 150 ms path: the peer's FIN comes back a round trip after our
        // close, so the new SYN waits for two.
        assert_eq!(quiet_after_close(Some(ms(150))), ms(350));
        // A LAN still gets a floor; a pathological RTT a ceiling.
        assert_eq!(quiet_after_close(Some(ms(1))), ms(100));
        assert_eq!(quiet_after_close(Some(ms(5000))), ms(1000));
        // No measurement yet: assume an internet path.
        assert_eq!(quiet_after_close(None), ms(500));
    }
}
