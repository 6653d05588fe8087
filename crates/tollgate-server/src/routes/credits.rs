//! Credits: packages for sale (public), an account's balance and history, spending
//! (with `Idempotency-Key`), grants and refunds. Service keys act on any account
//! (`credits:read`, `credits:write`); a signed-in user reads and spends their own
//! under `/v1/me/credits`.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, header};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tollgate_core::accounts::{Account, Scope};
use tollgate_core::audit::{Actor, AuditEvent, RequestOrigin};
use tollgate_core::billing::Payment;
use tollgate_core::credits::{
    CreditBalance, CreditKind, CreditReceipt, CreditTransaction, CreditTransfer, MAX_CREDIT_AMOUNT, TransactionQuery,
};
use tollgate_core::entitlements::effective_plan;
use tollgate_core::identity::Locale;
use tollgate_core::identity::flows::FieldError;
use tollgate_core::{Store, StoreError};
use utoipa::{IntoParams, ToSchema};

use super::accounts::resolve_account;
use super::usage::idempotency_for;
use super::views::ErrorResponse;
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiJson, ApiQuery, CurrentUser, Origin};
use crate::service_key::Service;
use crate::state::AppState;

const MAX_TEXT: usize = 500;
const MAX_PAGE: u32 = 200;

#[derive(Serialize, ToSchema)]
pub struct CreditPackageView {
    pub key: String,
    pub name: String,
    pub credits: i64,
    /// Integer minor units.
    pub amount: i64,
    pub currency: String,
}

#[derive(Serialize, ToSchema)]
pub struct CreditPackages {
    pub packages: Vec<CreditPackageView>,
}

/// The credit packages for sale, localized by `Accept-Language`.
#[utoipa::path(get, path = "/v1/credit-packages", tag = "credits",
    responses((status = 200, description = "Packages in display order", body = CreditPackages)))]
pub async fn list_packages(State(state): State<AppState>, headers: HeaderMap) -> Json<CreditPackages> {
    let locale = headers
        .get(header::ACCEPT_LANGUAGE)
        .and_then(|v| v.to_str().ok())
        .and_then(Locale::negotiate)
        .unwrap_or(Locale::En);
    let catalog = state.catalog.get();
    let packages = catalog
        .credit_packages()
        .into_iter()
        .map(|(key, p)| CreditPackageView {
            key: key.clone(),
            name: p.names.get(locale.as_str()).or_else(|| p.names.get("en")).cloned().unwrap_or_else(|| key.clone()),
            credits: p.credits,
            amount: p.amount,
            currency: p.currency.clone(),
        })
        .collect();
    Json(CreditPackages { packages })
}

/// Balance and totals.
#[utoipa::path(get, path = "/v1/accounts/{id}/credits", tag = "credits", security(("bearer" = [])),
    params(("id" = String, Path, description = "Account id or `ext:<external id>`")),
    responses(
        (status = 200, description = "Balance, purchased, used, granted", body = Object),
        (status = 404, description = "No such account", body = ErrorResponse),
    ))]
pub async fn balance(
    State(state): State<AppState>,
    service: Service,
    Path(id): Path<String>,
) -> ApiResult<Json<CreditBalance>> {
    service.require(Scope::CreditsRead)?;
    let account = resolve_account(&state, &id).await?;
    Ok(Json(state.store.credit_balance(account.id).await?))
}

/// The signed-in user's balance and totals.
#[utoipa::path(get, path = "/v1/me/credits", tag = "me", security(("bearer" = [])),
    responses((status = 200, description = "Balance, purchased, used, granted", body = Object)))]
pub async fn my_balance(State(state): State<AppState>, current: CurrentUser) -> ApiResult<Json<CreditBalance>> {
    Ok(Json(state.store.credit_balance(current.user.account_id).await?))
}

#[derive(Deserialize, IntoParams)]
pub struct TransactionsQuery {
    /// Only this kind: purchase, usage, bonus, refund, adjustment, expiry, reversal.
    pub kind: Option<String>,
    /// At most 200 (default 50).
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct TransactionPage {
    #[schema(value_type = Vec<Object>)]
    pub transactions: Vec<CreditTransaction>,
    /// Pass as `cursor` for the next (older) page; absent on the last page.
    pub next_cursor: Option<String>,
}

fn invalid(field: &'static str, code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::Validation(vec![FieldError { field, code, message: message.into() }])
}

async fn transactions_page(
    store: &dyn Store,
    account: &Account,
    query: TransactionsQuery,
) -> Result<TransactionPage, ApiError> {
    let kind = match query.kind.as_deref() {
        None => None,
        Some(k) => Some(CreditKind::parse(k).ok_or_else(|| invalid("kind", "invalid", "unknown transaction kind"))?),
    };
    let limit = query.limit.unwrap_or(50).clamp(1, MAX_PAGE);
    let before = match &query.cursor {
        None => None,
        Some(c) => Some(c.parse().map_err(|_| invalid("cursor", "invalid", "not a cursor from this list"))?),
    };
    let transactions = store.credit_transactions(account.id, TransactionQuery { kind, before, limit }).await?;
    let next_cursor =
        (transactions.len() == limit as usize).then(|| transactions[transactions.len() - 1].id.to_string());
    Ok(TransactionPage { transactions, next_cursor })
}

/// Transactions, newest first, paginated, optionally of one kind.
#[utoipa::path(get, path = "/v1/accounts/{id}/credits/transactions", tag = "credits", security(("bearer" = [])),
    params(("id" = String, Path, description = "Account id or `ext:<external id>`"), TransactionsQuery),
    responses(
        (status = 200, description = "A page of transactions", body = TransactionPage),
        (status = 404, description = "No such account", body = ErrorResponse),
        (status = 422, description = "Unknown kind or bad cursor", body = ErrorResponse),
    ))]
pub async fn transactions(
    State(state): State<AppState>,
    service: Service,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<TransactionsQuery>,
) -> ApiResult<Json<TransactionPage>> {
    service.require(Scope::CreditsRead)?;
    let account = resolve_account(&state, &id).await?;
    Ok(Json(transactions_page(&*state.store, &account, query).await?))
}

/// The signed-in user's transactions.
#[utoipa::path(get, path = "/v1/me/credits/transactions", tag = "me", security(("bearer" = [])), params(TransactionsQuery),
    responses((status = 200, description = "A page of transactions", body = TransactionPage)))]
pub async fn my_transactions(
    State(state): State<AppState>,
    current: CurrentUser,
    ApiQuery(query): ApiQuery<TransactionsQuery>,
) -> ApiResult<Json<TransactionPage>> {
    let account = state.store.account_by_id(current.user.account_id).await?.ok_or(ApiError::NotFound)?;
    Ok(Json(transactions_page(&*state.store, &account, query).await?))
}

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreditsBody {
    /// Credits to spend, grant or give back (positive).
    pub amount: i64,
    pub description: Option<String>,
    /// Your endpoint or feature (spends).
    pub endpoint: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Value>,
}

fn check(body: &CreditsBody) -> Result<(), ApiError> {
    let mut errors = Vec::new();
    if body.amount <= 0 || body.amount > MAX_CREDIT_AMOUNT {
        errors.push(FieldError { field: "amount", code: "out_of_range", message: format!("1 to {MAX_CREDIT_AMOUNT}") });
    }
    for (field, value) in [("description", &body.description), ("endpoint", &body.endpoint)] {
        if value.as_ref().is_some_and(|v| v.chars().count() > MAX_TEXT) {
            errors.push(FieldError { field, code: "too_long", message: format!("at most {MAX_TEXT} characters") });
        }
    }
    if body.metadata.as_ref().is_some_and(|m| !m.is_object()) {
        errors.push(FieldError { field: "metadata", code: "invalid", message: "a JSON object".into() });
    }
    if errors.is_empty() { Ok(()) } else { Err(ApiError::Validation(errors)) }
}

/// Writes one transfer and maps a refusal to 402 with the balance.
pub(crate) async fn transfer(state: &AppState, transfer: CreditTransfer) -> Result<CreditReceipt, ApiError> {
    let (account, requested) = (transfer.account, -transfer.amount);
    match state.store.transfer_credits(transfer).await {
        Err(StoreError::Conflict("insufficient_credits")) => {
            let balance = state.store.credit_balance(account).await?.balance;
            Err(ApiError::InsufficientCredits { balance, requested })
        }
        other => Ok(other?),
    }
}

/// A spend from `account` of `body.amount`, down to the floor its plan allows.
async fn spend_from(
    state: &AppState,
    account: &Account,
    actor: Actor,
    body: CreditsBody,
    idempotency: Option<tollgate_core::metering::Idempotency>,
) -> Result<CreditReceipt, ApiError> {
    let now = OffsetDateTime::now_utc();
    let subscription = state.store.subscription(account.id).await?;
    let catalog = state.catalog.get();
    let overdraft = effective_plan(&catalog, subscription.as_ref(), now).credits_overdraft;
    let mut t = CreditTransfer::new(account.id, CreditKind::Usage, -body.amount, actor, now);
    t.floor = -overdraft;
    t.description = body.description;
    t.endpoint = body.endpoint;
    t.metadata = body.metadata;
    t.idempotency = idempotency;
    transfer(state, t).await
}

/// Spends credits: refused with 402 `insufficient_credits` (and the balance) when the
/// balance, plus the plan's overdraft, does not cover it. With `Idempotency-Key` a
/// retry replays the first answer and spends nothing.
#[utoipa::path(post, path = "/v1/accounts/{id}/credits/spend", tag = "credits", security(("bearer" = [])),
    params(("id" = String, Path, description = "Account id or `ext:<external id>`"),
        ("Idempotency-Key" = Option<String>, Header, description = "Retries with the same key and body spend once")),
    request_body = CreditsBody,
    responses(
        (status = 200, description = "Spent; the transaction and the new balance", body = Object),
        (status = 402, description = "`insufficient_credits`", body = ErrorResponse),
        (status = 404, description = "No such account", body = ErrorResponse),
        (status = 422, description = "Invalid amount, or a reused `Idempotency-Key`", body = ErrorResponse),
    ))]
pub async fn spend(
    State(state): State<AppState>,
    service: Service,
    Path(id): Path<String>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<CreditsBody>,
) -> ApiResult<Json<CreditReceipt>> {
    service.require(Scope::CreditsWrite)?;
    check(&body)?;
    let account = resolve_account(&state, &id).await?;
    let idempotency =
        idempotency_for(&headers, &format_args!("svc:{}", service.0.id), "credits.spend", &(&account.id, &body))?;
    Ok(Json(spend_from(&state, &account, Actor::ServiceKey(service.0.id), body, idempotency).await?))
}

/// The signed-in user spends their own credits.
#[utoipa::path(post, path = "/v1/me/credits/spend", tag = "me", security(("bearer" = [])),
    params(("Idempotency-Key" = Option<String>, Header, description = "Retries with the same key and body spend once")),
    request_body = CreditsBody,
    responses(
        (status = 200, description = "Spent", body = Object),
        (status = 402, description = "`insufficient_credits`", body = ErrorResponse),
    ))]
pub async fn my_spend(
    State(state): State<AppState>,
    current: CurrentUser,
    headers: HeaderMap,
    ApiJson(body): ApiJson<CreditsBody>,
) -> ApiResult<Json<CreditReceipt>> {
    check(&body)?;
    let account = state.store.account_by_id(current.user.account_id).await?.ok_or(ApiError::NotFound)?;
    let idempotency =
        idempotency_for(&headers, &format_args!("user:{}", current.user.id), "credits.spend", &(&account.id, &body))?;
    Ok(Json(spend_from(&state, &account, current.actor(), body, idempotency).await?))
}

/// A grant (`bonus`) or a give-back (`refund`) by a backend, audited.
async fn give(
    state: &AppState,
    service: &Service,
    origin: &RequestOrigin,
    id: &str,
    kind: CreditKind,
    headers: &HeaderMap,
    body: CreditsBody,
) -> Result<CreditReceipt, ApiError> {
    service.require(Scope::CreditsWrite)?;
    check(&body)?;
    let account = resolve_account(state, id).await?;
    let route = format!("credits.{}", kind.as_str());
    let idempotency = idempotency_for(headers, &format_args!("svc:{}", service.0.id), &route, &(&account.id, &body))?;
    let now = OffsetDateTime::now_utc();
    let actor = Actor::ServiceKey(service.0.id);
    let mut t = CreditTransfer::new(account.id, kind, body.amount, actor.clone(), now);
    let action = if kind == CreditKind::Bonus { "credits.granted" } else { "credits.refunded" };
    t.audit = Some(
        AuditEvent::new(actor, action, origin, now)
            .meta("account_id", account.id.to_string())
            .meta("amount", body.amount)
            .meta("transfer_id", t.id.to_string()),
    );
    t.description = body.description;
    t.metadata = body.metadata;
    t.idempotency = idempotency;
    transfer(state, t).await
}

/// Grants credits for free (`bonus`).
#[utoipa::path(post, path = "/v1/accounts/{id}/credits/grant", tag = "credits", security(("bearer" = [])),
    params(("id" = String, Path, description = "Account id or `ext:<external id>`"),
        ("Idempotency-Key" = Option<String>, Header, description = "Retries with the same key and body grant once")),
    request_body = CreditsBody,
    responses(
        (status = 200, description = "Granted", body = Object),
        (status = 404, description = "No such account", body = ErrorResponse),
    ))]
pub async fn grant(
    State(state): State<AppState>,
    service: Service,
    Origin(origin): Origin,
    Path(id): Path<String>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<CreditsBody>,
) -> ApiResult<Json<CreditReceipt>> {
    Ok(Json(give(&state, &service, &origin, &id, CreditKind::Bonus, &headers, body).await?))
}

/// Gives credits back for usage that did not deliver (`refund`).
#[utoipa::path(post, path = "/v1/accounts/{id}/credits/refund", tag = "credits", security(("bearer" = [])),
    params(("id" = String, Path, description = "Account id or `ext:<external id>`"),
        ("Idempotency-Key" = Option<String>, Header, description = "Retries with the same key and body refund once")),
    request_body = CreditsBody,
    responses(
        (status = 200, description = "Given back", body = Object),
        (status = 404, description = "No such account", body = ErrorResponse),
    ))]
pub async fn refund(
    State(state): State<AppState>,
    service: Service,
    Origin(origin): Origin,
    Path(id): Path<String>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<CreditsBody>,
) -> ApiResult<Json<CreditReceipt>> {
    Ok(Json(give(&state, &service, &origin, &id, CreditKind::Refund, &headers, body).await?))
}

#[derive(Serialize, ToSchema)]
pub struct Payments {
    #[schema(value_type = Vec<Object>)]
    pub payments: Vec<Payment>,
}

/// Payments of an account, newest first (the last 100).
#[utoipa::path(get, path = "/v1/accounts/{id}/payments", tag = "credits", security(("bearer" = [])),
    params(("id" = String, Path, description = "Account id or `ext:<external id>`")),
    responses(
        (status = 200, description = "Payments", body = Payments),
        (status = 404, description = "No such account", body = ErrorResponse),
    ))]
pub async fn payments(
    State(state): State<AppState>,
    service: Service,
    Path(id): Path<String>,
) -> ApiResult<Json<Payments>> {
    service.require(Scope::CreditsRead)?;
    let account = resolve_account(&state, &id).await?;
    Ok(Json(Payments { payments: state.store.payments(Some(account.id), 100).await? }))
}

/// The signed-in user's payments.
#[utoipa::path(get, path = "/v1/me/payments", tag = "me", security(("bearer" = [])),
    responses((status = 200, description = "Payments", body = Payments)))]
pub async fn my_payments(State(state): State<AppState>, current: CurrentUser) -> ApiResult<Json<Payments>> {
    Ok(Json(Payments { payments: state.store.payments(Some(current.user.account_id), 100).await? }))
}
