//! Password rules and Argon2id hashing. The policy (length, common passwords) is
//! checked before hashing so that a rejected password never costs a hash.

use std::collections::HashSet;
use std::sync::OnceLock;

use argon2::{Algorithm, Argon2, Params, PasswordHasher as _, PasswordVerifier as _, Version};

pub const MIN_PASSWORD_CHARS: usize = 8;
/// Upper bound keeps hashing cost bounded for hostile input.
pub const MAX_PASSWORD_CHARS: usize = 128;

/// The 10,000 most common passwords of at least 8 characters (from the zxcvbn
/// frequency lists, MIT), compared case-insensitively.
static COMMON_PASSWORDS: &str = include_str!("../../data/common-passwords.txt");

fn common_passwords() -> &'static HashSet<&'static str> {
    static SET: OnceLock<HashSet<&'static str>> = OnceLock::new();
    SET.get_or_init(|| COMMON_PASSWORDS.lines().map(str::trim).filter(|l| !l.is_empty()).collect())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PasswordPolicyError {
    #[error("password must be at least {MIN_PASSWORD_CHARS} characters")]
    TooShort,
    #[error("password must be at most {MAX_PASSWORD_CHARS} characters")]
    TooLong,
    #[error("password is too common")]
    TooCommon,
}

/// Checks a password chosen by a user (registration, reset, change).
pub fn check_new_password(password: &str) -> Result<(), PasswordPolicyError> {
    let chars = password.chars().count();
    if chars < MIN_PASSWORD_CHARS {
        return Err(PasswordPolicyError::TooShort);
    }
    if chars > MAX_PASSWORD_CHARS {
        return Err(PasswordPolicyError::TooLong);
    }
    if common_passwords().contains(password.to_lowercase().as_str()) {
        return Err(PasswordPolicyError::TooCommon);
    }
    Ok(())
}

/// Argon2id cost parameters. The default is OWASP's recommendation
/// (m = 19 MiB, t = 2, p = 1); tests may configure cheaper ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct HashCost {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl Default for HashCost {
    fn default() -> Self {
        Self { memory_kib: 19 * 1024, iterations: 2, parallelism: 1 }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("password hashing failed: {0}")]
pub struct HashError(String);

/// Hashes and verifies passwords. Verification reads the cost from the stored PHC
/// string, so changing [`HashCost`] never locks anyone out.
#[derive(Clone)]
pub struct PasswordHasher {
    argon: Argon2<'static>,
    /// A hash of a random password with the current cost, verified against when the
    /// user does not exist so that unknown and known emails take the same time.
    dummy_hash: String,
}

impl PasswordHasher {
    pub fn new(cost: HashCost) -> Result<Self, HashError> {
        let params = Params::new(cost.memory_kib, cost.iterations, cost.parallelism, None)
            .map_err(|e| HashError(e.to_string()))?;
        let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
        let mut hasher = Self { argon, dummy_hash: String::new() };
        hasher.dummy_hash = hasher.hash(super::SecretToken::generate().expose())?;
        Ok(hasher)
    }

    /// CPU-bound (tens of milliseconds): call from a blocking thread.
    pub fn hash(&self, password: &str) -> Result<String, HashError> {
        self.argon.hash_password(password.as_bytes()).map(|h| h.to_string()).map_err(|e| HashError(e.to_string()))
    }

    /// `false` for a wrong password and for a malformed stored hash alike.
    pub fn verify(&self, password: &str, phc: &str) -> bool {
        self.argon.verify_password(password.as_bytes(), phc).is_ok()
    }

    /// Burns the same time as [`Self::verify`] for a user that does not exist.
    pub fn verify_dummy(&self, password: &str) {
        let _ = self.verify(password, &self.dummy_hash);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cheap() -> PasswordHasher {
        PasswordHasher::new(HashCost { memory_kib: 64, iterations: 1, parallelism: 1 }).unwrap()
    }

    #[test]
    fn policy() {
        assert_eq!(check_new_password("short"), Err(PasswordPolicyError::TooShort));
        assert_eq!(check_new_password(&"x".repeat(129)), Err(PasswordPolicyError::TooLong));
        assert_eq!(check_new_password("password"), Err(PasswordPolicyError::TooCommon));
        assert_eq!(check_new_password("PassWord"), Err(PasswordPolicyError::TooCommon));
        assert_eq!(check_new_password("baseball"), Err(PasswordPolicyError::TooCommon));
        assert!(check_new_password("correct horse battery staple").is_ok());
        // 128 multi-byte characters are allowed: the limit counts characters.
        assert!(check_new_password(&"é".repeat(128)).is_ok());
    }

    #[test]
    fn hash_and_verify() {
        let h = cheap();
        let phc = h.hash("correct horse battery").unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=64,t=1,p=1$"));
        assert!(h.verify("correct horse battery", &phc));
        assert!(!h.verify("wrong horse battery", &phc));
        assert!(!h.verify("anything", "not a phc string"));
    }

    #[test]
    fn default_cost_is_owasp() {
        let phc = PasswordHasher::new(HashCost::default()).unwrap().hash("x").unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
    }
}
