//! The workspace binaries the lab runs: `punchd`, `punch-rendezvous` and
//! `punch-lab-tool` (sink, sender, echo, link emulator), found beside the
//! tool in one target directory so a test never runs a stale build from
//! somewhere else.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};

use crate::net::netns;

/// Where the binaries are.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// punchd.
    pub punchd: PathBuf,
    /// punch-rendezvous.
    pub rendezvous: PathBuf,
    /// punch-lab-tool (sink and sender).
    pub tool: PathBuf,
}

impl Binaries {
    /// The workspace binaries next to `tool` (same target directory).
    pub fn beside(tool: &Path) -> Result<Self> {
        let dir = tool
            .parent()
            .ok_or_else(|| anyhow!("{} has no folder", tool.display()))?;
        let bins = Self {
            punchd: dir.join("punchd"),
            rendezvous: dir.join("punch-rendezvous"),
            tool: tool.to_owned(),
        };
        for b in [&bins.punchd, &bins.rendezvous, &bins.tool] {
            if !b.is_file() {
                bail!("{} is missing: run `cargo build --workspace` (or `cargo test --workspace`) first", b.display());
            }
        }
        Ok(bins)
    }

    /// `punchd keygen` into `path`; returns the public key it prints.
    pub(crate) fn keygen(&self, path: &Path) -> Result<String> {
        let out = netns::run(
            self.punchd.to_str().unwrap_or("punchd"),
            &["keygen", "--out", path.to_str().unwrap_or("")],
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}
