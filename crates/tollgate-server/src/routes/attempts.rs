//! Guessing budgets for secrets. An attempt at a password or a TOTP code is counted
//! *before* it is checked and given back when it turns out right (or fails for another
//! reason), so parallel guesses cannot all slip through a check-then-count window.
//! Passwords are budgeted per email address and codes per user, across every route
//! that checks them (login, the second factor, and the `/v1/me` routes that re-ask).

use tollgate_core::identity::{EmailAddress, IdentityError};
use tollgate_core::ids::UserId;
use tollgate_core::ratelimit::Decision;

use crate::error::ApiError;
use crate::state::AppState;

/// The budget key for password guesses on an address, as typed: unknown and known
/// addresses are limited alike.
pub fn password_key(email: &str) -> String {
    format!("login:{}", email.trim().to_lowercase().chars().take(254).collect::<String>())
}

pub fn user_password_key(email: &EmailAddress) -> String {
    password_key(email.as_str())
}

/// The budget key for second-factor guesses of a user (not of an `mfa_token`: a
/// password holder can mint as many of those as they like).
pub fn code_key(user: UserId) -> String {
    format!("mfa:{user}")
}

pub fn limited(d: Decision) -> ApiError {
    ApiError::RateLimited { retry_after: d.retry_after.unwrap_or_default(), limit: d.limit, reset_after: d.reset_after }
}

/// Runs `attempt` against the budgets named by `keys`. The outer error is a 429 when a
/// budget is spent; the inner result is the attempt's own.
pub async fn limited_attempt<T>(
    state: &AppState,
    keys: &[String],
    attempt: impl Future<Output = Result<T, IdentityError>>,
) -> Result<Result<T, IdentityError>, ApiError> {
    let limit = state.config.auth.failed_login_limit;
    let mut counted: Vec<&String> = Vec::with_capacity(keys.len());
    for key in keys {
        let decision = state.limiter.hit(key, limit, 1).await;
        if !decision.allowed {
            for key in counted {
                state.limiter.refund(key, limit, 1).await;
            }
            return Err(limited(decision));
        }
        counted.push(key);
    }
    let result = attempt.await;
    if !matches!(result, Err(IdentityError::InvalidCredentials | IdentityError::InvalidMfaCode)) {
        for key in counted {
            state.limiter.refund(key, limit, 1).await;
        }
    }
    Ok(result)
}
