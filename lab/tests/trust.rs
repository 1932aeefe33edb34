//! The rendezvous link on the wire (lab, root): over https neither the
//! network token nor the protocol's JSON crosses in clear.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write as _;

#[test]
fn the_rendezvous_link_shows_no_token_and_no_json_over_https() {
    let test = "lab trust rendezvous-link";
    let Some((_serial, bins)) =
        punch_lab::harness::prepare(test, env!("CARGO_BIN_EXE_punch-lab-tool"))
    else {
        return;
    };
    match punch_lab::suites::trust::rendezvous_link_is_opaque(&bins) {
        Ok(line) => {
            let _ = writeln!(std::io::stderr(), "LAB trust: {line}");
        }
        Err(e) => panic!("{test} failed: {e:#}"),
    }
}
