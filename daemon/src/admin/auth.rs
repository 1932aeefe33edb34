//! Who may use the admin API, decided without IO ([`decide`]), plus the
//! token file the daemon writes at start ([`write_token`]).
//!
//! - Host check: a request whose `Host` is not this listener (or a
//!   `localhost` name with its port) is refused, so a web page that
//!   rebinds its DNS name to 127.0.0.1 cannot read `/v1/status`.
//! - Token: anything that changes state (every method but GET/HEAD) needs
//!   `Authorization: Bearer TOKEN`; a browser cannot add that header to a
//!   cross-site request without a CORS preflight we never answer, so this
//!   also stops CSRF. With `allow_remote`, reads need it too, and the Host
//!   check is off (the token is the protection, and remote clients use
//!   whatever name they reach the host by).

use std::net::SocketAddr;
use std::path::Path;

use axum::http::{Method, StatusCode};
use punch_service::secret_file::{self, SecretFileError};

/// What the admin API is configured to allow.
#[derive(Clone)]
pub(crate) struct Policy {
    /// The bound listen address (its port is what `Host` must name).
    pub(crate) listen: SocketAddr,
    /// `[admin] allow_remote`.
    pub(crate) allow_remote: bool,
    /// The admin token.
    pub(crate) token: String,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("listen", &self.listen)
            .field("allow_remote", &self.allow_remote)
            .field("token", &"***")
            .finish()
    }
}

/// Whether `host` (a `Host` header value) names this listener: its own
/// `ip:port`, or `localhost`/a loopback IP with its port.
pub(crate) fn host_allowed(host: &str, listen: SocketAddr) -> bool {
    let port = listen.port().to_string();
    let Some((name, p)) = host.rsplit_once(':') else {
        return false;
    };
    if p != port {
        return false;
    }
    let bare = name.trim_start_matches('[').trim_end_matches(']');
    bare.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback() || ip == listen.ip())
}

/// Compares without an early exit.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether an `Authorization` header carries the token.
pub(crate) fn bearer_ok(authorization: Option<&str>, token: &str) -> bool {
    authorization
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|given| constant_time_eq(given.trim().as_bytes(), token.as_bytes()))
}

/// The verdict on one request: `Ok` or the status and the reason.
pub(crate) fn decide(
    policy: &Policy,
    method: &Method,
    host: Option<&str>,
    authorization: Option<&str>,
) -> Result<(), (StatusCode, &'static str)> {
    if !policy.allow_remote && !host.is_some_and(|h| host_allowed(h, policy.listen)) {
        return Err((
            StatusCode::MISDIRECTED_REQUEST,
            "the Host header does not name this admin API (127.0.0.1:PORT or localhost:PORT)\n",
        ));
    }
    let read = method == Method::GET || method == Method::HEAD;
    if (read && !policy.allow_remote) || bearer_ok(authorization, &policy.token) {
        return Ok(());
    }
    Err((
        StatusCode::UNAUTHORIZED,
        "this needs the admin token: send Authorization: Bearer <contents of [admin] token_file> (the punchd CLI does)\n",
    ))
}

/// A fresh token, written to `path` (mode 0600, replacing the last run's;
/// its folder is made 0700 if missing).
pub(crate) fn write_token(path: &Path) -> Result<String, SecretFileError> {
    let io = |source| SecretFileError::Io {
        path: path.to_owned(),
        source,
    };
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| io(std::io::Error::other(e.to_string())))?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(dir).map_err(io)?;
    }
    secret_file::write_private(path, format!("{token}\n").as_bytes(), true)?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(listen: &str, allow_remote: bool) -> Policy {
        Policy {
            listen: listen.parse().unwrap(),
            allow_remote,
            token: "t0k".into(),
        }
    }

    #[test]
    fn hosts_must_name_this_listener() {
        let l: SocketAddr = "127.0.0.1:7070".parse().unwrap();
        for ok in [
            "127.0.0.1:7070",
            "localhost:7070",
            "LOCALHOST:7070",
            "[::1]:7070",
        ] {
            assert!(host_allowed(ok, l), "{ok}");
        }
        for bad in [
            "evil.example:7070",
            "127.0.0.1:80",
            "localhost",
            "127.0.0.1",
            "evil.example",
        ] {
            assert!(!host_allowed(bad, l), "{bad}");
        }
    }

    #[test]
    fn reads_are_open_on_loopback_and_writes_need_the_token() {
        let p = policy("127.0.0.1:7070", false);
        let host = Some("127.0.0.1:7070");
        assert_eq!(decide(&p, &Method::GET, host, None), Ok(()));
        assert_eq!(
            decide(&p, &Method::POST, host, None).unwrap_err().0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            decide(&p, &Method::POST, host, Some("Bearer nope"))
                .unwrap_err()
                .0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            decide(&p, &Method::POST, host, Some("t0k")).unwrap_err().0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(decide(&p, &Method::POST, host, Some("Bearer t0k")), Ok(()));
        // DNS rebinding: the right token does not help a wrong Host.
        let rebound = Some("evil.example:7070");
        assert_eq!(
            decide(&p, &Method::GET, rebound, None).unwrap_err().0,
            StatusCode::MISDIRECTED_REQUEST
        );
        assert!(decide(&p, &Method::POST, rebound, Some("Bearer t0k")).is_err());
        assert!(decide(&p, &Method::GET, None, None).is_err());
    }

    #[test]
    fn remote_admin_needs_the_token_for_everything() {
        let p = policy("0.0.0.0:7070", true);
        let host = Some("admin.example:7070");
        assert_eq!(
            decide(&p, &Method::GET, host, None).unwrap_err().0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(decide(&p, &Method::GET, host, Some("Bearer t0k")), Ok(()));
    }

    #[test]
    fn the_token_file_is_private_and_new_each_start() {
        let dir = std::env::temp_dir().join(format!("punchd-admin-{}", std::process::id()));
        let path = dir.join("sub").join("admin.token");
        let a = write_token(&path).unwrap();
        let b = write_token(&path).unwrap();
        assert_ne!(a, b);
        assert_eq!(secret_file::read_private(&path).unwrap().trim(), b);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
