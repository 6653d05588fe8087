//! Memory of rows the hot path reads on every call — accounts by id and external id,
//! subscriptions — so a consume does not wait for the database to answer them.
//! Exact because every write of these rows goes through this store, and SQLite has
//! one writing process; the writes update the cache in the same call.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;

use tollgate_core::accounts::{Account, Subscription};
use tollgate_core::ids::AccountId;

/// Entries per map before it is dropped and refilled lazily.
const MAX_ENTRIES: usize = 100_000;

#[derive(Default)]
pub(crate) struct ReadCache {
    accounts: Map<AccountId, Account>,
    external: Map<String, AccountId>,
    subscriptions: Map<AccountId, Option<Subscription>>,
}

struct Map<K, V>(Mutex<HashMap<K, V>>);

impl<K, V> Default for Map<K, V> {
    fn default() -> Self {
        Self(Mutex::new(HashMap::new()))
    }
}

impl<K: Eq + Hash, V: Clone> Map<K, V> {
    fn get(&self, key: &K) -> Option<V> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).get(key).cloned()
    }

    /// Fills a gap only: a read must never overwrite what a concurrent write stored
    /// after the read began.
    fn fill(&self, key: K, value: V) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_ENTRIES {
            map.clear();
        }
        map.entry(key).or_insert(value);
    }

    fn put(&self, key: K, value: V) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_ENTRIES {
            map.clear();
        }
        map.insert(key, value);
    }
}

impl ReadCache {
    pub(crate) fn account(&self, id: AccountId) -> Option<Account> {
        self.accounts.get(&id)
    }

    pub(crate) fn account_by_external_id(&self, external_id: &str) -> Option<Account> {
        self.external.get(&external_id.to_owned()).and_then(|id| self.accounts.get(&id))
    }

    /// Remembers an account that exists (absence is never cached: it may be created).
    pub(crate) fn remember_account(&self, account: &Account) {
        if let Some(external) = &account.external_id {
            self.external.put(external.clone(), account.id);
        }
        self.accounts.put(account.id, account.clone());
    }

    /// `Some(cached)` when known, `None` when the database must be asked.
    pub(crate) fn subscription(&self, account: AccountId) -> Option<Option<Subscription>> {
        self.subscriptions.get(&account)
    }

    /// After reading the database.
    pub(crate) fn fill_subscription(&self, account: AccountId, subscription: Option<Subscription>) {
        self.subscriptions.fill(account, subscription);
    }

    /// After writing it.
    pub(crate) fn store_subscription(&self, account: AccountId, subscription: Option<Subscription>) {
        self.subscriptions.put(account, subscription);
    }
}
