//! Verifying an account's API key (`Authorization: Bearer tg_live_...`) on the hot
//! path: digest, then a short-lived cache in front of the store, so a busy key costs
//! one SHA-256 and one map lookup. A revocation through this node drops the entry at
//! once; on other nodes it takes effect within [`crate::digest_cache::TTL`]. Whether the key's user
//! is still active is read on every request (see `CurrentUser`), so a suspension is
//! immediate everywhere. `last_used_at` is written at most once a minute per key.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tollgate_core::Store;
use tollgate_core::api_keys::{self, ApiKey};
use tollgate_core::ids::ApiKeyId;

use crate::digest_cache::DigestCache;
use crate::error::ApiError;

/// Keys whose last write is remembered before the map is trimmed.
const TOUCHED_MAX: usize = 10_000;
/// How stale `last_used_at` may get.
const TOUCH_EVERY: Duration = Duration::from_secs(60);

#[derive(Default)]
pub struct ApiKeyCache {
    /// By the raw SHA-256 of the secret; hex (the store's form) only on a miss.
    entries: DigestCache<ApiKey, [u8; 32]>,
    /// Key → when this node last wrote its `last_used_at`.
    touched: Mutex<HashMap<ApiKeyId, Instant>>,
}

impl ApiKeyCache {
    /// The key whose secret this is (revoked and expired ones too: callers check).
    pub async fn lookup(&self, store: &Arc<dyn Store>, secret: &str) -> Result<Option<ApiKey>, ApiError> {
        let sha256 = api_keys::sha256(secret);
        if let Some(key) = self.entries.get(&sha256) {
            return Ok(key);
        }
        let key = store.api_key_by_digest(&api_keys::digest_of_sha256(&sha256)).await?;
        self.entries.insert(sha256, key.clone());
        Ok(key)
    }

    /// Forgets a revoked key, so this node refuses it from the next request on.
    pub fn forget(&self, id: ApiKeyId) {
        self.entries.retain(|key| key.id != id);
    }

    /// Records a use: a background write when this node has not written one for the
    /// key in the last minute, nothing otherwise.
    pub fn used(&self, store: &Arc<dyn Store>, id: ApiKeyId) {
        {
            let mut touched = self.touched.lock().unwrap_or_else(|e| e.into_inner());
            if touched.get(&id).is_some_and(|at| at.elapsed() < TOUCH_EVERY) {
                return;
            }
            if touched.len() >= TOUCHED_MAX {
                touched.retain(|_, at| at.elapsed() < TOUCH_EVERY);
            }
            touched.insert(id, Instant::now());
        }
        let store = store.clone();
        tokio::spawn(async move {
            if let Err(e) = store.touch_api_key(id, OffsetDateTime::now_utc()).await {
                tracing::warn!(error = %e, api_key_id = %id, "recording an API key's use failed");
            }
        });
    }
}
