//! The axum rendezvous server.
//!
//! Tasks and what flows between them:
//! - the axum accept loop (one), which upgrades `/v1/ws` requests;
//! - one [`connection`] task per daemon: it owns the WebSocket, checks the
//!   signed hello, then relays between the socket and the [`registry`]
//!   (punch orders for this daemon arrive on a bounded channel);
//! - one [`relay`] task per relayed session: it pairs the two sides of a
//!   punch session and pumps their (end-to-end encrypted) bytes;
//! - `/healthz` and `/metrics` are plain handlers over shared state.
//!
//! Everything stops through one `CancellationToken`: the accept loop stops
//! accepting, each connection tells its daemon `shutting_down` and closes,
//! and [`run`] returns when all of them have.

mod connection;
mod metrics;
mod ratelimit;
mod registry;
mod relay;
mod udp;

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::extract::{ConnectInfo, State, WebSocketUpgrade};
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::serve::ListenerExt as _;
use axum::Router;
use punch_config::RendezvousConfig;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use metrics::Metrics;

/// State shared by every handler and connection task.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) cfg: RendezvousConfig,
    pub(crate) registry: Mutex<Registry>,
    pub(crate) metrics: Metrics,
    /// Server-wide shutdown.
    pub(crate) cancel: CancellationToken,
    /// Tracks connection tasks so shutdown can wait for them.
    pub(crate) tracker: TaskTracker,
    pub(crate) next_conn_id: AtomicU64,
    /// The UDP observation port daemons are told about, if one is bound.
    pub(crate) udp_port: Option<u16>,
}

use registry::Registry;

impl Shared {
    /// The registry lock. A panic while holding it would poison it; the data
    /// is still consistent map operations, so keep serving.
    pub(crate) fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Serves the rendezvous on `listener` until `cancel` fires, then waits for
/// every connection task to finish.
pub async fn run(
    listener: TcpListener,
    cfg: RendezvousConfig,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let udp = bind_udp(&listener, &cfg).await?;
    let shared = Arc::new(Shared {
        udp_port: udp
            .as_ref()
            .and_then(|s| s.local_addr().ok())
            .map(|a| a.port()),
        cfg,
        registry: Mutex::default(),
        metrics: Metrics::default(),
        cancel: cancel.clone(),
        tracker: TaskTracker::new(),
        next_conn_id: AtomicU64::new(1),
    });
    let app = Router::new()
        .route("/v1/ws", get(ws_handler))
        .route("/v1/relay/{session}", get(relay::handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics_handler))
        .with_state(shared.clone());
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "rendezvous listening");
    }
    if let Some(socket) = udp {
        shared.tracker.spawn(udp::serve(socket, shared.clone()));
    }
    // Punch orders are small and time-critical: no Nagle delay.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let result = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(cancel.clone().cancelled_owned())
    .await;
    shared.tracker.close();
    shared.tracker.wait().await;
    tracing::info!("rendezvous stopped");
    result
}

/// The UDP observation socket: `udp_listen` if configured (failing to bind
/// it is an error), else the TCP listener's own address over UDP, and if
/// that port is taken over UDP, a warning and no QUIC candidates.
async fn bind_udp(
    listener: &TcpListener,
    cfg: &RendezvousConfig,
) -> std::io::Result<Option<tokio::net::UdpSocket>> {
    if let Some(addr) = cfg.udp_listen {
        return tokio::net::UdpSocket::bind(addr).await.map(Some);
    }
    let addr = listener.local_addr()?;
    match tokio::net::UdpSocket::bind(addr).await {
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
    State(shared): State<Arc<Shared>>,
) -> impl IntoResponse {
    let max = shared.cfg.limits.max_message_bytes;
    let tracker = shared.tracker.clone();
    // Small buffers: a registered daemon sends a few hundred bytes a minute,
    // and thousands of them stay connected at once.
    ws.max_message_size(max)
        .max_frame_size(max)
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_write_buffer_size(4 * max)
        .on_upgrade(move |socket| tracker.track_future(connection::serve(socket, addr, shared)))
}

async fn metrics_handler(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        shared.metrics.render(),
    )
}
