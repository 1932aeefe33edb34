//! The stream header: the few bytes that open every tunnel stream, so the
//! side that accepts it knows what is asked and can say no.
//!
//! ```text
//! opener → [version=2][len][service name]        (len ≤ 67: `name#n`, forward/ranges.rs)
//! exposer → [status][len][reason]                (status 0 = ok)
//! ```
//!
//! After an accepted header, a forwarded stream's data is framed
//! (`forward/frame.rs`); version 2 is that framing (version 1 sent raw
//! bytes and could not tell a cut tunnel from a clean end).
//!
//! Service names that start with `_` are reserved for the tunnel's own
//! control streams (a configured service cannot start with `_`):
//! [`PING_SERVICE`] for keepalive, and [`SELECT_PREFIX`]`<session>` for
//! the race's choice of path.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Header version: 2 since stream data is framed with an end marker.
const VERSION: u8 = 2;
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
        if name.is_empty() || name.len() > MAX_REQUEST_LEN {
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
