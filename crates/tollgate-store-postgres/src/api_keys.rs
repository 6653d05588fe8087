//! An account's API keys: created (at most `MAX_PER_ACCOUNT` live), found by digest,
//! listed, revoked, touched.

use sqlx::postgres::PgRow;
use tollgate_core::api_keys::{ApiKey, ApiKeyScope, MAX_PER_ACCOUNT};
use tollgate_core::audit::AuditEvent;
use tollgate_core::identity::TokenDigest;
use tollgate_core::ids::{AccountId, ApiKeyId};
use tollgate_core::{StoreError, Timestamp};
use uuid::Uuid;

use crate::rows::get;
use crate::store::insert_audit;
use crate::{PgStore, db_error};

/// Literal SQL only (sqlx refuses built strings): the column list as a macro.
macro_rules! columns {
    () => {
        "id, account_id, name, prefix, scopes, created_at, expires_at, last_used_at, revoked_at"
    };
}

fn api_key(row: &PgRow) -> Result<ApiKey, StoreError> {
    let scopes: Vec<String> = get(row, "scopes")?;
    Ok(ApiKey {
        id: ApiKeyId(get::<Uuid>(row, "id")?),
        account_id: AccountId(get::<Uuid>(row, "account_id")?),
        name: get(row, "name")?,
        prefix: get(row, "prefix")?,
        scopes: scopes.iter().filter_map(|s| ApiKeyScope::parse(s)).collect(),
        created_at: get(row, "created_at")?,
        expires_at: get(row, "expires_at")?,
        last_used_at: get(row, "last_used_at")?,
        revoked_at: get(row, "revoked_at")?,
    })
}

pub(crate) async fn create(
    store: &PgStore,
    key: ApiKey,
    digest: TokenDigest,
    audit: AuditEvent,
) -> Result<(), StoreError> {
    let mut tx = store.pool.begin().await.map_err(db_error)?;
    // The account's row lock serialises concurrent creations, so the limit holds.
    let exists: Option<Uuid> = sqlx::query_scalar("SELECT id FROM accounts WHERE id = $1 FOR UPDATE")
        .bind(key.account_id.0)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_error)?;
    if exists.is_none() {
        return Err(StoreError::NotFound);
    }
    let live: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM api_keys WHERE account_id = $1 AND revoked_at IS NULL \
         AND (expires_at IS NULL OR expires_at > $2)",
    )
    .bind(key.account_id.0)
    .bind(key.created_at)
    .fetch_one(&mut *tx)
    .await
    .map_err(db_error)?;
    if live as usize >= MAX_PER_ACCOUNT {
        return Err(StoreError::Conflict("api_keys_limit"));
    }
    let scopes: Vec<&str> = key.scopes.iter().map(|s| s.as_str()).collect();
    sqlx::query(
        "INSERT INTO api_keys (id, account_id, name, prefix, digest, scopes, created_at, expires_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(key.id.0)
    .bind(key.account_id.0)
    .bind(&key.name)
    .bind(&key.prefix)
    .bind(&digest.0)
    .bind(&scopes)
    .bind(key.created_at)
    .bind(key.expires_at)
    .execute(&mut *tx)
    .await
    .map_err(db_error)?;
    insert_audit(&mut tx, &audit).await?;
    tx.commit().await.map_err(db_error)
}

pub(crate) async fn by_digest(store: &PgStore, digest: &TokenDigest) -> Result<Option<ApiKey>, StoreError> {
    sqlx::query(concat!("SELECT ", columns!(), " FROM api_keys WHERE digest = $1"))
        .bind(&digest.0)
        .fetch_optional(&store.pool)
        .await
        .map_err(db_error)?
        .map(|row| api_key(&row))
        .transpose()
}

pub(crate) async fn list(store: &PgStore, account: AccountId) -> Result<Vec<ApiKey>, StoreError> {
    sqlx::query(concat!(
        "SELECT ",
        columns!(),
        " FROM api_keys WHERE account_id = $1 AND revoked_at IS NULL ORDER BY created_at DESC, id DESC"
    ))
    .bind(account.0)
    .fetch_all(&store.pool)
    .await
    .map_err(db_error)?
    .iter()
    .map(api_key)
    .collect()
}

pub(crate) async fn revoke(
    store: &PgStore,
    account: AccountId,
    id: ApiKeyId,
    audit: AuditEvent,
) -> Result<ApiKey, StoreError> {
    let mut tx = store.pool.begin().await.map_err(db_error)?;
    let row = sqlx::query(concat!(
        "UPDATE api_keys SET revoked_at = $3 WHERE id = $1 AND account_id = $2 AND revoked_at IS NULL RETURNING ",
        columns!()
    ))
    .bind(id.0)
    .bind(account.0)
    .bind(audit.created_at)
    .fetch_optional(&mut *tx)
    .await
    .map_err(db_error)?
    .ok_or(StoreError::NotFound)?;
    let key = api_key(&row)?;
    insert_audit(&mut tx, &audit).await?;
    tx.commit().await.map_err(db_error)?;
    Ok(key)
}

pub(crate) async fn touch(store: &PgStore, id: ApiKeyId, at: Timestamp) -> Result<(), StoreError> {
    sqlx::query("UPDATE api_keys SET last_used_at = $2 WHERE id = $1 AND (last_used_at IS NULL OR last_used_at < $2)")
        .bind(id.0)
        .bind(at)
        .execute(&store.pool)
        .await
        .map_err(db_error)?;
    Ok(())
}
