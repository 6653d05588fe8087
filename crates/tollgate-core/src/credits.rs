//! Credits: a double-entry ledger. Every movement is one transfer between an
//! account's balance and a system ledger account (purchases, usage, bonus, refund,
//! admin adjustment, expiry), written as two entries that sum to zero. The balance an
//! account sees is the sum of its entries; stores keep it as a running value too, and
//! [`LedgerCheck`] proves the two agree.

use serde::{Deserialize, Serialize};

use crate::Timestamp;
use crate::audit::{Actor, AuditEvent};
use crate::identity::str_enum;
use crate::ids::{AccountId, CreditTransferId, PaymentId};
use crate::metering::Idempotency;

/// Largest amount of one transfer: far beyond any real pack, far from `i64` overflow
/// when summed.
pub const MAX_CREDIT_AMOUNT: i64 = 1_000_000_000_000;

/// What a transfer is, which also names its system ledger account.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CreditKind {
    /// Bought (a paid checkout).
    Purchase,
    /// Spent on something (`spend`, or a meter funded by credits).
    Usage,
    /// Given for free (a promotion, a sign-up gift).
    Bonus,
    /// Given back for usage that did not deliver.
    Refund,
    /// Changed by an admin, either way.
    Adjustment,
    /// Credits that ran out of time.
    Expiry,
    /// A purchase taken back because its payment was refunded.
    Reversal,
}

str_enum!(CreditKind {
    Purchase => "purchase",
    Usage => "usage",
    Bonus => "bonus",
    Refund => "refund",
    Adjustment => "adjustment",
    Expiry => "expiry",
    Reversal => "reversal",
});

impl CreditKind {
    /// The system ledger account on the other side of every transfer of this kind.
    pub fn system_account(self) -> &'static str {
        match self {
            Self::Purchase | Self::Reversal => "purchases",
            Self::Usage => "usage",
            Self::Bonus => "bonus",
            Self::Refund => "refund",
            Self::Adjustment => "admin_adjustment",
            Self::Expiry => "expiry",
        }
    }
}

/// What to do when the balance cannot cover a debit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shortfall {
    /// Refuse the whole transfer (`Conflict("insufficient_credits")`).
    Refuse,
    /// Take what is there, down to the floor, and report how much (a refunded
    /// payment's credits may already be spent).
    TakeAvailable,
}

/// A movement to write, decided by the caller; the store checks the balance rule and
/// writes the transfer, its two entries, the new balance, the idempotency answer and
/// the audit event in one transaction.
#[derive(Clone, Debug)]
pub struct CreditTransfer {
    pub id: CreditTransferId,
    pub account: AccountId,
    pub kind: CreditKind,
    /// Signed change to the account's balance: grants positive, spends negative.
    pub amount: i64,
    /// Lowest balance this transfer may leave: 0, or minus the plan's overdraft.
    pub floor: i64,
    pub shortfall: Shortfall,
    pub description: Option<String>,
    pub endpoint: Option<String>,
    pub metadata: Option<serde_json::Value>,
    pub idempotency: Option<Idempotency>,
    pub actor: Actor,
    /// The payment that bought (or, refunded, took back) these credits.
    pub payment: Option<PaymentId>,
    pub now: Timestamp,
    pub audit: Option<AuditEvent>,
}

impl CreditTransfer {
    /// A transfer of `amount` with no floor below zero, refused when short, no key,
    /// no description: callers fill in the rest.
    pub fn new(account: AccountId, kind: CreditKind, amount: i64, actor: Actor, now: Timestamp) -> Self {
        Self {
            id: CreditTransferId::new(),
            account,
            kind,
            amount,
            floor: 0,
            shortfall: Shortfall::Refuse,
            description: None,
            endpoint: None,
            metadata: None,
            idempotency: None,
            actor,
            payment: None,
            now,
            audit: None,
        }
    }
}

impl CreditTransfer {
    /// The grant of the credits a succeeded payment bought.
    pub fn purchase(payment: &crate::billing::Payment) -> Self {
        let mut t =
            Self::new(payment.account_id, CreditKind::Purchase, payment.credits, Actor::System, payment.created_at);
        t.payment = Some(payment.id);
        t.description = Some(match &payment.credit_package {
            Some(package) => format!("Credit package {package}"),
            None => "Credit purchase".to_owned(),
        });
        t.metadata = Some(serde_json::json!({
            "provider": payment.provider,
            "provider_payment_id": payment.provider_payment_id,
        }));
        t
    }

    /// Taking back `due` credits of a refunded payment, as far as the balance allows.
    pub fn reversal(account: AccountId, payment: PaymentId, due: i64, event: &crate::billing::ProviderEvent) -> Self {
        let mut t = Self::new(account, CreditKind::Reversal, -due, Actor::System, event.received_at);
        t.shortfall = Shortfall::TakeAvailable;
        t.payment = Some(payment);
        t.description = Some("Payment refunded".into());
        t.metadata = Some(serde_json::json!({ "provider": event.provider, "event_id": event.id }));
        t
    }

    /// Paying `cost` credits for a consume its windows denied (a meter funded by
    /// credits), down to the funding's floor.
    pub fn metered(
        request: &crate::metering::UsageRequest,
        funding: crate::metering::CreditFunding,
        cost: i64,
    ) -> Self {
        let mut t = Self::new(request.account, CreditKind::Usage, -cost, Actor::System, request.now);
        t.floor = funding.floor;
        t.description = Some(format!("{} × {}", request.amount, request.meter));
        t.endpoint = request.context.endpoint.clone();
        t.metadata = Some(serde_json::json!({ "meter": request.meter, "amount": request.amount }));
        t
    }
}

/// How much of a debit the balance allows: the whole `amount` when the balance stays
/// at or above `floor`; with [`Shortfall::TakeAvailable`], as much as reaches the floor
/// (never a credit: 0 when already below it); `None` when refused. Grants always pass.
pub fn allowed_amount(balance: i64, amount: i64, floor: i64, shortfall: Shortfall) -> Option<i64> {
    if amount >= 0 {
        return Some(amount);
    }
    let after = balance.checked_add(amount)?;
    if after >= floor {
        return Some(amount);
    }
    match shortfall {
        Shortfall::Refuse => None,
        Shortfall::TakeAvailable => Some(-(balance - floor).max(0)),
    }
}

/// A transfer as the account sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreditTransaction {
    pub id: CreditTransferId,
    pub account_id: AccountId,
    pub kind: CreditKind,
    /// Signed change to the balance.
    pub amount: i64,
    pub balance_after: i64,
    pub description: Option<String>,
    pub endpoint: Option<String>,
    pub metadata: Option<serde_json::Value>,
    pub payment_id: Option<PaymentId>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: Timestamp,
}

/// The answer to a transfer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreditReceipt {
    pub transaction: CreditTransaction,
    /// When a [`Shortfall::TakeAvailable`] debit took less than asked: what is missing.
    pub shortfall: i64,
    /// This repeats the first answer to the same idempotency key.
    #[serde(default)]
    pub replayed: bool,
}

/// An account's credits.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreditBalance {
    pub balance: i64,
    /// Bought, net of reversed purchases.
    pub purchased: i64,
    /// Spent, net of refunds.
    pub used: i64,
    /// Given as bonus.
    pub granted: i64,
}

/// The proof that the ledger balances, over the whole database.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LedgerCheck {
    pub transfers: u64,
    /// Transfers whose entries do not sum to zero, or are not exactly two.
    pub unbalanced_transfers: u64,
    /// Accounts whose running balance differs from the sum of their entries.
    pub mismatched_balances: u64,
}

impl LedgerCheck {
    pub fn is_sound(&self) -> bool {
        self.unbalanced_transfers == 0 && self.mismatched_balances == 0
    }
}

/// A page of an account's transactions, newest first.
#[derive(Clone, Debug, Default)]
pub struct TransactionQuery {
    pub kind: Option<CreditKind>,
    /// Strictly older than this transaction (the previous page's last).
    pub before: Option<CreditTransferId>,
    pub limit: u32,
}

/// A credit package as configured: credits sold at a price.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreditPackage {
    pub credits: i64,
    /// Integer minor units.
    pub amount: i64,
    /// ISO 4217, upper case.
    pub currency: String,
    #[serde(default)]
    pub names: std::collections::BTreeMap<String, String>,
    /// A Stripe price id to sell it with (otherwise the price is sent inline).
    #[serde(default)]
    pub stripe_price: Option<String>,
    #[serde(default)]
    pub order: i64,
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn debits_stop_at_the_floor() {
        assert_eq!(allowed_amount(10, -10, 0, Shortfall::Refuse), Some(-10));
        assert_eq!(allowed_amount(10, -11, 0, Shortfall::Refuse), None);
        assert_eq!(allowed_amount(10, -11, -5, Shortfall::Refuse), Some(-11));
        assert_eq!(allowed_amount(10, -30, 0, Shortfall::TakeAvailable), Some(-10));
        assert_eq!(allowed_amount(-3, -30, 0, Shortfall::TakeAvailable), Some(0));
        assert_eq!(allowed_amount(-3, 5, 0, Shortfall::Refuse), Some(5));
        assert_eq!(allowed_amount(i64::MIN + 1, -5, i64::MIN, Shortfall::Refuse), None);
    }

    proptest! {
        #[test]
        fn never_below_the_floor(balance in -1000i64..1000, amount in -2000i64..2000, floor in -500i64..=0, take in any::<bool>()) {
            let shortfall = if take { Shortfall::TakeAvailable } else { Shortfall::Refuse };
            if let Some(taken) = allowed_amount(balance, amount, floor, shortfall) {
                if amount < 0 {
                    prop_assert!(taken <= 0 && taken >= amount);
                    // A debit never leaves the balance below the floor, nor lower than it was.
                    prop_assert!(balance + taken >= floor.min(balance));
                } else {
                    prop_assert_eq!(taken, amount);
                }
            } else {
                prop_assert!(amount < 0 && balance + amount < floor && !take);
            }
        }
    }
}
