//! `/v1/admin/plans`: the plans as the admin sees them (archived ones too) and
//! changes to one plan at a time. Each change is validated like a plan in the plans
//! file, stored with its audit event in one transaction, and served by this node at
//! once (by the others within `PLANS_RELOAD_EVERY`). A changed plans file, applied at
//! the next start or by `tollgate plans apply`, replaces what was changed here.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Serialize;
use time::OffsetDateTime;
use tollgate_core::audit::{AuditEvent, RequestOrigin, Severity};
use tollgate_core::identity::flows::FieldError;
use tollgate_core::plans::{Plan, PlanPatch, PlanSpec, plan_from_spec};
use tollgate_core::store::{PlanRemoval, StoreError};
use utoipa::ToSchema;

use super::views::ErrorResponse;
use crate::error::{ApiError, ApiResult};
use crate::extract::{Admin, ApiJson, Origin};
use crate::state::AppState;

/// A plan with everything it declares and whether it is archived.
#[derive(Serialize, ToSchema)]
pub struct AdminPlan {
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub plan: Plan,
    /// No longer sold or listed; still in force for its subscribers.
    pub archived: bool,
}

impl From<&Plan> for AdminPlan {
    fn from(plan: &Plan) -> Self {
        Self { plan: plan.clone(), archived: plan.archived }
    }
}

#[derive(Serialize, ToSchema)]
pub struct AdminPlanList {
    pub plans: Vec<AdminPlan>,
}

#[derive(Serialize, ToSchema)]
pub struct PlanRemoved {
    pub key: String,
    /// `deleted`, or `archived` when a subscription still uses the plan.
    #[schema(value_type = String)]
    pub outcome: PlanRemoval,
}

/// 422 `invalid_plan`, one entry per problem (validation, or a body that is not a plan).
fn invalid<E: ToString>(errors: impl IntoIterator<Item = E>) -> ApiError {
    ApiError::Validation(
        errors
            .into_iter()
            .map(|e| FieldError { field: "plan", code: "invalid_plan", message: e.to_string() })
            .collect(),
    )
}

fn plan_event(admin: &Admin, action: &str, origin: &RequestOrigin, key: &str, now: OffsetDateTime) -> AuditEvent {
    AuditEvent::new(admin.actor(), action, origin, now).target("plan", key).severity(Severity::Warning)
}

/// Serves what was just stored (a failure to reload is logged; the periodic reload
/// catches up).
async fn serve_stored(state: &AppState) {
    if let Err(e) = state.catalog.reload(&state.store).await {
        tracing::warn!(error = %e, "could not reload plans after an admin change");
    }
}

/// Every plan, archived ones included, in display order.
#[utoipa::path(get, path = "/v1/admin/plans", tag = "admin", security(("bearer" = [])),
    responses((status = 200, description = "All plans", body = AdminPlanList)))]
pub async fn list_plans(State(state): State<AppState>, _admin: Admin) -> Json<AdminPlanList> {
    let catalog = state.catalog.get();
    let mut plans: Vec<&Plan> = catalog.plans.values().collect();
    plans.sort_by(|a, b| a.order.cmp(&b.order).then_with(|| a.key.cmp(&b.key)));
    Json(AdminPlanList { plans: plans.into_iter().map(AdminPlan::from).collect() })
}

/// Creates a plan, written as in the plans file (`names`, `prices`, `limits`,
/// `features`, `rate_limits`, ...) plus its `key`. It cannot be the default plan
/// (the plans file decides that).
#[utoipa::path(post, path = "/v1/admin/plans", tag = "admin", security(("bearer" = [])),
    request_body(content = Object, description = "`key` and the plan as in a plans file"),
    responses(
        (status = 201, description = "Created", body = AdminPlan),
        (status = 409, description = "`plan_exists` (archived ones count)", body = ErrorResponse),
        (status = 422, description = "`invalid_plan`, with every problem listed", body = ErrorResponse),
    ))]
pub async fn create_plan(
    State(state): State<AppState>,
    admin: Admin,
    Origin(origin): Origin,
    ApiJson(mut body): ApiJson<serde_json::Map<String, serde_json::Value>>,
) -> ApiResult<(StatusCode, Json<AdminPlan>)> {
    let key = match body.remove("key") {
        Some(serde_json::Value::String(key)) => key,
        _ => {
            let message = "a string: a-z, 0-9, _ and - (at most 64)".to_owned();
            return Err(ApiError::Validation(vec![FieldError { field: "key", code: "required", message }]));
        }
    };
    let spec: PlanSpec = serde_json::from_value(serde_json::Value::Object(body)).map_err(|e| invalid([e]))?;
    if spec.default {
        let message = "the default plan is chosen in the plans file".to_owned();
        return Err(ApiError::Validation(vec![FieldError { field: "default", code: "not_allowed", message }]));
    }
    serve_stored(&state).await;
    let catalog = state.catalog.get();
    let plan = plan_from_spec(key.clone(), spec, &catalog.meters).map_err(invalid)?;
    let now = OffsetDateTime::now_utc();
    let audit = plan_event(&admin, "admin.plan.created", &origin, &key, now)
        .meta("plan", serde_json::to_value(&plan).unwrap_or_default());
    match state.store.put_plan(&plan, None, audit, now).await {
        Err(StoreError::Conflict("plans_key")) => return Err(ApiError::PlanExists(key)),
        other => other?,
    }
    serve_stored(&state).await;
    Ok((StatusCode::CREATED, Json(AdminPlan::from(&plan))))
}

/// Changes a plan: the fields given replace the plan's (`limits` merges per meter,
/// `null` removing one); `archived: true` stops selling it, `false` sells it again.
#[utoipa::path(patch, path = "/v1/admin/plans/{key}", tag = "admin", security(("bearer" = [])),
    params(("key" = String, Path, description = "The plan's key")),
    request_body(content = Object, description = "Any of: names, descriptions, prices, trial_days, features, \
        limits, rate_limits, rate_limit_multiplier, visible, order, credits_overdraft, archived"),
    responses(
        (status = 200, description = "Changed", body = AdminPlan),
        (status = 404, description = "No such plan", body = ErrorResponse),
        (status = 409, description = "`concurrent_change`: the plan changed since it was read", body = ErrorResponse),
        (status = 422, description = "`invalid_plan`, e.g. archiving the default plan", body = ErrorResponse),
    ))]
pub async fn update_plan(
    State(state): State<AppState>,
    admin: Admin,
    Origin(origin): Origin,
    Path(key): Path<String>,
    ApiJson(patch): ApiJson<serde_json::Value>,
) -> ApiResult<Json<AdminPlan>> {
    // The latest stored plans, not up to 5 s old ones; the store refuses the change
    // if the plan still changed in between (409 `concurrent_change`).
    serve_stored(&state).await;
    let catalog = state.catalog.get();
    let current = catalog.plans.get(&key).ok_or(ApiError::NotFound)?;
    let fields: Vec<String> = patch.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default();
    let patch: PlanPatch = serde_json::from_value(patch).map_err(|e| invalid([e]))?;
    let plan = current.patched(patch, &catalog.meters).map_err(invalid)?;
    let now = OffsetDateTime::now_utc();
    let audit = plan_event(&admin, "admin.plan.updated", &origin, &key, now)
        .meta("fields", fields)
        .meta("before", serde_json::to_value(current).unwrap_or_default())
        .meta("after", serde_json::to_value(&plan).unwrap_or_default())
        .meta("archived", plan.archived);
    state.store.put_plan(&plan, Some(current), audit, now).await?;
    serve_stored(&state).await;
    Ok(Json(AdminPlan::from(&plan)))
}

/// Deletes a plan nobody is subscribed to, or archives it when a subscription (or a
/// scheduled change) still uses it. The default plan stays.
#[utoipa::path(delete, path = "/v1/admin/plans/{key}", tag = "admin", security(("bearer" = [])),
    params(("key" = String, Path, description = "The plan's key")),
    responses(
        (status = 200, description = "Deleted or archived", body = PlanRemoved),
        (status = 404, description = "No such plan", body = ErrorResponse),
        (status = 409, description = "`default_plan`", body = ErrorResponse),
    ))]
pub async fn remove_plan(
    State(state): State<AppState>,
    admin: Admin,
    Origin(origin): Origin,
    Path(key): Path<String>,
) -> ApiResult<Json<PlanRemoved>> {
    serve_stored(&state).await;
    let catalog = state.catalog.get();
    let plan = catalog.plans.get(&key).ok_or(ApiError::NotFound)?;
    if plan.default && !plan.archived {
        return Err(ApiError::DefaultPlan);
    }
    let now = OffsetDateTime::now_utc();
    let audit = plan_event(&admin, "admin.plan.removed", &origin, &key, now);
    let outcome = state.store.remove_plan(&key, audit, now).await?;
    serve_stored(&state).await;
    Ok(Json(PlanRemoved { key, outcome }))
}
