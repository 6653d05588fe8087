//! In-memory rate-limit backend (the embedded default): GCRA state per key in a
//! sharded map, private to this process.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;
use std::time::Instant;

use async_trait::async_trait;
use tollgate_core::ratelimit::{Decision, RateLimit, gcra};

use super::{BackendError, RateLimitBackend};

const SHARDS: usize = 16;

pub struct MemoryRateLimiter {
    shards: Vec<Mutex<HashMap<String, i128>>>,
    hasher: RandomState,
    epoch: Instant,
}

impl Default for MemoryRateLimiter {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            epoch: Instant::now(),
        }
    }
}

impl MemoryRateLimiter {
    fn now(&self) -> i128 {
        self.epoch.elapsed().as_nanos() as i128
    }

    fn shard(&self, key: &str) -> &Mutex<HashMap<String, i128>> {
        &self.shards[(self.hasher.hash_one(key) as usize) % SHARDS]
    }

    /// Counts a request of `cost` against `key` when allowed.
    pub fn hit(&self, key: &str, limit: RateLimit, cost: u32) -> Decision {
        let now = self.now();
        let mut map = self.shard(key).lock().unwrap_or_else(|e| e.into_inner());
        let decision = gcra(limit, map.get(key).copied(), now, cost);
        if decision.allowed {
            // A key whose arrival time is in the past is back to a full burst, the same
            // as an absent key: drop such entries now and then so the map stays small.
            if map.len() > 10_000 {
                map.retain(|_, tat| *tat > now);
            }
            map.insert(key.to_owned(), decision.new_tat);
        }
        decision
    }

    /// Gives back `cost` counted by an earlier `hit` (an attempt that turned out not to
    /// count, e.g. a login that succeeded). Never below "full burst".
    pub fn refund(&self, key: &str, limit: RateLimit, cost: u32) {
        let now = self.now();
        let mut map = self.shard(key).lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tat) = map.get_mut(key) {
            let interval = i128::from(limit.window_seconds) * 1_000_000_000 / i128::from(limit.requests.max(1));
            *tat = (*tat - interval * i128::from(cost)).max(now);
        }
    }

    /// Would a request of cost 1 be allowed now? Counts nothing.
    pub fn peek(&self, key: &str, limit: RateLimit) -> Decision {
        let now = self.now();
        let map = self.shard(key).lock().unwrap_or_else(|e| e.into_inner());
        gcra(limit, map.get(key).copied(), now, 1)
    }
}

#[async_trait]
impl RateLimitBackend for MemoryRateLimiter {
    async fn hit(&self, key: &str, limit: RateLimit, cost: u32) -> Result<Decision, BackendError> {
        Ok(MemoryRateLimiter::hit(self, key, limit, cost))
    }

    async fn peek(&self, key: &str, limit: RateLimit) -> Result<Decision, BackendError> {
        Ok(MemoryRateLimiter::peek(self, key, limit))
    }

    async fn refund(&self, key: &str, limit: RateLimit, cost: u32) -> Result<(), BackendError> {
        MemoryRateLimiter::refund(self, key, limit, cost);
        Ok(())
    }

    async fn clear(&self, prefix: &str) -> Result<u64, BackendError> {
        let mut removed = 0;
        for shard in &self.shards {
            let mut map = shard.lock().unwrap_or_else(|e| e.into_inner());
            let before = map.len();
            map.retain(|k, _| !k.starts_with(prefix));
            removed += (before - map.len()) as u64;
        }
        Ok(removed)
    }

    fn name(&self) -> &'static str {
        "memory"
    }

    async fn forget(&self, keys: &[String]) -> Result<u64, BackendError> {
        let mut removed = 0;
        for key in keys {
            removed += u64::from(self.shard(key).lock().unwrap_or_else(|e| e.into_inner()).remove(key).is_some());
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn keys_are_independent_and_peek_counts_nothing() {
        let limiter = MemoryRateLimiter::default();
        let limit = RateLimit::per(2, Duration::from_secs(3600));
        assert!(limiter.peek("a", limit).allowed);
        assert!(limiter.hit("a", limit, 1).allowed);
        assert!(limiter.hit("a", limit, 1).allowed);
        assert!(!limiter.hit("a", limit, 1).allowed);
        assert!(!limiter.peek("a", limit).allowed);
        assert!(limiter.hit("b", limit, 1).allowed);
    }

    #[tokio::test]
    async fn forget_removes_exactly_the_keys_named() {
        let limiter = MemoryRateLimiter::default();
        let limit = RateLimit::per(1, Duration::from_secs(3600));
        for key in ["login:ada@x.com", "login:ada@x.com.au", "mfa:1"] {
            assert!(limiter.hit(key, limit, 1).allowed);
        }
        let keys = ["login:ada@x.com".to_owned(), "absent".to_owned()];
        assert_eq!(RateLimitBackend::forget(&limiter, &keys).await.unwrap(), 1);
        assert!(limiter.hit("login:ada@x.com", limit, 1).allowed, "forgotten");
        assert!(!limiter.peek("login:ada@x.com.au", limit).allowed, "a longer key is another key");
        assert!(!limiter.peek("mfa:1", limit).allowed);
    }

    #[test]
    fn refund_gives_back_a_hit() {
        let limiter = MemoryRateLimiter::default();
        let limit = RateLimit::per(1, Duration::from_secs(3600));
        assert!(limiter.hit("a", limit, 1).allowed);
        assert!(!limiter.peek("a", limit).allowed);
        limiter.refund("a", limit, 1);
        assert!(limiter.hit("a", limit, 1).allowed);
        // Refunding more than was used does not bank extra requests.
        limiter.refund("a", limit, 5);
        assert!(limiter.hit("a", limit, 1).allowed);
        assert!(!limiter.hit("a", limit, 1).allowed);
    }
}
