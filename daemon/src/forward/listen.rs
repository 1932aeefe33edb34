//! Local listeners: each `[[forward]]` accepts connections and carries
//! each one over a new stream to its peer's service.

use std::fmt::Display;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn, Instrument};

use super::splice::{reset, splice, SpliceError, StreamGuard};
use crate::admin::status::{ForwardStatus, PeerStatus};
use crate::tunnel::header::{request_service, HeaderError};
use crate::tunnel::StreamIo;

/// How many connections a forward's port queues before the daemon accepts
/// them (the kernel caps it at `net.core.somaxconn`, 4096 by default).
/// An application that opens a pool at once must find room: past the
/// queue (std's 128) Linux answers with SYN cookies, and a client's
/// segment arriving after its connection closed can then complete a
/// connection nobody owns, which the forward would carry to the service
/// and hold open (seen in the 1,000-stream test: 1,001 forwarded
/// connections, one open for good).
const FORWARD_BACKLOG: u32 = 4096;

/// A forward's TCP listener (and the demo's services'): `SO_REUSEADDR` (a
/// restarted daemon rebinds a port whose old connections linger in
/// `TIME_WAIT`, as std's bind does) and a queue of [`FORWARD_BACKLOG`].
pub(crate) fn bind_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(FORWARD_BACKLOG)
}

/// Where a forward's connections go: a peer that hands out streams to
/// itself (the peer task's handle). A trait so the forwarder sits below
/// the peer actor and never imports it.
pub(crate) trait StreamSource: Clone + Send + Sync + 'static {
    /// Why no stream could be had (logged).
    type Error: Display + Send;
    /// The peer's name, for logs.
    fn name(&self) -> &str;
    /// The peer's status, for the stream count.
    fn status(&self) -> &Arc<PeerStatus>;
    /// A new stream to the peer, waiting for a tunnel if need be.
    fn open_stream(&self) -> impl Future<Output = Result<StreamIo, Self::Error>> + Send;
}

/// Why a forwarded connection ended badly (for the log).
#[derive(Debug, thiserror::Error)]
enum ForwardError<E: Display> {
    /// No stream to the peer.
    #[error("{0}")]
    Open(E),
    /// The peer refused the service, or the header failed.
    #[error(transparent)]
    Header(#[from] HeaderError),
    /// The copy failed or was cut (both sockets were reset).
    #[error(transparent)]
    Splice(#[from] SpliceError),
}

/// Concurrent connections one forward carries; beyond it new ones are
/// reset at once. A tunnel's stream cap less the keepalive's stream: more
/// could never get a stream anyway, and would only hold sockets while
/// they wait.
pub(crate) const MAX_CONNECTIONS: usize = crate::tunnel::MAX_STREAMS - 1;

/// Accepts local connections for one `[[forward]]` until cancelled.
pub(crate) async fn run_forward<P: StreamSource>(
    listener: TcpListener,
    peer: P,
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
        if status.active.load(Ordering::Relaxed) >= MAX_CONNECTIONS as i64 {
            // A reset, not a queue: the sockets and tasks stay bounded and
            // the tunnel (and every other connection on it) is untouched.
            if status.refused.fetch_add(1, Ordering::Relaxed) % 1_000 == 0 {
                warn!(%from, max = MAX_CONNECTIONS, "connection refused: this forward already carries its maximum of concurrent connections (counted in punchd_forward_refused_total)");
            }
            reset(local);
            continue;
        }
        // Counted before the task starts, so a burst of accepts sees it.
        status.active.fetch_add(1, Ordering::Relaxed);
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

async fn forward_one<P: StreamSource>(
    local: TcpStream,
    peer: P,
    service: String,
    status: Arc<ForwardStatus>,
    cancel: CancellationToken,
) {
    let started = Instant::now();
    let opened: Result<_, ForwardError<P::Error>> = async {
        let mut stream = peer.open_stream().await.map_err(ForwardError::Open)?;
        request_service(&mut stream, &service).await?;
        Ok(stream)
    }
    .await;
    let result = match opened {
        Ok(stream) => {
            let _guard = StreamGuard::new(peer.status());
            splice(local, stream, &cancel).await.map_err(Into::into)
        }
        Err(e) => {
            // No stream, or refused: the application reads a reset, not
            // an empty but "complete" response.
            reset(local);
            Err(e)
        }
    };
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
