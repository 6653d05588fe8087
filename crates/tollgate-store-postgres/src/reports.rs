//! The admin side's read-only reports: stats, usage totals over all accounts, the
//! usage event log and the payment list.

use std::collections::BTreeMap;

use sqlx::QueryBuilder;
use sqlx::postgres::{PgRow, Postgres};
use sqlx::types::Json;
use tollgate_core::StoreError;
use tollgate_core::billing::Payment;
use tollgate_core::ids::AccountId;
use tollgate_core::reports::{
    AdminStats, Amounts, CreditTotals, PaymentQuery, Revenue, StatsQuery, UsageLogEntry, UsageLogQuery, UsageOutcome,
    UserCounts, day_string,
};
use tollgate_core::store::DailyUsage;

use crate::rows::get;
use crate::{PgStore, db_error};

fn count(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

pub(crate) async fn stats(store: &PgStore, query: StatsQuery) -> Result<AdminStats, StoreError> {
    // REPEATABLE READ: every number sees the same snapshot.
    let mut tx = store.pool.begin().await.map_err(db_error)?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
    let (total, active, suspended, new): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT COUNT(*), COUNT(*) FILTER (WHERE status = 'active'), COUNT(*) FILTER (WHERE status = 'suspended'), \
           COUNT(*) FILTER (WHERE created_at >= $1) \
         FROM users WHERE status <> 'deleted'",
    )
    .bind(query.new_since)
    .fetch_one(&mut *tx)
    .await
    .map_err(db_error)?;
    let users = UserCounts {
        total: count(total),
        active: count(active),
        suspended: count(suspended),
        new_this_week: count(new),
    };

    let plans: Vec<(String, i64)> = sqlx::query_as(
        "SELECT COALESCE(s.plan_key, $1) AS plan, COUNT(*) FROM accounts a \
         LEFT JOIN subscriptions s ON s.account_id = a.id AND s.status IN ('trialing', 'active', 'past_due') \
         WHERE NOT EXISTS (SELECT 1 FROM users u WHERE u.account_id = a.id AND u.status = 'deleted') \
         GROUP BY 1",
    )
    .bind(&query.default_plan)
    .fetch_all(&mut *tx)
    .await
    .map_err(db_error)?;

    let subscriptions: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT plan_key, status, COUNT(*) FROM subscriptions WHERE status IN ('active', 'trialing') \
         GROUP BY plan_key, status",
    )
    .fetch_all(&mut *tx)
    .await
    .map_err(db_error)?;

    let revenue: Vec<(String, i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT currency, SUM(amount)::bigint, SUM(amount_refunded)::bigint, \
           COALESCE(SUM(amount) FILTER (WHERE created_at >= $1), 0)::bigint, \
           COALESCE(SUM(amount_refunded) FILTER (WHERE created_at >= $1), 0)::bigint \
         FROM payments WHERE status IN ('succeeded', 'refunded', 'partially_refunded') \
         GROUP BY currency ORDER BY currency",
    )
    .bind(query.month_start)
    .fetch_all(&mut *tx)
    .await
    .map_err(db_error)?;

    let kinds: Vec<(String, i64)> =
        sqlx::query_as("SELECT kind, SUM(amount)::bigint FROM credit_transfers GROUP BY kind")
            .fetch_all(&mut *tx)
            .await
            .map_err(db_error)?;
    let (outstanding,): (i64,) = sqlx::query_as("SELECT COALESCE(SUM(balance), 0)::bigint FROM credit_balances")
        .fetch_one(&mut *tx)
        .await
        .map_err(db_error)?;
    tx.commit().await.map_err(db_error)?;

    let mut stats = AdminStats {
        users,
        accounts_per_plan: plans.into_iter().map(|(p, n)| (p, count(n))).collect(),
        revenue: revenue
            .into_iter()
            .map(|(currency, gross, refunded, month_gross, month_refunded)| Revenue {
                currency,
                all_time: Amounts::new(gross, refunded),
                this_month: Amounts::new(month_gross, month_refunded),
            })
            .collect(),
        credits: CreditTotals::from_kinds(&kinds, outstanding),
        ..Default::default()
    };
    let mut paying = BTreeMap::new();
    for (plan, status, n) in subscriptions {
        stats.active_subscriptions += count(n);
        if status == "trialing" {
            stats.trialing_subscriptions += count(n);
        } else {
            *paying.entry(plan).or_insert(0) += count(n);
        }
    }
    stats.paying_subscriptions = paying;
    Ok(stats)
}

pub(crate) async fn usage_daily(
    store: &PgStore,
    meter: Option<&str>,
    from: &str,
    to: &str,
) -> Result<Vec<DailyUsage>, StoreError> {
    let rows: Vec<(time::Date, String, i64, i64)> = sqlx::query_as(
        "SELECT day, meter, SUM(consumed)::bigint, SUM(denied)::bigint FROM usage_daily \
         WHERE ($1::text IS NULL OR meter = $1) AND day >= $2::date AND day <= $3::date \
         GROUP BY day, meter ORDER BY day, meter",
    )
    .bind(meter)
    .bind(from)
    .bind(to)
    .fetch_all(&store.pool)
    .await
    .map_err(db_error)?;
    Ok(rows
        .into_iter()
        .map(|(day, meter, consumed, denied)| DailyUsage { day: day_string(day), meter, consumed, denied })
        .collect())
}

fn usage_event(row: &PgRow) -> Result<UsageLogEntry, StoreError> {
    let outcome: String = get(row, "outcome")?;
    let metadata: Option<Json<serde_json::Value>> = get(row, "metadata")?;
    Ok(UsageLogEntry {
        id: get(row, "id")?,
        account_id: AccountId(get(row, "account_id")?),
        meter: get(row, "meter")?,
        outcome: UsageOutcome::parse(&outcome)
            .ok_or_else(|| StoreError::Internal(format!("usage outcome {outcome:?}")))?,
        amount: get(row, "amount")?,
        endpoint: get(row, "endpoint")?,
        metadata: metadata.map(|Json(m)| m),
        ip: get(row, "ip")?,
        created_at: get(row, "created_at")?,
    })
}

pub(crate) async fn usage_events(store: &PgStore, query: UsageLogQuery) -> Result<Vec<UsageLogEntry>, StoreError> {
    let mut sql: QueryBuilder<Postgres> = QueryBuilder::new(
        "SELECT id, account_id, meter, outcome, amount, endpoint, metadata, ip, created_at FROM usage_events WHERE true",
    );
    if let Some(account) = query.account {
        sql.push(" AND account_id = ").push_bind(account.0);
    }
    if let Some(meter) = query.meter {
        sql.push(" AND meter = ").push_bind(meter);
    }
    if let Some(outcome) = query.outcome {
        sql.push(" AND outcome = ").push_bind(outcome.as_str());
    }
    if let Some(from) = query.from {
        sql.push(" AND created_at >= ").push_bind(from);
    }
    if let Some(to) = query.to {
        sql.push(" AND created_at < ").push_bind(to);
    }
    if let Some((at, id)) = query.before {
        sql.push(" AND (created_at, id) < (").push_bind(at).push(", ").push_bind(id).push(")");
    }
    sql.push(" ORDER BY created_at DESC, id DESC LIMIT ").push_bind(i64::from(query.limit));
    let rows = sql.build().fetch_all(&store.pool).await.map_err(db_error)?;
    rows.iter().map(usage_event).collect()
}

pub(crate) async fn payments(store: &PgStore, query: PaymentQuery) -> Result<Vec<Payment>, StoreError> {
    let mut sql: QueryBuilder<Postgres> = QueryBuilder::new(
        "SELECT id, account_id, provider, kind, provider_payment_id, provider_intent_id, amount, currency, status, \
           credits, credit_package, amount_refunded, credits_reversed, credits_unrecovered, created_at, updated_at \
         FROM payments WHERE true",
    );
    if let Some(account) = query.account {
        sql.push(" AND account_id = ").push_bind(account.0);
    }
    if let Some((at, id)) = query.before {
        sql.push(" AND (created_at, id) < (").push_bind(at).push(", ").push_bind(id.0).push(")");
    }
    sql.push(" ORDER BY created_at DESC, id DESC LIMIT ").push_bind(i64::from(query.limit));
    let rows = sql.build().fetch_all(&store.pool).await.map_err(db_error)?;
    rows.iter().map(crate::billing::payment).collect()
}
