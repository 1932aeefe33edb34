//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`, off in
//! every normal build): the decoders of bytes a peer sends through a
//! tunnel, which are otherwise private to the crate.

use crate::forward::frame::{Decoder, Want, PREFIX};

/// Reads a stream header as the exposing side does; `Ok` is the service
/// asked for. Must run inside a Tokio runtime with time enabled.
pub async fn read_stream_header(bytes: &[u8]) -> Result<String, String> {
    let mut r = bytes;
    crate::tunnel::header::read_request(&mut r)
        .await
        .map_err(|e| e.to_string())
}

/// Feeds `wire` to the forwarded-stream frame decoder in pieces of `step`
/// bytes, as reads would deliver it; returns the data bytes delivered and
/// the verdict at the end.
pub fn decode_stream_frames(wire: &[u8], step: usize) -> (u64, Result<(), String>) {
    let step = step.max(1);
    let mut d = Decoder::default();
    let mut at = 0;
    loop {
        match d.want() {
            Want::Ended => return (d.delivered(), d.on_eof().map_err(|e| e.to_string())),
            Want::Prefix => {
                let Some(p) = wire.get(at..at + PREFIX) else {
                    return (d.delivered(), d.on_eof().map_err(|e| e.to_string()));
                };
                let mut prefix = [0u8; PREFIX];
                prefix.copy_from_slice(p);
                if let Err(e) = d.on_prefix(prefix) {
                    return (d.delivered(), Err(e.to_string()));
                }
                at += PREFIX;
            }
            Want::Data(n) => {
                let n = n.min(step).min(wire.len() - at);
                if n == 0 {
                    return (d.delivered(), d.on_eof().map_err(|e| e.to_string()));
                }
                d.on_data(n);
                at += n;
            }
        }
    }
}

/// Feeds `wire` to a UDP flow stream's datagram reassembler in pieces of
/// `step` bytes; returns the datagrams' lengths and the bytes left over
/// (a datagram cut short). Also parses `wire` as a QUIC flow datagram.
pub fn decode_udp_frames(wire: &[u8], step: usize) -> (Vec<usize>, usize) {
    let _ = crate::tunnel::datagram::parse_quic_datagram(bytes::Bytes::copy_from_slice(wire));
    let mut r = crate::forward::udp::wire::Reassembler::default();
    let mut lens = Vec::new();
    for piece in wire.chunks(step.max(1)) {
        r.push(piece);
        while let Some(d) = r.pop() {
            lens.push(d.len());
        }
    }
    (lens, r.pending())
}
