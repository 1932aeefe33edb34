//! The UDP datagram format (probe, ack, punch), parsed as the server's
//! observation endpoint and a daemon's punch port do; a parsed probe is
//! then signature-checked as the server would.
#![no_main]

use ed25519_dalek::SigningKey;
use libfuzzer_sys::fuzz_target;
use punch_rendezvous::datagram::{self, Datagram, ProbeBody};

fuzz_target!(|data: &[u8]| {
    let ours = datagram::is_ours(data);
    let Some(d) = datagram::parse(data) else {
        return;
    };
    assert!(ours, "parsed a datagram that is_ours rejects");
    if let Datagram::Probe {
        name,
        counter,
        local_port,
        signature,
    } = d
    {
        let key = SigningKey::from_bytes(&[3; 32]).verifying_key();
        let body = ProbeBody {
            name,
            counter,
            local_port,
        };
        let _ = datagram::verify_probe(&key, &[5; 32], &body, &signature);
    }
});
