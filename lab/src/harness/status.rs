//! Reading a daemon's status from outside: `punchd status --json` run
//! inside its namespace, parsed into the daemon's own [`StatusDoc`].

use std::path::Path;

use anyhow::{anyhow, bail, Context as _, Result};

use crate::harness::punchd_types::{PathState, PeerDoc, StatusDoc};
use crate::net::netns::Netns;

/// `punchd status --admin ADMIN --json` run inside `ns`.
pub fn read(ns: &Netns, punchd: &Path, admin: &str) -> Result<StatusDoc> {
    let out = ns.exec_output(
        punchd.to_str().unwrap_or("punchd"),
        &["status", "--admin", admin, "--json"],
    )?;
    if !out.status.success() {
        bail!(
            "punchd status in {}: {}",
            ns.name(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("punchd status in {}: not a status document", ns.name()))
}

/// The daemon's first peer: every lab config names exactly one.
pub fn first_peer(doc: &StatusDoc) -> Result<&PeerDoc> {
    doc.peers
        .first()
        .ok_or_else(|| anyhow!("{}'s status lists no peer", doc.name))
}

/// The first peer's path; [`PathState::None`] when there is no peer.
pub fn path(doc: &StatusDoc) -> PathState {
    doc.peers.first().map_or(PathState::None, |p| p.path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness::punchd_types::Transport;

    /// What `punchd status --json` prints for a direct tunnel, as the lab
    /// reads it.
    #[test]
    fn a_printed_status_reads_into_the_daemons_types() {
        let json = r#"{
          "name": "alice", "public_addr": "203.0.113.2:40000", "rendezvous": "connected",
          "punch_port": 40000, "quic_connections": 0,
          "peers": [{
            "name": "bob", "path": "direct", "transport": "tcp",
            "remote_addr": "203.0.113.3:40000", "rtt_ms": 0.4,
            "bytes_in": 1, "bytes_out": 2, "streams": 0,
            "last_punch": {"result": "ok", "elapsed_ms": 51, "attempts": 2, "reason": null,
                           "finished_unix_ms": 1}
          }],
          "forwards": [{"listen": "127.0.0.1:10000", "peer": "bob", "service": "sink",
                        "active": 0, "total": 3}]
        }"#;
        let doc: StatusDoc = match serde_json::from_str(json) {
            Ok(d) => d,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(path(&doc), PathState::Direct);
        assert!(first_peer(&doc).is_ok_and(|p| p.transport == Some(Transport::Tcp)));
        assert_eq!(doc.forwards.first().map(|f| f.total), Some(3));
    }

    #[test]
    fn no_peer_is_no_path() {
        let json =
            r#"{"name": "alice", "rendezvous": "disconnected", "peers": [], "forwards": []}"#;
        let doc: StatusDoc = match serde_json::from_str(json) {
            Ok(d) => d,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(path(&doc), PathState::None);
        assert!(first_peer(&doc).is_err());
    }
}
