//! One plan at a time, as the admin API changes them (the plans file is applied
//! whole by `usage::apply_catalog`), and Tollgate's own small settings.

use sqlx::types::Json;
use tollgate_core::audit::AuditEvent;
use tollgate_core::plans::Plan;
use tollgate_core::store::PlanRemoval;
use tollgate_core::{StoreError, Timestamp};

use crate::store::insert_audit;
use crate::{PgStore, db_error};

pub(crate) async fn put(
    store: &PgStore,
    plan: &Plan,
    previous: Option<&Plan>,
    audit: AuditEvent,
    now: Timestamp,
) -> Result<(), StoreError> {
    let archived_at = plan.archived.then_some(now);
    let mut tx = store.pool.begin().await.map_err(db_error)?;
    match previous {
        None => {
            let inserted = sqlx::query(
                "INSERT INTO plans (key, definition, archived_at, updated_at) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (key) DO NOTHING",
            )
            .bind(&plan.key)
            .bind(Json(plan))
            .bind(archived_at)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
            if inserted.rows_affected() == 0 {
                return Err(StoreError::Conflict("plans_key"));
            }
        }
        Some(previous) => {
            let stored: Option<(Json<Plan>, Option<Timestamp>)> =
                sqlx::query_as("SELECT definition, archived_at FROM plans WHERE key = $1 FOR UPDATE")
                    .bind(&plan.key)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(db_error)?;
            let Some((Json(stored), stored_archived_at)) = stored else { return Err(StoreError::NotFound) };
            if (Plan { archived: stored_archived_at.is_some(), ..stored }) != *previous {
                return Err(StoreError::Conflict("plan_changed"));
            }
            // An archived plan keeps the time it was first archived.
            sqlx::query(
                "UPDATE plans SET definition = $2, updated_at = $4, \
                 archived_at = CASE WHEN $3::timestamptz IS NULL THEN NULL ELSE COALESCE(archived_at, $3) END \
                 WHERE key = $1",
            )
            .bind(&plan.key)
            .bind(Json(plan))
            .bind(archived_at)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        }
    }
    insert_audit(&mut tx, &audit).await?;
    tx.commit().await.map_err(db_error)
}

pub(crate) async fn remove(
    store: &PgStore,
    key: &str,
    audit: AuditEvent,
    now: Timestamp,
) -> Result<PlanRemoval, StoreError> {
    let mut tx = store.pool.begin().await.map_err(db_error)?;
    let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM plans WHERE key = $1 FOR UPDATE")
        .bind(key)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_error)?;
    if exists.is_none() {
        return Err(StoreError::NotFound);
    }
    // No subscription may move onto the plan while deciding (as in `apply_catalog`).
    sqlx::query("LOCK TABLE subscriptions IN SHARE MODE").execute(&mut *tx).await.map_err(db_error)?;
    let in_use: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM subscriptions WHERE plan_key = $1 OR scheduled_plan = $1)")
            .bind(key)
            .fetch_one(&mut *tx)
            .await
            .map_err(db_error)?;
    let outcome = if in_use {
        sqlx::query("UPDATE plans SET archived_at = COALESCE(archived_at, $2), updated_at = $2 WHERE key = $1")
            .bind(key)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        PlanRemoval::Archived
    } else {
        sqlx::query("DELETE FROM plans WHERE key = $1").bind(key).execute(&mut *tx).await.map_err(db_error)?;
        PlanRemoval::Deleted
    };
    insert_audit(&mut tx, &audit.meta("outcome", outcome.as_str())).await?;
    tx.commit().await.map_err(db_error)?;
    Ok(outcome)
}

pub(crate) async fn setting(store: &PgStore, key: &str) -> Result<Option<String>, StoreError> {
    sqlx::query_scalar("SELECT value FROM settings WHERE key = $1")
        .bind(key)
        .fetch_optional(&store.pool)
        .await
        .map_err(db_error)
}

pub(crate) async fn put_setting(store: &PgStore, key: &str, value: &str, now: Timestamp) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO settings (key, value, updated_at) VALUES ($1, $2, $3) \
         ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
    )
    .bind(key)
    .bind(value)
    .bind(now)
    .execute(&store.pool)
    .await
    .map_err(db_error)?;
    Ok(())
}
