//! What the server proves about itself: its Ed25519 order-signing key
//! (`key_file`) and, with `[tls]`, its certificate.
//!
//! TLS here protects the link (token, registrations, relay capabilities);
//! the signing key protects punch orders end to end, also across a
//! TLS-terminating proxy, for daemons that pin it. The TLS handshake runs
//! in its own task per connection ([`TlsListener`]), so a slow or silent
//! client never holds up accepting the next one.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ed25519_dalek::pkcs8::{DecodePrivateKey as _, EncodePrivateKey as _};
use ed25519_dalek::SigningKey;
use punch_config::RendezvousConfig;
use punch_service::secret_file::{self, SecretFileError};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::protocol::b64;

/// Why the server's key or certificate could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrustError {
    /// A key file is unreadable, exposed, or could not be created.
    #[error("key_file: {0}")]
    KeyFile(#[from] SecretFileError),
    /// The file is not a PKCS#8 Ed25519 key.
    #[error("{}: not an Ed25519 private key in PKCS#8 PEM form ({reason}); delete it to have a new one made, or make one with `punch-rendezvous keygen --out FILE`", path.display())]
    KeyFormat {
        /// The file.
        path: PathBuf,
        /// What the decoder said.
        reason: String,
    },
    /// The OS random source failed.
    #[error("no randomness for a server key: {0}")]
    Random(String),
    /// `[tls]` cert or key unusable.
    #[error("[tls] {what} {}: {reason}", path.display())]
    Tls {
        /// `cert` or `key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong and what to do.
        reason: String,
    },
}

/// The server's signing key and optional TLS acceptor.
pub struct Trust {
    pub(crate) key: SigningKey,
    pub(crate) tls: Option<TlsAcceptor>,
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Trust({}, tls: {})",
            self.public_key(),
            self.tls.is_some()
        )
    }
}

impl Trust {
    /// Loads (or, where `key_file` names a missing file, creates) the
    /// signing key and loads `[tls]`. Without `key_file` the key is made
    /// now and lives as long as the process.
    pub fn from_config(cfg: &RendezvousConfig) -> Result<Self, TrustError> {
        let key = match &cfg.key_file {
            Some(path) => load_or_create_key(path)?,
            None => generate_key()?,
        };
        let tls = match &cfg.tls {
            Some(t) => Some(acceptor(&t.cert, &t.key)?),
            None => None,
        };
        Ok(Self { key, tls })
    }

    /// The order-signing public key, base64: what daemons pin.
    pub fn public_key(&self) -> String {
        b64(self.key.verifying_key().as_bytes())
    }
}

fn generate_key() -> Result<SigningKey, TrustError> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| TrustError::Random(e.to_string()))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Writes a new key file (0600, never over an existing one).
pub fn create_key(path: &Path) -> Result<SigningKey, TrustError> {
    let key = generate_key()?;
    let format = |reason: String| TrustError::KeyFormat {
        path: path.to_owned(),
        reason,
    };
    let pem = key
        .to_pkcs8_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
        .map_err(|e| format(e.to_string()))?;
    secret_file::write_private(path, pem.as_bytes(), false)?;
    Ok(key)
}

/// Loads a key file, refusing one group or others can read.
pub fn load_key(path: &Path) -> Result<SigningKey, TrustError> {
    let pem = secret_file::read_private(path)?;
    SigningKey::from_pkcs8_pem(&pem).map_err(|e| TrustError::KeyFormat {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

fn load_or_create_key(path: &Path) -> Result<SigningKey, TrustError> {
    if path.exists() {
        return load_key(path);
    }
    let key = create_key(path)?;
    tracing::info!(path = %path.display(), "created the server key");
    Ok(key)
}

fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TrustError> {
    let bad = |what, path: &Path, reason: String| TrustError::Tls {
        what,
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| bad("cert", cert, format!("{e}; give a PEM certificate chain")))?;
    if certs.is_empty() {
        return Err(bad("cert", cert, "holds no PEM certificate".to_owned()));
    }
    let pem = secret_file::read_private(key).map_err(|e| bad("key", key, e.to_string()))?;
    let private = PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| {
        bad(
            "key",
            key,
            format!("{e}; give the certificate's PEM private key"),
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(certs, private))
        .map_err(|e| {
            bad(
                "key",
                key,
                format!("{e}; does the key belong to the certificate?"),
            )
        })?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}
