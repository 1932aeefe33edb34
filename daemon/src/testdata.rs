//! Test data both this crate's tests and the lab use: deterministic bytes
//! to push through a tunnel, and hex for their digests. Outside the `demo`
//! feature, so a build without the embedded rendezvous still has them.

/// Deterministic pseudo-random bytes (xorshift), so the data is not
/// trivially compressible and needs no randomness source.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
