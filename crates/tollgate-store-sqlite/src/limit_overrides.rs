//! Per-account limit overrides: replaced whole with their audit event, read one
//! account at a time (admin) or all in force at once (each node's reload).

use sqlx::Row;
use sqlx::sqlite::SqliteRow;
use tollgate_core::audit::AuditEvent;
use tollgate_core::ids::AccountId;
use tollgate_core::metering::overrides::LimitOverrides;
use tollgate_core::{StoreError, Timestamp};
use uuid::Uuid;

use crate::rows::{from_micros, micros};
use crate::store::insert_audit;
use crate::{SqliteStore, db_error};

fn overrides(row: &SqliteRow) -> Result<LimitOverrides, StoreError> {
    let limits: String = row.try_get("limits").map_err(db_error)?;
    Ok(LimitOverrides {
        account_id: AccountId(row.try_get::<Uuid, _>("account_id").map_err(db_error)?),
        limits: serde_json::from_str(&limits).map_err(|e| StoreError::Internal(format!("stored limits: {e}")))?,
        reason: row.try_get("reason").map_err(db_error)?,
        expires_at: row.try_get::<Option<i64>, _>("expires_at").map_err(db_error)?.map(from_micros).transpose()?,
        set_by: row.try_get("set_by").map_err(db_error)?,
        updated_at: from_micros(row.try_get("updated_at").map_err(db_error)?)?,
    })
}

pub(crate) async fn set(
    store: &SqliteStore,
    account: AccountId,
    value: Option<LimitOverrides>,
    audit: AuditEvent,
) -> Result<(), StoreError> {
    let mut tx = store.writer.begin_with("BEGIN IMMEDIATE").await.map_err(db_error)?;
    let exists: Option<i64> = sqlx::query_scalar("SELECT 1 FROM accounts WHERE id = ?1")
        .bind(account.0)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_error)?;
    if exists.is_none() {
        return Err(StoreError::NotFound);
    }
    // What this replaces, read under the same lock, for the audit event.
    let previous = sqlx::query("SELECT * FROM limit_overrides WHERE account_id = ?1")
        .bind(account.0)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_error)?
        .as_ref()
        .map(overrides)
        .transpose()?;
    let audit = audit.meta("previous", previous.map(|p| serde_json::to_value(&p.limits).unwrap_or_default()));
    match value {
        None => {
            sqlx::query("DELETE FROM limit_overrides WHERE account_id = ?1")
                .bind(account.0)
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
        }
        Some(o) => {
            let limits = serde_json::to_string(&o.limits).map_err(|e| StoreError::Internal(e.to_string()))?;
            sqlx::query(
                "INSERT INTO limit_overrides (account_id, limits, reason, expires_at, set_by, updated_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
                 ON CONFLICT (account_id) DO UPDATE SET limits = excluded.limits, reason = excluded.reason, \
                 expires_at = excluded.expires_at, set_by = excluded.set_by, updated_at = excluded.updated_at",
            )
            .bind(account.0)
            .bind(limits)
            .bind(&o.reason)
            .bind(o.expires_at.map(micros))
            .bind(&o.set_by)
            .bind(micros(o.updated_at))
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        }
    }
    insert_audit(&mut tx, &audit).await?;
    tx.commit().await.map_err(db_error)
}

pub(crate) async fn of_account(store: &SqliteStore, account: AccountId) -> Result<Option<LimitOverrides>, StoreError> {
    let row = sqlx::query("SELECT * FROM limit_overrides WHERE account_id = ?1")
        .bind(account.0)
        .fetch_optional(&store.reader)
        .await
        .map_err(db_error)?;
    row.as_ref().map(overrides).transpose()
}

pub(crate) async fn in_force(store: &SqliteStore, now: Timestamp) -> Result<Vec<LimitOverrides>, StoreError> {
    let rows = sqlx::query("SELECT * FROM limit_overrides WHERE expires_at IS NULL OR expires_at > ?1")
        .bind(micros(now))
        .fetch_all(&store.reader)
        .await
        .map_err(db_error)?;
    rows.iter().map(overrides).collect()
}
