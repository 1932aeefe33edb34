//! Copying a connection's bytes both ways, and counting it while it lives.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::admin::status::PeerStatus;

/// Copy buffer per direction per stream: large enough for bulk transfers,
/// small enough that 1,000 streams stay in tens of MiB.
const SPLICE_BUF: usize = 32 * 1024;

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
