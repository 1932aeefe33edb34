//! A punched connection, closed the way the NATs on its path need.
//!
//! Closing a direct tunnel leaves a conntrack entry for the punch 4-tuple
//! in each NAT, and the next punch reuses that 4-tuple. Linux conntrack
//! lets a new SYN reopen a closed entry only if a FIN was seen on it, or if
//! the last RST it saw went the same way as the SYN. After a bare RST the
//! peer's own last packets (an ACK, its RST) usually arrive after ours, so
//! neither side's SYN may reopen the entry: the NAT drops them as invalid
//! and answers with RSTs until conntrack's 10 s CLOSE timeout, which every
//! retry refreshes. A FIN seen first makes any later SYN welcome.
//!
//! So a tunnel socket closes in two steps: `shutdown()` queues the FIN and
//! waits until the kernel has actually sent it, then dropping the socket
//! aborts it (RST), so no TIME_WAIT holds the 4-tuple for a minute.

use std::future::Future;
use std::io;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

/// The longest a shutdown waits for the kernel to send the FIN. Normally
/// it leaves at once; it is held back while earlier segments are still
/// queued below the socket (TCP small queues), or the window is closed.
const FIN_SEND_MAX: Duration = Duration::from_millis(500);
/// How often a waiting shutdown looks again: the kernel offers no
/// readiness event for "everything sent" once the write side is shut.
const FIN_SEND_POLL: Duration = Duration::from_millis(2);

/// Makes a socket close with RST rather than FIN: no TIME_WAIT is left on
/// its 4-tuple, which would otherwise block reconnecting between the same
/// ports for a minute.
///
/// Every punch socket is set so before it connects, too. A connecting
/// socket dropped half open (in SYN_RECV: the peer's SYN met ours, our
/// SYN-ACK is unanswered; the punch ended or a birthday mapping was
/// re-armed at that moment) would otherwise close with a FIN and stay
/// behind as an orphan in FIN_WAIT1 for up to ~100 s, and every later
/// `connect()` between the same two ports, the next punch's included,
/// fails with EADDRNOTAVAIL (a CI run once lost a whole minute of punches
/// to one). [`PunchedStream::new`] restores the normal close.
pub(crate) fn set_abortive_close(socket: &impl AsFd) {
    let _ = socket2::SockRef::from(socket).set_linger(Some(Duration::ZERO));
}

/// A punched connection.
///
/// When we drop it, the mux and TLS have already said goodbye and shut the
/// write side down (see [`PunchedStream::poll_shutdown`]: the FIN is on the
/// wire), and the socket is then aborted (RST).
///
/// When the process dies instead (SIGKILL, a crash), `Drop` never runs and
/// the kernel closes the socket normally: the peer's side and both NATs see
/// a FIN, which is what lets the restarted peer punch again at once. The
/// orphaned socket goes away as soon as the surviving peer aborts its side.
#[derive(Debug)]
pub(crate) struct PunchedStream {
    stream: TcpStream,
    /// Set once our FIN is queued: until when to wait for it to leave, and
    /// the timer for the next look.
    closing: Option<(Instant, Pin<Box<Sleep>>)>,
}

impl PunchedStream {
    /// Takes a connection that was set to abort on close while it
    /// connected ([`set_abortive_close`]) and lets it close normally again
    /// until we drop it: if the process dies, the kernel's FIN is what lets
    /// the restarted peer punch again at once (see above).
    pub(super) fn new(stream: TcpStream) -> Self {
        let _ = socket2::SockRef::from(&stream).set_linger(None);
        Self {
            stream,
            closing: None,
        }
    }

    /// A second handle on the socket for closing it with a FIN after
    /// whoever owns the stream has dropped it: a TLS handshake that fails
    /// drops its stream inside the handshake, with no chance to shut it
    /// down first, and the punch about to be retried on the same ports
    /// needs the NATs to have seen that FIN (module docs). `None` if the
    /// descriptor cannot be duplicated.
    pub(crate) fn fin_closer(&self) -> Option<FinCloser> {
        socket2::SockRef::from(&self.stream)
            .try_clone()
            .ok()
            .map(|socket| FinCloser { socket })
    }
}

/// See [`PunchedStream::fin_closer`]. Dropping it without calling
/// [`FinCloser::close`] only closes the duplicate descriptor.
#[derive(Debug)]
pub(crate) struct FinCloser {
    socket: socket2::Socket,
}

impl FinCloser {
    /// Sends our FIN and waits (at most `max_wait`) until the kernel has
    /// put it on the wire; the socket is then closed, with a RST when the
    /// stream was dropped first (it set the abortive close).
    pub(crate) async fn close(self, max_wait: Duration) {
        if self.socket.shutdown(std::net::Shutdown::Write).is_err() {
            return; // reset already, or never connected: nothing to send
        }
        let give_up = Instant::now() + max_wait;
        while unsent(&self.socket).is_some_and(|n| n > 0) && Instant::now() < give_up {
            tokio::time::sleep(FIN_SEND_POLL).await;
        }
    }
}

impl Drop for PunchedStream {
    fn drop(&mut self) {
        set_abortive_close(&self.stream);
    }
}

/// Bytes queued on `stream` that the kernel has not sent yet, our FIN
/// counting as one; `None` when it cannot tell.
#[allow(unsafe_code)]
fn unsent(stream: &impl std::os::fd::AsRawFd) -> Option<u32> {
    // linux/sockios.h; not in the libc crate.
    const SIOCOUTQNSD: u32 = 0x894B;
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQNSD writes one int through the pointer, which points
    // at `n` for the duration of the call; the descriptor stays open while
    // `stream` is borrowed.
    let rc = unsafe { libc::ioctl(stream.as_raw_fd(), SIOCOUTQNSD as _, &mut n) };
    (rc == 0).then(|| u32::try_from(n).unwrap_or(0))
}

impl AsyncRead for PunchedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for PunchedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    /// Shuts the write side down and completes once the FIN has been sent
    /// (or after [`FIN_SEND_MAX`]), so that the abort on drop cannot
    /// discard it.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.closing.is_none() {
            ready!(Pin::new(&mut this.stream).poll_shutdown(cx))?;
        }
        let (give_up, tick) = this.closing.get_or_insert_with(|| {
            let now = Instant::now();
            (now + FIN_SEND_MAX, Box::pin(tokio::time::sleep_until(now)))
        });
        loop {
            let now = Instant::now();
            if unsent(&this.stream).is_none_or(|n| n == 0) || now >= *give_up {
                return Poll::Ready(Ok(()));
            }
            ready!(tick.as_mut().poll(cx));
            tick.as_mut().reset(now + FIN_SEND_POLL);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// A loopback connection: our punched end and the peer's plain end.
    async fn connected_pair() -> (PunchedStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (PunchedStream::new(client.unwrap()), server.unwrap().0)
    }

    /// A closing tunnel must put everything it wrote, and then its FIN, on
    /// the wire before it aborts. Here the reader is slow, so at shutdown
    /// the data and the FIN are still queued in the kernel (the window is
    /// closed): an abort right after `shutdown()` would discard both and
    /// the reader would see a reset instead of the end of the stream.
    #[tokio::test]
    async fn shutdown_sends_queued_data_and_fin_before_the_abort() {
        let (mut writer, mut reader) = connected_pair().await;

        // Fill the reader's window and our send buffer until a write blocks.
        let chunk = vec![7u8; 64 * 1024];
        let mut written = 0usize;
        while let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(50), writer.write(&chunk)).await
        {
            written += n;
        }
        assert!(unsent(&writer.stream).unwrap() > 0, "nothing left queued");

        let read_all = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let mut got = Vec::new();
            let r = reader.read_to_end(&mut got).await;
            (r.map(|_| got.len()), reader)
        });
        writer.shutdown().await.unwrap();
        assert_eq!(unsent(&writer.stream), Some(0), "the FIN has not left");
        drop(writer); // the abort

        let (read, _reader) = read_all.await.unwrap();
        assert_eq!(
            read.unwrap(),
            written,
            "the reader saw a reset, not our FIN"
        );
    }

    /// A stream dropped without a shutdown (a failed TLS handshake drops
    /// it inside the handshake) still ends with our FIN before the abort
    /// when its `fin_closer` closes it: the peer reads the end of the
    /// stream, not a reset. Without the closer it would read a reset.
    #[tokio::test]
    async fn fin_closer_sends_the_fin_of_a_dropped_stream_before_the_abort() {
        let (mut stream, mut reader) = connected_pair().await;
        stream.write_all(b"hello").await.unwrap();
        let closer = stream.fin_closer().unwrap();
        drop(stream); // sets the abortive close; the socket stays open
        closer.close(FIN_SEND_MAX).await;

        let mut got = Vec::new();
        let read = reader.read_to_end(&mut got).await;
        assert_eq!(read.unwrap(), 5, "the reader saw a reset, not our FIN");
        assert_eq!(got, b"hello");
    }
}
