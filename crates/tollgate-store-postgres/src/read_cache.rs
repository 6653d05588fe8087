//! What the hot path reads before every consume — the account behind an external id
//! and its subscription — remembered for a short time on this node, so a consume is
//! not three round trips (account, subscription, batch) but about one.
//!
//! Several nodes write to the same database, so unlike the SQLite store's cache this
//! one can be stale: a subscription changed through *another* node is seen here
//! within [`SUBSCRIPTION_TTL`]. Changes through this node replace the entry at once,
//! and a refused compare-and-set drops it, so a retry reads the database. Counters
//! are never cached: quotas stay exact whatever plan is in force. Accounts are never
//! deleted and the hot path needs only their id, so they are kept longer; unknown
//! ids are not remembered, so an account created on another node is found at once.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tollgate_core::accounts::{Account, Subscription};
use tollgate_core::ids::AccountId;

pub(crate) const SUBSCRIPTION_TTL: Duration = Duration::from_secs(1);
const ACCOUNT_TTL: Duration = Duration::from_secs(60);
/// Entries per map before expired ones are swept (and, if still full, all dropped).
const MAX_ENTRIES: usize = 100_000;

#[derive(Default)]
pub(crate) struct ReadCache {
    accounts_by_external_id: Expiring<String, Account>,
    subscriptions: Expiring<AccountId, Option<Subscription>>,
    /// Bumped by every subscription write through this node: a read that started
    /// before a write must not put its older row back after it.
    generation: AtomicU64,
}

impl ReadCache {
    pub(crate) fn account_by_external_id(&self, external_id: &str) -> Option<Account> {
        self.accounts_by_external_id.get(external_id, ACCOUNT_TTL)
    }

    pub(crate) fn remember_account(&self, account: &Account) {
        if let Some(external_id) = &account.external_id {
            self.accounts_by_external_id.put(external_id.clone(), account.clone());
        }
    }

    pub(crate) fn subscription(&self, account: AccountId) -> Option<Option<Subscription>> {
        self.subscriptions.get(&account, SUBSCRIPTION_TTL)
    }

    /// Take before reading the database; pass to [`Self::fill_subscription`].
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Remembers a row read from the database, unless this node wrote a
    /// subscription since `seen` (the row may predate that write).
    pub(crate) fn fill_subscription(&self, account: AccountId, subscription: Option<Subscription>, seen: u64) {
        self.subscriptions.put_if(account, subscription, || self.generation() == seen);
    }

    /// This node's own write, committed.
    pub(crate) fn store_subscription(&self, account: AccountId, subscription: Subscription) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.subscriptions.put(account, Some(subscription));
    }

    pub(crate) fn forget_subscription(&self, account: AccountId) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.subscriptions.remove(&account);
    }
}

struct Expiring<K, V> {
    entries: Mutex<HashMap<K, (Instant, V)>>,
}

impl<K, V> Default for Expiring<K, V> {
    fn default() -> Self {
        Self { entries: Mutex::new(HashMap::new()) }
    }
}

impl<K: Eq + Hash, V: Clone> Expiring<K, V> {
    fn get<Q>(&self, key: &Q, ttl: Duration) -> Option<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.get(key).filter(|(at, _)| at.elapsed() < ttl).map(|(_, value)| value.clone())
    }

    fn put(&self, key: K, value: V) {
        self.put_if(key, value, || true);
    }

    /// Inserts if `still_valid` holds, checked under the lock (so a concurrent
    /// writer's `put` cannot land between the check and the insert).
    fn put_if(&self, key: K, value: V, still_valid: impl FnOnce() -> bool) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if !still_valid() {
            return;
        }
        if entries.len() >= MAX_ENTRIES {
            entries.retain(|_, (at, _)| at.elapsed() < ACCOUNT_TTL);
            if entries.len() >= MAX_ENTRIES {
                entries.clear();
            }
        }
        entries.insert(key, (Instant::now(), value));
    }

    fn remove(&self, key: &K) {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
    }
}

#[cfg(test)]
mod tests {
    use tollgate_core::Store;
    use tollgate_core::accounts::{NewExternalAccount, Subscription, SubscriptionStatus};
    use tollgate_core::audit::{Actor, AuditEvent, RequestOrigin};
    use tollgate_core::ids::AccountId;

    use super::SUBSCRIPTION_TTL;
    use crate::PgStore;
    use crate::testing::TestDatabase;

    fn pro(account: AccountId, plan: &str, at: time::OffsetDateTime) -> Subscription {
        Subscription {
            account_id: account,
            plan: plan.into(),
            status: SubscriptionStatus::Active,
            provider: "manual".into(),
            started_at: at,
            trial_ends_at: None,
            cancel_at_period_end: false,
            scheduled_plan: None,
            scheduled_at: None,
            updated_at: at,
            provider_subscription_id: None,
            provider_state_at: None,
        }
    }

    /// Two nodes: the one that changes a subscription sees it at once, the other
    /// within the TTL; a change computed from a stale cached copy is refused and the
    /// next read on that node is fresh.
    #[tokio::test]
    async fn another_nodes_subscription_change_is_seen_within_the_ttl() {
        let Some(database) = TestDatabase::create().await else { return };
        let a = PgStore::connect_with(database.options.clone()).await.unwrap();
        let b = PgStore::connect_with(database.options.clone()).await.unwrap();
        let now = tollgate_core::conformance::t0();
        let new = NewExternalAccount {
            id: AccountId::new(),
            external_id: "cus_nodes".into(),
            name: None,
            email: None,
            created_at: now,
        };
        let (account, _) = a.upsert_external_account(new).await.unwrap();
        let audit = || AuditEvent::new(Actor::System, "subscription.changed", &RequestOrigin::default(), now);
        assert_eq!(
            b.account_by_external_id("cus_nodes").await.unwrap().unwrap().id,
            account.id,
            "not cached as absent"
        );
        assert!(b.subscription(account.id).await.unwrap().is_none());

        let first = pro(account.id, "pro", now);
        a.put_subscription(first.clone(), None, audit()).await.unwrap();
        assert_eq!(a.subscription(account.id).await.unwrap(), Some(first.clone()), "read your writes");
        // b still holds "none": a change from there is refused, and b reads again.
        let from_b = pro(account.id, "max", now + time::Duration::seconds(1));
        assert!(matches!(
            b.put_subscription(from_b, None, audit()).await,
            Err(tollgate_core::StoreError::Conflict("subscription_changed"))
        ));
        assert_eq!(b.subscription(account.id).await.unwrap(), Some(first.clone()));

        let second = pro(account.id, "max", now + time::Duration::seconds(2));
        a.put_subscription(second.clone(), Some(first.updated_at), audit()).await.unwrap();
        tokio::time::sleep(SUBSCRIPTION_TTL + std::time::Duration::from_millis(100)).await;
        assert_eq!(b.subscription(account.id).await.unwrap(), Some(second), "seen once the TTL passed");
        a.close().await;
        b.close().await;
        database.drop().await;
    }
}
