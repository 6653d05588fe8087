//! `/v1/me/2fa/*` and the second step of login.

use reqwest::StatusCode;
use serde_json::json;
use time::OffsetDateTime;
use tollgate_core::identity::mfa::totp_code_at;

use crate::helpers::{PASSWORD, TestApp};

fn code(secret: &str, offset_steps: i64) -> String {
    let t = OffsetDateTime::now_utc().unix_timestamp() + offset_steps * 30;
    totp_code_at(secret, t as u64).unwrap()
}

async fn mfa_token(app: &TestApp) -> String {
    let r = app.post("/v1/auth/login", json!({ "email": "ada@example.com", "password": PASSWORD })).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["mfa_required"], true);
    assert!(r.body.get("access_token").is_none());
    r.body["mfa_token"].as_str().unwrap().to_owned()
}

async fn r_secret(app: &TestApp, access: &str) -> String {
    let r = app.request(reqwest::Method::POST, "/v1/me/2fa/setup", Some(access), None).await;
    r.body["secret"].as_str().unwrap().to_owned()
}

/// Turns 2FA on for a signed-in user; returns (secret, the code that enabled it,
/// recovery codes).
async fn enable(app: &TestApp, access: &str) -> (String, String, Vec<String>) {
    let r = app.request(reqwest::Method::POST, "/v1/me/2fa/setup", Some(access), None).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let secret = r.body["secret"].as_str().unwrap().to_owned();
    let c0 = code(&secret, 0);
    let r = app.post_auth("/v1/me/2fa/enable", access, json!({ "password": PASSWORD, "code": c0 })).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let recovery: Vec<String> = serde_json::from_value(r.body["recovery_codes"].clone()).unwrap();
    (secret, c0, recovery)
}

#[tokio::test]
async fn totp_enrolment_login_replay_and_recovery_codes() {
    let app = TestApp::new().await;
    let (access, _) = app.signed_in("ada@example.com").await;
    let r = app.post_auth("/v1/me/2fa/enable", &access, json!({ "password": PASSWORD, "code": "123456" })).await;
    assert_eq!((r.status, r.code()), (StatusCode::CONFLICT, "mfa_not_set_up"));
    let r = app.request(reqwest::Method::POST, "/v1/me/2fa/setup", Some(&access), None).await;
    assert!(r.body["otpauth_uri"].as_str().unwrap().starts_with("otpauth://totp/"));
    assert!(r.body["qr_svg"].as_str().unwrap().starts_with("<svg"));
    let r = app.post_auth("/v1/me/2fa/enable", &access, json!({ "password": PASSWORD, "code": "000000" })).await;
    assert_eq!((r.status, r.code()), (StatusCode::UNAUTHORIZED, "invalid_mfa_code"));
    // A stolen access token alone cannot turn 2FA on.
    let secret = r_secret(&app, &access).await;
    let r =
        app.post_auth("/v1/me/2fa/enable", &access, json!({ "password": "not it", "code": code(&secret, 0) })).await;
    assert_eq!((r.status, r.code()), (StatusCode::UNAUTHORIZED, "invalid_credentials"));
    let (secret, c0, recovery) = enable(&app, &access).await;
    assert_eq!(recovery.len(), 10);
    assert_eq!(app.get_auth("/v1/me", &access).await.body["user"]["mfa_enabled"], true);
    let r = app.request(reqwest::Method::POST, "/v1/me/2fa/setup", Some(&access), None).await;
    assert_eq!((r.status, r.code()), (StatusCode::CONFLICT, "mfa_already_enabled"));

    // Password alone is not enough now.
    let token = mfa_token(&app).await;
    let r = app.post("/v1/auth/login/mfa", json!({ "mfa_token": token, "code": "000000" })).await;
    assert_eq!((r.status, r.code()), (StatusCode::UNAUTHORIZED, "invalid_mfa_code"));
    // The code that enabled 2FA was used: replaying it fails.
    let r = app.post("/v1/auth/login/mfa", json!({ "mfa_token": token, "code": c0 })).await;
    assert_eq!((r.status, r.code()), (StatusCode::UNAUTHORIZED, "invalid_mfa_code"), "a code is accepted once");

    // Recovery codes: single use, any case.
    let r = app
        .post("/v1/auth/login/mfa", json!({ "mfa_token": token, "recovery_code": recovery[0].to_uppercase() }))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let token = mfa_token(&app).await;
    let r = app.post("/v1/auth/login/mfa", json!({ "mfa_token": token, "recovery_code": recovery[0] })).await;
    assert_eq!((r.status, r.code()), (StatusCode::UNAUTHORIZED, "invalid_mfa_code"));
    let r = app.post("/v1/auth/login/mfa", json!({ "mfa_token": token })).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    let r = app.post("/v1/auth/login/mfa", json!({ "mfa_token": "forged", "code": "123456" })).await;
    assert_eq!((r.status, r.code()), (StatusCode::UNAUTHORIZED, "invalid_mfa_token"));

    // Regenerating (with the password) replaces the codes.
    let r = app.post_auth("/v1/me/2fa/recovery-codes", &access, json!({ "password": "wrong" })).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = app.post_auth("/v1/me/2fa/recovery-codes", &access, json!({ "password": PASSWORD })).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let fresh: Vec<String> = serde_json::from_value(r.body["recovery_codes"].clone()).unwrap();
    let r = app.post("/v1/auth/login/mfa", json!({ "mfa_token": token, "recovery_code": recovery[1] })).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "old codes stop working");
    let r = app.post("/v1/auth/login/mfa", json!({ "mfa_token": token, "recovery_code": fresh[0] })).await;
    assert_eq!(r.status, StatusCode::OK);

    // A TOTP code of the next step signs in once; the spent mfa_token is dead.
    let token = mfa_token(&app).await;
    let c1 = code(&secret, 1);
    let r = app.post("/v1/auth/login/mfa", json!({ "mfa_token": token, "code": c1 })).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert!(app.get_auth("/v1/me", r.body["access_token"].as_str().unwrap()).await.status.is_success());
    let r = app.post("/v1/auth/login/mfa", json!({ "mfa_token": token, "code": c1 })).await;
    assert_eq!((r.status, r.code()), (StatusCode::UNAUTHORIZED, "invalid_mfa_token"));
    let token = mfa_token(&app).await;
    let r = app.post("/v1/auth/login/mfa", json!({ "mfa_token": token, "code": c1 })).await;
    assert_eq!((r.status, r.code()), (StatusCode::UNAUTHORIZED, "invalid_mfa_code"), "replayed code");

    // Disabling needs the password and an unused code.
    let r = app.post_auth("/v1/me/2fa/disable", &access, json!({ "password": PASSWORD, "code": c1 })).await;
    assert_eq!((r.status, r.code()), (StatusCode::UNAUTHORIZED, "invalid_mfa_code"));
    app.stop().await;
}

#[tokio::test]
async fn disabling_two_factor() {
    let app = TestApp::new().await;
    let (access, _) = app.signed_in("ada@example.com").await;
    let r = app.post_auth("/v1/me/2fa/disable", &access, json!({ "password": PASSWORD, "code": "123456" })).await;
    assert_eq!((r.status, r.code()), (StatusCode::CONFLICT, "mfa_not_enabled"));
    let (secret, _, _) = enable(&app, &access).await;
    let c1 = code(&secret, 1);
    let r = app.post_auth("/v1/me/2fa/disable", &access, json!({ "password": "wrong", "code": c1 })).await;
    assert_eq!((r.status, r.code()), (StatusCode::UNAUTHORIZED, "invalid_credentials"));
    let r = app.post_auth("/v1/me/2fa/disable", &access, json!({ "password": PASSWORD, "code": c1 })).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{:?}", r.body);
    let r = app.post("/v1/auth/login", json!({ "email": "ada@example.com", "password": PASSWORD })).await;
    assert_eq!(r.body["mfa_required"], false);
    app.stop().await;
}

#[tokio::test]
async fn wrong_codes_are_rate_limited_per_user() {
    let app = TestApp::builder().failed_login_limit(3, 3600).start().await;
    let (access, _) = app.signed_in("ada@example.com").await;
    let (secret, _, _) = enable(&app, &access).await;
    for _ in 0..3 {
        let token = mfa_token(&app).await;
        let r = app.post("/v1/auth/login/mfa", json!({ "mfa_token": token, "code": "000000" })).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    }
    let token = mfa_token(&app).await;
    let r = app.post("/v1/auth/login/mfa", json!({ "mfa_token": token, "code": code(&secret, 1) })).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "a fresh mfa_token does not reset the count");
    app.stop().await;
}
