//! Accounts (who owns plans, quotas and credits), subscriptions to plans, and the
//! service keys with which a product's backend acts on them.

use serde::{Deserialize, Serialize};

use crate::Timestamp;
use crate::identity::str_enum;
use crate::ids::{AccountId, ServiceKeyId};

/// Longest accepted external id (the product's own customer id).
pub const MAX_EXTERNAL_ID_LEN: usize = 200;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccountKind {
    /// A user's own account, created with the user.
    Personal,
    Organization,
    /// A customer of a product that keeps its own users (bring your own identity).
    External,
}

str_enum!(AccountKind { Personal => "personal", Organization => "organization", External => "external" });

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub id: AccountId,
    pub kind: AccountKind,
    pub name: Option<String>,
    pub external_id: Option<String>,
    pub email: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: Timestamp,
}

/// An external customer to create (idempotent on `external_id`).
#[derive(Clone, Debug)]
pub struct NewExternalAccount {
    pub id: AccountId,
    pub external_id: String,
    pub name: Option<String>,
    pub email: Option<String>,
    pub created_at: Timestamp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubscriptionStatus {
    Trialing,
    Active,
    PastDue,
    Canceled,
    Expired,
    Incomplete,
}

str_enum!(SubscriptionStatus {
    Trialing => "trialing",
    Active => "active",
    PastDue => "past_due",
    Canceled => "canceled",
    Expired => "expired",
    Incomplete => "incomplete",
});

impl SubscriptionStatus {
    /// Whether the subscription's plan applies (otherwise the default plan does).
    pub fn is_live(self) -> bool {
        matches!(self, Self::Trialing | Self::Active | Self::PastDue)
    }
}

/// An account's subscription to a plan. At most one per account.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscription {
    pub account_id: AccountId,
    pub plan: String,
    pub status: SubscriptionStatus,
    /// `manual` (set through the API) or a payment provider.
    pub provider: String,
    /// Billing periods are anchored here (day 31 → end of shorter months).
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: Timestamp,
    #[serde(with = "time::serde::rfc3339::option")]
    pub trial_ends_at: Option<Timestamp>,
    pub cancel_at_period_end: bool,
    /// A plan to switch to at `scheduled_at` (a downgrade at period end).
    pub scheduled_plan: Option<String>,
    /// When `scheduled_plan` or `cancel_at_period_end` takes effect.
    #[serde(with = "time::serde::rfc3339::option")]
    pub scheduled_at: Option<Timestamp>,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: Timestamp,
    /// The provider's id for it (a Stripe `sub_...`); `None` for `manual`.
    #[serde(default)]
    pub provider_subscription_id: Option<String>,
    /// When the provider produced the state stored here: older events are ignored.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub provider_state_at: Option<Timestamp>,
}

impl Subscription {
    /// The `updated_at` of a change to a subscription last updated at `previous`: now,
    /// at whole microseconds (what both stores keep), and strictly after `previous`,
    /// since `updated_at` is the version `Store::put_subscription` compares.
    pub fn version_after(previous: Option<Timestamp>, now: Timestamp) -> Timestamp {
        let now = now.replace_nanosecond(now.nanosecond() / 1_000 * 1_000).unwrap_or(now);
        match previous {
            Some(previous) if previous >= now => previous + time::Duration::microseconds(1),
            _ => now,
        }
    }
}

/// What a service key may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Scope {
    #[serde(rename = "usage:read")]
    UsageRead,
    #[serde(rename = "usage:write")]
    UsageWrite,
    #[serde(rename = "accounts:read")]
    AccountsRead,
    #[serde(rename = "accounts:write")]
    AccountsWrite,
    #[serde(rename = "ratelimit:check")]
    RatelimitCheck,
    #[serde(rename = "credits:read")]
    CreditsRead,
    /// Spend, grant and refund credits.
    #[serde(rename = "credits:write")]
    CreditsWrite,
    /// Start checkouts and portal sessions for accounts.
    #[serde(rename = "billing:write")]
    BillingWrite,
    /// The admin API's reads (`GET /v1/admin/...`).
    #[serde(rename = "admin:read")]
    AdminRead,
    /// The admin API's changes (suspend, delete, revoke sessions, ...).
    #[serde(rename = "admin:write")]
    AdminWrite,
    /// Everything, including the admin API.
    #[serde(rename = "admin:*")]
    Admin,
}

str_enum!(Scope {
    UsageRead => "usage:read",
    UsageWrite => "usage:write",
    AccountsRead => "accounts:read",
    AccountsWrite => "accounts:write",
    RatelimitCheck => "ratelimit:check",
    CreditsRead => "credits:read",
    CreditsWrite => "credits:write",
    BillingWrite => "billing:write",
    AdminRead => "admin:read",
    AdminWrite => "admin:write",
    Admin => "admin:*",
});

impl Scope {
    pub const ALL: [Scope; 11] = [
        Scope::UsageRead,
        Scope::UsageWrite,
        Scope::AccountsRead,
        Scope::AccountsWrite,
        Scope::RatelimitCheck,
        Scope::CreditsRead,
        Scope::CreditsWrite,
        Scope::BillingWrite,
        Scope::AdminRead,
        Scope::AdminWrite,
        Scope::Admin,
    ];
}

/// The integrating backend's secret, with scopes over all customers. Only its digest
/// is stored; `prefix` is kept to recognise it in lists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceKey {
    pub id: ServiceKeyId,
    pub name: String,
    pub prefix: String,
    pub scopes: Vec<Scope>,
    pub created_at: Timestamp,
    pub revoked_at: Option<Timestamp>,
}

impl ServiceKey {
    /// `admin:*` grants every scope.
    pub fn allows(&self, scope: Scope) -> bool {
        self.revoked_at.is_none() && (self.scopes.contains(&scope) || self.scopes.contains(&Scope::Admin))
    }
}
