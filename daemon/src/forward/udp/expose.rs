//! The exposing side of a UDP flow: a socket of its own toward the
//! service's target (so the target's replies come back to this flow and
//! no other), datagrams both ways until idle or closed.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::UdpSocket;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::carrier::Carrier;
use super::flows::Idle;
use super::{FLOW_IDLE, FLOW_QUEUE};
use crate::tunnel::StreamIo;

/// A UDP socket connected to `target` (the first address it resolves to),
/// from an ephemeral port of the same family.
pub(crate) async fn connect_target(target: &str) -> std::io::Result<UdpSocket> {
    let addr: SocketAddr = tokio::net::lookup_host(target)
        .await?
        .next()
        .ok_or_else(|| std::io::Error::other("the target resolves to no address"))?;
    let local: SocketAddr = if addr.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local).await?;
    super::enlarge_buffer(&socket);
    socket.connect(addr).await?;
    Ok(socket)
}

/// Serves one admitted flow until it is idle for [`FLOW_IDLE`], the
/// opener closes it, or the stream fails. Returns (datagrams to the
/// target, datagrams back, dropped).
pub(crate) async fn serve_flow(flow: AdmittedFlow, cancel: &CancellationToken) -> (u64, u64, u64) {
    serve_flow_with(flow, cancel, FLOW_IDLE).await
}

/// A flow about to be admitted: its target socket, its stream and (on
/// QUIC) its datagram route, made *before* the verdict is sent so that no
/// datagram the opener sends after it finds no route.
pub(crate) struct AdmittedFlow {
    socket: UdpSocket,
    stream: StreamIo,
    link: Option<crate::tunnel::DatagramLink>,
    drops: Arc<AtomicU64>,
}

impl AdmittedFlow {
    pub(crate) fn new(socket: UdpSocket, stream: StreamIo) -> Self {
        let drops = Arc::new(AtomicU64::new(0));
        let link = stream.datagram_link(FLOW_QUEUE, drops.clone());
        Self {
            socket,
            stream,
            link,
            drops,
        }
    }

    /// The stream, for the verdict.
    pub(crate) fn stream(&mut self) -> &mut StreamIo {
        &mut self.stream
    }
}

async fn serve_flow_with(
    flow: AdmittedFlow,
    cancel: &CancellationToken,
    idle: Duration,
) -> (u64, u64, u64) {
    let AdmittedFlow {
        socket,
        stream,
        link,
        drops,
    } = flow;
    let mut carrier = Carrier::new(stream, link);
    let mut clock = Idle::new(Instant::now(), idle);
    let (mut to_target, mut back) = (0u64, 0u64);
    let mut buf = vec![0u8; super::wire::MAX_DATAGRAM];
    let why = loop {
        tokio::select! {
            _ = cancel.cancelled() => break "daemon stopping",
            _ = tokio::time::sleep_until(clock.deadline()) => break "idle",
            r = carrier.recv() => match r {
                Ok(Some(d)) => {
                    clock.touch(Instant::now());
                    // Refused (an ICMP port unreachable for an earlier
                    // datagram) or a full buffer: lost, as UDP may be.
                    match socket.send(&d).await {
                        Ok(_) => to_target += 1,
                        Err(_) => { drops.fetch_add(1, Ordering::Relaxed); }
                    }
                }
                Ok(None) => break "closed by the peer",
                Err(e) => {
                    debug!(error = %e, "UDP flow cut");
                    break "tunnel stream failed";
                }
            },
            r = socket.recv(&mut buf) => match r {
                Ok(n) => {
                    clock.touch(Instant::now());
                    // Whatever else the target sent goes in the same write.
                    let mut batch = vec![Bytes::copy_from_slice(&buf[..n])];
                    while batch.len() < super::BATCH {
                        match socket.try_recv(&mut buf) {
                            Ok(n) => batch.push(Bytes::copy_from_slice(&buf[..n])),
                            Err(_) => break,
                        }
                    }
                    if let Err(e) = carrier.send_all(&batch).await {
                        debug!(error = %e, "UDP flow cut");
                        break "tunnel stream failed";
                    }
                    back += batch.len() as u64;
                }
                // ECONNREFUSED: the target is not listening (yet); the
                // flow stays, as the client may retry.
                Err(e) => debug!(error = %e, "UDP target error"),
            },
        }
    };
    debug!(why, to_target, back, "UDP flow ended");
    carrier.close().await;
    (to_target, back, drops.load(Ordering::Relaxed))
}
