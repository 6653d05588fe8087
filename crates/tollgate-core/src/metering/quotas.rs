//! `Quotas`: the metering use cases over a store and a catalog — check and consume a
//! meter for an account, and the account's entitlements with usage.

use std::sync::Arc;

use serde::Serialize;

use super::overrides::{LimitOverrides, OverrideBook};
use super::window::Window;
use super::{
    EventContext, Idempotency, LeaseDecision, LeaseRequest, ReservationAction, ReservationStatus, UsageDecision,
    UsageOp, UsageRequest, WindowCheck, WindowState, counter_checks, plans_that_allow,
};
use crate::accounts::Account;
use crate::entitlements::{billing_anchor, effective_plan};
use crate::ids::{AccountId, LeaseId, ReservationId};
use crate::plans::{Allowance, Catalog, Meter, MeterKind, Plan};
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    #[error("no meter named {0:?}")]
    UnknownMeter(String),
    #[error("{0:?} meters do not support {1:?}")]
    UnsupportedKind(MeterKind, UsageOp),
    #[error("amount must be a positive integer")]
    InvalidAmount,
    #[error("account not found")]
    AccountNotFound,
    #[error("no live lease with this id for this account")]
    LeaseNotFound,
    #[error("no pending reservation with this id for this account")]
    ReservationNotFound,
    #[error("the final amount exceeds the reservation")]
    CommitExceedsReservation,
    #[error("idempotency key already used for another request")]
    IdempotencyKeyReused,
    #[error("no counter of this meter has this window under the account's plan")]
    NothingToReset,
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for QuotaError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => QuotaError::AccountNotFound,
            StoreError::Conflict("idempotency_key") => QuotaError::IdempotencyKeyReused,
            other => QuotaError::Store(other),
        }
    }
}

/// A check or consume as asked, for an account the caller has already loaded (which
/// is how `Quotas` knows it exists without reading it again).
#[derive(Clone, Debug)]
pub struct ConsumeInput {
    pub meter: String,
    pub op: super::UsageOp,
    /// A reservation to open with this consume (`/v1/usage/reserve`).
    pub reservation: Option<ReservationAction>,
    pub amount: i64,
    pub dry_run: bool,
    pub idempotency: Option<Idempotency>,
    pub context: EventContext,
}

/// The decision and what explains it.
#[derive(Clone, Debug)]
pub struct ConsumeOutcome {
    pub decision: UsageDecision,
    pub plan: String,
    pub meter: Meter,
    /// Plans (in display order) under which the request would have been allowed; empty
    /// when it was allowed or no plan would help.
    pub upgrade_plans: Vec<String>,
}

/// One meter in an entitlements answer.
#[derive(Clone, Debug, Serialize)]
pub struct MeterEntitlement {
    pub meter: String,
    pub kind: MeterKind,
    /// Counters: each window's limit (`null`: unlimited), use and reset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub windows: Option<Vec<WindowState>>,
    /// Caps, gauges and concurrency: the largest amount or level (`null`: unlimited).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max: Option<Option<i64>>,
    /// Flags.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// An admin's override for this account replaces the plan's allowance (until
    /// `limit_overrides.expires_at`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub overridden: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Entitlements {
    pub account: Account,
    pub plan: String,
    /// The subscription behind `plan` (with any scheduled change), if any.
    pub subscription: Option<crate::accounts::Subscription>,
    pub features: std::collections::BTreeMap<String, serde_json::Value>,
    pub meters: Vec<MeterEntitlement>,
    /// Every counter has room for at least one more unit in every window.
    pub can_consume: bool,
    /// Some counter is exhausted in some window: only an upgrade (or waiting) helps.
    pub needs_upgrade: bool,
    /// Whether an admin's limit overrides apply (`overridden` marks the meters).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit_overrides: Option<OverridesInForce>,
}

/// What an account (and its users) may know of its overrides: which meters and until
/// when; the reason and who set them are for admins (`/v1/admin/accounts/{id}/limits`).
#[derive(Clone, Debug, Serialize)]
pub struct OverridesInForce {
    pub meters: Vec<String>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<time::OffsetDateTime>,
}

/// What applies to an account now: its plan and any overrides in force.
struct Terms<'c> {
    plan: &'c Plan,
    overrides: Option<Arc<LimitOverrides>>,
    now: time::OffsetDateTime,
}

impl Terms<'_> {
    /// The allowance in force for a meter (the override's, else the plan's) and
    /// whether it is an override.
    fn allowance(&self, key: &str, meter: &Meter) -> (Option<&Allowance>, bool) {
        match self.overrides.as_deref().and_then(|o| o.allowance(key, meter.kind, self.now)) {
            Some(a) => (Some(a), true),
            None => (self.plan.allowances.get(key), false),
        }
    }
}

/// The single window of a gauge (its level), or of a counter the plan omits.
fn gauge_window(limit: Option<i64>) -> WindowCheck {
    WindowCheck {
        window: Window::Lifetime,
        limit,
        count_keys: ["g".into()].into(),
        increment_key: "g".into(),
        resets_at: None,
    }
}

/// Public plans whose allowance for `meter` satisfies `test`, in display order.
fn allowing(catalog: &Catalog, meter: &str, test: impl Fn(&Allowance) -> bool) -> Vec<String> {
    catalog
        .public_plans()
        .into_iter()
        .filter(|p| p.allowances.get(meter).is_some_and(&test))
        .map(|p| p.key.clone())
        .collect()
}

#[derive(Clone)]
pub struct Quotas {
    store: Arc<dyn Store>,
    overrides: OverrideBook,
}

impl Quotas {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store, overrides: OverrideBook::default() }
    }

    /// Reloads every account's overrides in force (at start, then every
    /// [`super::overrides::RELOAD_EVERY`]).
    pub async fn reload_overrides(&self) -> Result<(), QuotaError> {
        let read_after = self.overrides.generation();
        let all = self.store.limit_overrides_in_force(time::OffsetDateTime::now_utc()).await?;
        self.overrides.replace(read_after, all);
        Ok(())
    }

    /// Sets (or, with no limits, clears) an account's overrides with their audit
    /// event, and applies them on this node at once.
    pub async fn set_overrides(
        &self,
        account: AccountId,
        overrides: Option<LimitOverrides>,
        audit: crate::audit::AuditEvent,
    ) -> Result<(), QuotaError> {
        self.store.set_limit_overrides(account, overrides.clone(), audit).await?;
        let now = time::OffsetDateTime::now_utc();
        self.overrides.put(account, overrides.filter(|o| o.in_force(now)));
        Ok(())
    }

    async fn terms<'c>(
        &self,
        catalog: &'c Catalog,
        account: AccountId,
    ) -> Result<(Option<crate::accounts::Subscription>, Terms<'c>), QuotaError> {
        let subscription = self.store.subscription(account).await?;
        let now = time::OffsetDateTime::now_utc();
        let plan = effective_plan(catalog, subscription.as_ref(), now);
        Ok((subscription, Terms { plan, overrides: self.overrides.get(account), now }))
    }

    /// Checks (dry run) or consumes `amount` of a meter, atomically across all its
    /// windows. Counters count; caps and flags only decide.
    pub async fn consume(
        &self,
        catalog: &Catalog,
        account: &Account,
        input: ConsumeInput,
    ) -> Result<ConsumeOutcome, QuotaError> {
        // A gauge may be set to zero; everything else moves by a positive amount.
        if input.amount < 0 || input.amount > super::MAX_AMOUNT || (input.amount == 0 && input.op != UsageOp::Set) {
            return Err(QuotaError::InvalidAmount);
        }
        let meter = catalog.meters.get(&input.meter).ok_or_else(|| QuotaError::UnknownMeter(input.meter.clone()))?;
        let (subscription, terms) = self.terms(catalog, account.id).await?;
        let (plan, now) = (terms.plan, terms.now);
        let (allowance, _) = terms.allowance(&input.meter, meter);
        let windows = match (meter.kind, input.op) {
            // A plan that does not list a counter allows none of it.
            (MeterKind::Counter, UsageOp::Consume | UsageOp::Refund) => {
                counter_checks(allowance, now, billing_anchor(subscription.as_ref()))
                    .unwrap_or_else(|| vec![gauge_window(Some(0))])
            }
            // A gauge is one level with the plan's maximum.
            (MeterKind::Gauge, _) => vec![gauge_window(match allowance {
                Some(Allowance::Gauge { max }) => *max,
                _ => Some(0),
            })],
            (MeterKind::Cap | MeterKind::Flag, UsageOp::Consume) => {
                return self.check_entitlement(catalog, meter, plan, allowance, &input).await;
            }
            (kind, op) => return Err(QuotaError::UnsupportedKind(kind, op)),
        };
        let amount = input.amount;
        let request = UsageRequest {
            account: account.id,
            meter: input.meter.clone(),
            op: input.op,
            amount,
            windows,
            dry_run: input.dry_run,
            idempotency: input.idempotency,
            context: input.context,
            now,
            credits: meter
                .credits_per_unit
                .map(|per_unit| super::CreditFunding { per_unit, floor: -plan.credits_overdraft }),
            reservation: input.reservation,
        };
        let decision = self.store.consume_usage(request).await?;
        let upgrade_plans = if decision.allowed {
            vec![]
        } else if meter.kind == MeterKind::Counter {
            plans_that_allow(catalog, &input.meter, &decision.windows, amount)
        } else {
            // A gauge: the level it would reach.
            let level = if input.op == UsageOp::Set {
                amount
            } else {
                decision.windows.first().map_or(0, |w| w.used).saturating_add(amount)
            };
            allowing(catalog, &input.meter, |a| matches!(a, Allowance::Gauge { max } if max.is_none_or(|m| level <= m)))
        };
        Ok(ConsumeOutcome { decision, plan: plan.key.clone(), meter: meter.clone(), upgrade_plans })
    }

    /// Takes a slot of a concurrency meter for `lease_seconds` (default: the meter's
    /// `lease_seconds`, else one hour). Returns the decision, the plan, and when denied
    /// the plans with more slots.
    pub async fn acquire(
        &self,
        catalog: &Catalog,
        account: AccountId,
        meter_key: &str,
        lease_seconds: Option<u64>,
        context: EventContext,
        idempotency: Option<Idempotency>,
    ) -> Result<(LeaseDecision, String, Vec<String>), QuotaError> {
        let meter = catalog.meters.get(meter_key).ok_or_else(|| QuotaError::UnknownMeter(meter_key.to_owned()))?;
        if meter.kind != MeterKind::Concurrency {
            return Err(QuotaError::UnsupportedKind(meter.kind, UsageOp::Consume));
        }
        let (_, terms) = self.terms(catalog, account).await?;
        let (plan, now) = (terms.plan, terms.now);
        let max = match terms.allowance(meter_key, meter).0 {
            Some(Allowance::Concurrency { max }) => *max,
            _ => Some(0),
        };
        let seconds = lease_seconds.or(meter.lease_seconds).unwrap_or(3600).clamp(1, 7 * 24 * 3600);
        let request = LeaseRequest {
            id: LeaseId::new(),
            account,
            meter: meter_key.to_owned(),
            max,
            expires_at: now + time::Duration::seconds(seconds as i64),
            context,
            now,
            idempotency,
        };
        let decision = self.store.acquire_lease(request).await?;
        let upgrade_plans = if decision.allowed {
            vec![]
        } else {
            let needed = decision.held + 1;
            allowing(
                catalog,
                meter_key,
                |a| matches!(a, Allowance::Concurrency { max } if max.is_none_or(|m| needed <= m)),
            )
        };
        Ok((decision, plan.key.clone(), upgrade_plans))
    }

    /// Ends a pending reservation: `Committed` keeps `final_amount` (default: all) and
    /// gives the rest back; `Released` and `Expired` give everything back — to the
    /// window instances the reservation counted in.
    pub async fn settle(
        &self,
        account: AccountId,
        id: ReservationId,
        status: ReservationStatus,
        final_amount: Option<i64>,
        idempotency: Option<Idempotency>,
    ) -> Result<UsageDecision, QuotaError> {
        let reservation = self.store.reservation(account, id).await?.filter(|r| r.status == ReservationStatus::Pending);
        let Some(reservation) = reservation else {
            // A retry of a settle that went through finds the reservation settled; the
            // settle stored its answer in the same transaction, so it is there to
            // replay. (Two attempts that both find it pending are sorted out by the
            // store's claim of the key: one settles, the other replays.)
            if let Some(idem) = &idempotency
                && let Some((hash, mut decision)) = self.store.idempotent_answer(&idem.scope, &idem.key).await?
            {
                if hash != idem.request_hash {
                    return Err(QuotaError::IdempotencyKeyReused);
                }
                decision.replayed = true;
                return Ok(decision);
            }
            return Err(QuotaError::ReservationNotFound);
        };
        let keep = match status {
            ReservationStatus::Committed => final_amount.unwrap_or(reservation.amount),
            _ => 0,
        };
        if keep < 0 || keep > reservation.amount {
            return Err(QuotaError::CommitExceedsReservation);
        }
        let request = UsageRequest {
            account,
            meter: reservation.meter,
            op: UsageOp::Refund,
            amount: reservation.amount - keep,
            windows: reservation.windows,
            dry_run: false,
            idempotency,
            context: EventContext::default(),
            now: time::OffsetDateTime::now_utc(),
            reservation: Some(ReservationAction::Settle { id, status }),
            credits: None,
        };
        self.store.consume_usage(request).await.map_err(|e| match e {
            StoreError::NotFound => QuotaError::ReservationNotFound,
            other => other.into(),
        })
    }

    /// Gives back every reservation whose time ran out; returns how many. Called
    /// periodically by the server.
    pub async fn expire_reservations(&self) -> Result<usize, QuotaError> {
        let mut expired = 0;
        loop {
            let batch = self.store.expired_reservations(time::OffsetDateTime::now_utc(), 100).await?;
            if batch.is_empty() {
                return Ok(expired);
            }
            for r in batch {
                match self.settle(r.account, r.id, ReservationStatus::Expired, None, None).await {
                    Ok(_) | Err(QuotaError::ReservationNotFound) => expired += 1,
                    Err(e) => return Err(e),
                }
            }
        }
    }

    /// Releases a lease held by `account`.
    /// Frees a lease; true when this repeats an earlier release with the same key.
    pub async fn release(
        &self,
        account: AccountId,
        lease: LeaseId,
        idempotency: Option<super::Idempotency>,
    ) -> Result<bool, QuotaError> {
        let now = time::OffsetDateTime::now_utc();
        self.store.release_lease(account, lease, now, idempotency).await.map_err(|e| match e {
            StoreError::NotFound => QuotaError::LeaseNotFound,
            other => other.into(),
        })
    }

    /// Caps and flags decide without counting.
    async fn check_entitlement(
        &self,
        catalog: &Catalog,
        meter: &Meter,
        plan: &crate::plans::Plan,
        allowance: Option<&Allowance>,
        input: &ConsumeInput,
    ) -> Result<ConsumeOutcome, QuotaError> {
        let amount = input.amount;
        let fits = |a: &Allowance| match a {
            Allowance::Cap { max } => max.is_none_or(|m| amount <= m),
            Allowance::Flag { enabled } => *enabled,
            _ => false,
        };
        let allowed = allowance.is_some_and(fits);
        let upgrade_plans = if allowed { vec![] } else { allowing(catalog, &input.meter, fits) };
        let decision = UsageDecision { allowed, windows: vec![], denied_by: None, replayed: false, credits_charged: 0 };
        Ok(ConsumeOutcome { decision, plan: plan.key.clone(), meter: meter.clone(), upgrade_plans })
    }

    /// The counter rows a quota reset of `account` clears: the current instance of
    /// every window (or only `window`) of every counter and gauge meter (or only
    /// `meter`) under the plan in force. An unknown meter, or a window the meter does
    /// not have under that plan, is an error: a reset that resets nothing is a typo.
    pub async fn reset_targets(
        &self,
        catalog: &Catalog,
        account: &Account,
        meter: Option<&str>,
        window: Option<Window>,
    ) -> Result<Vec<(String, Vec<String>)>, QuotaError> {
        if let Some(m) = meter
            && !catalog.meters.contains_key(m)
        {
            return Err(QuotaError::UnknownMeter(m.to_owned()));
        }
        let (subscription, terms) = self.terms(catalog, account.id).await?;
        let now = terms.now;
        let anchor = billing_anchor(subscription.as_ref());
        let mut targets = Vec::new();
        for (key, m) in &catalog.meters {
            if meter.is_some_and(|wanted| wanted != key) {
                continue;
            }
            let checks = match m.kind {
                MeterKind::Counter => counter_checks(terms.allowance(key, m).0, now, anchor).unwrap_or_default(),
                MeterKind::Gauge => vec![gauge_window(None)],
                _ => continue,
            };
            let keys: Vec<String> = checks
                .into_iter()
                .filter(|c| window.is_none_or(|w| w == c.window))
                .flat_map(|c| c.count_keys.to_vec())
                .collect();
            if !keys.is_empty() {
                targets.push((key.clone(), keys));
            }
        }
        if targets.is_empty() && (meter.is_some() || window.is_some()) {
            return Err(QuotaError::NothingToReset);
        }
        Ok(targets)
    }

    /// The account's plan, features and every meter's allowance with current usage.
    pub async fn entitlements(&self, catalog: &Catalog, account: Account) -> Result<Entitlements, QuotaError> {
        let (subscription, terms) = self.terms(catalog, account.id).await?;
        let (plan, now) = (terms.plan, terms.now);
        let anchor = billing_anchor(subscription.as_ref());
        let mut meters = Vec::new();
        let (mut can_consume, mut needs_upgrade) = (true, false);
        for (key, meter) in &catalog.meters {
            let (allowance, overridden) = terms.allowance(key, meter);
            let mut entry = MeterEntitlement {
                meter: key.clone(),
                kind: meter.kind,
                windows: None,
                max: None,
                enabled: None,
                overridden,
            };
            match (meter.kind, allowance) {
                (MeterKind::Counter, _) => {
                    let checks = counter_checks(allowance, now, anchor).unwrap_or_default();
                    let keys: Vec<Vec<String>> = checks.iter().map(|c| c.count_keys.to_vec()).collect();
                    let used = self.store.counter_values(account.id, key, &keys).await?;
                    let windows: Vec<WindowState> =
                        checks.iter().zip(used).map(|(c, u)| WindowState::new(c, u)).collect();
                    if allowance.is_none() || windows.iter().any(|w| w.remaining == Some(0)) {
                        can_consume = false;
                        needs_upgrade = true;
                    }
                    entry.windows = Some(windows);
                }
                (MeterKind::Gauge, allowance) => {
                    let max = match allowance {
                        Some(Allowance::Gauge { max }) => *max,
                        _ => Some(0),
                    };
                    let window = gauge_window(max);
                    let level = self.store.counter_values(account.id, key, &[window.count_keys.to_vec()]).await?;
                    entry.max = Some(max);
                    entry.windows = Some(vec![WindowState::new(&window, level[0])]);
                }
                (MeterKind::Flag, allowance) => {
                    entry.enabled = Some(matches!(allowance, Some(Allowance::Flag { enabled: true })));
                }
                (_, Some(Allowance::Cap { max } | Allowance::Gauge { max } | Allowance::Concurrency { max })) => {
                    entry.max = Some(*max);
                }
                (_, _) => entry.max = Some(Some(0)),
            }
            meters.push(entry);
        }
        Ok(Entitlements {
            account,
            plan: plan.key.clone(),
            subscription: subscription.clone(),
            features: plan.features.clone(),
            meters,
            can_consume,
            needs_upgrade,
            limit_overrides: terms
                .overrides
                .as_deref()
                .filter(|o| o.in_force(now))
                .map(|o| OverridesInForce { meters: o.limits.keys().cloned().collect(), expires_at: o.expires_at }),
        })
    }
}
