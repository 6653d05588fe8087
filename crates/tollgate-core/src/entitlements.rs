//! Which plan applies to an account right now, and what it is entitled to.

use crate::Timestamp;
use crate::accounts::Subscription;
use crate::metering::window::{self, Window};
use crate::plans::{Catalog, Plan};

/// The plan in force: the subscription's while it is live (and, when it cancels at
/// period end, until that end), otherwise the default plan. A plan that is no longer in
/// the catalog also falls back to the default.
pub fn effective_plan<'c>(catalog: &'c Catalog, subscription: Option<&Subscription>, now: Timestamp) -> &'c Plan {
    subscription
        .filter(|s| s.status.is_live())
        .filter(|s| {
            !s.cancel_at_period_end
                || window::span(Window::BillingPeriod, now, Some(s.started_at)).start <= s.updated_at
        })
        .and_then(|s| catalog.plans.get(&s.plan))
        .unwrap_or_else(|| catalog.default_plan())
}

/// The anchor of the account's billing periods (its subscription start), if any.
pub fn billing_anchor(subscription: Option<&Subscription>) -> Option<Timestamp> {
    subscription.filter(|s| s.status.is_live()).map(|s| s.started_at)
}
