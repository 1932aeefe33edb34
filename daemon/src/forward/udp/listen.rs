//! A UDP `[[forward]]`: one socket, one flow per local client address
//! (`flows.rs`), each flow carried over its own tunnel stream to the
//! peer's service (`carrier.rs`), replies sent back from the forward's
//! socket to the client that started the flow.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn, Instrument};

use super::carrier::{write_framed, Carrier};
use super::flows::{Admit, FlowTable, Idle};
use super::{FLOW_IDLE, FLOW_QUEUE, MAX_FLOWS};
use crate::admin::status::ForwardStatus;
use crate::forward::splice::StreamGuard;
use crate::forward::StreamSource;
use crate::tunnel::header::{read_verdict, send_request, StreamProtocol};

/// The listener's handle on one flow.
#[derive(Debug)]
struct Flow {
    id: u64,
    tx: mpsc::Sender<Bytes>,
}

/// Carries datagrams from `socket`'s clients to `service` on `peer` until
/// `accepting` is cancelled (then every flow ends).
pub(crate) async fn run_udp_forward<P: StreamSource>(
    socket: UdpSocket,
    peer: P,
    service: String,
    status: Arc<ForwardStatus>,
    accepting: CancellationToken,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    run_with(
        socket,
        peer,
        service,
        status,
        (accepting, cancel),
        tracker,
        FLOW_IDLE,
    )
    .await;
}

/// [`run_udp_forward`] with a flow idle timeout of `idle` (tests use a
/// short one).
pub(crate) async fn run_with<P: StreamSource>(
    socket: UdpSocket,
    peer: P,
    service: String,
    status: Arc<ForwardStatus>,
    (accepting, cancel): (CancellationToken, CancellationToken),
    tracker: TaskTracker,
    idle: Duration,
) {
    let socket = Arc::new(socket);
    let mut table: FlowTable<Flow> = FlowTable::new(MAX_FLOWS);
    let (ended_tx, mut ended_rx) = mpsc::channel::<(SocketAddr, u64)>(MAX_FLOWS);
    let mut buf = vec![0u8; super::wire::MAX_DATAGRAM];
    loop {
        let (n, client) = tokio::select! {
            _ = accepting.cancelled() => break,
            Some((client, id)) = ended_rx.recv() => {
                table.ended(client, id);
                status.active.store(table.len() as i64, Ordering::Relaxed);
                continue;
            }
            r = socket.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    // An ICMP error for an earlier reply (the client went
                    // away) and the like: not the socket's end.
                    debug!(error = %e, "UDP receive error; continuing");
                    continue;
                }
            },
        };
        let datagram = Bytes::copy_from_slice(&buf[..n]);
        let now = Instant::now();
        let (id, evicted, datagram) = match table.admit(client, now) {
            Admit::New { id, evicted } => (id, evicted, datagram),
            Admit::Existing => {
                let Some(flow) = table.get(&client) else {
                    continue;
                };
                match flow.tx.try_send(datagram) {
                    Ok(()) => continue,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        drop_one(&status, client, "the flow's queue is full");
                        continue;
                    }
                    // The flow ended (idle, or its stream failed) and the
                    // listener has not heard yet: a new one takes over.
                    Err(mpsc::error::TrySendError::Closed(d)) => {
                        let old = flow.id;
                        table.ended(client, old);
                        match table.admit(client, now) {
                            Admit::New { id, evicted } => (id, evicted, d),
                            Admit::Existing => continue,
                        }
                    }
                }
            }
        };
        if let Some(old) = evicted {
            debug!(%client, evicted = old.id, max = MAX_FLOWS, "flow table full: the least recently heard client's flow ends");
        }
        let (tx, rx) = mpsc::channel(FLOW_QUEUE);
        // A fresh queue has room for the first datagram.
        let _ = tx.try_send(datagram);
        table.insert(client, id, Flow { id, tx }, now);
        status.total.fetch_add(1, Ordering::Relaxed);
        status.active.store(table.len() as i64, Ordering::Relaxed);
        let flow = client_flow(
            FlowCtx {
                client,
                id,
                socket: socket.clone(),
                peer: peer.clone(),
                service: service.clone(),
                status: status.clone(),
                ended: ended_tx.clone(),
                idle,
            },
            rx,
            cancel.clone(),
        );
        tracker.spawn(flow.instrument(tracing::debug_span!("flow", %client)));
    }
    status.active.store(0, Ordering::Relaxed);
}

fn drop_one(status: &ForwardStatus, client: SocketAddr, why: &str) {
    if status.datagrams_dropped.fetch_add(1, Ordering::Relaxed) % 1_000 == 0 {
        warn!(%client, "datagram dropped: {why} (counted in punchd_forward_datagrams_dropped_total)");
    }
}

/// What one flow task needs.
struct FlowCtx<P> {
    client: SocketAddr,
    id: u64,
    socket: Arc<UdpSocket>,
    peer: P,
    service: String,
    status: Arc<ForwardStatus>,
    ended: mpsc::Sender<(SocketAddr, u64)>,
    idle: Duration,
}

/// One client's flow: a stream to the peer's service, datagrams both ways
/// until idle, evicted, refused or cut.
async fn client_flow<P: StreamSource>(
    ctx: FlowCtx<P>,
    mut rx: mpsc::Receiver<Bytes>,
    cancel: CancellationToken,
) {
    let FlowCtx {
        client,
        id,
        socket,
        peer,
        service,
        status,
        ended,
        idle,
    } = ctx;
    // The request and the first datagrams leave together; the verdict is
    // read after them (a refused flow's datagrams are discarded by the
    // peer and counted as dropped here). They go on the stream: the peer
    // routes QUIC datagrams to a flow only once it has admitted it.
    let mut first: Vec<Bytes> = Vec::new();
    let opened = tokio::select! {
        _ = cancel.cancelled() => None,
        r = async {
            let mut s = peer.open_stream().await.map_err(|e| e.to_string())?;
            // Routed before anything is sent: the peer's first reply may
            // come as a QUIC datagram right behind its verdict.
            let link = s.datagram_link(FLOW_QUEUE, status.datagrams_dropped.clone());
            send_request(&mut s, &service, StreamProtocol::Udp)
                .await
                .map_err(|e| e.to_string())?;
            while first.len() < super::BATCH {
                match rx.try_recv() {
                    Ok(d) => first.push(d),
                    Err(_) => break,
                }
            }
            write_framed(&mut s, &first).await.map_err(|e| e.to_string())?;
            read_verdict(&mut s).await.map_err(|e| e.to_string())?;
            Ok::<_, String>((s, link))
        } => match r {
            Ok(s) => {
                status.datagrams_out.fetch_add(first.len() as u64, Ordering::Relaxed);
                Some(s)
            }
            Err(e) => {
                status.datagrams_dropped.fetch_add(first.len() as u64, Ordering::Relaxed);
                warn!(peer = %peer.name(), %service, error = %e, "UDP flow refused or no tunnel; its datagrams are dropped");
                None
            }
        },
    };
    if let Some((stream, link)) = opened {
        let _guard = StreamGuard::new(peer.status());
        let mut carrier = Carrier::new(stream, link);
        debug!(
            quic_datagrams = carrier.uses_quic_datagrams(),
            "UDP flow open"
        );
        let mut clock = Idle::new(Instant::now(), idle);
        let why = loop {
            tokio::select! {
                _ = cancel.cancelled() => break "daemon stopping",
                _ = tokio::time::sleep_until(clock.deadline()) => break "idle",
                d = rx.recv() => match d {
                    None => break "evicted or forward closed",
                    Some(d) => {
                        // Whatever else is queued goes in the same write.
                        let mut batch = vec![d];
                        while batch.len() < super::BATCH {
                            match rx.try_recv() {
                                Ok(d) => batch.push(d),
                                Err(_) => break,
                            }
                        }
                        if let Err(e) = carrier.send_all(&batch).await {
                            debug!(error = %e, "UDP flow cut");
                            break "tunnel stream failed";
                        }
                        status.datagrams_out.fetch_add(batch.len() as u64, Ordering::Relaxed);
                        clock.touch(Instant::now());
                    }
                },
                r = carrier.recv() => match r {
                    Ok(Some(d)) => {
                        match socket.send_to(&d, client).await {
                            Ok(_) => status.datagrams_in.fetch_add(1, Ordering::Relaxed),
                            Err(_) => status.datagrams_dropped.fetch_add(1, Ordering::Relaxed),
                        };
                        clock.touch(Instant::now());
                    }
                    Ok(None) => break "closed by the peer",
                    Err(e) => {
                        debug!(error = %e, "UDP flow cut");
                        break "tunnel stream failed";
                    }
                },
            }
        };
        debug!(why, "UDP flow ended");
        carrier.close().await;
    }
    // Whatever was still queued is lost with the flow.
    let left = rx.len() as u64;
    if left > 0 {
        status.datagrams_dropped.fetch_add(left, Ordering::Relaxed);
    }
    let _ = ended.try_send((client, id));
}
