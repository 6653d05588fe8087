//! `/v1/credit-packages`, `/v1/accounts/{id}/credits/*` and `/v1/me/credits/*`.

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::TestApp;

async fn app_with_account() -> (TestApp, String) {
    let app = TestApp::builder().example_plans("credits-api.toml").start().await;
    let key = app.service_key(&["accounts:write", "credits:read", "credits:write"]).await;
    let r = app.post_auth("/v1/accounts", &key, json!({ "external_id": "buyer" })).await;
    assert_eq!(r.status, StatusCode::CREATED);
    (app, key)
}

#[tokio::test]
async fn packages_are_listed_in_order_and_localized() {
    let app = TestApp::builder().example_plans("credits-api.toml").start().await;
    let r = app.client.get(app.url("/v1/credit-packages")).header("Accept-Language", "fr").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let body: serde_json::Value = r.json().await.unwrap();
    let packages = body["packages"].as_array().unwrap();
    let seen: Vec<(&str, i64, i64)> = packages
        .iter()
        .map(|p| (p["key"].as_str().unwrap(), p["credits"].as_i64().unwrap(), p["amount"].as_i64().unwrap()))
        .collect();
    assert_eq!(seen, vec![("starter", 100, 1500), ("pro", 500, 6000), ("enterprise", 2000, 20000)]);
    assert_eq!(packages[0]["name"], "Découverte");
    assert_eq!(packages[0]["currency"], "USD");
    app.stop().await;
}

#[tokio::test]
async fn grants_spends_and_history() {
    let (app, key) = app_with_account().await;
    let path = |p: &str| format!("/v1/accounts/ext:buyer/credits{p}");
    let r = app.post_auth(&path("/grant"), &key, json!({ "amount": 20, "description": "welcome" })).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["transaction"]["balance_after"], 20);
    assert_eq!(r.body["transaction"]["kind"], "bonus");
    let spend = json!({ "amount": 5, "description": "report", "endpoint": "/api/report" });
    let r = app.post_auth(&path("/spend"), &key, spend.clone()).await;
    assert_eq!((r.status, r.body["transaction"]["amount"].as_i64()), (StatusCode::OK, Some(-5)));
    let r = app.post_auth(&path("/refund"), &key, json!({ "amount": 2, "description": "failed call" })).await;
    assert_eq!(r.status, StatusCode::OK);
    // Grants and refunds are audited with the service key as the actor.
    let store = &app.running.as_ref().unwrap().state.store;
    let query =
        tollgate_core::audit::AuditQuery { action_prefix: Some("credits.".into()), limit: 10, ..Default::default() };
    let audit = store.list_audit(query).await.unwrap();
    let actions: Vec<&str> = audit.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(actions, ["credits.refunded", "credits.granted"]);
    assert!(audit.iter().all(|e| matches!(e.actor, tollgate_core::audit::Actor::ServiceKey(_))), "{audit:?}");

    // Refused: more than the balance (free plan: no overdraft), with the balance in the answer.
    let r = app.post_auth(&path("/spend"), &key, json!({ "amount": 18 })).await;
    assert_eq!((r.status, r.code()), (StatusCode::PAYMENT_REQUIRED, "insufficient_credits"));
    assert_eq!(r.body["error"]["details"], json!({ "balance": 17, "requested": 18 }));
    for bad in [json!({ "amount": 0 }), json!({ "amount": -5 }), json!({ "amount": 1, "metadata": [1] })] {
        let r = app.post_auth(&path("/spend"), &key, bad.clone()).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}");
    }
    let r = app.post_auth(&path("/spend"), &key, json!({ "amount": 1, "extra": true })).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);

    let r = app.get_auth(&path(""), &key).await;
    assert_eq!(r.body, json!({ "balance": 17, "purchased": 0, "used": 3, "granted": 20 }));
    let r = app.get_auth(&path("/transactions?limit=2"), &key).await;
    let kinds: Vec<&str> =
        r.body["transactions"].as_array().unwrap().iter().map(|t| t["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, vec!["refund", "usage"]);
    let cursor = r.body["next_cursor"].as_str().unwrap();
    let r = app.get_auth(&path(&format!("/transactions?limit=2&cursor={cursor}")), &key).await;
    assert_eq!(r.body["transactions"].as_array().unwrap().len(), 1);
    assert_eq!(r.body["transactions"][0]["description"], "welcome");
    assert!(r.body["next_cursor"].is_null());
    let r = app.get_auth(&path("/transactions?kind=usage"), &key).await;
    assert_eq!(r.body["transactions"][0]["endpoint"], "/api/report");
    let r = app.get_auth(&path("/transactions?kind=gift"), &key).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    let r = app.get_auth(&path("/transactions?limit=-1"), &key).await;
    assert_eq!((r.status, r.code()), (StatusCode::UNPROCESSABLE_ENTITY, "invalid_body"));
    let r = app.get_auth(&path("/transactions?cursor=nope"), &key).await;
    assert_eq!((r.status, r.code()), (StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"));
    assert_eq!(app.get_auth("/v1/accounts/ext:nobody/credits", &key).await.status, StatusCode::NOT_FOUND);

    // Scopes: reading needs credits:read, moving needs credits:write.
    let reader = app.service_key(&["credits:read"]).await;
    assert_eq!(app.get_auth(&path(""), &reader).await.status, StatusCode::OK);
    let r = app.post_auth(&path("/spend"), &reader, json!({ "amount": 1 })).await;
    assert_eq!((r.status, r.code()), (StatusCode::FORBIDDEN, "insufficient_scope"));
    let usage_only = app.service_key(&["usage:write"]).await;
    assert_eq!(app.get_auth(&path(""), &usage_only).await.status, StatusCode::FORBIDDEN);
    assert_eq!(app.request(reqwest::Method::GET, &path(""), None, None).await.status, StatusCode::UNAUTHORIZED);
    app.stop().await;
}

#[tokio::test]
async fn a_retried_spend_counts_once() {
    let (app, key) = app_with_account().await;
    app.post_auth("/v1/accounts/ext:buyer/credits/grant", &key, json!({ "amount": 10 })).await;
    let spend = |body: serde_json::Value| {
        app.client
            .post(app.url("/v1/accounts/ext:buyer/credits/spend"))
            .bearer_auth(&key)
            .header("Idempotency-Key", "order-7")
            .json(&body)
            .send()
    };
    let tasks: Vec<_> = (0..8).map(|_| spend(json!({ "amount": 4 }))).collect();
    let mut ids = Vec::new();
    for r in futures_util::future::join_all(tasks).await {
        let r = r.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let body: serde_json::Value = r.json().await.unwrap();
        ids.push(body["transaction"]["id"].as_str().unwrap().to_owned());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "all retries name the first spend");
    let r = spend(json!({ "amount": 5 })).await.unwrap();
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let r = app.get_auth("/v1/accounts/ext:buyer/credits", &key).await;
    assert_eq!(r.body["balance"], 6);
    app.stop().await;
}

#[tokio::test]
async fn concurrent_spends_never_overdraw_over_http() {
    let (app, key) = app_with_account().await;
    app.post_auth("/v1/accounts/ext:buyer/credits/grant", &key, json!({ "amount": 100 })).await;
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            app.client
                .post(app.url("/v1/accounts/ext:buyer/credits/spend"))
                .bearer_auth(&key)
                .json(&json!({ "amount": 3 }))
                .send()
        })
        .collect();
    let mut granted = 0;
    for r in futures_util::future::join_all(tasks).await {
        match r.unwrap().status() {
            StatusCode::OK => granted += 3,
            StatusCode::PAYMENT_REQUIRED => {}
            other => panic!("unexpected {other}"),
        }
    }
    let r = app.get_auth("/v1/accounts/ext:buyer/credits", &key).await;
    assert_eq!(granted, 99);
    assert_eq!(r.body["balance"], 1);
    app.stop().await;
}

#[tokio::test]
async fn users_read_and_spend_their_own_credits() {
    let app = TestApp::builder().example_plans("credits-api.toml").start().await;
    let (token, _) = app.signed_in("reader@example.com").await;
    let r = app.get_auth("/v1/me/credits", &token).await;
    assert_eq!(r.body, json!({ "balance": 0, "purchased": 0, "used": 0, "granted": 0 }));
    let r = app.post_auth("/v1/me/credits/spend", &token, json!({ "amount": 1 })).await;
    assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED);
    let r = app.get_auth("/v1/me/credits/transactions", &token).await;
    assert_eq!(r.body["transactions"], json!([]));
    let r = app.get_auth("/v1/me/payments", &token).await;
    assert_eq!(r.body["payments"], json!([]));
    // A user token is not a service key: account routes stay closed.
    let me = app.get_auth("/v1/me", &token).await;
    let account = me.body["user"]["account_id"].as_str().unwrap().to_owned();
    let r = app.get_auth(&format!("/v1/accounts/{account}/credits"), &token).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    app.stop().await;
}

#[tokio::test]
async fn calls_past_the_plan_are_paid_with_credits() {
    let (app, key) = app_with_account().await;
    let usage = app.service_key(&["usage:write"]).await;
    let consume = |amount: i64| {
        app.post_auth(
            "/v1/usage/consume",
            &usage,
            json!({ "account": "ext:buyer", "meter": "api_calls", "amount": amount }),
        )
    };
    let r = consume(100).await;
    assert_eq!((r.status, r.body["credits_charged"].as_i64()), (StatusCode::OK, Some(0)), "{:?}", r.body);
    let r = consume(5).await;
    assert_eq!((r.status, r.code()), (StatusCode::PAYMENT_REQUIRED, "quota_exceeded"), "no credits yet");
    app.post_auth("/v1/accounts/ext:buyer/credits/grant", &key, json!({ "amount": 8 })).await;
    let r = consume(5).await;
    assert_eq!((r.status, r.body["credits_charged"].as_i64()), (StatusCode::OK, Some(5)), "{:?}", r.body);
    assert_eq!(r.body["windows"][0]["used"], 100, "the plan's window stays at its limit");
    assert_eq!(consume(5).await.status, StatusCode::PAYMENT_REQUIRED, "3 credits left");
    let r = app.get_auth("/v1/accounts/ext:buyer/credits/transactions?kind=usage", &key).await;
    assert_eq!(r.body["transactions"][0]["amount"], -5);
    assert_eq!(app.get_auth("/v1/accounts/ext:buyer/credits", &key).await.body["balance"], 3);
    app.stop().await;
}
