//! The admin side's read-only reports: stats, usage totals over all accounts, the
//! usage event log and the payment list. Reads only, on the reader pool (usage writes
//! stay with the usage writer).

use std::collections::BTreeMap;

use sqlx::sqlite::{Sqlite, SqliteRow};
use sqlx::{QueryBuilder, Row};
use tollgate_core::StoreError;
use tollgate_core::billing::Payment;
use tollgate_core::ids::AccountId;
use tollgate_core::reports::{
    AdminStats, Amounts, CreditTotals, PaymentQuery, Revenue, StatsQuery, UsageLogEntry, UsageLogQuery, UsageOutcome,
    UserCounts,
};
use tollgate_core::store::DailyUsage;
use uuid::Uuid;

use crate::rows::{from_micros, micros};
use crate::{SqliteStore, db_error};

fn count(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

pub(crate) async fn stats(store: &SqliteStore, query: StatsQuery) -> Result<AdminStats, StoreError> {
    // One read transaction: every number sees the same snapshot.
    let mut tx = store.reader.begin().await.map_err(db_error)?;
    let (total, active, suspended, new): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT COUNT(*), COALESCE(SUM(status = 'active'), 0), COALESCE(SUM(status = 'suspended'), 0), \
           COALESCE(SUM(created_at >= ?1), 0) \
         FROM users WHERE status <> 'deleted'",
    )
    .bind(micros(query.new_since))
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
        "SELECT COALESCE(s.plan_key, ?1) AS plan, COUNT(*) FROM accounts a \
         LEFT JOIN subscriptions s ON s.account_id = a.id AND s.status IN ('trialing', 'active', 'past_due') \
         WHERE NOT EXISTS (SELECT 1 FROM users u WHERE u.account_id = a.id AND u.status = 'deleted') \
         GROUP BY plan",
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
        "SELECT currency, SUM(amount), SUM(amount_refunded), \
           SUM(CASE WHEN created_at >= ?1 THEN amount ELSE 0 END), \
           SUM(CASE WHEN created_at >= ?1 THEN amount_refunded ELSE 0 END) \
         FROM payments WHERE status IN ('succeeded', 'refunded', 'partially_refunded') \
         GROUP BY currency ORDER BY currency",
    )
    .bind(micros(query.month_start))
    .fetch_all(&mut *tx)
    .await
    .map_err(db_error)?;

    let kinds: Vec<(String, i64)> = sqlx::query_as("SELECT kind, SUM(amount) FROM credit_transfers GROUP BY kind")
        .fetch_all(&mut *tx)
        .await
        .map_err(db_error)?;
    let (outstanding,): (i64,) = sqlx::query_as("SELECT COALESCE(SUM(balance), 0) FROM credit_balances")
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
    store: &SqliteStore,
    meter: Option<&str>,
    from: &str,
    to: &str,
) -> Result<Vec<DailyUsage>, StoreError> {
    let rows: Vec<(String, String, i64, i64)> = sqlx::query_as(
        "SELECT day, meter, SUM(consumed), SUM(denied) FROM usage_daily \
         WHERE (?1 IS NULL OR meter = ?1) AND day >= ?2 AND day <= ?3 GROUP BY day, meter ORDER BY day, meter",
    )
    .bind(meter)
    .bind(from)
    .bind(to)
    .fetch_all(&store.reader)
    .await
    .map_err(db_error)?;
    Ok(rows.into_iter().map(|(day, meter, consumed, denied)| DailyUsage { day, meter, consumed, denied }).collect())
}

fn usage_event(row: &SqliteRow) -> Result<UsageLogEntry, StoreError> {
    let outcome: String = row.try_get("outcome").map_err(db_error)?;
    let metadata: Option<String> = row.try_get("metadata").map_err(db_error)?;
    Ok(UsageLogEntry {
        id: row.try_get::<Uuid, _>("id").map_err(db_error)?,
        account_id: AccountId(row.try_get("account_id").map_err(db_error)?),
        meter: row.try_get("meter").map_err(db_error)?,
        outcome: UsageOutcome::parse(&outcome)
            .ok_or_else(|| StoreError::Internal(format!("usage outcome {outcome:?}")))?,
        amount: row.try_get("amount").map_err(db_error)?,
        endpoint: row.try_get("endpoint").map_err(db_error)?,
        metadata: metadata
            .map(|m| serde_json::from_str(&m))
            .transpose()
            .map_err(|e| StoreError::Internal(e.to_string()))?,
        ip: row.try_get("ip").map_err(db_error)?,
        created_at: from_micros(row.try_get("created_at").map_err(db_error)?)?,
    })
}

pub(crate) async fn usage_events(store: &SqliteStore, query: UsageLogQuery) -> Result<Vec<UsageLogEntry>, StoreError> {
    let mut sql: QueryBuilder<Sqlite> = QueryBuilder::new(
        "SELECT id, account_id, meter, outcome, amount, endpoint, metadata, ip, created_at FROM usage_events WHERE 1 = 1",
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
        sql.push(" AND created_at >= ").push_bind(micros(from));
    }
    if let Some(to) = query.to {
        sql.push(" AND created_at < ").push_bind(micros(to));
    }
    if let Some((at, id)) = query.before {
        sql.push(" AND (created_at, id) < (").push_bind(micros(at)).push(", ").push_bind(id).push(")");
    }
    sql.push(" ORDER BY created_at DESC, id DESC LIMIT ").push_bind(i64::from(query.limit));
    let rows = sql.build().fetch_all(&store.reader).await.map_err(db_error)?;
    rows.iter().map(usage_event).collect()
}

pub(crate) async fn payments(store: &SqliteStore, query: PaymentQuery) -> Result<Vec<Payment>, StoreError> {
    let mut sql: QueryBuilder<Sqlite> = QueryBuilder::new(
        "SELECT id, account_id, provider, kind, provider_payment_id, provider_intent_id, amount, currency, status, \
           credits, credit_package, amount_refunded, credits_reversed, credits_unrecovered, created_at, updated_at \
         FROM payments WHERE 1 = 1",
    );
    if let Some(account) = query.account {
        sql.push(" AND account_id = ").push_bind(account.0);
    }
    if let Some((at, id)) = query.before {
        sql.push(" AND (created_at, id) < (").push_bind(micros(at)).push(", ").push_bind(id.0).push(")");
    }
    sql.push(" ORDER BY created_at DESC, id DESC LIMIT ").push_bind(i64::from(query.limit));
    let rows = sql.build().fetch_all(&store.reader).await.map_err(db_error)?;
    rows.iter().map(crate::billing::payment).collect()
}
