//! `/v1/accounts/*`: customers of a product that keeps its own users (bring your own
//! identity), named by Tollgate id or `ext:<external id>`; their plan, entitlements and
//! usage. Called by the product's backend with a service key.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tollgate_core::StoreError;
use tollgate_core::accounts::{
    Account, MAX_EXTERNAL_ID_LEN, NewExternalAccount, Scope, Subscription, SubscriptionStatus,
};
use tollgate_core::audit::{Actor, AuditEvent};
use tollgate_core::entitlements::{effective_plan_key, period_end};
use tollgate_core::ids::AccountId;
use tollgate_core::metering::quotas::Entitlements;
use tollgate_core::store::DailyUsage;
use utoipa::{IntoParams, ToSchema};

use super::views::ErrorResponse;
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiJson, CurrentUser, Origin};
use crate::service_key::Service;
use crate::state::AppState;

/// `{id}` is a Tollgate account id or `ext:<external id>`.
pub async fn resolve_account(state: &AppState, id: &str) -> Result<Account, ApiError> {
    let account = match id.strip_prefix("ext:") {
        Some(external) => state.store.account_by_external_id(external).await?,
        None => match id.parse::<AccountId>() {
            Ok(id) => state.store.account_by_id(id).await?,
            Err(_) => None,
        },
    };
    account.ok_or(ApiError::NotFound)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateAccount {
    /// Your own id for the customer; creating twice returns the same account.
    pub external_id: String,
    pub name: Option<String>,
    pub email: Option<String>,
    /// A plan to subscribe the new account to (manual provider).
    pub plan: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct AccountView {
    pub id: uuid::Uuid,
    pub kind: String,
    pub external_id: Option<String>,
    pub name: Option<String>,
    pub email: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

impl From<&Account> for AccountView {
    fn from(a: &Account) -> Self {
        Self {
            id: a.id.0,
            kind: a.kind.as_str().to_owned(),
            external_id: a.external_id.clone(),
            name: a.name.clone(),
            email: a.email.clone(),
            created_at: a.created_at,
        }
    }
}

fn check_create(body: &CreateAccount) -> Result<(), ApiError> {
    use tollgate_core::identity::flows::FieldError;
    let mut errors = Vec::new();
    if body.external_id.trim().is_empty() || body.external_id.len() > MAX_EXTERNAL_ID_LEN {
        errors.push(FieldError {
            field: "external_id",
            code: "invalid",
            message: format!("1 to {MAX_EXTERNAL_ID_LEN} characters"),
        });
    }
    if body.name.as_ref().is_some_and(|n| n.chars().count() > 200) {
        errors.push(FieldError { field: "name", code: "too_long", message: "at most 200 characters".into() });
    }
    if let Some(email) = &body.email
        && tollgate_core::identity::EmailAddress::parse(email).is_err()
    {
        errors.push(FieldError { field: "email", code: "invalid_email", message: "not a valid email address".into() });
    }
    if errors.is_empty() { Ok(()) } else { Err(ApiError::Validation(errors)) }
}

/// Creates an external customer (or returns it when `external_id` exists: 200).
#[utoipa::path(post, path = "/v1/accounts", tag = "accounts", security(("bearer" = [])), request_body = CreateAccount,
    responses(
        (status = 201, description = "Created", body = AccountView),
        (status = 200, description = "Already existed", body = AccountView),
        (status = 403, description = "`insufficient_scope`: needs `accounts:write`", body = ErrorResponse),
        (status = 422, description = "Invalid fields or unknown plan", body = ErrorResponse),
    ))]
pub async fn create_account(
    State(state): State<AppState>,
    service: Service,
    Origin(origin): Origin,
    ApiJson(body): ApiJson<CreateAccount>,
) -> ApiResult<(StatusCode, Json<AccountView>)> {
    service.require(Scope::AccountsWrite)?;
    check_create(&body)?;
    let catalog = state.catalog.get();
    if let Some(plan) = &body.plan
        && catalog.plan_for_sale(plan).is_none()
    {
        return Err(ApiError::UnknownPlan(plan.clone()));
    }
    let now = OffsetDateTime::now_utc();
    let new = NewExternalAccount {
        id: AccountId::new(),
        external_id: body.external_id.trim().to_owned(),
        name: body.name,
        email: body.email.map(|e| e.trim().to_lowercase()),
        created_at: now,
    };
    let (account, created) = state.store.upsert_external_account(new).await?;
    if created && let Some(plan) = body.plan.filter(|p| *p != catalog.default_plan().key) {
        change_subscription(&state, &account, by_service(&service, &origin), |_, now| {
            Ok(Some((fresh_subscription(&account, &plan, 0, now), "subscription.changed")))
        })
        .await?;
    }
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(AccountView::from(&account))))
}

/// A subscription to `plan` starting now (a new billing period), with no scheduled
/// change.
pub(crate) fn fresh_subscription(account: &Account, plan: &str, trial_days: u32, now: OffsetDateTime) -> Subscription {
    Subscription {
        account_id: account.id,
        plan: plan.to_owned(),
        status: if trial_days > 0 { SubscriptionStatus::Trialing } else { SubscriptionStatus::Active },
        provider: "manual".into(),
        started_at: now,
        trial_ends_at: (trial_days > 0).then(|| now + time::Duration::days(i64::from(trial_days))),
        cancel_at_period_end: false,
        scheduled_plan: None,
        scheduled_at: None,
        updated_at: now,
        provider_subscription_id: None,
        provider_state_at: None,
    }
}

/// How many times a subscription change is recomputed when another change to the
/// same subscription lands between its read and its write.
const CHANGE_ATTEMPTS: usize = 5;

/// Read, decide, write with compare-and-set: `change` gets the live subscription
/// as it stands (scheduled changes that are due folded in) and returns the new one
/// with its audit action, or `None` when nothing is to change. If the stored row
/// changed meanwhile, the store refuses and the change is decided again on the new
/// state, so a cancel and a downgrade racing each other both take effect in some
/// order instead of one silently overwriting the other.
/// `audit` gives the event of a change (its action, the new subscription).
pub(crate) async fn change_subscription(
    state: &AppState,
    account: &Account,
    audit: impl Fn(&'static str, &Subscription) -> AuditEvent,
    mut change: impl FnMut(Option<Subscription>, OffsetDateTime) -> Result<Option<(Subscription, &'static str)>, ApiError>,
) -> Result<(), ApiError> {
    let mut was_live = false;
    for _ in 0..CHANGE_ATTEMPTS {
        let now = OffsetDateTime::now_utc();
        let stored = state.store.subscription(account.id).await?;
        let previous = stored.as_ref().map(|s| s.updated_at);
        let current = settled(stored, now);
        // Decided against a live subscription that a concurrent change then ended (a
        // cancel): deciding again on "none" would turn, say, a scheduled downgrade
        // into a new subscription. The caller asks again, knowing.
        if was_live && current.is_none() {
            return Err(ApiError::ConcurrentChange);
        }
        was_live = current.is_some();
        let Some((mut next, action)) = change(current, now)? else { return Ok(()) };
        next.updated_at = Subscription::version_after(previous, now);
        let event = audit(action, &next)
            .meta("account_id", next.account_id.to_string())
            .meta("plan", next.plan.clone())
            .meta("scheduled_plan", next.scheduled_plan.clone())
            .meta("cancel_at_period_end", next.cancel_at_period_end);
        match state.store.put_subscription(next, previous, event).await {
            Err(StoreError::Conflict("subscription_changed")) => continue,
            other => return Ok(other?),
        }
    }
    Err(ApiError::ConcurrentChange)
}

/// The audit event of a subscription change made through a service key.
fn by_service<'a>(
    service: &'a Service,
    origin: &'a tollgate_core::audit::RequestOrigin,
) -> impl Fn(&'static str, &Subscription) -> AuditEvent + 'a {
    move |action, next| {
        AuditEvent::new(Actor::System, action, origin, next.updated_at).meta("service_key_id", service.0.id.to_string())
    }
}

/// The live subscription as it stands now, with a scheduled change that is already
/// due folded in (so a new change starts from the plan really in force).
fn settled(subscription: Option<Subscription>, now: OffsetDateTime) -> Option<Subscription> {
    let mut s = subscription.filter(|s| s.status.is_live())?;
    let plan = effective_plan_key(Some(&s), now)?;
    if s.scheduled_at.is_some_and(|at| at <= now) {
        s.plan = plan;
        s.scheduled_plan = None;
        s.scheduled_at = None;
    }
    Some(s)
}

/// An account by id or `ext:<external id>`.
#[utoipa::path(get, path = "/v1/accounts/{id}", tag = "accounts", security(("bearer" = [])),
    params(("id" = String, Path, description = "Account id or `ext:<external id>`")),
    responses(
        (status = 200, description = "The account", body = AccountView),
        (status = 404, description = "No such account", body = ErrorResponse),
    ))]
pub async fn get_account(
    State(state): State<AppState>,
    service: Service,
    Path(id): Path<String>,
) -> ApiResult<Json<AccountView>> {
    service.require(Scope::AccountsRead)?;
    Ok(Json(AccountView::from(&resolve_account(&state, &id).await?)))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubscribeBody {
    pub plan: String,
    /// Start with a trial of this many days.
    #[serde(default)]
    pub trial_days: u32,
    /// Switch at the end of the current billing period instead of now (a downgrade).
    #[serde(default)]
    pub at_period_end: bool,
}

/// Puts the account on a plan now (manual provider; Stripe comes with billing).
#[utoipa::path(post, path = "/v1/accounts/{id}/subscription", tag = "accounts", security(("bearer" = [])),
    params(("id" = String, Path, description = "Account id or `ext:<external id>`")), request_body = SubscribeBody,
    responses(
        (status = 200, description = "Subscribed; the new entitlements", body = Object),
        (status = 404, description = "No such account", body = ErrorResponse),
        (status = 422, description = "Unknown plan", body = ErrorResponse),
    ))]
pub async fn put_subscription(
    State(state): State<AppState>,
    service: Service,
    Origin(origin): Origin,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<SubscribeBody>,
) -> ApiResult<Json<Entitlements>> {
    service.require(Scope::AccountsWrite)?;
    let account = resolve_account(&state, &id).await?;
    subscribe(&state, &account, body, by_service(&service, &origin)).await?;
    Ok(Json(state.quotas.entitlements(&state.catalog.get(), account).await?))
}

/// Puts `account` on `body.plan` (now, or at the end of the period), audited by
/// `audit`: a service key's call and an admin's share it.
pub(crate) async fn subscribe(
    state: &AppState,
    account: &Account,
    body: SubscribeBody,
    audit: impl Fn(&'static str, &Subscription) -> AuditEvent,
) -> Result<(), ApiError> {
    // An archived plan is no longer sold (its subscribers keep it).
    if state.catalog.get().plan_for_sale(&body.plan).is_none() {
        return Err(ApiError::UnknownPlan(body.plan));
    }
    if body.trial_days > 366 {
        return Err(ApiError::Validation(vec![tollgate_core::identity::flows::FieldError {
            field: "trial_days",
            code: "too_long",
            message: "at most 366 days".into(),
        }]));
    }
    let (plan, trial_days, at_period_end) = (body.plan, body.trial_days, body.at_period_end);
    change_subscription(state, account, audit, |current, now| {
        Ok(match current {
            Some(mut current) if at_period_end => {
                current.scheduled_at = Some(period_end(current.started_at, now));
                current.scheduled_plan = Some(plan.clone());
                current.cancel_at_period_end = false;
                Some((current, "subscription.change_scheduled"))
            }
            // Asking again for the plan already in force changes nothing (and cannot
            // restart the billing period or the trial).
            Some(current)
                if current.plan == plan && current.scheduled_plan.is_none() && !current.cancel_at_period_end =>
            {
                None
            }
            Some(mut current) if current.plan == plan => {
                current.scheduled_plan = None;
                current.scheduled_at = None;
                current.cancel_at_period_end = false;
                Some((current, "subscription.change_unscheduled"))
            }
            _ => Some((fresh_subscription(account, &plan, trial_days, now), "subscription.changed")),
        })
    })
    .await
}

#[derive(Deserialize, IntoParams)]
pub struct CancelQuery {
    /// Keep the plan until the end of the current billing period (default: now).
    #[serde(default)]
    pub at_period_end: bool,
}

/// Cancels the subscription: now (back to the default plan at once) or at the end of
/// the current billing period.
#[utoipa::path(delete, path = "/v1/accounts/{id}/subscription", tag = "accounts", security(("bearer" = [])),
    params(("id" = String, Path, description = "Account id or `ext:<external id>`"), CancelQuery),
    responses(
        (status = 200, description = "Canceled; the entitlements now", body = Object),
        (status = 404, description = "No such account, or no live subscription", body = ErrorResponse),
    ))]
pub async fn cancel_subscription(
    State(state): State<AppState>,
    service: Service,
    Origin(origin): Origin,
    Path(id): Path<String>,
    Query(query): Query<CancelQuery>,
) -> ApiResult<Json<Entitlements>> {
    service.require(Scope::AccountsWrite)?;
    let account = resolve_account(&state, &id).await?;
    // A subscription a payment provider bills ends there first, so it stops charging;
    // its own `deleted` event then finds the subscription already canceled.
    if let Some(current) = state.store.subscription(account.id).await?.filter(|s| s.status.is_live())
        && let Some(provider_id) = current.provider_subscription_id.as_deref()
    {
        if query.at_period_end {
            return Err(ApiError::BillingUnsupported(
                "a provider's subscription is canceled at period end through its customer portal",
            ));
        }
        if current.provider == crate::billing::stripe::PROVIDER {
            use tollgate_core::billing::PaymentProvider;
            state.billing.checkout_provider()?.cancel_subscription(provider_id).await?;
        }
    }
    change_subscription(&state, &account, by_service(&service, &origin), |current, now| {
        let mut current = current.ok_or(ApiError::NotFound)?;
        if query.at_period_end {
            current.cancel_at_period_end = true;
            current.scheduled_plan = None;
            current.scheduled_at = Some(period_end(current.started_at, now));
        } else {
            current.status = SubscriptionStatus::Canceled;
            current.cancel_at_period_end = false;
            current.scheduled_plan = None;
            current.scheduled_at = None;
        }
        Ok(Some((current, "subscription.canceled")))
    })
    .await?;
    Ok(Json(state.quotas.entitlements(&state.catalog.get(), account).await?))
}

/// The account's plan, features, and every meter's limits with current usage.
#[utoipa::path(get, path = "/v1/accounts/{id}/entitlements", tag = "accounts", security(("bearer" = [])),
    params(("id" = String, Path, description = "Account id or `ext:<external id>`")),
    responses(
        (status = 200, description = "Entitlements with usage, `can_consume`, `needs_upgrade`", body = Object),
        (status = 404, description = "No such account", body = ErrorResponse),
    ))]
pub async fn entitlements(
    State(state): State<AppState>,
    service: Service,
    Path(id): Path<String>,
) -> ApiResult<Json<Entitlements>> {
    service.require(Scope::UsageRead)?;
    let account = resolve_account(&state, &id).await?;
    Ok(Json(state.quotas.entitlements(&state.catalog.get(), account).await?))
}

/// The signed-in user's personal account: plan, features, limits and usage.
#[utoipa::path(get, path = "/v1/me/entitlements", tag = "me", security(("bearer" = [])),
    responses((status = 200, description = "Entitlements with usage", body = Object)))]
pub async fn my_entitlements(State(state): State<AppState>, current: CurrentUser) -> ApiResult<Json<Entitlements>> {
    let account = state.store.account_by_id(current.user.account_id).await?.ok_or(ApiError::NotFound)?;
    Ok(Json(state.quotas.entitlements(&state.catalog.get(), account).await?))
}

#[derive(Deserialize, IntoParams)]
pub struct UsageQuery {
    /// First day, `YYYY-MM-DD` (default: 30 days ago).
    pub from: Option<String>,
    /// Last day, `YYYY-MM-DD` (default: today).
    pub to: Option<String>,
    pub meter: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct UsageSeries {
    #[schema(value_type = Vec<Object>)]
    pub days: Vec<DailyUsage>,
}

fn day(s: &str, field: &'static str) -> Result<String, ApiError> {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    time::Date::parse(s, format).map(|_| s.to_owned()).map_err(|_| {
        ApiError::Validation(vec![tollgate_core::identity::flows::FieldError {
            field,
            code: "invalid_date",
            message: "expected YYYY-MM-DD".into(),
        }])
    })
}

/// Daily consumed and denied totals per meter.
#[utoipa::path(get, path = "/v1/accounts/{id}/usage", tag = "accounts", security(("bearer" = [])),
    params(("id" = String, Path, description = "Account id or `ext:<external id>`"), UsageQuery),
    responses(
        (status = 200, description = "Daily totals", body = UsageSeries),
        (status = 404, description = "No such account", body = ErrorResponse),
        (status = 422, description = "Bad dates", body = ErrorResponse),
    ))]
pub async fn usage(
    State(state): State<AppState>,
    service: Service,
    Path(id): Path<String>,
    Query(query): Query<UsageQuery>,
) -> ApiResult<Json<UsageSeries>> {
    service.require(Scope::UsageRead)?;
    let account = resolve_account(&state, &id).await?;
    let today = OffsetDateTime::now_utc().date();
    let format = time::macros::format_description!("[year]-[month]-[day]");
    let to = match &query.to {
        Some(s) => day(s, "to")?,
        None => today.format(format).map_err(|e| ApiError::Internal(e.to_string()))?,
    };
    let from = match &query.from {
        Some(s) => day(s, "from")?,
        None => (today - time::Duration::days(30)).format(format).map_err(|e| ApiError::Internal(e.to_string()))?,
    };
    let days = state.store.usage_daily(account.id, query.meter.as_deref(), &from, &to).await?;
    Ok(Json(UsageSeries { days }))
}
