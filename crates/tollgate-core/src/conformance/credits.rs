//! Conformance for the credits ledger, provider events and payments.

use std::sync::Arc;

use rand::{RngExt, SeedableRng};
use time::Duration;

use super::t0;
use crate::accounts::{NewExternalAccount, SubscriptionStatus};
use crate::audit::Actor;
use crate::billing::{
    BillingEffect, BillingOutcome, Payment, PaymentKind, PaymentStatus, ProviderEvent, ProviderSubscription,
};
use crate::credits::{CreditKind, CreditTransfer, Shortfall, TransactionQuery};
use crate::ids::{AccountId, PaymentId};
use crate::metering::Idempotency;
use crate::store::{Store, StoreError};

async fn account(store: &Arc<dyn Store>, external_id: &str) -> AccountId {
    let new = NewExternalAccount {
        id: AccountId::new(),
        external_id: external_id.into(),
        name: None,
        email: None,
        created_at: t0(),
    };
    store.upsert_external_account(new).await.unwrap().0.id
}

fn transfer(account: AccountId, kind: CreditKind, amount: i64) -> CreditTransfer {
    CreditTransfer::new(account, kind, amount, Actor::System, t0())
}

async fn balance(store: &Arc<dyn Store>, account: AccountId) -> i64 {
    store.credit_balance(account).await.unwrap().balance
}

pub async fn credits_move_by_balanced_transfers(store: Arc<dyn Store>) {
    let a = account(&store, "ledger-a").await;
    assert_eq!(store.credit_balance(a).await.unwrap(), Default::default());
    let grant = store.transfer_credits(transfer(a, CreditKind::Purchase, 100)).await.unwrap();
    assert_eq!((grant.transaction.amount, grant.transaction.balance_after), (100, 100));
    let mut spend = transfer(a, CreditKind::Usage, -30);
    spend.description = Some("report".into());
    spend.endpoint = Some("/api/report".into());
    spend.metadata = Some(serde_json::json!({"pages": 3}));
    store.transfer_credits(spend).await.unwrap();
    store.transfer_credits(transfer(a, CreditKind::Bonus, 5)).await.unwrap();
    store.transfer_credits(transfer(a, CreditKind::Refund, 10)).await.unwrap();
    // Refused: more than the balance, and nothing is written.
    let refused = store.transfer_credits(transfer(a, CreditKind::Usage, -86)).await;
    assert!(matches!(refused, Err(StoreError::Conflict("insufficient_credits"))), "{refused:?}");
    assert_eq!(balance(&store, a).await, 85);
    // An overdraft floor lets it through, down to the floor only.
    let mut overdraft = transfer(a, CreditKind::Usage, -95);
    overdraft.floor = -10;
    assert_eq!(store.transfer_credits(overdraft).await.unwrap().transaction.balance_after, -10);
    let mut past = transfer(a, CreditKind::Usage, -1);
    past.floor = -10;
    assert!(matches!(store.transfer_credits(past).await, Err(StoreError::Conflict("insufficient_credits"))));
    let totals = store.credit_balance(a).await.unwrap();
    assert_eq!((totals.balance, totals.purchased, totals.used, totals.granted), (-10, 100, 115, 5));

    let all = store.credit_transactions(a, TransactionQuery { limit: 50, ..Default::default() }).await.unwrap();
    let amounts: Vec<i64> = all.iter().map(|t| t.amount).collect();
    assert_eq!(amounts, vec![-95, 10, 5, -30, 100], "newest first");
    assert_eq!(all[3].endpoint.as_deref(), Some("/api/report"));
    assert_eq!(all[3].metadata, Some(serde_json::json!({"pages": 3})));
    let usage = store
        .credit_transactions(a, TransactionQuery { kind: Some(CreditKind::Usage), limit: 50, ..Default::default() })
        .await
        .unwrap();
    assert_eq!(usage.len(), 2);
    let first = store.credit_transactions(a, TransactionQuery { limit: 2, ..Default::default() }).await.unwrap();
    let next = store
        .credit_transactions(a, TransactionQuery { before: Some(first[1].id), limit: 10, ..Default::default() })
        .await
        .unwrap();
    assert_eq!(next.iter().map(|t| t.amount).collect::<Vec<_>>(), vec![5, -30, 100]);

    let unknown = store.transfer_credits(transfer(AccountId::new(), CreditKind::Bonus, 1)).await;
    assert!(matches!(unknown, Err(StoreError::NotFound)), "{unknown:?}");
    let check = store.ledger_check().await.unwrap();
    assert!(check.is_sound(), "{check:?}");
    assert_eq!(check.transfers, 5);
}

pub async fn concurrent_spends_never_overdraw(store: Arc<dyn Store>) {
    let a = account(&store, "ledger-race").await;
    store.transfer_credits(transfer(a, CreditKind::Purchase, 1000)).await.unwrap();
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut granted = 0;
                for _ in 0..10 {
                    let amount = 1 + (i % 5);
                    match store.transfer_credits(transfer(a, CreditKind::Usage, -amount)).await {
                        Ok(receipt) => {
                            assert!(receipt.transaction.balance_after >= 0);
                            granted += amount;
                        }
                        Err(StoreError::Conflict("insufficient_credits")) => {}
                        Err(e) => panic!("{e}"),
                    }
                }
                granted
            })
        })
        .collect();
    let mut spent = 0;
    for task in tasks {
        spent += task.await.unwrap();
    }
    let left = balance(&store, a).await;
    assert!(left >= 0, "balance went negative: {left}");
    assert_eq!(spent, 1000 - left, "granted spends must equal the drop in balance");
    assert!(left < 5, "64 × 10 spends of 1..5 should drain 1,000 credits (left {left})");
    assert!(store.ledger_check().await.unwrap().is_sound());
}

pub async fn idempotent_spends_count_once(store: Arc<dyn Store>) {
    let a = account(&store, "ledger-idem").await;
    store.transfer_credits(transfer(a, CreditKind::Purchase, 50)).await.unwrap();
    let keyed = |hash: &str| {
        let mut t = transfer(a, CreditKind::Usage, -5);
        t.idempotency =
            Some(Idempotency { scope: "svc:test:spend".into(), key: "k1".into(), request_hash: hash.into() });
        t
    };
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            let t = keyed("h1");
            tokio::spawn(async move { store.transfer_credits(t).await })
        })
        .collect();
    let mut ids = Vec::new();
    for task in tasks {
        ids.push(task.await.unwrap().unwrap().transaction.id);
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "every retry names the same transfer");
    assert_eq!(balance(&store, a).await, 45);
    assert!(store.transfer_credits(keyed("h1")).await.unwrap().replayed);
    let other = store.transfer_credits(keyed("h2")).await;
    assert!(matches!(other, Err(StoreError::Conflict("idempotency_key"))), "{other:?}");
    assert_eq!(balance(&store, a).await, 45);
}

/// Any sequence of grants, spends, refunds, adjustments and reversals leaves every
/// transfer balanced and every balance equal to the sum of its entries, and to a model.
pub async fn ledger_stays_balanced_under_random_sequences(store: Arc<dyn Store>) {
    let accounts = [account(&store, "p-1").await, account(&store, "p-2").await, account(&store, "p-3").await];
    for seed in 0..4u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut model: std::collections::HashMap<AccountId, i64> = Default::default();
        for a in accounts {
            model.insert(a, balance(&store, a).await);
        }
        for _ in 0..60 {
            let a = accounts[rng.random_range(0..accounts.len())];
            let kinds = [
                CreditKind::Purchase,
                CreditKind::Bonus,
                CreditKind::Usage,
                CreditKind::Refund,
                CreditKind::Adjustment,
                CreditKind::Reversal,
            ];
            let kind = kinds[rng.random_range(0..kinds.len())];
            let size = rng.random_range(1..200);
            let amount = match kind {
                CreditKind::Usage | CreditKind::Reversal => -size,
                CreditKind::Adjustment if rng.random_bool(0.5) => -size,
                _ => size,
            };
            let mut t = transfer(a, kind, amount);
            t.floor = if rng.random_bool(0.2) { -50 } else { 0 };
            t.shortfall = if kind == CreditKind::Reversal { Shortfall::TakeAvailable } else { Shortfall::Refuse };
            let before = model[&a];
            match store.transfer_credits(t.clone()).await {
                Ok(receipt) => {
                    let taken = receipt.transaction.amount;
                    assert!(before + taken >= t.floor.min(before), "seed {seed}: below the floor");
                    model.insert(a, before + taken);
                    assert_eq!(receipt.transaction.balance_after, before + taken);
                }
                Err(StoreError::Conflict("insufficient_credits")) => assert!(before + amount < t.floor),
                Err(e) => panic!("{e}"),
            }
        }
        for a in accounts {
            assert_eq!(balance(&store, a).await, model[&a], "seed {seed}");
        }
        let check = store.ledger_check().await.unwrap();
        assert!(check.is_sound(), "seed {seed}: {check:?}");
    }
}

fn event(id: &str, created: crate::Timestamp) -> ProviderEvent {
    ProviderEvent {
        provider: "stripe".into(),
        id: id.into(),
        event_type: "test.event".into(),
        created,
        received_at: t0(),
    }
}

fn credits_payment(account: AccountId, session: &str, intent: &str) -> Payment {
    Payment {
        id: PaymentId::new(),
        account_id: account,
        provider: "stripe".into(),
        kind: PaymentKind::Credits,
        provider_payment_id: session.into(),
        provider_intent_id: Some(intent.into()),
        amount: 1500,
        currency: "USD".into(),
        status: PaymentStatus::Succeeded,
        credits: 100,
        credit_package: Some("starter".into()),
        amount_refunded: 0,
        credits_reversed: 0,
        credits_unrecovered: 0,
        created_at: t0(),
        updated_at: t0(),
    }
}

pub async fn provider_events_apply_once(store: Arc<dyn Store>) {
    let a = account(&store, "buyer").await;
    let purchase = BillingEffect::CreditsPurchased { payment: credits_payment(a, "cs_1", "pi_1") };
    // The same event delivered eight times at once.
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            let effect = purchase.clone();
            tokio::spawn(async move { store.apply_billing_event(event("evt_1", t0()), effect, None).await })
        })
        .collect();
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.unwrap().unwrap());
    }
    assert_eq!(outcomes.iter().filter(|o| **o == BillingOutcome::Applied).count(), 1, "{outcomes:?}");
    assert_eq!(outcomes.iter().filter(|o| **o == BillingOutcome::Duplicate).count(), 7);
    // Another event about the same checkout (a retry with a new id) grants nothing more.
    let again = BillingEffect::CreditsPurchased { payment: credits_payment(a, "cs_1", "pi_1") };
    assert_eq!(store.apply_billing_event(event("evt_2", t0()), again, None).await.unwrap(), BillingOutcome::Ignored);
    assert_eq!(balance(&store, a).await, 100);
    let payments = store.payments(Some(a), 10).await.unwrap();
    assert_eq!(payments.len(), 1);
    assert_eq!((payments[0].amount, payments[0].credits, payments[0].status), (1500, 100, PaymentStatus::Succeeded));

    // Refunded after 70 were spent: 30 come back, 70 are recorded as unrecovered.
    store.transfer_credits(transfer(a, CreditKind::Usage, -70)).await.unwrap();
    let refund = BillingEffect::Refunded { provider_intent_id: "pi_1".into(), amount_refunded: 1500 };
    assert_eq!(
        store.apply_billing_event(event("evt_3", t0()), refund.clone(), None).await.unwrap(),
        BillingOutcome::Applied
    );
    assert_eq!(store.apply_billing_event(event("evt_3", t0()), refund, None).await.unwrap(), BillingOutcome::Duplicate);
    assert_eq!(balance(&store, a).await, 0);
    let payment = &store.payments(Some(a), 10).await.unwrap()[0];
    assert_eq!(
        (payment.status, payment.amount_refunded, payment.credits_reversed, payment.credits_unrecovered),
        (PaymentStatus::Refunded, 1500, 30, 70)
    );
    // A refund delivered before its purchase waits for it, then applies with it.
    let early = |total| BillingEffect::Refunded { provider_intent_id: "pi_2".into(), amount_refunded: total };
    assert_eq!(
        store.apply_billing_event(event("evt_4", t0()), early(300), None).await.unwrap(),
        BillingOutcome::Deferred
    );
    assert_eq!(
        store.apply_billing_event(event("evt_5", t0()), early(750), None).await.unwrap(),
        BillingOutcome::Deferred
    );
    assert_eq!(
        store.apply_billing_event(event("evt_4", t0()), early(300), None).await.unwrap(),
        BillingOutcome::Duplicate
    );
    let late = BillingEffect::CreditsPurchased { payment: credits_payment(a, "cs_2", "pi_2") };
    assert_eq!(store.apply_billing_event(event("evt_6", t0()), late, None).await.unwrap(), BillingOutcome::Applied);
    assert_eq!(balance(&store, a).await, 50, "bought 100, half the price refunded: 50 taken back");
    let payment =
        store.payments(Some(a), 10).await.unwrap().into_iter().find(|p| p.provider_payment_id == "cs_2").unwrap();
    assert_eq!(
        (payment.status, payment.amount_refunded, payment.credits_reversed),
        (PaymentStatus::PartiallyRefunded, 750, 50)
    );
    // A further partial refund takes the next share; an older total changes nothing.
    assert_eq!(
        store.apply_billing_event(event("evt_7", t0()), early(1200), None).await.unwrap(),
        BillingOutcome::Applied
    );
    assert_eq!(
        store.apply_billing_event(event("evt_8", t0()), early(900), None).await.unwrap(),
        BillingOutcome::Ignored
    );
    assert_eq!(balance(&store, a).await, 20);
    assert!(store.ledger_check().await.unwrap().is_sound());
}

fn state(account: AccountId, sub: &str, status: SubscriptionStatus, at: crate::Timestamp) -> BillingEffect {
    BillingEffect::Subscription(ProviderSubscription {
        account,
        provider_subscription_id: sub.into(),
        plan: "pro".into(),
        status,
        started_at: t0() - Duration::days(3),
        trial_ends_at: None,
        cancel_at_period_end: false,
        cancel_at: None,
        at,
    })
}

pub async fn provider_subscriptions_never_move_backwards(store: Arc<dyn Store>) {
    use SubscriptionStatus::*;
    let a = account(&store, "subscriber").await;
    let t = t0().replace_nanosecond(0).unwrap();
    let apply = |id: &'static str, effect: BillingEffect| {
        let store = store.clone();
        async move { store.apply_billing_event(event(id, t), effect, None).await.unwrap() }
    };
    assert_eq!(apply("e1", state(a, "sub_1", Active, t + Duration::seconds(2))).await, BillingOutcome::Applied);
    // An older update arriving late is ignored.
    assert_eq!(apply("e2", state(a, "sub_1", PastDue, t + Duration::seconds(1))).await, BillingOutcome::Ignored);
    let s = store.subscription(a).await.unwrap().unwrap();
    assert_eq!((s.status, s.plan.as_str(), s.provider.as_str()), (Active, "pro", "stripe"));
    assert_eq!(s.provider_subscription_id.as_deref(), Some("sub_1"));
    // Deleted in the same second as an update: the deletion stands whatever the order.
    assert_eq!(apply("e3", state(a, "sub_1", Canceled, t + Duration::seconds(3))).await, BillingOutcome::Applied);
    assert_eq!(apply("e4", state(a, "sub_1", Active, t + Duration::seconds(3))).await, BillingOutcome::Ignored);
    assert_eq!(store.subscription(a).await.unwrap().unwrap().status, Canceled);

    // A new subscription replaces the ended one; the old one's late end changes nothing.
    assert_eq!(apply("e5", state(a, "sub_2", Active, t + Duration::seconds(4))).await, BillingOutcome::Applied);
    assert_eq!(apply("e6", state(a, "sub_1", Canceled, t + Duration::seconds(9))).await, BillingOutcome::Ignored);

    // Invoice failed, then paid: past_due, then active; a late failure changes nothing.
    let invoice = |id: &str, status: PaymentStatus| BillingEffect::Invoice {
        payment: Payment {
            kind: PaymentKind::Subscription,
            provider_payment_id: id.into(),
            provider_intent_id: None,
            credits: 0,
            credit_package: None,
            status,
            ..credits_payment(a, id, "")
        },
        provider_subscription_id: Some("sub_2".into()),
        at: t + Duration::seconds(if status == PaymentStatus::Failed { 5 } else { 6 }),
    };
    assert_eq!(apply("e7", invoice("in_1", PaymentStatus::Failed)).await, BillingOutcome::Applied);
    assert_eq!(store.subscription(a).await.unwrap().unwrap().status, PastDue);
    assert_eq!(apply("e8", invoice("in_1", PaymentStatus::Succeeded)).await, BillingOutcome::Applied);
    assert_eq!(store.subscription(a).await.unwrap().unwrap().status, Active);
    assert_eq!(apply("e9", invoice("in_1", PaymentStatus::Failed)).await, BillingOutcome::Applied);
    let s = store.subscription(a).await.unwrap().unwrap();
    assert_eq!((s.status, s.provider_subscription_id.as_deref()), (Active, Some("sub_2")));
    let payments = store.payments(Some(a), 10).await.unwrap();
    assert_eq!(payments.len(), 1);
    assert_eq!(payments[0].status, PaymentStatus::Succeeded, "a failure never overwrites a success");

    // Once sub_2 has ended too, a late update of sub_1 does not bring sub_1 back.
    assert_eq!(apply("e10", state(a, "sub_2", Canceled, t + Duration::seconds(10))).await, BillingOutcome::Applied);
    assert_eq!(apply("e11", state(a, "sub_1", Active, t + Duration::seconds(1))).await, BillingOutcome::Ignored);
    let s = store.subscription(a).await.unwrap().unwrap();
    assert_eq!((s.status, s.provider_subscription_id.as_deref()), (Canceled, Some("sub_2")));
}

pub async fn provider_customers_link_once(store: Arc<dyn Store>) {
    let a = account(&store, "customer").await;
    assert_eq!(store.provider_customer(a, "stripe").await.unwrap(), None);
    assert_eq!(store.link_provider_customer(a, "stripe", "cus_1").await.unwrap(), "cus_1");
    assert_eq!(store.link_provider_customer(a, "stripe", "cus_2").await.unwrap(), "cus_1", "the first link wins");
    assert_eq!(store.provider_customer(a, "stripe").await.unwrap().as_deref(), Some("cus_1"));
    assert_eq!(store.account_by_provider_customer("stripe", "cus_1").await.unwrap(), Some(a));
    assert_eq!(store.account_by_provider_customer("stripe", "cus_2").await.unwrap(), None);
}
