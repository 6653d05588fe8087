//! Conformance for the admin reports: exact counts and sums over known fixtures, and
//! newest-first pages that stay stable under inserts.

use std::collections::BTreeMap;
use std::sync::Arc;

use time::Duration;

use super::{audit, new_user, t0};
use crate::Timestamp;
use crate::accounts::{NewExternalAccount, Subscription, SubscriptionStatus};
use crate::admin::UserChange;
use crate::audit::Actor;
use crate::billing::{BillingEffect, Payment, PaymentKind, PaymentStatus, ProviderEvent};
use crate::credits::{CreditKind, CreditTransfer};
use crate::identity::UserStatus;
use crate::ids::{AccountId, PaymentId};
use crate::metering::window::Window;
use crate::metering::{EventContext, UsageOp, UsageRequest, WindowCheck};
use crate::reports::{Amounts, PaymentQuery, StatsQuery, UsageLogQuery, UsageOutcome};
use crate::store::Store;

async fn external(store: &Arc<dyn Store>, external_id: &str) -> AccountId {
    let new = NewExternalAccount {
        id: AccountId::new(),
        external_id: external_id.into(),
        name: None,
        email: None,
        created_at: t0(),
    };
    store.upsert_external_account(new).await.unwrap().0.id
}

async fn subscribe(store: &Arc<dyn Store>, account: AccountId, plan: &str, status: SubscriptionStatus) {
    let now = t0();
    let sub = Subscription { status, ..super::manual_subscription(account, plan, now) };
    store.put_subscription(sub, None, audit("subscription.changed", now)).await.unwrap();
}

fn payment(account: AccountId, n: u32, amount: i64, currency: &str, credits: i64, at: Timestamp) -> Payment {
    Payment {
        id: PaymentId::new(),
        account_id: account,
        provider: "stripe".into(),
        kind: if credits > 0 { PaymentKind::Credits } else { PaymentKind::Subscription },
        provider_payment_id: format!("cs_{n}"),
        provider_intent_id: Some(format!("pi_{n}")),
        amount,
        currency: currency.into(),
        status: PaymentStatus::Succeeded,
        credits,
        credit_package: (credits > 0).then(|| "pack".into()),
        amount_refunded: 0,
        credits_reversed: 0,
        credits_unrecovered: 0,
        created_at: at,
        updated_at: at,
    }
}

async fn apply(store: &Arc<dyn Store>, n: u32, effect: BillingEffect) {
    let event = ProviderEvent {
        provider: "stripe".into(),
        id: format!("evt_{n}"),
        event_type: "test.event".into(),
        created: t0(),
        received_at: t0(),
    };
    store.apply_billing_event(event, effect, None).await.unwrap();
}

pub async fn admin_stats_count_exactly(store: Arc<dyn Store>) {
    let now = t0();
    let query = StatsQuery::at(now, "free");
    // Users: two new, one old, one suspended (new), one deleted (not counted at all).
    let ada = store.create_user(new_user("ada@example.com", now), None, audit("a", now)).await.unwrap();
    let bob = store.create_user(new_user("bob@example.com", now - Duration::days(10)), None, audit("a", now)).await;
    let bob = bob.unwrap();
    let cy = store.create_user(new_user("cy@example.com", now), None, audit("a", now)).await.unwrap();
    let dan = store.create_user(new_user("dan@example.com", now), None, audit("a", now)).await.unwrap();
    let status = |s| UserChange { status: Some(s), ..Default::default() };
    store.admin_update_user(cy.id, status(UserStatus::Suspended), audit("s", now)).await.unwrap();
    store.admin_update_user(dan.id, status(UserStatus::Deleted), audit("d", now)).await.unwrap();
    // Plans in force: ada pro (active), e1 pro (trialing), e2 max (past due: live, not
    // active), e3 canceled (default plan); bob, cy without a subscription (default).
    let (e1, e2, e3) = (external(&store, "e1").await, external(&store, "e2").await, external(&store, "e3").await);
    subscribe(&store, ada.account_id, "pro", SubscriptionStatus::Active).await;
    subscribe(&store, e1, "pro", SubscriptionStatus::Trialing).await;
    subscribe(&store, e2, "max", SubscriptionStatus::PastDue).await;
    subscribe(&store, e3, "pro", SubscriptionStatus::Canceled).await;
    subscribe(&store, bob.account_id, "max", SubscriptionStatus::Expired).await;

    // Payments: USD 1500 at the first instant of this month and 1000 just before it;
    // EUR 2000 this month, 500 of it refunded; a failed GBP invoice counts nothing.
    let before_month = query.month_start - Duration::seconds(1);
    let credits = |p| BillingEffect::CreditsPurchased { payment: p };
    apply(&store, 1, credits(payment(ada.account_id, 1, 1500, "USD", 100, query.month_start))).await;
    apply(&store, 2, credits(payment(ada.account_id, 2, 1000, "USD", 60, before_month))).await;
    apply(&store, 3, credits(payment(e1, 3, 2000, "EUR", 200, query.month_start))).await;
    apply(&store, 4, BillingEffect::Refunded { provider_intent_id: "pi_3".into(), amount_refunded: 500 }).await;
    let mut failed = payment(e2, 5, 900, "GBP", 0, query.month_start);
    failed.status = PaymentStatus::Failed;
    apply(&store, 5, BillingEffect::Invoice { payment: failed, provider_subscription_id: None, at: now }).await;
    // Credits beyond the purchases: spend 30, a bonus of 5, a refund of 3, an
    // adjustment of -2. The EUR refund took back a quarter of its 200 credits.
    let transfer = |kind, amount| CreditTransfer::new(ada.account_id, kind, amount, Actor::System, now);
    store.transfer_credits(transfer(CreditKind::Usage, -30)).await.unwrap();
    store.transfer_credits(transfer(CreditKind::Bonus, 5)).await.unwrap();
    store.transfer_credits(transfer(CreditKind::Refund, 3)).await.unwrap();
    store.transfer_credits(transfer(CreditKind::Adjustment, -2)).await.unwrap();

    let stats = store.admin_stats(query).await.unwrap();
    let u = &stats.users;
    assert_eq!((u.total, u.active, u.suspended, u.new_this_week), (3, 2, 1, 2), "{u:?}");
    let plans: BTreeMap<String, u64> = [("free".into(), 3), ("pro".into(), 2), ("max".into(), 1)].into();
    assert_eq!(stats.accounts_per_plan, plans, "bob, cy and e3 on free; dan's account is left out");
    assert_eq!((stats.active_subscriptions, stats.trialing_subscriptions), (2, 1));
    assert_eq!(stats.paying_subscriptions, BTreeMap::from([("pro".to_owned(), 1)]));
    let revenue: Vec<_> =
        stats.revenue.iter().map(|r| (r.currency.as_str(), r.all_time.clone(), r.this_month.clone())).collect();
    assert_eq!(
        revenue,
        vec![
            ("EUR", Amounts::new(2000, 500), Amounts::new(2000, 500)),
            ("USD", Amounts::new(2500, 0), Amounts::new(1500, 0)),
        ]
    );
    assert_eq!(stats.revenue[0].all_time.net, 1500);
    let c = &stats.credits;
    assert_eq!((c.purchased, c.used, c.granted, c.refunded, c.adjusted), (360, 30, 5, 3, -2), "{c:?}");
    assert_eq!((c.reversed, c.expired), (50, 0));
    assert_eq!(c.outstanding, 360 - 30 + 5 + 3 - 2 - 50);
}

fn usage(account: AccountId, meter: &str, amount: i64, limit: i64, at: Timestamp) -> UsageRequest {
    let key = format!("d:{}", crate::reports::day_string(at.date()));
    UsageRequest {
        account,
        meter: meter.into(),
        op: UsageOp::Consume,
        amount,
        windows: vec![WindowCheck {
            window: Window::Day,
            limit: Some(limit),
            count_keys: [key.clone()].into(),
            increment_key: key,
            resets_at: None,
        }],
        dry_run: false,
        idempotency: None,
        context: EventContext {
            endpoint: Some("/chat".into()),
            metadata: Some(serde_json::json!({"n": amount})),
            ip: Some("10.0.0.1".into()),
        },
        now: at,
        reservation: None,
        credits: None,
    }
}

pub async fn admin_usage_reports_sum_filter_and_page(store: Arc<dyn Store>) {
    // Noon of a fixed day two days back and the day before: days never split.
    let today = t0().date();
    let day1 = (today - Duration::days(2)).midnight().assume_utc() + Duration::hours(12);
    let day2 = day1 + Duration::days(1);
    let (a, b) = (external(&store, "a").await, external(&store, "b").await);
    let mut n = 0;
    let mut at = |day: Timestamp| {
        n += 1;
        day + Duration::seconds(n)
    };
    // Day 1: a 3 + 2 messages, b 4 messages and a denial (over 5), a 100 tokens.
    // Day 2: b 1 message, then 1 refunded.
    for (account, meter, amount, limit, when) in [
        (a, "messages", 3, 10, at(day1)),
        (a, "messages", 2, 10, at(day1)),
        (b, "messages", 4, 5, at(day1)),
        (b, "messages", 2, 5, at(day1)),
        (a, "tokens", 100, 1000, at(day1)),
        (b, "messages", 1, 10, at(day2)),
    ] {
        store.consume_usage(usage(account, meter, amount, limit, when)).await.unwrap();
    }
    let mut refund = usage(b, "messages", 1, 10, at(day2));
    refund.op = UsageOp::Refund;
    store.consume_usage(refund).await.unwrap();

    let (d1, d2) = (crate::reports::day_string(day1.date()), crate::reports::day_string(day2.date()));
    let totals = store.admin_usage_daily(None, &d1, &d2).await.unwrap();
    let got: Vec<_> = totals.iter().map(|r| (r.day.as_str(), r.meter.as_str(), r.consumed, r.denied)).collect();
    assert_eq!(
        got,
        vec![(d1.as_str(), "messages", 9, 1), (d1.as_str(), "tokens", 100, 0), (d2.as_str(), "messages", 0, 0)]
    );
    let messages = store.admin_usage_daily(Some("messages"), &d2, &d2).await.unwrap();
    assert_eq!(messages.len(), 1);

    // The log: newest first, filtered.
    let all = store.admin_usage_events(UsageLogQuery { limit: 50, ..Default::default() }).await.unwrap();
    assert_eq!(all.len(), 7);
    assert!(all.windows(2).all(|w| (w[0].created_at, w[0].id) > (w[1].created_at, w[1].id)), "newest first");
    assert_eq!((all[0].outcome, all[0].amount, all[0].account_id), (UsageOutcome::Refunded, 1, b));
    assert_eq!(all[0].metadata, Some(serde_json::json!({"n": 1})));
    assert_eq!((all[0].endpoint.as_deref(), all[0].ip.as_deref()), (Some("/chat"), Some("10.0.0.1")));
    let q = |f: fn(&mut UsageLogQuery)| {
        let mut q = UsageLogQuery { limit: 50, ..Default::default() };
        f(&mut q);
        q
    };
    let denied = store.admin_usage_events(q(|q| q.outcome = Some(UsageOutcome::Denied))).await.unwrap();
    assert_eq!(denied.iter().map(|e| (e.account_id, e.amount)).collect::<Vec<_>>(), vec![(b, 2)]);
    let mut of_a = q(|q| q.meter = Some("messages".into()));
    of_a.account = Some(a);
    assert_eq!(store.admin_usage_events(of_a).await.unwrap().iter().map(|e| e.amount).collect::<Vec<_>>(), vec![2, 3]);
    let mut window = q(|_| {});
    window.from = Some(day1 + Duration::seconds(3));
    window.to = Some(day1 + Duration::seconds(6));
    let got = store.admin_usage_events(window).await.unwrap();
    assert_eq!(got.iter().map(|e| e.amount).collect::<Vec<_>>(), vec![100, 2, 4], "from inclusive, to exclusive");

    // Pages of 3: an event recorded between pages (newer) does not shift them.
    let mut seen = Vec::new();
    let mut before = None;
    loop {
        let page = store.admin_usage_events(UsageLogQuery { before, limit: 3, ..Default::default() }).await.unwrap();
        if seen.is_empty() {
            store.consume_usage(usage(a, "messages", 1, 100, at(day2))).await.unwrap();
        }
        before = page.last().map(|e| (e.created_at, e.id));
        seen.extend(page.iter().map(|e| e.id));
        if page.len() < 3 {
            break;
        }
    }
    assert_eq!(seen, all.iter().map(|e| e.id).collect::<Vec<_>>());

    // Payments: all accounts' or one's, newest first, in pages.
    let now = t0();
    for (i, (account, minutes)) in [(a, 3), (b, 2), (a, 1)].into_iter().enumerate() {
        let p = payment(account, i as u32, 100, "USD", 1, now - Duration::minutes(minutes));
        apply(&store, i as u32, BillingEffect::CreditsPurchased { payment: p }).await;
    }
    let all = store.admin_payments(PaymentQuery { limit: 10, ..Default::default() }).await.unwrap();
    assert_eq!(all.iter().map(|p| p.provider_payment_id.as_str()).collect::<Vec<_>>(), vec!["cs_2", "cs_1", "cs_0"]);
    let first = store.admin_payments(PaymentQuery { limit: 2, ..Default::default() }).await.unwrap();
    let before = first.last().map(|p| (p.created_at, p.id));
    let rest = store.admin_payments(PaymentQuery { before, limit: 2, ..Default::default() }).await.unwrap();
    assert_eq!(rest.iter().map(|p| p.provider_payment_id.as_str()).collect::<Vec<_>>(), vec!["cs_0"]);
    let of_b = store.admin_payments(PaymentQuery { account: Some(b), limit: 10, ..Default::default() }).await.unwrap();
    assert_eq!(of_b.iter().map(|p| p.provider_payment_id.as_str()).collect::<Vec<_>>(), vec!["cs_1"]);
}
