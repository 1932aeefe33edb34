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

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::VerifyingKey;
use punch_config::{PeerConfig, Protocol, Secret, TransportKind};
use punch_service::secret_file;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
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
use crate::peer::{self, PeerCmd, PeerContext, PeerHandle};
use crate::quic::QuicPath;

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
    /// Where each `[[forward]]` listens, in config order.
    pub forward_addrs: Vec<SocketAddr>,
    /// Live status.
    pub status: Arc<StatusBoard>,
    /// The admin token file, removed at shutdown.
    pub admin_token_file: std::path::PathBuf,
    /// Stops the forward listeners only (the first step of a graceful stop).
    accepting: CancellationToken,
    cancel: CancellationToken,
    tracker: TaskTracker,
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
}

async fn bind(what: &str, addr: &str) -> Result<TcpListener, DaemonError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| DaemonError::Bind {
            what: what.to_owned(),
            addr: addr.to_owned(),
            source,
        })
}

/// Peers by name, with the key pinned for each.
type Peers = HashMap<String, (PeerHandle, punch_config::PublicKeyBytes)>;

/// A bound `[[forward]]`: a TCP listener or a UDP socket.
enum Listener {
    Tcp(TcpListener),
    Udp(tokio::net::UdpSocket),
}

/// The bound forward listeners, in config order.
struct Forwards {
    listeners: Vec<Listener>,
    addrs: Vec<SocketAddr>,
    status: Vec<Arc<ForwardStatus>>,
}

/// Starts a daemon for `cfg` with `identity`. Listeners are bound before
/// this returns, so their addresses are known and errors are immediate.
pub async fn start(
    cfg: PeerConfig,
    identity: Identity,
    cancel: CancellationToken,
) -> Result<RunningDaemon, DaemonError> {
    let own_key = identity.public_key();
    if let Some(p) = cfg.peers.iter().find(|p| p.public_key == own_key) {
        return Err(DaemonError::SelfPeer(p.name.to_string()));
    }
    let endpoint = Endpoint::new(&cfg.rendezvous.url, cfg.rendezvous.ca_file.as_deref())?;
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
    let forwards = bind_forwards(&cfg).await?;
    let peer_status: Vec<_> = cfg
        .peers
        .iter()
        .map(|p| Arc::new(PeerStatus::new(p.name.as_str())))
        .collect();
    let board = Arc::new(StatusBoard::new(
        cfg.name.as_str(),
        peer_status.clone(),
        forwards.status.clone(),
    ));

    let quic = bind_quic(&cfg, &identity);
    let (rv_cmd_tx, rv_cmd_rx) = mpsc::channel(64);
    let (rv_ev_tx, rv_ev_rx) = mpsc::channel(64);
    let (peers, quic_routes) = spawn_peers(
        &cfg,
        &identity,
        &peer_status,
        quic.as_ref(),
        (&endpoint, &rv_cmd_tx),
        &cancel,
        &tracker,
    )?;
    let forward_addrs = forwards.addrs.clone();
    spawn_forwards(&cfg, forwards, &peers, &accepting, &cancel, &tracker);
    if let Some(q) = &quic {
        board.set_quic_endpoint(q.endpoint().clone());
        tracker.spawn(
            q.clone()
                .accept_loop(quic_routes, cancel.clone(), tracker.clone())
                .instrument(tracing::info_span!("quic")),
        );
    }
    let settings = RvSettings {
        endpoint,
        token,
        server_key,
        name: cfg.name.to_string(),
        identity: identity.clone(),
        port: cfg.punch.port,
        local_candidates: cfg.punch.local_candidates,
        quic: quic.clone(),
    };
    tracker.spawn(
        control::run(settings, rv_ev_tx, rv_cmd_rx, board.clone(), cancel.clone())
            .instrument(tracing::info_span!("rendezvous")),
    );
    let (admin_tx, admin_rx) = mpsc::channel(16);
    tracker.spawn(route(rv_ev_rx, admin_rx, peers, cancel.clone()));
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
        accepting,
        cancel,
        tracker,
    })
}

fn local_addr(l: &TcpListener, what: &str, addr: &str) -> Result<SocketAddr, DaemonError> {
    l.local_addr().map_err(|source| DaemonError::Bind {
        what: what.to_owned(),
        addr: addr.to_owned(),
        source,
    })
}

/// Binds every `[[forward]]` listener, so a busy port fails the start.
async fn bind_forwards(cfg: &PeerConfig) -> Result<Forwards, DaemonError> {
    let mut out = Forwards {
        listeners: Vec::new(),
        addrs: Vec::new(),
        status: Vec::new(),
    };
    for f in &cfg.forward {
        let what = format!("forward to {}/{}", f.peer, f.service);
        let (l, addr) = match f.protocol {
            Protocol::Tcp => {
                let l = bind(&what, &f.listen).await?;
                let addr = local_addr(&l, &what, &f.listen)?;
                (Listener::Tcp(l), addr)
            }
            Protocol::Udp => {
                let what = format!("UDP {what}");
                let err = |source| DaemonError::Bind {
                    what: what.clone(),
                    addr: f.listen.clone(),
                    source,
                };
                let s = tokio::net::UdpSocket::bind(&f.listen).await.map_err(err)?;
                forward::udp::enlarge_buffer(&s);
                let addr = s.local_addr().map_err(err)?;
                (Listener::Udp(s), addr)
            }
        };
        out.addrs.push(addr);
        let status = ForwardStatus::new(&addr.to_string(), f.peer.as_str(), f.service.as_str());
        out.status.push(Arc::new(match f.protocol {
            Protocol::Tcp => status,
            Protocol::Udp => status.udp(),
        }));
        out.listeners.push(l);
    }
    Ok(out)
}

/// One task per `[[peers]]` entry; also the routes that hand incoming
/// QUIC connections to the peer that made them.
fn spawn_peers(
    cfg: &PeerConfig,
    identity: &Identity,
    peer_status: &[Arc<PeerStatus>],
    quic: Option<&Arc<QuicPath>>,
    // The rendezvous: where it is (for the relay) and its client's inbox.
    (endpoint, rendezvous): (&Endpoint, &mpsc::Sender<control::RvCmd>),
    cancel: &CancellationToken,
    tracker: &TaskTracker,
) -> Result<
    (
        Peers,
        HashMap<punch_config::PublicKeyBytes, mpsc::Sender<quinn::Connection>>,
    ),
    DaemonError,
> {
    let own_key = identity.public_key();
    let exposes = Arc::new(cfg.expose.clone());
    let mut quic_routes = HashMap::new();
    let mut peers = Peers::new();
    for (p, status) in cfg.peers.iter().zip(peer_status) {
        let Some(role) = Role::choose(&own_key.0, &p.public_key.0) else {
            return Err(DaemonError::SelfPeer(p.name.to_string()));
        };
        // Only the higher key accepts QUIC (the lower dials); connections
        // from this peer reach its task through this channel.
        let (incoming_tx, incoming_rx) = mpsc::channel(4);
        if role == Role::Server && quic.is_some() {
            quic_routes.insert(p.public_key, incoming_tx);
        }
        let ctx = PeerContext {
            identity: identity.clone(),
            name: p.name.to_string(),
            key: p.public_key,
            role,
            initiator: cfg.forward.iter().any(|f| f.peer == p.name),
            punch_timeout: cfg.punch.timeout,
            mode: cfg.punch.mode,
            relay_endpoint: endpoint.clone(),
            keepalive: (cfg.punch.keepalive_interval, cfg.punch.keepalive_timeout),
            exposes: exposes.clone(),
            status: status.clone(),
            rendezvous: rendezvous.clone(),
            transports: cfg.punch.transports.clone(),
            quic: quic.cloned(),
            quic_incoming: tokio::sync::Mutex::new(incoming_rx),
        };
        let handle = peer::spawn(ctx, cancel.clone(), tracker);
        peers.insert(p.name.to_string(), (handle, p.public_key));
    }
    Ok((peers, quic_routes))
}

/// One accept loop per `[[forward]]`, into its peer's task.
fn spawn_forwards(
    cfg: &PeerConfig,
    forwards: Forwards,
    peers: &Peers,
    accepting: &CancellationToken,
    cancel: &CancellationToken,
    tracker: &TaskTracker,
) {
    for ((f, listener), status) in cfg
        .forward
        .iter()
        .zip(forwards.listeners)
        .zip(&forwards.status)
    {
        if let Some((handle, _)) = peers.get(f.peer.as_str()) {
            let span = tracing::info_span!("forward", listen = %status.listen.lock().map(|l| l.clone()).unwrap_or_default(), peer = %f.peer, service = %f.service, protocol = f.protocol.as_str());
            match listener {
                Listener::Tcp(listener) => tracker.spawn(
                    forward::run_forward(
                        listener,
                        handle.clone(),
                        f.service.to_string(),
                        status.clone(),
                        accepting.clone(),
                        cancel.clone(),
                        tracker.clone(),
                    )
                    .instrument(span),
                ),
                Listener::Udp(socket) => tracker.spawn(
                    forward::udp::run_udp_forward(
                        socket,
                        handle.clone(),
                        f.service.to_string(),
                        status.clone(),
                        accepting.clone(),
                        cancel.clone(),
                        tracker.clone(),
                    )
                    .instrument(span),
                ),
            };
        }
    }
}

/// Routes rendezvous events and admin requests to the peer tasks.
async fn route(
    mut rendezvous: mpsc::Receiver<RvEvent>,
    mut admin: mpsc::Receiver<AdminCmd>,
    peers: Peers,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            ev = rendezvous.recv() => match ev {
                Some(ev) => dispatch(ev, &peers).await,
                None => break,
            },
            Some(AdminCmd::Repunch(name)) = admin.recv() => {
                if let Some((handle, _)) = peers.get(&name) {
                    handle.send(PeerCmd::Repunch).await;
                }
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
