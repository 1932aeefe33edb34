//! A tunnel: an authenticated, encrypted connection to one peer that
//! carries many streams, each with its own flow control. Two kinds, one
//! interface (open a stream, receive inbound streams, close):
//!
//! - over a byte transport (a punched TCP connection or the rendezvous
//!   relay): [`mux::handshake`] runs mutual TLS 1.3 ([`tls`]) and starts
//!   yamux on top. The
//!   driver future owns the yamux connection and is the only code that
//!   touches it: opening a stream is a request on a channel, inbound
//!   streams come out of another;
//! - over QUIC: `quic::tunnel::from_quic` wraps an authenticated quinn
//!   connection; streams map one-to-one onto QUIC streams, and the driver
//!   accepts them. It lives with the QUIC path, so this module never
//!   imports `quic` (the QUIC path imports the tunnel, one way).
//!
//! Also here, because every path's tunnel needs them: the stream header
//! that opens each stream ([`header`]), the keepalive that measures RTT
//! and declares a path dead ([`keepalive`]), and byte metering
//! ([`metered`]).
//!
//! The port forwarder only sees [`StreamIo`] and never knows which it runs on.

pub(crate) mod datagram;
pub mod header;
pub(crate) mod keepalive;
pub(crate) mod metered;
pub(crate) mod mux;
pub(crate) mod tls;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt as _};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::path::Transport;

/// One multiplexed stream, as tokio I/O. While it lives it counts as an
/// active stream of its tunnel, so a tunnel being replaced can wait for its
/// streams to finish before it closes.
#[derive(Debug)]
pub(crate) struct StreamIo {
    inner: StreamKind,
    active: Option<ActiveGuard>,
}

/// Dropping a stream ends it the same way on both kinds: yamux sends its
/// FIN, quinn finishes the send side and stops the receive side.
#[derive(Debug)]
enum StreamKind {
    Mux {
        io: Compat<yamux::Stream>,
        /// Resolves when the tunnel closes. yamux wakes a stream's reader
        /// when its connection dies or is dropped while active, but not
        /// when it is dropped while closing: the driver's goodbye on a
        /// blackholed path (socket buffer full) times out in that state,
        /// and every reader then waited forever (the lab's blackhole cut:
        /// 4 of 4 downloads stalled 40 s after the keepalive had closed
        /// the tunnel). A read that would wait on a closed tunnel errors.
        closed: Pin<Box<WaitForCancellationFutureOwned>>,
        /// This stream's place among the handles the mux driver counts
        /// against [`MAX_STREAMS`] (every stream, keepalive included): the
        /// driver's own count, since yamux's is not exposed.
        _slot: ActiveGuard,
    },
    Quic {
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        /// The connection and its datagram routes, for a UDP flow's
        /// datagrams ([`StreamIo::datagram_link`]).
        conn: quinn::Connection,
        routes: DatagramRoutes,
    },
}

#[derive(Debug)]
struct ActiveGuard(Arc<AtomicUsize>);

impl ActiveGuard {
    fn new(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter.clone())
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl StreamIo {
    pub(super) fn new(
        stream: yamux::Stream,
        (active, slots): (&Arc<AtomicUsize>, &Arc<AtomicUsize>),
        closed: &CancellationToken,
    ) -> Self {
        Self {
            inner: StreamKind::Mux {
                io: stream.compat(),
                closed: Box::pin(closed.clone().cancelled_owned()),
                _slot: ActiveGuard::new(slots),
            },
            active: Some(ActiveGuard::new(active)),
        }
    }

    pub(crate) fn quic(
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        active: &Arc<AtomicUsize>,
        conn: &quinn::Connection,
        routes: &DatagramRoutes,
    ) -> Self {
        Self {
            inner: StreamKind::Quic {
                send,
                recv,
                conn: conn.clone(),
                routes: routes.clone(),
            },
            active: Some(ActiveGuard::new(active)),
        }
    }

    /// On a QUIC tunnel whose peer takes datagrams: a link that carries
    /// this stream's UDP flow as QUIC datagrams, named by this stream's id
    /// (`forward/udp/wire.rs`). Received datagrams wait in a queue of
    /// `queue`; beyond it they are dropped and counted in `drops`. `None`
    /// on the other paths: the flow's datagrams go on the stream.
    pub(crate) fn datagram_link(
        &self,
        queue: usize,
        drops: Arc<AtomicU64>,
    ) -> Option<DatagramLink> {
        let StreamKind::Quic {
            send, conn, routes, ..
        } = &self.inner
        else {
            return None;
        };
        conn.max_datagram_size()?;
        let id = u64::from(send.id());
        let (tx, rx) = mpsc::channel(queue.max(1));
        routes.lock().insert(id, (tx, drops));
        Some(DatagramLink {
            conn: conn.clone(),
            id,
            rx,
            routes: routes.clone(),
        })
    }

    /// Stops counting this stream as user traffic (keepalive streams), so
    /// it does not hold a draining tunnel open.
    pub(crate) fn uncount(&mut self) {
        self.active = None;
    }

    /// Ends the stream as cut, not finished: QUIC resets the send side and
    /// stops the receive side (the peer reads an error, never a clean
    /// finish). yamux 0.13 has no reset for a single stream: dropping it
    /// sends a FIN, which a forwarded stream's framing (no end marker,
    /// `forward/frame.rs`) reads as a cut all the same.
    pub(crate) fn abort(self) {
        if let StreamKind::Quic {
            mut send, mut recv, ..
        } = self.inner
        {
            let _ = send.reset(STREAM_CUT);
            let _ = recv.stop(STREAM_CUT);
        }
    }
}

impl AsyncRead for StreamIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match &mut self.inner {
            StreamKind::Mux { io, closed, .. } => match Pin::new(io).poll_read(cx, buf) {
                Poll::Pending if closed.as_mut().poll(cx).is_ready() => Poll::Ready(Err(
                    std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "tunnel closed"),
                )),
                other => other,
            },
            StreamKind::Quic { recv, .. } => Pin::new(recv).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for StreamIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match &mut self.inner {
            StreamKind::Mux { io, .. } => Pin::new(io).poll_write(cx, data),
            StreamKind::Quic { send, .. } => AsyncWrite::poll_write(Pin::new(send), cx, data),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.inner {
            StreamKind::Mux { io, .. } => Pin::new(io).poll_flush(cx),
            StreamKind::Quic { send, .. } => AsyncWrite::poll_flush(Pin::new(send), cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.inner {
            StreamKind::Mux { io, .. } => Pin::new(io).poll_shutdown(cx),
            StreamKind::Quic { send, .. } => AsyncWrite::poll_shutdown(Pin::new(send), cx),
        }
    }
}

/// A QUIC connection's datagram routes: flow (stream id) → its queue and
/// drop counter. The tunnel driver dispatches each datagram it reads.
#[derive(Debug, Clone, Default)]
pub(crate) struct DatagramRoutes(Arc<std::sync::Mutex<RouteMap>>);

/// A flow's queue and drop counter, by the id of its stream.
type RouteMap = HashMap<u64, (mpsc::Sender<bytes::Bytes>, Arc<AtomicU64>)>;

impl DatagramRoutes {
    fn lock(&self) -> std::sync::MutexGuard<'_, RouteMap> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Hands a received datagram to its flow. One that names no open flow
    /// (late, after the flow ended) or is malformed is dropped; one whose
    /// flow's queue is full is dropped and counted there.
    pub(crate) fn dispatch(&self, datagram: bytes::Bytes) {
        let Some((id, payload)) = datagram::parse_quic_datagram(datagram) else {
            return;
        };
        let routes = self.lock();
        if let Some((tx, drops)) = routes.get(&id) {
            if tx.try_send(payload).is_err() {
                drops.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// One UDP flow's QUIC datagrams (see [`StreamIo::datagram_link`]); its
/// route is removed when it is dropped.
#[derive(Debug)]
pub(crate) struct DatagramLink {
    conn: quinn::Connection,
    id: u64,
    rx: mpsc::Receiver<bytes::Bytes>,
    routes: DatagramRoutes,
}

impl DatagramLink {
    /// Sends `payload` as one QUIC datagram if the path takes one that
    /// large now; `false` if it must go on the stream instead. quinn's
    /// send buffer is bounded (1 MiB) and drops its oldest datagrams when
    /// full: loss, as UDP would have it, never growth.
    pub(crate) fn try_send(&self, payload: &[u8]) -> bool {
        use self::datagram::{quic_datagram, ID_PREFIX};
        let fits = self
            .conn
            .max_datagram_size()
            .is_some_and(|max| payload.len() + ID_PREFIX <= max);
        fits && self
            .conn
            .send_datagram(quic_datagram(self.id, payload))
            .is_ok()
    }

    /// The next datagram of this flow.
    pub(crate) async fn recv(&mut self) -> Option<bytes::Bytes> {
        self.rx.recv().await
    }
}

impl Drop for DatagramLink {
    fn drop(&mut self) {
        self.routes.lock().remove(&self.id);
    }
}

/// QUIC application error code for a stream cut before its end.
const STREAM_CUT: quinn::VarInt = quinn::VarInt::from_u32(1);

/// Most streams one tunnel carries at once (each side).
pub(crate) const MAX_STREAMS: usize = 1024;
/// Inbound streams waiting for a handler before new ones are refused: as
/// many as may be open at once, so a stream the mux admitted is never
/// refused for want of room (with 256, a burst of 1,000 streams over QUIC
/// had hundreds reset before the handler loop ran).
pub(crate) const INBOUND_QUEUE: usize = MAX_STREAMS;
/// Stream-open requests waiting for the driver: as many as may be open at
/// once (with 256, 1,000 local connections arriving together over TCP had
/// dozens refused as "tunnel busy").
pub(super) const OPEN_QUEUE: usize = MAX_STREAMS;
/// How long a new stream may wait for QUIC stream credit on a full tunnel.
pub(crate) const STREAM_CREDIT_WAIT: Duration = Duration::from_secs(10);
/// How long the TLS handshake may take.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a tunnel could not be set up or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TunnelError {
    /// TLS failed: wrong key, not punchd, or the connection broke.
    #[error("TLS handshake failed: {0}")]
    Tls(#[source] std::io::Error),
    /// TLS did not finish in time.
    #[error("TLS handshake timed out")]
    HandshakeTimeout,
    /// The TLS configuration could not be built.
    #[error(transparent)]
    Setup(#[from] tls::TlsSetupError),
    /// The multiplexer failed.
    #[error("multiplexer: {0}")]
    Mux(#[from] yamux::ConnectionError),
    /// The tunnel is closed.
    #[error("tunnel closed")]
    Closed,
    /// Too many stream-open requests are queued.
    #[error("tunnel busy: too many streams being opened")]
    Busy,
    /// The QUIC connection failed.
    #[error("QUIC: {0}")]
    Quic(String),
}

pub(super) type OpenReply = oneshot::Sender<Result<StreamIo, TunnelError>>;

/// How a tunnel opens streams.
#[derive(Debug, Clone)]
pub(super) enum Opener {
    /// Ask the yamux driver.
    Mux(mpsc::Sender<OpenReply>),
    /// quinn connections are shared handles: open directly.
    Quic(quinn::Connection),
}

/// A handle to a live tunnel. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Tunnel {
    opener: Opener,
    closed: CancellationToken,
    /// Streams in use (not counting keepalive).
    active: Arc<AtomicUsize>,
    /// Set when the tunnel is closed because its path stopped carrying
    /// packets (see [`Tunnel::close_lost`]).
    lost: Arc<AtomicBool>,
    /// What carries it.
    pub(crate) transport: Transport,
    /// UDP flows' datagram routes (QUIC only; empty otherwise).
    routes: DatagramRoutes,
}

impl Tunnel {
    /// Opens a new stream.
    pub(crate) async fn open(&self) -> Result<StreamIo, TunnelError> {
        match &self.opener {
            Opener::Mux(open_tx) => {
                let (tx, rx) = oneshot::channel();
                open_tx.try_send(tx).map_err(|e| match e {
                    mpsc::error::TrySendError::Full(_) => TunnelError::Busy,
                    mpsc::error::TrySendError::Closed(_) => TunnelError::Closed,
                })?;
                tokio::select! {
                    r = rx => r.unwrap_or(Err(TunnelError::Closed)),
                    _ = self.closed.cancelled() => Err(TunnelError::Closed),
                }
            }
            Opener::Quic(conn) => tokio::select! {
                // Waits for stream credit when MAX_STREAMS are open; the
                // peer raises it as streams end. Not forever: a connection
                // that finds the tunnel full is refused after a while,
                // like yamux's at once.
                r = tokio::time::timeout(STREAM_CREDIT_WAIT, conn.open_bi()) => match r {
                    Ok(r) => r
                        .map(|(send, recv)| {
                            StreamIo::quic(send, recv, &self.active, conn, &self.routes)
                        })
                        .map_err(|e| TunnelError::Quic(e.to_string())),
                    Err(_) => Err(TunnelError::Busy),
                },
                _ = self.closed.cancelled() => Err(TunnelError::Closed),
            },
        }
    }

    /// Closes the tunnel (the driver says goodbye and ends).
    pub(crate) fn close(&self) {
        self.closed.cancel();
    }

    /// Closes the tunnel because its path is dead (no keepalive answer).
    /// A QUIC tunnel's driver then also moves the UDP endpoint to a fresh
    /// port, as the old one's NAT mappings are suspect; TCP punches use
    /// fresh sockets anyway.
    pub(crate) fn close_lost(&self) {
        self.lost.store(true, Ordering::Relaxed);
        self.closed.cancel();
    }

    /// Resolves when the tunnel has closed, for whatever reason.
    pub(crate) async fn closed(&self) {
        self.closed.cancelled().await;
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Streams in use right now.
    pub(crate) fn active_streams(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// A handle for a QUIC connection; its driver lives with the QUIC
    /// path (`quic::tunnel`) and shares this handle's state.
    pub(crate) fn over_quic(conn: quinn::Connection) -> Self {
        Self {
            opener: Opener::Quic(conn),
            closed: CancellationToken::new(),
            active: Arc::default(),
            lost: Arc::default(),
            transport: Transport::Quic,
            routes: DatagramRoutes::default(),
        }
    }

    /// The datagram routes, for the QUIC driver.
    pub(crate) fn routes(&self) -> &DatagramRoutes {
        &self.routes
    }

    /// The active-stream counter, for streams a driver accepts.
    pub(crate) fn counter(&self) -> &Arc<AtomicUsize> {
        &self.active
    }

    /// Marks the path as lost (the driver saw it time out).
    pub(crate) fn mark_lost(&self) {
        self.lost.store(true, Ordering::Relaxed);
    }

    /// Whether the path was declared lost.
    pub(crate) fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Relaxed)
    }
}

/// A fresh tunnel: its handle, its inbound streams and the driver that must
/// be polled (spawned) for anything to move.
pub(crate) struct TunnelParts {
    pub(crate) tunnel: Tunnel,
    pub(crate) inbound: mpsc::Receiver<StreamIo>,
    pub(crate) driver: Pin<Box<dyn Future<Output = ()> + Send>>,
}
