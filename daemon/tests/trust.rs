//! Trust boundaries on loopback (issue #23): TLS to the rendezvous, signed
//! punch orders against a man in the middle, the admin API's token and
//! Host check, and secrets kept out of logs.
//!
//! The man in the middle is an in-test TCP proxy between alice and the
//! rendezvous that rewrites the candidates of every punch order in the
//! server's WebSocket frames (server frames are unmasked, so that is a
//! byte-level edit), optionally terminating TLS itself.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::wait_for;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use punch_config::{PeerConfig, RendezvousConfig, TlsSection};
use punchd::demo::echo_roundtrip;
use punchd::demo::loopback::{echo_server, peer_config, ExposeSpec, Rendezvous};
use punchd::{Identity, PathState, RunningDaemon};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("punchd-trust-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A CA and a leaf for 127.0.0.1 signed by it, written as PEM files
/// (the key 0600, as the server demands).
struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn pki(dir: &Path, tag: &str) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    leaf.subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
    let out = Pki {
        ca: dir.join(format!("{tag}-ca.pem")),
        cert: dir.join(format!("{tag}-cert.pem")),
        key: dir.join(format!("{tag}-key.pem")),
    };
    std::fs::write(&out.ca, ca_cert.pem()).unwrap();
    std::fs::write(&out.cert, leaf_cert.pem()).unwrap();
    punch_service::secret_file::write_private(&out.key, leaf_key.serialize_pem().as_bytes(), false)
        .unwrap();
    out
}

fn acceptor(p: &Pki) -> TlsAcceptor {
    use rustls_pki_types::pem::PemObject;
    let certs = rustls_pki_types::CertificateDer::pem_file_iter(&p.cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(&p.key).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    TlsAcceptor::from(Arc::new(cfg))
}

/// Where a rewritten order points, and what arrived there.
struct Trap {
    addr: SocketAddr,
    tcp_hits: Arc<AtomicUsize>,
    udp_hits: Arc<AtomicUsize>,
}

impl Trap {
    async fn start(cancel: CancellationToken) -> Self {
        Self::start_at([127, 0, 0, 1], cancel).await
    }

    /// A trap on another loopback address (a "third host").
    async fn start_at(ip: [u8; 4], cancel: CancellationToken) -> Self {
        let tcp = TcpListener::bind(SocketAddr::from((ip, 0))).await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let udp = UdpSocket::bind(addr).await.unwrap();
        let (tcp_hits, udp_hits) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (t, u) = (tcp_hits.clone(), udp_hits.clone());
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    Ok(_) = tcp.accept() => { t.fetch_add(1, Ordering::SeqCst); }
                    Ok(_) = udp.recv_from(&mut buf) => { u.fetch_add(1, Ordering::SeqCst); }
                }
            }
        });
        Self {
            addr,
            tcp_hits,
            udp_hits,
        }
    }

    fn hits(&self) -> usize {
        self.tcp_hits.load(Ordering::SeqCst) + self.udp_hits.load(Ordering::SeqCst)
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A proxy in front of `upstream` (plain http): TLS towards the daemon
/// when `tls` is given, and with `inject`, every punch order's candidates
/// replaced by that address.
async fn mitm(
    tls: Option<TlsAcceptor>,
    upstream: SocketAddr,
    inject: Option<Inject>,
    cancel: CancellationToken,
) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (client, _) = tokio::select! {
                _ = cancel.cancelled() => return,
                r = listener.accept() => r.unwrap(),
            };
            let tls = tls.clone();
            let cancel = cancel.clone();
            tokio::spawn(async move {
                let client: Box<dyn Io> = match tls {
                    Some(a) => match a.accept(client).await {
                        Ok(s) => Box::new(s),
                        Err(_) => return,
                    },
                    None => Box::new(client),
                };
                let server = TcpStream::connect(upstream).await.unwrap();
                let (mut cr, mut cw) = tokio::io::split(client);
                let (mut sr, mut sw) = server.into_split();
                let up = async { tokio::io::copy(&mut cr, &mut sw).await.map(|_| ()) };
                let down = rewrite_down(&mut sr, &mut cw, inject);
                tokio::select! {
                    _ = up => {}
                    _ = down => {}
                    _ = cancel.cancelled() => {}
                }
            });
        }
    });
    addr
}

/// Copies server → daemon: the HTTP head as is, then WebSocket frames,
/// rewriting punch orders when `inject` is set.
async fn rewrite_down(
    from: &mut (impl AsyncRead + Unpin),
    to: &mut (impl AsyncWrite + Unpin),
    inject: Option<Inject>,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut head_done = false;
    let mut chunk = [0u8; 16384];
    loop {
        let n = from.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut out = Vec::new();
        if !head_done {
            let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            out.extend(buf.drain(..end + 4));
            head_done = true;
        }
        while let Some((frame_len, opcode, payload)) = next_frame(&buf) {
            match (opcode, inject) {
                (1, Some(how)) => {
                    let text = String::from_utf8_lossy(payload).into_owned();
                    out.extend(frame(1, rewrite_order(&text, how).as_bytes()));
                }
                _ => out.extend_from_slice(&buf[..frame_len]),
            }
            buf.drain(..frame_len);
        }
        to.write_all(&out).await?;
        to.flush().await?;
    }
}

/// One complete unmasked frame at the start of `buf`: its length, opcode
/// and payload.
fn next_frame(buf: &[u8]) -> Option<(usize, u8, &[u8])> {
    if buf.len() < 2 {
        return None;
    }
    let (head, len) = match buf[1] & 0x7f {
        126 if buf.len() >= 4 => (4, u16::from_be_bytes([buf[2], buf[3]]) as usize),
        127 if buf.len() >= 10 => (10, u64::from_be_bytes(buf[2..10].try_into().ok()?) as usize),
        126 | 127 => return None,
        n => (2, n as usize),
    };
    (buf.len() >= head + len).then(|| (head + len, buf[0] & 0x0f, &buf[head..head + len]))
}

fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => out.push(n as u8),
        n if n <= 0xffff => {
            out.push(126);
            out.extend((n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend((n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
    out
}

/// How the man in the middle rewrites punch orders.
#[derive(Debug, Clone, Copy)]
enum Inject {
    /// Every candidate replaced by this address.
    Replace(SocketAddr),
    /// The true candidates kept first, then [`FLOOD`] more on other
    /// ports of 127.0.0.1, with `hidden` among them (issue #24).
    Flood { hidden: SocketAddr },
    /// Issue #24: the daemon is told its public IP is `public` (another
    /// site than the peer's), and every order gets `victim` added to both
    /// lists after the true candidates: a third host, or a LAN address of
    /// a peer that is not behind our NAT.
    Victim {
        victim: SocketAddr,
        public: std::net::IpAddr,
    },
    /// Issue #24: the first order gets [`HUGE`] extra candidates, `hidden`
    /// among them, far past the daemon's 64 KiB message cap; later orders
    /// pass untouched.
    HugeOnce { hidden: SocketAddr },
}

/// Candidates the huge order adds.
const HUGE: u16 = 10_000;

/// Whether the huge order was sent (one per test process: one test uses it).
static HUGE_SENT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Candidates a flooded order adds: as many as fit the daemon's 64 KiB
/// message cap (a 10,000-candidate order is refused whole by that cap).
const FLOOD: u16 = 3_000;

fn rewrite_order(text: &str, how: Inject) -> String {
    let Ok(mut v) = serde_json::from_str::<serde_json::Value>(text) else {
        return text.to_owned();
    };
    if v["type"] == "punch" {
        match how {
            Inject::Replace(inject) => {
                v["candidates"] = serde_json::json!([inject.to_string()]);
                v["udp_candidates"] = serde_json::json!([inject.to_string()]);
            }
            Inject::Flood { hidden } => {
                let mut list: Vec<serde_json::Value> =
                    v["candidates"].as_array().cloned().unwrap_or_default();
                for i in 0..FLOOD {
                    let a = if i == FLOOD / 2 {
                        hidden
                    } else {
                        SocketAddr::from(([127, 0, 0, 1], 20_000 + i))
                    };
                    list.push(serde_json::json!(a.to_string()));
                }
                v["candidates"] = serde_json::Value::Array(list);
            }
            Inject::Victim { victim, .. } => {
                for key in ["candidates", "udp_candidates"] {
                    if let Some(list) = v[key].as_array_mut() {
                        list.push(serde_json::json!(victim.to_string()));
                    }
                }
            }
            Inject::HugeOnce { hidden } => {
                if !HUGE_SENT.swap(true, Ordering::SeqCst) {
                    let mut list: Vec<serde_json::Value> =
                        v["candidates"].as_array().cloned().unwrap_or_default();
                    for i in 0..HUGE {
                        let a = if i == HUGE / 2 {
                            hidden
                        } else {
                            SocketAddr::from(([127, 0, 0, 1], 20_000 + i))
                        };
                        list.push(serde_json::json!(a.to_string()));
                    }
                    v["candidates"] = serde_json::Value::Array(list);
                }
            }
        }
    }
    if let (Inject::Victim { public, .. }, true) = (how, v["type"] == "welcome") {
        if let Some(seen) = v["observed_addr"]
            .as_str()
            .and_then(|a| a.parse::<SocketAddr>().ok())
        {
            v["observed_addr"] =
                serde_json::json!(SocketAddr::new(public, seen.port()).to_string());
        }
    }
    v.to_string()
}

struct Pair {
    alice: RunningDaemon,
    bob: RunningDaemon,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Pair {
    /// alice forwards bob's `echo`; `alice_cfg` adjusts alice's config.
    async fn start(
        rv: &Rendezvous,
        alice_url: &str,
        bob_url: &str,
        punch: &str,
        adjust: impl FnOnce(&mut PeerConfig, &mut PeerConfig),
    ) -> Self {
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let echo = echo_server(cancel.clone(), &tracker).await.unwrap();
        let (a_id, b_id) = (Identity::generate().unwrap(), Identity::generate().unwrap());
        let mut a = peer_config(
            "alice",
            alice_url,
            &[("bob", b_id.public_key())],
            &[],
            &[("bob", "echo")],
            punch,
        )
        .unwrap();
        let expose = ExposeSpec {
            name: "echo".into(),
            target: echo.to_string(),
            allow: vec!["alice".into()],
        };
        let mut b = peer_config(
            "bob",
            bob_url,
            &[("alice", a_id.public_key())],
            &[expose],
            &[],
            punch,
        )
        .unwrap();
        adjust(&mut a, &mut b);
        let _ = rv;
        let bob = punchd::start(b, b_id, cancel.child_token()).await.unwrap();
        let alice = punchd::start(a, a_id, cancel.child_token()).await.unwrap();
        Self {
            alice,
            bob,
            cancel,
            tracker,
        }
    }

    async fn stop(self) {
        self.alice.shutdown(Duration::from_secs(2)).await;
        self.bob.shutdown(Duration::from_secs(2)).await;
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

fn path_of(d: &RunningDaemon) -> PathState {
    d.status
        .snapshot()
        .peers
        .first()
        .map_or(PathState::None, |p| p.path)
}

fn orders_refused(d: &RunningDaemon) -> u64 {
    d.status
        .render_metrics()
        .lines()
        .find_map(|l| l.strip_prefix("punchd_orders_refused_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn tls_config(p: &Pki) -> RendezvousConfig {
    RendezvousConfig {
        tls: Some(TlsSection {
            cert: p.cert.clone(),
            key: p.key.clone(),
        }),
        ..RendezvousConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_with_ca_file_and_a_pinned_server_key_punches_direct() {
    let dir = temp_dir("happy");
    let p = pki(&dir, "rv");
    let rv = Rendezvous::start(tls_config(&p)).await.unwrap();
    let url = rv.url();
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    let key = rv.server_key;
    let pair = Pair::start(&rv, &url, &url, "transports = [\"tcp\"]", |a, b| {
        for c in [a, b] {
            c.rendezvous.ca_file = Some(p.ca.clone());
            c.rendezvous.server_key = Some(key);
        }
    })
    .await;
    wait_for("a direct path over wss", Duration::from_secs(20), || {
        (path_of(&pair.alice) == PathState::Direct).then_some(())
    })
    .await;
    let stream = TcpStream::connect(pair.alice.forward_addrs[0])
        .await
        .unwrap();
    let data = punchd::pattern(64 * 1024, 23);
    let echoed = echo_roundtrip(stream, &data).await.unwrap();
    assert_eq!(echoed, punchd::hex(&Sha256::digest(&data)));
    assert_eq!(orders_refused(&pair.alice), 0);
    pair.stop().await;
    rv.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The rewritten order must be refused by alice, who then sends nothing
/// to the injected address (bob, who got a true order, punches towards
/// alice's real endpoint and gives up).
async fn injected_order_is_refused(tls: bool) {
    let dir = temp_dir(if tls { "mitm-tls" } else { "mitm-plain" });
    let p = pki(&dir, "proxy");
    let rv = Rendezvous::start(RendezvousConfig::default())
        .await
        .unwrap();
    let cancel = CancellationToken::new();
    let trap = Trap::start(cancel.clone()).await;
    let acceptor = tls.then(|| acceptor(&p));
    let proxy = mitm(
        acceptor,
        rv.addr,
        Some(Inject::Replace(trap.addr)),
        cancel.clone(),
    )
    .await;
    let alice_url = format!("{}://{proxy}", if tls { "https" } else { "http" });
    let key = rv.server_key;
    let punch = "transports = [\"tcp\", \"quic\"]\ntimeout = \"1s\"\nmode = \"direct-only\"";
    let pair = Pair::start(&rv, &alice_url, &rv.url(), punch, |a, _| {
        if tls {
            a.rendezvous.ca_file = Some(p.ca.clone());
        }
        a.rendezvous.server_key = Some(key);
    })
    .await;
    wait_for("alice to refuse an order", Duration::from_secs(20), || {
        (orders_refused(&pair.alice) > 0).then_some(())
    })
    .await;
    // bob's side of that session ends (no answer from alice): by then
    // alice would long have fired at the trap.
    wait_for("bob's punch to end", Duration::from_secs(20), || {
        pair.bob.status.snapshot().peers[0]
            .last_punch
            .as_ref()
            .map(|_| ())
    })
    .await;
    assert_eq!(trap.hits(), 0, "alice sent packets to the injected address");
    assert_ne!(path_of(&pair.alice), PathState::Direct);
    pair.stop().await;
    cancel.cancel();
    rv.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewritten_order_over_plain_http_is_refused_with_a_pinned_key() {
    injected_order_is_refused(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewritten_order_behind_a_tls_terminating_proxy_is_refused() {
    injected_order_is_refused(true).await;
}

fn limit_refusals(d: &RunningDaemon, reason: &str) -> u64 {
    let prefix = format!("punchd_limit_refusals_total{{reason=\"{reason}\"}} ");
    d.status
        .render_metrics()
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Issue #24: an unpinned link stuffs every order for alice with 3,000
/// extra candidates on other ports, one of them a listener here. alice
/// trims the order (8 candidates, 3 ports), counts every dropped one, never connects to the hidden
/// listener, and still punches bob through the true candidates kept first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_stuffed_with_candidates_is_trimmed_and_still_punches() {
    let rv = Rendezvous::start(RendezvousConfig::default())
        .await
        .unwrap();
    let cancel = CancellationToken::new();
    let hidden = Trap::start(cancel.clone()).await;
    let proxy = mitm(
        None,
        rv.addr,
        Some(Inject::Flood {
            hidden: hidden.addr,
        }),
        cancel.clone(),
    )
    .await;
    let pair = Pair::start(&rv, &format!("http://{proxy}"), &rv.url(), "", |_, _| {}).await;
    wait_for("alice to trim an order", Duration::from_secs(20), || {
        // Past the third port every extra is dropped for its port.
        (limit_refusals(&pair.alice, "candidate_address") >= u64::from(FLOOD) - 2).then_some(())
    })
    .await;
    wait_for("a tunnel", Duration::from_secs(30), || {
        (path_of(&pair.alice) != PathState::None).then_some(())
    })
    .await;
    let stream = TcpStream::connect(pair.alice.forward_addrs[0])
        .await
        .unwrap();
    let data = punchd::pattern(256 * 1024, 24);
    let echoed = echo_roundtrip(stream, &data).await.unwrap();
    assert_eq!(echoed, punchd::hex(&Sha256::digest(&data)));
    assert_eq!(
        hidden.hits(),
        0,
        "alice connected to a candidate past the cap"
    );
    pair.stop().await;
    cancel.cancel();
    rv.stop().await;
}

/// Issue #24: orders may only aim at the peer's own addresses. alice's
/// link is rewritten so she is told her public IP is 127.0.0.3 (another
/// site than bob's 127.0.0.1), and every order for her also names a
/// listener on 127.0.0.2: a third host, or a "LAN address" of bob's that
/// can only lead into alice's own LAN. alice drops it from both lists,
/// counted, sends it nothing, and still gets a tunnel to bob that carries
/// checksummed bytes. (Before, only the 8-candidate and 3-port caps held,
/// and the listener got her SYNs and datagrams.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_aiming_past_the_peer_is_cut_to_the_peers_own_addresses() {
    let rv = Rendezvous::start(RendezvousConfig::default())
        .await
        .unwrap();
    let cancel = CancellationToken::new();
    let victim = Trap::start_at([127, 0, 0, 2], cancel.clone()).await;
    let how = Inject::Victim {
        victim: victim.addr,
        public: [127, 0, 0, 3].into(),
    };
    let proxy = mitm(None, rv.addr, Some(how), cancel.clone()).await;
    let pair = Pair::start(&rv, &format!("http://{proxy}"), &rv.url(), "", |_, _| {}).await;
    wait_for("a tunnel", Duration::from_secs(30), || {
        (path_of(&pair.alice) != PathState::None).then_some(())
    })
    .await;
    let stream = TcpStream::connect(pair.alice.forward_addrs[0])
        .await
        .unwrap();
    let data = punchd::pattern(256 * 1024, 25);
    let echoed = echo_roundtrip(stream, &data).await.unwrap();
    assert_eq!(echoed, punchd::hex(&Sha256::digest(&data)));
    assert_eq!(victim.hits(), 0, "alice sent to an address not bob's");
    // Both lists of every order: at least two dropped, each counted.
    assert!(limit_refusals(&pair.alice, "candidate_not_peer") >= 2);
    pair.stop().await;
    cancel.cancel();
    rv.stop().await;
}

/// Issue #24: an order with 10,000 candidates over the real WebSocket
/// (about 180 KB of JSON). The daemon's 64 KiB message cap refuses it
/// whole: the connection to the rendezvous is closed and made again, no
/// candidate of it is contacted, and the next (honest) order punches and
/// carries checksummed bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_with_ten_thousand_candidates_is_refused_whole_and_punching_recovers() {
    let rv = Rendezvous::start(RendezvousConfig::default())
        .await
        .unwrap();
    let cancel = CancellationToken::new();
    let hidden = Trap::start(cancel.clone()).await;
    let proxy = mitm(
        None,
        rv.addr,
        Some(Inject::HugeOnce {
            hidden: hidden.addr,
        }),
        cancel.clone(),
    )
    .await;
    let logs = support::Logs::capture();
    let pair = Pair::start(
        &rv,
        &format!("http://{proxy}"),
        &rv.url(),
        "timeout = \"2s\"",
        |_, _| {},
    )
    .await;
    wait_for("a tunnel", Duration::from_secs(40), || {
        (path_of(&pair.alice) != PathState::None).then_some(())
    })
    .await;
    assert!(
        HUGE_SENT.load(Ordering::SeqCst),
        "the huge order was never sent"
    );
    let stream = TcpStream::connect(pair.alice.forward_addrs[0])
        .await
        .unwrap();
    let data = punchd::pattern(256 * 1024, 26);
    let echoed = echo_roundtrip(stream, &data).await.unwrap();
    assert_eq!(echoed, punchd::hex(&Sha256::digest(&data)));
    assert_eq!(
        hidden.hits(),
        0,
        "alice contacted a candidate of the huge order"
    );
    // Refused by the message cap (the connection closed), not trimmed.
    assert_eq!(limit_refusals(&pair.alice, "candidates"), 0);
    let registered = logs.lines_with(&["registered with rendezvous", &proxy.to_string()]);
    assert!(
        registered.len() >= 2,
        "alice did not re-register after the refusal: {registered:#?}"
    );
    pair.stop().await;
    cancel.cancel();
    rv.stop().await;
}

/// One raw HTTP/1.1 request; returns the status code.
async fn http(addr: SocketAddr, method: &str, path: &str, host: &str, auth: Option<&str>) -> u16 {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let auth = auth.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn punches(d: &RunningDaemon) -> u64 {
    d.status
        .render_metrics()
        .lines()
        .filter(|l| l.starts_with("punchd_punches_total") && l.contains("result=\"ok\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repunch_needs_the_admin_token_and_the_right_host() {
    let rv = Rendezvous::start(RendezvousConfig::default())
        .await
        .unwrap();
    let url = rv.url();
    let pair = Pair::start(&rv, &url, &url, "transports = [\"tcp\"]", |_, _| {}).await;
    wait_for("a direct path", Duration::from_secs(20), || {
        (path_of(&pair.alice) == PathState::Direct).then_some(())
    })
    .await;
    let admin = pair.alice.admin_addr;
    let host = admin.to_string();
    let before = punches(&pair.alice);
    assert!(before > 0, "no ok punch counted");
    let token = std::fs::read_to_string(&pair.alice.admin_token_file).unwrap();
    let token = token.trim();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&pair.alice.admin_token_file)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let repunch = "/v1/peers/bob/repunch";
    assert_eq!(http(admin, "POST", repunch, &host, None).await, 401);
    assert_eq!(
        http(admin, "POST", repunch, &host, Some("wrong")).await,
        401
    );
    assert_eq!(
        http(admin, "POST", repunch, "evil.example:7070", Some(token)).await,
        421
    );
    assert_eq!(
        http(admin, "GET", "/v1/status", "evil.example", None).await,
        421
    );
    assert_eq!(http(admin, "GET", "/v1/status", &host, None).await, 200);
    assert_eq!(
        http(
            admin,
            "GET",
            "/metrics",
            &format!("localhost:{}", admin.port()),
            None
        )
        .await,
        200
    );
    // Refused requests changed nothing: the tunnel is still the first one.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(punches(&pair.alice), before);
    assert_eq!(path_of(&pair.alice), PathState::Direct);
    // The CLI finds nothing without the token file, then re-punches with it.
    let cli = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_punchd"))
            .args(args)
            .output()
            .unwrap()
    };
    let nowhere = cli(&[
        "repunch",
        "bob",
        "--admin",
        &host,
        "--token-file",
        "/nonexistent/t",
    ]);
    assert_eq!(nowhere.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&nowhere.stderr).contains("--token-file"));
    let token_file = pair.alice.admin_token_file.to_str().unwrap();
    let ok = cli(&[
        "repunch",
        "bob",
        "--admin",
        &host,
        "--token-file",
        token_file,
    ]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    wait_for("the re-punch", Duration::from_secs(20), || {
        (punches(&pair.alice) > before).then_some(())
    })
    .await;
    pair.stop().await;
    rv.stop().await;
}

/// Runs the punchd binary with `config` until a stderr line contains
/// `want` (or `timeout`), then kills it; returns all stderr.
fn run_until(config: &Path, want: &str, timeout: Duration) -> String {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_punchd"))
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "debug")
        .env("NO_COLOR", "1")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + timeout;
    let mut all = String::new();
    while Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
            all.push_str(&line);
            all.push('\n');
            if line.contains(want) {
                break;
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    all
}

fn write_config(dir: &Path, url: &str, extra: &str) -> PathBuf {
    let key = dir.join("alice.key");
    Identity::generate().unwrap().save_new(&key).unwrap();
    let cfg = dir.join("alice.toml");
    let text = format!(
        "name = \"alice\"\nkey_file = \"alice.key\"\n[rendezvous]\nurl = \"{url}\"\n{extra}\n\
         [admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"admin.token\"\n"
    );
    std::fs::write(&cfg, text).unwrap();
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_is_refused_with_a_clear_error() {
    let dir = temp_dir("wrong-ca");
    let server = pki(&dir, "server");
    let other = pki(&dir, "other");
    let rv = Rendezvous::start(tls_config(&server)).await.unwrap();
    let extra = format!("ca_file = {:?}", other.ca.display().to_string());
    let cfg = write_config(&dir, &rv.url(), &extra);
    let log = tokio::task::spawn_blocking(move || {
        run_until(&cfg, "not trusted", Duration::from_secs(15))
    })
    .await
    .unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("not trusted"))
        .unwrap_or_else(|| panic!("no refusal in:\n{log}"));
    assert!(line.contains(&rv.url()), "{line}");
    assert!(line.contains("ca_file"), "{line}");
    assert!(!log.contains("registered with rendezvous"), "{log}");
    rv.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_network_token_never_reaches_the_logs() {
    let dir = temp_dir("token-logs");
    let secret = "tok-3f9a1c77e2";
    let rv = Rendezvous::start(RendezvousConfig {
        token: Some(punch_config::Secret::new(secret)),
        ..RendezvousConfig::default()
    })
    .await
    .unwrap();
    std::fs::write(dir.join("net.token"), format!("{secret}\n")).unwrap();
    let cfg = write_config(&dir, &rv.url(), "token_file = \"net.token\"");
    let log = tokio::task::spawn_blocking(move || {
        run_until(&cfg, "registered with rendezvous", Duration::from_secs(15))
    })
    .await
    .unwrap();
    assert!(log.contains("registered with rendezvous"), "{log}");
    assert!(!log.contains(secret), "the token is in the log:\n{log}");
    let cfg = PeerConfig::load(&dir.join("alice.toml")).unwrap();
    assert!(!format!("{cfg:?}").contains(secret));
    rv.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}
