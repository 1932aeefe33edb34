//! One task per configured peer: it owns that peer's tunnel.
//!
//! What flows in and out:
//! - [`PeerCmd::Punch`] from the rendezvous client: punch now. A punch runs
//!   as its own task ([`session::run`]) and reports back on the internal
//!   event channel; a newer order supersedes an older one.
//! - [`PeerCmd::Open`] from forward listeners: a stream, please. With a
//!   tunnel it is opened at once; without one the request waits (bounded in
//!   number and time) and, if this side initiates, a punch is requested.
//! - Internal events: a punch finished, a tunnel closed.
//!
//! The decisions are in [`state`] (sans-IO: events in, effects out); this
//! file is the shell that owns the channels, tasks and tunnels and carries
//! the effects out; [`session`] is one punch session (race, fallback,
//! report).
//!
//! The side that has forwards to a peer initiates (asks the rendezvous to
//! `connect`) at start-up and whenever the tunnel is lost, with backoff. The
//! other side only answers punch orders, so it never dials anyone who did
//! not ask for it.

pub(crate) mod session;
pub(crate) mod state;

use std::sync::Arc;
use std::time::Duration;

use punch_config::{Expose, PublicKeyBytes, PunchMode, TransportKind};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use crate::admin::status::{PathState, PeerStatus};
use crate::control::{PunchJob, RvCmd};
use crate::forward::{self, StreamSource};
use crate::identity::Identity;
use crate::path::Role;
use crate::quic::QuicPath;
use crate::race::PunchError;
use crate::tunnel::keepalive::keepalive;
use crate::tunnel::{StreamIo, Tunnel, TunnelError, TunnelParts};
use session::Punched;
use state::{Effect, Event, PeerState, Refusal, Settings};

/// A replaced tunnel stays open this long at most for its streams to end.
const DRAIN_MAX: Duration = Duration::from_secs(600);

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
    /// A reload changed whether we have forwards to this peer.
    SetInitiator(bool),
}

/// The `[[expose]]` table, shared by every peer task and swapped whole by
/// a config reload: each inbound stream reads the table current when it
/// arrives; streams already served keep going.
pub(crate) type ExposeTable = Arc<std::sync::RwLock<Arc<Vec<Expose>>>>;

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
    /// Ping interval and dead-path timeout.
    pub(crate) keepalive: (Duration, Duration),
    pub(crate) exposes: ExposeTable,
    pub(crate) status: Arc<PeerStatus>,
    pub(crate) rendezvous: mpsc::Sender<RvCmd>,
    /// Direct transports to race.
    pub(crate) transports: Vec<TransportKind>,
    /// The daemon's QUIC endpoint, when QUIC is on and its socket bound.
    pub(crate) quic: Option<Arc<QuicPath>>,
    /// QUIC connections this peer made to us, authenticated by the accept
    /// loop (server role; a punch session holds the lock while it runs).
    pub(crate) quic_incoming: tokio::sync::Mutex<mpsc::Receiver<quinn::Connection>>,
    /// Connect attempts, all peers' punches together (`punch/budget.rs`).
    pub(crate) syn_budget: Arc<std::sync::Mutex<crate::punch::budget::SynBudget>>,
}

/// A cloneable way to reach a peer task.
#[derive(Debug, Clone)]
pub(crate) struct PeerHandle {
    name: Arc<str>,
    tx: mpsc::Sender<PeerCmd>,
    status: Arc<PeerStatus>,
}

impl PeerHandle {
    pub(crate) async fn send(&self, cmd: PeerCmd) {
        let _ = self.tx.send(cmd).await;
    }
}

impl StreamSource for PeerHandle {
    type Error = OpenError;

    fn name(&self) -> &str {
        &self.name
    }

    fn status(&self) -> &Arc<PeerStatus> {
        &self.status
    }

    /// A new stream to this peer, waiting for a tunnel if need be.
    async fn open_stream(&self) -> Result<StreamIo, OpenError> {
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
        outcome: Result<Box<Punched>, PunchError>,
    },
    TunnelClosed {
        generation: u64,
    },
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

/// The shell: owns the tunnel, the running punch and the helper tasks, and
/// carries out what [`PeerState`] decides.
struct PeerActor {
    ctx: Arc<PeerContext>,
    state: PeerState<OpenReply>,
    cancel: CancellationToken,
    tracker: TaskTracker,
    events_tx: mpsc::Sender<Internal>,
    events_rx: mpsc::Receiver<Internal>,
    tunnel: Option<Tunnel>,
    /// The running punch's stop token.
    punching: Option<CancellationToken>,
    /// The order of the punch about to start (set by a `Punch` command).
    job: Option<PunchJob>,
    /// The tunnel of a punch that just finished, until `Install` takes it.
    punched: Option<Box<Punched>>,
}

impl PeerActor {
    fn new(ctx: Arc<PeerContext>, cancel: CancellationToken, tracker: TaskTracker) -> Self {
        let (events_tx, events_rx) = mpsc::channel(16);
        let settings = Settings {
            initiator: ctx.initiator,
            role: ctx.role,
            punch_timeout: ctx.punch_timeout,
        };
        Self {
            state: PeerState::new(settings, Instant::now()),
            ctx,
            cancel,
            tracker,
            events_tx,
            events_rx,
            tunnel: None,
            punching: None,
            job: None,
            punched: None,
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<PeerCmd>) {
        loop {
            let wake = self
                .state
                .next_wake()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            let event = tokio::select! {
                _ = self.cancel.cancelled() => break,
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.command(cmd),
                    None => break,
                },
                Some(ev) = self.events_rx.recv() => self.internal(ev),
                _ = tokio::time::sleep_until(wake) => Event::Timer,
            };
            let effects = self.state.handle(event, Instant::now());
            for effect in effects {
                self.apply(effect);
            }
            // A superseded punch's tunnel is dropped here, closing it.
            self.punched = None;
            self.job = None;
        }
        if let Some(t) = self.tunnel.take() {
            t.close();
        }
        for reply in self.state.shutdown() {
            let _ = reply.send(Err(OpenError::ShuttingDown));
        }
    }

    /// A command as an event; a punch order's details stay in the shell.
    fn command(&mut self, cmd: PeerCmd) -> Event<OpenReply> {
        match cmd {
            PeerCmd::Punch(job) => {
                let session = job.order.session.clone();
                self.job = Some(*job);
                Event::Punch { session }
            }
            PeerCmd::Open(reply) => Event::Open(reply),
            PeerCmd::Abort(session) => Event::Abort { session },
            PeerCmd::Repunch => {
                info!("re-punch requested");
                Event::Repunch { rtt: self.rtt() }
            }
            PeerCmd::RendezvousUp => Event::RendezvousUp,
            PeerCmd::SetInitiator(on) => Event::SetInitiator(on),
        }
    }

    fn internal(&mut self, ev: Internal) -> Event<OpenReply> {
        match ev {
            Internal::PunchDone {
                generation,
                outcome: Ok(p),
            } => {
                let (path, transport, quiet) = (p.path, p.parts.tunnel.transport, p.quiet);
                self.punched = Some(p);
                Event::PunchSucceeded {
                    generation,
                    path,
                    transport,
                    quiet,
                }
            }
            Internal::PunchDone {
                generation,
                outcome: Err(e),
            } => Event::PunchFailed {
                generation,
                reason: e.to_string(),
                nothing_to_try: e.nothing_to_try(),
                quiet: e.quiet_for(),
            },
            Internal::TunnelClosed { generation } => Event::TunnelClosed {
                generation,
                rtt: self.rtt(),
            },
        }
    }

    /// The current tunnel's RTT from keepalive, for the quiet period.
    fn rtt(&self) -> Option<Duration> {
        self.ctx
            .status
            .state()
            .rtt_ms
            .map(|ms| Duration::from_secs_f64(ms.max(0.0) / 1000.0))
    }

    fn apply(&mut self, effect: Effect<OpenReply>) {
        match effect {
            Effect::CancelPunch => {
                if let Some(stop) = &self.punching {
                    info!("abandoning the running punch (the peer left, or a newer order came)");
                    stop.cancel();
                }
            }
            Effect::StartPunch {
                generation,
                allow_relay,
            } => {
                if let Some(job) = self.job.take() {
                    self.start_punch(generation, job, allow_relay);
                }
            }
            Effect::Install { generation } => {
                if let Some(p) = self.punched.take() {
                    self.install(generation, *p);
                }
            }
            Effect::DropTunnel { close } => {
                if let Some(t) = self.tunnel.take() {
                    if close {
                        t.close();
                    } else {
                        warn!("tunnel lost; will punch again");
                    }
                }
                self.ctx.status.update(|s| {
                    s.path = PathState::None;
                    s.transport = None;
                    s.rtt_ms = None;
                    s.path_kept = None;
                });
            }
            Effect::OpenStream(reply) => match &self.tunnel {
                Some(t) => self.open_on(t.clone(), reply),
                None => {
                    let _ = reply.send(Err(OpenError::Tunnel(TunnelError::Closed)));
                }
            },
            Effect::Refuse(reply, why) => {
                let peer = self.ctx.name.clone();
                let _ = reply.send(Err(match why {
                    Refusal::Busy => OpenError::Busy(peer),
                    Refusal::NoTunnel { waited, last } => {
                        OpenError::NoTunnel { peer, waited, last }
                    }
                }));
            }
            Effect::AskRendezvous => {
                info!(
                    relayed = self.tunnel.is_some(),
                    "asking the rendezvous for a punch"
                );
                if self
                    .ctx
                    .rendezvous
                    .try_send(RvCmd::Connect(self.ctx.name.clone()))
                    .is_err()
                {
                    debug!("rendezvous client busy; will retry");
                }
            }
            Effect::ProbeRendezvous => {
                let _ = self.ctx.rendezvous.try_send(RvCmd::Probe);
            }
        }
    }

    fn start_punch(&mut self, generation: u64, job: PunchJob, allow_relay: bool) {
        let stop = self.cancel.child_token();
        if let Some(old) = self.punching.replace(stop.clone()) {
            old.cancel(); // a newer order wins
        }
        let ctx = self.ctx.clone();
        let events = self.events_tx.clone();
        let span = tracing::info_span!("punch", session = %job.order.session);
        self.tracker.spawn(
            async move {
                let outcome = tokio::select! {
                    r = session::run(&ctx, job, allow_relay) => r,
                    _ = stop.cancelled() => Err(PunchError::Cancelled),
                };
                let _ = events
                    .send(Internal::PunchDone {
                        generation,
                        outcome,
                    })
                    .await;
            }
            .instrument(span),
        );
    }

    /// Puts a fresh tunnel in service: driver, inbound streams, keepalive.
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
        self.punching = None;
        if let Some(old) = self.tunnel.replace(tunnel.clone()) {
            // New streams use the new tunnel; the old one closes when its
            // streams are done (an ssh session survives the upgrade).
            self.tracker.spawn(drain(old).in_current_span());
        }
        self.ctx.status.update(|s| {
            s.path = path;
            s.transport = Some(tunnel.transport);
            s.remote = Some(remote);
            if path != PathState::Direct {
                s.path_kept = None;
            }
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
                    let handler = forward::serve_inbound(
                        stream,
                        ctx.name.clone(),
                        ctx.exposes
                            .read()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .clone(),
                        ctx.status.clone(),
                        cancel.clone(),
                    );
                    tracker.spawn(handler.in_current_span());
                }
            }
            .in_current_span(),
        );
        self.tracker.spawn(
            keepalive(
                tunnel,
                self.ctx.keepalive,
                self.ctx.status.clone(),
                self.cancel.clone(),
            )
            .in_current_span(),
        );
    }

    fn open_on(&self, tunnel: Tunnel, reply: OpenReply) {
        self.tracker.spawn(async move {
            let _ = reply.send(tunnel.open().await.map_err(OpenError::from));
        });
    }
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
