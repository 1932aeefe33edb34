//! The rendezvous URL as the daemon uses it: `http://host:port` → the TCP
//! address to dial and the WebSocket URL. Shared by the control plane
//! (`/v1/ws`) and the relayed fallback (`/v1/relay/{session}`).

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
    fn new(url: &str, why: &'static str) -> Self {
        Self {
            url: url.to_owned(),
            why,
        }
    }
}

/// `http://host:port/...` → (`host:port`, websocket URL).
pub(crate) fn ws_target(url: &str) -> Result<(String, String), UrlError> {
    let (rest, scheme) = if let Some(r) = url.strip_prefix("http://") {
        (r, "ws")
    } else if let Some(r) = url.strip_prefix("https://") {
        let _ = r;
        return Err(UrlError::new(url, "https is not supported by this build; put the server behind a TLS proxy only for browsers, and point daemons at its http:// address (their traffic is signed, and tunnels are end-to-end encrypted)"));
    } else {
        return Err(UrlError::new(url, "must start with http://"));
    };
    let authority = rest.split('/').next().unwrap_or("");
    if authority.is_empty() {
        return Err(UrlError::new(url, "has no host"));
    }
    let host_port = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        && !authority.ends_with(']')
    {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    Ok((host_port, format!("{scheme}://{authority}/v1/ws")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_map_to_websocket_targets() {
        let (hp, ws) = ws_target("http://203.0.113.1:8080").unwrap();
        assert_eq!(hp, "203.0.113.1:8080");
        assert_eq!(ws, "ws://203.0.113.1:8080/v1/ws");
        let (hp, _) = ws_target("http://example.invalid/").unwrap();
        assert_eq!(hp, "example.invalid:80");
        assert!(ws_target("ftp://x").is_err());
        assert!(ws_target("http://").is_err());
    }
}
