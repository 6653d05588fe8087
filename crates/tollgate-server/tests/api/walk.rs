//! The whole walk a new user takes, as the acceptance describes it: register,
//! read the email, verify, log in, enable 2FA, log in with it, refresh, replay the old
//! refresh token (session dies), reset the password, and verify the access token
//! offline against the published JWKS.

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use time::OffsetDateTime;
use tollgate_core::identity::mfa::totp_code_at;

use crate::helpers::{PASSWORD, TestApp};

pub async fn walk(app: &TestApp) {
    let email = "walker@example.com";
    let r = app.post("/v1/auth/register", json!({ "email": email, "password": PASSWORD, "name": "Walker" })).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let user_id = r.body["user"]["id"].as_str().unwrap().to_owned();
    let account_id = r.body["user"]["account_id"].as_str().unwrap().to_owned();
    let mail = app.mail.wait_for(email, 1).await;
    let r = app.post("/v1/auth/verify-email", json!({ "token": mail.token("verify-email") })).await;
    assert_eq!(r.status, StatusCode::OK);
    let (access, _) = app.login(email, PASSWORD).await;

    // Offline verification: only the JWKS document and a JWT library.
    let jwks: JwkSet =
        serde_json::from_value(app.request(Method::GET, "/.well-known/jwks.json", None, None).await.body).unwrap();
    let header = jsonwebtoken::decode_header(&access).unwrap();
    assert_eq!(header.alg, Algorithm::EdDSA);
    let jwk = jwks.find(header.kid.as_deref().unwrap()).expect("kid published");
    let mut validation = Validation::new(Algorithm::EdDSA);
    validation.set_issuer(&["http://tollgate.test"]);
    let claims =
        jsonwebtoken::decode::<Value>(&access, &DecodingKey::from_jwk(jwk).unwrap(), &validation).unwrap().claims;
    assert_eq!(claims["sub"], user_id);
    assert_eq!(claims["acc"], account_id);
    assert_eq!(claims["role"], "user");
    for claim in ["sid", "jti", "iat", "exp"] {
        assert!(!claims[claim].is_null(), "{claim}");
    }
    assert_eq!(claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(), 900);

    // 2FA with a code computed from the secret.
    let r = app.request(Method::POST, "/v1/me/2fa/setup", Some(&access), None).await;
    let secret = r.body["secret"].as_str().unwrap().to_owned();
    let now = OffsetDateTime::now_utc().unix_timestamp() as u64;
    let r = app
        .post_auth(
            "/v1/me/2fa/enable",
            &access,
            json!({ "password": PASSWORD, "code": totp_code_at(&secret, now).unwrap() }),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = app.post("/v1/auth/login", json!({ "email": email, "password": PASSWORD })).await;
    assert_eq!(r.body["mfa_required"], true);
    let code = totp_code_at(&secret, now + 30).unwrap();
    let r = app.post("/v1/auth/login/mfa", json!({ "mfa_token": r.body["mfa_token"], "code": code })).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let mfa_access = r.body["access_token"].as_str().unwrap().to_owned();
    let first_refresh = r.body["refresh_token"].as_str().unwrap().to_owned();

    // Refresh, then replay the old refresh token: the session dies.
    let r = app.post("/v1/auth/refresh", json!({ "refresh_token": first_refresh })).await;
    assert_eq!(r.status, StatusCode::OK);
    let refreshed_access = r.body["access_token"].as_str().unwrap().to_owned();
    let r = app.post("/v1/auth/refresh", json!({ "refresh_token": first_refresh })).await;
    assert_eq!(r.code(), "refresh_token_reused");
    assert_eq!(app.get_auth("/v1/me", &mfa_access).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(app.get_auth("/v1/me", &refreshed_access).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(app.get_auth("/v1/me", &access).await.status, StatusCode::OK, "other sessions live on");

    // Reset the password: every session ends.
    app.post("/v1/auth/password/forgot", json!({ "email": email })).await;
    let mail = app.mail.wait_for(email, 2).await;
    let r = app
        .post(
            "/v1/auth/password/reset",
            json!({ "token": mail.token("reset-password"), "password": "the walk is over now" }),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(app.get_auth("/v1/me", &access).await.status, StatusCode::UNAUTHORIZED);
    let r = app.post("/v1/auth/login", json!({ "email": email, "password": "the walk is over now" })).await;
    assert_eq!(r.body["mfa_required"], true, "2FA survives a password reset");
}

#[tokio::test]
async fn the_whole_walk_on_sqlite() {
    let app = TestApp::new().await;
    walk(&app).await;
    app.stop().await;
}

#[tokio::test]
async fn the_whole_walk_on_postgres() {
    let Some(database) = tollgate_store_postgres::testing::TestDatabase::create().await else { return };
    let app = TestApp::builder().database_url(database.url.clone()).start().await;
    walk(&app).await;
    app.stop().await;
    database.drop().await;
}
