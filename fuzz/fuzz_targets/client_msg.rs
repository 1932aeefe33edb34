//! What a daemon sends the rendezvous (`ClientMsg`, JSON over the
//! WebSocket), decoded as the server does, then the hello's key and
//! signature checks the server runs next. Anything that decodes must
//! encode and decode back to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use punch_rendezvous::protocol::{decode_public_key, verify_challenge, ClientMsg};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(msg) = serde_json::from_str::<ClientMsg>(text) else {
        return;
    };
    if let ClientMsg::Hello(h) = &msg {
        if let Ok(key) = decode_public_key(&h.public_key) {
            let _ = verify_challenge(&key, &[7; 32], &h.name, h.token.as_deref(), &h.signature);
        }
    }
    let again = serde_json::to_string(&msg).expect("a decoded message encodes");
    let back: ClientMsg = serde_json::from_str(&again).expect("and decodes again");
    assert_eq!(
        serde_json::to_string(&back).expect("encodes"),
        again,
        "round trip"
    );
});
