//! `/v1/billing/*`: hosted checkout (a plan or a credit package), the customer
//! portal, and the Stripe webhook. Checkout and portal are for a signed-in user (their
//! own account) or a backend with `billing:write` naming the account.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use serde::{Deserialize, Serialize};
use sha2::Digest;
use time::OffsetDateTime;
use tollgate_core::accounts::{Account, Scope};
use tollgate_core::billing::{BillingOutcome, CheckoutItem, CheckoutRequest, PaymentProvider};
use tollgate_core::email::{self, EmailTemplate};
use tollgate_core::identity::flows::FieldError;
use tollgate_core::identity::{EmailAddress, Locale};
use tollgate_core::ids::AccountId;
use utoipa::ToSchema;

use super::accounts::resolve_account;
use super::views::ErrorResponse;
use crate::billing::{stripe, stripe_events};
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiJson, Caller};
use crate::state::AppState;

const MAX_URL: usize = 2048;

fn invalid(field: &'static str, code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::Validation(vec![FieldError { field, code, message: message.into() }])
}

/// A redirect after checkout or from the portal: an absolute http(s) URL with a host,
/// at most 2048 characters, and — when `redirect_origins` is configured — on one of
/// those origins, so Tollgate's checkouts cannot be made to send payers anywhere.
fn check_url(state: &AppState, field: &'static str, url: &str) -> Result<(), ApiError> {
    let parsed = reqwest::Url::parse(url).ok().filter(|u| {
        url.len() <= MAX_URL && matches!(u.scheme(), "https" | "http") && u.host_str().is_some_and(|h| !h.is_empty())
    });
    let Some(parsed) = parsed else {
        return Err(invalid(field, "invalid_url", "an absolute http(s) URL of at most 2048 characters"));
    };
    let allowed = state.config.stripe.as_ref().map_or(&[][..], |s| &s.redirect_origins[..]);
    let origin = parsed.origin().ascii_serialization();
    if !allowed.is_empty() && !allowed.contains(&origin) {
        return Err(invalid(
            field,
            "origin_not_allowed",
            format!("{origin} is not among the configured redirect origins"),
        ));
    }
    Ok(())
}

/// The account a caller acts on: a user's own; a service key's named one.
async fn account_for(state: &AppState, caller: &Caller, named: Option<&str>) -> Result<Account, ApiError> {
    match caller {
        Caller::User(current) => {
            if named.is_some_and(|id| id != current.user.account_id.to_string()) {
                return Err(ApiError::NotFound);
            }
            state.store.account_by_id(current.user.account_id).await?.ok_or(ApiError::NotFound)
        }
        Caller::Service(service) => {
            service.require(Scope::BillingWrite)?;
            let id = named.ok_or_else(|| invalid("account", "required", "name the account (id or ext:<id>)"))?;
            resolve_account(state, id).await
        }
    }
}

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckoutBody {
    /// The account (service keys only; a user buys for their own).
    pub account: Option<String>,
    /// Subscribe to this plan…
    pub plan: Option<String>,
    /// …or buy this credit package.
    pub credit_package: Option<String>,
    pub success_url: String,
    pub cancel_url: String,
}

#[derive(Serialize, ToSchema)]
pub struct CheckoutView {
    pub checkout_url: String,
    pub session_id: String,
}

/// Starts a Stripe Checkout Session: `subscription` mode for a plan, `payment` mode
/// for a credit package, with the account in its metadata. The webhook completes it.
#[utoipa::path(post, path = "/v1/billing/checkout", tag = "billing", security(("bearer" = [])),
    request_body = CheckoutBody,
    responses(
        (status = 200, description = "Send the customer to `checkout_url`", body = CheckoutView),
        (status = 422, description = "Neither or both of plan and credit_package, unknown ones, bad URLs", body = ErrorResponse),
        (status = 502, description = "Stripe unreachable or refused", body = ErrorResponse),
        (status = 503, description = "`billing_not_configured`", body = ErrorResponse),
    ))]
pub async fn checkout(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiJson(body): ApiJson<CheckoutBody>,
) -> ApiResult<Json<CheckoutView>> {
    check_url(&state, "success_url", &body.success_url)?;
    check_url(&state, "cancel_url", &body.cancel_url)?;
    let catalog = state.catalog.get();
    let item = match (&body.plan, &body.credit_package) {
        (Some(plan_key), None) => {
            let plan = catalog.plan_for_sale(plan_key).ok_or_else(|| ApiError::UnknownPlan(plan_key.clone()))?;
            let price = plan
                .prices
                .iter()
                .find(|p| p.period == "month")
                .or_else(|| plan.prices.iter().find(|p| p.period == "year"))
                .ok_or_else(|| invalid("plan", "not_for_sale", "this plan has no monthly or yearly price"))?;
            CheckoutItem::Plan {
                plan: plan.key.clone(),
                name: plan.name("en").to_owned(),
                amount: price.amount,
                currency: price.currency.clone(),
                interval: price.period.clone(),
                provider_price: price.stripe_price.clone(),
                trial_days: plan.trial_days,
            }
        }
        (None, Some(package_key)) => {
            let package = catalog
                .credit_packages
                .get(package_key)
                .ok_or_else(|| ApiError::UnknownCreditPackage(package_key.clone()))?;
            CheckoutItem::Credits {
                package: package_key.clone(),
                name: package.names.get("en").cloned().unwrap_or_else(|| format!("{} credits", package.credits)),
                credits: package.credits,
                amount: package.amount,
                currency: package.currency.clone(),
                provider_price: package.stripe_price.clone(),
            }
        }
        _ => return Err(invalid("plan", "one_of", "give exactly one of plan and credit_package")),
    };
    let provider = state.billing.checkout_provider()?;
    let account = account_for(&state, &caller, body.account.as_deref()).await?;
    let customer = state.billing.customer(&state, &*provider, &account).await?;
    // A retried request with the same Idempotency-Key gets the same session (Stripe
    // keeps keys 24 hours; another body under the same key is refused: 422). The key
    // sent to Stripe is a digest of account and key, so it has a fixed length.
    let idempotency_key = match headers.get("idempotency-key").map(|v| v.to_str().map(str::trim)) {
        Some(Ok(key)) if !key.is_empty() && key.len() <= 255 => {
            let digest = sha2::Sha256::digest(format!("{}\n{key}", account.id));
            let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
            format!("tollgate-checkout-{hex}")
        }
        Some(_) => return Err(ApiError::InvalidIdempotencyKey),
        None => format!("tollgate-checkout-{}", uuid::Uuid::new_v4()),
    };
    let session = provider
        .checkout(CheckoutRequest {
            account,
            customer,
            item,
            success_url: body.success_url,
            cancel_url: body.cancel_url,
            idempotency_key,
        })
        .await?;
    Ok(Json(CheckoutView { checkout_url: session.url, session_id: session.id }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PortalBody {
    pub account: Option<String>,
    pub return_url: String,
}

#[derive(Serialize, ToSchema)]
pub struct PortalView {
    pub portal_url: String,
}

/// A Stripe customer portal session (payment methods, invoices, cancellation).
#[utoipa::path(post, path = "/v1/billing/portal", tag = "billing", security(("bearer" = [])),
    request_body = PortalBody,
    responses(
        (status = 200, description = "Send the customer to `portal_url`", body = PortalView),
        (status = 502, description = "Stripe unreachable or refused", body = ErrorResponse),
        (status = 503, description = "`billing_not_configured`", body = ErrorResponse),
    ))]
pub async fn portal(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<PortalBody>,
) -> ApiResult<Json<PortalView>> {
    check_url(&state, "return_url", &body.return_url)?;
    let provider = state.billing.checkout_provider()?;
    let account = account_for(&state, &caller, body.account.as_deref()).await?;
    let customer = state.billing.customer(&state, &*provider, &account).await?;
    Ok(Json(PortalView { portal_url: provider.portal(&customer, &body.return_url).await? }))
}

#[derive(Serialize, ToSchema)]
pub struct WebhookAnswer {
    pub received: bool,
    #[schema(value_type = String)]
    pub outcome: BillingOutcome,
}

/// Stripe's webhook. The signature is checked over the raw body before anything is
/// parsed (400 `invalid_signature`); each event id is processed once, duplicates
/// answer 200 at once; unknown event types are recorded and ignored (200).
#[utoipa::path(post, path = "/v1/billing/webhooks/stripe", tag = "billing",
    request_body(content = Object, description = "A Stripe event, signed in `Stripe-Signature`", content_type = "application/json"),
    responses(
        (status = 200, description = "Received: `applied`, `duplicate` or `ignored`", body = WebhookAnswer),
        (status = 400, description = "`invalid_signature` or `invalid_payload`", body = ErrorResponse),
        (status = 503, description = "`billing_not_configured` (no webhook secret)", body = ErrorResponse),
    ))]
pub async fn stripe_webhook(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Json<WebhookAnswer>> {
    let secret = state
        .billing
        .stripe_webhook_secret
        .as_deref()
        .ok_or(ApiError::BillingNotConfigured("Stripe webhooks (TOLLGATE_STRIPE_WEBHOOK_SECRET)"))?;
    let now = OffsetDateTime::now_utc();
    let signature = headers.get("stripe-signature").and_then(|v| v.to_str().ok());
    if let Err(reason) = stripe::verify_signature(signature, &body, secret, now.unix_timestamp()) {
        tracing::warn!(%reason, "Stripe webhook refused");
        return Err(ApiError::InvalidSignature);
    }
    let understood = stripe_events::understand(&state, &body, now).await?;
    let email = match understood.payment_failed_for {
        Some(account) => payment_failed_email(&state, account, now).await?,
        None => None,
    };
    let (event_id, event_type) = (understood.event.id.clone(), understood.event.event_type.clone());
    let outcome = state.store.apply_billing_event(understood.event, understood.effect, email).await?;
    tracing::info!(%event_id, %event_type, ?outcome, "Stripe event");
    Ok(Json(WebhookAnswer { received: true, outcome }))
}

/// The notice to the account's owner (its user, else its email) that a payment failed,
/// pointing at the product's site where the payment method can be updated.
async fn payment_failed_email(
    state: &AppState,
    account: AccountId,
    now: OffsetDateTime,
) -> Result<Option<email::NewEmail>, ApiError> {
    let (to, locale) = match state.store.user_by_account(account).await? {
        Some(user) => (user.email, user.locale),
        None => match state.store.account_by_id(account).await?.and_then(|a| a.email) {
            Some(address) => match EmailAddress::parse(&address) {
                Ok(to) => (to, Locale::En),
                Err(_) => return Ok(None),
            },
            None => return Ok(None),
        },
    };
    Ok(Some(email::render(EmailTemplate::PaymentFailed, locale, &state.config.public_url, to, now)))
}
