//! `/v1/admin/plans`: plans created, changed, archived and deleted through the API,
//! each audited once; what they change applies to metering at once; a restart with
//! the same plans file keeps them, a changed file replaces them. On SQLite and
//! PostgreSQL, and across two nodes.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::TestApp;

async fn admin(app: &TestApp) -> String {
    app.service_key(&["admin:*"]).await
}

async fn plan_keys(app: &TestApp, path: &str, token: Option<&str>) -> Vec<(String, bool)> {
    let r = app.request(Method::GET, path, token, None).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    r.body["plans"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["key"].as_str().unwrap().to_owned(), p["archived"].as_bool().unwrap_or(false)))
        .collect()
}

fn team() -> Value {
    json!({
        "key": "team",
        "order": 5,
        "names": { "en": "Team", "fr": "Équipe" },
        "prices": [{ "amount": 12000, "currency": "XOF", "period": "month" }],
        "limits": { "messages": [{ "window": "day", "limit": 3 }], "tokens": "unlimited" },
        "features": { "support": "email" },
    })
}

async fn consume(app: &TestApp, key: &str, account: &str) -> StatusCode {
    app.post_auth("/v1/usage/consume", key, json!({ "account": account, "meter": "messages", "amount": 1 }))
        .await
        .status
}

async fn lifecycle(app: &TestApp) {
    let admin = admin(app).await;
    let listed = plan_keys(app, "/v1/admin/plans", Some(&admin)).await;
    assert_eq!(listed.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), ["free", "pro", "max", "enterprise"]);

    // Created: listed publicly, subscribable, metered by its limits.
    let r = app.post_auth("/v1/admin/plans", &admin, team()).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!((&r.body["key"], &r.body["archived"]), (&json!("team"), &json!(false)));
    assert!(plan_keys(app, "/v1/plans", None).await.iter().any(|(k, _)| k == "team"));
    let service = app.service_key(&["accounts:write", "usage:write", "usage:read"]).await;
    let account = app.post_auth("/v1/accounts", &service, json!({ "external_id": "cus_team" })).await.body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = app.post_auth(&format!("/v1/accounts/{account}/subscription"), &service, json!({ "plan": "team" })).await;
    assert!(r.status.is_success(), "{:?}", r.body);
    for _ in 0..3 {
        assert_eq!(consume(app, &service, &account).await, StatusCode::OK);
    }
    assert_eq!(consume(app, &service, &account).await, StatusCode::PAYMENT_REQUIRED);

    // Refused, creating nothing.
    let r = app.post_auth("/v1/admin/plans", &admin, team()).await;
    assert_eq!((r.status, r.code()), (StatusCode::CONFLICT, "plan_exists"));
    for bad in [
        json!({ "names": { "en": "No key" } }),
        json!({ "key": "Bad Key" }),
        json!({ "key": "x1", "limits": { "nope": 1 } }),
        json!({ "key": "x2", "prices": [{ "amount": -1, "currency": "XOF", "period": "month" }] }),
        json!({ "key": "x3", "default": true }),
        json!({ "key": "x4", "mystery": 1 }),
        json!({ "key": "x5", "limits": { "messages": true } }),
    ] {
        let r = app.post_auth("/v1/admin/plans", &admin, bad.clone()).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {:?}", r.body);
    }
    assert_eq!(plan_keys(app, "/v1/admin/plans", Some(&admin)).await.len(), 5);

    // Changed: the subscriber's day grows at once.
    let patch = json!({ "limits": { "messages": [{ "window": "day", "limit": 4 }] }, "order": 6 });
    let r = app.request(Method::PATCH, "/v1/admin/plans/team", Some(&admin), Some(patch)).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["order"], 6);
    assert_eq!(r.body["names"]["fr"], "Équipe", "fields not given are kept");
    assert_eq!(consume(app, &service, &account).await, StatusCode::OK);
    assert_eq!(consume(app, &service, &account).await, StatusCode::PAYMENT_REQUIRED);
    for (path, bad, status) in [
        ("/v1/admin/plans/nope", json!({ "order": 1 }), StatusCode::NOT_FOUND),
        ("/v1/admin/plans/free", json!({ "archived": true }), StatusCode::UNPROCESSABLE_ENTITY),
        ("/v1/admin/plans/team", json!({ "default": true }), StatusCode::UNPROCESSABLE_ENTITY),
        ("/v1/admin/plans/team", json!({ "rate_limit_multiplier": 0 }), StatusCode::UNPROCESSABLE_ENTITY),
        ("/v1/admin/plans/team", json!({ "limits": { "tokens": -5 } }), StatusCode::UNPROCESSABLE_ENTITY),
    ] {
        let r = app.request(Method::PATCH, path, Some(&admin), Some(bad.clone())).await;
        assert_eq!(r.status, status, "{path} {bad}: {:?}", r.body);
    }

    // Removed while in use: archived, no longer sold, still in force for its subscriber.
    let r = app.request(Method::DELETE, "/v1/admin/plans/team", Some(&admin), None).await;
    assert_eq!((r.status, &r.body["outcome"]), (StatusCode::OK, &json!("archived")), "{:?}", r.body);
    assert!(plan_keys(app, "/v1/admin/plans", Some(&admin)).await.contains(&("team".into(), true)));
    assert!(!plan_keys(app, "/v1/plans", None).await.iter().any(|(k, _)| k == "team"));
    let other = app.post_auth("/v1/accounts", &service, json!({ "external_id": "cus_late" })).await.body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = app.post_auth(&format!("/v1/accounts/{other}/subscription"), &service, json!({ "plan": "team" })).await;
    assert_eq!((r.status, r.code()), (StatusCode::UNPROCESSABLE_ENTITY, "unknown_plan"));
    let r = app.get_auth(&format!("/v1/accounts/{account}/entitlements"), &service).await;
    assert_eq!(r.body["plan"], "team", "{:?}", r.body);
    // Sold again.
    let r = app.request(Method::PATCH, "/v1/admin/plans/team", Some(&admin), Some(json!({ "archived": false }))).await;
    assert_eq!((r.status, &r.body["archived"]), (StatusCode::OK, &json!(false)));

    // An unused plan is deleted; the default plan stays.
    let r = app.post_auth("/v1/admin/plans", &admin, json!({ "key": "trial" })).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let r = app.request(Method::DELETE, "/v1/admin/plans/trial", Some(&admin), None).await;
    assert_eq!((r.status, &r.body["outcome"]), (StatusCode::OK, &json!("deleted")));
    let r = app.request(Method::DELETE, "/v1/admin/plans/trial", Some(&admin), None).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = app.request(Method::DELETE, "/v1/admin/plans/free", Some(&admin), None).await;
    assert_eq!((r.status, r.code()), (StatusCode::CONFLICT, "default_plan"));

    // One event per change that happened, naming the key's actor; refusals write none.
    let r = app.get_auth("/v1/admin/audit-log?target=plan:team&limit=50", &admin).await;
    let actions: Vec<&str> =
        r.body["events"].as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["admin.plan.updated", "admin.plan.removed", "admin.plan.updated", "admin.plan.created"]);
    assert!(r.body["events"].as_array().unwrap().iter().all(|e| e["actor"]["type"] == "service_key"));
    let r = app.get_auth("/v1/admin/audit-log?target=plan:trial&limit=50", &admin).await;
    assert_eq!(r.body["events"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn admin_plans_on_sqlite() {
    let app = TestApp::builder().example_plans("chatbot.toml").start().await;
    lifecycle(&app).await;
    app.stop().await;
}

#[tokio::test]
async fn admin_plans_on_postgres() {
    let Some(database) = tollgate_store_postgres::testing::TestDatabase::create().await else { return };
    let app = TestApp::builder().example_plans("chatbot.toml").database_url(database.url.clone()).start().await;
    lifecycle(&app).await;
    app.stop().await;
    database.drop().await;
}

#[tokio::test]
async fn users_cannot_change_plans() {
    let app = TestApp::builder().example_plans("chatbot.toml").start().await;
    let (user, _) = app.signed_in("ada@example.com").await;
    let reader = app.service_key(&["admin:read"]).await;
    for token in [user.as_str(), reader.as_str()] {
        let r = app.post_auth("/v1/admin/plans", token, team()).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{:?}", r.body);
        let r = app.request(Method::DELETE, "/v1/admin/plans/pro", Some(token), None).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        let r = app.request(Method::PATCH, "/v1/admin/plans/pro", Some(token), Some(json!({ "order": 1 }))).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
    }
    assert_eq!(plan_keys(&app, "/v1/admin/plans", Some(&reader)).await.len(), 4, "admin:read lists");
    app.stop().await;
}

/// A restart with the same plans file keeps the API's changes; a changed file wins.
#[tokio::test]
async fn the_plans_file_wins_only_when_it_changes() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plans.toml");
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/plans/chatbot.toml");
    let text = std::fs::read_to_string(example).unwrap();
    std::fs::write(&file, &text).unwrap();
    let db = format!("sqlite://{}", dir.path().join("tollgate.db").display());
    let start = || TestApp::builder().plans_file(file.clone()).database_url(db.clone()).start();

    let app = start().await;
    let admin = admin(&app).await;
    assert_eq!(app.post_auth("/v1/admin/plans", &admin, team()).await.status, StatusCode::CREATED);
    let r = app.request(Method::PATCH, "/v1/admin/plans/pro", Some(&admin), Some(json!({ "order": 9 }))).await;
    assert_eq!(r.status, StatusCode::OK);
    app.stop().await;

    let app = start().await;
    let admin = self::admin(&app).await;
    let keys = plan_keys(&app, "/v1/admin/plans", Some(&admin)).await;
    assert!(keys.iter().any(|(k, _)| k == "team"), "same file: the API's plan stays ({keys:?})");
    assert_eq!(keys.last().unwrap().0, "pro", "and so does its change of order");
    app.stop().await;

    std::fs::write(&file, text.replace("names = { en = \"Max\"", "names = { en = \"Maximum\"")).unwrap();
    let app = start().await;
    let admin = self::admin(&app).await;
    let keys = plan_keys(&app, "/v1/admin/plans", Some(&admin)).await;
    assert_eq!(keys.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), ["free", "pro", "max", "enterprise"]);
    // An account on "free" explicitly, before the file moves the default to "pro".
    let service = app.service_key(&["accounts:write", "usage:read"]).await;
    for external in ["cus_free", "cus_none"] {
        assert!(app.post_auth("/v1/accounts", &service, json!({ "external_id": external })).await.status.is_success());
    }
    let r = app.post_auth("/v1/accounts/ext:cus_free/subscription", &service, json!({ "plan": "free" })).await;
    assert!(r.status.is_success(), "{:?}", r.body);
    app.stop().await;

    // "free" leaves the file, still used: archived, with `default` in its definition.
    let free = text.find("[plans.free]").unwrap();
    let pro = text.find("[plans.pro]").unwrap();
    let moved = format!("{}{}", &text[..free], &text[pro..]).replace("[plans.pro]\n", "[plans.pro]\ndefault = true\n");
    std::fs::write(&file, moved).unwrap();
    let app = start().await;
    let admin = self::admin(&app).await;
    let service = app.service_key(&["usage:read"]).await;
    let plan_of = |external: &'static str| {
        let (app, service) = (&app, &service);
        async move { app.get_auth(&format!("/v1/accounts/ext:{external}/entitlements"), service).await.body["plan"].clone() }
    };
    assert_eq!(plan_of("cus_none").await, "pro", "the new default, not the archived former one");
    assert_eq!(plan_of("cus_free").await, "free", "its subscriber keeps it");
    assert!(plan_keys(&app, "/v1/admin/plans", Some(&admin)).await.contains(&("free".into(), true)));
    let r = app.request(Method::PATCH, "/v1/admin/plans/free", Some(&admin), Some(json!({ "archived": false }))).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "a former default is not sold again: {:?}", r.body);
    let r = app.request(Method::DELETE, "/v1/admin/plans/free", Some(&admin), None).await;
    assert_eq!((r.status, &r.body["outcome"]), (StatusCode::OK, &json!("archived")), "{:?}", r.body);
    let r = app.request(Method::DELETE, "/v1/admin/plans/pro", Some(&admin), None).await;
    assert_eq!((r.status, r.code()), (StatusCode::CONFLICT, "default_plan"));
    app.stop().await;
}

/// A plan changed through one node is served by another within its reload (5 s).
#[tokio::test]
async fn plan_changes_reach_other_nodes_on_postgres() {
    let Some(database) = tollgate_store_postgres::testing::TestDatabase::create().await else { return };
    let node = || TestApp::builder().example_plans("chatbot.toml").database_url(database.url.clone()).start();
    let (a, b) = (node().await, node().await);
    let admin = admin(&a).await;
    assert_eq!(a.post_auth("/v1/admin/plans", &admin, team()).await.status, StatusCode::CREATED);
    let mut seen = false;
    for _ in 0..80 {
        seen = plan_keys(&b, "/v1/plans", None).await.iter().any(|(k, _)| k == "team");
        if seen {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(seen, "the other node never served the new plan");
    a.stop().await;
    b.stop().await;
    database.drop().await;
}
