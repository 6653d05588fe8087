//! Plans and meters as declared in the plans file: what is counted (meters, by kind),
//! what each plan allows (limits per meter, per window), feature flags, rate limits per
//! scope, prices and names per locale. [`Catalog::from_file`] validates a whole file
//! at once, so a bad plans file is refused before anything changes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::credits::CreditPackage;
use crate::metering::window::Window;
use crate::ratelimit::RateLimit;

/// How a meter counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MeterKind {
    /// Consumed, resets per window (messages per day).
    Counter,
    /// A level that goes up and down (storage used).
    Gauge,
    /// Leases held at once, each expiring (simulations running).
    Concurrency,
    /// The largest amount allowed in one request (iterations per simulation).
    Cap,
    /// A boolean entitlement (GPU access).
    Flag,
}

/// A meter as declared.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meter {
    pub kind: MeterKind,
    /// Display unit, e.g. `message`, `byte`.
    #[serde(default)]
    pub unit: Option<String>,
    /// Names per locale, for the product's UI.
    #[serde(default)]
    pub names: BTreeMap<String, String>,
    /// HTTP status of a denial: 402 (quota, "upgrade") or 429 ("slow down").
    #[serde(default = "default_deny_status")]
    pub deny_status: u16,
    /// Concurrency meters: how long a lease lives unless released or renewed.
    #[serde(default)]
    pub lease_seconds: Option<u64>,
    /// Counters: once a window is spent, each unit costs this many credits instead of
    /// being denied (while the balance lasts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credits_per_unit: Option<i64>,
}

fn default_deny_status() -> u16 {
    402
}

/// One window of a counter limit; `limit: None` is unlimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowLimit {
    pub window: Window,
    pub limit: Option<i64>,
}

/// What a plan allows for one meter, shaped by the meter's kind.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Allowance {
    /// Every window must have room (all or nothing).
    Counter {
        windows: Vec<WindowLimit>,
    },
    /// Highest level; `None` unlimited.
    Gauge {
        max: Option<i64>,
    },
    /// Leases at once; `None` unlimited.
    Concurrency {
        max: Option<i64>,
    },
    /// Largest single amount; `None` unlimited.
    Cap {
        max: Option<i64>,
    },
    Flag {
        enabled: bool,
    },
}

impl Allowance {
    /// The meter kind this allowance is for.
    pub fn kind(&self) -> MeterKind {
        match self {
            Allowance::Counter { .. } => MeterKind::Counter,
            Allowance::Gauge { .. } => MeterKind::Gauge,
            Allowance::Concurrency { .. } => MeterKind::Concurrency,
            Allowance::Cap { .. } => MeterKind::Cap,
            Allowance::Flag { .. } => MeterKind::Flag,
        }
    }
}

/// A price in integer minor units (cents; XOF has none).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub amount: i64,
    /// ISO 4217, upper case.
    pub currency: String,
    /// `month`, `year` or `one_time`.
    pub period: String,
    /// The Stripe price to charge (otherwise the amount is sent inline).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stripe_price: Option<String>,
}

/// A plan after validation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub key: String,
    pub names: BTreeMap<String, String>,
    pub descriptions: BTreeMap<String, String>,
    pub prices: Vec<Price>,
    pub trial_days: u32,
    /// Arbitrary JSON feature flags and settings (`gpu_access = true`, `support = "email"`).
    pub features: BTreeMap<String, serde_json::Value>,
    pub allowances: BTreeMap<String, Allowance>,
    pub rate_limits: BTreeMap<String, RateLimit>,
    /// Scales every rate limit of the plan (1.0 = as declared).
    pub rate_limit_multiplier: f64,
    pub visible: bool,
    pub order: i64,
    pub default: bool,
    /// How far below zero the credit balance may go (0: never).
    #[serde(default)]
    pub credits_overdraft: i64,
    /// No longer sold (not listed, not subscribable), still in force for the
    /// accounts subscribed to it. Kept by the store beside the definition.
    #[serde(skip)]
    pub archived: bool,
}

impl Plan {
    pub fn name(&self, locale: &str) -> &str {
        self.names
            .get(locale)
            .or_else(|| self.names.get("en"))
            .or_else(|| self.names.values().next())
            .map_or(&self.key, |s| s)
    }

    pub fn description(&self, locale: &str) -> Option<&str> {
        self.descriptions.get(locale).or_else(|| self.descriptions.get("en")).map(String::as_str)
    }

    /// The plan's limit for a rate-limit scope, multiplier applied.
    pub fn rate_limit(&self, scope: &str) -> Option<RateLimit> {
        self.rate_limits.get(scope).map(|l| RateLimit {
            requests: ((f64::from(l.requests) * self.rate_limit_multiplier).round() as u32).max(1),
            window_seconds: l.window_seconds,
        })
    }
}

/// A plan as written in the file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanSpec {
    #[serde(default)]
    pub names: BTreeMap<String, String>,
    #[serde(default)]
    pub descriptions: BTreeMap<String, String>,
    #[serde(default)]
    pub prices: Vec<Price>,
    #[serde(default)]
    pub trial_days: u32,
    #[serde(default)]
    pub features: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    pub limits: BTreeMap<String, LimitSpec>,
    #[serde(default)]
    pub rate_limits: BTreeMap<String, RateLimit>,
    #[serde(default = "one")]
    pub rate_limit_multiplier: f64,
    #[serde(default = "yes")]
    pub visible: bool,
    #[serde(default)]
    pub order: i64,
    #[serde(default)]
    pub default: bool,
    #[serde(default)]
    pub credits_overdraft: i64,
}

fn one() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}

/// A limit as written: `1000`, `true`, `"unlimited"`, `{ window = "day", limit = 5 }`
/// or a list of those tables (several windows at once).
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum LimitSpec {
    Number(i64),
    Bool(bool),
    Word(String),
    Window(WindowSpec),
    Windows(Vec<WindowSpec>),
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowSpec {
    pub window: Window,
    /// A number, or `"unlimited"` (absent also means unlimited).
    #[serde(default)]
    pub limit: Option<LimitNumber>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum LimitNumber {
    Number(i64),
    Word(String),
}

/// The plans file: meters and plans.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanFile {
    #[serde(default)]
    pub meters: BTreeMap<String, Meter>,
    #[serde(default)]
    pub plans: BTreeMap<String, PlanSpec>,
    #[serde(default)]
    pub credit_packages: BTreeMap<String, CreditPackage>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{location}: {problem}")]
pub struct PlanError {
    pub location: String,
    pub problem: String,
}

fn err(location: impl Into<String>, problem: impl Into<String>) -> PlanError {
    PlanError { location: location.into(), problem: problem.into() }
}

/// Validated meters and plans.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Catalog {
    pub meters: BTreeMap<String, Meter>,
    pub plans: BTreeMap<String, Plan>,
    /// What is sold for credits; not stored (every node reads the same file).
    #[serde(default, skip)]
    pub credit_packages: BTreeMap<String, CreditPackage>,
}

/// Keys are what integrators type in API calls: keep them boring.
fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 64
        && key.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

fn unlimited_word(word: &str) -> bool {
    word.eq_ignore_ascii_case("unlimited")
}

impl Catalog {
    /// The catalog used when there is no plans file: one free plan, no meters.
    pub fn builtin() -> Self {
        let free = Plan {
            key: "free".into(),
            names: [("en".to_owned(), "Free".to_owned()), ("fr".to_owned(), "Gratuit".to_owned())].into(),
            descriptions: BTreeMap::new(),
            prices: vec![],
            trial_days: 0,
            features: BTreeMap::new(),
            allowances: BTreeMap::new(),
            rate_limits: BTreeMap::new(),
            rate_limit_multiplier: 1.0,
            visible: true,
            order: 0,
            default: true,
            credits_overdraft: 0,
            archived: false,
        };
        Self { meters: BTreeMap::new(), plans: [("free".to_owned(), free)].into(), credit_packages: BTreeMap::new() }
    }

    /// Validates a whole file; every problem is reported with where it is.
    pub fn from_file(file: PlanFile) -> Result<Self, Vec<PlanError>> {
        let mut errors = Vec::new();
        for (key, meter) in &file.meters {
            let at = format!("meters.{key}");
            if !valid_key(key) {
                errors.push(err(&at, "keys use a-z, 0-9, _ and - (at most 64)"));
            }
            if meter.deny_status != 402 && meter.deny_status != 429 {
                errors.push(err(&at, "deny_status must be 402 or 429"));
            }
            match (meter.kind, meter.lease_seconds) {
                (MeterKind::Concurrency, Some(0)) => errors.push(err(&at, "lease_seconds must be positive")),
                (MeterKind::Concurrency, _) => {}
                (_, Some(_)) => errors.push(err(&at, "lease_seconds is only for concurrency meters")),
                _ => {}
            }
            match (meter.kind, meter.credits_per_unit) {
                (MeterKind::Counter, Some(c)) if c <= 0 => errors.push(err(&at, "credits_per_unit must be positive")),
                (MeterKind::Counter, _) | (_, None) => {}
                (_, Some(_)) => errors.push(err(&at, "credits_per_unit is only for counter meters")),
            }
        }
        let mut plans = BTreeMap::new();
        // Counted before validation, so a broken default plan is not also "missing".
        let defaults = file.plans.values().filter(|p| p.default).count();
        for (key, spec) in file.plans {
            match plan_from_spec(key.clone(), spec, &file.meters) {
                Ok(plan) => {
                    plans.insert(key, plan);
                }
                Err(mut problems) => errors.append(&mut problems),
            }
        }
        match defaults {
            1 => {}
            0 => errors.push(err("plans", "exactly one plan must have default = true")),
            _ => errors.push(err("plans", "only one plan may have default = true")),
        }
        for (key, package) in &file.credit_packages {
            let at = format!("credit_packages.{key}");
            if !valid_key(key) {
                errors.push(err(&at, "keys use a-z, 0-9, _ and - (at most 64)"));
            }
            if package.credits <= 0 || package.credits > crate::credits::MAX_CREDIT_AMOUNT {
                errors.push(err(&at, "credits must be positive"));
            }
            if package.amount <= 0 {
                errors.push(err(&at, "amount must be positive (integer minor units)"));
            }
            if package.currency.len() != 3 || !package.currency.bytes().all(|b| b.is_ascii_uppercase()) {
                errors
                    .push(err(&at, format!("currency {:?} is not an ISO 4217 code like USD or XOF", package.currency)));
            }
        }
        if errors.is_empty() {
            Ok(Self { meters: file.meters, plans, credit_packages: file.credit_packages })
        } else {
            Err(errors)
        }
    }

    /// A plan that may be subscribed to or bought: known and not archived.
    pub fn plan_for_sale(&self, key: &str) -> Option<&Plan> {
        self.plans.get(key).filter(|p| !p.archived)
    }

    /// The plan of accounts without a live subscription. An archived plan is never it:
    /// a former default the file replaced keeps `default` in its stored definition.
    pub fn default_plan(&self) -> &Plan {
        self.plans.values().find(|p| p.default && !p.archived).expect("a validated catalog has a default plan")
    }

    /// Credit packages in display order.
    pub fn credit_packages(&self) -> Vec<(&String, &CreditPackage)> {
        let mut packages: Vec<_> = self.credit_packages.iter().collect();
        packages.sort_by(|a, b| a.1.order.cmp(&b.1.order).then_with(|| a.0.cmp(b.0)));
        packages
    }

    /// Visible plans in display order.
    pub fn public_plans(&self) -> Vec<&Plan> {
        let mut plans: Vec<&Plan> = self.plans.values().filter(|p| p.visible && !p.archived).collect();
        plans.sort_by(|a, b| a.order.cmp(&b.order).then_with(|| a.key.cmp(&b.key)));
        plans
    }
}

/// The longest trial a plan may offer.
pub const MAX_TRIAL_DAYS: u32 = 366;

/// Validates one plan as written against the declared meters; every problem is
/// reported with where it is (`plans.<key>...`). Used for the plans file and for
/// plans created through the admin API.
pub fn plan_from_spec(key: String, spec: PlanSpec, meters: &BTreeMap<String, Meter>) -> Result<Plan, Vec<PlanError>> {
    let mut errors = Vec::new();
    let at = format!("plans.{key}");
    if !valid_key(&key) {
        errors.push(err(&at, "keys use a-z, 0-9, _ and - (at most 64)"));
    }
    let mut allowances = BTreeMap::new();
    for (meter_key, limit) in spec.limits {
        let at = format!("{at}.limits.{meter_key}");
        let Some(meter) = meters.get(&meter_key) else {
            errors.push(err(&at, "no such meter is declared under [meters]"));
            continue;
        };
        match allowance(meter.kind, limit) {
            Ok(a) => {
                allowances.insert(meter_key, a);
            }
            Err(problem) => errors.push(err(&at, problem)),
        }
    }
    let plan = Plan {
        key,
        names: spec.names,
        descriptions: spec.descriptions,
        prices: spec.prices,
        trial_days: spec.trial_days,
        features: spec.features,
        allowances,
        rate_limits: spec.rate_limits,
        rate_limit_multiplier: spec.rate_limit_multiplier,
        visible: spec.visible,
        order: spec.order,
        default: spec.default,
        credits_overdraft: spec.credits_overdraft,
        archived: false,
    };
    errors.extend(plan.problems());
    if errors.is_empty() { Ok(plan) } else { Err(errors) }
}

impl Plan {
    /// What is wrong with the plan's own settings (prices, overdraft, rate limits);
    /// its allowances are checked against the meters when they are parsed.
    pub fn problems(&self) -> Vec<PlanError> {
        let mut errors = Vec::new();
        let at = format!("plans.{}", self.key);
        for price in &self.prices {
            if price.amount < 0 {
                errors.push(err(&at, "a price cannot be negative"));
            }
            if price.currency.len() != 3 || !price.currency.bytes().all(|b| b.is_ascii_uppercase()) {
                errors.push(err(&at, format!("currency {:?} is not an ISO 4217 code like EUR or XOF", price.currency)));
            }
            if !["month", "year", "one_time"].contains(&price.period.as_str()) {
                errors.push(err(&at, "price period must be month, year or one_time"));
            }
        }
        if self.credits_overdraft < 0 {
            errors.push(err(&at, "credits_overdraft cannot be negative"));
        }
        if self.trial_days > MAX_TRIAL_DAYS {
            errors.push(err(&at, format!("trial_days is at most {MAX_TRIAL_DAYS}")));
        }
        if !(self.rate_limit_multiplier.is_finite() && self.rate_limit_multiplier > 0.0) {
            errors.push(err(&at, "rate_limit_multiplier must be positive"));
        }
        for (scope, limit) in &self.rate_limits {
            if limit.requests == 0 || limit.window_seconds == 0 {
                errors.push(err(format!("{at}.rate_limits.{scope}"), "requests and window_seconds must be positive"));
            }
        }
        errors
    }
}

/// An admin's change to one plan (`PATCH /v1/admin/plans/{key}`): the fields given
/// replace the plan's; `limits` merges per meter (`null` removes the meter's allowance,
/// so the plan allows none of it). Which plan is the default is the plans file's call.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanPatch {
    pub names: Option<BTreeMap<String, String>>,
    pub descriptions: Option<BTreeMap<String, String>>,
    pub prices: Option<Vec<Price>>,
    pub trial_days: Option<u32>,
    pub features: Option<BTreeMap<String, serde_json::Value>>,
    pub limits: Option<BTreeMap<String, Option<LimitSpec>>>,
    pub rate_limits: Option<BTreeMap<String, RateLimit>>,
    pub rate_limit_multiplier: Option<f64>,
    pub visible: Option<bool>,
    pub order: Option<i64>,
    pub credits_overdraft: Option<i64>,
    pub archived: Option<bool>,
}

impl Plan {
    /// The plan with `patch` applied, validated like a plan in the file.
    pub fn patched(&self, patch: PlanPatch, meters: &BTreeMap<String, Meter>) -> Result<Plan, Vec<PlanError>> {
        let mut plan = self.clone();
        let mut errors = Vec::new();
        macro_rules! set {
            ($($field:ident),+) => { $( if let Some(v) = patch.$field { plan.$field = v; } )+ };
        }
        set!(names, descriptions, prices, trial_days, features, rate_limits, rate_limit_multiplier, visible, order);
        set!(credits_overdraft, archived);
        for (meter_key, limit) in patch.limits.unwrap_or_default() {
            let at = format!("plans.{}.limits.{meter_key}", self.key);
            let Some(meter) = meters.get(&meter_key) else {
                errors.push(err(&at, "no such meter is declared under [meters]"));
                continue;
            };
            match limit.map(|spec| allowance(meter.kind, spec)) {
                None => {
                    plan.allowances.remove(&meter_key);
                }
                Some(Ok(a)) => {
                    plan.allowances.insert(meter_key, a);
                }
                Some(Err(problem)) => errors.push(err(&at, problem)),
            }
        }
        let at = format!("plans.{}", self.key);
        if plan.default && !self.archived && plan.archived {
            errors.push(err(&at, "the default plan cannot be archived"));
        }
        if plan.default && self.archived && !plan.archived {
            errors.push(err(&at, "a former default plan cannot be sold again: declare it in the plans file"));
        }
        errors.extend(plan.problems());
        if errors.is_empty() { Ok(plan) } else { Err(errors) }
    }
}

fn limit_number(n: Option<LimitNumber>) -> Result<Option<i64>, String> {
    match n {
        None => Ok(None),
        Some(LimitNumber::Number(n)) if n >= 0 => Ok(Some(n)),
        Some(LimitNumber::Number(_)) => Err("a limit cannot be negative (use \"unlimited\")".into()),
        Some(LimitNumber::Word(w)) if unlimited_word(&w) => Ok(None),
        Some(LimitNumber::Word(w)) => Err(format!("{w:?} is not a number or \"unlimited\"")),
    }
}

/// A limit as written (in a plans file, or an admin's override) for a meter of `kind`.
pub fn allowance(kind: MeterKind, spec: LimitSpec) -> Result<Allowance, String> {
    let max = |spec: LimitSpec| -> Result<Option<i64>, String> {
        match spec {
            LimitSpec::Number(n) if n >= 0 => Ok(Some(n)),
            LimitSpec::Number(_) => Err("a limit cannot be negative (use \"unlimited\")".into()),
            LimitSpec::Word(w) if unlimited_word(&w) => Ok(None),
            other => Err(format!("expected a number or \"unlimited\", got {other:?}")),
        }
    };
    match kind {
        MeterKind::Counter => {
            let windows = match spec {
                LimitSpec::Window(w) => vec![w],
                LimitSpec::Windows(ws) if !ws.is_empty() => ws,
                // Unlimited still counts per month, so usage shows in entitlements.
                LimitSpec::Word(w) if unlimited_word(&w) => {
                    return Ok(Allowance::Counter {
                        windows: vec![WindowLimit { window: Window::Month, limit: None }],
                    });
                }
                _ => return Err("a counter needs { window = \"...\", limit = N } or a list of them".into()),
            };
            let mut out = Vec::with_capacity(windows.len());
            for w in windows {
                if out.iter().any(|o: &WindowLimit| o.window == w.window) {
                    return Err(format!("window {} is given twice", w.window.as_string()));
                }
                out.push(WindowLimit { window: w.window, limit: limit_number(w.limit)? });
            }
            Ok(Allowance::Counter { windows: out })
        }
        MeterKind::Gauge => Ok(Allowance::Gauge { max: max(spec)? }),
        MeterKind::Concurrency => Ok(Allowance::Concurrency { max: max(spec)? }),
        MeterKind::Cap => Ok(Allowance::Cap { max: max(spec)? }),
        MeterKind::Flag => match spec {
            LimitSpec::Bool(enabled) => Ok(Allowance::Flag { enabled }),
            _ => Err("a flag is true or false".into()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(key: &str, default: bool, archived: bool) -> Plan {
        Plan { key: key.into(), default, archived, ..Catalog::builtin().default_plan().clone() }
    }

    #[test]
    fn a_former_default_kept_for_its_subscribers_is_not_the_default() {
        // The file moved `default` from "basic" to "free"; "basic" is archived, in use.
        let catalog = Catalog {
            meters: BTreeMap::new(),
            plans: [("basic".to_owned(), plan("basic", true, true)), ("free".to_owned(), plan("free", true, false))]
                .into(),
            credit_packages: BTreeMap::new(),
        };
        assert_eq!(catalog.default_plan().key, "free");
        assert!(catalog.plan_for_sale("basic").is_none() && catalog.plan_for_sale("free").is_some());
        assert_eq!(catalog.public_plans().len(), 1);
    }

    #[test]
    fn patches_keep_the_default_rules() {
        let meters = BTreeMap::new();
        let archive = PlanPatch { archived: Some(true), ..Default::default() };
        let sell = PlanPatch { archived: Some(false), ..Default::default() };
        assert!(plan("free", true, false).patched(archive.clone(), &meters).is_err(), "the default stays sold");
        assert!(plan("basic", true, true).patched(sell, &meters).is_err(), "a former default is not sold again");
        let order = PlanPatch { order: Some(3), ..Default::default() };
        assert_eq!(plan("basic", true, true).patched(order, &meters).unwrap().order, 3, "other fields change");
        assert!(plan("pro", false, false).patched(archive, &meters).unwrap().archived);
        let long_trial = PlanPatch { trial_days: Some(MAX_TRIAL_DAYS + 1), ..Default::default() };
        assert!(plan("pro", false, false).patched(long_trial, &meters).is_err());
    }
}
