//! How a UDP flow's datagrams travel through the tunnel. Pure: bytes in,
//! datagrams out; the flow tasks do the I/O.
//!
//! On the flow's stream (the TCP-mux and relayed paths, and on QUIC for a
//! datagram larger than the path takes):
//!
//! ```text
//! [u16 BE len][len bytes] [u16 BE len][len bytes] …     (0 ≤ len ≤ 65535)
//! ```
//!
//! A zero-length datagram is a datagram (UDP allows it), so there is no end
//! marker: a UDP flow has no clean end to tell from a cut, it just stops.
//! Any length a `u16` holds is valid, so the decoder can never be asked to
//! hold more than one 64 KiB datagram plus what one read brought.
//!
//! As a QUIC datagram, a flow's datagram is prefixed with the id of the
//! flow's stream (`tunnel/datagram.rs`).

use bytes::{Buf, Bytes, BytesMut};

/// Bytes in a datagram's length prefix on a stream.
pub(crate) const LEN_PREFIX: usize = 2;
/// The largest datagram a flow carries: what fits a `u16` length (and an
/// IPv6 jumbo-less UDP payload, 65,527, is below it).
pub(crate) const MAX_DATAGRAM: usize = u16::MAX as usize;

/// `datagram` as stream bytes, prefix and payload in one buffer (one
/// write). `None` if it is larger than [`MAX_DATAGRAM`].
pub(crate) fn frame(datagram: &[u8]) -> Option<Vec<u8>> {
    let len = u16::try_from(datagram.len()).ok()?;
    let mut out = Vec::with_capacity(LEN_PREFIX + datagram.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(datagram);
    Some(out)
}

/// Reassembles datagrams from a flow stream's bytes as reads deliver them
/// (any split). Holds at most one partial datagram plus one read.
#[derive(Debug, Default)]
pub(crate) struct Reassembler {
    buf: BytesMut,
}

impl Reassembler {
    /// Bytes read from the stream.
    pub(crate) fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete datagram, if one has arrived.
    pub(crate) fn pop(&mut self) -> Option<Bytes> {
        let len = usize::from(u16::from_be_bytes([*self.buf.first()?, *self.buf.get(1)?]));
        if self.buf.len() < LEN_PREFIX + len {
            return None;
        }
        self.buf.advance(LEN_PREFIX);
        Some(self.buf.split_to(len).freeze())
    }

    /// Bytes of a datagram that began but did not finish (at the stream's
    /// end: a cut, logged).
    pub(crate) fn pending(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frames_round_trip_including_empty_and_largest() {
        let big = vec![9u8; MAX_DATAGRAM];
        let datagrams: Vec<&[u8]> = vec![b"query", b"", &big, b"x"];
        let mut wire = Vec::new();
        for d in &datagrams {
            wire.extend(frame(d).unwrap());
        }
        let mut r = Reassembler::default();
        r.push(&wire);
        for d in &datagrams {
            assert_eq!(r.pop().as_deref(), Some(*d));
        }
        assert_eq!(r.pop(), None);
        assert_eq!(r.pending(), 0);
        assert_eq!(frame(&vec![0u8; MAX_DATAGRAM + 1]), None);
    }

    #[test]
    fn a_partial_datagram_waits_and_is_reported() {
        let mut r = Reassembler::default();
        r.push(&frame(b"hello").unwrap()[..4]);
        assert_eq!(r.pop(), None);
        assert_eq!(r.pending(), 4);
        r.push(b"llo");
        assert_eq!(r.pop().as_deref(), Some(&b"hello"[..]));
        r.push(&[0]);
        assert_eq!(r.pop(), None, "half a length prefix");
    }

    proptest! {
        /// Any datagrams, split anywhere, come out whole and in order.
        #[test]
        fn any_split_reassembles(
            datagrams in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..2000), 0..20),
            cuts in proptest::collection::vec(1usize..700, 1..50),
        ) {
            let mut wire = Vec::new();
            for d in &datagrams {
                wire.extend(frame(d).unwrap());
            }
            let mut r = Reassembler::default();
            let (mut at, mut out) = (0, Vec::new());
            for c in cuts.iter().cycle() {
                if at >= wire.len() { break; }
                let end = (at + c).min(wire.len());
                r.push(&wire[at..end]);
                at = end;
                while let Some(d) = r.pop() { out.push(d.to_vec()); }
            }
            prop_assert_eq!(out, datagrams);
            prop_assert_eq!(r.pending(), 0);
        }

        /// Arbitrary bytes never panic and never yield more than arrived.
        #[test]
        fn garbage_is_bounded(wire in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let mut r = Reassembler::default();
            r.push(&wire);
            let mut taken = 0;
            while let Some(d) = r.pop() { taken += LEN_PREFIX + d.len(); }
            prop_assert_eq!(taken + r.pending(), wire.len());
        }
    }
}
