//! `Quotas`: the metering use cases over a store and a catalog — check and consume a
//! meter for an account, and the account's entitlements with usage.

use std::sync::Arc;

use serde::Serialize;

use super::{EventContext, Idempotency, UsageDecision, UsageRequest, WindowState, counter_checks, plans_that_allow};
use crate::accounts::Account;
use crate::entitlements::{billing_anchor, effective_plan};
use crate::ids::AccountId;
use crate::plans::{Allowance, Catalog, Meter, MeterKind};
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    #[error("no meter named {0:?}")]
    UnknownMeter(String),
    #[error("{0:?} meters are not consumed this way")]
    UnsupportedKind(MeterKind),
    #[error("amount must be a positive integer")]
    InvalidAmount,
    #[error("account not found")]
    AccountNotFound,
    #[error("idempotency key already used for another request")]
    IdempotencyKeyReused,
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

/// A check or consume as asked.
#[derive(Clone, Debug)]
pub struct ConsumeInput {
    pub account: AccountId,
    pub meter: String,
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
}

#[derive(Clone, Debug, Serialize)]
pub struct Entitlements {
    pub account: Account,
    pub plan: String,
    pub features: std::collections::BTreeMap<String, serde_json::Value>,
    pub meters: Vec<MeterEntitlement>,
    /// Every counter has room for at least one more unit in every window.
    pub can_consume: bool,
    /// Some counter is exhausted in some window: only an upgrade (or waiting) helps.
    pub needs_upgrade: bool,
}

#[derive(Clone)]
pub struct Quotas {
    store: Arc<dyn Store>,
}

impl Quotas {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }

    /// Checks (dry run) or consumes `amount` of a meter, atomically across all its
    /// windows. Counters count; caps and flags only decide.
    pub async fn consume(&self, catalog: &Catalog, input: ConsumeInput) -> Result<ConsumeOutcome, QuotaError> {
        if input.amount <= 0 {
            return Err(QuotaError::InvalidAmount);
        }
        let meter = catalog.meters.get(&input.meter).ok_or_else(|| QuotaError::UnknownMeter(input.meter.clone()))?;
        if input.dry_run && self.store.account_by_id(input.account).await?.is_none() {
            // A consume learns this from the store's foreign key; a check reads only.
            return Err(QuotaError::AccountNotFound);
        }
        let subscription = self.store.subscription(input.account).await?;
        let now = time::OffsetDateTime::now_utc();
        let plan = effective_plan(catalog, subscription.as_ref(), now);
        let allowance = plan.allowances.get(&input.meter);
        let decision = match meter.kind {
            MeterKind::Counter => {
                // A plan that does not list a counter allows none of it.
                let windows =
                    counter_checks(allowance, now, billing_anchor(subscription.as_ref())).unwrap_or_else(|| {
                        vec![super::WindowCheck {
                            window: super::window::Window::Lifetime,
                            limit: Some(0),
                            count_keys: vec!["l".into()],
                            increment_key: "l".into(),
                            resets_at: None,
                        }]
                    });
                let request = UsageRequest {
                    account: input.account,
                    meter: input.meter.clone(),
                    amount: input.amount,
                    windows,
                    dry_run: input.dry_run,
                    idempotency: input.idempotency,
                    context: input.context,
                    now,
                };
                self.store.consume_usage(request).await?
            }
            MeterKind::Cap | MeterKind::Flag => {
                if self.store.account_by_id(input.account).await?.is_none() {
                    return Err(QuotaError::AccountNotFound);
                }
                let allowed = match allowance {
                    Some(Allowance::Cap { max }) => max.is_none_or(|m| input.amount <= m),
                    Some(Allowance::Flag { enabled }) => *enabled,
                    _ => false,
                };
                UsageDecision { allowed, windows: vec![], denied_by: None, replayed: false }
            }
            kind @ (MeterKind::Gauge | MeterKind::Concurrency) => return Err(QuotaError::UnsupportedKind(kind)),
        };
        let upgrade_plans = if decision.allowed {
            vec![]
        } else {
            match meter.kind {
                MeterKind::Counter => plans_that_allow(catalog, &input.meter, &decision.windows, input.amount),
                _ => catalog
                    .public_plans()
                    .into_iter()
                    .filter(|p| match p.allowances.get(&input.meter) {
                        Some(Allowance::Cap { max }) => max.is_none_or(|m| input.amount <= m),
                        Some(Allowance::Flag { enabled }) => *enabled,
                        _ => false,
                    })
                    .map(|p| p.key.clone())
                    .collect(),
            }
        };
        Ok(ConsumeOutcome { decision, plan: plan.key.clone(), meter: meter.clone(), upgrade_plans })
    }

    /// The account's plan, features and every meter's allowance with current usage.
    pub async fn entitlements(&self, catalog: &Catalog, account: Account) -> Result<Entitlements, QuotaError> {
        let subscription = self.store.subscription(account.id).await?;
        let now = time::OffsetDateTime::now_utc();
        let plan = effective_plan(catalog, subscription.as_ref(), now);
        let anchor = billing_anchor(subscription.as_ref());
        let mut meters = Vec::new();
        let (mut can_consume, mut needs_upgrade) = (true, false);
        for (key, meter) in &catalog.meters {
            let allowance = plan.allowances.get(key);
            let mut entry =
                MeterEntitlement { meter: key.clone(), kind: meter.kind, windows: None, max: None, enabled: None };
            match (meter.kind, allowance) {
                (MeterKind::Counter, _) => {
                    let checks = counter_checks(allowance, now, anchor).unwrap_or_default();
                    let keys: Vec<Vec<String>> = checks.iter().map(|c| c.count_keys.clone()).collect();
                    let used = self.store.counter_values(account.id, key, &keys).await?;
                    let windows: Vec<WindowState> =
                        checks.iter().zip(used).map(|(c, u)| WindowState::new(c, u)).collect();
                    if allowance.is_none() || windows.iter().any(|w| w.remaining == Some(0)) {
                        can_consume = false;
                        needs_upgrade = true;
                    }
                    entry.windows = Some(windows);
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
            features: plan.features.clone(),
            meters,
            can_consume,
            needs_upgrade,
        })
    }
}
