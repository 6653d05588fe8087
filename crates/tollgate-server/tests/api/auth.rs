//! `/v1/auth/*`.

use reqwest::{Method, StatusCode};
use serde_json::json;
use tollgate_core::audit::AuditQuery;

use crate::helpers::{PASSWORD, TestApp};

#[tokio::test]
async fn register_normalises_email_and_sends_a_localised_verification() {
    let app = TestApp::new().await;
    let r = app
        .post(
            "/v1/auth/register",
            json!({ "email": "  Ada@Example.COM ", "password": PASSWORD, "name": "Ada", "locale": "fr" }),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let user = &r.body["user"];
    assert_eq!(user["email"], "ada@example.com");
    assert_eq!(user["email_verified"], false);
    assert_eq!(user["locale"], "fr");
    assert!(user["account_id"].is_string());
    assert!(user.get("password_hash").is_none());
    let mail = app.mail.wait_for("ada@example.com", 1).await;
    assert!(mail.data.contains("Confirmez votre adresse"), "French template: {}", mail.data);
    assert!(mail.data.contains("http://tollgate.test/verify-email?token="));
    // Same address in another case: conflict.
    let r = app.post("/v1/auth/register", json!({ "email": "ADA@example.com", "password": PASSWORD })).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert_eq!(r.code(), "email_taken");
    app.stop().await;
}

#[tokio::test]
async fn register_rejects_bad_input_without_writing_anything() {
    let app = TestApp::new().await;
    let cases = [
        (json!({ "email": "ada@example.com" }), "password"),
        (json!({ "email": "ada@example.com", "password": PASSWORD, "admin": true }), "admin"),
        (json!({ "email": "ada@example.com", "password": 12345678 }), "password"),
    ];
    for (body, field) in cases {
        let r = app.post("/v1/auth/register", body.clone()).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(r.code(), "invalid_body");
        assert!(r.body["error"]["details"]["fields"][field].is_string(), "{:?}", r.body);
    }
    let validation = [
        (json!({ "email": "not-an-email", "password": PASSWORD }), "email", "invalid_email"),
        (json!({ "email": format!("{}@example.com", "a".repeat(300)), "password": PASSWORD }), "email", "too_long"),
        (json!({ "email": "ada@example.com", "password": "short" }), "password", "too_short"),
        (json!({ "email": "ada@example.com", "password": "x".repeat(129) }), "password", "too_long"),
        (json!({ "email": "ada@example.com", "password": "password1" }), "password", "too_common"),
        (json!({ "email": "ada@example.com", "password": PASSWORD, "name": "n".repeat(201) }), "name", "too_long"),
        (json!({ "email": "ada@example.com", "password": PASSWORD, "locale": "de" }), "locale", "unsupported"),
    ];
    for (body, field, code) in validation {
        let r = app.post("/v1/auth/register", body.clone()).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(r.code(), "validation_failed");
        assert_eq!(r.body["error"]["details"]["fields"][field]["code"], code, "{:?}", r.body);
    }
    // Not JSON, wrong content type, too large.
    let res = app
        .client
        .post(app.url("/v1/auth/register"))
        .header("content-type", "application/json")
        .body("{\"email\":")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "malformed_json");
    let res = app.client.post(app.url("/v1/auth/register")).body("email=a").send().await.unwrap();
    assert_eq!(res.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let huge = json!({ "email": "ada@example.com", "password": PASSWORD, "name": "x".repeat(1_100_000) });
    let r = app.post("/v1/auth/register", huge).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.code(), "payload_too_large");
    // Nothing was half-written: the address is still free.
    let r = app.post("/v1/auth/register", json!({ "email": "ada@example.com", "password": PASSWORD })).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    app.stop().await;
}

#[tokio::test]
async fn login_needs_a_verified_email_then_succeeds() {
    let app = TestApp::new().await;
    app.post("/v1/auth/register", json!({ "email": "ada@example.com", "password": PASSWORD })).await;
    let r = app.post("/v1/auth/login", json!({ "email": "ada@example.com", "password": PASSWORD })).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.code(), "email_not_verified");
    let mail = app.mail.wait_for("ada@example.com", 1).await;
    let token = mail.token("verify-email");
    let r = app.post("/v1/auth/verify-email", json!({ "token": token })).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["user"]["email_verified"], true);
    // A verification link works once; a forged one never.
    let r = app.post("/v1/auth/verify-email", json!({ "token": token })).await;
    assert_eq!((r.status, r.code()), (StatusCode::BAD_REQUEST, "invalid_token"));
    let r = app.post("/v1/auth/verify-email", json!({ "token": "forged" })).await;
    assert_eq!((r.status, r.code()), (StatusCode::BAD_REQUEST, "invalid_token"));

    let r = app.post("/v1/auth/login", json!({ "email": "ADA@example.com", "password": PASSWORD })).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["mfa_required"], false);
    assert_eq!(r.body["token_type"], "Bearer");
    assert_eq!(r.body["expires_in"], 900);
    let access = r.body["access_token"].as_str().unwrap();
    let me = app.get_auth("/v1/me", access).await;
    assert_eq!(me.body["user"]["email"], "ada@example.com");
    assert!(me.body["user"]["last_login_at"].is_string());
    app.stop().await;
}

#[tokio::test]
async fn wrong_password_and_unknown_email_look_the_same_and_are_recorded() {
    let app = TestApp::new().await;
    app.verified_user("ada@example.com").await;
    let wrong = app.post("/v1/auth/login", json!({ "email": "ada@example.com", "password": "not the password" })).await;
    let unknown =
        app.post("/v1/auth/login", json!({ "email": "nobody@example.com", "password": "not the password" })).await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert_eq!(wrong.status, unknown.status);
    assert_eq!(wrong.body, unknown.body);
    let store = &app.running.as_ref().unwrap().state.store;
    let failures = store
        .list_audit(AuditQuery { action_prefix: Some("login.failed".into()), limit: 10, ..Default::default() })
        .await
        .unwrap();
    assert_eq!(failures.len(), 2);
    assert!(failures.iter().all(|e| e.ip.as_deref() == Some("127.0.0.1")));
    assert!(failures.iter().all(|e| e.metadata["method"] == "password"));
    app.stop().await;
}

#[tokio::test]
async fn failed_logins_are_limited_per_email() {
    let app = TestApp::builder().failed_login_limit(3, 3600).start().await;
    app.verified_user("ada@example.com").await;
    for _ in 0..3 {
        let r = app.post("/v1/auth/login", json!({ "email": "ada@example.com", "password": "wrong password" })).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    }
    // Now even the right password is refused for a while...
    let r = app.post("/v1/auth/login", json!({ "email": "Ada@example.com", "password": PASSWORD })).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.code(), "rate_limited");
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry > 0 && retry <= 1200, "{retry}");
    // ...and unknown addresses are limited the same way (no enumeration).
    for _ in 0..3 {
        app.post("/v1/auth/login", json!({ "email": "ghost@example.com", "password": "wrong password" })).await;
    }
    let r = app.post("/v1/auth/login", json!({ "email": "ghost@example.com", "password": "wrong password" })).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    app.stop().await;
}

#[tokio::test]
async fn auth_group_is_limited_per_ip_with_headers() {
    let app = TestApp::builder().ip_limit(5, 60).start().await;
    for i in 0..5 {
        let r = app.post("/v1/auth/password/forgot", json!({ "email": "x@example.com" })).await;
        assert_eq!(r.status, StatusCode::ACCEPTED);
        assert_eq!(r.headers["ratelimit-limit"], "5");
        assert_eq!(r.headers["ratelimit-remaining"].to_str().unwrap(), (4 - i).to_string());
    }
    let r = app.post("/v1/auth/login", json!({ "email": "x@example.com", "password": "whatever1" })).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(r.headers.contains_key("retry-after"));
    assert_eq!(r.headers["ratelimit-remaining"], "0");
    // Other groups are not affected.
    let r = app.request(Method::GET, "/healthz", None, None).await;
    assert_eq!(r.status, StatusCode::OK);
    app.stop().await;
}

#[tokio::test]
async fn refresh_rotates_and_a_replayed_token_kills_the_session() {
    let app = TestApp::new().await;
    let (access, refresh) = app.signed_in("ada@example.com").await;
    let r = app.post("/v1/auth/refresh", json!({ "refresh_token": refresh })).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let new_refresh = r.body["refresh_token"].as_str().unwrap().to_owned();
    let new_access = r.body["access_token"].as_str().unwrap().to_owned();
    assert_ne!(new_refresh, refresh);
    assert_eq!(app.get_auth("/v1/me", &new_access).await.status, StatusCode::OK);
    // Replay of the rotated token: the whole session dies.
    let r = app.post("/v1/auth/refresh", json!({ "refresh_token": refresh })).await;
    assert_eq!((r.status, r.code()), (StatusCode::UNAUTHORIZED, "refresh_token_reused"));
    let r = app.post("/v1/auth/refresh", json!({ "refresh_token": new_refresh })).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    for token in [&access, &new_access] {
        let r = app.get_auth("/v1/me", token).await;
        assert_eq!((r.status, r.code()), (StatusCode::UNAUTHORIZED, "unauthenticated"));
    }
    let r = app.post("/v1/auth/refresh", json!({ "refresh_token": "garbage" })).await;
    assert_eq!((r.status, r.code()), (StatusCode::UNAUTHORIZED, "invalid_refresh_token"));
    app.stop().await;
}

#[tokio::test]
async fn logout_ends_the_session() {
    let app = TestApp::new().await;
    let (access, refresh) = app.signed_in("ada@example.com").await;
    let r = app.request(Method::POST, "/v1/auth/logout", Some(&access), None).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(app.get_auth("/v1/me", &access).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        app.post("/v1/auth/refresh", json!({ "refresh_token": refresh })).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(app.request(Method::POST, "/v1/auth/logout", None, None).await.status, StatusCode::UNAUTHORIZED);
    app.stop().await;
}

#[tokio::test]
async fn password_reset_is_single_use_and_ends_every_session() {
    let app = TestApp::new().await;
    let (access, _) = app.signed_in("ada@example.com").await;
    let r = app.post("/v1/auth/password/forgot", json!({ "email": "ADA@example.com" })).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    // Unknown addresses get the same answer and no email.
    let r = app.post("/v1/auth/password/forgot", json!({ "email": "nobody@example.com" })).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let mail = app.mail.wait_for("ada@example.com", 2).await;
    assert!(mail.data.contains("Reset your password"));
    let token = mail.token("reset-password");
    let r = app.post("/v1/auth/password/reset", json!({ "token": token, "password": "password123" })).await;
    assert_eq!((r.status, r.code()), (StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"));
    let r = app.post("/v1/auth/password/reset", json!({ "token": token, "password": "a brand new passphrase" })).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let r = app.post("/v1/auth/password/reset", json!({ "token": token, "password": "another new passphrase" })).await;
    assert_eq!((r.status, r.code()), (StatusCode::BAD_REQUEST, "invalid_token"));
    assert_eq!(app.get_auth("/v1/me", &access).await.status, StatusCode::UNAUTHORIZED);
    let r = app.post("/v1/auth/login", json!({ "email": "ada@example.com", "password": PASSWORD })).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    app.login("ada@example.com", "a brand new passphrase").await;
    assert_eq!(app.mail.count_to("nobody@example.com"), 0);
    app.stop().await;
}

#[tokio::test]
async fn magic_link_signs_in_once() {
    let app = TestApp::new().await;
    app.verified_user("ada@example.com").await;
    let r = app.post("/v1/auth/magic-link", json!({ "email": "ada@example.com" })).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let mail = app.mail.wait_for("ada@example.com", 2).await;
    let token = mail.token("magic-link");
    let r = app.post("/v1/auth/magic-link/verify", json!({ "token": token })).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let access = r.body["access_token"].as_str().unwrap();
    assert_eq!(app.get_auth("/v1/me", access).await.status, StatusCode::OK);
    let r = app.post("/v1/auth/magic-link/verify", json!({ "token": token })).await;
    assert_eq!((r.status, r.code()), (StatusCode::BAD_REQUEST, "invalid_token"));
    app.stop().await;
}

#[tokio::test]
async fn forged_and_foreign_access_tokens_are_refused() {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use jsonwebtoken::{Algorithm, EncodingKey, Header};

    let app = TestApp::new().await;
    let (access, _) = app.signed_in("ada@example.com").await;
    let state = &app.running.as_ref().unwrap().state;
    let claims = state.tokens.verify(&access).unwrap();
    let jwks = app.request(Method::GET, "/.well-known/jwks.json", None, None).await.body;
    let key = &jwks["keys"][0];

    let mut attempts: Vec<(&str, String)> = Vec::new();
    // alg: none with the real claims.
    let payload = access.split('.').nth(1).unwrap();
    attempts.push(("alg none", format!("{}.{payload}.", URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#))));
    // HS256 keyed with the published public key.
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(key["kid"].as_str().unwrap().to_owned());
    let hs = jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(key["x"].as_str().unwrap().as_bytes()))
        .unwrap();
    attempts.push(("hs256 with public key", hs));
    // Same key, another issuer.
    let foreign = tollgate_server::access_token::AccessTokens::load_or_create(
        &app.config.signing_key_file,
        "https://evil.test",
        std::time::Duration::from_secs(900),
    )
    .unwrap();
    let (session, user) = state.store.session_with_user(claims.session_id().unwrap()).await.unwrap().unwrap();
    attempts.push(("other issuer", foreign.issue(&user, &session).unwrap()));
    // Expired.
    attempts.push((
        "expired",
        state.tokens.issue_at(&user, &session, time::OffsetDateTime::now_utc() - time::Duration::hours(2)).unwrap(),
    ));
    // Tampered payload.
    let mut parts: Vec<&str> = access.split('.').collect();
    let evil = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&serde_json::json!({"sub": "x", "role": "admin"})).unwrap());
    parts[1] = &evil;
    attempts.push(("tampered", parts.join(".")));
    attempts.push(("garbage", "abc".into()));
    for (what, token) in attempts {
        let r = app.get_auth("/v1/me", &token).await;
        assert_eq!((r.status, r.code()), (StatusCode::UNAUTHORIZED, "unauthenticated"), "{what}");
    }
    let r = app.request(Method::GET, "/v1/me", None, None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    app.stop().await;
}

#[tokio::test]
async fn parallel_guesses_cannot_outrun_the_budget() {
    let app = TestApp::builder().failed_login_limit(10, 3600).start().await;
    app.verified_user("ada@example.com").await;
    let mut tasks = Vec::new();
    for i in 0..40 {
        let client = app.client.clone();
        let url = app.url("/v1/auth/login");
        tasks.push(tokio::spawn(async move {
            let body = json!({ "email": "ada@example.com", "password": format!("guess number {i}") });
            client.post(url).json(&body).send().await.unwrap().status()
        }));
    }
    let mut checked = 0;
    for t in tasks {
        match t.await.unwrap() {
            StatusCode::UNAUTHORIZED => checked += 1,
            StatusCode::TOO_MANY_REQUESTS => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(checked, 10, "exactly the budget was checked");
    app.stop().await;
}

#[tokio::test]
async fn a_stolen_token_cannot_guess_the_password_without_limit() {
    let app = TestApp::builder().failed_login_limit(3, 3600).start().await;
    let (access, _) = app.signed_in("ada@example.com").await;
    for _ in 0..3 {
        let r = app
            .post_auth("/v1/me/password", &access, json!({ "current": "a guess", "new": "another passphrase" }))
            .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    }
    let r =
        app.post_auth("/v1/me/password", &access, json!({ "current": PASSWORD, "new": "another passphrase" })).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "the same budget as login");
    let r = app.post("/v1/auth/login", json!({ "email": "ada@example.com", "password": PASSWORD })).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    app.stop().await;
}

#[tokio::test]
async fn a_mailbox_cannot_be_flooded() {
    let app = TestApp::builder().email_limit(2, 3600).start().await;
    app.verified_user("ada@example.com").await;
    for _ in 0..4 {
        let r = app.post("/v1/auth/password/forgot", json!({ "email": "ada@example.com" })).await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "the answer never changes");
    }
    app.mail.wait_for("ada@example.com", 3).await;
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(app.mail.count_to("ada@example.com"), 3, "verification + 2 resets, not 5 emails");
    app.stop().await;
}

#[tokio::test]
async fn a_squatter_loses_the_account_when_the_owner_proves_the_mailbox() {
    let app = TestApp::new().await;
    // Someone registers Ada's address with their own password; it is never verified.
    app.post("/v1/auth/register", json!({ "email": "ada@example.com", "password": "squatter password" })).await;
    // Ada signs in with a magic link sent to her mailbox.
    app.post("/v1/auth/magic-link", json!({ "email": "ada@example.com" })).await;
    let mail = app.mail.wait_for("ada@example.com", 2).await;
    let r = app.post("/v1/auth/magic-link/verify", json!({ "token": mail.token("magic-link") })).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    // The squatter's password no longer opens the account.
    let r = app.post("/v1/auth/login", json!({ "email": "ada@example.com", "password": "squatter password" })).await;
    assert_eq!((r.status, r.code()), (StatusCode::UNAUTHORIZED, "invalid_credentials"));
    app.stop().await;
}
