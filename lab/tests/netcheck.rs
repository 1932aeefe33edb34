//! `punchd netcheck` behind each lab NAT kind (lab, root): port-preserving
//! masquerade and a firewalled one say endpoint-independent;
//! `--random-fully` endpoint-dependent with no step; nftables `numgen inc`
//! endpoint-dependent with the step it measured. Prints the table.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[test]
fn netcheck_classifies_every_lab_nat_kind() {
    punch_lab::harness::preflight::case(
        "netcheck",
        "kinds",
        env!("CARGO_BIN_EXE_punch-lab-tool"),
        punch_lab::suites::netcheck::classify_every_kind,
    );
}

/// Two port-randomizing NATs: relayed within 3 s of the order (2 runs
/// here; `lab/hard-nat-runs.sh` runs 20).
#[test]
fn two_random_nats_are_relayed_at_once() {
    repeated(
        "hard-pair",
        punch_lab::suites::netcheck::hard_pair_relays_at_once,
    );
}

/// Predictable (numgen) + easy: direct over QUIC through port prediction
/// (2 runs here; `lab/hard-nat-runs.sh` runs 20).
#[test]
fn a_predictable_nat_and_an_easy_one_go_direct() {
    repeated(
        "predict",
        punch_lab::suites::netcheck::predictable_and_easy_go_direct,
    );
}

/// Predictable + predictable: both predict, direct over QUIC (2 runs here).
#[test]
fn two_predictable_nats_go_direct() {
    repeated(
        "predict2",
        punch_lab::suites::netcheck::two_predictable_go_direct,
    );
}

/// Runs a repeated case `PUNCH_LAB_RUNS` times (2 in CI; the 20-run
/// series are `lab/hard-nat-runs.sh`).
fn repeated(case: &str, suite: fn(&punch_lab::harness::Binaries, usize) -> anyhow::Result<String>) {
    let runs = std::env::var("PUNCH_LAB_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    punch_lab::harness::preflight::case(
        "netcheck",
        case,
        env!("CARGO_BIN_EXE_punch-lab-tool"),
        |b| suite(b, runs),
    );
}

/// Random (`--random-fully`) + easy: direct over QUIC by birthday probing
/// (2 runs here, one each way; `lab/hard-nat-runs.sh` runs 20).
#[test]
fn a_random_nat_and_an_easy_one_go_direct_by_birthday_probing() {
    repeated(
        "bday",
        punch_lab::suites::netcheck::random_and_easy_go_direct,
    );
}

/// Random + easy over TCP only: direct by TCP birthday probing, a
/// simultaneous open between one of the random side's 256 SYN_SENT sockets
/// and a probe SYN (2 runs here; `lab/hard-nat-runs.sh` runs 20).
#[test]
fn a_random_nat_and_an_easy_one_go_direct_over_tcp_by_birthday_probing() {
    repeated(
        "bdayt",
        punch_lab::suites::netcheck::random_and_easy_go_direct_over_tcp,
    );
}

/// Random + an easy NAT that answers unsolicited SYNs with RST (plain
/// masquerade), with a router between the NATs: the TTL-limited SYNs of
/// the random side expire at the router, and the pair goes direct over TCP
/// (2 runs here; 20 in `lab/hard-nat-runs.sh`, which also measures QUIC).
#[test]
fn a_random_nat_and_a_rst_answering_one_go_direct_past_a_router_by_ttl_limited_opening() {
    repeated("bdhop", |b, runs| {
        punch_lab::suites::netcheck::random_and_rst_easy_go_direct_past_a_router(
            b,
            runs,
            punch_lab::harness::punchd_types::Transport::Tcp,
        )
    });
}

/// The same pair over QUIC, measured (`--ignored` here; run by
/// `lab/hard-nat-runs.sh`): 39 of 40 runs went direct.
#[test]
#[ignore = "a measurement: run by lab/hard-nat-runs.sh"]
fn a_random_nat_and_a_rst_answering_one_past_a_router_over_quic() {
    repeated("bdhopq", |b, runs| {
        punch_lab::suites::netcheck::random_and_rst_easy_past_a_router_measured(
            b,
            runs,
            punch_lab::harness::punchd_types::Transport::Quic,
        )
    });
}

/// The same pair with the NATs on one switch (no router to expire at):
/// measured only, in `lab/hard-nat-runs.sh` (`--ignored` here).
#[test]
#[ignore = "a measurement: run by lab/hard-nat-runs.sh"]
fn a_random_nat_and_a_rst_answering_one_on_one_switch() {
    repeated("bdnohop", |b, runs| {
        over_both(
            b,
            runs,
            punch_lab::suites::netcheck::random_and_rst_easy_without_a_router,
        )
    });
}

/// A case over TCP, then over QUIC.
fn over_both(
    b: &punch_lab::harness::Binaries,
    runs: usize,
    case: fn(
        &punch_lab::harness::Binaries,
        usize,
        punch_lab::harness::punchd_types::Transport,
    ) -> anyhow::Result<String>,
) -> anyhow::Result<String> {
    use punch_lab::harness::punchd_types::Transport;
    Ok(format!(
        "{}\n{}",
        case(b, runs, Transport::Tcp)?,
        case(b, runs, Transport::Quic)?
    ))
}
