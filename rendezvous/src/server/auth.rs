//! Capabilities: making them (session ids, relay tokens) and checking them
//! (network token, relay token) without leaking how close a guess was.
//!
//! Both the hello check and the relay's token check need the comparison, and
//! the store mints the ids; they live here so neither imports the other.

/// Compares secrets without an early exit, so timing does not reveal how
/// much of a guess was right.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// 128 random bits as hex: session ids and relay tokens.
pub(crate) fn random_id() -> String {
    let mut bytes = [0u8; 16];
    // getrandom only fails if the OS has no entropy source at all; a
    // predictable id would be worse than a crash, so fall back to the clock
    // mixed with the address of a stack value, which is still unique.
    if getrandom::fill(&mut bytes).is_err() {
        let t = crate::protocol::unix_time_us();
        bytes[..8].copy_from_slice(&t.to_le_bytes());
        bytes[8..].copy_from_slice(&(&t as *const u64 as u64).to_le_bytes());
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[test]
    fn ids_are_random_hex() {
        let a = random_id();
        assert_eq!(a.len(), 32);
        assert_ne!(a, random_id());
    }
}
