//! The port relay: local listeners on one side, exposed services on the
//! other, one tunnel stream per connection.
//!
//! Each stream starts with a tiny header so the exposing side knows what is
//! asked and can say no:
//!
//! ```text
//! opener → [version=1][len][service name]        (len ≤ 63)
//! exposer → [status][len][reason]                (status 0 = ok)
//! ```
//!
//! then bytes flow both ways until each side half-closes. The exposer only
//! ever connects to a `target` from its own `[[expose]]` table, and only for
//! peers in that entry's `allow` list: a forward names a service, never an
//! address, so a daemon cannot be used as an open proxy.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use punch_config::Expose;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use crate::peer::PeerHandle;
use crate::status::{ForwardStatus, PeerStatus};
use crate::tunnel::StreamIo;

/// Header version.
const VERSION: u8 = 1;
/// Reserved service for keepalive pings; `_` cannot start a service name.
pub(crate) const PING_SERVICE: &str = "_ping";
/// Time allowed for a header to arrive.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed to reach an exposed target.
const TARGET_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Copy buffer per direction per stream: large enough for bulk transfers,
/// small enough that 1,000 streams stay in tens of MiB.
const SPLICE_BUF: usize = 32 * 1024;

/// Errors in the stream header exchange.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HeaderError {
    /// The stream failed or closed early.
    #[error("stream closed during header: {0}")]
    Io(#[from] std::io::Error),
    /// The peer speaks another version or sent nonsense.
    #[error("malformed stream header: {0}")]
    Malformed(&'static str),
    /// The header did not arrive in time.
    #[error("no stream header within {HEADER_TIMEOUT:?}")]
    Timeout,
    /// The other side refused, saying why.
    #[error("refused by peer: {0}")]
    Refused(String),
}

async fn read_short_string<R: AsyncRead + Unpin>(r: &mut R) -> Result<String, HeaderError> {
    let len = r.read_u8().await? as usize;
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    String::from_utf8(buf).map_err(|_| HeaderError::Malformed("not UTF-8"))
}

async fn write_short<W: AsyncWrite + Unpin>(
    w: &mut W,
    first: u8,
    text: &str,
) -> std::io::Result<()> {
    let text = &text.as_bytes()[..text.len().min(255)];
    let mut frame = Vec::with_capacity(2 + text.len());
    frame.push(first);
    frame.push(text.len() as u8);
    frame.extend_from_slice(text);
    w.write_all(&frame).await?;
    w.flush().await
}

/// Opener: asks for `service`, then waits for the verdict.
pub(crate) async fn request_service<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    service: &str,
) -> Result<(), HeaderError> {
    write_short(s, VERSION, service).await?;
    tokio::time::timeout(HEADER_TIMEOUT, async {
        let status = s.read_u8().await?;
        let reason = read_short_string(s).await?;
        if status == 0 {
            Ok(())
        } else {
            Err(HeaderError::Refused(reason))
        }
    })
    .await
    .map_err(|_| HeaderError::Timeout)?
}

/// Exposer: reads which service is asked for.
pub(crate) async fn read_request<S: AsyncRead + Unpin>(s: &mut S) -> Result<String, HeaderError> {
    tokio::time::timeout(HEADER_TIMEOUT, async {
        if s.read_u8().await? != VERSION {
            return Err(HeaderError::Malformed("unknown version"));
        }
        let name = read_short_string(s).await?;
        if name.is_empty() || name.len() > 63 {
            return Err(HeaderError::Malformed("bad service name length"));
        }
        Ok(name)
    })
    .await
    .map_err(|_| HeaderError::Timeout)?
}

/// Exposer: sends the verdict.
pub(crate) async fn reply<S: AsyncWrite + Unpin>(
    s: &mut S,
    verdict: Result<(), &str>,
) -> std::io::Result<()> {
    match verdict {
        Ok(()) => write_short(s, 0, "").await,
        Err(reason) => write_short(s, 1, reason).await,
    }
}

/// Copies both ways until both directions are done, passing each EOF on as
/// a half-close. Returns (a→b, b→a) byte counts.
pub(crate) async fn splice<A, B>(a: &mut A, b: &mut B) -> std::io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    tokio::io::copy_bidirectional_with_sizes(a, b, SPLICE_BUF, SPLICE_BUF).await
}

/// Counts a stream as open in the peer's status while alive.
pub(crate) struct StreamGuard(Arc<PeerStatus>);

impl StreamGuard {
    pub(crate) fn new(status: &Arc<PeerStatus>) -> Self {
        status.streams.fetch_add(1, Ordering::Relaxed);
        Self(status.clone())
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Accepts local connections for one `[[forward]]` until cancelled.
pub(crate) async fn run_forward(
    listener: TcpListener,
    peer: PeerHandle,
    service: String,
    status: Arc<ForwardStatus>,
    accepting: CancellationToken,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let (local, from) = tokio::select! {
            _ = accepting.cancelled() => break,

            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and similar: wait a little
                    // rather than spin, and keep the listener.
                    warn!(error = %e, "accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = local.set_nodelay(true);
        status.total.fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!("conn", %from);
        tracker.spawn(
            forward_one(
                local,
                peer.clone(),
                service.clone(),
                status.clone(),
                cancel.clone(),
            )
            .instrument(span),
        );
    }
}

async fn forward_one(
    mut local: TcpStream,
    peer: PeerHandle,
    service: String,
    status: Arc<ForwardStatus>,
    cancel: CancellationToken,
) {
    status.active.fetch_add(1, Ordering::Relaxed);
    let started = Instant::now();
    let result = async {
        let mut stream = peer.open_stream().await.map_err(|e| e.to_string())?;
        let _guard = StreamGuard::new(peer.status());
        request_service(&mut stream, &service)
            .await
            .map_err(|e| e.to_string())?;
        tokio::select! {
            r = splice(&mut local, &mut stream) => r.map_err(|e| e.to_string()),
            _ = cancel.cancelled() => Err("daemon shutting down".to_owned()),
        }
    }
    .await;
    match result {
        Ok((up, down)) => debug!(
            up,
            down,
            ms = started.elapsed().as_millis() as u64,
            "connection done"
        ),
        Err(e) => warn!(peer = %peer.name(), %service, error = %e, "forwarded connection closed"),
    }
    status.active.fetch_sub(1, Ordering::Relaxed);
}

/// Handles one stream the peer opened: the ping service, or an exposed
/// service the peer is allowed to use.
pub(crate) async fn serve_inbound(
    mut stream: StreamIo,
    peer_name: String,
    exposes: Arc<Vec<Expose>>,
    status: Arc<PeerStatus>,
    cancel: CancellationToken,
) {
    let service = match read_request(&mut stream).await {
        Ok(s) => s,
        Err(e) => {
            warn!(peer = %peer_name, error = %e, "bad stream from peer");
            return;
        }
    };
    if service == PING_SERVICE {
        stream.uncount();
        if reply(&mut stream, Ok(())).await.is_ok() {
            echo_pings(&mut stream, &cancel).await;
        }
        return;
    }
    let Some(expose) = exposes.iter().find(|e| e.name.as_str() == service) else {
        warn!(peer = %peer_name, %service, "refused: no such service exposed");
        let _ = reply(
            &mut stream,
            Err(&format!("service {service} is not exposed here")),
        )
        .await;
        return;
    };
    if !expose.allow.iter().any(|a| a.as_str() == peer_name) {
        warn!(peer = %peer_name, %service, "refused: peer not in allow list");
        let _ = reply(
            &mut stream,
            Err(&format!(
                "peer {peer_name} is not allowed to use service {service}"
            )),
        )
        .await;
        return;
    }
    let target = match tokio::time::timeout(
        TARGET_CONNECT_TIMEOUT,
        TcpStream::connect(&expose.target),
    )
    .await
    {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            return refuse_target(&mut stream, &peer_name, &service, &e.to_string()).await
        }
        Err(_) => return refuse_target(&mut stream, &peer_name, &service, "timed out").await,
    };
    let _ = target.set_nodelay(true);
    if reply(&mut stream, Ok(())).await.is_err() {
        return;
    }
    let _guard = StreamGuard::new(&status);
    let mut target = target;
    tokio::select! {
        r = splice(&mut stream, &mut target) => match r {
            Ok((down, up)) => debug!(peer = %peer_name, %service, down, up, "stream done"),
            Err(e) => info!(peer = %peer_name, %service, error = %e, "stream ended with error"),
        },
        _ = cancel.cancelled() => {}
    }
}

async fn refuse_target<S: AsyncWrite + Unpin>(
    stream: &mut S,
    peer: &str,
    service: &str,
    why: &str,
) {
    warn!(%peer, %service, error = %why, "cannot reach exposed target; is the service running?");
    let _ = reply(
        stream,
        Err(&format!(
            "service {service} is unavailable on the peer: {why}"
        )),
    )
    .await;
}

/// The exposer's side of a keepalive stream: echo 8-byte pings.
async fn echo_pings<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, cancel: &CancellationToken) {
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
mod tests {
    use super::*;

    #[tokio::test]
    async fn header_round_trip_and_refusal() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        let server = tokio::spawn(async move {
            let name = read_request(&mut b).await.unwrap();
            reply(&mut b, Err("nope")).await.unwrap();
            name
        });
        let r = request_service(&mut a, "ssh").await;
        assert!(
            matches!(r, Err(HeaderError::Refused(ref why)) if why == "nope"),
            "{r:?}"
        );
        assert_eq!(server.await.unwrap(), "ssh");
    }

    #[tokio::test]
    async fn malformed_headers_are_rejected() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(&[9, 3, b'a', b'b', b'c']).await.unwrap();
        assert!(matches!(
            read_request(&mut b).await,
            Err(HeaderError::Malformed(_))
        ));
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(&[VERSION, 0]).await.unwrap();
        assert!(matches!(
            read_request(&mut b).await,
            Err(HeaderError::Malformed(_))
        ));
        let (a, mut b) = tokio::io::duplex(1024);
        drop(a);
        assert!(matches!(
            read_request(&mut b).await,
            Err(HeaderError::Io(_))
        ));
    }
}
