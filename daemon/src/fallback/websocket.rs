//! The relayed transport: a WebSocket to `punch-rendezvous`'s
//! `/v1/relay/{session}`, presented as a plain byte stream so the same
//! TLS + mux tunnel runs over it as over a punched TCP connection. The
//! server pairs the two sides and sees only TLS records.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use futures::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::FallbackError;
use crate::control::link::{Endpoint, RvStream};

/// Largest frame we send; the server accepts up to 256 KiB.
const MAX_FRAME: usize = 64 * 1024;
/// The largest relay message accepted from the server.
const MAX_INBOUND: usize = 256 * 1024;

/// Opens the relay for `session` with this side's `token`.
pub(crate) async fn connect(
    rendezvous: &Endpoint,
    session: &str,
    token: &str,
) -> Result<(WsBytes, std::net::SocketAddr), FallbackError> {
    let url = rendezvous.ws_url(&format!("/v1/relay/{session}?token={token}"));
    let tcp = tokio::net::TcpStream::connect(rendezvous.host_port()).await?;
    let remote = tcp.peer_addr()?;
    let _ = tcp.set_nodelay(true);
    // Over https the relay token (in the URL) and the tunnel's TLS records
    // ride inside the link's TLS too.
    let link = rendezvous.wrap(tcp).await?;
    // The server relays the peer's frames, at most its own frame cap
    // (256 KiB); anything larger is refused rather than buffered.
    let (ws, _) = tokio_tungstenite::client_async_with_config(
        url,
        link,
        Some(crate::control::ws_limits(MAX_INBOUND)),
    )
    .await?;
    Ok((
        WsBytes {
            ws,
            pending: Bytes::new(),
        },
        remote,
    ))
}

/// Binary WebSocket frames as an `AsyncRead + AsyncWrite` byte stream.
#[derive(Debug)]
pub(crate) struct WsBytes {
    ws: WebSocketStream<RvStream>,
    /// The unread rest of the last frame.
    pending: Bytes,
}

impl AsyncRead for WsBytes {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                let chunk = self.pending.split_to(n);
                buf.put_slice(&chunk);
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut self.ws).poll_next(cx)) {
                Some(Ok(Message::Binary(data))) => self.pending = data,
                Some(Ok(Message::Close(_))) | None => return Poll::Ready(Ok(())),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Poll::Ready(Err(io::Error::other(e))),
            }
        }
    }
}

impl AsyncWrite for WsBytes {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(Pin::new(&mut self.ws).poll_ready(cx)).map_err(io::Error::other)?;
        let n = data.len().min(MAX_FRAME);
        Pin::new(&mut self.ws)
            .start_send(Message::binary(data[..n].to_vec()))
            .map_err(io::Error::other)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws)
            .poll_flush(cx)
            .map_err(io::Error::other)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws)
            .poll_close(cx)
            .map_err(io::Error::other)
    }
}
