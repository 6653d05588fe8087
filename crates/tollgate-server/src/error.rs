//! `ApiError`: every failure a client can see, and the one table that maps each to a
//! stable snake_case code and an HTTP status. Internal errors are logged here, once,
//! with their source, and never shown.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tollgate_core::StoreError;
use tollgate_core::identity::IdentityError;
use tollgate_core::identity::flows::FieldError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("request body is not valid JSON: {0}")]
    MalformedJson(String),
    #[error("request body does not match the expected shape")]
    InvalidBody { fields: BTreeMap<String, String> },
    #[error("some fields are invalid")]
    Validation(Vec<FieldError>),
    #[error("request body is larger than 1 MiB")]
    PayloadTooLarge,
    #[error("expected Content-Type: application/json")]
    UnsupportedMediaType,
    #[error("authentication required")]
    Unauthenticated,
    #[error("invalid email or password")]
    InvalidCredentials,
    #[error("email address not verified")]
    EmailNotVerified,
    #[error("account suspended")]
    AccountSuspended,
    #[error("not allowed")]
    Forbidden,
    #[error("the admin API requires two-factor authentication on this account")]
    Admin2faRequired,
    #[error("an impersonation token cannot do this")]
    ImpersonationForbidden,
    #[error("an API key cannot do this: sign in")]
    ApiKeyForbidden,
    #[error("an admin cannot suspend, delete or demote themselves")]
    AdminSelfChange,
    #[error("not found")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("email address already registered")]
    EmailTaken,
    #[error("invalid or expired token")]
    InvalidToken,
    #[error("invalid or expired refresh token")]
    InvalidRefreshToken,
    #[error("refresh token already used; the session has been revoked")]
    RefreshTokenReused,
    #[error("invalid or expired mfa_token")]
    InvalidMfaToken,
    #[error("invalid two-factor code")]
    InvalidMfaCode,
    #[error("two-factor authentication is already enabled")]
    MfaAlreadyEnabled,
    #[error("two-factor authentication is not enabled")]
    MfaNotEnabled,
    #[error("start two-factor setup first")]
    MfaNotSetUp,
    #[error("this key lacks the {0} scope")]
    MissingScope(&'static str),
    #[error("Idempotency-Key must be 1 to 255 visible characters")]
    InvalidIdempotencyKey,
    #[error("this Idempotency-Key was used for another request")]
    IdempotencyKeyReused,
    #[error("no plan named {0:?}")]
    UnknownPlan(String),
    #[error("a plan named {0:?} exists (archived plans count)")]
    PlanExists(String),
    #[error("the default plan cannot be removed (the plans file chooses it)")]
    DefaultPlan,
    #[error("no rate limit scope named {0:?} in the plan")]
    UnknownRateLimitScope(String),
    #[error("no meter named {0:?}")]
    UnknownMeter(String),
    #[error("{0}")]
    UnsupportedMeter(String),
    #[error("too many requests")]
    RateLimited { retry_after: Duration, limit: u32, reset_after: Duration },
    #[error("the resource kept changing under this request; try again")]
    ConcurrentChange,
    #[error("not enough credits")]
    InsufficientCredits { balance: i64, requested: i64 },
    #[error("no credit package named {0:?}")]
    UnknownCreditPackage(String),
    #[error("billing with {0} is not configured on this server")]
    BillingNotConfigured(&'static str),
    #[error("{0}")]
    BillingUnsupported(&'static str),
    #[error("the payment provider could not be reached; try again")]
    PaymentProviderUnavailable(String),
    #[error("the payment provider refused the request")]
    PaymentProviderRefused(String),
    #[error("webhook signature verification failed")]
    InvalidSignature,
    #[error("webhook payload is not a valid event")]
    InvalidWebhookPayload,
    #[error("service unavailable")]
    Unavailable(String),
    #[error("internal error")]
    Internal(String),
}

#[derive(Serialize)]
struct Body<'a> {
    error: ErrorBody<'a>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: &'a str,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<serde_json::Value>,
}

impl ApiError {
    /// The table: stable code and status for every error.
    pub fn code_and_status(&self) -> (&'static str, StatusCode) {
        use ApiError::*;
        match self {
            MalformedJson(_) => ("malformed_json", StatusCode::BAD_REQUEST),
            InvalidBody { .. } => ("invalid_body", StatusCode::UNPROCESSABLE_ENTITY),
            Validation(_) => ("validation_failed", StatusCode::UNPROCESSABLE_ENTITY),
            PayloadTooLarge => ("payload_too_large", StatusCode::PAYLOAD_TOO_LARGE),
            UnsupportedMediaType => ("unsupported_media_type", StatusCode::UNSUPPORTED_MEDIA_TYPE),
            Unauthenticated => ("unauthenticated", StatusCode::UNAUTHORIZED),
            InvalidCredentials => ("invalid_credentials", StatusCode::UNAUTHORIZED),
            EmailNotVerified => ("email_not_verified", StatusCode::FORBIDDEN),
            AccountSuspended => ("account_suspended", StatusCode::FORBIDDEN),
            Forbidden => ("forbidden", StatusCode::FORBIDDEN),
            Admin2faRequired => ("admin_2fa_required", StatusCode::FORBIDDEN),
            ImpersonationForbidden => ("impersonation_forbidden", StatusCode::FORBIDDEN),
            ApiKeyForbidden => ("api_key_forbidden", StatusCode::FORBIDDEN),
            AdminSelfChange => ("admin_self_change", StatusCode::CONFLICT),
            NotFound => ("not_found", StatusCode::NOT_FOUND),
            MethodNotAllowed => ("method_not_allowed", StatusCode::METHOD_NOT_ALLOWED),
            EmailTaken => ("email_taken", StatusCode::CONFLICT),
            InvalidToken => ("invalid_token", StatusCode::BAD_REQUEST),
            InvalidRefreshToken => ("invalid_refresh_token", StatusCode::UNAUTHORIZED),
            RefreshTokenReused => ("refresh_token_reused", StatusCode::UNAUTHORIZED),
            InvalidMfaToken => ("invalid_mfa_token", StatusCode::UNAUTHORIZED),
            InvalidMfaCode => ("invalid_mfa_code", StatusCode::UNAUTHORIZED),
            MfaAlreadyEnabled => ("mfa_already_enabled", StatusCode::CONFLICT),
            MfaNotEnabled => ("mfa_not_enabled", StatusCode::CONFLICT),
            MfaNotSetUp => ("mfa_not_set_up", StatusCode::CONFLICT),
            MissingScope(_) => ("insufficient_scope", StatusCode::FORBIDDEN),
            InvalidIdempotencyKey => ("invalid_idempotency_key", StatusCode::BAD_REQUEST),
            IdempotencyKeyReused => ("idempotency_key_reused", StatusCode::UNPROCESSABLE_ENTITY),
            UnknownPlan(_) => ("unknown_plan", StatusCode::UNPROCESSABLE_ENTITY),
            PlanExists(_) => ("plan_exists", StatusCode::CONFLICT),
            DefaultPlan => ("default_plan", StatusCode::CONFLICT),
            UnknownMeter(_) => ("unknown_meter", StatusCode::UNPROCESSABLE_ENTITY),
            UnknownRateLimitScope(_) => ("unknown_scope", StatusCode::UNPROCESSABLE_ENTITY),
            UnsupportedMeter(_) => ("unsupported_meter_kind", StatusCode::UNPROCESSABLE_ENTITY),
            RateLimited { .. } => ("rate_limited", StatusCode::TOO_MANY_REQUESTS),
            ConcurrentChange => ("concurrent_change", StatusCode::CONFLICT),
            InsufficientCredits { .. } => ("insufficient_credits", StatusCode::PAYMENT_REQUIRED),
            UnknownCreditPackage(_) => ("unknown_credit_package", StatusCode::UNPROCESSABLE_ENTITY),
            BillingNotConfigured(_) => ("billing_not_configured", StatusCode::SERVICE_UNAVAILABLE),
            BillingUnsupported(_) => ("billing_unsupported", StatusCode::UNPROCESSABLE_ENTITY),
            PaymentProviderUnavailable(_) => ("payment_provider_unavailable", StatusCode::BAD_GATEWAY),
            PaymentProviderRefused(_) => ("payment_provider_error", StatusCode::BAD_GATEWAY),
            InvalidSignature => ("invalid_signature", StatusCode::BAD_REQUEST),
            InvalidWebhookPayload => ("invalid_payload", StatusCode::BAD_REQUEST),
            Unavailable(_) => ("service_unavailable", StatusCode::SERVICE_UNAVAILABLE),
            Internal(_) => ("internal_error", StatusCode::INTERNAL_SERVER_ERROR),
        }
    }

    fn details(&self) -> Option<serde_json::Value> {
        match self {
            ApiError::InvalidBody { fields } => Some(serde_json::json!({ "fields": fields })),
            ApiError::Validation(errors) => {
                let fields: BTreeMap<&str, serde_json::Value> = errors
                    .iter()
                    .map(|e| (e.field, serde_json::json!({ "code": e.code, "message": e.message })))
                    .collect();
                Some(serde_json::json!({ "fields": fields }))
            }
            ApiError::MalformedJson(reason) => Some(serde_json::json!({ "reason": reason })),
            ApiError::InsufficientCredits { balance, requested } => {
                Some(serde_json::json!({ "balance": balance, "requested": requested }))
            }
            ApiError::RateLimited { retry_after, .. } => {
                Some(serde_json::json!({ "retry_after_seconds": ceil_secs(*retry_after) }))
            }
            _ => None,
        }
    }
}

pub fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

// Header names made once: a name inserted as a `&str` is parsed, and one that is not
// a standard header copied into a new allocation, on every answer.
static RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
static RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
static RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

/// `RateLimit-*` headers (IETF draft) plus `Retry-After` when denied.
pub fn rate_limit_headers(
    headers: &mut HeaderMap,
    limit: u32,
    remaining: u32,
    reset_after: Duration,
    retry_after: Option<Duration>,
) {
    headers.insert(RATELIMIT_LIMIT.clone(), HeaderValue::from(limit));
    headers.insert(RATELIMIT_REMAINING.clone(), HeaderValue::from(remaining));
    headers.insert(RATELIMIT_RESET.clone(), HeaderValue::from(ceil_secs(reset_after)));
    if let Some(retry) = retry_after {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(ceil_secs(retry).max(1)));
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (code, status) = self.code_and_status();
        let message = match &self {
            ApiError::Internal(source) => {
                tracing::error!(error.source = %source, "internal error");
                self.to_string()
            }
            ApiError::Unavailable(source)
            | ApiError::PaymentProviderUnavailable(source)
            | ApiError::PaymentProviderRefused(source) => {
                tracing::warn!(error.source = %source, "dependency unavailable or refused");
                self.to_string()
            }
            other => other.to_string(),
        };
        let body = Body { error: ErrorBody { code, message, details: self.details() } };
        let mut response = (status, axum::Json(body)).into_response();
        if let ApiError::RateLimited { retry_after, limit, reset_after } = self {
            rate_limit_headers(response.headers_mut(), limit, 0, reset_after, Some(retry_after));
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => ApiError::NotFound,
            StoreError::Conflict("users_email") => ApiError::EmailTaken,
            StoreError::Conflict("subscription_changed" | "plan_changed") => ApiError::ConcurrentChange,
            StoreError::Conflict("idempotency_key") => ApiError::IdempotencyKeyReused,
            StoreError::Conflict("api_keys_limit") => ApiError::Validation(vec![FieldError {
                field: "api_keys",
                code: "too_many",
                message: format!("at most {} live API keys per account", tollgate_core::api_keys::MAX_PER_ACCOUNT),
            }]),
            StoreError::Conflict("credits_overflow") => ApiError::Validation(vec![FieldError {
                field: "amount",
                code: "too_large",
                message: "the balance would overflow".into(),
            }]),
            StoreError::Unavailable(s) => ApiError::Unavailable(s),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<IdentityError> for ApiError {
    fn from(e: IdentityError) -> Self {
        use IdentityError as E;
        match e {
            E::Invalid(errors) => ApiError::Validation(errors),
            E::EmailTaken => ApiError::EmailTaken,
            E::InvalidCredentials => ApiError::InvalidCredentials,
            E::EmailNotVerified => ApiError::EmailNotVerified,
            E::AccountSuspended => ApiError::AccountSuspended,
            E::InvalidToken => ApiError::InvalidToken,
            E::InvalidMfaCode => ApiError::InvalidMfaCode,
            E::MfaAlreadyEnabled => ApiError::MfaAlreadyEnabled,
            E::MfaNotEnabled => ApiError::MfaNotEnabled,
            E::MfaNotSetUp => ApiError::MfaNotSetUp,
            E::SessionNotFound => ApiError::NotFound,
            E::RefreshTokenReused => ApiError::RefreshTokenReused,
            E::Store(s) => s.into(),
            E::Internal(s) => ApiError::Internal(s),
        }
    }
}

impl From<tollgate_core::metering::quotas::QuotaError> for ApiError {
    fn from(e: tollgate_core::metering::quotas::QuotaError) -> Self {
        use tollgate_core::metering::quotas::QuotaError as E;
        match e {
            E::UnknownMeter(m) => ApiError::UnknownMeter(m),
            E::UnsupportedKind(kind, op) => {
                let name = |v: serde_json::Result<serde_json::Value>| {
                    v.ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
                };
                ApiError::UnsupportedMeter(format!(
                    "{} meters do not support {} (not yet, for concurrency meters)",
                    name(serde_json::to_value(kind)),
                    name(serde_json::to_value(op))
                ))
            }
            E::InvalidAmount => ApiError::Validation(vec![tollgate_core::identity::flows::FieldError {
                field: "amount",
                code: "must_be_positive",
                message: "amount must be a positive integer".into(),
            }]),
            E::AccountNotFound | E::LeaseNotFound | E::ReservationNotFound => ApiError::NotFound,
            E::NothingToReset => ApiError::Validation(vec![tollgate_core::identity::flows::FieldError {
                field: "window",
                code: "not_a_window_of_the_meter",
                message: "no counter of this meter has this window under the account's plan".into(),
            }]),
            E::CommitExceedsReservation => ApiError::Validation(vec![tollgate_core::identity::flows::FieldError {
                field: "amount",
                code: "exceeds_reservation",
                message: "the final amount exceeds what was reserved".into(),
            }]),
            E::IdempotencyKeyReused => ApiError::IdempotencyKeyReused,
            E::Store(s) => s.into(),
        }
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
