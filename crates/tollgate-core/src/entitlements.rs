//! Which plan applies to an account right now, and what it is entitled to.

use crate::Timestamp;
use crate::accounts::Subscription;
use crate::metering::window::{self, Window};
use crate::plans::{Catalog, Plan};

/// The plan in force: the subscription's while it is live, switching by itself to a
/// scheduled plan (or, when canceling at period end, to the default plan) once
/// `scheduled_at` has passed; otherwise the default plan. A plan no longer in the
/// catalog also falls back to the default.
pub fn effective_plan<'c>(catalog: &'c Catalog, subscription: Option<&Subscription>, now: Timestamp) -> &'c Plan {
    let default = catalog.default_plan();
    let Some(s) = subscription.filter(|s| s.status.is_live()) else { return default };
    let due = s.scheduled_at.is_some_and(|at| at <= now);
    if due && s.cancel_at_period_end {
        return default;
    }
    let key = match (&s.scheduled_plan, due) {
        (Some(scheduled), true) => scheduled,
        _ => &s.plan,
    };
    catalog.plans.get(key).unwrap_or(default)
}

/// The key of the plan in force (see [`effective_plan`]), or `None` on the default
/// plan because there is no live subscription.
pub fn effective_plan_key(subscription: Option<&Subscription>, now: Timestamp) -> Option<String> {
    let s = subscription.filter(|s| s.status.is_live())?;
    let due = s.scheduled_at.is_some_and(|at| at <= now);
    if due && s.cancel_at_period_end {
        return None;
    }
    Some(match (&s.scheduled_plan, due) {
        (Some(scheduled), true) => scheduled.clone(),
        _ => s.plan.clone(),
    })
}

/// The anchor of the account's billing periods (its subscription start), if any.
pub fn billing_anchor(subscription: Option<&Subscription>) -> Option<Timestamp> {
    subscription.filter(|s| s.status.is_live()).map(|s| s.started_at)
}

/// When the billing period containing `now` ends for a subscription started at
/// `started_at`: where scheduled changes take effect.
pub fn period_end(started_at: Timestamp, now: Timestamp) -> Timestamp {
    window::span(Window::BillingPeriod, now, Some(started_at)).end.unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accounts::SubscriptionStatus;
    use crate::ids::AccountId;

    fn catalog() -> Catalog {
        let mut catalog = Catalog::builtin();
        for key in ["pro", "max"] {
            let mut plan = catalog.default_plan().clone();
            plan.key = key.into();
            plan.default = false;
            catalog.plans.insert(key.into(), plan);
        }
        catalog
    }

    fn sub(plan: &str, now: Timestamp) -> Subscription {
        Subscription {
            account_id: AccountId::new(),
            plan: plan.into(),
            status: SubscriptionStatus::Active,
            provider: "manual".into(),
            started_at: now,
            trial_ends_at: None,
            cancel_at_period_end: false,
            scheduled_plan: None,
            scheduled_at: None,
            updated_at: now,
            provider_subscription_id: None,
            provider_state_at: None,
        }
    }

    #[test]
    fn scheduled_changes_happen_by_themselves() {
        let catalog = catalog();
        let start = time::macros::datetime!(2026-01-31 12:00 UTC);
        let mut s = sub("max", start);
        assert_eq!(effective_plan(&catalog, Some(&s), start).key, "max");
        // A downgrade at the end of the period: Feb 28, the anchor clamped.
        let end = period_end(start, start + time::Duration::days(3));
        assert_eq!(end, time::macros::datetime!(2026-02-28 12:00 UTC));
        s.scheduled_plan = Some("pro".into());
        s.scheduled_at = Some(end);
        assert_eq!(effective_plan(&catalog, Some(&s), end - time::Duration::seconds(1)).key, "max");
        assert_eq!(effective_plan(&catalog, Some(&s), end).key, "pro");
        // Canceling at period end falls back to the default plan then.
        s.scheduled_plan = None;
        s.cancel_at_period_end = true;
        assert_eq!(effective_plan(&catalog, Some(&s), end - time::Duration::seconds(1)).key, "max");
        assert_eq!(effective_plan(&catalog, Some(&s), end).key, "free");
        assert_eq!(effective_plan_key(Some(&s), end), None);
        s.status = SubscriptionStatus::Canceled;
        assert_eq!(effective_plan(&catalog, Some(&s), start).key, "free");
    }
}
