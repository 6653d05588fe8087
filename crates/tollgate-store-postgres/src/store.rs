//! `impl Store for PgStore`: each method one transaction (or one statement, which
//! PostgreSQL runs as its own transaction).
//!
//! Unlike SQLite, writers really run concurrently here (READ COMMITTED, many
//! connections), so every "use once" rule is a single conditional UPDATE, or a row
//! lock taken before the decision: under READ COMMITTED a blocked UPDATE or
//! `SELECT ... FOR UPDATE` re-checks its WHERE clause against the row as the winner
//! committed it, so the losers see the row already used.

use async_trait::async_trait;
use sqlx::QueryBuilder;
use sqlx::postgres::{PgConnection, Postgres};
use sqlx::types::Json;
use tollgate_core::accounts::{Account, NewExternalAccount, ServiceKey, Subscription};
use tollgate_core::admin::{UserChange, UserPage, UserQuery};
use tollgate_core::audit::{Actor, AuditEvent, AuditQuery, Severity};
use tollgate_core::billing::{BillingEffect, BillingOutcome, Payment, ProviderEvent};
use tollgate_core::credits::{
    CreditBalance, CreditReceipt, CreditTransaction, CreditTransfer, LedgerCheck, TransactionQuery,
};
use tollgate_core::email::{EmailStatus, NewEmail, OutboxEmail};
use tollgate_core::identity::{
    EmailAddress, Locale, NewSession, NewUser, OneTimeToken, Redeemed, RefreshOutcome, Session, SessionScope,
    TokenDigest, TokenEffect, TokenPurpose, User,
};
use tollgate_core::ids::{AccountId, EmailId, LeaseId, ReservationId, SessionId, UserId};
use tollgate_core::metering::{LeaseDecision, LeaseRequest, Reservation, UsageDecision, UsageRequest};
use tollgate_core::plans::Catalog;
use tollgate_core::store::{BillingStore, CatalogChanges, DailyUsage, EmailOutcome, NewOneTimeToken, Rotation};
use tollgate_core::{Store, StoreError, Timestamp};
use uuid::Uuid;

use crate::rows::{self, get};
use crate::{PgStore, admin, billing, db_error, reports, usage};

pub(crate) async fn insert_audit(conn: &mut PgConnection, e: &AuditEvent) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO audit_events (id, actor_type, actor_id, action, target_type, target_id, metadata, ip, user_agent, severity, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(e.id.0)
    .bind(e.actor.kind())
    .bind(e.actor.id())
    .bind(&e.action)
    .bind(&e.target_type)
    .bind(&e.target_id)
    .bind(Json(&e.metadata))
    .bind(&e.ip)
    .bind(&e.user_agent)
    .bind(e.severity.as_str())
    .bind(e.created_at)
    .execute(conn)
    .await
    .map_err(db_error)?;
    Ok(())
}

async fn insert_token(conn: &mut PgConnection, t: &OneTimeToken) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO one_time_tokens (id, digest, purpose, user_id, new_email, created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(t.id.0)
    .bind(&t.digest.0)
    .bind(t.purpose.as_str())
    .bind(t.user_id.0)
    .bind(t.new_email.as_ref().map(EmailAddress::as_str))
    .bind(t.created_at)
    .bind(t.expires_at)
    .execute(conn)
    .await
    .map_err(db_error)?;
    Ok(())
}

pub(crate) async fn insert_email(conn: &mut PgConnection, e: &NewEmail) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO email_outbox (id, to_address, template, subject, text_body, html_body, status, next_attempt_at, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, 'pending', $7, $7)",
    )
    .bind(e.id.0)
    .bind(e.to.as_str())
    .bind(e.template)
    .bind(&e.subject)
    .bind(&e.text_body)
    .bind(&e.html_body)
    .bind(e.created_at)
    .execute(conn)
    .await
    .map_err(db_error)?;
    Ok(())
}

async fn insert_one_time_token(conn: &mut PgConnection, t: &NewOneTimeToken) -> Result<(), StoreError> {
    insert_token(conn, &t.token).await?;
    if let Some(email) = &t.email {
        insert_email(conn, email).await?;
    }
    Ok(())
}

/// Inserts a user and their personal account.
async fn insert_user(conn: &mut PgConnection, u: &NewUser) -> Result<(), StoreError> {
    sqlx::query("INSERT INTO accounts (id, kind, created_at) VALUES ($1, 'personal', $2)")
        .bind(u.account_id.0)
        .bind(u.created_at)
        .execute(&mut *conn)
        .await
        .map_err(db_error)?;
    sqlx::query(
        "INSERT INTO users (id, email, email_verified_at, name, locale, password_hash, status, role, account_id, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, 'active', $7, $8, $9, $9)",
    )
    .bind(u.id.0)
    .bind(u.email.as_str())
    .bind(u.email_verified.then_some(u.created_at))
    .bind(&u.name)
    .bind(u.locale.as_str())
    .bind(&u.password_hash)
    .bind(u.role.as_str())
    .bind(u.account_id.0)
    .bind(u.created_at)
    .execute(conn)
    .await
    .map_err(db_error)?;
    Ok(())
}

pub(crate) async fn fetch_user(conn: &mut PgConnection, id: UserId) -> Result<Option<User>, StoreError> {
    let row = sqlx::query(concat!("SELECT ", rows::user_columns!(), " FROM users WHERE id = $1"))
        .bind(id.0)
        .fetch_optional(conn)
        .await
        .map_err(db_error)?;
    row.as_ref().map(rows::user).transpose()
}

async fn insert_session(conn: &mut PgConnection, s: &NewSession) -> Result<Session, StoreError> {
    let row = sqlx::query(concat!(
        "INSERT INTO sessions (id, user_id, ip, user_agent, created_at, last_seen_at, expires_at) VALUES ($1, $2, $3, $4, $5, $5, $6) \
         RETURNING ",
        rows::session_columns!()
    ))
    .bind(s.id.0)
    .bind(s.user_id.0)
    .bind(&s.ip)
    .bind(&s.user_agent)
    .bind(s.created_at)
    .bind(s.expires_at)
    .fetch_one(&mut *conn)
    .await
    .map_err(db_error)?;
    sqlx::query("INSERT INTO refresh_tokens (digest, session_id, created_at) VALUES ($1, $2, $3)")
        .bind(&s.refresh_digest.0)
        .bind(s.id.0)
        .bind(s.created_at)
        .execute(&mut *conn)
        .await
        .map_err(db_error)?;
    sqlx::query("UPDATE users SET last_login_at = $2 WHERE id = $1")
        .bind(s.user_id.0)
        .bind(s.created_at)
        .execute(&mut *conn)
        .await
        .map_err(db_error)?;
    rows::session(&row)
}

pub(crate) async fn fetch_session(conn: &mut PgConnection, id: SessionId) -> Result<Option<Session>, StoreError> {
    let row = sqlx::query(concat!("SELECT ", rows::session_columns!(), " FROM sessions WHERE id = $1"))
        .bind(id.0)
        .fetch_optional(conn)
        .await
        .map_err(db_error)?;
    row.as_ref().map(rows::session).transpose()
}

async fn mark_verified(conn: &mut PgConnection, user: UserId, now: Timestamp) -> Result<(), StoreError> {
    sqlx::query("UPDATE users SET email_verified_at = COALESCE(email_verified_at, $2), updated_at = $2 WHERE id = $1")
        .bind(user.0)
        .bind(now)
        .execute(conn)
        .await
        .map_err(db_error)?;
    Ok(())
}

/// Revokes live sessions of `user`, optionally sparing one; returns how many.
pub(crate) async fn revoke_all(
    conn: &mut PgConnection,
    user: UserId,
    except: Option<SessionId>,
    now: Timestamp,
) -> Result<u64, StoreError> {
    let done = sqlx::query(
        "UPDATE sessions SET revoked_at = $2 \
         WHERE user_id = $1 AND revoked_at IS NULL AND expires_at > $2 AND ($3::uuid IS NULL OR id <> $3)",
    )
    .bind(user.0)
    .bind(now)
    .bind(except.map(|s| s.0))
    .execute(conn)
    .await
    .map_err(db_error)?;
    Ok(done.rows_affected())
}

async fn replace_codes(
    conn: &mut PgConnection,
    user: UserId,
    codes: &[TokenDigest],
    now: Timestamp,
) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM recovery_codes WHERE user_id = $1")
        .bind(user.0)
        .execute(&mut *conn)
        .await
        .map_err(db_error)?;
    if codes.is_empty() {
        return Ok(());
    }
    let digests: Vec<&str> = codes.iter().map(|c| c.0.as_str()).collect();
    sqlx::query(
        "INSERT INTO recovery_codes (user_id, digest, created_at) SELECT $1, d, $3 FROM UNNEST($2::text[]) AS d",
    )
    .bind(user.0)
    .bind(digests)
    .bind(now)
    .execute(&mut *conn)
    .await
    .map_err(db_error)?;
    Ok(())
}

fn check_session_owner(session: &NewSession, token_user: UserId) -> Result<(), StoreError> {
    if session.user_id == token_user {
        Ok(())
    } else {
        Err(StoreError::Internal("session for another user than the token's".into()))
    }
}

/// Marks every unused reset, magic, email-change and MFA link of the user used.
pub(crate) async fn end_outstanding_links(
    conn: &mut PgConnection,
    user: UserId,
    now: Timestamp,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE one_time_tokens SET used_at = $2 WHERE user_id = $1 AND used_at IS NULL \
           AND purpose IN ('password_reset', 'magic_link', 'change_email', 'mfa_login')",
    )
    .bind(user.0)
    .bind(now)
    .execute(conn)
    .await
    .map_err(db_error)?;
    Ok(())
}

/// On the first proof of mailbox ownership, forgets what an unproven registrant set:
/// the password, 2FA, recovery codes and sessions (see `TokenEffect`). A no-op for a
/// verified address.
async fn drop_unproven_credentials(conn: &mut PgConnection, user: UserId, now: Timestamp) -> Result<(), StoreError> {
    let done = sqlx::query(
        "UPDATE users SET password_hash = NULL, totp_secret = NULL, totp_enabled_at = NULL, totp_last_step = NULL, \
           updated_at = $2 WHERE id = $1 AND email_verified_at IS NULL",
    )
    .bind(user.0)
    .bind(now)
    .execute(&mut *conn)
    .await
    .map_err(db_error)?;
    if done.rows_affected() == 1 {
        replace_codes(conn, user, &[], now).await?;
        revoke_all(conn, user, None, now).await?;
    }
    Ok(())
}

fn with_target(mut audit: AuditEvent, user: UserId) -> AuditEvent {
    if audit.target_id.is_none() {
        audit = audit.target_user(user);
    }
    audit
}

impl PgStore {
    async fn upsert_admin_once(
        &self,
        user: &NewUser,
        mut token: OneTimeToken,
        audit: &AuditEvent,
    ) -> Result<User, StoreError> {
        let now = audit.created_at;
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        // Locked so that a concurrent change to this user waits for the promotion.
        let existing: Option<Uuid> =
            sqlx::query_scalar("SELECT id FROM users WHERE email = $1 AND status <> 'deleted' FOR UPDATE")
                .bind(user.email.as_str())
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_error)?;
        let id = match existing {
            Some(id) => {
                sqlx::query("UPDATE users SET role = 'admin', updated_at = $2 WHERE id = $1")
                    .bind(id)
                    .bind(now)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_error)?;
                UserId(id)
            }
            None => {
                insert_user(&mut tx, user).await?;
                user.id
            }
        };
        token.user_id = id;
        insert_token(&mut tx, &token).await?;
        insert_audit(&mut tx, &with_target(audit.clone(), id)).await?;
        let admin = fetch_user(&mut tx, id).await?.ok_or(StoreError::NotFound)?;
        tx.commit().await.map_err(db_error)?;
        Ok(admin)
    }
}

#[async_trait]
impl BillingStore for PgStore {
    async fn transfer_credits(&self, transfer: CreditTransfer) -> Result<CreditReceipt, StoreError> {
        billing::transfer_credits(self, transfer).await
    }

    async fn credit_balance(&self, account: AccountId) -> Result<CreditBalance, StoreError> {
        billing::credit_balance(self, account).await
    }

    async fn credit_transactions(
        &self,
        account: AccountId,
        query: TransactionQuery,
    ) -> Result<Vec<CreditTransaction>, StoreError> {
        billing::credit_transactions(self, account, query).await
    }

    async fn ledger_check(&self) -> Result<LedgerCheck, StoreError> {
        billing::ledger_check(self).await
    }

    async fn provider_customer(&self, account: AccountId, provider: &str) -> Result<Option<String>, StoreError> {
        billing::provider_customer(self, account, provider).await
    }

    async fn link_provider_customer(
        &self,
        account: AccountId,
        provider: &str,
        customer: &str,
    ) -> Result<String, StoreError> {
        billing::link_provider_customer(self, account, provider, customer).await
    }

    async fn account_by_provider_customer(
        &self,
        provider: &str,
        customer: &str,
    ) -> Result<Option<AccountId>, StoreError> {
        billing::account_by_provider_customer(self, provider, customer).await
    }

    async fn apply_billing_event(
        &self,
        event: ProviderEvent,
        effect: BillingEffect,
        email: Option<NewEmail>,
    ) -> Result<BillingOutcome, StoreError> {
        billing::apply_billing_event(self, event, effect, email).await
    }

    async fn payments(&self, account: Option<AccountId>, limit: u32) -> Result<Vec<Payment>, StoreError> {
        billing::payments(self, account, limit).await
    }
}

#[async_trait]
impl Store for PgStore {
    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map_err(db_error)?;
        Ok(())
    }

    async fn create_user(
        &self,
        user: NewUser,
        token: Option<NewOneTimeToken>,
        audit: AuditEvent,
    ) -> Result<User, StoreError> {
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        insert_user(&mut tx, &user).await?;
        if let Some(token) = &token {
            insert_one_time_token(&mut tx, token).await?;
        }
        insert_audit(&mut tx, &audit).await?;
        let created = fetch_user(&mut tx, user.id).await?.ok_or(StoreError::NotFound)?;
        tx.commit().await.map_err(db_error)?;
        Ok(created)
    }

    async fn user_by_id(&self, id: UserId) -> Result<Option<User>, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(db_error)?;
        fetch_user(&mut conn, id).await
    }

    async fn user_by_account(&self, account: AccountId) -> Result<Option<User>, StoreError> {
        let row = sqlx::query(concat!("SELECT ", rows::user_columns!(), " FROM users WHERE account_id = $1"))
            .bind(account.0)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_error)?;
        row.as_ref().map(rows::user).transpose()
    }

    async fn user_by_email(&self, email: &EmailAddress) -> Result<Option<User>, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            rows::user_columns!(),
            " FROM users WHERE email = $1 AND status <> 'deleted'"
        ))
        .bind(email.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(db_error)?;
        row.as_ref().map(rows::user).transpose()
    }

    async fn update_profile(
        &self,
        id: UserId,
        name: Option<Option<String>>,
        locale: Option<Locale>,
        now: Timestamp,
    ) -> Result<User, StoreError> {
        let row = sqlx::query(concat!(
            "UPDATE users SET name = CASE WHEN $2 THEN $3 ELSE name END, locale = COALESCE($4, locale), updated_at = $5 \
             WHERE id = $1 RETURNING ",
            rows::user_columns!()
        ))
        .bind(id.0)
        .bind(name.is_some())
        .bind(name.flatten())
        .bind(locale.map(Locale::as_str))
        .bind(now)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_error)?;
        row.as_ref().map(rows::user).transpose()?.ok_or(StoreError::NotFound)
    }

    async fn change_password(
        &self,
        id: UserId,
        password_hash: String,
        keep: Option<SessionId>,
        audit: AuditEvent,
    ) -> Result<(), StoreError> {
        let now = audit.created_at;
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        let done = sqlx::query("UPDATE users SET password_hash = $2, updated_at = $3 WHERE id = $1")
            .bind(id.0)
            .bind(&password_hash)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        revoke_all(&mut tx, id, keep, now).await?;
        end_outstanding_links(&mut tx, id, now).await?;
        insert_audit(&mut tx, &with_target(audit, id)).await?;
        tx.commit().await.map_err(db_error)
    }

    async fn upsert_admin(&self, user: NewUser, token: OneTimeToken, audit: AuditEvent) -> Result<User, StoreError> {
        // Two concurrent upserts of a new address both find no user and both insert;
        // the loser hits `users_email` and rolls back. Its second attempt finds the
        // winner's user and promotes it, as if the two had run one after the other.
        match self.upsert_admin_once(&user, token.clone(), &audit).await {
            Err(StoreError::Conflict("users_email")) => self.upsert_admin_once(&user, token, &audit).await,
            result => result,
        }
    }

    async fn admin_users(&self, query: UserQuery) -> Result<UserPage, StoreError> {
        admin::users(self, query).await
    }

    async fn admin_update_user(&self, id: UserId, change: UserChange, audit: AuditEvent) -> Result<User, StoreError> {
        admin::update_user(self, id, change, audit).await
    }

    async fn start_impersonation(&self, session: NewSession, audit: AuditEvent) -> Result<Session, StoreError> {
        admin::start_impersonation(self, session, audit).await
    }

    async fn issue_token(&self, token: NewOneTimeToken) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        insert_one_time_token(&mut tx, &token).await?;
        tx.commit().await.map_err(db_error)
    }

    async fn peek_token(
        &self,
        digest: &TokenDigest,
        purpose: TokenPurpose,
        now: Timestamp,
    ) -> Result<Option<OneTimeToken>, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            rows::token_columns!(),
            " FROM one_time_tokens WHERE digest = $1 AND purpose = $2 AND used_at IS NULL AND expires_at > $3"
        ))
        .bind(&digest.0)
        .bind(purpose.as_str())
        .bind(now)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_error)?;
        row.as_ref().map(rows::one_time_token).transpose()
    }

    async fn redeem_token(
        &self,
        digest: &TokenDigest,
        purpose: TokenPurpose,
        now: Timestamp,
        effect: TokenEffect,
        audit: AuditEvent,
    ) -> Result<Redeemed, StoreError> {
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        // One conditional UPDATE: concurrent redemptions queue on the token's row lock
        // and, once the winner commits, find `used_at` set and match nothing.
        let row = sqlx::query(
            "UPDATE one_time_tokens t SET used_at = $3 FROM users u \
             WHERE t.digest = $1 AND t.purpose = $2 AND t.used_at IS NULL AND t.expires_at > $3 \
               AND u.id = t.user_id AND u.status = 'active' \
             RETURNING t.user_id, t.new_email",
        )
        .bind(&digest.0)
        .bind(purpose.as_str())
        .bind(now)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_error)?
        .ok_or(StoreError::NotFound)?;
        let user_id = UserId(get::<Uuid>(&row, "user_id")?);
        let new_email: Option<String> = get(&row, "new_email")?;
        let mut session = None;
        match effect {
            TokenEffect::VerifyEmail => mark_verified(&mut tx, user_id, now).await?,
            TokenEffect::ChangeEmail => {
                let email =
                    new_email.ok_or_else(|| StoreError::Internal("change_email token without new_email".into()))?;
                sqlx::query("UPDATE users SET email = $2, email_verified_at = $3, updated_at = $3 WHERE id = $1")
                    .bind(user_id.0)
                    .bind(email)
                    .bind(now)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_error)?;
                end_outstanding_links(&mut tx, user_id, now).await?;
            }
            TokenEffect::ResetPassword { password_hash } => {
                drop_unproven_credentials(&mut tx, user_id, now).await?;
                sqlx::query("UPDATE users SET password_hash = $2, updated_at = $3 WHERE id = $1")
                    .bind(user_id.0)
                    .bind(password_hash)
                    .bind(now)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_error)?;
                mark_verified(&mut tx, user_id, now).await?;
                revoke_all(&mut tx, user_id, None, now).await?;
                end_outstanding_links(&mut tx, user_id, now).await?;
            }
            TokenEffect::MagicLogin(new_session) => {
                check_session_owner(&new_session, user_id)?;
                drop_unproven_credentials(&mut tx, user_id, now).await?;
                mark_verified(&mut tx, user_id, now).await?;
                session = Some(insert_session(&mut tx, &new_session).await?);
            }
            TokenEffect::MfaLogin(new_session) => {
                check_session_owner(&new_session, user_id)?;
                session = Some(insert_session(&mut tx, &new_session).await?);
            }
            TokenEffect::Consume => {}
        }
        insert_audit(&mut tx, &with_target(audit, user_id)).await?;
        let user = fetch_user(&mut tx, user_id).await?.ok_or(StoreError::NotFound)?;
        tx.commit().await.map_err(db_error)?;
        Ok(Redeemed { user, session })
    }

    async fn create_session(&self, session: NewSession, audit: AuditEvent) -> Result<Session, StoreError> {
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        let created = insert_session(&mut tx, &session).await?;
        insert_audit(&mut tx, &with_target(audit, session.user_id)).await?;
        tx.commit().await.map_err(db_error)?;
        Ok(created)
    }

    async fn rotate_refresh_token(&self, rotation: Rotation) -> Result<RefreshOutcome, StoreError> {
        let now = rotation.now;
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        // Locks the token and its session: concurrent rotations of one token queue
        // here, and each one after the first sees the token rotated (a replay).
        // Locking the session too means a concurrent revocation either happens before
        // (we see it) or waits for the rotation to commit.
        let row = sqlx::query(
            "SELECT rt.session_id, s.user_id, rt.rotated_at IS NOT NULL AS rotated, \
                    s.revoked_at IS NOT NULL AS revoked, s.expires_at <= $2 AS expired \
             FROM refresh_tokens rt JOIN sessions s ON s.id = rt.session_id \
             WHERE rt.digest = $1 \
             FOR UPDATE",
        )
        .bind(&rotation.presented.0)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_error)?;
        let Some(row) = row else {
            tx.rollback().await.map_err(db_error)?;
            return Ok(RefreshOutcome::Invalid);
        };
        let session_id = SessionId(get::<Uuid>(&row, "session_id")?);
        let user_id = UserId(get::<Uuid>(&row, "user_id")?);
        let rotated: bool = get(&row, "rotated")?;
        let revoked: bool = get(&row, "revoked")?;
        let expired: bool = get(&row, "expired")?;
        if revoked || expired {
            tx.rollback().await.map_err(db_error)?;
            return Ok(RefreshOutcome::Invalid);
        }
        if rotated {
            sqlx::query("UPDATE sessions SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL")
                .bind(session_id.0)
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
            let audit = AuditEvent::new(Actor::System, "session.refresh_token_reused", &Default::default(), now)
                .target_user(user_id)
                .severity(Severity::Critical)
                .meta("session_id", session_id.to_string());
            insert_audit(&mut tx, &audit).await?;
            tx.commit().await.map_err(db_error)?;
            return Ok(RefreshOutcome::Reused { session_id });
        }
        sqlx::query("UPDATE refresh_tokens SET rotated_at = $2 WHERE digest = $1")
            .bind(&rotation.presented.0)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        sqlx::query("INSERT INTO refresh_tokens (digest, session_id, created_at) VALUES ($1, $2, $3)")
            .bind(&rotation.replacement.0)
            .bind(session_id.0)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        let session = sqlx::query(concat!(
            "UPDATE sessions SET last_seen_at = $2 WHERE id = $1 RETURNING ",
            rows::session_columns!()
        ))
        .bind(session_id.0)
        .bind(now)
        .fetch_one(&mut *tx)
        .await
        .map_err(db_error)?;
        let session = rows::session(&session)?;
        let user = fetch_user(&mut tx, user_id).await?.ok_or(StoreError::NotFound)?;
        tx.commit().await.map_err(db_error)?;
        Ok(RefreshOutcome::Rotated { session, user })
    }

    async fn session_with_user(&self, id: SessionId) -> Result<Option<(Session, User)>, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(db_error)?;
        let Some(session) = fetch_session(&mut conn, id).await? else {
            return Ok(None);
        };
        let user = fetch_user(&mut conn, session.user_id).await?.ok_or(StoreError::NotFound)?;
        Ok(Some((session, user)))
    }

    async fn touch_session(&self, id: SessionId, now: Timestamp, stale_before: Timestamp) -> Result<(), StoreError> {
        sqlx::query("UPDATE sessions SET last_seen_at = $2 WHERE id = $1 AND last_seen_at < $3")
            .bind(id.0)
            .bind(now)
            .bind(stale_before)
            .execute(&self.pool)
            .await
            .map_err(db_error)?;
        Ok(())
    }

    async fn list_sessions(&self, user: UserId, now: Timestamp) -> Result<Vec<Session>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            rows::session_columns!(),
            " FROM sessions WHERE user_id = $1 AND revoked_at IS NULL AND expires_at > $2 ORDER BY created_at DESC, id DESC"
        ))
        .bind(user.0)
        .bind(now)
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        rows.iter().map(rows::session).collect()
    }

    async fn revoke_sessions(&self, user: UserId, scope: SessionScope, audit: AuditEvent) -> Result<u64, StoreError> {
        let now = audit.created_at;
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        let count = match scope {
            SessionScope::One(id) => {
                let done = sqlx::query(
                    "UPDATE sessions SET revoked_at = $3 WHERE id = $1 AND user_id = $2 AND revoked_at IS NULL AND expires_at > $3",
                )
                .bind(id.0)
                .bind(user.0)
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
                if done.rows_affected() == 0 {
                    return Err(StoreError::NotFound);
                }
                done.rows_affected()
            }
            SessionScope::AllExcept(keep) => revoke_all(&mut tx, user, Some(keep), now).await?,
            SessionScope::All => revoke_all(&mut tx, user, None, now).await?,
        };
        insert_audit(&mut tx, &with_target(audit, user).meta("count", count)).await?;
        tx.commit().await.map_err(db_error)?;
        Ok(count)
    }

    async fn set_totp_secret(&self, user: UserId, secret: String, now: Timestamp) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        let done =
            sqlx::query("UPDATE users SET totp_secret = $2, updated_at = $3 WHERE id = $1 AND totp_enabled_at IS NULL")
                .bind(user.0)
                .bind(secret)
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
        if done.rows_affected() == 0 {
            return match fetch_user(&mut tx, user).await? {
                Some(_) => Err(StoreError::Conflict("totp_enabled")),
                None => Err(StoreError::NotFound),
            };
        }
        tx.commit().await.map_err(db_error)
    }

    async fn enable_totp(
        &self,
        user: UserId,
        step: i64,
        recovery_codes: Vec<TokenDigest>,
        audit: AuditEvent,
    ) -> Result<(), StoreError> {
        let now = audit.created_at;
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        let done = sqlx::query(
            "UPDATE users SET totp_enabled_at = $2, totp_last_step = $3, updated_at = $2 \
             WHERE id = $1 AND totp_enabled_at IS NULL AND totp_secret IS NOT NULL",
        )
        .bind(user.0)
        .bind(now)
        .bind(step)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        if done.rows_affected() == 0 {
            return match fetch_user(&mut tx, user).await? {
                Some(u) if u.totp_enabled() => Err(StoreError::Conflict("totp_enabled")),
                _ => Err(StoreError::NotFound),
            };
        }
        replace_codes(&mut tx, user, &recovery_codes, now).await?;
        insert_audit(&mut tx, &with_target(audit, user)).await?;
        tx.commit().await.map_err(db_error)
    }

    async fn use_totp_step(&self, user: UserId, step: i64) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE users SET totp_last_step = $2 \
             WHERE id = $1 AND totp_enabled_at IS NOT NULL AND (totp_last_step IS NULL OR totp_last_step < $2)",
        )
        .bind(user.0)
        .bind(step)
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(done.rows_affected() == 1)
    }

    async fn use_recovery_code(&self, user: UserId, code: &TokenDigest, now: Timestamp) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE recovery_codes SET used_at = $3 WHERE user_id = $1 AND digest = $2 AND used_at IS NULL",
        )
        .bind(user.0)
        .bind(&code.0)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(done.rows_affected() == 1)
    }

    async fn replace_recovery_codes(
        &self,
        user: UserId,
        codes: Vec<TokenDigest>,
        audit: AuditEvent,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        replace_codes(&mut tx, user, &codes, audit.created_at).await?;
        insert_audit(&mut tx, &with_target(audit, user)).await?;
        tx.commit().await.map_err(db_error)
    }

    async fn unused_recovery_codes(&self, user: UserId) -> Result<u32, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM recovery_codes WHERE user_id = $1 AND used_at IS NULL")
            .bind(user.0)
            .fetch_one(&self.pool)
            .await
            .map_err(db_error)?;
        Ok(n as u32)
    }

    async fn disable_totp(&self, user: UserId, audit: AuditEvent) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        sqlx::query("UPDATE users SET totp_secret = NULL, totp_enabled_at = NULL, totp_last_step = NULL, updated_at = $2 WHERE id = $1")
            .bind(user.0)
            .bind(audit.created_at)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        replace_codes(&mut tx, user, &[], audit.created_at).await?;
        insert_audit(&mut tx, &with_target(audit, user)).await?;
        tx.commit().await.map_err(db_error)
    }

    async fn record_audit(&self, event: AuditEvent) -> Result<(), StoreError> {
        let mut conn = self.pool.acquire().await.map_err(db_error)?;
        insert_audit(&mut conn, &event).await
    }

    async fn list_audit(&self, query: AuditQuery) -> Result<Vec<AuditEvent>, StoreError> {
        let mut sql: QueryBuilder<Postgres> =
            QueryBuilder::new(concat!("SELECT ", rows::audit_columns!(), " FROM audit_events WHERE TRUE"));
        if let Some(user) = query.target_user {
            sql.push(" AND target_type = 'user' AND target_id = ").push_bind(user.to_string());
        }
        if let Some(prefix) = query.action_prefix {
            // starts_with, not LIKE: no wildcard escaping to get wrong.
            sql.push(" AND starts_with(action, ").push_bind(prefix).push(")");
        }
        if let Some(action) = query.action {
            sql.push(" AND action = ").push_bind(action);
        }
        if let Some(actor) = query.actor {
            sql.push(" AND actor_type = ").push_bind(actor.kind());
            match actor.id() {
                Some(id) => sql.push(" AND actor_id = ").push_bind(id),
                None => sql.push(" AND actor_id IS NULL"),
            };
        }
        if let Some((kind, id)) = query.target {
            sql.push(" AND target_type = ").push_bind(kind).push(" AND target_id = ").push_bind(id);
        }
        if let Some(severity) = query.severity {
            sql.push(" AND severity = ").push_bind(severity.as_str());
        }
        if let Some(from) = query.from {
            sql.push(" AND created_at >= ").push_bind(from);
        }
        if let Some(to) = query.to {
            sql.push(" AND created_at < ").push_bind(to);
        }
        if let Some((at, id)) = query.before {
            sql.push(" AND (created_at, id) < (").push_bind(at).push(", ").push_bind(id.0).push(")");
        }
        sql.push(" ORDER BY created_at DESC, id DESC LIMIT ").push_bind(i64::from(query.limit.clamp(1, 1000)));
        let rows = sql.build().fetch_all(&self.pool).await.map_err(db_error)?;
        rows.iter().map(rows::audit_event).collect()
    }

    async fn claim_emails(
        &self,
        now: Timestamp,
        lease_until: Timestamp,
        limit: u32,
    ) -> Result<Vec<OutboxEmail>, StoreError> {
        // SKIP LOCKED: concurrent senders each take different rows instead of queueing
        // behind one another; a row locked by another sender is skipped, and one whose
        // claim committed meanwhile is re-checked (and no longer due) when locked.
        let rows = sqlx::query(concat!(
            "UPDATE email_outbox SET claimed_until = $2 WHERE id IN ( \
               SELECT id FROM email_outbox WHERE status = 'pending' AND next_attempt_at <= $1 \
                 AND (claimed_until IS NULL OR claimed_until <= $1) ORDER BY next_attempt_at, id LIMIT $3 \
                 FOR UPDATE SKIP LOCKED) \
             RETURNING ",
            rows::outbox_columns!()
        ))
        .bind(now)
        .bind(lease_until)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        let mut emails = rows.iter().map(rows::outbox_email).collect::<Result<Vec<_>, _>>()?;
        emails.sort_by_key(|e| (e.created_at, e.id));
        Ok(emails)
    }

    async fn finish_email(&self, id: EmailId, outcome: EmailOutcome, now: Timestamp) -> Result<(), StoreError> {
        let (status, next_attempt, error) = match outcome {
            EmailOutcome::Sent => (EmailStatus::Sent, None, None),
            EmailOutcome::Logged => (EmailStatus::Logged, None, None),
            EmailOutcome::Retry { at, error } => (EmailStatus::Pending, Some(at), Some(error)),
            EmailOutcome::Failed { error } => (EmailStatus::Failed, None, Some(error)),
        };
        let delivered = matches!(status, EmailStatus::Sent | EmailStatus::Logged);
        // Once an email is no longer pending its body (which holds a live link) is blanked:
        // the database keeps token digests only, not usable links.
        sqlx::query(
            "UPDATE email_outbox SET status = $2, attempts = attempts + 1, claimed_until = NULL, \
               next_attempt_at = COALESCE($3, next_attempt_at), last_error = COALESCE($4, last_error), \
               sent_at = CASE WHEN $5 THEN $6 ELSE sent_at END, \
               text_body = CASE WHEN $2 = 'pending' THEN text_body ELSE '' END, \
               html_body = CASE WHEN $2 = 'pending' THEN html_body ELSE '' END \
             WHERE id = $1",
        )
        .bind(id.0)
        .bind(status.as_str())
        .bind(next_attempt)
        .bind(error)
        .bind(delivered)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(())
    }

    async fn pending_email_count(&self) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM email_outbox WHERE status = 'pending'")
            .fetch_one(&self.pool)
            .await
            .map_err(db_error)?;
        Ok(n as u64)
    }

    async fn backlogs(&self, now: Timestamp) -> Result<tollgate_core::system::Backlogs, StoreError> {
        crate::system::backlogs(self, now).await
    }

    async fn cleanup(
        &self,
        retention: tollgate_core::system::Retention,
        audit: AuditEvent,
    ) -> Result<tollgate_core::system::CleanupReport, StoreError> {
        crate::system::cleanup(self, retention, audit).await
    }

    async fn apply_catalog(&self, catalog: &Catalog, now: Timestamp) -> Result<CatalogChanges, StoreError> {
        usage::apply_catalog(self, catalog, now).await
    }

    async fn stored_catalog(&self) -> Result<Option<Catalog>, StoreError> {
        usage::stored_catalog(self).await
    }

    async fn upsert_external_account(&self, account: NewExternalAccount) -> Result<(Account, bool), StoreError> {
        usage::upsert_external_account(self, account).await
    }

    async fn account_by_id(&self, id: AccountId) -> Result<Option<Account>, StoreError> {
        usage::account_by_id(self, id).await
    }

    async fn account_by_external_id(&self, external_id: &str) -> Result<Option<Account>, StoreError> {
        usage::account_by_external_id(self, external_id).await
    }

    async fn subscription(&self, account: AccountId) -> Result<Option<Subscription>, StoreError> {
        usage::subscription(self, account).await
    }

    async fn put_subscription(
        &self,
        subscription: Subscription,
        previous: Option<Timestamp>,
        audit: AuditEvent,
    ) -> Result<(), StoreError> {
        usage::put_subscription(self, subscription, previous, audit).await
    }

    async fn create_service_key(
        &self,
        key: ServiceKey,
        digest: TokenDigest,
        audit: AuditEvent,
    ) -> Result<(), StoreError> {
        usage::create_service_key(self, key, digest, audit).await
    }

    async fn service_key_by_digest(&self, digest: &TokenDigest) -> Result<Option<ServiceKey>, StoreError> {
        usage::service_key_by_digest(self, digest).await
    }

    async fn create_api_key(
        &self,
        key: tollgate_core::api_keys::ApiKey,
        digest: TokenDigest,
        audit: AuditEvent,
    ) -> Result<(), StoreError> {
        crate::api_keys::create(self, key, digest, audit).await
    }

    async fn api_key_by_digest(
        &self,
        digest: &TokenDigest,
    ) -> Result<Option<tollgate_core::api_keys::ApiKey>, StoreError> {
        crate::api_keys::by_digest(self, digest).await
    }

    async fn api_keys(&self, account: AccountId) -> Result<Vec<tollgate_core::api_keys::ApiKey>, StoreError> {
        crate::api_keys::list(self, account).await
    }

    async fn revoke_api_key(
        &self,
        account: AccountId,
        id: tollgate_core::ids::ApiKeyId,
        audit: AuditEvent,
    ) -> Result<tollgate_core::api_keys::ApiKey, StoreError> {
        crate::api_keys::revoke(self, account, id, audit).await
    }

    async fn touch_api_key(&self, id: tollgate_core::ids::ApiKeyId, at: Timestamp) -> Result<(), StoreError> {
        crate::api_keys::touch(self, id, at).await
    }

    async fn consume_usage(&self, request: UsageRequest) -> Result<UsageDecision, StoreError> {
        usage::consume_usage(self, request).await
    }

    async fn idempotent_answer(&self, scope: &str, key: &str) -> Result<Option<(String, UsageDecision)>, StoreError> {
        // A claimed key whose request has not finished has no response yet.
        let row: Option<(String, Option<String>)> =
            sqlx::query_as("SELECT request_hash, response::text FROM idempotency_keys WHERE scope = $1 AND key = $2")
                .bind(scope)
                .bind(key)
                .fetch_optional(&self.pool)
                .await
                .map_err(db_error)?;
        match row {
            // A claim's placeholder (never committed, but cheap to rule out).
            Some((hash, Some(response))) if response != "null" => {
                let decision =
                    serde_json::from_str(&response).map_err(|e| StoreError::Internal(format!("stored answer: {e}")))?;
                Ok(Some((hash, decision)))
            }
            _ => Ok(None),
        }
    }

    async fn reservation(&self, account: AccountId, id: ReservationId) -> Result<Option<Reservation>, StoreError> {
        usage::reservation(self, account, id).await
    }

    async fn expired_reservations(&self, now: Timestamp, limit: u32) -> Result<Vec<Reservation>, StoreError> {
        usage::expired_reservations(self, now, limit).await
    }

    async fn acquire_lease(&self, request: LeaseRequest) -> Result<LeaseDecision, StoreError> {
        usage::acquire_lease(self, request).await
    }

    async fn release_lease(
        &self,
        account: AccountId,
        lease: LeaseId,
        now: Timestamp,
        idempotency: Option<tollgate_core::metering::Idempotency>,
    ) -> Result<bool, StoreError> {
        usage::release_lease(self, account, lease, now, idempotency).await
    }

    async fn usage_daily(
        &self,
        account: AccountId,
        meter: Option<&str>,
        from: &str,
        to: &str,
    ) -> Result<Vec<DailyUsage>, StoreError> {
        usage::usage_daily(self, account, meter, from, to).await
    }

    async fn put_plan(
        &self,
        plan: &tollgate_core::plans::Plan,
        previous: Option<&tollgate_core::plans::Plan>,
        audit: AuditEvent,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        crate::plans::put(self, plan, previous, audit, now).await
    }

    async fn remove_plan(
        &self,
        key: &str,
        audit: AuditEvent,
        now: Timestamp,
    ) -> Result<tollgate_core::store::PlanRemoval, StoreError> {
        crate::plans::remove(self, key, audit, now).await
    }

    async fn setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        crate::plans::setting(self, key).await
    }

    async fn put_setting(&self, key: &str, value: &str, now: Timestamp) -> Result<(), StoreError> {
        crate::plans::put_setting(self, key, value, now).await
    }

    async fn set_limit_overrides(
        &self,
        account: AccountId,
        overrides: Option<tollgate_core::metering::overrides::LimitOverrides>,
        audit: AuditEvent,
    ) -> Result<(), StoreError> {
        crate::limit_overrides::set(self, account, overrides, audit).await
    }

    async fn limit_overrides(
        &self,
        account: AccountId,
    ) -> Result<Option<tollgate_core::metering::overrides::LimitOverrides>, StoreError> {
        crate::limit_overrides::of_account(self, account).await
    }

    async fn limit_overrides_in_force(
        &self,
        now: Timestamp,
    ) -> Result<Vec<tollgate_core::metering::overrides::LimitOverrides>, StoreError> {
        crate::limit_overrides::in_force(self, now).await
    }

    async fn reset_counters(&self, reset: tollgate_core::metering::CounterReset) -> Result<u64, StoreError> {
        usage::reset_counters(self, reset).await
    }

    async fn counter_values(
        &self,
        account: AccountId,
        meter: &str,
        keys: &[Vec<String>],
    ) -> Result<Vec<i64>, StoreError> {
        usage::counter_values(self, account, meter, keys).await
    }

    // ---- admin reports (read only) -------------------------------------------------

    async fn admin_stats(
        &self,
        query: tollgate_core::reports::StatsQuery,
    ) -> Result<tollgate_core::reports::AdminStats, StoreError> {
        reports::stats(self, query).await
    }

    async fn admin_usage_daily(
        &self,
        meter: Option<&str>,
        from: &str,
        to: &str,
    ) -> Result<Vec<DailyUsage>, StoreError> {
        reports::usage_daily(self, meter, from, to).await
    }

    async fn admin_usage_events(
        &self,
        query: tollgate_core::reports::UsageLogQuery,
    ) -> Result<Vec<tollgate_core::reports::UsageLogEntry>, StoreError> {
        reports::usage_events(self, query).await
    }

    async fn admin_payments(&self, query: tollgate_core::reports::PaymentQuery) -> Result<Vec<Payment>, StoreError> {
        reports::payments(self, query).await
    }
}
