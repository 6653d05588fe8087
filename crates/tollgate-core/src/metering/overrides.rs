//! Per-account limit overrides: an admin gives one account, for some meters, an
//! allowance other than its plan's (a pilot customer's higher quota, a flag turned on
//! for a week), with a reason and an optional expiry. While in force, an override
//! replaces the plan's allowance for its meter whatever plan the account is on.
//!
//! Overrides are rare (a few accounts among many), so every node keeps all the ones
//! in force in memory ([`OverrideBook`]) and reloads them whole every second; the hot
//! path reads the map and never the database. A change made through this node
//! replaces its map at once; other nodes see it at their next reload.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use crate::Timestamp;
use crate::ids::AccountId;
use crate::plans::{Allowance, MeterKind};

/// How often nodes reload the overrides (the most a change made elsewhere lags).
pub const RELOAD_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// An account's overrides, as last set (one set per account; setting replaces it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LimitOverrides {
    pub account_id: AccountId,
    /// Meter key → the allowance that replaces the plan's.
    pub limits: BTreeMap<String, Allowance>,
    pub reason: String,
    /// After this the plan's allowances apply again (`None`: until changed).
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<Timestamp>,
    /// Who set them, as the audit log names actors (`user:<id>`, `service_key:<id>`).
    pub set_by: String,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: Timestamp,
}

impl LimitOverrides {
    pub fn in_force(&self, now: Timestamp) -> bool {
        self.expires_at.is_none_or(|at| now < at)
    }

    /// The override for `meter` of this kind, if any. One whose kind no longer
    /// matches the meter (the plans file changed the meter) is ignored.
    pub fn allowance(&self, meter: &str, kind: MeterKind, now: Timestamp) -> Option<&Allowance> {
        if !self.in_force(now) {
            return None;
        }
        self.limits.get(meter).filter(|a| a.kind() == kind)
    }
}

type ByAccount = HashMap<AccountId, Arc<LimitOverrides>>;

/// Every account's overrides in force, shared by the hot path; swapped whole.
#[derive(Clone, Default)]
pub struct OverrideBook(Arc<RwLock<Book>>);

#[derive(Default)]
struct Book {
    by_account: Arc<ByAccount>,
    /// Counts this node's own changes, so a reload read before one of them does not
    /// undo it.
    generation: u64,
}

impl OverrideBook {
    fn book(&self) -> std::sync::RwLockReadGuard<'_, Book> {
        self.0.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, account: AccountId) -> Option<Arc<LimitOverrides>> {
        let book = self.book();
        if book.by_account.is_empty() {
            return None;
        }
        book.by_account.get(&account).cloned()
    }

    /// Where a reload starts from: pass it to [`OverrideBook::replace`].
    pub fn generation(&self) -> u64 {
        self.book().generation
    }

    /// Replaces the whole book with what was read from the store, unless this node
    /// changed an entry since `read_after` (the next reload will include it).
    pub fn replace(&self, read_after: u64, all: Vec<LimitOverrides>) {
        let map: HashMap<_, _> = all.into_iter().map(|o| (o.account_id, Arc::new(o))).collect();
        let mut book = self.0.write().unwrap_or_else(|e| e.into_inner());
        if book.generation == read_after {
            book.by_account = Arc::new(map);
        }
    }

    /// Sets or clears one account's entry (a change made through this node).
    pub fn put(&self, account: AccountId, overrides: Option<LimitOverrides>) {
        let mut book = self.0.write().unwrap_or_else(|e| e.into_inner());
        let mut map = ByAccount::clone(&book.by_account);
        match overrides {
            Some(o) => map.insert(account, Arc::new(o)),
            None => map.remove(&account),
        };
        book.by_account = Arc::new(map);
        book.generation += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::AccountId;

    fn overrides(expires_in: Option<i64>) -> LimitOverrides {
        let now = time::OffsetDateTime::now_utc();
        LimitOverrides {
            account_id: AccountId::new(),
            limits: [("gpu".to_owned(), Allowance::Flag { enabled: true })].into(),
            reason: "pilot".into(),
            expires_at: expires_in.map(|s| now + time::Duration::seconds(s)),
            set_by: "system".into(),
            updated_at: now,
        }
    }

    #[test]
    fn an_override_applies_until_it_expires_and_only_to_its_kind() {
        let o = overrides(Some(60));
        let now = o.updated_at;
        assert_eq!(o.allowance("gpu", MeterKind::Flag, now), Some(&Allowance::Flag { enabled: true }));
        assert_eq!(o.allowance("gpu", MeterKind::Cap, now), None, "kind changed in the plans file");
        assert_eq!(o.allowance("other", MeterKind::Flag, now), None);
        assert_eq!(o.allowance("gpu", MeterKind::Flag, now + time::Duration::seconds(60)), None);
        assert!(overrides(None).in_force(now + time::Duration::days(3650)));
    }

    #[test]
    fn the_book_puts_clears_and_reloads() {
        let book = OverrideBook::default();
        let o = overrides(None);
        let id = o.account_id;
        assert!(book.get(id).is_none());
        book.put(id, Some(o.clone()));
        assert_eq!(book.get(id).as_deref(), Some(&o));
        book.put(id, None);
        assert!(book.get(id).is_none());
        book.replace(book.generation(), vec![o.clone()]);
        assert_eq!(book.get(id).as_deref(), Some(&o));
        book.replace(book.generation(), vec![]);
        assert!(book.get(id).is_none());
        // A reload read before this node's own change does not undo it.
        let read_after = book.generation();
        book.put(id, Some(o.clone()));
        book.replace(read_after, vec![]);
        assert_eq!(book.get(id).as_deref(), Some(&o), "the stale reload is dropped");
    }
}
