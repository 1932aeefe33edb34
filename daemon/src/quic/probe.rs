//! Telling the rendezvous our UDP endpoint, and keeping that NAT mapping.
//!
//! While registered, the daemon sends a signed probe from its UDP punch
//! socket to the server's observation port: quickly (250 ms doubling) until
//! one is acknowledged, then every [`PROBE_INTERVAL`]. The server records
//! the source address as our UDP candidate; its ack coming back keeps the
//! mapping two-way, which NATs keep much longer than one-way ones (Linux
//! conntrack: 120 s vs 30 s).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use punch_rendezvous::datagram::{self, ProbeBody};
use tokio::sync::mpsc;
use tracing::debug;

use super::socket::Ack;
use super::QuicPath;
use crate::identity::Identity;

/// Steady probe spacing: well inside the 30 s a NAT may keep an idle UDP
/// mapping.
const PROBE_INTERVAL: Duration = Duration::from_secs(15);
/// First retry while unacknowledged.
const FIRST_RETRY: Duration = Duration::from_millis(250);

/// Probes for one registration (the nonce binds them to it).
#[derive(Debug)]
pub(crate) struct Prober {
    path: Arc<QuicPath>,
    server: SocketAddr,
    nonce: [u8; 32],
    name: String,
    identity: Identity,
    counter: u64,
    acks: mpsc::Receiver<Ack>,
    acked: bool,
    next: Instant,
}

impl Prober {
    pub(crate) fn new(
        path: Arc<QuicPath>,
        server: SocketAddr,
        nonce: [u8; 32],
        name: &str,
        identity: &Identity,
    ) -> Self {
        let acks = path.demux.acks_from(server);
        Self {
            path,
            server,
            nonce,
            name: name.to_owned(),
            identity: identity.clone(),
            counter: 0,
            acks,
            acked: false,
            next: Instant::now(),
        }
    }

    /// When the next probe is due.
    pub(crate) fn next_due(&self) -> Instant {
        self.next
    }

    /// Sends the next probe and schedules the one after.
    pub(crate) async fn send(&mut self) {
        self.counter += 1;
        let body = ProbeBody {
            name: &self.name,
            counter: self.counter,
            local_port: self.path.port(),
        };
        let d = datagram::probe(self.identity.signing_key(), &self.nonce, &body);
        if let Err(e) = self.path.send_to(&d, self.server).await {
            debug!(server = %self.server, error = %e, "UDP probe not sent");
        }
        let wait = if self.acked {
            PROBE_INTERVAL
        } else {
            (FIRST_RETRY * 2u32.saturating_pow(self.counter.min(6) as u32 - 1)).min(PROBE_INTERVAL)
        };
        self.next = Instant::now() + wait;
    }

    /// Probe again at once, as if never acknowledged (after a re-bind).
    pub(crate) fn restart(&mut self) {
        self.acked = false;
        self.next = Instant::now();
    }

    /// The path probed for (its re-binds restart the probing).
    pub(crate) fn path(&self) -> &Arc<QuicPath> {
        &self.path
    }

    /// The next acknowledgement: the UDP endpoint the server saw.
    pub(crate) async fn ack(&mut self) -> Option<SocketAddr> {
        let (counter, observed) = self.acks.recv().await?;
        if counter > self.counter {
            return None; // not an answer to anything we sent
        }
        self.acked = true;
        Some(observed)
    }
}
