//! Port mapping through a real router daemon (miniupnpd, built by
//! lab/miniupnpd/build.sh): both NATs port-randomizing, direct through
//! the mapping with UPnP IGD, NAT-PMP or PCP; a router restart; a router
//! that refuses; no router at all. Run one at a time.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write as _;

use punch_lab::suites::portmap;

fn scenario(name: &str) {
    let test = format!("lab port mapping {name}");
    let Some((_serial, bins)) =
        punch_lab::harness::prepare(&test, env!("CARGO_BIN_EXE_punch-lab-tool"))
    else {
        return;
    };
    if let Err(why) = punch_lab::net::router::installed() {
        if std::env::var_os("PUNCH_LAB_REQUIRE").is_some() {
            panic!("{test}: {why}");
        }
        let _ = writeln!(std::io::stderr(), "SKIP {test}: {why}");
        return;
    }
    match portmap::run_named(name, &bins) {
        Ok(report) => {
            let _ = writeln!(std::io::stderr(), "LAB {report}");
        }
        Err(e) => panic!("{test} failed: {e:#}"),
    }
}

#[test]
fn random_nats_with_upnp_igd_on_one_router_is_direct() {
    scenario("pm-upnp");
}

#[test]
fn random_nats_with_nat_pmp_only_is_direct() {
    scenario("pm-natpmp");
}

#[test]
fn random_nats_with_pcp_only_is_direct() {
    scenario("pm-pcp");
}

#[test]
fn random_nats_with_both_routers_mapping_is_direct() {
    scenario("pm-both");
}

#[test]
fn a_router_restart_that_forgets_the_mapping_is_mapped_again_and_working() {
    scenario("pm-restart");
}

#[test]
fn a_router_refusing_the_mapping_falls_back_without_an_error_loop() {
    scenario("pm-deny");
}

#[test]
fn no_router_does_not_hold_up_the_punch() {
    scenario("pm-none");
}

#[test]
fn port_mapping_off_sends_no_probe() {
    scenario("pm-off");
}
