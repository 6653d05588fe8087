//! `/v1/admin`: the admin API over users and the audit log, for admin users and
//! service keys with `admin:read` / `admin:write` (the [`Admin`] extractor). Every
//! change writes exactly one audit event naming the admin, in the change's own
//! transaction (clearing rate limits, which touches no table, records it after).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tollgate_core::accounts::Subscription;
use tollgate_core::admin::{DEFAULT_PAGE, MAX_PAGE, PlanFilter, UserChange, UserCursor, UserQuery, UserSort};
use tollgate_core::audit::{Actor, AuditEvent, AuditQuery, RequestOrigin, Severity};
use tollgate_core::billing::Payment;
use tollgate_core::credits::{CreditBalance, CreditTransaction, TransactionQuery};
use tollgate_core::identity::flows::{FieldError, parse_name};
use tollgate_core::identity::{EmailAddress, NewSession, Role, SecretToken, SessionScope, User, UserStatus};
use tollgate_core::ids::{AuditEventId, SessionId, UserId};
use tollgate_core::metering::quotas::Entitlements;
use utoipa::{IntoParams, ToSchema};

use super::accounts::{AccountView, change_subscription, fresh_subscription};
use super::attempts;
use super::views::{ErrorResponse, SessionView, UserView};
use crate::error::{ApiError, ApiResult};
use crate::extract::{Admin, ApiJson, ApiQuery, Origin, parse_json};
use crate::state::AppState;

/// How many recent items of each kind a user's detail shows.
const RECENT: u32 = 20;

pub(super) fn invalid(field: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::Validation(vec![FieldError { field, code: "invalid", message: message.into() }])
}

pub(super) fn parse_time(field: &'static str, value: Option<&str>) -> Result<Option<OffsetDateTime>, ApiError> {
    value
        .map(|v| OffsetDateTime::parse(v, &Rfc3339).map_err(|_| invalid(field, "expected an RFC 3339 time")))
        .transpose()
}

/// Cursors are opaque to clients: base64url of a small JSON value.
pub(super) fn encode_cursor(value: &impl Serialize) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).unwrap_or_default())
}

pub(super) fn decode_cursor<T: DeserializeOwned>(cursor: &str) -> Result<T, ApiError> {
    let bytes = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| invalid("cursor", "not a cursor from this list"))?;
    serde_json::from_slice(&bytes).map_err(|_| invalid("cursor", "not a cursor from this list"))
}

/// A keyset position in a newest-first list (audit log, usage log, payments): the
/// last row's time in microseconds and its id.
#[derive(Serialize, Deserialize)]
pub(super) struct TimeCursor<I> {
    pub t: i64,
    pub id: I,
}

pub(super) fn time_cursor<I: DeserializeOwned>(cursor: Option<&str>) -> Result<Option<(OffsetDateTime, I)>, ApiError> {
    let Some(c) = cursor else { return Ok(None) };
    let cursor: TimeCursor<I> = decode_cursor(c)?;
    let at = OffsetDateTime::from_unix_timestamp_nanos(i128::from(cursor.t) * 1000)
        .map_err(|_| invalid("cursor", "not a cursor from this list"))?;
    Ok(Some((at, cursor.id)))
}

/// A user list's cursor remembers its sort, so it cannot be replayed on another order.
#[derive(Serialize, Deserialize)]
struct UsersCursor {
    sort: String,
    #[serde(flatten)]
    at: UserCursor,
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct UsersParams {
    /// A substring of the email or the name (any case), or a prefix of the id.
    pub q: Option<String>,
    /// `active`, `suspended` or `deleted` (default: all but deleted).
    pub status: Option<String>,
    /// A plan key: users whose live subscription is on it (the default plan also
    /// matches users without one).
    pub plan: Option<String>,
    /// `user` or `admin`.
    pub role: Option<String>,
    /// RFC 3339; at or after.
    pub created_after: Option<String>,
    /// RFC 3339; strictly before.
    pub created_before: Option<String>,
    /// `created`, `last_login` or `email`; a leading `-` sorts descending (default
    /// `-created`, newest first).
    pub sort: Option<String>,
    /// At most 200 (default 50).
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page, with the same filters and sort.
    pub cursor: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct UserList {
    pub users: Vec<UserView>,
    /// How many users match the filters, over all pages.
    pub total: u64,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

fn user_query(state: &AppState, params: UsersParams) -> Result<UserQuery, ApiError> {
    let status = match params.status.as_deref() {
        None => None,
        Some(s) => Some(UserStatus::parse(s).ok_or_else(|| invalid("status", "active, suspended or deleted"))?),
    };
    let role = match params.role.as_deref() {
        None => None,
        Some(r) => Some(Role::parse(r).ok_or_else(|| invalid("role", "user or admin"))?),
    };
    let plan = match params.plan {
        None => None,
        Some(key) => {
            let catalog = state.catalog.get();
            if !catalog.plans.contains_key(&key) {
                return Err(ApiError::UnknownPlan(key));
            }
            let is_default = catalog.default_plan().key == key;
            Some(PlanFilter { key, is_default })
        }
    };
    let sort = match params.sort.as_deref() {
        None => UserSort::default(),
        Some(s) => {
            UserSort::parse(s).ok_or_else(|| invalid("sort", "created, last_login or email, - for descending"))?
        }
    };
    let after = match params.cursor.as_deref() {
        None => None,
        Some(c) => {
            let cursor: UsersCursor = decode_cursor(c)?;
            if cursor.sort != sort.as_string() {
                return Err(invalid("cursor", "this cursor belongs to another sort"));
            }
            Some(cursor.at)
        }
    };
    let q = params.q.map(|q| q.trim().to_lowercase()).filter(|q| !q.is_empty());
    if q.as_ref().is_some_and(|q| q.chars().count() > 320) {
        return Err(invalid("q", "at most 320 characters"));
    }
    Ok(UserQuery {
        q,
        status,
        role,
        plan,
        created_after: parse_time("created_after", params.created_after.as_deref())?,
        created_before: parse_time("created_before", params.created_before.as_deref())?,
        sort,
        after,
        limit: params.limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE),
    })
}

/// Users, searched, filtered and sorted, a page at a time.
#[utoipa::path(get, path = "/v1/admin/users", tag = "admin", security(("bearer" = [])), params(UsersParams),
    responses(
        (status = 200, description = "A page of users and the total", body = UserList),
        (status = 401, description = "`unauthenticated`", body = ErrorResponse),
        (status = 403, description = "`forbidden`, `admin_2fa_required`, `impersonation_forbidden` or `insufficient_scope`", body = ErrorResponse),
        (status = 422, description = "`validation_failed`: a bad filter, sort or cursor", body = ErrorResponse),
    ))]
pub async fn list_users(
    State(state): State<AppState>,
    _admin: Admin,
    ApiQuery(params): ApiQuery<UsersParams>,
) -> ApiResult<Json<UserList>> {
    let query = user_query(&state, params)?;
    let sort = query.sort.as_string();
    let page = state.store.admin_users(query).await?;
    Ok(Json(UserList {
        users: page.users.iter().map(UserView::from).collect(),
        total: page.total,
        next_cursor: page.next.map(|at| encode_cursor(&UsersCursor { sort, at })),
    }))
}

/// An audit event as the admin API shows it.
#[derive(Serialize, ToSchema)]
pub struct AuditEventView {
    pub id: uuid::Uuid,
    /// `{"type": "user" | "service_key" | "system" | "anonymous", "id": ...}`.
    #[schema(value_type = Object)]
    pub actor: Actor,
    pub action: String,
    pub target_type: Option<String>,
    pub target_id: Option<String>,
    #[schema(value_type = Object)]
    pub metadata: serde_json::Value,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    #[schema(value_type = String, example = "info")]
    pub severity: Severity,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

impl From<AuditEvent> for AuditEventView {
    fn from(e: AuditEvent) -> Self {
        Self {
            id: e.id.0,
            actor: e.actor,
            action: e.action,
            target_type: e.target_type,
            target_id: e.target_id,
            metadata: e.metadata,
            ip: e.ip,
            user_agent: e.user_agent,
            severity: e.severity,
            created_at: e.created_at,
        }
    }
}

/// Everything about one user an admin needs, and no secret.
#[derive(Serialize, ToSchema)]
pub struct UserDetail {
    pub user: UserView,
    pub account: Option<AccountView>,
    /// Plan in force, subscription, features and every meter with its usage.
    #[schema(value_type = Object)]
    pub entitlements: Option<Entitlements>,
    #[schema(value_type = Object)]
    pub credits: CreditBalance,
    #[schema(value_type = Vec<Object>)]
    pub recent_transactions: Vec<CreditTransaction>,
    /// Live sessions, newest first.
    pub sessions: Vec<SessionView>,
    /// The account's API keys that are not revoked (prefixes, never secrets).
    pub api_keys: Vec<super::api_keys::ApiKeyView>,
    #[schema(value_type = Vec<Object>)]
    pub recent_payments: Vec<Payment>,
    /// Audit events about the user, newest first.
    pub recent_audit_events: Vec<AuditEventView>,
}

async fn live_user(state: &AppState, id: &str) -> Result<User, ApiError> {
    let id: UserId = id.parse().map_err(|_| ApiError::NotFound)?;
    state.store.user_by_id(id).await?.ok_or(ApiError::NotFound)
}

/// One user: profile, account, plan and usage, credits, sessions, payments, audit trail.
#[utoipa::path(get, path = "/v1/admin/users/{id}", tag = "admin", security(("bearer" = [])),
    params(("id" = String, Path, description = "User id")),
    responses(
        (status = 200, description = "The user", body = UserDetail),
        (status = 404, description = "No such user", body = ErrorResponse),
    ))]
pub async fn get_user(
    State(state): State<AppState>,
    _admin: Admin,
    Path(id): Path<String>,
) -> ApiResult<Json<UserDetail>> {
    let user = live_user(&state, &id).await?;
    let store = &state.store;
    let account = store.account_by_id(user.account_id).await?;
    let entitlements = match &account {
        Some(account) => Some(state.quotas.entitlements(&state.catalog.get(), account.clone()).await?),
        None => None,
    };
    let transactions = TransactionQuery { kind: None, before: None, limit: RECENT };
    let audit = AuditQuery { target_user: Some(user.id), limit: RECENT, ..Default::default() };
    Ok(Json(UserDetail {
        account: account.as_ref().map(AccountView::from),
        entitlements,
        credits: store.credit_balance(user.account_id).await?,
        recent_transactions: store.credit_transactions(user.account_id, transactions).await?,
        sessions: store
            .list_sessions(user.id, OffsetDateTime::now_utc())
            .await?
            .iter()
            .map(|s| SessionView::new(s, false))
            .collect(),
        api_keys: store.api_keys(user.account_id).await?.iter().map(super::api_keys::ApiKeyView::from).collect(),
        recent_payments: store.payments(Some(user.account_id), RECENT).await?,
        recent_audit_events: store.list_audit(audit).await?.into_iter().map(AuditEventView::from).collect(),
        user: UserView::from(&user),
    }))
}

#[derive(Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PatchStatus {
    Active,
    Suspended,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserPatch {
    /// `suspended` ends every session at once; `active` lifts a suspension.
    pub status: Option<PatchStatus>,
    #[schema(value_type = Option<String>, example = "admin")]
    pub role: Option<Role>,
    /// Puts the user's account on this plan now; must be changed on its own.
    pub plan: Option<String>,
    /// `null` clears the name; absent leaves it.
    #[serde(default, deserialize_with = "super::me::double_option")]
    #[schema(value_type = Option<String>)]
    pub name: Option<Option<String>>,
    /// Set as given (the admin vouches for it).
    pub email: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct AdminUserResponse {
    pub user: UserView,
}

fn admin_event(admin: &Admin, action: &str, origin: &RequestOrigin, user: UserId) -> AuditEvent {
    let severity = match action {
        "admin.user.suspended" | "admin.user.deleted" | "admin.user.role_changed" => Severity::Warning,
        _ => Severity::Info,
    };
    AuditEvent::new(admin.actor(), action, origin, OffsetDateTime::now_utc()).target_user(user).severity(severity)
}

/// An admin may not lock themselves out (suspend, delete or demote their own user).
fn refuse_self_lockout(admin: &Admin, user: &User, change: &UserChange) -> Result<(), ApiError> {
    let locks_out =
        matches!(change.status, Some(UserStatus::Suspended | UserStatus::Deleted)) || change.role == Some(Role::User);
    if admin.user_id() == Some(user.id) && locks_out { Err(ApiError::AdminSelfChange) } else { Ok(()) }
}

async fn apply_change(
    state: &AppState,
    admin: &Admin,
    origin: &RequestOrigin,
    user: &User,
    change: UserChange,
) -> Result<User, ApiError> {
    refuse_self_lockout(admin, user, &change)?;
    let mut event = admin_event(admin, change.action(user), origin, user.id);
    if let Some(status) = change.status {
        event = event.meta("status", status.as_str()).meta("previous_status", user.status.as_str());
    }
    if let Some(role) = change.role {
        event = event.meta("role", role.as_str()).meta("previous_role", user.role.as_str());
    }
    if let Some(email) = &change.email {
        event = event.meta("email", email.as_str()).meta("previous_email", user.email.as_str());
    }
    if change.name.is_some() {
        event = event.meta("name_changed", true);
    }
    Ok(state.store.admin_update_user(user.id, change, event).await?)
}

/// Puts the user's account on `plan` now (nothing when it is already on it).
async fn change_plan(
    state: &AppState,
    admin: &Admin,
    origin: &RequestOrigin,
    user: &User,
    plan: String,
) -> Result<(), ApiError> {
    // As for a subscription set any other way: an archived plan is no longer sold.
    if state.catalog.get().plan_for_sale(&plan).is_none() {
        return Err(ApiError::UnknownPlan(plan));
    }
    let account = state.store.account_by_id(user.account_id).await?.ok_or(ApiError::NotFound)?;
    let audit = |_: &'static str, next: &Subscription| {
        AuditEvent::new(admin.actor(), "admin.user.plan_changed", origin, next.updated_at).target_user(user.id)
    };
    change_subscription(state, &account, audit, |current, now| {
        // `current` is already settled: a scheduled change that is due is folded in.
        Ok(match current {
            Some(current)
                if current.plan == plan && current.scheduled_plan.is_none() && !current.cancel_at_period_end =>
            {
                None
            }
            _ => Some((fresh_subscription(&account, &plan, 0, now), "admin.user.plan_changed")),
        })
    })
    .await
}

/// Changes a user: suspend or activate, role, plan, name, email.
#[utoipa::path(patch, path = "/v1/admin/users/{id}", tag = "admin", security(("bearer" = [])),
    params(("id" = String, Path, description = "User id")), request_body = UserPatch,
    responses(
        (status = 200, description = "The user as changed", body = AdminUserResponse),
        (status = 404, description = "No such user (or deleted)", body = ErrorResponse),
        (status = 409, description = "`email_taken`, or `admin_self_change`", body = ErrorResponse),
        (status = 422, description = "Invalid fields or unknown plan", body = ErrorResponse),
    ))]
pub async fn update_user(
    State(state): State<AppState>,
    admin: Admin,
    Origin(origin): Origin,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<UserPatch>,
) -> ApiResult<Json<AdminUserResponse>> {
    let user = live_user(&state, &id).await?;
    if user.status == UserStatus::Deleted {
        return Err(ApiError::NotFound);
    }
    let mut errors = Vec::new();
    let name = body.name.map(|raw| parse_name(raw.as_deref()).map_err(|e| errors.push(e)).ok().flatten());
    let email = body.email.as_deref().and_then(|e| {
        EmailAddress::parse(e)
            .map_err(|e| errors.push(FieldError { field: "email", code: "invalid", message: e.to_string() }))
            .ok()
    });
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    let change = UserChange {
        status: body.status.map(|s| match s {
            PatchStatus::Active => UserStatus::Active,
            PatchStatus::Suspended => UserStatus::Suspended,
        }),
        role: body.role,
        name,
        email,
    };
    // One change, one audit event: a plan change is a subscription change with its
    // own transaction, so it is not mixed with changes to the user.
    let user = match (body.plan, change.is_empty()) {
        (Some(plan), true) => {
            change_plan(&state, &admin, &origin, &user, plan).await?;
            user
        }
        (Some(_), false) => return Err(invalid("plan", "change the plan on its own, without other fields")),
        (None, true) => return Err(invalid("body", "nothing to change")),
        (None, false) => apply_change(&state, &admin, &origin, &user, change).await?,
    };
    Ok(Json(AdminUserResponse { user: UserView::from(&user) }))
}

/// Soft-deletes a user: status `deleted`, sessions ended, email free to register
/// again; the rows stay for the audit trail.
#[utoipa::path(delete, path = "/v1/admin/users/{id}", tag = "admin", security(("bearer" = [])),
    params(("id" = String, Path, description = "User id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such user (or already deleted)", body = ErrorResponse),
        (status = 409, description = "`admin_self_change`", body = ErrorResponse),
    ))]
pub async fn delete_user(
    State(state): State<AppState>,
    admin: Admin,
    Origin(origin): Origin,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let user = live_user(&state, &id).await?;
    if user.status == UserStatus::Deleted {
        return Err(ApiError::NotFound);
    }
    let change = UserChange { status: Some(UserStatus::Deleted), ..Default::default() };
    apply_change(&state, &admin, &origin, &user, change).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize, ToSchema)]
pub struct Revoked {
    /// How many live sessions were ended.
    pub revoked: u64,
}

/// Ends every session of a user (their access tokens stop working at once).
#[utoipa::path(post, path = "/v1/admin/users/{id}/revoke-sessions", tag = "admin", security(("bearer" = [])),
    params(("id" = String, Path, description = "User id")),
    responses(
        (status = 200, description = "Sessions ended", body = Revoked),
        (status = 404, description = "No such user", body = ErrorResponse),
    ))]
pub async fn revoke_sessions(
    State(state): State<AppState>,
    admin: Admin,
    Origin(origin): Origin,
    Path(id): Path<String>,
) -> ApiResult<Json<Revoked>> {
    let user = live_user(&state, &id).await?;
    let event = admin_event(&admin, "admin.user.sessions_revoked", &origin, user.id);
    let revoked = state.store.revoke_sessions(user.id, SessionScope::All, event).await?;
    Ok(Json(Revoked { revoked }))
}

/// The rate limits a user can be held by, as named in `clear-rate-limits`.
const LIMIT_SCOPES: [&str; 4] = ["login", "mfa", "email", "api"];

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClearRateLimits {
    /// Any of `login` (failed passwords for the email), `mfa` (second-factor
    /// guesses), `email` (emails requested), `api` (the plan's rate limits of the
    /// account, and of the user id as a key). Default: all.
    pub scopes: Option<Vec<String>>,
}

#[derive(Serialize, ToSchema)]
pub struct Cleared {
    pub scopes: Vec<String>,
    /// How many limiter keys were removed.
    pub cleared: u64,
}

/// The limiter keys of a user's limits in one scope.
fn limit_keys(state: &AppState, user: &User, scope: &str) -> Vec<String> {
    match scope {
        "login" => vec![attempts::user_password_key(&user.email)],
        "mfa" => vec![attempts::code_key(user.id)],
        "email" => vec![super::auth::email_limit_key(user.email.as_str())],
        _ => {
            let catalog = state.catalog.get();
            let mut scopes: Vec<&String> = catalog.plans.values().flat_map(|p| p.rate_limits.keys()).collect();
            scopes.sort();
            scopes.dedup();
            scopes
                .into_iter()
                .flat_map(|s| [format!("rl:{s}:a:{}", user.account_id), format!("rl:{s}:k:{}", user.id)])
                .collect()
        }
    }
}

/// Forgets a user's rate-limit state, in memory or in Redis.
#[utoipa::path(post, path = "/v1/admin/users/{id}/clear-rate-limits", tag = "admin", security(("bearer" = [])),
    params(("id" = String, Path, description = "User id")), request_body = ClearRateLimits,
    responses(
        (status = 200, description = "Cleared", body = Cleared),
        (status = 404, description = "No such user", body = ErrorResponse),
        (status = 503, description = "The rate-limit backend did not answer", body = ErrorResponse),
    ))]
pub async fn clear_rate_limits(
    State(state): State<AppState>,
    admin: Admin,
    Origin(origin): Origin,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Cleared>> {
    let user = live_user(&state, &id).await?;
    let body: ClearRateLimits =
        if body.iter().all(u8::is_ascii_whitespace) { ClearRateLimits { scopes: None } } else { parse_json(&body)? };
    let scopes = body.scopes.unwrap_or_else(|| LIMIT_SCOPES.map(str::to_owned).to_vec());
    if let Some(unknown) = scopes.iter().find(|s| !LIMIT_SCOPES.contains(&s.as_str())) {
        return Err(invalid("scopes", format!("unknown scope {unknown:?}; use login, mfa, email or api")));
    }
    let keys: Vec<String> = scopes.iter().flat_map(|scope| limit_keys(&state, &user, scope)).collect();
    let cleared = state.limiter.forget(&keys).await.map_err(|e| ApiError::Unavailable(e.to_string()))?;
    let event = admin_event(&admin, "admin.user.rate_limits_cleared", &origin, user.id)
        .meta("scopes", scopes.clone())
        .meta("cleared", cleared);
    state.store.record_audit(event).await?;
    Ok(Json(Cleared { scopes, cleared }))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct AuditParams {
    /// `user:<id>`, `service_key:<id>`, `system` or `anonymous`.
    pub actor: Option<String>,
    /// Exactly this action, e.g. `admin.user.suspended`.
    pub action: Option<String>,
    /// `<type>:<id>`, e.g. `user:<id>`.
    pub target: Option<String>,
    /// `info`, `warning` or `critical`.
    pub severity: Option<String>,
    /// RFC 3339; at or after.
    pub from: Option<String>,
    /// RFC 3339; strictly before.
    pub to: Option<String>,
    /// At most 200 (default 50).
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct AuditPage {
    pub events: Vec<AuditEventView>,
    /// Pass as `cursor` for the next (older) page; absent on the last page.
    pub next_cursor: Option<String>,
}

fn audit_query(params: AuditParams) -> Result<AuditQuery, ApiError> {
    let actor = match params.actor.as_deref() {
        None => None,
        Some(a) => {
            let (kind, id) = match a.split_once(':') {
                Some((kind, id)) => (kind, Some(id)),
                None => (a, None),
            };
            Some(
                Actor::from_parts(kind, id)
                    .ok_or_else(|| invalid("actor", "user:<id>, service_key:<id>, system or anonymous"))?,
            )
        }
    };
    let target = match params.target {
        None => None,
        Some(t) => {
            let (kind, id) = t.split_once(':').ok_or_else(|| invalid("target", "expected <type>:<id>"))?;
            Some((kind.to_owned(), id.to_owned()))
        }
    };
    let severity = match params.severity.as_deref() {
        None => None,
        Some(s) => Some(Severity::parse(s).ok_or_else(|| invalid("severity", "info, warning or critical"))?),
    };
    let before = time_cursor::<AuditEventId>(params.cursor.as_deref())?;
    Ok(AuditQuery {
        actor,
        action: params.action,
        target,
        severity,
        from: parse_time("from", params.from.as_deref())?,
        to: parse_time("to", params.to.as_deref())?,
        before,
        limit: params.limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE),
        ..Default::default()
    })
}

/// The audit log, newest first, filtered, a page at a time.
#[utoipa::path(get, path = "/v1/admin/audit-log", tag = "admin", security(("bearer" = [])), params(AuditParams),
    responses(
        (status = 200, description = "A page of events", body = AuditPage),
        (status = 422, description = "`validation_failed`: a bad filter or cursor", body = ErrorResponse),
    ))]
pub async fn audit_log(
    State(state): State<AppState>,
    _admin: Admin,
    ApiQuery(params): ApiQuery<AuditParams>,
) -> ApiResult<Json<AuditPage>> {
    let query = audit_query(params)?;
    let limit = query.limit as usize;
    let events = state.store.list_audit(query).await?;
    let next_cursor = (events.len() == limit)
        .then(|| {
            events
                .last()
                .map(|e| encode_cursor(&TimeCursor { t: tollgate_core::admin::micros(e.created_at), id: e.id }))
        })
        .flatten();
    Ok(Json(AuditPage { events: events.into_iter().map(AuditEventView::from).collect(), next_cursor }))
}

#[derive(Serialize, ToSchema)]
pub struct Impersonation {
    /// An access token for the user whose `act` claim names the admin; refused by
    /// the admin API and by password, email and 2FA changes.
    pub access_token: String,
    pub token_type: &'static str,
    pub expires_in: u64,
    pub user: UserView,
}

/// Starts acting as a user: a short-lived access token (15 minutes at most, no
/// refresh token) in a session of its own, which the user sees in their session list
/// and which revoking the user's sessions ends. Admin users only: the token names the
/// admin in its `act` claim, and a service key is nobody to name.
#[utoipa::path(post, path = "/v1/admin/users/{id}/impersonate", tag = "admin", security(("bearer" = [])),
    params(("id" = String, Path, description = "User id")),
    responses(
        (status = 200, description = "An impersonation token", body = Impersonation),
        (status = 403, description = "`forbidden` for a service key; `account_suspended` for a suspended user", body = ErrorResponse),
        (status = 404, description = "No such user (or deleted)", body = ErrorResponse),
        (status = 422, description = "`validation_failed`: impersonating yourself", body = ErrorResponse),
    ))]
pub async fn impersonate(
    State(state): State<AppState>,
    admin: Admin,
    Origin(origin): Origin,
    Path(id): Path<String>,
) -> ApiResult<Json<Impersonation>> {
    let Admin::User(current) = &admin else { return Err(ApiError::Forbidden) };
    let user = live_user(&state, &id).await?;
    match user.status {
        UserStatus::Deleted => return Err(ApiError::NotFound),
        UserStatus::Suspended => return Err(ApiError::AccountSuspended),
        UserStatus::Active => {}
    }
    if user.id == current.user.id {
        return Err(invalid("id", "you cannot impersonate yourself"));
    }
    let now = OffsetDateTime::now_utc();
    let ttl = crate::impersonation::MAX_TTL.min(state.tokens.ttl());
    let expires_at = now + ttl;
    let session = NewSession {
        id: SessionId::new(),
        user_id: user.id,
        ip: origin.ip.clone(),
        user_agent: origin.user_agent.clone(),
        created_at: now,
        expires_at,
        // Never handed out: an impersonation cannot be extended.
        refresh_digest: SecretToken::generate().digest(),
    };
    let event = AuditEvent::new(admin.actor(), "admin.user.impersonated", &origin, now)
        .target_user(user.id)
        .severity(Severity::Critical)
        .meta("session_id", session.id.to_string())
        .meta("expires_in_seconds", ttl.as_secs());
    let session = state.store.start_impersonation(session, event).await?;
    let access_token = state
        .tokens
        .issue_impersonation(&user, &session, current.user.id, now, ttl)
        .map_err(|e| ApiError::Internal(format!("signing an impersonation token: {e}")))?;
    Ok(Json(Impersonation {
        access_token,
        token_type: "Bearer",
        expires_in: ttl.as_secs(),
        user: UserView::from(&user),
    }))
}
