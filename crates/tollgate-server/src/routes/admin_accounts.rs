//! `/v1/admin/accounts/{id}/*`: an admin's changes to one account — credits adjusted
//! either way, quota windows started over, limits overridden, the subscription set. `{id}` is an account
//! id or `ext:<external id>`. Each change writes one audit event naming the admin, in
//! the change's own transaction.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tollgate_core::accounts::{Account, Subscription};
use tollgate_core::audit::{AuditEvent, RequestOrigin, Severity};
use tollgate_core::credits::{CreditKind, CreditReceipt, CreditTransfer, MAX_CREDIT_AMOUNT};
use tollgate_core::identity::flows::FieldError;
use tollgate_core::metering::CounterReset;
use tollgate_core::metering::overrides::LimitOverrides;
use tollgate_core::metering::quotas::Entitlements;
use tollgate_core::metering::window::Window;
use tollgate_core::plans::LimitSpec;
use utoipa::ToSchema;

use super::accounts::{SubscribeBody, resolve_account, subscribe};
use super::credits::transfer;
use super::usage::idempotency_for;
use super::views::ErrorResponse;
use crate::error::{ApiError, ApiResult};
use crate::extract::{Admin, ApiJson, Origin, parse_json};
use crate::state::AppState;

const MAX_REASON: usize = 500;

/// The reason an admin gives for a change, trimmed; 1 to [`MAX_REASON`] characters.
fn checked_reason<'a>(reason: &'a str, errors: &mut Vec<FieldError>) -> &'a str {
    let reason = reason.trim();
    if reason.is_empty() || reason.chars().count() > MAX_REASON {
        errors.push(FieldError { field: "reason", code: "invalid", message: format!("1 to {MAX_REASON} characters") });
    }
    reason
}

fn account_event(
    admin: &Admin,
    action: &str,
    origin: &RequestOrigin,
    account: &Account,
    now: OffsetDateTime,
) -> AuditEvent {
    AuditEvent::new(admin.actor(), action, origin, now).target("account", account.id)
}

#[derive(Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreditAdjustment {
    /// Credits to add (positive) or take away (negative); never 0.
    pub amount: i64,
    /// Why, for the ledger and the audit log (1 to 500 characters).
    pub reason: String,
}

/// Adds or takes away credits (`adjustment`). Taking more than the balance is refused
/// with 402 `insufficient_credits`. With `Idempotency-Key` a retry replays the first
/// answer and moves nothing.
#[utoipa::path(post, path = "/v1/admin/accounts/{id}/credits/adjust", tag = "admin", security(("bearer" = [])),
    params(("id" = String, Path, description = "Account id or `ext:<external id>`"),
        ("Idempotency-Key" = Option<String>, Header, description = "Retries with the same key and body adjust once")),
    request_body = CreditAdjustment,
    responses(
        (status = 200, description = "Adjusted; the transaction and the new balance", body = Object),
        (status = 402, description = "`insufficient_credits`", body = ErrorResponse),
        (status = 404, description = "No such account", body = ErrorResponse),
        (status = 422, description = "Invalid amount or reason, or a reused `Idempotency-Key`", body = ErrorResponse),
    ))]
pub async fn adjust_credits(
    State(state): State<AppState>,
    admin: Admin,
    Origin(origin): Origin,
    Path(id): Path<String>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<CreditAdjustment>,
) -> ApiResult<Json<CreditReceipt>> {
    let mut errors = Vec::new();
    if body.amount == 0 || body.amount.abs() > MAX_CREDIT_AMOUNT {
        let message = format!("-{MAX_CREDIT_AMOUNT} to {MAX_CREDIT_AMOUNT}, not 0");
        errors.push(FieldError { field: "amount", code: "out_of_range", message });
    }
    let reason = checked_reason(&body.reason, &mut errors);
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    let account = resolve_account(&state, &id).await?;
    let caller = admin.actor();
    let idempotency = idempotency_for(
        &headers,
        &format_args!("admin:{}:{}", caller.kind(), caller.id().unwrap_or_default()),
        "admin.credits.adjust",
        &(&account.id, &body),
    )?;
    let now = OffsetDateTime::now_utc();
    let mut t = CreditTransfer::new(account.id, CreditKind::Adjustment, body.amount, caller, now);
    t.audit = Some(
        account_event(&admin, "admin.credits.adjusted", &origin, &account, now)
            .severity(Severity::Warning)
            .meta("account_id", account.id.to_string())
            .meta("amount", body.amount)
            .meta("reason", reason)
            .meta("transfer_id", t.id.to_string()),
    );
    t.description = Some(reason.to_owned());
    t.idempotency = idempotency;
    Ok(Json(transfer(&state, t).await?))
}

#[derive(Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QuotaReset {
    /// Only this meter (default: every counter and gauge).
    pub meter: Option<String>,
    /// Only this window: `day`, `month`, `billing_period`, `lifetime` or
    /// `rolling:<seconds>`, as the plan declares it (default: every window).
    pub window: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct QuotaResetDone {
    /// The meters reset, with the windows' counter rows cleared.
    #[schema(value_type = Object)]
    pub reset: Vec<ResetMeter>,
    /// How many counter rows held usage and were deleted.
    pub rows_deleted: u64,
    /// The account's entitlements after the reset.
    #[schema(value_type = Object)]
    pub entitlements: Entitlements,
}

#[derive(Serialize)]
pub struct ResetMeter {
    pub meter: String,
    pub window_keys: Vec<String>,
}

/// Starts the current instance of an account's quota windows over from zero: all of
/// them, one meter's, or one window's. Leases of concurrency meters are untouched.
#[utoipa::path(post, path = "/v1/admin/accounts/{id}/quotas/reset", tag = "admin", security(("bearer" = [])),
    params(("id" = String, Path, description = "Account id or `ext:<external id>`")), request_body = QuotaReset,
    responses(
        (status = 200, description = "Reset; what was cleared and the entitlements now", body = QuotaResetDone),
        (status = 404, description = "No such account", body = ErrorResponse),
        (status = 422, description = "`unknown_meter`, or a window the meter does not have", body = ErrorResponse),
    ))]
pub async fn reset_quotas(
    State(state): State<AppState>,
    admin: Admin,
    Origin(origin): Origin,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Json<QuotaResetDone>> {
    let body: QuotaReset =
        if body.iter().all(u8::is_ascii_whitespace) { QuotaReset::default() } else { parse_json(&body)? };
    let window = match body.window.as_deref() {
        None => None,
        Some(w) => Some(Window::parse(w).map_err(|e| {
            ApiError::Validation(vec![FieldError { field: "window", code: "invalid", message: e.to_string() }])
        })?),
    };
    let account = resolve_account(&state, &id).await?;
    let catalog = state.catalog.get();
    let counters = state.quotas.reset_targets(&catalog, &account, body.meter.as_deref(), window).await?;
    let now = OffsetDateTime::now_utc();
    let audit = account_event(&admin, "admin.quotas.reset", &origin, &account, now)
        .severity(Severity::Warning)
        .meta("account_id", account.id.to_string())
        .meta("meter", body.meter.clone())
        .meta("window", body.window.clone())
        .meta("meters", counters.iter().map(|(m, _)| m.clone()).collect::<Vec<_>>());
    let reset = CounterReset { account: account.id, counters: counters.clone(), audit };
    let rows_deleted = state.store.reset_counters(reset).await?;
    let entitlements = state.quotas.entitlements(&catalog, account).await?;
    let reset = counters.into_iter().map(|(meter, window_keys)| ResetMeter { meter, window_keys }).collect();
    Ok(Json(QuotaResetDone { reset, rows_deleted, entitlements }))
}

/// Sets the account's subscription (manual provider), like a service key's
/// `POST /v1/accounts/{id}/subscription`, recorded as the admin's.
#[utoipa::path(put, path = "/v1/admin/accounts/{id}/subscription", tag = "admin", security(("bearer" = [])),
    params(("id" = String, Path, description = "Account id or `ext:<external id>`")), request_body = SubscribeBody,
    responses(
        (status = 200, description = "Subscribed; the new entitlements", body = Object),
        (status = 404, description = "No such account", body = ErrorResponse),
        (status = 422, description = "`unknown_plan` or invalid fields", body = ErrorResponse),
    ))]
pub async fn put_subscription(
    State(state): State<AppState>,
    admin: Admin,
    Origin(origin): Origin,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<SubscribeBody>,
) -> ApiResult<Json<Entitlements>> {
    let account = resolve_account(&state, &id).await?;
    let audit = |action: &'static str, next: &Subscription| {
        account_event(&admin, &format!("admin.{action}"), &origin, &account, next.updated_at)
    };
    subscribe(&state, &account, body, audit).await?;
    Ok(Json(state.quotas.entitlements(&state.catalog.get(), account).await?))
}

/// Most meters one override set may name.
const MAX_OVERRIDES: usize = 100;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitsBody {
    /// Meter key → limit, written as in a plans file: a number, `"unlimited"`, `true`
    /// / `false` for flags, or for counters `[{ "window": "day", "limit": 50 }, ...]`.
    /// It replaces the plan's allowance for that meter whatever the plan. The set
    /// replaces the previous one whole; `{}` removes all overrides.
    #[schema(value_type = Object)]
    pub limits: std::collections::BTreeMap<String, serde_json::Value>,
    /// Why, for the audit log (1 to 500 characters).
    pub reason: String,
    /// When the plan's allowances apply again (RFC 3339, in the future); absent: until changed.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
}

#[derive(Serialize, ToSchema)]
pub struct AccountLimits {
    /// The overrides as last set (`null`: none), expired or not.
    #[schema(value_type = Object)]
    pub overrides: Option<LimitOverrides>,
    /// Whether they apply now (set and not expired).
    pub in_force: bool,
    /// The account's entitlements with the overrides applied.
    #[schema(value_type = Object)]
    pub entitlements: Entitlements,
}

async fn account_limits(
    state: &AppState,
    account: Account,
    overrides: Option<LimitOverrides>,
) -> ApiResult<Json<AccountLimits>> {
    let in_force = overrides.as_ref().is_some_and(|o| o.in_force(OffsetDateTime::now_utc()));
    let entitlements = state.quotas.entitlements(&state.catalog.get(), account).await?;
    Ok(Json(AccountLimits { overrides, in_force, entitlements }))
}

/// The account's limit overrides and its entitlements with them applied.
#[utoipa::path(get, path = "/v1/admin/accounts/{id}/limits", tag = "admin", security(("bearer" = [])),
    params(("id" = String, Path, description = "Account id or `ext:<external id>`")),
    responses(
        (status = 200, description = "The overrides (or none) and the entitlements", body = AccountLimits),
        (status = 404, description = "No such account", body = ErrorResponse),
    ))]
pub async fn get_limits(
    State(state): State<AppState>,
    _admin: Admin,
    Path(id): Path<String>,
) -> ApiResult<Json<AccountLimits>> {
    let account = resolve_account(&state, &id).await?;
    let overrides = state.store.limit_overrides(account.id).await?;
    account_limits(&state, account, overrides).await
}

/// Sets the account's per-meter limit overrides (replacing any before), with a reason
/// and an optional expiry. They apply on this node from the answer on, on other nodes
/// within a second. `{"limits": {}}` removes them.
#[utoipa::path(put, path = "/v1/admin/accounts/{id}/limits", tag = "admin", security(("bearer" = [])),
    params(("id" = String, Path, description = "Account id or `ext:<external id>`")), request_body = LimitsBody,
    responses(
        (status = 200, description = "Set; the overrides and the entitlements now", body = AccountLimits),
        (status = 404, description = "No such account", body = ErrorResponse),
        (status = 422, description = "An unknown meter, a limit that does not fit the meter's kind, \
            a missing reason or an expiry in the past", body = ErrorResponse),
    ))]
pub async fn put_limits(
    State(state): State<AppState>,
    admin: Admin,
    Origin(origin): Origin,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<LimitsBody>,
) -> ApiResult<Json<AccountLimits>> {
    let now = OffsetDateTime::now_utc();
    let catalog = state.catalog.get();
    let mut errors = Vec::new();
    let reason = checked_reason(&body.reason, &mut errors);
    if body.expires_at.is_some_and(|at| at <= now) {
        errors.push(FieldError { field: "expires_at", code: "in_the_past", message: "must be in the future".into() });
    }
    if body.limits.len() > MAX_OVERRIDES {
        errors.push(FieldError {
            field: "limits",
            code: "too_many",
            message: format!("at most {MAX_OVERRIDES} meters"),
        });
    }
    let mut limits = std::collections::BTreeMap::new();
    for (key, value) in body.limits {
        let Some(meter) = catalog.meters.get(&key) else {
            errors.push(FieldError {
                field: "limits",
                code: "unknown_meter",
                message: format!("no meter named {key:?}"),
            });
            continue;
        };
        let parsed = serde_json::from_value::<LimitSpec>(value)
            .map_err(|_| "not a limit: a number, \"unlimited\", true/false, or a list of windows".to_owned())
            .and_then(|spec| tollgate_core::plans::allowance(meter.kind, spec));
        match parsed {
            Ok(allowance) => {
                limits.insert(key, allowance);
            }
            Err(problem) => {
                errors.push(FieldError { field: "limits", code: "invalid_limit", message: format!("{key}: {problem}") })
            }
        }
    }
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    let account = resolve_account(&state, &id).await?;
    // Whole microseconds, as both stores keep it, so this node serves what others read.
    let expires_at = body.expires_at.map(|at| at.replace_nanosecond(at.nanosecond() / 1000 * 1000).unwrap_or(at));
    let caller = admin.actor();
    let overrides = (!limits.is_empty()).then(|| LimitOverrides {
        account_id: account.id,
        limits,
        reason: reason.to_owned(),
        expires_at,
        set_by: format!("{}:{}", caller.kind(), caller.id().unwrap_or_default()),
        updated_at: now,
    });
    let action = if overrides.is_some() { "admin.limits.set" } else { "admin.limits.cleared" };
    let audit = account_event(&admin, action, &origin, &account, now)
        .severity(Severity::Warning)
        .meta("account_id", account.id.to_string())
        .meta("reason", reason)
        .meta("limits", overrides.as_ref().map(|o| serde_json::to_value(&o.limits).unwrap_or_default()))
        .meta("expires_at", expires_at.and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok()));
    state.quotas.set_overrides(account.id, overrides.clone(), audit).await?;
    account_limits(&state, account, overrides).await
}
