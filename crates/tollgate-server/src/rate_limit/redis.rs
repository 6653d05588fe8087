//! Redis rate-limit backend: the GCRA state of every key in one Redis, shared by every
//! node. Each operation is one Lua script run atomically on the server, on Redis's
//! clock (`TIME`), so nodes with skewed clocks agree.
//!
//! The script does the arithmetic of `tollgate_core::ratelimit::gcra` exactly: it
//! keeps a key's TAT (theoretical arrival time) as integer nanoseconds since the Unix
//! epoch and computes in nanoseconds relative to `now`, which Lua's doubles hold
//! exactly for any window up to 2^53 ns (104 days). Longer windows still work, within
//! a few nanoseconds.

use std::sync::LazyLock;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tollgate_core::ratelimit::{Decision, RateLimit};

use super::{BackendError, RateLimitBackend};

/// How long connecting, and waiting for one reply, may take before the operation fails
/// (and the `Limiter` applies its failure policy).
const TIMEOUT: Duration = Duration::from_secs(1);

/// Keys removed per `DEL` (and asked per `SCAN` step) by `clear`.
const CLEAR_BATCH: usize = 500;

/// One GCRA step on one key. Contract:
///
/// - `KEYS[1]`: the key. Its value, when present, is the TAT as a decimal string of
///   integer nanoseconds since the Unix epoch, and it expires (PX) one second after
///   the TAT: an expired TAT means the same as no key at all.
/// - `ARGV`: mode (`hit` | `peek` | `refund`), window (ns), emission interval (ns,
///   >= 1), burst (requests), cost, now (µs since the epoch; empty for Redis's `TIME`).
/// - `hit` stores the new TAT when allowed; `peek` computes a hit of cost 1 and stores
///   nothing; `refund` moves a stored TAT back by interval × cost, never below now
///   (deleting the key when it reaches now), creates no key, and then reports the
///   state as a step of cost 0.
/// - Returns `{allowed (0|1), remaining, reset_after (ns), retry_after (ns, -1 when
///   allowed), tat (ns since the epoch, string: the TAT after this step)}`, exactly
///   `gcra(limit, tat, now, cost)` with `now` in ns; durations are capped at 2^62 ns.
const SCRIPT: &str = r#"
local CAP = 4611686018427387904 -- 2^62 ns: replies stay within Redis's 64-bit integers
local function idiv(a, b) -- floor(a / b), exact for integers below 2^53
  local q = math.floor(a / b)
  if q * b > a then q = q - 1 elseif (q + 1) * b <= a then q = q + 1 end
  return q
end
local mode, window, interval = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local requests, cost, now = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
-- d = TAT - now in ns. TAT = max(stored or now, now), so d >= 0.
local stored = redis.call('GET', KEYS[1])
local d = 0
if stored then
  local us, ns = tonumber(string.sub(stored, 1, -4)) or 0, tonumber(string.sub(stored, -3)) or 0
  d = math.max((us - now) * 1000 + ns, 0)
end
local function tat(x) -- now + x ns, as stored
  local us = idiv(x, 1000)
  return string.format('%.0f%03d', now + us, math.min(math.max(x - us * 1000, 0), 999))
end
-- Stores TAT = now + x ns (x > 0) expiring a second after it (an expired TAT means the
-- same as no key; the margin keeps a caller-given `now`, slower than Redis's clock, exact).
local function store(x)
  if x > 0 then
    redis.call('SET', KEYS[1], tat(x), 'PX', string.format('%.0f', math.ceil(x / 1000000) + 1000))
  elseif stored then
    redis.call('DEL', KEYS[1])
  end
end
if mode == 'refund' then
  if stored then
    d = math.max(d - interval * cost, 0)
    store(d)
  end
  cost = 0
elseif mode == 'peek' then
  cost = 1
elseif mode ~= 'hit' then
  return redis.error_reply('unknown mode')
end
local new_d = d + interval * cost
local allowed = new_d - window <= 0
local after = d
local retry = math.min(new_d - window, CAP)
if allowed then
  after = new_d
  retry = -1
  if mode == 'hit' then store(new_d) end
end
local remaining = math.min(math.max(idiv(window - after, interval), 0), requests)
return {allowed and 1 or 0, remaining, math.min(after, CAP), retry, tat(after)}
"#;

static GCRA: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(SCRIPT));

#[derive(Clone, Copy, Debug)]
enum Mode {
    Hit,
    Peek,
    Refund,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Hit => "hit",
            Mode::Peek => "peek",
            Mode::Refund => "refund",
        }
    }
}

/// GCRA state in Redis (`TOLLGATE_REDIS_URL`), shared by every node using the same
/// Redis and key prefix. Cheap to clone: one multiplexed connection, re-established
/// on failure.
#[derive(Clone)]
pub struct RedisRateLimiter {
    conn: ConnectionManager,
    key_prefix: String,
}

/// The error of a redis call, without the URL (it may hold a password).
fn backend_error(what: &str, e: redis::RedisError) -> BackendError {
    BackendError(format!("redis {what}: {e}"))
}

/// Escapes the glob characters of a `SCAN MATCH` pattern, so `s` matches only itself.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl RedisRateLimiter {
    /// Connects to the Redis at `url` (`redis://[user:password@]host:port/db`); every
    /// key is stored as `{key_prefix}{key}`. Fails when Redis does not answer within
    /// about a second.
    pub async fn connect(url: &str, key_prefix: &str) -> Result<Self, BackendError> {
        let client = redis::Client::open(url).map_err(|e| backend_error("url", e))?;
        Self::with_client(client, key_prefix).await
    }

    async fn with_client(client: redis::Client, key_prefix: &str) -> Result<Self, BackendError> {
        // No retry inside one operation: a request waits for at most one connection
        // attempt; the next operation tries again.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(Some(TIMEOUT))
            .set_number_of_retries(0);
        let conn = ConnectionManager::new_with_config(client, config).await.map_err(|e| backend_error("connect", e))?;
        Ok(Self { conn, key_prefix: key_prefix.to_owned() })
    }

    /// Runs the script; `now_us` (µs since the epoch) replaces Redis's clock in tests.
    async fn run(
        &self,
        mode: Mode,
        key: &str,
        limit: RateLimit,
        cost: u32,
        now_us: Option<u64>,
    ) -> Result<Decision, BackendError> {
        // The same window and interval as core's `RateLimit::{window,interval}_nanos`.
        let window = i128::from(limit.window_seconds) * 1_000_000_000;
        let interval = (window / i128::from(limit.requests.max(1))).max(1);
        let mut conn = self.conn.clone();
        let (allowed, remaining, reset_after, retry_after, tat): (i64, i64, i64, i64, String) = GCRA
            .key(format!("{}{}", self.key_prefix, key))
            .arg(mode.as_str())
            .arg(window.to_string())
            .arg(interval.to_string())
            .arg(limit.requests)
            .arg(cost)
            .arg(now_us.map(|n| n.to_string()).unwrap_or_default())
            .invoke_async(&mut conn)
            .await
            .map_err(|e| backend_error(mode.as_str(), e))?;
        let nanos = |n: i64| Duration::from_nanos(n.max(0).cast_unsigned());
        Ok(Decision {
            allowed: allowed == 1,
            limit: limit.requests,
            remaining: u32::try_from(remaining.max(0)).unwrap_or(limit.requests),
            reset_after: nanos(reset_after),
            retry_after: (allowed != 1).then(|| nanos(retry_after)),
            new_tat: tat.parse().map_err(|_| BackendError(format!("redis {}: unexpected reply", mode.as_str())))?,
        })
    }
}

#[async_trait]
impl RateLimitBackend for RedisRateLimiter {
    async fn hit(&self, key: &str, limit: RateLimit, cost: u32) -> Result<Decision, BackendError> {
        self.run(Mode::Hit, key, limit, cost, None).await
    }

    async fn peek(&self, key: &str, limit: RateLimit) -> Result<Decision, BackendError> {
        self.run(Mode::Peek, key, limit, 1, None).await
    }

    async fn refund(&self, key: &str, limit: RateLimit, cost: u32) -> Result<(), BackendError> {
        self.run(Mode::Refund, key, limit, cost, None).await.map(|_| ())
    }

    async fn clear(&self, prefix: &str) -> Result<u64, BackendError> {
        let pattern = format!("{}*", glob_escape(&format!("{}{prefix}", self.key_prefix)));
        let mut conn = self.conn.clone();
        let mut cursor = 0u64;
        let mut removed = 0;
        loop {
            let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(CLEAR_BATCH)
                .query_async(&mut conn)
                .await
                .map_err(|e| backend_error("clear", e))?;
            for batch in keys.chunks(CLEAR_BATCH) {
                let n: u64 =
                    redis::cmd("DEL").arg(batch).query_async(&mut conn).await.map_err(|e| backend_error("clear", e))?;
                removed += n;
            }
            if next == 0 {
                return Ok(removed);
            }
            cursor = next;
        }
    }

    fn name(&self) -> &'static str {
        "redis"
    }

    async fn ping(&self) -> Result<(), BackendError> {
        let mut conn = self.conn.clone();
        redis::cmd("PING").query_async::<String>(&mut conn).await.map(|_| ()).map_err(|e| backend_error("ping", e))
    }

    async fn forget(&self, keys: &[String]) -> Result<u64, BackendError> {
        if keys.is_empty() {
            return Ok(0);
        }
        let mut conn = self.conn.clone();
        let mut removed = 0;
        for batch in keys.chunks(CLEAR_BATCH) {
            let full: Vec<String> = batch.iter().map(|k| format!("{}{k}", self.key_prefix)).collect();
            let n: u64 =
                redis::cmd("DEL").arg(full).query_async(&mut conn).await.map_err(|e| backend_error("forget", e))?;
            removed += n;
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    //! Against the Redis at `TOLLGATE_TEST_REDIS_URL` (default
    //! `redis://127.0.0.1:6379/`); skipped with a printed reason when it does not
    //! answer, unless `TOLLGATE_REQUIRE_SERVICES=1`. Every test works under its own
    //! `t:<uuid>:` prefix and deletes it at the end, even when it fails.

    use std::sync::Arc;
    use std::time::Instant;

    use tokio::net::{TcpListener, TcpStream};
    use tokio::task::JoinSet;
    use tollgate_core::ratelimit::gcra;

    use super::super::{FailureMode, Limiter};
    use super::*;

    const DEFAULT_URL: &str = "redis://127.0.0.1:6379/";
    const SEC: u64 = 1_000_000; // µs
    /// An arbitrary fixed "now" (2025-06-15), in µs since the epoch.
    const T0: u64 = 1_750_000_000 * SEC;

    impl RedisRateLimiter {
        async fn hit_at(&self, key: &str, limit: RateLimit, cost: u32, now_us: u64) -> Decision {
            self.run(Mode::Hit, key, limit, cost, Some(now_us)).await.unwrap()
        }
        async fn peek_at(&self, key: &str, limit: RateLimit, now_us: u64) -> Decision {
            self.run(Mode::Peek, key, limit, 1, Some(now_us)).await.unwrap()
        }
        async fn refund_at(&self, key: &str, limit: RateLimit, cost: u32, now_us: u64) -> Decision {
            self.run(Mode::Refund, key, limit, cost, Some(now_us)).await.unwrap()
        }
    }

    /// A test's own key space `t:<uuid>:` in the test Redis, deleted on drop.
    struct Scratch {
        client: redis::Client,
        prefix: String,
    }

    impl Scratch {
        /// None (after a loud skip) when the test Redis does not answer.
        async fn new() -> Option<Self> {
            let url = std::env::var("TOLLGATE_TEST_REDIS_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned());
            let client =
                redis::Client::open(url.as_str()).unwrap_or_else(|e| panic!("bad TOLLGATE_TEST_REDIS_URL: {e}"));
            let addr = client.get_connection_info().addr().to_string();
            let scratch = Self { client, prefix: format!("t:{}:", uuid::Uuid::now_v7()) };
            let error = match RedisRateLimiter::with_client(scratch.client.clone(), "").await {
                Ok(_) => return Some(scratch),
                Err(e) => e.to_string(),
            };
            if std::env::var("TOLLGATE_REQUIRE_SERVICES").is_ok_and(|v| v == "1") {
                panic!(
                    "Redis not reachable at {addr} ({error}) and TOLLGATE_REQUIRE_SERVICES=1; set TOLLGATE_TEST_REDIS_URL"
                );
            }
            eprintln!("SKIPPED: Redis not reachable at {addr} ({error}); set TOLLGATE_TEST_REDIS_URL");
            None
        }

        /// A limiter (a "node") whose keys live under this scratch space + `sub`.
        async fn limiter(&self, sub: &str) -> RedisRateLimiter {
            RedisRateLimiter::with_client(self.client.clone(), &format!("{}{sub}", self.prefix)).await.unwrap()
        }

        /// The raw keys under this scratch space, sorted.
        async fn keys(&self) -> Vec<String> {
            let mut conn = self.client.get_multiplexed_async_connection().await.unwrap();
            let mut keys: Vec<String> =
                redis::cmd("KEYS").arg(format!("{}*", self.prefix)).query_async(&mut conn).await.unwrap();
            keys.sort();
            keys.iter().map(|k| k[self.prefix.len()..].to_owned()).collect()
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            // Synchronous, so it also runs when the test panics.
            let Ok(mut conn) = self.client.get_connection_with_timeout(TIMEOUT) else { return };
            let keys: Vec<Vec<u8>> =
                redis::cmd("KEYS").arg(format!("{}*", self.prefix)).query(&mut conn).unwrap_or_default();
            if !keys.is_empty() {
                let _: redis::RedisResult<u64> = redis::cmd("DEL").arg(keys).query(&mut conn);
            }
        }
    }

    fn interval_ns(limit: RateLimit) -> i128 {
        (i128::from(limit.window_seconds) * 1_000_000_000 / i128::from(limit.requests.max(1))).max(1)
    }

    #[derive(Clone, Copy, Debug)]
    enum Op {
        Hit(u32),
        Peek,
        Refund(u32),
    }

    /// The reference: core's `gcra` on a TAT kept here (ns), with the refund of the
    /// in-memory backend.
    struct Model {
        limit: RateLimit,
        tat: Option<i128>,
    }

    impl Model {
        fn step(&mut self, op: Op, now_us: u64) -> Decision {
            let now = i128::from(now_us) * 1000;
            match op {
                Op::Hit(cost) => {
                    let d = gcra(self.limit, self.tat, now, cost);
                    if d.allowed {
                        self.tat = Some(d.new_tat);
                    }
                    d
                }
                Op::Peek => gcra(self.limit, self.tat, now, 1),
                Op::Refund(cost) => {
                    if let Some(tat) = self.tat {
                        self.tat = Some((tat - interval_ns(self.limit) * i128::from(cost)).max(now));
                    }
                    gcra(self.limit, self.tat, now, 0)
                }
            }
        }
    }

    /// xorshift64*: deterministic sequences without a dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            if n == 0 { 0 } else { self.next() % n }
        }
    }

    /// Runs `steps` (gap in µs, operation) on one key in Redis and in the model; every
    /// decision must be identical, to the nanosecond and including the new TAT.
    async fn agree(limiter: &RedisRateLimiter, key: &str, limit: RateLimit, steps: &[(u64, Op)]) {
        let mut model = Model { limit, tat: None };
        let mut now = T0;
        for (i, &(gap, op)) in steps.iter().enumerate() {
            now += gap;
            let expected = model.step(op, now);
            let got = match op {
                Op::Hit(cost) => limiter.hit_at(key, limit, cost, now).await,
                Op::Peek => limiter.peek_at(key, limit, now).await,
                Op::Refund(cost) => limiter.refund_at(key, limit, cost, now).await,
            };
            assert_eq!(got, expected, "{limit:?}, step {i} ({op:?} at +{} µs) of {steps:?}", now - T0);
        }
    }

    #[tokio::test]
    async fn agrees_with_core_on_a_burst_then_recovery() {
        let Some(scratch) = Scratch::new().await else { return };
        let limiter = scratch.limiter("").await;
        let limit = RateLimit::per(10, Duration::from_secs(60));
        for i in 0..10 {
            let d = limiter.hit_at("k", limit, 1, T0).await;
            assert!(d.allowed, "request {i}");
            assert_eq!(d.remaining, 9 - i);
        }
        let denied = limiter.hit_at("k", limit, 1, T0).await;
        assert!(!denied.allowed);
        assert_eq!(denied.retry_after, Some(Duration::from_secs(6)));
        assert!(!limiter.hit_at("k", limit, 1, T0 + 6 * SEC - 1).await.allowed);
        assert!(limiter.hit_at("k", limit, 1, T0 + 6 * SEC).await.allowed);
        assert!(!limiter.hit_at("k", limit, 1, T0 + 6 * SEC).await.allowed);
        // A cost above the burst is never allowed.
        assert!(!limiter.hit_at("other", limit, 11, T0).await.allowed);
    }

    #[tokio::test]
    async fn agrees_with_core_on_random_sequences() {
        let Some(scratch) = Scratch::new().await else { return };
        let limiter = scratch.limiter("").await;
        // Including limits whose interval is no whole number of µs (3/s, 7/h, ...),
        // one of 250 ns, and a 30-day window.
        let limits = [
            (1, 1),
            (3, 1),
            (10, 60),
            (7, 3600),
            (100, 60),
            (5, 10),
            (1000, 1),
            (3, 86_400),
            (4_000_000, 1),
            (2, 30 * 86_400),
            (u32::MAX, 1),
        ];
        for seed in 1..=32u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let (requests, window) = limits[rng.below(limits.len() as u64) as usize];
            let limit = RateLimit::per(requests, Duration::from_secs(window));
            let interval_us = (interval_ns(limit) / 1000) as u64;
            let max_cost = u64::from(requests.min(20)) + 2;
            let mut model = Model { limit, tat: None };
            let mut steps = Vec::new();
            let mut now = T0;
            for _ in 0..(20 + rng.below(60)) {
                let cost = match rng.below(10) {
                    0..=5 => 1,
                    6 => 0,
                    _ => rng.below(max_cost) as u32,
                };
                let op = match rng.below(10) {
                    0..=6 => Op::Hit(cost),
                    7 | 8 => Op::Peek,
                    _ => Op::Refund(cost),
                };
                // Gaps around the interesting instants: none, within two intervals, the
                // µs just before and at the end of the wait the model asks for, the TAT
                // (back to a full burst), a whole window.
                let now_ns = i128::from(now) * 1000;
                let retry = gcra(limit, model.tat, now_ns, if let Op::Hit(c) = op { c } else { 1 })
                    .retry_after
                    .map_or(0, |r| r.as_nanos().div_ceil(1000) as u64);
                let until_tat = model.tat.map_or(0, |t| ((t - now_ns).max(0) / 1000) as u64);
                let gap = match rng.below(10) {
                    0..=2 => 0,
                    3 | 4 => rng.below(2 * interval_us + 2),
                    5 => retry,
                    6 => retry.saturating_sub(1),
                    7 => until_tat,
                    8 => until_tat + 1,
                    _ => window * SEC,
                };
                now += gap;
                model.step(op, now);
                steps.push((gap, op));
            }
            agree(&limiter, &format!("seed{seed}"), limit, &steps).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_nodes_share_one_limit() {
        let Some(scratch) = Scratch::new().await else { return };
        let nodes = [Arc::new(scratch.limiter("").await), Arc::new(scratch.limiter("").await)];
        let limit = RateLimit::per(10, Duration::from_secs(3600));
        let mut tasks = JoinSet::new();
        for i in 0..64 {
            let node = nodes[i % 2].clone();
            tasks.spawn(async move { node.hit("login:someone", limit, 1).await.unwrap().allowed });
        }
        let allowed = tasks.join_all().await.into_iter().filter(|&a| a).count();
        assert_eq!(allowed, 10);
        // Both see the spent budget, on Redis's clock.
        for node in &nodes {
            let d = node.peek("login:someone", limit).await.unwrap();
            assert!(!d.allowed);
            assert!(d.retry_after.unwrap() > Duration::from_secs(300));
        }
        assert_eq!(scratch.keys().await, ["login:someone"]);
    }

    #[tokio::test]
    async fn peek_counts_nothing_and_refund_gives_back() {
        let Some(scratch) = Scratch::new().await else { return };
        let limiter = scratch.limiter("").await;
        let limit = RateLimit::per(2, Duration::from_secs(3600));
        for _ in 0..5 {
            assert!(limiter.peek("a", limit).await.unwrap().allowed);
        }
        assert!(scratch.keys().await.is_empty(), "peek stores nothing");
        assert!(limiter.hit("a", limit, 1).await.unwrap().allowed);
        assert!(limiter.hit("a", limit, 1).await.unwrap().allowed);
        assert!(!limiter.hit("a", limit, 1).await.unwrap().allowed);
        assert!(!limiter.peek("a", limit).await.unwrap().allowed);
        assert!(limiter.hit("b", limit, 1).await.unwrap().allowed, "keys are independent");

        limiter.refund("a", limit, 1).await.unwrap();
        assert!(limiter.hit("a", limit, 1).await.unwrap().allowed);
        assert!(!limiter.peek("a", limit).await.unwrap().allowed);
        // Refunding more than was used does not bank extra requests, and the key,
        // back to a full burst, is gone.
        limiter.refund("a", limit, 5).await.unwrap();
        assert_eq!(scratch.keys().await, ["b"]);
        assert!(limiter.hit("a", limit, 1).await.unwrap().allowed);
        assert!(limiter.hit("a", limit, 1).await.unwrap().allowed);
        assert!(!limiter.hit("a", limit, 1).await.unwrap().allowed);
        // A refund creates no key.
        limiter.refund("c", limit, 1).await.unwrap();
        assert_eq!(scratch.keys().await, ["a", "b"]);
        // The TAT expires (a second after) it is reached.
        let mut conn = scratch.client.get_multiplexed_async_connection().await.unwrap();
        let ttl: i64 = redis::cmd("PTTL").arg(format!("{}b", scratch.prefix)).query_async(&mut conn).await.unwrap();
        assert!((1_700_000..=1_801_000).contains(&ttl), "ttl {ttl} ms");
    }

    #[tokio::test]
    async fn clear_removes_only_the_matching_keys() {
        let Some(scratch) = Scratch::new().await else { return };
        let n1 = scratch.limiter("n1:").await;
        let n2 = scratch.limiter("n2:").await;
        let limit = RateLimit::per(1, Duration::from_secs(3600));
        let keys = ["user:1", "user:10", "user:2", "user:*", "user:[1]", "user:?", "user:\\", "ip:1"];
        for key in keys {
            assert!(n1.hit(key, limit, 1).await.unwrap().allowed);
            assert!(n2.hit(key, limit, 1).await.unwrap().allowed);
        }
        // Glob characters in the prefix are literal.
        assert_eq!(n1.clear("user:*").await.unwrap(), 1);
        assert_eq!(n1.clear("user:[1]").await.unwrap(), 1);
        assert_eq!(n1.clear("user:?").await.unwrap(), 1);
        assert_eq!(n1.clear("user:\\").await.unwrap(), 1);
        assert_eq!(n1.clear("user:1").await.unwrap(), 2);
        assert_eq!(n1.clear("user:1").await.unwrap(), 0);
        assert!(n1.hit("user:1", limit, 1).await.unwrap().allowed, "cleared");
        assert!(!n1.hit("user:2", limit, 1).await.unwrap().allowed, "kept");
        let mut n2_keys: Vec<String> = keys.iter().map(|k| format!("n2:{k}")).collect();
        n2_keys.sort();
        let mut expected = ["n1:ip:1", "n1:user:1", "n1:user:2"].map(String::from).to_vec();
        expected.extend(n2_keys.iter().cloned());
        expected.sort();
        assert_eq!(scratch.keys().await, expected, "the other node's keys are untouched");
        // Many keys: more than one SCAN step and DEL batch.
        for i in 0..1200 {
            n1.hit(&format!("bulk:{i}"), limit, 1).await.unwrap();
        }
        assert_eq!(n1.clear("bulk:").await.unwrap(), 1200);
        assert_eq!(n1.clear("").await.unwrap(), 3);
        assert_eq!(scratch.keys().await, n2_keys);
    }

    #[tokio::test]
    async fn forget_removes_exactly_the_keys_named() {
        let Some(scratch) = Scratch::new().await else { return };
        let n1 = scratch.limiter("n1:").await;
        let n2 = scratch.limiter("n2:").await;
        let limit = RateLimit::per(1, Duration::from_secs(3600));
        for key in ["login:ada@x.com", "login:ada@x.com.au", "login:*"] {
            assert!(n1.hit(key, limit, 1).await.unwrap().allowed);
            assert!(n2.hit(key, limit, 1).await.unwrap().allowed);
        }
        let keys = ["login:ada@x.com".to_owned(), "login:*".to_owned(), "absent".to_owned()];
        assert_eq!(n1.forget(&keys).await.unwrap(), 2);
        assert_eq!(n1.forget(&[]).await.unwrap(), 0);
        assert!(n1.hit("login:ada@x.com", limit, 1).await.unwrap().allowed, "forgotten");
        assert!(!n1.peek("login:ada@x.com.au", limit).await.unwrap().allowed, "a longer key is another key");
        assert_eq!(scratch.keys().await.iter().filter(|k| k.starts_with("n2:")).count(), 3, "other nodes untouched");
    }

    #[tokio::test]
    async fn an_unreachable_redis_fails_fast_without_the_password() {
        let started = Instant::now();
        let Err(e) = RedisRateLimiter::connect("redis://:hunter2@127.0.0.1:1/", "t:").await else {
            panic!("connected to port 1")
        };
        assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert!(RedisRateLimiter::connect("not a url", "t:").await.is_err());

        // A server that accepts connections and never answers.
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("redis://{}/", silent.local_addr().unwrap());
        let held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((socket, _)) = silent.accept().await {
                open.push(socket);
            }
        });
        let started = Instant::now();
        let result = match RedisRateLimiter::connect(&url, "t:").await {
            Ok(limiter) => limiter.hit("k", RateLimit::per(1, Duration::from_secs(1)), 1).await.map(|_| ()),
            Err(e) => Err(e),
        };
        assert!(result.is_err());
        assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
        held.abort();
    }

    /// Redis going away under a connected limiter: a TCP proxy to the test Redis,
    /// then stopped.
    #[tokio::test]
    async fn a_lost_redis_is_an_error_and_the_limiter_applies_its_policy() {
        let Some(scratch) = Scratch::new().await else { return };
        let redis::ConnectionAddr::Tcp(host, port) = scratch.client.get_connection_info().addr().clone() else {
            eprintln!("SKIPPED: the test Redis is not reached over TCP");
            return;
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy_port = listener.local_addr().unwrap().port();
        let piping = tokio::spawn(proxy(listener, host.clone(), port));
        let info = scratch
            .client
            .get_connection_info()
            .clone()
            .set_addr(redis::ConnectionAddr::Tcp("127.0.0.1".into(), proxy_port));
        let client = redis::Client::open(info).unwrap();
        let limiter = Arc::new(RedisRateLimiter::with_client(client, &scratch.prefix).await.unwrap());
        let limit = RateLimit::per(5, Duration::from_secs(60));
        assert!(limiter.hit("k", limit, 1).await.unwrap().allowed);

        // Redis gone.
        piping.abort();
        let _ = piping.await;
        for _ in 0..3 {
            let started = Instant::now();
            assert!(limiter.hit("k", limit, 1).await.is_err());
            assert!(limiter.peek("k", limit).await.is_err());
            assert!(limiter.refund("k", limit, 1).await.is_err());
            assert!(limiter.clear("").await.is_err());
            assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
        }
        let closed = Limiter::new(limiter.clone(), FailureMode::Closed);
        let d = closed.hit("k", limit, 1).await;
        assert!(!d.allowed);
        assert!(d.retry_after.is_some());
        assert!(!closed.peek("k", limit).await.allowed);
        let open = Limiter::new(limiter.clone(), FailureMode::Open);
        assert!(open.hit("k", limit, 1).await.allowed);
        assert!(open.peek("k", limit).await.allowed);
        open.refund("k", limit, 1).await;

        // Redis back: the next operations reconnect, and the state was kept.
        let piping = tokio::spawn(proxy(TcpListener::bind(("127.0.0.1", proxy_port)).await.unwrap(), host, port));
        let started = Instant::now();
        let d = loop {
            match limiter.hit("k", limit, 1).await {
                Ok(d) => break d,
                Err(e) => assert!(started.elapsed() < Duration::from_secs(5), "no reconnection: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(d.allowed);
        assert_eq!(d.remaining, 3, "the hit before the loss still counts");
        piping.abort();
    }

    /// Pipes every connection accepted on `listener` to `host:port` until aborted,
    /// which closes the listener and every pipe.
    async fn proxy(listener: TcpListener, host: String, port: u16) {
        let mut pipes = JoinSet::new();
        while let Ok((mut client, _)) = listener.accept().await {
            let host = host.clone();
            pipes.spawn(async move {
                if let Ok(mut server) = TcpStream::connect((host.as_str(), port)).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    }
}
