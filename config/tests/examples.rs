//! Every shipped example must parse, and every file in `examples/invalid/`
//! must fail with the message its first line promises.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use punch_config::{PeerConfig, RendezvousConfig};

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

#[test]
fn shipped_examples_parse() {
    let peer = PeerConfig::load(&examples_dir().join("peer.toml")).expect("peer.toml parses");
    assert_eq!(peer.name.as_str(), "alice");
    assert_eq!(peer.punch.port, 40000);
    assert_eq!(peer.forward.len(), 1);
    assert!(peer.key_file.ends_with("examples/alice.key"));
    let server = RendezvousConfig::load(&examples_dir().join("rendezvous.toml"))
        .expect("rendezvous.toml parses");
    assert_eq!(server.listen[0].port(), 8080);
    assert!(server.token.is_some());
}

#[test]
fn invalid_examples_fail_with_their_promised_message() {
    let dir = examples_dir().join("invalid");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("examples/invalid exists") {
        let path = entry.expect("dir entry").path();
        let text = std::fs::read_to_string(&path).expect("readable");
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} lacks a '# expect: ' first line", path.display()));
        let err = PeerConfig::load(&path)
            .err()
            .unwrap_or_else(|| panic!("{} parsed but should not", path.display()));
        assert!(
            err.to_string().contains(expect),
            "{}: got {err}, want {expect}",
            path.display()
        );
        checked += 1;
    }
    assert!(checked >= 4, "only {checked} invalid examples found");
}
