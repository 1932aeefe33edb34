//! A tunnel: an authenticated, encrypted connection to one peer that
//! carries many streams, each with its own flow control. Two kinds, one
//! interface (open a stream, receive inbound streams, close):
//!
//! - over a byte transport (a punched TCP connection or the rendezvous
//!   relay): [`handshake`] runs mutual TLS 1.3 and starts yamux on top. The
//!   driver future owns the yamux connection and is the only code that
//!   touches it: opening a stream is a request on a channel, inbound
//!   streams come out of another;
//! - over QUIC: [`from_quic`] wraps an authenticated quinn connection;
//!   streams map one-to-one onto QUIC streams, and the driver accepts them.
//!
//! The port relay only sees [`StreamIo`] and never knows which it runs on.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use punch_config::PublicKeyBytes;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt as _, TokioAsyncReadCompatExt as _};
use tokio_util::sync::CancellationToken;

use quinn::VarInt;

use crate::identity::Identity;
use crate::punch::plan::Role;
use crate::status::{PeerStatus, Transport};
use crate::tls;

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
    Mux(Compat<yamux::Stream>),
    Quic {
        send: quinn::SendStream,
        recv: quinn::RecvStream,
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
    fn new(stream: yamux::Stream, active: &Arc<AtomicUsize>) -> Self {
        Self {
            inner: StreamKind::Mux(stream.compat()),
            active: Some(ActiveGuard::new(active)),
        }
    }

    fn quic(send: quinn::SendStream, recv: quinn::RecvStream, active: &Arc<AtomicUsize>) -> Self {
        Self {
            inner: StreamKind::Quic { send, recv },
            active: Some(ActiveGuard::new(active)),
        }
    }

    /// Stops counting this stream as user traffic (keepalive streams), so
    /// it does not hold a draining tunnel open.
    pub(crate) fn uncount(&mut self) {
        self.active = None;
    }
}

impl AsyncRead for StreamIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match &mut self.inner {
            StreamKind::Mux(s) => Pin::new(s).poll_read(cx, buf),
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
            StreamKind::Mux(s) => Pin::new(s).poll_write(cx, data),
            StreamKind::Quic { send, .. } => AsyncWrite::poll_write(Pin::new(send), cx, data),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.inner {
            StreamKind::Mux(s) => Pin::new(s).poll_flush(cx),
            StreamKind::Quic { send, .. } => AsyncWrite::poll_flush(Pin::new(send), cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.inner {
            StreamKind::Mux(s) => Pin::new(s).poll_shutdown(cx),
            StreamKind::Quic { send, .. } => AsyncWrite::poll_shutdown(Pin::new(send), cx),
        }
    }
}

/// Buffer between TLS and the transport, each way. Without it every TLS
/// record (and every 12-byte yamux header, which TLS seals as a record of
/// its own) was a separate `writev`, and reads came in ~10 KB pieces; with
/// it a mux frame and its header leave in one system call and one read
/// drains many records. Measured in the lab bench: one stream 2.3–2.5 →
/// 3.0–3.1 Gbit/s, 64-byte round trip p50 232–273 → 159–204 µs. Writes
/// still leave at once: yamux flushes after every batch of frames, and the
/// flush goes through.
const IO_BUFFER: usize = 256 * 1024;

/// Most streams one tunnel carries at once (each side).
pub(crate) const MAX_STREAMS: usize = 1024;
/// Inbound streams waiting for a handler before new ones are refused.
const INBOUND_QUEUE: usize = 256;
/// Stream-open requests waiting for the driver.
const OPEN_QUEUE: usize = 256;
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

type OpenReply = oneshot::Sender<Result<StreamIo, TunnelError>>;

/// How a tunnel opens streams.
#[derive(Debug, Clone)]
enum Opener {
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
                // Waits for stream credit when MAX_STREAMS are open, like
                // yamux; the peer raises it as streams end.
                r = conn.open_bi() => r
                    .map(|(send, recv)| StreamIo::quic(send, recv, &self.active))
                    .map_err(|e| TunnelError::Quic(e.to_string())),
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
}

/// A fresh tunnel: its handle, its inbound streams and the driver that must
/// be polled (spawned) for anything to move.
pub(crate) struct TunnelParts {
    pub(crate) tunnel: Tunnel,
    pub(crate) inbound: mpsc::Receiver<StreamIo>,
    pub(crate) driver: Pin<Box<dyn Future<Output = ()> + Send>>,
}

fn mux_config() -> yamux::Config {
    let mut cfg = yamux::Config::default();
    cfg.set_max_num_streams(MAX_STREAMS);
    // Every stream may buffer its 256 KiB initial window; this bounds what a
    // peer can make us hold across all streams of one tunnel.
    cfg.set_max_connection_receive_window(Some(MAX_STREAMS * 256 * 1024));
    // Bigger frames than yamux's 16 KiB default mean fewer frame headers
    // and TLS records per byte: +45% (1 stream) and +62% (8 streams) in
    // the lab bench. 128 KiB helped one stream a little more but hurt
    // interleaving across 8 (BENCHMARKS.md).
    cfg.set_split_send_size(64 * 1024);

    cfg
}

/// Runs TLS (pinned to `peer`) and starts the multiplexer over `io`.
pub(crate) async fn handshake<S>(
    io: S,
    role: Role,
    identity: &Identity,
    peer: &PublicKeyBytes,
    transport: Transport,
) -> Result<TunnelParts, TunnelError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = tokio::io::BufStream::with_capacity(IO_BUFFER, IO_BUFFER, io);
    let tls_stream: tokio_rustls::TlsStream<_> = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        match role {
            Role::Client => {
                let connector =
                    tokio_rustls::TlsConnector::from(tls::client_config(identity, peer)?);
                let name = ServerName::try_from(tls::SERVER_NAME)
                    .map_err(|e| TunnelError::Tls(std::io::Error::other(e)))?;
                connector
                    .connect(name, io)
                    .await
                    .map(Into::into)
                    .map_err(TunnelError::Tls)
            }
            Role::Server => {
                let acceptor = tokio_rustls::TlsAcceptor::from(tls::server_config(identity, peer)?);
                acceptor
                    .accept(io)
                    .await
                    .map(Into::into)
                    .map_err(TunnelError::Tls)
            }
        }
    })
    .await
    .map_err(|_| TunnelError::HandshakeTimeout)??;
    let mode = match role {
        Role::Client => yamux::Mode::Client,
        Role::Server => yamux::Mode::Server,
    };
    let conn = yamux::Connection::new(tls_stream.compat(), mux_config(), mode);
    let (open_tx, open_rx) = mpsc::channel(OPEN_QUEUE);
    let (inbound_tx, inbound) = mpsc::channel(INBOUND_QUEUE);
    let closed = CancellationToken::new();
    let active = Arc::new(AtomicUsize::new(0));
    let driver = Box::pin(drive(
        conn,
        open_rx,
        inbound_tx,
        closed.clone(),
        active.clone(),
    ));
    Ok(TunnelParts {
        tunnel: Tunnel {
            opener: Opener::Mux(open_tx),
            closed,
            active,
            lost: Arc::default(),
            transport,
        },
        inbound,
        driver,
    })
}

/// Owns the yamux connection: serves open requests, hands out inbound
/// streams, and keeps the connection polled (yamux only makes progress while
/// `poll_next_inbound` is being called).
async fn drive<T>(
    mut conn: yamux::Connection<T>,
    mut open_rx: mpsc::Receiver<OpenReply>,
    inbound_tx: mpsc::Sender<StreamIo>,
    closed: CancellationToken,
    active: Arc<AtomicUsize>,
) where
    T: futures::AsyncRead + futures::AsyncWrite + Unpin + Send,
{
    let mut pending: std::collections::VecDeque<OpenReply> = std::collections::VecDeque::new();
    let result: Result<(), yamux::ConnectionError> = tokio::select! {
        _ = closed.cancelled() => {
            let _ = tokio::time::timeout(Duration::from_secs(1), std::future::poll_fn(|cx| conn.poll_close(cx))).await;
            Ok(())
        }
        r = std::future::poll_fn(|cx| {
            while let Poll::Ready(Some(req)) = open_rx.poll_recv(cx) {
                pending.push_back(req);
            }
            while !pending.is_empty() {
                match conn.poll_new_outbound(cx) {
                    Poll::Ready(Ok(stream)) => {
                        if let Some(reply) = pending.pop_front() {
                            let _ = reply.send(Ok(StreamIo::new(stream, &active)));
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => break,
                }
            }
            loop {
                match conn.poll_next_inbound(cx) {
                    Poll::Ready(Some(Ok(stream))) => {
                        // A full queue means handlers are not keeping up:
                        // dropping the stream resets it, and the peer's
                        // forward reports the refusal.
                        if inbound_tx.try_send(StreamIo::new(stream, &active)).is_err() {
                            tracing::warn!("inbound stream refused: handler queue full");
                        }
                    }
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                    Poll::Ready(None) => return Poll::Ready(Ok(())),
                    Poll::Pending => return Poll::Pending,
                }
            }
        }) => r,
    };
    match result {
        Ok(()) => tracing::debug!("tunnel closed"),
        Err(e) => tracing::info!(error = %e, "tunnel ended"),
    }
    for reply in pending.drain(..) {
        let _ = reply.send(Err(TunnelError::Closed));
    }
    closed.cancel();
}

/// A tunnel over an authenticated QUIC connection on `path`'s endpoint.
/// The driver accepts the peer's streams, keeps the status byte counters
/// current (QUIC has no byte stream to meter, so they come from quinn's
/// UDP counters, every 250 ms), closes the connection when the tunnel is
/// closed, and moves the endpoint to a fresh port if the path was lost.
pub(crate) fn from_quic(
    conn: quinn::Connection,
    status: Arc<PeerStatus>,
    path: Arc<crate::quic::QuicPath>,
) -> TunnelParts {
    let (inbound_tx, inbound) = mpsc::channel(INBOUND_QUEUE);
    let closed = CancellationToken::new();
    let active = Arc::new(AtomicUsize::new(0));
    let lost = Arc::new(AtomicBool::new(false));
    let driver = Box::pin(drive_quic(
        conn.clone(),
        inbound_tx,
        closed.clone(),
        active.clone(),
        lost.clone(),
        status,
        path,
    ));
    TunnelParts {
        tunnel: Tunnel {
            opener: Opener::Quic(conn),
            closed,
            active,
            lost,
            transport: Transport::Quic,
        },
        inbound,
        driver,
    }
}

async fn drive_quic(
    conn: quinn::Connection,
    inbound_tx: mpsc::Sender<StreamIo>,
    closed: CancellationToken,
    active: Arc<AtomicUsize>,
    lost: Arc<AtomicBool>,
    status: Arc<PeerStatus>,
    path: Arc<crate::quic::QuicPath>,
) {
    let live = path.live_tunnel();
    let mut metered = (0u64, 0u64);
    let mut meter = || {
        let s = conn.stats();
        let (rx, tx) = (s.udp_rx.bytes, s.udp_tx.bytes);
        status
            .bytes_in
            .fetch_add(rx.saturating_sub(metered.0), Ordering::Relaxed);
        status
            .bytes_out
            .fetch_add(tx.saturating_sub(metered.1), Ordering::Relaxed);
        metered = (rx, tx);
    };
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = closed.cancelled() => {
                conn.close(VarInt::from_u32(0), b"closed");
                break;
            }
            r = conn.accept_bi() => match r {
                Ok((send, recv)) => {
                    if inbound_tx.try_send(StreamIo::quic(send, recv, &active)).is_err() {
                        tracing::warn!("inbound stream refused: handler queue full");
                    }
                }
                Err(e) => {
                    tracing::info!(error = %e, "QUIC tunnel ended");
                    if matches!(e, quinn::ConnectionError::TimedOut) {
                        lost.store(true, Ordering::Relaxed);
                    }
                    break;
                }
            },
            _ = tick.tick() => meter(),
        }
    }
    meter();
    drop(live);
    if lost.load(Ordering::Relaxed) {
        path.rebind_after_lost_path().await;
    }
    closed.cancel();
}
