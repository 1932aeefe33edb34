//! Before a lab run: can the lab run here at all (root, the tools), whose
//! turn it is, and the Ctrl-C handler that removes what an interrupted run
//! leaves behind.

use std::path::Path;

use crate::harness::binaries::Binaries;
use crate::net::netns;

/// Environment variable that turns a lab skip into a failure (set in CI).
pub const REQUIRE_ENV: &str = "PUNCH_LAB_REQUIRE";

/// Why the lab cannot run here, if it cannot.
pub fn unavailable() -> Option<String> {
    let uid = std::process::Command::new("id")
        .arg("-u")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    if uid.as_deref() != Some("0") {
        return Some("the NAT lab needs root (network namespaces and nftables)".to_owned());
    }
    for tool in ["ip", "nft", "ss", "conntrack"] {
        if !on_path(tool) {
            return Some(format!(
                "`{tool}` is not installed (apt-get install iproute2 nftables conntrack)"
            ));
        }
    }
    None
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| Path::new(&d).join(tool).is_file()))
}

/// Everything a lab test needs before it starts: the lab available (or a
/// printed skip), its turn (lab tests in one binary run one at a time:
/// they share two cores, and timing should not be measured under a
/// neighbour's transfer), the Ctrl-C cleanup, and the binaries beside
/// `tool` (`env!("CARGO_BIN_EXE_punch-lab-tool")`).
pub fn prepare(test: &str, tool: &str) -> Option<(std::sync::MutexGuard<'static, ()>, Binaries)> {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    if !available_or_skip(test) {
        return None;
    }
    let guard = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    cleanup_on_ctrl_c();
    match Binaries::beside(Path::new(tool)) {
        Ok(bins) => Some((guard, bins)),
        Err(e) => panic!("{test}: {e:#}"),
    }
}

/// Returns true if the lab can run; otherwise prints why and returns false,
/// or panics when [`REQUIRE_ENV`] is set (so CI cannot silently skip).
pub fn available_or_skip(test: &str) -> bool {
    match unavailable() {
        None => true,
        Some(reason) if std::env::var_os(REQUIRE_ENV).is_some() => {
            panic!(
                "{test}: the NAT lab is required ({REQUIRE_ENV} is set) but cannot run: {reason}"
            )
        }
        Some(reason) => {
            // Written to the process's stderr, not with `eprintln!`: libtest
            // captures the print macros of a passing test, which made a
            // skipped lab test look like a plain `ok`. A direct write to
            // fd 2 shows in every `cargo test` run.
            use std::io::Write as _;
            let _ = writeln!(std::io::stderr(), "SKIP {test}: {reason}");
            false
        }
    }
}

/// Installs a Ctrl-C handler (once per process) that removes every lab
/// namespace before exiting, so an interrupted run leaves nothing behind.
pub fn cleanup_on_ctrl_c() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = ctrlc::set_handler(|| {
            eprintln!("interrupted: removing lab namespaces");
            netns::cleanup();
            std::process::exit(130);
        });
    });
}

/// One lab test case: prepares (or skips, see [`prepare`]), runs `f` and
/// prints its line as `LAB <suite>: …` straight to stderr (visible even
/// when the test harness captures output), or panics with its error.
pub fn case(
    suite: &str,
    name: &str,
    tool: &str,
    f: impl FnOnce(&Binaries) -> anyhow::Result<String>,
) {
    use std::io::Write as _;
    let test = format!("lab {suite} {name}");
    let Some((_serial, bins)) = prepare(&test, tool) else {
        return;
    };
    match f(&bins) {
        Ok(line) => {
            let _ = writeln!(std::io::stderr(), "LAB {suite}: {line}");
        }
        Err(e) => panic!("{test} failed: {e:#}"),
    }
}
