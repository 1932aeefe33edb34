//! Value types that validate themselves while they are deserialized, so a bad
//! value is reported with the span of the value that is wrong.

use std::fmt;

use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize};

/// A secret string (the network token). `Debug` and `Display` never show it,
/// so it cannot leak into logs through a `{:?}` of a config struct.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself; call this only where it is sent or compared.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// A peer or daemon name: `[a-z0-9-]`, 1 to 63 characters, like a DNS label,
/// so it can appear in logs, metrics labels and file names without quoting.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct PeerName(String);

impl PeerName {
    /// Checks `value` against the naming rule.
    pub fn parse(value: &str) -> Result<Self, String> {
        let ok_chars = value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if value.is_empty() || value.len() > 63 || !ok_chars {
            return Err(format!(
                "invalid name {value:?}: use 1 to 63 characters from a-z, 0-9 and '-'"
            ));
        }
        Ok(Self(value.to_owned()))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PeerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for PeerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl<'de> Deserialize<'de> for PeerName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        PeerName::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A raw Ed25519 public key (32 bytes), written in config files as standard
/// base64, the form `punchd keygen` and `punchd pubkey` print.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PublicKeyBytes(pub [u8; 32]);

impl PublicKeyBytes {
    /// Decodes the base64 form.
    pub fn from_base64(value: &str) -> Result<Self, String> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(value.trim())
            .map_err(|e| {
                format!("public key is not valid base64 ({e}); paste the output of `punchd pubkey`")
            })?;
        let arr: [u8; 32] = bytes.try_into().map_err(|b: Vec<u8>| {
            format!(
                "public key is {} bytes, an Ed25519 key is 32; paste the output of `punchd pubkey`",
                b.len()
            )
        })?;
        Ok(Self(arr))
    }

    /// The base64 form.
    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.0)
    }
}

impl fmt::Display for PublicKeyBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for PublicKeyBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_base64())
    }
}

impl<'de> Deserialize<'de> for PublicKeyBytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        PublicKeyBytes::from_base64(&s).map_err(serde::de::Error::custom)
    }
}

impl Serialize for PublicKeyBytes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_base64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_label_rule() {
        assert!(PeerName::parse("alice-2").is_ok());
        assert!(PeerName::parse("").is_err());
        assert!(PeerName::parse("Alice").is_err());
        assert!(PeerName::parse("a_b").is_err());
        assert!(PeerName::parse(&"a".repeat(64)).is_err());
        assert!(PeerName::parse(&"a".repeat(63)).is_ok());
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("hunter2");
        assert!(!format!("{s:?}").contains("hunter2"));
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn public_keys_round_trip_and_reject_bad_lengths() {
        let k = PublicKeyBytes([7; 32]);
        assert_eq!(PublicKeyBytes::from_base64(&k.to_base64()), Ok(k));
        let short = base64::engine::general_purpose::STANDARD.encode([1u8; 16]);
        assert!(PublicKeyBytes::from_base64(&short)
            .unwrap_err()
            .contains("16 bytes"));
        assert!(PublicKeyBytes::from_base64("not base64!").is_err());
    }
}
