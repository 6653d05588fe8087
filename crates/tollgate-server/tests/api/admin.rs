//! `/v1/admin/*`: who may use it, the user list and detail, admin changes (each
//! audited once, with its actor), and the audit log. The flows that matter most run on
//! SQLite and on PostgreSQL.

use std::collections::HashSet;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use time::OffsetDateTime;
use tollgate_core::identity::mfa::totp_code_at;

use crate::helpers::{PASSWORD, Reply, TestApp};

/// The id of the user behind an access token.
async fn my_id(app: &TestApp, access: &str) -> String {
    app.get_auth("/v1/me", access).await.body["user"]["id"].as_str().unwrap().to_owned()
}

async fn patch(app: &TestApp, path: &str, token: &str, body: Value) -> Reply {
    app.request(Method::PATCH, path, Some(token), Some(body)).await
}

/// A signed-in admin user (promoted through the admin API by a service key):
/// (access token, user id).
async fn admin_user(app: &TestApp, email: &str) -> (String, String) {
    let key = app.service_key(&["admin:*"]).await;
    let (access, _) = app.signed_in(email).await;
    let id = my_id(app, &access).await;
    let r = patch(app, &format!("/v1/admin/users/{id}"), &key, json!({ "role": "admin" })).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    (access, id)
}

/// Audit events about a user, newest first.
async fn events_about(app: &TestApp, token: &str, user: &str) -> Vec<Value> {
    let r = app.get_auth(&format!("/v1/admin/audit-log?target=user:{user}&limit=200"), token).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    r.body["events"].as_array().unwrap().clone()
}

#[tokio::test]
async fn only_admins_and_admin_keys_reach_admin_routes() {
    let app = TestApp::new().await;
    let (user, _) = app.signed_in("ada@example.com").await;
    let id = my_id(&app, &user).await;
    let path = format!("/v1/admin/users/{id}");
    assert_eq!(app.request(Method::GET, "/v1/admin/users", None, None).await.status, StatusCode::UNAUTHORIZED);
    let r = app.get_auth("/v1/admin/users", &user).await;
    assert_eq!((r.status, r.code()), (StatusCode::FORBIDDEN, "forbidden"));
    let r = patch(&app, &path, &user, json!({ "role": "admin" })).await;
    assert_eq!((r.status, r.code()), (StatusCode::FORBIDDEN, "forbidden"), "no self-promotion");
    let r = app.get_auth("/v1/admin/users", "tg_sk_not-a-key").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);

    let usage = app.service_key(&["usage:write", "accounts:write"]).await;
    let r = app.get_auth("/v1/admin/users", &usage).await;
    assert_eq!((r.status, r.code()), (StatusCode::FORBIDDEN, "insufficient_scope"));
    let read = app.service_key(&["admin:read"]).await;
    assert_eq!(app.get_auth(&path, &read).await.status, StatusCode::OK);
    let r = patch(&app, &path, &read, json!({ "name": "x" })).await;
    assert_eq!((r.status, r.code()), (StatusCode::FORBIDDEN, "insufficient_scope"), "reads only");
    let write = app.service_key(&["admin:write"]).await;
    assert_eq!(patch(&app, &path, &write, json!({ "name": "x" })).await.status, StatusCode::OK);
    assert_eq!(app.get_auth(&path, &write).await.status, StatusCode::FORBIDDEN, "writes only");

    // A user promoted to admin: their existing token works at once, and a demotion
    // takes it away at once (the role is read from the user, not the token).
    let (admin, admin_id) = admin_user(&app, "root@example.com").await;
    assert_eq!(app.get_auth("/v1/admin/users", &admin).await.status, StatusCode::OK);
    let r = patch(&app, &format!("/v1/admin/users/{admin_id}"), &write, json!({ "role": "user" })).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(app.get_auth("/v1/admin/users", &admin).await.status, StatusCode::FORBIDDEN);
    app.stop().await;
}

#[tokio::test]
async fn admin_users_need_2fa_when_configured() {
    let app = TestApp::builder().admin_require_2fa().start().await;
    let (admin, _) = admin_user(&app, "root@example.com").await;
    let r = app.get_auth("/v1/admin/users", &admin).await;
    assert_eq!((r.status, r.code()), (StatusCode::FORBIDDEN, "admin_2fa_required"));
    let r = app.request(Method::POST, "/v1/me/2fa/setup", Some(&admin), None).await;
    let secret = r.body["secret"].as_str().unwrap().to_owned();
    let code = totp_code_at(&secret, OffsetDateTime::now_utc().unix_timestamp() as u64).unwrap();
    let r = app.post_auth("/v1/me/2fa/enable", &admin, json!({ "password": PASSWORD, "code": code })).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(app.get_auth("/v1/admin/users", &admin).await.status, StatusCode::OK);
    // Service keys have no second factor; their scope is what counts.
    let key = app.service_key(&["admin:read"]).await;
    assert_eq!(app.get_auth("/v1/admin/users", &key).await.status, StatusCode::OK);
    app.stop().await;
}

async fn suspension_takes_effect_at_once(app: &TestApp) {
    let (admin, _) = admin_user(app, "root@example.com").await;
    let (access, refresh) = app.signed_in("ada@example.com").await;
    let id = my_id(app, &access).await;
    assert_eq!(app.get_auth("/v1/me", &access).await.status, StatusCode::OK);

    let r = patch(app, &format!("/v1/admin/users/{id}"), &admin, json!({ "status": "suspended" })).await;
    assert_eq!((r.status, &r.body["user"]["status"]), (StatusCode::OK, &json!("suspended")));
    let r = app.get_auth("/v1/me", &access).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "the same access token fails at once");
    let r = app.post("/v1/auth/refresh", json!({ "refresh_token": refresh })).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{:?}", r.body);
    let r = app.post("/v1/auth/login", json!({ "email": "ada@example.com", "password": PASSWORD })).await;
    assert_eq!((r.status, r.code()), (StatusCode::FORBIDDEN, "account_suspended"), "{:?}", r.body);
    let detail = app.get_auth(&format!("/v1/admin/users/{id}"), &admin).await;
    assert_eq!(detail.body["sessions"], json!([]));

    let r = patch(app, &format!("/v1/admin/users/{id}"), &admin, json!({ "status": "active" })).await;
    assert_eq!(r.status, StatusCode::OK);
    app.login("ada@example.com", PASSWORD).await;
    assert_eq!(app.get_auth("/v1/me", &access).await.status, StatusCode::UNAUTHORIZED, "old sessions stay ended");
}

#[tokio::test]
async fn suspension_takes_effect_at_once_on_sqlite() {
    let app = TestApp::new().await;
    suspension_takes_effect_at_once(&app).await;
    app.stop().await;
}

#[tokio::test]
async fn suspension_takes_effect_at_once_on_postgres() {
    let Some(database) = tollgate_store_postgres::testing::TestDatabase::create().await else { return };
    let app = TestApp::builder().database_url(database.url.clone()).start().await;
    suspension_takes_effect_at_once(&app).await;
    app.stop().await;
    database.drop().await;
}

/// Every admin change, by `token` acting as `actor`, leaves exactly one audit event
/// about the user, naming that actor.
async fn each_change_is_audited_once(app: &TestApp, token: &str, actor: Value) {
    let (access, _) = app.signed_in("ada@example.com").await;
    let id = my_id(app, &access).await;
    let user = format!("/v1/admin/users/{id}");
    let changes: Vec<(&str, Method, String, Option<Value>)> = vec![
        ("admin.user.updated", Method::PATCH, user.clone(), Some(json!({ "name": "Ada L." }))),
        ("admin.user.role_changed", Method::PATCH, user.clone(), Some(json!({ "role": "admin" }))),
        ("admin.user.role_changed", Method::PATCH, user.clone(), Some(json!({ "role": "user" }))),
        ("admin.user.plan_changed", Method::PATCH, user.clone(), Some(json!({ "plan": "pro" }))),
        ("admin.user.suspended", Method::PATCH, user.clone(), Some(json!({ "status": "suspended" }))),
        ("admin.user.activated", Method::PATCH, user.clone(), Some(json!({ "status": "active" }))),
        ("admin.user.sessions_revoked", Method::POST, format!("{user}/revoke-sessions"), None),
        ("admin.user.rate_limits_cleared", Method::POST, format!("{user}/clear-rate-limits"), Some(json!({}))),
        ("admin.user.deleted", Method::DELETE, user.clone(), None),
    ];
    for (action, method, path, body) in changes {
        let before = events_about(app, token, &id).await.len();
        let r = app.request(method, &path, Some(token), body).await;
        assert!(r.status.is_success(), "{action}: {} {:?}", r.status, r.body);
        let events = events_about(app, token, &id).await;
        assert_eq!(events.len(), before + 1, "{action}: exactly one event");
        assert_eq!(events[0]["action"], action);
        assert_eq!(events[0]["actor"], actor, "{action}");
        assert_eq!(events[0]["target_id"], id.as_str());
        assert_eq!(events[0]["user_agent"], "tollgate-tests");
        assert_eq!(events[0]["ip"], "127.0.0.1");
    }
    // Refused changes write nothing.
    let before = events_about(app, token, &id).await.len();
    let r = app.request(Method::DELETE, &user, Some(token), None).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "already deleted");
    assert_eq!(events_about(app, token, &id).await.len(), before);
    // Filters: by action, and by actor.
    let r = app.get_auth("/v1/admin/audit-log?action=admin.user.deleted", token).await;
    assert_eq!(r.body["events"].as_array().unwrap().len(), 1);
    let actor_param = match actor["id"].as_str() {
        Some(actor_id) => format!("{}:{actor_id}", actor["type"].as_str().unwrap()),
        None => actor["type"].as_str().unwrap().to_owned(),
    };
    let r = app.get_auth(&format!("/v1/admin/audit-log?actor={actor_param}&severity=warning"), token).await;
    let actions: HashSet<&str> =
        r.body["events"].as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(actions, HashSet::from(["admin.user.role_changed", "admin.user.suspended", "admin.user.deleted"]));
}

#[tokio::test]
async fn every_admin_change_is_audited_once_with_its_actor_on_sqlite() {
    let app = TestApp::builder().example_plans("saas-api.toml").start().await;
    let (admin, admin_id) = admin_user(&app, "root@example.com").await;
    each_change_is_audited_once(&app, &admin, json!({ "type": "user", "id": admin_id })).await;
    app.stop().await;
}

#[tokio::test]
async fn every_admin_change_by_a_service_key_is_audited_once_on_postgres() {
    let Some(database) = tollgate_store_postgres::testing::TestDatabase::create().await else { return };
    let app = TestApp::builder().database_url(database.url.clone()).example_plans("saas-api.toml").start().await;
    let key = app.service_key(&["admin:*"]).await;
    let store = &app.running.as_ref().unwrap().state.store;
    let query = tollgate_core::audit::AuditQuery {
        action: Some("service_key.created".into()),
        limit: 10,
        ..Default::default()
    };
    let key_id = store.list_audit(query).await.unwrap()[0].metadata["service_key_id"].clone();
    each_change_is_audited_once(&app, &key, json!({ "type": "service_key", "id": key_id })).await;
    app.stop().await;
    database.drop().await;
}

async fn the_user_list_searches_filters_sorts_and_pages(app: &TestApp) {
    let key = app.service_key(&["admin:*"]).await;
    for email in ["carol@example.com", "ada@example.com", "bob@example.org"] {
        app.verified_user(email).await;
    }
    let r = app.get_auth("/v1/admin/users?limit=2", &key).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["total"], 3);
    assert_eq!(r.body["users"][0]["email"], "bob@example.org", "newest first");
    let cursor = r.body["next_cursor"].as_str().unwrap().to_owned();
    // Someone registers between two pages: nobody is repeated or skipped.
    app.verified_user("dan@example.com").await;
    let r = app.get_auth(&format!("/v1/admin/users?limit=2&cursor={cursor}"), &key).await;
    assert_eq!(r.body["users"].as_array().unwrap().len(), 1);
    assert_eq!(r.body["users"][0]["email"], "carol@example.com");
    assert!(r.body["next_cursor"].is_null());
    assert_eq!(r.body["total"], 4);

    let emails = |r: &Reply| -> Vec<String> {
        r.body["users"].as_array().unwrap().iter().map(|u| u["email"].as_str().unwrap().to_owned()).collect()
    };
    let r = app.get_auth("/v1/admin/users?sort=email", &key).await;
    assert_eq!(emails(&r), ["ada@example.com", "bob@example.org", "carol@example.com", "dan@example.com"]);
    let r = app.get_auth("/v1/admin/users?q=EXAMPLE.ORG", &key).await;
    assert_eq!(emails(&r), ["bob@example.org"]);
    let bob = r.body["users"][0]["id"].as_str().unwrap().to_owned();
    let r = app.get_auth(&format!("/v1/admin/users?q={}", &bob[..23]), &key).await;
    assert!(emails(&r).contains(&"bob@example.org".to_owned()), "id prefix");
    let r = app.get_auth("/v1/admin/users?role=admin", &key).await;
    assert_eq!(r.body["total"], 0);
    let r = app.get_auth("/v1/admin/users?plan=free&status=active", &key).await;
    assert_eq!(r.body["total"], 4);
    let r = app
        .get_auth("/v1/admin/users?created_after=2000-01-01T00:00:00Z&created_before=2001-01-01T00:00:00Z", &key)
        .await;
    assert_eq!(r.body["total"], 0);

    for bad in [
        "sort=name",
        "status=gone",
        "role=root",
        "created_after=yesterday",
        "cursor=not-a-cursor",
        &format!("sort=email&cursor={cursor}"),
    ] {
        let r = app.get_auth(&format!("/v1/admin/users?{bad}"), &key).await;
        assert_eq!((r.status, r.code()), (StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"), "{bad}");
    }
    let r = app.get_auth("/v1/admin/users?plan=nope", &key).await;
    assert_eq!(r.code(), "unknown_plan");
    let r = app.get_auth("/v1/admin/users?colour=blue", &key).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "unknown parameters are refused");
}

#[tokio::test]
async fn the_user_list_searches_filters_sorts_and_pages_on_sqlite() {
    let app = TestApp::new().await;
    the_user_list_searches_filters_sorts_and_pages(&app).await;
    app.stop().await;
}

#[tokio::test]
async fn the_user_list_searches_filters_sorts_and_pages_on_postgres() {
    let Some(database) = tollgate_store_postgres::testing::TestDatabase::create().await else { return };
    let app = TestApp::builder().database_url(database.url.clone()).start().await;
    the_user_list_searches_filters_sorts_and_pages(&app).await;
    app.stop().await;
    database.drop().await;
}

async fn the_user_detail_has_everything_but_secrets(app: &TestApp) {
    let key = app.service_key(&["admin:*"]).await;
    let (access, _) = app.signed_in("ada@example.com").await;
    let id = my_id(app, &access).await;
    let r = app.get_auth(&format!("/v1/admin/users/{id}"), &key).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["user"]["email"], "ada@example.com");
    assert_eq!(r.body["account"]["kind"], "personal");
    assert_eq!(r.body["entitlements"]["plan"], "free");
    assert_eq!(r.body["credits"]["balance"], 0);
    assert_eq!(r.body["sessions"].as_array().unwrap().len(), 1);
    let actions: Vec<&str> =
        r.body["recent_audit_events"].as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert!(actions.contains(&"login.succeeded"), "{actions:?}");
    for field in ["recent_transactions", "recent_payments"] {
        assert!(r.body[field].is_array(), "{field}");
    }
    let text = r.body.to_string();
    for secret in ["password_hash", "argon2", "totp_secret", "refresh"] {
        assert!(!text.contains(secret), "{secret} leaked: {text}");
    }
    for unknown in [format!("/v1/admin/users/{}", uuid::Uuid::now_v7()), "/v1/admin/users/not-an-id".to_owned()] {
        let r = app.get_auth(&unknown, &key).await;
        assert_eq!((r.status, r.code()), (StatusCode::NOT_FOUND, "not_found"));
    }
}

#[tokio::test]
async fn the_user_detail_has_everything_but_secrets_on_sqlite() {
    let app = TestApp::new().await;
    the_user_detail_has_everything_but_secrets(&app).await;
    app.stop().await;
}

#[tokio::test]
async fn the_user_detail_has_everything_but_secrets_on_postgres() {
    let Some(database) = tollgate_store_postgres::testing::TestDatabase::create().await else { return };
    let app = TestApp::builder().database_url(database.url.clone()).start().await;
    the_user_detail_has_everything_but_secrets(&app).await;
    app.stop().await;
    database.drop().await;
}

#[tokio::test]
async fn deletion_frees_the_email_and_keeps_the_rows() {
    let app = TestApp::new().await;
    let (admin, admin_id) = admin_user(&app, "root@example.com").await;
    let (access, _) = app.signed_in("ada@example.com").await;
    let id = my_id(&app, &access).await;
    let r = app.request(Method::DELETE, &format!("/v1/admin/users/{id}"), Some(&admin), None).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{:?}", r.body);
    assert_eq!(app.get_auth("/v1/me", &access).await.status, StatusCode::UNAUTHORIZED);
    let r = app.get_auth(&format!("/v1/admin/users/{id}"), &admin).await;
    assert_eq!(r.body["user"]["status"], "deleted", "kept for the audit trail");
    let r = app.get_auth("/v1/admin/users?q=ada@", &admin).await;
    assert_eq!(r.body["total"], 0, "deleted users are listed only when asked for");
    let r = app.get_auth("/v1/admin/users?status=deleted", &admin).await;
    assert_eq!(r.body["total"], 1);
    let r = patch(&app, &format!("/v1/admin/users/{id}"), &admin, json!({ "status": "active" })).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "deleted users cannot be changed");
    app.signed_in("ada@example.com").await;

    // Admins cannot lock themselves out.
    for body in [json!({ "status": "suspended" }), json!({ "role": "user" })] {
        let r = patch(&app, &format!("/v1/admin/users/{admin_id}"), &admin, body).await;
        assert_eq!((r.status, r.code()), (StatusCode::CONFLICT, "admin_self_change"));
    }
    let r = app.request(Method::DELETE, &format!("/v1/admin/users/{admin_id}"), Some(&admin), None).await;
    assert_eq!(r.code(), "admin_self_change");
    // Taken emails, bad bodies.
    let (other, _) = app.signed_in("bob@example.com").await;
    let bob = my_id(&app, &other).await;
    let r = patch(&app, &format!("/v1/admin/users/{bob}"), &admin, json!({ "email": "ROOT@example.com" })).await;
    assert_eq!((r.status, r.code()), (StatusCode::CONFLICT, "email_taken"));
    for body in
        [json!({}), json!({ "status": "deleted" }), json!({ "email": "nope" }), json!({ "plan": "free", "name": "x" })]
    {
        let r = patch(&app, &format!("/v1/admin/users/{bob}"), &admin, body.clone()).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {:?}", r.body);
    }
    app.stop().await;
}

async fn clearing_rate_limits_lets_the_user_in(app: &TestApp) {
    let key = app.service_key(&["admin:write"]).await;
    let (access, _) = app.signed_in("ada@example.com").await;
    let id = my_id(app, &access).await;
    for _ in 0..2 {
        app.post("/v1/auth/login", json!({ "email": "ada@example.com", "password": "wrong password" })).await;
        app.post("/v1/auth/login", json!({ "email": "ada@example.com.au", "password": "wrong password" })).await;
    }
    let r = app.post("/v1/auth/login", json!({ "email": "ada@example.com", "password": PASSWORD })).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    let path = format!("/v1/admin/users/{id}/clear-rate-limits");
    let r = app.post_auth(&path, &key, json!({ "scopes": ["teleport"] })).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    let r = app.post_auth(&path, &key, json!({ "scopes": ["login"] })).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["cleared"], 1);
    app.login("ada@example.com", PASSWORD).await;
    let r = app.post("/v1/auth/login", json!({ "email": "ada@example.com.au", "password": "wrong password" })).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "another address's budget is not cleared");
    // No body at all clears every scope.
    let r = app.request(Method::POST, &path, Some(&key), None).await;
    assert_eq!((r.status, &r.body["scopes"]), (StatusCode::OK, &json!(["login", "mfa", "email", "api"])));
}

#[tokio::test]
async fn clearing_rate_limits_in_memory() {
    let app = TestApp::builder().failed_login_limit(2, 3600).start().await;
    clearing_rate_limits_lets_the_user_in(&app).await;
    app.stop().await;
}

#[tokio::test]
async fn clearing_rate_limits_in_redis() {
    if !crate::helpers::redis_available().await {
        return;
    }
    let prefix = format!("t:{}:", uuid::Uuid::now_v7());
    let app = TestApp::builder().failed_login_limit(2, 3600).redis(&prefix).start().await;
    clearing_rate_limits_lets_the_user_in(&app).await;
    app.stop().await;
}

#[tokio::test]
async fn the_audit_log_pages_and_refuses_bad_filters() {
    let app = TestApp::new().await;
    let key = app.service_key(&["admin:read"]).await;
    for email in ["a@example.com", "b@example.com", "c@example.com"] {
        app.verified_user(email).await;
    }
    let mut seen = HashSet::new();
    let mut path = "/v1/admin/audit-log?limit=2".to_owned();
    loop {
        let r = app.get_auth(&path, &key).await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        for e in r.body["events"].as_array().unwrap() {
            assert!(seen.insert(e["id"].as_str().unwrap().to_owned()), "no event twice");
        }
        match r.body["next_cursor"].as_str() {
            Some(c) => path = format!("/v1/admin/audit-log?limit=2&cursor={c}"),
            None => break,
        }
    }
    assert!(seen.len() >= 6, "registrations and verifications: {}", seen.len());
    for bad in ["actor=robot", "severity=loud", "target=user", "from=today", "cursor=%%%"] {
        let r = app.get_auth(&format!("/v1/admin/audit-log?{bad}"), &key).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {:?}", r.body);
    }
    let openapi = app.request(Method::GET, "/openapi.json", None, None).await.body;
    for route in [
        "/v1/admin/users",
        "/v1/admin/users/{id}",
        "/v1/admin/users/{id}/revoke-sessions",
        "/v1/admin/users/{id}/clear-rate-limits",
        "/v1/admin/audit-log",
    ] {
        assert!(openapi["paths"][route].is_object(), "{route} in /openapi.json");
    }
    app.stop().await;
}

/// The claims of a JWT, read without verifying (the server verified it).
fn claims(token: &str) -> Value {
    use base64::Engine;
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

async fn impersonation_acts_as_the_user_but_never_as_admin(app: &TestApp) {
    let (admin, admin_id) = admin_user(app, "root@example.com").await;
    let (own, _) = app.signed_in("ada@example.com").await;
    let ada = my_id(app, &own).await;
    // The target is an admin too: the token still cannot use the admin API.
    let key = app.service_key(&["admin:*"]).await;
    patch(app, &format!("/v1/admin/users/{ada}"), &key, json!({ "role": "admin" })).await;

    let path = format!("/v1/admin/users/{ada}/impersonate");
    let r = app.request(Method::POST, &path, Some(&key), None).await;
    assert_eq!((r.status, r.code()), (StatusCode::FORBIDDEN, "forbidden"), "a service key is nobody to name");
    let r = app.request(Method::POST, &format!("/v1/admin/users/{admin_id}/impersonate"), Some(&admin), None).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "not yourself");
    let before = events_about(app, &admin, &ada).await.len();
    let r = app.request(Method::POST, &path, Some(&admin), None).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let token = r.body["access_token"].as_str().unwrap().to_owned();
    let events = events_about(app, &admin, &ada).await;
    assert_eq!(events.len(), before + 1);
    assert_eq!(events[0]["action"], "admin.user.impersonated");
    assert_eq!(events[0]["severity"], "critical");
    assert_eq!(events[0]["actor"], json!({ "type": "user", "id": admin_id }));
    let c = claims(&token);
    assert_eq!((&c["sub"], &c["act"]), (&json!(ada), &json!({ "sub": admin_id })));
    assert!(c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap() <= 900, "short-lived");
    assert!(r.body.get("refresh_token").is_none());

    // It is the user on /v1/me...
    let r = app.get_auth("/v1/me", &token).await;
    assert_eq!(r.body["user"]["id"], ada.as_str());
    let r = patch(app, "/v1/me", &token, json!({ "name": "Set by support" })).await;
    assert_eq!(r.status, StatusCode::OK);
    // ...never an admin, and never the user's own credentials.
    for (method, path) in [
        (Method::GET, "/v1/admin/users".to_owned()),
        (Method::GET, format!("/v1/admin/users/{ada}")),
        (Method::PATCH, format!("/v1/admin/users/{admin_id}")),
        (Method::POST, format!("/v1/admin/users/{admin_id}/impersonate")),
        (Method::GET, "/v1/admin/audit-log".to_owned()),
    ] {
        let r = app.request(method, &path, Some(&token), Some(json!({ "name": "x" }))).await;
        assert_eq!((r.status, r.code()), (StatusCode::FORBIDDEN, "impersonation_forbidden"), "{path}");
    }
    for (path, body) in [
        ("/v1/me/password", json!({ "current": PASSWORD, "new": "a brand new password" })),
        ("/v1/me/email", json!({ "email": "evil@example.com", "password": PASSWORD })),
        ("/v1/me/2fa/setup", json!({})),
        ("/v1/me/2fa/enable", json!({ "password": PASSWORD, "code": "123456" })),
        ("/v1/me/2fa/disable", json!({ "password": PASSWORD, "code": "123456" })),
        ("/v1/me/2fa/recovery-codes", json!({ "password": PASSWORD })),
    ] {
        let r = app.post_auth(path, &token, body).await;
        assert_eq!((r.status, r.code()), (StatusCode::FORBIDDEN, "impersonation_forbidden"), "{path}");
    }

    // Everything it did is in the audit log with both identities.
    let both = json!({ "type": "impersonator", "id": { "admin": admin_id, "user": ada } });
    let events = events_about(app, &admin, &ada).await;
    let requests: Vec<&Value> = events.iter().filter(|e| e["action"] == "impersonation.request").collect();
    assert!(requests.iter().all(|e| e["actor"] == both), "{requests:?}");
    let seen: HashSet<(String, String, u64)> = requests
        .iter()
        .map(|e| {
            let m = &e["metadata"];
            (
                m["method"].as_str().unwrap().to_owned(),
                m["path"].as_str().unwrap().to_owned(),
                m["status"].as_u64().unwrap(),
            )
        })
        .collect();
    assert!(seen.contains(&("GET".into(), "/v1/me".into(), 200)), "{seen:?}");
    assert!(seen.contains(&("PATCH".into(), "/v1/me".into(), 200)), "{seen:?}");
    assert!(seen.contains(&("POST".into(), "/v1/me/password".into(), 403)), "{seen:?}");
    // Billing routes (open to users and keys) are recorded too.
    let r = app.post_auth("/v1/billing/portal", &token, json!({ "return_url": "https://app.example.com/" })).await;
    assert!(r.status.is_client_error() || r.status.is_server_error(), "no Stripe here: {:?}", r.body);
    let events = events_about(app, &admin, &ada).await;
    assert!(
        events.iter().any(|e| e["action"] == "impersonation.request" && e["metadata"]["path"] == "/v1/billing/portal"),
        "{events:?}"
    );
    // A change it makes names both identities on the change's own event too.
    let r = app.request(Method::DELETE, "/v1/me/sessions", Some(&token), None).await;
    assert!(r.status.is_success(), "{:?}", r.body);
    let events = events_about(app, &admin, &ada).await;
    let revoked = events.iter().find(|e| e["action"] == "session.revoked").unwrap();
    assert_eq!(revoked["actor"], both);
    assert_eq!(app.get_auth("/v1/me", &own).await.status, StatusCode::UNAUTHORIZED, "acted as the user");

    // Demoting the admin ends their impersonations at once.
    let r = app.request(Method::POST, &path, Some(&admin), None).await;
    let second = r.body["access_token"].as_str().unwrap().to_owned();
    assert_eq!(app.get_auth("/v1/me", &second).await.status, StatusCode::OK);
    patch(app, &format!("/v1/admin/users/{admin_id}"), &key, json!({ "role": "user" })).await;
    assert_eq!(app.get_auth("/v1/me", &second).await.status, StatusCode::UNAUTHORIZED);
    patch(app, &format!("/v1/admin/users/{admin_id}"), &key, json!({ "role": "admin" })).await;
    assert_eq!(app.get_auth("/v1/me", &second).await.status, StatusCode::OK, "and only while demoted");
    // Revoking the user's sessions ends the impersonation at once.
    app.request(Method::POST, &format!("/v1/admin/users/{ada}/revoke-sessions"), Some(&admin), None).await;
    assert_eq!(app.get_auth("/v1/me", &token).await.status, StatusCode::UNAUTHORIZED);
    // Suspended users cannot be impersonated.
    patch(app, &format!("/v1/admin/users/{ada}"), &admin, json!({ "status": "suspended" })).await;
    let r = app.request(Method::POST, &path, Some(&admin), None).await;
    assert_eq!((r.status, r.code()), (StatusCode::FORBIDDEN, "account_suspended"));
}

#[tokio::test]
async fn impersonation_acts_as_the_user_but_never_as_admin_on_sqlite() {
    let app = TestApp::new().await;
    impersonation_acts_as_the_user_but_never_as_admin(&app).await;
    app.stop().await;
}

#[tokio::test]
async fn impersonation_acts_as_the_user_but_never_as_admin_on_postgres() {
    let Some(database) = tollgate_store_postgres::testing::TestDatabase::create().await else { return };
    let app = TestApp::builder().database_url(database.url.clone()).start().await;
    impersonation_acts_as_the_user_but_never_as_admin(&app).await;
    app.stop().await;
    database.drop().await;
}
