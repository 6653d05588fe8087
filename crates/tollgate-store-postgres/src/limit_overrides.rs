//! Per-account limit overrides: replaced whole with their audit event, read one
//! account at a time (admin) or all in force at once (each node's reload).

use sqlx::postgres::PgRow;
use sqlx::types::Json;
use tollgate_core::audit::AuditEvent;
use tollgate_core::ids::AccountId;
use tollgate_core::metering::overrides::LimitOverrides;
use tollgate_core::plans::Allowance;
use tollgate_core::{StoreError, Timestamp};
use uuid::Uuid;

use crate::rows::get;
use crate::store::insert_audit;
use crate::{PgStore, db_error};

type Limits = std::collections::BTreeMap<String, Allowance>;

fn overrides(row: &PgRow) -> Result<LimitOverrides, StoreError> {
    let Json(limits) = get::<Json<Limits>>(row, "limits")?;
    Ok(LimitOverrides {
        account_id: AccountId(get::<Uuid>(row, "account_id")?),
        limits,
        reason: get(row, "reason")?,
        expires_at: get(row, "expires_at")?,
        set_by: get(row, "set_by")?,
        updated_at: get(row, "updated_at")?,
    })
}

pub(crate) async fn set(
    store: &PgStore,
    account: AccountId,
    value: Option<LimitOverrides>,
    audit: AuditEvent,
) -> Result<(), StoreError> {
    let mut tx = store.pool.begin().await.map_err(db_error)?;
    // Locks the account row: two admins setting overrides at once apply in turn.
    let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE")
        .bind(account.0)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_error)?;
    if exists.is_none() {
        return Err(StoreError::NotFound);
    }
    // What this replaces, read under the same lock, for the audit event.
    let previous = sqlx::query("SELECT * FROM limit_overrides WHERE account_id = $1")
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
            sqlx::query("DELETE FROM limit_overrides WHERE account_id = $1")
                .bind(account.0)
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
        }
        Some(o) => {
            sqlx::query(
                "INSERT INTO limit_overrides (account_id, limits, reason, expires_at, set_by, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (account_id) DO UPDATE SET limits = excluded.limits, reason = excluded.reason, \
                 expires_at = excluded.expires_at, set_by = excluded.set_by, updated_at = excluded.updated_at",
            )
            .bind(account.0)
            .bind(Json(&o.limits))
            .bind(&o.reason)
            .bind(o.expires_at)
            .bind(&o.set_by)
            .bind(o.updated_at)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        }
    }
    insert_audit(&mut tx, &audit).await?;
    tx.commit().await.map_err(db_error)
}

pub(crate) async fn of_account(store: &PgStore, account: AccountId) -> Result<Option<LimitOverrides>, StoreError> {
    let row = sqlx::query("SELECT * FROM limit_overrides WHERE account_id = $1")
        .bind(account.0)
        .fetch_optional(&store.pool)
        .await
        .map_err(db_error)?;
    row.as_ref().map(overrides).transpose()
}

pub(crate) async fn in_force(store: &PgStore, now: Timestamp) -> Result<Vec<LimitOverrides>, StoreError> {
    let rows = sqlx::query("SELECT * FROM limit_overrides WHERE expires_at IS NULL OR expires_at > $1")
        .bind(now)
        .fetch_all(&store.pool)
        .await
        .map_err(db_error)?;
    rows.iter().map(overrides).collect()
}
