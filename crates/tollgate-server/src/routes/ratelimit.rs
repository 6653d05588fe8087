//! `POST /v1/ratelimit/check`: plan-aware rate limiting for a product's own routes.
//! The limit is the plan's for the scope (`requests` per `window_seconds`, times the
//! plan's multiplier): the account's plan when an account is named, the default
//! plan's otherwise (anonymous callers, keyed by ip for example).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tollgate_core::accounts::Scope;
use tollgate_core::entitlements::effective_plan;
use utoipa::ToSchema;

use super::accounts::resolve_account;
use super::views::ErrorResponse;
use crate::error::{ApiError, ApiResult, ceil_secs, rate_limit_headers};
use crate::extract::ApiJson;
use crate::service_key::Service;
use crate::state::AppState;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimitCheck {
    /// Who is limited: a user id, an API key id, an ip... (default: the account id).
    pub key: Option<String>,
    /// A scope declared in the plans' `rate_limits`, e.g. `api`.
    pub scope: String,
    /// Account id or `ext:<id>` whose plan sets the limit (default plan when absent).
    pub account: Option<String>,
    /// Requests this call counts for (default 1).
    #[serde(default = "one")]
    pub cost: u32,
}

fn one() -> u32 {
    1
}

#[derive(Serialize, ToSchema)]
pub struct RateLimitAnswer {
    pub allowed: bool,
    pub limit: u32,
    pub window_seconds: u64,
    pub remaining: u32,
    /// Seconds until the key is back to a full burst.
    pub reset_seconds: u64,
    /// When denied: seconds to wait.
    pub retry_after_seconds: Option<u64>,
}

/// Counts one request against the plan's limit for `scope` and `key`.
#[utoipa::path(post, path = "/v1/ratelimit/check", tag = "usage", security(("bearer" = [])), request_body = RateLimitCheck,
    responses(
        (status = 200, description = "Allowed; `RateLimit-*` headers", body = RateLimitAnswer),
        (status = 429, description = "`rate_limited`, with `Retry-After`", body = ErrorResponse),
        (status = 403, description = "`insufficient_scope`: needs `ratelimit:check`", body = ErrorResponse),
        (status = 422, description = "Unknown scope or invalid body", body = ErrorResponse),
    ))]
pub async fn check(
    State(state): State<AppState>,
    service: Service,
    ApiJson(body): ApiJson<RateLimitCheck>,
) -> ApiResult<Response> {
    service.require(Scope::RatelimitCheck)?;
    let field_error = |field: &'static str, message: &str| {
        ApiError::Validation(vec![tollgate_core::identity::flows::FieldError {
            field,
            code: "invalid",
            message: message.into(),
        }])
    };
    if body.cost == 0 {
        return Err(field_error("cost", "cost must be positive"));
    }
    if body.scope.is_empty() || body.scope.len() > 64 {
        return Err(field_error("scope", "scope must be 1 to 64 characters"));
    }
    let catalog = state.catalog.get();
    let (plan, account_key) = match &body.account {
        Some(id) => {
            let account = resolve_account(&state, id).await?;
            let subscription = state.store.subscription(account.id).await?;
            (
                effective_plan(&catalog, subscription.as_ref(), time::OffsetDateTime::now_utc()).clone(),
                Some(account.id.to_string()),
            )
        }
        None => (catalog.default_plan().clone(), None),
    };
    let limit = plan.rate_limit(&body.scope).ok_or_else(|| ApiError::UnknownRateLimitScope(body.scope.clone()))?;
    // Explicit keys and account ids live apart, so a caller's key can never be
    // another account's bucket.
    let subject = match (body.key, account_key) {
        (Some(key), _) => format!("k:{key}"),
        (None, Some(account)) => format!("a:{account}"),
        (None, None) => return Err(field_error("key", "give a key or an account")),
    };
    if subject.len() > 202 {
        return Err(field_error("key", "key must be at most 200 characters"));
    }
    let decision = state.limiter.hit(&format!("rl:{}:{subject}", body.scope), limit, body.cost).await;
    if !decision.allowed {
        return Err(ApiError::RateLimited {
            retry_after: decision.retry_after.unwrap_or_default(),
            limit: decision.limit,
            reset_after: decision.reset_after,
        });
    }
    let answer = RateLimitAnswer {
        allowed: true,
        limit: decision.limit,
        window_seconds: limit.window_seconds,
        remaining: decision.remaining,
        reset_seconds: ceil_secs(decision.reset_after),
        retry_after_seconds: None,
    };
    let mut response = (StatusCode::OK, Json(answer)).into_response();
    rate_limit_headers(response.headers_mut(), decision.limit, decision.remaining, decision.reset_after, None);
    Ok(response)
}
