//! `/v1/me/2fa/*`: TOTP setup with a QR code, enabling (returns recovery codes),
//! disabling and regenerating recovery codes.

use axum::Json;
use axum::extract::State;
use qrcode::QrCode;
use qrcode::render::svg;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::attempts::{code_key, limited_attempt, user_password_key};
use super::views::ErrorResponse;
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiJson, CurrentUser, Origin};
use crate::state::AppState;

#[derive(Serialize, ToSchema)]
pub struct TotpSetupResponse {
    /// Base32 secret, for typing into an authenticator by hand.
    pub secret: String,
    pub otpauth_uri: String,
    /// The `otpauth_uri` as an inline SVG QR code.
    pub qr_svg: String,
}

/// Starts (or restarts) 2FA setup: a new secret, not active until `/enable`.
#[utoipa::path(post, path = "/v1/me/2fa/setup", tag = "2fa", security(("bearer" = [])),
    responses(
        (status = 200, description = "Secret, URI and QR code", body = TotpSetupResponse),
        (status = 409, description = "`mfa_already_enabled`", body = ErrorResponse),
    ))]
pub async fn setup(State(state): State<AppState>, current: CurrentUser) -> ApiResult<Json<TotpSetupResponse>> {
    current.refuse_delegated()?;
    let setup = state.identity.totp_setup(&current.user).await?;
    let qr = QrCode::new(setup.otpauth_uri.as_bytes()).map_err(|e| ApiError::Internal(format!("QR code: {e}")))?;
    let svg = qr.render::<svg::Color<'_>>().min_dimensions(200, 200).build();
    // Drop the XML prolog so the SVG can be inlined in HTML as is.
    let qr_svg = match svg.find("<svg") {
        Some(start) => svg[start..].to_owned(),
        None => svg,
    };
    Ok(Json(TotpSetupResponse { secret: setup.secret, otpauth_uri: setup.otpauth_uri, qr_svg }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CodeRequest {
    /// The current 6-digit code.
    pub code: String,
}

#[derive(Serialize, ToSchema)]
pub struct RecoveryCodes {
    /// Ten single-use codes, shown this once.
    pub recovery_codes: Vec<String>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnableRequest {
    /// The current password.
    pub password: String,
    /// A current code from the authenticator, proving the secret.
    pub code: String,
}

/// Turns 2FA on once a code proves the secret (needs the password too).
#[utoipa::path(post, path = "/v1/me/2fa/enable", tag = "2fa", security(("bearer" = [])), request_body = EnableRequest,
    responses(
        (status = 200, description = "Enabled; the recovery codes", body = RecoveryCodes),
        (status = 401, description = "`invalid_credentials` or `invalid_mfa_code`", body = ErrorResponse),
        (status = 409, description = "`mfa_already_enabled` or `mfa_not_set_up`", body = ErrorResponse),
        (status = 429, description = "Too many wrong passwords", body = ErrorResponse),
    ))]
pub async fn enable(
    State(state): State<AppState>,
    Origin(origin): Origin,
    current: CurrentUser,
    ApiJson(body): ApiJson<EnableRequest>,
) -> ApiResult<Json<RecoveryCodes>> {
    let keys = [user_password_key(&current.user.email)];
    current.refuse_delegated()?;
    let attempt = state.identity.totp_enable(&current.user, &body.password, &body.code, &origin);
    let recovery_codes = limited_attempt(&state, &keys, attempt).await??;
    Ok(Json(RecoveryCodes { recovery_codes }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DisableRequest {
    pub password: String,
    pub code: String,
}

/// Turns 2FA off (needs the password and a current code).
#[utoipa::path(post, path = "/v1/me/2fa/disable", tag = "2fa", security(("bearer" = [])), request_body = DisableRequest,
    responses(
        (status = 204, description = "Disabled"),
        (status = 401, description = "`invalid_credentials` or `invalid_mfa_code`", body = ErrorResponse),
        (status = 409, description = "`mfa_not_enabled`", body = ErrorResponse),
    ))]
pub async fn disable(
    State(state): State<AppState>,
    Origin(origin): Origin,
    current: CurrentUser,
    ApiJson(body): ApiJson<DisableRequest>,
) -> ApiResult<axum::http::StatusCode> {
    let keys = [user_password_key(&current.user.email), code_key(current.user.id)];
    current.refuse_delegated()?;
    let attempt = state.identity.totp_disable(&current.user, &body.password, &body.code, &origin);
    limited_attempt(&state, &keys, attempt).await??;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PasswordRequest {
    pub password: String,
}

/// Replaces the recovery codes (needs the password); the old ones stop working.
#[utoipa::path(post, path = "/v1/me/2fa/recovery-codes", tag = "2fa", security(("bearer" = [])), request_body = PasswordRequest,
    responses(
        (status = 200, description = "The new recovery codes", body = RecoveryCodes),
        (status = 401, description = "`invalid_credentials`", body = ErrorResponse),
        (status = 409, description = "`mfa_not_enabled`", body = ErrorResponse),
    ))]
pub async fn regenerate_recovery_codes(
    State(state): State<AppState>,
    Origin(origin): Origin,
    current: CurrentUser,
    ApiJson(body): ApiJson<PasswordRequest>,
) -> ApiResult<Json<RecoveryCodes>> {
    let keys = [user_password_key(&current.user.email)];
    current.refuse_delegated()?;
    let attempt = state.identity.regenerate_recovery_codes(&current.user, &body.password, &origin);
    let recovery_codes = limited_attempt(&state, &keys, attempt).await??;
    Ok(Json(RecoveryCodes { recovery_codes }))
}
