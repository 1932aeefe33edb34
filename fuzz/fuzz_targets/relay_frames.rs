//! Relay frames: the WebSocket frames a relay side sends the server, read
//! with the relay's own limits (256 KiB per frame and message) by the same
//! tungstenite the server's axum uses, in the server role. Whatever the
//! bytes, reading ends in a message stream or an error, never a panic or
//! an allocation beyond the limits.
#![no_main]

use std::io::{Cursor, Read, Write};

use libfuzzer_sys::fuzz_target;
use tungstenite::protocol::{Role, WebSocket, WebSocketConfig};

/// The client's bytes in, the server's answers (pongs, close) discarded.
struct Wire(Cursor<Vec<u8>>);

impl Read for Wire {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Wire {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const MAX_RELAY_FRAME: usize = 256 * 1024;

fuzz_target!(|data: &[u8]| {
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_RELAY_FRAME))
        .max_frame_size(Some(MAX_RELAY_FRAME));
    let mut ws =
        WebSocket::from_raw_socket(Wire(Cursor::new(data.to_vec())), Role::Server, Some(config));
    for _ in 0..10_000 {
        match ws.read() {
            Ok(msg) => assert!(msg.len() <= MAX_RELAY_FRAME),
            Err(_) => break,
        }
    }
});
