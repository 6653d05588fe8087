//! `/v1/admin/system/*`: how the platform itself is doing (database, rate-limit
//! backend, email and webhook backlogs, version, uptime) and retention cleanup.

use std::time::Instant;

use axum::Json;
use axum::extract::State;
use serde::Serialize;
use time::{Duration, OffsetDateTime};
use tollgate_core::audit::{AuditEvent, Severity};
use tollgate_core::system::{Backlogs, CleanupReport, Retention};
use utoipa::ToSchema;

use super::views::ErrorResponse;
use crate::error::{ApiError, ApiResult};
use crate::extract::{Admin, Origin};
use crate::state::AppState;

#[derive(Serialize, ToSchema)]
pub struct Component {
    /// `ok` or `down`; for email `ok` (outbox empty), `backlog` (emails waiting to
    /// be sent or retried) or `unknown` (the database did not answer).
    pub status: &'static str,
    /// `sqlite` / `postgres`, `memory` / `redis`, `smtp` / `log`.
    pub backend: &'static str,
    /// How long the check's round trip took.
    pub latency_ms: Option<f64>,
    /// Why it is down (never a secret: no URL, no password).
    pub error: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct SystemHealth {
    /// `ok` when every configured part answers, else `degraded`.
    pub status: &'static str,
    pub version: &'static str,
    pub uptime_seconds: u64,
    pub database: Component,
    pub rate_limits: Component,
    pub email: Component,
    /// Outbox, webhook and reservation backlogs; absent when the database is down.
    #[schema(value_type = Option<Object>)]
    pub backlogs: Option<Backlogs>,
}

fn component(backend: &'static str, started: Instant, result: Result<(), String>) -> Component {
    let latency_ms = Some(started.elapsed().as_secs_f64() * 1000.0);
    match result {
        Ok(()) => Component { status: "ok", backend, latency_ms, error: None },
        Err(error) => Component { status: "down", backend, latency_ms, error: Some(error) },
    }
}

/// Each part of the platform and whether it answers. Always 200 when the admin is
/// authenticated: a part that is down is reported, not raised.
#[utoipa::path(get, path = "/v1/admin/system/health", tag = "admin", security(("bearer" = [])),
    responses(
        (status = 200, description = "Health of each part", body = SystemHealth),
        (status = 401, description = "`unauthenticated`", body = ErrorResponse),
        (status = 403, description = "Not an admin", body = ErrorResponse),
    ))]
pub async fn health(State(state): State<AppState>, _admin: Admin) -> Json<SystemHealth> {
    let started = Instant::now();
    let db = state.store.ping().await.map_err(|e| e.to_string());
    let database_backend = if state.config.database_url.starts_with("sqlite:") { "sqlite" } else { "postgres" };
    let database = component(database_backend, started, db);
    let started = Instant::now();
    let rate_limits =
        component(state.limiter.backend_name(), started, state.limiter.ping().await.map_err(|e| e.to_string()));
    let backlogs =
        if database.status == "ok" { state.store.backlogs(OffsetDateTime::now_utc()).await.ok() } else { None };
    // No SMTP round trip here: the mailer retries each email from the outbox, so
    // what says sending works is that the outbox drains.
    let email = Component {
        status: match &backlogs {
            Some(b) if b.emails_pending == 0 => "ok",
            Some(_) => "backlog",
            None => "unknown",
        },
        backend: if state.config.smtp.is_some() { "smtp" } else { "log" },
        latency_ms: None,
        error: None,
    };
    let all_ok = database.status == "ok" && rate_limits.status == "ok" && backlogs.is_some();
    Json(SystemHealth {
        status: if all_ok { "ok" } else { "degraded" },
        version: env!("CARGO_PKG_VERSION"),
        uptime_seconds: state.started_at.elapsed().as_secs(),
        database,
        rate_limits,
        email,
        backlogs,
    })
}

#[derive(Serialize, ToSchema)]
pub struct CleanupDone {
    /// Rows deleted, by kind.
    #[schema(value_type = Object)]
    pub deleted: CleanupReport,
    /// The cutoffs applied (from `retention` in the configuration).
    #[serde(with = "time::serde::rfc3339")]
    pub usage_events_before: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub audit_before: OffsetDateTime,
}

/// Retention: deletes usage events and audit events older than the configured days
/// (`retention.usage_events_days`, `retention.audit_days`), used or expired links,
/// expired sessions and old settled reservations; reports the counts. Daily usage
/// rollups, counters, the ledger and payments are kept.
#[utoipa::path(post, path = "/v1/admin/system/cleanup", tag = "admin", security(("bearer" = [])),
    responses(
        (status = 200, description = "What was deleted", body = CleanupDone),
        (status = 401, description = "`unauthenticated`", body = ErrorResponse),
        (status = 403, description = "Not an admin, or `insufficient_scope` (needs admin:write)", body = ErrorResponse),
    ))]
pub async fn cleanup(
    State(state): State<AppState>,
    admin: Admin,
    Origin(origin): Origin,
) -> ApiResult<Json<CleanupDone>> {
    let now = OffsetDateTime::now_utc();
    let retention = Retention {
        usage_events_before: now - Duration::days(i64::from(state.config.retention.usage_events_days)),
        audit_before: now - Duration::days(i64::from(state.config.retention.audit_days)),
        now,
    };
    let audit = AuditEvent::new(admin.actor(), "admin.system.cleanup", &origin, now)
        .severity(Severity::Warning)
        .meta("usage_events_days", state.config.retention.usage_events_days)
        .meta("audit_days", state.config.retention.audit_days);
    let deleted = state.store.cleanup(retention, audit).await.map_err(ApiError::from)?;
    Ok(Json(CleanupDone {
        deleted,
        usage_events_before: retention.usage_events_before,
        audit_before: retention.audit_before,
    }))
}
