//! The authorization matrix, generated from the router's own route table (the
//! OpenAPI document is built from the same list as the router, `app.rs`): every route
//! is put in a class by its path, and an unclassified route fails the test, so a
//! route added later cannot escape the matrix. For each route and credential kind
//! (anonymous, user, impersonation token, API key, service keys without and with the
//! scope, admin user) the status must be the one its class allows. Path ids are
//! random, so a caller that gets past authorization finds nothing (404), never
//! someone else's data.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::helpers::{Reply, TestApp};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Class {
    /// Anyone: sign-up and sign-in, health, docs, public catalog, provider webhooks.
    Public,
    /// The signed-in user's own things (`/v1/me`, sign-out).
    Me,
    /// A product's backend with a service key (some also take a user for themselves).
    Service,
    /// `/v1/admin`: admin users and admin-scoped service keys only.
    Admin,
}

fn class(path: &str) -> Class {
    const PUBLIC: &[&str] = &[
        "/healthz",
        "/readyz",
        "/metrics",
        "/.well-known/jwks.json",
        "/verify-email",
        "/reset-password",
        "/v1/plans",
        "/v1/credit-packages",
        "/v1/billing/webhooks/stripe",
    ];
    if PUBLIC.contains(&path) || (path.starts_with("/v1/auth/") && path != "/v1/auth/logout") {
        Class::Public
    } else if path.starts_with("/v1/admin/") {
        Class::Admin
    } else if path == "/v1/me" || path.starts_with("/v1/me/") || path == "/v1/auth/logout" {
        Class::Me
    } else if ["/v1/accounts", "/v1/usage/", "/v1/ratelimit/", "/v1/billing/"].iter().any(|p| path.starts_with(p)) {
        Class::Service
    } else {
        panic!("{path}: a route no class covers; put it in the authorization matrix")
    }
}

/// The path with every `{param}` replaced by a fresh id.
fn concrete(path: &str) -> String {
    let mut out = String::new();
    let mut rest = path;
    while let Some(start) = rest.find('{') {
        let end = rest[start..].find('}').unwrap() + start;
        out.push_str(&rest[..start]);
        out.push_str(&uuid::Uuid::now_v7().to_string());
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

async fn call(app: &TestApp, method: &Method, path: &str, token: Option<&str>) -> Reply {
    let body = (*method != Method::GET && *method != Method::DELETE).then(|| json!({}));
    app.request(method.clone(), path, token, body).await
}

fn denied(r: &Reply) -> bool {
    r.status == StatusCode::UNAUTHORIZED || r.status == StatusCode::FORBIDDEN
}

async fn every_route_refuses_who_it_must(app: &TestApp) {
    let (user, _) = app.signed_in("ada@example.com").await;
    let (admin, _) = app.signed_in("root@example.com").await;
    let promote = app.service_key(&["admin:*"]).await;
    let admin_id = app.get_auth("/v1/me", &admin).await.body["user"]["id"].as_str().unwrap().to_owned();
    let r = app
        .request(
            Method::PATCH,
            &format!("/v1/admin/users/{admin_id}"),
            Some(&promote),
            Some(json!({ "role": "admin" })),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let (victim, _) = app.signed_in("bob@example.com").await;
    let victim_id = app.get_auth("/v1/me", &victim).await.body["user"]["id"].as_str().unwrap().to_owned();
    let r = app.post_auth(&format!("/v1/admin/users/{victim_id}/impersonate"), &admin, json!({})).await;
    let impersonation = r.body["access_token"].as_str().unwrap().to_owned();
    let r = app.post_auth("/v1/me/api-keys", &user, json!({ "name": "m", "scopes": ["read", "write"] })).await;
    let api_key = r.body["key"].as_str().unwrap().to_owned();
    // A key with scopes, but none that any admin or the tested service route needs.
    let unscoped = app.service_key(&["ratelimit:check"]).await;
    let admin_read = app.service_key(&["admin:read"]).await;

    let r = app.request(Method::GET, "/openapi.json", None, None).await;
    let mut routes: Vec<(String, Method)> = Vec::new();
    for (path, ops) in r.body["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            routes.push((path.clone(), method.to_uppercase().parse().unwrap()));
        }
    }
    assert!(routes.len() > 80, "the route table was read: {}", routes.len());
    let mut checked = 0;
    for (path, method) in &routes {
        let class = class(path);
        let url = concrete(path);
        let what = format!("{method} {path}");
        if class == Class::Public {
            continue;
        }
        let r = call(app, method, &url, None).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{what} anonymous: {:?}", r.body);
        let r = call(app, method, &url, Some("Bearer-garbage")).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{what} with a bad token");
        match class {
            Class::Admin => {
                let reads = *method == Method::GET;
                for (who, token, code) in [
                    ("user", &user, "forbidden"),
                    ("impersonation", &impersonation, "impersonation_forbidden"),
                    ("api key", &api_key, "api_key_forbidden"),
                    ("unscoped service key", &unscoped, "insufficient_scope"),
                ] {
                    let r = call(app, method, &url, Some(token)).await;
                    assert_eq!((r.status, r.code()), (StatusCode::FORBIDDEN, code), "{what} as {who}: {:?}", r.body);
                }
                let r = call(app, method, &url, Some(&admin_read)).await;
                if reads {
                    assert!(!denied(&r), "{what} admin:read: {} {:?}", r.status, r.body);
                } else {
                    assert_eq!(
                        (r.status, r.code()),
                        (StatusCode::FORBIDDEN, "insufficient_scope"),
                        "{what} admin:read"
                    );
                }
                let r = call(app, method, &url, Some(&admin)).await;
                assert!(!denied(&r), "{what} as an admin user: {} {:?}", r.status, r.body);
                if !path.ends_with("/impersonate") {
                    let r = call(app, method, &url, Some(&promote)).await;
                    assert!(!denied(&r), "{what} admin:* key: {} {:?}", r.status, r.body);
                }
            }
            Class::Me => {
                let r = call(app, method, &url, Some(&unscoped)).await;
                assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{what}: a service key is nobody's sign-in");
                if path == "/v1/auth/logout" {
                    continue; // would end the user's session for the rest of the matrix
                }
                let r = call(app, method, &url, Some(&user)).await;
                assert!(!denied(&r), "{what} as the user: {} {:?}", r.status, r.body);
                if *method == Method::GET {
                    for (who, token) in [("impersonation", &impersonation), ("api key", &api_key)] {
                        let r = call(app, method, &url, Some(token)).await;
                        assert!(!denied(&r), "{what} read by {who}: {} {:?}", r.status, r.body);
                    }
                }
            }
            Class::Service => {
                // A user or an unscoped key never reaches another account (random id,
                // or no account at all): refused, or not found, never a success.
                for (who, token) in [("user", &user), ("api key", &api_key), ("unscoped service key", &unscoped)] {
                    let r = call(app, method, &url, Some(token)).await;
                    if path == "/v1/ratelimit/check" && who == "unscoped service key" {
                        continue; // the scope it has
                    }
                    assert!(!r.status.is_success(), "{what} as {who}: {} {:?}", r.status, r.body);
                }
                let r = call(app, method, &url, Some(&promote)).await;
                assert!(!denied(&r), "{what} admin:* key: {} {:?}", r.status, r.body);
            }
            Class::Public => unreachable!(),
        }
        checked += 1;
    }
    assert!(checked > 60, "{checked} routes checked");
}

#[tokio::test]
async fn every_route_refuses_who_it_must_on_sqlite() {
    let app = TestApp::new().await;
    every_route_refuses_who_it_must(&app).await;
    app.stop().await;
}

#[tokio::test]
async fn every_route_refuses_who_it_must_on_postgres() {
    let Some(database) = tollgate_store_postgres::testing::TestDatabase::create().await else { return };
    let app = TestApp::builder().database_url(database.url.clone()).start().await;
    every_route_refuses_who_it_must(&app).await;
    app.stop().await;
    database.drop().await;
}
