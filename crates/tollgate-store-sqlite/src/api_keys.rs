//! An account's API keys: created (at most `MAX_PER_ACCOUNT` live), found by digest,
//! listed, revoked, touched.

use sqlx::Row;
use sqlx::sqlite::SqliteRow;
use tollgate_core::api_keys::{ApiKey, ApiKeyScope, MAX_PER_ACCOUNT};
use tollgate_core::audit::AuditEvent;
use tollgate_core::identity::TokenDigest;
use tollgate_core::ids::{AccountId, ApiKeyId};
use tollgate_core::{StoreError, Timestamp};
use uuid::Uuid;

use crate::rows::{from_micros, micros};
use crate::store::insert_audit;
use crate::{SqliteStore, db_error};

/// Literal SQL only (sqlx refuses built strings): the column list as a macro.
macro_rules! columns {
    () => {
        "id, account_id, name, prefix, scopes, created_at, expires_at, last_used_at, revoked_at"
    };
}

fn api_key(row: &SqliteRow) -> Result<ApiKey, StoreError> {
    let scopes: String = row.try_get("scopes").map_err(db_error)?;
    let time = |column: &str| -> Result<Option<Timestamp>, StoreError> {
        row.try_get::<Option<i64>, _>(column).map_err(db_error)?.map(from_micros).transpose()
    };
    Ok(ApiKey {
        id: ApiKeyId(row.try_get::<Uuid, _>("id").map_err(db_error)?),
        account_id: AccountId(row.try_get::<Uuid, _>("account_id").map_err(db_error)?),
        name: row.try_get("name").map_err(db_error)?,
        prefix: row.try_get("prefix").map_err(db_error)?,
        scopes: scopes.split_whitespace().filter_map(ApiKeyScope::parse).collect(),
        created_at: from_micros(row.try_get("created_at").map_err(db_error)?)?,
        expires_at: time("expires_at")?,
        last_used_at: time("last_used_at")?,
        revoked_at: time("revoked_at")?,
    })
}

pub(crate) async fn create(
    store: &SqliteStore,
    key: ApiKey,
    digest: TokenDigest,
    audit: AuditEvent,
) -> Result<(), StoreError> {
    let mut tx = store.writer.begin_with("BEGIN IMMEDIATE").await.map_err(db_error)?;
    let live: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM api_keys WHERE account_id = ?1 AND revoked_at IS NULL \
         AND (expires_at IS NULL OR expires_at > ?2)",
    )
    .bind(key.account_id.0)
    .bind(micros(key.created_at))
    .fetch_one(&mut *tx)
    .await
    .map_err(db_error)?;
    if live as usize >= MAX_PER_ACCOUNT {
        return Err(StoreError::Conflict("api_keys_limit"));
    }
    let scopes: Vec<&str> = key.scopes.iter().map(|s| s.as_str()).collect();
    sqlx::query(
        "INSERT INTO api_keys (id, account_id, name, prefix, digest, scopes, created_at, expires_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )
    .bind(key.id.0)
    .bind(key.account_id.0)
    .bind(&key.name)
    .bind(&key.prefix)
    .bind(&digest.0)
    .bind(scopes.join(" "))
    .bind(micros(key.created_at))
    .bind(key.expires_at.map(micros))
    .execute(&mut *tx)
    .await
    .map_err(db_error)?;
    insert_audit(&mut tx, &audit).await?;
    tx.commit().await.map_err(db_error)
}

pub(crate) async fn by_digest(store: &SqliteStore, digest: &TokenDigest) -> Result<Option<ApiKey>, StoreError> {
    sqlx::query(concat!("SELECT ", columns!(), " FROM api_keys WHERE digest = ?1"))
        .bind(&digest.0)
        .fetch_optional(&store.reader)
        .await
        .map_err(db_error)?
        .map(|row| api_key(&row))
        .transpose()
}

pub(crate) async fn list(store: &SqliteStore, account: AccountId) -> Result<Vec<ApiKey>, StoreError> {
    sqlx::query(concat!(
        "SELECT ",
        columns!(),
        " FROM api_keys WHERE account_id = ?1 AND revoked_at IS NULL ORDER BY created_at DESC, id DESC"
    ))
    .bind(account.0)
    .fetch_all(&store.reader)
    .await
    .map_err(db_error)?
    .iter()
    .map(api_key)
    .collect()
}

pub(crate) async fn revoke(
    store: &SqliteStore,
    account: AccountId,
    id: ApiKeyId,
    audit: AuditEvent,
) -> Result<ApiKey, StoreError> {
    let mut tx = store.writer.begin_with("BEGIN IMMEDIATE").await.map_err(db_error)?;
    let row = sqlx::query(concat!(
        "UPDATE api_keys SET revoked_at = ?3 WHERE id = ?1 AND account_id = ?2 AND revoked_at IS NULL RETURNING ",
        columns!()
    ))
    .bind(id.0)
    .bind(account.0)
    .bind(micros(audit.created_at))
    .fetch_optional(&mut *tx)
    .await
    .map_err(db_error)?
    .ok_or(StoreError::NotFound)?;
    let key = api_key(&row)?;
    insert_audit(&mut tx, &audit).await?;
    tx.commit().await.map_err(db_error)?;
    Ok(key)
}

pub(crate) async fn touch(store: &SqliteStore, id: ApiKeyId, at: Timestamp) -> Result<(), StoreError> {
    sqlx::query("UPDATE api_keys SET last_used_at = ?2 WHERE id = ?1 AND (last_used_at IS NULL OR last_used_at < ?2)")
        .bind(id.0)
        .bind(micros(at))
        .execute(&store.writer)
        .await
        .map_err(db_error)?;
    Ok(())
}
