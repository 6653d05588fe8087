//! Impersonation: an admin acting as a user through a short-lived access token whose
//! `act` claim (RFC 8693) names the admin. Such a token is a user's token everywhere
//! except the admin API and password, email and second-factor changes (refused by
//! `Admin` and `CurrentUser::refuse_delegated`). What it changes is audited as
//! `Actor::Impersonator` (admin and user); on top of that every request it makes to
//! `/v1/me` and `/v1/billing` (checkout, portal) is recorded here, reads included,
//! with method, path and status.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use time::OffsetDateTime;
use tollgate_core::audit::{Actor, AuditEvent};
use tollgate_core::ids::UserId;

use crate::extract::origin_of;
use crate::state::AppState;

/// The longest an impersonation token (and its session) lives.
pub const MAX_TTL: Duration = Duration::from_secs(15 * 60);

/// Filled by `CurrentUser` when the request's token is an impersonation token, so the
/// layer below learns it without verifying the token a second time.
#[derive(Clone, Default)]
pub struct Slot(Arc<OnceLock<(UserId, UserId)>>);

impl Slot {
    pub fn fill(&self, admin: UserId, user: UserId) {
        let _ = self.0.set((admin, user));
    }
}

/// Records every request made with an impersonation token (after it is answered).
pub async fn record_requests(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let slot = Slot::default();
    request.extensions_mut().insert(slot.clone());
    let method = request.method().clone();
    // The path only: query strings can carry tokens.
    let path = request.uri().path().to_owned();
    let origin = origin_of(request.headers(), request.extensions());
    let response = next.run(request).await;
    if let Some((admin, user)) = slot.0.get().copied() {
        let event = AuditEvent::new(
            Actor::Impersonator { admin, user },
            "impersonation.request",
            &origin,
            OffsetDateTime::now_utc(),
        )
        .target_user(user)
        .meta("method", method.as_str())
        .meta("path", path)
        .meta("status", response.status().as_u16());
        if let Err(e) = state.store.record_audit(event).await {
            tracing::error!(error = %e, "recording an impersonated request failed");
        }
    }
    response
}
