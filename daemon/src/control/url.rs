//! The rendezvous URL as the daemon uses it: `http://host:port` or
//! `https://host:port` → the TCP address to dial, the host TLS verifies,
//! and the authority WebSocket URLs are built on. Shared by the control
//! plane (`/v1/ws`) and the relayed fallback (`/v1/relay/{session}`)
//! through [`super::link::Endpoint`].

/// A rendezvous URL the daemon cannot use.
#[derive(Debug, thiserror::Error)]
#[error("rendezvous url {url:?}: {why}")]
pub struct UrlError {
    /// The URL as configured.
    pub url: String,
    /// What is wrong with it.
    pub why: &'static str,
}

impl UrlError {
    pub(crate) fn new(url: &str, why: &'static str) -> Self {
        Self {
            url: url.to_owned(),
            why,
        }
    }
}

/// What a rendezvous URL says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    /// `host:port` to resolve and dial (default port 80 or 443).
    pub(crate) host_port: String,
    /// The host alone (brackets kept off an IPv6 literal): TLS's server name.
    pub(crate) host: String,
    /// `host[:port]` as written, for WebSocket URLs.
    pub(crate) authority: String,
    /// `https://`.
    pub(crate) tls: bool,
}

/// Parses `http://host:port/...` or `https://...`.
pub(crate) fn ws_target(url: &str) -> Result<Target, UrlError> {
    let (rest, tls) = if let Some(r) = url.strip_prefix("http://") {
        (r, false)
    } else if let Some(r) = url.strip_prefix("https://") {
        (r, true)
    } else {
        return Err(UrlError::new(url, "must start with http:// or https://"));
    };
    let authority = rest.split('/').next().unwrap_or("");
    if authority.is_empty() {
        return Err(UrlError::new(url, "has no host"));
    }
    let port = authority
        .rsplit_once(':')
        .filter(|(_, p)| p.parse::<u16>().is_ok() && !authority.ends_with(']'));
    let (host, host_port) = match port {
        Some((host, _)) => (host, authority.to_owned()),
        None => (
            authority,
            format!("{authority}:{}", if tls { 443 } else { 80 }),
        ),
    };
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    if host.is_empty() {
        return Err(UrlError::new(url, "has no host"));
    }
    Ok(Target {
        host_port,
        host,
        authority: authority.to_owned(),
        tls,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_map_to_websocket_targets() {
        let t = ws_target("http://203.0.113.1:8080").unwrap();
        assert_eq!(t.host_port, "203.0.113.1:8080");
        assert_eq!(t.authority, "203.0.113.1:8080");
        assert!(!t.tls);
        let t = ws_target("http://example.invalid/").unwrap();
        assert_eq!(t.host_port, "example.invalid:80");
        let t = ws_target("https://rv.example.invalid").unwrap();
        assert_eq!(
            (t.host_port.as_str(), t.host.as_str(), t.tls),
            ("rv.example.invalid:443", "rv.example.invalid", true)
        );
        let t = ws_target("https://[2001:db8::10]:8443/x").unwrap();
        assert_eq!(
            (t.host_port.as_str(), t.host.as_str()),
            ("[2001:db8::10]:8443", "2001:db8::10")
        );
        assert!(ws_target("ftp://x").is_err());
        assert!(ws_target("http://").is_err());
    }
}
