//! Rate limiting: GCRA state behind one interface with two backends — in memory (the
//! embedded default, one node) and Redis (shared by every node; `TOLLGATE_REDIS_URL`).
//! The arithmetic is `tollgate_core::ratelimit::gcra` in both; a backend only keeps the
//! one timestamp per key.
//!
//! [`Limiter`] is what the rest of the server uses: it applies the failure policy
//! (fail open or closed when the backend is unreachable), logs and counts failures.

mod memory;
pub mod redis;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tollgate_core::ratelimit::{Decision, RateLimit};

pub use memory::MemoryRateLimiter;
pub use redis::RedisRateLimiter;

#[derive(Debug, thiserror::Error)]
#[error("rate limit backend unavailable: {0}")]
pub struct BackendError(pub String);

/// A place to keep GCRA state. Keys are opaque strings chosen by the caller.
#[async_trait]
pub trait RateLimitBackend: Send + Sync + 'static {
    /// Counts a request of `cost` against `key` when allowed.
    async fn hit(&self, key: &str, limit: RateLimit, cost: u32) -> Result<Decision, BackendError>;

    /// Would a request of cost 1 be allowed now? Counts nothing.
    async fn peek(&self, key: &str, limit: RateLimit) -> Result<Decision, BackendError>;

    /// Gives back `cost` counted by an earlier `hit`; never below a full burst.
    async fn refund(&self, key: &str, limit: RateLimit, cost: u32) -> Result<(), BackendError>;

    /// Forgets every key starting with `prefix` (an admin clearing a subject's limits);
    /// returns how many keys were removed.
    async fn clear(&self, prefix: &str) -> Result<u64, BackendError>;

    /// Forgets exactly these keys (a subject's known keys: `clear` on `login:ada@x.com`
    /// would also take `login:ada@x.com.au`); returns how many existed.
    async fn forget(&self, keys: &[String]) -> Result<u64, BackendError>;

    /// Where the state lives, for the health page: `memory` or `redis`.
    fn name(&self) -> &'static str;

    /// A round trip to the backend (nothing to do in memory).
    async fn ping(&self) -> Result<(), BackendError> {
        Ok(())
    }
}

/// What to do when the backend cannot answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// Allow the request (availability over strictness).
    Open,
    /// Refuse the request with 429 (strictness over availability).
    Closed,
}

/// The server's rate limiter: a backend plus the failure policy.
#[derive(Clone)]
pub struct Limiter {
    backend: Arc<dyn RateLimitBackend>,
    on_failure: FailureMode,
}

impl Limiter {
    pub fn new(backend: Arc<dyn RateLimitBackend>, on_failure: FailureMode) -> Self {
        Self { backend, on_failure }
    }

    pub fn in_memory() -> Self {
        Self::new(Arc::new(MemoryRateLimiter::default()), FailureMode::Open)
    }

    fn failed(&self, what: &str, limit: RateLimit, e: BackendError) -> Decision {
        metrics::counter!("rate_limit_backend_errors_total", "op" => what.to_owned()).increment(1);
        tracing::warn!(error = %e, policy = ?self.on_failure, "rate limit backend failed");
        let allowed = self.on_failure == FailureMode::Open;
        Decision {
            allowed,
            limit: limit.requests,
            remaining: 0,
            reset_after: Duration::ZERO,
            retry_after: (!allowed).then_some(Duration::from_secs(1)),
            new_tat: 0,
        }
    }

    pub async fn hit(&self, key: &str, limit: RateLimit, cost: u32) -> Decision {
        match self.backend.hit(key, limit, cost).await {
            Ok(d) => d,
            Err(e) => self.failed("hit", limit, e),
        }
    }

    pub async fn peek(&self, key: &str, limit: RateLimit) -> Decision {
        match self.backend.peek(key, limit).await {
            Ok(d) => d,
            Err(e) => self.failed("peek", limit, e),
        }
    }

    pub async fn refund(&self, key: &str, limit: RateLimit, cost: u32) {
        if let Err(e) = self.backend.refund(key, limit, cost).await {
            self.failed("refund", limit, e);
        }
    }

    pub async fn clear(&self, prefix: &str) -> Result<u64, BackendError> {
        self.backend.clear(prefix).await
    }

    pub async fn forget(&self, keys: &[String]) -> Result<u64, BackendError> {
        self.backend.forget(keys).await
    }

    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    pub async fn ping(&self) -> Result<(), BackendError> {
        self.backend.ping().await
    }
}
