//! A daemon's Ed25519 identity: one key signs the rendezvous hello and
//! authenticates the tunnel (as a TLS raw public key), so "who registered as
//! alice" and "who is at the other end of this tunnel" are the same question.

use std::path::{Path, PathBuf};

use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::SigningKey;
use punch_config::PublicKeyBytes;
use punch_service::secret_file::{self, SecretFileError};

/// Errors loading or creating an identity file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// Group or others may read it, or it could not be read or written.
    #[error(transparent)]
    File(SecretFileError),
    /// `keygen` refuses to replace an existing key.
    #[error("{} already exists; refusing to overwrite an identity (delete it first if you mean to)", path.display())]
    Exists {
        /// The identity file.
        path: PathBuf,
    },
    /// The file is not a PKCS#8 Ed25519 key.
    #[error("{}: not an Ed25519 private key in PKCS#8 PEM form ({reason}); create one with `punchd keygen`", path.display())]
    Format {
        /// The identity file.
        path: PathBuf,
        /// What the decoder said.
        reason: String,
    },
    /// The OS random source failed.
    #[error("no randomness available: {0}")]
    Random(String),
}

/// An Ed25519 signing key and the forms of it the daemon needs.
#[derive(Clone)]
pub struct Identity {
    key: SigningKey,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity({})", self.public_key())
    }
}

impl Identity {
    /// A fresh random identity.
    pub fn generate() -> Result<Self, IdentityError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| IdentityError::Random(e.to_string()))?;
        Ok(Self {
            key: SigningKey::from_bytes(&seed),
        })
    }

    /// Loads a PKCS#8 PEM identity file, refusing one that group or others
    /// can read: the key is the daemon's whole identity.
    pub fn load(path: &Path) -> Result<Self, IdentityError> {
        let pem = secret_file::read_private(path).map_err(IdentityError::File)?;
        let key = SigningKey::from_pkcs8_pem(&pem).map_err(|e| IdentityError::Format {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        Ok(Self { key })
    }

    /// Writes the identity to a new file with mode 0600; never overwrites.
    pub fn save_new(&self, path: &Path) -> Result<(), IdentityError> {
        let pem = self
            .key
            .to_pkcs8_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
            .map_err(|e| IdentityError::Format {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
        secret_file::write_private(path, pem.as_bytes(), false).map_err(|e| match e {
            SecretFileError::Exists { path } => IdentityError::Exists { path },
            other => IdentityError::File(other),
        })
    }

    /// The public half, as config files and the rendezvous carry it.
    pub fn public_key(&self) -> PublicKeyBytes {
        PublicKeyBytes(self.key.verifying_key().to_bytes())
    }

    /// The signing key (hello signatures).
    pub fn signing_key(&self) -> &SigningKey {
        &self.key
    }

    /// PKCS#8 DER of the private key, for rustls.
    pub(crate) fn pkcs8_der(&self) -> Option<Vec<u8>> {
        self.key.to_pkcs8_der().ok().map(|d| d.as_bytes().to_vec())
    }

    /// SubjectPublicKeyInfo DER: what a TLS raw public key carries.
    pub(crate) fn spki_der(&self) -> Option<Vec<u8>> {
        spki_der(&self.public_key())
    }
}

/// SubjectPublicKeyInfo DER of an Ed25519 public key.
pub(crate) fn spki_der(key: &PublicKeyBytes) -> Option<Vec<u8>> {
    let vk = ed25519_dalek::VerifyingKey::from_bytes(&key.0).ok()?;
    vk.to_public_key_der().ok().map(|d| d.as_bytes().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("punchd-id-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn keygen_writes_0600_and_refuses_to_overwrite() {
        let dir = temp("keygen");
        let path = dir.join("a.key");
        let id = Identity::generate().unwrap();
        id.save_new(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(matches!(
            Identity::generate().unwrap().save_new(&path),
            Err(IdentityError::Exists { .. })
        ));
        let loaded = Identity::load(&path).unwrap();
        assert_eq!(loaded.public_key(), id.public_key());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn a_key_readable_by_others_is_refused_with_the_chmod_hint() {
        use std::os::unix::fs::PermissionsExt;
        let dir = temp("exposed");
        let path = dir.join("a.key");
        Identity::generate().unwrap().save_new(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Identity::load(&path).unwrap_err().to_string();
        assert!(
            e.contains(&format!("run `chmod 600 {}`", path.display())),
            "{e}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Identity::load(&path).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn garbage_key_files_are_explained() {
        let dir = temp("garbage");
        let path = dir.join("bad.key");
        secret_file::write_private(&path, b"hello", false).unwrap();
        let e = Identity::load(&path).unwrap_err().to_string();
        assert!(e.contains("punchd keygen"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn spki_is_the_standard_ed25519_form() {
        let id = Identity::generate().unwrap();
        let spki = id.spki_der().unwrap();
        assert_eq!(spki.len(), 44);
        assert_eq!(&spki[12..], &id.public_key().0);
    }
}
