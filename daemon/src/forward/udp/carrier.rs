//! The tunnel side of one UDP flow, the same at both ends: datagrams go as
//! QUIC datagrams when the tunnel is QUIC and the datagram fits the path,
//! else length-prefixed on the flow's stream (`wire.rs`); both are read.

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::wire::{frame, Reassembler};
use crate::tunnel::{DatagramLink, StreamIo};

/// Read buffer for the flow's stream.
const READ_BUF: usize = 16 * 1024;

/// Why a flow's tunnel side ended.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CarrierError {
    /// The stream failed or was reset.
    #[error("tunnel stream: {0}")]
    Io(#[from] std::io::Error),
    /// The stream ended inside a datagram (the far side was cut).
    #[error("flow stream cut inside a datagram ({0} bytes pending)")]
    Cut(usize),
}

/// Writes `datagrams` framed on `stream` in one write and one flush
/// (nothing for none).
pub(crate) async fn write_framed<W, D>(stream: &mut W, datagrams: &[D]) -> std::io::Result<()>
where
    W: tokio::io::AsyncWrite + Unpin,
    D: AsRef<[u8]>,
{
    let mut out = Vec::new();
    for d in datagrams {
        if let Some(framed) = frame(d.as_ref()) {
            out.extend_from_slice(&framed);
        }
    }
    if !out.is_empty() {
        stream.write_all(&out).await?;
        stream.flush().await?;
    }
    Ok(())
}

/// One flow's stream and, on QUIC, its datagram link.
pub(crate) struct Carrier {
    stream: StreamIo,
    link: Option<DatagramLink>,
    reassembler: Reassembler,
    buf: Vec<u8>,
    /// The far side's stream ended: only datagrams may still come.
    stream_done: bool,
}

impl Carrier {
    pub(crate) fn new(stream: StreamIo, link: Option<DatagramLink>) -> Self {
        Self {
            stream,
            link,
            reassembler: Reassembler::default(),
            buf: vec![0u8; READ_BUF],
            stream_done: false,
        }
    }

    /// Whether datagrams ride QUIC datagrams (for the log).
    pub(crate) fn uses_quic_datagrams(&self) -> bool {
        self.link.is_some()
    }

    /// Sends datagrams toward the far side, in order. Those that do not
    /// go as QUIC datagrams are framed into one buffer and written at
    /// once: one write and one flush (one mux frame, one TLS record) for a
    /// burst instead of one per datagram, which at 100 Mbit/s of 1,200-byte
    /// datagrams over the TCP path was the difference between keeping up
    /// and dropping. Datagrams over [`super::wire::MAX_DATAGRAM`] cannot be
    /// read from a UDP socket, so `frame` never refuses one here; if it
    /// did, the datagram is dropped.
    pub(crate) async fn send_all(&mut self, datagrams: &[Bytes]) -> Result<(), CarrierError> {
        let link = self.link.as_ref();
        let rest: Vec<&Bytes> = datagrams
            .iter()
            .filter(|d| !link.is_some_and(|l| l.try_send(d)))
            .collect();
        write_framed(&mut self.stream, &rest).await?;
        Ok(())
    }

    /// The next datagram from the far side; `None` when the flow's stream
    /// ended cleanly (the far side closed the flow). Cancel-safe: bytes
    /// read wait in the reassembler.
    pub(crate) async fn recv(&mut self) -> Result<Option<Bytes>, CarrierError> {
        let Self {
            stream,
            link,
            reassembler,
            buf,
            stream_done,
        } = self;
        loop {
            if let Some(d) = reassembler.pop() {
                return Ok(Some(d));
            }
            if *stream_done {
                return Ok(None);
            }
            let from_link = async {
                match link.as_mut() {
                    Some(l) => l.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                n = stream.read(buf) => {
                    let n = n?;
                    if n == 0 {
                        let pending = reassembler.pending();
                        if pending > 0 {
                            return Err(CarrierError::Cut(pending));
                        }
                        *stream_done = true;
                    } else {
                        reassembler.push(&buf[..n]);
                    }
                }
                Some(d) = from_link => return Ok(Some(d)),
            }
        }
    }

    /// Ends the flow: the stream's send side finishes (the far side reads
    /// a clean end and closes its side of the flow).
    pub(crate) async fn close(mut self) {
        let _ = self.stream.shutdown().await;
    }
}
