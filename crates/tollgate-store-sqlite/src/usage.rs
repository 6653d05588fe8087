//! Plans, accounts, service keys and usage on SQLite: the bodies of the corresponding
//! `Store` methods (the trait impl in `store.rs` delegates here).

use sqlx::sqlite::{Sqlite, SqliteConnection, SqliteRow};
use sqlx::{QueryBuilder, Row};
use tollgate_core::accounts::{
    Account, AccountKind, NewExternalAccount, Scope, ServiceKey, Subscription, SubscriptionStatus,
};
use tollgate_core::audit::AuditEvent;
use tollgate_core::identity::TokenDigest;
use tollgate_core::ids::{AccountId, LeaseId, ReservationId, ServiceKeyId, UsageEventId};
use tollgate_core::metering::{
    self, EventContext, LeaseDecision, LeaseRequest, Reservation, ReservationStatus, UsageDecision, UsageRequest,
    WindowState,
};
use tollgate_core::plans::{Catalog, Meter, Plan};
use tollgate_core::store::{CatalogChanges, DailyUsage};
use tollgate_core::{StoreError, Timestamp};
use uuid::Uuid;

use crate::rows::{from_micros, micros};
use crate::store::insert_audit;
use crate::{SqliteStore, db_error};

fn json_err(e: serde_json::Error) -> StoreError {
    StoreError::Internal(format!("stored JSON: {e}"))
}

pub(crate) async fn apply_catalog(
    store: &SqliteStore,
    catalog: &Catalog,
    now: Timestamp,
) -> Result<CatalogChanges, StoreError> {
    let mut tx = store.writer.begin_with("BEGIN IMMEDIATE").await.map_err(db_error)?;
    let mut changes = CatalogChanges::default();
    let now_ts = now;
    let now = micros(now);

    let existing: Vec<(String, String)> =
        sqlx::query_as("SELECT key, definition FROM meters").fetch_all(&mut *tx).await.map_err(db_error)?;
    for (key, meter) in &catalog.meters {
        let definition = serde_json::to_string(meter).map_err(json_err)?;
        let label = format!("meter {key}");
        match existing.iter().find(|(k, _)| k == key) {
            Some((_, old)) if *old == definition => changes.unchanged.push(label),
            Some(_) => {
                sqlx::query("UPDATE meters SET definition = ?2, updated_at = ?3 WHERE key = ?1")
                    .bind(key)
                    .bind(&definition)
                    .bind(now)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_error)?;
                changes.updated.push(label);
            }
            None => {
                sqlx::query("INSERT INTO meters (key, definition, updated_at) VALUES (?1, ?2, ?3)")
                    .bind(key)
                    .bind(&definition)
                    .bind(now)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_error)?;
                changes.created.push(label);
            }
        }
    }
    for (key, _) in existing.iter().filter(|(k, _)| !catalog.meters.contains_key(k)) {
        sqlx::query("DELETE FROM meters WHERE key = ?1").bind(key).execute(&mut *tx).await.map_err(db_error)?;
        changes.deleted.push(format!("meter {key}"));
    }

    let existing: Vec<(String, String, Option<i64>)> =
        sqlx::query_as("SELECT key, definition, archived_at FROM plans").fetch_all(&mut *tx).await.map_err(db_error)?;
    for (key, plan) in &catalog.plans {
        let definition = serde_json::to_string(plan).map_err(json_err)?;
        let label = format!("plan {key}");
        match existing.iter().find(|(k, _, _)| k == key) {
            Some((_, old, None)) if *old == definition => changes.unchanged.push(label),
            Some(_) => {
                sqlx::query("UPDATE plans SET definition = ?2, archived_at = NULL, updated_at = ?3 WHERE key = ?1")
                    .bind(key)
                    .bind(&definition)
                    .bind(now)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_error)?;
                changes.updated.push(label);
            }
            None => {
                sqlx::query("INSERT INTO plans (key, definition, updated_at) VALUES (?1, ?2, ?3)")
                    .bind(key)
                    .bind(&definition)
                    .bind(now)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_error)?;
                changes.created.push(label);
            }
        }
    }
    for (key, _, archived_at) in existing.iter().filter(|(k, _, _)| !catalog.plans.contains_key(k)) {
        let in_use: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM subscriptions WHERE plan_key = ?1 OR scheduled_plan = ?1)",
        )
        .bind(key)
        .fetch_one(&mut *tx)
        .await
        .map_err(db_error)?;
        if in_use {
            if archived_at.is_none() {
                sqlx::query("UPDATE plans SET archived_at = ?2, updated_at = ?2 WHERE key = ?1")
                    .bind(key)
                    .bind(now)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_error)?;
                changes.archived.push(format!("plan {key}"));
            }
        } else {
            sqlx::query("DELETE FROM plans WHERE key = ?1").bind(key).execute(&mut *tx).await.map_err(db_error)?;
            changes.deleted.push(format!("plan {key}"));
        }
    }
    if let Some(audit) = changes.audit_event(now_ts) {
        insert_audit(&mut tx, &audit).await?;
    }
    tx.commit().await.map_err(db_error)?;
    Ok(changes)
}

pub(crate) async fn stored_catalog(store: &SqliteStore) -> Result<Option<Catalog>, StoreError> {
    // One read transaction: both lists from the same snapshot.
    let mut tx = store.reader.begin().await.map_err(db_error)?;
    let meters: Vec<(String, String)> =
        sqlx::query_as("SELECT key, definition FROM meters").fetch_all(&mut *tx).await.map_err(db_error)?;
    // Archived plans too: still in force for their subscribers.
    let plans: Vec<(String, String, Option<i64>)> =
        sqlx::query_as("SELECT key, definition, archived_at FROM plans").fetch_all(&mut *tx).await.map_err(db_error)?;
    tx.commit().await.map_err(db_error)?;
    if meters.is_empty() && plans.is_empty() {
        return Ok(None);
    }
    let meters = meters
        .into_iter()
        .map(|(k, d)| Ok((k, serde_json::from_str::<Meter>(&d).map_err(json_err)?)))
        .collect::<Result<_, StoreError>>()?;
    let plans = plans
        .into_iter()
        .map(|(k, d, archived_at)| {
            let plan = serde_json::from_str::<Plan>(&d).map_err(json_err)?;
            Ok((k, Plan { archived: archived_at.is_some(), ..plan }))
        })
        .collect::<Result<_, StoreError>>()?;
    Ok(Some(Catalog { meters, plans, credit_packages: Default::default() }))
}

macro_rules! account_columns {
    () => {
        "id, kind, name, external_id, email, created_at"
    };
}

fn account(row: &SqliteRow) -> Result<Account, StoreError> {
    let kind: String = row.try_get("kind").map_err(db_error)?;
    Ok(Account {
        id: AccountId(row.try_get::<Uuid, _>("id").map_err(db_error)?),
        kind: AccountKind::parse(&kind).ok_or_else(|| StoreError::Internal(format!("account kind {kind:?}")))?,
        name: row.try_get("name").map_err(db_error)?,
        external_id: row.try_get("external_id").map_err(db_error)?,
        email: row.try_get("email").map_err(db_error)?,
        created_at: from_micros(row.try_get("created_at").map_err(db_error)?)?,
    })
}

pub(crate) async fn upsert_external_account(
    store: &SqliteStore,
    new: NewExternalAccount,
) -> Result<(Account, bool), StoreError> {
    let mut tx = store.writer.begin_with("BEGIN IMMEDIATE").await.map_err(db_error)?;
    let inserted = sqlx::query(
        "INSERT INTO accounts (id, kind, name, external_id, email, created_at) VALUES (?1, 'external', ?2, ?3, ?4, ?5) \
         ON CONFLICT (external_id) DO NOTHING",
    )
    .bind(new.id.0)
    .bind(&new.name)
    .bind(&new.external_id)
    .bind(&new.email)
    .bind(micros(new.created_at))
    .execute(&mut *tx)
    .await
    .map_err(db_error)?
    .rows_affected()
        == 1;
    let row = sqlx::query(concat!("SELECT ", account_columns!(), " FROM accounts WHERE external_id = ?1"))
        .bind(&new.external_id)
        .fetch_one(&mut *tx)
        .await
        .map_err(db_error)?;
    tx.commit().await.map_err(db_error)?;
    let found = account(&row)?;
    store.cache.remember_account(&found);
    Ok((found, inserted))
}

pub(crate) async fn account_by_id(store: &SqliteStore, id: AccountId) -> Result<Option<Account>, StoreError> {
    if let Some(account) = store.cache.account(id) {
        return Ok(Some(account));
    }
    let row = sqlx::query(concat!("SELECT ", account_columns!(), " FROM accounts WHERE id = ?1"))
        .bind(id.0)
        .fetch_optional(&store.reader)
        .await
        .map_err(db_error)?;
    let found = row.as_ref().map(account).transpose()?;
    if let Some(a) = &found {
        store.cache.remember_account(a);
    }
    Ok(found)
}

pub(crate) async fn account_by_external_id(
    store: &SqliteStore,
    external_id: &str,
) -> Result<Option<Account>, StoreError> {
    if let Some(account) = store.cache.account_by_external_id(external_id) {
        return Ok(Some(account));
    }
    let row = sqlx::query(concat!("SELECT ", account_columns!(), " FROM accounts WHERE external_id = ?1"))
        .bind(external_id)
        .fetch_optional(&store.reader)
        .await
        .map_err(db_error)?;
    let found = row.as_ref().map(account).transpose()?;
    if let Some(a) = &found {
        store.cache.remember_account(a);
    }
    Ok(found)
}

pub(crate) async fn subscription(store: &SqliteStore, account: AccountId) -> Result<Option<Subscription>, StoreError> {
    if let Some(cached) = store.cache.subscription(account) {
        return Ok(cached);
    }
    let seen = store.cache.subscription_generation();
    let mut conn = store.reader.acquire().await.map_err(db_error)?;
    let subscription = subscription_in(&mut conn, account).await?;
    let Some(subscription) = subscription else {
        store.cache.fill_subscription(account, None, seen);
        return Ok(None);
    };
    store.cache.fill_subscription(account, Some(subscription.clone()), seen);
    Ok(Some(subscription))
}

/// The account's subscription as this connection (maybe inside a transaction) sees it.
pub(crate) async fn subscription_in(
    conn: &mut SqliteConnection,
    account: AccountId,
) -> Result<Option<Subscription>, StoreError> {
    let row = sqlx::query(
        "SELECT plan_key, status, provider, started_at, trial_ends_at, cancel_at_period_end, scheduled_plan, scheduled_at, \
           updated_at, provider_subscription_id, provider_state_at FROM subscriptions WHERE account_id = ?1",
    )
    .bind(account.0)
    .fetch_optional(&mut *conn)
    .await
    .map_err(db_error)?;
    let Some(row) = row else { return Ok(None) };
    let status: String = row.try_get("status").map_err(db_error)?;
    let optional_time = |column: &str| -> Result<Option<Timestamp>, StoreError> {
        row.try_get::<Option<i64>, _>(column).map_err(db_error)?.map(from_micros).transpose()
    };
    Ok(Some(Subscription {
        account_id: account,
        plan: row.try_get("plan_key").map_err(db_error)?,
        status: SubscriptionStatus::parse(&status).ok_or_else(|| StoreError::Internal(format!("status {status:?}")))?,
        provider: row.try_get("provider").map_err(db_error)?,
        started_at: from_micros(row.try_get("started_at").map_err(db_error)?)?,
        trial_ends_at: optional_time("trial_ends_at")?,
        cancel_at_period_end: row.try_get("cancel_at_period_end").map_err(db_error)?,
        scheduled_plan: row.try_get("scheduled_plan").map_err(db_error)?,
        scheduled_at: optional_time("scheduled_at")?,
        updated_at: from_micros(row.try_get("updated_at").map_err(db_error)?)?,
        provider_subscription_id: row.try_get("provider_subscription_id").map_err(db_error)?,
        provider_state_at: optional_time("provider_state_at")?,
    }))
}

/// Writes the account's subscription if the stored one still has version `previous`
/// (`updated_at`; `None`: there is none); false when it changed meanwhile.
pub(crate) async fn write_subscription(
    conn: &mut SqliteConnection,
    s: &Subscription,
    previous: Option<Timestamp>,
) -> Result<bool, StoreError> {
    // The update applies only to the version the change was computed from; with no
    // previous version, `IS NULL` never matches an existing row.
    let written = sqlx::query(
        "INSERT INTO subscriptions (account_id, plan_key, status, provider, started_at, trial_ends_at, cancel_at_period_end, \
           scheduled_plan, scheduled_at, updated_at, provider_subscription_id, provider_state_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?9, ?10, ?8, ?12, ?13) \
         ON CONFLICT (account_id) DO UPDATE SET plan_key = excluded.plan_key, status = excluded.status, \
           provider = excluded.provider, started_at = excluded.started_at, trial_ends_at = excluded.trial_ends_at, \
           cancel_at_period_end = excluded.cancel_at_period_end, scheduled_plan = excluded.scheduled_plan, \
           scheduled_at = excluded.scheduled_at, updated_at = excluded.updated_at, \
           provider_subscription_id = excluded.provider_subscription_id, provider_state_at = excluded.provider_state_at \
         WHERE subscriptions.updated_at IS ?11",
    )
    .bind(s.account_id.0)
    .bind(&s.plan)
    .bind(s.status.as_str())
    .bind(&s.provider)
    .bind(micros(s.started_at))
    .bind(s.trial_ends_at.map(micros))
    .bind(s.cancel_at_period_end)
    .bind(micros(s.updated_at))
    .bind(&s.scheduled_plan)
    .bind(s.scheduled_at.map(micros))
    .bind(previous.map(micros))
    .bind(&s.provider_subscription_id)
    .bind(s.provider_state_at.map(micros))
    .execute(&mut *conn)
    .await
    .map_err(db_error)?;
    Ok(written.rows_affected() > 0)
}

pub(crate) async fn put_subscription(
    store: &SqliteStore,
    s: Subscription,
    previous: Option<Timestamp>,
    audit: AuditEvent,
) -> Result<(), StoreError> {
    let mut tx = store.writer.begin_with("BEGIN IMMEDIATE").await.map_err(db_error)?;
    if !write_subscription(&mut tx, &s, previous).await? {
        return Err(StoreError::Conflict("subscription_changed"));
    }
    insert_audit(&mut tx, &audit).await?;
    tx.commit().await.map_err(db_error)?;
    store.cache.store_subscription(s.account_id, Some(s));
    Ok(())
}

pub(crate) async fn create_service_key(
    store: &SqliteStore,
    key: ServiceKey,
    digest: TokenDigest,
    audit: AuditEvent,
) -> Result<(), StoreError> {
    let mut tx = store.writer.begin_with("BEGIN IMMEDIATE").await.map_err(db_error)?;
    let scopes: Vec<&str> = key.scopes.iter().map(|s| s.as_str()).collect();
    sqlx::query(
        "INSERT INTO service_keys (id, name, prefix, digest, scopes, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )
    .bind(key.id.0)
    .bind(&key.name)
    .bind(&key.prefix)
    .bind(&digest.0)
    .bind(scopes.join(" "))
    .bind(micros(key.created_at))
    .execute(&mut *tx)
    .await
    .map_err(db_error)?;
    insert_audit(&mut tx, &audit).await?;
    tx.commit().await.map_err(db_error)
}

pub(crate) async fn service_key_by_digest(
    store: &SqliteStore,
    digest: &TokenDigest,
) -> Result<Option<ServiceKey>, StoreError> {
    let row =
        sqlx::query("SELECT id, name, prefix, scopes, created_at, revoked_at FROM service_keys WHERE digest = ?1")
            .bind(&digest.0)
            .fetch_optional(&store.reader)
            .await
            .map_err(db_error)?;
    let Some(row) = row else { return Ok(None) };
    let scopes: String = row.try_get("scopes").map_err(db_error)?;
    let revoked: Option<i64> = row.try_get("revoked_at").map_err(db_error)?;
    Ok(Some(ServiceKey {
        id: ServiceKeyId(row.try_get::<Uuid, _>("id").map_err(db_error)?),
        name: row.try_get("name").map_err(db_error)?,
        prefix: row.try_get("prefix").map_err(db_error)?,
        scopes: scopes.split_whitespace().filter_map(Scope::parse).collect(),
        created_at: from_micros(row.try_get("created_at").map_err(db_error)?)?,
        revoked_at: revoked.map(from_micros).transpose()?,
    }))
}

/// The current usage of each window (sum of its counter rows).
async fn window_usage(
    conn: &mut SqliteConnection,
    account: AccountId,
    meter: &str,
    keys: &[Vec<String>],
) -> Result<Vec<i64>, StoreError> {
    let mut used = Vec::with_capacity(keys.len());
    for window_keys in keys {
        let value: i64 = if let [only] = window_keys.as_slice() {
            sqlx::query_scalar("SELECT COALESCE(SUM(used), 0) FROM usage_counters WHERE account_id = ?1 AND meter = ?2 AND window_key = ?3")
                .bind(account.0)
                .bind(meter)
                .bind(only)
                .fetch_one(&mut *conn)
                .await
                .map_err(db_error)?
        } else {
            let mut sql: QueryBuilder<Sqlite> =
                QueryBuilder::new("SELECT COALESCE(SUM(used), 0) FROM usage_counters WHERE account_id = ");
            sql.push_bind(account.0).push(" AND meter = ").push_bind(meter).push(" AND window_key IN (");
            let mut list = sql.separated(", ");
            for key in window_keys {
                list.push_bind(key);
            }
            sql.push(")");
            sql.build_query_scalar().fetch_one(&mut *conn).await.map_err(db_error)?
        };
        used.push(value);
    }
    Ok(used)
}

pub(crate) async fn counter_values(
    store: &SqliteStore,
    account: AccountId,
    meter: &str,
    keys: &[Vec<String>],
) -> Result<Vec<i64>, StoreError> {
    let mut conn = store.reader.acquire().await.map_err(db_error)?;
    window_usage(&mut conn, account, meter, keys).await
}

pub(crate) async fn usage_daily(
    store: &SqliteStore,
    account: AccountId,
    meter: Option<&str>,
    from: &str,
    to: &str,
) -> Result<Vec<DailyUsage>, StoreError> {
    let rows: Vec<(String, String, i64, i64)> = sqlx::query_as(
        "SELECT day, meter, consumed, denied FROM usage_daily \
         WHERE account_id = ?1 AND (?2 IS NULL OR meter = ?2) AND day >= ?3 AND day <= ?4 ORDER BY day, meter",
    )
    .bind(account.0)
    .bind(meter)
    .bind(from)
    .bind(to)
    .fetch_all(&store.reader)
    .await
    .map_err(db_error)?;
    Ok(rows.into_iter().map(|(day, meter, consumed, denied)| DailyUsage { day, meter, consumed, denied }).collect())
}

/// Dry runs read committed usage; consumes go through the group-commit writer.
pub(crate) async fn consume_usage(store: &SqliteStore, request: UsageRequest) -> Result<UsageDecision, StoreError> {
    if !request.dry_run {
        return store.usage.consume(request).await;
    }
    let keys: Vec<Vec<String>> = request.windows.iter().map(|w| w.count_keys.to_vec()).collect();
    let used = counter_values(store, request.account, &request.meter, &keys).await?;
    let (mut allowed, mut denied_by) = metering::decide(&request.windows, &used, request.amount);
    let windows = request.windows.iter().zip(&used).map(|(w, u)| WindowState::new(w, *u)).collect();
    // A meter funded by credits: would the balance pay for it?
    let mut credits_charged = 0;
    if let Some((funding, cost)) = metering::CreditFunding::applies(&request, allowed) {
        let balance = crate::billing::credit_balance(store, request.account).await?.balance;
        if funding.affordable(balance, cost) {
            (allowed, denied_by, credits_charged) = (true, None, cost);
        }
    }
    Ok(UsageDecision { allowed, windows, denied_by, replayed: false, credits_charged })
}

async fn lease_event(
    conn: &mut SqliteConnection,
    account: AccountId,
    meter: &str,
    outcome: &str,
    context: Option<&EventContext>,
    now: Timestamp,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO usage_events (id, account_id, meter, outcome, amount, endpoint, metadata, ip, created_at) \
         VALUES (?1, ?2, ?3, ?4, 1, ?5, ?6, ?7, ?8)",
    )
    .bind(UsageEventId::new().0)
    .bind(account.0)
    .bind(meter)
    .bind(outcome)
    .bind(context.and_then(|c| c.endpoint.clone()))
    .bind(context.and_then(|c| c.metadata.as_ref().map(|m| m.to_string())))
    .bind(context.and_then(|c| c.ip.clone()))
    .bind(micros(now))
    .execute(conn)
    .await
    .map_err(db_error)?;
    Ok(())
}

/// The stored answer to an idempotency key: the hash of its request and the answer.
/// (Answers are written in the same transaction as what they answer, so a key that
/// is here is complete.)
pub(crate) async fn stored_answer<'c, T: serde::de::DeserializeOwned>(
    conn: impl sqlx::SqliteExecutor<'c>,
    scope: &str,
    key: &str,
) -> Result<Option<(String, T)>, StoreError> {
    let row: Option<(String, String)> =
        sqlx::query_as("SELECT request_hash, response FROM idempotency_keys WHERE scope = ?1 AND key = ?2")
            .bind(scope)
            .bind(key)
            .fetch_optional(conn)
            .await
            .map_err(db_error)?;
    row.map(|(hash, response)| {
        serde_json::from_str(&response)
            .map(|answer| (hash, answer))
            .map_err(|e| StoreError::Internal(format!("stored answer: {e}")))
    })
    .transpose()
}

pub(crate) async fn acquire_lease(store: &SqliteStore, request: LeaseRequest) -> Result<LeaseDecision, StoreError> {
    let now = micros(request.now);
    let mut tx = store.writer.begin_with("BEGIN IMMEDIATE").await.map_err(db_error)?;
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM accounts WHERE id = ?1)")
        .bind(request.account.0)
        .fetch_one(&mut *tx)
        .await
        .map_err(db_error)?;
    if !exists {
        return Err(StoreError::NotFound);
    }
    // The writer lock is held: a duplicate waits, then finds this one's answer.
    if let Some(idem) = &request.idempotency
        && let Some((hash, mut decision)) = stored_answer::<LeaseDecision>(&mut *tx, &idem.scope, &idem.key).await?
    {
        if hash != idem.request_hash {
            return Err(StoreError::Conflict("idempotency_key"));
        }
        decision.replayed = true;
        return Ok(decision);
    }
    let (held, next_expiry): (i64, Option<i64>) = sqlx::query_as(
        "SELECT COUNT(*), MIN(expires_at) FROM usage_leases \
         WHERE account_id = ?1 AND meter = ?2 AND released_at IS NULL AND expires_at > ?3",
    )
    .bind(request.account.0)
    .bind(&request.meter)
    .bind(now)
    .fetch_one(&mut *tx)
    .await
    .map_err(db_error)?;
    let allowed = request.max.is_none_or(|max| held < max);
    if allowed {
        sqlx::query(
            "INSERT INTO usage_leases (id, account_id, meter, expires_at, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .bind(request.id.0)
        .bind(request.account.0)
        .bind(&request.meter)
        .bind(micros(request.expires_at))
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
    }
    let outcome = if allowed { "consumed" } else { "denied" };
    lease_event(&mut tx, request.account, &request.meter, outcome, Some(&request.context), request.now).await?;
    let decision = LeaseDecision {
        allowed,
        held: held + i64::from(allowed),
        max: request.max,
        lease_id: allowed.then_some(request.id),
        expires_at: allowed.then_some(request.expires_at),
        next_expiry: if allowed { None } else { next_expiry.map(from_micros).transpose()? },
        replayed: false,
    };
    // Only a granted lease is the key's answer: a denial invites a retry later
    // (`Retry-After`), which must be able to take a slot then.
    if let Some(idem) = request.idempotency.as_ref().filter(|_| allowed) {
        let response = serde_json::to_string(&decision).map_err(|e| StoreError::Internal(e.to_string()))?;
        sqlx::query(
            "INSERT INTO idempotency_keys (scope, key, request_hash, response, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .bind(&idem.scope)
        .bind(&idem.key)
        .bind(&idem.request_hash)
        .bind(response)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
    }
    tx.commit().await.map_err(db_error)?;
    Ok(decision)
}

pub(crate) async fn release_lease(
    store: &SqliteStore,
    account: AccountId,
    lease: LeaseId,
    now: Timestamp,
    idempotency: Option<metering::Idempotency>,
) -> Result<bool, StoreError> {
    let mut tx = store.writer.begin_with("BEGIN IMMEDIATE").await.map_err(db_error)?;
    if let Some(idem) = &idempotency
        && let Some((hash, _)) = stored_answer::<serde_json::Value>(&mut *tx, &idem.scope, &idem.key).await?
    {
        return if hash == idem.request_hash { Ok(true) } else { Err(StoreError::Conflict("idempotency_key")) };
    }
    let meter: Option<String> = sqlx::query_scalar(
        "UPDATE usage_leases SET released_at = ?3 \
         WHERE id = ?1 AND account_id = ?2 AND released_at IS NULL AND expires_at > ?3 RETURNING meter",
    )
    .bind(lease.0)
    .bind(account.0)
    .bind(micros(now))
    .fetch_optional(&mut *tx)
    .await
    .map_err(db_error)?;
    let meter = meter.ok_or(StoreError::NotFound)?;
    lease_event(&mut tx, account, &meter, "released", None, now).await?;
    if let Some(idem) = &idempotency {
        sqlx::query(
            "INSERT INTO idempotency_keys (scope, key, request_hash, response, created_at) \
             VALUES (?1, ?2, ?3, '{\"released\":true}', ?4)",
        )
        .bind(&idem.scope)
        .bind(&idem.key)
        .bind(&idem.request_hash)
        .bind(micros(now))
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
    }
    tx.commit().await.map_err(db_error)?;
    Ok(false)
}

fn reservation_row(row: &SqliteRow) -> Result<Reservation, StoreError> {
    let status: String = row.try_get("status").map_err(db_error)?;
    let windows: String = row.try_get("windows").map_err(db_error)?;
    Ok(Reservation {
        id: ReservationId(row.try_get::<Uuid, _>("id").map_err(db_error)?),
        account: AccountId(row.try_get::<Uuid, _>("account_id").map_err(db_error)?),
        meter: row.try_get("meter").map_err(db_error)?,
        amount: row.try_get("amount").map_err(db_error)?,
        windows: serde_json::from_str(&windows).map_err(json_err)?,
        expires_at: from_micros(row.try_get("expires_at").map_err(db_error)?)?,
        status: ReservationStatus::parse(&status)
            .ok_or_else(|| StoreError::Internal(format!("reservation status {status:?}")))?,
    })
}

pub(crate) async fn reservation(
    store: &SqliteStore,
    account: AccountId,
    id: ReservationId,
) -> Result<Option<Reservation>, StoreError> {
    let row = sqlx::query(
        "SELECT id, account_id, meter, amount, windows, expires_at, status FROM usage_reservations WHERE id = ?1 AND account_id = ?2",
    )
    .bind(id.0)
    .bind(account.0)
    .fetch_optional(&store.reader)
    .await
    .map_err(db_error)?;
    row.as_ref().map(reservation_row).transpose()
}

pub(crate) async fn expired_reservations(
    store: &SqliteStore,
    now: Timestamp,
    limit: u32,
) -> Result<Vec<Reservation>, StoreError> {
    let rows = sqlx::query(
        "SELECT id, account_id, meter, amount, windows, expires_at, status FROM usage_reservations \
         WHERE status = 'pending' AND expires_at <= ?1 ORDER BY expires_at LIMIT ?2",
    )
    .bind(micros(now))
    .bind(i64::from(limit))
    .fetch_all(&store.reader)
    .await
    .map_err(db_error)?;
    rows.iter().map(reservation_row).collect()
}
