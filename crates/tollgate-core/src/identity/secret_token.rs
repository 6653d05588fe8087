//! Opaque secrets (refresh tokens, email links, recovery codes): 256 random bits shown
//! once, only their SHA-256 stored. High-entropy secrets need no slow hash; the digest
//! makes lookup an indexed equality and a database leak useless.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

/// A secret as handed to its owner. Its `Debug` is redacted so it cannot leak into logs.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretToken(String);

impl std::fmt::Debug for SecretToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretToken(<redacted>)")
    }
}

impl SecretToken {
    /// 32 random bytes from the OS generator, URL-safe base64 (43 characters).
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand::fill(&mut bytes);
        Self(URL_SAFE_NO_PAD.encode(bytes))
    }

    /// Wraps a token presented by a client.
    pub fn from_presented(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn digest(&self) -> TokenDigest {
        TokenDigest::of(&self.0)
    }
}

/// SHA-256 of a secret, hex encoded: what the database stores and looks up.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TokenDigest(pub String);

impl TokenDigest {
    pub fn of(secret: &str) -> Self {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let digest = Sha256::digest(secret.as_bytes());
        let mut hex = String::with_capacity(64);
        for byte in digest.iter() {
            hex.push(HEX[usize::from(byte >> 4)] as char);
            hex.push(HEX[usize::from(byte & 0xf)] as char);
        }
        Self(hex)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_unique_and_long() {
        let a = SecretToken::generate();
        let b = SecretToken::generate();
        assert_ne!(a, b);
        assert_eq!(a.expose().len(), 43);
    }

    #[test]
    fn digest_is_stable_sha256_hex() {
        assert_eq!(TokenDigest::of("abc").0, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn debug_is_redacted() {
        let t = SecretToken::from_presented("super-secret");
        assert!(!format!("{t:?}").contains("super"));
    }
}
