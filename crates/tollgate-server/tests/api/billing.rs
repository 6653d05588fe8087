//! Stripe billing end to end: checkout through the local Stripe stand-in, its signed
//! webhooks (duplicated, concurrent, reordered), credits and subscriptions.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::fake_stripe::{Event, FakeStripe, signature_header};
use crate::helpers::TestApp;

const SECRET: &str = "whsec_tollgate_tests";

async fn start() -> (TestApp, FakeStripe) {
    let stripe = FakeStripe::start(SECRET).await;
    let app = TestApp::builder().example_plans("credits-api.toml").stripe(&stripe.url, SECRET).start().await;
    stripe.set_webhook_target(app.url("/v1/billing/webhooks/stripe"));
    (app, stripe)
}

async fn deliver(stripe: &FakeStripe, event: &Event) -> Value {
    let r = stripe.deliver(event).await;
    assert_eq!(r.status(), StatusCode::OK, "{}", event.event_type);
    r.json().await.unwrap()
}

fn urls() -> Value {
    json!({ "success_url": "https://app.test/ok", "cancel_url": "https://app.test/cancel" })
}

fn with(mut body: Value, extra: Value) -> Value {
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    body
}

#[tokio::test]
async fn buy_credits_spend_them_and_refund() {
    let (app, stripe) = start().await;
    let (token, _) = app.signed_in("buyer@example.com").await;
    let r = app.post_auth("/v1/billing/checkout", &token, with(urls(), json!({ "credit_package": "starter" }))).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let session = r.body["session_id"].as_str().unwrap().to_owned();
    assert!(r.body["checkout_url"].as_str().unwrap().starts_with("https://checkout.stripe.com/"));

    // What Tollgate sent: a customer (once), then the session, pinned and idempotent.
    let requests = stripe.requests();
    assert_eq!(
        requests.iter().map(|r| r.path.as_str()).collect::<Vec<_>>(),
        ["/v1/customers", "/v1/checkout/sessions"]
    );
    for request in &requests {
        assert_eq!(request.header("stripe-version"), Some("2026-09-30.endive"));
        assert_eq!(request.header("authorization"), Some("Bearer sk_test_tollgate"));
        assert!(request.header("idempotency-key").is_some());
    }
    assert_eq!(requests[0].field("email"), Some("buyer@example.com"));
    let checkout = &requests[1];
    assert_eq!(checkout.field("mode"), Some("payment"));
    assert_eq!(checkout.field("line_items[0][price_data][unit_amount]"), Some("1500"));
    assert_eq!(checkout.field("line_items[0][price_data][currency]"), Some("usd"));
    assert_eq!(checkout.field("metadata[credits]"), Some("100"));
    assert!(checkout.field("metadata[account_id]").is_some());
    // A second checkout reuses the customer.
    let r = app.post_auth("/v1/billing/checkout", &token, with(urls(), json!({ "credit_package": "pro" }))).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(stripe.requests().iter().filter(|r| r.path == "/v1/customers").count(), 1);

    let events = stripe.complete_checkout(&session);
    assert_eq!(deliver(&stripe, &events[0]).await["outcome"], "applied");
    assert_eq!(deliver(&stripe, &events[0]).await["outcome"], "duplicate", "a redelivery credits nothing");
    let r = app.get_auth("/v1/me/credits", &token).await;
    assert_eq!(r.body, json!({ "balance": 100, "purchased": 100, "used": 0, "granted": 0 }));

    let r = app.post_auth("/v1/me/credits/spend", &token, json!({ "amount": 5, "description": "export" })).await;
    assert_eq!((r.status, r.body["transaction"]["balance_after"].as_i64()), (StatusCode::OK, Some(95)));
    let r = app.get_auth("/v1/me/credits/transactions", &token).await;
    let history: Vec<(&str, i64)> = r.body["transactions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["kind"].as_str().unwrap(), t["amount"].as_i64().unwrap()))
        .collect();
    assert_eq!(history, vec![("usage", -5), ("purchase", 100)]);
    let r = app.get_auth("/v1/me/payments", &token).await;
    let payment = &r.body["payments"][0];
    assert_eq!((payment["amount"].as_i64(), payment["currency"].as_str()), (Some(1500), Some("USD")));
    assert_eq!((payment["status"].as_str(), payment["credits"].as_i64()), (Some("succeeded"), Some(100)));

    // Refunded in full after 5 were spent: 95 come back off the balance, 5 are recorded.
    let intent = stripe.checkout_session(&session).unwrap()["payment_intent"].as_str().unwrap().to_owned();
    let refund = stripe.refund(&intent, 1500);
    assert_eq!(deliver(&stripe, &refund).await["outcome"], "applied");
    assert_eq!(app.get_auth("/v1/me/credits", &token).await.body["balance"], 0);
    let r = app.get_auth("/v1/me/payments", &token).await;
    let payment = &r.body["payments"][0];
    assert_eq!(payment["status"], "refunded");
    assert_eq!((payment["credits_reversed"].as_i64(), payment["credits_unrecovered"].as_i64()), (Some(95), Some(5)));
    app.stop().await;
}

/// The account's plan in force and its subscription's status.
async fn plan(app: &TestApp, key: &str) -> (String, Option<String>) {
    let r = app.get_auth("/v1/accounts/ext:acme/entitlements", key).await;
    (r.body["plan"].as_str().unwrap().to_owned(), r.body["subscription"]["status"].as_str().map(str::to_owned))
}

#[tokio::test]
async fn subscribe_fail_pay_and_cancel() {
    let (app, stripe) = start().await;
    let key = app.service_key(&["accounts:write", "usage:read", "billing:write"]).await;
    let r = app.post_auth("/v1/accounts", &key, json!({ "external_id": "acme", "email": "billing@acme.test" })).await;
    assert_eq!(r.status, StatusCode::CREATED);
    let body = with(urls(), json!({ "account": "ext:acme", "plan": "pro" }));
    let r = app.post_auth("/v1/billing/checkout", &key, body).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let session = r.body["session_id"].as_str().unwrap().to_owned();
    let sent = stripe.requests().into_iter().find(|r| r.path == "/v1/checkout/sessions").unwrap();
    assert_eq!(sent.field("mode"), Some("subscription"));
    assert_eq!(sent.field("line_items[0][price_data][recurring][interval]"), Some("month"));
    assert_eq!(sent.field("subscription_data[metadata][plan]"), Some("pro"));

    let events = stripe.complete_checkout(&session);
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(types, ["customer.subscription.created", "checkout.session.completed", "invoice.paid"]);
    for event in &events {
        deliver(&stripe, event).await;
    }
    assert_eq!(plan(&app, &key).await, ("pro".to_owned(), Some("active".to_owned())));
    let r = app.get_auth("/v1/accounts/ext:acme/entitlements", &key).await;
    assert_eq!(r.body["meters"][0]["windows"][0]["limit"], 10000, "pro limits apply");
    let sub_id = r.body["subscription"]["provider_subscription_id"].as_str().unwrap().to_owned();

    // The renewal fails: past due (the plan still applies), and the owner is told.
    for event in stripe.fail_invoice(&sub_id) {
        deliver(&stripe, &event).await;
    }
    assert_eq!(plan(&app, &key).await, ("pro".to_owned(), Some("past_due".to_owned())));
    let mail = app.mail.wait_for("billing@acme.test", 1).await;
    assert!(mail.data.contains("Subject: Your payment failed"), "{}", mail.data);

    // Paid on retry: active again.
    for event in stripe.pay_invoice(&sub_id) {
        deliver(&stripe, &event).await;
    }
    assert_eq!(plan(&app, &key).await, ("pro".to_owned(), Some("active".to_owned())));

    // Deleted: back to the default plan.
    deliver(&stripe, &stripe.delete_subscription(&sub_id)).await;
    let (plan_now, _) = plan(&app, &key).await;
    assert_eq!(plan_now, "free");
    let r = app.get_auth("/v1/accounts/ext:acme/entitlements", &key).await;
    assert_eq!(r.body["meters"][0]["windows"][0]["limit"], 100);
    app.stop().await;
}

#[tokio::test]
async fn reordered_subscription_events_never_move_backwards() {
    let (app, stripe) = start().await;
    let key = app.service_key(&["accounts:write", "usage:read", "billing:write"]).await;
    app.post_auth("/v1/accounts", &key, json!({ "external_id": "late" })).await;
    let r = app
        .post_auth("/v1/billing/checkout", &key, with(urls(), json!({ "account": "ext:late", "plan": "pro" })))
        .await;
    let events = stripe.complete_checkout(r.body["session_id"].as_str().unwrap());
    let sub_id = events[0].json()["data"]["object"]["id"].as_str().unwrap().to_owned();
    // Two updates: first past_due, then active again; delivered newest first, then the
    // creation last of all.
    let older = stripe.update_subscription(&sub_id, json!({ "status": "past_due" }));
    let newer = stripe.update_subscription(&sub_id, json!({ "status": "active", "cancel_at_period_end": true }));
    assert!(newer.created > older.created);
    assert_eq!(deliver(&stripe, &newer).await["outcome"], "applied");
    assert_eq!(deliver(&stripe, &older).await["outcome"], "ignored");
    for event in &events {
        deliver(&stripe, event).await;
    }
    let r = app.get_auth("/v1/accounts/ext:late/entitlements", &key).await;
    assert_eq!(r.body["plan"], "pro");
    assert_eq!(r.body["subscription"]["status"], "active");
    assert_eq!(r.body["subscription"]["cancel_at_period_end"], true, "the newest state stands");
    app.stop().await;
}

#[tokio::test]
async fn webhooks_are_verified_before_anything_else() {
    let (app, stripe) = start().await;
    let event = stripe.event("customer.created", json!({ "id": "cus_x", "object": "customer" }));
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let cases = [
        ("wrong secret", signature_header("whsec_other", &event.payload, now)),
        ("stale", signature_header(SECRET, &event.payload, now - 301)),
        ("from the future", signature_header(SECRET, &event.payload, now + 301)),
        ("no v1", format!("t={now}")),
        ("garbage", "nonsense".to_owned()),
    ];
    for (name, header) in cases {
        let r = stripe.deliver_with(&event, header).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{name}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_signature", "{name}");
    }
    // A tampered body under a valid signature of the original.
    let header = signature_header(SECRET, &event.payload, now);
    let tampered = event.payload.replace("cus_x", "cus_y");
    let r = app
        .client
        .post(app.url("/v1/billing/webhooks/stripe"))
        .header("Stripe-Signature", header)
        .header("Content-Type", "application/json")
        .body(tampered)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = app.client.post(app.url("/v1/billing/webhooks/stripe")).body(event.payload.clone()).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST, "no signature at all");
    // A well-signed event of a type Tollgate does not handle: recorded, 200.
    assert_eq!(deliver(&stripe, &event).await["outcome"], "ignored");
    // Signed but not an event.
    let junk = r#"{"hello":"world"}"#;
    let r = app
        .client
        .post(app.url("/v1/billing/webhooks/stripe"))
        .header("Stripe-Signature", signature_header(SECRET, junk, now))
        .body(junk)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    app.stop().await;
}

#[tokio::test]
async fn a_duplicate_delivered_at_the_same_moment_credits_once() {
    let (app, stripe) = start().await;
    let (token, _) = app.signed_in("twice@example.com").await;
    let r = app.post_auth("/v1/billing/checkout", &token, with(urls(), json!({ "credit_package": "pro" }))).await;
    let events = stripe.complete_checkout(r.body["session_id"].as_str().unwrap());
    let deliveries: Vec<_> = (0..8).map(|_| stripe.deliver(&events[0])).collect();
    let mut outcomes = Vec::new();
    for r in futures_util::future::join_all(deliveries).await {
        assert_eq!(r.status(), StatusCode::OK);
        let body: Value = r.json().await.unwrap();
        outcomes.push(body["outcome"].as_str().unwrap().to_owned());
    }
    assert_eq!(outcomes.iter().filter(|o| *o == "applied").count(), 1, "{outcomes:?}");
    assert_eq!(app.get_auth("/v1/me/credits", &token).await.body["balance"], 500);
    app.stop().await;
}

#[tokio::test]
async fn checkout_refuses_bad_requests_and_works_only_when_configured() {
    let (app, stripe) = start().await;
    let (token, _) = app.signed_in("picky@example.com").await;
    let cases = [
        (json!({}), "validation_failed"),
        (json!({ "plan": "pro", "credit_package": "starter" }), "validation_failed"),
        (json!({ "plan": "platinum" }), "unknown_plan"),
        (json!({ "plan": "free" }), "validation_failed"),
        (json!({ "credit_package": "mega" }), "unknown_credit_package"),
    ];
    for (extra, code) in cases {
        let r = app.post_auth("/v1/billing/checkout", &token, with(urls(), extra.clone())).await;
        assert_eq!((r.status, r.code()), (StatusCode::UNPROCESSABLE_ENTITY, code), "{extra}");
    }
    let bad_url =
        json!({ "credit_package": "starter", "success_url": "javascript:alert(1)", "cancel_url": "https://x.test" });
    let r = app.post_auth("/v1/billing/checkout", &token, bad_url).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    // Another user's (existing) account is not this user's to buy for.
    let (other, _) = app.signed_in("other@example.com").await;
    let other_account = app.get_auth("/v1/me", &other).await.body["user"]["account_id"].as_str().unwrap().to_owned();
    let body = with(urls(), json!({ "credit_package": "starter", "account": other_account }));
    let r = app.post_auth("/v1/billing/checkout", &token, body).await;
    assert_eq!((r.status, r.code()), (StatusCode::NOT_FOUND, "not_found"));
    assert!(stripe.requests().iter().all(|r| r.path != "/v1/checkout/sessions"), "nothing reached Stripe");
    let r = app.post_auth("/v1/billing/portal", &token, json!({ "return_url": "https://app.test/account" })).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert!(r.body["portal_url"].as_str().unwrap().starts_with("https://billing.stripe.com/"));
    let no_scope = app.service_key(&["accounts:read"]).await;
    let r = app
        .post_auth(
            "/v1/billing/checkout",
            &no_scope,
            with(urls(), json!({ "credit_package": "starter", "account": "ext:x" })),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    app.stop().await;

    let plain = TestApp::builder().example_plans("credits-api.toml").start().await;
    let (token, _) = plain.signed_in("nostripe@example.com").await;
    let r = plain.post_auth("/v1/billing/checkout", &token, with(urls(), json!({ "credit_package": "starter" }))).await;
    assert_eq!((r.status, r.code()), (StatusCode::SERVICE_UNAVAILABLE, "billing_not_configured"));
    let r = plain.post("/v1/billing/webhooks/stripe", json!({})).await;
    assert_eq!((r.status, r.code()), (StatusCode::SERVICE_UNAVAILABLE, "billing_not_configured"));
    plain.stop().await;
}

#[tokio::test]
async fn canceling_through_the_api_cancels_at_stripe_first() {
    let (app, stripe) = start().await;
    let key = app.service_key(&["accounts:write", "usage:read", "billing:write"]).await;
    app.post_auth("/v1/accounts", &key, json!({ "external_id": "acme" })).await;
    let r = app
        .post_auth("/v1/billing/checkout", &key, with(urls(), json!({ "account": "ext:acme", "plan": "pro" })))
        .await;
    for event in stripe.complete_checkout(r.body["session_id"].as_str().unwrap()) {
        deliver(&stripe, &event).await;
    }
    assert_eq!(plan(&app, &key).await.0, "pro");
    let r = app
        .request(reqwest::Method::DELETE, "/v1/accounts/ext:acme/subscription?at_period_end=true", Some(&key), None)
        .await;
    assert_eq!((r.status, r.code()), (StatusCode::UNPROCESSABLE_ENTITY, "billing_unsupported"));
    let r = app.request(reqwest::Method::DELETE, "/v1/accounts/ext:acme/subscription", Some(&key), None).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["plan"], "free");
    let deleted = stripe.requests().into_iter().filter(|r| r.method == "DELETE").collect::<Vec<_>>();
    assert_eq!(deleted.len(), 1, "Stripe was told");
    // Stripe's own `deleted` event arrives afterwards and changes nothing.
    for event in stripe.take_events() {
        deliver(&stripe, &event).await;
    }
    assert_eq!(plan(&app, &key).await, ("free".to_owned(), Some("canceled".to_owned())));
    app.stop().await;
}

#[tokio::test]
async fn an_unpaid_checkout_grants_nothing_and_a_late_refund_still_counts() {
    let (app, stripe) = start().await;
    let (token, _) = app.signed_in("async@example.com").await;
    let r = app.post_auth("/v1/billing/checkout", &token, with(urls(), json!({ "credit_package": "starter" }))).await;
    let session_id = r.body["session_id"].as_str().unwrap().to_owned();
    // Completed but not paid yet (a bank debit): nothing granted.
    let mut unpaid = stripe.checkout_session(&session_id).unwrap();
    unpaid["status"] = "complete".into();
    unpaid["payment_status"] = "unpaid".into();
    assert_eq!(deliver(&stripe, &stripe.event("checkout.session.completed", unpaid)).await["outcome"], "ignored");
    assert_eq!(app.get_auth("/v1/me/credits", &token).await.body["balance"], 0);
    // Paid; then refunded in two parts, the second delivered first.
    let events = stripe.complete_checkout(&session_id);
    let intent = stripe.checkout_session(&session_id).unwrap()["payment_intent"].as_str().unwrap().to_owned();
    let first = stripe.refund(&intent, 300);
    let second = stripe.refund(&intent, 450);
    assert_eq!(deliver(&stripe, &second).await["outcome"], "deferred", "its payment is not known yet");
    deliver(&stripe, &events[0]).await;
    assert_eq!(app.get_auth("/v1/me/credits", &token).await.body["balance"], 50, "750 of 1500 refunded: 50 back");
    assert_eq!(deliver(&stripe, &first).await["outcome"], "ignored", "an older total changes nothing");
    let payment = &app.get_auth("/v1/me/payments", &token).await.body["payments"][0];
    assert_eq!(
        (payment["status"].as_str(), payment["amount_refunded"].as_i64()),
        (Some("partially_refunded"), Some(750))
    );
    app.stop().await;
}

#[tokio::test]
async fn a_deletion_and_an_update_in_the_same_second_end_deleted() {
    let (app, stripe) = start().await;
    let key = app.service_key(&["accounts:write", "usage:read", "billing:write"]).await;
    app.post_auth("/v1/accounts", &key, json!({ "external_id": "acme" })).await;
    let r = app
        .post_auth("/v1/billing/checkout", &key, with(urls(), json!({ "account": "ext:acme", "plan": "pro" })))
        .await;
    let events = stripe.complete_checkout(r.body["session_id"].as_str().unwrap());
    for event in &events {
        deliver(&stripe, event).await;
    }
    let sub_id = events[0].json()["data"]["object"]["id"].as_str().unwrap().to_owned();
    let second = events.iter().map(|e| e.created).max().unwrap() + 5;
    stripe.set_clock(second);
    let deleted = stripe.delete_subscription(&sub_id);
    stripe.set_clock(deleted.created);
    let updated = stripe.update_subscription(&sub_id, json!({ "status": "active" }));
    assert_eq!(deleted.created, updated.created, "Stripe dates events to the second");
    assert_eq!(deliver(&stripe, &deleted).await["outcome"], "applied");
    assert_eq!(deliver(&stripe, &updated).await["outcome"], "ignored");
    assert_eq!(plan(&app, &key).await, ("free".to_owned(), Some("canceled".to_owned())));
    app.stop().await;
}

#[tokio::test]
async fn redirects_can_be_held_to_configured_origins() {
    let stripe = FakeStripe::start(SECRET).await;
    let app = TestApp::builder()
        .example_plans("credits-api.toml")
        .stripe(&stripe.url, SECRET)
        .redirect_origins(&["https://app.test"])
        .start()
        .await;
    let (token, _) = app.signed_in("origins@example.com").await;
    let ok = app.post_auth("/v1/billing/checkout", &token, with(urls(), json!({ "credit_package": "starter" }))).await;
    assert_eq!(ok.status, StatusCode::OK, "{:?}", ok.body);
    let elsewhere = json!({ "credit_package": "starter", "success_url": "https://evil.test/ok", "cancel_url": "https://app.test/c" });
    let r = app.post_auth("/v1/billing/checkout", &token, elsewhere).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(r.body["error"]["details"]["fields"]["success_url"]["code"], "origin_not_allowed");
    let r = app.post_auth("/v1/billing/portal", &token, json!({ "return_url": "https://app.test.evil.test/" })).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    app.stop().await;
}

#[tokio::test]
async fn events_may_name_the_account_by_external_id() {
    let (app, stripe) = start().await;
    let key = app.service_key(&["accounts:write", "credits:read"]).await;
    app.post_auth("/v1/accounts", &key, json!({ "external_id": "shop-7" })).await;
    let session = json!({
        "id": "cs_test_ext", "object": "checkout.session", "mode": "payment", "status": "complete",
        "payment_status": "paid", "payment_intent": "pi_ext", "amount_total": 6000, "currency": "usd",
        "metadata": { "account_id": "ext:shop-7", "credit_package": "pro" },
    });
    assert_eq!(deliver(&stripe, &stripe.event("checkout.session.completed", session)).await["outcome"], "applied");
    let r = app.get_auth("/v1/accounts/ext:shop-7/credits", &key).await;
    assert_eq!(r.body["balance"], 500, "the package's credits, from the catalog");
    let r = app.get_auth("/v1/accounts/ext:shop-7/payments", &key).await;
    assert_eq!(
        (r.body["payments"][0]["amount"].as_i64(), r.body["payments"][0]["currency"].as_str()),
        (Some(6000), Some("USD"))
    );
    app.stop().await;
}
