//! The admin side's read-only reports: platform stats, usage analytics series, the
//! usage event log and the payment list. The stores count and sum; what the numbers
//! mean (which plan an account is on, what revenue and MRR are, how a series is
//! bucketed and zero-filled) is decided here.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::{Date, Duration, Month, Time};

use crate::Timestamp;
use crate::ids::{AccountId, PaymentId};
use crate::plans::Catalog;
use crate::store::DailyUsage;

/// Longest range of an analytics series, in days (both ends included).
pub const MAX_SERIES_DAYS: i64 = 366;

/// What `admin_stats` counts as of `now`.
#[derive(Clone, Debug)]
pub struct StatsQuery {
    /// Users created at or after this are new (`now` minus 7 days).
    pub new_since: Timestamp,
    /// Revenue "this month" is of payments created at or after this (the first of the
    /// calendar month, 00:00 UTC).
    pub month_start: Timestamp,
    /// Accounts without a live subscription are on this plan.
    pub default_plan: String,
}

impl StatsQuery {
    pub fn at(now: Timestamp, default_plan: impl Into<String>) -> Self {
        let now = now.to_offset(time::UtcOffset::UTC);
        let first = now.date().replace_day(1).unwrap_or(now.date());
        Self {
            new_since: now - Duration::days(7),
            month_start: first.with_time(Time::MIDNIGHT).assume_utc(),
            default_plan: default_plan.into(),
        }
    }
}

/// Users who are not deleted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct UserCounts {
    pub total: u64,
    pub active: u64,
    pub suspended: u64,
    /// Created in the last 7 days.
    pub new_this_week: u64,
}

/// Money in integer minor units of one currency.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Amounts {
    /// Succeeded payments (refunded ones included: they were paid).
    pub gross: i64,
    /// What was refunded of them.
    pub refunded: i64,
    /// `gross - refunded`.
    pub net: i64,
}

impl Amounts {
    pub fn new(gross: i64, refunded: i64) -> Self {
        Self { gross, refunded, net: gross - refunded }
    }
}

/// Revenue of one currency. A refund counts against its payment's month (payments
/// record what was refunded of them, not when).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Revenue {
    pub currency: String,
    pub all_time: Amounts,
    pub this_month: Amounts,
}

/// Ledger totals over all accounts, as positive numbers of credits.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CreditTotals {
    /// Bought (`purchase` transfers).
    pub purchased: i64,
    /// Given for free (`bonus`).
    pub granted: i64,
    /// Spent (`usage`).
    pub used: i64,
    /// Given back for usage that did not deliver (`refund`).
    pub refunded: i64,
    /// Taken back after refunded payments (`reversal`).
    pub reversed: i64,
    /// Ran out of time (`expiry`).
    pub expired: i64,
    /// Admin adjustments, net (negative when more was taken than given).
    pub adjusted: i64,
    /// The sum of all balances now.
    pub outstanding: i64,
}

impl CreditTotals {
    /// From the net sum of transfers per kind (`purchase`, `usage`, ...) and the sum of
    /// balances.
    pub fn from_kinds(sums: &[(String, i64)], outstanding: i64) -> Self {
        let sum = |kind: &str| sums.iter().filter(|(k, _)| k == kind).map(|(_, v)| *v).sum::<i64>();
        Self {
            purchased: sum("purchase"),
            granted: sum("bonus"),
            used: -sum("usage"),
            refunded: sum("refund"),
            reversed: -sum("reversal"),
            expired: -sum("expiry"),
            adjusted: sum("adjustment"),
            outstanding,
        }
    }
}

/// What the stores count for the admin dashboard.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct AdminStats {
    pub users: UserCounts,
    /// Accounts by the plan in force: the live (trialing, active, past due)
    /// subscription's plan, else the default plan. Accounts of deleted users are left
    /// out.
    pub accounts_per_plan: BTreeMap<String, u64>,
    /// Subscriptions `active` or `trialing`.
    pub active_subscriptions: u64,
    /// Of which `trialing`.
    pub trialing_subscriptions: u64,
    /// `active` (paying, not trialing) subscriptions per plan: what MRR is made of.
    pub paying_subscriptions: BTreeMap<String, u64>,
    /// By currency, in currency order.
    pub revenue: Vec<Revenue>,
    pub credits: CreditTotals,
}

/// A plan's recurring price as monthly revenue: its first monthly price, else its first
/// yearly price divided by 12 (rounded down); `None` for a plan without either.
pub fn monthly_price(catalog: &Catalog, plan: &str) -> Option<(String, i64)> {
    let prices = &catalog.plans.get(plan)?.prices;
    if let Some(p) = prices.iter().find(|p| p.period == "month") {
        return Some((p.currency.clone(), p.amount));
    }
    prices.iter().find(|p| p.period == "year").map(|p| (p.currency.clone(), p.amount / 12))
}

/// Monthly recurring revenue per currency: each paying subscription at its plan's
/// monthly price (`monthly_price`). Plans that are free or unknown to the catalog add
/// nothing; a currency appears once some plan priced in it has a paying subscription.
pub fn mrr(catalog: &Catalog, paying: &BTreeMap<String, u64>) -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    for (plan, count) in paying {
        if let Some((currency, amount)) = monthly_price(catalog, plan) {
            *out.entry(currency).or_insert(0) += amount * *count as i64;
        }
    }
    out
}

/// How an analytics series groups days.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Interval {
    Day,
    /// ISO weeks, starting on Monday; a point is dated by its Monday.
    Week,
    /// Calendar months; a point is dated by the first of the month.
    Month,
}

crate::identity::str_enum!(Interval { Day => "day", Week => "week", Month => "month" });

impl Interval {
    /// The first day of the bucket `day` falls in.
    pub fn start_of(self, day: Date) -> Date {
        match self {
            Self::Day => day,
            Self::Week => day - Duration::days(i64::from(day.weekday().number_days_from_monday())),
            Self::Month => day.replace_day(1).unwrap_or(day),
        }
    }

    fn next(self, start: Date) -> Option<Date> {
        match self {
            Self::Day => start.next_day(),
            Self::Week => start.checked_add(Duration::days(7)),
            Self::Month => {
                let (year, month) = if start.month() == Month::December {
                    (start.year() + 1, Month::January)
                } else {
                    (start.year(), start.month().next())
                };
                Date::from_calendar_date(year, month, 1).ok()
            }
        }
    }
}

/// One point of a series.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SeriesPoint {
    /// `YYYY-MM-DD`: the first day of the bucket.
    pub date: String,
    pub consumed: i64,
    pub denied: i64,
}

pub fn day_string(d: Date) -> String {
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

/// The points of one meter's series from `from` to `to` (both included): every bucket
/// present, zero when nothing happened. `rows` are daily totals (any meter; only
/// `meter`'s are taken). A bucket at either end may reach outside the range, but only
/// days inside it count.
pub fn series(rows: &[DailyUsage], meter: &str, from: Date, to: Date, interval: Interval) -> Vec<SeriesPoint> {
    let mut buckets: BTreeMap<Date, (i64, i64)> = BTreeMap::new();
    let mut at = Some(interval.start_of(from));
    while let Some(start) = at.filter(|d| *d <= to) {
        buckets.insert(start, (0, 0));
        at = interval.next(start);
    }
    let format = time::macros::format_description!("[year]-[month]-[day]");
    for row in rows.iter().filter(|r| r.meter == meter) {
        let Ok(day) = Date::parse(&row.day, format) else { continue };
        if day < from || day > to {
            continue;
        }
        if let Some(b) = buckets.get_mut(&interval.start_of(day)) {
            b.0 += row.consumed;
            b.1 += row.denied;
        }
    }
    buckets.into_iter().map(|(d, (consumed, denied))| SeriesPoint { date: day_string(d), consumed, denied }).collect()
}

/// What a usage event records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UsageOutcome {
    Consumed,
    Denied,
    Released,
    Refunded,
}

crate::identity::str_enum!(UsageOutcome {
    Consumed => "consumed",
    Denied => "denied",
    Released => "released",
    Refunded => "refunded",
});

/// One usage event as the admin log shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct UsageLogEntry {
    pub id: uuid::Uuid,
    pub account_id: AccountId,
    pub meter: String,
    pub outcome: UsageOutcome,
    pub amount: i64,
    pub endpoint: Option<String>,
    pub metadata: Option<serde_json::Value>,
    pub ip: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: Timestamp,
}

/// Which usage events, newest first (by time, then id).
#[derive(Clone, Debug, Default)]
pub struct UsageLogQuery {
    pub account: Option<AccountId>,
    pub meter: Option<String>,
    pub outcome: Option<UsageOutcome>,
    /// At or after.
    pub from: Option<Timestamp>,
    /// Strictly before.
    pub to: Option<Timestamp>,
    /// Strictly older than this (time, id): where the next page starts, so events
    /// inserted meanwhile (all newer) never shift a page.
    pub before: Option<(Timestamp, uuid::Uuid)>,
    pub limit: u32,
}

/// Which payments, newest first (by creation time, then id).
#[derive(Clone, Debug, Default)]
pub struct PaymentQuery {
    pub account: Option<AccountId>,
    /// Strictly older than this (time, id).
    pub before: Option<(Timestamp, PaymentId)>,
    pub limit: u32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::{date, datetime};

    fn row(day: &str, meter: &str, consumed: i64, denied: i64) -> DailyUsage {
        DailyUsage { day: day.into(), meter: meter.into(), consumed, denied }
    }

    #[test]
    fn stats_windows_are_utc_week_and_calendar_month() {
        let q = StatsQuery::at(datetime!(2026-03-05 10:00 UTC), "free");
        assert_eq!(q.new_since, datetime!(2026-02-26 10:00 UTC));
        assert_eq!(q.month_start, datetime!(2026-03-01 0:00 UTC));
        let q = StatsQuery::at(datetime!(2026-03-01 00:30 +01:00), "free");
        assert_eq!(q.month_start, datetime!(2026-02-01 0:00 UTC), "the month is UTC's");
    }

    #[test]
    fn series_are_zero_filled_per_bucket() {
        let rows = vec![
            row("2026-03-02", "messages", 3, 1),
            row("2026-03-02", "tokens", 100, 0),
            row("2026-03-04", "messages", 2, 0),
            row("2026-03-09", "messages", 5, 0),
            row("2026-02-27", "messages", 7, 0),
        ];
        let days = series(&rows, "messages", date!(2026 - 03 - 01), date!(2026 - 03 - 04), Interval::Day);
        let got: Vec<_> = days.iter().map(|p| (p.date.as_str(), p.consumed, p.denied)).collect();
        assert_eq!(got, vec![("2026-03-01", 0, 0), ("2026-03-02", 3, 1), ("2026-03-03", 0, 0), ("2026-03-04", 2, 0)]);
        // 2026-03-01 is a Sunday: its week starts on 2026-02-23; days before `from` do not count.
        let weeks = series(&rows, "messages", date!(2026 - 03 - 01), date!(2026 - 03 - 10), Interval::Week);
        let got: Vec<_> = weeks.iter().map(|p| (p.date.as_str(), p.consumed)).collect();
        assert_eq!(got, vec![("2026-02-23", 0), ("2026-03-02", 5), ("2026-03-09", 5)]);
        let months = series(&rows, "messages", date!(2025 - 12 - 15), date!(2026 - 03 - 31), Interval::Month);
        let got: Vec<_> = months.iter().map(|p| (p.date.as_str(), p.consumed)).collect();
        assert_eq!(got, vec![("2025-12-01", 0), ("2026-01-01", 0), ("2026-02-01", 7), ("2026-03-01", 10)]);
    }

    #[test]
    fn credit_totals_are_positive_by_kind() {
        let sums = vec![
            ("purchase".to_owned(), 300),
            ("usage".to_owned(), -120),
            ("bonus".to_owned(), 10),
            ("refund".to_owned(), 5),
            ("reversal".to_owned(), -50),
            ("adjustment".to_owned(), -3),
        ];
        let t = CreditTotals::from_kinds(&sums, 142);
        assert_eq!((t.purchased, t.used, t.granted, t.refunded, t.reversed, t.adjusted), (300, 120, 10, 5, 50, -3));
        assert_eq!((t.expired, t.outstanding), (0, 142));
    }

    #[test]
    fn mrr_takes_monthly_prices_else_a_twelfth_of_yearly() {
        use crate::plans::Price;
        let mut catalog = Catalog::builtin();
        let base = catalog.default_plan().clone();
        let price = |amount, currency: &str, period: &str| Price {
            amount,
            currency: currency.into(),
            period: period.into(),
            stripe_price: None,
        };
        let mut pro = base.clone();
        pro.key = "pro".into();
        pro.default = false;
        pro.prices = vec![price(12000, "EUR", "year"), price(1500, "EUR", "month")];
        let mut yearly = pro.clone();
        yearly.key = "yearly".into();
        yearly.prices = vec![price(10000, "USD", "year")];
        catalog.plans.insert("pro".into(), pro);
        catalog.plans.insert("yearly".into(), yearly);
        let paying: BTreeMap<String, u64> = [("pro".into(), 3), ("yearly".into(), 2), ("gone".into(), 9)].into();
        assert_eq!(mrr(&catalog, &paying), BTreeMap::from([("EUR".into(), 4500), ("USD".into(), 1666)]));
    }
}
