//! `/v1/usage/*`: the seed scenarios, idempotency, concurrency and bad input over HTTP.

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{Reply, TestApp};

async fn app_with(plans: &str) -> (TestApp, String) {
    let app = TestApp::builder().example_plans(plans).start().await;
    let key = app.service_key(&["usage:write", "usage:read", "accounts:write"]).await;
    (app, key)
}

async fn customer(app: &TestApp, key: &str, external_id: &str, plan: Option<&str>) {
    let r = app.post_auth("/v1/accounts", key, json!({ "external_id": external_id, "plan": plan })).await;
    assert!(r.status.is_success(), "{:?}", r.body);
}

async fn consume(app: &TestApp, key: &str, account: &str, meter: &str, amount: i64) -> Reply {
    app.post_auth("/v1/usage/consume", key, json!({ "account": account, "meter": meter, "amount": amount })).await
}

#[tokio::test]
async fn chatbot_messages_per_day_and_per_month() {
    let (app, key) = app_with("chatbot.toml").await;
    customer(&app, &key, "awa", None).await;
    for i in 1..=5 {
        let r = consume(&app, &key, "ext:awa", "messages", 1).await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        assert_eq!(r.body["windows"][0]["window"], "day");
        assert_eq!(r.body["windows"][0]["used"], i);
        assert_eq!(r.body["windows"][1]["used"], i);
        assert_eq!(r.body["warning"], i >= 4, "80% warning at 4 of 5");
        assert_eq!(r.headers["x-quota-limit"], "5");
        assert_eq!(r.headers["x-quota-remaining"].to_str().unwrap(), (5 - i).to_string());
        assert!(r.headers.contains_key("x-quota-reset"));
    }
    let r = consume(&app, &key, "ext:awa", "messages", 1).await;
    assert_eq!((r.status, r.code()), (StatusCode::PAYMENT_REQUIRED, "quota_exceeded"));
    let details = &r.body["error"]["details"];
    assert_eq!(details["window"], "day");
    assert_eq!(details["limit"], 5);
    assert_eq!(details["used"], 5);
    assert!(details["resets_at"].as_str().unwrap().ends_with("T00:00:00Z"), "{details}");
    assert_eq!(details["upgrade_plans"], json!(["pro", "max", "enterprise"]));
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=86_400).contains(&retry));
    // The check endpoint agrees and counts nothing; the quota status says it all.
    let r = app.post_auth("/v1/usage/check", &key, json!({ "account": "ext:awa", "meter": "messages" })).await;
    assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED);
    let r = app.get_auth("/v1/accounts/ext:awa/entitlements", &key).await;
    assert_eq!((r.body["can_consume"].clone(), r.body["needs_upgrade"].clone()), (json!(false), json!(true)));
    // Tokens are a separate meter with a monthly limit; an upgrade lifts both.
    assert_eq!(consume(&app, &key, "ext:awa", "tokens", 1200).await.status, StatusCode::OK);
    app.post_auth("/v1/accounts/ext:awa/subscription", &key, json!({ "plan": "pro" })).await;
    let r = consume(&app, &key, "ext:awa", "messages", 1).await;
    assert_eq!(r.status, StatusCode::OK, "pro allows 100 a day: {:?}", r.body);
    assert_eq!(r.body["plan"], "pro");
    assert_eq!(r.body["windows"][0]["used"], 6, "usage carries over the plan change");
    // Daily rollups.
    let r = app.get_auth("/v1/accounts/ext:awa/usage?meter=messages", &key).await;
    assert_eq!(r.body["days"][0]["consumed"], 6);
    assert_eq!(r.body["days"][0]["denied"], 1, "the check did not count as a denial");
    app.stop().await;
}

#[tokio::test]
async fn monte_carlo_caps_flags_and_monthly_simulations() {
    let (app, key) = app_with("monte-carlo.toml").await;
    customer(&app, &key, "lab", None).await;
    let r = consume(&app, &key, "ext:lab", "iterations_per_simulation", 1000).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let r = consume(&app, &key, "ext:lab", "iterations_per_simulation", 1001).await;
    assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(r.body["error"]["details"]["upgrade_plans"], json!(["basic", "pro", "enterprise"]));
    let r = consume(&app, &key, "ext:lab", "iterations_per_simulation", 1000).await;
    assert_eq!(r.status, StatusCode::OK, "a cap counts nothing");
    let r = consume(&app, &key, "ext:lab", "gpu_access", 1).await;
    assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(r.body["error"]["details"]["upgrade_plans"], json!(["basic", "pro", "enterprise"]));
    let r = consume(&app, &key, "ext:lab", "simulations", 100).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["windows"][0]["window"], "month");
    let r = consume(&app, &key, "ext:lab", "simulations", 1).await;
    assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED);
    assert!(r.body["error"]["details"]["resets_at"].as_str().unwrap().contains("-01T00:00:00Z"));
    let r = consume(&app, &key, "ext:lab", "concurrent_simulations", 1).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "unsupported_meter_kind"),
        "slots are acquired"
    );
    app.stop().await;
}

#[tokio::test]
async fn medical_imaging_lifetime_quota_and_429_meters() {
    let (app, key) = app_with("medical-imaging.toml").await;
    customer(&app, &key, "clinic", None).await;
    let r = consume(&app, &key, "ext:clinic", "api_calls_l3_detect", 200).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["windows"][0]["window"], "lifetime");
    assert!(r.body["windows"][0]["resets_at"].is_null());
    let r = consume(&app, &key, "ext:clinic", "api_calls_l3_detect", 1).await;
    assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED);
    assert!(r.body["error"]["details"]["resets_at"].is_null());
    assert!(!r.headers.contains_key("retry-after"), "a lifetime quota never resets");
    assert_eq!(r.body["error"]["details"]["upgrade_plans"], json!(["research"]));
    let r = consume(&app, &key, "ext:clinic", "api_calls_segmentation", 1001).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "this meter denies with 429");
    app.stop().await;
}

#[tokio::test]
async fn idempotent_consumes_count_once() {
    let (app, key) = app_with("chatbot.toml").await;
    customer(&app, &key, "awa", None).await;
    let send = |idem: &'static str, amount: i64| {
        let client = app.client.clone();
        let url = app.url("/v1/usage/consume");
        let key = key.clone();
        async move {
            let res = client
                .post(url)
                .bearer_auth(key)
                .header("idempotency-key", idem)
                .json(&json!({ "account": "ext:awa", "meter": "tokens", "amount": amount }))
                .send()
                .await
                .unwrap();
            let status = res.status();
            (status, res.json::<serde_json::Value>().await.unwrap())
        }
    };
    let mut tasks = Vec::new();
    for _ in 0..16 {
        tasks.push(tokio::spawn(send("req-1", 100)));
    }
    let mut fresh = 0;
    for t in tasks {
        let (status, body) = t.await.unwrap();
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["windows"][0]["used"], 100);
        fresh += usize::from(body["replayed"] == false);
    }
    assert_eq!(fresh, 1);
    let (status, body) = send("req-1", 101).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("idempotency_key_reused"))
    );
    let (_, body) = send("req-2", 1).await;
    assert_eq!(body["windows"][0]["used"], 101);
    app.stop().await;
}

#[tokio::test]
async fn concurrent_consumes_never_exceed_the_limit() {
    let (app, key) = app_with("medical-imaging.toml").await;
    customer(&app, &key, "clinic", None).await;
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let client = app.client.clone();
        let url = app.url("/v1/usage/consume");
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let mut granted = 0;
            for _ in 0..20 {
                let body = json!({ "account": "ext:clinic", "meter": "api_calls_l3_detect" });
                let res = client.post(&url).bearer_auth(&key).json(&body).send().await.unwrap();
                match res.status() {
                    StatusCode::OK => granted += 1,
                    StatusCode::PAYMENT_REQUIRED => {}
                    other => panic!("{other}"),
                }
            }
            granted
        }));
    }
    let mut granted = 0;
    for t in tasks {
        granted += t.await.unwrap();
    }
    assert_eq!(granted, 200);
    let r = app.get_auth("/v1/accounts/ext:clinic/entitlements", &key).await;
    let meter =
        r.body["meters"].as_array().unwrap().iter().find(|m| m["meter"] == "api_calls_l3_detect").unwrap().clone();
    assert_eq!(meter["windows"][0]["used"], 200);
    app.stop().await;
}

#[tokio::test]
async fn bad_usage_requests_are_clear_4xx() {
    let (app, key) = app_with("chatbot.toml").await;
    customer(&app, &key, "awa", None).await;
    for (body, status, code) in [
        (json!({ "account": "ext:awa", "meter": "messages", "amount": 0 }), 422, "validation_failed"),
        (json!({ "account": "ext:awa", "meter": "messages", "amount": -3 }), 422, "validation_failed"),
        (json!({ "account": "ext:awa", "meter": "messages", "amount": 1e30 }), 422, "invalid_body"),
        (json!({ "account": "ext:awa", "meter": "messages", "amount": i64::MAX }), 422, "validation_failed"),
        (json!({ "account": "ext:awa", "meter": "messages", "amount": "1" }), 422, "invalid_body"),
        (json!({ "account": "ext:awa", "meter": "messages", "extra": true }), 422, "invalid_body"),
        (json!({ "account": "ext:awa", "meter": "nope" }), 422, "unknown_meter"),
        (json!({ "account": "ext:ghost", "meter": "messages" }), 404, "not_found"),
        (json!({ "meter": "messages" }), 422, "invalid_body"),
    ] {
        let r = app.post_auth("/v1/usage/consume", &key, body.clone()).await;
        assert_eq!((r.status.as_u16(), r.code()), (status, code), "{body}: {:?}", r.body);
    }
    let reader = app.service_key(&["usage:read"]).await;
    let r = consume(&app, &reader, "ext:awa", "messages", 1).await;
    assert_eq!((r.status, r.code()), (StatusCode::FORBIDDEN, "insufficient_scope"));
    let r = app.post_auth("/v1/usage/consume", &key, json!({ "account": "ext:awa", "meter": "messages" })).await;
    assert_eq!(r.status, StatusCode::OK, "after all those, the first real consume succeeds");
    assert_eq!(r.body["windows"][0]["used"], 1, "nothing was half-written");
    app.stop().await;
}

#[tokio::test]
async fn medical_imaging_storage_is_a_gauge() {
    let (app, key) = app_with("medical-imaging.toml").await;
    customer(&app, &key, "clinic", None).await;
    let gib = 1024_i64 * 1024 * 1024;
    let set = |amount: i64| {
        app.post_auth(
            "/v1/usage/set",
            &key,
            json!({ "account": "ext:clinic", "meter": "storage_dicom", "amount": amount }),
        )
    };
    let add = |amount: i64| {
        app.post_auth(
            "/v1/usage/add",
            &key,
            json!({ "account": "ext:clinic", "meter": "storage_dicom", "amount": amount }),
        )
    };
    let r = set(9 * gib).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["windows"][0]["used"], 9 * gib);
    assert_eq!(r.body["windows"][0]["warning"], true, "90% of 10 GiB");
    let r = add(2 * gib).await;
    assert_eq!((r.status, r.code()), (StatusCode::PAYMENT_REQUIRED, "quota_exceeded"));
    assert_eq!(r.body["error"]["details"]["upgrade_plans"], json!(["research"]));
    let r = add(-4 * gib).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["windows"][0]["used"], 5 * gib);
    let r = add(5 * gib).await;
    assert_eq!(r.body["windows"][0]["used"], 10 * gib, "up to the maximum exactly");
    assert_eq!(set(0).await.body["windows"][0]["used"], 0);
    assert_eq!(add(-1).await.body["windows"][0]["used"], 0, "never below zero");
    assert_eq!(add(0).await.status, StatusCode::UNPROCESSABLE_ENTITY);
    // The sign is part of the request an idempotency key stands for.
    let keyed = |amount: i64| {
        app.client
            .post(app.url("/v1/usage/add"))
            .bearer_auth(&key)
            .header("idempotency-key", "move-1")
            .json(&json!({ "account": "ext:clinic", "meter": "storage_dicom", "amount": amount }))
            .send()
    };
    assert_eq!(keyed(-1).await.unwrap().status(), StatusCode::OK);
    assert_eq!(keyed(1).await.unwrap().status(), StatusCode::UNPROCESSABLE_ENTITY);
    let r = app.get_auth("/v1/accounts/ext:clinic/entitlements", &key).await;
    let meter = r.body["meters"].as_array().unwrap().iter().find(|m| m["meter"] == "storage_dicom").unwrap().clone();
    assert_eq!(meter["max"], 10 * gib);
    assert_eq!(meter["windows"][0]["used"], 0);
    app.stop().await;
}

#[tokio::test]
async fn a_refund_gives_quota_back() {
    let (app, key) = app_with("chatbot.toml").await;
    customer(&app, &key, "awa", None).await;
    for _ in 0..5 {
        consume(&app, &key, "ext:awa", "messages", 1).await;
    }
    assert_eq!(consume(&app, &key, "ext:awa", "messages", 1).await.status, StatusCode::PAYMENT_REQUIRED);
    let r = app
        .post_auth("/v1/usage/refund", &key, json!({ "account": "ext:awa", "meter": "messages", "amount": 2 }))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["windows"][0]["used"], 3);
    assert_eq!(r.body["windows"][1]["used"], 3);
    assert_eq!(consume(&app, &key, "ext:awa", "messages", 2).await.status, StatusCode::OK);
    let r =
        app.post_auth("/v1/usage/set", &key, json!({ "account": "ext:awa", "meter": "messages", "amount": 1 })).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "unsupported_meter_kind"),
        "a counter has no level to set"
    );
    app.stop().await;
}

#[tokio::test]
async fn monte_carlo_concurrent_simulations_are_leases() {
    let (app, key) = app_with("monte-carlo.toml").await;
    customer(&app, &key, "lab", None).await;
    let acquire =
        || app.post_auth("/v1/usage/acquire", &key, json!({ "account": "ext:lab", "meter": "concurrent_simulations" }));
    let mut leases = Vec::new();
    for held in 1..=3 {
        let r = acquire().await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        assert_eq!(r.body["held"], held);
        assert_eq!(r.body["max"], 3);
        assert!(r.body["expires_at"].is_string());
        leases.push(r.body["lease_id"].as_str().unwrap().to_owned());
    }
    let r = acquire().await;
    assert_eq!((r.status, r.code()), (StatusCode::PAYMENT_REQUIRED, "quota_exceeded"));
    assert_eq!(r.body["error"]["details"]["upgrade_plans"], json!(["basic", "pro", "enterprise"]));
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry > 3500 && retry <= 3600, "until the first lease expires: {retry}");
    let release = |id: String, account: &'static str| {
        let app = &app;
        let key = key.clone();
        async move { app.post_auth(&format!("/v1/usage/leases/{id}/release"), &key, json!({ "account": account })).await }
    };
    customer(&app, &key, "other", None).await;
    assert_eq!(release(leases[0].clone(), "ext:other").await.status, StatusCode::NOT_FOUND, "not theirs");
    assert_eq!(release(leases[0].clone(), "ext:lab").await.status, StatusCode::NO_CONTENT);
    assert_eq!(release(leases[0].clone(), "ext:lab").await.status, StatusCode::NOT_FOUND, "released once");
    // With an Idempotency-Key, a retried release answers as the first did.
    let keyed_release = |id: String| {
        app.client
            .post(app.url(&format!("/v1/usage/leases/{id}/release")))
            .bearer_auth(&key)
            .header("idempotency-key", "free-1")
            .json(&json!({ "account": "ext:lab" }))
            .send()
    };
    assert_eq!(keyed_release(leases[1].clone()).await.unwrap().status(), StatusCode::NO_CONTENT);
    assert_eq!(keyed_release(leases[1].clone()).await.unwrap().status(), StatusCode::NO_CONTENT, "replayed");
    let reused = keyed_release(leases[2].clone()).await.unwrap();
    assert_eq!(reused.status(), StatusCode::UNPROCESSABLE_ENTITY, "the key under another lease");
    assert_eq!(acquire().await.status, StatusCode::OK, "the keyed release freed a slot");
    // A retried acquire with its Idempotency-Key names the same lease and takes
    // no second slot.
    let send = || async {
        let res = app
            .client
            .post(app.url("/v1/usage/acquire"))
            .bearer_auth(&key)
            .header("idempotency-key", "sim-42")
            .json(&json!({ "account": "ext:lab", "meter": "concurrent_simulations" }))
            .send()
            .await
            .unwrap();
        (res.status(), res.json::<serde_json::Value>().await.unwrap())
    };
    let (first, again) = (send().await, send().await);
    assert_eq!((first.0, again.0), (StatusCode::OK, StatusCode::OK), "{first:?} {again:?}");
    assert_eq!(first.1["lease_id"], again.1["lease_id"]);
    assert_eq!((first.1["replayed"].clone(), again.1["replayed"].clone()), (json!(false), json!(true)));
    assert_eq!(acquire().await.status, StatusCode::PAYMENT_REQUIRED, "three slots held, not four");
    assert_eq!(
        release(first.1["lease_id"].as_str().unwrap().to_owned(), "ext:lab").await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(acquire().await.status, StatusCode::OK, "the slot is free again");
    // A short lease frees itself.
    app.post_auth("/v1/accounts/ext:lab/subscription", &key, json!({ "plan": "basic" })).await;
    let short = app
        .post_auth(
            "/v1/usage/acquire",
            &key,
            json!({ "account": "ext:lab", "meter": "concurrent_simulations", "lease_seconds": 1 }),
        )
        .await;
    assert_eq!(short.body["held"], 4, "basic allows 10");
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(acquire().await.body["held"], 4, "the expired lease no longer counts");
    app.stop().await;
}

#[tokio::test]
async fn reservations_count_only_work_that_succeeded() {
    // Seed 004's middleware: reserve before the call, commit on 2xx, release otherwise.
    let (app, key) = app_with("medical-imaging.toml").await;
    customer(&app, &key, "clinic", None).await;
    let reserve = |ttl: u64| {
        app.post_auth(
            "/v1/usage/reserve",
            &key,
            json!({ "account": "ext:clinic", "meter": "api_calls_l3_detect", "amount": 2, "ttl_seconds": ttl }),
        )
    };
    let settle = |id: String, action: &'static str, body: serde_json::Value| {
        let app = &app;
        let key = key.clone();
        async move { app.post_auth(&format!("/v1/usage/reservations/{id}/{action}"), &key, body).await }
    };
    let r = reserve(60).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["windows"][0]["used"], 2, "counted while the work runs");
    let ok = r.body["reservation_id"].as_str().unwrap().to_owned();
    let r = settle(ok.clone(), "commit", json!({ "account": "ext:clinic", "amount": 3 })).await;
    assert_eq!((r.status, r.code()), (StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"), "more than reserved");
    let r = settle(ok.clone(), "commit", json!({ "account": "ext:clinic", "amount": 1 })).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["windows"][0]["used"], 1, "the unused part came back");
    assert_eq!(
        settle(ok, "release", json!({ "account": "ext:clinic" })).await.status,
        StatusCode::NOT_FOUND,
        "settled once"
    );
    let failed = reserve(60).await.body["reservation_id"].as_str().unwrap().to_owned();
    let r = settle(failed, "release", json!({ "account": "ext:clinic" })).await;
    assert_eq!(r.body["windows"][0]["used"], 1, "a failed call costs nothing");
    // Forgotten reservations come back by themselves.
    reserve(1).await;
    tokio::time::sleep(std::time::Duration::from_millis(3500)).await;
    let r = app.get_auth("/v1/accounts/ext:clinic/entitlements", &key).await;
    let meter =
        r.body["meters"].as_array().unwrap().iter().find(|m| m["meter"] == "api_calls_l3_detect").unwrap().clone();
    assert_eq!(meter["windows"][0]["used"], 1, "the expired reservation was given back");
    app.stop().await;
}

#[tokio::test]
async fn reserve_and_settle_retries_replay_their_first_answer() {
    let (app, key) = app_with("medical-imaging.toml").await;
    customer(&app, &key, "clinic", None).await;
    let post = |path: String, idem: &'static str, body: serde_json::Value| {
        let client = app.client.clone();
        let url = app.url(&path);
        let key = key.clone();
        async move {
            let res =
                client.post(url).bearer_auth(key).header("idempotency-key", idem).json(&body).send().await.unwrap();
            let status = res.status();
            (status, res.json::<serde_json::Value>().await.unwrap())
        }
    };
    let reserve = json!({ "account": "ext:clinic", "meter": "api_calls_l3_detect", "amount": 5, "ttl_seconds": 60 });
    // Eight attempts of one reserve at once: one reservation, counted once, one id.
    let tasks: Vec<_> =
        (0..8).map(|_| tokio::spawn(post("/v1/usage/reserve".into(), "job-7", reserve.clone()))).collect();
    let mut ids = std::collections::HashSet::new();
    let mut expiries = std::collections::HashSet::new();
    for task in tasks {
        let (status, body) = task.await.unwrap();
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["windows"][0]["used"], 5, "{body}");
        ids.insert(body["reservation_id"].as_str().unwrap().to_owned());
        expiries.insert(body["expires_at"].as_str().unwrap().to_owned());
    }
    assert_eq!((ids.len(), expiries.len()), (1, 1), "every replay names the same reservation");
    let id = ids.into_iter().next().unwrap();
    let (status, body) = post(
        "/v1/usage/reserve".into(),
        "job-7",
        json!({ "account": "ext:clinic", "meter": "api_calls_l3_detect", "amount": 6 }),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("idempotency_key_reused"))
    );

    // Commit with the final amount, retried: the second answer replays the first
    // instead of saying the reservation is gone.
    let commit = format!("/v1/usage/reservations/{id}/commit");
    let first = post(commit.clone(), "commit-7", json!({ "account": "ext:clinic", "amount": 3 })).await;
    assert_eq!(first.0, StatusCode::OK, "{}", first.1);
    assert_eq!((first.1["windows"][0]["used"].clone(), first.1["replayed"].clone()), (json!(3), json!(false)));
    let again = post(commit.clone(), "commit-7", json!({ "account": "ext:clinic", "amount": 3 })).await;
    assert_eq!(again.0, StatusCode::OK, "{}", again.1);
    assert_eq!((again.1["windows"][0]["used"].clone(), again.1["replayed"].clone()), (json!(3), json!(true)));
    let other = post(commit, "commit-7", json!({ "account": "ext:clinic", "amount": 2 })).await;
    assert_eq!(
        (other.0, other.1["error"]["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("idempotency_key_reused"))
    );
    // Without a key, a second settle finds nothing pending.
    let r =
        app.post_auth(&format!("/v1/usage/reservations/{id}/release"), &key, json!({ "account": "ext:clinic" })).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = app.get_auth("/v1/accounts/ext:clinic/entitlements", &key).await;
    let meter =
        r.body["meters"].as_array().unwrap().iter().find(|m| m["meter"] == "api_calls_l3_detect").unwrap().clone();
    assert_eq!(meter["windows"][0]["used"], 3);
    app.stop().await;
}
