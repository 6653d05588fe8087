//! Plans, accounts, service keys and usage on PostgreSQL: the bodies of the
//! corresponding `Store` methods (the trait impl in `store.rs` delegates here).
//!
//! Writers really run concurrently here (READ COMMITTED, a pool of connections), so
//! each rule that SQLite gets from its single writer is made explicit:
//! - `consume_usage` serialises the consumes of one (account, meter) on a
//!   transaction-level advisory lock and reads the counters only once it holds it
//!   (a batch of plain consumes, `usage_batch.rs`, holds the locks of all of its
//!   (account, meter) pairs, taken in ascending order);
//!   `acquire_lease` takes the same lock before counting the live leases;
//! - an idempotency key is claimed first, so a concurrent duplicate waits on the
//!   primary key and replays the committed answer;
//! - `upsert_external_account` relies on `ON CONFLICT DO NOTHING`, which waits for a
//!   concurrent insert of the same `external_id` to commit;
//! - `apply_catalog` locks the catalog tables, so instances applying at once take turns.

use serde_json::Value;
use sqlx::postgres::{PgConnection, PgRow};
use sqlx::types::Json;
use time::UtcOffset;
use tollgate_core::accounts::{
    Account, AccountKind, NewExternalAccount, Scope, ServiceKey, Subscription, SubscriptionStatus,
};
use tollgate_core::audit::AuditEvent;
use tollgate_core::credits::CreditTransfer;
use tollgate_core::identity::TokenDigest;
use tollgate_core::ids::{AccountId, LeaseId, ReservationId, ServiceKeyId, UsageEventId};
use tollgate_core::metering::{
    self, CounterReset, EventContext, Idempotency, LeaseDecision, LeaseRequest, Reservation, ReservationAction,
    ReservationStatus, UsageDecision, UsageRequest, WindowCheck, WindowState,
};
use tollgate_core::plans::{Catalog, Meter, Plan};
use tollgate_core::store::{CatalogChanges, DailyUsage};
use tollgate_core::{StoreError, Timestamp};
use uuid::Uuid;

use crate::rows::get;
use crate::store::insert_audit;
use crate::{PgStore, db_error, usage_batch};

fn json_err(e: serde_json::Error) -> StoreError {
    StoreError::Internal(format!("stored JSON: {e}"))
}

// Stored definitions are compared with the new ones as values of the domain type
// rather than as text (jsonb does not keep the text it was given); one that no longer
// parses counts as changed.

pub(crate) async fn apply_catalog(
    store: &PgStore,
    catalog: &Catalog,
    now: Timestamp,
) -> Result<CatalogChanges, StoreError> {
    let mut tx = store.pool.begin().await.map_err(db_error)?;
    // Instances applying the plans file at once (several starting together) take
    // turns: the second reads what the first committed and finds it unchanged.
    // EXCLUSIVE lets readers (`stored_catalog`) through.
    sqlx::query("LOCK TABLE meters, plans IN EXCLUSIVE MODE").execute(&mut *tx).await.map_err(db_error)?;
    let mut changes = CatalogChanges::default();

    let existing: Vec<(String, Json<Value>)> =
        sqlx::query_as("SELECT key, definition FROM meters").fetch_all(&mut *tx).await.map_err(db_error)?;
    for (key, meter) in &catalog.meters {
        let label = format!("meter {key}");
        match existing.iter().find(|(k, _)| k == key) {
            Some((_, Json(old))) if serde_json::from_value::<Meter>(old.clone()).is_ok_and(|old| old == *meter) => {
                changes.unchanged.push(label)
            }
            Some(_) => {
                sqlx::query("UPDATE meters SET definition = $2, updated_at = $3 WHERE key = $1")
                    .bind(key)
                    .bind(Json(meter))
                    .bind(now)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_error)?;
                changes.updated.push(label);
            }
            None => {
                sqlx::query("INSERT INTO meters (key, definition, updated_at) VALUES ($1, $2, $3)")
                    .bind(key)
                    .bind(Json(meter))
                    .bind(now)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_error)?;
                changes.created.push(label);
            }
        }
    }
    for (key, _) in existing.iter().filter(|(k, _)| !catalog.meters.contains_key(k)) {
        sqlx::query("DELETE FROM meters WHERE key = $1").bind(key).execute(&mut *tx).await.map_err(db_error)?;
        changes.deleted.push(format!("meter {key}"));
    }

    let existing: Vec<(String, Json<Value>, Option<Timestamp>)> =
        sqlx::query_as("SELECT key, definition, archived_at FROM plans").fetch_all(&mut *tx).await.map_err(db_error)?;
    for (key, plan) in &catalog.plans {
        let label = format!("plan {key}");
        match existing.iter().find(|(k, _, _)| k == key) {
            Some((_, Json(old), None)) if serde_json::from_value::<Plan>(old.clone()).is_ok_and(|old| old == *plan) => {
                changes.unchanged.push(label)
            }
            Some(_) => {
                sqlx::query("UPDATE plans SET definition = $2, archived_at = NULL, updated_at = $3 WHERE key = $1")
                    .bind(key)
                    .bind(Json(plan))
                    .bind(now)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_error)?;
                changes.updated.push(label);
            }
            None => {
                sqlx::query("INSERT INTO plans (key, definition, updated_at) VALUES ($1, $2, $3)")
                    .bind(key)
                    .bind(Json(plan))
                    .bind(now)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_error)?;
                changes.created.push(label);
            }
        }
    }
    let removed: Vec<_> = existing.iter().filter(|(k, _, _)| !catalog.plans.contains_key(k)).collect();
    if !removed.is_empty() {
        // Subscriptions may not change while deciding which plans are still used: a
        // concurrent `put_subscription` waits for this transaction, and the checks
        // below (each a new snapshot) see every subscription committed before.
        sqlx::query("LOCK TABLE subscriptions IN SHARE MODE").execute(&mut *tx).await.map_err(db_error)?;
    }
    for (key, _, archived_at) in removed {
        let in_use: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM subscriptions WHERE plan_key = $1 OR scheduled_plan = $1)",
        )
        .bind(key)
        .fetch_one(&mut *tx)
        .await
        .map_err(db_error)?;
        if in_use {
            if archived_at.is_none() {
                sqlx::query("UPDATE plans SET archived_at = $2, updated_at = $2 WHERE key = $1")
                    .bind(key)
                    .bind(now)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_error)?;
                changes.archived.push(format!("plan {key}"));
            }
        } else {
            sqlx::query("DELETE FROM plans WHERE key = $1").bind(key).execute(&mut *tx).await.map_err(db_error)?;
            changes.deleted.push(format!("plan {key}"));
        }
    }
    if let Some(audit) = changes.audit_event(now) {
        insert_audit(&mut tx, &audit).await?;
    }
    tx.commit().await.map_err(db_error)?;
    Ok(changes)
}

pub(crate) async fn stored_catalog(store: &PgStore) -> Result<Option<Catalog>, StoreError> {
    // One statement, so one snapshot: never half of a concurrent apply.
    // Archived plans too: still in force for their subscribers.
    let rows: Vec<(bool, String, Json<Value>, bool)> = sqlx::query_as(
        "SELECT TRUE, key, definition, FALSE FROM meters \
         UNION ALL SELECT FALSE, key, definition, archived_at IS NOT NULL FROM plans",
    )
    .fetch_all(&store.pool)
    .await
    .map_err(db_error)?;
    if rows.is_empty() {
        return Ok(None);
    }
    let mut catalog =
        Catalog { meters: Default::default(), plans: Default::default(), credit_packages: Default::default() };
    for (is_meter, key, Json(definition), archived) in rows {
        if is_meter {
            catalog.meters.insert(key, serde_json::from_value::<Meter>(definition).map_err(json_err)?);
        } else {
            let plan = Plan { archived, ..serde_json::from_value::<Plan>(definition).map_err(json_err)? };
            catalog.plans.insert(key, plan);
        }
    }
    Ok(Some(catalog))
}

macro_rules! account_columns {
    () => {
        "id, kind, name, external_id, email, created_at"
    };
}

fn account(row: &PgRow) -> Result<Account, StoreError> {
    let kind: String = get(row, "kind")?;
    Ok(Account {
        id: AccountId(get::<Uuid>(row, "id")?),
        kind: AccountKind::parse(&kind).ok_or_else(|| StoreError::Internal(format!("account kind {kind:?}")))?,
        name: get(row, "name")?,
        external_id: get(row, "external_id")?,
        email: get(row, "email")?,
        created_at: get(row, "created_at")?,
    })
}

pub(crate) async fn upsert_external_account(
    store: &PgStore,
    new: NewExternalAccount,
) -> Result<(Account, bool), StoreError> {
    // A concurrent insert of the same external_id makes ON CONFLICT wait for it to
    // commit, then do nothing; the SELECT after it (a new snapshot under READ
    // COMMITTED) finds the winner's row. Accounts are never deleted, so the loop only
    // guards against the impossible.
    for _ in 0..3 {
        let inserted = sqlx::query(concat!(
            "INSERT INTO accounts (id, kind, name, external_id, email, created_at) VALUES ($1, 'external', $2, $3, $4, $5) \
             ON CONFLICT (external_id) DO NOTHING RETURNING ",
            account_columns!()
        ))
        .bind(new.id.0)
        .bind(&new.name)
        .bind(&new.external_id)
        .bind(&new.email)
        .bind(new.created_at)
        .fetch_optional(&store.pool)
        .await
        .map_err(db_error)?;
        if let Some(row) = inserted {
            return Ok((account(&row)?, true));
        }
        if let Some(existing) = account_by_external_id(store, &new.external_id).await? {
            return Ok((existing, false));
        }
    }
    Err(StoreError::Internal(format!("account {:?} neither inserted nor found", new.external_id)))
}

pub(crate) async fn account_by_id(store: &PgStore, id: AccountId) -> Result<Option<Account>, StoreError> {
    let row = sqlx::query(concat!("SELECT ", account_columns!(), " FROM accounts WHERE id = $1"))
        .bind(id.0)
        .fetch_optional(&store.pool)
        .await
        .map_err(db_error)?;
    row.as_ref().map(account).transpose()
}

pub(crate) async fn account_by_external_id(store: &PgStore, external_id: &str) -> Result<Option<Account>, StoreError> {
    if let Some(found) = store.cache.account_by_external_id(external_id) {
        return Ok(Some(found));
    }
    let row = sqlx::query(concat!("SELECT ", account_columns!(), " FROM accounts WHERE external_id = $1"))
        .bind(external_id)
        .fetch_optional(&store.pool)
        .await
        .map_err(db_error)?;
    let found = row.as_ref().map(account).transpose()?;
    if let Some(found) = &found {
        store.cache.remember_account(found);
    }
    Ok(found)
}

/// The subscription as this node last saw it, at most `read_cache::SUBSCRIPTION_TTL`
/// ago (see `read_cache.rs`).
pub(crate) async fn subscription(store: &PgStore, account: AccountId) -> Result<Option<Subscription>, StoreError> {
    if let Some(cached) = store.cache.subscription(account) {
        return Ok(cached);
    }
    let seen = store.cache.generation();
    let found = subscription_row(store, account).await?;
    store.cache.fill_subscription(account, found.clone(), seen);
    Ok(found)
}

macro_rules! subscription_columns {
    () => {
        "plan_key, status, provider, started_at, trial_ends_at, cancel_at_period_end, scheduled_plan, scheduled_at, \
         updated_at, provider_subscription_id, provider_state_at"
    };
}

async fn subscription_row(store: &PgStore, account: AccountId) -> Result<Option<Subscription>, StoreError> {
    let mut conn = store.pool.acquire().await.map_err(db_error)?;
    subscription_in(&mut conn, account, false).await
}

/// The account's subscription as this connection (maybe inside a transaction) sees
/// it; with `lock`, the row is locked (`FOR UPDATE`) until the transaction ends, so a
/// read-decide-write cannot interleave with another writer of the row (who waits,
/// then re-reads it as committed).
pub(crate) async fn subscription_in(
    conn: &mut PgConnection,
    account: AccountId,
    lock: bool,
) -> Result<Option<Subscription>, StoreError> {
    let sql = if lock {
        concat!("SELECT ", subscription_columns!(), " FROM subscriptions WHERE account_id = $1 FOR UPDATE")
    } else {
        concat!("SELECT ", subscription_columns!(), " FROM subscriptions WHERE account_id = $1")
    };
    let row = sqlx::query(sql).bind(account.0).fetch_optional(&mut *conn).await.map_err(db_error)?;
    let Some(row) = row else { return Ok(None) };
    let status: String = get(&row, "status")?;
    Ok(Some(Subscription {
        account_id: account,
        plan: get(&row, "plan_key")?,
        status: SubscriptionStatus::parse(&status).ok_or_else(|| StoreError::Internal(format!("status {status:?}")))?,
        provider: get(&row, "provider")?,
        started_at: get(&row, "started_at")?,
        trial_ends_at: get(&row, "trial_ends_at")?,
        cancel_at_period_end: get(&row, "cancel_at_period_end")?,
        scheduled_plan: get(&row, "scheduled_plan")?,
        scheduled_at: get(&row, "scheduled_at")?,
        updated_at: get(&row, "updated_at")?,
        provider_subscription_id: get(&row, "provider_subscription_id")?,
        provider_state_at: get(&row, "provider_state_at")?,
    }))
}

/// Writes the account's subscription if the stored one still has version `previous`
/// (`updated_at`; `None`: there is none); false when it changed meanwhile. An unknown
/// account fails the foreign key: `NotFound` (see `db_error`).
///
/// A concurrent writer of the same row waits on its lock, then sees the new version.
/// When the write is refused because of a conflicting row, that row is locked all the
/// same (`ON CONFLICT DO UPDATE` locks the rows it skips), so a caller may read it
/// again and decide anew.
pub(crate) async fn write_subscription(
    conn: &mut PgConnection,
    s: &Subscription,
    previous: Option<Timestamp>,
) -> Result<bool, StoreError> {
    let written = sqlx::query(
        "INSERT INTO subscriptions (account_id, plan_key, status, provider, started_at, trial_ends_at, cancel_at_period_end, \
           scheduled_plan, scheduled_at, updated_at, provider_subscription_id, provider_state_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $9, $10, $8, $12, $13) \
         ON CONFLICT (account_id) DO UPDATE SET plan_key = excluded.plan_key, status = excluded.status, \
           provider = excluded.provider, started_at = excluded.started_at, trial_ends_at = excluded.trial_ends_at, \
           cancel_at_period_end = excluded.cancel_at_period_end, scheduled_plan = excluded.scheduled_plan, \
           scheduled_at = excluded.scheduled_at, updated_at = excluded.updated_at, \
           provider_subscription_id = excluded.provider_subscription_id, provider_state_at = excluded.provider_state_at \
         WHERE subscriptions.updated_at IS NOT DISTINCT FROM $11",
    )
    .bind(s.account_id.0)
    .bind(&s.plan)
    .bind(s.status.as_str())
    .bind(&s.provider)
    .bind(s.started_at)
    .bind(s.trial_ends_at)
    .bind(s.cancel_at_period_end)
    .bind(s.updated_at)
    .bind(&s.scheduled_plan)
    .bind(s.scheduled_at)
    .bind(previous)
    .bind(&s.provider_subscription_id)
    .bind(s.provider_state_at)
    .execute(&mut *conn)
    .await
    .map_err(db_error)?;
    Ok(written.rows_affected() > 0)
}

pub(crate) async fn put_subscription(
    store: &PgStore,
    s: Subscription,
    previous: Option<Timestamp>,
    audit: AuditEvent,
) -> Result<(), StoreError> {
    let mut tx = store.pool.begin().await.map_err(db_error)?;
    // The update applies only to the version the change was computed from.
    if !write_subscription(&mut tx, &s, previous).await? {
        // Possibly computed from this node's cached copy: the retry reads the row.
        store.cache.forget_subscription(s.account_id);
        return Err(StoreError::Conflict("subscription_changed"));
    }
    insert_audit(&mut tx, &audit).await?;
    tx.commit().await.map_err(db_error)?;
    store.cache.store_subscription(s.account_id, s);
    Ok(())
}

pub(crate) async fn create_service_key(
    store: &PgStore,
    key: ServiceKey,
    digest: TokenDigest,
    audit: AuditEvent,
) -> Result<(), StoreError> {
    let mut tx = store.pool.begin().await.map_err(db_error)?;
    let scopes: Vec<&str> = key.scopes.iter().map(|s| s.as_str()).collect();
    sqlx::query(
        "INSERT INTO service_keys (id, name, prefix, digest, scopes, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(key.id.0)
    .bind(&key.name)
    .bind(&key.prefix)
    .bind(&digest.0)
    .bind(scopes)
    .bind(key.created_at)
    .execute(&mut *tx)
    .await
    .map_err(db_error)?;
    insert_audit(&mut tx, &audit).await?;
    tx.commit().await.map_err(db_error)
}

pub(crate) async fn service_key_by_digest(
    store: &PgStore,
    digest: &TokenDigest,
) -> Result<Option<ServiceKey>, StoreError> {
    let row =
        sqlx::query("SELECT id, name, prefix, scopes, created_at, revoked_at FROM service_keys WHERE digest = $1")
            .bind(&digest.0)
            .fetch_optional(&store.pool)
            .await
            .map_err(db_error)?;
    let Some(row) = row else { return Ok(None) };
    let scopes: Vec<String> = get(&row, "scopes")?;
    Ok(Some(ServiceKey {
        id: ServiceKeyId(get::<Uuid>(&row, "id")?),
        name: get(&row, "name")?,
        prefix: get(&row, "prefix")?,
        scopes: scopes.iter().filter_map(|s| Scope::parse(s)).collect(),
        created_at: get(&row, "created_at")?,
        revoked_at: get(&row, "revoked_at")?,
    }))
}

/// The current usage of each window: the sum of its (distinct) counter rows, 0 for
/// missing ones. One statement for all windows.
async fn window_usage(
    conn: &mut PgConnection,
    account: AccountId,
    meter: &str,
    keys: &[Vec<String>],
) -> Result<Vec<i64>, StoreError> {
    let (windows, flat): (Vec<i32>, Vec<&str>) = keys
        .iter()
        .enumerate()
        .flat_map(|(i, window_keys)| window_keys.iter().map(move |k| (i as i32, k.as_str())))
        .unzip();
    let sums: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT k.i, COALESCE(SUM(c.used), 0)::bigint \
         FROM (SELECT DISTINCT i, key FROM UNNEST($3::integer[], $4::text[]) AS u (i, key)) k \
         LEFT JOIN usage_counters c ON c.account_id = $1 AND c.meter = $2 AND c.window_key = k.key \
         GROUP BY k.i",
    )
    .bind(account.0)
    .bind(meter)
    .bind(windows)
    .bind(flat)
    .fetch_all(conn)
    .await
    .map_err(db_error)?;
    let mut used = vec![0; keys.len()];
    for (i, sum) in sums {
        used[i as usize] = sum;
    }
    Ok(used)
}

pub(crate) async fn counter_values(
    store: &PgStore,
    account: AccountId,
    meter: &str,
    keys: &[Vec<String>],
) -> Result<Vec<i64>, StoreError> {
    let mut conn = store.pool.acquire().await.map_err(db_error)?;
    window_usage(&mut conn, account, meter, keys).await
}

pub(crate) async fn usage_daily(
    store: &PgStore,
    account: AccountId,
    meter: Option<&str>,
    from: &str,
    to: &str,
) -> Result<Vec<DailyUsage>, StoreError> {
    let rows: Vec<(time::Date, String, i64, i64)> = sqlx::query_as(
        "SELECT day, meter, consumed, denied FROM usage_daily \
         WHERE account_id = $1 AND ($2::text IS NULL OR meter = $2) AND day >= $3::date AND day <= $4::date \
         ORDER BY day, meter",
    )
    .bind(account.0)
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

fn day_string(d: time::Date) -> String {
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

/// The advisory lock key of one (account, meter)'s counters (and leases): FNV-1a,
/// stable across Rust versions and instances. A collision only makes two meters take
/// turns.
pub(crate) fn counters_lock_key(account: AccountId, meter: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in b"usage_counters\0".iter().chain(account.0.as_bytes()).chain(meter.as_bytes()) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash as i64
}

/// Claims the idempotency key for this transaction, or returns the stored answer.
///
/// The claim row carries a JSON null answer that this transaction replaces before it
/// commits, so no other transaction ever sees it: a concurrent duplicate's INSERT waits
/// on the primary key until the claimant commits (then conflicts and reads the real
/// answer, in a new snapshot) or rolls back (then claims the key itself).
async fn claim_idempotency_key(
    conn: &mut PgConnection,
    idem: &Idempotency,
    now: Timestamp,
) -> Result<Option<UsageDecision>, StoreError> {
    match claim_idempotency_key_raw(conn, idem, now).await? {
        Some(response) => {
            let mut decision: UsageDecision = serde_json::from_value(response).map_err(json_err)?;
            decision.replayed = true;
            Ok(Some(decision))
        }
        None => Ok(None),
    }
}

/// [`claim_idempotency_key`] for any kind of answer: the stored answer as JSON.
pub(crate) async fn claim_idempotency_key_raw(
    conn: &mut PgConnection,
    idem: &Idempotency,
    now: Timestamp,
) -> Result<Option<Value>, StoreError> {
    // Idempotency rows are never deleted today; the loop covers one being removed
    // (say, by an expiry job) between the conflict and the read.
    for _ in 0..3 {
        let claimed = sqlx::query(
            "INSERT INTO idempotency_keys (scope, key, request_hash, response, created_at) \
             VALUES ($1, $2, $3, 'null', $4) ON CONFLICT (scope, key) DO NOTHING",
        )
        .bind(&idem.scope)
        .bind(&idem.key)
        .bind(&idem.request_hash)
        .bind(now)
        .execute(&mut *conn)
        .await
        .map_err(db_error)?
        .rows_affected()
            == 1;
        if claimed {
            return Ok(None);
        }
        let stored: Option<(String, Json<Value>)> =
            sqlx::query_as("SELECT request_hash, response FROM idempotency_keys WHERE scope = $1 AND key = $2")
                .bind(&idem.scope)
                .bind(&idem.key)
                .fetch_optional(&mut *conn)
                .await
                .map_err(db_error)?;
        if let Some((hash, Json(response))) = stored {
            if hash != idem.request_hash {
                return Err(StoreError::Conflict("idempotency_key"));
            }
            // A null answer (a claim) fails to parse in the caller rather than replay.
            return Ok(Some(response));
        }
    }
    Err(StoreError::Internal("idempotency key neither claimed nor found".into()))
}

/// Checks and (unless denied) counts the request, records the event, the daily total
/// and the idempotency answer. Plain consumes are committed in batches
/// (`usage_batch.rs`); every other request has a transaction of its own
/// ([`consume_alone`]).
pub(crate) async fn consume_usage(store: &PgStore, request: UsageRequest) -> Result<UsageDecision, StoreError> {
    if usage_batch::is_batchable(&request) {
        return store.usage_batch.consume(store, request).await;
    }
    consume_alone(store, request).await
}

/// [`consume_usage`] in a transaction of its own: the reference a batch must match.
///
/// Exactness: every consume of one (account, meter) takes the same transaction-level
/// advisory lock before reading the counters, and keeps it until it commits. Under
/// READ COMMITTED each statement sees everything committed before it started, so the
/// sums read after the lock include every earlier consume, and no other consume can
/// change them before this one commits. Row locks (`SELECT ... FOR UPDATE`) would not
/// do for rolling windows: a bucket row that a concurrent consume has inserted but not
/// committed is invisible to the snapshot, so it could be neither locked nor counted.
pub(crate) async fn consume_alone(store: &PgStore, request: UsageRequest) -> Result<UsageDecision, StoreError> {
    let keys: Vec<Vec<String>> = request.windows.iter().map(|w| w.count_keys.to_vec()).collect();
    if request.dry_run {
        // Reads as things stand, locks nothing, writes nothing. Dry runs are only
        // ever consumes, so the consume rule is the whole rule here.
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
        return Ok(UsageDecision { allowed, windows, denied_by, replayed: false, credits_charged });
    }
    let mut tx = store.pool.begin().await.map_err(db_error)?;
    // The key first, before any other lock: a duplicate waiting on it holds nothing.
    if let Some(idem) = &request.idempotency
        && let Some(replayed) = claim_idempotency_key(&mut tx, idem, request.now).await?
    {
        // Rolled back on drop: only the (conflicting) claim attempt was made.
        return Ok(replayed);
    }
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(counters_lock_key(request.account, &request.meter))
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
    // A settle needs a pending reservation of this account. The row lock makes a
    // concurrent settle of the same reservation (possibly through another meter's
    // lock) wait, then re-read the row as committed and find it no longer pending.
    // Returning rolls back on drop: nothing, not even the idempotency claim, is kept.
    if let Some(ReservationAction::Settle { id, .. }) = &request.reservation {
        let status: Option<String> =
            sqlx::query_scalar("SELECT status FROM usage_reservations WHERE id = $1 AND account_id = $2 FOR UPDATE")
                .bind(id.0)
                .bind(request.account.0)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_error)?;
        if status.as_deref() != Some(ReservationStatus::Pending.as_str()) {
            return Err(StoreError::NotFound);
        }
    }
    let used = window_usage(&mut tx, request.account, &request.meter, &keys).await?;
    let mut applied = metering::apply(request.op, &request.windows, &used, request.amount);
    // Spent windows, but the meter draws on credits: pay in this transaction (under the
    // meter's lock, then the balance row's: the same order as every other transfer).
    let mut credits_charged = 0;
    if let Some((funding, cost)) = metering::CreditFunding::applies(&request, applied.allowed) {
        let payment = CreditTransfer::metered(&request, funding, cost);
        match crate::billing::transfer_in(&mut tx, &payment).await {
            Ok(_) => {
                applied.paid_with_credits();
                credits_charged = cost;
            }
            Err(StoreError::Conflict("insufficient_credits")) => {}
            Err(e) => return Err(e),
        }
    }
    let windows = request.windows.iter().zip(&applied.after).map(|(w, u)| WindowState::new(w, *u)).collect();
    let decision = UsageDecision {
        allowed: applied.allowed,
        windows,
        denied_by: applied.denied_by,
        replayed: false,
        credits_charged,
    };
    let (outcome, event_amount) = applied.event(request.op, request.amount);

    // Each window adds its delta to its increment row (summed if two windows share
    // one, as in SQLite); none when denied or zero. Deltas are negative for refunds
    // and lowered gauges, and a row never goes below zero: a new row starts at
    // GREATEST(0, delta), an existing one becomes GREATEST(0, used + delta). The
    // update reads the raw delta from `deltas`, since `excluded` holds the clamped one.
    let (increments, deltas): (Vec<&str>, Vec<i64>) = request
        .windows
        .iter()
        .zip(&applied.deltas)
        .filter(|(_, d)| **d != 0)
        .map(|(w, d)| (w.increment_key.as_str(), *d))
        .unzip();
    // Net change of the first window (consumes add, refunds and lowered gauges
    // subtract) when allowed; one denial otherwise.
    let (consumed, denied) = match (applied.allowed, credits_charged > 0) {
        (true, true) => (request.amount, 0),
        (true, false) => (applied.deltas.first().copied().unwrap_or(0), 0),
        (false, _) => (0, 1),
    };
    // One statement for every write, to hold the lock for as few round trips as
    // possible. An unknown account fails a foreign key: `NotFound`.
    let answered: i64 = sqlx::query_scalar(
        "WITH deltas AS ( \
           SELECT k, SUM(d)::bigint AS d FROM UNNEST($4::text[], $17::bigint[]) AS u (k, d) GROUP BY k \
         ), counters AS ( \
           INSERT INTO usage_counters (account_id, meter, window_key, used) \
           SELECT $1, $2, k, GREATEST(0, d) FROM deltas \
           ON CONFLICT (account_id, meter, window_key) DO UPDATE SET used = GREATEST(0, usage_counters.used + \
             (SELECT deltas.d FROM deltas WHERE deltas.k = excluded.window_key)) \
         ), event AS ( \
           INSERT INTO usage_events (id, account_id, meter, outcome, amount, idempotency_key, endpoint, metadata, ip, created_at) \
           VALUES ($5, $1, $2, $6, $3, $7, $8, $9, $10, $11) \
         ), daily AS ( \
           INSERT INTO usage_daily (account_id, meter, day, consumed, denied) VALUES ($1, $2, $12, $13, $14) \
           ON CONFLICT (account_id, meter, day) DO UPDATE \
             SET consumed = usage_daily.consumed + excluded.consumed, denied = usage_daily.denied + excluded.denied \
         ), answer AS ( \
           UPDATE idempotency_keys SET response = $16 WHERE scope = $15 AND key = $7 RETURNING 1 \
         ) \
         SELECT COUNT(*) FROM answer",
    )
    .bind(request.account.0)
    .bind(&request.meter)
    .bind(event_amount)
    .bind(increments)
    .bind(UsageEventId::new().0)
    .bind(outcome)
    .bind(request.idempotency.as_ref().map(|i| i.key.as_str()))
    .bind(&request.context.endpoint)
    .bind(request.context.metadata.as_ref().map(Json))
    .bind(&request.context.ip)
    .bind(request.now)
    .bind(request.now.to_offset(UtcOffset::UTC).date())
    .bind(consumed)
    .bind(denied)
    .bind(request.idempotency.as_ref().map(|i| i.scope.as_str()))
    .bind(request.idempotency.as_ref().map(|_| Json(&decision)))
    .bind(deltas)
    .fetch_one(&mut *tx)
    .await
    .map_err(db_error)?;
    if answered != i64::from(request.idempotency.is_some()) {
        return Err(StoreError::Internal("idempotency claim lost before its answer was stored".into()));
    }
    match &request.reservation {
        Some(ReservationAction::Open { id, expires_at }) if applied.allowed => {
            sqlx::query(
                "INSERT INTO usage_reservations (id, account_id, meter, amount, windows, expires_at, status, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, 'pending', $7)",
            )
            .bind(id.0)
            .bind(request.account.0)
            .bind(&request.meter)
            .bind(request.amount)
            .bind(Json(&request.windows))
            .bind(*expires_at)
            .bind(request.now)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        }
        Some(ReservationAction::Settle { id, status }) => {
            sqlx::query(
                "UPDATE usage_reservations SET status = $2, settled_at = $3 WHERE id = $1 AND status = 'pending'",
            )
            .bind(id.0)
            .bind(status.as_str())
            .bind(request.now)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        }
        _ => {}
    }
    tx.commit().await.map_err(db_error)?;
    Ok(decision)
}

/// Records a lease decision (`consumed`, `denied` or `released`, amount 1) in
/// `usage_events`, as the SQLite store does.
async fn lease_event(
    conn: &mut PgConnection,
    account: AccountId,
    meter: &str,
    outcome: &str,
    context: Option<&EventContext>,
    now: Timestamp,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO usage_events (id, account_id, meter, outcome, amount, endpoint, metadata, ip, created_at) \
         VALUES ($1, $2, $3, $4, 1, $5, $6, $7, $8)",
    )
    .bind(UsageEventId::new().0)
    .bind(account.0)
    .bind(meter)
    .bind(outcome)
    .bind(context.and_then(|c| c.endpoint.as_deref()))
    .bind(context.and_then(|c| c.metadata.as_ref().map(Json)))
    .bind(context.and_then(|c| c.ip.as_deref()))
    .bind(now)
    .execute(conn)
    .await
    .map_err(db_error)?;
    Ok(())
}

/// Takes a slot when fewer than `max` live leases exist, and records the event, in one
/// transaction.
///
/// Exactness: as in `consume_usage`, every acquire of one (account, meter) takes the
/// same transaction-level advisory lock before counting the live leases and keeps it
/// until it commits; under READ COMMITTED the count, read after the lock, includes
/// every lease committed by earlier acquires. Releases and expiries only ever free
/// slots, so they need not take the lock: an acquire that misses one merely denies
/// where a moment later it would have granted.
pub(crate) async fn acquire_lease(store: &PgStore, request: LeaseRequest) -> Result<LeaseDecision, StoreError> {
    let mut tx = store.pool.begin().await.map_err(db_error)?;
    // Accounts are never deleted, so the check holds until commit. (The foreign keys
    // would give `NotFound` too, but only after taking the lock.)
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM accounts WHERE id = $1)")
        .bind(request.account.0)
        .fetch_one(&mut *tx)
        .await
        .map_err(db_error)?;
    if !exists {
        return Err(StoreError::NotFound);
    }
    // The key first, before the lock (as for consumes): a duplicate waits on it.
    if let Some(idem) = &request.idempotency
        && let Some(stored) = claim_idempotency_key_raw(&mut tx, idem, request.now).await?
    {
        let mut decision: LeaseDecision = serde_json::from_value(stored).map_err(json_err)?;
        decision.replayed = true;
        return Ok(decision);
    }
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(counters_lock_key(request.account, &request.meter))
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
    let (held, next_expiry): (i64, Option<Timestamp>) = sqlx::query_as(
        "SELECT COUNT(*), MIN(expires_at) FROM usage_leases \
         WHERE account_id = $1 AND meter = $2 AND released_at IS NULL AND expires_at > $3",
    )
    .bind(request.account.0)
    .bind(&request.meter)
    .bind(request.now)
    .fetch_one(&mut *tx)
    .await
    .map_err(db_error)?;
    let allowed = request.max.is_none_or(|max| held < max);
    if allowed {
        sqlx::query(
            "INSERT INTO usage_leases (id, account_id, meter, expires_at, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(request.id.0)
        .bind(request.account.0)
        .bind(&request.meter)
        .bind(request.expires_at)
        .bind(request.now)
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
        next_expiry: if allowed { None } else { next_expiry },
        replayed: false,
    };
    // Only a granted lease is the key's answer: a denial invites a retry later
    // (`Retry-After`), which must be able to take a slot then.
    if let Some(idem) = &request.idempotency {
        if allowed {
            sqlx::query("UPDATE idempotency_keys SET response = $3 WHERE scope = $1 AND key = $2")
                .bind(&idem.scope)
                .bind(&idem.key)
                .bind(Json(&decision))
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
        } else {
            sqlx::query("DELETE FROM idempotency_keys WHERE scope = $1 AND key = $2")
                .bind(&idem.scope)
                .bind(&idem.key)
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
        }
    }
    tx.commit().await.map_err(db_error)?;
    Ok(decision)
}

/// Releases a live lease of `account`: one conditional UPDATE, so of two concurrent
/// releases the second re-checks the row as the first committed it and finds nothing.
pub(crate) async fn release_lease(
    store: &PgStore,
    account: AccountId,
    lease: LeaseId,
    now: Timestamp,
    idempotency: Option<Idempotency>,
) -> Result<bool, StoreError> {
    let mut tx = store.pool.begin().await.map_err(db_error)?;
    // The key first: a concurrent retry waits on it, then replays.
    if let Some(idem) = &idempotency
        && claim_idempotency_key_raw(&mut tx, idem, now).await?.is_some()
    {
        return Ok(true);
    }
    let meter: Option<String> = sqlx::query_scalar(
        "UPDATE usage_leases SET released_at = $3 \
         WHERE id = $1 AND account_id = $2 AND released_at IS NULL AND expires_at > $3 RETURNING meter",
    )
    .bind(lease.0)
    .bind(account.0)
    .bind(now)
    .fetch_optional(&mut *tx)
    .await
    .map_err(db_error)?;
    let meter = meter.ok_or(StoreError::NotFound)?;
    lease_event(&mut tx, account, &meter, "released", None, now).await?;
    if let Some(idem) = &idempotency {
        sqlx::query("UPDATE idempotency_keys SET response = '{\"released\":true}' WHERE scope = $1 AND key = $2")
            .bind(&idem.scope)
            .bind(&idem.key)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
    }
    tx.commit().await.map_err(db_error)?;
    Ok(false)
}

macro_rules! reservation_columns {
    () => {
        "id, account_id, meter, amount, windows, expires_at, status"
    };
}

fn reservation_row(row: &PgRow) -> Result<Reservation, StoreError> {
    let status: String = get(row, "status")?;
    let Json(windows) = get::<Json<Vec<WindowCheck>>>(row, "windows")?;
    Ok(Reservation {
        id: ReservationId(get::<Uuid>(row, "id")?),
        account: AccountId(get::<Uuid>(row, "account_id")?),
        meter: get(row, "meter")?,
        amount: get(row, "amount")?,
        windows,
        expires_at: get(row, "expires_at")?,
        status: ReservationStatus::parse(&status)
            .ok_or_else(|| StoreError::Internal(format!("reservation status {status:?}")))?,
    })
}

pub(crate) async fn reservation(
    store: &PgStore,
    account: AccountId,
    id: ReservationId,
) -> Result<Option<Reservation>, StoreError> {
    let row = sqlx::query(concat!(
        "SELECT ",
        reservation_columns!(),
        " FROM usage_reservations WHERE id = $1 AND account_id = $2"
    ))
    .bind(id.0)
    .bind(account.0)
    .fetch_optional(&store.pool)
    .await
    .map_err(db_error)?;
    row.as_ref().map(reservation_row).transpose()
}

pub(crate) async fn expired_reservations(
    store: &PgStore,
    now: Timestamp,
    limit: u32,
) -> Result<Vec<Reservation>, StoreError> {
    let rows = sqlx::query(concat!(
        "SELECT ",
        reservation_columns!(),
        " FROM usage_reservations WHERE status = 'pending' AND expires_at <= $1 ORDER BY expires_at LIMIT $2"
    ))
    .bind(now)
    .bind(i64::from(limit))
    .fetch_all(&store.pool)
    .await
    .map_err(db_error)?;
    rows.iter().map(reservation_row).collect()
}

/// An admin's quota reset: under each meter's advisory lock (in ascending key order,
/// like a batch), so no consume that read the old counts commits after it.
pub(crate) async fn reset_counters(store: &PgStore, reset: CounterReset) -> Result<u64, StoreError> {
    let mut tx = store.pool.begin().await.map_err(db_error)?;
    let mut locks: Vec<i64> = reset.counters.iter().map(|(meter, _)| counters_lock_key(reset.account, meter)).collect();
    locks.sort_unstable();
    locks.dedup();
    for lock in locks {
        sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(lock).execute(&mut *tx).await.map_err(db_error)?;
    }
    let mut deleted = 0;
    for (meter, keys) in &reset.counters {
        deleted +=
            sqlx::query("DELETE FROM usage_counters WHERE account_id = $1 AND meter = $2 AND window_key = ANY($3)")
                .bind(reset.account.0)
                .bind(meter)
                .bind(keys)
                .execute(&mut *tx)
                .await
                .map_err(db_error)?
                .rows_affected();
    }
    insert_audit(&mut tx, &reset.audit.meta("rows_deleted", deleted)).await?;
    tx.commit().await.map_err(db_error)?;
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use tollgate_core::Store;
    use tollgate_core::plans::Catalog;

    use crate::PgStore;
    use crate::testing::TestDatabase;

    /// Two instances starting together both apply the plans file: they take turns,
    /// so neither fails on the other's rows and exactly one reports the creations.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_catalog_applies_take_turns() {
        let Some(database) = TestDatabase::create().await else { return };
        let catalog = Catalog::builtin();
        let size = catalog.meters.len() + catalog.plans.len();
        let now = tollgate_core::conformance::t0();
        let start = std::sync::Arc::new(tokio::sync::Barrier::new(4));
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let store = PgStore::connect_with(database.options.clone()).await.unwrap();
            store.ping().await.unwrap();
            let (catalog, start) = (catalog.clone(), start.clone());
            tasks.push(tokio::spawn(async move {
                start.wait().await;
                let changes = store.apply_catalog(&catalog, now).await.unwrap();
                store.close().await;
                changes
            }));
        }
        let mut created = 0;
        for task in tasks {
            let changes = task.await.unwrap();
            assert!(changes.updated.is_empty() && changes.deleted.is_empty() && changes.archived.is_empty());
            assert_eq!(changes.created.len() + changes.unchanged.len(), size, "{changes:?}");
            assert!(changes.created.is_empty() || changes.unchanged.is_empty(), "{changes:?}");
            created += usize::from(!changes.created.is_empty());
        }
        assert_eq!(created, 1);
        let store = PgStore::connect_with(database.options.clone()).await.unwrap();
        assert_eq!(store.stored_catalog().await.unwrap(), Some(catalog));
        store.close().await;
        database.drop().await;
    }
}
