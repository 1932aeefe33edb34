//! A UDP flow's datagrams on its stream (`daemon/src/forward/udp/wire.rs`)
//! and as QUIC datagrams (`daemon/src/tunnel/datagram.rs`): the
//! reassembler fed the bytes in pieces of a fuzzer-chosen size. Every byte
//! is accounted for (prefixes, payloads, what is left), and nothing panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&step, wire)) = data.split_first() else {
        return;
    };
    let (lens, left) = punchd::fuzzing::decode_udp_frames(wire, usize::from(step));
    let taken: usize = lens.iter().map(|n| n + 2).sum();
    assert_eq!(taken + left, wire.len());
});
