//! Metering: the decisions of the hot path. Core turns a plan's allowance into the
//! window instances to check ([`UsageRequest`]); the store checks and increments them
//! atomically (all windows or none) and records the event; core then explains the
//! answer (remaining, warning at 80%, which plans would allow it).
//! Window arithmetic is pure and lives in [`window`].

pub mod overrides;
pub mod quotas;
pub mod window;

use serde::{Deserialize, Serialize};

use crate::Timestamp;
use crate::ids::{AccountId, LeaseId, ReservationId};
use crate::plans::{Allowance, Catalog, WindowLimit};
use window::Window;

/// Largest amount one request may move (10^15): far above any real use, far enough
/// below `i64::MAX` that sums of counters cannot overflow.
pub const MAX_AMOUNT: i64 = 1_000_000_000_000_000;

/// At or above this share of a limit, answers carry a warning.
pub const WARNING_RATIO: f64 = 0.8;

/// One window instance of a counter, as the store sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowCheck {
    pub window: Window,
    /// `None`: unlimited (still counted, for analytics and the answer).
    pub limit: Option<i64>,
    /// Counter rows whose sum is the usage (one row; several buckets for rolling),
    /// shared (see [`window::rolling_bucket_keys`]).
    pub count_keys: std::sync::Arc<[String]>,
    /// The row a consume increments.
    pub increment_key: String,
    pub resets_at: Option<Timestamp>,
}

impl WindowCheck {
    pub fn for_limit(limit: &WindowLimit, now: Timestamp, anchor: Option<Timestamp>) -> Self {
        let count_keys: std::sync::Arc<[String]> = match limit.window {
            Window::Rolling { seconds } => window::rolling_bucket_keys(seconds, now),
            other => [window::key(other, now, anchor)].into(),
        };
        Self {
            window: limit.window,
            limit: limit.limit,
            // The current instance's key, already built: the last (or only) one counted.
            increment_key: count_keys.last().cloned().unwrap_or_else(|| window::key(limit.window, now, anchor)),
            count_keys,
            resets_at: window::resets_at(limit.window, now, anchor),
        }
    }
}

/// Where a decision came from, for the usage event.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventContext {
    pub endpoint: Option<String>,
    pub metadata: Option<serde_json::Value>,
    pub ip: Option<String>,
}

/// An idempotency key with the fingerprint of the request it belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Idempotency {
    /// What the key is scoped to (the caller and the route), so two integrators'
    /// keys never collide.
    pub scope: String,
    pub key: String,
    /// SHA-256 of the canonical request: same key + other body is refused.
    pub request_hash: String,
}

/// What a usage request does to its windows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UsageOp {
    /// Adds `amount` to every window, all or nothing, within the limits.
    #[default]
    Consume,
    /// Takes `amount` back from every window's current instance, never below zero;
    /// always allowed (work that failed, a refund).
    Refund,
    /// Sets a gauge's level (its one window) to `amount`: raising it must fit the
    /// limit, lowering it is always allowed.
    Set,
}

/// How a reservation ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReservationStatus {
    Pending,
    /// The work succeeded: the (final) amount stays counted.
    Committed,
    /// The work failed: everything is given back.
    Released,
    /// Neither happened in time: everything is given back.
    Expired,
}

crate::identity::str_enum!(ReservationStatus {
    Pending => "pending",
    Committed => "committed",
    Released => "released",
    Expired => "expired",
});

/// A reservation as stored: the windows it counted in, so that settling gives back to
/// the same window instances even after they rolled over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reservation {
    pub id: ReservationId,
    pub account: AccountId,
    pub meter: String,
    pub amount: i64,
    pub windows: Vec<WindowCheck>,
    pub expires_at: Timestamp,
    pub status: ReservationStatus,
}

/// What a usage request does to a reservation, in the same transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReservationAction {
    /// With a consume: when allowed, record a pending reservation of the amount.
    Open { id: ReservationId, expires_at: Timestamp },
    /// With a refund (of what is given back, possibly zero): end this pending
    /// reservation of the account with `status`; `NotFound` unless it is pending.
    Settle { id: ReservationId, status: ReservationStatus },
}

/// A consume (or a dry-run check) of a counter meter.
#[derive(Clone, Debug)]
pub struct UsageRequest {
    pub account: AccountId,
    pub meter: String,
    pub op: UsageOp,
    pub amount: i64,
    pub windows: Vec<WindowCheck>,
    /// Check only: count nothing, record nothing.
    pub dry_run: bool,
    pub idempotency: Option<Idempotency>,
    pub context: EventContext,
    pub now: Timestamp,
    pub reservation: Option<ReservationAction>,
    /// A consume the windows deny is paid with credits instead, when set.
    pub credits: Option<CreditFunding>,
}

/// A meter that draws on the account's credits once its plan window is spent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CreditFunding {
    pub per_unit: i64,
    /// Lowest balance allowed: 0, or minus the plan's overdraft.
    pub floor: i64,
}

impl CreditFunding {
    /// Credits a denied consume of `amount` costs; `None` on overflow (refused).
    pub fn cost(self, amount: i64) -> Option<i64> {
        amount.checked_mul(self.per_unit).filter(|c| *c <= crate::credits::MAX_CREDIT_AMOUNT)
    }

    /// Whether a balance pays `cost` (a dry run's answer).
    pub fn affordable(self, balance: i64, cost: i64) -> bool {
        crate::credits::allowed_amount(balance, -cost, self.floor, crate::credits::Shortfall::Refuse).is_some()
    }

    /// Whether a consume decided `allowed` by the windows should be paid with
    /// credits instead: only consumes (not refunds, gauges or reservations).
    pub fn applies(request: &UsageRequest, allowed: bool) -> Option<(Self, i64)> {
        let funding = request.credits?;
        if allowed || request.op != UsageOp::Consume || request.reservation.is_some() {
            return None;
        }
        Some((funding, funding.cost(request.amount)?))
    }
}

/// An admin's quota reset: counter rows of one account to delete, per meter, so those
/// windows start over from zero; the audit event is written with it.
#[derive(Clone, Debug)]
pub struct CounterReset {
    pub account: AccountId,
    /// (meter, its counter rows): the current instance of each window reset.
    pub counters: Vec<(String, Vec<String>)>,
    pub audit: crate::audit::AuditEvent,
}

/// A request for a slot of a concurrency meter.
#[derive(Clone, Debug)]
pub struct LeaseRequest {
    pub id: LeaseId,
    pub account: AccountId,
    pub meter: String,
    /// Slots allowed at once; `None` unlimited.
    pub max: Option<i64>,
    pub expires_at: Timestamp,
    pub context: EventContext,
    pub now: Timestamp,
    /// A retry with the same key and request replays the first answer (the same
    /// lease) instead of taking another slot.
    pub idempotency: Option<Idempotency>,
}

/// The answer to a lease request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseDecision {
    pub allowed: bool,
    /// Live leases after this request (including the new one when allowed).
    pub held: i64,
    pub max: Option<i64>,
    /// The lease, when allowed.
    pub lease_id: Option<LeaseId>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<Timestamp>,
    /// When denied: when the first live lease expires (a slot frees up at the latest).
    #[serde(with = "time::serde::rfc3339::option")]
    pub next_expiry: Option<Timestamp>,
    /// The stored answer of an earlier request with the same idempotency key.
    #[serde(default)]
    pub replayed: bool,
}

/// One window in an answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowState {
    pub window: Window,
    pub limit: Option<i64>,
    /// Usage after this request (when it was counted) or as it stands (when not).
    pub used: i64,
    pub remaining: Option<i64>,
    #[serde(with = "rfc3339_in_place")]
    pub resets_at: Option<Timestamp>,
    pub warning: bool,
}

/// `time::serde::rfc3339::option`, formatting into a buffer on the stack instead of
/// a new `String`: every usage answer writes one per window.
mod rfc3339_in_place {
    use serde::{Serializer, ser::Error};
    pub use time::serde::rfc3339::option::deserialize;

    use crate::Timestamp;

    pub fn serialize<S: Serializer>(at: &Option<Timestamp>, serializer: S) -> Result<S::Ok, S::Error> {
        let Some(at) = at else { return serializer.serialize_none() };
        // The longest RFC 3339 time is 35 bytes (nanoseconds and an offset).
        let mut buffer = [0u8; 40];
        let mut rest = &mut buffer[..];
        at.format_into(&mut rest, &time::format_description::well_known::Rfc3339).map_err(S::Error::custom)?;
        // What the formatter wrote is what it took off the front of `rest` (its own
        // count leaves out some of its pieces).
        let left = rest.len();
        let written = buffer.len() - left;
        serializer.serialize_some(std::str::from_utf8(&buffer[..written]).map_err(S::Error::custom)?)
    }
}

/// The store's answer to a usage request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageDecision {
    pub allowed: bool,
    pub windows: Vec<WindowState>,
    /// The first window that had no room, when denied.
    pub denied_by: Option<Window>,
    /// True when this answer is the stored answer of an earlier request with the same
    /// idempotency key (nothing was counted again).
    #[serde(default)]
    pub replayed: bool,
    /// Credits this consume cost because its windows were spent (0: within the plan).
    #[serde(default)]
    pub credits_charged: i64,
}

impl WindowState {
    pub fn new(check: &WindowCheck, used: i64) -> Self {
        let remaining = check.limit.map(|l| (l - used).max(0));
        let warning = check.limit.is_some_and(|l| l > 0 && used as f64 >= WARNING_RATIO * l as f64);
        Self { window: check.window, limit: check.limit, used, remaining, resets_at: check.resets_at, warning }
    }
}

/// Decides a request against current usage (`used[i]` for `checks[i]`): allowed only
/// if every limited window has room for `amount`. Pure, shared by both stores so they
/// cannot disagree on the rule.
pub fn decide(checks: &[WindowCheck], used: &[i64], amount: i64) -> (bool, Option<Window>) {
    for (check, used) in checks.iter().zip(used) {
        // An unlimited window still cannot count past what an i64 holds.
        let Some(after) = used.checked_add(amount) else { return (false, Some(check.window)) };
        if check.limit.is_some_and(|limit| after > limit) {
            return (false, Some(check.window));
        }
    }
    (true, None)
}

/// The outcome of a usage operation on current usage, before anything is written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    pub allowed: bool,
    pub denied_by: Option<Window>,
    /// Usage of each window afterwards (unchanged when denied).
    pub after: Vec<i64>,
    /// What to add to each window's increment row (0 when denied).
    pub deltas: Vec<i64>,
}

impl Applied {
    /// A denied consume paid with credits instead: allowed, and the windows stay as
    /// they are (spent), so no counter ever passes its limit.
    pub fn paid_with_credits(&mut self) {
        self.allowed = true;
        self.denied_by = None;
    }

    /// The event to record: `consumed`, `denied`, `released` or `refunded`, and its
    /// (positive) amount.
    pub fn event(&self, op: UsageOp, amount: i64) -> (&'static str, i64) {
        let moved = self.deltas.first().copied().unwrap_or(0);
        match (self.allowed, op) {
            (false, _) => ("denied", amount),
            (true, UsageOp::Consume) => ("consumed", amount),
            (true, UsageOp::Refund) => ("refunded", -moved),
            (true, UsageOp::Set) if moved >= 0 => ("consumed", moved),
            (true, UsageOp::Set) => ("released", -moved),
        }
    }
}

/// Applies `op` with `amount` to windows whose usage is `used`: the one rule both
/// stores follow for every kind of change.
pub fn apply(op: UsageOp, checks: &[WindowCheck], used: &[i64], amount: i64) -> Applied {
    match op {
        UsageOp::Consume => {
            let (allowed, denied_by) = decide(checks, used, amount);
            let delta = if allowed { amount } else { 0 };
            Applied {
                allowed,
                denied_by,
                after: used.iter().map(|u| u + delta).collect(),
                deltas: vec![delta; used.len()],
            }
        }
        UsageOp::Refund => {
            let deltas: Vec<i64> = used.iter().map(|u| -amount.min((*u).max(0))).collect();
            Applied {
                allowed: true,
                denied_by: None,
                after: used.iter().zip(&deltas).map(|(u, d)| u + d).collect(),
                deltas,
            }
        }
        UsageOp::Set => {
            let over = checks.iter().zip(used).find(|(c, u)| amount > **u && c.limit.is_some_and(|l| amount > l));
            match over {
                Some((check, _)) => Applied {
                    allowed: false,
                    denied_by: Some(check.window),
                    after: used.to_vec(),
                    deltas: vec![0; used.len()],
                },
                None => Applied {
                    allowed: true,
                    denied_by: None,
                    after: vec![amount; used.len()],
                    deltas: used.iter().map(|u| amount - u).collect(),
                },
            }
        }
    }
}

/// The counter windows of `meter` under `allowance`, or `None` when the plan does not
/// allow the meter at all (treated as a limit of zero by the caller).
pub fn counter_checks(
    allowance: Option<&Allowance>,
    now: Timestamp,
    anchor: Option<Timestamp>,
) -> Option<Vec<WindowCheck>> {
    match allowance {
        Some(Allowance::Counter { windows }) => {
            Some(windows.iter().map(|w| WindowCheck::for_limit(w, now, anchor)).collect())
        }
        _ => None,
    }
}

/// Plans (in display order) under which `amount` more would fit, given the usage per
/// window in `windows`: what an upgrade would give.
pub fn plans_that_allow(catalog: &Catalog, meter: &str, windows: &[WindowState], amount: i64) -> Vec<String> {
    catalog
        .public_plans()
        .into_iter()
        .filter(|plan| match plan.allowances.get(meter) {
            Some(Allowance::Counter { windows: limits }) => windows.iter().all(|state| {
                // A window the plan does not limit is unlimited under it.
                limits.iter().find(|l| l.window == state.window).and_then(|l| l.limit).is_none_or(|l| {
                    let used_before = if state.remaining.is_some() { state.used } else { 0 };
                    used_before + amount <= l
                })
            }),
            _ => false,
        })
        .map(|p| p.key.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Reset times serialise exactly as `time::serde::rfc3339` writes them, and read back.
        #[test]
        fn reset_times_serialise_as_time_does(secs in -62_000_000_000i64..250_000_000_000, nanos in 0u32..1_000_000_000, whole: bool, offset in -86_399i32..86_400) {
            let at = time::OffsetDateTime::from_unix_timestamp(secs).unwrap()
                + time::Duration::nanoseconds(if whole { 0 } else { i64::from(nanos) });
            for at in [at, at.to_offset(time::UtcOffset::from_whole_seconds(offset - offset % 60).unwrap())] {
                let state = WindowState { window: Window::Day, limit: None, used: 0, remaining: None, resets_at: Some(at), warning: false };
                let json = serde_json::to_value(&state).unwrap();
                let expected = at.format(&time::format_description::well_known::Rfc3339);
                match expected {
                    Ok(expected) => {
                        proptest::prop_assert_eq!(json["resets_at"].as_str(), Some(expected.as_str()));
                        let back: WindowState = serde_json::from_value(json).unwrap();
                        proptest::prop_assert_eq!(back.resets_at, Some(at));
                    }
                    // Years before 0000 or after 9999 are not RFC 3339 for either.
                    Err(_) => proptest::prop_assert!(serde_json::to_value(&state).is_err()),
                }
            }
            let none = WindowState { window: Window::Day, limit: None, used: 0, remaining: None, resets_at: None, warning: false };
            proptest::prop_assert_eq!(&serde_json::to_value(&none).unwrap()["resets_at"], &serde_json::Value::Null);
        }
    }

    fn check(limit: Option<i64>, window: Window) -> WindowCheck {
        WindowCheck { window, limit, count_keys: ["k".into()].into(), increment_key: "k".into(), resets_at: None }
    }

    #[test]
    fn all_windows_must_have_room() {
        let checks = [check(Some(5), Window::Day), check(Some(150), Window::Month)];
        assert_eq!(decide(&checks, &[4, 100], 1), (true, None));
        assert_eq!(decide(&checks, &[5, 100], 1), (false, Some(Window::Day)));
        assert_eq!(decide(&checks, &[0, 150], 1), (false, Some(Window::Month)));
        assert_eq!(decide(&[check(None, Window::Day)], &[1_000_000], 1), (true, None), "unlimited");
        assert_eq!(
            decide(&[check(None, Window::Day)], &[i64::MAX], 1),
            (false, Some(Window::Day)),
            "but never past i64"
        );
    }

    #[test]
    fn refunds_never_go_below_zero_and_sets_fit_the_limit() {
        let checks = [check(Some(10), Window::Lifetime)];
        let refund = apply(UsageOp::Refund, &checks, &[3], 5);
        assert_eq!((refund.allowed, refund.after.clone(), refund.deltas.clone()), (true, vec![0], vec![-3]));
        assert_eq!(refund.event(UsageOp::Refund, 5), ("refunded", 3));
        let raise = apply(UsageOp::Set, &checks, &[3], 10);
        assert_eq!((raise.allowed, raise.deltas.clone()), (true, vec![7]));
        let over = apply(UsageOp::Set, &checks, &[3], 11);
        assert_eq!((over.allowed, over.denied_by), (false, Some(Window::Lifetime)));
        // Lowering is allowed even above a limit that shrank (a downgrade).
        let lower = apply(UsageOp::Set, &checks, &[15], 12);
        assert_eq!((lower.allowed, lower.deltas.clone()), (true, vec![-3]));
        assert_eq!(lower.event(UsageOp::Set, 12), ("released", 3));
    }

    #[test]
    fn warning_at_eighty_percent() {
        let c = check(Some(10), Window::Day);
        assert!(!WindowState::new(&c, 7).warning);
        assert!(WindowState::new(&c, 8).warning);
        assert_eq!(WindowState::new(&c, 12).remaining, Some(0));
        assert!(!WindowState::new(&check(None, Window::Day), 1_000).warning);
    }
}
