//! The identity use cases: register, verify, log in (with a second factor), refresh,
//! reset, magic links, profile, sessions and 2FA management. Each validates its input,
//! does the slow or secret work (hashing, token generation) and ends in one `Store`
//! call. Access tokens (JWTs) are minted by the server from the sessions returned here.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use super::mfa;
use super::password::{self, HashCost, PasswordHasher, PasswordPolicyError};
use super::{
    EmailAddress, EmailError, Locale, MAX_NAME_CHARS, NewSession, NewUser, OneTimeToken, RefreshOutcome, Role,
    SecretToken, Session, SessionScope, TokenDigest, TokenEffect, TokenPurpose, User, UserStatus,
};
use crate::Timestamp;
use crate::audit::{Actor, AuditEvent, RequestOrigin, Severity};
use crate::email::{self, EmailTemplate};
use crate::ids::{AccountId, OneTimeTokenId, SessionId, UserId};
use crate::store::{NewOneTimeToken, Rotation, Store, StoreError};

/// Lifetimes and switches of the identity flows.
#[derive(Clone, Debug)]
pub struct IdentitySettings {
    /// Base of the links in emails, e.g. `https://auth.example.com`.
    pub public_url: String,
    pub session_ttl: Duration,
    pub verify_email_ttl: Duration,
    pub password_reset_ttl: Duration,
    pub magic_link_ttl: Duration,
    pub change_email_ttl: Duration,
    pub mfa_token_ttl: Duration,
    /// Refuse password login until the email is verified.
    pub require_verified_email: bool,
    pub hash_cost: HashCost,
}

impl Default for IdentitySettings {
    fn default() -> Self {
        Self {
            public_url: "http://127.0.0.1:8080".into(),
            session_ttl: Duration::from_secs(30 * 24 * 3600),
            verify_email_ttl: Duration::from_secs(24 * 3600),
            password_reset_ttl: Duration::from_secs(3600),
            magic_link_ttl: Duration::from_secs(15 * 60),
            change_email_ttl: Duration::from_secs(24 * 3600),
            mfa_token_ttl: Duration::from_secs(5 * 60),
            require_verified_email: true,
            hash_cost: HashCost::default(),
        }
    }
}

/// A per-field validation problem (422).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub field: &'static str,
    pub code: &'static str,
    pub message: String,
}

impl FieldError {
    fn new(field: &'static str, code: &'static str, message: impl Into<String>) -> Self {
        Self { field, code, message: message.into() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("invalid input")]
    Invalid(Vec<FieldError>),
    #[error("email address already registered")]
    EmailTaken,
    /// Wrong email or password; deliberately does not say which.
    #[error("invalid email or password")]
    InvalidCredentials,
    #[error("email address not verified")]
    EmailNotVerified,
    #[error("account suspended")]
    AccountSuspended,
    /// Unknown, used, expired or forged one-time token.
    #[error("invalid or expired token")]
    InvalidToken,
    #[error("invalid two-factor code")]
    InvalidMfaCode,
    #[error("two-factor authentication is already enabled")]
    MfaAlreadyEnabled,
    #[error("two-factor authentication is not enabled")]
    MfaNotEnabled,
    #[error("two-factor setup has not been started")]
    MfaNotSetUp,
    #[error("session not found")]
    SessionNotFound,
    #[error("refresh token reused; session revoked")]
    RefreshTokenReused,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<password::HashError> for IdentityError {
    fn from(e: password::HashError) -> Self {
        Self::Internal(e.to_string())
    }
}

/// A successful sign-in: the server turns it into an access token + refresh token.
#[derive(Debug)]
pub struct SignedIn {
    pub user: User,
    pub session: Session,
    pub refresh_token: SecretToken,
}

#[derive(Debug)]
#[allow(clippy::large_enum_variant, reason = "short-lived return value; boxing buys nothing")]
pub enum LoginOutcome {
    SignedIn(SignedIn),
    /// Password was right; a second factor is needed with this short-lived token.
    MfaRequired {
        mfa_token: SecretToken,
        expires_at: Timestamp,
    },
}

/// The second factor presented with an `mfa_token`.
#[derive(Debug, Clone)]
pub enum SecondFactor {
    Totp(String),
    RecoveryCode(String),
}

/// Registration input as received.
#[derive(Debug, Clone, Default)]
pub struct Registration {
    pub email: String,
    pub password: String,
    pub name: Option<String>,
    pub locale: Option<String>,
}

/// What 2FA setup shows the user.
#[derive(Debug, Clone)]
pub struct TotpSetup {
    pub secret: String,
    pub otpauth_uri: String,
}

/// Identity flows over one store.
#[derive(Clone)]
pub struct Identity {
    store: Arc<dyn Store>,
    hasher: PasswordHasher,
    settings: Arc<IdentitySettings>,
    /// Argon2 takes 19 MiB and tens of milliseconds per call: bound how many run at
    /// once so a login flood cannot exhaust memory or the blocking pool.
    hash_permits: Arc<Semaphore>,
}

fn now() -> Timestamp {
    time::OffsetDateTime::now_utc()
}

fn after(now: Timestamp, d: Duration) -> Timestamp {
    now + time::Duration::try_from(d).unwrap_or(time::Duration::MAX)
}

fn email_field(raw: &str) -> Result<EmailAddress, IdentityError> {
    EmailAddress::parse(raw).map_err(|e| {
        let code = match e {
            EmailError::TooLong => "too_long",
            EmailError::Invalid => "invalid_email",
        };
        IdentityError::Invalid(vec![FieldError::new("email", code, e.to_string())])
    })
}

fn password_field(field: &'static str, raw: &str) -> Result<(), IdentityError> {
    password::check_new_password(raw).map_err(|e| {
        let code = match e {
            PasswordPolicyError::TooShort => "too_short",
            PasswordPolicyError::TooLong => "too_long",
            PasswordPolicyError::TooCommon => "too_common",
        };
        IdentityError::Invalid(vec![FieldError::new(field, code, e.to_string())])
    })
}

/// Passwords presented for checking are capped too, so a huge one costs nothing.
fn presented_password_ok(raw: &str) -> bool {
    raw.chars().count() <= password::MAX_PASSWORD_CHARS
}

pub fn parse_name(raw: Option<&str>) -> Result<Option<String>, FieldError> {
    match raw.map(str::trim) {
        None | Some("") => Ok(None),
        Some(name) if name.chars().count() > MAX_NAME_CHARS => {
            Err(FieldError::new("name", "too_long", format!("name must be at most {MAX_NAME_CHARS} characters")))
        }
        Some(name) if name.chars().any(char::is_control) => {
            Err(FieldError::new("name", "invalid", "name contains control characters"))
        }
        Some(name) => Ok(Some(name.to_owned())),
    }
}

pub fn parse_locale(raw: Option<&str>) -> Result<Option<Locale>, FieldError> {
    match raw {
        None => Ok(None),
        Some(s) => Locale::parse(&s.to_ascii_lowercase())
            .map(Some)
            .ok_or_else(|| FieldError::new("locale", "unsupported", "supported locales: en, fr")),
    }
}

fn redeem_error(e: StoreError) -> IdentityError {
    match e {
        StoreError::NotFound => IdentityError::InvalidToken,
        StoreError::Conflict("users_email") => IdentityError::EmailTaken,
        other => IdentityError::Store(other),
    }
}

impl Identity {
    pub fn new(store: Arc<dyn Store>, settings: IdentitySettings) -> Result<Self, IdentityError> {
        let hasher = PasswordHasher::new(settings.hash_cost)?;
        let permits = std::thread::available_parallelism().map_or(2, |n| n.get() * 2);
        Ok(Self { store, hasher, settings: Arc::new(settings), hash_permits: Arc::new(Semaphore::new(permits)) })
    }

    pub fn settings(&self) -> &IdentitySettings {
        &self.settings
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    async fn hash(&self, password: &str) -> Result<String, IdentityError> {
        let _permit = self.hash_permits.acquire().await.map_err(|e| IdentityError::Internal(e.to_string()))?;
        let hasher = self.hasher.clone();
        let password = password.to_owned();
        tokio::task::spawn_blocking(move || hasher.hash(&password))
            .await
            .map_err(|e| IdentityError::Internal(e.to_string()))?
            .map_err(Into::into)
    }

    /// Verifies against `phc`, or against a dummy hash when there is none, so that
    /// "no such user" and "wrong password" cost the same time.
    async fn verify(&self, password: &str, phc: Option<&str>) -> Result<bool, IdentityError> {
        let _permit = self.hash_permits.acquire().await.map_err(|e| IdentityError::Internal(e.to_string()))?;
        let hasher = self.hasher.clone();
        let password = password.to_owned();
        let phc = phc.map(str::to_owned);
        tokio::task::spawn_blocking(move || match phc {
            Some(phc) => hasher.verify(&password, &phc),
            None => {
                hasher.verify_dummy(&password);
                false
            }
        })
        .await
        .map_err(|e| IdentityError::Internal(e.to_string()))
    }

    fn link(&self, path: &str, token: &SecretToken) -> String {
        format!("{}/{path}?token={}", self.settings.public_url.trim_end_matches('/'), token.expose())
    }

    fn one_time_token(
        &self,
        purpose: TokenPurpose,
        user: UserId,
        ttl: Duration,
        now: Timestamp,
    ) -> (SecretToken, OneTimeToken) {
        let secret = SecretToken::generate();
        let token = OneTimeToken {
            id: OneTimeTokenId::new(),
            digest: secret.digest(),
            purpose,
            user_id: user,
            new_email: None,
            created_at: now,
            expires_at: after(now, ttl),
            used_at: None,
        };
        (secret, token)
    }

    /// A token plus the email that carries its link.
    fn emailed_token(&self, purpose: TokenPurpose, user: &User, to: EmailAddress, now: Timestamp) -> NewOneTimeToken {
        let (ttl, template, path) = match purpose {
            TokenPurpose::VerifyEmail => (self.settings.verify_email_ttl, EmailTemplate::VerifyEmail, "verify-email"),
            TokenPurpose::ChangeEmail => (self.settings.change_email_ttl, EmailTemplate::ChangeEmail, "verify-email"),
            TokenPurpose::PasswordReset => {
                (self.settings.password_reset_ttl, EmailTemplate::PasswordReset, "reset-password")
            }
            TokenPurpose::MagicLink => (self.settings.magic_link_ttl, EmailTemplate::MagicLink, "magic-link"),
            TokenPurpose::MfaLogin => unreachable!("MFA tokens are never emailed"),
        };
        let (secret, mut token) = self.one_time_token(purpose, user.id, ttl, now);
        if purpose == TokenPurpose::ChangeEmail {
            token.new_email = Some(to.clone());
        }
        let email = email::render(template, user.locale, &self.link(path, &secret), to, now);
        NewOneTimeToken { token, email: Some(email) }
    }

    fn new_session(&self, user: UserId, origin: &RequestOrigin, now: Timestamp) -> (SecretToken, NewSession) {
        let refresh = SecretToken::generate();
        let session = NewSession {
            id: SessionId::new(),
            user_id: user,
            ip: origin.ip.clone(),
            user_agent: origin.user_agent.clone(),
            created_at: now,
            expires_at: after(now, self.settings.session_ttl),
            refresh_digest: refresh.digest(),
        };
        (refresh, session)
    }

    // ---- registration and verification -------------------------------------------

    pub async fn register(&self, input: Registration, origin: &RequestOrigin) -> Result<User, IdentityError> {
        let mut errors = Vec::new();
        let email = email_field(&input.email).map_err(|e| errors.extend(field_errors(e))).ok();
        if let Err(e) = password_field("password", &input.password) {
            errors.extend(field_errors(e));
        }
        let name = parse_name(input.name.as_deref()).map_err(|e| errors.push(e)).ok().flatten();
        let locale = parse_locale(input.locale.as_deref()).map_err(|e| errors.push(e)).ok().flatten();
        let (Some(email), true) = (email, errors.is_empty()) else {
            return Err(IdentityError::Invalid(errors));
        };
        let password_hash = self.hash(&input.password).await?;
        let now = now();
        let new_user = NewUser {
            id: UserId::new(),
            account_id: AccountId::new(),
            email: email.clone(),
            email_verified: false,
            name,
            locale: locale.unwrap_or_default(),
            password_hash: Some(password_hash),
            role: Role::User,
            created_at: now,
        };
        let placeholder = user_from_new(&new_user);
        let token = self.emailed_token(TokenPurpose::VerifyEmail, &placeholder, email, now);
        let audit = AuditEvent::new(Actor::Anonymous, "user.registered", origin, now).target_user(new_user.id);
        self.store.create_user(new_user, Some(token), audit).await.map_err(|e| match e {
            StoreError::Conflict("users_email") => IdentityError::EmailTaken,
            other => other.into(),
        })
    }

    /// Sends a new verification link if the address belongs to an unverified user.
    /// Says nothing either way (no enumeration).
    pub async fn resend_verification(&self, raw_email: &str) -> Result<(), IdentityError> {
        let Ok(email) = EmailAddress::parse(raw_email) else {
            return Ok(());
        };
        let Some(user) = self.store.user_by_email(&email).await? else {
            return Ok(());
        };
        if user.email_verified_at.is_some() || user.status != UserStatus::Active {
            return Ok(());
        }
        let token = self.emailed_token(TokenPurpose::VerifyEmail, &user, user.email.clone(), now());
        self.store.issue_token(token).await?;
        Ok(())
    }

    /// Redeems a verification link: either a new account's address, or the new address
    /// of an email change.
    pub async fn verify_email(&self, token: &str, origin: &RequestOrigin) -> Result<User, IdentityError> {
        let digest = TokenDigest::of(token);
        let now = now();
        for (purpose, effect, action) in [
            (TokenPurpose::VerifyEmail, TokenEffect::VerifyEmail, "email.verified"),
            (TokenPurpose::ChangeEmail, TokenEffect::ChangeEmail, "email.changed"),
        ] {
            let audit = AuditEvent::new(Actor::Anonymous, action, origin, now);
            match self.store.redeem_token(&digest, purpose, now, effect, audit).await {
                Ok(redeemed) => return Ok(redeemed.user),
                Err(StoreError::NotFound) => continue,
                Err(e) => return Err(redeem_error(e)),
            }
        }
        Err(IdentityError::InvalidToken)
    }

    // ---- login ---------------------------------------------------------------------

    /// Password login. Unknown email and wrong password are indistinguishable, in the
    /// answer and in time. Every outcome is recorded in the audit log.
    pub async fn login(
        &self,
        raw_email: &str,
        password: &str,
        origin: &RequestOrigin,
    ) -> Result<LoginOutcome, IdentityError> {
        let now = now();
        let email = EmailAddress::parse(raw_email).ok();
        let user = match &email {
            Some(email) => self.store.user_by_email(email).await?,
            None => None,
        };
        let phc = user.as_ref().and_then(|u| u.password_hash.as_deref());
        let password_ok = presented_password_ok(password) && self.verify(password, phc).await?;
        let fail = |reason: &str, user: Option<&User>| {
            let mut event = AuditEvent::new(Actor::Anonymous, "login.failed", origin, now)
                .severity(Severity::Warning)
                .meta("method", "password")
                .meta("reason", reason)
                .meta("email", raw_email.chars().take(254).collect::<String>());
            if let Some(user) = user {
                event = event.target_user(user.id);
            }
            event
        };
        let user = match (user, password_ok) {
            (Some(user), true) => user,
            (user, _) => {
                self.store.record_audit(fail("invalid_credentials", user.as_ref())).await?;
                return Err(IdentityError::InvalidCredentials);
            }
        };
        match user.status {
            UserStatus::Active => {}
            UserStatus::Suspended => {
                self.store.record_audit(fail("suspended", Some(&user))).await?;
                return Err(IdentityError::AccountSuspended);
            }
            UserStatus::Deleted => {
                self.store.record_audit(fail("deleted", Some(&user))).await?;
                return Err(IdentityError::InvalidCredentials);
            }
        }
        if self.settings.require_verified_email && user.email_verified_at.is_none() {
            self.store.record_audit(fail("email_not_verified", Some(&user))).await?;
            return Err(IdentityError::EmailNotVerified);
        }
        if user.totp_enabled() {
            return self.require_second_factor(&user, now).await;
        }
        self.open_session(user, origin, "password", now).await.map(LoginOutcome::SignedIn)
    }

    async fn require_second_factor(&self, user: &User, now: Timestamp) -> Result<LoginOutcome, IdentityError> {
        let (secret, token) = self.one_time_token(TokenPurpose::MfaLogin, user.id, self.settings.mfa_token_ttl, now);
        let expires_at = token.expires_at;
        self.store.issue_token(NewOneTimeToken { token, email: None }).await?;
        Ok(LoginOutcome::MfaRequired { mfa_token: secret, expires_at })
    }

    async fn open_session(
        &self,
        user: User,
        origin: &RequestOrigin,
        method: &str,
        now: Timestamp,
    ) -> Result<SignedIn, IdentityError> {
        let (refresh_token, new_session) = self.new_session(user.id, origin, now);
        let audit = AuditEvent::new(Actor::User(user.id), "login.succeeded", origin, now)
            .target_user(user.id)
            .meta("method", method);
        let session = self.store.create_session(new_session, audit).await?;
        Ok(SignedIn { user, session, refresh_token })
    }

    /// Completes a login that needed a second factor. A TOTP code is accepted once; a
    /// recovery code is used up. The `mfa_token` survives wrong codes (the caller rate
    /// limits attempts) but not success.
    pub async fn login_mfa(
        &self,
        mfa_token: &str,
        factor: SecondFactor,
        origin: &RequestOrigin,
    ) -> Result<SignedIn, IdentityError> {
        let now = now();
        let digest = TokenDigest::of(mfa_token);
        let token =
            self.store.peek_token(&digest, TokenPurpose::MfaLogin, now).await?.ok_or(IdentityError::InvalidToken)?;
        let user = self.store.user_by_id(token.user_id).await?.ok_or(IdentityError::InvalidToken)?;
        let (accepted, method) = match &factor {
            SecondFactor::Totp(code) => (self.accept_totp(&user, code, now).await?, "totp"),
            SecondFactor::RecoveryCode(code) => {
                (self.store.use_recovery_code(user.id, &mfa::recovery_code_digest(code), now).await?, "recovery_code")
            }
        };
        if !accepted {
            let event = AuditEvent::new(Actor::Anonymous, "login.failed", origin, now)
                .target_user(user.id)
                .severity(Severity::Warning)
                .meta("method", method)
                .meta("reason", "invalid_mfa_code");
            self.store.record_audit(event).await?;
            return Err(IdentityError::InvalidMfaCode);
        }
        let (refresh_token, new_session) = self.new_session(user.id, origin, now);
        let audit = AuditEvent::new(Actor::User(user.id), "login.succeeded", origin, now)
            .target_user(user.id)
            .meta("method", method);
        let redeemed = self
            .store
            .redeem_token(&digest, TokenPurpose::MfaLogin, now, TokenEffect::MfaLogin(new_session), audit)
            .await
            .map_err(redeem_error)?;
        let session = redeemed.session.ok_or_else(|| IdentityError::Internal("no session opened".into()))?;
        Ok(SignedIn { user: redeemed.user, session, refresh_token })
    }

    /// Whose login an `mfa_token` continues, if it is live (for rate limiting attempts
    /// per user rather than per token, since a password holder can mint tokens).
    pub async fn mfa_token_user(&self, mfa_token: &str) -> Result<Option<UserId>, IdentityError> {
        let token = self.store.peek_token(&TokenDigest::of(mfa_token), TokenPurpose::MfaLogin, now()).await?;
        Ok(token.map(|t| t.user_id))
    }

    /// True when `code` is valid now and its step was not used before.
    async fn accept_totp(&self, user: &User, code: &str, now: Timestamp) -> Result<bool, IdentityError> {
        let (Some(secret), true) = (&user.totp_secret, user.totp_enabled()) else {
            return Ok(false);
        };
        let Some(step) = mfa::check_totp(secret, code, now.unix_timestamp().max(0) as u64) else {
            return Ok(false);
        };
        Ok(self.store.use_totp_step(user.id, step).await?)
    }

    /// Rotates a refresh token. Presenting a token that was already rotated revokes the
    /// session: either the client or an attacker holds a stolen copy.
    pub async fn refresh(&self, refresh_token: &str) -> Result<SignedIn, IdentityError> {
        let replacement = SecretToken::generate();
        let rotation =
            Rotation { presented: TokenDigest::of(refresh_token), replacement: replacement.digest(), now: now() };
        match self.store.rotate_refresh_token(rotation).await? {
            RefreshOutcome::Rotated { session, user } if user.status == UserStatus::Active => {
                Ok(SignedIn { user, session, refresh_token: replacement })
            }
            RefreshOutcome::Rotated { .. } => Err(IdentityError::AccountSuspended),
            RefreshOutcome::Reused { .. } => Err(IdentityError::RefreshTokenReused),
            RefreshOutcome::Invalid => Err(IdentityError::InvalidToken),
        }
    }

    pub async fn logout(&self, user: UserId, session: SessionId, origin: &RequestOrigin) -> Result<(), IdentityError> {
        let audit = AuditEvent::new(Actor::User(user), "logout", origin, now()).target_user(user);
        match self.store.revoke_sessions(user, SessionScope::One(session), audit).await {
            Ok(_) | Err(StoreError::NotFound) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    // ---- password reset and magic links --------------------------------------------

    /// Emails a reset link if the address belongs to an active user. Always succeeds
    /// from the caller's point of view; the caller answers 202 either way.
    pub async fn forgot_password(&self, raw_email: &str) -> Result<(), IdentityError> {
        self.email_link_if_active(raw_email, TokenPurpose::PasswordReset).await
    }

    pub async fn request_magic_link(&self, raw_email: &str) -> Result<(), IdentityError> {
        self.email_link_if_active(raw_email, TokenPurpose::MagicLink).await
    }

    async fn email_link_if_active(&self, raw_email: &str, purpose: TokenPurpose) -> Result<(), IdentityError> {
        let Ok(email) = EmailAddress::parse(raw_email) else {
            return Ok(());
        };
        let Some(user) = self.store.user_by_email(&email).await? else {
            return Ok(());
        };
        if user.status != UserStatus::Active {
            return Ok(());
        }
        let token = self.emailed_token(purpose, &user, user.email.clone(), now());
        self.store.issue_token(token).await?;
        Ok(())
    }

    /// Sets a new password from a reset link; every session ends.
    pub async fn reset_password(
        &self,
        token: &str,
        new_password: &str,
        origin: &RequestOrigin,
    ) -> Result<User, IdentityError> {
        password_field("password", new_password)?;
        let digest = TokenDigest::of(token);
        let now = now();
        // Check the token before paying for a hash.
        let live = self
            .store
            .peek_token(&digest, TokenPurpose::PasswordReset, now)
            .await?
            .ok_or(IdentityError::InvalidToken)?;
        let password_hash = self.hash(new_password).await?;
        let audit = AuditEvent::new(Actor::User(live.user_id), "password.reset", origin, now).target_user(live.user_id);
        let redeemed = self
            .store
            .redeem_token(
                &digest,
                TokenPurpose::PasswordReset,
                now,
                TokenEffect::ResetPassword { password_hash },
                audit,
            )
            .await
            .map_err(redeem_error)?;
        Ok(redeemed.user)
    }

    /// Signs in with a magic link. A verified user with 2FA still has to give a second
    /// factor; for an unverified address the link is the first proof of ownership, so
    /// it replaces whatever credentials the registrant set (see `TokenEffect`).
    pub async fn verify_magic_link(&self, token: &str, origin: &RequestOrigin) -> Result<LoginOutcome, IdentityError> {
        let digest = TokenDigest::of(token);
        let now = now();
        let live =
            self.store.peek_token(&digest, TokenPurpose::MagicLink, now).await?.ok_or(IdentityError::InvalidToken)?;
        let user = self.store.user_by_id(live.user_id).await?.ok_or(IdentityError::InvalidToken)?;
        if user.totp_enabled() && user.email_verified_at.is_some() {
            let audit = AuditEvent::new(Actor::User(user.id), "magic_link.used", origin, now).target_user(user.id);
            let redeemed = self
                .store
                .redeem_token(&digest, TokenPurpose::MagicLink, now, TokenEffect::Consume, audit)
                .await
                .map_err(redeem_error)?;
            return self.require_second_factor(&redeemed.user, now).await;
        }
        let (refresh_token, new_session) = self.new_session(user.id, origin, now);
        let audit = AuditEvent::new(Actor::User(user.id), "login.succeeded", origin, now)
            .target_user(user.id)
            .meta("method", "magic_link");
        let redeemed = self
            .store
            .redeem_token(&digest, TokenPurpose::MagicLink, now, TokenEffect::MagicLogin(new_session), audit)
            .await
            .map_err(redeem_error)?;
        let session = redeemed.session.ok_or_else(|| IdentityError::Internal("no session opened".into()))?;
        Ok(LoginOutcome::SignedIn(SignedIn { user: redeemed.user, session, refresh_token }))
    }

    // ---- the signed-in user ----------------------------------------------------------

    pub async fn update_profile(
        &self,
        user: UserId,
        name: Option<Option<String>>,
        locale: Option<Locale>,
    ) -> Result<User, IdentityError> {
        Ok(self.store.update_profile(user, name, locale, now()).await?)
    }

    /// Changes the password after checking the current one; other sessions end.
    pub async fn change_password(
        &self,
        user: &User,
        session: SessionId,
        current: &str,
        new: &str,
        origin: &RequestOrigin,
    ) -> Result<(), IdentityError> {
        password_field("new", new)?;
        self.check_password(user, current).await?;
        let hash = self.hash(new).await?;
        let audit = AuditEvent::new(Actor::User(user.id), "password.changed", origin, now()).target_user(user.id);
        self.store.change_password(user.id, hash, Some(session), audit).await?;
        Ok(())
    }

    async fn check_password(&self, user: &User, presented: &str) -> Result<(), IdentityError> {
        if presented_password_ok(presented) && self.verify(presented, user.password_hash.as_deref()).await? {
            Ok(())
        } else {
            Err(IdentityError::InvalidCredentials)
        }
    }

    /// Sends a confirmation link to `new_email`; the address changes only when it is
    /// followed (through `verify_email`).
    pub async fn request_email_change(
        &self,
        user: &User,
        new_email: &str,
        password: &str,
    ) -> Result<(), IdentityError> {
        let email = email_field(new_email)?;
        self.check_password(user, password).await?;
        if self.store.user_by_email(&email).await?.is_some() {
            return Err(IdentityError::EmailTaken);
        }
        let token = self.emailed_token(TokenPurpose::ChangeEmail, user, email, now());
        self.store.issue_token(token).await?;
        Ok(())
    }

    pub async fn sessions(&self, user: UserId) -> Result<Vec<Session>, IdentityError> {
        Ok(self.store.list_sessions(user, now()).await?)
    }

    pub async fn revoke_sessions(
        &self,
        user: UserId,
        scope: SessionScope,
        origin: &RequestOrigin,
    ) -> Result<u64, IdentityError> {
        let audit = AuditEvent::new(Actor::User(user), "session.revoked", origin, now()).target_user(user).meta(
            "scope",
            match scope {
                SessionScope::One(id) => id.to_string(),
                SessionScope::AllExcept(_) => "others".to_owned(),
                SessionScope::All => "all".to_owned(),
            },
        );
        self.store.revoke_sessions(user, scope, audit).await.map_err(|e| match e {
            StoreError::NotFound => IdentityError::SessionNotFound,
            other => other.into(),
        })
    }

    // ---- two-factor authentication ---------------------------------------------------

    pub async fn totp_setup(&self, user: &User) -> Result<TotpSetup, IdentityError> {
        if user.totp_enabled() {
            return Err(IdentityError::MfaAlreadyEnabled);
        }
        let secret = mfa::new_totp_secret();
        let otpauth_uri =
            mfa::otpauth_uri(&secret, user.email.as_str(), None).map_err(|e| IdentityError::Internal(e.to_string()))?;
        self.store.set_totp_secret(user.id, secret.clone(), now()).await.map_err(|e| match e {
            StoreError::Conflict(_) => IdentityError::MfaAlreadyEnabled,
            other => other.into(),
        })?;
        Ok(TotpSetup { secret, otpauth_uri })
    }

    /// Turns 2FA on once the user proves the secret with a code; returns the recovery
    /// codes, shown this once. Needs the password too: with a stolen access token alone
    /// nobody can lock the owner out behind an authenticator of their own.
    pub async fn totp_enable(
        &self,
        user: &User,
        password: &str,
        code: &str,
        origin: &RequestOrigin,
    ) -> Result<Vec<String>, IdentityError> {
        if user.totp_enabled() {
            return Err(IdentityError::MfaAlreadyEnabled);
        }
        self.check_password(user, password).await?;
        let secret = user.totp_secret.as_deref().ok_or(IdentityError::MfaNotSetUp)?;
        let now = now();
        let step =
            mfa::check_totp(secret, code, now.unix_timestamp().max(0) as u64).ok_or(IdentityError::InvalidMfaCode)?;
        let (codes, digests) = mfa::new_recovery_codes();
        let audit = AuditEvent::new(Actor::User(user.id), "mfa.enabled", origin, now).target_user(user.id);
        self.store.enable_totp(user.id, step, digests, audit).await.map_err(|e| match e {
            StoreError::Conflict(_) => IdentityError::MfaAlreadyEnabled,
            StoreError::NotFound => IdentityError::MfaNotSetUp,
            other => other.into(),
        })?;
        Ok(codes)
    }

    /// Turns 2FA off; needs both the password and a current code.
    pub async fn totp_disable(
        &self,
        user: &User,
        password: &str,
        code: &str,
        origin: &RequestOrigin,
    ) -> Result<(), IdentityError> {
        if !user.totp_enabled() {
            return Err(IdentityError::MfaNotEnabled);
        }
        self.check_password(user, password).await?;
        let now = now();
        if !self.accept_totp(user, code, now).await? {
            return Err(IdentityError::InvalidMfaCode);
        }
        let audit = AuditEvent::new(Actor::User(user.id), "mfa.disabled", origin, now)
            .target_user(user.id)
            .severity(Severity::Warning);
        self.store.disable_totp(user.id, audit).await?;
        Ok(())
    }

    /// New recovery codes (the old ones stop working); needs the password, since the
    /// codes exist for when the authenticator is lost.
    pub async fn regenerate_recovery_codes(
        &self,
        user: &User,
        password: &str,
        origin: &RequestOrigin,
    ) -> Result<Vec<String>, IdentityError> {
        if !user.totp_enabled() {
            return Err(IdentityError::MfaNotEnabled);
        }
        self.check_password(user, password).await?;
        let (codes, digests) = mfa::new_recovery_codes();
        let audit =
            AuditEvent::new(Actor::User(user.id), "mfa.recovery_codes_regenerated", origin, now()).target_user(user.id);
        self.store.replace_recovery_codes(user.id, digests, audit).await?;
        Ok(codes)
    }

    // ---- operators -------------------------------------------------------------------

    /// Creates an admin (or promotes an existing user) and returns a one-time link that
    /// sets their password through the reset endpoint.
    pub async fn create_admin(&self, raw_email: &str) -> Result<(User, String), IdentityError> {
        let email = email_field(raw_email)?;
        let now = now();
        let new_user = NewUser {
            id: UserId::new(),
            account_id: AccountId::new(),
            email,
            email_verified: false,
            name: None,
            locale: Locale::default(),
            password_hash: None,
            role: Role::Admin,
            created_at: now,
        };
        // The store binds the token to whichever user ends up admin.
        let (secret, token) =
            self.one_time_token(TokenPurpose::PasswordReset, new_user.id, self.settings.password_reset_ttl, now);
        let audit = AuditEvent::new(Actor::System, "user.admin_granted", &RequestOrigin::default(), now)
            .severity(Severity::Critical);
        let user = self.store.upsert_admin(new_user, token, audit).await?;
        Ok((user, self.link("reset-password", &secret)))
    }
}

fn field_errors(e: IdentityError) -> Vec<FieldError> {
    match e {
        IdentityError::Invalid(errors) => errors,
        _ => Vec::new(),
    }
}

/// The user a `NewUser` becomes, for rendering their first email before it exists.
fn user_from_new(new: &NewUser) -> User {
    User {
        id: new.id,
        email: new.email.clone(),
        email_verified_at: None,
        name: new.name.clone(),
        locale: new.locale,
        password_hash: None,
        status: UserStatus::Active,
        role: new.role,
        account_id: new.account_id,
        totp_secret: None,
        totp_enabled_at: None,
        totp_last_step: None,
        created_at: new.created_at,
        updated_at: new.created_at,
        last_login_at: None,
    }
}
