//! Copying a connection's bytes both ways through a tunnel stream, framed
//! (`frame.rs`) so that a cut tunnel is never mistaken for a clean end, and
//! counting the stream while it lives.
//!
//! A local socket's EOF is sent as the end marker, then the stream's write
//! side is half-closed; the far side half-closes its local socket (a FIN)
//! only on that marker. Anything else, a tunnel that dies, a far side that
//! was cut or reset, a local socket that fails, or the daemon stopping
//! before both directions ended, resets both the local socket (`SO_LINGER`
//! 0, so the application reads `ECONNRESET`) and the tunnel stream.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::frame::{self, Decoder, FrameError, Want, PREFIX};
use crate::admin::status::PeerStatus;
use crate::tunnel::StreamIo;

/// Copy buffer per direction per stream: large enough for bulk transfers,
/// small enough that 1,000 streams stay in tens of MiB.
const SPLICE_BUF: usize = 32 * 1024;

/// Why a spliced connection ended other than cleanly in both directions.
/// Every variant resets both the local socket and the tunnel stream.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum SpliceError {
    /// The local socket failed (e.g. the application reset it).
    #[error("local socket: {0}")]
    Local(#[source] std::io::Error),
    /// The tunnel stream failed (reset, connection lost).
    #[error("tunnel stream: {0}")]
    Tunnel(#[source] std::io::Error),
    /// The tunnel stream ended without its end marker, or was malformed.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The daemon stopped before the connection ended.
    #[error("daemon shutting down")]
    Cancelled,
}

/// Copies `local` ↔ `tunnel` until both directions ended cleanly (each EOF
/// passed on as a half-close), or resets both on any failure or on
/// `cancel`. Returns (local→tunnel, tunnel→local) data bytes.
pub(crate) async fn splice(
    mut local: TcpStream,
    mut tunnel: StreamIo,
    cancel: &CancellationToken,
) -> Result<(u64, u64), SpliceError> {
    let result = {
        let (mut lr, mut lw) = local.split();
        let (mut tr, mut tw) = tokio::io::split(&mut tunnel);
        tokio::select! {
            r = async {
                tokio::try_join!(send_framed(&mut lr, &mut tw), recv_framed(&mut tr, &mut lw))
            } => r,
            _ = cancel.cancelled() => Err(SpliceError::Cancelled),
        }
    };
    if result.is_err() {
        reset(local);
        tunnel.abort();
    }
    result
}

/// Drops `s` with a TCP RST instead of a FIN, so its application reads an
/// error rather than a clean end.
pub(crate) fn reset(s: TcpStream) {
    let _ = s.set_zero_linger();
    drop(s);
}

/// Local → tunnel: each read becomes one chunk, written with its prefix in
/// one `write_all`; EOF becomes the end marker and a half-close.
async fn send_framed<R, W>(local: &mut R, tunnel: &mut W) -> Result<u64, SpliceError>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut buf = vec![0u8; PREFIX + SPLICE_BUF];
    let mut total = 0u64;
    loop {
        let n = local
            .read(&mut buf[PREFIX..])
            .await
            .map_err(SpliceError::Local)?;
        buf[..PREFIX].copy_from_slice(&frame::prefix(n));
        tunnel
            .write_all(&buf[..PREFIX + n])
            .await
            .map_err(SpliceError::Tunnel)?;
        if n == 0 {
            tunnel.shutdown().await.map_err(SpliceError::Tunnel)?;
            return Ok(total);
        }
        tunnel.flush().await.map_err(SpliceError::Tunnel)?;
        total += n as u64;
    }
}

/// Tunnel → local: chunks are written out as they arrive; the end marker
/// half-closes the local socket; an EOF before it is a cut.
async fn recv_framed<R, W>(tunnel: &mut R, local: &mut W) -> Result<u64, SpliceError>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut buf = vec![0u8; SPLICE_BUF];
    let mut dec = Decoder::default();
    loop {
        match dec.want() {
            Want::Ended => {
                local.shutdown().await.map_err(SpliceError::Local)?;
                return Ok(dec.delivered());
            }
            Want::Prefix => {
                let mut p = [0u8; PREFIX];
                match tunnel.read_exact(&mut p).await {
                    Ok(_) => dec.on_prefix(p)?,
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => dec.on_eof()?,
                    Err(e) => return Err(SpliceError::Tunnel(e)),
                }
            }
            Want::Data(left) => {
                let want = left.min(buf.len());
                let n = tunnel
                    .read(&mut buf[..want])
                    .await
                    .map_err(SpliceError::Tunnel)?;
                if n == 0 {
                    dec.on_eof()?;
                }
                local
                    .write_all(&buf[..n])
                    .await
                    .map_err(SpliceError::Local)?;
                dec.on_data(n);
            }
        }
    }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn framed_copy_round_trips_and_ends_cleanly() {
        let data = crate::testdata::pattern(300_000, 3);
        let (mut tx, mut rx) = tokio::io::duplex(64 * 1024);
        let sent = data.clone();
        let sender = tokio::spawn(async move {
            let mut src: &[u8] = &sent;
            send_framed(&mut src, &mut tx).await.unwrap()
        });
        let mut out = Vec::new();
        let got = recv_framed(&mut rx, &mut out).await.unwrap();
        assert_eq!(sender.await.unwrap(), data.len() as u64);
        assert_eq!(got, data.len() as u64);
        assert_eq!(out, data);
    }

    #[tokio::test]
    async fn a_stream_that_ends_without_the_marker_is_an_error() {
        let (mut tx, mut rx) = tokio::io::duplex(64 * 1024);
        tx.write_all(&frame::prefix(5)).await.unwrap();
        tx.write_all(b"hello").await.unwrap();
        drop(tx); // what a dead yamux connection looks like: EOF
        let mut out = Vec::new();
        let r = recv_framed(&mut rx, &mut out).await;
        assert!(
            matches!(r, Err(SpliceError::Frame(FrameError::Truncated(5)))),
            "{r:?}"
        );
        assert_eq!(out, b"hello");
    }

    #[tokio::test]
    async fn an_oversize_chunk_is_an_error() {
        let (mut tx, mut rx) = tokio::io::duplex(1024);
        tx.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        let r = recv_framed(&mut rx, &mut Vec::new()).await;
        assert!(
            matches!(r, Err(SpliceError::Frame(FrameError::Oversize(_)))),
            "{r:?}"
        );
    }
}
