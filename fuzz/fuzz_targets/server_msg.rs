//! What the rendezvous sends a daemon (`ServerMsg`, JSON), decoded as the
//! daemon does, then the punch order signature check and nonce decoding
//! the daemon runs on it.
#![no_main]

use ed25519_dalek::SigningKey;
use libfuzzer_sys::fuzz_target;
use punch_rendezvous::protocol::{decode_nonce, verify_order, ServerMsg};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(msg) = serde_json::from_str::<ServerMsg>(text) else {
        return;
    };
    match &msg {
        ServerMsg::Punch(order) => {
            let key = SigningKey::from_bytes(&[9; 32]).verifying_key();
            let _ = verify_order(&key, "alice", &[1; 32], order);
        }
        ServerMsg::Challenge { nonce, .. } => {
            let _ = decode_nonce(nonce);
        }
        _ => {}
    }
    let again = serde_json::to_string(&msg).expect("a decoded message encodes");
    let _: ServerMsg = serde_json::from_str(&again).expect("and decodes again");
});
