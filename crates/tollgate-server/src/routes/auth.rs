//! `/v1/auth/*`: registration, verification, login (with second factor), refresh,
//! logout, password reset and magic links. The whole group is rate limited per client
//! ip; failed logins are also limited per email address.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tollgate_core::identity::IdentityError;
use tollgate_core::identity::flows::{LoginOutcome, Registration, SecondFactor, SignedIn};
use utoipa::ToSchema;

use super::attempts::{code_key, limited_attempt, password_key};
use super::views::{Accepted, ErrorResponse, UserView};
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiJson, CurrentUser, Origin};
use crate::state::AppState;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    pub email: String,
    /// 8 to 128 characters, not a common password.
    pub password: String,
    pub name: Option<String>,
    /// `en` or `fr`; emails are sent in this language.
    pub locale: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct UserResponse {
    pub user: UserView,
}

/// Creates a user and their personal account, and emails a verification link.
#[utoipa::path(post, path = "/v1/auth/register", tag = "auth", request_body = RegisterRequest,
    responses(
        (status = 201, description = "Registered; a verification email is on its way", body = UserResponse),
        (status = 409, description = "Email already registered (`email_taken`)", body = ErrorResponse),
        (status = 422, description = "Invalid fields", body = ErrorResponse),
        (status = 429, description = "Rate limited", body = ErrorResponse),
    ))]
pub async fn register(
    State(state): State<AppState>,
    Origin(origin): Origin,
    ApiJson(body): ApiJson<RegisterRequest>,
) -> ApiResult<(StatusCode, Json<UserResponse>)> {
    let input = Registration { email: body.email, password: body.password, name: body.name, locale: body.locale };
    let user = state.identity.register(input, &origin).await?;
    Ok((StatusCode::CREATED, Json(UserResponse { user: UserView::from(&user) })))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// The token from the emailed link.
    pub token: String,
}

/// Confirms an email address (after registration or an email change).
#[utoipa::path(post, path = "/v1/auth/verify-email", tag = "auth", request_body = TokenRequest,
    responses(
        (status = 200, description = "Email verified", body = UserResponse),
        (status = 400, description = "Unknown, used or expired token (`invalid_token`)", body = ErrorResponse),
        (status = 409, description = "The new address was taken meanwhile (`email_taken`)", body = ErrorResponse),
    ))]
pub async fn verify_email(
    State(state): State<AppState>,
    Origin(origin): Origin,
    ApiJson(body): ApiJson<TokenRequest>,
) -> ApiResult<Json<UserResponse>> {
    let user = state.identity.verify_email(&body.token, &origin).await?;
    Ok(Json(UserResponse { user: UserView::from(&user) }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EmailRequest {
    pub email: String,
}

/// Runs `work` in the background so that the answer, and its timing, are the same
/// whether the address is registered or not. Each address gets a few such emails per
/// window (`email_limit`); past that the request is still answered 202 but sends
/// nothing, so nobody can flood a mailbox through Tollgate.
/// The budget key for emails sent to an address, as typed.
pub fn email_limit_key(email: &str) -> String {
    format!("mail:{}", email.trim().to_lowercase().chars().take(254).collect::<String>())
}

async fn email_in_background<F>(state: &AppState, email: &str, what: &'static str, work: F)
where
    F: Future<Output = Result<(), IdentityError>> + Send + 'static,
{
    let key = email_limit_key(email);
    if !state.limiter.hit(&key, state.config.auth.email_limit, 1).await.allowed {
        tracing::info!("{what}: per-address email limit reached; nothing sent");
        return;
    }
    tokio::spawn(async move {
        if let Err(e) = work.await {
            tracing::warn!(error = %e, "{what} failed");
        }
    });
}

/// Sends a new verification link if the address belongs to an unverified user.
#[utoipa::path(post, path = "/v1/auth/verify-email/resend", tag = "auth", request_body = EmailRequest,
    responses((status = 202, description = "Accepted, whether or not the address is registered", body = Accepted)))]
pub async fn resend_verification(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<EmailRequest>,
) -> (StatusCode, Json<Accepted>) {
    let identity = state.identity.clone();
    let email = body.email.clone();
    email_in_background(&state, &body.email, "resending verification", async move {
        identity.resend_verification(&email).await
    })
    .await;
    (StatusCode::ACCEPTED, Json(Accepted::new()))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    pub email: String,
    pub password: String,
}

/// Either tokens, or `mfa_required` with an `mfa_token` for `/v1/auth/login/mfa`.
#[derive(Serialize, ToSchema, Default)]
pub struct LoginResponse {
    pub mfa_required: bool,
    /// EdDSA-signed JWT; verify it with `/.well-known/jwks.json`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_type: Option<&'static str>,
    /// Seconds until the access token expires.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_in: Option<u64>,
    /// Opaque; rotates on every use.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<UserView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mfa_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", with = "time::serde::rfc3339::option")]
    pub mfa_token_expires_at: Option<OffsetDateTime>,
}

fn signed_in(state: &AppState, s: SignedIn) -> ApiResult<LoginResponse> {
    let access_token = state
        .tokens
        .issue(&s.user, &s.session)
        .map_err(|e| ApiError::Internal(format!("signing access token: {e}")))?;
    Ok(LoginResponse {
        mfa_required: false,
        access_token: Some(access_token),
        token_type: Some("Bearer"),
        expires_in: Some(state.tokens.ttl().as_secs()),
        refresh_token: Some(s.refresh_token.expose().to_owned()),
        user: Some(UserView::from(&s.user)),
        ..Default::default()
    })
}

fn login_response(state: &AppState, outcome: LoginOutcome) -> ApiResult<LoginResponse> {
    match outcome {
        LoginOutcome::SignedIn(s) => signed_in(state, s),
        LoginOutcome::MfaRequired { mfa_token, expires_at } => Ok(LoginResponse {
            mfa_required: true,
            mfa_token: Some(mfa_token.expose().to_owned()),
            mfa_token_expires_at: Some(expires_at),
            ..Default::default()
        }),
    }
}

/// Password login. Wrong email and wrong password get the same answer in the same time.
#[utoipa::path(post, path = "/v1/auth/login", tag = "auth", request_body = LoginRequest,
    responses(
        (status = 200, description = "Signed in, or a second factor is required", body = LoginResponse),
        (status = 401, description = "Wrong email or password (`invalid_credentials`)", body = ErrorResponse),
        (status = 403, description = "`email_not_verified` or `account_suspended`", body = ErrorResponse),
        (status = 429, description = "Too many failed logins for this address, or requests from this ip", body = ErrorResponse),
    ))]
pub async fn login(
    State(state): State<AppState>,
    Origin(origin): Origin,
    ApiJson(body): ApiJson<LoginRequest>,
) -> ApiResult<Json<LoginResponse>> {
    let keys = [password_key(&body.email)];
    let outcome = limited_attempt(&state, &keys, state.identity.login(&body.email, &body.password, &origin)).await?;
    Ok(Json(login_response(&state, outcome?)?))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginMfaRequest {
    pub mfa_token: String,
    /// A 6-digit TOTP code; give this or `recovery_code`.
    pub code: Option<String>,
    pub recovery_code: Option<String>,
}

/// Completes a login with a TOTP code (accepted once) or a recovery code (used up).
#[utoipa::path(post, path = "/v1/auth/login/mfa", tag = "auth", request_body = LoginMfaRequest,
    responses(
        (status = 200, description = "Signed in", body = LoginResponse),
        (status = 401, description = "`invalid_mfa_token` or `invalid_mfa_code`", body = ErrorResponse),
        (status = 422, description = "Neither or both of `code` and `recovery_code`", body = ErrorResponse),
        (status = 429, description = "Too many wrong codes for this user", body = ErrorResponse),
    ))]
pub async fn login_mfa(
    State(state): State<AppState>,
    Origin(origin): Origin,
    ApiJson(body): ApiJson<LoginMfaRequest>,
) -> ApiResult<Json<LoginResponse>> {
    let factor = match (body.code, body.recovery_code) {
        (Some(code), None) => SecondFactor::Totp(code),
        (None, Some(code)) => SecondFactor::RecoveryCode(code),
        _ => {
            return Err(ApiError::Validation(vec![tollgate_core::identity::flows::FieldError {
                field: "code",
                code: "one_of_required",
                message: "give exactly one of code and recovery_code".into(),
            }]));
        }
    };
    let user = state.identity.mfa_token_user(&body.mfa_token).await?.ok_or(ApiError::InvalidMfaToken)?;
    let keys = [code_key(user)];
    match limited_attempt(&state, &keys, state.identity.login_mfa(&body.mfa_token, factor, &origin)).await? {
        Ok(signed) => Ok(Json(signed_in(&state, signed)?)),
        Err(IdentityError::InvalidToken) => Err(ApiError::InvalidMfaToken),
        Err(e) => Err(e.into()),
    }
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefreshRequest {
    pub refresh_token: String,
}

/// Rotates the refresh token and issues a new access token. Presenting a refresh token
/// that was already used revokes the whole session.
#[utoipa::path(post, path = "/v1/auth/refresh", tag = "auth", request_body = RefreshRequest,
    responses(
        (status = 200, description = "New tokens", body = LoginResponse),
        (status = 401, description = "`invalid_refresh_token`, or `refresh_token_reused` (session revoked)", body = ErrorResponse),
        (status = 403, description = "`account_suspended`", body = ErrorResponse),
    ))]
pub async fn refresh(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<RefreshRequest>,
) -> ApiResult<Json<LoginResponse>> {
    match state.identity.refresh(&body.refresh_token).await {
        Ok(s) => Ok(Json(signed_in(&state, s)?)),
        Err(IdentityError::InvalidToken) => Err(ApiError::InvalidRefreshToken),
        Err(e) => Err(e.into()),
    }
}

/// Ends the session of the access token.
#[utoipa::path(post, path = "/v1/auth/logout", tag = "auth", security(("bearer" = [])),
    responses(
        (status = 204, description = "Signed out"),
        (status = 401, description = "Not signed in", body = ErrorResponse),
    ))]
pub async fn logout(
    State(state): State<AppState>,
    Origin(origin): Origin,
    current: CurrentUser,
) -> ApiResult<StatusCode> {
    let session = current.require_session()?.id;
    state.identity.logout(current.user.id, session, &current.origin(origin)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Emails a one-hour, single-use reset link if the address is registered.
#[utoipa::path(post, path = "/v1/auth/password/forgot", tag = "auth", request_body = EmailRequest,
    responses((status = 202, description = "Accepted, whether or not the address is registered", body = Accepted)))]
pub async fn forgot_password(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<EmailRequest>,
) -> (StatusCode, Json<Accepted>) {
    let identity = state.identity.clone();
    let email = body.email.clone();
    email_in_background(&state, &body.email, "password reset request", async move {
        identity.forgot_password(&email).await
    })
    .await;
    (StatusCode::ACCEPTED, Json(Accepted::new()))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResetPasswordRequest {
    pub token: String,
    pub password: String,
}

/// Sets a new password from a reset link; every session of the user ends.
#[utoipa::path(post, path = "/v1/auth/password/reset", tag = "auth", request_body = ResetPasswordRequest,
    responses(
        (status = 200, description = "Password set; sign in again", body = UserResponse),
        (status = 400, description = "`invalid_token`", body = ErrorResponse),
        (status = 422, description = "Password rejected by the policy", body = ErrorResponse),
    ))]
pub async fn reset_password(
    State(state): State<AppState>,
    Origin(origin): Origin,
    ApiJson(body): ApiJson<ResetPasswordRequest>,
) -> ApiResult<Json<UserResponse>> {
    let user = state.identity.reset_password(&body.token, &body.password, &origin).await?;
    Ok(Json(UserResponse { user: UserView::from(&user) }))
}

/// Emails a 15-minute, single-use sign-in link if the address is registered.
#[utoipa::path(post, path = "/v1/auth/magic-link", tag = "auth", request_body = EmailRequest,
    responses((status = 202, description = "Accepted, whether or not the address is registered", body = Accepted)))]
pub async fn magic_link(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<EmailRequest>,
) -> (StatusCode, Json<Accepted>) {
    let identity = state.identity.clone();
    let email = body.email.clone();
    email_in_background(
        &state,
        &body.email,
        "magic link request",
        async move { identity.request_magic_link(&email).await },
    )
    .await;
    (StatusCode::ACCEPTED, Json(Accepted::new()))
}

/// Signs in with a magic link (a user with 2FA still gets `mfa_required`).
#[utoipa::path(post, path = "/v1/auth/magic-link/verify", tag = "auth", request_body = TokenRequest,
    responses(
        (status = 200, description = "Signed in, or a second factor is required", body = LoginResponse),
        (status = 400, description = "`invalid_token`", body = ErrorResponse),
    ))]
pub async fn magic_link_verify(
    State(state): State<AppState>,
    Origin(origin): Origin,
    ApiJson(body): ApiJson<TokenRequest>,
) -> ApiResult<Json<LoginResponse>> {
    let outcome = state.identity.verify_magic_link(&body.token, &origin).await?;
    Ok(Json(login_response(&state, outcome)?))
}
