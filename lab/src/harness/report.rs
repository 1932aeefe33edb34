//! What a checked scenario run measured, and the `LAB` line it prints.

use std::time::Duration;

use crate::harness::punchd_types::{PathState, PeerDoc, Transport};
use crate::harness::transfer::SendReport;

/// What a scenario measured.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Scenario name.
    pub name: String,
    /// The path alice's status reports.
    pub path: PathState,
    /// alice's remote endpoint for bob.
    pub remote: String,
    /// The transport alice's status reports (none with no tunnel).
    pub transport: Option<Transport>,
    /// Punch order → tunnel ready, from alice's status.
    pub punch_ms: u64,
    /// connect() attempts alice made.
    pub attempts: u64,
    /// Daemons started → alice's status says direct.
    pub ready_ms: u64,
    /// The transfer.
    pub transfer: Option<SendReport>,
    /// Bytes the rendezvous interface saw during the transfer.
    pub rendezvous_bytes_during_transfer: u64,
    /// The failure reason alice reported, for `PunchFails`.
    pub punch_reason: Option<String>,
    /// Containerized rendezvous: start → health check passed, and the exit
    /// code on SIGTERM.
    pub container: Option<(Duration, i32)>,
    /// With no path: connect to the forward → the connection refused.
    pub refused_after: Option<Duration>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<12} path={:<7} transport={:<5} remote={:<20} punch={}ms attempts={} ready={}ms",
            self.name,
            self.path.as_str(),
            self.transport.map_or("", Transport::as_str),
            self.remote,
            self.punch_ms,
            self.attempts,
            self.ready_ms
        )?;
        if let Some(t) = &self.transfer {
            let mbit = t.bytes as f64 * 8.0 / t.seconds.max(1e-9) / 1e6;
            write!(
                f,
                " transfer={}MiB/{}streams in {:.2}s ({mbit:.0} Mbit/s) rendezvous_bytes={}",
                t.bytes >> 20,
                t.streams,
                t.seconds,
                self.rendezvous_bytes_during_transfer
            )?;
        }
        if let Some(r) = &self.punch_reason {
            write!(f, " reason={r:?}")?;
        }
        if let Some(d) = &self.refused_after {
            write!(f, " forward refused after {}ms", d.as_millis())?;
        }
        if let Some((healthy, code)) = &self.container {
            write!(
                f,
                " container: healthy after {}ms, exit {code} on SIGTERM",
                healthy.as_millis()
            )?;
        }
        Ok(())
    }
}

impl Report {
    /// Takes what alice's status says about bob: path, transport, remote
    /// endpoint, and the latest punch's time and attempts.
    pub fn read_peer(&mut self, peer: &PeerDoc) {
        self.path = peer.path;
        self.transport = peer.transport;
        self.remote = peer.remote_addr.clone().unwrap_or_default();
        if let Some(p) = &peer.last_punch {
            self.punch_ms = p.elapsed_ms;
            self.attempts = u64::from(p.attempts);
        }
    }
}
