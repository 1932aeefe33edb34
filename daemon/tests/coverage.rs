//! What a user relies on and nothing else tested: the rendezvous
//! re-registration backoff (paused time), a slow reader beside a fast one,
//! the bound on connections waiting for a tunnel, and what both ends see
//! when a tunnel dies mid-stream (1,000 streams: `tests/streams.rs`). Real
//! daemons and a real rendezvous on 127.0.0.1:0.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use punchd::demo::loopback::peer_config;
use punchd::{hex, pattern, Identity};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use support::{ask_for, wait_for, Lab, Logs};

/// With the rendezvous down, the daemon tries again after 250 ms, then
/// doubling up to 10 s, each delay within ±25 % jitter (`backoff.rs`), and
/// the jitter really varies. A stand-in rendezvous accepts each attempt
/// and drops it at once; paused time makes the 40-odd seconds instant.
#[tokio::test(start_paused = true)]
async fn rendezvous_reconnects_back_off_from_250ms_doubling_to_10s_with_jitter() {
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", dead.local_addr().unwrap());
    let cfg = peer_config("alice", &url, &[], &[], &[], "transports = [\"tcp\"]").unwrap();
    let daemon = punchd::start(cfg, Identity::generate().unwrap(), CancellationToken::new())
        .await
        .unwrap();
    let mut attempts = Vec::new();
    for _ in 0..10 {
        let (s, _) = dead.accept().await.unwrap();
        attempts.push(Instant::now());
        drop(s);
    }
    let gaps: Vec<Duration> = attempts.windows(2).map(|w| w[1] - w[0]).collect();
    println!("reconnect gaps: {gaps:?}");
    let bases_ms = [250u64, 500, 1000, 2000, 4000, 8000, 10_000, 10_000, 10_000];
    // A gap between two accepts is the backoff delay plus the attempt
    // itself (connect, the upgrade request, seeing it dropped), which on
    // paused time can read a little: CI saw 313 ms for a 250 ms base,
    // 0.5 ms past +25 %.
    let attempt = Duration::from_millis(20);
    for (gap, base) in gaps.iter().zip(bases_ms) {
        let base = Duration::from_millis(base);
        assert!(
            *gap >= base.mul_f64(0.75) && *gap <= base.mul_f64(1.25) + attempt,
            "reconnect gaps {gaps:?}: {gap:?} is outside {base:?} ± 25 % (+ {attempt:?} for the attempt)"
        );
    }
    // Jitter: the capped delays are not all the same.
    assert!(
        gaps[6..].windows(2).any(|w| w[0] != w[1]),
        "no jitter: {gaps:?}"
    );
    daemon.shutdown(Duration::ZERO).await;
}

/// A reader that stops reading holds up only its own stream: a second
/// stream on the same tunnel completes intact while the first stays
/// blocked, and what the first has in flight (every socket buffer on the
/// way, both daemons' copy buffers and its 256 KiB mux window) stays far
/// below what its service has to send. Then the slow reader reads on and
/// gets everything, intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_stalls_only_its_own_stream() {
    const SLOW: u64 = 64 * 1024 * 1024;
    const FAST: u64 = 8 * 1024 * 1024;
    /// In flight for a stalled stream: loopback socket buffers (up to a few
    /// MiB each with autotuning, four of them), 2 × 32 KiB of copy buffer
    /// and the mux window: about 9 MiB seen. The service's 64 MiB never fit.
    const IN_FLIGHT_MAX: u64 = 32 * 1024 * 1024;
    let lab = Lab::new().await;
    let (alice, bob, written) = lab.source_pair().await;
    let forward = alice.forward_addrs[0];
    let mut slow = ask_for(forward, SLOW).await;
    let mut first = [0u8; 1];
    slow.read_exact(&mut first).await.unwrap();
    // The slow stream's service fills what it can, then blocks.
    let mut fast = ask_for(forward, FAST).await;
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), fast.read_to_end(&mut got))
        .await
        .expect("the fast stream was stalled by the slow one")
        .unwrap();
    assert_eq!(got.len() as u64, FAST);
    assert_eq!(
        hex(&Sha256::digest(&got)),
        hex(&Sha256::digest(pattern(FAST as usize, 7)))
    );
    let slow_sent = written.load(Ordering::Relaxed) - FAST;
    println!("stalled stream: {slow_sent} bytes in flight");
    assert!(
        slow_sent < IN_FLIGHT_MAX,
        "the stalled stream's service got {slow_sent} bytes out: not held back"
    );
    // Nothing was lost while it was held back.
    let mut rest = Vec::with_capacity(SLOW as usize);
    rest.push(first[0]);
    tokio::time::timeout(Duration::from_secs(120), slow.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rest.len() as u64, SLOW);
    assert!(rest == pattern(SLOW as usize, 7), "slow stream corrupted");
    lab.stop(vec![alice, bob]).await;
}

/// With no tunnel to bob, 256 local connections wait for one; the 257th
/// is closed at once, and the log says why. The 256 keep waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_257th_connection_waiting_for_a_tunnel_is_refused_with_the_reason() {
    let logs = Logs::capture();
    let lab = Lab::new().await;
    // bob never starts: no tunnel can come up.
    let alice = lab.alice(&["echo"], "").await;
    let forward = alice.forward_addrs[0];
    let mut waiting = Vec::new();
    for _ in 0..256 {
        waiting.push(TcpStream::connect(forward).await.unwrap());
    }
    wait_for("256 connections waiting", Duration::from_secs(10), || {
        (alice.status.snapshot().forwards[0].active == 256).then_some(())
    })
    .await;
    // A refused connection is reset (never a clean end), so fast that the
    // reset can reach connect() itself.
    match TcpStream::connect(forward).await {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        Ok(mut extra) => {
            let mut buf = [0u8; 1];
            let read = tokio::time::timeout(Duration::from_secs(5), extra.read(&mut buf))
                .await
                .expect("the 257th connection was not refused");
            assert!(
                matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
                "the 257th connection must be reset, got {read:?}"
            );
        }
    }
    let reason = "too many connections waiting for a tunnel to bob";
    wait_for("the refusal in the log", Duration::from_secs(5), || {
        (!logs
            .lines_with(&["forwarded connection closed", reason])
            .is_empty())
        .then_some(())
    })
    .await;
    assert_eq!(logs.lines_with(&[reason]).len(), 1, "more than one refused");
    let mut buf = [0u8; 1];
    for s in &waiting {
        let r = s.try_read(&mut buf);
        assert!(
            matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "a waiting connection was closed: {r:?}"
        );
    }
    lab.stop(vec![alice]).await;
}

/// Reads until the stream ends: the byte count, and whether it ended in
/// an error (a reset) rather than a clean EOF.
async fn read_until_end(s: &mut TcpStream, mut got: u64) -> (u64, bool) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf))
            .await
            .expect("the cut stream neither ended nor failed within 30 s")
        {
            Ok(0) => return (got, false),
            Ok(n) => got += n as u64,
            Err(_) => return (got, true),
        }
    }
}

/// The peer dies mid-download: the local client must see an error, never
/// a clean EOF after part of the data (DESIGN.md: no silent truncation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_client_sees_an_error_not_eof_when_the_peer_dies_mid_download() {
    const TOTAL: u64 = 1 << 30;
    let lab = Lab::new().await;
    let (alice, bob, _) = lab.source_pair().await;
    let mut s = ask_for(alice.forward_addrs[0], TOTAL).await;
    let mut head = vec![0u8; 1024 * 1024];
    s.read_exact(&mut head).await.unwrap();
    // bob stops without a drain period: the stream is cut.
    bob.shutdown(Duration::ZERO).await;
    let (got, failed) = read_until_end(&mut s, head.len() as u64).await;
    assert!(got < TOTAL, "the cut came too late to test anything");
    assert!(
        failed,
        "clean EOF after {got} of {TOTAL} bytes: silent truncation"
    );
    lab.stop(vec![alice]).await;
}

/// The forwarding side dies mid-upload: the exposed service must see an
/// error, never a clean EOF after part of the data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exposed_service_sees_an_error_not_eof_when_the_peer_dies_mid_upload() {
    let lab = Lab::new().await;
    // The exposed service: counts what arrives, reports how it ended.
    let sink = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sink_addr = sink.local_addr().unwrap();
    let received = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = received.clone();
    let service = tokio::spawn(async move {
        let (mut s, _) = sink.accept().await.unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match s.read(&mut buf).await {
                Ok(0) => return false,
                Ok(n) => counter.fetch_add(n as u64, Ordering::Relaxed),
                Err(_) => return true,
            };
        }
    });
    let (alice, bob) = lab
        .direct_pair(
            &["sink"],
            &[lab.expose_at("sink", sink_addr, &["alice"])],
            "",
        )
        .await;
    let mut client = TcpStream::connect(alice.forward_addrs[0]).await.unwrap();
    let uploader = tokio::spawn(async move {
        let chunk = pattern(64 * 1024, 3);
        while client.write_all(&chunk).await.is_ok() {}
    });
    wait_for("the upload under way", Duration::from_secs(20), || {
        (received.load(Ordering::Relaxed) > 1024 * 1024).then_some(())
    })
    .await;
    // alice stops without a drain period: the stream is cut.
    alice.shutdown(Duration::ZERO).await;
    let failed = tokio::time::timeout(Duration::from_secs(30), service)
        .await
        .expect("the exposed service's connection neither ended nor failed")
        .unwrap();
    let got = received.load(Ordering::Relaxed);
    assert!(
        failed,
        "the exposed service got a clean EOF after {got} bytes of an unfinished upload"
    );
    uploader.abort();
    lab.stop(vec![bob]).await;
}
