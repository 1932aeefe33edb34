//! `punchd demo`: the whole system in one process on loopback: an embedded
//! rendezvous, two daemons with fresh keys, a forward from one to an echo
//! service the other exposes, and a checksummed transfer through it.
//!
//! Behind the default-on `demo` feature: it (and [`loopback`]) embed the
//! rendezvous *server*, which the daemon itself never links.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use punch_config::RendezvousConfig;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub mod loopback;

pub use crate::testdata::{hex, pattern};

use crate::admin::status::{PathState, Transport};
use crate::identity::Identity;
use loopback::{echo_server, peer_config, ExposeSpec, Rendezvous};

/// Bytes pushed through the tunnel.
pub const DEMO_BYTES: usize = 16 * 1024 * 1024;

/// Why the demo failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DemoError {
    /// A step failed.
    #[error("{step}: {message}")]
    Step {
        /// What was being done.
        step: &'static str,
        /// What went wrong.
        message: String,
    },
}

fn step<E: fmt::Display>(step: &'static str) -> impl FnOnce(E) -> DemoError {
    move |e| DemoError::Step {
        step,
        message: e.to_string(),
    }
}

/// What the demo measured.
#[derive(Debug, Clone)]
pub struct DemoReport {
    /// direct, relayed or none.
    pub path: PathState,
    /// tcp, quic or relay (the path the race kept).
    pub transport: Option<Transport>,
    /// The remote endpoint alice reached bob at.
    pub remote: String,
    /// Order → tunnel ready.
    pub punch_ms: u64,
    /// connect() attempts.
    pub attempts: u32,
    /// Bytes echoed.
    pub bytes: usize,
    /// Time to send and receive them.
    pub transfer: Duration,
    /// Whether the echoed bytes hashed the same.
    pub checksum_ok: bool,
    /// The sha256.
    pub sha256: String,
}

impl fmt::Display for DemoReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mib = self.bytes as f64 / (1024.0 * 1024.0);
        let secs = self.transfer.as_secs_f64().max(1e-9);
        writeln!(f, "punchd demo: alice ⇄ bob on loopback")?;
        writeln!(
            f,
            "  path        {} over {} via {}",
            self.path.as_str(),
            self.transport.map_or("-", |t| t.as_str()),
            self.remote
        )?;
        writeln!(
            f,
            "  punch       {} ms, {} attempt(s)",
            self.punch_ms, self.attempts
        )?;
        writeln!(f, "  transfer    {mib:.0} MiB echoed through the forward in {:.0} ms ({:.0} MiB/s each way)", secs * 1000.0, mib / secs)?;
        write!(
            f,
            "  checksum    sha256 {} {}",
            &self.sha256[..16],
            if self.checksum_ok {
                "matches"
            } else {
                "MISMATCH"
            }
        )
    }
}

/// Writes `data` to `stream` while reading the same amount back; returns
/// the sha256 of what came back.
pub async fn echo_roundtrip(stream: TcpStream, data: &[u8]) -> std::io::Result<String> {
    echo_counted(stream, data, None).await
}

/// [`echo_roundtrip`], adding the bytes read back to `done` as they come
/// (for a progress line).
async fn echo_counted(
    stream: TcpStream,
    data: &[u8],
    done: Option<&AtomicU64>,
) -> std::io::Result<String> {
    let (mut r, mut w) = stream.into_split();
    let writer = async {
        w.write_all(data).await?;
        w.shutdown().await
    };
    let reader = async {
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0;
        while total < data.len() {
            let n = r.read(&mut buf).await?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("echo ended after {total} of {} bytes", data.len()),
                ));
            }
            hasher.update(&buf[..n]);
            total += n;
            if let Some(d) = done {
                d.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
        Ok(hex(&hasher.finalize()))
    };
    let ((), digest) = tokio::try_join!(writer, reader)?;
    Ok(digest)
}

/// Runs the demo.
pub async fn run() -> Result<DemoReport, DemoError> {
    run_counting(None).await
}

/// Runs the demo, counting the bytes echoed so far into `progress`.
pub async fn run_counting(progress: Option<Arc<AtomicU64>>) -> Result<DemoReport, DemoError> {
    let rendezvous = Rendezvous::start(RendezvousConfig::default())
        .await
        .map_err(step("starting the embedded rendezvous"))?;
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let result = run_with(&rendezvous, cancel.clone(), &tracker, progress.as_deref()).await;
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
    rendezvous.stop().await;
    result
}

async fn run_with(
    rendezvous: &Rendezvous,
    cancel: CancellationToken,
    tracker: &TaskTracker,
    progress: Option<&AtomicU64>,
) -> Result<DemoReport, DemoError> {
    let echo = echo_server(cancel.clone(), tracker)
        .await
        .map_err(step("starting the echo service"))?;
    let alice_id = Identity::generate().map_err(step("generating alice's key"))?;
    let bob_id = Identity::generate().map_err(step("generating bob's key"))?;
    let url = rendezvous.url();
    let alice_cfg = peer_config(
        "alice",
        &url,
        &[("bob", bob_id.public_key())],
        &[],
        &[("bob", "echo")],
        "",
    )
    .map_err(step("alice's config"))?;
    let expose = ExposeSpec {
        name: "echo".into(),
        target: echo.to_string(),
        allow: vec!["alice".into()],
    };
    let bob_cfg = peer_config(
        "bob",
        &url,
        &[("alice", alice_id.public_key())],
        &[expose],
        &[],
        "",
    )
    .map_err(step("bob's config"))?;
    let bob = crate::start(bob_cfg, bob_id, cancel.child_token())
        .await
        .map_err(step("starting bob"))?;
    let alice = crate::start(alice_cfg, alice_id, cancel.child_token())
        .await
        .map_err(step("starting alice"))?;
    let forward = alice.forward_addrs[0];

    let data = pattern(DEMO_BYTES, 0x5eed);
    let expected = hex(&Sha256::digest(&data));
    let stream = TcpStream::connect(forward)
        .await
        .map_err(step("connecting to alice's forward"))?;
    let t0 = Instant::now();
    let got = tokio::time::timeout(
        Duration::from_secs(60),
        echo_counted(stream, &data, progress),
    )
    .await
    .map_err(step("echo through the tunnel"))?
    .map_err(step("echo through the tunnel"))?;
    let transfer = t0.elapsed();
    let doc = alice.status.snapshot();
    let peer = doc.peers.first().cloned().ok_or_else(|| DemoError::Step {
        step: "status",
        message: "alice lists no peer".into(),
    })?;
    let punch = peer.last_punch.clone();
    alice.shutdown(Duration::from_secs(2)).await;
    bob.shutdown(Duration::from_secs(2)).await;
    Ok(DemoReport {
        path: peer.path,
        transport: peer.transport,
        remote: peer.remote_addr.unwrap_or_default(),
        punch_ms: punch.as_ref().map_or(0, |p| p.elapsed_ms),
        attempts: punch.as_ref().map_or(0, |p| p.attempts),
        bytes: data.len(),
        transfer,
        checksum_ok: got == expected,
        sha256: got,
    })
}
