//! `/v1/accounts/*` with service keys.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::helpers::TestApp;

#[tokio::test]
async fn external_accounts_are_created_once_and_found_by_either_id() {
    let app = TestApp::builder().example_plans("chatbot.toml").start().await;
    let key = app.service_key(&["accounts:write", "accounts:read", "usage:read"]).await;
    let body = json!({ "external_id": "user-42", "name": "Awa", "email": "Awa@Example.com" });
    let r = app.post_auth("/v1/accounts", &key, body.clone()).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let id = r.body["id"].as_str().unwrap().to_owned();
    assert_eq!(r.body["kind"], "external");
    assert_eq!(r.body["email"], "awa@example.com");
    let again = app.post_auth("/v1/accounts", &key, body).await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.body["id"], id.as_str());
    for path in [format!("/v1/accounts/{id}"), "/v1/accounts/ext:user-42".to_owned()] {
        let r = app.get_auth(&path, &key).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.body["id"], id.as_str());
    }
    for missing in
        ["/v1/accounts/ext:nobody", "/v1/accounts/not-a-uuid", "/v1/accounts/01a20897-0000-7000-8000-000000000000"]
    {
        assert_eq!(app.get_auth(missing, &key).await.status, StatusCode::NOT_FOUND, "{missing}");
    }
    let r = app.post_auth("/v1/accounts", &key, json!({ "external_id": "" })).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    let r = app.post_auth("/v1/accounts", &key, json!({ "external_id": "x", "plan": "platinum" })).await;
    assert_eq!((r.status, r.code()), (StatusCode::UNPROCESSABLE_ENTITY, "unknown_plan"));
    app.stop().await;
}

#[tokio::test]
async fn service_keys_are_required_and_scoped() {
    let app = TestApp::new().await;
    let reader = app.service_key(&["accounts:read"]).await;
    let r = app.post_auth("/v1/accounts", &reader, json!({ "external_id": "a" })).await;
    assert_eq!((r.status, r.code()), (StatusCode::FORBIDDEN, "insufficient_scope"));
    let r = app.request(Method::POST, "/v1/accounts", None, Some(json!({ "external_id": "a" }))).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = app.post_auth("/v1/accounts", "tg_sk_forged", json!({ "external_id": "a" })).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    // A user's access token is not a service key.
    let (access, _) = app.signed_in("ada@example.com").await;
    let r = app.post_auth("/v1/accounts", &access, json!({ "external_id": "a" })).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let admin = app.service_key(&["admin:*"]).await;
    let r = app.post_auth("/v1/accounts", &admin, json!({ "external_id": "a" })).await;
    assert_eq!(r.status, StatusCode::CREATED, "admin:* implies every scope");
    app.stop().await;
}

#[tokio::test]
async fn subscribing_changes_the_entitlements() {
    let app = TestApp::builder().example_plans("monte-carlo.toml").start().await;
    let key = app.service_key(&["accounts:write", "usage:read"]).await;
    app.post_auth("/v1/accounts", &key, json!({ "external_id": "lab-1" })).await;
    let r = app.get_auth("/v1/accounts/ext:lab-1/entitlements", &key).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["plan"], "free");
    let meters = r.body["meters"].as_array().unwrap();
    let meter = |name: &str| meters.iter().find(|m| m["meter"] == name).unwrap().clone();
    assert_eq!(meter("simulations")["windows"][0]["limit"], 100);
    assert_eq!(meter("simulations")["windows"][0]["used"], 0);
    assert_eq!(meter("iterations_per_simulation")["max"], 1000);
    assert_eq!(meter("gpu_access")["enabled"], false);
    assert_eq!(r.body["can_consume"], true);
    let r = app.post_auth("/v1/accounts/ext:lab-1/subscription", &key, json!({ "plan": "enterprise" })).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["plan"], "enterprise");
    let meters = r.body["meters"].as_array().unwrap();
    let sims = meters.iter().find(|m| m["meter"] == "simulations").unwrap();
    assert!(sims["windows"][0]["limit"].is_null(), "unlimited, still counted per month");
    assert!(meters.iter().find(|m| m["meter"] == "iterations_per_simulation").unwrap()["max"].is_null());
    let r = app.post_auth("/v1/accounts/ext:lab-1/subscription", &key, json!({ "plan": "nope" })).await;
    assert_eq!(r.code(), "unknown_plan");
    app.stop().await;
}

#[tokio::test]
async fn a_users_personal_account_has_entitlements_too() {
    let app = TestApp::builder().example_plans("chatbot.toml").start().await;
    let (access, _) = app.signed_in("ada@example.com").await;
    let r = app.get_auth("/v1/me/entitlements", &access).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["plan"], "free");
    assert_eq!(r.body["account"]["kind"], "personal");
    app.stop().await;
}

#[tokio::test]
async fn downgrades_wait_for_the_period_end_and_cancels_fall_back() {
    let app = TestApp::builder().example_plans("chatbot.toml").start().await;
    let key = app.service_key(&["accounts:write", "usage:read"]).await;
    app.post_auth("/v1/accounts", &key, json!({ "external_id": "awa", "plan": "max" })).await;
    let r =
        app.post_auth("/v1/accounts/ext:awa/subscription", &key, json!({ "plan": "pro", "at_period_end": true })).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["plan"], "max", "still max until the period ends");
    assert_eq!(r.body["subscription"]["scheduled_plan"], "pro");
    assert!(r.body["subscription"]["scheduled_at"].is_string());
    // An upgrade now replaces the scheduled change.
    let r = app.post_auth("/v1/accounts/ext:awa/subscription", &key, json!({ "plan": "enterprise" })).await;
    assert_eq!(r.body["plan"], "enterprise");
    assert!(r.body["subscription"]["scheduled_plan"].is_null());
    let r = app.request(Method::DELETE, "/v1/accounts/ext:awa/subscription?at_period_end=true", Some(&key), None).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["plan"], "enterprise");
    assert_eq!(r.body["subscription"]["cancel_at_period_end"], true);
    let r = app.request(Method::DELETE, "/v1/accounts/ext:awa/subscription", Some(&key), None).await;
    assert_eq!(r.body["plan"], "free", "canceled now: the default plan");
    let r = app.request(Method::DELETE, "/v1/accounts/ext:awa/subscription", Some(&key), None).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "nothing left to cancel");
    app.stop().await;
}
