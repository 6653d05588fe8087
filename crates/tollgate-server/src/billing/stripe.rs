//! Stripe: one hand-written client for the few calls Tollgate makes (form-encoded,
//! `Stripe-Version` pinned, an `Idempotency-Key` on every POST, no redirects, bounded
//! timeouts) and the verification of `Stripe-Signature` on webhooks. What events mean
//! is in `stripe_events.rs`.

use std::time::Duration;

use async_trait::async_trait;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::Value;
use tollgate_core::accounts::Account;
use tollgate_core::billing::{Checkout, CheckoutItem, CheckoutRequest, PaymentProvider, ProviderError};

use crate::config::StripeConfig;

pub const PROVIDER: &str = "stripe";

/// How old a signed webhook may be (Stripe's libraries default to 5 minutes).
pub const SIGNATURE_TOLERANCE_SECONDS: i64 = 300;

pub struct StripeClient {
    http: reqwest::Client,
    base: String,
    secret_key: String,
    version: String,
}

impl StripeClient {
    pub fn new(config: &StripeConfig, secret_key: String) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(20))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("Tollgate/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self { http, base: config.api_base.clone(), secret_key, version: config.api_version.clone() })
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Value, ProviderError> {
        let response = request
            .bearer_auth(&self.secret_key)
            .header("Stripe-Version", &self.version)
            .send()
            .await
            .map_err(|e| ProviderError::Unavailable(format!("Stripe: {e}")))?;
        let status = response.status();
        let body: Value = response.json().await.map_err(|e| ProviderError::Unavailable(format!("Stripe: {e}")))?;
        if status.is_success() {
            return Ok(body);
        }
        let message = body["error"]["message"].as_str().unwrap_or("no message").to_owned();
        if body["error"]["type"] == "idempotency_error" {
            return Err(ProviderError::IdempotencyConflict);
        }
        if status.is_server_error() || status.as_u16() == 429 {
            Err(ProviderError::Unavailable(format!("Stripe {status}: {message}")))
        } else {
            Err(ProviderError::Refused(format!("Stripe {status}: {message}")))
        }
    }

    async fn post(&self, path: &str, form: &[(String, String)], idempotency_key: &str) -> Result<Value, ProviderError> {
        let request =
            self.http.post(format!("{}{path}", self.base)).header("Idempotency-Key", idempotency_key).form(form);
        self.send(request).await
    }

    pub async fn retrieve_subscription(&self, id: &str) -> Result<Value, ProviderError> {
        self.send(self.http.get(format!("{}/v1/subscriptions/{id}", self.base))).await
    }
}

fn field(name: &str, value: impl Into<String>) -> (String, String) {
    (name.to_owned(), value.into())
}

fn id_of(object: &Value) -> Result<String, ProviderError> {
    object["id"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| ProviderError::Refused("Stripe answered without an id".into()))
}

#[async_trait]
impl PaymentProvider for StripeClient {
    fn name(&self) -> &'static str {
        PROVIDER
    }

    async fn create_customer(&self, account: &Account, email: Option<&str>) -> Result<String, ProviderError> {
        let mut form = vec![field("metadata[account_id]", account.id.to_string())];
        if let Some(email) = email {
            form.push(field("email", email));
        }
        if let Some(name) = &account.name {
            form.push(field("name", name.clone()));
        }
        // One customer per account even when two requests race: Stripe answers the
        // second with the first's customer for 24 hours.
        let customer = self.post("/v1/customers", &form, &format!("tollgate-customer-{}", account.id)).await?;
        id_of(&customer)
    }

    async fn checkout(&self, request: CheckoutRequest) -> Result<Checkout, ProviderError> {
        let account = request.account.id.to_string();
        let mut form = vec![
            field("customer", request.customer),
            field("client_reference_id", account.clone()),
            field("success_url", request.success_url),
            field("cancel_url", request.cancel_url),
            field("line_items[0][quantity]", "1"),
            field("metadata[account_id]", account.clone()),
        ];
        match request.item {
            CheckoutItem::Plan { plan, name, amount, currency, interval, provider_price, trial_days } => {
                form.push(field("mode", "subscription"));
                match provider_price {
                    Some(price) => form.push(field("line_items[0][price]", price)),
                    None => form.extend([
                        field("line_items[0][price_data][currency]", currency.to_lowercase()),
                        field("line_items[0][price_data][unit_amount]", amount.to_string()),
                        field("line_items[0][price_data][product_data][name]", name),
                        field("line_items[0][price_data][recurring][interval]", interval),
                    ]),
                }
                form.extend([
                    field("metadata[plan]", plan.clone()),
                    field("subscription_data[metadata][account_id]", account),
                    field("subscription_data[metadata][plan]", plan),
                ]);
                if trial_days > 0 {
                    form.push(field("subscription_data[trial_period_days]", trial_days.to_string()));
                }
            }
            CheckoutItem::Credits { package, name, credits, amount, currency, provider_price } => {
                form.push(field("mode", "payment"));
                match provider_price {
                    Some(price) => form.push(field("line_items[0][price]", price)),
                    None => form.extend([
                        field("line_items[0][price_data][currency]", currency.to_lowercase()),
                        field("line_items[0][price_data][unit_amount]", amount.to_string()),
                        field("line_items[0][price_data][product_data][name]", name),
                    ]),
                }
                form.extend([
                    field("metadata[credit_package]", package.clone()),
                    field("metadata[credits]", credits.to_string()),
                    field("payment_intent_data[metadata][account_id]", account),
                    field("payment_intent_data[metadata][credit_package]", package),
                ]);
            }
        }
        let session = self.post("/v1/checkout/sessions", &form, &request.idempotency_key).await?;
        let url =
            session["url"].as_str().ok_or_else(|| ProviderError::Refused("checkout session without url".into()))?;
        Ok(Checkout { id: id_of(&session)?, url: url.to_owned() })
    }

    async fn portal(&self, customer: &str, return_url: &str) -> Result<String, ProviderError> {
        let form = [field("customer", customer), field("return_url", return_url)];
        let key = uuid::Uuid::new_v4().to_string();
        let session = self.post("/v1/billing_portal/sessions", &form, &key).await?;
        session["url"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| ProviderError::Refused("portal session without url".into()))
    }

    async fn cancel_subscription(&self, provider_subscription_id: &str) -> Result<(), ProviderError> {
        self.send(self.http.delete(format!("{}/v1/subscriptions/{provider_subscription_id}", self.base))).await?;
        Ok(())
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("no Stripe-Signature header")]
    Missing,
    #[error("Stripe-Signature has no timestamp or no v1 signature")]
    Malformed,
    #[error("timestamp outside the tolerance")]
    Stale,
    #[error("no signature matches")]
    Mismatch,
}

/// Verifies `Stripe-Signature: t=<unix>,v1=<hex>[,v1=<hex>...]` over the raw body:
/// HMAC-SHA256 keyed with the endpoint secret over `"{t}.{body}"`; any one `v1` may
/// match (Stripe sends several while a secret is rolled); compared in constant time;
/// the timestamp must be within the tolerance either way.
pub fn verify_signature(header: Option<&str>, body: &[u8], secret: &str, now: i64) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", t)) => timestamp = t.parse::<i64>().ok(),
            Some(("v1", sig)) => {
                if let Ok(bytes) = hex::decode(sig) {
                    signatures.push(bytes);
                }
            }
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or(SignatureError::Malformed)?;
    if signatures.is_empty() {
        return Err(SignatureError::Malformed);
    }
    if now.abs_diff(timestamp) > SIGNATURE_TOLERANCE_SECONDS.unsigned_abs() {
        return Err(SignatureError::Stale);
    }
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).map_err(|_| SignatureError::Mismatch)?;
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let expected = mac.finalize().into_bytes();
    let matched =
        signatures.iter().any(|sig| subtle::ConstantTimeEq::ct_eq(sig.as_slice(), expected.as_slice()).into());
    if matched { Ok(()) } else { Err(SignatureError::Mismatch) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(secret: &str, t: i64, body: &str) -> String {
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(format!("{t}.{body}").as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    #[test]
    fn signatures_are_checked_over_the_raw_body_within_the_tolerance() {
        let (secret, body, t) = ("whsec_test", r#"{"id":"evt_1"}"#, 1_700_000_000);
        let good = format!("t={t},v1={}", sign(secret, t, body));
        assert_eq!(verify_signature(Some(&good), body.as_bytes(), secret, t + 10), Ok(()));
        // Any of several v1 signatures (a secret being rolled), v0 ignored.
        let several = format!("t={t},v1={},v1={},v0=abc", sign("whsec_old", t, body), sign(secret, t, body));
        assert_eq!(verify_signature(Some(&several), body.as_bytes(), secret, t), Ok(()));
        assert_eq!(verify_signature(Some(&good), br#"{"id":"evt_2"}"#, secret, t), Err(SignatureError::Mismatch));
        assert_eq!(verify_signature(Some(&good), body.as_bytes(), "whsec_other", t), Err(SignatureError::Mismatch));
        assert_eq!(verify_signature(Some(&good), body.as_bytes(), secret, t + 301), Err(SignatureError::Stale));
        assert_eq!(verify_signature(Some(&good), body.as_bytes(), secret, t - 301), Err(SignatureError::Stale));
        assert_eq!(verify_signature(None, body.as_bytes(), secret, t), Err(SignatureError::Missing));
        assert_eq!(verify_signature(Some("v1=00"), body.as_bytes(), secret, t), Err(SignatureError::Malformed));
        assert_eq!(
            verify_signature(Some(&format!("t={t}")), body.as_bytes(), secret, t),
            Err(SignatureError::Malformed)
        );
        let tampered_time = format!("t={},v1={}", t + 1, sign(secret, t, body));
        assert_eq!(verify_signature(Some(&tampered_time), body.as_bytes(), secret, t), Err(SignatureError::Mismatch));
    }
}
