//! The storage boundary. Each method is one use case and runs as one transaction in
//! the backend (SQLite or PostgreSQL), so the rest of Tollgate never sees a
//! transaction and never half-writes. Both backends pass the same conformance suite
//! (`conformance`, expanded into named tests by each store crate).

use async_trait::async_trait;

use crate::Timestamp;
use crate::accounts::{Account, NewExternalAccount, ServiceKey, Subscription};
use crate::admin::{UserChange, UserPage, UserQuery};
use crate::api_keys::ApiKey;
use crate::audit::{AuditEvent, AuditQuery};
use crate::billing::{BillingEffect, BillingOutcome, Payment, ProviderEvent};
use crate::credits::{CreditBalance, CreditReceipt, CreditTransaction, CreditTransfer, LedgerCheck, TransactionQuery};
use crate::email::{NewEmail, OutboxEmail};
use crate::identity::{
    EmailAddress, Locale, NewSession, NewUser, OneTimeToken, Redeemed, RefreshOutcome, Session, SessionScope,
    TokenDigest, TokenEffect, TokenPurpose, User,
};
use crate::ids::{AccountId, ApiKeyId, EmailId, LeaseId, ReservationId, SessionId, UserId};
use crate::metering::overrides::LimitOverrides;
use crate::metering::{CounterReset, LeaseDecision, LeaseRequest, Reservation, UsageDecision, UsageRequest};
use crate::plans::{Catalog, Plan};
use crate::reports::{AdminStats, PaymentQuery, StatsQuery, UsageLogEntry, UsageLogQuery};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    /// A uniqueness rule was violated; the name says which (e.g. `users_email`).
    #[error("conflict on {0}")]
    Conflict(&'static str),
    /// The database could not be reached or timed out.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// Anything else: a bug or corrupt data. Logged, never shown to clients.
    #[error("database error: {0}")]
    Internal(String),
}

/// A one-time token to create, with the email that carries it (if any).
#[derive(Clone, Debug)]
pub struct NewOneTimeToken {
    pub token: OneTimeToken,
    pub email: Option<NewEmail>,
}

/// A refresh-token rotation request.
#[derive(Clone, Debug)]
pub struct Rotation {
    pub presented: TokenDigest,
    pub replacement: TokenDigest,
    pub now: Timestamp,
}

#[async_trait]
pub trait Store: BillingStore + Send + Sync + 'static {
    /// Cheap round trip, for `/readyz`.
    async fn ping(&self) -> Result<(), StoreError>;

    // ---- users -------------------------------------------------------------------

    /// Creates a user, their personal account, and optionally a one-time token with
    /// its email, plus an audit event. `Conflict("users_email")` when the email is in
    /// use by a user that is not deleted.
    async fn create_user(
        &self,
        user: NewUser,
        token: Option<NewOneTimeToken>,
        audit: AuditEvent,
    ) -> Result<User, StoreError>;

    async fn user_by_id(&self, id: UserId) -> Result<Option<User>, StoreError>;

    /// The user whose personal account this is, if any.
    async fn user_by_account(&self, account: AccountId) -> Result<Option<User>, StoreError>;

    /// Finds a user who is not deleted by (normalised) email.
    async fn user_by_email(&self, email: &EmailAddress) -> Result<Option<User>, StoreError>;

    /// Sets name and locale; `None` leaves a field as it is.
    async fn update_profile(
        &self,
        id: UserId,
        name: Option<Option<String>>,
        locale: Option<Locale>,
        now: Timestamp,
    ) -> Result<User, StoreError>;

    /// Sets the password hash and ends every session of the user except `keep`.
    async fn change_password(
        &self,
        id: UserId,
        password_hash: String,
        keep: Option<SessionId>,
        audit: AuditEvent,
    ) -> Result<(), StoreError>;

    /// Gives an existing user the admin role, or creates an admin without a password;
    /// then issues `token` (a password-reset link) for them.
    async fn upsert_admin(&self, user: NewUser, token: OneTimeToken, audit: AuditEvent) -> Result<User, StoreError>;

    // ---- admin -------------------------------------------------------------------

    /// A page of users matching `query` in its order, and how many match in all.
    async fn admin_users(&self, query: UserQuery) -> Result<UserPage, StoreError>;

    /// Applies an admin's change to a user who is not deleted, with its audit event,
    /// in one transaction. A change to `Suspended` or `Deleted` also revokes every live
    /// session and ends every outstanding link. `NotFound` for an unknown or deleted
    /// user, `Conflict("users_email")` when the new email is taken.
    async fn admin_update_user(&self, id: UserId, change: UserChange, audit: AuditEvent) -> Result<User, StoreError>;

    /// Opens a session in which an admin acts as an active user (an impersonation):
    /// no refresh token (it cannot outlive `expires_at`), the user's `last_login_at`
    /// untouched, and the audit event, in one transaction. `NotFound` unless the user
    /// is active.
    async fn start_impersonation(&self, session: NewSession, audit: AuditEvent) -> Result<Session, StoreError>;

    // ---- one-time tokens ---------------------------------------------------------

    /// Stores a token (and its email in the outbox) in one transaction.
    async fn issue_token(&self, token: NewOneTimeToken) -> Result<(), StoreError>;

    /// A live (unused, unexpired) token of `purpose`, without using it.
    async fn peek_token(
        &self,
        digest: &TokenDigest,
        purpose: TokenPurpose,
        now: Timestamp,
    ) -> Result<Option<OneTimeToken>, StoreError>;

    /// Marks a live token of `purpose` used and applies `effect`, all or nothing.
    /// `NotFound` when the token is unknown, used, expired, or its user is not active;
    /// `Conflict("users_email")` when a changed email is now taken.
    async fn redeem_token(
        &self,
        digest: &TokenDigest,
        purpose: TokenPurpose,
        now: Timestamp,
        effect: TokenEffect,
        audit: AuditEvent,
    ) -> Result<Redeemed, StoreError>;

    // ---- sessions ----------------------------------------------------------------

    /// Opens a session after a successful login and records the login.
    async fn create_session(&self, session: NewSession, audit: AuditEvent) -> Result<Session, StoreError>;

    /// Rotates a refresh token; a replayed (already rotated) token revokes its session.
    async fn rotate_refresh_token(&self, rotation: Rotation) -> Result<RefreshOutcome, StoreError>;

    /// The session and its user, whatever their state (callers check liveness).
    async fn session_with_user(&self, id: SessionId) -> Result<Option<(Session, User)>, StoreError>;

    /// Records activity; writes only when the stored time is older than `stale_before`,
    /// so a busy session does not write on every request.
    async fn touch_session(&self, id: SessionId, now: Timestamp, stale_before: Timestamp) -> Result<(), StoreError>;

    /// Live sessions of a user, newest first.
    async fn list_sessions(&self, user: UserId, now: Timestamp) -> Result<Vec<Session>, StoreError>;

    /// Revokes the user's live sessions in `scope`; returns how many. `NotFound` when
    /// `SessionScope::One` names no live session of this user.
    async fn revoke_sessions(&self, user: UserId, scope: SessionScope, audit: AuditEvent) -> Result<u64, StoreError>;

    // ---- second factor -----------------------------------------------------------

    /// Stores a new TOTP secret for a user whose 2FA is not enabled yet.
    /// `Conflict("totp_enabled")` when it is.
    async fn set_totp_secret(&self, user: UserId, secret: String, now: Timestamp) -> Result<(), StoreError>;

    /// Turns 2FA on with the step of the code that proved the secret and replaces the
    /// recovery codes. `Conflict("totp_enabled")` when already on, `NotFound` without
    /// a secret.
    async fn enable_totp(
        &self,
        user: UserId,
        step: i64,
        recovery_codes: Vec<TokenDigest>,
        audit: AuditEvent,
    ) -> Result<(), StoreError>;

    /// Accepts a TOTP step once: true only if `step` is newer than the last one used.
    async fn use_totp_step(&self, user: UserId, step: i64) -> Result<bool, StoreError>;

    /// Uses a recovery code once: true if it existed unused.
    async fn use_recovery_code(&self, user: UserId, code: &TokenDigest, now: Timestamp) -> Result<bool, StoreError>;

    /// Replaces all recovery codes.
    async fn replace_recovery_codes(
        &self,
        user: UserId,
        codes: Vec<TokenDigest>,
        audit: AuditEvent,
    ) -> Result<(), StoreError>;

    /// How many recovery codes are still unused.
    async fn unused_recovery_codes(&self, user: UserId) -> Result<u32, StoreError>;

    /// Turns 2FA off, forgetting the secret and the recovery codes.
    async fn disable_totp(&self, user: UserId, audit: AuditEvent) -> Result<(), StoreError>;

    // ---- audit -------------------------------------------------------------------

    async fn record_audit(&self, event: AuditEvent) -> Result<(), StoreError>;

    /// Newest first.
    async fn list_audit(&self, query: AuditQuery) -> Result<Vec<AuditEvent>, StoreError>;

    // ---- email outbox ------------------------------------------------------------

    /// Claims up to `limit` due emails (pending, next attempt due, not claimed by a
    /// live lease) until `lease_until`, so concurrent senders never send one twice.
    async fn claim_emails(
        &self,
        now: Timestamp,
        lease_until: Timestamp,
        limit: u32,
    ) -> Result<Vec<OutboxEmail>, StoreError>;

    /// Records the outcome of a delivery attempt: sent (or logged), retry at a time,
    /// or failed for good.
    async fn finish_email(&self, id: EmailId, outcome: EmailOutcome, now: Timestamp) -> Result<(), StoreError>;

    /// Emails not yet delivered (for health and tests).
    async fn pending_email_count(&self) -> Result<u64, StoreError>;

    // ---- system ------------------------------------------------------------------

    /// The backlogs the admin health page shows, as of `now`.
    async fn backlogs(&self, now: Timestamp) -> Result<crate::system::Backlogs, StoreError>;

    /// Deletes what `retention` calls old, then writes `audit` with the counts, in one
    /// transaction (the only path that deletes audit events).
    async fn cleanup(
        &self,
        retention: crate::system::Retention,
        audit: AuditEvent,
    ) -> Result<crate::system::CleanupReport, StoreError>;

    // ---- plans -------------------------------------------------------------------

    /// Makes the stored meters and plans equal to `catalog`: new ones are created,
    /// changed ones updated, and ones missing from it deleted — or archived when a
    /// subscription still uses them. Idempotent; reports what it did.
    async fn apply_catalog(&self, catalog: &Catalog, now: Timestamp) -> Result<CatalogChanges, StoreError>;

    /// The meters and active plans last applied (`None` before the first apply).
    async fn stored_catalog(&self) -> Result<Option<Catalog>, StoreError>;

    /// Creates one plan (`previous: None`; `Conflict("plans_key")` if the key exists,
    /// archived or not) or replaces it if it is still `previous` (`NotFound` if
    /// missing, `Conflict("plan_changed")` if changed since it was read, archiving
    /// included), with its audit event. An archived plan keeps its first archiving time.
    async fn put_plan(
        &self,
        plan: &Plan,
        previous: Option<&Plan>,
        audit: AuditEvent,
        now: Timestamp,
    ) -> Result<(), StoreError>;

    /// Deletes a plan no subscription uses (now or as a scheduled change), else
    /// archives it; writes the audit event with the outcome in its metadata.
    async fn remove_plan(&self, key: &str, audit: AuditEvent, now: Timestamp) -> Result<PlanRemoval, StoreError>;

    /// A small named setting Tollgate keeps for itself (e.g. the digest of the plans
    /// file last applied).
    async fn setting(&self, key: &str) -> Result<Option<String>, StoreError>;

    async fn put_setting(&self, key: &str, value: &str, now: Timestamp) -> Result<(), StoreError>;

    // ---- accounts and service keys ---------------------------------------------

    /// Creates an external customer, or returns the existing one with this
    /// `external_id` (`created` tells which). Idempotent under concurrency.
    async fn upsert_external_account(&self, account: NewExternalAccount) -> Result<(Account, bool), StoreError>;

    async fn account_by_id(&self, id: AccountId) -> Result<Option<Account>, StoreError>;

    async fn account_by_external_id(&self, external_id: &str) -> Result<Option<Account>, StoreError>;

    /// The account's subscription, whatever its status.
    async fn subscription(&self, account: AccountId) -> Result<Option<Subscription>, StoreError>;

    /// Creates or replaces the account's subscription (one per account), but only if
    /// the stored one is still the one the change was computed from: `previous` is its
    /// `updated_at` (the row's version), `None` when there was none. Otherwise
    /// `Conflict("subscription_changed")` and nothing is written, so two concurrent
    /// changes (a cancel and a downgrade) cannot both start from the same state and
    /// silently undo each other. `NotFound` for an unknown account.
    async fn put_subscription(
        &self,
        subscription: Subscription,
        previous: Option<Timestamp>,
        audit: AuditEvent,
    ) -> Result<(), StoreError>;

    async fn create_service_key(
        &self,
        key: ServiceKey,
        digest: TokenDigest,
        audit: AuditEvent,
    ) -> Result<(), StoreError>;

    /// A service key by the digest of its secret (revoked ones too: callers check).
    async fn service_key_by_digest(&self, digest: &TokenDigest) -> Result<Option<ServiceKey>, StoreError>;

    // ---- account API keys ------------------------------------------------------

    /// Stores a new key with its audit event. `Conflict("api_keys_limit")` when the
    /// account already has `api_keys::MAX_PER_ACCOUNT` live keys.
    async fn create_api_key(&self, key: ApiKey, digest: TokenDigest, audit: AuditEvent) -> Result<(), StoreError>;

    /// A key by the digest of its secret (revoked and expired ones too: callers check).
    async fn api_key_by_digest(&self, digest: &TokenDigest) -> Result<Option<ApiKey>, StoreError>;

    /// The account's keys that are not revoked, newest first.
    async fn api_keys(&self, account: AccountId) -> Result<Vec<ApiKey>, StoreError>;

    /// Revokes a live key of `account`, with its audit event. `NotFound` when the
    /// account has no such unrevoked key.
    async fn revoke_api_key(&self, account: AccountId, id: ApiKeyId, audit: AuditEvent) -> Result<ApiKey, StoreError>;

    /// Records that a key was used at `at` (callers write this at most once a minute).
    async fn touch_api_key(&self, id: ApiKeyId, at: Timestamp) -> Result<(), StoreError>;

    // ---- usage -------------------------------------------------------------------

    /// Checks every window of the request and, unless it is a dry run, increments them
    /// all or none, records the usage event and the idempotency answer, in one
    /// transaction. Concurrent calls never push a window past its limit.
    /// A known idempotency key with the same request replays the stored decision;
    /// with another request it is `Conflict("idempotency_key")`.
    async fn consume_usage(&self, request: UsageRequest) -> Result<UsageDecision, StoreError>;

    /// The stored answer to an idempotency key, if its request completed: the
    /// request's hash and the decision. Lets a retry of a call whose first answer
    /// changed what the call looks at (a settled reservation) still be replayed.
    async fn idempotent_answer(&self, scope: &str, key: &str) -> Result<Option<(String, UsageDecision)>, StoreError>;

    /// A reservation of `account` (any status).
    async fn reservation(&self, account: AccountId, id: ReservationId) -> Result<Option<Reservation>, StoreError>;

    /// Pending reservations whose time ran out, oldest first, at most `limit`.
    async fn expired_reservations(&self, now: Timestamp, limit: u32) -> Result<Vec<Reservation>, StoreError>;

    /// Takes a slot of a concurrency meter when fewer than `max` live (unreleased,
    /// unexpired) leases exist, atomically; records a `consumed` or `denied` event.
    /// `NotFound` for an unknown account.
    async fn acquire_lease(&self, request: LeaseRequest) -> Result<LeaseDecision, StoreError>;

    /// Releases a live lease of `account`; records a `released` event. `NotFound`
    /// when there is no such live lease of that account. With an idempotency key the
    /// release is remembered as the key's answer: a retry (after the lease is gone)
    /// answers `Ok(true)` (replayed) instead of `NotFound`; another request under the
    /// key is `Conflict("idempotency_key")`.
    async fn release_lease(
        &self,
        account: AccountId,
        lease: LeaseId,
        now: Timestamp,
        idempotency: Option<crate::metering::Idempotency>,
    ) -> Result<bool, StoreError>;

    /// Daily totals of an account, optionally for one meter, for days in `[from, to]`
    /// (`YYYY-MM-DD`), ordered by day then meter.
    async fn usage_daily(
        &self,
        account: AccountId,
        meter: Option<&str>,
        from: &str,
        to: &str,
    ) -> Result<Vec<DailyUsage>, StoreError>;

    /// Deletes the counter rows of `reset` (an admin's quota reset), so those windows
    /// start over, and writes its audit event, in one transaction serialized with the
    /// consumes of the same meters (no consume decided on the old counts lands after
    /// it). Returns how many rows existed and were deleted.
    async fn reset_counters(&self, reset: CounterReset) -> Result<u64, StoreError>;

    /// Replaces an account's limit overrides (`None`: removes them) and writes the
    /// audit event, with the limits replaced as its `previous` metadata, in one
    /// transaction. `NotFound` when the account does not exist.
    async fn set_limit_overrides(
        &self,
        account: AccountId,
        overrides: Option<LimitOverrides>,
        audit: AuditEvent,
    ) -> Result<(), StoreError>;

    /// An account's limit overrides as last set, expired or not.
    async fn limit_overrides(&self, account: AccountId) -> Result<Option<LimitOverrides>, StoreError>;

    /// Every account's overrides still in force at `now` (each node keeps them all).
    async fn limit_overrides_in_force(&self, now: Timestamp) -> Result<Vec<LimitOverrides>, StoreError>;

    /// The sum of the counter rows `keys` of one meter (0 for missing rows), in order.
    async fn counter_values(
        &self,
        account: AccountId,
        meter: &str,
        keys: &[Vec<String>],
    ) -> Result<Vec<i64>, StoreError>;

    // ---- admin reports (read only) -------------------------------------------------

    /// The admin dashboard's counts and sums (`reports::AdminStats`), all read from one
    /// snapshot.
    async fn admin_stats(&self, query: StatsQuery) -> Result<AdminStats, StoreError>;

    /// Daily totals summed over all accounts, optionally of one meter, for days in
    /// `[from, to]` (`YYYY-MM-DD`), ordered by day then meter.
    async fn admin_usage_daily(&self, meter: Option<&str>, from: &str, to: &str)
    -> Result<Vec<DailyUsage>, StoreError>;

    /// Usage events of all accounts matching `query`, newest first, at most
    /// `query.limit`.
    async fn admin_usage_events(&self, query: UsageLogQuery) -> Result<Vec<UsageLogEntry>, StoreError>;

    /// Payments of all accounts (or one) matching `query`, newest first, at most
    /// `query.limit`.
    async fn admin_payments(&self, query: PaymentQuery) -> Result<Vec<Payment>, StoreError>;
}

/// Credits and billing: the ledger, payments and provider events.
#[async_trait]
pub trait BillingStore: Send + Sync {
    // ---- credits -----------------------------------------------------------------

    /// Writes one ledger transfer: checks the balance rule (a debit may not leave the
    /// balance under `transfer.floor`; see `credits::allowed_amount`), then the
    /// transfer, its two entries, the running balance, the idempotency answer and the
    /// audit event, in one transaction. Concurrent debits never take the balance below
    /// the floor. `Conflict("insufficient_credits")` when refused,
    /// `Conflict("idempotency_key")` for a known key with another request, `NotFound`
    /// for an unknown account. A known key with the same request replays its receipt.
    async fn transfer_credits(&self, transfer: CreditTransfer) -> Result<CreditReceipt, StoreError>;

    /// Balance and totals (zero for an account that never had credits).
    async fn credit_balance(&self, account: AccountId) -> Result<CreditBalance, StoreError>;

    /// Transactions of an account, newest first.
    async fn credit_transactions(
        &self,
        account: AccountId,
        query: TransactionQuery,
    ) -> Result<Vec<CreditTransaction>, StoreError>;

    /// Checks the whole ledger: every transfer two entries summing to zero, every
    /// running balance equal to the sum of its account's entries.
    async fn ledger_check(&self) -> Result<LedgerCheck, StoreError>;

    // ---- billing -------------------------------------------------------------------

    /// The provider's customer id of an account.
    async fn provider_customer(&self, account: AccountId, provider: &str) -> Result<Option<String>, StoreError>;

    /// Links a provider customer to an account, unless one is linked already; returns
    /// the linked id (the first one wins when two requests race).
    async fn link_provider_customer(
        &self,
        account: AccountId,
        provider: &str,
        customer: &str,
    ) -> Result<String, StoreError>;

    async fn account_by_provider_customer(
        &self,
        provider: &str,
        customer: &str,
    ) -> Result<Option<AccountId>, StoreError>;

    /// Records a provider event once per `(provider, id)` and applies its effect in the
    /// same transaction: a second delivery, even concurrent, is `Duplicate` and does
    /// nothing. `email` (a payment-failed notice) is queued only when the effect applied.
    async fn apply_billing_event(
        &self,
        event: ProviderEvent,
        effect: BillingEffect,
        email: Option<NewEmail>,
    ) -> Result<BillingOutcome, StoreError>;

    /// Payments, newest first; of one account or all.
    async fn payments(&self, account: Option<AccountId>, limit: u32) -> Result<Vec<Payment>, StoreError>;
}

/// One day of one meter's usage.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DailyUsage {
    pub day: String,
    pub meter: String,
    pub consumed: i64,
    pub denied: i64,
}

/// What `remove_plan` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PlanRemoval {
    Deleted,
    /// Still in use: no longer sold, still in force for its subscribers.
    Archived,
}

impl PlanRemoval {
    pub fn as_str(self) -> &'static str {
        match self {
            PlanRemoval::Deleted => "deleted",
            PlanRemoval::Archived => "archived",
        }
    }
}

/// What `apply_catalog` did, by key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CatalogChanges {
    pub created: Vec<String>,
    pub updated: Vec<String>,
    pub unchanged: Vec<String>,
    pub archived: Vec<String>,
    pub deleted: Vec<String>,
}

impl CatalogChanges {
    fn changed(&self) -> bool {
        !(self.created.is_empty() && self.updated.is_empty() && self.archived.is_empty() && self.deleted.is_empty())
    }

    /// The audit event of an application that changed something (`plans.applied`,
    /// by the system: the plans file), written in the application's transaction.
    pub fn audit_event(&self, now: Timestamp) -> Option<AuditEvent> {
        use crate::audit::{Actor, RequestOrigin, Severity};
        self.changed().then(|| {
            AuditEvent::new(Actor::System, "plans.applied", &RequestOrigin::default(), now)
                .severity(Severity::Warning)
                .meta("created", self.created.clone())
                .meta("updated", self.updated.clone())
                .meta("archived", self.archived.clone())
                .meta("deleted", self.deleted.clone())
        })
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum EmailOutcome {
    Sent,
    Logged,
    Retry { at: Timestamp, error: String },
    Failed { error: String },
}
