//! `/v1/admin` reports, read only: platform stats, usage analytics series, the usage
//! event log and payments, for admin users and service keys with `admin:read` (the
//! [`Admin`] extractor). The rules (plan in force, revenue, MRR, buckets) are in
//! `tollgate_core::reports`; handlers parse, call one store method, shape the answer.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::{Date, OffsetDateTime};
use tollgate_core::admin::{DEFAULT_PAGE, MAX_PAGE, micros};
use tollgate_core::billing::Payment;
use tollgate_core::ids::{AccountId, PaymentId};
use tollgate_core::reports::{
    self, CreditTotals, Interval, MAX_SERIES_DAYS, PaymentQuery, Revenue, SeriesPoint, StatsQuery, UsageLogEntry,
    UsageLogQuery, UsageOutcome, UserCounts, day_string,
};
use utoipa::{IntoParams, ToSchema};

use super::accounts::resolve_account;
use super::admin::{TimeCursor, encode_cursor, invalid, parse_time, time_cursor};
use super::views::ErrorResponse;
use crate::error::{ApiError, ApiResult};
use crate::extract::{Admin, ApiQuery};
use crate::state::AppState;

#[derive(Serialize, ToSchema)]
pub struct StatsView {
    /// Users not deleted: `total`, `active`, `suspended`, `new_this_week` (last 7 days).
    #[schema(value_type = Object)]
    pub users: UserCounts,
    /// Accounts by the plan in force (a live subscription's plan, else the default);
    /// accounts of deleted users are left out.
    #[schema(value_type = Object)]
    pub accounts_per_plan: BTreeMap<String, u64>,
    /// Subscriptions `active` or `trialing`.
    pub active_subscriptions: u64,
    /// Of which `trialing`.
    pub trialing_subscriptions: u64,
    /// `active` subscriptions per plan (trials excluded): what MRR counts.
    #[schema(value_type = Object)]
    pub paying_subscriptions: BTreeMap<String, u64>,
    /// Per currency, integer minor units: `all_time` and `this_month` (payments created
    /// since the 1st, UTC), each `{gross, refunded, net}` of succeeded payments.
    #[schema(value_type = Vec<Object>)]
    pub revenue: Vec<Revenue>,
    /// Monthly recurring revenue per currency: each paying subscription at its plan's
    /// monthly price (a yearly price / 12).
    #[schema(value_type = Object)]
    pub mrr: BTreeMap<String, i64>,
    /// Ledger totals: `purchased`, `granted`, `used`, `refunded`, `reversed`, `expired`,
    /// `adjusted` (net) and `outstanding` (all balances).
    #[schema(value_type = Object)]
    pub credits: CreditTotals,
    #[serde(with = "time::serde::rfc3339")]
    pub generated_at: OffsetDateTime,
}

/// Platform numbers for the admin dashboard.
#[utoipa::path(get, path = "/v1/admin/stats", tag = "admin", security(("bearer" = [])),
    responses(
        (status = 200, description = "Users, plans, subscriptions, revenue, MRR and credits", body = StatsView),
        (status = 401, description = "`unauthenticated`", body = ErrorResponse),
        (status = 403, description = "`forbidden`, `admin_2fa_required`, `impersonation_forbidden` or `insufficient_scope`", body = ErrorResponse),
    ))]
pub async fn stats(State(state): State<AppState>, _admin: Admin) -> ApiResult<Json<StatsView>> {
    let catalog = state.catalog.get();
    let now = OffsetDateTime::now_utc();
    let stats = state.store.admin_stats(StatsQuery::at(now, catalog.default_plan().key.clone())).await?;
    Ok(Json(StatsView {
        mrr: reports::mrr(&catalog, &stats.paying_subscriptions),
        users: stats.users,
        accounts_per_plan: stats.accounts_per_plan,
        active_subscriptions: stats.active_subscriptions,
        trialing_subscriptions: stats.trialing_subscriptions,
        paying_subscriptions: stats.paying_subscriptions,
        revenue: stats.revenue,
        credits: stats.credits,
        generated_at: now,
    }))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct AnalyticsParams {
    /// A meter of the catalog (default: every meter, one series each).
    pub meter: Option<String>,
    /// `YYYY-MM-DD` or an RFC 3339 time (its UTC date); default 29 days before `to`.
    pub from: Option<String>,
    /// `YYYY-MM-DD` or an RFC 3339 time (its UTC date), included; default today (UTC).
    pub to: Option<String>,
    /// `day` (default), `week` (ISO, from Monday) or `month`.
    pub interval: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct MeterSeries {
    pub meter: String,
    /// Every bucket from `from` to `to`, zero when nothing happened; dated by the
    /// bucket's first day.
    #[schema(value_type = Vec<Object>)]
    pub points: Vec<SeriesPoint>,
}

#[derive(Serialize, ToSchema)]
pub struct UsageAnalytics {
    pub from: String,
    pub to: String,
    #[schema(value_type = String, example = "day")]
    pub interval: Interval,
    /// Consumed and denied, summed over all accounts, per meter.
    pub series: Vec<MeterSeries>,
}

fn date_param(field: &'static str, value: &str) -> Result<Date, ApiError> {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    Date::parse(value, format)
        .or_else(|_| OffsetDateTime::parse(value, &Rfc3339).map(|t| t.to_offset(time::UtcOffset::UTC).date()))
        .map_err(|_| invalid(field, "expected YYYY-MM-DD or an RFC 3339 time"))
}

fn known_meter(state: &AppState, meter: Option<String>) -> Result<Option<String>, ApiError> {
    match meter {
        Some(m) if !state.catalog.get().meters.contains_key(&m) => Err(invalid("meter", "not a meter of the catalog")),
        m => Ok(m),
    }
}

/// Usage over time for charts: consumed and denied per meter, all accounts summed.
#[utoipa::path(get, path = "/v1/admin/analytics/usage", tag = "admin", security(("bearer" = [])),
    params(AnalyticsParams),
    responses(
        (status = 200, description = "One zero-filled series per meter", body = UsageAnalytics),
        (status = 401, description = "`unauthenticated`", body = ErrorResponse),
        (status = 403, description = "`forbidden`, `admin_2fa_required`, `impersonation_forbidden` or `insufficient_scope`", body = ErrorResponse),
        (status = 422, description = "`validation_failed`: an unknown meter or interval, a bad date, `from` after `to`, more than 366 days", body = ErrorResponse),
    ))]
pub async fn usage_analytics(
    State(state): State<AppState>,
    _admin: Admin,
    ApiQuery(params): ApiQuery<AnalyticsParams>,
) -> ApiResult<Json<UsageAnalytics>> {
    let meter = known_meter(&state, params.meter)?;
    let interval = match params.interval.as_deref() {
        None => Interval::Day,
        Some(i) => Interval::parse(i).ok_or_else(|| invalid("interval", "day, week or month"))?,
    };
    let to = match params.to.as_deref() {
        Some(v) => date_param("to", v)?,
        None => OffsetDateTime::now_utc().date(),
    };
    let from = match params.from.as_deref() {
        Some(v) => date_param("from", v)?,
        None => to - time::Duration::days(29),
    };
    if from > to {
        return Err(invalid("from", "after to"));
    }
    if (to - from).whole_days() + 1 > MAX_SERIES_DAYS {
        return Err(invalid("from", format!("at most {MAX_SERIES_DAYS} days from to")));
    }
    let (from_s, to_s) = (day_string(from), day_string(to));
    let rows = state.store.admin_usage_daily(meter.as_deref(), &from_s, &to_s).await?;
    let meters: Vec<String> = match meter {
        Some(m) => vec![m],
        None => {
            let mut all: Vec<String> = state.catalog.get().meters.keys().cloned().collect();
            all.extend(rows.iter().map(|r| r.meter.clone()));
            all.sort();
            all.dedup();
            all
        }
    };
    let series = meters
        .into_iter()
        .map(|m| MeterSeries { points: reports::series(&rows, &m, from, to, interval), meter: m })
        .collect();
    Ok(Json(UsageAnalytics { from: from_s, to: to_s, interval, series }))
}

/// An account filter: an id or `ext:<external id>` that must exist.
async fn account_param(state: &AppState, account: Option<&str>) -> Result<Option<AccountId>, ApiError> {
    match account {
        None => Ok(None),
        Some(a) => match resolve_account(state, a).await {
            Ok(account) => Ok(Some(account.id)),
            Err(ApiError::NotFound) => Err(invalid("account", "no such account")),
            Err(e) => Err(e),
        },
    }
}

/// Reads one more row than the page to know whether another page follows.
fn page<T>(mut rows: Vec<T>, limit: u32, cursor_of: impl Fn(&T) -> String) -> (Vec<T>, Option<String>) {
    if rows.len() > limit as usize {
        rows.truncate(limit as usize);
        let next = rows.last().map(cursor_of);
        (rows, next)
    } else {
        (rows, None)
    }
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct UsageLogParams {
    /// Account id or `ext:<external id>`.
    pub account: Option<String>,
    /// A meter of the catalog.
    pub meter: Option<String>,
    /// `consumed`, `denied`, `released` or `refunded`.
    pub outcome: Option<String>,
    /// RFC 3339; at or after.
    pub from: Option<String>,
    /// RFC 3339; strictly before.
    pub to: Option<String>,
    /// At most 200 (default 50).
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page, with the same filters.
    pub cursor: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct UsageLogPage {
    /// Newest first: id, account_id, meter, outcome, amount, endpoint, metadata, ip,
    /// created_at.
    #[schema(value_type = Vec<Object>)]
    pub events: Vec<UsageLogEntry>,
    /// Pass as `cursor` for the next (older) page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// Usage events of all accounts, newest first, filtered, a page at a time.
#[utoipa::path(get, path = "/v1/admin/usage-logs", tag = "admin", security(("bearer" = [])),
    params(UsageLogParams),
    responses(
        (status = 200, description = "A page of usage events", body = UsageLogPage),
        (status = 401, description = "`unauthenticated`", body = ErrorResponse),
        (status = 403, description = "`forbidden`, `admin_2fa_required`, `impersonation_forbidden` or `insufficient_scope`", body = ErrorResponse),
        (status = 422, description = "`validation_failed`: an unknown account, meter or outcome, a bad time or cursor", body = ErrorResponse),
    ))]
pub async fn usage_logs(
    State(state): State<AppState>,
    _admin: Admin,
    ApiQuery(params): ApiQuery<UsageLogParams>,
) -> ApiResult<Json<UsageLogPage>> {
    let meter = known_meter(&state, params.meter)?;
    let outcome = match params.outcome.as_deref() {
        None => None,
        Some(o) => {
            Some(UsageOutcome::parse(o).ok_or_else(|| invalid("outcome", "consumed, denied, released or refunded"))?)
        }
    };
    let limit = params.limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE);
    let query = UsageLogQuery {
        from: parse_time("from", params.from.as_deref())?,
        to: parse_time("to", params.to.as_deref())?,
        before: time_cursor(params.cursor.as_deref())?,
        account: account_param(&state, params.account.as_deref()).await?,
        meter,
        outcome,
        limit: limit + 1,
    };
    let rows = state.store.admin_usage_events(query).await?;
    let (events, next_cursor) = page(rows, limit, |e| encode_cursor(&TimeCursor { t: micros(e.created_at), id: e.id }));
    Ok(Json(UsageLogPage { events, next_cursor }))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct PaymentParams {
    /// Account id or `ext:<external id>`.
    pub account: Option<String>,
    /// At most 200 (default 50).
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page, with the same filter.
    pub cursor: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct PaymentPage {
    /// Newest first.
    #[schema(value_type = Vec<Object>)]
    pub payments: Vec<Payment>,
    /// Pass as `cursor` for the next (older) page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// Payments of all accounts (or one), newest first, a page at a time.
#[utoipa::path(get, path = "/v1/admin/payments", tag = "admin", security(("bearer" = [])),
    params(PaymentParams),
    responses(
        (status = 200, description = "A page of payments", body = PaymentPage),
        (status = 401, description = "`unauthenticated`", body = ErrorResponse),
        (status = 403, description = "`forbidden`, `admin_2fa_required`, `impersonation_forbidden` or `insufficient_scope`", body = ErrorResponse),
        (status = 422, description = "`validation_failed`: an unknown account or a bad cursor", body = ErrorResponse),
    ))]
pub async fn payments(
    State(state): State<AppState>,
    _admin: Admin,
    ApiQuery(params): ApiQuery<PaymentParams>,
) -> ApiResult<Json<PaymentPage>> {
    let limit = params.limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE);
    let query = PaymentQuery {
        before: time_cursor::<PaymentId>(params.cursor.as_deref())?,
        account: account_param(&state, params.account.as_deref()).await?,
        limit: limit + 1,
    };
    let rows = state.store.admin_payments(query).await?;
    let (payments, next_cursor) =
        page(rows, limit, |p| encode_cursor(&TimeCursor { t: micros(p.created_at), id: p.id }));
    Ok(Json(PaymentPage { payments, next_cursor }))
}
