//! Two real daemons and an embedded rendezvous on 127.0.0.1: punching,
//! transfer integrity, concurrency, access control and authentication.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use punchd::demo::loopback::ExposeSpec;
use support::{direct, wait_for, Lab};

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use punch_config::PeerConfig;
use punchd::demo::echo_roundtrip;
use punchd::demo::loopback::peer_config;
use punchd::{hex, pattern, Identity, PathState};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// Ports in LISTEN state, from /proc/net/tcp{,6}.
fn listening_ports() -> Vec<u16> {
    let mut ports = Vec::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() > 3 && cols[3] == "0A" {
                if let Some(port) = cols[1]
                    .rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
                {
                    ports.push(port);
                }
            }
        }
    }
    ports
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simultaneous_open_never_listens_on_the_punch_port() {
    let lab = Lab::new().await;
    let (alice, bob) = lab
        .pair(
            &["echo"],
            vec![lab.expose("echo", &["alice"])],
            "transports = [\"tcp\"]",
        )
        .await;
    let ports = wait_for("both punch ports", Duration::from_secs(10), || {
        let (a, b) = (
            alice.status.snapshot().punch_port,
            bob.status.snapshot().punch_port,
        );
        (a != 0 && b != 0).then_some((a, b))
    })
    .await;
    // Watch for a listener on either punch port for the whole punch.
    let saw_listener = Arc::new(AtomicBool::new(false));
    let stop = CancellationToken::new();
    let watcher = {
        let (saw, stop) = (saw_listener.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                let l = listening_ports();
                if l.contains(&ports.0) || l.contains(&ports.1) {
                    saw.store(true, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let doc = wait_for("a direct path", Duration::from_secs(20), || {
        Some(alice.status.snapshot()).filter(direct)
    })
    .await;
    let peer = &doc.peers[0];
    // Alice reached bob at bob's punch port: a simultaneous open between the two punch ports.
    assert_eq!(
        peer.remote_addr.as_deref(),
        Some(format!("127.0.0.1:{}", ports.1).as_str())
    );
    let punch = peer.last_punch.clone().unwrap();
    assert_eq!(punch.result, "ok");
    assert!(punch.attempts >= 1);
    println!(
        "punch: {} ms, {} attempts",
        punch.elapsed_ms, punch.attempts
    );
    // The connection is between the two punch ports, seen from the OS.
    assert!(
        tcp_established_between(ports.0, ports.1),
        "no established connection between the punch ports"
    );
    let bob_doc = wait_for("bob direct", Duration::from_secs(5), || {
        Some(bob.status.snapshot()).filter(direct)
    })
    .await;
    assert_eq!(
        bob_doc.peers[0].remote_addr.as_deref(),
        Some(format!("127.0.0.1:{}", ports.0).as_str())
    );
    // RTT shows up from keepalive pings.
    wait_for("an RTT", Duration::from_secs(5), || {
        alice.status.snapshot().peers[0].rtt_ms
    })
    .await;
    stop.cancel();
    watcher.await.unwrap();
    assert!(
        !saw_listener.load(Ordering::SeqCst),
        "a punch port was in LISTEN state"
    );
    lab.stop(vec![alice, bob]).await;
}

/// 16 MiB echoed through a forward over one transport; status must name it
/// and count the bytes.
async fn sixteen_mib_over(transport: &str) {
    let lab = Lab::new().await;
    let (alice, bob) = lab
        .pair(
            &["echo"],
            vec![lab.expose("echo", &["alice"])],
            &format!("transports = [\"{transport}\"]"),
        )
        .await;
    let data = pattern(16 * 1024 * 1024, 42);
    let expected = hex(&Sha256::digest(&data));
    // Connecting before the tunnel is up is fine: the connection waits for it.
    let stream = TcpStream::connect(alice.forward_addrs[0]).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(60), echo_roundtrip(stream, &data))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, expected);
    let doc = alice.status.snapshot();
    assert_eq!(doc.peers[0].path, PathState::Direct);
    assert_eq!(doc.peers[0].transport.map(|t| t.as_str()), Some(transport));
    // Wire bytes (QUIC's are sampled every 250 ms).
    let counted = wait_for("bytes counted", Duration::from_secs(2), || {
        let p = alice.status.snapshot().peers.remove(0);
        (p.bytes_out > 16 * 1024 * 1024 && p.bytes_in > 16 * 1024 * 1024).then_some(p)
    })
    .await;
    println!(
        "{transport}: {} bytes out, {} in",
        counted.bytes_out, counted.bytes_in
    );
    assert_eq!(doc.forwards[0].total, 1);
    lab.stop(vec![alice, bob]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_mib_arrive_intact_over_tcp() {
    sixteen_mib_over("tcp").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_mib_arrive_intact_over_quic() {
    sixteen_mib_over("quic").await;
}

/// An established TCP connection between these two local ports.
fn tcp_established_between(a: u16, b: u16) -> bool {
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    tcp.lines().any(|l| {
        l.contains(&format!(":{a:04X} "))
            && l.contains(&format!(":{b:04X} "))
            && l.split_whitespace().nth(3) == Some("01")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_tcp_and_quic_keeps_one_path_and_closes_the_other() {
    let lab = Lab::new().await;
    let (alice, bob) = lab
        .pair(&["echo"], vec![lab.expose("echo", &["alice"])], "")
        .await;
    for _ in 0..3 {
        let stream = TcpStream::connect(alice.forward_addrs[0]).await.unwrap();
        echo_roundtrip(stream, &pattern(64 * 1024, 1))
            .await
            .unwrap();
    }
    let ports = (
        alice.status.snapshot().punch_port,
        bob.status.snapshot().punch_port,
    );
    // Both ends name the same transport, and the loser is gone: no TCP
    // connection between the punch ports if QUIC won; no QUIC connection
    // left on either endpoint if TCP won.
    let kept = wait_for(
        "one path, the other closed",
        Duration::from_secs(10),
        || {
            let (a, b) = (alice.status.snapshot(), bob.status.snapshot());
            let ta = a.peers[0].transport?;
            let tb = b.peers[0].transport?;
            assert_eq!(ta, tb, "the two ends kept different paths");
            let closed = match ta.as_str() {
                "quic" => !tcp_established_between(ports.0, ports.1),
                "tcp" => a.quic_connections == Some(0) && b.quic_connections == Some(0),
                other => panic!("unexpected transport {other}"),
            };
            closed.then_some(ta)
        },
    )
    .await;
    println!("kept {}", kept.as_str());
    let stream = TcpStream::connect(alice.forward_addrs[0]).await.unwrap();
    echo_roundtrip(stream, &pattern(1024 * 1024, 2))
        .await
        .unwrap();
    assert_eq!(
        alice.status.snapshot().peers[0].transport,
        Some(kept),
        "the kept path carries the traffic"
    );
    lab.stop(vec![alice, bob]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_streams() {
    let lab = Lab::new().await;
    let (alice, bob) = lab
        .pair(&["echo"], vec![lab.expose("echo", &["alice"])], "")
        .await;
    wait_for("a direct path", Duration::from_secs(20), || {
        Some(alice.status.snapshot()).filter(direct)
    })
    .await;
    let forward = alice.forward_addrs[0];
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..100u64 {
        tasks.spawn(async move {
            let data = pattern(256 * 1024, i + 1);
            let expected = hex(&Sha256::digest(&data));
            let stream = TcpStream::connect(forward).await.unwrap();
            (echo_roundtrip(stream, &data).await.unwrap(), expected)
        });
    }
    // While they run, the tunnel counts them.
    let peak = wait_for("streams to be counted", Duration::from_secs(10), || {
        let n = alice.status.snapshot().peers[0].streams;
        (n > 1).then_some(n)
    })
    .await;
    let mut ok = 0;
    while let Some(r) = tasks.join_next().await {
        let (got, expected) = r.unwrap();
        assert_eq!(got, expected);
        ok += 1;
    }
    assert_eq!(ok, 100);
    assert!(peak <= 100);
    wait_for("streams to drain", Duration::from_secs(10), || {
        (alice.status.snapshot().peers[0].streams == 0).then_some(())
    })
    .await;
    assert_eq!(alice.status.snapshot().forwards[0].total, 100);
    lab.stop(vec![alice, bob]).await;
}

/// Reads until EOF; a refused stream closes without a byte. The refusal
/// may come so fast that the reset lands before `connect` returns (seen
/// in CI): that is a refusal too, as `ssh -L` users know it.
async fn closed_without_data(addr: SocketAddr) -> bool {
    let mut s = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
        Err(e) => panic!("connect to the forward {addr}: {e}"),
    };
    let mut buf = [0u8; 16];
    matches!(
        tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_not_exposed_or_not_allowed_are_refused() {
    let lab = Lab::new().await;
    // bob exposes "echo" to alice, "private" only to carol; "missing" does not exist.
    let exposes = vec![
        lab.expose("echo", &["alice"]),
        lab.expose("private", &["carol"]),
    ];
    let url = lab.rendezvous.url();
    let carol_key = Identity::generate().unwrap().public_key();
    let bob_cfg = peer_config(
        "bob",
        &url,
        &[("alice", lab.alice_id.public_key()), ("carol", carol_key)],
        &exposes,
        &[],
        "",
    )
    .unwrap();
    let alice_cfg = peer_config(
        "alice",
        &url,
        &[("bob", lab.bob_id.public_key())],
        &[],
        &[("bob", "echo"), ("bob", "private"), ("bob", "missing")],
        "",
    )
    .unwrap();
    let bob = punchd::start(bob_cfg, lab.bob_id.clone(), lab.cancel.child_token())
        .await
        .unwrap();
    let alice = punchd::start(alice_cfg, lab.alice_id.clone(), lab.cancel.child_token())
        .await
        .unwrap();
    wait_for("a direct path", Duration::from_secs(20), || {
        Some(alice.status.snapshot()).filter(direct)
    })
    .await;
    assert!(
        closed_without_data(alice.forward_addrs[1]).await,
        "not-allowed service must be refused"
    );
    assert!(
        closed_without_data(alice.forward_addrs[2]).await,
        "unexposed service must be refused"
    );
    // The allowed one still works over the same tunnel.
    let data = pattern(4096, 7);
    let got = echo_roundtrip(
        TcpStream::connect(alice.forward_addrs[0]).await.unwrap(),
        &data,
    )
    .await
    .unwrap();
    assert_eq!(got, hex(&Sha256::digest(&data)));
    lab.stop(vec![alice, bob]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impostor_registered_under_the_peers_name_gets_nothing() {
    let logs = support::Logs::capture();
    let lab = Lab::new().await;
    let url = lab.rendezvous.url();
    // Mallory registers as "bob" with her own key; alice pins bob's real key.
    let mallory = Identity::generate().unwrap();
    let bob_cfg = || {
        let echo = [lab.expose("echo", &["alice"])];
        peer_config(
            "bob",
            &url,
            &[("alice", lab.alice_id.public_key())],
            &echo,
            &[],
            "",
        )
        .unwrap()
    };
    let alice_cfg = peer_config(
        "alice",
        &url,
        &[("bob", lab.bob_id.public_key())],
        &[],
        &[("bob", "echo")],
        "timeout = \"1s\"",
    )
    .unwrap();
    let m = punchd::start(bob_cfg(), mallory, lab.cancel.child_token())
        .await
        .unwrap();
    let alice = punchd::start(alice_cfg, lab.alice_id.clone(), lab.cancel.child_token())
        .await
        .unwrap();
    wait_for("mallory registered", Duration::from_secs(10), || {
        (m.status.snapshot().rendezvous == "connected").then_some(())
    })
    .await;
    // Alice's local connection waits for a tunnel that must never come, and
    // is closed when a waiting connection's limit is up: `[punch] timeout`
    // (1 s) + 5 s (`peer/state.rs`), give or take 0.5 s.
    let limit = Duration::from_secs(1 + 5);
    let margin = Duration::from_millis(500);
    let started = Instant::now();
    assert!(closed_without_data(alice.forward_addrs[0]).await);
    let waited = started.elapsed();
    assert!(
        waited >= limit && waited <= limit + margin,
        "refused after {waited:?}, not {limit:?} + {margin:?}"
    );
    let doc = alice.status.snapshot();
    assert_eq!(doc.peers[0].path, PathState::None);
    assert_eq!(doc.peers[0].punches_ok, 0);
    assert_eq!(m.status.snapshot().peers[0].path, PathState::None);
    // Refused for the key: alice's log names the mismatch.
    assert!(
        !logs
            .lines_with(&[
                "peer=bob",
                "punch order carries a key other than the one in [[peers]]"
            ])
            .is_empty(),
        "no key-mismatch refusal in alice's log"
    );
    // Positive control: the genuine bob, in the same setup, gets through.
    m.shutdown(Duration::from_secs(1)).await;
    let bob = punchd::start(bob_cfg(), lab.bob_id.clone(), lab.cancel.child_token())
        .await
        .unwrap();
    let data = pattern(4096, 9);
    let stream = TcpStream::connect(alice.forward_addrs[0]).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(20), echo_roundtrip(stream, &data))
        .await
        .expect("the genuine peer was not reached")
        .unwrap();
    assert_eq!(got, hex(&Sha256::digest(&data)));
    assert!(direct(&alice.status.snapshot()));
    lab.stop(vec![alice, bob]).await;
}

#[tokio::test]
async fn a_peer_with_our_own_key_is_refused_at_start() {
    let id = Identity::generate().unwrap();
    let cfg: PeerConfig = peer_config(
        "alice",
        "http://127.0.0.1:9",
        &[("bob", id.public_key())],
        &[],
        &[],
        "",
    )
    .unwrap();
    let err = punchd::start(cfg, id, CancellationToken::new())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("own public key"), "{err}");
}

/// How a socket's reader saw it end.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// A clean EOF: what a truncated download must never look like.
    Fin,
    /// `ECONNRESET` (or another error).
    Reset(std::io::ErrorKind),
}

/// Reads `s` to its end, returning how it ended and the bytes read.
async fn read_to_end_kind<R: AsyncReadExt + Unpin>(s: &mut R) -> (End, u64) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        match s.read(&mut buf).await {
            Ok(0) => return (End::Fin, total),
            Ok(n) => total += n as u64,
            Err(e) => return (End::Reset(e.kind()), total),
        }
    }
}

/// A download service on 127.0.0.1:0: writes bytes without end to its one
/// connection and reports how that connection was first seen to end: a
/// FIN (the reader's EOF) or a reset (either half's error; Linux reports a
/// socket's error once, to whichever call comes first).
async fn endless_download() -> (SocketAddr, tokio::sync::oneshot::Receiver<End>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        let (mut r, mut w) = s.into_split();
        let writer = async {
            let chunk = pattern(64 * 1024, 9);
            loop {
                if let Err(e) = w.write_all(&chunk).await {
                    return End::Reset(e.kind());
                }
            }
        };
        let end = tokio::select! {
            e = writer => e,
            (e, _) = read_to_end_kind(&mut r) => e,
        };
        let _ = tx.send(end);
    });
    (addr, rx)
}

/// Which daemon dies mid-stream.
#[derive(Debug, Clone, Copy)]
enum Victim {
    Alice,
    Bob,
}

/// A download through a forward over `transport`, cut mid-stream by
/// stopping one daemon abruptly (its tunnel dies with it): the forward's
/// client and the exposed target must both read a reset, never a FIN
/// (before the stream framing, the survivor's side read a clean EOF).
async fn a_cut_tunnel_resets_both_ends(transport: &str, victim: Victim) {
    let lab = Lab::new().await;
    let (target, target_end) = endless_download().await;
    let tokens = (lab.cancel.child_token(), lab.cancel.child_token());
    let kill = match victim {
        Victim::Alice => tokens.0.clone(),
        Victim::Bob => tokens.1.clone(),
    };
    let expose = ExposeSpec {
        name: "download".into(),
        target: target.to_string(),
        allow: vec!["alice".into()],
    };
    let (alice, bob) = lab
        .pair_with(
            &["download"],
            vec![expose],
            &format!("transports = [\"{transport}\"]"),
            tokens,
        )
        .await;
    let mut client = TcpStream::connect(alice.forward_addrs[0]).await.unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut before = 0;
    while before < 4 * 1024 * 1024 {
        let n = tokio::time::timeout(Duration::from_secs(20), client.read(&mut buf))
            .await
            .expect("download started")
            .unwrap();
        assert!(n > 0, "download ended early");
        before += n;
    }
    kill.cancel();
    let (client_end, after) =
        tokio::time::timeout(Duration::from_secs(20), read_to_end_kind(&mut client))
            .await
            .expect("the client's stream ends once the tunnel is gone");
    let target_end = tokio::time::timeout(Duration::from_secs(20), target_end)
        .await
        .expect("the target's connection ends once the tunnel is gone")
        .unwrap();
    println!(
        "{transport}, {victim:?} cut after {before} + {after} bytes: client {client_end:?}, target {target_end:?}"
    );
    assert_eq!(
        client_end,
        End::Reset(std::io::ErrorKind::ConnectionReset),
        "the forward's client must read a reset"
    );
    assert_eq!(
        target_end,
        End::Reset(std::io::ErrorKind::ConnectionReset),
        "the exposed target must read a reset"
    );
    lab.stop(vec![alice, bob]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_cut_by_the_exposer_resets_both_ends_over_tcp() {
    a_cut_tunnel_resets_both_ends("tcp", Victim::Bob).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_cut_by_the_forwarder_resets_both_ends_over_tcp() {
    a_cut_tunnel_resets_both_ends("tcp", Victim::Alice).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_cut_by_the_exposer_resets_both_ends_over_quic() {
    a_cut_tunnel_resets_both_ends("quic", Victim::Bob).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_cut_by_the_forwarder_resets_both_ends_over_quic() {
    a_cut_tunnel_resets_both_ends("quic", Victim::Alice).await;
}

/// A client that half-closes its write side still gets the whole answer,
/// and the target sees the half-close as a FIN (the end marker), not a cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_still_carries_the_whole_response() {
    let lab = Lab::new().await;
    let (alice, bob) = lab
        .pair(&["echo"], vec![lab.expose("echo", &["alice"])], "")
        .await;
    let data = pattern(3 * 1024 * 1024 + 17, 5);
    let mut s = TcpStream::connect(alice.forward_addrs[0]).await.unwrap();
    let (mut r, mut w) = s.split();
    let (wrote, (end, got)) = tokio::join!(
        async {
            w.write_all(&data).await.unwrap();
            w.shutdown().await.unwrap();
        },
        read_to_end_kind(&mut r)
    );
    let () = wrote;
    assert_eq!((end, got), (End::Fin, data.len() as u64));
    lab.stop(vec![alice, bob]).await;
}
