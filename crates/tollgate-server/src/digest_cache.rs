//! What a secret's digest resolved to (a key, or nothing), remembered for a short
//! time, so verifying a busy service key or API key costs a SHA-256 and a map lookup
//! instead of a database read. Changes made elsewhere show within [`TTL`].

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long a looked-up digest (found or not) is remembered.
pub const TTL: Duration = Duration::from_secs(30);
const MAX: usize = 10_000;

/// Keyed by the digest as the caller has it: the hex `String` the store uses, or the
/// raw 32 bytes (API keys: no hex string to build and hash on a hit).
pub struct DigestCache<V, K = String>(Mutex<HashMap<K, (Instant, Option<V>)>>);

impl<V, K> Default for DigestCache<V, K> {
    fn default() -> Self {
        Self(Mutex::new(HashMap::new()))
    }
}

impl<V: Clone, K: Hash + Eq> DigestCache<V, K> {
    fn entries(&self) -> MutexGuard<'_, HashMap<K, (Instant, Option<V>)>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `Some(found)` while the entry is fresh, `None` when the store must be asked.
    pub fn get<Q: Hash + Eq + ?Sized>(&self, digest: &Q) -> Option<Option<V>>
    where
        K: Borrow<Q>,
    {
        self.entries().get(digest).filter(|(at, _)| at.elapsed() < TTL).map(|(_, v)| v.clone())
    }

    /// Remembers what the store said; drops stale entries (or all) when full.
    pub fn insert(&self, digest: K, value: Option<V>) {
        let mut entries = self.entries();
        if entries.len() >= MAX {
            entries.retain(|_, (at, _)| at.elapsed() < TTL);
            if entries.len() >= MAX {
                entries.clear();
            }
        }
        entries.insert(digest, (Instant::now(), value));
    }

    /// Forgets the entries whose value fails `keep` (a revocation on this node).
    pub fn retain(&self, mut keep: impl FnMut(&V) -> bool) {
        self.entries().retain(|_, (_, v)| v.as_ref().is_none_or(&mut keep));
    }
}
