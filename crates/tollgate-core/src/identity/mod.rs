//! Identity: users, their personal accounts, sessions, one-time tokens and second
//! factors. The types live here; the use cases are in [`flows`].

mod email_address;
pub mod flows;
pub mod mfa;
pub mod password;
mod secret_token;

use serde::{Deserialize, Serialize};

pub use email_address::{EmailAddress, EmailError, MAX_EMAIL_LEN};
pub use flows::{Identity, IdentityError, IdentitySettings};
pub use secret_token::{SecretToken, TokenDigest};

use crate::Timestamp;
use crate::ids::{AccountId, OneTimeTokenId, SessionId, UserId};

/// Longest accepted display name, in characters.
pub const MAX_NAME_CHARS: usize = 200;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UserStatus {
    Active,
    Suspended,
    Deleted,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    User,
    Admin,
}

/// Locales with translated emails and pages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Locale {
    #[default]
    En,
    Fr,
}

macro_rules! str_enum {
    ($ty:ident { $($variant:ident => $s:literal),+ $(,)? }) => {
        impl $ty {
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $s),+ }
            }
            pub fn parse(s: &str) -> Option<Self> {
                match s { $($s => Some(Self::$variant),)+ _ => None }
            }
        }
    };
}
pub(crate) use str_enum;

str_enum!(UserStatus { Active => "active", Suspended => "suspended", Deleted => "deleted" });
str_enum!(Role { User => "user", Admin => "admin" });
str_enum!(Locale { En => "en", Fr => "fr" });

impl Locale {
    /// Picks the first supported language of an `Accept-Language`-style list.
    pub fn negotiate(header: &str) -> Option<Self> {
        header.split(',').find_map(|part| {
            let tag = part.split(';').next()?.trim().to_ascii_lowercase();
            Self::parse(tag.split('-').next()?)
        })
    }
}

/// A person who signs in. Holds its secrets (password hash, TOTP secret); the HTTP
/// layer shows a separate view that has none of them.
#[derive(Clone, Debug, PartialEq)]
pub struct User {
    pub id: UserId,
    pub email: EmailAddress,
    pub email_verified_at: Option<Timestamp>,
    pub name: Option<String>,
    pub locale: Locale,
    /// `None` for a user who never set one (an admin created from the CLI).
    pub password_hash: Option<String>,
    pub status: UserStatus,
    pub role: Role,
    /// The user's personal account (who owns plans, quotas and credits).
    pub account_id: AccountId,
    /// Set during setup and kept while 2FA is on.
    pub totp_secret: Option<String>,
    pub totp_enabled_at: Option<Timestamp>,
    /// Last accepted TOTP time step: a code is never accepted twice.
    pub totp_last_step: Option<i64>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    pub last_login_at: Option<Timestamp>,
}

impl User {
    pub fn totp_enabled(&self) -> bool {
        self.totp_enabled_at.is_some()
    }
}

/// What the store needs to create a user together with their personal account.
#[derive(Clone, Debug)]
pub struct NewUser {
    pub id: UserId,
    pub account_id: AccountId,
    pub email: EmailAddress,
    pub email_verified: bool,
    pub name: Option<String>,
    pub locale: Locale,
    pub password_hash: Option<String>,
    pub role: Role,
    pub created_at: Timestamp,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Session {
    pub id: SessionId,
    pub user_id: UserId,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    pub created_at: Timestamp,
    pub last_seen_at: Timestamp,
    pub expires_at: Timestamp,
    pub revoked_at: Option<Timestamp>,
}

impl Session {
    pub fn is_live(&self, now: Timestamp) -> bool {
        self.revoked_at.is_none() && self.expires_at > now
    }
}

/// A session to open, with the digest of its first refresh token.
#[derive(Clone, Debug)]
pub struct NewSession {
    pub id: SessionId,
    pub user_id: UserId,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
    pub refresh_digest: TokenDigest,
}

/// Result of presenting a refresh token.
#[derive(Clone, Debug, PartialEq)]
#[allow(clippy::large_enum_variant, reason = "short-lived return value; boxing buys nothing")]
pub enum RefreshOutcome {
    /// The token was current: it is now rotated and the new one is live.
    Rotated { session: Session, user: User },
    /// The token had already been rotated: somebody replayed it, so the whole session
    /// was revoked.
    Reused { session_id: SessionId },
    /// Unknown token, or its session is revoked or expired.
    Invalid,
}

/// Which sessions of a user to end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionScope {
    One(SessionId),
    AllExcept(SessionId),
    All,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenPurpose {
    VerifyEmail,
    ChangeEmail,
    PasswordReset,
    MagicLink,
    MfaLogin,
}

str_enum!(TokenPurpose {
    VerifyEmail => "verify_email",
    ChangeEmail => "change_email",
    PasswordReset => "password_reset",
    MagicLink => "magic_link",
    MfaLogin => "mfa_login",
});

/// A single-use secret link or code, stored as a digest.
#[derive(Clone, Debug, PartialEq)]
pub struct OneTimeToken {
    pub id: OneTimeTokenId,
    pub digest: TokenDigest,
    pub purpose: TokenPurpose,
    pub user_id: UserId,
    /// The address being confirmed, for [`TokenPurpose::ChangeEmail`].
    pub new_email: Option<EmailAddress>,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
    pub used_at: Option<Timestamp>,
}

/// What redeeming a one-time token does, in the same transaction that marks it used.
///
/// Two rules hold across effects:
/// - **Proof of the mailbox beats earlier credentials.** When a magic link or reset
///   link is the first proof that the user owns the address, credentials chosen before
///   that proof (password for a magic link, 2FA, sessions) are dropped: whoever
///   registered the address had not shown they own it (account pre-hijacking).
/// - **Security changes end outstanding links.** Changing the email or the password
///   marks every other unused link of the user used.
#[derive(Clone, Debug)]
pub enum TokenEffect {
    /// Marks the user's email verified (the registrant proved the mailbox).
    VerifyEmail,
    /// Replaces the email with the token's `new_email` (verified).
    ChangeEmail,
    /// Sets the password, marks the email verified and ends every session.
    ResetPassword { password_hash: String },
    /// Marks the email verified and opens a session.
    MagicLogin(NewSession),
    /// Opens a session: the second step of a login. Verifies nothing.
    MfaLogin(NewSession),
    /// Only uses the token up (a magic link whose login continues with a second factor).
    Consume,
}

/// The user after a redemption, and the session it opened if any.
#[derive(Clone, Debug)]
pub struct Redeemed {
    pub user: User,
    pub session: Option<Session>,
}
