//! Port ranges and config reload, end to end on loopback: two daemons, an
//! embedded rendezvous, real listeners and real files.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use punch_config::PeerConfig;
use punchd::demo::loopback::ExposeSpec;
use punchd::{pattern, PathState, ReloadError, RunningDaemon};
use support::{ask_for, source_server, wait_for, Lab};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// `n` consecutive free ports on 127.0.0.1 (bound and released; a port
/// taken in between makes the daemon's bind fail loudly, not silently).
fn free_run(n: u16) -> u16 {
    let seed = std::process::id() as u16;
    for i in 0..500u16 {
        let base = 20_000 + (seed.wrapping_mul(7).wrapping_add(i.wrapping_mul(97))) % 40_000;
        let held: Vec<_> = (0..n)
            .map_while(|k| std::net::TcpListener::bind(("127.0.0.1", base + k)).ok())
            .collect();
        if held.len() == n as usize {
            return base;
        }
    }
    panic!("no run of {n} free ports");
}

/// Listeners on `n` consecutive ports, each answering every connection
/// with `port <k>` (its position) and closing.
async fn numbered_servers(lab: &Lab, n: u16) -> u16 {
    loop {
        let base = free_run(n);
        let mut ls = Vec::new();
        for k in 0..n {
            match TcpListener::bind(("127.0.0.1", base + k)).await {
                Ok(l) => ls.push(l),
                Err(_) => break,
            }
        }
        if ls.len() < n as usize {
            continue;
        }
        for (k, l) in ls.into_iter().enumerate() {
            let cancel = lab.cancel.clone();
            lab.tracker.spawn(async move {
                loop {
                    let (mut s, _) = tokio::select! {
                        _ = cancel.cancelled() => break,
                        r = l.accept() => match r { Ok(c) => c, Err(_) => continue },
                    };
                    let _ = s.write_all(format!("port {k}").as_bytes()).await;
                    let _ = s.shutdown().await;
                }
            });
        }
        return base;
    }
}

async fn read_all(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

/// alice's peer.toml: bob as her one peer, then `forwards` as
/// `(listen, service)`.
fn alice_toml(lab: &Lab, dir: &Path, forwards: &[(&str, &str)]) -> String {
    let mut t = format!(
        "name = \"alice\"\nkey_file = \"alice.key\"\n\n[rendezvous]\nurl = \"{}\"\n\n\
         [admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = {:?}\n\n\
         [[peers]]\nname = \"bob\"\npublic_key = \"{}\"\n",
        lab.rendezvous.url(),
        dir.join("admin.token").display().to_string(),
        lab.bob_id.public_key().to_base64()
    );
    for (listen, service) in forwards {
        t.push_str(&format!(
            "\n[[forward]]\nlisten = \"{listen}\"\npeer = \"bob\"\nservice = \"{service}\"\n"
        ));
    }
    t
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("punchd-fwd-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn alice_from(lab: &Lab, path: &Path) -> RunningDaemon {
    let cfg = PeerConfig::load(path).unwrap();
    let alice = punchd::start_from_file(path, cfg, lab.alice_id.clone(), lab.cancel.child_token())
        .await
        .unwrap();
    let ready = wait_for("a direct path", Duration::from_secs(20), || {
        Some(()).filter(|()| support::direct(&alice.status.snapshot()))
    });
    ready.await;
    alice
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_port_of_a_range_reaches_its_own_target_and_no_other() {
    let lab = Lab::new().await;
    let target = numbered_servers(&lab, 3).await;
    let bob = lab
        .bob(
            &[ExposeSpec {
                name: "web".into(),
                target: format!("127.0.0.1:{target}-{}", target + 2),
                allow: vec!["alice".into()],
            }],
            "",
        )
        .await;
    let dir = temp_dir("range");
    let listen = free_run(4);
    let path = dir.join("peer.toml");
    // Four listen ports against a three-port target: the fourth is refused
    // by bob, who only serves positions his own range has.
    let toml = alice_toml(
        &lab,
        &dir,
        &[(&format!("127.0.0.1:{listen}-{}", listen + 3), "web")],
    );
    std::fs::write(&path, toml).unwrap();
    let alice = alice_from(&lab, &path).await;
    assert_eq!(alice.forward_addrs.len(), 4);
    for k in 0..3u16 {
        let addr = SocketAddr::from(([127, 0, 0, 1], listen + k));
        assert_eq!(read_all(addr).await.unwrap(), format!("port {k}"));
    }
    let fourth = SocketAddr::from(([127, 0, 0, 1], listen + 3));
    let got = read_all(fourth).await;
    assert!(
        got.as_ref().map_or(true, String::is_empty),
        "position 3 reached something: {got:?}"
    );
    let doc = alice.status.snapshot();
    assert_eq!(doc.forwards.len(), 4);
    assert_eq!(doc.forwards[2].listen, format!("127.0.0.1:{}", listen + 2));
    lab.stop(vec![alice, bob]).await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_and_removes_forwards_without_cutting_a_transfer() {
    const LEN: u64 = 64 * 1024 * 1024;
    let lab = Lab::new().await;
    let (source, _) = source_server(lab.cancel.clone(), &lab.tracker).await;
    let bob = lab
        .bob(
            &[
                lab.expose_at("a", source, &["alice"]),
                lab.expose("b", &["alice"]),
                lab.expose("c", &["alice"]),
            ],
            "",
        )
        .await;
    let dir = temp_dir("reload");
    let path = dir.join("peer.toml");
    std::fs::write(
        &path,
        alice_toml(&lab, &dir, &[("127.0.0.1:0", "a"), ("127.0.0.1:0", "c")]),
    )
    .unwrap();
    let alice = alice_from(&lab, &path).await;
    let (fa, fc) = (alice.forward_addrs[0], alice.forward_addrs[1]);
    let punches = alice.status.snapshot().peers[0].punches_ok;

    // 64 MiB over A; the reader pauses after 8 MiB until the reload is
    // done, so the reload lands mid-transfer.
    let reloaded = Arc::new(Notify::new());
    let reader = {
        let reloaded = reloaded.clone();
        tokio::spawn(async move {
            let mut s = ask_for(fa, LEN).await;
            let mut got = vec![0u8; 8 * 1024 * 1024];
            s.read_exact(&mut got).await.unwrap();
            reloaded.notified().await;
            s.read_to_end(&mut got).await.unwrap();
            got
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    std::fs::write(
        &path,
        alice_toml(&lab, &dir, &[("127.0.0.1:0", "a"), ("127.0.0.1:0", "b")]),
    )
    .unwrap();
    let summary = alice.reload().await.unwrap();
    assert!(
        summary.contains("forwards added: 127.0.0.1:0 → bob/b"),
        "{summary}"
    );
    assert!(
        summary.contains("forwards removed: 127.0.0.1:0 → bob/c"),
        "{summary}"
    );
    reloaded.notify_one();
    let got = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.len() as u64, LEN);
    assert!(
        got == pattern(LEN as usize, 7),
        "the transfer's bytes differ"
    );

    let now = alice.forward_addrs_now();
    assert_eq!(now.len(), 2);
    assert_eq!(now[0], fa, "forward A kept its listener");
    let fb = now[1];
    let echo = |addr: SocketAddr| async move {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(b"hello").await?;
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).await?;
        std::io::Result::Ok(buf)
    };
    assert_eq!(&echo(fb).await.unwrap(), b"hello", "forward B works");
    assert!(
        TcpStream::connect(fc).await.is_err(),
        "forward C still listens"
    );
    let doc = alice.status.snapshot();
    assert_eq!(doc.peers[0].path, PathState::Direct);
    assert_eq!(doc.peers[0].punches_ok, punches, "the tunnel was replaced");

    // An invalid file: refused with its location, nothing changes.
    std::fs::write(
        &path,
        alice_toml(&lab, &dir, &[("127.0.0.1:0", "a"), ("nowhere", "b")]),
    )
    .unwrap();
    let err = alice.reload().await.unwrap_err();
    assert!(matches!(err, ReloadError::Config(_)), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("peer.toml:") && msg.contains("forward[1].listen"),
        "{msg}"
    );
    assert!(msg.contains("the running configuration stays"), "{msg}");
    // The same through the admin API, as `punchd reload` sends it.
    let token = std::fs::read_to_string(&alice.admin_token_file).unwrap();
    let refused = punchd::admin::client::reload(alice.admin_addr, token.trim())
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("forward[1].listen"),
        "{refused}"
    );
    assert_eq!(
        &echo(fb).await.unwrap(),
        b"hello",
        "forward B after the refusal"
    );
    let mut s = ask_for(fa, 1024 * 1024).await;
    let mut again = Vec::new();
    s.read_to_end(&mut again).await.unwrap();
    assert!(
        again == pattern(1024 * 1024, 7),
        "forward A after the refusal"
    );
    assert_eq!(alice.forward_addrs_now(), now);
    assert_eq!(alice.status.snapshot().peers[0].punches_ok, punches);

    let metrics = alice.status.render_metrics();
    assert!(
        metrics.contains("punchd_reloads_total{result=\"ok\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("punchd_reloads_total{result=\"refused\"} 2"),
        "{metrics}"
    );

    // Without the token the admin API refuses to reload at all.
    assert!(punchd::admin::client::reload(alice.admin_addr, "nope")
        .await
        .is_err());

    // Removing bob (and his forwards) closes his tunnel cleanly: bob sees
    // it end and has no path to alice, and alice's listeners are gone.
    let mut bare = alice_toml(&lab, &dir, &[]);
    let at = bare.find("[[peers]]").unwrap();
    bare.truncate(at);
    std::fs::write(&path, bare).unwrap();
    let summary = alice.reload().await.unwrap();
    assert!(summary.contains("peers stopped: bob"), "{summary}");
    assert!(alice.status.snapshot().peers.is_empty());
    assert!(TcpStream::connect(fa).await.is_err());
    wait_for(
        "bob to see the tunnel closed",
        Duration::from_secs(10),
        || Some(()).filter(|()| bob.status.snapshot().peers[0].path == PathState::None),
    )
    .await;
    lab.stop(vec![alice, bob]).await;
    std::fs::remove_dir_all(&dir).unwrap();
}
