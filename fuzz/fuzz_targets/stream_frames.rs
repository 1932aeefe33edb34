//! The framing of forwarded stream data (`daemon/src/forward/frame.rs`):
//! the decoder fed the bytes in pieces of a fuzzer-chosen size. It never
//! claims more data than the input held, and a clean end needs the end
//! marker.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&step, wire)) = data.split_first() else {
        return;
    };
    let (delivered, verdict) = punchd::fuzzing::decode_stream_frames(wire, usize::from(step));
    assert!(delivered <= wire.len() as u64);
    if verdict.is_ok() {
        assert!(wire.len() >= 4, "a clean end needs at least the end marker");
    }
});
