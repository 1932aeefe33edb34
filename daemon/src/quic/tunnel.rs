//! The tunnel over an authenticated QUIC connection: streams map
//! one-to-one onto QUIC streams; the driver accepts the peer's, meters
//! bytes and moves the endpoint to a fresh port after a lost path.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use quinn::VarInt;
use tokio::sync::mpsc;

use super::QuicPath;
use crate::admin::status::PeerStatus;
use crate::tunnel::{StreamIo, Tunnel, TunnelParts, INBOUND_QUEUE};

/// A tunnel over an authenticated QUIC connection on `path`'s endpoint.
/// The driver accepts the peer's streams, keeps the status byte counters
/// current (QUIC has no byte stream to meter, so they come from quinn's
/// UDP counters, every 250 ms), closes the connection when the tunnel is
/// closed, and moves the endpoint to a fresh port if the path was lost.
pub(crate) fn from_quic(
    conn: quinn::Connection,
    status: Arc<PeerStatus>,
    path: Arc<QuicPath>,
) -> TunnelParts {
    let (inbound_tx, inbound) = mpsc::channel(INBOUND_QUEUE);
    let tunnel = Tunnel::over_quic(conn.clone());
    let driver = Box::pin(drive_quic(conn, inbound_tx, tunnel.clone(), status, path));
    TunnelParts {
        tunnel,
        inbound,
        driver,
    }
}

async fn drive_quic(
    conn: quinn::Connection,
    inbound_tx: mpsc::Sender<StreamIo>,
    tunnel: Tunnel,
    status: Arc<PeerStatus>,
    path: Arc<QuicPath>,
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
    // Off once the connection says it takes no (more) datagrams.
    let mut datagrams = true;
    loop {
        tokio::select! {
            _ = tunnel.closed() => {
                conn.close(VarInt::from_u32(0), b"closed");
                break;
            }
            r = conn.accept_bi() => match r {
                Ok((send, recv)) => {
                    let stream = StreamIo::quic(send, recv, tunnel.counter(), &conn, tunnel.routes());
                    if inbound_tx.try_send(stream).is_err() {
                        tracing::warn!("inbound stream refused: handler queue full");
                    }
                }
                Err(e) => {
                    tracing::info!(error = %e, "QUIC tunnel ended");
                    if matches!(e, quinn::ConnectionError::TimedOut) {
                        tunnel.mark_lost();
                    }
                    break;
                }
            },
            d = conn.read_datagram(), if datagrams => match d {
                Ok(d) => tunnel.routes().dispatch(d),
                Err(_) => datagrams = false,
            },
            _ = tick.tick() => meter(),
        }
    }
    meter();
    drop(live);
    if tunnel.is_lost() {
        path.rebind_after_lost_path().await;
    }
    tunnel.close();
}
