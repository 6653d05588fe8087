//! `/v1/me/api-keys`: a user's API keys for their account. The secret is shown once,
//! at creation; lists show the prefix. Managing keys needs the user's own sign-in
//! (no impersonation token, no API key).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tollgate_core::api_keys::{self, ApiKey, ApiKeyScope, DISPLAY_LEN, MAX_NAME};
use tollgate_core::audit::{AuditEvent, Severity};
use tollgate_core::identity::flows::FieldError;
use tollgate_core::ids::ApiKeyId;
use utoipa::ToSchema;
use uuid::Uuid;

use super::views::ErrorResponse;
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiJson, CurrentUser, Origin};
use crate::state::AppState;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApiKey {
    /// 1 to 100 characters, to recognise the key.
    pub name: String,
    /// `read` (GET and HEAD) and/or `write` (everything else).
    #[schema(value_type = Vec<String>, example = json!(["read"]))]
    pub scopes: Vec<ApiKeyScope>,
    /// RFC 3339, in the future; absent: no expiry.
    #[serde(default, with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>)]
    pub expires_at: Option<OffsetDateTime>,
}

/// A key as lists show it: no secret.
#[derive(Serialize, ToSchema)]
pub struct ApiKeyView {
    pub id: Uuid,
    pub name: String,
    /// The first characters of the secret.
    pub prefix: String,
    #[schema(value_type = Vec<String>)]
    pub scopes: Vec<ApiKeyScope>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
    /// Up to a minute behind.
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_used_at: Option<OffsetDateTime>,
}

impl From<&ApiKey> for ApiKeyView {
    fn from(k: &ApiKey) -> Self {
        Self {
            id: k.id.0,
            name: k.name.clone(),
            prefix: k.prefix.clone(),
            scopes: k.scopes.clone(),
            created_at: k.created_at,
            expires_at: k.expires_at,
            last_used_at: k.last_used_at,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct CreatedApiKey {
    /// `tg_live_...`: shown this once, stored only as a hash.
    pub key: String,
    pub api_key: ApiKeyView,
}

#[derive(Serialize, ToSchema)]
pub struct ApiKeyList {
    pub api_keys: Vec<ApiKeyView>,
}

fn check(body: &CreateApiKey, now: OffsetDateTime) -> Result<(String, Vec<ApiKeyScope>), ApiError> {
    let mut errors = Vec::new();
    let name = body.name.trim();
    if name.is_empty() || name.chars().count() > MAX_NAME || name.chars().any(char::is_control) {
        errors.push(FieldError { field: "name", code: "invalid", message: format!("1 to {MAX_NAME} characters") });
    }
    let mut scopes = body.scopes.clone();
    scopes.sort();
    scopes.dedup();
    if scopes.is_empty() {
        errors.push(FieldError { field: "scopes", code: "required", message: "read and/or write".into() });
    }
    if body.expires_at.is_some_and(|at| at <= now) {
        errors.push(FieldError { field: "expires_at", code: "in_the_past", message: "must be in the future".into() });
    }
    if errors.is_empty() { Ok((name.to_owned(), scopes)) } else { Err(ApiError::Validation(errors)) }
}

/// Creates an API key for the signed-in user's account; the secret is in this answer
/// only.
#[utoipa::path(post, path = "/v1/me/api-keys", tag = "me", security(("bearer" = [])), request_body = CreateApiKey,
    responses(
        (status = 201, description = "Created; `key` is shown once", body = CreatedApiKey),
        (status = 403, description = "`impersonation_forbidden` or `api_key_forbidden`", body = ErrorResponse),
        (status = 422, description = "Invalid name, scopes or expiry, or too many keys", body = ErrorResponse),
    ))]
pub async fn create(
    State(state): State<AppState>,
    Origin(origin): Origin,
    current: CurrentUser,
    ApiJson(body): ApiJson<CreateApiKey>,
) -> ApiResult<(StatusCode, Json<CreatedApiKey>)> {
    current.refuse_delegated()?;
    let now = OffsetDateTime::now_utc();
    let (name, scopes) = check(&body, now)?;
    let secret = api_keys::generate_secret();
    let key = ApiKey {
        id: ApiKeyId::new(),
        account_id: current.user.account_id,
        name,
        prefix: secret[..DISPLAY_LEN].to_owned(),
        scopes,
        created_at: now,
        expires_at: body.expires_at,
        last_used_at: None,
        revoked_at: None,
    };
    let audit = AuditEvent::new(current.actor(), "api_key.created", &current.origin(origin), now)
        .target_user(current.user.id)
        .severity(Severity::Warning)
        .meta("api_key_id", key.id.to_string())
        .meta("prefix", key.prefix.clone())
        .meta("scopes", key.scopes.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    state.store.create_api_key(key.clone(), api_keys::digest(&secret), audit).await?;
    Ok((StatusCode::CREATED, Json(CreatedApiKey { key: secret, api_key: ApiKeyView::from(&key) })))
}

/// The account's keys that are not revoked, newest first (no secrets).
#[utoipa::path(get, path = "/v1/me/api-keys", tag = "me", security(("bearer" = [])),
    responses((status = 200, description = "Keys", body = ApiKeyList)))]
pub async fn list(State(state): State<AppState>, current: CurrentUser) -> ApiResult<Json<ApiKeyList>> {
    let keys = state.store.api_keys(current.user.account_id).await?;
    Ok(Json(ApiKeyList { api_keys: keys.iter().map(ApiKeyView::from).collect() }))
}

/// Revokes a key at once (on other nodes within 30 seconds). Another account's key
/// is 404.
#[utoipa::path(delete, path = "/v1/me/api-keys/{id}", tag = "me", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "API key id")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 403, description = "`impersonation_forbidden` or `api_key_forbidden`", body = ErrorResponse),
        (status = 404, description = "No such key of this account", body = ErrorResponse),
    ))]
pub async fn revoke(
    State(state): State<AppState>,
    Origin(origin): Origin,
    current: CurrentUser,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    current.refuse_delegated()?;
    let id = ApiKeyId(id.parse().map_err(|_| ApiError::NotFound)?);
    let now = OffsetDateTime::now_utc();
    let audit = AuditEvent::new(current.actor(), "api_key.revoked", &current.origin(origin), now)
        .target_user(current.user.id)
        .severity(Severity::Warning)
        .meta("api_key_id", id.to_string());
    state.store.revoke_api_key(current.user.account_id, id, audit).await?;
    state.api_keys.forget(id);
    Ok(StatusCode::NO_CONTENT)
}
