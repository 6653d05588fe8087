//! What a (verified) Stripe event means for Tollgate: the account it is about (from
//! the metadata Tollgate put on the checkout, else the customer id), the plan (from
//! metadata, else the price), and the resulting [`BillingEffect`]. Payloads are read
//! as JSON values, tolerating fields Stripe adds and reading both the current and the
//! pre-2025 places of fields that moved (period on items, invoice's subscription).

use serde_json::Value;
use time::OffsetDateTime;
use tollgate_core::Timestamp;
use tollgate_core::accounts::SubscriptionStatus;
use tollgate_core::billing::{BillingEffect, Payment, PaymentKind, PaymentStatus, ProviderEvent, ProviderSubscription};
use tollgate_core::ids::{AccountId, PaymentId};
use tollgate_core::plans::Catalog;

use super::stripe::PROVIDER;
use crate::error::ApiError;
use crate::state::AppState;

/// An event understood: what to record, what it does, and whether to tell the
/// account's owner that a payment failed.
pub struct Understood {
    pub event: ProviderEvent,
    pub effect: BillingEffect,
    pub payment_failed_for: Option<AccountId>,
}

fn time_of(value: &Value) -> Option<Timestamp> {
    OffsetDateTime::from_unix_timestamp(value.as_i64()?).ok()
}

fn text(value: &Value) -> Option<String> {
    value.as_str().filter(|s| !s.is_empty()).map(str::to_owned)
}

/// Parses the envelope and decides the effect. `Err` only for a payload that is not
/// a Stripe event at all (400); anything merely unexpected becomes `Nothing` and is
/// logged, so Stripe does not retry it forever.
pub async fn understand(state: &AppState, body: &[u8], now: Timestamp) -> Result<Understood, ApiError> {
    let envelope: Value = serde_json::from_slice(body).map_err(|_| ApiError::InvalidWebhookPayload)?;
    let (Some(id), Some(event_type), Some(created)) =
        (text(&envelope["id"]), text(&envelope["type"]), time_of(&envelope["created"]))
    else {
        return Err(ApiError::InvalidWebhookPayload);
    };
    let object = &envelope["data"]["object"];
    if !object.is_object() {
        return Err(ApiError::InvalidWebhookPayload);
    }
    let event =
        ProviderEvent { provider: PROVIDER.into(), id, event_type: event_type.clone(), created, received_at: now };
    let catalog = state.catalog.get();
    let mut payment_failed_for = None;
    let effect = match event_type.as_str() {
        "checkout.session.completed" | "checkout.session.async_payment_succeeded" => {
            checkout_completed(state, &catalog, object, created, now).await?
        }
        "customer.subscription.created" | "customer.subscription.updated" | "customer.subscription.deleted" => {
            match account_of(state, object, &object["metadata"]).await? {
                Some(account) => subscription_state(&catalog, account, object, created),
                None => BillingEffect::Nothing,
            }
        }
        "invoice.paid" | "invoice.payment_succeeded" | "invoice.payment_failed" => {
            let failed = event_type == "invoice.payment_failed";
            let metadata = &object["parent"]["subscription_details"]["metadata"];
            match account_of(state, object, metadata).await? {
                Some(account) => {
                    if failed {
                        payment_failed_for = Some(account);
                    }
                    invoice(account, object, failed, created, now)
                }
                None => BillingEffect::Nothing,
            }
        }
        "charge.refunded" => match (text(&object["payment_intent"]), object["amount_refunded"].as_i64()) {
            (Some(intent), Some(amount_refunded)) => {
                BillingEffect::Refunded { provider_intent_id: intent, amount_refunded }
            }
            _ => BillingEffect::Nothing,
        },
        _ => BillingEffect::Nothing,
    };
    if effect == BillingEffect::Nothing {
        tracing::info!(event_id = %event.id, event_type = %event.event_type, "Stripe event recorded, nothing to do");
    }
    Ok(Understood { event, effect, payment_failed_for })
}

/// The account an object is about: `metadata.account_id` (written by Tollgate's
/// checkout with the secret key; never `client_reference_id`, which a buyer can set
/// on payment links), else the account linked to its customer. `None` (logged) when
/// neither names a known account: the event is recorded and ignored.
async fn account_of(state: &AppState, object: &Value, metadata: &Value) -> Result<Option<AccountId>, ApiError> {
    // An account id, or `ext:<external id>` as everywhere else in the API.
    if let Some(named) = text(&metadata["account_id"]) {
        let account = match named.strip_prefix("ext:") {
            Some(external) => state.store.account_by_external_id(external).await?,
            None => match named.parse::<AccountId>() {
                Ok(id) => state.store.account_by_id(id).await?,
                Err(_) => None,
            },
        };
        if let Some(account) = account {
            return Ok(Some(account.id));
        }
    }
    if let Some(customer) = text(&object["customer"])
        && let Some(id) = state.store.account_by_provider_customer(PROVIDER, &customer).await?
    {
        return Ok(Some(id));
    }
    tracing::warn!(object = %object["id"], "Stripe event about no known account; ignored");
    Ok(None)
}

async fn checkout_completed(
    state: &AppState,
    catalog: &Catalog,
    session: &Value,
    created: Timestamp,
    now: Timestamp,
) -> Result<BillingEffect, ApiError> {
    let Some(account) = account_of(state, session, &session["metadata"]).await? else {
        return Ok(BillingEffect::Nothing);
    };
    // Remember the customer for this account, unless it already belongs to another.
    if let Some(customer) = text(&session["customer"]) {
        match state.store.account_by_provider_customer(PROVIDER, &customer).await? {
            Some(owner) if owner != account => {
                tracing::warn!(%customer, "checkout's customer belongs to another account; not linked");
            }
            Some(_) => {}
            None => {
                state.store.link_provider_customer(account, PROVIDER, &customer).await?;
            }
        }
    }
    let Some(session_id) = text(&session["id"]) else { return Ok(BillingEffect::Nothing) };
    match session["mode"].as_str() {
        Some("payment") => {
            // Asynchronous methods complete unpaid and succeed later (their own event).
            if !matches!(session["payment_status"].as_str(), Some("paid" | "no_payment_required")) {
                return Ok(BillingEffect::Nothing);
            }
            let package = text(&session["metadata"]["credit_package"]);
            // What the customer was sold, as written on the session at checkout.
            let credits = text(&session["metadata"]["credits"])
                .and_then(|c| c.parse::<i64>().ok())
                .or_else(|| package.as_ref().and_then(|p| catalog.credit_packages.get(p)).map(|p| p.credits))
                .filter(|c| *c > 0);
            let Some(credits) = credits else {
                tracing::warn!(session = %session_id, "paid checkout without credits metadata; ignored");
                return Ok(BillingEffect::Nothing);
            };
            Ok(BillingEffect::CreditsPurchased {
                payment: Payment {
                    id: PaymentId::new(),
                    account_id: account,
                    provider: PROVIDER.into(),
                    kind: PaymentKind::Credits,
                    provider_intent_id: text(&session["payment_intent"]).or_else(|| Some(session_id.clone())),
                    provider_payment_id: session_id,
                    amount: session["amount_total"].as_i64().unwrap_or(0),
                    currency: text(&session["currency"]).unwrap_or_default().to_uppercase(),
                    status: PaymentStatus::Succeeded,
                    credits,
                    credit_package: package,
                    amount_refunded: 0,
                    credits_reversed: 0,
                    credits_unrecovered: 0,
                    created_at: now,
                    updated_at: now,
                },
            })
        }
        Some("subscription") => {
            // Paid, or nothing to pay (a trial); a pending debit waits for its invoice.
            if !matches!(session["payment_status"].as_str(), Some("paid" | "no_payment_required")) {
                return Ok(BillingEffect::Nothing);
            }
            let (Some(subscription), Some(plan)) = (text(&session["subscription"]), text(&session["metadata"]["plan"]))
            else {
                return Ok(BillingEffect::Nothing);
            };
            if !catalog.plans.contains_key(&plan) {
                tracing::warn!(%plan, "checkout for a plan not in the catalog; ignored");
                return Ok(BillingEffect::Nothing);
            }
            // The subscription's own events carry its full state (trial, period); this
            // one only makes sure the plan applies if they are late. Dated at the
            // session's creation, so any subscription event supersedes it.
            let at = time_of(&session["created"]).unwrap_or(created);
            Ok(BillingEffect::Subscription(ProviderSubscription {
                account,
                provider_subscription_id: subscription,
                plan,
                status: SubscriptionStatus::Active,
                started_at: created,
                trial_ends_at: None,
                cancel_at_period_end: false,
                cancel_at: None,
                at,
            }))
        }
        _ => Ok(BillingEffect::Nothing),
    }
}

fn status(stripe: &str) -> Option<SubscriptionStatus> {
    Some(match stripe {
        "trialing" => SubscriptionStatus::Trialing,
        "active" => SubscriptionStatus::Active,
        // Unpaid: retries are exhausted but Stripe keeps the subscription; treat as
        // past due (the plan applies) until it is canceled.
        "past_due" | "unpaid" => SubscriptionStatus::PastDue,
        "canceled" => SubscriptionStatus::Canceled,
        "incomplete" => SubscriptionStatus::Incomplete,
        "incomplete_expired" | "paused" => SubscriptionStatus::Expired,
        _ => return None,
    })
}

/// The plan of a Stripe subscription: its metadata, else the plan whose configured
/// Stripe price it uses, else the price's lookup key.
fn plan_of(catalog: &Catalog, subscription: &Value) -> Option<String> {
    if let Some(plan) = text(&subscription["metadata"]["plan"]).filter(|p| catalog.plans.contains_key(p)) {
        return Some(plan);
    }
    let price = &subscription["items"]["data"][0]["price"];
    if let Some(price_id) = text(&price["id"]) {
        // A plan still sold before an archived one with the same Stripe price.
        let charges =
            |p: &&tollgate_core::plans::Plan| p.prices.iter().any(|pr| pr.stripe_price.as_deref() == Some(&price_id));
        let mut matching: Vec<_> = catalog.plans.values().filter(charges).collect();
        matching.sort_by_key(|p| p.archived);
        if let Some(plan) = matching.first() {
            return Some(plan.key.clone());
        }
    }
    text(&price["lookup_key"]).filter(|p| catalog.plans.contains_key(p))
}

fn subscription_state(catalog: &Catalog, account: AccountId, sub: &Value, created: Timestamp) -> BillingEffect {
    let (Some(id), Some(status), Some(plan)) =
        (text(&sub["id"]), sub["status"].as_str().and_then(status), plan_of(catalog, sub))
    else {
        tracing::warn!(subscription = %sub["id"], "Stripe subscription with an unknown status or plan; ignored");
        return BillingEffect::Nothing;
    };
    let item = &sub["items"]["data"][0];
    let period_end = time_of(&item["current_period_end"]).or_else(|| time_of(&sub["current_period_end"]));
    BillingEffect::Subscription(ProviderSubscription {
        account,
        provider_subscription_id: id,
        plan,
        status,
        started_at: time_of(&sub["billing_cycle_anchor"]).or_else(|| time_of(&sub["start_date"])).unwrap_or(created),
        trial_ends_at: time_of(&sub["trial_end"]),
        cancel_at_period_end: sub["cancel_at_period_end"].as_bool().unwrap_or(false)
            || time_of(&sub["cancel_at"]).is_some(),
        cancel_at: time_of(&sub["cancel_at"]).or(period_end),
        at: created,
    })
}

fn invoice(account: AccountId, invoice: &Value, failed: bool, created: Timestamp, now: Timestamp) -> BillingEffect {
    let Some(id) = text(&invoice["id"]) else { return BillingEffect::Nothing };
    let subscription =
        text(&invoice["parent"]["subscription_details"]["subscription"]).or_else(|| text(&invoice["subscription"]));
    let amount = if failed { invoice["amount_due"].as_i64() } else { invoice["amount_paid"].as_i64() };
    BillingEffect::Invoice {
        payment: Payment {
            id: PaymentId::new(),
            account_id: account,
            provider: PROVIDER.into(),
            kind: PaymentKind::Subscription,
            provider_payment_id: id,
            provider_intent_id: text(&invoice["payment_intent"]),
            amount: amount.unwrap_or(0),
            currency: text(&invoice["currency"]).unwrap_or_default().to_uppercase(),
            status: if failed { PaymentStatus::Failed } else { PaymentStatus::Succeeded },
            credits: 0,
            credit_package: None,
            amount_refunded: 0,
            credits_reversed: 0,
            credits_unrecovered: 0,
            created_at: now,
            updated_at: now,
        },
        provider_subscription_id: subscription,
        at: created,
    }
}
