//! Billing, independent of the payment provider: payments, the events providers send
//! (stored once per provider event id), what each event means for Tollgate
//! ([`BillingEffect`]), and the rule that keeps events arriving out of order from
//! moving a subscription backwards. Providers (Stripe, the `manual` provider, later
//! CinetPay) implement [`PaymentProvider`] in the server crate.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::Timestamp;
use crate::accounts::{Account, SubscriptionStatus};
use crate::identity::str_enum;
use crate::ids::{AccountId, PaymentId};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PaymentStatus {
    Pending,
    Succeeded,
    Failed,
    Refunded,
    PartiallyRefunded,
}

str_enum!(PaymentStatus {
    Pending => "pending",
    Succeeded => "succeeded",
    Failed => "failed",
    Refunded => "refunded",
    PartiallyRefunded => "partially_refunded",
});

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PaymentKind {
    /// A credit package bought once.
    Credits,
    /// An invoice of a subscription.
    Subscription,
}

str_enum!(PaymentKind { Credits => "credits", Subscription => "subscription" });

/// What a provider told us about money that moved (or failed to).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payment {
    pub id: PaymentId,
    pub account_id: AccountId,
    pub provider: String,
    pub kind: PaymentKind,
    /// The provider's id of what was paid: a checkout session, an invoice.
    pub provider_payment_id: String,
    /// The provider's id of the money movement (a Stripe payment intent), by which
    /// refunds find their payment.
    pub provider_intent_id: Option<String>,
    /// Integer minor units.
    pub amount: i64,
    pub currency: String,
    pub status: PaymentStatus,
    /// Credits bought by this payment (0 for subscriptions).
    pub credits: i64,
    pub credit_package: Option<String>,
    pub amount_refunded: i64,
    /// Credits taken back after a refund.
    pub credits_reversed: i64,
    /// Credits a refund should have taken back but that were already spent.
    pub credits_unrecovered: i64,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: Timestamp,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: Timestamp,
}

/// One delivery of a provider event, stored once per `(provider, id)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProviderEvent {
    pub provider: String,
    pub id: String,
    pub event_type: String,
    /// When the provider created the event (orders events about one object).
    pub created: Timestamp,
    pub received_at: Timestamp,
}

/// A subscription's state as the provider reported it at `at`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProviderSubscription {
    pub account: AccountId,
    pub provider_subscription_id: String,
    pub plan: String,
    pub status: SubscriptionStatus,
    /// The billing anchor.
    pub started_at: Timestamp,
    pub trial_ends_at: Option<Timestamp>,
    pub cancel_at_period_end: bool,
    /// When a cancellation at period end takes effect.
    pub cancel_at: Option<Timestamp>,
    /// When the provider produced this state.
    pub at: Timestamp,
}

/// What an event does, once the provider's payload has been understood and the
/// account and plan resolved. Applied by [`crate::Store::apply_billing_event`] in the
/// transaction that records the event, so it happens at most once.
#[derive(Clone, Debug, PartialEq)]
pub enum BillingEffect {
    /// Recorded, nothing else (an event type we do not handle, or nothing to change).
    Nothing,
    /// A one-time payment for credits succeeded: record the payment, grant its credits
    /// (once per payment, whatever the number of events telling it).
    CreditsPurchased { payment: Payment },
    /// The provider's subscription changed (created, updated, deleted).
    Subscription(ProviderSubscription),
    /// An invoice of a subscription was paid or failed: record the payment; a failure
    /// makes a live subscription `past_due`, a later success makes it `active` again.
    Invoice { payment: Payment, provider_subscription_id: Option<String>, at: Timestamp },
    /// A payment was refunded, in total `amount_refunded` so far: its credits are
    /// taken back in proportion, as far as the balance allows; the rest is recorded.
    /// Before its payment is known it waits, and applies when the payment arrives.
    Refunded { provider_intent_id: String, amount_refunded: i64 },
}

/// What `apply_billing_event` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BillingOutcome {
    Applied,
    /// This event id was seen before; nothing was done again.
    Duplicate,
    /// Recorded, but older than what is stored (out of order) or about nothing we hold.
    Ignored,
    /// Recorded and kept: it refers to a payment not known yet (a refund delivered
    /// before its purchase), and applies when that payment arrives.
    Deferred,
}

/// How far along its life a status is, for events that carry the same time.
fn lifecycle_rank(status: SubscriptionStatus) -> u8 {
    match status {
        SubscriptionStatus::Incomplete => 0,
        SubscriptionStatus::Trialing => 1,
        SubscriptionStatus::Active | SubscriptionStatus::PastDue => 2,
        SubscriptionStatus::Canceled | SubscriptionStatus::Expired => 3,
    }
}

/// Whether a provider state at `new_at` replaces the stored one (at `stored_at`):
/// a newer one does, an older one never; at the same second (providers date events
/// to the second) the one further along its life wins, and between equals the later
/// arrival. So a late `subscription.updated` cannot revive a deleted subscription.
pub fn supersedes(
    new_at: Timestamp,
    new_status: SubscriptionStatus,
    stored_at: Option<Timestamp>,
    stored_status: SubscriptionStatus,
) -> bool {
    match stored_at {
        None => true,
        Some(stored_at) if new_at != stored_at => new_at > stored_at,
        Some(_) => lifecycle_rank(new_status) >= lifecycle_rank(stored_status),
    }
}

/// Whether a provider's subscription state replaces the stored subscription.
/// About the same provider subscription: [`supersedes`]. About another one (a new
/// subscription after a cancellation, or a late event of an old one): only a newer
/// state does, and never the end of a subscription over a live one, so neither a
/// late update of an ended subscription nor the late end of an old one changes what
/// the account has now.
pub fn replaces(stored: &crate::accounts::Subscription, state: &ProviderSubscription) -> bool {
    if stored.provider_subscription_id.as_deref() == Some(state.provider_subscription_id.as_str()) {
        return supersedes(state.at, state.status, stored.provider_state_at, stored.status);
    }
    let newer = stored.provider_state_at.is_none_or(|at| state.at > at);
    newer && (state.status.is_live() || !stored.status.is_live())
}

/// The subscription a provider state makes of the stored one, or `None` when the
/// stored one stands ([`replaces`]). `updated_at` is the next version after the stored.
pub fn subscription_from_state(
    stored: Option<&crate::accounts::Subscription>,
    provider: &str,
    state: &ProviderSubscription,
    now: Timestamp,
) -> Option<crate::accounts::Subscription> {
    if stored.is_some_and(|stored| !replaces(stored, state)) {
        return None;
    }
    Some(crate::accounts::Subscription {
        account_id: state.account,
        plan: state.plan.clone(),
        status: state.status,
        provider: provider.to_owned(),
        started_at: state.started_at,
        trial_ends_at: state.trial_ends_at,
        cancel_at_period_end: state.cancel_at_period_end,
        scheduled_plan: None,
        scheduled_at: if state.cancel_at_period_end { state.cancel_at } else { None },
        updated_at: crate::accounts::Subscription::version_after(stored.map(|s| s.updated_at), now),
        provider_subscription_id: Some(state.provider_subscription_id.clone()),
        provider_state_at: Some(state.at),
    })
}

/// What an invoice of `provider_subscription_id`, paid or failed at `at`, makes of
/// the stored subscription: failed → `past_due`, paid → `active` again, unless the
/// subscription is another one, has ended, or holds a newer provider state. `None`:
/// unchanged.
pub fn subscription_after_invoice(
    stored: &crate::accounts::Subscription,
    provider_subscription_id: &str,
    payment: PaymentStatus,
    at: Timestamp,
    now: Timestamp,
) -> Option<crate::accounts::Subscription> {
    use crate::accounts::SubscriptionStatus::{Active, PastDue};
    if stored.provider_subscription_id.as_deref() != Some(provider_subscription_id) || !stored.status.is_live() {
        return None;
    }
    let status = match payment {
        PaymentStatus::Failed => PastDue,
        PaymentStatus::Succeeded if stored.status == PastDue => Active,
        _ => return None,
    };
    if !supersedes(at, status, stored.provider_state_at, stored.status) {
        return None;
    }
    let mut next = stored.clone();
    next.status = status;
    next.provider_state_at = Some(at);
    next.updated_at = crate::accounts::Subscription::version_after(Some(stored.updated_at), now);
    Some(next)
}

/// The credits a refund of `amount_refunded` (cumulative) out of `amount` should
/// have taken back in total from a payment that bought `credits`, minus what earlier
/// refunds already took (or failed to take).
pub fn credits_to_reverse(credits: i64, amount: i64, amount_refunded: i64, already: i64) -> i64 {
    if amount <= 0 || credits <= 0 {
        return 0;
    }
    let refunded = amount_refunded.clamp(0, amount);
    // i128: credits × amount can pass i64 for large packs in currencies like XOF.
    let due = (i128::from(credits) * i128::from(refunded) / i128::from(amount)) as i64;
    (due - already).max(0)
}

/// A hosted payment page to send the customer to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckoutRequest {
    pub account: Account,
    pub customer: String,
    pub item: CheckoutItem,
    pub success_url: String,
    pub cancel_url: String,
    /// Retrying the same request gives the same session.
    pub idempotency_key: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckoutItem {
    /// A subscription to a plan, at this price.
    Plan {
        plan: String,
        name: String,
        amount: i64,
        currency: String,
        interval: String,
        provider_price: Option<String>,
        trial_days: u32,
    },
    /// A credit package, paid once.
    Credits {
        package: String,
        name: String,
        credits: i64,
        amount: i64,
        currency: String,
        provider_price: Option<String>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkout {
    pub id: String,
    pub url: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// This provider does not do that (the manual provider has no hosted checkout).
    #[error("{0}")]
    Unsupported(&'static str),
    /// The provider could not be reached, or answered with a server error.
    #[error("payment provider unavailable: {0}")]
    Unavailable(String),
    /// The provider refused the request (a bug or a configuration problem here).
    #[error("payment provider refused the request: {0}")]
    Refused(String),
    /// The same idempotency key was sent before with other parameters.
    #[error("idempotency key reused with other parameters")]
    IdempotencyConflict,
}

/// A payment provider: creates customers, checkouts and portal sessions, and cancels
/// subscriptions on its side. Webhooks are provider-specific (each verifies and
/// translates its own) and end in [`BillingEffect`]s.
#[async_trait]
pub trait PaymentProvider: Send + Sync {
    /// `stripe`, `manual`, ...: stored with subscriptions and payments.
    fn name(&self) -> &'static str;

    /// Creates the provider's customer for an account; returns its id.
    async fn create_customer(&self, account: &Account, email: Option<&str>) -> Result<String, ProviderError>;

    async fn checkout(&self, request: CheckoutRequest) -> Result<Checkout, ProviderError>;

    /// A page where the customer manages payment methods and subscriptions.
    async fn portal(&self, customer: &str, return_url: &str) -> Result<String, ProviderError>;

    /// Ends a subscription on the provider's side now.
    async fn cancel_subscription(&self, provider_subscription_id: &str) -> Result<(), ProviderError>;
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use time::macros::datetime;

    use super::*;
    use crate::accounts::SubscriptionStatus::*;
    use crate::ids::AccountId;

    #[test]
    fn newer_states_win_and_deletion_is_final_within_a_second() {
        let t = datetime!(2026-11-23 12:00 UTC);
        let later = t + time::Duration::seconds(1);
        assert!(supersedes(t, Active, None, Active));
        assert!(supersedes(later, Active, Some(t), Canceled));
        assert!(!supersedes(t, Active, Some(later), PastDue));
        assert!(!supersedes(t, Active, Some(t), Canceled));
        assert!(supersedes(t, Canceled, Some(t), Active));
        assert!(supersedes(t, PastDue, Some(t), Active));
        assert!(supersedes(t, Active, Some(t), PastDue));
        assert!(!supersedes(t, Trialing, Some(t), Active));
    }

    #[test]
    fn an_ended_subscription_never_comes_back() {
        let t = datetime!(2026-11-23 12:00 UTC);
        let at = |s: i64| t + time::Duration::seconds(s);
        let stored = |sub: &str, status, state_at: Option<Timestamp>| crate::accounts::Subscription {
            account_id: AccountId::new(),
            plan: "pro".into(),
            status,
            provider: "stripe".into(),
            started_at: t,
            trial_ends_at: None,
            cancel_at_period_end: false,
            scheduled_plan: None,
            scheduled_at: None,
            updated_at: t,
            provider_subscription_id: Some(sub.into()),
            provider_state_at: state_at,
        };
        let state = |sub: &str, status, s: i64| ProviderSubscription {
            account: AccountId::new(),
            provider_subscription_id: sub.into(),
            plan: "pro".into(),
            status,
            started_at: t,
            trial_ends_at: None,
            cancel_at_period_end: false,
            cancel_at: None,
            at: at(s),
        };
        // sub_2 ended at 4: a late update of sub_1 (from 1) does not revive sub_1.
        assert!(!replaces(&stored("sub_2", Canceled, Some(at(4))), &state("sub_1", Active, 1)));
        // A new subscription after the end of the old one does.
        assert!(replaces(&stored("sub_1", Canceled, Some(at(2))), &state("sub_2", Active, 3)));
        // The late end of an old subscription changes nothing over a live one.
        assert!(!replaces(&stored("sub_2", Active, Some(at(3))), &state("sub_1", Canceled, 9)));
        // A manual subscription (no provider state) is replaced by a provider's live one.
        let mut manual = stored("x", Active, None);
        manual.provider_subscription_id = None;
        assert!(replaces(&manual, &state("sub_3", Active, 1)));
        assert!(!replaces(&manual, &state("sub_3", Canceled, 1)));
    }

    #[test]
    fn refunds_reverse_credits_in_proportion() {
        assert_eq!(credits_to_reverse(100, 1500, 1500, 0), 100);
        assert_eq!(credits_to_reverse(100, 1500, 750, 0), 50);
        assert_eq!(credits_to_reverse(100, 1500, 1500, 50), 50);
        assert_eq!(credits_to_reverse(100, 1500, 9999, 0), 100);
        assert_eq!(credits_to_reverse(0, 1500, 1500, 0), 0);
        assert_eq!(credits_to_reverse(100, 0, 0, 0), 0);
    }

    proptest! {
        #[test]
        fn successive_refunds_never_reverse_more_than_bought(credits in 0i64..1_000_000, amount in 1i64..10_000_000, steps in proptest::collection::vec(0i64..10_000_000, 1..6)) {
            let mut refunded = 0;
            let mut reversed = 0;
            for step in steps {
                refunded = (refunded + step).min(amount);
                reversed += credits_to_reverse(credits, amount, refunded, reversed);
                prop_assert!(reversed <= credits);
            }
            if refunded == amount {
                prop_assert_eq!(reversed, credits);
            }
        }
    }
}
