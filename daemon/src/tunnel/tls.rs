//! Mutual TLS 1.3 with pinned Ed25519 raw public keys (RFC 7250).
//!
//! There is no CA: each side presents its raw public key and accepts exactly
//! one key, the one configured in `[[peers]]` for the peer it punched to.
//! The same configs serve TCP (via tokio-rustls) and QUIC (quinn), so one
//! identity model covers every path. The one difference: a QUIC endpoint
//! is shared by all peers, so its server side accepts any key in
//! `[[peers]]` ([`server_config_any`]) and the connection is matched to a
//! peer by the key it presented.

use std::sync::Arc;

use punch_config::PublicKeyBytes;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{
    verify_tls13_signature_with_raw_key, CryptoProvider, WebPkiSupportedAlgorithms,
};
use rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, SubjectPublicKeyInfoDer,
    UnixTime,
};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::identity::{spki_der, Identity};

/// Errors building TLS configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsSetupError {
    /// The key could not be turned into a rustls signing key.
    #[error("cannot use the identity key for TLS: {0}")]
    Key(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// The name the client sends in SNI. Not checked: the key is what counts.
pub(crate) const SERVER_NAME: &str = "punchd.invalid";

/// ALPN for the tunnel, so a punchd tunnel can never be confused with
/// another TLS protocol on the same port.
pub(crate) const ALPN: &[u8] = b"punchd/1";

/// ring's TLS 1.3 suites, AES-128-GCM first (ring's default puts AES-256
/// first): with AES-NI it is the fastest AEAD on these machines (one core,
/// 16 KiB: 3.4–3.5 GB/s, AES-256-GCM 3.3, ChaCha20-Poly1305 2.0), and its
/// 128-bit key matches the strength of the X25519 key exchange anyway.
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            TLS13_AES_128_GCM_SHA256,
            TLS13_AES_256_GCM_SHA384,
            TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..rustls::crypto::ring::default_provider()
    })
}

fn certified_key(
    identity: &Identity,
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, TlsSetupError> {
    let der = identity
        .pkcs8_der()
        .ok_or_else(|| TlsSetupError::Key("PKCS#8 encoding failed".into()))?;
    let spki = identity
        .spki_der()
        .ok_or_else(|| TlsSetupError::Key("SPKI encoding failed".into()))?;
    let signer = provider
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(der)))
        .map_err(|e| TlsSetupError::Key(e.to_string()))?;
    Ok(Arc::new(CertifiedKey::new(
        vec![CertificateDer::from(spki)],
        signer,
    )))
}

/// Client config that presents `identity` and accepts only `peer`.
pub(crate) fn client_config(
    identity: &Identity,
    peer: &PublicKeyBytes,
) -> Result<Arc<rustls::ClientConfig>, TlsSetupError> {
    let provider = provider();
    let verifier = Arc::new(PinnedKey::new(peer, &provider)?);
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(
            rustls::client::AlwaysResolvesClientRawPublicKeys::new(certified_key(
                identity, &provider,
            )?),
        ));
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(cfg))
}

/// Server config that presents `identity` and requires `peer` as client.
pub(crate) fn server_config(
    identity: &Identity,
    peer: &PublicKeyBytes,
) -> Result<Arc<rustls::ServerConfig>, TlsSetupError> {
    server_config_any(identity, std::slice::from_ref(peer))
}

/// Server config that presents `identity` and accepts any of `peers` as
/// client (the shared QUIC endpoint). An empty list accepts nobody.
pub(crate) fn server_config_any(
    identity: &Identity,
    peers: &[PublicKeyBytes],
) -> Result<Arc<rustls::ServerConfig>, TlsSetupError> {
    let provider = provider();
    let verifier = Arc::new(PinnedKey::any_of(peers, &provider)?);
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(
            rustls::server::AlwaysResolvesServerRawPublicKeys::new(certified_key(
                identity, &provider,
            )?),
        ));
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(cfg))
}

/// Which of `peers` presented `spki` (the raw public key a TLS session
/// authenticated, as rustls reports it).
pub(crate) fn presented_key(spki: &[u8], peers: &[PublicKeyBytes]) -> Option<PublicKeyBytes> {
    peers
        .iter()
        .find(|k| spki_der(k).is_some_and(|d| d == spki))
        .copied()
}

/// Accepts exactly the pinned raw public keys (one, except on the shared
/// QUIC endpoint), in either role.
#[derive(Debug)]
struct PinnedKey {
    spkis: Vec<Vec<u8>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl PinnedKey {
    fn new(key: &PublicKeyBytes, provider: &CryptoProvider) -> Result<Self, TlsSetupError> {
        Self::any_of(std::slice::from_ref(key), provider)
    }

    fn any_of(keys: &[PublicKeyBytes], provider: &CryptoProvider) -> Result<Self, TlsSetupError> {
        let spkis = keys
            .iter()
            .map(|k| {
                spki_der(k).ok_or_else(|| {
                    TlsSetupError::Key("peer public key is not a valid Ed25519 point".into())
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            spkis,
            algorithms: provider.signature_verification_algorithms,
        })
    }

    fn check(&self, presented: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        if self
            .spkis
            .iter()
            .any(|k| presented.as_ref() == k.as_slice())
        {
            Ok(())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.check(cert)?;
        verify_tls13_signature_with_raw_key(
            message,
            &SubjectPublicKeyInfoDer::from(cert.as_ref()),
            dss,
            &self.algorithms,
        )
    }
}

impl ServerCertVerifier for PinnedKey {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verify13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

impl ClientCertVerifier for PinnedKey {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verify13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Runs a handshake over an in-memory pipe: `client` expects
    /// `client_expects`, `server` expects `server_expects`.
    async fn handshake(
        client: &Identity,
        client_expects: PublicKeyBytes,
        server: &Identity,
        server_expects: PublicKeyBytes,
    ) -> (bool, bool) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let connector =
            tokio_rustls::TlsConnector::from(client_config(client, &client_expects).unwrap());
        let acceptor =
            tokio_rustls::TlsAcceptor::from(server_config(server, &server_expects).unwrap());
        let name = ServerName::try_from(SERVER_NAME).unwrap();
        let c = async {
            let mut s = connector.connect(name, a).await.ok()?;
            s.write_all(b"ping").await.ok()?;
            s.flush().await.ok()?;
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).await.ok()?;
            Some(buf == *b"pong")
        };
        let s = async {
            let mut s = acceptor.accept(b).await.ok()?;
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).await.ok()?;
            s.write_all(b"pong").await.ok()?;
            s.flush().await.ok()?;
            Some(buf == *b"ping")
        };
        let (c, s) = tokio::join!(c, s);
        (c == Some(true), s == Some(true))
    }

    #[tokio::test]
    async fn pinned_keys_authenticate_both_ways() {
        let (a, b) = (Identity::generate().unwrap(), Identity::generate().unwrap());
        assert_eq!(
            handshake(&a, b.public_key(), &b, a.public_key()).await,
            (true, true)
        );
    }

    #[tokio::test]
    async fn an_impostor_server_is_refused() {
        let (a, b, m) = (
            Identity::generate().unwrap(),
            Identity::generate().unwrap(),
            Identity::generate().unwrap(),
        );
        // a expects b, but m answers (and m would accept a).
        let (client_ok, _) = handshake(&a, b.public_key(), &m, a.public_key()).await;
        assert!(!client_ok);
    }

    #[tokio::test]
    async fn an_impostor_client_is_refused() {
        let (a, b, m) = (
            Identity::generate().unwrap(),
            Identity::generate().unwrap(),
            Identity::generate().unwrap(),
        );
        // b expects a, but m connects (m expects b, so m itself would be happy).
        let (_, server_ok) = handshake(&m, b.public_key(), &b, a.public_key()).await;
        assert!(!server_ok);
    }
}
