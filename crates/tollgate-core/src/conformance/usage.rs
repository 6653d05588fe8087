//! Conformance for plans, accounts, service keys and usage.

use std::sync::Arc;

use time::Duration;

use super::{audit, new_user, t0};
use crate::Timestamp;
use crate::accounts::{NewExternalAccount, Scope, ServiceKey, Subscription, SubscriptionStatus};
use crate::audit::AuditQuery;
use crate::identity::SecretToken;
use crate::ids::{AccountId, LeaseId, ReservationId, ServiceKeyId};
use crate::metering::window::Window;
use crate::metering::{
    CounterReset, EventContext, Idempotency, LeaseRequest, ReservationAction, ReservationStatus, UsageOp, UsageRequest,
    WindowCheck,
};
use crate::plans::{Allowance, Catalog, Meter, MeterKind, Plan, WindowLimit};
use crate::store::{Store, StoreError};

fn meter(kind: MeterKind) -> Meter {
    Meter { kind, unit: None, names: Default::default(), deny_status: 402, lease_seconds: None, credits_per_unit: None }
}

fn plan(key: &str, default: bool, limit: i64) -> Plan {
    let mut p = Catalog::builtin().default_plan().clone();
    p.key = key.into();
    p.default = default;
    p.allowances.insert(
        "messages".into(),
        Allowance::Counter { windows: vec![WindowLimit { window: Window::Day, limit: Some(limit) }] },
    );
    p
}

fn catalog(plans: Vec<Plan>) -> Catalog {
    Catalog {
        meters: [("messages".to_owned(), meter(MeterKind::Counter))].into(),
        plans: plans.into_iter().map(|p| (p.key.clone(), p)).collect(),
        credit_packages: Default::default(),
    }
}

async fn external(store: &Arc<dyn Store>, external_id: &str) -> AccountId {
    let new = NewExternalAccount {
        id: AccountId::new(),
        external_id: external_id.into(),
        name: Some("Customer".into()),
        email: None,
        created_at: t0(),
    };
    store.upsert_external_account(new).await.unwrap().0.id
}

fn window(window: Window, key: &str, limit: Option<i64>) -> WindowCheck {
    WindowCheck { window, limit, count_keys: [key.into()].into(), increment_key: key.into(), resets_at: None }
}

/// Each test uses one instant throughout, so a run that crosses midnight cannot split
/// its daily rollup in two.
fn consume(now: Timestamp, account: AccountId, amount: i64, windows: Vec<WindowCheck>) -> UsageRequest {
    UsageRequest {
        account,
        meter: "messages".into(),
        op: UsageOp::Consume,
        amount,
        windows,
        dry_run: false,
        idempotency: None,
        context: EventContext { endpoint: Some("/chat".into()), metadata: None, ip: Some("10.0.0.1".into()) },
        now,
        reservation: None,
        credits: None,
    }
}

fn day(now: Timestamp) -> String {
    let d = now.date();
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

pub async fn catalog_apply_is_idempotent_and_archives_plans_in_use(store: Arc<dyn Store>) {
    let now = t0();
    assert!(store.stored_catalog().await.unwrap().is_none());
    let first = catalog(vec![plan("free", true, 5), plan("pro", false, 100), plan("old", false, 1)]);
    let changes = store.apply_catalog(&first, now).await.unwrap();
    assert_eq!(changes.created.len(), 4, "{changes:?}");
    assert_eq!(store.stored_catalog().await.unwrap().unwrap(), first);
    let again = store.apply_catalog(&first, now).await.unwrap();
    assert!(again.created.is_empty() && again.updated.is_empty() && again.deleted.is_empty());
    assert_eq!(again.unchanged.len(), 4);
    // Audited in the same transaction, only when something changed.
    let applied = super::events_of(&store, "plans.applied").await;
    assert_eq!(applied.len(), 1, "the idempotent second apply writes no event");
    assert_eq!(applied[0].metadata["created"].as_array().unwrap().len(), 4);
    // "pro" is in use by a subscription, "old" is not.
    let account = external(&store, "cus_1").await;
    let sub = super::manual_subscription(account, "pro", now);
    let previous = store.subscription(sub.account_id).await.unwrap().map(|s| s.updated_at);
    store.put_subscription(sub, previous, audit("subscription.changed", now)).await.unwrap();
    let second = catalog(vec![plan("free", true, 10)]);
    let changes = store.apply_catalog(&second, now).await.unwrap();
    assert_eq!(changes.updated, vec!["plan free".to_owned()]);
    assert_eq!(changes.archived, vec!["plan pro".to_owned()]);
    assert_eq!(changes.deleted, vec!["plan old".to_owned()]);
    // The archived plan is still there for its subscriber, marked, with its definition.
    let mut archived = plan("pro", false, 100);
    archived.archived = true;
    let mut with_archived = second.clone();
    with_archived.plans.insert("pro".into(), archived);
    assert_eq!(store.stored_catalog().await.unwrap().unwrap(), with_archived, "archived plans stay, marked");
    // Declaring it again brings it back.
    let third = catalog(vec![plan("free", true, 10), plan("pro", false, 100)]);
    let changes = store.apply_catalog(&third, now).await.unwrap();
    assert_eq!(changes.updated, vec!["plan pro".to_owned()]);
}

pub async fn external_accounts_are_idempotent(store: Arc<dyn Store>) {
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let new = NewExternalAccount {
                id: AccountId::new(),
                external_id: "cus_42".into(),
                name: None,
                email: Some("billing@example.com".into()),
                created_at: t0(),
            };
            store.upsert_external_account(new).await.unwrap()
        }));
    }
    let mut ids = Vec::new();
    let mut created = 0;
    for t in tasks {
        let (account, was_created) = t.await.unwrap();
        created += usize::from(was_created);
        ids.push(account.id);
    }
    assert_eq!(created, 1);
    ids.dedup();
    assert_eq!(ids.len(), 1);
    let account = store.account_by_external_id("cus_42").await.unwrap().unwrap();
    assert_eq!(account.id, ids[0]);
    assert_eq!(account.email.as_deref(), Some("billing@example.com"));
    assert_eq!(store.account_by_id(ids[0]).await.unwrap().unwrap(), account);
    assert!(store.account_by_external_id("cus_43").await.unwrap().is_none());
    assert!(store.account_by_id(AccountId::new()).await.unwrap().is_none());
    // A user's personal account is an account too.
    let user = store.create_user(new_user("ada@example.com", t0()), None, audit("a", t0())).await.unwrap();
    let personal = store.account_by_id(user.account_id).await.unwrap().unwrap();
    assert_eq!(personal.kind, crate::accounts::AccountKind::Personal);
}

pub async fn subscriptions_are_one_per_account(store: Arc<dyn Store>) {
    let now = t0();
    let account = external(&store, "cus_1").await;
    assert!(store.subscription(account).await.unwrap().is_none());
    let mut sub = Subscription {
        account_id: account,
        plan: "pro".into(),
        status: SubscriptionStatus::Trialing,
        provider: "manual".into(),
        started_at: now,
        trial_ends_at: Some(now + Duration::days(14)),
        cancel_at_period_end: false,
        scheduled_plan: None,
        scheduled_at: None,
        updated_at: now,
        provider_subscription_id: None,
        provider_state_at: None,
    };
    store.put_subscription(sub.clone(), None, audit("s", now)).await.unwrap();
    assert_eq!(store.subscription(account).await.unwrap().unwrap(), sub);
    let first_version = sub.updated_at;
    sub.updated_at = now + Duration::seconds(1);
    sub.plan = "max".into();
    sub.status = SubscriptionStatus::Active;
    sub.cancel_at_period_end = true;
    sub.scheduled_plan = Some("free".into());
    sub.scheduled_at = Some(now + Duration::days(30));
    sub.trial_ends_at = None;
    store.put_subscription(sub.clone(), Some(first_version), audit("s", now)).await.unwrap();
    assert_eq!(store.subscription(account).await.unwrap().unwrap(), sub);
    let ghost = Subscription { account_id: AccountId::new(), ..sub };
    assert!(matches!(store.put_subscription(ghost, None, audit("s", now)).await, Err(StoreError::NotFound)));
}

/// A change computed from a version that is no longer stored is refused whole (no
/// row, no audit event), and of many changes computed from one version exactly one
/// lands.
pub async fn subscription_changes_compare_and_set(store: Arc<dyn Store>) {
    let now = t0();
    let account = external(&store, "cus_cas").await;
    let base = super::manual_subscription(account, "pro", now);
    store.put_subscription(base.clone(), None, audit("sub.first", now)).await.unwrap();
    // Created from "none" again: someone created it first.
    let again = Subscription { plan: "max".into(), ..base.clone() };
    assert!(matches!(
        store.put_subscription(again, None, audit("sub.lost", now)).await,
        Err(StoreError::Conflict("subscription_changed"))
    ));
    // From a stale version.
    let stale = Subscription { plan: "max".into(), updated_at: now + Duration::seconds(2), ..base.clone() };
    assert!(matches!(
        store.put_subscription(stale, Some(now - Duration::seconds(1)), audit("sub.lost", now)).await,
        Err(StoreError::Conflict("subscription_changed"))
    ));
    assert_eq!(store.subscription(account).await.unwrap().unwrap(), base);
    let lost = AuditQuery { action_prefix: Some("sub.lost".into()), limit: 10, ..Default::default() };
    assert!(store.list_audit(lost).await.unwrap().is_empty(), "a refused change leaves no audit event");

    // Sixteen writers race from the same version: one wins.
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let store = store.clone();
            let next = Subscription {
                plan: format!("plan-{i}"),
                updated_at: now + Duration::seconds(10) + Duration::microseconds(i),
                ..base.clone()
            };
            tokio::spawn(async move { store.put_subscription(next, Some(now), audit("sub.race", now)).await })
        })
        .collect();
    let mut won = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(()) => won += 1,
            Err(StoreError::Conflict("subscription_changed")) => {}
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!(won, 1);
    let stored = store.subscription(account).await.unwrap().unwrap();
    assert!(stored.plan.starts_with("plan-"));
    let races = AuditQuery { action_prefix: Some("sub.race".into()), limit: 50, ..Default::default() };
    assert_eq!(store.list_audit(races).await.unwrap().len(), 1);
}

pub async fn service_keys_are_found_by_digest(store: Arc<dyn Store>) {
    let now = t0();
    let secret = SecretToken::generate();
    let key = ServiceKey {
        id: ServiceKeyId::new(),
        name: "backend".into(),
        prefix: secret.expose()[..8].to_owned(),
        scopes: vec![Scope::UsageWrite, Scope::AccountsRead],
        created_at: now,
        revoked_at: None,
    };
    store.create_service_key(key.clone(), secret.digest(), audit("service_key.created", now)).await.unwrap();
    assert_eq!(store.service_key_by_digest(&secret.digest()).await.unwrap().unwrap(), key);
    assert!(store.service_key_by_digest(&SecretToken::generate().digest()).await.unwrap().is_none());
}

pub async fn consume_counts_all_windows_or_none(store: Arc<dyn Store>) {
    let now = t0();
    let account = external(&store, "cus_1").await;
    let windows = || vec![window(Window::Day, "d:today", Some(5)), window(Window::Month, "m:this", Some(7))];
    for i in 1..=5 {
        let d = store.consume_usage(consume(now, account, 1, windows())).await.unwrap();
        assert!(d.allowed);
        assert_eq!(d.windows[0].used, i);
        assert_eq!(d.windows[0].remaining, Some(5 - i));
        assert_eq!(d.windows[0].warning, i >= 4);
    }
    // The day is full: denied, and the month is not counted either.
    let d = store.consume_usage(consume(now, account, 1, windows())).await.unwrap();
    assert!(!d.allowed);
    assert_eq!(d.denied_by, Some(Window::Day));
    assert_eq!(d.windows[1].used, 5);
    // Tomorrow (a new day key) the month still has 2 left: 3 is refused, 2 fits.
    let tomorrow = || vec![window(Window::Day, "d:tomorrow", Some(5)), window(Window::Month, "m:this", Some(7))];
    let d = store.consume_usage(consume(now, account, 3, tomorrow())).await.unwrap();
    assert_eq!((d.allowed, d.denied_by), (false, Some(Window::Month)));
    let d = store.consume_usage(consume(now, account, 2, tomorrow())).await.unwrap();
    assert!(d.allowed);
    assert_eq!(d.windows[1].remaining, Some(0));
    let keys = vec![
        vec!["d:today".to_owned()],
        vec!["m:this".to_owned()],
        vec!["d:today".to_owned(), "d:tomorrow".to_owned()],
    ];
    assert_eq!(store.counter_values(account, "messages", &keys).await.unwrap(), vec![5, 7, 7]);
    let daily = store.usage_daily(account, Some("messages"), &day(now), &day(now)).await.unwrap();
    assert_eq!(daily.len(), 1);
    assert_eq!((daily[0].consumed, daily[0].denied), (7, 2));
    // Unlimited windows count but never deny; dry runs count nothing.
    let mut check = consume(now, account, 1_000_000, vec![window(Window::Lifetime, "l", None)]);
    check.dry_run = true;
    assert!(store.consume_usage(check.clone()).await.unwrap().allowed);
    assert_eq!(store.counter_values(account, "messages", &[vec!["l".into()]]).await.unwrap(), vec![0]);
    check.dry_run = false;
    assert_eq!(store.consume_usage(check).await.unwrap().windows[0].used, 1_000_000);
}

pub async fn consume_is_exact_under_concurrency(store: Arc<dyn Store>) {
    let now = t0();
    const TASKS: usize = 64;
    const EACH: usize = 200;
    const LIMIT: i64 = 10_000;
    let account = external(&store, "cus_hot").await;
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut granted = 0i64;
            for _ in 0..EACH {
                let windows =
                    vec![window(Window::Day, "d:1", Some(LIMIT)), window(Window::Month, "m:1", Some(LIMIT + 500))];
                if store.consume_usage(consume(now, account, 1, windows)).await.unwrap().allowed {
                    granted += 1;
                }
            }
            granted
        }));
    }
    let mut granted = 0;
    for t in tasks {
        granted += t.await.unwrap();
    }
    assert_eq!(granted, LIMIT, "exactly the limit was granted");
    let keys = vec![vec!["d:1".to_owned()], vec!["m:1".to_owned()]];
    assert_eq!(store.counter_values(account, "messages", &keys).await.unwrap(), vec![LIMIT, LIMIT]);
    let daily = store.usage_daily(account, None, &day(now), &day(now)).await.unwrap();
    assert_eq!(daily[0].consumed, LIMIT, "the events agree with the counter");
    assert_eq!(daily[0].denied, (TASKS * EACH) as i64 - LIMIT);
}

pub async fn idempotent_consume_replays_and_conflicts(store: Arc<dyn Store>) {
    let now = t0();
    let account = external(&store, "cus_1").await;
    let idem = |hash: &str| Idempotency { scope: "key:test".into(), key: "req-1".into(), request_hash: hash.into() };
    let request = |hash: &str| {
        let mut r = consume(now, account, 2, vec![window(Window::Day, "d:1", Some(10))]);
        r.idempotency = Some(idem(hash));
        r
    };
    // Replayed concurrently: counted once.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let store = store.clone();
        let r = request("h1");
        tasks.push(tokio::spawn(async move { store.consume_usage(r).await.unwrap() }));
    }
    let mut decisions = Vec::new();
    for t in tasks {
        decisions.push(t.await.unwrap());
    }
    assert_eq!(decisions.iter().filter(|d| !d.replayed).count(), 1);
    assert!(decisions.iter().all(|d| d.allowed && d.windows[0].used == 2), "replays carry the first answer");
    assert_eq!(store.counter_values(account, "messages", &[vec!["d:1".into()]]).await.unwrap(), vec![2]);
    // Same key, another request: refused, nothing counted.
    let other = store.consume_usage(request("h2")).await;
    assert!(matches!(other, Err(StoreError::Conflict("idempotency_key"))), "{other:?}");
    assert_eq!(store.counter_values(account, "messages", &[vec!["d:1".into()]]).await.unwrap(), vec![2]);
}

pub async fn consume_for_an_unknown_account_is_not_found(store: Arc<dyn Store>) {
    let r = store.consume_usage(consume(t0(), AccountId::new(), 1, vec![window(Window::Day, "d:1", Some(10))])).await;
    assert!(matches!(r, Err(StoreError::NotFound)), "{r:?}");
}

pub async fn refunds_and_gauge_levels(store: Arc<dyn Store>) {
    let now = t0();
    let account = external(&store, "cus_1").await;
    let windows = || vec![window(Window::Day, "d:1", Some(10)), window(Window::Month, "m:1", Some(100))];
    assert!(store.consume_usage(consume(now, account, 4, windows())).await.unwrap().allowed);
    // A refund gives back from every window, never below zero.
    let mut refund = consume(now, account, 6, windows());
    refund.op = UsageOp::Refund;
    let d = store.consume_usage(refund).await.unwrap();
    assert!(d.allowed);
    assert_eq!((d.windows[0].used, d.windows[1].used), (0, 0));
    assert_eq!(
        store.counter_values(account, "messages", &[vec!["d:1".into()], vec!["m:1".into()]]).await.unwrap(),
        vec![0, 0]
    );
    // A gauge: set raises within the maximum, lowers always.
    let gauge = || vec![window(Window::Lifetime, "g", Some(1000))];
    let mut set = consume(now, account, 800, gauge());
    set.op = UsageOp::Set;
    assert_eq!(store.consume_usage(set.clone()).await.unwrap().windows[0].used, 800);
    set.amount = 1001;
    let d = store.consume_usage(set.clone()).await.unwrap();
    assert_eq!((d.allowed, d.windows[0].used), (false, 800));
    set.amount = 0;
    assert_eq!(store.consume_usage(set).await.unwrap().windows[0].used, 0);
    // Consumes then count from the new level.
    let d = store.consume_usage(consume(now, account, 1000, gauge())).await.unwrap();
    assert!(d.allowed);
    assert!(!store.consume_usage(consume(now, account, 1, gauge())).await.unwrap().allowed);
    let daily = store.usage_daily(account, None, &day(now), &day(now)).await.unwrap();
    // Net: +4 -4 +800 -800 +1000, and two denials.
    assert_eq!((daily[0].consumed, daily[0].denied), (1000, 2));
}

fn lease(account: AccountId, max: Option<i64>, now: Timestamp, ttl: Duration) -> LeaseRequest {
    LeaseRequest {
        id: LeaseId::new(),
        account,
        meter: "simulations".into(),
        max,
        expires_at: now + ttl,
        context: EventContext::default(),
        now,
        idempotency: None,
    }
}

/// Attempts of one acquire with one key, at once: one slot taken, every answer names
/// the same lease; the key with another request is refused.
pub async fn idempotent_acquires_take_one_slot(store: Arc<dyn Store>) {
    let now = t0();
    let account = external(&store, "lab").await;
    let idem =
        |hash: &str| Idempotency { scope: "svc:test:acquire".into(), key: "run-1".into(), request_hash: hash.into() };
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            let request =
                LeaseRequest { idempotency: Some(idem("h1")), ..lease(account, Some(3), now, Duration::hours(1)) };
            tokio::spawn(async move { store.acquire_lease(request).await.unwrap() })
        })
        .collect();
    let mut leases = std::collections::HashSet::new();
    let mut fresh = 0;
    for task in tasks {
        let d = task.await.unwrap();
        assert!(d.allowed);
        assert_eq!(d.held, 1, "{d:?}");
        leases.insert(d.lease_id.unwrap());
        fresh += usize::from(!d.replayed);
    }
    assert_eq!((leases.len(), fresh), (1, 1));
    let other = LeaseRequest { idempotency: Some(idem("h2")), ..lease(account, Some(3), now, Duration::hours(1)) };
    assert!(matches!(store.acquire_lease(other).await, Err(StoreError::Conflict("idempotency_key"))));
    let plain = store.acquire_lease(lease(account, Some(3), now, Duration::hours(1))).await.unwrap();
    assert_eq!(plain.held, 2, "only one slot was taken by the eight attempts");
    // A denial is not the key's answer: retried once a slot is free, it takes it.
    store.acquire_lease(lease(account, Some(3), now, Duration::hours(1))).await.unwrap();
    let keyed = || LeaseRequest {
        idempotency: Some(Idempotency {
            scope: "svc:test:acquire".into(),
            key: "run-2".into(),
            request_hash: "h1".into(),
        }),
        ..lease(account, Some(3), now, Duration::hours(1))
    };
    assert!(!store.acquire_lease(keyed()).await.unwrap().allowed);
    store.release_lease(account, plain.lease_id.unwrap(), now, None).await.unwrap();
    let retried = store.acquire_lease(keyed()).await.unwrap();
    assert!(retried.allowed && !retried.replayed, "{retried:?}");
}

pub async fn leases_hold_slots_until_released_or_expired(store: Arc<dyn Store>) {
    let now = t0();
    let account = external(&store, "lab").await;
    let other = external(&store, "other-lab").await;
    // Concurrent acquires never exceed the maximum.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store.acquire_lease(lease(account, Some(3), now, Duration::hours(1))).await.unwrap()
        }));
    }
    let mut granted = Vec::new();
    for t in tasks {
        let d = t.await.unwrap();
        if d.allowed {
            granted.push(d.lease_id.unwrap());
        } else {
            assert_eq!(d.held, 3);
            assert!(d.next_expiry.is_some());
        }
    }
    assert_eq!(granted.len(), 3);
    // Another account's slots are its own; its lease cannot be released by us.
    let theirs = store.acquire_lease(lease(other, Some(3), now, Duration::hours(1))).await.unwrap();
    assert!(theirs.allowed);
    assert!(matches!(
        store.release_lease(account, theirs.lease_id.unwrap(), now, None).await,
        Err(StoreError::NotFound)
    ));
    // Releasing frees a slot, once.
    store.release_lease(account, granted[0], now, None).await.unwrap();
    assert!(matches!(store.release_lease(account, granted[0], now, None).await, Err(StoreError::NotFound)));
    // With a key, a retry of a release replays it; the key under another lease is refused.
    let key =
        |hash: &str| Some(Idempotency { scope: "svc:t:release".into(), key: "r1".into(), request_hash: hash.into() });
    assert!(!store.release_lease(account, granted[1], now, key("h1")).await.unwrap());
    assert!(store.release_lease(account, granted[1], now, key("h1")).await.unwrap(), "replayed");
    let other = store.release_lease(account, granted[2], now, key("h2")).await;
    assert!(matches!(other, Err(StoreError::Conflict("idempotency_key"))), "{other:?}");
    // A failed release leaves the key free.
    let missing = store
        .release_lease(account, granted[0], now, Some(Idempotency { key: "r2".into(), ..key("h3").unwrap() }))
        .await;
    assert!(matches!(missing, Err(StoreError::NotFound)));
    store
        .release_lease(account, granted[2], now, Some(Idempotency { key: "r2".into(), ..key("h4").unwrap() }))
        .await
        .unwrap();
    let again = store.acquire_lease(lease(account, Some(3), now, Duration::seconds(10))).await.unwrap();
    assert!(again.allowed);
    assert_eq!(again.held, 1, "all three released, one taken again");
    // Expired leases free their slots by themselves.
    let later = now + Duration::hours(2);
    let d = store.acquire_lease(lease(account, Some(3), later, Duration::hours(1))).await.unwrap();
    assert!(d.allowed);
    assert_eq!(d.held, 1);
    assert!(store.acquire_lease(lease(account, None, later, Duration::hours(1))).await.unwrap().allowed, "unlimited");
    let unknown = store.acquire_lease(lease(AccountId::new(), Some(1), now, Duration::hours(1))).await;
    assert!(matches!(unknown, Err(StoreError::NotFound)));
}

fn reserve(now: Timestamp, account: AccountId, amount: i64, ttl: Duration) -> (ReservationId, UsageRequest) {
    let id = ReservationId::new();
    let mut r = consume(now, account, amount, vec![window(Window::Day, "d:1", Some(10))]);
    r.reservation = Some(ReservationAction::Open { id, expires_at: now + ttl });
    (id, r)
}

fn settle(
    now: Timestamp,
    account: AccountId,
    id: ReservationId,
    give_back: i64,
    status: ReservationStatus,
) -> UsageRequest {
    let mut r = consume(now, account, give_back, vec![window(Window::Day, "d:1", Some(10))]);
    r.op = UsageOp::Refund;
    r.reservation = Some(ReservationAction::Settle { id, status });
    r
}

pub async fn reservations_count_until_settled(store: Arc<dyn Store>) {
    let now = t0();
    let account = external(&store, "cus_1").await;
    let used = |store: Arc<dyn Store>| async move {
        store.counter_values(account, "messages", &[vec!["d:1".into()]]).await.unwrap()[0]
    };
    let (id, r) = reserve(now, account, 6, Duration::minutes(5));
    assert!(store.consume_usage(r).await.unwrap().allowed);
    assert_eq!(used(store.clone()).await, 6);
    let stored = store.reservation(account, id).await.unwrap().unwrap();
    assert_eq!((stored.amount, stored.status, stored.meter.as_str()), (6, ReservationStatus::Pending, "messages"));
    assert_eq!(stored.windows[0].increment_key, "d:1");
    // A denied reserve opens nothing.
    let (denied, r) = reserve(now, account, 5, Duration::minutes(5));
    assert!(!store.consume_usage(r).await.unwrap().allowed);
    assert!(store.reservation(account, denied).await.unwrap().is_none());
    // Commit 4 of the 6: 2 come back; settling twice is refused.
    let d = store.consume_usage(settle(now, account, id, 2, ReservationStatus::Committed)).await.unwrap();
    assert_eq!(d.windows[0].used, 4);
    assert_eq!(store.reservation(account, id).await.unwrap().unwrap().status, ReservationStatus::Committed);
    let again = store.consume_usage(settle(now, account, id, 2, ReservationStatus::Released)).await;
    assert!(matches!(again, Err(StoreError::NotFound)), "{again:?}");
    assert_eq!(used(store.clone()).await, 4);
    // Another account cannot settle it.
    let other = external(&store, "cus_2").await;
    let (theirs, r) = reserve(now, other, 1, Duration::minutes(5));
    store.consume_usage(r).await.unwrap();
    assert!(matches!(
        store.consume_usage(settle(now, account, theirs, 1, ReservationStatus::Released)).await,
        Err(StoreError::NotFound)
    ));
    // Expired reservations are listed for the sweeper.
    let (late, r) = reserve(now, account, 3, Duration::seconds(1));
    store.consume_usage(r).await.unwrap();
    assert_eq!(used(store.clone()).await, 7);
    let later = now + Duration::seconds(2);
    let expired = store.expired_reservations(later, 10).await.unwrap();
    assert_eq!(expired.iter().map(|r| r.id).collect::<Vec<_>>(), vec![late]);
    store.consume_usage(settle(later, account, late, 3, ReservationStatus::Expired)).await.unwrap();
    assert_eq!(used(store.clone()).await, 4);
    assert!(store.expired_reservations(later, 10).await.unwrap().is_empty());
}

pub async fn reservations_are_exact_under_concurrency(store: Arc<dyn Store>) {
    let now = t0();
    let account = external(&store, "cus_hot").await;
    let mut tasks = Vec::new();
    for task in 0..16 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut committed = 0i64;
            for i in 0..20 {
                let (id, r) = reserve(now, account, 1, Duration::minutes(5));
                if !store.consume_usage(r).await.unwrap().allowed {
                    continue;
                }
                // Half the work succeeds, half fails.
                if (task + i) % 2 == 0 {
                    store.consume_usage(settle(now, account, id, 0, ReservationStatus::Committed)).await.unwrap();
                    committed += 1;
                } else {
                    store.consume_usage(settle(now, account, id, 1, ReservationStatus::Released)).await.unwrap();
                }
            }
            committed
        }));
    }
    let mut committed = 0;
    for t in tasks {
        committed += t.await.unwrap();
    }
    let used = store.counter_values(account, "messages", &[vec!["d:1".into()]]).await.unwrap()[0];
    assert_eq!(used, committed, "the counter holds exactly the committed work");
    assert!(used <= 10, "never past the limit");
}

/// A meter funded by credits: once its window is spent, consumes are paid from the
/// balance (in the same transaction as the usage event), never past the floor, and the
/// window's counter never passes its limit.
pub async fn spent_windows_draw_on_credits(store: Arc<dyn Store>) {
    use crate::audit::Actor;
    use crate::credits::{CreditKind, CreditTransfer};
    use crate::metering::CreditFunding;

    let now = t0();
    let account = external(&store, "cus_credits").await;
    let funded = |amount: i64| {
        let mut r = consume(now, account, amount, vec![window(Window::Day, "d:1", Some(2))]);
        r.credits = Some(CreditFunding { per_unit: 3, floor: 0 });
        r
    };
    let within = store.consume_usage(funded(2)).await.unwrap();
    assert!(within.allowed);
    assert_eq!(within.credits_charged, 0, "within the plan, no credits");
    let broke = store.consume_usage(funded(1)).await.unwrap();
    assert!(!broke.allowed, "no credits yet");
    store.transfer_credits(CreditTransfer::new(account, CreditKind::Purchase, 10, Actor::System, now)).await.unwrap();
    let mut check = funded(1);
    check.dry_run = true;
    let dry = store.consume_usage(check).await.unwrap();
    assert!(dry.allowed && dry.credits_charged == 3, "{dry:?}");
    let paid = store.consume_usage(funded(2)).await.unwrap();
    assert!(paid.allowed, "{paid:?}");
    assert_eq!((paid.credits_charged, paid.windows[0].used), (6, 2));
    assert!(!store.consume_usage(funded(2)).await.unwrap().allowed, "costs 6, 4 left");
    assert!(store.consume_usage(funded(1)).await.unwrap().allowed);
    assert_eq!(store.credit_balance(account).await.unwrap().balance, 1);
    // Concurrent funded consumes drain the balance exactly and never below zero.
    store.transfer_credits(CreditTransfer::new(account, CreditKind::Purchase, 29, Actor::System, now)).await.unwrap();
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let store = store.clone();
            let request = funded(1);
            tokio::spawn(async move { store.consume_usage(request).await.unwrap() })
        })
        .collect();
    let mut charged = 0;
    for task in tasks {
        charged += task.await.unwrap().credits_charged;
    }
    assert_eq!(charged, 30, "ten of sixteen paid 3 each");
    assert_eq!(store.credit_balance(account).await.unwrap().balance, 0);
    assert_eq!(store.counter_values(account, "messages", &[vec!["d:1".into()]]).await.unwrap(), vec![2]);
    let daily = store.usage_daily(account, Some("messages"), &day(now), &day(now)).await.unwrap();
    assert_eq!(daily[0].consumed, 2 + 2 + 1 + 10, "paid consumes count as consumed");
    assert!(store.ledger_check().await.unwrap().is_sound());
}

pub async fn quota_resets_start_windows_over(store: Arc<dyn Store>) {
    let now = t0();
    let account = external(&store, "cus_reset").await;
    let windows = || vec![window(Window::Day, "d:r", Some(3)), window(Window::Month, "m:r", Some(100))];
    for _ in 0..3 {
        assert!(store.consume_usage(consume(now, account, 1, windows())).await.unwrap().allowed);
    }
    assert!(!store.consume_usage(consume(now, account, 1, windows())).await.unwrap().allowed);
    // Only the day starts over; a key without a row deletes nothing.
    let reset = move |keys: Vec<&str>| CounterReset {
        account,
        counters: vec![("messages".into(), keys.into_iter().map(str::to_owned).collect())],
        audit: audit("admin.quota.reset", now),
    };
    assert_eq!(store.reset_counters(reset(vec!["d:r", "d:other"])).await.unwrap(), 1);
    let keys = vec![vec!["d:r".to_owned()], vec!["m:r".to_owned()]];
    assert_eq!(store.counter_values(account, "messages", &keys).await.unwrap(), vec![0, 3]);
    let d = store.consume_usage(consume(now, account, 3, windows())).await.unwrap();
    assert!(d.allowed, "the day has room again");
    assert_eq!((d.windows[0].used, d.windows[1].used), (3, 6));
    let events = super::events_of(&store, "admin.quota.reset").await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].metadata["rows_deleted"], 1);

    // Resets racing consumes: every consume is decided on the counts as they stand,
    // so the day's counter equals the consumes granted after the last reset.
    const TASKS: usize = 16;
    const EACH: usize = 50;
    assert_eq!(store.reset_counters(reset(vec!["d:r", "m:r"])).await.unwrap(), 2);
    let unlimited = || vec![window(Window::Day, "d:r", None), window(Window::Month, "m:r", None)];
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..EACH {
                assert!(store.consume_usage(consume(now, account, 1, unlimited())).await.unwrap().allowed);
            }
        }));
    }
    let resets = {
        let store = store.clone();
        tokio::spawn(async move {
            for _ in 0..5 {
                store.reset_counters(reset(vec!["m:r"])).await.unwrap();
                tokio::task::yield_now().await;
            }
        })
    };
    for t in tasks {
        t.await.unwrap();
    }
    resets.await.unwrap();
    let values = store.counter_values(account, "messages", &keys).await.unwrap();
    assert_eq!(values[0], (TASKS * EACH) as i64, "the day was not reset: every consume counted once");
    assert!(values[1] <= values[0], "the month only ever lost counts to resets");
    // After a final reset nothing stale remains anywhere (the SQLite writer's memory
    // included): the next consume starts from zero.
    store.reset_counters(reset(vec!["d:r", "m:r"])).await.unwrap();
    let d = store.consume_usage(consume(now, account, 1, windows())).await.unwrap();
    assert_eq!((d.windows[0].used, d.windows[1].used), (1, 1));
}

pub async fn cleanup_deletes_only_what_retention_names(store: Arc<dyn Store>) {
    use crate::system::Retention;
    let now = t0();
    let user = store.create_user(new_user("old@example.com", now), None, audit("user.registered", now)).await.unwrap();
    let (_, mut expired) = super::session_for(user.id, now - Duration::days(40));
    expired.expires_at = now - Duration::days(10);
    store.create_session(expired, audit("login.succeeded", now - Duration::days(40))).await.unwrap();
    let (_, live) = super::session_for(user.id, now);
    let live = store.create_session(live, audit("login.succeeded", now)).await.unwrap();
    store.record_audit(audit("ancient.thing", now - Duration::days(400))).await.unwrap();
    let account = external(&store, "cus_cleanup").await;
    let lifetime = || vec![window(Window::Lifetime, "l", None)];
    store.consume_usage(consume(now - Duration::days(100), account, 1, lifetime())).await.unwrap();
    store.consume_usage(consume(now, account, 1, lifetime())).await.unwrap();
    let backlogs = store.backlogs(now).await.unwrap();
    assert_eq!((backlogs.emails_pending, backlogs.webhook_events_last_24h), (0, 0));
    // An expired override goes, one still in force stays.
    let other = external(&store, "cus_cleanup_live").await;
    for (id, expires_at) in [(account, now - Duration::seconds(1)), (other, now + Duration::days(1))] {
        let overrides = crate::metering::overrides::LimitOverrides {
            account_id: id,
            limits: [("gpu".to_owned(), Allowance::Flag { enabled: true })].into(),
            reason: "trial".into(),
            expires_at: Some(expires_at),
            set_by: "system:".into(),
            updated_at: now,
        };
        store.set_limit_overrides(id, Some(overrides), audit("admin.limits.set", now)).await.unwrap();
    }

    let retention =
        Retention { usage_events_before: now - Duration::days(90), audit_before: now - Duration::days(365), now };
    let report = store.cleanup(retention, audit("admin.system.cleanup", now)).await.unwrap();
    assert_eq!((report.usage_events, report.audit_events), (1, 1));
    assert_eq!((report.sessions, report.refresh_tokens), (1, 1));
    assert_eq!(report.limit_overrides, 1);
    assert!(store.limit_overrides(account).await.unwrap().is_none());
    assert!(store.limit_overrides(other).await.unwrap().is_some());
    let actions: Vec<String> = store
        .list_audit(AuditQuery { limit: 50, ..Default::default() })
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.action)
        .collect();
    assert!(actions.contains(&"admin.system.cleanup".to_owned()) && actions.contains(&"user.registered".to_owned()));
    assert!(!actions.contains(&"ancient.thing".to_owned()), "{actions:?}");
    // Counters and rollups stay: only the event log is trimmed.
    assert_eq!(store.counter_values(account, "messages", &[vec!["l".into()]]).await.unwrap(), vec![2]);
    let live_sessions = store.list_sessions(user.id, now).await.unwrap();
    assert_eq!(live_sessions.iter().map(|s| s.id).collect::<Vec<_>>(), vec![live.id]);
    let again = store.cleanup(retention, audit("admin.system.cleanup", now)).await.unwrap();
    assert_eq!(again, Default::default(), "a second cleanup finds nothing");
}

pub async fn api_keys_are_found_listed_revoked_and_limited(store: Arc<dyn Store>) {
    use crate::api_keys::{self, ApiKey, ApiKeyScope, MAX_PER_ACCOUNT};
    use crate::ids::ApiKeyId;
    let now = t0();
    let account = external(&store, "cus_keys").await;
    let other = external(&store, "cus_other").await;
    let key = |account: AccountId, at: Timestamp| ApiKey {
        id: ApiKeyId::new(),
        account_id: account,
        name: "ci".into(),
        prefix: "tg_live_abcd".into(),
        scopes: vec![ApiKeyScope::Read, ApiKeyScope::Write],
        created_at: at,
        expires_at: Some(at + Duration::days(30)),
        last_used_at: None,
        revoked_at: None,
    };
    let first = key(account, now);
    let secret = api_keys::generate_secret();
    store.create_api_key(first.clone(), api_keys::digest(&secret), audit("api_key.created", now)).await.unwrap();
    assert_eq!(store.api_key_by_digest(&api_keys::digest(&secret)).await.unwrap(), Some(first.clone()));
    assert_eq!(store.api_key_by_digest(&api_keys::digest("tg_live_nope")).await.unwrap(), None);
    store.touch_api_key(first.id, now + Duration::seconds(5)).await.unwrap();
    store.touch_api_key(first.id, now + Duration::seconds(1)).await.unwrap();
    let listed = store.api_keys(account).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].last_used_at, Some(now + Duration::seconds(5)), "touches never go back in time");
    assert!(store.api_keys(other).await.unwrap().is_empty());

    // Another account cannot revoke it; its own account can, once.
    let r = store.revoke_api_key(other, first.id, audit("api_key.revoked", now)).await;
    assert!(matches!(r, Err(StoreError::NotFound)), "{r:?}");
    let revoked = store.revoke_api_key(account, first.id, audit("api_key.revoked", now)).await.unwrap();
    assert_eq!(revoked.revoked_at, Some(now));
    let r = store.revoke_api_key(account, first.id, audit("api_key.revoked", now)).await;
    assert!(matches!(r, Err(StoreError::NotFound)));
    assert!(store.api_keys(account).await.unwrap().is_empty());
    let found = store.api_key_by_digest(&api_keys::digest(&secret)).await.unwrap().unwrap();
    assert!(!found.is_live(now), "a revoked key is found but not live");

    // At most MAX_PER_ACCOUNT live keys; revoked ones do not count.
    for i in 0..MAX_PER_ACCOUNT {
        let k = key(account, now + Duration::microseconds(i as i64 + 1));
        store.create_api_key(k, api_keys::digest(&format!("s{i}")), audit("api_key.created", now)).await.unwrap();
    }
    let r = store.create_api_key(key(account, now), api_keys::digest("one-more"), audit("api_key.created", now)).await;
    assert!(matches!(r, Err(StoreError::Conflict("api_keys_limit"))), "{r:?}");
    let events = super::events_of(&store, "api_key.created").await;
    assert_eq!(events.len(), MAX_PER_ACCOUNT + 1, "the refused key left no event");
}

pub async fn limit_overrides_replace_expire_and_audit(store: Arc<dyn Store>) {
    use crate::metering::overrides::LimitOverrides;
    let now = t0();
    let account = external(&store, "cus_overrides").await;
    let other = external(&store, "cus_overrides_other").await;
    let set = |account: AccountId, limits: Vec<(&str, Allowance)>, expires_at: Option<Timestamp>| LimitOverrides {
        account_id: account,
        limits: limits.into_iter().map(|(k, a)| (k.to_owned(), a)).collect(),
        reason: "pilot customer".into(),
        expires_at,
        set_by: "system:".into(),
        updated_at: now,
    };
    assert_eq!(store.limit_overrides(account).await.unwrap(), None);
    let first = set(
        account,
        vec![
            ("messages", Allowance::Counter { windows: vec![WindowLimit { window: Window::Day, limit: Some(50) }] }),
            ("gpu", Allowance::Flag { enabled: true }),
        ],
        None,
    );
    store.set_limit_overrides(account, Some(first.clone()), audit("admin.limits.set", now)).await.unwrap();
    assert_eq!(store.limit_overrides(account).await.unwrap(), Some(first.clone()));

    // A second set replaces the first whole.
    let second = set(account, vec![("storage", Allowance::Gauge { max: None })], Some(now + Duration::hours(1)));
    store.set_limit_overrides(account, Some(second.clone()), audit("admin.limits.set", now)).await.unwrap();
    assert_eq!(store.limit_overrides(account).await.unwrap(), Some(second.clone()));

    // In force: not expired; an expired set stays readable for the admin.
    let expired = set(other, vec![("gpu", Allowance::Flag { enabled: false })], Some(now - Duration::seconds(1)));
    store.set_limit_overrides(other, Some(expired.clone()), audit("admin.limits.set", now)).await.unwrap();
    assert_eq!(store.limit_overrides_in_force(now).await.unwrap(), vec![second.clone()]);
    assert_eq!(store.limit_overrides(other).await.unwrap(), Some(expired));
    assert!(store.limit_overrides_in_force(now + Duration::hours(2)).await.unwrap().is_empty());

    // Clearing removes the row; an unknown account is not found and writes nothing.
    store.set_limit_overrides(account, None, audit("admin.limits.cleared", now)).await.unwrap();
    assert_eq!(store.limit_overrides(account).await.unwrap(), None);
    let missing = AccountId::new();
    let err =
        store.set_limit_overrides(missing, Some(set(missing, vec![], None)), audit("admin.limits.set", now)).await;
    assert!(matches!(err, Err(StoreError::NotFound)), "{err:?}");
    let count = async |action| super::events_of(&store, action).await.len();
    assert_eq!((count("admin.limits.set").await, count("admin.limits.cleared").await), (3, 1));
}

pub async fn plans_are_created_replaced_and_removed_one_at_a_time(store: Arc<dyn Store>) {
    use crate::store::PlanRemoval;
    let now = t0();
    store.apply_catalog(&catalog(vec![plan("free", true, 10)]), now).await.unwrap();
    let team = plan("team", false, 500);
    store.put_plan(&team, None, audit("admin.plan.created", now), now).await.unwrap();
    let again = store.put_plan(&team, None, audit("admin.plan.created", now), now).await;
    assert!(matches!(again, Err(StoreError::Conflict("plans_key"))), "{again:?}");
    let nope = plan("nope", false, 1);
    let missing = store.put_plan(&nope, Some(&nope), audit("admin.plan.updated", now), now).await;
    assert!(matches!(missing, Err(StoreError::NotFound)), "{missing:?}");
    let mut bigger = plan("team", false, 900);
    store.put_plan(&bigger, Some(&team), audit("admin.plan.updated", now), now).await.unwrap();
    assert_eq!(store.stored_catalog().await.unwrap().unwrap().plans["team"], bigger);
    // A change based on a stale read is refused: it would undo the one in between.
    let stale = store.put_plan(&plan("team", false, 1), Some(&team), audit("admin.plan.updated", now), now).await;
    assert!(matches!(stale, Err(StoreError::Conflict("plan_changed"))), "{stale:?}");
    let before = bigger.clone();
    bigger.archived = true;
    store.put_plan(&bigger, Some(&before), audit("admin.plan.updated", now), now).await.unwrap();
    assert!(store.stored_catalog().await.unwrap().unwrap().plans["team"].archived);
    let stale = store.put_plan(&before, Some(&before), audit("admin.plan.updated", now), now).await;
    assert!(matches!(stale, Err(StoreError::Conflict("plan_changed"))), "a stale read cannot un-archive");
    let archived = bigger.clone();
    bigger.archived = false;
    store.put_plan(&bigger, Some(&archived), audit("admin.plan.updated", now), now).await.unwrap();
    assert!(!store.stored_catalog().await.unwrap().unwrap().plans["team"].archived);

    // Removing: a plan an account is subscribed to (or scheduled to move to) is
    // archived; an unused one is deleted.
    let account = external(&store, "cus_plans").await;
    store.put_plan(&plan("later", false, 5), None, audit("admin.plan.created", now), now).await.unwrap();
    let sub = Subscription {
        scheduled_plan: Some("later".into()),
        scheduled_at: Some(now + Duration::days(30)),
        ..super::manual_subscription(account, "team", now)
    };
    store.put_subscription(sub, None, audit("subscription.changed", now)).await.unwrap();
    assert_eq!(store.remove_plan("team", audit("admin.plan.removed", now), now).await.unwrap(), PlanRemoval::Archived);
    assert_eq!(store.remove_plan("later", audit("admin.plan.removed", now), now).await.unwrap(), PlanRemoval::Archived);
    store.put_plan(&plan("unused", false, 5), None, audit("admin.plan.created", now), now).await.unwrap();
    assert_eq!(store.remove_plan("unused", audit("admin.plan.removed", now), now).await.unwrap(), PlanRemoval::Deleted);
    assert!(matches!(
        store.remove_plan("unused", audit("admin.plan.removed", now), now).await,
        Err(StoreError::NotFound)
    ));
    let stored = store.stored_catalog().await.unwrap().unwrap();
    assert!(stored.plans["team"].archived && stored.plans["later"].archived);
    assert!(!stored.plans.contains_key("unused"));
    let removed = super::events_of(&store, "admin.plan.removed").await;
    let outcomes: Vec<&serde_json::Value> = removed.iter().map(|e| &e.metadata["outcome"]).collect();
    assert_eq!(outcomes, vec!["deleted", "archived", "archived"], "newest first, refusals not audited");
    let written = async |action| super::events_of(&store, action).await.len();
    assert_eq!(
        (written("admin.plan.created").await, written("admin.plan.updated").await),
        (3, 3),
        "refusals write none"
    );

    // Settings: absent, set, replaced.
    assert_eq!(store.setting("plans_file_digest").await.unwrap(), None);
    store.put_setting("plans_file_digest", "abc", now).await.unwrap();
    store.put_setting("plans_file_digest", "def", now).await.unwrap();
    assert_eq!(store.setting("plans_file_digest").await.unwrap().as_deref(), Some("def"));
}
