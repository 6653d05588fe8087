//! Upkeep: the health page's backlogs and retention cleanup.

use tollgate_core::audit::AuditEvent;
use tollgate_core::system::{Backlogs, CleanupReport, Retention};
use tollgate_core::{StoreError, Timestamp};

use crate::store::insert_audit;
use crate::{PgStore, db_error};

pub(crate) async fn backlogs(store: &PgStore, now: Timestamp) -> Result<Backlogs, StoreError> {
    let (emails, refunds, webhooks, last, expired): (i64, i64, i64, Option<Timestamp>, i64) = sqlx::query_as(
        "SELECT (SELECT COUNT(*) FROM email_outbox WHERE status = 'pending'), \
                (SELECT COUNT(*) FROM pending_refunds), \
                (SELECT COUNT(*) FROM provider_events WHERE received_at >= $1), \
                (SELECT MAX(received_at) FROM provider_events), \
                (SELECT COUNT(*) FROM usage_reservations WHERE status = 'pending' AND expires_at <= $2)",
    )
    .bind(now - time::Duration::days(1))
    .bind(now)
    .fetch_one(&store.pool)
    .await
    .map_err(db_error)?;
    Ok(Backlogs {
        emails_pending: emails as u64,
        refunds_waiting_for_payment: refunds as u64,
        webhook_events_last_24h: webhooks as u64,
        last_webhook_event_at: last,
        expired_reservations_pending: expired as u64,
    })
}

pub(crate) async fn cleanup(
    store: &PgStore,
    retention: Retention,
    audit: AuditEvent,
) -> Result<CleanupReport, StoreError> {
    let mut tx = store.pool.begin().await.map_err(db_error)?;
    let mut run = async |sql: &'static str, at: Timestamp| -> Result<u64, StoreError> {
        Ok(sqlx::query(sql).bind(at).execute(&mut *tx).await.map_err(db_error)?.rows_affected())
    };
    let report = CleanupReport {
        usage_events: run("DELETE FROM usage_events WHERE created_at < $1", retention.usage_events_before).await?,
        audit_events: run("DELETE FROM audit_events WHERE created_at < $1", retention.audit_before).await?,
        one_time_tokens: run(
            "DELETE FROM one_time_tokens WHERE used_at IS NOT NULL OR expires_at <= $1",
            retention.now,
        )
        .await?,
        refresh_tokens: run(
            "DELETE FROM refresh_tokens WHERE session_id IN (SELECT id FROM sessions WHERE expires_at <= $1)",
            retention.now,
        )
        .await?,
        sessions: run("DELETE FROM sessions WHERE expires_at <= $1", retention.now).await?,
        reservations: run(
            "DELETE FROM usage_reservations WHERE status <> 'pending' AND settled_at < $1",
            retention.usage_events_before,
        )
        .await?,
        limit_overrides: run("DELETE FROM limit_overrides WHERE expires_at <= $1", retention.now).await?,
    };
    let audit = audit.meta("deleted", serde_json::to_value(&report).unwrap_or_default());
    insert_audit(&mut tx, &audit).await?;
    tx.commit().await.map_err(db_error)?;
    Ok(report)
}
