//! `/v1/me/*`: the signed-in user's profile, password, email, sessions and second
//! factor.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use tollgate_core::identity::SessionScope;
use tollgate_core::identity::flows::{FieldError, parse_locale, parse_name};
use tollgate_core::ids::SessionId;
use utoipa::ToSchema;
use uuid::Uuid;

use super::attempts::{limited_attempt, user_password_key};
use super::auth::UserResponse;
use super::views::{Accepted, ErrorResponse, SessionView, UserView};
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiJson, CurrentUser, Origin};
use crate::state::AppState;

/// The signed-in user.
#[utoipa::path(get, path = "/v1/me", tag = "me", security(("bearer" = [])),
    responses(
        (status = 200, description = "The user", body = UserResponse),
        (status = 401, description = "Not signed in", body = ErrorResponse),
    ))]
pub async fn get_me(current: CurrentUser) -> Json<UserResponse> {
    Json(UserResponse { user: UserView::from(&current.user) })
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateMeRequest {
    /// `null` clears the name; absent leaves it.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>)]
    pub name: Option<Option<String>>,
    pub locale: Option<String>,
}

/// Distinguishes an absent field (`None`) from an explicit `null` (`Some(None)`).
pub(crate) fn double_option<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

/// Updates name and locale.
#[utoipa::path(patch, path = "/v1/me", tag = "me", security(("bearer" = [])), request_body = UpdateMeRequest,
    responses(
        (status = 200, description = "Updated", body = UserResponse),
        (status = 422, description = "Invalid fields", body = ErrorResponse),
    ))]
pub async fn update_me(
    State(state): State<AppState>,
    current: CurrentUser,
    ApiJson(body): ApiJson<UpdateMeRequest>,
) -> ApiResult<Json<UserResponse>> {
    let mut errors: Vec<FieldError> = Vec::new();
    let name = match body.name {
        None => None,
        Some(raw) => parse_name(raw.as_deref()).map_err(|e| errors.push(e)).ok(),
    };
    let locale = parse_locale(body.locale.as_deref()).map_err(|e| errors.push(e)).ok().flatten();
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    let user = state.identity.update_profile(current.user.id, name, locale).await?;
    Ok(Json(UserResponse { user: UserView::from(&user) }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangePasswordRequest {
    pub current: String,
    pub new: String,
}

/// Changes the password; every other session ends.
#[utoipa::path(post, path = "/v1/me/password", tag = "me", security(("bearer" = [])), request_body = ChangePasswordRequest,
    responses(
        (status = 204, description = "Changed"),
        (status = 401, description = "Wrong current password (`invalid_credentials`)", body = ErrorResponse),
        (status = 422, description = "New password rejected by the policy", body = ErrorResponse),
        (status = 429, description = "Too many wrong passwords", body = ErrorResponse),
    ))]
pub async fn change_password(
    State(state): State<AppState>,
    Origin(origin): Origin,
    current: CurrentUser,
    ApiJson(body): ApiJson<ChangePasswordRequest>,
) -> ApiResult<StatusCode> {
    let keys = [user_password_key(&current.user.email)];
    let session = current.refuse_delegated()?.id;
    let attempt = state.identity.change_password(&current.user, session, &body.current, &body.new, &origin);
    limited_attempt(&state, &keys, attempt).await??;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangeEmailRequest {
    pub email: String,
    /// The current password.
    pub password: String,
}

/// Sends a confirmation link to the new address; the email changes when it is followed
/// (`POST /v1/auth/verify-email`).
#[utoipa::path(post, path = "/v1/me/email", tag = "me", security(("bearer" = [])), request_body = ChangeEmailRequest,
    responses(
        (status = 202, description = "Confirmation sent to the new address", body = Accepted),
        (status = 401, description = "Wrong password", body = ErrorResponse),
        (status = 409, description = "Address in use (`email_taken`)", body = ErrorResponse),
        (status = 422, description = "Invalid email", body = ErrorResponse),
    ))]
pub async fn change_email(
    State(state): State<AppState>,
    current: CurrentUser,
    ApiJson(body): ApiJson<ChangeEmailRequest>,
) -> ApiResult<(StatusCode, Json<Accepted>)> {
    current.refuse_delegated()?;
    let keys = [user_password_key(&current.user.email)];
    limited_attempt(&state, &keys, state.identity.request_email_change(&current.user, &body.email, &body.password))
        .await??;
    Ok((StatusCode::ACCEPTED, Json(Accepted::new())))
}

#[derive(Serialize, ToSchema)]
pub struct SessionList {
    pub sessions: Vec<SessionView>,
}

/// Live sessions (devices), newest first.
#[utoipa::path(get, path = "/v1/me/sessions", tag = "me", security(("bearer" = [])),
    responses((status = 200, description = "Sessions", body = SessionList)))]
pub async fn list_sessions(State(state): State<AppState>, current: CurrentUser) -> ApiResult<Json<SessionList>> {
    let sessions = state.identity.sessions(current.user.id).await?;
    let this = current.session().map(|s| s.id);
    let sessions = sessions.iter().map(|s| SessionView::new(s, Some(s.id) == this)).collect();
    Ok(Json(SessionList { sessions }))
}

/// Ends one session of the user (404 for anyone else's).
#[utoipa::path(delete, path = "/v1/me/sessions/{id}", tag = "me", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "Session id")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 404, description = "No such live session of this user", body = ErrorResponse),
    ))]
pub async fn revoke_session(
    State(state): State<AppState>,
    Origin(origin): Origin,
    current: CurrentUser,
    Path(id): Path<Uuid>,
) -> ApiResult<StatusCode> {
    current.require_session()?;
    let origin = current.origin(origin);
    state.identity.revoke_sessions(current.user.id, SessionScope::One(SessionId(id)), &origin).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize, ToSchema)]
pub struct RevokedCount {
    pub revoked: u64,
}

/// Ends every session of the user except the current one.
#[utoipa::path(delete, path = "/v1/me/sessions", tag = "me", security(("bearer" = [])),
    responses((status = 200, description = "How many sessions ended", body = RevokedCount)))]
pub async fn revoke_other_sessions(
    State(state): State<AppState>,
    Origin(origin): Origin,
    current: CurrentUser,
) -> ApiResult<Json<RevokedCount>> {
    let session = current.require_session()?.id;
    let revoked = state
        .identity
        .revoke_sessions(current.user.id, SessionScope::AllExcept(session), &current.origin(origin))
        .await?;
    Ok(Json(RevokedCount { revoked }))
}
