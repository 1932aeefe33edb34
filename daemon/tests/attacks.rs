//! Attacks on one daemon pair through its own forward (issue #24), on
//! loopback: each asserts the refusal and that honest traffic still moves.
//! (Stuffed punch orders are in `trust.rs`, beside its man in the middle.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use punchd::{hex, pattern, PathState};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::{wait_for, Lab, Logs};

/// Echoes `len` checksummed bytes through `addr`; true if all came back.
async fn honest_echo(addr: std::net::SocketAddr, len: usize, seed: u64) -> bool {
    let data = pattern(len, seed);
    let Ok(s) = TcpStream::connect(addr).await else {
        return false;
    };
    punchd::demo::echo_roundtrip(s, &data)
        .await
        .is_ok_and(|got| got == hex(&Sha256::digest(&data)))
}

/// 2,000 local connections at once through one forward, all held open:
/// the forward and the tunnel carry what fits (a tunnel has 1,024 stream
/// slots) and reset the rest at once, counted; the tunnel is never cut
/// (before: yamux's TooManyStreams ended it and every forward of the peer
/// broke), and once the flood lets go an honest transfer goes through the
/// very same tunnel.
async fn two_thousand_connections_at_once(
    (alice_punch, bob_punch): (&str, &str),
    up: fn(&punchd::StatusDoc) -> bool,
) {
    const FLOOD: usize = 2_000;
    // One flood at a time: three at once would share 2 cores and the fd
    // limit, and each test reads only the log lines of its own run.
    static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _turn = ONE_AT_A_TIME.lock().await;
    let logs = Logs::capture();
    let mark = logs.mark();
    let lab = Lab::new().await;
    let echo = [lab.expose_at("echo", lab.echo, &["alice"])];
    let bob = lab.bob(&echo, bob_punch).await;
    let alice = lab.alice(&["echo"], alice_punch).await;
    wait_for("the tunnel", Duration::from_secs(30), || {
        Some(alice.status.snapshot()).filter(up)
    })
    .await;
    let forward = alice.forward_addrs[0];
    let started = std::time::Instant::now();
    let (release_tx, release_rx) = tokio::sync::watch::channel(false);
    let answered = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..FLOOD {
        let mut release = release_rx.clone();
        let answered = answered.clone();
        tasks.spawn(async move {
            let data = pattern(512, i as u64 + 1);
            let echoed = async {
                let mut s = TcpStream::connect(forward).await.ok()?;
                s.write_all(&data).await.ok()?;
                let mut echoed = vec![0u8; data.len()];
                // A refused connection reads a reset (or an end) here.
                s.read_exact(&mut echoed).await.ok()?;
                Some((s, echoed))
            }
            .await;
            answered.fetch_add(1, Ordering::SeqCst);
            let (_held, echoed) = echoed?;
            let _ = release.wait_for(|go| *go).await;
            (echoed == data).then_some(())
        });
    }
    // Everyone gets an answer, an echo or a refusal, while the served
    // ones stay open.
    wait_for(
        "the flood to be served or refused",
        Duration::from_secs(60),
        || (answered.load(Ordering::SeqCst) == FLOOD).then_some(()),
    )
    .await;
    let answered_in = started.elapsed();
    let served = alice.status.snapshot();
    assert!(
        served.forwards[0].active <= 1024,
        "{} connections held past the cap",
        served.forwards[0].active
    );
    release_tx.send(true).unwrap();
    let mut ok = 0;
    while let Some(r) = tasks.join_next().await {
        ok += usize::from(r.unwrap().is_some());
    }
    // Measured 1,022 on each path (837 over QUIC once): opens that meet a
    // full tunnel while earlier ones are still being torn down are refused
    // too. Half the cap is the floor.
    assert!(ok >= 512, "only {ok} of {FLOOD} connections were served");
    let path = alice.status.snapshot().peers[0].transport;
    eprintln!(
        "FLOOD {path:?}: {ok} of {FLOOD} served and held, {} refused; all answered in {:.2} s",
        FLOOD - ok,
        answered_in.as_secs_f64()
    );
    // The same tunnel, still up, carries an honest transfer once the
    // flood's streams are torn down (until then an open may still meet a
    // full tunnel on either side and be refused, as any other would).
    wait_for(
        "the flood's streams to end",
        Duration::from_secs(30),
        || {
            let (a, b) = (alice.status.snapshot(), bob.status.snapshot());
            (a.forwards[0].active == 0 && a.peers[0].streams == 0 && b.peers[0].streams == 0)
                .then_some(())
        },
    )
    .await;
    let honest = honest_echo(forward, 1 << 20, 99).await;
    assert!(
        honest,
        "an honest transfer failed after the flood: {:#?}",
        logs.lines_since(mark, &["WARN"])
    );
    // A relayed start may upgrade to direct meanwhile (the old tunnel then
    // drains): that is no cut. A cut logs one of these (the second is
    // what yamux's TooManyStreams ended the tunnel with).
    let cuts = [
        logs.lines_since(mark, &["tunnel lost"]),
        logs.lines_since(mark, &["maximum number of streams"]),
    ]
    .concat();
    assert!(
        cuts.is_empty(),
        "the flood cut the tunnel: {cuts:#?} {:#?}",
        logs.lines_since(mark, &["punchd"])
            .iter()
            .filter(|l| !l.contains("forwarded connection closed"))
            .collect::<Vec<_>>()
    );
    // Refused at the forward's cap or at the tunnel's stream cap (both
    // 1,024; the keepalive stream takes one slot): counted at the forward
    // when it got there first.
    assert!(alice
        .status
        .render_metrics()
        .contains("punchd_forward_refused_total{"));
    // Every connection made here is counted (the flood and the honest
    // one). At least, not exactly: the forward is a loopback port that any
    // process on the host can reach, and CI once counted one more.
    let total = alice.status.snapshot().forwards[0].total;
    assert!(
        total > FLOOD as u64,
        "the forward counted {total} connections of the {} made",
        FLOOD + 1
    );
    lab.stop(vec![alice, bob]).await;
}

/// Over QUIC (direct on loopback every time): opens beyond the stream
/// credit wait for it, the forward's cap resets the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_connections_at_once_leave_a_quic_tunnel_up() {
    let quic = "transports = [\"quic\"]";
    two_thousand_connections_at_once((quic, quic), support::direct).await;
}

/// Over yamux, direct or relayed, whichever the punch gives (on loopback
/// the TCP punch often loses: the same-host defect of #17). The case of
/// the issue: TooManyStreams ended the tunnel, and later the accepting
/// side's yamux, counting streams its handlers still held, ended it with
/// a GoAway ("maximum number of streams reached"; the relay's WebSocket
/// closed about 0.3 s in, which is how a relayed tunnel showed it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_connections_at_once_leave_a_yamux_tunnel_up() {
    let tcp = "transports = [\"tcp\"]";
    two_thousand_connections_at_once((tcp, tcp), |doc| doc.peers[0].path != PathState::None).await;
}

/// Over yamux through the relay, every time: alice punches only TCP and
/// bob only QUIC, so no direct path can form and both fall back to the
/// relay after a 1 s punch (and stay there: upgrades fail the same way).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_connections_at_once_leave_a_relayed_tunnel_up() {
    two_thousand_connections_at_once(
        (
            "transports = [\"tcp\"]\ntimeout = \"1s\"",
            "transports = [\"quic\"]\ntimeout = \"1s\"",
        ),
        |doc| doc.peers[0].path == PathState::Relayed,
    )
    .await;
}
