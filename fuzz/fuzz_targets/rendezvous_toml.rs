//! `rendezvous.toml`, the server's configuration file, parsed and checked.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use punch_config::RendezvousConfig;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = RendezvousConfig::parse_str(Path::new("rendezvous.toml"), text);
    }
});
