//! Verifying an account API key on the hot path, in isolation (SPEC: over 100k per
//! second per core, cached): `ApiKeyCache::lookup`, which is the SHA-256 of the
//! secret, the digest cache's map lookup and a clone of the key. The store is a real
//! SQLite database in a temporary directory with 10,000 real keys created through it
//! (200 accounts of 50), so a miss is a real store read. Single thread: one tokio
//! `current_thread` runtime, every loop inside one async block. A plain timing loop
//! (`harness = false`), no framework: run with
//! `cargo bench -p tollgate-server --bench api_key`.
//!
//! Each round starts from an empty cache and fills it through misses (timed: the
//! miss path), then times hits; the cache forgets entries after `digest_cache::TTL`,
//! so a round must finish well within it (checked).

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tollgate_core::Store;
use tollgate_core::accounts::NewExternalAccount;
use tollgate_core::api_keys::{self, ApiKey, ApiKeyScope, DISPLAY_LEN, MAX_PER_ACCOUNT};
use tollgate_core::audit::{Actor, AuditEvent, RequestOrigin};
use tollgate_core::ids::{AccountId, ApiKeyId};
use tollgate_server::api_key::ApiKeyCache;
use tollgate_server::digest_cache::{DigestCache, TTL};
use tollgate_store_sqlite::SqliteStore;

/// As the `tollgate` binary (`main.rs`): the allocator is part of the hot path.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const ROUNDS: usize = 5;
const PER_ROUND: u64 = 1_000_000;
/// Distinct keys cached for the random-access case: the cache's capacity, so
/// nothing is evicted.
const KEYS: usize = 10_000;

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(run());
}

async fn run() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("bench.db").display());
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&url).await.unwrap());
    let created = Instant::now();
    let secrets = create_keys(&store).await;
    println!("setup: {KEYS} keys over {} accounts created in {:.1} s", KEYS / MAX_PER_ACCOUNT, secs(created.elapsed()));

    // A fixed pseudo-random order of key indexes (xorshift64), read sequentially.
    let mut x = 0x9E37_79B9_7F4A_7C15_u64;
    let order: Vec<u32> = (0..PER_ROUND)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % KEYS as u64) as u32
        })
        .collect();
    let busy = secrets[0].as_str();

    // (1) one busy key: the cache holds only it.
    let mut rounds = Vec::new();
    for _ in 0..ROUNDS {
        let cache = ApiKeyCache::default();
        let warmed = Instant::now();
        assert!(cache.lookup(&store, busy).await.unwrap().is_some());
        rounds.push(
            time_round(|| async {
                for _ in 0..PER_ROUND {
                    black_box(cache.lookup(&store, black_box(busy)).await.unwrap());
                }
            })
            .await,
        );
        assert!(warmed.elapsed() < TTL / 2, "a round must end well within the TTL, or hits become misses");
    }
    report("ApiKeyCache::lookup hit, one busy key", &mut rounds, PER_ROUND);

    // (2) 10,000 keys cached, random access; (4) the misses that fill the cache.
    let mut rounds = Vec::new();
    let mut misses = Vec::new();
    for _ in 0..ROUNDS {
        let cache = ApiKeyCache::default();
        let warmed = Instant::now();
        for secret in &secrets {
            assert!(cache.lookup(&store, secret).await.unwrap().is_some());
        }
        misses.push(warmed.elapsed());
        rounds.push(
            time_round(|| async {
                for &i in &order {
                    black_box(cache.lookup(&store, black_box(secrets[i as usize].as_str())).await.unwrap());
                }
            })
            .await,
        );
        assert!(warmed.elapsed() < TTL / 2, "a round must end well within the TTL, or hits become misses");
    }
    report("ApiKeyCache::lookup hit, 10,000 keys cached, random order", &mut rounds, PER_ROUND);
    report("ApiKeyCache::lookup miss (SQLite read + insert), 10,000 distinct keys", &mut misses, KEYS as u64);

    // (3) where a hit's time goes.
    let mut rounds = Vec::new();
    for _ in 0..ROUNDS {
        rounds.push(
            time_round(|| async {
                for _ in 0..PER_ROUND {
                    black_box(api_keys::digest(black_box(busy)));
                }
            })
            .await,
        );
    }
    report("api_keys::digest (SHA-256 + hex String)", &mut rounds, PER_ROUND);

    let mut rounds = Vec::new();
    for _ in 0..ROUNDS {
        rounds.push(
            time_round(|| async {
                for _ in 0..PER_ROUND {
                    black_box(Sha256::digest(black_box(busy).as_bytes()));
                }
            })
            .await,
        );
    }
    report("SHA-256 alone (raw 32 bytes)", &mut rounds, PER_ROUND);

    let key = store.api_key_by_digest(&api_keys::digest(busy)).await.unwrap();
    let hex = api_keys::digest(busy).0;
    let mut rounds = Vec::new();
    for _ in 0..ROUNDS {
        let cache = DigestCache::<ApiKey>::default();
        cache.insert(hex.clone(), key.clone());
        rounds.push(
            time_round(|| async {
                for _ in 0..PER_ROUND {
                    black_box(cache.get(black_box(hex.as_str())));
                }
            })
            .await,
        );
    }
    report("DigestCache::get hit alone, hex String key (service keys)", &mut rounds, PER_ROUND);

    let raw: [u8; 32] = Sha256::digest(busy.as_bytes()).into();
    let mut rounds = Vec::new();
    for _ in 0..ROUNDS {
        let cache = DigestCache::<ApiKey, [u8; 32]>::default();
        cache.insert(raw, key.clone());
        rounds.push(
            time_round(|| async {
                for _ in 0..PER_ROUND {
                    black_box(cache.get(black_box(&raw)));
                }
            })
            .await,
        );
    }
    report("DigestCache::get hit alone, raw 32-byte key (API keys)", &mut rounds, PER_ROUND);

    let mut rounds = Vec::new();
    for _ in 0..ROUNDS {
        rounds.push(
            time_round(|| async {
                for _ in 0..PER_ROUND {
                    black_box(black_box(&key).clone());
                }
            })
            .await,
        );
    }
    report("ApiKey clone alone", &mut rounds, PER_ROUND);
}

/// 200 external accounts with 50 keys each (the most an account may have), created
/// as `POST /v1/me/api-keys` does; returns the secrets.
async fn create_keys(store: &Arc<dyn Store>) -> Vec<String> {
    let now = OffsetDateTime::now_utc();
    let mut secrets = Vec::with_capacity(KEYS);
    for a in 0..KEYS / MAX_PER_ACCOUNT {
        let account = NewExternalAccount {
            id: AccountId::new(),
            external_id: format!("bench_{a}"),
            name: None,
            email: None,
            created_at: now,
        };
        let (account, _) = store.upsert_external_account(account).await.unwrap();
        for _ in 0..MAX_PER_ACCOUNT {
            let secret = api_keys::generate_secret();
            let key = ApiKey {
                id: ApiKeyId::new(),
                account_id: account.id,
                name: "bench".into(),
                prefix: secret[..DISPLAY_LEN].to_owned(),
                scopes: vec![ApiKeyScope::Read, ApiKeyScope::Write],
                created_at: now,
                expires_at: None,
                last_used_at: None,
                revoked_at: None,
            };
            let audit = AuditEvent::new(Actor::System, "api_key.created", &RequestOrigin::default(), now);
            store.create_api_key(key, api_keys::digest(&secret), audit).await.unwrap();
            secrets.push(secret);
        }
    }
    secrets
}

async fn time_round<F: Future<Output = ()>>(f: impl FnOnce() -> F) -> Duration {
    let started = Instant::now();
    f().await;
    started.elapsed()
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Prints the best round's rate (the least disturbed by other work on the machine),
/// its time per operation, and the median round's rate.
fn report(name: &str, rounds: &mut [Duration], per_round: u64) {
    rounds.sort();
    let rate = |d: Duration| per_round as f64 / d.as_secs_f64();
    println!(
        "{name}: best {:.0} k/s ({:.0} ns each), median {:.0} k/s",
        rate(rounds[0]) / 1e3,
        rounds[0].as_nanos() as f64 / per_round as f64,
        rate(rounds[rounds.len() / 2]) / 1e3
    );
}
