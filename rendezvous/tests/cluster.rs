//! Several instances sharing one real `redis-server` (started here on
//! 127.0.0.1 with a free port, no persistence, killed at the end also on
//! failure): registrations visible across instances, name rules across
//! them, punch orders across them with one `at`, the relay on the
//! coordinating instance, a killed instance's entries expiring, and Redis
//! killed → degraded, then ok after it is back, without a restart.
//!
//! Without `redis-server` on the PATH each test prints `SKIP` and passes,
//! unless `PUNCH_LAB_REQUIRE=1` (CI), where that is a failure.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::SinkExt;
use punch_config::{RendezvousConfig, Secret};
use punch_rendezvous::protocol::{unix_time_us, ClientMsg, ErrorCode, ServerMsg};
use support::{expect_refused, hello, key, recv, recv_binary, relay, send, Ws};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `redis-server` of this test's own; SIGKILLed when dropped.
struct Redis {
    child: Option<Child>,
    port: u16,
    dir: std::path::PathBuf,
}

impl Redis {
    /// Starts one, or `None` (after printing `SKIP`) when `redis-server`
    /// is not installed and `PUNCH_LAB_REQUIRE` is not `1`.
    fn start(test: &str) -> Option<Self> {
        let found = Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            let require = std::env::var("PUNCH_LAB_REQUIRE").is_ok_and(|v| v == "1");
            assert!(
                !require,
                "{test}: redis-server is not installed (apt-get install redis-server) and PUNCH_LAB_REQUIRE=1"
            );
            println!("SKIP {test}: redis-server is not installed");
            return None;
        }
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("punch-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut r = Redis {
            child: None,
            port,
            dir,
        };
        r.restart();
        Some(r)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// (Re)starts the server on the same port, empty, and waits until it
    /// answers.
    fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--protected-mode", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn cmd(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One in-process instance sharing `redis`.
struct Instance {
    addr: SocketAddr,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Instance {
    async fn start(redis: &Redis) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cfg = RendezvousConfig {
            redis: Some(Secret::new(redis.url())),
            public_url: Some(format!("http://{addr}")),
            ..Default::default()
        };
        let cancel = CancellationToken::new();
        let task = tokio::spawn(punch_rendezvous::server::run(listener, cfg, cancel.clone()));
        let i = Instance { addr, cancel, task };
        i.wait_status("ok").await;
        i
    }

    async fn get(&self, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    async fn health(&self) -> serde_json::Value {
        let text = self.get("/healthz").await;
        assert!(
            text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200"),
            "{text}"
        );
        let body = text.split("\r\n\r\n").nth(1).unwrap();
        serde_json::from_str(body).unwrap()
    }

    async fn wait_status(&self, want: &str) -> Duration {
        let t0 = Instant::now();
        loop {
            if self.health().await["status"] == want {
                return t0.elapsed();
            }
            assert!(
                t0.elapsed() < Duration::from_secs(15),
                "/healthz never said {want}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn metric(&self, prefix: &str) -> u64 {
        let text = self.get("/metrics").await;
        text.lines()
            .find_map(|l| l.strip_prefix(prefix)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
    }

    async fn stop(self) {
        self.cancel.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

async fn register(at: &Instance, name: &str, seed: u8) -> Ws {
    let (ws, welcome) = hello(at.addr, name, &key(seed), None, false).await;
    assert!(matches!(welcome, ServerMsg::Welcome { .. }), "{welcome:?}");
    ws
}

async fn connect(ws: &mut Ws, peer: &str) {
    send(
        ws,
        &ClientMsg::Connect {
            peer: peer.to_owned(),
        },
    )
    .await;
}

async fn order(ws: &mut Ws) -> punch_rendezvous::protocol::PunchOrder {
    match recv(ws).await {
        ServerMsg::Punch(o) => o,
        other => panic!("expected a punch order, got {other:?}"),
    }
}

/// Asks for a punch until it is coordinated (a registration just made
/// elsewhere may take a moment to be visible); the two orders.
async fn punch_eventually(
    from: &mut Ws,
    to: &mut Ws,
    peer: &str,
) -> (
    punch_rendezvous::protocol::PunchOrder,
    punch_rendezvous::protocol::PunchOrder,
) {
    let t0 = Instant::now();
    loop {
        connect(from, peer).await;
        match recv(from).await {
            ServerMsg::Punch(a) => return (a, order(to).await),
            ServerMsg::Error { code, message } => {
                assert!(
                    t0.elapsed() < Duration::from_secs(15),
                    "punch to {peer} still refused: {code:?} {message}"
                );
            }
            other => panic!("{other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_name_rules_orders_and_relay_across_instances() {
    let Some(redis) = Redis::start("registrations_name_rules_orders_and_relay_across_instances")
    else {
        return;
    };
    let a = Instance::start(&redis).await;
    let b = Instance::start(&redis).await;
    let mut alice = register(&a, "alice", 1).await;
    let mut bob = register(&b, "bob", 2).await;
    assert_eq!(a.health().await["registry"], "redis");

    // A punch across instances: both get an order, with one `at`.
    let sent = unix_time_us();
    let (to_alice, to_bob) = punch_eventually(&mut alice, &mut bob, "bob").await;
    let arrived = unix_time_us();
    assert_eq!(to_alice.session, to_bob.session);
    assert!(to_alice.initiator && !to_bob.initiator);
    let skew = to_alice.at_us.abs_diff(to_bob.at_us);
    println!(
        "cross-instance at: skew {skew} us between the two orders; orders arrived {} us before at",
        to_bob.at_us.saturating_sub(arrived)
    );
    // One host, one clock: only the offset estimate to Redis differs.
    assert!(skew < 2_000, "at differs by {skew} us");
    assert!(to_bob.at_us > arrived, "bob's order arrives before at");
    assert!(to_alice.at_us >= sent + 25_000);
    assert_eq!(to_bob.peer, "alice");
    assert_eq!(
        to_bob.candidates[0].ip(),
        "127.0.0.1".parse::<std::net::IpAddr>().unwrap()
    );
    // The relay is the coordinating instance's, named to the far side.
    assert_eq!(to_alice.relay_url, None);
    assert_eq!(to_bob.relay_url, Some(format!("http://{}", a.addr)));

    // Both join the relay on instance A; bytes pass.
    let mut ra = relay(a.addr, &to_alice.session, &to_alice.relay_token)
        .await
        .unwrap();
    let mut rb = relay(a.addr, &to_bob.session, &to_bob.relay_token)
        .await
        .unwrap();
    ra.send(Message::binary(b"over one instance".to_vec()))
        .await
        .unwrap();
    assert_eq!(recv_binary(&mut rb).await, b"over one instance");
    // Not on B: the session is A's.
    assert!(relay(b.addr, &to_bob.session, &to_bob.relay_token)
        .await
        .is_err());

    // Results from both sides are accepted (bob's is forwarded home).
    for (ws, s) in [(&mut alice, &to_alice.session), (&mut bob, &to_bob.session)] {
        let r = punch_rendezvous::protocol::PunchResult {
            session: s.clone(),
            path: punch_rendezvous::protocol::PathKind::Direct,
            elapsed_ms: 1,
            attempts: 1,
            reason: None,
        };
        send(ws, &ClientMsg::Result(r)).await;
    }

    // Name rules across instances: another key is refused on A...
    let (mut thief, answer) = hello(a.addr, "bob", &key(9), None, false).await;
    assert_eq!(support::error_code(&answer), ErrorCode::NameTaken);
    drop(thief.close(None).await);
    // ...the same key on A replaces the registration on B, whose
    // connection is told so.
    let mut bob2 = register(&a, "bob", 2).await;
    expect_refused(&mut bob, ErrorCode::Replaced).await;
    // And bob is now A's: a punch from alice is local, no relay_url.
    let (_, to_bob2) = punch_eventually(&mut alice, &mut bob2, "bob").await;
    assert_eq!(to_bob2.relay_url, None);

    assert!(
        a.metric("punch_rendezvous_cluster_signals_total{direction=\"sent\"}")
            .await
            > 0
    );
    assert!(
        b.metric("punch_rendezvous_cluster_signals_total{direction=\"received\"}")
            .await
            > 0
    );
    assert_eq!(a.metric("punch_rendezvous_redis_up").await, 1);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_means_degraded_then_ok_without_restart() {
    let Some(mut redis) = Redis::start("redis_killed_means_degraded_then_ok_without_restart")
    else {
        return;
    };
    let a = Instance::start(&redis).await;
    let b = Instance::start(&redis).await;
    let mut alice = register(&a, "alice", 1).await;
    let mut bob = register(&a, "bob", 2).await;
    let mut carol = register(&b, "carol", 3).await;
    punch_eventually(&mut alice, &mut carol, "carol").await;

    redis.kill();
    let took = a.wait_status("degraded").await;
    println!("degraded seen after {took:?}");
    assert_eq!(a.health().await["redis"], "unreachable");
    // Its own daemons are still coordinated...
    connect(&mut alice, "bob").await;
    order(&mut alice).await;
    order(&mut bob).await;
    // ...new ones still register...
    let mut dave = register(&a, "dave", 4).await;
    // ...and a peer only Redis knows is a retryable refusal, not a crash.
    connect(&mut dave, "carol").await;
    expect_refused(&mut dave, ErrorCode::Busy).await;
    assert!(a.metric("punch_rendezvous_redis_failures_total").await > 0);
    assert_eq!(a.metric("punch_rendezvous_redis_up").await, 0);

    // Back, empty: both instances rewrite their entries and resubscribe.
    redis.restart();
    let took = a.wait_status("ok").await;
    b.wait_status("ok").await;
    println!("ok again after {took:?}");
    let (_, to_carol) = punch_eventually(&mut dave, &mut carol, "carol").await;
    assert_eq!(to_carol.peer, "dave");
    assert!(redis.cmd(&["EXISTS", "punch:d:dave"]) == "1");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_s_entries_expire() {
    let Some(redis) = Redis::start("a_killed_instance_s_entries_expire") else {
        return;
    };
    let a = Instance::start(&redis).await;
    // The other instance is a real process, SIGKILLed: no cleanup at all.
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("punch-rv-kill-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("rendezvous.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\nredis = \"{}\"\npublic_url = \"http://127.0.0.1:{port}\"\n",
            redis.url()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_punch-rendezvous"))
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    struct Kill<'a>(&'a mut Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let child = Kill(&mut child);
    let b_addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let t0 = Instant::now();
    while tokio::net::TcpStream::connect(b_addr).await.is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "instance B did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_carol, welcome) = hello(b_addr, "carol", &key(3), None, false).await;
    assert!(matches!(welcome, ServerMsg::Welcome { .. }), "{welcome:?}");
    let mut alice = register(&a, "alice", 1).await;
    let mut carol_ws = _carol;
    punch_eventually(&mut alice, &mut carol_ws, "carol").await;

    drop(child);
    let killed = Instant::now();
    let ttl: i64 = redis.cmd(&["PTTL", "punch:d:carol"]).parse().unwrap();
    assert!(
        ttl > 0 && ttl <= 30_000,
        "carol's entry has an expiry: {ttl}"
    );
    // Her instance's liveness key lapses within 5 s: from then on she is
    // nobody to punch, long before her entry expires.
    loop {
        connect(&mut alice, "carol").await;
        match recv(&mut alice).await {
            ServerMsg::Error {
                code: ErrorCode::UnknownPeer,
                ..
            } => break,
            ServerMsg::Punch(_) => {}
            other => panic!("{other:?}"),
        }
        assert!(
            killed.elapsed() < Duration::from_secs(8),
            "carol still a punch target 8 s after her instance died"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!(
        "a killed instance's daemons unknown after {:?}",
        killed.elapsed()
    );
    while redis.cmd(&["EXISTS", "punch:d:carol"]) != "0" {
        assert!(
            killed.elapsed() < Duration::from_secs(35),
            "carol still registered 35 s after her instance died"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    connect(&mut alice, "carol").await;
    expect_refused(&mut alice, ErrorCode::UnknownPeer).await;
    println!(
        "a killed instance's entry vanished after {:?}",
        killed.elapsed()
    );
    let _ = std::fs::remove_dir_all(&dir);
    a.stop().await;
}
