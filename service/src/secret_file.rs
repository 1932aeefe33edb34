//! Files that hold secrets: identity keys, TLS keys, tokens.
//!
//! One place decides what "private" means so both binaries refuse the same
//! files with the same words: a key readable by group or others is an
//! error, not a warning, because by the time anyone reads the warning the
//! key may have been copied.

use std::io::Write as _;
use std::path::{Path, PathBuf};

/// Why a secret file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SecretFileError {
    /// Read, write or stat failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Group or others may read the file.
    #[error("{} is readable by group or others (mode {mode:04o}); a private key must be private: run `chmod 600 {}`", path.display(), path.display())]
    Exposed {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// `create_new` found the file there.
    #[error("{} already exists; refusing to overwrite it (delete it first if you mean to)", path.display())]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// A token file with nothing in it.
    #[error("{} is empty; put the token on its first line", path.display())]
    Empty {
        /// The file.
        path: PathBuf,
    },
}

/// Whether permission bits let anyone but the owner read (or write) the
/// file. Pure, so the rule is tested without touching a file system.
pub fn is_exposed(mode: u32) -> bool {
    mode & 0o077 != 0
}

/// Reads a private file (a key), refusing one that group or others can
/// read or write.
pub fn read_private(path: &Path) -> Result<String, SecretFileError> {
    let io = |source| SecretFileError::Io {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = file.metadata().map_err(io)?.permissions().mode() & 0o7777;
        if is_exposed(mode) {
            return Err(SecretFileError::Exposed {
                path: path.to_owned(),
                mode,
            });
        }
    }
    std::io::read_to_string(file).map_err(io)
}

/// Reads a token: the first line, trimmed. Token files are not held to
/// the key rule (container secrets are often mounted 0444), but an empty
/// one is an error rather than "no token".
pub fn read_token(path: &Path) -> Result<String, SecretFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| SecretFileError::Io {
        path: path.to_owned(),
        source,
    })?;
    let token = text.lines().next().unwrap_or("").trim().to_owned();
    if token.is_empty() {
        return Err(SecretFileError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(token)
}

/// Writes `bytes` to `path` with mode 0600. With `replace` false an
/// existing file is an error; with it true the file is replaced
/// atomically (a temporary beside it, then a rename), so a reader never
/// sees a half-written or briefly world-readable secret.
pub fn write_private(path: &Path, bytes: &[u8], replace: bool) -> Result<(), SecretFileError> {
    let io = |source| SecretFileError::Io {
        path: path.to_owned(),
        source,
    };
    let target = if replace {
        let mut name = path.file_name().unwrap_or_default().to_owned();
        name.push(format!(".{}.tmp", std::process::id()));
        path.with_file_name(name)
    } else {
        path.to_owned()
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&target).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists && !replace {
            SecretFileError::Exists {
                path: path.to_owned(),
            }
        } else {
            io(e)
        }
    })?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    if replace {
        std::fs::rename(&target, path).map_err(|e| {
            let _ = std::fs::remove_file(&target);
            io(e)
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("punch-secret-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn only_owner_bits_are_private() {
        assert!(!is_exposed(0o600));
        assert!(!is_exposed(0o400));
        assert!(is_exposed(0o640));
        assert!(is_exposed(0o644));
        assert!(is_exposed(0o602));
    }

    #[cfg(unix)]
    #[test]
    fn an_exposed_key_is_refused_with_the_chmod_that_fixes_it() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = temp("exposed");
        let path = dir.join("k");
        write_private(&path, b"secret", false).unwrap();
        assert_eq!(read_private(&path).unwrap(), "secret");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_private(&path).unwrap_err().to_string();
        assert!(e.contains(&format!("chmod 600 {}", path.display())), "{e}");
        assert!(e.contains("0644"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn writes_are_0600_and_replace_only_when_asked() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = temp("write");
        let path = dir.join("t");
        write_private(&path, b"one\n", false).unwrap();
        assert!(matches!(
            write_private(&path, b"two", false),
            Err(SecretFileError::Exists { .. })
        ));
        write_private(&path, b"two\n", true).unwrap();
        assert_eq!(read_token(&path).unwrap(), "two");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(&path, "\n").unwrap();
        assert!(matches!(
            read_token(&path),
            Err(SecretFileError::Empty { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
