//! The tunnel over a byte transport (a punched TCP connection, or the
//! relayed fallback): mutual TLS 1.3, then yamux, driven by one task that
//! owns the yamux connection.

use std::sync::atomic::{AtomicUsize, Ordering};
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

/// yamux's own stream cap, twice ours ([`MAX_STREAMS`]). yamux ends the
/// whole connection (a GoAway) when a peer opens a stream past its cap,
/// and each side counts only the handles it still holds: a stream the
/// opener has dropped (its local connection ended, or was refused) still
/// counts on the accepting side until that side's handler lets go. With
/// both caps equal, an opener within its own count could push the other
/// side over its cap in that gap, and a burst of 2,000 connections ended
/// the tunnel that way (issue #24; seen direct and relayed alike). So
/// the driver holds both directions to [`MAX_STREAMS`] by its own count
/// (opens beyond it refused as busy, inbound streams beyond it reset at
/// once), and yamux's cap only ends a peer that opens twice as many
/// streams as it could ever legitimately keep.
pub(crate) const MUX_STREAM_LIMIT: usize = 2 * MAX_STREAMS;

/// What a peer can make one tunnel hold, each way, through the mux: the
/// initial window of every stream the driver keeps ([`MAX_STREAMS`]) plus
/// the shared growth pool. One stream holds at most
/// `INITIAL_STREAM_WINDOW + STREAM_WINDOW_POOL` (32.25 MiB); a window only
/// grows while its reader keeps up, so a slow reader stays near its
/// initial window. (Streams past the cap are reset as they arrive, so
/// their first frames are dropped with them.)
pub(crate) const MUX_RECEIVE_BOUND: usize =
    MAX_STREAMS * INITIAL_STREAM_WINDOW + STREAM_WINDOW_POOL;

fn mux_config() -> yamux::Config {
    let mut cfg = yamux::Config::default();
    cfg.set_max_num_streams(MUX_STREAM_LIMIT);
    // yamux wants 256 KiB for every stream it may hold on top of the pool
    // it grows windows from; the pool stays [`STREAM_WINDOW_POOL`].
    cfg.set_max_connection_receive_window(Some(
        MUX_RECEIVE_BOUND + (MUX_STREAM_LIMIT - MAX_STREAMS) * INITIAL_STREAM_WINDOW,
    ));
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
        (active.clone(), Arc::default()),
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

/// Whether the driver may let one more stream live, opened by either
/// side, with `held` stream handles alive (every stream, keepalive too).
fn room_for_one(held: usize) -> bool {
    held < MAX_STREAMS
}

/// Owns the yamux connection: serves open requests, hands out inbound
/// streams, and keeps the connection polled (yamux only makes progress while
/// `poll_next_inbound` is being called). Of the two counters, `active` is
/// the tunnel's active-stream count (keepalive not included) and `slots`
/// counts every stream handle alive, which holds both directions to
/// [`MAX_STREAMS`] (see [`MUX_STREAM_LIMIT`]).
async fn drive<T>(
    mut conn: yamux::Connection<T>,
    mut open_rx: mpsc::Receiver<OpenReply>,
    inbound_tx: mpsc::Sender<StreamIo>,
    closed: CancellationToken,
    (active, slots): (Arc<AtomicUsize>, Arc<AtomicUsize>),
) where
    T: futures::AsyncRead + futures::AsyncWrite + Unpin + Send,
{
    let mut pending: std::collections::VecDeque<OpenReply> = std::collections::VecDeque::new();
    let mut refused_inbound = 0u64;
    let held = || slots.load(Ordering::Relaxed);
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
                if !room_for_one(held()) {
                    // Our cap, by our count: refused like yamux's own,
                    // before yamux could count it.
                    if let Some(reply) = pending.pop_front() {
                        let _ = reply.send(Err(TunnelError::Busy));
                    }
                    continue;
                }
                match conn.poll_new_outbound(cx) {
                    Poll::Ready(Ok(stream)) => {
                        if let Some(reply) = pending.pop_front() {
                            let _ = reply.send(Ok(StreamIo::new(stream, (&active, &slots), &closed)));
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
                        // Past our cap (the peer's count lags ours while
                        // our handlers finish streams it already let go):
                        // reset this stream here, which frees its place
                        // in yamux's count at once, and keep the tunnel.
                        if !room_for_one(held()) {
                            if refused_inbound % 1_000 == 0 {
                                tracing::warn!(held = held(), max = MAX_STREAMS, refused = refused_inbound + 1, "inbound stream refused: the tunnel carries its maximum of streams");
                            }
                            refused_inbound += 1;
                            drop(stream);
                            continue;
                        }
                        // A full queue means handlers are not keeping up:
                        // dropping the stream resets it, and the peer's
                        // forward reports the refusal.
                        if inbound_tx.try_send(StreamIo::new(stream, (&active, &slots), &closed)).is_err() {
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

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// A tunnel over an in-memory pipe, both drivers spawned: the opener's
    /// handle and the other side's; its inbound streams are answered by
    /// [`far_side`].
    async fn pair() -> (Tunnel, Tunnel, mpsc::Receiver<StreamIo>) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let (ia, ib) = (Identity::generate().unwrap(), Identity::generate().unwrap());
        let (pa, pb) = (ia.public_key(), ib.public_key());
        let (ta, tb) = tokio::join!(
            handshake(a, Role::Client, &ia, &pb, Transport::Tcp),
            handshake(b, Role::Server, &ib, &pa, Transport::Tcp),
        );
        let (ta, tb) = (ta.unwrap(), tb.unwrap());
        tokio::spawn(ta.driver);
        tokio::spawn(tb.driver);
        (ta.tunnel, tb.tunnel, tb.inbound)
    }

    /// The far side's handlers: answer each stream's byte and hold the
    /// stream until `release` says so (handlers still busy with streams
    /// the opener has already let go).
    fn far_side(
        mut inbound: mpsc::Receiver<StreamIo>,
        release: tokio::sync::watch::Receiver<bool>,
    ) {
        tokio::spawn(async move {
            while let Some(mut s) = inbound.recv().await {
                let mut release = release.clone();
                tokio::spawn(async move {
                    let mut b = [0u8; 1];
                    if s.read_exact(&mut b).await.is_ok() && s.write_all(&b).await.is_ok() {
                        let _ = s.flush().await;
                    }
                    let _ = release.wait_for(|go| *go).await;
                });
            }
        });
    }

    /// Opens a stream, sends a byte and waits for its echo: true if the far
    /// side took the stream, false if it reset it.
    async fn open_one(t: &Tunnel) -> Option<StreamIo> {
        let mut s = t.open().await.ok()?;
        s.write_all(b"x").await.ok()?;
        s.flush().await.ok()?;
        let mut b = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut b))
            .await
            .expect("neither an echo nor a reset")
            .ok()?;
        Some(s)
    }

    #[test]
    fn the_driver_admits_up_to_the_cap() {
        assert!(room_for_one(MAX_STREAMS - 1));
        assert!(!room_for_one(MAX_STREAMS));
    }

    /// Issue #24: the opener lets go of streams the accepting side's
    /// handlers still hold, and opens as many new ones at once. The
    /// accepting side's count is then above the opener's: with yamux's cap
    /// equal to ours its SYNs ended the whole tunnel ("maximum number of
    /// streams reached", a GoAway; what 2,000 connections at once did to
    /// a tunnel, direct or relayed). Now the excess streams are reset one
    /// by one, the tunnel stays up, and it carries new streams once the
    /// far side's handlers let go.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn streams_the_far_side_still_holds_never_end_the_tunnel() {
        const AGAIN: usize = 200;
        let (near, far, inbound) = pair().await;
        let (release, held) = tokio::sync::watch::channel(false);
        far_side(inbound, held);
        let mut mine = Vec::new();
        for i in 0..MAX_STREAMS {
            mine.push(
                open_one(&near)
                    .await
                    .unwrap_or_else(|| panic!("stream {i} refused")),
            );
        }
        // Ours go; the far side's handlers still hold theirs.
        mine.truncate(MAX_STREAMS - AGAIN);
        let mut taken = 0;
        for _ in 0..AGAIN {
            if let Some(s) = open_one(&near).await {
                taken += 1;
                mine.push(s);
            }
        }
        assert_eq!(taken, 0, "the far side took streams past its cap");
        assert!(!near.is_closed() && !far.is_closed(), "the tunnel ended");
        // The far side's handlers finish: the same tunnel carries new
        // streams end to end.
        release.send(true).unwrap();
        mine.clear();
        let again = async {
            loop {
                if let Some(s) = open_one(&near).await {
                    return s;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), again)
            .await
            .expect("no stream after the far side let go");
        assert!(!near.is_closed() && !far.is_closed());
    }
}
