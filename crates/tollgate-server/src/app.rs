//! The whole HTTP surface in one function: every route, its group's middleware, and
//! the layers every request passes through. The OpenAPI document is generated from
//! the same route list, so it cannot miss a route.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use utoipa_swagger_ui::SwaggerUi;

use crate::error::{ApiError, rate_limit_headers};
use crate::observe::ObserveLayer;
use crate::routes::{
    accounts, admin, admin_accounts, admin_plans, admin_reports, admin_system, api_keys, auth, billing, credits, me,
    mfa, ops, pages, plans, ratelimit, usage,
};
use crate::state::AppState;

/// Largest accepted request body.
pub const BODY_LIMIT: usize = 1024 * 1024;

#[derive(OpenApi)]
#[openapi(
    info(title = "Tollgate", description = "Accounts and sign-in, plans, quotas, credits and billing for any SaaS product."),
    modifiers(&BearerAuth),
    tags(
        (name = "auth", description = "Registration, login, tokens, password reset, magic links"),
        (name = "me", description = "The signed-in user"),
        (name = "2fa", description = "Two-factor authentication (TOTP)"),
        (name = "operations", description = "Health, metrics, keys"),
        (name = "pages", description = "HTML pages behind the links in emails"),
        (name = "plans", description = "The public price list"),
        (name = "accounts", description = "Customers, subscriptions, entitlements (service key)"),
        (name = "usage", description = "Check and consume quotas: the hot path (service key)"),
        (name = "credits", description = "Credit packages, balances, spending, grants, payments"),
        (name = "billing", description = "Stripe checkout, customer portal and webhooks"),
        (name = "admin", description = "Users, the audit log and reports (admin users, or service keys with admin:read / admin:write)"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let mut scheme = Http::new(HttpAuthScheme::Bearer);
        scheme.bearer_format = Some("JWT".into());
        components.add_security_scheme("bearer", SecurityScheme::Http(scheme));
    }
}

/// The routes and their OpenAPI description, before state and layers.
fn api_routes(state: &AppState) -> OpenApiRouter<AppState> {
    let auth = OpenApiRouter::new()
        .routes(routes!(auth::register))
        .routes(routes!(auth::verify_email))
        .routes(routes!(auth::resend_verification))
        .routes(routes!(auth::login))
        .routes(routes!(auth::login_mfa))
        .routes(routes!(auth::refresh))
        .routes(routes!(auth::logout))
        .routes(routes!(auth::forgot_password))
        .routes(routes!(auth::reset_password))
        .routes(routes!(auth::magic_link))
        .routes(routes!(auth::magic_link_verify))
        .route_layer(middleware::from_fn_with_state(state.clone(), limit_auth_by_ip));
    let me = OpenApiRouter::new()
        .routes(routes!(me::get_me, me::update_me))
        .routes(routes!(me::change_password))
        .routes(routes!(me::change_email))
        .routes(routes!(me::list_sessions, me::revoke_other_sessions))
        .routes(routes!(me::revoke_session))
        .routes(routes!(api_keys::create, api_keys::list))
        .routes(routes!(api_keys::revoke))
        .routes(routes!(mfa::setup))
        .routes(routes!(mfa::enable))
        .routes(routes!(mfa::disable))
        .routes(routes!(mfa::regenerate_recovery_codes))
        .routes(routes!(accounts::my_entitlements))
        .routes(routes!(credits::my_balance))
        .routes(routes!(credits::my_transactions))
        .routes(routes!(credits::my_spend))
        .routes(routes!(credits::my_payments))
        .route_layer(middleware::from_fn_with_state(state.clone(), crate::impersonation::record_requests));
    let product = OpenApiRouter::new()
        .routes(routes!(plans::list_plans))
        .routes(routes!(accounts::create_account))
        .routes(routes!(accounts::get_account))
        .routes(routes!(accounts::put_subscription, accounts::cancel_subscription))
        .routes(routes!(accounts::entitlements))
        .routes(routes!(accounts::usage))
        .routes(routes!(usage::check))
        .routes(routes!(usage::consume))
        .routes(routes!(usage::refund))
        .routes(routes!(usage::set))
        .routes(routes!(usage::add))
        .routes(routes!(usage::acquire))
        .routes(routes!(usage::release))
        .routes(routes!(usage::reserve))
        .routes(routes!(usage::commit))
        .routes(routes!(usage::release_reservation))
        .routes(routes!(ratelimit::check))
        .routes(routes!(credits::list_packages))
        .routes(routes!(credits::balance))
        .routes(routes!(credits::transactions))
        .routes(routes!(credits::spend))
        .routes(routes!(credits::grant))
        .routes(routes!(credits::refund))
        .routes(routes!(credits::payments))
        .routes(routes!(billing::stripe_webhook));
    // Open to users and service keys: a user's impersonation token is recorded here too.
    let billing = OpenApiRouter::new()
        .routes(routes!(billing::checkout))
        .routes(routes!(billing::portal))
        .route_layer(middleware::from_fn_with_state(state.clone(), crate::impersonation::record_requests));
    let admin = OpenApiRouter::new()
        .routes(routes!(admin::list_users))
        .routes(routes!(admin::get_user, admin::update_user, admin::delete_user))
        .routes(routes!(admin::revoke_sessions))
        .routes(routes!(admin::clear_rate_limits))
        .routes(routes!(admin::impersonate))
        .routes(routes!(admin::audit_log))
        .routes(routes!(admin_accounts::adjust_credits))
        .routes(routes!(admin_accounts::reset_quotas))
        .routes(routes!(admin_accounts::put_subscription))
        .routes(routes!(admin_accounts::get_limits, admin_accounts::put_limits))
        .routes(routes!(admin_plans::list_plans, admin_plans::create_plan))
        .routes(routes!(admin_plans::update_plan, admin_plans::remove_plan))
        .routes(routes!(admin_system::health))
        .routes(routes!(admin_system::cleanup))
        .routes(routes!(admin_reports::stats))
        .routes(routes!(admin_reports::usage_analytics))
        .routes(routes!(admin_reports::usage_logs))
        .routes(routes!(admin_reports::payments));
    let operations = OpenApiRouter::new()
        .routes(routes!(ops::healthz))
        .routes(routes!(ops::readyz))
        .routes(routes!(ops::metrics))
        .routes(routes!(ops::jwks));
    // The pages behind emailed links share the auth group's per-ip limit.
    let pages = OpenApiRouter::new()
        .routes(routes!(pages::verify_email))
        .routes(routes!(pages::reset_password_form, pages::reset_password))
        .route_layer(middleware::from_fn_with_state(state.clone(), limit_auth_by_ip));
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(auth)
        .merge(me)
        .merge(product)
        .merge(billing)
        .merge(admin)
        .merge(operations)
        .merge(pages)
}

/// The OpenAPI 3.1 document served at `/openapi.json`.
pub fn openapi(state: &AppState) -> utoipa::openapi::OpenApi {
    api_routes(state).into_openapi()
}

pub fn router(state: AppState) -> Router {
    crate::metrics::install();
    let (routes, openapi) = api_routes(&state).split_for_parts();
    routes
        .merge(SwaggerUi::new("/docs").url("/openapi.json", openapi))
        .fallback(ops::not_found)
        .method_not_allowed_fallback(ops::method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(ObserveLayer)
        .with_state(state)
}

/// The rate-limit identity of a client address: IPv4 as is, IPv6 by its /64, since
/// one end site usually holds a whole /64 and could otherwise rotate addresses.
fn client_key(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
    }
}

/// Every auth endpoint counts against the client ip's budget.
async fn limit_auth_by_ip(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let client = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or_else(|| "unknown".to_owned(), |c| client_key(c.0.ip()));
    let decision = state.limiter.hit(&format!("auth-ip:{client}"), state.config.auth.ip_limit, 1).await;
    if !decision.allowed {
        return ApiError::RateLimited {
            retry_after: decision.retry_after.unwrap_or(Duration::from_secs(1)),
            limit: decision.limit,
            reset_after: decision.reset_after,
        }
        .into_response();
    }
    let mut response = next.run(request).await;
    rate_limit_headers(response.headers_mut(), decision.limit, decision.remaining, decision.reset_after, None);
    response
}

#[cfg(test)]
mod tests {
    use super::client_key;

    #[test]
    fn ipv6_clients_are_limited_per_64() {
        assert_eq!(client_key("203.0.113.7".parse().unwrap()), "203.0.113.7");
        assert_eq!(client_key("::ffff:203.0.113.7".parse().unwrap()), "203.0.113.7");
        let a = client_key("2001:db8:1:2:aaaa::1".parse().unwrap());
        let b = client_key("2001:db8:1:2:bbbb:cccc::9".parse().unwrap());
        assert_eq!(a, b);
        assert_eq!(a, "2001:db8:1:2::/64");
        assert_ne!(a, client_key("2001:db8:1:3::1".parse().unwrap()));
    }
}
