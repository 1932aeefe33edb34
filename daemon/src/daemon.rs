//! Wiring: binds every listener, starts one task per concern, and routes
//! rendezvous events to the peer tasks.
//!
//! ```text
//!  forward listeners ──open──▶ peer tasks ◀──punch orders── dispatcher ◀── rendezvous client
//!                                │  ▲                                          ▲
//!                                ▼  └─────────── connect / report ─────────────┘
//!                             tunnels (TLS + yamux, or QUIC) ──inbound──▶ exposed services
//!                                ▲
//!            QUIC accept loop ───┘ (incoming QUIC, matched to a peer by key)
//! ```
//!
//! Every task is spawned on one [`TaskTracker`] and watches one
//! [`CancellationToken`]; [`RunningDaemon::shutdown`] cancels and waits.
//!
//! What runs per config entry (a peer task, a forward's listeners, the
//! expose table) is owned by the `Supervisor`, which lives in the router
//! task; each peer and each forward port has its own child token, so a
//! reload (`SIGHUP`, `POST /v1/reload`) stops exactly what the plan from
//! `reload.rs` removes and starts what it adds, leaving the rest running.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::VerifyingKey;
use punch_config::{Forward, PeerConfig, PeerEntry, Protocol, Secret, TransportKind};
use punch_service::secret_file;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn, Instrument};

use crate::admin::status::{ForwardStatus, PeerStatus, StatusBoard};
use crate::admin::{self, AdminCmd};
use crate::control::link::Endpoint;
use crate::control::{self, RvEvent, RvSettings};
use crate::forward;
use crate::identity::Identity;
use crate::path::Role;
use crate::peer::{self, ExposeTable, PeerCmd, PeerContext, PeerHandle};
use crate::quic::{QuicPath, QuicRoutes};
use crate::reload;

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr} for {what}: {source}; is another program using it?")]
    Bind {
        /// Which listener.
        what: String,
        /// The address.
        addr: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The rendezvous URL or its TLS settings are unusable.
    #[error(transparent)]
    Rendezvous(#[from] crate::control::link::LinkError),
    /// `[rendezvous] token_file` unreadable.
    #[error("[rendezvous] token_file: {0}")]
    TokenFile(punch_service::secret_file::SecretFileError),
    /// `[rendezvous] server_key` is not an Ed25519 point.
    #[error("[rendezvous] server_key is not a valid Ed25519 public key; copy it from `punch-rendezvous pubkey`")]
    ServerKey,
    /// The admin token could not be written.
    #[error(
        "cannot write the admin token ({0}); set [admin] token_file to a path this user may write"
    )]
    AdminToken(punch_service::secret_file::SecretFileError),
    /// A peer is configured with our own key.
    #[error(
        "peer {0} is listed with this daemon's own public key; a daemon cannot connect to itself"
    )]
    SelfPeer(String),
}

/// A started daemon.
#[derive(Debug)]
pub struct RunningDaemon {
    /// Where the admin API listens.
    pub admin_addr: SocketAddr,
    /// Where each `[[forward]]` listened at start, in config order, one
    /// address per port of a range (see [`RunningDaemon::forward_addrs_now`]
    /// after a reload).
    pub forward_addrs: Vec<SocketAddr>,
    /// Live status.
    pub status: Arc<StatusBoard>,
    /// The admin token file, removed at shutdown.
    pub admin_token_file: std::path::PathBuf,
    /// Reload requests to the supervisor task.
    reloads: mpsc::Sender<ReloadRequest>,
    /// Stops the forward listeners only (the first step of a graceful stop).
    accepting: CancellationToken,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

/// Why a reload changed nothing (or, [`ReloadError::Partial`], not all).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReloadError {
    /// The new file does not validate (its located error).
    #[error("{0}; the running configuration stays")]
    Config(String),
    /// The new config cannot be put in place (a listener cannot be bound,
    /// a peer carries our own key).
    #[error("{0}; the running configuration stays")]
    Apply(String),
    /// Applied, except listeners whose ports were taken in the moment
    /// between a removed forward freeing them and the new one binding.
    #[error("{0}")]
    Partial(String),
    /// The daemon is stopping.
    #[error("the daemon is shutting down")]
    ShuttingDown,
}

/// A reload asked of the supervisor: re-read the config file (`None`) or
/// use this config.
struct ReloadRequest {
    config: Option<Box<PeerConfig>>,
    reply: oneshot::Sender<Result<String, ReloadError>>,
}

impl std::fmt::Debug for ReloadRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReloadRequest")
    }
}

impl RunningDaemon {
    /// Stops gracefully: closes the forward listeners, lets open streams
    /// finish for up to `drain`, then stops every task and waits for them.
    pub async fn shutdown(self, drain: Duration) {
        self.accepting.cancel();
        let deadline = tokio::time::Instant::now() + drain;
        while tokio::time::Instant::now() < deadline && self.open_streams() > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let left = self.open_streams();
        if left > 0 {
            warn!(
                streams = left,
                ?drain,
                "closing streams still open after the drain period"
            );
        }
        self.cancel.cancel();
        self.tracker.close();
        if tokio::time::timeout(drain, self.tracker.wait())
            .await
            .is_err()
        {
            warn!(?drain, "some tasks did not finish in time");
        }
        let _ = std::fs::remove_file(&self.admin_token_file);
    }

    fn open_streams(&self) -> i64 {
        let doc = self.status.snapshot();
        doc.peers.iter().map(|p| p.streams).sum::<i64>()
            + doc.forwards.iter().map(|f| f.active).sum::<i64>()
    }

    /// Resolves when the daemon has been cancelled and all its tasks ended.
    pub async fn stopped(&self) {
        self.cancel.cancelled().await;
        self.tracker.close();
        self.tracker.wait().await;
    }

    /// Re-reads the config file the daemon was started from (what `SIGHUP`
    /// and `punchd reload` do) and applies what changed; returns a summary.
    /// An invalid file changes nothing.
    pub async fn reload(&self) -> Result<String, ReloadError> {
        request_reload(&self.reloads, None).await
    }

    /// Applies `cfg` as if it had been read from the file.
    pub async fn reload_with(&self, cfg: PeerConfig) -> Result<String, ReloadError> {
        request_reload(&self.reloads, Some(Box::new(cfg))).await
    }

    /// Where the forwards listen now, in config order (one per port).
    pub fn forward_addrs_now(&self) -> Vec<SocketAddr> {
        self.status
            .snapshot()
            .forwards
            .iter()
            .filter_map(|f| f.listen.parse().ok())
            .collect()
    }
}

async fn request_reload(
    to: &mpsc::Sender<ReloadRequest>,
    config: Option<Box<PeerConfig>>,
) -> Result<String, ReloadError> {
    let (reply, answer) = oneshot::channel();
    to.send(ReloadRequest { config, reply })
        .await
        .map_err(|_| ReloadError::ShuttingDown)?;
    answer.await.unwrap_or(Err(ReloadError::ShuttingDown))
}

async fn bind(what: &str, addr: &str) -> Result<TcpListener, DaemonError> {
    TcpListener::bind(addr)
        .await
        .map_err(bind_error(what, addr))
}

/// [`DaemonError::Bind`] for the listener `what` at `addr`, for `map_err`.
fn bind_error<'a>(
    what: &'a str,
    addr: &'a str,
) -> impl Fn(std::io::Error) -> DaemonError + Copy + 'a {
    move |source| DaemonError::Bind {
        what: what.to_owned(),
        addr: addr.to_owned(),
        source,
    }
}

/// Peers by name, with the key pinned for each.
type Peers = HashMap<String, (PeerHandle, punch_config::PublicKeyBytes)>;

/// A bound port of a `[[forward]]`: a TCP listener or a UDP socket.
enum Listener {
    Tcp(TcpListener),
    Udp(tokio::net::UdpSocket),
}

/// Starts a daemon for `cfg` with `identity`. Listeners are bound before
/// this returns, so their addresses are known and errors are immediate.
/// Without a config file, [`RunningDaemon::reload`] has nothing to re-read
/// (see [`start_from_file`]).
pub async fn start(
    cfg: PeerConfig,
    identity: Identity,
    cancel: CancellationToken,
) -> Result<RunningDaemon, DaemonError> {
    start_inner(cfg, None, identity, cancel).await
}

/// [`start`] for a config read from `path`, which a reload re-reads.
pub async fn start_from_file(
    path: &Path,
    cfg: PeerConfig,
    identity: Identity,
    cancel: CancellationToken,
) -> Result<RunningDaemon, DaemonError> {
    start_inner(cfg, Some(path.to_owned()), identity, cancel).await
}

async fn start_inner(
    cfg: PeerConfig,
    path: Option<PathBuf>,
    identity: Identity,
    cancel: CancellationToken,
) -> Result<RunningDaemon, DaemonError> {
    let own_key = identity.public_key();
    if let Some(p) = cfg.peers.iter().find(|p| p.public_key == own_key) {
        return Err(DaemonError::SelfPeer(p.name.to_string()));
    }
    let endpoints = cfg
        .rendezvous
        .urls()
        .into_iter()
        .map(|u| Endpoint::new(u, cfg.rendezvous.ca_file.as_deref()))
        .collect::<Result<Vec<_>, _>>()?;
    let token = match &cfg.rendezvous.token_file {
        Some(path) => Some(Secret::new(
            secret_file::read_token(path).map_err(DaemonError::TokenFile)?,
        )),
        None => cfg.rendezvous.token.clone(),
    };
    let server_key = match &cfg.rendezvous.server_key {
        Some(k) => Some(VerifyingKey::from_bytes(&k.0).map_err(|_| DaemonError::ServerKey)?),
        None => {
            warn!("no [rendezvous] server_key: punch orders are trusted as they arrive, so whoever controls the link to the server can aim our punches; pin the key the server prints");
            None
        }
    };
    let tracker = TaskTracker::new();
    let accepting = cancel.child_token();
    let admin_listener = bind("the admin API", &cfg.admin.listen).await?;
    let admin_addr = local_addr(&admin_listener, "the admin API", &cfg.admin.listen)?;
    // The bound port, so `listen = "…:0"` daemons do not share a file.
    let token_path = cfg
        .admin
        .token_file
        .clone()
        .unwrap_or_else(|| punch_config::peer::default_token_path(admin_addr.port()));
    let policy = admin::auth::Policy {
        listen: admin_addr,
        allow_remote: cfg.admin.allow_remote,
        token: admin::auth::write_token(&token_path).map_err(DaemonError::AdminToken)?,
    };
    info!(path = %token_path.display(), "admin token written");
    let mut bound = Vec::new();
    for f in &cfg.forward {
        bound.push(bind_forward(f, &HashSet::new()).await?);
    }
    let board = Arc::new(StatusBoard::new(cfg.name.as_str(), Vec::new(), Vec::new()));

    let quic = bind_quic(&cfg, &identity);
    log_socket_buffers(&cfg.punch.transports);
    let (rv_cmd_tx, rv_cmd_rx) = mpsc::channel(64);
    let (rv_ev_tx, rv_ev_rx) = mpsc::channel(64);
    let quic_routes = QuicRoutes::default();
    let mut sup = Supervisor {
        identity: identity.clone(),
        rendezvous: rv_cmd_tx,
        quic: quic.clone(),
        quic_routes: quic_routes.clone(),
        syn_budget: Arc::default(),
        exposes: Arc::new(std::sync::RwLock::new(Arc::new(cfg.expose.clone()))),
        board: board.clone(),
        accepting: accepting.clone(),
        cancel: cancel.clone(),
        tracker: tracker.clone(),
        path,
        peers: HashMap::new(),
        forwards: Vec::new(),
        cfg: cfg.clone(),
    };
    for p in &cfg.peers {
        sup.start_peer(p)?;
    }
    for (f, ports) in cfg.forward.iter().zip(bound) {
        let live = sup.start_forward(f, ports);
        sup.forwards.push(live);
    }
    sup.publish();
    let forward_addrs: Vec<SocketAddr> = sup
        .forwards
        .iter()
        .flat_map(|f| f.ports.iter().map(|p| p.addr))
        .collect();
    if let Some(q) = &quic {
        board.set_quic_endpoint(q.endpoint().clone());
        tracker.spawn(
            q.clone()
                .accept_loop(quic_routes, cancel.clone(), tracker.clone())
                .instrument(tracing::info_span!("quic")),
        );
    }
    let settings = RvSettings {
        endpoint: endpoints[0].clone(),
        endpoints,
        token,
        server_key,
        name: cfg.name.to_string(),
        identity: identity.clone(),
        port: cfg.punch.port,
        local_candidates: cfg.punch.local_candidates,
        quic: quic.clone(),
        portmap: if cfg.punch.port_mapping {
            crate::portmap::PortMapper::spawn(board.portmap.clone(), cancel.clone(), &tracker)
        } else {
            crate::portmap::PortMapper::disabled()
        },
        nat: control::netcheck::NatCheck::new(board.nat.clone()),
    };
    tracker.spawn(
        control::run(settings, rv_ev_tx, rv_cmd_rx, board.clone(), cancel.clone())
            .instrument(tracing::info_span!("rendezvous")),
    );
    let (admin_tx, admin_rx) = mpsc::channel(16);
    let (reload_tx, reload_rx) = mpsc::channel(4);
    tracker.spawn(route(rv_ev_rx, admin_rx, reload_rx, sup));
    tracker.spawn(admin::serve(
        admin_listener,
        board.clone(),
        admin_tx,
        policy,
        cancel.clone(),
    ));
    info!(name = %cfg.name, %admin_addr, forwards = forward_addrs.len(), peers = cfg.peers.len(), "punchd started");
    Ok(RunningDaemon {
        admin_addr,
        forward_addrs,
        status: board,
        admin_token_file: token_path,
        reloads: reload_tx,
        accepting,
        cancel,
        tracker,
    })
}

fn local_addr(l: &TcpListener, what: &str, addr: &str) -> Result<SocketAddr, DaemonError> {
    l.local_addr().map_err(bind_error(what, addr))
}

/// The listeners of one `[[forward]]`, one per port of its range; `None`
/// for a port in `later` (held by a forward a reload is about to close).
type BoundPorts = Vec<(SocketAddr, Option<Listener>)>;

/// Binds one port of `f`: a TCP listener, or for `protocol = "udp"` a UDP
/// socket with a large receive buffer (a burst must not overflow it
/// while the flow's stream opens).
async fn bind_port(
    f: &Forward,
    what: &str,
    addr: SocketAddr,
) -> Result<(SocketAddr, Listener), DaemonError> {
    let a = addr.to_string();
    match f.protocol {
        Protocol::Tcp => {
            let l = forward::listen::bind_tcp(addr).map_err(bind_error(what, &a))?;
            Ok((local_addr(&l, what, &a)?, Listener::Tcp(l)))
        }
        Protocol::Udp => {
            let what = format!("UDP {what}");
            let err = bind_error(&what, &a);
            let s = tokio::net::UdpSocket::bind(addr).await.map_err(err)?;
            forward::udp::enlarge_buffer(&s);
            let bound = s.local_addr().map_err(err)?;
            Ok((bound, Listener::Udp(s)))
        }
    }
}

/// Binds every port of `f` except those in `later`, so a busy port fails
/// the start (or the reload) before anything else changes.
async fn bind_forward(f: &Forward, later: &HashSet<SocketAddr>) -> Result<BoundPorts, DaemonError> {
    let what = format!("forward to {}/{}", f.peer, f.service);
    let addrs = f.listen_addrs().ok_or_else(|| DaemonError::Bind {
        what: what.clone(),
        addr: f.listen.clone(),
        source: std::io::Error::other("not an ip:port address"),
    })?;
    let mut out = Vec::new();
    for addr in addrs {
        if later.contains(&addr) {
            out.push((addr, None));
            continue;
        }
        let (bound, l) = bind_port(f, &what, addr).await?;
        out.push((bound, Some(l)));
    }
    Ok(out)
}

/// One running port of a forward.
struct LivePort {
    addr: SocketAddr,
    status: Arc<ForwardStatus>,
    /// Stops this port's accept loop (a reload removed the forward).
    stop: CancellationToken,
    /// The accept loop; awaited after `stop`, so the port is free again.
    task: tokio::task::JoinHandle<()>,
}

/// One running `[[forward]]`.
struct LiveForward {
    ports: Vec<LivePort>,
}

/// One running peer task.
struct LivePeer {
    handle: PeerHandle,
    key: punch_config::PublicKeyBytes,
    status: Arc<PeerStatus>,
    /// Stops this peer's task, which closes its tunnel.
    stop: CancellationToken,
}

/// Owns what runs per config entry (peer tasks, forward listeners, the
/// expose table) and applies reloads ([`crate::reload`]).
struct Supervisor {
    identity: Identity,
    rendezvous: mpsc::Sender<control::RvCmd>,
    quic: Option<Arc<QuicPath>>,
    quic_routes: QuicRoutes,
    /// Connect attempts, all peers' punches together (`punch/budget.rs`).
    syn_budget: Arc<std::sync::Mutex<crate::punch::budget::SynBudget>>,
    exposes: ExposeTable,
    board: Arc<StatusBoard>,
    accepting: CancellationToken,
    cancel: CancellationToken,
    tracker: TaskTracker,
    /// The config file, for reloads.
    path: Option<PathBuf>,
    peers: HashMap<String, LivePeer>,
    /// In the order of `cfg.forward`.
    forwards: Vec<LiveForward>,
    /// The configuration running now.
    cfg: PeerConfig,
}

impl Supervisor {
    /// Starts the task of one `[[peers]]` entry.
    fn start_peer(&mut self, p: &PeerEntry) -> Result<(), DaemonError> {
        let own_key = self.identity.public_key();
        let Some(role) = Role::choose(&own_key.0, &p.public_key.0) else {
            return Err(DaemonError::SelfPeer(p.name.to_string()));
        };
        // Only the higher key accepts QUIC (the lower dials); connections
        // from this peer reach its task through this channel.
        let (incoming_tx, incoming_rx) = mpsc::channel(4);
        if role == Role::Server && self.quic.is_some() {
            lock(&self.quic_routes).insert(p.public_key, incoming_tx);
        }
        let status = Arc::new(PeerStatus::new(p.name.as_str()));
        let cfg = &self.cfg;
        let ctx = PeerContext {
            identity: self.identity.clone(),
            name: p.name.to_string(),
            key: p.public_key,
            role,
            initiator: cfg.forward.iter().any(|f| f.peer == p.name),
            punch_timeout: cfg.punch.timeout,
            mode: cfg.punch.mode,
            keepalive: (cfg.punch.keepalive_interval, cfg.punch.keepalive_timeout),
            exposes: self.exposes.clone(),
            status: status.clone(),
            rendezvous: self.rendezvous.clone(),
            transports: cfg.punch.transports.clone(),
            quic: self.quic.clone(),
            quic_incoming: tokio::sync::Mutex::new(incoming_rx),
            syn_budget: self.syn_budget.clone(),
        };
        let stop = self.cancel.child_token();
        let handle = peer::spawn(ctx, stop.clone(), &self.tracker);
        self.peers.insert(
            p.name.to_string(),
            LivePeer {
                handle,
                key: p.public_key,
                status,
                stop,
            },
        );
        Ok(())
    }

    /// Stops a peer's task; its tunnel closes (the peer sees a clean
    /// close, not a dead path).
    fn stop_peer(&mut self, name: &str) {
        if let Some(p) = self.peers.remove(name) {
            lock(&self.quic_routes).remove(&p.key);
            p.stop.cancel();
        }
    }

    /// One accept loop per port of `f`, into its peer's task.
    fn start_forward(&self, f: &Forward, ports: BoundPorts) -> LiveForward {
        let range = ports.len() > 1;
        let mut live = Vec::new();
        for (n, (addr, listener)) in ports.into_iter().enumerate() {
            let Some(listener) = listener else { continue };
            let Some(peer) = self.peers.get(f.peer.as_str()) else {
                continue;
            };
            // n < MAX_RANGE_PORTS (validated), so it fits.
            let request = forward::ranges::request(f.service.as_str(), range.then_some(n as u16));
            let status = ForwardStatus::new(&addr.to_string(), f.peer.as_str(), f.service.as_str());
            let status = Arc::new(match f.protocol {
                Protocol::Tcp => status,
                Protocol::Udp => status.udp(),
            });
            let stop = self.accepting.child_token();
            let span = tracing::info_span!("forward", listen = %addr, peer = %f.peer, service = %f.service, protocol = f.protocol.as_str());
            let task = match listener {
                Listener::Tcp(listener) => self.tracker.spawn(
                    forward::run_forward(
                        listener,
                        peer.handle.clone(),
                        request,
                        status.clone(),
                        stop.clone(),
                        self.cancel.clone(),
                        self.tracker.clone(),
                    )
                    .instrument(span),
                ),
                Listener::Udp(socket) => self.tracker.spawn(
                    forward::udp::run_udp_forward(
                        socket,
                        peer.handle.clone(),
                        request,
                        status.clone(),
                        stop.clone(),
                        self.cancel.clone(),
                        self.tracker.clone(),
                    )
                    .instrument(span),
                ),
            };
            live.push(LivePort {
                addr,
                status,
                stop,
                task,
            });
        }
        LiveForward { ports: live }
    }

    /// Puts the running peers and forwards on the status board.
    fn publish(&self) {
        let peers = self
            .cfg
            .peers
            .iter()
            .filter_map(|p| self.peers.get(p.name.as_str()).map(|l| l.status.clone()))
            .collect();
        let forwards = self
            .forwards
            .iter()
            .flat_map(|f| f.ports.iter().map(|p| p.status.clone()))
            .collect();
        self.board.replace(peers, forwards);
    }

    /// The peers map the router dispatches rendezvous events with.
    fn routes(&self) -> Peers {
        self.peers
            .iter()
            .map(|(name, p)| (name.clone(), (p.handle.clone(), p.key)))
            .collect()
    }

    /// Reads (or takes) the new config and applies it; on any error
    /// nothing has changed.
    async fn reload(&mut self, given: Option<Box<PeerConfig>>) -> Result<String, ReloadError> {
        let new = match given {
            Some(cfg) => *cfg,
            None => {
                let path = self.path.as_ref().ok_or_else(|| {
                    ReloadError::Apply(
                        "this daemon was started without a config file, so there is nothing to re-read"
                            .into(),
                    )
                })?;
                PeerConfig::load(path).map_err(|e| ReloadError::Config(e.to_string()))?
            }
        };
        let own_key = self.identity.public_key();
        if let Some(p) = new.peers.iter().find(|p| p.public_key == own_key) {
            return Err(ReloadError::Apply(
                DaemonError::SelfPeer(p.name.to_string()).to_string(),
            ));
        }
        let plan = reload::plan(&self.cfg, &new);
        let summary = plan.summary(&self.cfg, &new);
        for what in &plan.needs_restart {
            warn!(
                section = what,
                "changed in the config file; takes effect at the next restart"
            );
        }
        if plan.is_empty() {
            self.cfg.clone_from(&new);
            return Ok(summary);
        }
        // Bind first: a busy port refuses the reload before anything stops.
        let freed: HashSet<SocketAddr> = plan
            .forwards_removed
            .iter()
            .flat_map(|&i| self.forwards[i].ports.iter().map(|p| p.addr))
            .collect();
        let mut bound = Vec::new();
        for &i in &plan.forwards_added {
            let ports = bind_forward(&new.forward[i], &freed)
                .await
                .map_err(|e| ReloadError::Apply(e.to_string()))?;
            bound.push((i, ports));
        }
        // Close removed forwards and wait until their ports are free.
        let mut old_forwards: Vec<Option<LiveForward>> = std::mem::take(&mut self.forwards)
            .into_iter()
            .map(Some)
            .collect();
        for &i in &plan.forwards_removed {
            if let Some(f) = old_forwards[i].take() {
                for p in f.ports {
                    p.stop.cancel();
                    let _ = p.task.await;
                }
            }
        }
        for name in &plan.peers_removed {
            self.stop_peer(name);
        }
        *self
            .exposes
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(new.expose.clone());
        self.cfg = new;
        let added = plan.peers_added.clone();
        for p in &added {
            // Our own key was refused above; nothing else fails here.
            if let Err(e) = self.start_peer(p) {
                warn!(peer = %p.name, error = %e, "cannot start the peer");
            }
        }
        if let Some(q) = &self.quic {
            let keys: Vec<_> = self.cfg.peers.iter().map(|p| p.public_key).collect();
            if let Err(e) = q.accept_from(&self.identity, &keys) {
                warn!(error = %e, "cannot update the QUIC endpoint's peer keys");
            }
        }
        for (name, on) in &plan.initiator {
            if let Some(p) = self.peers.get(name) {
                p.handle.send(PeerCmd::SetInitiator(*on)).await;
            }
        }
        let mut fresh: HashMap<usize, LiveForward> = HashMap::new();
        // Ports a removed forward just freed, bound now. Should one be
        // taken in between, that port stays unbound and the reload says
        // so; everything else is applied and tracked.
        let mut late = Vec::new();
        for (i, mut ports) in bound {
            let f = self.cfg.forward[i].clone();
            for (addr, listener) in &mut ports {
                if listener.is_none() {
                    let what = format!("forward to {}/{}", f.peer, f.service);
                    match bind_port(&f, &what, *addr).await {
                        Ok((_, l)) => *listener = Some(l),
                        Err(e) => late.push(e.to_string()),
                    }
                }
            }
            fresh.insert(i, self.start_forward(&f, ports));
        }
        let kept: HashMap<usize, usize> = plan.forwards_kept.iter().map(|&(o, n)| (n, o)).collect();
        self.forwards = (0..self.cfg.forward.len())
            .map(|n| match kept.get(&n) {
                Some(&o) => old_forwards[o].take(),
                None => fresh.remove(&n),
            })
            .map(|f| f.unwrap_or(LiveForward { ports: Vec::new() }))
            .collect();
        self.publish();
        if late.is_empty() {
            Ok(summary)
        } else {
            Err(ReloadError::Partial(format!(
                "{summary}; but {}",
                late.join("; ")
            )))
        }
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Routes rendezvous events and admin requests to the peer tasks, and
/// applies reloads (which change where they are routed).
async fn route(
    mut rendezvous: mpsc::Receiver<RvEvent>,
    mut admin: mpsc::Receiver<AdminCmd>,
    mut reloads: mpsc::Receiver<ReloadRequest>,
    mut sup: Supervisor,
) {
    let cancel = sup.cancel.clone();
    let mut peers = sup.routes();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            ev = rendezvous.recv() => match ev {
                Some(ev) => dispatch(ev, &peers).await,
                None => break,
            },
            Some(cmd) = admin.recv() => match cmd {
                AdminCmd::Repunch(name) => {
                    if let Some((handle, _)) = peers.get(&name) {
                        handle.send(PeerCmd::Repunch).await;
                    }
                }
                AdminCmd::Reload(reply) => {
                    let r = apply_reload(&mut sup, None).await;
                    let _ = reply.send(r.map_err(|e| e.to_string()));
                    peers = sup.routes();
                }
            },
            Some(req) = reloads.recv() => {
                let r = apply_reload(&mut sup, req.config).await;
                let _ = req.reply.send(r);
                peers = sup.routes();
            }
        }
    }
}

async fn apply_reload(
    sup: &mut Supervisor,
    config: Option<Box<PeerConfig>>,
) -> Result<String, ReloadError> {
    let r = sup.reload(config).await;
    sup.board.reloaded(r.is_ok());
    match &r {
        Ok(summary) => info!(%summary, "configuration reloaded"),
        Err(e) => warn!(error = %e, "reload refused"),
    }
    r
}

/// Says once, at start, how large the tunnel sockets' buffers may grow,
/// and what to raise when the host keeps them short.
fn log_socket_buffers(transports: &[TransportKind]) {
    use crate::punch::buffers::{describe, plan, Kind};
    for (transport, kind) in [
        (TransportKind::Tcp, Kind::Tcp),
        (TransportKind::Quic, Kind::Udp),
    ] {
        if !transports.contains(&transport) {
            continue;
        }
        for (enough, line) in describe(kind, plan(kind)) {
            if enough {
                info!("{line}");
            } else {
                warn!("{line}");
            }
        }
    }
}

/// The QUIC endpoint on the punch port number, when `quic` is among the
/// transports. Failing to bind it costs the QUIC path, not the daemon.
fn bind_quic(cfg: &PeerConfig, identity: &Identity) -> Option<Arc<QuicPath>> {
    if !cfg.punch.transports.contains(&TransportKind::Quic) {
        return None;
    }
    let keys: Vec<_> = cfg.peers.iter().map(|p| p.public_key).collect();
    let keepalive = (cfg.punch.keepalive_interval, cfg.punch.keepalive_timeout);
    match QuicPath::bind(
        cfg.punch.port,
        identity,
        &keys,
        keepalive,
        cfg.punch.quic_congestion,
    ) {
        Ok(q) => Some(Arc::new(q)),
        Err(e) => {
            warn!(error = %e, "QUIC path unavailable; punching over TCP only");
            None
        }
    }
}

/// Routes one rendezvous event. A punch order must name a configured peer
/// *and* carry the key we pinned for it; anything else is refused here,
/// before a single packet is sent.
async fn dispatch(ev: RvEvent, peers: &Peers) {
    match ev {
        RvEvent::Up => {
            for (handle, _) in peers.values() {
                handle.send(PeerCmd::RendezvousUp).await;
            }
        }
        RvEvent::Punch(job) => {
            let name = job.order.peer.clone();
            match peers.get(&name) {
                Some((handle, key)) if key.to_base64() == job.order.public_key => {
                    handle.send(PeerCmd::Punch(job)).await
                }
                Some(_) => {
                    warn!(peer = %name, "punch order carries a key other than the one in [[peers]]; refusing (impostor, or the peer changed keys: update public_key)")
                }
                None => {
                    warn!(peer = %name, "punch order from a peer not in [[peers]]; refusing (add it to [[peers]] to allow it)")
                }
            }
        }
        RvEvent::Aborted { session, peer } => {
            if let Some((handle, _)) = peers.get(&peer) {
                handle.send(PeerCmd::Abort(session)).await;
            }
        }
        RvEvent::Refused { code, message } => {
            warn!(code = code.as_str(), %message, "rendezvous refused a request")
        }
    }
}
