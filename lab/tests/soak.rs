//! The fault-injecting soak, two minutes of it (lab, root): checked
//! streams both ways while NATs are flushed, daemons and the rendezvous
//! SIGKILLed, links lose packets and a NAT's timeouts are shortened.
//! `punch-lab-tool soak --minutes 30` (lab/soak.sh) is the long run.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write as _;
use std::time::Duration;

use punch_lab::suites::soak::{self, Options};

/// Set to replay a soak's fault plan (the summary prints its seed).
const SEED_ENV: &str = "PUNCH_LAB_SOAK_SEED";

#[test]
fn two_minutes_of_faults_corrupt_truncate_and_leak_nothing() {
    let test = "lab soak 2 minutes";
    let Some((_serial, bins)) =
        punch_lab::harness::prepare(test, env!("CARGO_BIN_EXE_punch-lab-tool"))
    else {
        return;
    };
    let seed = std::env::var(SEED_ENV)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(soak::clock_seed);
    let summary = match soak::run(&bins, &Options::new(Duration::from_secs(120), seed)) {
        Ok(s) => s,
        Err(e) => panic!("{test} could not run: {e:#}"),
    };
    let _ = writeln!(std::io::stderr(), "LAB soak:\n{summary}");
    assert!(
        summary.passed(),
        "{test} failed (replay with {SEED_ENV}={seed}; logs in /tmp/punch-lab-soak):\n{summary}"
    );
}
