//! The stream header: the few bytes that open every tunnel stream, so the
//! side that accepts it knows what is asked and can say no.
//!
//! ```text
//! opener → [version=2][len][service name]              (TCP; len ≤ 67: `name#n`, forward/ranges.rs)
//! opener → [version=3][protocol][len][service name]    (0 = TCP, 1 = UDP)
//! exposer → [status][len][reason]                      (status 0 = ok)
//! ```
//!
//! After an accepted header, a forwarded TCP stream's data is framed
//! (`forward/frame.rs`); version 2 is that framing (version 1 sent raw
//! bytes and could not tell a cut tunnel from a clean end). Version 3 adds
//! the protocol: a UDP flow's stream carries length-prefixed datagrams
//! (`forward/udp/wire.rs`). TCP streams are still opened as version 2, so
//! TCP forwards keep working with daemons that predate UDP forwarding; a
//! version-3 header with a protocol we do not know is refused with a
//! reason, not dropped.
//!
//! Service names that start with `_` are reserved for the tunnel's own
//! control streams (a configured service cannot start with `_`):
//! [`PING_SERVICE`] for keepalive, and [`SELECT_PREFIX`]`<session>` for
//! the race's choice of path.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Header version: 2 since stream data is framed with an end marker.
const VERSION: u8 = 2;
/// Header version 3: a protocol byte follows the version.
const VERSION_PROTOCOL: u8 = 3;

/// What a stream carries (the protocol byte of a version-3 header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StreamProtocol {
    /// A forwarded TCP connection (framed bytes).
    Tcp,
    /// A UDP flow (length-prefixed datagrams).
    Udp,
}

impl StreamProtocol {
    fn byte(self) -> u8 {
        match self {
            StreamProtocol::Tcp => 0,
            StreamProtocol::Udp => 1,
        }
    }

    fn from_byte(b: u8) -> Option<Self> {
        match b {
            0 => Some(StreamProtocol::Tcp),
            1 => Some(StreamProtocol::Udp),
            _ => None,
        }
    }
}

impl From<punch_config::Protocol> for StreamProtocol {
    fn from(p: punch_config::Protocol) -> Self {
        match p {
            punch_config::Protocol::Tcp => StreamProtocol::Tcp,
            punch_config::Protocol::Udp => StreamProtocol::Udp,
        }
    }
}

/// A stream's request: which service, over which protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Request {
    pub(crate) service: String,
    pub(crate) protocol: StreamProtocol,
}
/// Reserved service for keepalive pings; `_` cannot start a service name.
pub(crate) const PING_SERVICE: &str = "_ping";
/// Prefix of the race's selection request (a reserved service name: `_`
/// cannot start a configured one).
pub(crate) const SELECT_PREFIX: &str = "_select:";
/// Longest service request: a 63-byte name, or `name#n` for the n-th
/// port of a range forward (`forward/ranges.rs`; n < 256).
pub(crate) const MAX_REQUEST_LEN: usize = 63 + 4;
/// Time allowed for a header to arrive.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// A version-3 header named a protocol this daemon does not know
    /// (a newer peer): refused with a reason, the stream closed.
    #[error("unknown stream protocol {0}")]
    UnknownProtocol(u8),
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

/// Opener: asks for `service` (a TCP stream), then waits for the verdict.
pub(crate) async fn request_service<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    service: &str,
) -> Result<(), HeaderError> {
    request_as(s, service, StreamProtocol::Tcp).await
}

/// Opener: asks for `service` over `protocol`, then waits for the verdict.
pub(crate) async fn request_as<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    service: &str,
    protocol: StreamProtocol,
) -> Result<(), HeaderError> {
    send_request(s, service, protocol).await?;
    read_verdict(s).await
}

/// Opener: sends the request (one write) without waiting for the verdict,
/// so a UDP flow's first datagrams can follow it at once and a DNS query
/// costs one round trip, not two. TCP goes as a version-2 header (older
/// daemons understand it), anything else as version 3.
pub(crate) async fn send_request<S: AsyncWrite + Unpin>(
    s: &mut S,
    service: &str,
    protocol: StreamProtocol,
) -> std::io::Result<()> {
    let name = &service.as_bytes()[..service.len().min(255)];
    let mut header = Vec::with_capacity(3 + name.len());
    match protocol {
        StreamProtocol::Tcp => header.push(VERSION),
        p => header.extend_from_slice(&[VERSION_PROTOCOL, p.byte()]),
    }
    header.push(name.len() as u8);
    header.extend_from_slice(name);
    s.write_all(&header).await?;
    s.flush().await
}

/// Opener: waits for the exposer's verdict on a request.
pub(crate) async fn read_verdict<S: AsyncRead + Unpin>(s: &mut S) -> Result<(), HeaderError> {
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

/// Exposer: reads which service is asked for (any protocol; the tunnel's
/// own control streams use this and only ever ask over TCP).
pub(crate) async fn read_request<S: AsyncRead + Unpin>(s: &mut S) -> Result<String, HeaderError> {
    read_header(s).await.map(|r| r.service)
}

/// Exposer: reads which service is asked for, over which protocol.
pub(crate) async fn read_header<S: AsyncRead + Unpin>(s: &mut S) -> Result<Request, HeaderError> {
    tokio::time::timeout(HEADER_TIMEOUT, async {
        let protocol = match s.read_u8().await? {
            VERSION => StreamProtocol::Tcp,
            VERSION_PROTOCOL => {
                let b = s.read_u8().await?;
                StreamProtocol::from_byte(b).ok_or(HeaderError::UnknownProtocol(b))?
            }
            _ => return Err(HeaderError::Malformed("unknown version")),
        };
        let service = read_short_string(s).await?;
        if service.is_empty() || service.len() > MAX_REQUEST_LEN {
            return Err(HeaderError::Malformed("bad service name length"));
        }
        Ok(Request { service, protocol })
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
        // Version 3 with a protocol from the future: its own error, so the
        // exposer can answer with a reason.
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(&[VERSION_PROTOCOL, 7, 3, b'd', b'n', b's'])
            .await
            .unwrap();
        assert!(matches!(
            read_header(&mut b).await,
            Err(HeaderError::UnknownProtocol(7))
        ));
    }

    #[tokio::test]
    async fn protocols_round_trip_and_tcp_stays_version_2() {
        for p in [StreamProtocol::Tcp, StreamProtocol::Udp] {
            let (mut a, mut b) = tokio::io::duplex(1024);
            let server = tokio::spawn(async move {
                let mut first = [0u8; 1];
                let req = {
                    // Peek the version by reading the whole header from a
                    // copy of the bytes.
                    let mut wire = Vec::new();
                    let mut buf = [0u8; 64];
                    let n = b.read(&mut buf).await.unwrap();
                    wire.extend_from_slice(&buf[..n]);
                    first[0] = wire[0];
                    read_header(&mut wire.as_slice()).await.unwrap()
                };
                reply(&mut b, Ok(())).await.unwrap();
                (first[0], req)
            });
            request_as(&mut a, "dns", p).await.unwrap();
            let (version, req) = server.await.unwrap();
            assert_eq!(req.service, "dns");
            assert_eq!(req.protocol, p);
            let want = if p == StreamProtocol::Tcp {
                VERSION
            } else {
                VERSION_PROTOCOL
            };
            assert_eq!(version, want);
        }
    }
}
