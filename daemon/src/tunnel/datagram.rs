//! A UDP flow's datagrams on a QUIC tunnel: `[u64 BE id of the flow's
//! stream][payload]`. The stream that opened the flow (and asked for the
//! service, and was admitted) names it; both ends see the same stream id,
//! so no id is negotiated, and a datagram can only reach a flow the ACL
//! admitted. Pure; [`super::DatagramRoutes`] dispatches by it.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Bytes of the flow id in front of a QUIC datagram's payload.
pub(crate) const ID_PREFIX: usize = 8;

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
        /// Arbitrary datagrams never panic; those long enough keep their
        /// payload.
        #[test]
        fn any_bytes_parse_or_are_refused(d in proptest::collection::vec(any::<u8>(), 0..64)) {
            let parsed = parse_quic_datagram(Bytes::from(d.clone()));
            match parsed {
                Some((_, p)) => prop_assert_eq!(&p[..], &d[ID_PREFIX..]),
                None => prop_assert!(d.len() < ID_PREFIX),
            }
        }
    }
}
