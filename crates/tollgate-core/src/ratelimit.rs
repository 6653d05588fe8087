//! Rate limiting with GCRA (generic cell rate algorithm): one timestamp per key (the
//! "theoretical arrival time"), exact, no background refill, and the same arithmetic
//! whether the timestamp lives in memory or in Redis.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `requests` per `window`, bursting up to `requests` at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimit {
    pub requests: u32,
    /// Window length in seconds.
    pub window_seconds: u64,
}

impl RateLimit {
    pub const fn per(requests: u32, window: Duration) -> Self {
        Self { requests, window_seconds: window.as_secs() }
    }

    fn window_nanos(&self) -> i128 {
        i128::from(self.window_seconds) * 1_000_000_000
    }

    /// Time between two requests at the sustained rate.
    fn interval_nanos(&self) -> i128 {
        (self.window_nanos() / i128::from(self.requests.max(1))).max(1)
    }
}

/// The outcome of one GCRA step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub limit: u32,
    /// Requests still allowed right now after this one.
    pub remaining: u32,
    /// Until the key is back to a full burst.
    pub reset_after: Duration,
    /// When denied: how long until the request would be allowed.
    pub retry_after: Option<Duration>,
    /// The arrival time to store when allowed (nanoseconds, same clock as `now`).
    pub new_tat: i128,
}

fn to_duration(nanos: i128) -> Duration {
    Duration::from_nanos(nanos.clamp(0, i128::from(u64::MAX)) as u64)
}

/// One GCRA step for a request of `cost` at `now` (nanoseconds on any clock, as long as
/// it is the one that produced `tat`). Pure: the caller stores `new_tat` when allowed.
pub fn gcra(limit: RateLimit, tat: Option<i128>, now: i128, cost: u32) -> Decision {
    let interval = limit.interval_nanos();
    let window = limit.window_nanos();
    let tat = tat.unwrap_or(now).max(now);
    let new_tat = tat + interval * i128::from(cost);
    let allow_at = new_tat - window;
    let remaining_after = |tat: i128| ((now + window - tat) / interval).clamp(0, i128::from(limit.requests)) as u32;
    if allow_at > now {
        return Decision {
            allowed: false,
            limit: limit.requests,
            remaining: remaining_after(tat),
            reset_after: to_duration(tat - now),
            retry_after: Some(to_duration(allow_at - now)),
            new_tat: tat,
        };
    }
    Decision {
        allowed: true,
        limit: limit.requests,
        remaining: remaining_after(new_tat),
        reset_after: to_duration(new_tat - now),
        retry_after: None,
        new_tat,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SEC: i128 = 1_000_000_000;

    #[test]
    fn burst_then_deny_then_recover() {
        let limit = RateLimit::per(10, Duration::from_secs(60));
        let mut tat = None;
        for i in 0..10 {
            let d = gcra(limit, tat, 0, 1);
            assert!(d.allowed, "request {i}");
            assert_eq!(d.remaining, 9 - i);
            tat = Some(d.new_tat);
        }
        let denied = gcra(limit, tat, 0, 1);
        assert!(!denied.allowed);
        assert_eq!(denied.retry_after, Some(Duration::from_secs(6)));
        // One emission interval later exactly one more is allowed.
        let d = gcra(limit, tat, 6 * SEC, 1);
        assert!(d.allowed);
        assert!(!gcra(limit, Some(d.new_tat), 6 * SEC, 1).allowed);
    }

    #[test]
    fn cost_larger_than_burst_is_never_allowed() {
        let limit = RateLimit::per(5, Duration::from_secs(1));
        assert!(!gcra(limit, None, 0, 6).allowed);
    }

    proptest! {
        /// The GCRA bound: between any two admitted requests `i < j`, at most the burst
        /// plus one request per emission interval elapsed was admitted. In particular
        /// a fresh key admits exactly `requests` at once.
        #[test]
        fn admits_at_most_burst_plus_rate(
            requests in 1u32..50,
            window_s in 1u64..120,
            gaps in proptest::collection::vec(0i128..(2 * SEC), 1..300),
        ) {
            let limit = RateLimit::per(requests, Duration::from_secs(window_s));
            let interval = i128::from(window_s) * SEC / i128::from(requests);
            let mut tat = None;
            let mut now = 0i128;
            let mut admitted: Vec<i128> = Vec::new();
            for gap in gaps {
                now += gap;
                let d = gcra(limit, tat, now, 1);
                if d.allowed {
                    tat = Some(d.new_tat);
                    admitted.push(now);
                } else {
                    prop_assert!(d.retry_after.unwrap() > Duration::ZERO);
                    // Waiting exactly `retry_after` is enough.
                    let later = now + d.retry_after.unwrap().as_nanos() as i128;
                    prop_assert!(gcra(limit, tat, later, 1).allowed);
                }
            }
            for i in 0..admitted.len() {
                for j in i..admitted.len() {
                    let count = (j - i + 1) as i128;
                    let bound = i128::from(requests) + (admitted[j] - admitted[i]) / interval;
                    prop_assert!(count <= bound, "{count} admitted, bound {bound}");
                }
            }
        }
    }
}
