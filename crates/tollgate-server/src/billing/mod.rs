//! Payment providers behind [`PaymentProvider`]: Stripe (`stripe.rs`, its events in
//! `stripe_events.rs`) and the `manual` provider (plans set through the API, no
//! hosted checkout). `Billing` holds the configured ones and the flows around them:
//! a provider customer per account, created when first needed.

pub mod stripe;
pub mod stripe_events;

use std::sync::Arc;

use async_trait::async_trait;
use tollgate_core::accounts::Account;
use tollgate_core::billing::{Checkout, CheckoutRequest, PaymentProvider, ProviderError};

use crate::config::Config;
use crate::error::ApiError;
use crate::state::AppState;

/// Subscriptions set through `POST /v1/accounts/{id}/subscription`: nothing to pay
/// through Tollgate, so no checkout or portal; cancelling has nothing remote to do.
pub struct ManualProvider;

#[async_trait]
impl PaymentProvider for ManualProvider {
    fn name(&self) -> &'static str {
        "manual"
    }

    async fn create_customer(&self, account: &Account, _email: Option<&str>) -> Result<String, ProviderError> {
        Ok(format!("manual:{}", account.id))
    }

    async fn checkout(&self, _request: CheckoutRequest) -> Result<Checkout, ProviderError> {
        Err(ProviderError::Unsupported(
            "the manual provider has no checkout: set the plan with POST /v1/accounts/{id}/subscription",
        ))
    }

    async fn portal(&self, _customer: &str, _return_url: &str) -> Result<String, ProviderError> {
        Err(ProviderError::Unsupported("the manual provider has no customer portal"))
    }

    async fn cancel_subscription(&self, _provider_subscription_id: &str) -> Result<(), ProviderError> {
        Ok(())
    }
}

pub struct Billing {
    /// Present when `TOLLGATE_STRIPE_SECRET_KEY` is set.
    pub stripe: Option<Arc<stripe::StripeClient>>,
    /// Present when `TOLLGATE_STRIPE_WEBHOOK_SECRET` is set.
    pub stripe_webhook_secret: Option<String>,
    pub manual: ManualProvider,
}

impl Billing {
    pub fn from_config(config: &Config) -> anyhow::Result<Self> {
        let (stripe, stripe_webhook_secret) = match &config.stripe {
            Some(c) => (
                c.secret_key.clone().map(|key| stripe::StripeClient::new(c, key).map(Arc::new)).transpose()?,
                c.webhook_secret.clone(),
            ),
            None => (None, None),
        };
        Ok(Self { stripe, stripe_webhook_secret, manual: ManualProvider })
    }

    /// The provider hosted checkouts go through.
    pub fn checkout_provider(&self) -> Result<Arc<stripe::StripeClient>, ApiError> {
        self.stripe.clone().ok_or(ApiError::BillingNotConfigured("Stripe (TOLLGATE_STRIPE_SECRET_KEY)"))
    }

    /// The account's customer at `provider`, created there and linked on first use.
    pub async fn customer(
        &self,
        state: &AppState,
        provider: &dyn PaymentProvider,
        account: &Account,
    ) -> Result<String, ApiError> {
        if let Some(customer) = state.store.provider_customer(account.id, provider.name()).await? {
            return Ok(customer);
        }
        let email = match &account.email {
            Some(email) => Some(email.clone()),
            None => state.store.user_by_account(account.id).await?.map(|u| u.email.as_str().to_owned()),
        };
        let created = provider.create_customer(account, email.as_deref()).await?;
        Ok(state.store.link_provider_customer(account.id, provider.name(), &created).await?)
    }
}

impl From<ProviderError> for ApiError {
    fn from(e: ProviderError) -> Self {
        match e {
            ProviderError::Unsupported(what) => ApiError::BillingUnsupported(what),
            ProviderError::Unavailable(s) => ApiError::PaymentProviderUnavailable(s),
            ProviderError::Refused(s) => ApiError::PaymentProviderRefused(s),
            ProviderError::IdempotencyConflict => ApiError::IdempotencyKeyReused,
        }
    }
}
