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

/// A map with a generation that every write bumps: a read that began before a write
/// (its generation is older) must not fill in what it read, which may be stale.
struct Map<K, V>(Mutex<(u64, HashMap<K, V>)>);

impl<K, V> Default for Map<K, V> {
    fn default() -> Self {
        Self(Mutex::new((0, HashMap::new())))
    }
}

impl<K: Eq + Hash, V: Clone> Map<K, V> {
    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, HashMap<K, V>)> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, key: &K) -> Option<V> {
        self.lock().1.get(key).cloned()
    }

    fn generation(&self) -> u64 {
        self.lock().0
    }

    /// Fills a gap with what a read found, unless a write happened since the read
    /// began (`seen`) or the map is full.
    fn fill(&self, key: K, value: V, seen: u64) {
        let mut guard = self.lock();
        let (generation, map) = &mut *guard;
        if *generation == seen && map.len() < MAX_ENTRIES {
            map.entry(key).or_insert(value);
        }
    }

    /// After a write: the new value, and a new generation.
    fn put(&self, key: K, value: V) {
        let mut guard = self.lock();
        let (generation, map) = &mut *guard;
        *generation += 1;
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

    /// Remembers an account that exists (absence is never cached: it may be created;
    /// an account row never changes once created, so any read may fill it).
    pub(crate) fn remember_account(&self, account: &Account) {
        if let Some(external) = &account.external_id {
            self.external.put(external.clone(), account.id);
        }
        self.accounts.put(account.id, account.clone());
    }

    /// Taken before reading a subscription from the database.
    pub(crate) fn subscription_generation(&self) -> u64 {
        self.subscriptions.generation()
    }

    /// `Some(cached)` when known, `None` when the database must be asked.
    pub(crate) fn subscription(&self, account: AccountId) -> Option<Option<Subscription>> {
        self.subscriptions.get(&account)
    }

    /// After reading the database, with the generation taken before the read.
    pub(crate) fn fill_subscription(&self, account: AccountId, subscription: Option<Subscription>, seen: u64) {
        self.subscriptions.fill(account, subscription, seen);
    }

    /// After writing it.
    pub(crate) fn store_subscription(&self, account: AccountId, subscription: Option<Subscription>) {
        self.subscriptions.put(account, subscription);
    }
}
