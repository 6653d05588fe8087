//! API keys: an account's own secrets for programmatic access (seed 002), as opposed
//! to service keys, which a product's backend uses over all its customers. A key is
//! `tg_live_` and 32 random bytes in base62, shown once; only its SHA-256 is stored,
//! with the first characters kept to recognise it in a list.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::Timestamp;
use crate::identity::{TokenDigest, str_enum};
use crate::ids::{AccountId, ApiKeyId};

pub const PREFIX: &str = "tg_live_";
/// Characters of the secret kept for display (the prefix and 4 more).
pub const DISPLAY_LEN: usize = PREFIX.len() + 4;
pub const MAX_NAME: usize = 100;
/// Most live keys per account.
pub const MAX_PER_ACCOUNT: usize = 50;

/// What a key may do: `read` allows GET and HEAD, `write` everything else.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApiKeyScope {
    Read,
    Write,
}

str_enum!(ApiKeyScope {
    Read => "read",
    Write => "write",
});

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ApiKey {
    pub id: ApiKeyId,
    pub account_id: AccountId,
    pub name: String,
    /// The first characters of the secret, e.g. `tg_live_3fQk`.
    pub prefix: String,
    pub scopes: Vec<ApiKeyScope>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: Timestamp,
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<Timestamp>,
    /// Updated at most once a minute per key and node, not on every request.
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_used_at: Option<Timestamp>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub revoked_at: Option<Timestamp>,
}

impl ApiKey {
    /// Neither revoked nor expired.
    pub fn is_live(&self, now: Timestamp) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|at| at > now)
    }

    pub fn allows(&self, scope: ApiKeyScope) -> bool {
        self.scopes.contains(&scope)
    }
}

/// A fresh secret: the prefix and 32 bytes from the OS generator in base62 (43
/// characters: letters and digits only, so it survives any copy and paste).
pub fn generate_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::fill(&mut bytes);
    format!("{PREFIX}{}", base62(&bytes))
}

/// Fixed-width base62 of a 256-bit number (43 digits: 62^43 > 2^256).
fn base62(bytes: &[u8; 32]) -> String {
    const DIGITS: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    // Big-endian digits of the number, divided by 62 repeatedly (schoolbook division).
    let mut n = bytes.to_vec();
    let mut out = Vec::with_capacity(43);
    for _ in 0..43 {
        let mut rem = 0u32;
        for byte in n.iter_mut() {
            let acc = (rem << 8) | u32::from(*byte);
            *byte = (acc / 62) as u8;
            rem = acc % 62;
        }
        out.push(DIGITS[rem as usize]);
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}

/// The digest stored for `secret`.
pub fn digest(secret: &str) -> TokenDigest {
    TokenDigest::of(secret)
}

/// The raw SHA-256 of `secret`: what a cache in front of the store can key by,
/// without building the hex string of [`digest`].
pub fn sha256(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// [`digest`] from the raw SHA-256 ([`sha256`]): its lowercase hex.
pub fn digest_of_sha256(sha256: &[u8; 32]) -> TokenDigest {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut hex = [0u8; 64];
    for (pair, byte) in hex.chunks_exact_mut(2).zip(sha256) {
        pair[0] = HEX[usize::from(byte >> 4)];
        pair[1] = HEX[usize::from(byte & 0xf)];
    }
    TokenDigest(hex.iter().map(|&c| char::from(c)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_prefixed_base62_of_full_length() {
        let a = generate_secret();
        let b = generate_secret();
        assert_ne!(a, b);
        assert_eq!(a.len(), PREFIX.len() + 43);
        assert!(a[PREFIX.len()..].bytes().all(|c| c.is_ascii_alphanumeric()), "{a}");
    }

    #[test]
    fn the_raw_digest_in_hex_is_the_stored_digest() {
        for secret in [String::new(), "tg_live_abc".into(), generate_secret(), generate_secret()] {
            assert_eq!(digest_of_sha256(&sha256(&secret)), digest(&secret), "{secret}");
        }
    }

    #[test]
    fn base62_is_the_number_in_base_62() {
        let mut one = [0u8; 32];
        one[31] = 1;
        assert_eq!(base62(&one), format!("{}1", "0".repeat(42)));
        let mut n = [0u8; 32];
        n[31] = 62;
        assert_eq!(base62(&n), format!("{}10", "0".repeat(41)));
        assert_ne!(base62(&[0xff; 32]).as_bytes()[0], b'0', "2^256 - 1 needs all 43 digits");
    }
}
