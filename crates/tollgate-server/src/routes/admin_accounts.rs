//! `/v1/admin/accounts/{id}/*`: an admin's changes to one account — credits adjusted
//! either way, quota windows started over, the subscription set. `{id}` is an account
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
use tollgate_core::metering::quotas::Entitlements;
use tollgate_core::metering::window::Window;
use utoipa::ToSchema;

use super::accounts::{SubscribeBody, resolve_account, subscribe};
use super::credits::transfer;
use super::usage::idempotency_for;
use super::views::ErrorResponse;
use crate::error::{ApiError, ApiResult};
use crate::extract::{Admin, ApiJson, Origin, parse_json};
use crate::state::AppState;

const MAX_REASON: usize = 500;

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
    let reason = body.reason.trim();
    if reason.is_empty() || reason.chars().count() > MAX_REASON {
        let message = format!("1 to {MAX_REASON} characters");
        errors.push(FieldError { field: "reason", code: "invalid", message });
    }
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
