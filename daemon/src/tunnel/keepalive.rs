//! Keepalive: one reserved stream per tunnel ([`PING_SERVICE`]) carrying
//! 8-byte pings. The opener measures the round trip (`rtt_ms`) and closes
//! the tunnel as lost when an answer is missed, so the peer task punches
//! again; the other side only echoes.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::header::{request_service, HeaderError, PING_SERVICE};
use super::{Tunnel, TunnelError};
use crate::admin::status::PeerStatus;

/// Why the keepalive declared a path dead.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum KeepaliveError {
    /// The ping stream could not be opened.
    #[error("keepalive stream: {0}")]
    Open(#[from] TunnelError),
    /// The peer did not take the ping stream.
    #[error("keepalive stream: {0}")]
    Header(#[from] HeaderError),
    /// An echo came back for another ping.
    #[error("keepalive echo out of order")]
    OutOfOrder,
    /// The stream failed.
    #[error("keepalive stream failed: {0}")]
    Io(#[from] std::io::Error),
    /// No answer in time.
    #[error("no keepalive answer within {0:?}")]
    Timeout(Duration),
}

/// Pings every `interval` until the tunnel closes or `cancel` fires; a
/// ping unanswered within `timeout` closes the tunnel as lost. Also the
/// source of `rtt_ms` in `status`.
pub(crate) async fn keepalive(
    tunnel: Tunnel,
    (interval, timeout): (Duration, Duration),
    status: Arc<PeerStatus>,
    cancel: CancellationToken,
) {
    let result: Result<(), KeepaliveError> = async {
        let mut s = tunnel.open().await?;
        s.uncount();
        request_service(&mut s, PING_SERVICE).await?;
        let mut seq = 0u64;
        loop {
            seq += 1;
            let t0 = Instant::now();
            let mut echo = [0u8; 8];
            let exchange = async {
                s.write_all(&seq.to_be_bytes()).await?;
                s.flush().await?;
                s.read_exact(&mut echo).await
            };
            match tokio::time::timeout(timeout, exchange).await {
                Ok(Ok(_)) if u64::from_be_bytes(echo) == seq => {}
                Ok(Ok(_)) => return Err(KeepaliveError::OutOfOrder),
                Ok(Err(e)) => return Err(KeepaliveError::Io(e)),
                Err(_) => return Err(KeepaliveError::Timeout(timeout)),
            }
            let rtt = t0.elapsed().as_secs_f64() * 1000.0;
            status.update(|st| st.rtt_ms = Some((rtt * 1000.0).round() / 1000.0));
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = tunnel.closed() => return Ok(()),
                _ = cancel.cancelled() => return Ok(()),
            }
        }
    }
    .await;
    if let Err(why) = result {
        if !tunnel.is_closed() {
            warn!(reason = %why, "path looks dead; closing the tunnel");
            tunnel.close_lost();
        }
    }
}

/// The exposer's side of a keepalive stream: echo 8-byte pings.
pub(crate) async fn echo_pings<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    cancel: &CancellationToken,
) {
    let mut buf = [0u8; 8];
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = s.read_exact(&mut buf) => if r.is_err() { return },
        }
        if s.write_all(&buf).await.is_err() || s.flush().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
#[path = "keepalive_tests.rs"]
mod tests;
