//! The `punchd` binary as a user runs it: exit codes and messages.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Command, Output};

fn punchd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_punchd"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("punchd-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn keygen_pubkey_and_check_config() {
    let dir = temp_dir("keys");
    let key = dir.join("alice.key");
    let out = punchd(&["keygen", "--out", key.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let public = text(&out.stdout).trim().to_owned();
    assert_eq!(public.len(), 44, "{public}");
    // Refuses to overwrite, as a usage error.
    let again = punchd(&["keygen", "--out", key.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(2));
    assert!(text(&again.stderr).contains("refusing to overwrite"));
    let pk = punchd(&["pubkey", "--key", key.to_str().unwrap()]);
    assert_eq!(text(&pk.stdout).trim(), public);

    let cfg = dir.join("peer.toml");
    std::fs::write(&cfg, "name = \"alice\"\nkey_file = \"alice.key\"\n[rendezvous]\nurl = \"http://127.0.0.1:8080\"\n").unwrap();
    let ok = punchd(&["check-config", "--config", cfg.to_str().unwrap()]);
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    assert!(text(&ok.stdout).contains(&public));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_configs_exit_2_naming_file_line_and_key() {
    let dir = temp_dir("bad");
    let cfg = dir.join("peer.toml");
    std::fs::write(&cfg, "name = \"alice\"\nkey_file = \"a.key\"\n[rendezvous]\nurl = \"http://x:1\"\n[punch]\ntimeout = 5\n").unwrap();
    let out = punchd(&["check-config", "--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("peer.toml:6:"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // A valid config whose key file is missing also says so.
    std::fs::write(
        &cfg,
        "name = \"alice\"\nkey_file = \"nope.key\"\n[rendezvous]\nurl = \"http://x:1\"\n",
    )
    .unwrap();
    let out = punchd(&["check-config", "--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("nope.key"),
        "{}",
        text(&out.stderr)
    );
    // Running the daemon with a broken config is the same error.
    let out = punchd(&["--config", dir.join("missing.toml").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("cannot read"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn status_without_a_daemon_is_a_clear_runtime_error() {
    let out = punchd(&["status", "--admin", "127.0.0.1:9"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("is punchd running"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
#[cfg(feature = "demo")]
fn demo_runs_and_reports_a_direct_path() {
    let out = punchd(&["demo"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    // Default transports race TCP and QUIC; either may win on loopback.
    assert!(
        stdout.contains("direct over tcp via 127.0.0.1:")
            || stdout.contains("direct over quic via 127.0.0.1:"),
        "{stdout}"
    );
    assert!(stdout.contains("matches"), "{stdout}");
}

#[test]
#[cfg(feature = "demo")]
fn demo_piped_prints_its_report_without_logs_or_escape_codes() {
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_punchd"))
            .args(args)
            .env_remove("RUST_LOG")
            .env_remove("NO_COLOR")
            .output()
            .unwrap()
    };
    let out = run(&["demo"]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for line in [
        "punchd demo:",
        "  path ",
        "  punch ",
        "  transfer ",
        "  checksum ",
    ] {
        assert!(stdout.contains(line), "no {line:?} in {stdout}");
    }
    assert_eq!(stdout.lines().count(), 5, "{stdout}");
    assert!(
        !stdout.contains('\x1b') && !stderr.contains('\x1b'),
        "{stdout:?} {stderr:?}"
    );
    // No logs and no progress line: stderr is not a terminal.
    assert!(stderr.trim().is_empty(), "{stderr}");
    // --verbose brings the logs back, still without colour in a pipe.
    let out = run(&["demo", "--verbose"]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("INFO") && stderr.contains("punchd started"),
        "{stderr}"
    );
    assert!(!stderr.contains('\x1b'), "{stderr:?}");
}

/// `punchd ARGS` on a pseudo-terminal (util-linux `script`, in every
/// Debian base system), with `env`; everything it wrote to the terminal.
#[cfg(feature = "demo")]
fn on_a_terminal(args: &str, env: &[(&str, &str)]) -> String {
    let command = format!("{} {args}", env!("CARGO_BIN_EXE_punchd"));
    let out = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .envs(env.iter().copied())
        .output()
        .expect("script(1) from util-linux");
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
}

#[test]
#[cfg(feature = "demo")]
fn on_a_terminal_the_demo_shows_progress_and_logs_are_coloured_unless_no_color() {
    let quiet = on_a_terminal("demo", &[]);
    assert!(
        quiet.contains("MiB") && quiet.contains("\x1b[2K"),
        "{quiet:?}"
    );
    assert!(quiet.contains("checksum    sha256"), "{quiet:?}");
    // SGR colour codes (`ESC[2m`, `ESC[32m` …) only in the verbose logs.
    let colour = |s: &str| s.contains("\x1b[32m") || s.contains("\x1b[2m");
    assert!(!colour(&quiet), "{quiet:?}");
    let verbose = on_a_terminal("demo --verbose", &[]);
    assert!(
        verbose.contains("punchd started") && colour(&verbose),
        "{verbose:?}"
    );
    let plain = on_a_terminal("demo --verbose", &[("NO_COLOR", "1")]);
    assert!(plain.contains("punchd started"), "{plain:?}");
    assert!(
        !plain.contains('\x1b'),
        "colour despite NO_COLOR: {plain:?}"
    );
}

#[test]
fn completions_and_man_pages_come_from_the_clap_definitions() {
    for shell in ["bash", "zsh", "fish"] {
        let out = punchd(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", text(&out.stderr));
        let script = text(&out.stdout);
        assert!(script.len() > 1000, "{shell}: {script}");
        for word in ["reload", "check-config", "token-file"] {
            assert!(script.contains(word), "{shell} script lacks {word}");
        }
    }
    assert_eq!(punchd(&["completions", "tcsh"]).status.code(), Some(2));
    let man = punchd(&["man"]);
    assert!(man.status.success());
    let page = text(&man.stdout);
    assert!(
        page.contains(".TH punchd 1") && page.contains("reload"),
        "{page}"
    );
    let dir = temp_dir("man");
    let out = punchd(&["man", "--out", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for page in ["punchd.1", "punchd-reload.1", "punchd-status.1"] {
        assert!(dir.join(page).exists(), "{page} not written");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A stand-in for systemd's notify socket: what `Type=notify` units rely on.
struct ServiceManager {
    socket: std::os::unix::net::UnixDatagram,
    path: PathBuf,
}

impl ServiceManager {
    fn new(dir: &std::path::Path) -> Self {
        let path = dir.join("notify.sock");
        let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(std::time::Duration::from_secs(15)))
            .unwrap();
        Self { socket, path }
    }

    /// The next notification, or a panic after 15 s.
    fn next(&self) -> String {
        let mut buf = [0u8; 1024];
        let n = self
            .socket
            .recv(&mut buf)
            .expect("no notification within 15 s");
        text(&buf[..n])
    }
}

#[test]
fn tells_the_service_manager_when_ready_and_when_stopping() {
    let dir = temp_dir("notify");
    let key = dir.join("alice.key");
    assert!(punchd(&["keygen", "--out", key.to_str().unwrap()])
        .status
        .success());
    let cfg = dir.join("alice.toml");
    // Nothing listens at the rendezvous URL: readiness means "listeners
    // bound", not "registered", so the unit starts while the server is down.
    std::fs::write(
        &cfg,
        "name = \"alice\"\nkey_file = \"alice.key\"\n[rendezvous]\nurl = \"http://127.0.0.1:9\"\n\
         [punch]\nport = 0\n[admin]\nlisten = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let manager = ServiceManager::new(&dir);
    let mut child = Command::new(env!("CARGO_BIN_EXE_punchd"))
        .args(["--config", cfg.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .env("NOTIFY_SOCKET", &manager.path)
        .spawn()
        .unwrap();
    let ready = manager.next();
    assert!(ready.contains("READY=1"), "{ready:?}");
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let stopping = manager.next();
    assert!(stopping.contains("STOPPING=1"), "{stopping:?}");
    assert_eq!(child.wait().unwrap().code(), Some(0));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A daemon that is killed if the test fails before stopping it.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn listening(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

#[test]
fn sighup_and_punchd_reload_apply_a_new_file_and_refuse_a_bad_one() {
    let dir = temp_dir("reload");
    for name in ["alice", "bob"] {
        let key = dir.join(format!("{name}.key"));
        assert!(punchd(&["keygen", "--out", key.to_str().unwrap()])
            .status
            .success());
    }
    let bob = text(&punchd(&["pubkey", "--key", dir.join("bob.key").to_str().unwrap()]).stdout);
    let (admin, p1, p2, p3) = (free_port(), free_port(), free_port(), free_port());
    let cfg = dir.join("alice.toml");
    let write = |listens: &[u16], extra: &str| {
        let mut t = format!(
            "name = \"alice\"\nkey_file = \"alice.key\"\n[rendezvous]\nurl = \"http://127.0.0.1:9\"\n\
             [admin]\nlisten = \"127.0.0.1:{admin}\"\ntoken_file = \"admin.token\"\n\
             [[peers]]\nname = \"bob\"\npublic_key = \"{}\"\n{extra}",
            bob.trim()
        );
        for p in listens {
            t.push_str(&format!(
                "[[forward]]\nlisten = \"127.0.0.1:{p}\"\npeer = \"bob\"\nservice = \"x\"\n"
            ));
        }
        std::fs::write(&cfg, t).unwrap();
    };
    write(&[p1], "");
    let manager = ServiceManager::new(&dir);
    let mut child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_punchd"))
            .args(["--config", cfg.to_str().unwrap()])
            .env("RUST_LOG", "warn")
            .env("NOTIFY_SOCKET", &manager.path)
            .spawn()
            .unwrap(),
    );
    assert!(manager.next().contains("READY=1"));
    assert!(listening(p1));

    // SIGHUP: the forward moves from p1 to p2; systemd hears RELOADING=1,
    // then READY=1 once it is done.
    write(&[p2], "");
    let hup = Command::new("kill")
        .args(["-HUP", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    assert!(manager.next().contains("RELOADING=1"));
    assert!(manager.next().contains("READY=1"));
    assert!(listening(p2) && !listening(p1));

    // `punchd reload` with a bad file: exit 2, the located error, no change.
    write(&[p2, p3], "colour = \"red\"\n");
    let out = punchd(&["reload", "--config", cfg.to_str().unwrap()]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("not asked to reload") && err.contains("colour"),
        "{err}"
    );
    // Given the address, the daemon reads the file itself and refuses it.
    let admin_addr = format!("127.0.0.1:{admin}");
    let token = dir.join("admin.token");
    let out = punchd(&[
        "reload",
        "--admin",
        &admin_addr,
        "--token-file",
        token.to_str().unwrap(),
    ]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("alice.toml:11:1") && err.contains("colour"),
        "{err}"
    );
    assert!(err.contains("the running configuration stays"), "{err}");
    assert!(listening(p2) && !listening(p3));

    // Fixed: exit 0, says what changed.
    write(&[p2, p3], "");
    let out = punchd(&["reload", "--config", cfg.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(
        said.contains("reloaded: forwards added: 127.0.0.1:"),
        "{said}"
    );
    assert!(listening(p2) && listening(p3));

    let term = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    assert_eq!(child.0.wait().unwrap().code(), Some(0));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_remote_admin_listen_without_allow_remote_exits_2_naming_the_key() {
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../config/examples/invalid/admin-remote.toml"
    );
    let out = punchd(&["check-config", "--config", example]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("admin-remote.toml:13:1: key `admin.listen`"),
        "{err}"
    );
    assert!(err.contains("allow_remote = true"), "{err}");
}

#[cfg(unix)]
#[test]
fn a_key_file_readable_by_others_exits_2_with_the_chmod_hint() {
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_dir("exposed-key");
    let key = dir.join("alice.key");
    let out = punchd(&["keygen", "--out", key.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cfg = dir.join("peer.toml");
    std::fs::write(&cfg, "name = \"alice\"\nkey_file = \"alice.key\"\n[rendezvous]\nurl = \"http://127.0.0.1:8080\"\n").unwrap();
    for args in [
        vec!["check-config", "--config", cfg.to_str().unwrap()],
        vec!["--config", cfg.to_str().unwrap()],
        vec!["pubkey", "--key", key.to_str().unwrap()],
    ] {
        let out = punchd(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = text(&out.stderr);
        assert!(
            err.contains(&format!("chmod 600 {}", key.display())),
            "{err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
