//! The tunnel over a byte transport (a punched TCP connection, or the
//! relayed fallback): mutual TLS 1.3, then yamux, driven by one task that
//! owns the yamux connection.

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use punch_config::PublicKeyBytes;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_util::compat::TokioAsyncReadCompatExt as _;
use tokio_util::sync::CancellationToken;

use super::{
    tls, OpenReply, Opener, StreamIo, Tunnel, TunnelError, TunnelParts, HANDSHAKE_TIMEOUT,
    INBOUND_QUEUE, MAX_STREAMS, OPEN_QUEUE,
};
use crate::identity::Identity;
use crate::path::{Role, Transport};

/// Buffer between TLS and the transport, each way. Without it every TLS
/// record (and every 12-byte yamux header, which TLS seals as a record of
/// its own) was a separate `writev`, and reads came in ~10 KB pieces; with
/// it a mux frame and its header leave in one system call and one read
/// drains many records. Measured in the lab bench: one stream 2.3–2.5 →
/// 3.0–3.1 Gbit/s, 64-byte round trip p50 232–273 → 159–204 µs. Writes
/// still leave at once: yamux flushes after every batch of frames, and the
/// flush goes through.
const IO_BUFFER: usize = 256 * 1024;

/// Receive window a stream may grow into beyond yamux's fixed 256 KiB
/// initial credit, shared by all streams of one tunnel.
///
/// yamux 0.13 auto-tunes a stream's window toward the bandwidth-delay
/// product (it doubles it when the sender used half of it within two
/// round trips), but only out of `max_connection_receive_window` minus the
/// 256 KiB every one of `max_num_streams` streams is guaranteed. The old
/// setting left nothing to grow into, so every stream was capped at
/// 256 KiB: 256 KiB ÷ 40 ms = 52 Mbit/s, the figure `ss -ti` showed as an
/// `app_limited` tunnel socket in issue 18. 32 MiB lets one stream fill
/// 1.3 Gbit/s at 200 ms RTT.
pub(crate) const STREAM_WINDOW_POOL: usize = 32 * 1024 * 1024;

/// yamux's fixed initial credit per stream (its `DEFAULT_CREDIT`, from the
/// yamux specification).
pub(crate) const INITIAL_STREAM_WINDOW: usize = 256 * 1024;

/// What a peer can make one tunnel hold, each way, through the mux: the
/// initial window of every stream that may be open plus the shared growth
/// pool. One stream holds at most `INITIAL_STREAM_WINDOW +
/// STREAM_WINDOW_POOL` (32.25 MiB); a window only grows while its reader
/// keeps up, so a slow reader stays near its initial window.
pub(crate) const MUX_RECEIVE_BOUND: usize =
    MAX_STREAMS * INITIAL_STREAM_WINDOW + STREAM_WINDOW_POOL;

fn mux_config() -> yamux::Config {
    let mut cfg = yamux::Config::default();
    cfg.set_max_num_streams(MAX_STREAMS);
    cfg.set_max_connection_receive_window(Some(MUX_RECEIVE_BOUND));
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
            routes: Default::default(),
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
                            let _ = reply.send(Ok(StreamIo::new(stream, &active, &closed)));
                        }
                    }
                    // Every stream slot in use (both directions count): refuse
                    // this open, keep the tunnel. Ending the tunnel here cut
                    // every forward of the peer when 2,000 connections
                    // arrived at once.
                    Poll::Ready(Err(yamux::ConnectionError::TooManyStreams)) => {
                        if let Some(reply) = pending.pop_front() {
                            let _ = reply.send(Err(TunnelError::Busy));
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
                        if inbound_tx.try_send(StreamIo::new(stream, &active, &closed)).is_err() {
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
