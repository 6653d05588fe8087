//! `/v1/me/api-keys`: created once-visible, listed without secrets, scoped by method,
//! refused for security changes and the admin API, dead at once when revoked or when
//! the user is suspended.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::helpers::TestApp;

async fn api_keys_act_as_their_user_within_scope(app: &TestApp) {
    let (access, _) = app.signed_in("ada@example.com").await;
    let r = app.post_auth("/v1/me/api-keys", &access, json!({ "name": "ci", "scopes": ["read", "write"] })).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let key = r.body["key"].as_str().unwrap().to_owned();
    let id = r.body["api_key"]["id"].as_str().unwrap().to_owned();
    assert!(key.starts_with("tg_live_") && key.len() == 51, "{key}");
    assert!(key.starts_with(r.body["api_key"]["prefix"].as_str().unwrap()));
    let r = app.post_auth("/v1/me/api-keys", &access, json!({ "name": "reader", "scopes": ["read"] })).await;
    let reader = r.body["key"].as_str().unwrap().to_owned();

    // Listed without secrets, newest first.
    let r = app.get_auth("/v1/me/api-keys", &access).await;
    let list = r.body["api_keys"].as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert!(!r.body.to_string().contains(&key[8..]), "no secret in the list");

    // The key is its user wherever a token would be...
    let me = app.get_auth("/v1/me", &key).await;
    assert_eq!((me.status, &me.body["user"]["email"]), (StatusCode::OK, &json!("ada@example.com")));
    assert_eq!(app.get_auth("/v1/me/entitlements", &key).await.status, StatusCode::OK);
    let r = app.request(Method::PATCH, "/v1/me", Some(&key), Some(json!({ "name": "Ada" }))).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    // ...within its scopes...
    assert_eq!(app.get_auth("/v1/me", &reader).await.status, StatusCode::OK);
    let r = app.request(Method::PATCH, "/v1/me", Some(&reader), Some(json!({ "name": "x" }))).await;
    assert_eq!((r.status, r.code()), (StatusCode::FORBIDDEN, "insufficient_scope"));
    // ...but never for security changes, sessions, other keys, or as an admin.
    let refused = [
        (Method::POST, "/v1/me/password", json!({ "current": "x", "new": "y" })),
        (Method::POST, "/v1/me/email", json!({ "email": "new@example.com", "password": "x" })),
        (Method::POST, "/v1/me/2fa/setup", json!({})),
        (Method::POST, "/v1/me/api-keys", json!({ "name": "more", "scopes": ["read"] })),
        (Method::DELETE, "/v1/me/sessions", json!({})),
        (Method::POST, "/v1/auth/logout", json!({})),
    ];
    for (method, path, body) in refused {
        let r = app.request(method, path, Some(&key), Some(body)).await;
        assert_eq!((r.status, r.code()), (StatusCode::FORBIDDEN, "api_key_forbidden"), "{path}: {:?}", r.body);
    }
    assert_eq!(app.get_auth("/v1/me/api-keys", &key).await.status, StatusCode::OK, "reading keys is fine");

    // Bad input.
    for bad in [
        json!({ "name": "", "scopes": ["read"] }),
        json!({ "name": "x", "scopes": [] }),
        json!({ "name": "x", "scopes": ["admin"] }),
        json!({ "name": "x", "scopes": ["read"], "expires_at": "2001-01-01T00:00:00Z" }),
    ] {
        let r = app.post_auth("/v1/me/api-keys", &access, bad.clone()).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {:?}", r.body);
    }
    assert_eq!(
        app.get_auth("/v1/me", "tg_live_0000000000000000000000000000000000000000000").await.status,
        StatusCode::UNAUTHORIZED
    );

    // Another user cannot see or revoke it (404, not 403).
    let (bob, _) = app.signed_in("bob@example.com").await;
    let r = app.request(Method::DELETE, &format!("/v1/me/api-keys/{id}"), Some(&bob), None).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(app.get_auth("/v1/me/api-keys", &bob).await.body["api_keys"].as_array().unwrap().is_empty());

    // Revoked: refused from the next request on.
    let r = app.request(Method::DELETE, &format!("/v1/me/api-keys/{id}"), Some(&access), None).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(app.get_auth("/v1/me", &key).await.status, StatusCode::UNAUTHORIZED);
    let r = app.request(Method::DELETE, &format!("/v1/me/api-keys/{id}"), Some(&access), None).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "revoked once");

    // Suspension stops the other key at once, and it works again after activation.
    let admin = app.service_key(&["admin:*"]).await;
    let user_id = me.body["user"]["id"].as_str().unwrap();
    let path = format!("/v1/admin/users/{user_id}");
    let r = app.request(Method::PATCH, &path, Some(&admin), Some(json!({ "status": "suspended" }))).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(app.get_auth("/v1/me", &reader).await.status, StatusCode::UNAUTHORIZED);
    app.request(Method::PATCH, &path, Some(&admin), Some(json!({ "status": "active" }))).await;
    assert_eq!(app.get_auth("/v1/me", &reader).await.status, StatusCode::OK);
    // The admin detail lists the live key by prefix; the audit log has both events.
    let detail = app.get_auth(&path, &admin).await;
    assert_eq!(detail.body["api_keys"].as_array().unwrap().len(), 1);
    let r = app.get_auth(&format!("/v1/admin/audit-log?target=user:{user_id}&limit=200"), &admin).await;
    let actions: Vec<&str> =
        r.body["events"].as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(actions.iter().filter(|a| **a == "api_key.created").count(), 2);
    assert_eq!(actions.iter().filter(|a| **a == "api_key.revoked").count(), 1);
}

#[tokio::test]
async fn api_keys_act_as_their_user_within_scope_on_sqlite() {
    let app = TestApp::new().await;
    api_keys_act_as_their_user_within_scope(&app).await;
    app.stop().await;
}

#[tokio::test]
async fn api_keys_act_as_their_user_within_scope_on_postgres() {
    let Some(database) = tollgate_store_postgres::testing::TestDatabase::create().await else { return };
    let app = TestApp::builder().database_url(database.url.clone()).start().await;
    api_keys_act_as_their_user_within_scope(&app).await;
    app.stop().await;
    database.drop().await;
}

#[tokio::test]
async fn admin_users_api_keys_are_not_admin_and_impersonators_cannot_mint_keys() {
    let app = TestApp::new().await;
    let service = app.service_key(&["admin:*"]).await;
    let (root, _) = app.signed_in("root@example.com").await;
    let root_id = app.get_auth("/v1/me", &root).await.body["user"]["id"].as_str().unwrap().to_owned();
    app.request(Method::PATCH, &format!("/v1/admin/users/{root_id}"), Some(&service), Some(json!({ "role": "admin" })))
        .await;
    let r = app.post_auth("/v1/me/api-keys", &root, json!({ "name": "root", "scopes": ["read", "write"] })).await;
    let key = r.body["key"].as_str().unwrap().to_owned();
    assert_eq!(app.get_auth("/v1/admin/users", &root).await.status, StatusCode::OK);
    let r = app.get_auth("/v1/admin/users", &key).await;
    assert_eq!((r.status, r.code()), (StatusCode::FORBIDDEN, "api_key_forbidden"));

    let (ada, _) = app.signed_in("ada@example.com").await;
    let ada_id = app.get_auth("/v1/me", &ada).await.body["user"]["id"].as_str().unwrap().to_owned();
    let r = app.post_auth(&format!("/v1/admin/users/{ada_id}/impersonate"), &root, json!({})).await;
    let token = r.body["access_token"].as_str().unwrap().to_owned();
    let r = app.post_auth("/v1/me/api-keys", &token, json!({ "name": "backdoor", "scopes": ["read"] })).await;
    assert_eq!((r.status, r.code()), (StatusCode::FORBIDDEN, "impersonation_forbidden"));
    app.stop().await;
}
