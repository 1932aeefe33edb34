//! The few UDP datagrams punchd sends that are not QUIC.
//!
//! A daemon's UDP punch port carries QUIC once a path is up, but before
//! that it needs three small messages of its own:
//!
//! ```text
//! daemon → server  probe {name, counter, local_port, signature}   "this is my UDP mapping"
//! server → daemon  ack   {counter, observed}          (keeps the mapping two-way)
//! daemon ⇄ daemon  punch {session}                    (opens each NAT for the other)
//! anyone → server   observe {nonce}                   "what address do you see?"
//! server → anyone   observed {nonce, observed}        (NAT discovery, `punchd netcheck`)
//! ```
//!
//! `observe` is unsigned: its answer only tells the sender its own source
//! address, which is no secret from the sender. It is padded to
//! [`OBSERVE_LEN`], longer than any answer, so the server never sends more
//! than it received (no amplification), and answered under per-source
//! rate limits.
//!
//! Every one starts with [`MAGIC`], whose first byte is zero. A QUIC v1
//! packet always has its "fixed bit" (0x40) set unless both ends agreed to
//! grease it, which punchd never offers, so one byte tells the two apart
//! on a shared socket.
//!
//! The probe is signed with the daemon's Ed25519 key over the nonce of its
//! current WebSocket registration and a counter that must grow: a probe
//! cannot be forged, moved to another registration, or replayed from
//! another address to redirect the daemon's UDP candidate.

use std::net::{IpAddr, SocketAddr};

use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};

/// First bytes of every non-QUIC datagram.
pub const MAGIC: [u8; 4] = [0x00, b'p', b'n', b'd'];

/// Domain separation for probe signatures.
pub const PROBE_CONTEXT: &[u8] = b"punchd-udp-probe-v1:";

const KIND_PROBE: u8 = 1;
const KIND_ACK: u8 = 2;
const KIND_PUNCH: u8 = 3;
const KIND_OBSERVE: u8 = 4;
const KIND_OBSERVED: u8 = 5;

/// Length of an `observe` request (padded with zeros): at least the
/// longest `observed` answer (32 bytes for IPv6), so answers never amplify.
pub const OBSERVE_LEN: usize = 40;

/// Longest datagram of ours (a probe with a 63-byte name).
pub const MAX_LEN: usize = 4 + 1 + 1 + 63 + 8 + 2 + 64;

/// A parsed datagram. Borrowed from the receive buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Datagram<'a> {
    /// A daemon announcing its UDP mapping to the server.
    Probe {
        /// The registered name.
        name: &'a str,
        /// Strictly increasing per registration.
        counter: u64,
        /// The UDP port the probe was sent from, before any NAT (for
        /// same-LAN candidates; it changes when the daemon re-binds).
        local_port: u16,
        /// Over [`PROBE_CONTEXT`], the registration nonce, name, counter
        /// and local port.
        signature: [u8; 64],
    },
    /// The server's answer: what it saw.
    Ack {
        /// The probe's counter.
        counter: u64,
        /// The source address of the probe, as the server saw it.
        observed: SocketAddr,
    },
    /// A hole-punching datagram between two daemons.
    Punch {
        /// The punch session (from the order).
        session: &'a str,
    },
    /// "What source address do you see?" (NAT discovery).
    Observe {
        /// Echoed in the answer, to match it to the question.
        nonce: u64,
    },
    /// The answer to [`Datagram::Observe`].
    Observed {
        /// The question's nonce.
        nonce: u64,
        /// The question's source address as the server saw it.
        observed: SocketAddr,
    },
}

/// True if `buf` is one of ours (not QUIC).
pub fn is_ours(buf: &[u8]) -> bool {
    buf.len() > MAGIC.len() && buf[..MAGIC.len()] == MAGIC
}

/// What a probe says, apart from its signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeBody<'a> {
    /// The registered name.
    pub name: &'a str,
    /// Strictly increasing per registration.
    pub counter: u64,
    /// The daemon's local UDP port.
    pub local_port: u16,
}

fn probe_message(nonce: &[u8], p: &ProbeBody<'_>) -> Vec<u8> {
    let mut m = PROBE_CONTEXT.to_vec();
    m.extend_from_slice(nonce);
    m.extend_from_slice(p.name.as_bytes());
    m.extend_from_slice(&p.counter.to_be_bytes());
    m.extend_from_slice(&p.local_port.to_be_bytes());
    m
}

/// A signed probe for registration `nonce`. Names longer than 63 bytes are
/// not valid punchd names and are cut.
pub fn probe(key: &SigningKey, nonce: &[u8], p: &ProbeBody<'_>) -> Vec<u8> {
    let p = ProbeBody {
        name: &p.name[..p.name.len().min(63)],
        ..*p
    };
    let sig = key.sign(&probe_message(nonce, &p));
    let mut d = MAGIC.to_vec();
    d.push(KIND_PROBE);
    d.push(p.name.len() as u8);
    d.extend_from_slice(p.name.as_bytes());
    d.extend_from_slice(&p.counter.to_be_bytes());
    d.extend_from_slice(&p.local_port.to_be_bytes());
    d.extend_from_slice(&sig.to_bytes());
    d
}

/// Checks a probe's signature against the registration it names.
pub fn verify_probe(
    key: &VerifyingKey,
    nonce: &[u8],
    p: &ProbeBody<'_>,
    signature: &[u8; 64],
) -> bool {
    key.verify(&probe_message(nonce, p), &Signature::from_bytes(signature))
        .is_ok()
}

/// The server's answer to a probe.
pub fn ack(counter: u64, observed: SocketAddr) -> Vec<u8> {
    addressed(KIND_ACK, counter, observed)
}

/// A NAT-discovery question (padded to [`OBSERVE_LEN`]).
pub fn observe(nonce: u64) -> Vec<u8> {
    let mut d = MAGIC.to_vec();
    d.push(KIND_OBSERVE);
    d.extend_from_slice(&nonce.to_be_bytes());
    d.resize(OBSERVE_LEN, 0);
    d
}

/// The server's answer to [`observe`]: never longer than the question.
pub fn observed(nonce: u64, observed: SocketAddr) -> Vec<u8> {
    addressed(KIND_OBSERVED, nonce, observed)
}

fn addressed(kind: u8, counter: u64, observed: SocketAddr) -> Vec<u8> {
    let mut d = MAGIC.to_vec();
    d.push(kind);
    d.extend_from_slice(&counter.to_be_bytes());
    match observed.ip() {
        IpAddr::V4(ip) => {
            d.push(4);
            d.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            d.push(6);
            d.extend_from_slice(&ip.octets());
        }
    }
    d.extend_from_slice(&observed.port().to_be_bytes());
    d
}

/// A punch datagram for `session` (ids are short ASCII; longer are cut).
pub fn punch(session: &str) -> Vec<u8> {
    let session = &session.as_bytes()[..session.len().min(64)];
    let mut d = MAGIC.to_vec();
    d.push(KIND_PUNCH);
    d.push(session.len() as u8);
    d.extend_from_slice(session);
    d
}

/// Parses one of ours; `None` for anything else or anything malformed.
pub fn parse(buf: &[u8]) -> Option<Datagram<'_>> {
    if !is_ours(buf) || buf.len() > MAX_LEN {
        return None;
    }
    let mut r = Reader(&buf[MAGIC.len()..]);
    let d = match r.u8()? {
        KIND_PROBE => {
            let len = r.u8()? as usize;
            let name = std::str::from_utf8(r.take(len)?).ok()?;
            let counter = u64::from_be_bytes(r.array()?);
            let local_port = u16::from_be_bytes(r.array()?);
            let signature = r.array()?;
            Datagram::Probe {
                name,
                counter,
                local_port,
                signature,
            }
        }
        KIND_ACK => {
            let counter = u64::from_be_bytes(r.array()?);
            Datagram::Ack {
                counter,
                observed: r.addr()?,
            }
        }
        KIND_OBSERVED => {
            let nonce = u64::from_be_bytes(r.array()?);
            Datagram::Observed {
                nonce,
                observed: r.addr()?,
            }
        }
        KIND_OBSERVE => {
            if buf.len() != OBSERVE_LEN {
                return None;
            }
            let nonce = u64::from_be_bytes(r.array()?);
            let pad = r.take(r.0.len())?;
            if pad.iter().any(|b| *b != 0) {
                return None;
            }
            Datagram::Observe { nonce }
        }
        KIND_PUNCH => {
            let len = r.u8()? as usize;
            let session = std::str::from_utf8(r.take(len)?).ok()?;
            Datagram::Punch { session }
        }
        _ => return None,
    };
    r.0.is_empty().then_some(d)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    fn addr(&mut self) -> Option<SocketAddr> {
        let ip = match self.u8()? {
            4 => IpAddr::from(self.array::<4>()?),
            6 => IpAddr::from(self.array::<16>()?),
            _ => return None,
        };
        Some(SocketAddr::new(ip, u16::from_be_bytes(self.array()?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_round_trip_and_bind_nonce_name_and_counter() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let nonce = [1u8; 32];
        let body = ProbeBody {
            name: "alice",
            counter: 3,
            local_port: 40000,
        };
        let d = probe(&key, &nonce, &body);
        let Some(Datagram::Probe {
            name,
            counter,
            local_port,
            signature,
        }) = parse(&d)
        else {
            panic!("not a probe: {d:?}");
        };
        let got = ProbeBody {
            name,
            counter,
            local_port,
        };
        assert_eq!(got, body);
        let vk = key.verifying_key();
        assert!(verify_probe(&vk, &nonce, &got, &signature));
        assert!(!verify_probe(&vk, &[2u8; 32], &got, &signature));
        for forged in [
            ProbeBody {
                name: "mallory",
                ..got
            },
            ProbeBody { counter: 4, ..got },
            ProbeBody {
                local_port: 1,
                ..got
            },
        ] {
            assert!(!verify_probe(&vk, &nonce, &forged, &signature));
        }
    }

    #[test]
    fn acks_and_punches_round_trip() {
        for addr in ["203.0.113.2:40000", "[2001:db8::1]:9"] {
            let addr: SocketAddr = addr.parse().unwrap();
            assert_eq!(
                parse(&ack(9, addr)),
                Some(Datagram::Ack {
                    counter: 9,
                    observed: addr
                })
            );
        }
        assert_eq!(
            parse(&punch("abc123")),
            Some(Datagram::Punch { session: "abc123" })
        );
    }

    #[test]
    fn observe_round_trips_and_its_answer_never_amplifies() {
        assert_eq!(parse(&observe(7)), Some(Datagram::Observe { nonce: 7 }));
        for addr in ["203.0.113.2:40000", "[2001:db8::1]:9"] {
            let addr: SocketAddr = addr.parse().unwrap();
            let answer = observed(7, addr);
            assert!(answer.len() <= observe(7).len());
            assert_eq!(
                parse(&answer),
                Some(Datagram::Observed {
                    nonce: 7,
                    observed: addr
                })
            );
        }
        // Short, long, or non-zero padding: not an observe.
        let q = observe(7);
        assert_eq!(parse(&q[..OBSERVE_LEN - 1]), None);
        let mut long = q.clone();
        long.push(0);
        assert_eq!(parse(&long), None);
        let mut dirty = q;
        dirty[OBSERVE_LEN - 1] = 1;
        assert_eq!(parse(&dirty), None);
    }

    #[test]
    fn quic_and_garbage_are_not_ours() {
        // A QUIC long header (Initial) and short header both set 0x40.
        assert!(!is_ours(&[0xc3, 0, 0, 0, 1]));
        assert!(!is_ours(&[0x41, 1, 2, 3, 4]));
        assert_eq!(parse(&[0xc3, 0, 0, 0, 1]), None);
        // Truncated, trailing bytes, unknown kind, bad UTF-8.
        let mut p = punch("s");
        p.push(0);
        assert_eq!(parse(&p), None);
        assert_eq!(parse(&punch("s")[..6]), None);
        assert_eq!(parse(&[0, b'p', b'n', b'd', 9]), None);
        assert_eq!(parse(&[0, b'p', b'n', b'd', KIND_PUNCH, 1, 0xff]), None);
        assert_eq!(parse(&[0u8; 400]), None);
    }
}
