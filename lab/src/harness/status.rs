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
