//! Service keys: the secret with which a product's backend calls Tollgate
//! (`Authorization: Bearer tg_sk_...`). Shown once, stored as a SHA-256 digest.
//! Verified keys are cached for a short time so the hot path does not read the
//! database on every call; a revocation takes effect within that time.

use std::sync::Arc;

use axum::extract::{FromRef, FromRequestParts};
use axum::http::header;
use axum::http::request::Parts;
use time::OffsetDateTime;
use tollgate_core::Store;
use tollgate_core::accounts::{Scope, ServiceKey};
use tollgate_core::audit::{Actor, AuditEvent, RequestOrigin, Severity};
use tollgate_core::identity::{SecretToken, TokenDigest};
use tollgate_core::ids::ServiceKeyId;

use crate::digest_cache::DigestCache;
use crate::error::ApiError;
use crate::state::AppState;

pub const PREFIX: &str = "tg_sk_";

/// Creates a key; returns the secret, shown once.
pub async fn create(store: &Arc<dyn Store>, name: &str, scopes: Vec<Scope>) -> Result<(ServiceKey, String), ApiError> {
    let secret = format!("{PREFIX}{}", SecretToken::generate().expose());
    let now = OffsetDateTime::now_utc();
    let key = ServiceKey {
        id: ServiceKeyId::new(),
        name: name.to_owned(),
        prefix: secret[..PREFIX.len() + 6].to_owned(),
        scopes,
        created_at: now,
        revoked_at: None,
    };
    let audit = AuditEvent::new(Actor::System, "service_key.created", &RequestOrigin::default(), now)
        .severity(Severity::Warning)
        .meta("service_key_id", key.id.to_string())
        .meta("name", name)
        .meta("scopes", key.scopes.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    store.create_service_key(key.clone(), TokenDigest::of(&secret), audit).await?;
    Ok((key, secret))
}

/// Digest → key (or absence), for [`crate::digest_cache::TTL`].
#[derive(Default)]
pub struct KeyCache(DigestCache<ServiceKey>);

impl KeyCache {
    async fn lookup(&self, store: &Arc<dyn Store>, secret: &str) -> Result<Option<ServiceKey>, ApiError> {
        let digest = TokenDigest::of(secret);
        if let Some(key) = self.0.get(&digest.0) {
            return Ok(key);
        }
        let key = store.service_key_by_digest(&digest).await?;
        self.0.insert(digest.0, key.clone());
        Ok(key)
    }
}

/// A backend authenticated by a service key.
pub struct Service(pub ServiceKey);

impl Service {
    /// 403 unless the key has `scope` (or `admin:*`).
    pub fn require(&self, scope: Scope) -> Result<(), ApiError> {
        if self.0.allows(scope) { Ok(()) } else { Err(ApiError::MissingScope(scope.as_str())) }
    }
}

impl<S> FromRequestParts<S> for Service
where
    S: Send + Sync,
    AppState: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let state = AppState::from_ref(state);
        let secret = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|s| s.starts_with(PREFIX))
            .ok_or(ApiError::Unauthenticated)?;
        let key = state.service_keys.lookup(&state.store, secret).await?.ok_or(ApiError::Unauthenticated)?;
        if key.revoked_at.is_some() {
            return Err(ApiError::Unauthenticated);
        }
        Ok(Service(key))
    }
}
