//! `punch-rendezvous` on `SIGHUP`: a new token (from its token file)
//! applies to daemons that register afterwards; a config that no longer
//! loads is refused and the running one stays.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use punch_rendezvous::protocol::{ErrorCode, ServerMsg};
use support::{error_code, hello, key};

fn hup(pid: u32) {
    let ok = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

/// Waits for a log line containing `what`.
fn wait_line(lines: &mpsc::Receiver<String>, what: &str) -> String {
    loop {
        let line = lines
            .recv_timeout(Duration::from_secs(15))
            .unwrap_or_else(|_| panic!("no log line with {what:?} within 15 s"));
        if line.contains(what) {
            return line;
        }
    }
}

#[tokio::test]
async fn sighup_reloads_the_token_for_new_daemons() {
    let dir = std::env::temp_dir().join(format!("punch-rv-reload-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let token = dir.join("network.token");
    let cfg = dir.join("rendezvous.toml");
    std::fs::write(&token, "one\n").unwrap();
    let toml = format!("listen = \"{addr}\"\ntoken_file = \"network.token\"\n");
    std::fs::write(&cfg, &toml).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let mut server = Command::new(env!("CARGO_BIN_EXE_punch-rendezvous"))
        .args(["--config", cfg.to_str().unwrap()])
        .env("RUST_LOG", "info")
        .env_remove("PUNCH_TOKEN")
        .env_remove("PUNCH_TOKEN_FILE")
        .env_remove("PUNCH_RENDEZVOUS_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, lines) = mpsc::channel();
    let out = server.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    wait_line(&lines, "rendezvous listening");

    let (_old, answer) = hello(addr, "alice", &key(1), Some("one"), false).await;
    assert!(matches!(answer, ServerMsg::Welcome { .. }), "{answer:?}");

    std::fs::write(&token, "two\n").unwrap();
    hup(server.id());
    let line = wait_line(&lines, "configuration reloaded");
    assert!(!line.contains('\u{1b}'), "colour in a pipe: {line:?}");
    let (_, answer) = hello(addr, "bob", &key(2), Some("one"), false).await;
    assert_eq!(error_code(&answer), ErrorCode::BadToken);
    let (_, answer) = hello(addr, "bob", &key(2), Some("two"), false).await;
    assert!(matches!(answer, ServerMsg::Welcome { .. }), "{answer:?}");

    // A file that no longer loads: refused, the running token stays.
    std::fs::write(&cfg, format!("{toml}colour = \"red\"\n")).unwrap();
    hup(server.id());
    let line = wait_line(&lines, "reload refused");
    assert!(line.contains("rendezvous.toml:3"), "{line}");
    let (_, answer) = hello(addr, "carol", &key(3), Some("two"), false).await;
    assert!(matches!(answer, ServerMsg::Welcome { .. }), "{answer:?}");

    let _ = server.kill();
    let _ = server.wait();
    std::fs::remove_dir_all(&dir).unwrap();
}
