//! The byte link to the rendezvous: plain TCP for `http://`, TLS (rustls)
//! for `https://`, verified against the built-in Mozilla roots
//! (`webpki-roots`, so a container without a CA bundle still verifies) or
//! the `[rendezvous] ca_file` alone.
//!
//! The caller dials: the control connection must leave from the punch
//! port (SO_REUSEADDR + SO_REUSEPORT) so the server observes the mapping
//! the punch reuses, so this module only wraps a connected `TcpStream`.

use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::url::{ws_target, Target, UrlError};

/// Why the rendezvous link could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// The URL is not usable.
    #[error(transparent)]
    Url(#[from] UrlError),
    /// `ca_file` unreadable or not PEM certificates.
    #[error("[rendezvous] ca_file {}: {reason}", path.display())]
    CaFile {
        /// The file.
        path: PathBuf,
        /// What is wrong and what to do.
        reason: String,
    },
    /// The server's certificate did not verify.
    #[error("rendezvous {url}: the server's TLS certificate is not trusted ({reason}); if it is signed by a private CA or self-signed, set [rendezvous] ca_file to that CA's PEM certificate")]
    Untrusted {
        /// The URL.
        url: String,
        /// What rustls said.
        reason: String,
    },
    /// Another TLS failure (not TLS at all, protocol error, reset).
    #[error("rendezvous {url}: TLS handshake failed: {source}; is it really an https:// server?")]
    Handshake {
        /// The URL.
        url: String,
        /// What went wrong.
        #[source]
        source: io::Error,
    },
}

/// Where the rendezvous is and how to speak to it. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    url: String,
    target: Target,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Endpoint {
    /// Parses `url` and, for `https://`, builds the verifier (from
    /// `ca_file` if given). Warns when plain http leaves the host.
    pub(crate) fn new(url: &str, ca_file: Option<&Path>) -> Result<Self, LinkError> {
        let target = ws_target(url)?;
        let tls = if target.tls {
            Some(Arc::new(client_config(ca_file)?))
        } else {
            if !is_loopback_host(&target.host) {
                tracing::warn!(%url, "the rendezvous link is plain http: the network token, registrations and relay tokens cross the network unencrypted; use https:// (and pin [rendezvous] server_key)");
            }
            None
        };
        Ok(Self {
            url: url.to_owned(),
            target,
            tls,
        })
    }

    /// The URL as configured.
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// Another instance of the same rendezvous (a punch order's
    /// `relay_url`), verified the same way: same roots for https.
    pub(crate) fn sibling(&self, url: &str) -> Result<Self, LinkError> {
        let target = ws_target(url)?;
        let tls = match (&self.tls, target.tls) {
            (_, false) => None,
            (Some(same), true) => Some(same.clone()),
            (None, true) => Some(Arc::new(client_config(None)?)),
        };
        Ok(Self {
            url: url.to_owned(),
            target,
            tls,
        })
    }

    /// `host:port` to resolve and dial.
    pub(crate) fn host_port(&self) -> &str {
        &self.target.host_port
    }

    /// The WebSocket URL of `path` (e.g. `/v1/ws`) on this server.
    pub(crate) fn ws_url(&self, path: &str) -> String {
        let scheme = if self.tls.is_some() { "wss" } else { "ws" };
        format!("{scheme}://{}{path}", self.target.authority)
    }

    /// Wraps a connected stream: TLS for https, as is for http.
    pub(crate) async fn wrap(&self, tcp: TcpStream) -> Result<RvStream, LinkError> {
        let Some(config) = &self.tls else {
            return Ok(RvStream::Plain(tcp));
        };
        let name = ServerName::try_from(self.target.host.clone()).map_err(|_| {
            UrlError::new(&self.url, "has a host that is neither a DNS name nor an IP")
        })?;
        let connector = tokio_rustls::TlsConnector::from(config.clone());
        match connector.connect(name, tcp).await {
            Ok(tls) => Ok(RvStream::Tls(Box::new(tls))),
            Err(e) => Err(classify(&self.url, e)),
        }
    }
}

/// A refused certificate gets the message that says what to do about it.
fn classify(url: &str, e: io::Error) -> LinkError {
    let cert = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .filter(|r| {
            matches!(
                r,
                rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented
            )
        })
        .map(ToString::to_string);
    match cert {
        Some(reason) => LinkError::Untrusted {
            url: url.to_owned(),
            reason,
        },
        None => LinkError::Handshake {
            url: url.to_owned(),
            source: e,
        },
    }
}

fn client_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, LinkError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let bad = |reason: String| LinkError::CaFile {
                path: path.to_owned(),
                reason,
            };
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| bad(format!("{e}; give the CA certificate in PEM form")))?;
            if certs.is_empty() {
                return Err(bad("holds no PEM certificate".to_owned()));
            }
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| bad(format!("{e}; give the CA certificate in PEM form")))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| LinkError::CaFile {
            path: ca_file.map(Path::to_owned).unwrap_or_default(),
            reason: e.to_string(),
        })?;
    Ok(builder.with_root_certificates(roots).with_no_client_auth())
}

/// Whether plain http to `host` stays on this machine.
pub(crate) fn is_loopback_host(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.eq_ignore_ascii_case("localhost")
        || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The rendezvous link: plain or TLS.
#[derive(Debug)]
pub(crate) enum RvStream {
    /// `http://`.
    Plain(TcpStream),
    /// `https://`.
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for RvStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(t) => Pin::new(t).poll_read(cx, buf),
            Self::Tls(t) => Pin::new(t.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for RvStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(t) => Pin::new(t).poll_write(cx, data),
            Self::Tls(t) => Pin::new(t.as_mut()).poll_write(cx, data),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(t) => Pin::new(t).poll_flush(cx),
            Self::Tls(t) => Pin::new(t.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(t) => Pin::new(t).poll_shutdown(cx),
            Self::Tls(t) => Pin::new(t.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        assert!(is_loopback_host("127.0.0.1"));
        assert!(is_loopback_host("[::1]"));
        assert!(is_loopback_host("LocalHost"));
        assert!(!is_loopback_host("203.0.113.1"));
        assert!(!is_loopback_host("rv.example"));
    }

    #[test]
    fn https_urls_become_wss() {
        let e = Endpoint::new("https://rv.example", None).unwrap();
        assert_eq!(e.host_port(), "rv.example:443");
        assert_eq!(e.ws_url("/v1/ws"), "wss://rv.example/v1/ws");
        let p = Endpoint::new("http://127.0.0.1:8080/", None).unwrap();
        assert_eq!(p.ws_url("/v1/ws"), "ws://127.0.0.1:8080/v1/ws");
    }

    #[test]
    fn a_relay_on_another_instance_is_reached_like_ours() {
        let ours = Endpoint::new("https://rv1.example", None).unwrap();
        let other = ours.sibling("https://rv2.example:8443").unwrap();
        assert_eq!(other.host_port(), "rv2.example:8443");
        assert_eq!(
            other.ws_url("/v1/relay/s?token=t"),
            "wss://rv2.example:8443/v1/relay/s?token=t"
        );
        let plain = Endpoint::new("http://127.0.0.1:8080", None).unwrap();
        let lab = plain.sibling("http://127.0.0.1:8081").unwrap();
        assert_eq!(lab.ws_url("/v1/ws"), "ws://127.0.0.1:8081/v1/ws");
        assert!(plain.sibling("ftp://x").is_err());
    }

    #[test]
    fn a_missing_ca_file_names_the_key() {
        let e = Endpoint::new("https://rv.example", Some(Path::new("/nonexistent/ca.pem")))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("[rendezvous] ca_file /nonexistent/ca.pem"),
            "{e}"
        );
    }
}
