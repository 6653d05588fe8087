//! Row <-> domain conversions: timestamps as integer microseconds, enums as text.

use sqlx::Row;
use sqlx::sqlite::SqliteRow;
use tollgate_core::audit::{Actor, AuditEvent, Severity};
use tollgate_core::email::OutboxEmail;
use tollgate_core::identity::{
    EmailAddress, Locale, OneTimeToken, Role, Session, TokenDigest, TokenPurpose, User, UserStatus,
};
use tollgate_core::ids::{AccountId, AuditEventId, EmailId, OneTimeTokenId, SessionId, UserId};
use tollgate_core::{StoreError, Timestamp};
use uuid::Uuid;

pub(crate) fn micros(t: Timestamp) -> i64 {
    (t.unix_timestamp_nanos() / 1000) as i64
}

pub(crate) fn from_micros(us: i64) -> Result<Timestamp, StoreError> {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1000)
        .map_err(|e| StoreError::Internal(e.to_string()))
}

fn opt_ts(row: &SqliteRow, col: &str) -> Result<Option<Timestamp>, StoreError> {
    row.try_get::<Option<i64>, _>(col).map_err(crate::db_error)?.map(from_micros).transpose()
}

fn ts(row: &SqliteRow, col: &str) -> Result<Timestamp, StoreError> {
    from_micros(row.try_get(col).map_err(crate::db_error)?)
}

fn get<'r, T: sqlx::Decode<'r, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite>>(
    row: &'r SqliteRow,
    col: &str,
) -> Result<T, StoreError> {
    row.try_get(col).map_err(crate::db_error)
}

fn corrupt(what: &str, value: &str) -> StoreError {
    StoreError::Internal(format!("unexpected {what} in database: {value:?}"))
}

macro_rules! user_columns {
    () => {
        "id, email, email_verified_at, name, locale, password_hash, status, role, account_id, \
     totp_secret, totp_enabled_at, totp_last_step, created_at, updated_at, last_login_at"
    };
}
pub(crate) use user_columns;

pub(crate) fn user(row: &SqliteRow) -> Result<User, StoreError> {
    let status: String = get(row, "status")?;
    let role: String = get(row, "role")?;
    let locale: String = get(row, "locale")?;
    Ok(User {
        id: UserId(get::<Uuid>(row, "id")?),
        email: EmailAddress::from_trusted(get(row, "email")?),
        email_verified_at: opt_ts(row, "email_verified_at")?,
        name: get(row, "name")?,
        locale: Locale::parse(&locale).ok_or_else(|| corrupt("locale", &locale))?,
        password_hash: get(row, "password_hash")?,
        status: UserStatus::parse(&status).ok_or_else(|| corrupt("status", &status))?,
        role: Role::parse(&role).ok_or_else(|| corrupt("role", &role))?,
        account_id: AccountId(get::<Uuid>(row, "account_id")?),
        totp_secret: get(row, "totp_secret")?,
        totp_enabled_at: opt_ts(row, "totp_enabled_at")?,
        totp_last_step: get(row, "totp_last_step")?,
        created_at: ts(row, "created_at")?,
        updated_at: ts(row, "updated_at")?,
        last_login_at: opt_ts(row, "last_login_at")?,
    })
}

macro_rules! session_columns {
    () => {
        "id, user_id, ip, user_agent, created_at, last_seen_at, expires_at, revoked_at"
    };
}
pub(crate) use session_columns;

pub(crate) fn session(row: &SqliteRow) -> Result<Session, StoreError> {
    Ok(Session {
        id: SessionId(get::<Uuid>(row, "id")?),
        user_id: UserId(get::<Uuid>(row, "user_id")?),
        ip: get(row, "ip")?,
        user_agent: get(row, "user_agent")?,
        created_at: ts(row, "created_at")?,
        last_seen_at: ts(row, "last_seen_at")?,
        expires_at: ts(row, "expires_at")?,
        revoked_at: opt_ts(row, "revoked_at")?,
    })
}

macro_rules! token_columns {
    () => {
        "id, digest, purpose, user_id, new_email, created_at, expires_at, used_at"
    };
}
pub(crate) use token_columns;

pub(crate) fn one_time_token(row: &SqliteRow) -> Result<OneTimeToken, StoreError> {
    let purpose: String = get(row, "purpose")?;
    Ok(OneTimeToken {
        id: OneTimeTokenId(get::<Uuid>(row, "id")?),
        digest: TokenDigest(get(row, "digest")?),
        purpose: TokenPurpose::parse(&purpose).ok_or_else(|| corrupt("purpose", &purpose))?,
        user_id: UserId(get::<Uuid>(row, "user_id")?),
        new_email: get::<Option<String>>(row, "new_email")?.map(EmailAddress::from_trusted),
        created_at: ts(row, "created_at")?,
        expires_at: ts(row, "expires_at")?,
        used_at: opt_ts(row, "used_at")?,
    })
}

macro_rules! audit_columns {
    () => {
        "id, actor_type, actor_id, action, target_type, target_id, metadata, ip, user_agent, severity, created_at"
    };
}
pub(crate) use audit_columns;

pub(crate) fn audit_event(row: &SqliteRow) -> Result<AuditEvent, StoreError> {
    let actor_type: String = get(row, "actor_type")?;
    let actor_id: Option<String> = get(row, "actor_id")?;
    let severity: String = get(row, "severity")?;
    let metadata: String = get(row, "metadata")?;
    Ok(AuditEvent {
        id: AuditEventId(get::<Uuid>(row, "id")?),
        actor: Actor::from_parts(&actor_type, actor_id.as_deref()).ok_or_else(|| corrupt("actor", &actor_type))?,
        action: get(row, "action")?,
        target_type: get(row, "target_type")?,
        target_id: get(row, "target_id")?,
        metadata: serde_json::from_str(&metadata).map_err(|e| StoreError::Internal(e.to_string()))?,
        ip: get(row, "ip")?,
        user_agent: get(row, "user_agent")?,
        severity: Severity::parse(&severity).ok_or_else(|| corrupt("severity", &severity))?,
        created_at: ts(row, "created_at")?,
    })
}

macro_rules! outbox_columns {
    () => {
        "id, to_address, template, subject, text_body, html_body, attempts, created_at"
    };
}
pub(crate) use outbox_columns;

pub(crate) fn outbox_email(row: &SqliteRow) -> Result<OutboxEmail, StoreError> {
    Ok(OutboxEmail {
        id: EmailId(get::<Uuid>(row, "id")?),
        to: EmailAddress::from_trusted(get(row, "to_address")?),
        template: get(row, "template")?,
        subject: get(row, "subject")?,
        text_body: get(row, "text_body")?,
        html_body: get(row, "html_body")?,
        attempts: get(row, "attempts")?,
        created_at: ts(row, "created_at")?,
    })
}
