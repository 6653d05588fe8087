//! TOTP (RFC 6238) second factor and single-use recovery codes.
//!
//! A code is accepted once: [`check_totp`] returns the matched time step and the store
//! only accepts a step greater than the last one used (the replay guard RFC 6238 §5.2
//! asks for; totp-rs leaves it to the caller).

use totp_rs::{Builder, Secret, Totp};

use super::TokenDigest;

pub const RECOVERY_CODE_COUNT: usize = 10;
const ISSUER: &str = "Tollgate";

#[derive(Debug, thiserror::Error)]
#[error("stored TOTP secret is unusable")]
pub struct BadSecret;

fn totp(secret_base32: &str, account: &str, issuer: &str) -> Result<Totp, BadSecret> {
    let secret = Secret::try_from_base32(secret_base32).map_err(|_| BadSecret)?;
    Builder::new()
        .with_secret(secret)
        .with_account_name(account.to_owned())
        .with_issuer(Some(issuer.to_owned()))
        .build()
        .map_err(|_| BadSecret)
}

/// A fresh 160-bit secret, base32 encoded (what authenticator apps accept).
pub fn new_totp_secret() -> String {
    Secret::generate().to_base32()
}

/// The `otpauth://totp/...` URI shown as a QR code during setup.
pub fn otpauth_uri(secret_base32: &str, account: &str, issuer: Option<&str>) -> Result<String, BadSecret> {
    totp(secret_base32, account, issuer.unwrap_or(ISSUER))?.to_url().map_err(|_| BadSecret)
}

/// The time step matched by `code` at `unix_seconds` (±1 step of clock skew), if any.
pub fn check_totp(secret_base32: &str, code: &str, unix_seconds: u64) -> Option<i64> {
    let code: String = code.chars().filter(|c| !c.is_whitespace()).collect();
    if code.len() != 6 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let totp = totp(secret_base32, "check", ISSUER).ok()?;
    totp.check(&code, unix_seconds).and_then(|step| i64::try_from(step).ok())
}

/// The code for `unix_seconds`; used by tests and the CLI, never by the server.
pub fn totp_code_at(secret_base32: &str, unix_seconds: u64) -> Result<String, BadSecret> {
    Ok(totp(secret_base32, "check", ISSUER)?.generate(unix_seconds).to_string())
}

/// Ten recovery codes like `k3j9-x2mq-a8c4-p0zt` (80 random bits each, so an unsalted
/// SHA-256 is enough) and their digests for storage.
pub fn new_recovery_codes() -> (Vec<String>, Vec<TokenDigest>) {
    const ALPHABET: &[u8] = b"abcdefghjkmnpqrstuvwxyz23456789"; // no 0/o, 1/l/i
    let mut codes = Vec::with_capacity(RECOVERY_CODE_COUNT);
    for _ in 0..RECOVERY_CODE_COUNT {
        let mut bytes = [0u8; 16];
        rand::fill(&mut bytes);
        let chars: Vec<char> = bytes.iter().map(|b| ALPHABET[(*b as usize) % ALPHABET.len()] as char).collect();
        let code = chars.chunks(4).map(|c| c.iter().collect::<String>()).collect::<Vec<_>>().join("-");
        codes.push(code);
    }
    let digests = codes.iter().map(|c| recovery_code_digest(c)).collect();
    (codes, digests)
}

/// Digest of a presented recovery code: case, dashes and spaces do not matter.
pub fn recovery_code_digest(presented: &str) -> TokenDigest {
    let normalised: String =
        presented.chars().filter(|c| c.is_ascii_alphanumeric()).map(|c| c.to_ascii_lowercase()).collect();
    TokenDigest::of(&normalised)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_round_trip_and_step() {
        let secret = new_totp_secret();
        let now = 1_700_000_000;
        let code = totp_code_at(&secret, now).unwrap();
        assert_eq!(check_totp(&secret, &code, now), Some((now / 30) as i64));
        // One step of skew either way is accepted, two are not.
        assert!(check_totp(&secret, &code, now + 30).is_some());
        assert!(check_totp(&secret, &code, now + 90).is_none());
        assert!(check_totp(&secret, "abcdef", now).is_none());
        assert!(check_totp(&secret, "12345", now).is_none());
    }

    #[test]
    fn uri_names_issuer_and_secret() {
        let secret = new_totp_secret();
        let uri = otpauth_uri(&secret, "ada@example.com", None).unwrap();
        assert!(uri.starts_with("otpauth://totp/Tollgate:ada%40example.com?"), "{uri}");
        assert!(uri.contains(&secret));
    }

    #[test]
    fn recovery_codes_are_distinct_and_normalised() {
        let (codes, digests) = new_recovery_codes();
        assert_eq!(codes.len(), RECOVERY_CODE_COUNT);
        let unique: std::collections::HashSet<_> = codes.iter().collect();
        assert_eq!(unique.len(), RECOVERY_CODE_COUNT);
        assert_eq!(recovery_code_digest(&codes[0].to_uppercase().replace('-', " ")), digests[0]);
    }
}
