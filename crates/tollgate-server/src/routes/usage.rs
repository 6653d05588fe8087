//! `/v1/usage/*`: the hot path. A product's backend (service key with `usage:write`)
//! checks or consumes a meter for an account. Answers carry each window's limit, use,
//! remaining and reset, `X-Quota-*` headers, and on denial a 402 (or the meter's
//! status) saying which plans would allow it.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tollgate_core::accounts::Scope;
use tollgate_core::metering::quotas::{ConsumeInput, ConsumeOutcome};
use tollgate_core::metering::{EventContext, Idempotency, UsageOp, WindowState};
use utoipa::ToSchema;

use super::accounts::resolve_account;
use super::views::ErrorResponse;
use crate::error::{ApiError, ApiResult, ceil_secs};
use crate::extract::{ApiJson, Origin};
use crate::service_key::Service;
use crate::state::AppState;

// Made once (see `crate::error`'s `RateLimit-*` names).
static X_QUOTA_LIMIT: HeaderName = HeaderName::from_static("x-quota-limit");
static X_QUOTA_REMAINING: HeaderName = HeaderName::from_static("x-quota-remaining");
static X_QUOTA_RESET: HeaderName = HeaderName::from_static("x-quota-reset");

/// Longest accepted `Idempotency-Key`.
const MAX_IDEMPOTENCY_KEY: usize = 255;

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UsageBody {
    /// Account id, or `ext:<your customer id>`.
    pub account: String,
    pub meter: String,
    /// Units to check or consume (default 1).
    #[serde(default = "one")]
    pub amount: i64,
    /// Your endpoint or feature, recorded with the usage event.
    pub endpoint: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Value>,
}

fn one() -> i64 {
    1
}

#[derive(Serialize, ToSchema)]
pub struct UsageAnswer {
    pub allowed: bool,
    pub account_id: uuid::Uuid,
    pub meter: String,
    pub amount: i64,
    /// The plan in force.
    pub plan: String,
    /// Per window: limit (null = unlimited), used, remaining, resets_at, warning.
    #[schema(value_type = Vec<Object>)]
    pub windows: Vec<WindowState>,
    /// Some window is at or above 80% of its limit.
    pub warning: bool,
    /// Plans under which a denied request would have been allowed.
    pub upgrade_plans: Vec<String>,
    /// Credits this consume cost because the plan's window was spent (meters with
    /// `credits_per_unit`); 0 within the plan.
    pub credits_charged: i64,
    /// This answer repeats the first answer to the same `Idempotency-Key`.
    pub replayed: bool,
    /// `/v1/usage/reserve` only: settle it with `/v1/usage/reservations/{id}/commit`
    /// or `/release` before `expires_at`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reservation_id: Option<uuid::Uuid>,
    #[serde(skip_serializing_if = "Option::is_none", with = "time::serde::rfc3339::option")]
    pub expires_at: Option<time::OffsetDateTime>,
}

fn validate(body: &UsageBody, zero_ok: bool) -> Result<(), ApiError> {
    let mut errors = Vec::new();
    if body.amount < 0 || (body.amount == 0 && !zero_ok) {
        errors.push(field("amount", "must_be_positive", "amount must be a positive integer"));
    } else if body.amount > tollgate_core::metering::MAX_AMOUNT {
        errors.push(field("amount", "too_large", "amount must be at most 10^15"));
    }
    if body.meter.is_empty() || body.meter.len() > 64 {
        errors.push(field("meter", "invalid", "meter must be 1 to 64 characters"));
    }
    if body.endpoint.as_ref().is_some_and(|e| e.len() > 200) {
        errors.push(field("endpoint", "too_long", "endpoint must be at most 200 characters"));
    }
    if body.metadata.as_ref().is_some_and(|m| m.to_string().len() > 4096) {
        errors.push(field("metadata", "too_long", "metadata must be at most 4 KiB of JSON"));
    }
    if errors.is_empty() { Ok(()) } else { Err(ApiError::Validation(errors)) }
}

fn field(field: &'static str, code: &'static str, message: &str) -> tollgate_core::identity::flows::FieldError {
    tollgate_core::identity::flows::FieldError { field, code, message: message.to_owned() }
}

/// The `Idempotency-Key`, scoped to the calling key and route, with the request's
/// fingerprint (canonical JSON: serde_json sorts object keys).
fn idempotency(
    headers: &HeaderMap,
    service: &Service,
    route: &str,
    body: &impl Serialize,
) -> Result<Option<Idempotency>, ApiError> {
    idempotency_for(headers, &format_args!("svc:{}", service.0.id), route, body)
}

/// The `Idempotency-Key` of a request by `caller` (`svc:<key id>`, `user:<id>`) to
/// `route`, and the fingerprint of its body: the same key with another body is refused.
pub(crate) fn idempotency_for(
    headers: &HeaderMap,
    caller: &dyn std::fmt::Display,
    route: &str,
    body: &impl Serialize,
) -> Result<Option<Idempotency>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else { return Ok(None) };
    let key = value.to_str().map_err(|_| ApiError::InvalidIdempotencyKey)?.trim();
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY {
        return Err(ApiError::InvalidIdempotencyKey);
    }
    let canonical = serde_json::to_value(body).map_err(|e| ApiError::Internal(e.to_string()))?.to_string();
    let hash = Sha256::digest(canonical.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    Ok(Some(Idempotency { scope: format!("{caller}:{route}"), key: key.to_owned(), request_hash: hash }))
}

fn answer(
    outcome: ConsumeOutcome,
    account_id: uuid::Uuid,
    meter: String,
    amount: i64,
    reservation: Option<(uuid::Uuid, time::OffsetDateTime)>,
) -> Response {
    let decision = outcome.decision;
    let reservation = reservation.filter(|_| decision.allowed);
    let body = UsageAnswer {
        allowed: decision.allowed,
        account_id,
        meter,
        amount,
        plan: outcome.plan,
        warning: decision.windows.iter().any(|w| w.warning),
        windows: decision.windows,
        upgrade_plans: outcome.upgrade_plans,
        credits_charged: decision.credits_charged,
        replayed: decision.replayed,
        reservation_id: reservation.map(|(id, _)| id),
        expires_at: reservation.map(|(_, at)| at),
    };
    // The tightest limited window drives the quota headers.
    let tightest = body.windows.iter().filter(|w| w.limit.is_some()).min_by_key(|w| w.remaining.unwrap_or(i64::MAX));
    let quota_headers = tightest.map(|w| (w.limit, w.remaining, w.resets_at));
    let mut response = if body.allowed {
        json(StatusCode::OK, &body)
    } else {
        let denied_window = decision.denied_by.and_then(|d| body.windows.iter().find(|w| w.window == d));
        let status = StatusCode::from_u16(outcome.meter.deny_status).unwrap_or(StatusCode::PAYMENT_REQUIRED);
        let details = serde_json::json!({
            "meter": body.meter,
            "amount": amount,
            "window": denied_window.map(|w| w.window.as_string()),
            "limit": denied_window.and_then(|w| w.limit),
            "used": denied_window.map(|w| w.used),
            "resets_at": denied_window.and_then(|w| w.resets_at).map(|t| t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()),
            "upgrade_plans": body.upgrade_plans,
            "plan": body.plan,
            "windows": body.windows,
        });
        let error = serde_json::json!({ "error": { "code": "quota_exceeded", "message": format!("quota exceeded for {}", body.meter), "details": details } });
        let mut response = json(status, &error);
        if let Some(resets_at) = denied_window.and_then(|w| w.resets_at) {
            let wait = (resets_at - time::OffsetDateTime::now_utc()).max(time::Duration::ZERO);
            let secs = ceil_secs(std::time::Duration::try_from(wait).unwrap_or_default()).max(1);
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    };
    if let Some((limit, remaining, reset)) = quota_headers {
        let headers = response.headers_mut();
        if let Some(limit) = limit {
            headers.insert(X_QUOTA_LIMIT.clone(), HeaderValue::from(limit));
        }
        if let Some(remaining) = remaining {
            headers.insert(X_QUOTA_REMAINING.clone(), HeaderValue::from(remaining));
        }
        if let Some(reset) = reset {
            headers.insert(X_QUOTA_RESET.clone(), HeaderValue::from(reset.unix_timestamp()));
        }
    }
    response
}

/// A JSON answer written into a buffer with room for a usage answer: axum's `Json`
/// starts at 128 bytes and grows, copying, for every answer of this route.
fn json(status: StatusCode, body: &impl Serialize) -> Response {
    let mut buffer = Vec::with_capacity(1024);
    match serde_json::to_writer(&mut buffer, body) {
        Ok(()) => {
            (status, [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], buffer).into_response()
        }
        Err(e) => ApiError::Internal(e.to_string()).into_response(),
    }
}

/// Which route a usage call came through.
#[derive(Clone, Copy)]
enum Route {
    Check,
    Consume,
    Refund,
    Set,
    Add,
}

async fn run(
    state: AppState,
    service: Service,
    origin: tollgate_core::audit::RequestOrigin,
    headers: HeaderMap,
    mut body: UsageBody,
    route: Route,
) -> ApiResult<Response> {
    service.require(Scope::UsageWrite)?;
    // `add` takes a signed amount: a negative one gives back like a refund.
    let op = match route {
        Route::Check | Route::Consume => UsageOp::Consume,
        Route::Refund => UsageOp::Refund,
        Route::Set => UsageOp::Set,
        Route::Add if body.amount < 0 => UsageOp::Refund,
        Route::Add => UsageOp::Consume,
    };
    let dry_run = matches!(route, Route::Check);
    let route_name = match route {
        Route::Check => "check",
        Route::Consume => "consume",
        Route::Refund => "refund",
        Route::Set => "set",
        Route::Add => "add",
    };
    // Fingerprint the body as sent, before the sign of `add` is folded into `op`.
    let idempotency = if dry_run { None } else { idempotency(&headers, &service, route_name, &body)? };
    if matches!(route, Route::Add) {
        body.amount = body.amount.checked_abs().unwrap_or(0);
    }
    validate(&body, op == UsageOp::Set)?;
    let account = resolve_account(&state, &body.account).await?;
    let input = ConsumeInput {
        meter: body.meter.clone(),
        op,
        reservation: None,
        amount: body.amount,
        dry_run,
        idempotency,
        context: EventContext { endpoint: body.endpoint.clone(), metadata: body.metadata.clone(), ip: origin.ip },
    };
    let outcome = state.quotas.consume(&state.catalog.get(), &account, input).await?;
    Ok(answer(outcome, account.id.0, body.meter, body.amount, None))
}

/// Would `amount` fit in every window? Counts nothing.
#[utoipa::path(post, path = "/v1/usage/check", tag = "usage", security(("bearer" = [])), request_body = UsageBody,
    responses(
        (status = 200, description = "Allowed", body = UsageAnswer),
        (status = 402, description = "`quota_exceeded` (or the meter's `deny_status`), with the window, reset and upgrade plans", body = ErrorResponse),
        (status = 403, description = "`insufficient_scope`: needs `usage:write`", body = ErrorResponse),
        (status = 404, description = "No such account", body = ErrorResponse),
        (status = 422, description = "Invalid body or unknown meter", body = ErrorResponse),
    ))]
pub async fn check(
    State(state): State<AppState>,
    service: Service,
    Origin(origin): Origin,
    headers: HeaderMap,
    ApiJson(body): ApiJson<UsageBody>,
) -> ApiResult<Response> {
    run(state, service, origin, headers, body, Route::Check).await
}

/// Consumes `amount` in every window of the meter, all or nothing. With an
/// `Idempotency-Key`, a retry replays the first answer and counts nothing.
#[utoipa::path(post, path = "/v1/usage/consume", tag = "usage", security(("bearer" = [])), request_body = UsageBody,
    params(("Idempotency-Key" = Option<String>, Header, description = "Retries with the same key and body count once")),
    responses(
        (status = 200, description = "Consumed", body = UsageAnswer),
        (status = 402, description = "`quota_exceeded` (or the meter's `deny_status`), with the window, reset and upgrade plans", body = ErrorResponse),
        (status = 403, description = "`insufficient_scope`: needs `usage:write`", body = ErrorResponse),
        (status = 404, description = "No such account", body = ErrorResponse),
        (status = 422, description = "Invalid body, unknown meter, or an `Idempotency-Key` reused with another body", body = ErrorResponse),
    ))]
pub async fn consume(
    State(state): State<AppState>,
    service: Service,
    Origin(origin): Origin,
    headers: HeaderMap,
    ApiJson(body): ApiJson<UsageBody>,
) -> ApiResult<Response> {
    run(state, service, origin, headers, body, Route::Consume).await
}

/// Gives back `amount` from every window's current instance (work that failed);
/// never below zero.
#[utoipa::path(post, path = "/v1/usage/refund", tag = "usage", security(("bearer" = [])), request_body = UsageBody,
    params(("Idempotency-Key" = Option<String>, Header, description = "Retries with the same key and body count once")),
    responses(
        (status = 200, description = "Refunded; the windows after", body = UsageAnswer),
        (status = 404, description = "No such account", body = ErrorResponse),
        (status = 422, description = "Invalid body or unknown meter", body = ErrorResponse),
    ))]
pub async fn refund(
    State(state): State<AppState>,
    service: Service,
    Origin(origin): Origin,
    headers: HeaderMap,
    ApiJson(body): ApiJson<UsageBody>,
) -> ApiResult<Response> {
    run(state, service, origin, headers, body, Route::Refund).await
}

/// Sets a gauge's level (e.g. storage used) to `amount`: raising it must fit the
/// plan's maximum, lowering it always works.
#[utoipa::path(post, path = "/v1/usage/set", tag = "usage", security(("bearer" = [])), request_body = UsageBody,
    params(("Idempotency-Key" = Option<String>, Header, description = "Retries with the same key and body count once")),
    responses(
        (status = 200, description = "Set; the level", body = UsageAnswer),
        (status = 402, description = "`quota_exceeded`: above the plan's maximum", body = ErrorResponse),
        (status = 422, description = "Invalid body, unknown meter or not a gauge", body = ErrorResponse),
    ))]
pub async fn set(
    State(state): State<AppState>,
    service: Service,
    Origin(origin): Origin,
    headers: HeaderMap,
    ApiJson(body): ApiJson<UsageBody>,
) -> ApiResult<Response> {
    run(state, service, origin, headers, body, Route::Set).await
}

/// Moves a gauge's level by `amount` (negative lowers it, never below zero); raising
/// it must fit the plan's maximum.
#[utoipa::path(post, path = "/v1/usage/add", tag = "usage", security(("bearer" = [])), request_body = UsageBody,
    params(("Idempotency-Key" = Option<String>, Header, description = "Retries with the same key and body count once")),
    responses(
        (status = 200, description = "Moved; the level", body = UsageAnswer),
        (status = 402, description = "`quota_exceeded`: above the plan's maximum", body = ErrorResponse),
        (status = 422, description = "Invalid body or unknown meter", body = ErrorResponse),
    ))]
pub async fn add(
    State(state): State<AppState>,
    service: Service,
    Origin(origin): Origin,
    headers: HeaderMap,
    ApiJson(body): ApiJson<UsageBody>,
) -> ApiResult<Response> {
    run(state, service, origin, headers, body, Route::Add).await
}

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AcquireBody {
    /// Account id, or `ext:<your customer id>`.
    pub account: String,
    /// A concurrency meter.
    pub meter: String,
    /// How long the slot is held unless released (default: the meter's `lease_seconds`).
    pub lease_seconds: Option<u64>,
    pub endpoint: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct LeaseAnswer {
    pub allowed: bool,
    pub plan: String,
    /// Present when allowed: release it with `POST /v1/usage/leases/{id}/release`.
    pub lease_id: Option<uuid::Uuid>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<time::OffsetDateTime>,
    /// Live leases now.
    pub held: i64,
    /// Slots allowed at once; null = unlimited.
    pub max: Option<i64>,
    /// This answer repeats the first answer to the same `Idempotency-Key`.
    pub replayed: bool,
}

/// Takes a slot of a concurrency meter (e.g. a running simulation). Slots free up when
/// released or when their lease expires.
#[utoipa::path(post, path = "/v1/usage/acquire", tag = "usage", security(("bearer" = [])), request_body = AcquireBody,
    params(("Idempotency-Key" = Option<String>, Header, description = "A retry replays the first answer (the same lease)")),
    responses(
        (status = 200, description = "Slot taken", body = LeaseAnswer),
        (status = 402, description = "`quota_exceeded`: every slot is taken; `Retry-After` until the first lease expires", body = ErrorResponse),
        (status = 404, description = "No such account", body = ErrorResponse),
        (status = 422, description = "Unknown meter or not a concurrency meter", body = ErrorResponse),
    ))]
pub async fn acquire(
    State(state): State<AppState>,
    service: Service,
    Origin(origin): Origin,
    headers: HeaderMap,
    ApiJson(body): ApiJson<AcquireBody>,
) -> ApiResult<Response> {
    service.require(Scope::UsageWrite)?;
    let idempotency = idempotency(&headers, &service, "acquire", &body)?;
    let account = resolve_account(&state, &body.account).await?;
    let context = EventContext { endpoint: body.endpoint.clone(), metadata: None, ip: origin.ip };
    let catalog = state.catalog.get();
    let (decision, plan, upgrade_plans) =
        state.quotas.acquire(&catalog, account.id, &body.meter, body.lease_seconds, context, idempotency).await?;
    if decision.allowed {
        let answer = LeaseAnswer {
            allowed: true,
            plan,
            lease_id: decision.lease_id.map(|l| l.0),
            expires_at: decision.expires_at,
            held: decision.held,
            max: decision.max,
            replayed: decision.replayed,
        };
        return Ok((StatusCode::OK, Json(answer)).into_response());
    }
    let status = catalog.meters.get(&body.meter).and_then(|m| StatusCode::from_u16(m.deny_status).ok());
    let details = serde_json::json!({
        "meter": body.meter,
        "held": decision.held,
        "limit": decision.max,
        "plan": plan,
        "upgrade_plans": upgrade_plans,
        "resets_at": decision.next_expiry.map(|t| t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()),
    });
    let error = serde_json::json!({ "error": { "code": "quota_exceeded", "message": format!("every {} slot is taken", body.meter), "details": details } });
    let mut response = (status.unwrap_or(StatusCode::PAYMENT_REQUIRED), Json(error)).into_response();
    if let Some(expiry) = decision.next_expiry {
        let wait = std::time::Duration::try_from((expiry - time::OffsetDateTime::now_utc()).max(time::Duration::ZERO))
            .unwrap_or_default();
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(ceil_secs(wait).max(1)));
    }
    Ok(response)
}

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReleaseBody {
    /// The account that holds the lease (id or `ext:<id>`).
    pub account: String,
}

/// Frees a slot taken with `/v1/usage/acquire`.
#[utoipa::path(post, path = "/v1/usage/leases/{id}/release", tag = "usage", security(("bearer" = [])),
    params(("id" = uuid::Uuid, Path, description = "Lease id"),
        ("Idempotency-Key" = Option<String>, Header, description = "A retry after the release answers 204 again, not 404")),
    request_body = ReleaseBody,
    responses(
        (status = 204, description = "Released"),
        (status = 404, description = "No live lease with this id for this account", body = ErrorResponse),
    ))]
pub async fn release(
    State(state): State<AppState>,
    service: Service,
    headers: HeaderMap,
    axum::extract::Path(id): axum::extract::Path<uuid::Uuid>,
    ApiJson(body): ApiJson<ReleaseBody>,
) -> ApiResult<StatusCode> {
    service.require(Scope::UsageWrite)?;
    let idempotency = idempotency(&headers, &service, "release", &(id, &body))?;
    let account = resolve_account(&state, &body.account).await?;
    state.quotas.release(account.id, tollgate_core::ids::LeaseId(id), idempotency).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReserveBody {
    /// Account id, or `ext:<your customer id>`.
    pub account: String,
    pub meter: String,
    #[serde(default = "one")]
    pub amount: i64,
    /// Settle within this many seconds or the usage is given back (default 300).
    pub ttl_seconds: Option<u64>,
    pub endpoint: Option<String>,
}

/// Counts `amount` now and holds it as a reservation: commit it when the work
/// succeeded (optionally with the final amount), release it when it failed; if
/// neither happens within `ttl_seconds` it is given back by itself.
#[utoipa::path(post, path = "/v1/usage/reserve", tag = "usage", security(("bearer" = [])), request_body = ReserveBody,
    params(("Idempotency-Key" = Option<String>, Header, description = "Retries with the same key and body count once")),
    responses(
        (status = 200, description = "Reserved, with `reservation_id` and `expires_at`", body = UsageAnswer),
        (status = 402, description = "`quota_exceeded`", body = ErrorResponse),
        (status = 404, description = "No such account", body = ErrorResponse),
        (status = 422, description = "Invalid body or not a counter", body = ErrorResponse),
    ))]
pub async fn reserve(
    State(state): State<AppState>,
    service: Service,
    Origin(origin): Origin,
    headers: HeaderMap,
    ApiJson(body): ApiJson<ReserveBody>,
) -> ApiResult<Response> {
    service.require(Scope::UsageWrite)?;
    let idempotency = idempotency(&headers, &service, "reserve", &body)?;
    let as_usage = UsageBody {
        account: body.account.clone(),
        meter: body.meter.clone(),
        amount: body.amount,
        endpoint: body.endpoint.clone(),
        metadata: None,
    };
    validate(&as_usage, false)?;
    let ttl = body.ttl_seconds.unwrap_or(300).clamp(1, 7 * 24 * 3600);
    let account = resolve_account(&state, &body.account).await?;
    // With an Idempotency-Key the reservation's id follows from the key, so a replay
    // answers with the id the first attempt opened.
    let id = match &idempotency {
        Some(idem) => reservation_id_for(idem),
        None => tollgate_core::ids::ReservationId::new(),
    };
    // Whole seconds, as stored, so that a replay's answer is the first one's.
    let now = time::OffsetDateTime::now_utc();
    let mut expires_at = now.replace_nanosecond(0).unwrap_or(now) + time::Duration::seconds(ttl as i64);
    let input = ConsumeInput {
        meter: body.meter.clone(),
        op: UsageOp::Consume,
        reservation: Some(tollgate_core::metering::ReservationAction::Open { id, expires_at }),
        amount: body.amount,
        dry_run: false,
        idempotency,
        context: EventContext { endpoint: body.endpoint.clone(), metadata: None, ip: origin.ip },
    };
    let catalog = state.catalog.get();
    if catalog.meters.get(&body.meter).is_some_and(|m| m.kind != tollgate_core::plans::MeterKind::Counter) {
        return Err(ApiError::UnsupportedMeter("only counters can be reserved".into()));
    }
    let outcome = state.quotas.consume(&catalog, &account, input).await?;
    if outcome.decision.replayed
        && let Some(opened) = state.store.reservation(account.id, id).await?
    {
        expires_at = opened.expires_at;
    }
    Ok(answer(outcome, account.id.0, body.meter, body.amount, Some((id.0, expires_at))))
}

/// The reservation id of a reserve with this idempotency key: the first 16 bytes
/// of SHA-256 over its scope and key, as a version-8 (custom) UUID.
fn reservation_id_for(idem: &Idempotency) -> tollgate_core::ids::ReservationId {
    let digest = Sha256::new()
        .chain_update(idem.scope.as_bytes())
        .chain_update([0])
        .chain_update(idem.key.as_bytes())
        .finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    tollgate_core::ids::ReservationId(uuid::Builder::from_custom_bytes(bytes).into_uuid())
}

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SettleBody {
    /// The account that holds the reservation (id or `ext:<id>`).
    pub account: String,
    /// Commit only: what the work really used (default: everything reserved).
    pub amount: Option<i64>,
}

async fn settle(
    state: AppState,
    service: Service,
    headers: HeaderMap,
    id: uuid::Uuid,
    body: SettleBody,
    status: tollgate_core::metering::ReservationStatus,
) -> ApiResult<Json<serde_json::Value>> {
    service.require(Scope::UsageWrite)?;
    // The reservation is part of what the key fingerprints.
    let route = format!("reservations/{}", status.as_str());
    let idempotency = idempotency(&headers, &service, &route, &(id, &body))?;
    let account = resolve_account(&state, &body.account).await?;
    let reservation = tollgate_core::ids::ReservationId(id);
    let decision = state.quotas.settle(account.id, reservation, status, body.amount, idempotency).await?;
    Ok(Json(
        serde_json::json!({ "status": status.as_str(), "windows": decision.windows, "replayed": decision.replayed }),
    ))
}

/// The work succeeded: keep the reserved amount (or the final `amount`, giving the
/// rest back).
#[utoipa::path(post, path = "/v1/usage/reservations/{id}/commit", tag = "usage", security(("bearer" = [])),
    params(("id" = uuid::Uuid, Path, description = "Reservation id"),
        ("Idempotency-Key" = Option<String>, Header, description = "A retry replays the first answer")),
    request_body = SettleBody,
    responses(
        (status = 200, description = "Committed; the windows after", body = Object),
        (status = 404, description = "No pending reservation with this id for this account", body = ErrorResponse),
        (status = 422, description = "`amount` above what was reserved", body = ErrorResponse),
    ))]
pub async fn commit(
    State(state): State<AppState>,
    service: Service,
    axum::extract::Path(id): axum::extract::Path<uuid::Uuid>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<SettleBody>,
) -> ApiResult<Json<serde_json::Value>> {
    settle(state, service, headers, id, body, tollgate_core::metering::ReservationStatus::Committed).await
}

/// The work failed: give everything reserved back.
#[utoipa::path(post, path = "/v1/usage/reservations/{id}/release", tag = "usage", security(("bearer" = [])),
    params(("id" = uuid::Uuid, Path, description = "Reservation id"),
        ("Idempotency-Key" = Option<String>, Header, description = "A retry replays the first answer")),
    request_body = SettleBody,
    responses(
        (status = 200, description = "Released; the windows after", body = Object),
        (status = 404, description = "No pending reservation with this id for this account", body = ErrorResponse),
    ))]
pub async fn release_reservation(
    State(state): State<AppState>,
    service: Service,
    axum::extract::Path(id): axum::extract::Path<uuid::Uuid>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<SettleBody>,
) -> ApiResult<Json<serde_json::Value>> {
    if body.amount.is_some() {
        return Err(ApiError::Validation(vec![field("amount", "not_allowed", "a release gives everything back")]));
    }
    settle(state, service, headers, id, body, tollgate_core::metering::ReservationStatus::Released).await
}
