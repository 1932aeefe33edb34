//! Keepalive timing with tokio's paused time: two real tunnels (TLS and
//! yamux over an in-memory pipe), the opener running [`keepalive`], the
//! other side a test double that echoes pings, or stops answering.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::keepalive;
use crate::admin::status::PeerStatus;
use crate::identity::Identity;
use crate::path::{Role, Transport};
use crate::tunnel::header::{read_request, reply, PING_SERVICE};
use crate::tunnel::{mux, StreamIo, Tunnel};

const INTERVAL: Duration = Duration::from_secs(5);
const TIMEOUT: Duration = Duration::from_secs(10);

/// A tunnel over an in-memory pipe: the opener's handle, and the other
/// side's inbound streams. Both drivers run until the test ends.
async fn tunnel_pair() -> (Tunnel, mpsc::Receiver<StreamIo>) {
    let (a, b) = tokio::io::duplex(1 << 20);
    let (ia, ib) = (Identity::generate().unwrap(), Identity::generate().unwrap());
    let (pa, pb) = (ia.public_key(), ib.public_key());
    let (ta, tb) = tokio::join!(
        mux::handshake(a, Role::Client, &ia, &pb, Transport::Tcp),
        mux::handshake(b, Role::Server, &ib, &pa, Transport::Tcp),
    );
    let (ta, tb) = (ta.unwrap(), tb.unwrap());
    tokio::spawn(ta.driver);
    tokio::spawn(tb.driver);
    // Keep the far side's handle alive (dropping it does not close the
    // tunnel, but the test double lives on its inbound streams).
    std::mem::forget(tb.tunnel);
    (ta.tunnel, tb.inbound)
}

/// The far side: takes the ping stream and echoes `answer` pings; every
/// ping that arrives (answered or not) is reported with its arrival time.
fn far_side(mut inbound: mpsc::Receiver<StreamIo>, answer: u64) -> mpsc::Receiver<Instant> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut s = inbound.recv().await.unwrap();
        assert_eq!(read_request(&mut s).await.unwrap(), PING_SERVICE);
        reply(&mut s, Ok(())).await.unwrap();
        let mut n = 0;
        let mut buf = [0u8; 8];
        while s.read_exact(&mut buf).await.is_ok() {
            n += 1;
            let _ = tx.send(Instant::now()).await;
            if n <= answer {
                s.write_all(&buf).await.unwrap();
                s.flush().await.unwrap();
            }
        }
    });
    rx
}

#[tokio::test(start_paused = true)]
async fn pings_cross_at_the_configured_interval_and_report_rtt() {
    let (tunnel, inbound) = tunnel_pair().await;
    let mut pings = far_side(inbound, u64::MAX);
    let status = Arc::new(PeerStatus::new("bob"));
    tokio::spawn(keepalive(
        tunnel.clone(),
        (INTERVAL, TIMEOUT),
        status.clone(),
        CancellationToken::new(),
    ));
    let mut at = Vec::new();
    for _ in 0..5 {
        at.push(pings.recv().await.unwrap());
    }
    for w in at.windows(2) {
        let gap = w[1] - w[0];
        // The interval, plus the (virtual, near-zero) round trip.
        assert!(
            gap >= INTERVAL && gap <= INTERVAL + Duration::from_millis(5),
            "ping gap {gap:?}"
        );
    }
    assert!(status.state().rtt_ms.is_some(), "no RTT from the pings");
    assert!(!tunnel.is_closed(), "a healthy tunnel was closed");
}

#[tokio::test(start_paused = true)]
async fn a_silent_tunnel_is_declared_dead_after_the_timeout_not_before() {
    let (tunnel, inbound) = tunnel_pair().await;
    // Two pings answered, then silence (the pings still arrive).
    let mut pings = far_side(inbound, 2);
    tokio::spawn(keepalive(
        tunnel.clone(),
        (INTERVAL, TIMEOUT),
        Arc::new(PeerStatus::new("bob")),
        CancellationToken::new(),
    ));
    for _ in 0..2 {
        pings.recv().await.unwrap();
    }
    let unanswered = pings.recv().await.unwrap();
    tunnel.closed().await;
    let after = Instant::now() - unanswered;
    assert!(
        after >= TIMEOUT && after <= TIMEOUT + Duration::from_millis(5),
        "declared dead {after:?} after the unanswered ping (timeout {TIMEOUT:?})"
    );
    assert!(tunnel.is_lost(), "closed, but not as a lost path");
}
