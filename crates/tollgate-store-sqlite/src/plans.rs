//! One plan at a time, as the admin API changes them (the plans file is applied
//! whole by `usage::apply_catalog`), and Tollgate's own small settings.

use tollgate_core::audit::AuditEvent;
use tollgate_core::plans::Plan;
use tollgate_core::store::PlanRemoval;
use tollgate_core::{StoreError, Timestamp};

use crate::rows::micros;
use crate::store::insert_audit;
use crate::{SqliteStore, db_error};

pub(crate) async fn put(
    store: &SqliteStore,
    plan: &Plan,
    previous: Option<&Plan>,
    audit: AuditEvent,
    now: Timestamp,
) -> Result<(), StoreError> {
    let definition = serde_json::to_string(plan).map_err(|e| StoreError::Internal(e.to_string()))?;
    let archived_at = plan.archived.then(|| micros(now));
    let mut tx = store.writer.begin_with("BEGIN IMMEDIATE").await.map_err(db_error)?;
    let stored: Option<(String, Option<i64>)> =
        sqlx::query_as("SELECT definition, archived_at FROM plans WHERE key = ?1")
            .bind(&plan.key)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db_error)?;
    match (previous, stored) {
        (None, Some(_)) => return Err(StoreError::Conflict("plans_key")),
        (Some(_), None) => return Err(StoreError::NotFound),
        (Some(previous), Some((definition, archived_at))) => {
            let stored = serde_json::from_str::<Plan>(&definition).map_err(|e| StoreError::Internal(e.to_string()))?;
            if (Plan { archived: archived_at.is_some(), ..stored }) != *previous {
                return Err(StoreError::Conflict("plan_changed"));
            }
        }
        (None, None) => {}
    }
    // An archived plan keeps the time it was first archived.
    sqlx::query(
        "INSERT INTO plans (key, definition, archived_at, updated_at) VALUES (?1, ?2, ?3, ?4) \
         ON CONFLICT (key) DO UPDATE SET definition = excluded.definition, updated_at = excluded.updated_at, \
         archived_at = CASE WHEN excluded.archived_at IS NULL THEN NULL \
         ELSE COALESCE(plans.archived_at, excluded.archived_at) END",
    )
    .bind(&plan.key)
    .bind(definition)
    .bind(archived_at)
    .bind(micros(now))
    .execute(&mut *tx)
    .await
    .map_err(db_error)?;
    insert_audit(&mut tx, &audit).await?;
    tx.commit().await.map_err(db_error)
}

pub(crate) async fn remove(
    store: &SqliteStore,
    key: &str,
    audit: AuditEvent,
    now: Timestamp,
) -> Result<PlanRemoval, StoreError> {
    let mut tx = store.writer.begin_with("BEGIN IMMEDIATE").await.map_err(db_error)?;
    let exists: Option<i64> = sqlx::query_scalar("SELECT 1 FROM plans WHERE key = ?1")
        .bind(key)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_error)?;
    if exists.is_none() {
        return Err(StoreError::NotFound);
    }
    let in_use: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM subscriptions WHERE plan_key = ?1 OR scheduled_plan = ?1)")
            .bind(key)
            .fetch_one(&mut *tx)
            .await
            .map_err(db_error)?;
    let outcome = if in_use {
        sqlx::query("UPDATE plans SET archived_at = COALESCE(archived_at, ?2), updated_at = ?2 WHERE key = ?1")
            .bind(key)
            .bind(micros(now))
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        PlanRemoval::Archived
    } else {
        sqlx::query("DELETE FROM plans WHERE key = ?1").bind(key).execute(&mut *tx).await.map_err(db_error)?;
        PlanRemoval::Deleted
    };
    insert_audit(&mut tx, &audit.meta("outcome", outcome.as_str())).await?;
    tx.commit().await.map_err(db_error)?;
    Ok(outcome)
}

pub(crate) async fn setting(store: &SqliteStore, key: &str) -> Result<Option<String>, StoreError> {
    sqlx::query_scalar("SELECT value FROM settings WHERE key = ?1")
        .bind(key)
        .fetch_optional(&store.reader)
        .await
        .map_err(db_error)
}

pub(crate) async fn put_setting(store: &SqliteStore, key: &str, value: &str, now: Timestamp) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO settings (key, value, updated_at) VALUES (?1, ?2, ?3) \
         ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
    )
    .bind(key)
    .bind(value)
    .bind(micros(now))
    .execute(&store.writer)
    .await
    .map_err(db_error)?;
    Ok(())
}
