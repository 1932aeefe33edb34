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
//! As a QUIC datagram: `[u64 BE id of the flow's stream][payload]`. The
//! stream that opened the flow (and asked for the service, and was
//! admitted) names it; both ends see the same stream id, so no id is
//! negotiated and a datagram can only reach a flow the ACL admitted.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Bytes in a datagram's length prefix on a stream.
pub(crate) const LEN_PREFIX: usize = 2;
/// Bytes of the flow id in front of a QUIC datagram's payload.
pub(crate) const ID_PREFIX: usize = 8;
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

/// `payload` as a QUIC datagram of the flow whose stream has id `flow`.
pub(crate) fn quic_datagram(flow: u64, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(ID_PREFIX + payload.len());
    out.put_u64(flow);
    out.extend_from_slice(payload);
    out.freeze()
}

/// A QUIC datagram's flow id and payload; `None` if it is shorter than the
/// id (malformed: dropped).
pub(crate) fn parse_quic_datagram(mut d: Bytes) -> Option<(u64, Bytes)> {
    if d.len() < ID_PREFIX {
        return None;
    }
    let id = d.get_u64();
    Some((id, d))
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

    #[test]
    fn quic_datagrams_carry_their_flow() {
        let d = quic_datagram(0x0102_0304_0506_0708, b"dns");
        assert_eq!(d.len(), ID_PREFIX + 3);
        let (id, payload) = parse_quic_datagram(d).unwrap();
        assert_eq!(id, 0x0102_0304_0506_0708);
        assert_eq!(&payload[..], b"dns");
        assert_eq!(
            parse_quic_datagram(quic_datagram(4, b"")).unwrap().1.len(),
            0
        );
        assert_eq!(parse_quic_datagram(Bytes::from_static(&[1, 2, 3])), None);
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
            let _ = parse_quic_datagram(Bytes::from(wire));
        }
    }
}
