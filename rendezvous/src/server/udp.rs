//! The UDP observation endpoint: daemons send signed probes from their UDP
//! punch port, and the source address we see is their UDP mapping, the
//! QUIC path's counterpart of the WebSocket's observed address.
//!
//! One task owns the socket. Work per datagram is bounded and cheap checks
//! come first: parse, a store lookup, the counter, a per-daemon and a
//! server-wide rate limit; only then the signature. The ack goes back to the address the
//! probe came from, so the NAT sees traffic both ways and keeps the
//! mapping.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::UdpSocket;
use tracing::{debug, info};

use super::ratelimit::TokenBucket;
use super::store::{Probe, ProbeRecorded};
use super::Shared;
use crate::datagram::{self, Datagram, ProbeBody};
use crate::protocol::decode_public_key;

/// Probes verified per second, server-wide (a probe costs one Ed25519
/// verification, ~50 µs). Daemons probe every 15 s, so this serves tens of
/// thousands of them while a flood costs at most a fraction of a core.
const PROBES_PER_SECOND: u32 = 2_000;
const PROBE_BURST: u32 = 4_000;

/// Serves probes until the server shuts down.
pub(crate) async fn serve(socket: UdpSocket, shared: Arc<Shared>) {
    if let Ok(addr) = socket.local_addr() {
        info!(%addr, "UDP observation endpoint listening");
    }
    let mut buf = [0u8; datagram::MAX_LEN + 1];
    let mut bucket = TokenBucket::new(PROBES_PER_SECOND, PROBE_BURST, Instant::now());
    loop {
        let (n, from) = tokio::select! {
            _ = shared.cancel.cancelled() => break,
            r = socket.recv_from(&mut buf) => match r {
                Ok(x) => x,
                // ICMP errors from earlier sends surface here; keep serving.
                Err(e) => { debug!(error = %e, "udp receive error"); continue }
            },
        };
        let from = SocketAddr::new(from.ip().to_canonical(), from.port());
        match observe(&shared, &mut bucket, &buf[..n], from).await {
            Some(counter) => {
                shared.metrics.udp_probes.fetch_add(1, Ordering::Relaxed);
                let _ = socket.send_to(&datagram::ack(counter, from), from).await;
            }
            None => {
                shared.metrics.udp_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Checks one datagram; on a valid probe records `from` as the daemon's
/// UDP endpoint and returns the counter to acknowledge.
async fn observe(
    shared: &Shared,
    bucket: &mut TokenBucket,
    buf: &[u8],
    from: SocketAddr,
) -> Option<u64> {
    let Some(Datagram::Probe {
        name,
        counter,
        local_port,
        signature,
    }) = datagram::parse(buf)
    else {
        return None;
    };
    let body = ProbeBody {
        name,
        counter,
        local_port,
    };
    let now = Instant::now();
    let key = shared.store.probe_key(name).await.ok()??;
    if counter <= key.counter {
        return None; // a replay, or reordered
    }
    if !shared.local.allow_probe(key.conn_id, now) {
        return None;
    }
    if !bucket.allow(now) {
        return None;
    }
    let vk = decode_public_key(&crate::protocol::b64(&key.public_key)).ok()?;
    if !datagram::verify_probe(&vk, &key.nonce, &body, &signature) {
        return None;
    }
    let probe = Probe {
        nonce: key.nonce,
        counter,
        local_port,
        from,
    };
    match shared.store.record_probe(name, probe).await.ok()? {
        ProbeRecorded::Stale => None,
        ProbeRecorded::Current { moved } => {
            if moved {
                info!(daemon = name, udp = %from, "UDP endpoint observed");
            }
            Some(counter)
        }
    }
}
