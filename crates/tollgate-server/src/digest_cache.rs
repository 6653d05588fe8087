//! What a secret's digest resolved to (a key, or nothing), remembered for a short
//! time, so verifying a busy service key or API key costs a SHA-256 and a map lookup
//! instead of a database read. Changes made elsewhere show within [`TTL`].

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long a looked-up digest (found or not) is remembered.
pub const TTL: Duration = Duration::from_secs(30);
const MAX: usize = 10_000;

pub struct DigestCache<V>(Mutex<HashMap<String, (Instant, Option<V>)>>);

impl<V> Default for DigestCache<V> {
    fn default() -> Self {
        Self(Mutex::new(HashMap::new()))
    }
}

impl<V: Clone> DigestCache<V> {
    fn entries(&self) -> MutexGuard<'_, HashMap<String, (Instant, Option<V>)>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `Some(found)` while the entry is fresh, `None` when the store must be asked.
    pub fn get(&self, digest: &str) -> Option<Option<V>> {
        self.entries().get(digest).filter(|(at, _)| at.elapsed() < TTL).map(|(_, v)| v.clone())
    }

    /// Remembers what the store said; drops stale entries (or all) when full.
    pub fn insert(&self, digest: String, value: Option<V>) {
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
