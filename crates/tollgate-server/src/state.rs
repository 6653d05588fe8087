//! What every handler can reach. Handlers are not generic over the backend: the
//! store is an `Arc<dyn Store>` chosen once at start.

use std::sync::Arc;

use tollgate_core::Store;
use tollgate_core::identity::Identity;
use tollgate_core::metering::quotas::Quotas;

use crate::access_token::AccessTokens;
use crate::catalog::SharedCatalog;
use crate::config::Config;
use crate::rate_limit::Limiter;
use crate::service_key::KeyCache;

/// Cloned into every request's extractors, so it is one `Arc` (cloning the fields
/// one by one showed up in profiles).
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    pub fn new(shared: Shared) -> Self {
        Self(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

pub struct Shared {
    pub store: Arc<dyn Store>,
    pub identity: Identity,
    pub tokens: Arc<AccessTokens>,
    pub limiter: Limiter,
    pub catalog: SharedCatalog,
    pub quotas: Quotas,
    pub service_keys: Arc<KeyCache>,
    pub api_keys: Arc<crate::api_key::ApiKeyCache>,
    pub billing: crate::billing::Billing,
    pub config: Arc<Config>,
    /// When this process started serving (the health page's uptime).
    pub started_at: std::time::Instant,
}
