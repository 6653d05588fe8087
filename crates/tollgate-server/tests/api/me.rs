//! `/v1/me/*` (2FA is in `mfa`).

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::helpers::{PASSWORD, TestApp};

#[tokio::test]
async fn profile_can_be_read_and_updated() {
    let app = TestApp::new().await;
    let (access, _) = app.signed_in("ada@example.com").await;
    let r = app
        .request(Method::PATCH, "/v1/me", Some(&access), Some(json!({ "name": "Ada Lovelace", "locale": "FR" })))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["user"]["name"], "Ada Lovelace");
    assert_eq!(r.body["user"]["locale"], "fr");
    // Absent leaves, null clears.
    let r = app.request(Method::PATCH, "/v1/me", Some(&access), Some(json!({ "locale": "en" }))).await;
    assert_eq!(r.body["user"]["name"], "Ada Lovelace");
    let r = app.request(Method::PATCH, "/v1/me", Some(&access), Some(json!({ "name": null }))).await;
    assert!(r.body["user"]["name"].is_null());
    for (body, field) in [(json!({ "name": "x".repeat(201) }), "name"), (json!({ "locale": "klingon" }), "locale")] {
        let r = app.request(Method::PATCH, "/v1/me", Some(&access), Some(body)).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(r.body["error"]["details"]["fields"][field].is_object(), "{:?}", r.body);
    }
    let r = app.request(Method::PATCH, "/v1/me", Some(&access), Some(json!({ "email": "x@example.com" }))).await;
    assert_eq!((r.status, r.code()), (StatusCode::UNPROCESSABLE_ENTITY, "invalid_body"));
    app.stop().await;
}

#[tokio::test]
async fn changing_the_password_ends_other_sessions() {
    let app = TestApp::new().await;
    let (first, _) = app.signed_in("ada@example.com").await;
    let (second, _) = app.login("ada@example.com", PASSWORD).await;
    let r = app.post_auth("/v1/me/password", &second, json!({ "current": "wrong", "new": "a new passphrase" })).await;
    assert_eq!((r.status, r.code()), (StatusCode::UNAUTHORIZED, "invalid_credentials"));
    let r = app.post_auth("/v1/me/password", &second, json!({ "current": PASSWORD, "new": "qwerty123" })).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(r.body["error"]["details"]["fields"]["new"]["code"], "too_common");
    let r = app.post_auth("/v1/me/password", &second, json!({ "current": PASSWORD, "new": "a new passphrase" })).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{:?}", r.body);
    assert_eq!(app.get_auth("/v1/me", &first).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(app.get_auth("/v1/me", &second).await.status, StatusCode::OK);
    app.login("ada@example.com", "a new passphrase").await;
    app.stop().await;
}

#[tokio::test]
async fn changing_the_email_waits_for_confirmation() {
    let app = TestApp::new().await;
    let (access, _) = app.signed_in("ada@example.com").await;
    app.verified_user("taken@example.com").await;
    let r = app.post_auth("/v1/me/email", &access, json!({ "email": "taken@example.com", "password": PASSWORD })).await;
    assert_eq!((r.status, r.code()), (StatusCode::CONFLICT, "email_taken"));
    let r = app.post_auth("/v1/me/email", &access, json!({ "email": "new@example.com", "password": "wrong" })).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = app.post_auth("/v1/me/email", &access, json!({ "email": "nope", "password": PASSWORD })).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    let r = app.post_auth("/v1/me/email", &access, json!({ "email": "New@Example.com", "password": PASSWORD })).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    // Nothing changes until the new address confirms.
    assert_eq!(app.get_auth("/v1/me", &access).await.body["user"]["email"], "ada@example.com");
    let mail = app.mail.wait_for("new@example.com", 1).await;
    assert!(mail.data.contains("Confirm your new email address"));
    let r = app.post("/v1/auth/verify-email", json!({ "token": mail.token("verify-email") })).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["user"]["email"], "new@example.com");
    app.login("new@example.com", PASSWORD).await;
    app.stop().await;
}

#[tokio::test]
async fn sessions_are_listed_and_revoked_only_by_their_owner() {
    let app = TestApp::new().await;
    let (first, _) = app.signed_in("ada@example.com").await;
    let (second, _) = app.login("ada@example.com", PASSWORD).await;
    let (third, _) = app.login("ada@example.com", PASSWORD).await;
    let (bob, _) = app.signed_in("bob@example.com").await;
    let r = app.get_auth("/v1/me/sessions", &first).await;
    let sessions = r.body["sessions"].as_array().unwrap().clone();
    assert_eq!(sessions.len(), 3);
    assert_eq!(sessions.iter().filter(|s| s["current"] == true).count(), 1);
    assert_eq!(sessions[0]["user_agent"], "tollgate-tests");
    let first_id = sessions.iter().find(|s| s["current"] == true).unwrap()["id"].as_str().unwrap().to_owned();
    // Bob cannot see or end Ada's sessions: 404, not 403.
    let r = app.request(Method::DELETE, &format!("/v1/me/sessions/{first_id}"), Some(&bob), None).await;
    assert_eq!((r.status, r.code()), (StatusCode::NOT_FOUND, "not_found"));
    assert_eq!(app.get_auth("/v1/me", &first).await.status, StatusCode::OK);
    // Ada ends the first from the second.
    let r = app.request(Method::DELETE, &format!("/v1/me/sessions/{first_id}"), Some(&second), None).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(app.get_auth("/v1/me", &first).await.status, StatusCode::UNAUTHORIZED);
    let r = app.request(Method::DELETE, "/v1/me/sessions", Some(&second), None).await;
    assert_eq!(r.body["revoked"], 1);
    assert_eq!(app.get_auth("/v1/me", &third).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(app.get_auth("/v1/me", &second).await.status, StatusCode::OK);
    assert_eq!(app.get_auth("/v1/me", &bob).await.status, StatusCode::OK);
    let r = app.request(Method::DELETE, "/v1/me/sessions/not-a-uuid", Some(&second), None).await;
    assert!(r.status.is_client_error());
    app.stop().await;
}
