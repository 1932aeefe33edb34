//! The axum rendezvous server.
//!
//! Tasks and what flows between them:
//! - the accept loop (one, [`accept`]: connection caps and the HTTP
//!   header timeout), whose axum router upgrades `/v1/ws` and
//!   `/v1/relay/{session}` requests and answers `/healthz` and `/metrics`;
//! - one `connection` task per daemon: it owns the WebSocket, checks the
//!   signed hello, registers the daemon in the `store` and its outbox in
//!   `local`; then it turns the daemon's messages into store operations
//!   (connect → a session and two punch orders addressed by name, result →
//!   a report) and writes what arrives in its outbox (punch orders, aborts)
//!   to the socket;
//! - one `relay` task per relayed side: the store checks its token and
//!   pairs it with the other side of the session; the first side waits for
//!   the second's socket (a oneshot in `local`), then pumps their
//!   (end-to-end encrypted) bytes;
//! - one `udp` task owns the observation socket: a signed probe, checked
//!   against the store, records the daemon's UDP endpoint there.
//!
//! The store seam: `store::Store` holds what could be shared between
//! instances (registrations, sessions, relay pairing), as async, fallible
//! data-only operations; `store::MemoryStore` is the default. What only
//! this process can hold (outboxes, replacement signals, rate buckets,
//! waiting relay sockets, relay slots) is in `local::Local`, keyed by
//! connection id. Connection code never touches either's fields.
//!
//! Everything stops through one `CancellationToken`: the accept loop stops
//! accepting, each connection tells its daemon `shutting_down` and closes,
//! and [`run`] returns when all of them have.
//!
//! Imports run one way (`tests/layering.rs` checks it): the handlers
//! (`connection`, `relay`, `udp`) use `store`, `local`, `metrics`, `auth`
//! and `ratelimit`; `store` uses only `auth` and `lock`, `local` only
//! `store`'s types, `lock` and `ratelimit`.

mod accept;
mod auth;
pub mod bind;
mod cluster;
mod connection;
mod ipv6;
mod lan;
mod local;
mod lock;
mod metrics;
mod observe;
mod ratelimit;
mod relay;
mod store;
mod trust;
mod udp;

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use axum::extract::{ConnectInfo, State, WebSocketUpgrade};
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Extension, Router};
use punch_config::RendezvousConfig;
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use metrics::Metrics;
pub use trust::{create_key, load_key, Trust, TrustError};

/// State shared by every handler and connection task.
#[derive(Debug)]
pub(crate) struct Shared {
    /// The configuration; its token and limits change on a reload, so
    /// read it through [`Shared::cfg`] each time.
    live: LiveConfig,
    /// Registrations, sessions and relay pairing (data only).
    pub(crate) store: Arc<dyn Store>,
    /// The same store when it is the shared one (`redis`): health,
    /// metrics and its tasks.
    pub(crate) cluster: Option<Arc<RedisStore>>,
    /// This process's handles: outboxes, rate buckets, relay sockets.
    pub(crate) local: Local,
    pub(crate) metrics: Metrics,
    /// Server-wide shutdown.
    pub(crate) cancel: CancellationToken,
    /// Tracks connection tasks so shutdown can wait for them.
    pub(crate) tracker: TaskTracker,
    /// Ids for daemon connections and relay joiners, unique in this process.
    pub(crate) next_conn_id: AtomicU64,
    /// The UDP observation port daemons are told about, if one is bound.
    pub(crate) udp_port: Option<u16>,
    /// NAT discovery's second endpoint (`observe_port`), if bound.
    pub(crate) observe_port: Option<u16>,
    /// NAT discovery answers, for `/metrics`.
    pub(crate) observe: observe::Counters,
    /// Signs every punch order (daemons may pin its public key).
    pub(crate) key: ed25519_dalek::SigningKey,
    /// Connection counts behind `max_connections` and `max_http_per_ip`.
    pub(crate) gate: accept::Gate,
    /// `relay_total_bytes_per_second`, shared by every relay.
    pub(crate) relay_budget: relay::GlobalBudget,
}

use local::Local;
use store::{MemoryStore, RedisStore, Store};

impl Shared {
    /// The configuration now in force.
    pub(crate) fn cfg(&self) -> Arc<RendezvousConfig> {
        self.live.get()
    }
}

/// A running server's configuration, shared with whoever reloads it
/// (`punch-rendezvous` on `SIGHUP`). A reload changes the network token
/// and the `[limits]`: new connections and checks see them at once,
/// connections already registered stay. Everything else (listen
/// addresses, TLS, the key, the UDP endpoint, the relay's global budget)
/// is bound at start and changes only with a restart.
#[derive(Debug, Clone)]
pub struct LiveConfig(Arc<std::sync::RwLock<Arc<RendezvousConfig>>>);

impl LiveConfig {
    /// Wraps the configuration a server starts with.
    pub fn new(mut cfg: RendezvousConfig) -> Self {
        cfg.limits.max_connections = accept::connection_cap(cfg.limits.max_connections);
        Self(Arc::new(std::sync::RwLock::new(Arc::new(cfg))))
    }

    /// The configuration now in force.
    pub fn get(&self) -> Arc<RendezvousConfig> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Takes `new`'s token and limits; the rest stays as started.
    pub fn reload(&self, new: &RendezvousConfig) {
        let mut next = (*self.get()).clone();
        next.token.clone_from(&new.token);
        next.limits = new.limits.clone();
        next.limits.max_connections = accept::connection_cap(next.limits.max_connections);
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(next);
    }
}

/// Serves the rendezvous on `listener` until `cancel` fires, then waits for
/// every connection task to finish. The key and certificate come from
/// `cfg` ([`Trust::from_config`]); use [`run_with`] to load them first and
/// report their errors apart.
pub async fn run(
    listener: TcpListener,
    cfg: RendezvousConfig,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let trust = Trust::from_config(&cfg).map_err(std::io::Error::other)?;
    run_with(listener, cfg, trust, cancel).await
}

/// [`run`] with the server's key and certificate already loaded.
pub async fn run_with(
    listener: TcpListener,
    cfg: RendezvousConfig,
    trust: Trust,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    run_live(listener, LiveConfig::new(cfg), trust, cancel).await
}

/// [`run_with`] on a configuration the caller can reload while it runs.
pub async fn run_live(
    listener: TcpListener,
    live: LiveConfig,
    trust: Trust,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    run_listeners(vec![listener], live, trust, cancel).await
}

/// Every socket a server serves on, bound before it starts: the HTTP
/// listeners, the UDP observation sockets and NAT discovery's second
/// endpoint. [`Bound::bind`] binds what the configuration asks for beside
/// the listeners; [`Bound::new`] takes sockets the caller already holds (a
/// test harness that wants free ports binds them itself with
/// [`bind::same_port`], so no other process can take one in between).
pub struct Bound {
    listeners: Vec<TcpListener>,
    udp: Vec<UdpSocket>,
    observe: Option<observe::Sockets>,
}

impl Bound {
    /// The UDP observation socket beside each listener (or `udp_listen`),
    /// and `observe_port` beside the first listener (IPv4 in the usual
    /// dual-stack setup; discovery is IPv4-only for now).
    pub fn bind(listeners: Vec<TcpListener>, cfg: &RendezvousConfig) -> std::io::Result<Self> {
        let Some(listener) = listeners.first() else {
            return Err(std::io::Error::other("no listen address"));
        };
        let mut udp = Vec::new();
        if cfg.udp_listen.is_some() {
            udp.extend(bind_udp(listener, cfg)?);
        } else {
            for l in &listeners {
                udp.extend(bind_udp(l, cfg)?);
            }
        }
        let observe = observe::bind(listener.local_addr()?, cfg.observe_port)?;
        Ok(Self {
            listeners,
            udp,
            observe,
        })
    }

    /// Sockets already bound: `listeners` (at least one), their UDP
    /// observation sockets, and NAT discovery's second endpoint (a TCP
    /// listener and a UDP socket on one port) or none.
    pub fn new(
        listeners: Vec<TcpListener>,
        udp: Vec<UdpSocket>,
        observe: Option<(TcpListener, UdpSocket)>,
    ) -> Self {
        Self {
            listeners,
            udp,
            observe: observe.map(|(tcp, udp)| observe::Sockets::new(tcp, udp)),
        }
    }

    /// NAT discovery's second port, if it has one.
    pub fn observe_port(&self) -> Option<u16> {
        self.observe.as_ref().and_then(observe::Sockets::port)
    }
}

/// [`run_live`] on several listeners (`listen` as a list, e.g. one IPv4
/// and one IPv6 socket from [`bind::tcp_all`]): one accept loop each, one
/// registry, and a UDP observation socket beside each listener.
pub async fn run_listeners(
    listeners: Vec<TcpListener>,
    live: LiveConfig,
    trust: Trust,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let bound = Bound::bind(listeners, &live.get())?;
    run_bound(bound, live, trust, cancel).await
}

/// Serves on sockets already bound ([`Bound`]) until `cancel` fires.
pub async fn run_bound(
    bound: Bound,
    live: LiveConfig,
    trust: Trust,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let cfg = live.get();
    let Bound {
        listeners,
        udp: udps,
        observe: observe_sockets,
    } = bound;
    if listeners.is_empty() {
        return Err(std::io::Error::other("no listen address"));
    }
    let udp = udps.first();
    let cluster = match (&cfg.redis, &cfg.public_url) {
        (Some(url), Some(public_url)) => Some(Arc::new(
            RedisStore::new(url.expose(), public_url)
                .map_err(|e| std::io::Error::other(format!("redis: {e}")))?,
        )),
        _ => None,
    };
    let store: Arc<dyn Store> = match &cluster {
        Some(c) => c.clone(),
        None => Arc::new(MemoryStore::default()),
    };
    let shared = Arc::new(Shared {
        udp_port: udp.and_then(|s| s.local_addr().ok()).map(|a| a.port()),
        observe_port: observe_sockets.as_ref().and_then(observe::Sockets::port),
        observe: observe::Counters::default(),
        relay_budget: relay::GlobalBudget::new(cfg.limits.relay_total_bytes_per_second),
        live,
        store,
        cluster: cluster.clone(),
        local: Local::default(),
        metrics: Metrics::default(),
        cancel: cancel.clone(),
        tracker: TaskTracker::new(),
        next_conn_id: AtomicU64::new(1),
        key: trust.key.clone(),
        gate: accept::Gate::default(),
    });
    let app = Router::new()
        .route("/v1/ws", get(ws_handler))
        .route("/v1/relay/{session}", get(relay::handler))
        .route("/healthz", get(cluster::healthz))
        .route("/metrics", get(metrics_handler))
        .route("/v1/observe", get(observe::http_handler))
        .with_state(shared.clone());
    for l in &listeners {
        if let Ok(addr) = l.local_addr() {
            let scheme = if trust.tls.is_some() { "https" } else { "http" };
            tracing::info!(%addr, scheme, server_key = %trust.public_key(), "rendezvous listening (daemons may pin server_key)");
        }
    }
    if let Some(store) = cluster {
        tracing::info!(instance = store.instance(), "registry shared through redis");
        cluster::spawn(&shared, store);
    }
    for socket in udps {
        shared.tracker.spawn(udp::serve(socket, shared.clone()));
    }
    if let Some(sockets) = observe_sockets {
        shared
            .tracker
            .spawn(observe::serve(sockets, shared.clone()));
    }
    let loops = listeners
        .into_iter()
        .map(|l| accept::serve(l, trust.tls.clone(), app.clone(), shared.clone()));
    let result = futures::future::try_join_all(loops).await.map(|_| ());
    shared.tracker.close();
    shared.tracker.wait().await;
    tracing::info!("rendezvous stopped");
    result
}

/// The UDP observation socket: `udp_listen` if configured (failing to bind
/// it is an error), else the TCP listener's own address over UDP, and if
/// that port is taken over UDP, a warning and no QUIC candidates.
fn bind_udp(listener: &TcpListener, cfg: &RendezvousConfig) -> std::io::Result<Option<UdpSocket>> {
    if let Some(addr) = cfg.udp_listen {
        return bind::udp(addr).map(Some);
    }
    let addr = listener.local_addr()?;
    match bind::udp(addr) {
        Ok(s) => Ok(Some(s)),
        Err(e) => {
            tracing::warn!(%addr, error = %e, "cannot bind the UDP observation endpoint; daemons will have no QUIC path (set udp_listen to another port)");
            Ok(None)
        }
    }
}

async fn ws_handler(
    ws: WebSocketUpgrade,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    permit: Option<accept::ConnPermit>,
    State(shared): State<Arc<Shared>>,
) -> impl IntoResponse {
    let max = shared.cfg().limits.max_message_bytes;
    let tracker = shared.tracker.clone();
    // Small buffers: a registered daemon sends a few hundred bytes a minute,
    // and thousands of them stay connected at once.
    ws.max_message_size(max)
        .max_frame_size(max)
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_write_buffer_size(4 * max)
        .on_upgrade(move |socket| {
            // The socket keeps its place in `max_connections` while it lives.
            let permit = permit.map(|Extension(p)| p);
            if let Some(p) = &permit {
                p.upgraded();
            }
            tracker.track_future(async move {
                connection::serve(socket, addr, shared).await;
                drop(permit);
            })
        })
}

async fn metrics_handler(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            punch_service::prometheus::CONTENT_TYPE,
        )],
        match &shared.cluster {
            Some(store) => shared.metrics.render() + &cluster::render(store),
            None => shared.metrics.render(),
        } + &shared.observe.render(),
    )
}
