//! `EmailAddress`: parsed once at the edge, normalised (trimmed, lower-cased) so the
//! unique index in either database is case-insensitive without collation tricks.

use serde::{Deserialize, Serialize};

/// RFC 5321 caps a path at 254 octets.
pub const MAX_EMAIL_LEN: usize = 254;

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EmailAddress(String);

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EmailError {
    #[error("email address is too long")]
    TooLong,
    #[error("email address is not valid")]
    Invalid,
}

impl EmailAddress {
    /// Deliberately simple: one `@`, a non-empty local part without spaces or control
    /// characters, a domain with a dot and no empty labels. Full RFC 5322 grammar
    /// accepts addresses no mail server delivers to; the verification email is the
    /// real check.
    pub fn parse(raw: &str) -> Result<Self, EmailError> {
        let trimmed = raw.trim();
        if trimmed.len() > MAX_EMAIL_LEN {
            return Err(EmailError::TooLong);
        }
        let lowered = trimmed.to_lowercase();
        let (local, domain) = lowered.split_once('@').ok_or(EmailError::Invalid)?;
        let bad_char = |c: char| c.is_whitespace() || c.is_control() || "<>()[],;:\\\"@".contains(c);
        if local.is_empty() || local.len() > 64 || local.chars().any(bad_char) {
            return Err(EmailError::Invalid);
        }
        if domain.is_empty()
            || !domain.contains('.')
            || domain.split('.').any(|label| label.is_empty() || label.starts_with('-') || label.ends_with('-'))
            || domain.chars().any(|c| !(c.is_alphanumeric() || c == '-' || c == '.'))
        {
            return Err(EmailError::Invalid);
        }
        Ok(Self(lowered))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// For values read back from our own database, already normalised.
    pub fn from_trusted(s: String) -> Self {
        Self(s)
    }
}

impl std::fmt::Display for EmailAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_case_and_whitespace() {
        assert_eq!(EmailAddress::parse("  Ada@Example.COM ").unwrap().as_str(), "ada@example.com");
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "ada",
            "@example.com",
            "ada@",
            "ada@example",
            "a b@example.com",
            "ada@exa mple.com",
            "ada@@example.com",
            "ada@.example.com",
            "ada@example..com",
        ] {
            assert!(EmailAddress::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn rejects_too_long() {
        let long = format!("{}@example.com", "a".repeat(250));
        assert_eq!(EmailAddress::parse(&long), Err(EmailError::TooLong));
    }
}
