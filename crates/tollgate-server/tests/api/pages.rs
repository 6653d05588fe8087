//! The HTML pages behind emailed links.

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{PASSWORD, TestApp};

#[tokio::test]
async fn clicking_the_verification_link_confirms_the_address() {
    let app = TestApp::new().await;
    app.post("/v1/auth/register", json!({ "email": "ada@example.com", "password": PASSWORD })).await;
    let token = app.mail.wait_for("ada@example.com", 1).await.token("verify-email");
    let page = app
        .client
        .get(app.url(&format!("/verify-email?token={token}")))
        .header("accept-language", "fr-FR,fr;q=0.9")
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert!(page.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    let html = page.text().await.unwrap();
    assert!(html.contains("Adresse confirmée") && html.contains("ada@example.com"), "{html}");
    app.login("ada@example.com", PASSWORD).await;
    let again = app.client.get(app.url(&format!("/verify-email?token={token}"))).send().await.unwrap();
    assert_eq!(again.status(), StatusCode::BAD_REQUEST);
    assert!(again.text().await.unwrap().contains("Link not valid"));
    app.stop().await;
}

#[tokio::test]
async fn the_reset_link_opens_a_form_that_sets_the_password() {
    let app = TestApp::new().await;
    app.verified_user("ada@example.com").await;
    app.post("/v1/auth/password/forgot", json!({ "email": "ada@example.com" })).await;
    let token = app.mail.wait_for("ada@example.com", 2).await.token("reset-password");
    let form = app.client.get(app.url(&format!("/reset-password?token={token}"))).send().await.unwrap();
    assert_eq!(form.status(), StatusCode::OK);
    let html = form.text().await.unwrap();
    assert!(html.contains("<form method=\"post\" action=\"/reset-password\">") && html.contains(&token));
    // The GET did not use the token; a weak password re-renders the form.
    let weak = app
        .client
        .post(app.url("/reset-password"))
        .form(&[("token", token.as_str()), ("password", "password")])
        .send()
        .await
        .unwrap();
    assert_eq!(weak.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert!(weak.text().await.unwrap().contains("too common"));
    let done = app
        .client
        .post(app.url("/reset-password"))
        .form(&[("token", token.as_str()), ("password", "a fresh passphrase")])
        .send()
        .await
        .unwrap();
    assert_eq!(done.status(), StatusCode::OK);
    app.login("ada@example.com", "a fresh passphrase").await;
    // Markup in the token is escaped, never reflected.
    let evil =
        app.client.get(app.url("/reset-password?token=%22%3E%3Cscript%3Ealert(1)%3C/script%3E")).send().await.unwrap();
    assert!(!evil.text().await.unwrap().contains("<script>alert(1)"));
    app.stop().await;
}
