//! `/v1/admin/accounts/{id}/*` and `/v1/admin/system/*`: credit adjustments, quota
//! resets, subscriptions set by an admin, health and retention cleanup — each change
//! audited once with the admin as actor. The flows run on SQLite and PostgreSQL.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{Reply, TestApp};

/// An admin user's access token and the `actor` the audit log names them by.
async fn admin(app: &TestApp) -> (String, Value) {
    let key = app.service_key(&["admin:*"]).await;
    let (access, _) = app.signed_in("root@example.com").await;
    let id = app.get_auth("/v1/me", &access).await.body["user"]["id"].as_str().unwrap().to_owned();
    let r = app
        .request(Method::PATCH, &format!("/v1/admin/users/{id}"), Some(&key), Some(json!({ "role": "admin" })))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    (access, json!({ "type": "user", "id": id }))
}

/// A customer account `ext:{external}` and a backend key that meters it.
async fn customer(app: &TestApp, external: &str) -> (String, String) {
    let key = app.service_key(&["accounts:write", "usage:write", "credits:read"]).await;
    let r = app.post_auth("/v1/accounts", &key, json!({ "external_id": external })).await;
    assert!(r.status.is_success(), "{:?}", r.body);
    (r.body["id"].as_str().unwrap().to_owned(), key)
}

async fn events_about_account(app: &TestApp, token: &str, account: &str) -> Vec<Value> {
    let r = app.get_auth(&format!("/v1/admin/audit-log?target=account:{account}&limit=200"), token).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    r.body["events"].as_array().unwrap().clone()
}

async fn adjust(app: &TestApp, token: &str, account: &str, body: Value, key: Option<&str>) -> Reply {
    let mut request = app
        .client
        .post(app.url(&format!("/v1/admin/accounts/{account}/credits/adjust")))
        .bearer_auth(token)
        .json(&body);
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let body = response.json().await.unwrap_or(Value::Null);
    Reply { status, headers: Default::default(), body }
}

async fn balance(app: &TestApp, key: &str, account: &str) -> i64 {
    app.get_auth(&format!("/v1/accounts/{account}/credits"), key).await.body["balance"].as_i64().unwrap()
}

async fn credit_adjustments(app: &TestApp, admin: &str, actor: &Value) {
    let (account, key) = customer(app, "cus_credits").await;
    let r = adjust(app, admin, &account, json!({ "amount": 100, "reason": "goodwill" }), Some("adj-1")).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["transaction"]["kind"], "adjustment");
    // A retry replays the answer and moves nothing; the key with another body is 422.
    let r = adjust(app, admin, &account, json!({ "amount": 100, "reason": "goodwill" }), Some("adj-1")).await;
    assert_eq!((r.status, &r.body["replayed"]), (StatusCode::OK, &json!(true)));
    let r = adjust(app, admin, &account, json!({ "amount": 5, "reason": "goodwill" }), Some("adj-1")).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{:?}", r.body);
    // By ext: id too, and downwards.
    let r = adjust(app, admin, "ext:cus_credits", json!({ "amount": -30, "reason": "correction" }), None).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(balance(app, &key, &account).await, 70);
    let r = adjust(app, admin, &account, json!({ "amount": -71, "reason": "too much" }), None).await;
    assert_eq!((r.status, r.code()), (StatusCode::PAYMENT_REQUIRED, "insufficient_credits"));
    for bad in [json!({ "amount": 0, "reason": "x" }), json!({ "amount": 5, "reason": "  " }), json!({ "amount": 5 })] {
        let r = adjust(app, admin, &account, bad.clone(), None).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {:?}", r.body);
    }
    let r = adjust(app, admin, "ext:nobody", json!({ "amount": 5, "reason": "x" }), None).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(balance(app, &key, &account).await, 70, "refusals moved nothing");
    // Exactly one event per adjustment that moved credits, naming the admin.
    let events = events_about_account(app, admin, &account).await;
    let adjusted: Vec<&Value> = events.iter().filter(|e| e["action"] == "admin.credits.adjusted").collect();
    assert_eq!(adjusted.len(), 2, "{events:?}");
    assert!(adjusted.iter().all(|e| e["actor"] == *actor));
    assert_eq!(adjusted[0]["metadata"]["amount"], -30);
    assert_eq!(adjusted[0]["metadata"]["reason"], "correction");
}

async fn consume(app: &TestApp, key: &str, account: &str, meter: &str, amount: i64) -> Reply {
    app.post_auth("/v1/usage/consume", key, json!({ "account": account, "meter": meter, "amount": amount })).await
}

fn window<'a>(entitlements: &'a Value, meter: &str, window: &str) -> &'a Value {
    let meter = entitlements["meters"].as_array().unwrap().iter().find(|m| m["meter"] == meter).unwrap();
    meter["windows"].as_array().unwrap().iter().find(|w| w["window"] == window).unwrap()
}

async fn quota_resets(app: &TestApp, admin: &str, actor: &Value) {
    let (account, key) = customer(app, "cus_quota").await;
    for _ in 0..5 {
        assert_eq!(consume(app, &key, &account, "messages", 1).await.status, StatusCode::OK);
    }
    assert_eq!(consume(app, &key, &account, "tokens", 700).await.status, StatusCode::OK);
    let r = consume(app, &key, &account, "messages", 1).await;
    assert_eq!((r.status, r.code()), (StatusCode::PAYMENT_REQUIRED, "quota_exceeded"), "the day is full");

    let path = format!("/v1/admin/accounts/{account}/quotas/reset");
    let r = app.post_auth(&path, admin, json!({ "meter": "messages", "window": "day" })).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["rows_deleted"], 1);
    assert_eq!(window(&r.body["entitlements"], "messages", "day")["used"], 0);
    assert_eq!(window(&r.body["entitlements"], "messages", "month")["used"], 5, "only the day starts over");
    assert_eq!(window(&r.body["entitlements"], "tokens", "month")["used"], 700);
    assert_eq!(consume(app, &key, &account, "messages", 1).await.status, StatusCode::OK, "room again");

    // Refused: an unknown meter, a window that does not parse, a window the meter lacks.
    let r = app.post_auth(&path, admin, json!({ "meter": "nope" })).await;
    assert_eq!((r.status, r.code()), (StatusCode::UNPROCESSABLE_ENTITY, "unknown_meter"));
    let r = app.post_auth(&path, admin, json!({ "window": "fortnight" })).await;
    assert_eq!((r.status, r.code()), (StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"));
    let r = app.post_auth(&path, admin, json!({ "meter": "tokens", "window": "day" })).await;
    assert_eq!((r.status, r.code()), (StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"));
    let r = app.post_auth(&path, admin, json!({ "meters": "typo" })).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "unknown fields are refused");

    // No body: every window of every meter.
    let r = app.request(Method::POST, &path, Some(admin), None).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["rows_deleted"], 3, "messages day and month, tokens month");
    assert_eq!(window(&r.body["entitlements"], "tokens", "month")["used"], 0);
    let events = events_about_account(app, admin, &account).await;
    let resets: Vec<&Value> = events.iter().filter(|e| e["action"] == "admin.quotas.reset").collect();
    assert_eq!(resets.len(), 2, "refused resets are not recorded");
    assert!(resets.iter().all(|e| e["actor"] == *actor));
    assert_eq!(resets[1]["metadata"]["meter"], "messages");
    assert_eq!(resets[1]["metadata"]["rows_deleted"], 1);
}

async fn subscriptions_set_by_an_admin(app: &TestApp, admin: &str, actor: &Value) {
    let (account, _) = customer(app, "cus_plan").await;
    let path = "/v1/admin/accounts/ext:cus_plan/subscription";
    let r = app.request(Method::PUT, path, Some(admin), Some(json!({ "plan": "pro" }))).await;
    assert_eq!((r.status, &r.body["plan"]), (StatusCode::OK, &json!("pro")), "{:?}", r.body);
    let r = app.request(Method::PUT, path, Some(admin), Some(json!({ "plan": "platinum" }))).await;
    assert_eq!((r.status, r.code()), (StatusCode::UNPROCESSABLE_ENTITY, "unknown_plan"));
    let r = app.request(Method::PUT, path, Some(admin), Some(json!({ "plan": "max", "trial_days": 400 }))).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    let events = events_about_account(app, admin, &account).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!((&events[0]["action"], &events[0]["actor"]), (&json!("admin.subscription.changed"), actor));
    assert_eq!(events[0]["metadata"]["plan"], "pro");
}

async fn health_and_cleanup(app: &TestApp, admin: &str, actor: &Value, backend: &str) {
    let r = app.get_auth("/v1/admin/system/health", admin).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!((&r.body["status"], &r.body["database"]["backend"]), (&json!("ok"), &json!(backend)));
    assert_eq!((&r.body["database"]["status"], &r.body["rate_limits"]["status"]), (&json!("ok"), &json!("ok")));
    assert_eq!(r.body["email"]["backend"], "smtp");
    assert_eq!(r.body["version"], env!("CARGO_PKG_VERSION"));
    assert!(r.body["backlogs"]["emails_pending"].is_u64() && r.body["uptime_seconds"].is_u64());

    let read_only = app.service_key(&["admin:read"]).await;
    assert_eq!(app.get_auth("/v1/admin/system/health", &read_only).await.status, StatusCode::OK);
    let r = app.request(Method::POST, "/v1/admin/system/cleanup", Some(&read_only), None).await;
    assert_eq!((r.status, r.code()), (StatusCode::FORBIDDEN, "insufficient_scope"));
    let r = app.request(Method::POST, "/v1/admin/system/cleanup", Some(admin), None).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    // The admin's sign-in used its verification link: a used link is old news.
    assert!(r.body["deleted"]["one_time_tokens"].as_u64().unwrap() >= 1, "{:?}", r.body);
    assert_eq!(r.body["deleted"]["audit_events"], 0, "nothing is a year old");
    let r = app.get_auth("/v1/admin/audit-log?action=admin.system.cleanup", admin).await;
    let events = r.body["events"].as_array().unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["actor"], *actor);
    assert_eq!(events[0]["metadata"]["usage_events_days"], 90);
}

async fn limit_overrides(app: &TestApp, admin: &str, actor: &Value) {
    let (account, key) = customer(app, "cus_limits").await;
    let path = format!("/v1/admin/accounts/{account}/limits");
    let r = app.get_auth(&path, admin).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!((&r.body["overrides"], &r.body["in_force"]), (&Value::Null, &json!(false)));

    // Free allows 5 messages a day; the override gives 8 (the month stays unlimited).
    let expires = (time::OffsetDateTime::now_utc() + time::Duration::days(7))
        .replace_nanosecond(0)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let body = json!({
        "limits": { "messages": [{ "window": "day", "limit": 8 }], "tokens": "unlimited" },
        "reason": "pilot customer",
        "expires_at": expires,
    });
    let r = app.request(Method::PUT, &path, Some(admin), Some(body)).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["in_force"], true);
    assert_eq!(r.body["overrides"]["reason"], "pilot customer");
    assert_eq!(window(&r.body["entitlements"], "messages", "day")["limit"], 8);
    let messages = r.body["entitlements"]["meters"].as_array().unwrap().iter().find(|m| m["meter"] == "messages");
    assert_eq!(messages.unwrap()["overridden"], true);
    for i in 0..8 {
        assert_eq!(consume(app, &key, &account, "messages", 1).await.status, StatusCode::OK, "message {i}");
    }
    let r = consume(app, &key, &account, "messages", 1).await;
    assert_eq!((r.status, r.code()), (StatusCode::PAYMENT_REQUIRED, "quota_exceeded"), "the override's day is full");
    assert_eq!(consume(app, &key, &account, "tokens", 10_000_000).await.status, StatusCode::OK, "tokens unlimited");
    // The account's own view shows the override too.
    let reader = app.service_key(&["usage:read"]).await;
    let r = app.get_auth(&format!("/v1/accounts/{account}/entitlements"), &reader).await;
    assert_eq!(window(&r.body, "messages", "day")["limit"], 8, "{:?}", r.body);
    // Which meters and until when; not the admin's reason nor who set them.
    assert_eq!(r.body["limit_overrides"]["meters"], json!(["messages", "tokens"]));
    assert_eq!(r.body["limit_overrides"]["expires_at"], json!(expires));
    assert!(r.body["limit_overrides"].get("reason").is_none() && !r.body.to_string().contains("pilot customer"));

    // Refused, changing nothing: unknown meter, wrong shape for the kind, no reason,
    // an expiry in the past, a bad id.
    for bad in [
        json!({ "limits": { "nope": 1 }, "reason": "x" }),
        json!({ "limits": { "messages": true }, "reason": "x" }),
        json!({ "limits": { "messages": -1 }, "reason": "x" }),
        json!({ "limits": { "messages": 5 } }),
        json!({ "limits": {}, "reason": " " }),
        json!({ "limits": {}, "reason": "x", "expires_at": "2001-01-01T00:00:00Z" }),
    ] {
        let r = app.request(Method::PUT, &path, Some(admin), Some(bad.clone())).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {:?}", r.body);
    }
    let r = app
        .request(
            Method::PUT,
            "/v1/admin/accounts/ext:nobody/limits",
            Some(admin),
            Some(json!({ "limits": {}, "reason": "x" })),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let unchanged = app.get_auth(&path, admin).await.body;
    assert_eq!(unchanged["overrides"]["limits"]["messages"]["windows"][0]["limit"], 8, "{unchanged:?}");
    assert_eq!((&unchanged["overrides"]["expires_at"], &unchanged["in_force"]), (&json!(expires), &json!(true)));

    // Cleared: the plan's 5 a day applies again (8 already used).
    let r = app.request(Method::PUT, &path, Some(admin), Some(json!({ "limits": {}, "reason": "pilot over" }))).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!((&r.body["overrides"], &r.body["in_force"]), (&Value::Null, &json!(false)));
    assert_eq!(window(&r.body["entitlements"], "messages", "day")["limit"], 5);
    assert_eq!(consume(app, &key, &account, "messages", 1).await.status, StatusCode::PAYMENT_REQUIRED);

    // One event per change, naming the admin, with what was set and what it replaced.
    let events = events_about_account(app, admin, &account).await;
    let set: Vec<&Value> = events.iter().filter(|e| e["action"] == "admin.limits.set").collect();
    let cleared: Vec<&Value> = events.iter().filter(|e| e["action"] == "admin.limits.cleared").collect();
    assert_eq!((set.len(), cleared.len()), (1, 1), "{events:?}");
    assert!(set.iter().chain(&cleared).all(|e| e["actor"] == *actor));
    assert_eq!(set[0]["metadata"]["reason"], "pilot customer");
    assert_eq!(cleared[0]["metadata"]["previous"]["messages"]["kind"], "counter");
}

async fn all(app: &TestApp, backend: &str) {
    let (admin, actor) = admin(app).await;
    credit_adjustments(app, &admin, &actor).await;
    quota_resets(app, &admin, &actor).await;
    limit_overrides(app, &admin, &actor).await;
    subscriptions_set_by_an_admin(app, &admin, &actor).await;
    health_and_cleanup(app, &admin, &actor, backend).await;
}

#[tokio::test]
async fn admin_account_changes_and_system_on_sqlite() {
    let app = TestApp::builder().example_plans("chatbot.toml").start().await;
    all(&app, "sqlite").await;
    app.stop().await;
}

#[tokio::test]
async fn admin_account_changes_and_system_on_postgres() {
    let Some(database) = tollgate_store_postgres::testing::TestDatabase::create().await else { return };
    let app = TestApp::builder().example_plans("chatbot.toml").database_url(database.url.clone()).start().await;
    all(&app, "postgres").await;
    app.stop().await;
    database.drop().await;
}

#[tokio::test]
async fn users_cannot_change_accounts() {
    let app = TestApp::builder().example_plans("chatbot.toml").start().await;
    let (account, _) = customer(&app, "cus_x").await;
    let (user, _) = app.signed_in("ada@example.com").await;
    let routes = [
        (Method::POST, format!("/v1/admin/accounts/{account}/credits/adjust"), json!({ "amount": 5, "reason": "x" })),
        (Method::POST, format!("/v1/admin/accounts/{account}/quotas/reset"), json!({})),
        (Method::PUT, format!("/v1/admin/accounts/{account}/subscription"), json!({ "plan": "pro" })),
        (Method::PUT, format!("/v1/admin/accounts/{account}/limits"), json!({ "limits": {}, "reason": "x" })),
        (Method::POST, "/v1/admin/system/cleanup".to_owned(), json!({})),
    ];
    for (method, path, body) in routes {
        let r = app.request(method.clone(), &path, None, Some(body.clone())).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{path}");
        let r = app.request(method, &path, Some(&user), Some(body)).await;
        assert_eq!((r.status, r.code()), (StatusCode::FORBIDDEN, "forbidden"), "{path}");
    }
    app.stop().await;
}

/// An override set through one node applies on another within its reload (1 s).
#[tokio::test]
async fn overrides_reach_other_nodes_on_postgres() {
    let Some(database) = tollgate_store_postgres::testing::TestDatabase::create().await else { return };
    let node = || TestApp::builder().example_plans("chatbot.toml").database_url(database.url.clone()).start();
    let (a, b) = (node().await, node().await);
    let (admin, _) = admin(&a).await;
    let (account, _) = customer(&a, "cus_nodes").await;
    let reader = a.service_key(&["usage:read"]).await;
    let day_limit = |r: Reply| window(&r.body, "messages", "day")["limit"].clone();
    let path = format!("/v1/accounts/{account}/entitlements");
    assert_eq!(day_limit(b.get_auth(&path, &reader).await), 5);
    let body = json!({ "limits": { "messages": [{ "window": "day", "limit": 9 }] }, "reason": "pilot" });
    let r = a.request(Method::PUT, &format!("/v1/admin/accounts/{account}/limits"), Some(&admin), Some(body)).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let mut seen = json!(5);
    for _ in 0..50 {
        seen = day_limit(b.get_auth(&path, &reader).await);
        if seen == 9 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(seen, 9, "the other node never picked the override up");
    a.stop().await;
    b.stop().await;
    database.drop().await;
}
