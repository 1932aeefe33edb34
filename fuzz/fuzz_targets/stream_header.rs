//! The stream header an exposing daemon reads at the start of every
//! tunnel stream (`daemon/src/tunnel/header.rs`, through the `fuzzing`
//! feature's entry point). An accepted service request is never empty nor
//! longer than 67 bytes: a 63-byte name, or `name#n` for the n-th port of
//! a range forward (n < 256; `MAX_REQUEST_LEN` in the header module).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(name) = runtime().block_on(punchd::fuzzing::read_stream_header(data)) {
        assert!(!name.is_empty() && name.len() <= 63 + 4, "{name:?}");
    }
});
