//! An attack that needs a network (issue #24): a rogue peer claims
//! addresses on alice's LAN and a third party's, and asks for punches;
//! alice must send them nothing while her tunnel to bob keeps working
//! (lab/src/suites/attack.rs).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write as _;

#[test]
fn a_rogue_peer_cannot_aim_punches_at_the_lan_or_a_third_party() {
    let test = "lab attack rogue peer";
    let Some((_serial, bins)) =
        punch_lab::harness::prepare(test, env!("CARGO_BIN_EXE_punch-lab-tool"))
    else {
        return;
    };
    match punch_lab::suites::attack::rogue_peer_aims_at_the_lan(&bins) {
        Ok(summary) => {
            let _ = writeln!(std::io::stderr(), "LAB {summary}");
        }
        Err(e) => panic!("{test} failed: {e:#}"),
    }
}
