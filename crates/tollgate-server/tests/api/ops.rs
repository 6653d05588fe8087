//! Health, readiness, metrics, OpenAPI, docs, and the error shape of unknown routes.

use reqwest::{Method, StatusCode};

use crate::helpers::TestApp;

#[tokio::test]
async fn health_readiness_and_metrics() {
    let app = TestApp::new().await;
    let r = app.request(Method::GET, "/healthz", None, None).await;
    assert_eq!((r.status, r.body["status"].as_str()), (StatusCode::OK, Some("ok")));
    let r = app.request(Method::GET, "/readyz", None, None).await;
    assert_eq!((r.status, r.body["status"].as_str()), (StatusCode::OK, Some("ready")));
    assert!(r.headers.contains_key("x-request-id"));
    app.request(Method::GET, "/v1/me", None, None).await;
    let text = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(text.contains(r#"http_requests_total{method="GET",route="/readyz",status="200"}"#), "{text}");
    assert!(text.contains(r#"route="/v1/me",status="401""#), "{text}");
    assert!(text.contains("http_request_duration_seconds_bucket"), "{text}");
    app.stop().await;
}

#[tokio::test]
async fn openapi_covers_every_route_and_docs_are_served() {
    let app = TestApp::new().await;
    let r = app.request(Method::GET, "/openapi.json", None, None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["openapi"], "3.1.0");
    let paths = r.body["paths"].as_object().unwrap();
    let expected = [
        ("/v1/auth/register", "post"),
        ("/v1/auth/verify-email", "post"),
        ("/v1/auth/verify-email/resend", "post"),
        ("/v1/auth/login", "post"),
        ("/v1/auth/login/mfa", "post"),
        ("/v1/auth/refresh", "post"),
        ("/v1/auth/logout", "post"),
        ("/v1/auth/password/forgot", "post"),
        ("/v1/auth/password/reset", "post"),
        ("/v1/auth/magic-link", "post"),
        ("/v1/auth/magic-link/verify", "post"),
        ("/v1/me", "get"),
        ("/v1/me", "patch"),
        ("/v1/me/password", "post"),
        ("/v1/me/email", "post"),
        ("/v1/me/sessions", "get"),
        ("/v1/me/sessions", "delete"),
        ("/v1/me/sessions/{id}", "delete"),
        ("/v1/me/2fa/setup", "post"),
        ("/v1/me/2fa/enable", "post"),
        ("/v1/me/2fa/disable", "post"),
        ("/v1/me/2fa/recovery-codes", "post"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
        ("/.well-known/jwks.json", "get"),
        ("/verify-email", "get"),
        ("/reset-password", "get"),
        ("/reset-password", "post"),
        ("/v1/me/entitlements", "get"),
        ("/v1/plans", "get"),
        ("/v1/accounts", "post"),
        ("/v1/accounts/{id}", "get"),
        ("/v1/accounts/{id}/subscription", "post"),
        ("/v1/accounts/{id}/subscription", "delete"),
        ("/v1/accounts/{id}/entitlements", "get"),
        ("/v1/accounts/{id}/usage", "get"),
        ("/v1/usage/check", "post"),
        ("/v1/usage/consume", "post"),
        ("/v1/usage/refund", "post"),
        ("/v1/usage/set", "post"),
        ("/v1/usage/add", "post"),
        ("/v1/usage/acquire", "post"),
        ("/v1/usage/leases/{id}/release", "post"),
        ("/v1/usage/reserve", "post"),
        ("/v1/usage/reservations/{id}/commit", "post"),
        ("/v1/usage/reservations/{id}/release", "post"),
        ("/v1/ratelimit/check", "post"),
        ("/v1/credit-packages", "get"),
        ("/v1/accounts/{id}/credits", "get"),
        ("/v1/accounts/{id}/credits/transactions", "get"),
        ("/v1/accounts/{id}/credits/spend", "post"),
        ("/v1/accounts/{id}/credits/grant", "post"),
        ("/v1/accounts/{id}/credits/refund", "post"),
        ("/v1/accounts/{id}/payments", "get"),
        ("/v1/me/credits", "get"),
        ("/v1/me/credits/transactions", "get"),
        ("/v1/me/credits/spend", "post"),
        ("/v1/me/payments", "get"),
        ("/v1/billing/checkout", "post"),
        ("/v1/billing/portal", "post"),
        ("/v1/billing/webhooks/stripe", "post"),
        ("/v1/admin/users", "get"),
        ("/v1/admin/users/{id}", "get"),
        ("/v1/admin/users/{id}", "patch"),
        ("/v1/admin/users/{id}", "delete"),
        ("/v1/admin/users/{id}/revoke-sessions", "post"),
        ("/v1/admin/users/{id}/clear-rate-limits", "post"),
        ("/v1/admin/users/{id}/impersonate", "post"),
        ("/v1/admin/audit-log", "get"),
        ("/v1/admin/accounts/{id}/credits/adjust", "post"),
        ("/v1/admin/accounts/{id}/quotas/reset", "post"),
        ("/v1/admin/accounts/{id}/subscription", "put"),
        ("/v1/admin/accounts/{id}/limits", "get"),
        ("/v1/admin/accounts/{id}/limits", "put"),
        ("/v1/admin/plans", "get"),
        ("/v1/admin/plans", "post"),
        ("/v1/admin/plans/{key}", "patch"),
        ("/v1/admin/plans/{key}", "delete"),
        ("/v1/admin/system/health", "get"),
        ("/v1/admin/system/cleanup", "post"),
        ("/v1/me/api-keys", "post"),
        ("/v1/me/api-keys", "get"),
        ("/v1/me/api-keys/{id}", "delete"),
        ("/v1/admin/stats", "get"),
        ("/v1/admin/analytics/usage", "get"),
        ("/v1/admin/usage-logs", "get"),
        ("/v1/admin/payments", "get"),
    ];
    let mut documented = 0;
    for (path, ops) in paths {
        for (method, op) in ops.as_object().unwrap() {
            documented += 1;
            assert!(expected.contains(&(path.as_str(), method.as_str())), "undocumented in this test: {method} {path}");
            for (status, response) in op["responses"].as_object().unwrap() {
                assert!(
                    response["description"].as_str().is_some_and(|d| !d.is_empty()),
                    "{method} {path} {status} needs a description"
                );
            }
        }
    }
    assert_eq!(documented, expected.len());
    // Every documented route is really served (not 404/405).
    for (path, method) in expected {
        let path = path.replace("{id}", "01a20897-0000-7000-8000-000000000000");
        let r = app.request(method.to_uppercase().parse().unwrap(), &path, None, None).await;
        assert!(
            r.status != StatusCode::NOT_FOUND || r.code() != "not_found" || path.contains("/sessions/"),
            "{method} {path} is not routed"
        );
        assert_ne!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
    }
    let docs = app.client.get(app.url("/docs/")).send().await.unwrap();
    assert_eq!(docs.status(), StatusCode::OK);
    assert!(docs.text().await.unwrap().contains("swagger"));
    app.stop().await;
}

#[tokio::test]
async fn unknown_routes_and_methods_use_the_error_shape() {
    let app = TestApp::new().await;
    let r = app.request(Method::GET, "/v1/nope", None, None).await;
    assert_eq!((r.status, r.code()), (StatusCode::NOT_FOUND, "not_found"));
    let r = app.request(Method::DELETE, "/healthz", None, None).await;
    assert_eq!((r.status, r.code()), (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"));
    app.stop().await;
}

#[tokio::test]
async fn graceful_shutdown_finishes_and_stops_listening() {
    let app = TestApp::new().await;
    let url = app.url("/healthz");
    let client = app.client.clone();
    app.stop().await;
    assert!(client.get(url).send().await.is_err(), "nothing listens after shutdown");
}
