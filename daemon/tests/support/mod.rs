//! What the daemon's integration tests share: an embedded rendezvous and
//! two daemons on 127.0.0.1 (every port 0), test services behind them,
//! waiting on a condition, and the daemon's log as text.

#![allow(dead_code, unreachable_pub, missing_docs)]

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use punch_config::RendezvousConfig;
use punchd::demo::loopback::{echo_server, peer_config, ExposeSpec, Rendezvous};
use punchd::{pattern, Identity, PathState, RunningDaemon, StatusDoc};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Polls `f` until it returns `Some`, or panics after `timeout`.
pub async fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The first peer's path is direct.
pub fn direct(doc: &StatusDoc) -> bool {
    doc.peers
        .first()
        .is_some_and(|p| p.path == PathState::Direct)
}

/// Everything this test process logged (every test's daemons), as text.
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    /// Starts capturing (once per process) and returns the capture.
    pub fn capture() -> Self {
        static LOGS: OnceLock<Logs> = OnceLock::new();
        LOGS.get_or_init(|| {
            let logs = Logs::default();
            let writer = logs.clone();
            tracing_subscriber::fmt()
                // yamux's errors too: it logs why it ends a connection
                // ("maximum number of streams reached") only there.
                .with_env_filter("punchd=info,yamux=error")
                .with_ansi(false)
                .with_writer(move || writer.clone())
                .init();
            logs
        })
        .clone()
    }

    /// Where the capture is now: [`Logs::lines_since`] reads from here on,
    /// so a test sees nothing an earlier test of the process logged.
    pub fn mark(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    /// The lines logged since `mark` that contain every one of `parts`.
    pub fn lines_since(&self, mark: usize, parts: &[&str]) -> Vec<String> {
        let buf = self.0.lock().unwrap();
        let text = String::from_utf8_lossy(buf.get(mark..).unwrap_or_default()).into_owned();
        text.lines()
            .filter(|l| parts.iter().all(|p| l.contains(p)))
            .map(str::to_owned)
            .collect()
    }

    /// The lines that contain every one of `parts`.
    pub fn lines_with(&self, parts: &[&str]) -> Vec<String> {
        let text = String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned();
        text.lines()
            .filter(|l| parts.iter().all(|p| l.contains(p)))
            .map(str::to_owned)
            .collect()
    }
}

/// A test service that sends what it is asked for: the client writes a
/// `u64` length, the service answers with that many bytes of
/// `pattern(len, 7)` and closes. `written` counts what the service got
/// into its socket, across connections.
pub async fn source_server(
    cancel: CancellationToken,
    tracker: &TaskTracker,
) -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let written = Arc::new(AtomicU64::new(0));
    let conns = tracker.clone();
    let counter = written.clone();
    tracker.spawn(async move {
        loop {
            let (mut s, _) = tokio::select! {
                _ = cancel.cancelled() => break,
                r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
            };
            let (cancel, counter) = (cancel.clone(), counter.clone());
            conns.spawn(async move {
                let send = async {
                    let len = s.read_u64().await?;
                    let data = pattern(len as usize, 7);
                    for chunk in data.chunks(16 * 1024) {
                        s.write_all(chunk).await?;
                        counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    }
                    s.shutdown().await
                };
                tokio::select! {
                    _ = send => {}
                    _ = cancel.cancelled() => {}
                }
            });
        }
    });
    (addr, written)
}

/// A rendezvous, an echo service and two identities; daemons start from it.
pub struct Lab {
    pub rendezvous: Rendezvous,
    pub cancel: CancellationToken,
    pub tracker: TaskTracker,
    pub echo: SocketAddr,
    pub alice_id: Identity,
    pub bob_id: Identity,
}

impl Lab {
    pub async fn new() -> Self {
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let echo = echo_server(cancel.clone(), &tracker).await.unwrap();
        Self {
            rendezvous: Rendezvous::start(RendezvousConfig::default())
                .await
                .unwrap(),
            cancel,
            tracker,
            echo,
            alice_id: Identity::generate().unwrap(),
            bob_id: Identity::generate().unwrap(),
        }
    }

    /// The echo service, as bob offers it to `allow`.
    pub fn expose(&self, name: &str, allow: &[&str]) -> ExposeSpec {
        self.expose_at(name, self.echo, allow)
    }

    /// A service bob offers at `target`, to `allow`.
    pub fn expose_at(&self, name: &str, target: SocketAddr, allow: &[&str]) -> ExposeSpec {
        ExposeSpec {
            name: name.into(),
            target: target.to_string(),
            allow: allow.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// alice, forwarding `services` of bob, with `punch` in her `[punch]`.
    pub async fn alice(&self, services: &[&str], punch: &str) -> RunningDaemon {
        self.alice_with(services, punch, self.cancel.child_token())
            .await
    }

    /// [`Lab::alice`] stopped by her own `cancel`, so a test can kill her.
    pub async fn alice_with(
        &self,
        services: &[&str],
        punch: &str,
        cancel: CancellationToken,
    ) -> RunningDaemon {
        let forwards: Vec<_> = services.iter().map(|s| ("bob", *s)).collect();
        let cfg = peer_config(
            "alice",
            &self.rendezvous.url(),
            &[("bob", self.bob_id.public_key())],
            &[],
            &forwards,
            punch,
        )
        .unwrap();
        punchd::start(cfg, self.alice_id.clone(), cancel)
            .await
            .unwrap()
    }

    /// bob, exposing `exposes` to alice, with `punch` in his `[punch]`.
    pub async fn bob(&self, exposes: &[ExposeSpec], punch: &str) -> RunningDaemon {
        self.bob_with(exposes, punch, self.cancel.child_token())
            .await
    }

    /// [`Lab::bob`] stopped by his own `cancel`, so a test can kill him.
    pub async fn bob_with(
        &self,
        exposes: &[ExposeSpec],
        punch: &str,
        cancel: CancellationToken,
    ) -> RunningDaemon {
        let cfg = peer_config(
            "bob",
            &self.rendezvous.url(),
            &[("alice", self.alice_id.public_key())],
            exposes,
            &[],
            punch,
        )
        .unwrap();
        punchd::start(cfg, self.bob_id.clone(), cancel)
            .await
            .unwrap()
    }

    /// alice forwards `services` of bob; bob exposes `exposes`; both with
    /// `punch`. Returns at once (bob first, so alice finds him registered).
    pub async fn pair(
        &self,
        services: &[&str],
        exposes: Vec<ExposeSpec>,
        punch: &str,
    ) -> (RunningDaemon, RunningDaemon) {
        let bob = self.bob(&exposes, punch).await;
        (self.alice(services, punch).await, bob)
    }

    /// [`Lab::pair`] with each daemon's own cancel token (alice, bob), so a
    /// test can stop one abruptly.
    pub async fn pair_with(
        &self,
        services: &[&str],
        exposes: Vec<ExposeSpec>,
        punch: &str,
        (alice_cancel, bob_cancel): (CancellationToken, CancellationToken),
    ) -> (RunningDaemon, RunningDaemon) {
        let bob = self.bob_with(&exposes, punch, bob_cancel).await;
        (self.alice_with(services, punch, alice_cancel).await, bob)
    }

    /// A [`source_server`] exposed by bob as "source" and forwarded by
    /// alice, on a direct path; and the source's byte count.
    pub async fn source_pair(&self) -> (RunningDaemon, RunningDaemon, Arc<AtomicU64>) {
        let (source, written) = source_server(self.cancel.clone(), &self.tracker).await;
        let exposes = [self.expose_at("source", source, &["alice"])];
        let (alice, bob) = self.direct_pair(&["source"], &exposes, "").await;
        (alice, bob, written)
    }

    /// bob exposing `exposes`, alice forwarding `services`; both with
    /// `punch`; returns once alice's path to bob is direct.
    pub async fn direct_pair(
        &self,
        services: &[&str],
        exposes: &[ExposeSpec],
        punch: &str,
    ) -> (RunningDaemon, RunningDaemon) {
        self.pair_when(services, exposes, punch, "a direct path", direct)
            .await
    }

    /// As [`Lab::direct_pair`], returning once alice's status meets `up`.
    pub async fn pair_when(
        &self,
        services: &[&str],
        exposes: &[ExposeSpec],
        punch: &str,
        what: &str,
        up: fn(&StatusDoc) -> bool,
    ) -> (RunningDaemon, RunningDaemon) {
        let (alice, bob) = self.pair(services, exposes.to_vec(), punch).await;
        let ready = wait_for(what, Duration::from_secs(3600), || {
            Some(alice.status.snapshot()).filter(up)
        });
        if tokio::time::timeout(Duration::from_secs(20), ready)
            .await
            .is_err()
        {
            panic!(
                "no {what} within 20 s: alice {:?}, bob {:?}",
                alice.status.snapshot().peers,
                bob.status.snapshot().peers
            );
        }
        (alice, bob)
    }

    pub async fn stop(self, daemons: Vec<RunningDaemon>) {
        for d in daemons {
            d.shutdown(Duration::from_secs(3)).await;
        }
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
        self.rendezvous.stop().await;
    }
}

/// Asks a source service (through `addr`) for `len` bytes.
pub async fn ask_for(addr: SocketAddr, len: u64) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_u64(len).await.unwrap();
    s
}

/// A plain HTTP/1.0 GET; the body of a 200 answer.
pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").expect("headers end");
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    body.to_owned()
}
