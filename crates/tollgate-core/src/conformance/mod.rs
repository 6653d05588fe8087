//! The store conformance suite: one function per behaviour, each given a fresh, empty,
//! migrated store. Every backend expands them into named tests with
//! [`conformance_tests!`](crate::conformance_tests), so SQLite and PostgreSQL are held
//! to exactly the same contract.

mod admin;
mod credits;
mod reports;
mod usage;

pub use admin::{
    admin_suspension_ends_sessions_in_one_transaction, admin_user_lists_filter_sort_and_page,
    admin_user_pages_are_stable_under_inserts, impersonation_sessions_do_not_count_as_logins,
};

pub use credits::{
    concurrent_spends_never_overdraw, credits_move_by_balanced_transfers, idempotent_spends_count_once,
    ledger_stays_balanced_under_random_sequences, provider_customers_link_once, provider_events_apply_once,
    provider_subscriptions_never_move_backwards,
};

pub use reports::{admin_stats_count_exactly, admin_usage_reports_sum_filter_and_page};

pub use usage::{
    api_keys_are_found_listed_revoked_and_limited, catalog_apply_is_idempotent_and_archives_plans_in_use,
    cleanup_deletes_only_what_retention_names, consume_counts_all_windows_or_none,
    consume_for_an_unknown_account_is_not_found, consume_is_exact_under_concurrency, external_accounts_are_idempotent,
    idempotent_acquires_take_one_slot, idempotent_consume_replays_and_conflicts,
    leases_hold_slots_until_released_or_expired, limit_overrides_replace_expire_and_audit,
    plans_are_created_replaced_and_removed_one_at_a_time, quota_resets_start_windows_over, refunds_and_gauge_levels,
    reservations_are_exact_under_concurrency, reservations_count_until_settled, service_keys_are_found_by_digest,
    spent_windows_draw_on_credits, subscription_changes_compare_and_set, subscriptions_are_one_per_account,
};

use std::sync::Arc;

use time::Duration;

use crate::Timestamp;
use crate::accounts::{Subscription, SubscriptionStatus};
use crate::audit::{Actor, AuditEvent, AuditQuery, RequestOrigin};
use crate::email::{self, EmailTemplate};
use crate::identity::{
    EmailAddress, Locale, NewSession, NewUser, OneTimeToken, RefreshOutcome, Role, SecretToken, SessionScope,
    TokenDigest, TokenEffect, TokenPurpose, UserStatus,
};
use crate::ids::{AccountId, OneTimeTokenId, SessionId, UserId};
use crate::store::{EmailOutcome, NewOneTimeToken, Rotation, Store, StoreError};

/// A fresh store for one test, and how to clean up after it.
pub trait Fixture {
    fn store(&self) -> Arc<dyn Store>;
    /// Runs after a passing test (a failing one leaves its database for inspection).
    fn cleanup(self) -> impl std::future::Future<Output = ()> + Send;
}

/// Expands the suite into `#[tokio::test]`s. `$make` is an async expression giving an
/// `Option<impl Fixture>` (None: backend unavailable; the backend decides whether that
/// is a loud skip or a failure).
#[macro_export]
macro_rules! conformance_tests {
    ($make:expr) => {
        $crate::conformance_tests!(@expand $make;
            create_and_find_user, email_is_unique_case_insensitively, profile_update,
            token_redeems_once, expired_token_is_refused, change_email_conflict_is_atomic,
            reset_password_ends_sessions, refresh_rotation_and_reuse_detection, revoke_sessions_scopes,
            session_with_user_and_touch, totp_lifecycle, totp_step_accepted_once_concurrently,
            recovery_codes_single_use, admin_upsert, audit_is_recorded_and_filtered,
            outbox_claim_lease_and_outcomes, concurrent_refresh_rotates_once, token_requires_existing_user,
            magic_login_drops_unproven_credentials, mfa_login_verifies_nothing, security_changes_end_outstanding_links,
            catalog_apply_is_idempotent_and_archives_plans_in_use, external_accounts_are_idempotent,
            subscriptions_are_one_per_account, subscription_changes_compare_and_set, idempotent_acquires_take_one_slot, service_keys_are_found_by_digest, consume_counts_all_windows_or_none,
            consume_is_exact_under_concurrency, idempotent_consume_replays_and_conflicts,
            consume_for_an_unknown_account_is_not_found, refunds_and_gauge_levels,
            leases_hold_slots_until_released_or_expired, reservations_count_until_settled,
            reservations_are_exact_under_concurrency, quota_resets_start_windows_over, cleanup_deletes_only_what_retention_names,
            api_keys_are_found_listed_revoked_and_limited, limit_overrides_replace_expire_and_audit,
            plans_are_created_replaced_and_removed_one_at_a_time,
            credits_move_by_balanced_transfers, concurrent_spends_never_overdraw, idempotent_spends_count_once,
            ledger_stays_balanced_under_random_sequences, provider_events_apply_once,
            provider_subscriptions_never_move_backwards, provider_customers_link_once, spent_windows_draw_on_credits,
            admin_user_lists_filter_sort_and_page, admin_user_pages_are_stable_under_inserts,
            admin_suspension_ends_sessions_in_one_transaction, impersonation_sessions_do_not_count_as_logins,
            admin_stats_count_exactly, admin_usage_reports_sum_filter_and_page,
        );
    };
    (@expand $make:expr; $($name:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                if let Some(fixture) = $make.await {
                    $crate::conformance::$name($crate::conformance::Fixture::store(&fixture)).await;
                    $crate::conformance::Fixture::cleanup(fixture).await;
                }
            }
        )+
    };
}

pub fn t0() -> Timestamp {
    // Whole microseconds: both backends store microsecond precision.
    let now = time::OffsetDateTime::now_utc();
    now.replace_nanosecond(now.nanosecond() / 1000 * 1000).unwrap()
}

fn origin() -> RequestOrigin {
    RequestOrigin { ip: Some("127.0.0.1".into()), user_agent: Some("conformance".into()), impersonator: None }
}

/// The audit events of one action, newest first (at most 200).
pub(crate) async fn events_of(store: &Arc<dyn Store>, action: &str) -> Vec<AuditEvent> {
    store.list_audit(AuditQuery { action: Some(action.into()), limit: 200, ..Default::default() }).await.unwrap()
}

/// An active `manual` subscription to `plan` started at `now`, nothing scheduled.
pub(crate) fn manual_subscription(account: AccountId, plan: &str, now: Timestamp) -> Subscription {
    Subscription {
        account_id: account,
        plan: plan.into(),
        status: SubscriptionStatus::Active,
        provider: "manual".into(),
        started_at: now,
        trial_ends_at: None,
        cancel_at_period_end: false,
        scheduled_plan: None,
        scheduled_at: None,
        updated_at: now,
        provider_subscription_id: None,
        provider_state_at: None,
    }
}

pub(crate) fn audit(action: &str, now: Timestamp) -> AuditEvent {
    AuditEvent::new(Actor::System, action, &origin(), now)
}

pub fn new_user(email: &str, now: Timestamp) -> NewUser {
    NewUser {
        id: UserId::new(),
        account_id: AccountId::new(),
        email: EmailAddress::parse(email).unwrap(),
        email_verified: false,
        name: Some("Ada".into()),
        locale: Locale::Fr,
        password_hash: Some("$argon2id$fake".into()),
        role: Role::User,
        created_at: now,
    }
}

fn token(purpose: TokenPurpose, user: UserId, now: Timestamp, ttl: Duration) -> (SecretToken, OneTimeToken) {
    let secret = SecretToken::generate();
    let token = OneTimeToken {
        id: OneTimeTokenId::new(),
        digest: secret.digest(),
        purpose,
        user_id: user,
        new_email: None,
        created_at: now,
        expires_at: now + ttl,
        used_at: None,
    };
    (secret, token)
}

pub(crate) fn session_for(user: UserId, now: Timestamp) -> (SecretToken, NewSession) {
    let refresh = SecretToken::generate();
    let s = NewSession {
        id: SessionId::new(),
        user_id: user,
        ip: Some("10.0.0.1".into()),
        user_agent: Some("ua".into()),
        created_at: now,
        expires_at: now + Duration::days(30),
        refresh_digest: refresh.digest(),
    };
    (refresh, s)
}

pub async fn create_and_find_user(store: Arc<dyn Store>) {
    let now = t0();
    let new = new_user("ada@example.com", now);
    let (secret, tok) = token(TokenPurpose::VerifyEmail, new.id, now, Duration::hours(1));
    let email = email::render(EmailTemplate::VerifyEmail, Locale::Fr, "http://x/verify", new.email.clone(), now);
    let user = store
        .create_user(
            new.clone(),
            Some(NewOneTimeToken { token: tok, email: Some(email) }),
            audit("user.registered", now),
        )
        .await
        .unwrap();
    assert_eq!(user.id, new.id);
    assert_eq!(user.account_id, new.account_id);
    assert_eq!(user.email.as_str(), "ada@example.com");
    assert_eq!(user.name.as_deref(), Some("Ada"));
    assert_eq!(user.locale, Locale::Fr);
    assert_eq!(user.status, UserStatus::Active);
    assert_eq!(user.role, Role::User);
    assert_eq!(user.created_at, now);
    assert!(user.email_verified_at.is_none());
    assert_eq!(store.user_by_id(user.id).await.unwrap().unwrap(), user);
    assert_eq!(store.user_by_email(&new.email).await.unwrap().unwrap(), user);
    assert!(store.user_by_id(UserId::new()).await.unwrap().is_none());
    assert!(store.peek_token(&secret.digest(), TokenPurpose::VerifyEmail, now).await.unwrap().is_some());
    assert!(store.peek_token(&secret.digest(), TokenPurpose::PasswordReset, now).await.unwrap().is_none());
    assert_eq!(store.pending_email_count().await.unwrap(), 1);
}

pub async fn email_is_unique_case_insensitively(store: Arc<dyn Store>) {
    let now = t0();
    store.create_user(new_user("ada@example.com", now), None, audit("a", now)).await.unwrap();
    let dup = new_user(" ADA@Example.com ", now);
    let err = store.create_user(dup.clone(), None, audit("a", now)).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict("users_email")), "{err:?}");
    // Nothing of the failed registration was written (no half-written account).
    assert!(store.user_by_id(dup.id).await.unwrap().is_none());
    let registered = store.list_audit(AuditQuery { limit: 10, ..Default::default() }).await.unwrap();
    assert_eq!(registered.len(), 1);
}

pub async fn profile_update(store: Arc<dyn Store>) {
    let now = t0();
    let user = store.create_user(new_user("ada@example.com", now), None, audit("a", now)).await.unwrap();
    let later = now + Duration::seconds(5);
    let u = store.update_profile(user.id, Some(Some("Grace".into())), None, later).await.unwrap();
    assert_eq!(u.name.as_deref(), Some("Grace"));
    assert_eq!(u.locale, Locale::Fr);
    assert_eq!(u.updated_at, later);
    let u = store.update_profile(user.id, Some(None), Some(Locale::En), later).await.unwrap();
    assert_eq!(u.name, None);
    assert_eq!(u.locale, Locale::En);
    assert!(matches!(store.update_profile(UserId::new(), None, None, later).await, Err(StoreError::NotFound)));
}

pub async fn token_redeems_once(store: Arc<dyn Store>) {
    let now = t0();
    let user = store.create_user(new_user("ada@example.com", now), None, audit("a", now)).await.unwrap();
    let (secret, tok) = token(TokenPurpose::VerifyEmail, user.id, now, Duration::hours(1));
    store.issue_token(NewOneTimeToken { token: tok, email: None }).await.unwrap();
    let digest = secret.digest();
    // Wrong purpose does not redeem it.
    let wrong =
        store.redeem_token(&digest, TokenPurpose::MagicLink, now, TokenEffect::VerifyEmail, audit("x", now)).await;
    assert!(matches!(wrong, Err(StoreError::NotFound)));
    let redeemed = store
        .redeem_token(&digest, TokenPurpose::VerifyEmail, now, TokenEffect::VerifyEmail, audit("email.verified", now))
        .await
        .unwrap();
    assert_eq!(redeemed.user.email_verified_at, Some(now));
    assert!(redeemed.session.is_none());
    let again =
        store.redeem_token(&digest, TokenPurpose::VerifyEmail, now, TokenEffect::VerifyEmail, audit("x", now)).await;
    assert!(matches!(again, Err(StoreError::NotFound)));
    assert!(store.peek_token(&digest, TokenPurpose::VerifyEmail, now).await.unwrap().is_none());
    // Concurrent redemptions of one magic link: exactly one session.
    let (secret, tok) = token(TokenPurpose::MagicLink, user.id, now, Duration::hours(1));
    store.issue_token(NewOneTimeToken { token: tok, email: None }).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let store = store.clone();
        let digest = secret.digest();
        tasks.push(tokio::spawn(async move {
            let (_, s) = session_for(user.id, now);
            store
                .redeem_token(
                    &digest,
                    TokenPurpose::MagicLink,
                    now,
                    TokenEffect::MagicLogin(s),
                    audit("login.succeeded", now),
                )
                .await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(r) => {
                assert!(r.session.is_some());
                ok += 1;
            }
            Err(StoreError::NotFound) => {}
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!(ok, 1);
    assert_eq!(store.list_sessions(user.id, now).await.unwrap().len(), 1);
}

pub async fn expired_token_is_refused(store: Arc<dyn Store>) {
    let now = t0();
    let user = store.create_user(new_user("ada@example.com", now), None, audit("a", now)).await.unwrap();
    let (secret, tok) = token(TokenPurpose::PasswordReset, user.id, now, Duration::minutes(60));
    store.issue_token(NewOneTimeToken { token: tok, email: None }).await.unwrap();
    let late = now + Duration::minutes(61);
    assert!(store.peek_token(&secret.digest(), TokenPurpose::PasswordReset, late).await.unwrap().is_none());
    let r = store
        .redeem_token(
            &secret.digest(),
            TokenPurpose::PasswordReset,
            late,
            TokenEffect::ResetPassword { password_hash: "x".into() },
            audit("x", late),
        )
        .await;
    assert!(matches!(r, Err(StoreError::NotFound)));
    assert_eq!(store.user_by_id(user.id).await.unwrap().unwrap().password_hash.as_deref(), Some("$argon2id$fake"));
}

pub async fn change_email_conflict_is_atomic(store: Arc<dyn Store>) {
    let now = t0();
    let ada = store.create_user(new_user("ada@example.com", now), None, audit("a", now)).await.unwrap();
    let (secret, mut tok) = token(TokenPurpose::ChangeEmail, ada.id, now, Duration::hours(1));
    tok.new_email = Some(EmailAddress::parse("grace@example.com").unwrap());
    store.issue_token(NewOneTimeToken { token: tok, email: None }).await.unwrap();
    // Someone registers the address before Ada confirms.
    store.create_user(new_user("grace@example.com", now), None, audit("a", now)).await.unwrap();
    let r = store
        .redeem_token(
            &secret.digest(),
            TokenPurpose::ChangeEmail,
            now,
            TokenEffect::ChangeEmail,
            audit("email.changed", now),
        )
        .await;
    assert!(matches!(r, Err(StoreError::Conflict("users_email"))), "{r:?}");
    // The token is still unused (the transaction rolled back) and Ada's email unchanged.
    assert!(store.peek_token(&secret.digest(), TokenPurpose::ChangeEmail, now).await.unwrap().is_some());
    assert_eq!(store.user_by_id(ada.id).await.unwrap().unwrap().email.as_str(), "ada@example.com");

    let (secret, mut tok) = token(TokenPurpose::ChangeEmail, ada.id, now, Duration::hours(1));
    tok.new_email = Some(EmailAddress::parse("ada@new.example").unwrap());
    store.issue_token(NewOneTimeToken { token: tok, email: None }).await.unwrap();
    let r = store
        .redeem_token(
            &secret.digest(),
            TokenPurpose::ChangeEmail,
            now,
            TokenEffect::ChangeEmail,
            audit("email.changed", now),
        )
        .await
        .unwrap();
    assert_eq!(r.user.email.as_str(), "ada@new.example");
    assert!(store.user_by_email(&EmailAddress::parse("ada@example.com").unwrap()).await.unwrap().is_none());
}

pub async fn reset_password_ends_sessions(store: Arc<dyn Store>) {
    let now = t0();
    let user = store.create_user(new_user("ada@example.com", now), None, audit("a", now)).await.unwrap();
    for _ in 0..2 {
        let (_, s) = session_for(user.id, now);
        store.create_session(s, audit("login.succeeded", now)).await.unwrap();
    }
    let (secret, tok) = token(TokenPurpose::PasswordReset, user.id, now, Duration::hours(1));
    store.issue_token(NewOneTimeToken { token: tok, email: None }).await.unwrap();
    let r = store
        .redeem_token(
            &secret.digest(),
            TokenPurpose::PasswordReset,
            now,
            TokenEffect::ResetPassword { password_hash: "new-hash".into() },
            audit("password.reset", now),
        )
        .await
        .unwrap();
    assert_eq!(r.user.password_hash.as_deref(), Some("new-hash"));
    assert!(r.user.email_verified_at.is_some(), "a followed reset link proves the address");
    assert!(store.list_sessions(user.id, now).await.unwrap().is_empty());
    // change_password keeps one session.
    let (_, keep) = session_for(user.id, now);
    let keep = store.create_session(keep, audit("login.succeeded", now)).await.unwrap();
    let (_, other) = session_for(user.id, now);
    store.create_session(other, audit("login.succeeded", now)).await.unwrap();
    store.change_password(user.id, "newer".into(), Some(keep.id), audit("password.changed", now)).await.unwrap();
    let live = store.list_sessions(user.id, now).await.unwrap();
    assert_eq!(live.iter().map(|s| s.id).collect::<Vec<_>>(), vec![keep.id]);
    assert_eq!(store.user_by_id(user.id).await.unwrap().unwrap().password_hash.as_deref(), Some("newer"));
}

pub async fn refresh_rotation_and_reuse_detection(store: Arc<dyn Store>) {
    let now = t0();
    let user = store.create_user(new_user("ada@example.com", now), None, audit("a", now)).await.unwrap();
    let (first, s) = session_for(user.id, now);
    let session = store.create_session(s, audit("login.succeeded", now)).await.unwrap();
    assert_eq!(store.user_by_id(user.id).await.unwrap().unwrap().last_login_at, Some(now));
    let second = SecretToken::generate();
    let out = store
        .rotate_refresh_token(Rotation { presented: first.digest(), replacement: second.digest(), now })
        .await
        .unwrap();
    match out {
        RefreshOutcome::Rotated { session: s, user: u } => {
            assert_eq!(s.id, session.id);
            assert_eq!(u.id, user.id);
        }
        other => panic!("expected rotation, got {other:?}"),
    }
    let third = SecretToken::generate();
    // Replaying the first token revokes the session...
    let out = store
        .rotate_refresh_token(Rotation { presented: first.digest(), replacement: third.digest(), now })
        .await
        .unwrap();
    assert_eq!(out, RefreshOutcome::Reused { session_id: session.id });
    // ...so even the current token is dead now, and so is the replacement.
    let out = store
        .rotate_refresh_token(Rotation { presented: second.digest(), replacement: third.digest(), now })
        .await
        .unwrap();
    assert!(matches!(out, RefreshOutcome::Invalid | RefreshOutcome::Reused { .. }), "{out:?}");
    assert!(store.list_sessions(user.id, now).await.unwrap().is_empty());
    let unknown = SecretToken::generate();
    let out = store
        .rotate_refresh_token(Rotation { presented: unknown.digest(), replacement: third.digest(), now })
        .await
        .unwrap();
    assert_eq!(out, RefreshOutcome::Invalid);
    // An expired session does not refresh.
    let (tok, mut s) = session_for(user.id, now);
    s.expires_at = now + Duration::seconds(1);
    store.create_session(s, audit("login.succeeded", now)).await.unwrap();
    let out = store
        .rotate_refresh_token(Rotation {
            presented: tok.digest(),
            replacement: SecretToken::generate().digest(),
            now: now + Duration::seconds(2),
        })
        .await
        .unwrap();
    assert_eq!(out, RefreshOutcome::Invalid);
}

pub async fn concurrent_refresh_rotates_once(store: Arc<dyn Store>) {
    let now = t0();
    let user = store.create_user(new_user("ada@example.com", now), None, audit("a", now)).await.unwrap();
    let (first, s) = session_for(user.id, now);
    store.create_session(s, audit("login.succeeded", now)).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let store = store.clone();
        let presented = first.digest();
        tasks.push(tokio::spawn(async move {
            store
                .rotate_refresh_token(Rotation { presented, replacement: SecretToken::generate().digest(), now })
                .await
                .unwrap()
        }));
    }
    let mut rotated = 0;
    for t in tasks {
        if matches!(t.await.unwrap(), RefreshOutcome::Rotated { .. }) {
            rotated += 1;
        }
    }
    assert_eq!(rotated, 1, "exactly one concurrent refresh may win");
}

pub async fn revoke_sessions_scopes(store: Arc<dyn Store>) {
    let now = t0();
    let ada = store.create_user(new_user("ada@example.com", now), None, audit("a", now)).await.unwrap();
    let bob = store.create_user(new_user("bob@example.com", now), None, audit("a", now)).await.unwrap();
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (_, s) = session_for(ada.id, now);
        ids.push(store.create_session(s, audit("l", now)).await.unwrap().id);
    }
    let (_, s) = session_for(bob.id, now);
    let bobs = store.create_session(s, audit("l", now)).await.unwrap();
    // Ada cannot revoke Bob's session: it is not hers.
    let r = store.revoke_sessions(ada.id, SessionScope::One(bobs.id), audit("session.revoked", now)).await;
    assert!(matches!(r, Err(StoreError::NotFound)));
    assert_eq!(store.list_sessions(bob.id, now).await.unwrap().len(), 1);
    assert_eq!(store.revoke_sessions(ada.id, SessionScope::One(ids[0]), audit("s", now)).await.unwrap(), 1);
    let r = store.revoke_sessions(ada.id, SessionScope::One(ids[0]), audit("s", now)).await;
    assert!(matches!(r, Err(StoreError::NotFound)), "revoking twice is not found");
    assert_eq!(store.revoke_sessions(ada.id, SessionScope::AllExcept(ids[2]), audit("s", now)).await.unwrap(), 1);
    let live: Vec<_> = store.list_sessions(ada.id, now).await.unwrap().into_iter().map(|s| s.id).collect();
    assert_eq!(live, vec![ids[2]]);
    assert_eq!(store.revoke_sessions(ada.id, SessionScope::All, audit("s", now)).await.unwrap(), 1);
    assert!(store.list_sessions(ada.id, now).await.unwrap().is_empty());
    assert_eq!(store.list_sessions(bob.id, now).await.unwrap().len(), 1);
}

pub async fn session_with_user_and_touch(store: Arc<dyn Store>) {
    let now = t0();
    let user = store.create_user(new_user("ada@example.com", now), None, audit("a", now)).await.unwrap();
    let (_, s) = session_for(user.id, now);
    let session = store.create_session(s, audit("l", now)).await.unwrap();
    let (got, u) = store.session_with_user(session.id).await.unwrap().unwrap();
    assert_eq!(got, session);
    assert_eq!(u.id, user.id);
    assert!(got.is_live(now));
    let later = now + Duration::minutes(5);
    // Not stale yet: no write.
    store.touch_session(session.id, later, now - Duration::minutes(1)).await.unwrap();
    assert_eq!(store.session_with_user(session.id).await.unwrap().unwrap().0.last_seen_at, now);
    store.touch_session(session.id, later, later - Duration::minutes(1)).await.unwrap();
    assert_eq!(store.session_with_user(session.id).await.unwrap().unwrap().0.last_seen_at, later);
    assert!(store.session_with_user(SessionId::new()).await.unwrap().is_none());
    store.revoke_sessions(user.id, SessionScope::All, audit("s", now)).await.unwrap();
    let (revoked, _) = store.session_with_user(session.id).await.unwrap().unwrap();
    assert!(!revoked.is_live(later));
}

pub async fn totp_lifecycle(store: Arc<dyn Store>) {
    let now = t0();
    let user = store.create_user(new_user("ada@example.com", now), None, audit("a", now)).await.unwrap();
    let r = store.enable_totp(user.id, 5, vec![], audit("mfa.enabled", now)).await;
    assert!(matches!(r, Err(StoreError::NotFound)), "no secret yet: {r:?}");
    store.set_totp_secret(user.id, "SECRETONE".into(), now).await.unwrap();
    store.set_totp_secret(user.id, "SECRETTWO".into(), now).await.unwrap();
    let codes: Vec<TokenDigest> = (0..10).map(|i| TokenDigest::of(&format!("code{i}"))).collect();
    store.enable_totp(user.id, 100, codes, audit("mfa.enabled", now)).await.unwrap();
    let u = store.user_by_id(user.id).await.unwrap().unwrap();
    assert_eq!(u.totp_secret.as_deref(), Some("SECRETTWO"));
    assert!(u.totp_enabled());
    assert_eq!(u.totp_last_step, Some(100));
    assert_eq!(store.unused_recovery_codes(user.id).await.unwrap(), 10);
    assert!(matches!(store.set_totp_secret(user.id, "X".into(), now).await, Err(StoreError::Conflict("totp_enabled"))));
    assert!(matches!(
        store.enable_totp(user.id, 101, vec![], audit("m", now)).await,
        Err(StoreError::Conflict("totp_enabled"))
    ));
    store.replace_recovery_codes(user.id, vec![TokenDigest::of("fresh")], audit("m", now)).await.unwrap();
    assert_eq!(store.unused_recovery_codes(user.id).await.unwrap(), 1);
    assert!(!store.use_recovery_code(user.id, &TokenDigest::of("code1"), now).await.unwrap());
    store.disable_totp(user.id, audit("mfa.disabled", now)).await.unwrap();
    let u = store.user_by_id(user.id).await.unwrap().unwrap();
    assert!(!u.totp_enabled());
    assert!(u.totp_secret.is_none());
    assert_eq!(store.unused_recovery_codes(user.id).await.unwrap(), 0);
}

pub async fn totp_step_accepted_once_concurrently(store: Arc<dyn Store>) {
    let now = t0();
    let user = store.create_user(new_user("ada@example.com", now), None, audit("a", now)).await.unwrap();
    store.set_totp_secret(user.id, "S".into(), now).await.unwrap();
    store.enable_totp(user.id, 100, vec![], audit("m", now)).await.unwrap();
    assert!(!store.use_totp_step(user.id, 100).await.unwrap(), "the enabling step is used");
    assert!(!store.use_totp_step(user.id, 99).await.unwrap(), "older steps are refused");
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move { store.use_totp_step(user.id, 101).await.unwrap() }));
    }
    let mut accepted = 0;
    for t in tasks {
        accepted += usize::from(t.await.unwrap());
    }
    assert_eq!(accepted, 1);
}

pub async fn recovery_codes_single_use(store: Arc<dyn Store>) {
    let now = t0();
    let ada = store.create_user(new_user("ada@example.com", now), None, audit("a", now)).await.unwrap();
    let bob = store.create_user(new_user("bob@example.com", now), None, audit("a", now)).await.unwrap();
    store.set_totp_secret(ada.id, "S".into(), now).await.unwrap();
    store.enable_totp(ada.id, 1, vec![TokenDigest::of("c1"), TokenDigest::of("c2")], audit("m", now)).await.unwrap();
    assert!(!store.use_recovery_code(bob.id, &TokenDigest::of("c1"), now).await.unwrap(), "codes belong to one user");
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(
            async move { store.use_recovery_code(ada.id, &TokenDigest::of("c1"), now).await.unwrap() },
        ));
    }
    let mut used = 0;
    for t in tasks {
        used += usize::from(t.await.unwrap());
    }
    assert_eq!(used, 1);
    assert_eq!(store.unused_recovery_codes(ada.id).await.unwrap(), 1);
}

pub async fn admin_upsert(store: Arc<dyn Store>) {
    let now = t0();
    // Creates a passwordless admin...
    let mut new = new_user("root@example.com", now);
    new.role = Role::Admin;
    new.password_hash = None;
    let (secret, tok) = token(TokenPurpose::PasswordReset, new.id, now, Duration::hours(1));
    let admin = store.upsert_admin(new, tok, audit("user.admin_granted", now)).await.unwrap();
    assert_eq!(admin.role, Role::Admin);
    assert!(admin.password_hash.is_none());
    let live = store.peek_token(&secret.digest(), TokenPurpose::PasswordReset, now).await.unwrap().unwrap();
    assert_eq!(live.user_id, admin.id);
    // ...or promotes an existing user, binding the token to them.
    let user = store.create_user(new_user("ada@example.com", now), None, audit("a", now)).await.unwrap();
    let mut again = new_user("ada@example.com", now);
    again.role = Role::Admin;
    let (secret, tok) = token(TokenPurpose::PasswordReset, again.id, now, Duration::hours(1));
    let promoted = store.upsert_admin(again, tok, audit("user.admin_granted", now)).await.unwrap();
    assert_eq!(promoted.id, user.id);
    assert_eq!(promoted.role, Role::Admin);
    assert_eq!(promoted.password_hash.as_deref(), Some("$argon2id$fake"));
    let live = store.peek_token(&secret.digest(), TokenPurpose::PasswordReset, now).await.unwrap().unwrap();
    assert_eq!(live.user_id, user.id);
}

pub async fn token_requires_existing_user(store: Arc<dyn Store>) {
    let now = t0();
    let (secret, tok) = token(TokenPurpose::MagicLink, UserId::new(), now, Duration::hours(1));
    let email = email::render(
        EmailTemplate::MagicLink,
        Locale::En,
        "http://x",
        EmailAddress::parse("x@example.com").unwrap(),
        now,
    );
    let r = store.issue_token(NewOneTimeToken { token: tok, email: Some(email) }).await;
    assert!(matches!(r, Err(StoreError::NotFound)), "a token must belong to an existing user: {r:?}");
    assert!(store.peek_token(&secret.digest(), TokenPurpose::MagicLink, now).await.unwrap().is_none());
    assert_eq!(store.pending_email_count().await.unwrap(), 0, "nothing half-written");
}

pub async fn audit_is_recorded_and_filtered(store: Arc<dyn Store>) {
    let now = t0();
    let user = store
        .create_user(new_user("ada@example.com", now), None, audit("user.registered", now).target_user(UserId::new()))
        .await
        .unwrap();
    let e = AuditEvent::new(Actor::User(user.id), "login.failed", &origin(), now + Duration::seconds(1))
        .target_user(user.id)
        .severity(crate::audit::Severity::Warning)
        .meta("reason", "invalid_credentials");
    store.record_audit(e.clone()).await.unwrap();
    store
        .record_audit(AuditEvent::new(Actor::Anonymous, "login.failed", &origin(), now + Duration::seconds(2)))
        .await
        .unwrap();
    let all = store.list_audit(AuditQuery { limit: 10, ..Default::default() }).await.unwrap();
    assert_eq!(all.len(), 3);
    assert_eq!(all[1], e, "round trip keeps every field; newest first");
    let mine =
        store.list_audit(AuditQuery { target_user: Some(user.id), limit: 10, ..Default::default() }).await.unwrap();
    assert_eq!(mine, vec![e]);
    let logins = store
        .list_audit(AuditQuery { action_prefix: Some("login.".into()), limit: 1, ..Default::default() })
        .await
        .unwrap();
    assert_eq!(logins.len(), 1);
    assert_eq!(logins[0].actor, Actor::Anonymous);
}

pub async fn outbox_claim_lease_and_outcomes(store: Arc<dyn Store>) {
    let now = t0();
    let user = store.create_user(new_user("ada@example.com", now), None, audit("a", now)).await.unwrap();
    for purpose in [TokenPurpose::VerifyEmail, TokenPurpose::MagicLink] {
        let (_, tok) = token(purpose, user.id, now, Duration::hours(1));
        let email = email::render(EmailTemplate::MagicLink, Locale::En, "http://x/y?token=z", user.email.clone(), now);
        store.issue_token(NewOneTimeToken { token: tok, email: Some(email) }).await.unwrap();
    }
    assert_eq!(store.pending_email_count().await.unwrap(), 2);
    let lease = now + Duration::seconds(60);
    let claimed = store.claim_emails(now, lease, 10).await.unwrap();
    assert_eq!(claimed.len(), 2);
    assert_eq!(claimed[0].to, user.email);
    assert!(claimed[0].text_body.contains("http://x/y?token=z"));
    // Leased: a second sender gets nothing until the lease runs out.
    assert!(store.claim_emails(now, lease, 10).await.unwrap().is_empty());
    store.finish_email(claimed[0].id, EmailOutcome::Sent, now).await.unwrap();
    let retry_at = now + Duration::seconds(30);
    store
        .finish_email(claimed[1].id, EmailOutcome::Retry { at: retry_at, error: "421 try later".into() }, now)
        .await
        .unwrap();
    assert_eq!(store.pending_email_count().await.unwrap(), 1);
    assert!(store.claim_emails(now + Duration::seconds(10), lease, 10).await.unwrap().is_empty(), "not due yet");
    let again = store.claim_emails(retry_at, retry_at + Duration::seconds(60), 10).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].attempts, 1);
    store.finish_email(again[0].id, EmailOutcome::Failed { error: "550".into() }, retry_at).await.unwrap();
    assert_eq!(store.pending_email_count().await.unwrap(), 0);
    // An expired lease (a sender that died) is claimed again.
    let (_, tok) = token(TokenPurpose::VerifyEmail, user.id, now, Duration::hours(1));
    let email = email::render(EmailTemplate::VerifyEmail, Locale::En, "http://x", user.email.clone(), now);
    store.issue_token(NewOneTimeToken { token: tok, email: Some(email) }).await.unwrap();
    let first = store.claim_emails(now, now + Duration::seconds(5), 10).await.unwrap();
    assert_eq!(first.len(), 1);
    let reclaimed = store.claim_emails(now + Duration::seconds(6), now + Duration::seconds(60), 10).await.unwrap();
    assert_eq!(reclaimed.len(), 1);
    assert_eq!(reclaimed[0].id, first[0].id);
    store.finish_email(reclaimed[0].id, EmailOutcome::Logged, now).await.unwrap();
    assert_eq!(store.pending_email_count().await.unwrap(), 0);
}

async fn issue(store: &Arc<dyn Store>, purpose: TokenPurpose, user: UserId, now: Timestamp) -> SecretToken {
    let (secret, tok) = token(purpose, user, now, Duration::hours(1));
    store.issue_token(NewOneTimeToken { token: tok, email: None }).await.unwrap();
    secret
}

pub async fn magic_login_drops_unproven_credentials(store: Arc<dyn Store>) {
    let now = t0();
    // Someone registered Ada's address with their own password and 2FA, and signed in
    // (possible when verification is not required).
    let user = store.create_user(new_user("ada@example.com", now), None, audit("a", now)).await.unwrap();
    store.set_totp_secret(user.id, "S".into(), now).await.unwrap();
    store.enable_totp(user.id, 1, vec![TokenDigest::of("c")], audit("m", now)).await.unwrap();
    let (_, s) = session_for(user.id, now);
    let squatter = store.create_session(s, audit("l", now)).await.unwrap();
    // Ada follows a magic link: the first proof of the mailbox.
    let secret = issue(&store, TokenPurpose::MagicLink, user.id, now).await;
    let (_, s) = session_for(user.id, now);
    let r = store
        .redeem_token(&secret.digest(), TokenPurpose::MagicLink, now, TokenEffect::MagicLogin(s), audit("l", now))
        .await
        .unwrap();
    assert!(r.user.email_verified_at.is_some());
    assert!(r.user.password_hash.is_none(), "the squatter's password is gone");
    assert!(!r.user.totp_enabled() && r.user.totp_secret.is_none(), "and their 2FA");
    assert_eq!(store.unused_recovery_codes(user.id).await.unwrap(), 0);
    let live: Vec<_> = store.list_sessions(user.id, now).await.unwrap().into_iter().map(|s| s.id).collect();
    assert_eq!(live, vec![r.session.unwrap().id], "the squatter's session ended");
    assert!(!live.contains(&squatter.id));
    // For a verified address, a magic link keeps the password.
    store.change_password(user.id, "chosen-by-ada".into(), None, audit("p", now)).await.unwrap();
    let secret = issue(&store, TokenPurpose::MagicLink, user.id, now).await;
    let (_, s) = session_for(user.id, now);
    let r = store
        .redeem_token(&secret.digest(), TokenPurpose::MagicLink, now, TokenEffect::MagicLogin(s), audit("l", now))
        .await
        .unwrap();
    assert_eq!(r.user.password_hash.as_deref(), Some("chosen-by-ada"));
}

pub async fn mfa_login_verifies_nothing(store: Arc<dyn Store>) {
    let now = t0();
    let user = store.create_user(new_user("ada@example.com", now), None, audit("a", now)).await.unwrap();
    let secret = issue(&store, TokenPurpose::MfaLogin, user.id, now).await;
    let (_, s) = session_for(user.id, now);
    let r = store
        .redeem_token(&secret.digest(), TokenPurpose::MfaLogin, now, TokenEffect::MfaLogin(s), audit("l", now))
        .await
        .unwrap();
    assert!(r.session.is_some());
    assert!(r.user.email_verified_at.is_none(), "a second factor proves nothing about the mailbox");
    assert_eq!(r.user.password_hash.as_deref(), Some("$argon2id$fake"));
}

pub async fn security_changes_end_outstanding_links(store: Arc<dyn Store>) {
    let now = t0();
    let user = store.create_user(new_user("ada@example.com", now), None, audit("a", now)).await.unwrap();
    let live = |purpose, secret: SecretToken| {
        let store = store.clone();
        async move { store.peek_token(&secret.digest(), purpose, now).await.unwrap().is_some() }
    };
    // A password change ends reset and magic links sent before it.
    let reset = issue(&store, TokenPurpose::PasswordReset, user.id, now).await;
    let magic = issue(&store, TokenPurpose::MagicLink, user.id, now).await;
    let verify = issue(&store, TokenPurpose::VerifyEmail, user.id, now).await;
    store.change_password(user.id, "new".into(), None, audit("p", now)).await.unwrap();
    assert!(!live(TokenPurpose::PasswordReset, reset).await);
    assert!(!live(TokenPurpose::MagicLink, magic).await);
    assert!(live(TokenPurpose::VerifyEmail, verify).await, "verification links are not credentials");
    // An email change ends links sent to the old address.
    let magic = issue(&store, TokenPurpose::MagicLink, user.id, now).await;
    let (change, mut tok) = token(TokenPurpose::ChangeEmail, user.id, now, Duration::hours(1));
    tok.new_email = Some(EmailAddress::parse("ada@new.example").unwrap());
    store.issue_token(NewOneTimeToken { token: tok, email: None }).await.unwrap();
    store
        .redeem_token(&change.digest(), TokenPurpose::ChangeEmail, now, TokenEffect::ChangeEmail, audit("e", now))
        .await
        .unwrap();
    assert!(!live(TokenPurpose::MagicLink, magic).await);
    // A reset ends the other links too.
    let first = issue(&store, TokenPurpose::PasswordReset, user.id, now).await;
    let second = issue(&store, TokenPurpose::PasswordReset, user.id, now).await;
    let effect = TokenEffect::ResetPassword { password_hash: "h".into() };
    store.redeem_token(&first.digest(), TokenPurpose::PasswordReset, now, effect, audit("r", now)).await.unwrap();
    assert!(!live(TokenPurpose::PasswordReset, second).await);
}
