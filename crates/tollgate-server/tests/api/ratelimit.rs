//! `POST /v1/ratelimit/check`, in memory and shared through Redis by two servers.

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{TestApp, redis_available};

#[tokio::test]
async fn plan_aware_limits_with_headers() {
    let app = TestApp::builder().example_plans("saas-api.toml").start().await;
    let key = app.service_key(&["ratelimit:check", "accounts:write"]).await;
    app.post_auth("/v1/accounts", &key, json!({ "external_id": "free-co" })).await;
    app.post_auth("/v1/accounts", &key, json!({ "external_id": "pro-co", "plan": "pro_plus" })).await;
    let check = |account: &'static str| {
        let body = json!({ "scope": "jobs", "account": account });
        app.post_auth("/v1/ratelimit/check", &key, body)
    };
    for i in 0..10 {
        let r = check("ext:free-co").await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        assert_eq!(r.headers["ratelimit-limit"], "10");
        assert_eq!(r.body["remaining"], 9 - i);
    }
    let r = check("ext:free-co").await;
    assert_eq!((r.status, r.code()), (StatusCode::TOO_MANY_REQUESTS, "rate_limited"));
    assert!(r.headers["retry-after"].to_str().unwrap().parse::<u64>().unwrap() > 0);
    // pro_plus doubles every limit.
    let r = check("ext:pro-co").await;
    assert_eq!(r.body["limit"], 20);
    // Anonymous callers get the default plan's limit, per key.
    let r = app.post_auth("/v1/ratelimit/check", &key, json!({ "scope": "api", "key": "ip:203.0.113.9" })).await;
    assert_eq!(r.body["limit"], 60);
    let r = app.post_auth("/v1/ratelimit/check", &key, json!({ "scope": "nope", "key": "x" })).await;
    assert_eq!((r.status, r.code()), (StatusCode::UNPROCESSABLE_ENTITY, "unknown_scope"));
    app.stop().await;
}

#[tokio::test]
async fn two_servers_share_one_limit_through_redis() {
    if !redis_available().await {
        return;
    }
    let prefix = format!("t:{}:", uuid::Uuid::now_v7().simple());
    let first = TestApp::builder().example_plans("saas-api.toml").redis(&prefix).start().await;
    let second = TestApp::builder().example_plans("saas-api.toml").redis(&prefix).start().await;
    let key_a = first.service_key(&["ratelimit:check"]).await;
    let key_b = second.service_key(&["ratelimit:check"]).await;
    let mut tasks = Vec::new();
    for i in 0..40 {
        let (client, url, key) = if i % 2 == 0 {
            (first.client.clone(), first.url("/v1/ratelimit/check"), key_a.clone())
        } else {
            (second.client.clone(), second.url("/v1/ratelimit/check"), key_b.clone())
        };
        tasks.push(tokio::spawn(async move {
            let body = json!({ "scope": "jobs", "key": "user-7" });
            client.post(url).bearer_auth(key).json(&body).send().await.unwrap().status()
        }));
    }
    let mut allowed = 0;
    for t in tasks {
        if t.await.unwrap() == StatusCode::OK {
            allowed += 1;
        }
    }
    assert_eq!(allowed, 10, "one limit across both nodes");
    let limiter = &first.running.as_ref().unwrap().state.limiter;
    assert!(limiter.clear("").await.unwrap() >= 1, "clean up the test's keys");
    first.stop().await;
    second.stop().await;
}
