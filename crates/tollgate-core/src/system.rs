//! The platform's own upkeep: what the admin's health page counts, and retention
//! (which old rows a cleanup deletes, and what it reports).

use serde::Serialize;

use crate::Timestamp;

/// Backlogs the health page shows, counted by the store.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Backlogs {
    /// Emails in the outbox not yet delivered (pending or retrying).
    pub emails_pending: u64,
    /// Provider refunds received before their payment, waiting for it.
    pub refunds_waiting_for_payment: u64,
    /// Provider events (webhooks) received in the last 24 hours.
    pub webhook_events_last_24h: u64,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_webhook_event_at: Option<Timestamp>,
    /// Reservations whose time ran out and that the expiry task has not released yet.
    pub expired_reservations_pending: u64,
}

/// What a retention cleanup deletes: usage events and audit events older than their
/// cutoffs; one-time tokens used or expired; sessions (and their refresh tokens)
/// expired; reservations settled (committed, released, expired) before the usage
/// cutoff. Daily rollups, counters, the ledger and payments are never deleted.
#[derive(Clone, Copy, Debug)]
pub struct Retention {
    pub usage_events_before: Timestamp,
    pub audit_before: Timestamp,
    pub now: Timestamp,
}

/// How many rows a cleanup deleted, by kind.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CleanupReport {
    pub usage_events: u64,
    pub audit_events: u64,
    pub one_time_tokens: u64,
    pub sessions: u64,
    pub refresh_tokens: u64,
    pub reservations: u64,
    /// Accounts' limit overrides past their expiry (the audit log keeps their history).
    pub limit_overrides: u64,
}
