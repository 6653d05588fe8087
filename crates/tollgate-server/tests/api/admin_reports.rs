//! `/v1/admin` reports: stats, usage analytics, usage logs and payments. Exact numbers
//! over known fixtures (users, a suspension, subscriptions, consumes and denials,
//! payments with a refund) on SQLite and on PostgreSQL; who may read them; bad
//! parameters.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use time::{Duration, OffsetDateTime};
use tollgate_core::billing::{BillingEffect, Payment, PaymentKind, PaymentStatus, ProviderEvent};
use tollgate_core::ids::{AccountId, PaymentId};

use crate::helpers::{Reply, TestApp};

const ROUTES: [&str; 4] =
    ["/v1/admin/stats", "/v1/admin/analytics/usage", "/v1/admin/usage-logs", "/v1/admin/payments"];

async fn my_id(app: &TestApp, access: &str) -> String {
    app.get_auth("/v1/me", access).await.body["user"]["id"].as_str().unwrap().to_owned()
}

/// A signed-in admin user (promoted by a service key): (access token, user id).
async fn admin_user(app: &TestApp, key: &str, email: &str) -> (String, String) {
    let (access, _) = app.signed_in(email).await;
    let id = my_id(app, &access).await;
    let r =
        app.request(Method::PATCH, &format!("/v1/admin/users/{id}"), Some(key), Some(json!({ "role": "admin" }))).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    (access, id)
}

async fn get_ok(app: &TestApp, path: &str, token: &str) -> Value {
    let r = app.get_auth(path, token).await;
    assert_eq!(r.status, StatusCode::OK, "{path}: {:?}", r.body);
    r.body
}

async fn consume(app: &TestApp, key: &str, account: &str, meter: &str, amount: i64) -> Reply {
    app.post_auth("/v1/usage/consume", key, json!({ "account": account, "meter": meter, "amount": amount })).await
}

fn day(d: time::Date) -> String {
    tollgate_core::reports::day_string(d)
}

fn credits_payment(
    account: AccountId,
    n: u32,
    amount: i64,
    currency: &str,
    credits: i64,
    at: OffsetDateTime,
) -> Payment {
    Payment {
        id: PaymentId::new(),
        account_id: account,
        provider: "stripe".into(),
        kind: PaymentKind::Credits,
        provider_payment_id: format!("cs_{n}"),
        provider_intent_id: Some(format!("pi_{n}")),
        amount,
        currency: currency.into(),
        status: PaymentStatus::Succeeded,
        credits,
        credit_package: Some("pack".into()),
        amount_refunded: 0,
        credits_reversed: 0,
        credits_unrecovered: 0,
        created_at: at,
        updated_at: at,
    }
}

/// What the provider's webhook would record, applied through the store.
async fn provider_event(app: &TestApp, n: u32, effect: BillingEffect) {
    let store = &app.running.as_ref().unwrap().state.store;
    let now = OffsetDateTime::now_utc();
    let event = ProviderEvent {
        provider: "stripe".into(),
        id: format!("evt_{n}"),
        event_type: "test.event".into(),
        created: now,
        received_at: now,
    };
    store.apply_billing_event(event, effect, None).await.unwrap();
}

async fn account_id(app: &TestApp, external: &str) -> AccountId {
    let store = &app.running.as_ref().unwrap().state.store;
    store.account_by_external_id(external).await.unwrap().unwrap().id
}

fn ids(events: &Value) -> Vec<String> {
    events.as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap().to_owned()).collect()
}

/// Reads every page of `path` (which has a query already) `limit` at a time, calling
/// `between` after the first page; returns the ids in order.
async fn all_pages(app: &TestApp, token: &str, path: &str, field: &str, between: impl AsyncFn()) -> Vec<String> {
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let url = match &cursor {
            Some(c) => format!("{path}&cursor={c}"),
            None => path.to_owned(),
        };
        let page = get_ok(app, &url, token).await;
        if cursor.is_none() {
            between().await;
        }
        seen.extend(ids(&page[field]));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    seen
}

async fn reports_are_exact(app: &TestApp) {
    let key = app.service_key(&["admin:*", "usage:write", "accounts:write"]).await;
    let (admin, _) = admin_user(app, &key, "root@example.com").await;
    app.signed_in("ada@example.com").await;
    let (bob, _) = app.signed_in("bob@example.com").await;
    let bob_id = my_id(app, &bob).await;
    let r = app
        .request(
            Method::PATCH,
            &format!("/v1/admin/users/{bob_id}"),
            Some(&admin),
            Some(json!({ "status": "suspended" })),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    for (external_id, plan) in [("c1", Some("pro")), ("c2", None), ("c3", Some("max"))] {
        let r = app.post_auth("/v1/accounts", &key, json!({ "external_id": external_id, "plan": plan })).await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    }
    // Usage today: c1 3 messages and 1200 tokens; c2 5 messages (its free day) and a
    // denial.
    for _ in 0..3 {
        assert_eq!(consume(app, &key, "ext:c1", "messages", 1).await.status, StatusCode::OK);
    }
    for _ in 0..5 {
        assert_eq!(consume(app, &key, "ext:c2", "messages", 1).await.status, StatusCode::OK);
    }
    assert_eq!(consume(app, &key, "ext:c2", "messages", 1).await.status, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(consume(app, &key, "ext:c1", "tokens", 1200).await.status, StatusCode::OK);
    // Payments: USD 1500 for 100 credits (c1), then EUR 2000 for 200 credits (c2), a
    // quarter of which is refunded (50 credits taken back).
    let (c1, c2) = (account_id(app, "c1").await, account_id(app, "c2").await);
    let now = OffsetDateTime::now_utc();
    let usd = credits_payment(c1, 1, 1500, "USD", 100, now - Duration::seconds(2));
    provider_event(app, 1, BillingEffect::CreditsPurchased { payment: usd }).await;
    let eur = credits_payment(c2, 2, 2000, "EUR", 200, now - Duration::seconds(1));
    provider_event(app, 2, BillingEffect::CreditsPurchased { payment: eur }).await;
    provider_event(app, 3, BillingEffect::Refunded { provider_intent_id: "pi_2".into(), amount_refunded: 500 }).await;

    // Stats.
    let s = get_ok(app, "/v1/admin/stats", &admin).await;
    assert_eq!(s["users"], json!({ "total": 3, "active": 2, "suspended": 1, "new_this_week": 3 }));
    assert_eq!(s["accounts_per_plan"], json!({ "free": 4, "pro": 1, "max": 1 }), "root, ada, bob and c2 on free");
    assert_eq!((&s["active_subscriptions"], &s["trialing_subscriptions"]), (&json!(2), &json!(0)));
    assert_eq!(s["paying_subscriptions"], json!({ "pro": 1, "max": 1 }));
    assert_eq!(s["mrr"], json!({ "XOF": 7000 + 22000 }));
    assert_eq!(
        s["revenue"],
        json!([
            { "currency": "EUR", "all_time": { "gross": 2000, "refunded": 500, "net": 1500 },
              "this_month": { "gross": 2000, "refunded": 500, "net": 1500 } },
            { "currency": "USD", "all_time": { "gross": 1500, "refunded": 0, "net": 1500 },
              "this_month": { "gross": 1500, "refunded": 0, "net": 1500 } },
        ])
    );
    assert_eq!(
        s["credits"],
        json!({ "purchased": 300, "granted": 0, "used": 0, "refunded": 0, "reversed": 50, "expired": 0,
                "adjusted": 0, "outstanding": 250 })
    );

    // Analytics: zero-filled days, summed over accounts, one series per meter.
    let today = OffsetDateTime::now_utc().date();
    let (d0, d1) = (day(today - Duration::days(2)), day(today - Duration::days(1)));
    let a = get_ok(app, &format!("/v1/admin/analytics/usage?from={d0}&to={}", day(today)), &admin).await;
    let point = |d: &str, consumed: i64, denied: i64| json!({ "date": d, "consumed": consumed, "denied": denied });
    assert_eq!(
        a,
        json!({ "from": d0, "to": day(today), "interval": "day", "series": [
            { "meter": "messages", "points": [point(&d0, 0, 0), point(&d1, 0, 0), point(&day(today), 8, 1)] },
            { "meter": "tokens", "points": [point(&d0, 0, 0), point(&d1, 0, 0), point(&day(today), 1200, 0)] },
        ]})
    );
    // One meter; `to` as an RFC 3339 time; weeks from Monday.
    let a =
        get_ok(app, &format!("/v1/admin/analytics/usage?meter=tokens&from={d1}&to={}T23:59:00Z", day(today)), &admin)
            .await;
    assert_eq!(a["series"], json!([{ "meter": "tokens", "points": [point(&d1, 0, 0), point(&day(today), 1200, 0)] }]));
    let from = today - Duration::days(13);
    let a = get_ok(app, &format!("/v1/admin/analytics/usage?meter=messages&interval=week&from={}", day(from)), &admin)
        .await;
    let monday = |d: time::Date| d - Duration::days(i64::from(d.weekday().number_days_from_monday()));
    let mut weeks = Vec::new();
    let mut w = monday(from);
    while w <= today {
        let consumed = if w == monday(today) { 8 } else { 0 };
        weeks.push(point(&day(w), consumed, if consumed > 0 { 1 } else { 0 }));
        w += Duration::days(7);
    }
    assert_eq!(a["series"][0]["points"], json!(weeks));
    let a = get_ok(app, "/v1/admin/analytics/usage", &admin).await;
    assert_eq!(a["series"][0]["points"].as_array().unwrap().len(), 30, "the last 30 days by default");

    // Usage logs: 10 events, newest first, filtered.
    let all = get_ok(app, "/v1/admin/usage-logs?limit=200", &admin).await;
    let events = all["events"].as_array().unwrap();
    assert_eq!(events.len(), 10);
    assert!(all["next_cursor"].is_null());
    assert_eq!(
        (&events[0]["meter"], &events[0]["amount"], &events[0]["outcome"]),
        (&json!("tokens"), &json!(1200), &json!("consumed"))
    );
    assert_eq!(events[0]["account_id"], json!(c1.to_string()));
    for field in ["id", "account_id", "meter", "outcome", "amount", "endpoint", "metadata", "ip", "created_at"] {
        assert!(events[0].get(field).is_some(), "{field} in {}", events[0]);
    }
    let denied = get_ok(app, "/v1/admin/usage-logs?account=ext:c2&outcome=denied", &admin).await;
    let denied = denied["events"].as_array().unwrap();
    assert_eq!(denied.len(), 1);
    assert_eq!((&denied[0]["meter"], &denied[0]["amount"]), (&json!("messages"), &json!(1)));
    let tokens = get_ok(app, &format!("/v1/admin/usage-logs?account={c1}&meter=tokens"), &admin).await;
    assert_eq!(tokens["events"].as_array().unwrap().len(), 1);
    let c2_messages = get_ok(app, "/v1/admin/usage-logs?account=ext:c2&meter=messages&outcome=consumed", &admin).await;
    assert_eq!(c2_messages["events"].as_array().unwrap().len(), 5);
    let oldest = events[9]["created_at"].as_str().unwrap();
    let since = get_ok(app, &format!("/v1/admin/usage-logs?from={oldest}"), &admin).await;
    assert_eq!(since["events"].as_array().unwrap().len(), 10, "from is inclusive");
    let before = get_ok(app, &format!("/v1/admin/usage-logs?to={oldest}"), &admin).await;
    assert_eq!(before["events"], json!([]), "to is exclusive");
    // Pages of 3 while new usage arrives: the pages started before it do not move.
    let paged = all_pages(app, &admin, "/v1/admin/usage-logs?limit=3", "events", async || {
        assert_eq!(consume(app, &key, "ext:c3", "messages", 2).await.status, StatusCode::OK);
    })
    .await;
    assert_eq!(paged, ids(&all["events"]));

    // Payments: newest first, all accounts or one, a page at a time.
    let p = get_ok(app, "/v1/admin/payments", &admin).await;
    let currencies: Vec<_> = p["payments"].as_array().unwrap().iter().map(|p| p["currency"].clone()).collect();
    assert_eq!(currencies, vec![json!("EUR"), json!("USD")]);
    assert_eq!(
        (&p["payments"][0]["status"], &p["payments"][0]["amount_refunded"]),
        (&json!("partially_refunded"), &json!(500))
    );
    let paged = all_pages(app, &admin, "/v1/admin/payments?limit=1", "payments", async || {}).await;
    assert_eq!(paged, ids(&p["payments"]));
    let of_c1 = get_ok(app, "/v1/admin/payments?account=ext:c1", &admin).await;
    assert_eq!(of_c1["payments"].as_array().unwrap().len(), 1);
    assert_eq!(of_c1["payments"][0]["currency"], "USD");
}

#[tokio::test]
async fn reports_are_exact_on_sqlite() {
    let app = TestApp::builder().example_plans("chatbot.toml").start().await;
    reports_are_exact(&app).await;
    app.stop().await;
}

#[tokio::test]
async fn reports_are_exact_on_postgres() {
    let Some(database) = tollgate_store_postgres::testing::TestDatabase::create().await else { return };
    let app = TestApp::builder().example_plans("chatbot.toml").database_url(database.url.clone()).start().await;
    reports_are_exact(&app).await;
    app.stop().await;
    database.drop().await;
}

#[tokio::test]
async fn reports_are_for_admins_only() {
    let app = TestApp::builder().example_plans("chatbot.toml").start().await;
    let key = app.service_key(&["admin:*"]).await;
    let (admin, _) = admin_user(&app, &key, "root@example.com").await;
    let (user, _) = app.signed_in("ada@example.com").await;
    let ada = my_id(&app, &user).await;
    let r = app.request(Method::POST, &format!("/v1/admin/users/{ada}/impersonate"), Some(&admin), None).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let impersonation = r.body["access_token"].as_str().unwrap().to_owned();
    let read = app.service_key(&["admin:read"]).await;
    let write = app.service_key(&["admin:write"]).await;
    let usage = app.service_key(&["usage:read", "usage:write"]).await;
    for path in ROUTES {
        assert_eq!(app.request(Method::GET, path, None, None).await.status, StatusCode::UNAUTHORIZED, "{path}");
        let r = app.get_auth(path, &user).await;
        assert_eq!((r.status, r.code()), (StatusCode::FORBIDDEN, "forbidden"), "{path}");
        let r = app.get_auth(path, &impersonation).await;
        assert_eq!((r.status, r.code()), (StatusCode::FORBIDDEN, "impersonation_forbidden"), "{path}");
        for key in [&usage, &write] {
            let r = app.get_auth(path, key).await;
            assert_eq!((r.status, r.code()), (StatusCode::FORBIDDEN, "insufficient_scope"), "{path}");
        }
        assert_eq!(app.get_auth(path, &read).await.status, StatusCode::OK, "{path}");
        assert_eq!(app.get_auth(path, &admin).await.status, StatusCode::OK, "{path}");
    }
    app.stop().await;
}

#[tokio::test]
async fn bad_report_parameters_are_422_with_the_field() {
    let app = TestApp::builder().example_plans("chatbot.toml").start().await;
    let key = app.service_key(&["admin:read"]).await;
    let today = OffsetDateTime::now_utc().date();
    for (path, field) in [
        ("/v1/admin/analytics/usage?interval=hour".to_owned(), "interval"),
        ("/v1/admin/analytics/usage?meter=nope".to_owned(), "meter"),
        ("/v1/admin/analytics/usage?from=2026-13-01".to_owned(), "from"),
        ("/v1/admin/analytics/usage?to=yesterday".to_owned(), "to"),
        (format!("/v1/admin/analytics/usage?from={}&to={}", day(today), day(today - Duration::days(1))), "from"),
        (format!("/v1/admin/analytics/usage?from={}", day(today - Duration::days(366))), "from"),
        ("/v1/admin/usage-logs?outcome=eaten".to_owned(), "outcome"),
        ("/v1/admin/usage-logs?meter=nope".to_owned(), "meter"),
        ("/v1/admin/usage-logs?account=ext:nobody".to_owned(), "account"),
        ("/v1/admin/usage-logs?account=not-an-id".to_owned(), "account"),
        ("/v1/admin/usage-logs?from=2026-01-01".to_owned(), "from"),
        ("/v1/admin/usage-logs?cursor=bm90IGEgY3Vyc29y".to_owned(), "cursor"),
        ("/v1/admin/payments?cursor=!!".to_owned(), "cursor"),
        ("/v1/admin/payments?account=ext:nobody".to_owned(), "account"),
    ] {
        let r = app.get_auth(&path, &key).await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"),
            "{path}: {:?}",
            r.body
        );
        assert!(r.body["error"]["details"]["fields"].get(field).is_some(), "{path}: {:?}", r.body);
    }
    // 366 days, both ends included, is the most one series covers.
    let path = format!("/v1/admin/analytics/usage?meter=messages&from={}", day(today - Duration::days(365)));
    let r = app.get_auth(&path, &key).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["series"][0]["points"].as_array().unwrap().len(), 366);
    // Limits beyond 200 are clamped, not refused.
    assert_eq!(app.get_auth("/v1/admin/usage-logs?limit=1000", &key).await.status, StatusCode::OK);
    app.stop().await;
}
