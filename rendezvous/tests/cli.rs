//! The `punch-rendezvous` binary as a service manager runs it: readiness,
//! the container health probe, and a clean exit on SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_punch-rendezvous");

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("punch-rv-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn next_notification(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 1024];
    let n = socket.recv(&mut buf).expect("no notification within 15 s");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn healthcheck(addr: &str) -> std::process::Output {
    Command::new(BIN)
        .args(["healthcheck", "--addr", addr])
        .output()
        .unwrap()
}

#[test]
fn ready_healthy_then_stops_cleanly_on_sigterm() {
    let dir = temp_dir("notify");
    let path = dir.join("notify.sock");
    let manager = UnixDatagram::bind(&path).unwrap();
    manager
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let mut server = Command::new(BIN)
        .args(["--listen", &addr])
        .env("NOTIFY_SOCKET", &path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();

    let ready = next_notification(&manager);
    assert!(ready.contains("READY=1"), "{ready:?}");
    // Ready means listening: the probe succeeds at once, without retries.
    let probe = healthcheck(&addr);
    assert!(
        probe.status.success(),
        "{}",
        String::from_utf8_lossy(&probe.stderr)
    );

    let term = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let stopping = next_notification(&manager);
    assert!(stopping.contains("STOPPING=1"), "{stopping:?}");
    assert_eq!(server.wait().unwrap().code(), Some(0));

    // Nothing listens any more: the probe says so and fails.
    let probe = healthcheck(&addr);
    assert_eq!(probe.status.code(), Some(1));
    let err = String::from_utf8_lossy(&probe.stderr);
    assert!(err.contains("unhealthy") && err.contains(&addr), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn healthcheck_refuses_a_server_that_is_not_healthy() {
    // Something that answers HTTP, but not 200: the probe must not pass.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let responder = std::thread::spawn(move || {
        use std::io::{Read as _, Write as _};
        let (mut conn, _) = listener.accept().unwrap();
        let mut buf = [0u8; 1024];
        let _ = conn.read(&mut buf).unwrap();
        conn.write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
            .unwrap();
    });
    let probe = healthcheck(&addr);
    responder.join().unwrap();
    assert_eq!(probe.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&probe.stderr).contains("503"));
}
