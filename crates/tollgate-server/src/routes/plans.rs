//! `GET /v1/plans`: the public price list, localized by `Accept-Language`.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, header};
use serde::Serialize;
use tollgate_core::identity::Locale;
use tollgate_core::plans::{Allowance, Plan, Price};
use utoipa::ToSchema;

use crate::state::AppState;

#[derive(Serialize, ToSchema)]
pub struct PriceView {
    /// Integer minor units (cents; XOF has none).
    pub amount: i64,
    pub currency: String,
    pub period: String,
}

#[derive(Serialize, ToSchema)]
pub struct PlanView {
    pub key: String,
    pub name: String,
    pub description: Option<String>,
    pub prices: Vec<PriceView>,
    pub trial_days: u32,
    #[schema(value_type = Object)]
    pub features: BTreeMap<String, serde_json::Value>,
    /// Per meter: the allowance (`counter` windows with `limit` or null for unlimited,
    /// `cap`/`gauge`/`concurrency` `max`, `flag` `enabled`).
    #[schema(value_type = Object)]
    pub limits: BTreeMap<String, Allowance>,
    #[schema(value_type = Object)]
    pub rate_limits: BTreeMap<String, tollgate_core::ratelimit::RateLimit>,
    pub default: bool,
}

impl PlanView {
    pub fn new(plan: &Plan, locale: &str) -> Self {
        let rate_limits =
            plan.rate_limits.keys().filter_map(|scope| Some((scope.clone(), plan.rate_limit(scope)?))).collect();
        Self {
            key: plan.key.clone(),
            name: plan.name(locale).to_owned(),
            description: plan.description(locale).map(str::to_owned),
            prices: plan
                .prices
                .iter()
                .map(|Price { amount, currency, period, .. }| PriceView {
                    amount: *amount,
                    currency: currency.clone(),
                    period: period.clone(),
                })
                .collect(),
            trial_days: plan.trial_days,
            features: plan.features.clone(),
            limits: plan.allowances.clone(),
            rate_limits,
            default: plan.default,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct PlanList {
    pub plans: Vec<PlanView>,
}

pub fn locale(headers: &HeaderMap) -> Locale {
    headers.get(header::ACCEPT_LANGUAGE).and_then(|v| v.to_str().ok()).and_then(Locale::negotiate).unwrap_or_default()
}

/// Visible plans in display order, names and descriptions in the caller's language.
#[utoipa::path(get, path = "/v1/plans", tag = "plans",
    params(("Accept-Language" = Option<String>, Header, description = "`fr` or `en`")),
    responses((status = 200, description = "The public plans", body = PlanList)))]
pub async fn list_plans(State(state): State<AppState>, headers: HeaderMap) -> Json<PlanList> {
    let locale = locale(&headers);
    let catalog = state.catalog.get();
    Json(PlanList { plans: catalog.public_plans().into_iter().map(|p| PlanView::new(p, locale.as_str())).collect() })
}
