//! The admin side's user queries and changes: a filtered, keyset-paginated list with
//! its total, and an admin's change to a user with its audit event.

use sqlx::sqlite::Sqlite;
use sqlx::{QueryBuilder, Row};
use tollgate_core::StoreError;
use tollgate_core::admin::{SortValue, UserChange, UserPage, UserQuery, UserSortField};
use tollgate_core::audit::AuditEvent;
use tollgate_core::identity::{EmailAddress, NewSession, Role, Session, User, UserStatus};
use tollgate_core::ids::UserId;

use crate::rows::{self, micros};
use crate::store::{end_outstanding_links, fetch_session, fetch_user, insert_audit, revoke_all};
use crate::{SqliteStore, db_error};

const LIVE_SUBSCRIPTION: &str = "SELECT 1 FROM subscriptions s WHERE s.account_id = users.account_id \
     AND s.status IN ('trialing', 'active', 'past_due')";

/// The `WHERE` clause of a user query, without its cursor (the total counts it all).
fn push_filters(sql: &mut QueryBuilder<Sqlite>, query: &UserQuery) {
    match query.status {
        Some(status) => sql.push(" WHERE status = ").push_bind(status.as_str()),
        None => sql.push(" WHERE status <> 'deleted'"),
    };
    if let Some(role) = query.role {
        sql.push(" AND role = ").push_bind(role.as_str());
    }
    if let Some(q) = &query.q {
        // instr, not LIKE: no wildcard escaping to get wrong. Emails are stored
        // lower-cased; names are compared lower-cased.
        sql.push(" AND (instr(email, ").push_bind(q.clone());
        sql.push(") > 0 OR instr(lower(COALESCE(name, '')), ").push_bind(q.clone()).push(") > 0");
        if let Some(prefix) = query.id_prefix() {
            sql.push(" OR substr(lower(hex(id)), 1, ").push_bind(prefix.len() as i64);
            sql.push(") = ").push_bind(prefix);
        }
        sql.push(")");
    }
    if let Some(plan) = &query.plan {
        sql.push(" AND (EXISTS (").push(LIVE_SUBSCRIPTION).push(" AND s.plan_key = ").push_bind(plan.key.clone());
        sql.push(")");
        if plan.is_default {
            sql.push(" OR NOT EXISTS (").push(LIVE_SUBSCRIPTION).push(")");
        }
        sql.push(")");
    }
    if let Some(after) = query.created_after {
        sql.push(" AND created_at >= ").push_bind(micros(after));
    }
    if let Some(before) = query.created_before {
        sql.push(" AND created_at < ").push_bind(micros(before));
    }
}

pub(crate) async fn users(store: &SqliteStore, query: UserQuery) -> Result<UserPage, StoreError> {
    let sort_expr = match query.sort.field {
        UserSortField::Created => "created_at",
        UserSortField::LastLogin => "COALESCE(last_login_at, 0)",
        UserSortField::Email => "email",
    };
    let direction = if query.sort.descending { "DESC" } else { "ASC" };
    // One read transaction: the page and its total see the same snapshot.
    let mut tx = store.reader.begin().await.map_err(db_error)?;
    let mut count: QueryBuilder<Sqlite> = QueryBuilder::new("SELECT COUNT(*) AS n FROM users");
    push_filters(&mut count, &query);
    let total: i64 = count.build().fetch_one(&mut *tx).await.map_err(db_error)?.try_get("n").map_err(db_error)?;

    let mut sql: QueryBuilder<Sqlite> = QueryBuilder::new(concat!("SELECT ", rows::user_columns!(), " FROM users"));
    push_filters(&mut sql, &query);
    if let Some(cursor) = &query.after {
        let op = if query.sort.descending { "<" } else { ">" };
        sql.push(format_args!(" AND ({sort_expr}, id) {op} ("));
        match &cursor.value {
            SortValue::Micros(v) => sql.push_bind(*v),
            SortValue::Text(v) => sql.push_bind(v.clone()),
        };
        sql.push(", ").push_bind(cursor.id.0).push(")");
    }
    sql.push(format_args!(" ORDER BY {sort_expr} {direction}, id {direction} LIMIT "));
    sql.push_bind(i64::from(query.page_size()) + 1);
    let found = sql.build().fetch_all(&mut *tx).await.map_err(db_error)?;
    let users = found.iter().map(rows::user).collect::<Result<Vec<_>, _>>()?;
    tx.commit().await.map_err(db_error)?;
    Ok(UserPage::from_rows(users, total as u64, &query))
}

pub(crate) async fn update_user(
    store: &SqliteStore,
    id: UserId,
    change: UserChange,
    audit: AuditEvent,
) -> Result<User, StoreError> {
    let now = audit.created_at;
    let mut tx = store.writer.begin_with("BEGIN IMMEDIATE").await.map_err(db_error)?;
    let before =
        fetch_user(&mut tx, id).await?.filter(|u| u.status != UserStatus::Deleted).ok_or(StoreError::NotFound)?;
    sqlx::query(
        "UPDATE users SET status = COALESCE(?2, status), role = COALESCE(?3, role), \
         name = CASE WHEN ?4 THEN ?5 ELSE name END, email = COALESCE(?6, email), updated_at = ?7 WHERE id = ?1",
    )
    .bind(id.0)
    .bind(change.status.map(UserStatus::as_str))
    .bind(change.role.map(Role::as_str))
    .bind(change.name.is_some())
    .bind(change.name.clone().flatten())
    .bind(change.email.as_ref().map(EmailAddress::as_str))
    .bind(micros(now))
    .execute(&mut *tx)
    .await
    .map_err(db_error)?;
    let email_changed = change.email.as_ref().is_some_and(|e| *e != before.email);
    if change.ends_sessions() {
        revoke_all(&mut tx, id, None, now).await?;
    }
    if change.ends_sessions() || email_changed {
        end_outstanding_links(&mut tx, id, now).await?;
    }
    let mut audit = audit;
    if audit.target_id.is_none() {
        audit = audit.target_user(id);
    }
    insert_audit(&mut tx, &audit).await?;
    let after = fetch_user(&mut tx, id).await?.ok_or(StoreError::NotFound)?;
    tx.commit().await.map_err(db_error)?;
    Ok(after)
}

pub(crate) async fn start_impersonation(
    store: &SqliteStore,
    s: NewSession,
    audit: AuditEvent,
) -> Result<Session, StoreError> {
    let mut tx = store.writer.begin_with("BEGIN IMMEDIATE").await.map_err(db_error)?;
    fetch_user(&mut tx, s.user_id).await?.filter(|u| u.status == UserStatus::Active).ok_or(StoreError::NotFound)?;
    sqlx::query(
        "INSERT INTO sessions (id, user_id, ip, user_agent, created_at, last_seen_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6)",
    )
    .bind(s.id.0)
    .bind(s.user_id.0)
    .bind(&s.ip)
    .bind(&s.user_agent)
    .bind(micros(s.created_at))
    .bind(micros(s.expires_at))
    .execute(&mut *tx)
    .await
    .map_err(db_error)?;
    let mut audit = audit;
    if audit.target_id.is_none() {
        audit = audit.target_user(s.user_id);
    }
    insert_audit(&mut tx, &audit).await?;
    let session = fetch_session(&mut tx, s.id).await?.ok_or(StoreError::NotFound)?;
    tx.commit().await.map_err(db_error)?;
    Ok(session)
}
