//! From observed source addresses to how a NAT maps (sans IO).
//!
//! Discovery asks the rendezvous's two endpoints (`listen`, then
//! `observe_port`) what source address they see, from one local port, then
//! does the same from a second local port: four observations per
//! transport, in the order the mappings were made. One local port seen
//! the same by both endpoints means one mapping for every destination
//! (endpoint-independent); two public endpoints mean a mapping per
//! destination (endpoint-dependent). For the latter, the steps between
//! consecutive new mappings say whether the next port can be predicted:
//! a NAT that allocates sequentially (even byte-swapped, as nftables'
//! `numgen inc` comes out on some kernels: a step of 256) shows the same
//! step every time; a randomizing one does not.

use std::net::SocketAddr;

use punch_rendezvous::nat::{Mapping, TransportNat};

/// What one local port saw: the local port, and each endpoint's answer
/// (`None`: no answer in time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    /// The local port the questions were asked from.
    pub local_port: u16,
    /// The answer of `listen`.
    pub main: Option<SocketAddr>,
    /// The answer of `observe_port`.
    pub second: Option<SocketAddr>,
}

/// The signed step from port `a` to port `b`, mod 65536.
fn step(a: u16, b: u16) -> i32 {
    i32::from(b.wrapping_sub(a) as i16)
}

/// How the NAT maps this transport, from the flows in the order asked.
pub fn classify(flows: &[Flow]) -> TransportNat {
    let answers: Vec<(u16, SocketAddr)> = flows
        .iter()
        .flat_map(|f| {
            [f.main, f.second]
                .into_iter()
                .flatten()
                .map(move |a| (f.local_port, a))
        })
        .collect();
    if answers.is_empty() {
        return TransportNat {
            mapping: Mapping::Blocked,
            ..TransportNat::default()
        };
    }
    let port_preserved = answers.iter().all(|(local, seen)| seen.port() == *local);
    let pairs: Vec<(SocketAddr, SocketAddr)> = flows
        .iter()
        .filter_map(|f| Some((f.main?, f.second?)))
        .collect();
    let mapping = if pairs.is_empty() {
        // One endpoint only (a server without `observe_port`, or one
        // that is filtered): nothing to compare.
        Mapping::Unknown
    } else if pairs.iter().all(|(a, b)| a == b) {
        Mapping::EndpointIndependent
    } else {
        Mapping::EndpointDependent
    };
    let delta = if mapping == Mapping::EndpointDependent {
        predictable_step(flows)
    } else {
        None
    };
    TransportNat {
        mapping,
        port_preserved,
        delta,
        unsolicited: None,
    }
}

/// The one step between consecutive mappings, when there are at least
/// three (two steps) from every question answered, all the same, on one
/// public IP, and not zero.
fn predictable_step(flows: &[Flow]) -> Option<i32> {
    if flows.iter().any(|f| f.main.is_none() || f.second.is_none()) {
        return None;
    }
    let seq: Vec<SocketAddr> = flows
        .iter()
        .flat_map(|f| [f.main, f.second])
        .flatten()
        .collect();
    if seq.len() < 3 {
        return None;
    }
    if seq.iter().any(|a| a.ip() != seq[0].ip()) {
        return None;
    }
    let steps: Vec<i32> = seq
        .windows(2)
        .map(|w| step(w[0].port(), w[1].port()))
        .collect();
    let first = steps[0];
    (first != 0 && steps.iter().all(|s| *s == first)).then_some(first)
}

/// The port a NAT with step `delta` gives the next new mapping after
/// `last` (the prediction port prediction aims at).
pub fn predict(last: u16, delta: i32, ahead: u16) -> u16 {
    let d = (delta as i16 as u16).wrapping_mul(ahead);
    last.wrapping_add(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(local: u16, main: Option<&str>, second: Option<&str>) -> Flow {
        Flow {
            local_port: local,
            main: main.map(|a| a.parse().unwrap()),
            second: second.map(|a| a.parse().unwrap()),
        }
    }

    #[test]
    fn one_public_endpoint_per_local_port_is_endpoint_independent() {
        // Linux masquerade: the port is kept when free.
        let n = classify(&[
            flow(40000, Some("203.0.113.2:40000"), Some("203.0.113.2:40000")),
            flow(40001, Some("203.0.113.2:40001"), Some("203.0.113.2:40001")),
        ]);
        assert_eq!(n.mapping, Mapping::EndpointIndependent);
        assert!(n.port_preserved);
        assert_eq!(n.delta, None);
        // No NAT at all reads the same.
        let n = classify(&[flow(5, Some("192.0.2.7:5"), Some("192.0.2.7:5"))]);
        assert_eq!(n.mapping, Mapping::EndpointIndependent);
        // Rewritten but stable.
        let n = classify(&[flow(
            40000,
            Some("203.0.113.2:1024"),
            Some("203.0.113.2:1024"),
        )]);
        assert_eq!(n.mapping, Mapping::EndpointIndependent);
        assert!(!n.port_preserved);
    }

    #[test]
    fn random_ports_per_destination_are_endpoint_dependent_and_unpredictable() {
        let n = classify(&[
            flow(40000, Some("203.0.113.2:51234"), Some("203.0.113.2:3321")),
            flow(40001, Some("203.0.113.2:60211"), Some("203.0.113.2:18004")),
        ]);
        assert_eq!(n.mapping, Mapping::EndpointDependent);
        assert!(!n.port_preserved);
        assert_eq!(n.delta, None);
        assert!(n.is_hard());
    }

    #[test]
    fn a_byte_swapped_sequential_allocation_is_learned_not_assumed() {
        // nftables `numgen inc … offset 30000` on these kernels: 12405,
        // 12661, 12917, 13173 (0x7530, 0x7531, … byte-swapped).
        let n = classify(&[
            flow(40000, Some("203.0.113.2:12405"), Some("203.0.113.2:12661")),
            flow(40001, Some("203.0.113.2:12917"), Some("203.0.113.2:13173")),
        ]);
        assert_eq!(n.mapping, Mapping::EndpointDependent);
        assert_eq!(n.delta, Some(256));
        assert!(!n.is_hard());
        assert_eq!(predict(13173, 256, 1), 13429);
        // A plain +1 allocator, and one that counts down across 0.
        let n = classify(&[
            flow(1, Some("203.0.113.2:30000"), Some("203.0.113.2:30001")),
            flow(2, Some("203.0.113.2:30002"), Some("203.0.113.2:30003")),
        ]);
        assert_eq!(n.delta, Some(1));
        let n = classify(&[
            flow(1, Some("203.0.113.2:1"), Some("203.0.113.2:0")),
            flow(2, Some("203.0.113.2:65535"), Some("203.0.113.2:65534")),
        ]);
        assert_eq!(n.delta, Some(-1));
        assert_eq!(predict(0, -1, 2), 65534);
    }

    #[test]
    fn an_irregular_step_or_a_missing_answer_predicts_nothing() {
        let n = classify(&[
            flow(1, Some("203.0.113.2:30000"), Some("203.0.113.2:30001")),
            flow(2, Some("203.0.113.2:30002"), Some("203.0.113.2:30007")),
        ]);
        assert_eq!((n.mapping, n.delta), (Mapping::EndpointDependent, None));
        let n = classify(&[
            flow(1, Some("203.0.113.2:30000"), Some("203.0.113.2:30001")),
            flow(2, Some("203.0.113.2:30002"), None),
        ]);
        assert_eq!((n.mapping, n.delta), (Mapping::EndpointDependent, None));
        // Two public IPs (a NAT pool): not one sequence.
        let n = classify(&[
            flow(1, Some("203.0.113.2:30000"), Some("203.0.113.3:30001")),
            flow(2, Some("203.0.113.2:30002"), Some("203.0.113.3:30003")),
        ]);
        assert_eq!(n.delta, None);
    }

    #[test]
    fn silence_is_blocked_and_one_endpoint_is_unknown() {
        let n = classify(&[flow(1, None, None), flow(2, None, None)]);
        assert_eq!(n.mapping, Mapping::Blocked);
        assert!(n.is_hard());
        assert_eq!(classify(&[]).mapping, Mapping::Blocked);
        let n = classify(&[
            flow(1, Some("203.0.113.2:1"), None),
            flow(2, Some("203.0.113.2:2"), None),
        ]);
        assert_eq!(n.mapping, Mapping::Unknown);
        assert!(n.port_preserved);
    }
}
