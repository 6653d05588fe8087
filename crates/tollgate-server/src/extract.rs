//! Extractors: the JSON body with our own rejections, where a request came from, and
//! who is calling.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, FromRef, FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{Method, header};
use bytes::Bytes;
use serde::de::DeserializeOwned;
use time::OffsetDateTime;
use tollgate_core::accounts::Scope;
use tollgate_core::audit::{Actor, RequestOrigin};
use tollgate_core::identity::{Role, Session, User, UserStatus};

use crate::access_token::{Claims, TokenError};
use crate::error::ApiError;
use crate::state::AppState;

/// A JSON body. Wrong content type: 415; too large: 413; not JSON: 400
/// `malformed_json`; JSON of the wrong shape (missing, unknown or mistyped fields):
/// 422 `invalid_body` naming the field.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|mime| {
                let mime = mime.trim();
                mime.eq_ignore_ascii_case("application/json")
                    || (mime.starts_with("application/") && mime.ends_with("+json"))
            });
        if !is_json {
            return Err(ApiError::UnsupportedMediaType);
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge
            } else {
                ApiError::MalformedJson(e.body_text())
            }
        })?;
        parse_json(&bytes).map(ApiJson)
    }
}

pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    use serde_json::error::Category;
    // No string anywhere may carry a NUL: PostgreSQL cannot store one, and no field
    // of ours needs it. (A raw NUL byte is already invalid JSON.)
    if bytes.windows(6).any(|w| w[0] == b'\\' && w[1] == b'u' && w[2..].iter().all(|b| *b == b'0')) {
        return Err(ApiError::InvalidBody {
            fields: [("body".to_owned(), "strings may not contain NUL (\\u0000)".to_owned())].into(),
        });
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        match inner.classify() {
            Category::Syntax | Category::Eof | Category::Io => ApiError::MalformedJson(inner.to_string()),
            Category::Data => {
                // serde's message without the " at line 1 column 42" suffix.
                let message = inner.to_string();
                let message = message.split(" at line ").next().unwrap_or(&message).to_owned();
                let parent = if path == "." { String::new() } else { path };
                // A missing field is reported at its parent's path; name the field itself.
                let field = match message.strip_prefix("missing field `").and_then(|m| m.split('`').next()) {
                    Some(missing) if parent.is_empty() => missing.to_owned(),
                    Some(missing) => format!("{parent}.{missing}"),
                    None if parent.is_empty() => "body".to_owned(),
                    None => parent,
                };
                ApiError::InvalidBody { fields: [(field, message)].into_iter().collect() }
            }
        }
    })?;
    // Trailing garbage after the value is malformed JSON too.
    de.end().map_err(|e| ApiError::MalformedJson(e.to_string()))?;
    Ok(value)
}

/// The client's ip (the TCP peer; proxies come with the gateway work) and user agent.
pub struct Origin(pub RequestOrigin);

const MAX_USER_AGENT: usize = 512;

/// Ip and user agent of a request (no impersonator: see `CurrentUser::origin`).
pub fn origin_of(headers: &axum::http::HeaderMap, extensions: &axum::http::Extensions) -> RequestOrigin {
    let ip = extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip().to_string());
    let user_agent = headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .map(|ua| ua.chars().take(MAX_USER_AGENT).collect());
    RequestOrigin { ip, user_agent, impersonator: None }
}

impl<S: Send + Sync> FromRequestParts<S> for Origin {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(Origin(origin_of(&parts.headers, &parts.extensions)))
    }
}

/// A signed-in user, from `Authorization: Bearer <access token>`, or the user of an
/// account's API key (`Bearer tg_live_...`). An access token's signature and expiry
/// are checked offline; its session and user are then loaded, so a revoked session
/// or a suspended user is refused at once, not at expiry. An API key's user is loaded
/// the same way on every request, and the key's scope follows the method (`read` for
/// GET and HEAD, `write` for the rest), so no handler can forget to check it.
pub struct CurrentUser {
    pub user: User,
    pub via: Credential,
}

/// How the caller proved who they are.
pub enum Credential {
    Session { session: Session, claims: Box<Claims> },
    ApiKey(tollgate_core::api_keys::ApiKey),
}

impl CurrentUser {
    /// The session of a signed-in caller (none for an API key).
    pub fn session(&self) -> Option<&Session> {
        match &self.via {
            Credential::Session { session, .. } => Some(session),
            Credential::ApiKey(_) => None,
        }
    }

    fn claims(&self) -> Option<&Claims> {
        match &self.via {
            Credential::Session { claims, .. } => Some(claims),
            Credential::ApiKey(_) => None,
        }
    }

    pub fn is_impersonation(&self) -> bool {
        self.claims().is_some_and(|c| c.is_impersonation())
    }

    pub fn is_api_key(&self) -> bool {
        matches!(self.via, Credential::ApiKey(_))
    }

    /// The admin acting as this user, when the token is an impersonation token.
    pub fn impersonator(&self) -> Option<tollgate_core::ids::UserId> {
        self.claims().and_then(|c| c.impersonator())
    }

    /// Who the audit log names for what this request does.
    pub fn actor(&self) -> Actor {
        if let Credential::ApiKey(key) = &self.via {
            return Actor::ApiKey { user: self.user.id, key: key.id };
        }
        match self.impersonator() {
            Some(admin) => Actor::Impersonator { admin, user: self.user.id },
            None => Actor::User(self.user.id),
        }
    }

    /// `origin` with the impersonator, if any, so the events it goes into name both.
    pub fn origin(&self, mut origin: RequestOrigin) -> RequestOrigin {
        origin.impersonator = self.impersonator();
        origin
    }

    /// The user's own sign-in, or 403: password, email, second factor and API keys
    /// are changed by the user, not through an impersonation token
    /// (`impersonation_forbidden`) nor with an API key (`api_key_forbidden`).
    pub fn refuse_delegated(&self) -> Result<&Session, ApiError> {
        match &self.via {
            Credential::ApiKey(_) => Err(ApiError::ApiKeyForbidden),
            Credential::Session { claims, .. } if claims.is_impersonation() => Err(ApiError::ImpersonationForbidden),
            Credential::Session { session, .. } => Ok(session),
        }
    }

    /// The session, or 403 `api_key_forbidden` (signing out and managing sessions
    /// need one).
    pub fn require_session(&self) -> Result<&Session, ApiError> {
        self.session().ok_or(ApiError::ApiKeyForbidden)
    }
}

fn bearer(parts: &Parts) -> Option<&str> {
    let value = parts.headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token.trim())
}

/// How long `last_seen_at` may lag behind: one write per session per minute at most.
const TOUCH_EVERY: time::Duration = time::Duration::minutes(1);

impl<S> FromRequestParts<S> for CurrentUser
where
    S: Send + Sync,
    AppState: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let state = AppState::from_ref(state);
        let token = bearer(parts).ok_or(ApiError::Unauthenticated)?;
        if token.starts_with(tollgate_core::api_keys::PREFIX) {
            return api_key_user(&state, &parts.method, token).await;
        }
        let claims = state.tokens.verify(token).map_err(|e: TokenError| {
            tracing::debug!(reason = %e, "access token refused");
            ApiError::Unauthenticated
        })?;
        let session_id = claims.session_id().ok_or(ApiError::Unauthenticated)?;
        let (session, user) = state.store.session_with_user(session_id).await?.ok_or(ApiError::Unauthenticated)?;
        let now = OffsetDateTime::now_utc();
        if !session.is_live(now) || user.status != UserStatus::Active || claims.user_id() != Some(user.id) {
            return Err(ApiError::Unauthenticated);
        }
        if claims.is_impersonation() {
            let admin = claims.impersonator().ok_or(ApiError::Unauthenticated)?;
            // The impersonation lasts only while its admin is an active admin: a
            // demoted or suspended admin's tokens stop at once, like the user's would.
            let acting = state.store.user_by_id(admin).await?;
            if !acting.is_some_and(|a| a.role == Role::Admin && a.status == UserStatus::Active) {
                return Err(ApiError::Unauthenticated);
            }
            if let Some(slot) = parts.extensions.get::<crate::impersonation::Slot>() {
                slot.fill(admin, user.id);
            }
        }
        if session.last_seen_at < now - TOUCH_EVERY {
            state.store.touch_session(session.id, now, now - TOUCH_EVERY).await?;
        }
        Ok(CurrentUser { user, via: Credential::Session { session, claims: Box::new(claims) } })
    }
}

/// The user of an account's API key: live key, scope for the method, active user.
async fn api_key_user(state: &AppState, method: &Method, secret: &str) -> Result<CurrentUser, ApiError> {
    use tollgate_core::api_keys::ApiKeyScope;
    let key = state.api_keys.lookup(&state.store, secret).await?.ok_or(ApiError::Unauthenticated)?;
    if !key.is_live(OffsetDateTime::now_utc()) {
        return Err(ApiError::Unauthenticated);
    }
    // The scope first: a request the key may not make costs no database read.
    let needed = if *method == Method::GET || *method == Method::HEAD { ApiKeyScope::Read } else { ApiKeyScope::Write };
    if !key.allows(needed) {
        return Err(ApiError::MissingScope(needed.as_str()));
    }
    let user = state.store.user_by_account(key.account_id).await?.ok_or(ApiError::Unauthenticated)?;
    if user.status != UserStatus::Active {
        return Err(ApiError::Unauthenticated);
    }
    state.api_keys.used(&state.store, key.id);
    Ok(CurrentUser { user, via: Credential::ApiKey(key) })
}

/// A query string: a parameter of the wrong type is a 422 `invalid_body` in the usual
/// error shape (axum's own rejection is plain text).
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let query = parts.uri.query().unwrap_or_default();
        parse_query(query).map(ApiQuery)
    }
}

fn parse_query<T: DeserializeOwned>(query: &str) -> Result<T, ApiError> {
    axum::extract::Query::<T>::try_from_uri(&format!("/?{query}").parse().map_err(|_| ApiError::InvalidBody {
        fields: [("query".to_owned(), "not a valid query string".to_owned())].into(),
    })?)
    .map(|q| q.0)
    .map_err(|e| ApiError::InvalidBody { fields: [("query".to_owned(), e.body_text())].into() })
}

/// Who calls a route open to both kinds of caller: a signed-in user, acting on their
/// own account, or a product's backend with a service key, acting on any account.
/// A `tg_sk_` bearer is a service key; anything else must be an access token.
pub enum Caller {
    User(Box<CurrentUser>),
    Service(crate::service_key::Service),
}

impl<S> FromRequestParts<S> for Caller
where
    S: Send + Sync,
    AppState: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        if bearer(parts).is_some_and(|t| t.starts_with(crate::service_key::PREFIX)) {
            Ok(Caller::Service(crate::service_key::Service::from_request_parts(parts, state).await?))
        } else {
            Ok(Caller::User(Box::new(CurrentUser::from_request_parts(parts, state).await?)))
        }
    }
}

/// Who may use the admin API: a signed-in user whose role is `admin` (active, with 2FA
/// on when `admin_require_2fa` says so, and not through an impersonation token), or a
/// service key with `admin:read` for reads and `admin:write` for changes (`admin:*`
/// for both). The scope follows the method, so no handler can forget to check it.
pub enum Admin {
    User(Box<CurrentUser>),
    Service(crate::service_key::Service),
}

impl Admin {
    /// Who the audit log names for what this admin does.
    pub fn actor(&self) -> Actor {
        match self {
            Admin::User(current) => Actor::User(current.user.id),
            Admin::Service(service) => Actor::ServiceKey(service.0.id),
        }
    }

    /// The admin user, when the admin is one (a service key is not a user).
    pub fn user_id(&self) -> Option<tollgate_core::ids::UserId> {
        match self {
            Admin::User(current) => Some(current.user.id),
            Admin::Service(_) => None,
        }
    }
}

impl<S> FromRequestParts<S> for Admin
where
    S: Send + Sync,
    AppState: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let reads = parts.method == Method::GET || parts.method == Method::HEAD;
        match Caller::from_request_parts(parts, state).await? {
            Caller::Service(service) => {
                service.require(if reads { Scope::AdminRead } else { Scope::AdminWrite })?;
                Ok(Admin::Service(service))
            }
            Caller::User(current) => {
                if current.is_impersonation() {
                    return Err(ApiError::ImpersonationForbidden);
                }
                // An API key acts as its user, never as an admin.
                if current.is_api_key() {
                    return Err(ApiError::ApiKeyForbidden);
                }
                // The role as stored now, not as the token says: a demotion applies at once.
                if current.user.role != Role::Admin {
                    return Err(ApiError::Forbidden);
                }
                if AppState::from_ref(state).config.admin_require_2fa && !current.user.totp_enabled() {
                    return Err(ApiError::Admin2faRequired);
                }
                Ok(Admin::User(current))
            }
        }
    }
}
