//! Response bodies shared by several routes. Secrets (hashes, TOTP secrets) never
//! reach a view.

use serde::Serialize;
use time::OffsetDateTime;
use tollgate_core::identity::{Locale, Role, Session, User, UserStatus};
use utoipa::ToSchema;
use uuid::Uuid;

/// A user as the user sees themselves.
#[derive(Serialize, ToSchema)]
pub struct UserView {
    pub id: Uuid,
    pub email: String,
    pub email_verified: bool,
    pub name: Option<String>,
    #[schema(value_type = String, example = "en")]
    pub locale: Locale,
    #[schema(value_type = String, example = "active")]
    pub status: UserStatus,
    #[schema(value_type = String, example = "user")]
    pub role: Role,
    /// The user's personal account (plans, quotas and credits belong to it).
    pub account_id: Uuid,
    pub mfa_enabled: bool,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_login_at: Option<OffsetDateTime>,
}

impl From<&User> for UserView {
    fn from(u: &User) -> Self {
        Self {
            id: u.id.0,
            email: u.email.to_string(),
            email_verified: u.email_verified_at.is_some(),
            name: u.name.clone(),
            locale: u.locale,
            status: u.status,
            role: u.role,
            account_id: u.account_id.0,
            mfa_enabled: u.totp_enabled(),
            created_at: u.created_at,
            last_login_at: u.last_login_at,
        }
    }
}

/// A signed-in device.
#[derive(Serialize, ToSchema)]
pub struct SessionView {
    pub id: Uuid,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub last_seen_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    /// True for the session of the token making this request.
    pub current: bool,
}

impl SessionView {
    pub fn new(s: &Session, current: bool) -> Self {
        Self {
            id: s.id.0,
            ip: s.ip.clone(),
            user_agent: s.user_agent.clone(),
            created_at: s.created_at,
            last_seen_at: s.last_seen_at,
            expires_at: s.expires_at,
            current,
        }
    }
}

/// The shape of every error.
#[derive(Serialize, ToSchema)]
pub struct ErrorResponse {
    pub error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable snake_case code, e.g. `invalid_credentials`.
    pub code: String,
    pub message: String,
    /// Per-field errors (`fields`) or other machine-readable context.
    pub details: Option<serde_json::Value>,
}

/// An accepted request whose effect is not visible (e.g. an email may be sent).
#[derive(Serialize, ToSchema)]
pub struct Accepted {
    pub status: &'static str,
}

impl Default for Accepted {
    fn default() -> Self {
        Self::new()
    }
}

impl Accepted {
    pub fn new() -> Self {
        Self { status: "accepted" }
    }
}
