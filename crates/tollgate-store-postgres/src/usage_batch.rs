//! Group commit for plain consumes: one transaction, so one WAL flush, for a whole
//! batch of them.
//!
//! With `synchronous_commit = on` every commit waits for its WAL flush, so one
//! transaction per consume caps a hot account at the disk's flush rate. Instead, a
//! task per store drains up to [`MAX_BATCH`] queued consumes and, in one transaction:
//! takes the advisory lock of every (account, meter) of the batch, in ascending key
//! order; reads the counter rows; decides every consume in arrival order in memory
//! (each one sees the counters as the ones before it left them); writes counters,
//! events and daily rollups with one multi-row statement; commits. Callers are
//! answered only after the commit, and all of them get the error if it fails.
//!
//! Exactness is the same argument as in `usage::consume_usage`: every writer of an
//! (account, meter)'s counters holds its advisory lock, and the rows are read only once
//! the batch holds all of its locks. Unlike the SQLite writer nothing about counters is
//! remembered between batches, since other instances write them too. Locks are taken
//! in ascending order so that batches of several instances cannot deadlock; a single
//! consume takes one lock, so it cannot deadlock with a batch either.
//!
//! Only plain consumes are batched (see [`is_batchable`]): dry runs, idempotent
//! requests and reservations keep their own transaction in `usage.rs`.

use std::collections::{HashMap, HashSet};

use serde_json::Value;
use sqlx::postgres::{PgConnection, PgPool};
use sqlx::types::Json;
use time::{Date, UtcOffset};
use tokio::sync::{mpsc, oneshot};
use tollgate_core::ids::{AccountId, UsageEventId};
use tollgate_core::metering::{self, EventContext, UsageDecision, UsageRequest, WindowState};
use tollgate_core::{StoreError, Timestamp};
use uuid::Uuid;

use crate::usage::{consume_alone, counters_lock_key};
use crate::{PgStore, db_error};

/// Most consumes committed together; later ones wait for the next batch.
const MAX_BATCH: usize = 256;
/// Consumes queued beyond this make their callers wait to enqueue.
const QUEUE: usize = MAX_BATCH * 8;
/// Accounts remembered as existing before the set is dropped and refilled lazily.
const MAX_KNOWN_ACCOUNTS: usize = 100_000;

struct Job {
    request: UsageRequest,
    reply: oneshot::Sender<Result<UsageDecision, StoreError>>,
}

/// The sending side of a store's batcher. The task ends once every clone of the
/// store (hence of this sender) is gone.
#[derive(Clone)]
pub(crate) struct UsageBatcher {
    jobs: mpsc::Sender<Job>,
}

impl UsageBatcher {
    /// Starts the batcher on the current Tokio runtime.
    pub(crate) fn spawn(pool: PgPool) -> Result<Self, StoreError> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|e| StoreError::Unavailable(format!("usage batcher needs a Tokio runtime: {e}")))?;
        let (jobs, queue) = mpsc::channel(QUEUE);
        runtime.spawn(run(pool, queue));
        Ok(Self { jobs })
    }

    /// Consumes as part of the next batch; answers after its commit.
    pub(crate) async fn consume(&self, store: &PgStore, request: UsageRequest) -> Result<UsageDecision, StoreError> {
        let (reply, answer) = oneshot::channel();
        if let Err(mpsc::error::SendError(job)) = self.jobs.send(Job { request, reply }).await {
            // The task is gone while the store lives (a panic, or its runtime shutting
            // down). The request was never sent, so it can safely take its own
            // transaction instead.
            tracing::error!("usage batcher stopped; consuming without it");
            return consume_alone(store, job.request).await;
        }
        answer.await.map_err(|_| StoreError::Unavailable("usage batcher stopped before answering".into()))?
    }
}

/// Whether `request` goes through the batcher: a plain consume (or refund, or gauge
/// set), which PostgreSQL will not refuse for its own content. A text or jsonb value
/// with a NUL character fails its statement, and in a batch that would fail every
/// consume of the batch; such a request keeps its own transaction (and its error).
pub(crate) fn is_batchable(request: &UsageRequest) -> bool {
    // Meters funded by credits pay inside their own transaction (`consume_alone`).
    request.idempotency.is_none()
        && request.reservation.is_none()
        && request.credits.is_none()
        && !request.dry_run
        && !has_nul(request)
}

fn has_nul(request: &UsageRequest) -> bool {
    let context = &request.context;
    request.meter.contains('\0')
        || request
            .windows
            .iter()
            .any(|w| w.increment_key.contains('\0') || w.count_keys.iter().any(|k| k.contains('\0')))
        || context.endpoint.as_deref().is_some_and(|e| e.contains('\0'))
        || context.ip.as_deref().is_some_and(|ip| ip.contains('\0'))
        || context.metadata.as_ref().is_some_and(json_has_nul)
}

fn json_has_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(json_has_nul),
        Value::Object(fields) => fields.iter().any(|(k, v)| k.contains('\0') || json_has_nul(v)),
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}

async fn run(pool: PgPool, mut queue: mpsc::Receiver<Job>) {
    // Accounts are never deleted, so one seen to exist still does: only unknown ones
    // are looked up. (This is no counter cache; those are always read again.)
    let mut known_accounts = HashSet::new();
    let mut jobs = Vec::with_capacity(MAX_BATCH);
    // Zero once the queue is closed and empty: every store clone is gone.
    while queue.recv_many(&mut jobs, MAX_BATCH).await > 0 {
        if known_accounts.len() > MAX_KNOWN_ACCOUNTS {
            known_accounts.clear();
        }
        let outcome = {
            let requests: Vec<&UsageRequest> = jobs.iter().map(|job| &job.request).collect();
            commit_batch(&pool, &mut known_accounts, &requests).await
        };
        match outcome {
            Ok(answers) => {
                for (job, answer) in jobs.drain(..).zip(answers) {
                    // A caller that gave up no longer listens; its consume stands.
                    let _ = job.reply.send(answer);
                }
            }
            Err(e) => {
                // Rolled back, so nothing of the batch was written (unless the connection
                // was lost during COMMIT: then unknown, as for a single consume).
                tracing::error!(error = %e, batch = jobs.len(), "usage batch failed");
                for job in jobs.drain(..) {
                    let _ = job.reply.send(Err(same_error(&e)));
                }
            }
        }
    }
}

/// `StoreError` is not `Clone`; every caller of a failed batch gets its own copy.
fn same_error(e: &StoreError) -> StoreError {
    match e {
        StoreError::NotFound => StoreError::NotFound,
        StoreError::Conflict(what) => StoreError::Conflict(what),
        StoreError::Unavailable(message) => StoreError::Unavailable(message.clone()),
        StoreError::Internal(message) => StoreError::Internal(message.clone()),
    }
}

/// Decides and writes `requests` in one transaction: the answers in order (a consume
/// for an unknown account is `NotFound` and writes nothing), or the error that failed
/// the whole batch.
async fn commit_batch(
    pool: &PgPool,
    known_accounts: &mut HashSet<AccountId>,
    requests: &[&UsageRequest],
) -> Result<Vec<Result<UsageDecision, StoreError>>, StoreError> {
    let mut tx = pool.begin().await.map_err(db_error)?;
    let unknown: HashSet<Uuid> =
        requests.iter().filter(|r| !known_accounts.contains(&r.account)).map(|r| r.account.0).collect();
    if !unknown.is_empty() {
        let unknown: Vec<Uuid> = unknown.into_iter().collect();
        let found: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM accounts WHERE id = ANY($1)")
            .bind(unknown)
            .fetch_all(&mut *tx)
            .await
            .map_err(db_error)?;
        known_accounts.extend(found.into_iter().map(AccountId));
    }
    let counted: Vec<&UsageRequest> =
        requests.iter().copied().filter(|r| known_accounts.contains(&r.account)).collect();
    if counted.is_empty() {
        return Ok(requests.iter().map(|_| Err(StoreError::NotFound)).collect());
    }

    let mut lock_keys: Vec<i64> = counted.iter().map(|r| counters_lock_key(r.account, &r.meter)).collect();
    lock_keys.sort_unstable();
    lock_keys.dedup();
    // One statement; the ORDER BY keeps the subquery from being flattened, so the locks
    // are taken one after the other in ascending order.
    sqlx::query(
        "SELECT count(pg_advisory_xact_lock(k)) FROM (SELECT DISTINCT k FROM UNNEST($1::bigint[]) AS t (k) ORDER BY k) s",
    )
    .bind(lock_keys)
    .execute(&mut *tx)
    .await
    .map_err(db_error)?;

    // A statement of its own, after the locks: its snapshot includes every commit of
    // whoever held them before.
    let mut batch = Batch::with_counters(read_counters(&mut tx, &counted).await?);
    let answers = requests
        .iter()
        .map(|r| if known_accounts.contains(&r.account) { Ok(batch.decide(r)) } else { Err(StoreError::NotFound) })
        .collect();
    batch.write(&mut tx).await?;
    tx.commit().await.map_err(db_error)?;
    Ok(answers)
}

/// One counter row: (account, meter, window key).
type CounterKey<'a> = (AccountId, &'a str, &'a str);

#[derive(Debug)]
struct Counter {
    used: i64,
    /// Changed by this batch, so to be written.
    changed: bool,
}

/// The stored value of every counter row the requests read or increment (missing
/// rows are 0, as in `window_usage`).
async fn read_counters<'a>(
    conn: &mut PgConnection,
    requests: &[&'a UsageRequest],
) -> Result<HashMap<CounterKey<'a>, Counter>, StoreError> {
    let mut wanted: Vec<CounterKey<'a>> = Vec::new();
    let mut seen = HashSet::new();
    for request in requests {
        for window in &request.windows {
            for key in window.count_keys.iter().chain([&window.increment_key]) {
                let row = (request.account, request.meter.as_str(), key.as_str());
                if seen.insert(row) {
                    wanted.push(row);
                }
            }
        }
    }
    let accounts: Vec<Uuid> = wanted.iter().map(|(account, _, _)| account.0).collect();
    let meters: Vec<&str> = wanted.iter().map(|(_, meter, _)| *meter).collect();
    let keys: Vec<&str> = wanted.iter().map(|(_, _, key)| *key).collect();
    // Rows come back by their position in the arrays (1-based).
    let stored: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT k.i, c.used \
         FROM UNNEST($1::uuid[], $2::text[], $3::text[]) WITH ORDINALITY AS k (account_id, meter, window_key, i) \
         JOIN usage_counters c USING (account_id, meter, window_key)",
    )
    .bind(accounts)
    .bind(meters)
    .bind(keys)
    .fetch_all(conn)
    .await
    .map_err(db_error)?;
    let mut counters = HashMap::with_capacity(wanted.len());
    for (position, used) in stored {
        let row = usize::try_from(position - 1)
            .ok()
            .and_then(|i| wanted.get(i))
            .ok_or_else(|| StoreError::Internal(format!("counter row {position} was not asked for")))?;
        counters.insert(*row, Counter { used, changed: false });
    }
    Ok(counters)
}

/// The usage event of one consume.
struct Event<'a> {
    id: Uuid,
    account: AccountId,
    meter: &'a str,
    outcome: &'static str,
    amount: i64,
    context: &'a EventContext,
    at: Timestamp,
}

/// A batch being decided: the counters as the consumes so far left them, and what to
/// write.
struct Batch<'a> {
    counters: HashMap<CounterKey<'a>, Counter>,
    events: Vec<Event<'a>>,
    /// (account, meter, UTC day) → (consumed, denied).
    daily: HashMap<(AccountId, &'a str, Date), (i64, i64)>,
}

impl<'a> Batch<'a> {
    fn with_counters(counters: HashMap<CounterKey<'a>, Counter>) -> Self {
        Self { counters, events: Vec::new(), daily: HashMap::new() }
    }

    /// Decides one consume as `usage::consume_alone` would on the counters as they
    /// stand, and records its effects.
    fn decide(&mut self, request: &'a UsageRequest) -> UsageDecision {
        let (account, meter) = (request.account, request.meter.as_str());
        let used: Vec<i64> = request
            .windows
            .iter()
            .map(|window| {
                let keys = &window.count_keys;
                // Each distinct row once, as `window_usage` sums them.
                keys.iter()
                    .enumerate()
                    .filter(|(i, key)| !keys[..*i].contains(key))
                    .map(|(_, key)| self.counters.get(&(account, meter, key.as_str())).map_or(0, |c| c.used))
                    .fold(0, i64::saturating_add)
            })
            .collect();
        let applied = metering::apply(request.op, &request.windows, &used, request.amount);

        // As the single consume's write: deltas summed per increment row (two windows
        // may share one), then the row clamped at zero, since a refund of a rolling
        // window takes from its current bucket only. The answer, as there, reports the
        // unclamped usage.
        let mut row_deltas: Vec<(&'a str, i64)> = Vec::new();
        for (window, delta) in request.windows.iter().zip(&applied.deltas).filter(|(_, d)| **d != 0) {
            match row_deltas.iter_mut().find(|(key, _)| *key == window.increment_key) {
                Some((_, sum)) => *sum = sum.saturating_add(*delta),
                None => row_deltas.push((window.increment_key.as_str(), *delta)),
            }
        }
        for (key, delta) in row_deltas {
            let counter = self.counters.entry((account, meter, key)).or_insert(Counter { used: 0, changed: false });
            counter.used = counter.used.saturating_add(delta).max(0);
            counter.changed = true;
        }

        let (outcome, amount) = applied.event(request.op, request.amount);
        self.events.push(Event {
            id: UsageEventId::new().0,
            account,
            meter,
            outcome,
            amount,
            context: &request.context,
            at: request.now,
        });
        let day = request.now.to_offset(UtcOffset::UTC).date();
        let (consumed, denied) = self.daily.entry((account, meter, day)).or_insert((0, 0));
        if applied.allowed {
            // Net change of the first window: consumes add, refunds and lowered gauges
            // subtract.
            *consumed = consumed.saturating_add(applied.deltas.first().copied().unwrap_or(0));
        } else {
            *denied += 1;
        }
        let windows = request.windows.iter().zip(&applied.after).map(|(w, u)| WindowState::new(w, *u)).collect();
        UsageDecision {
            allowed: applied.allowed,
            windows,
            denied_by: applied.denied_by,
            replayed: false,
            credits_charged: 0,
        }
    }

    /// Writes the batch in one statement. Counter rows get their new value outright:
    /// the batch holds their locks, so nobody changed them since they were read.
    async fn write(&self, conn: &mut PgConnection) -> Result<(), StoreError> {
        let changed: Vec<(&CounterKey<'a>, i64)> =
            self.counters.iter().filter(|(_, c)| c.changed).map(|(row, c)| (row, c.used)).collect();
        let daily: Vec<_> = self.daily.iter().collect();
        sqlx::query(
            "WITH counters AS ( \
               INSERT INTO usage_counters (account_id, meter, window_key, used) \
               SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::bigint[]) \
               ON CONFLICT (account_id, meter, window_key) DO UPDATE SET used = excluded.used \
             ), events AS ( \
               INSERT INTO usage_events (id, account_id, meter, outcome, amount, endpoint, metadata, ip, created_at) \
               SELECT * FROM UNNEST($5::uuid[], $6::uuid[], $7::text[], $8::text[], $9::bigint[], $10::text[], \
                 $11::jsonb[], $12::text[], $13::timestamptz[]) \
             ) \
             INSERT INTO usage_daily (account_id, meter, day, consumed, denied) \
             SELECT * FROM UNNEST($14::uuid[], $15::text[], $16::date[], $17::bigint[], $18::bigint[]) \
             ON CONFLICT (account_id, meter, day) DO UPDATE \
               SET consumed = usage_daily.consumed + excluded.consumed, denied = usage_daily.denied + excluded.denied",
        )
        .bind(changed.iter().map(|((account, _, _), _)| account.0).collect::<Vec<Uuid>>())
        .bind(changed.iter().map(|((_, meter, _), _)| *meter).collect::<Vec<&str>>())
        .bind(changed.iter().map(|((_, _, key), _)| *key).collect::<Vec<&str>>())
        .bind(changed.iter().map(|(_, used)| *used).collect::<Vec<i64>>())
        .bind(self.events.iter().map(|e| e.id).collect::<Vec<Uuid>>())
        .bind(self.events.iter().map(|e| e.account.0).collect::<Vec<Uuid>>())
        .bind(self.events.iter().map(|e| e.meter).collect::<Vec<&str>>())
        .bind(self.events.iter().map(|e| e.outcome).collect::<Vec<&str>>())
        .bind(self.events.iter().map(|e| e.amount).collect::<Vec<i64>>())
        .bind(self.events.iter().map(|e| e.context.endpoint.as_deref()).collect::<Vec<Option<&str>>>())
        .bind(self.events.iter().map(|e| e.context.metadata.as_ref().map(Json)).collect::<Vec<Option<Json<&Value>>>>())
        .bind(self.events.iter().map(|e| e.context.ip.as_deref()).collect::<Vec<Option<&str>>>())
        .bind(self.events.iter().map(|e| e.at).collect::<Vec<Timestamp>>())
        .bind(daily.iter().map(|((account, _, _), _)| account.0).collect::<Vec<Uuid>>())
        .bind(daily.iter().map(|((_, meter, _), _)| *meter).collect::<Vec<&str>>())
        .bind(daily.iter().map(|((_, _, day), _)| *day).collect::<Vec<Date>>())
        .bind(daily.iter().map(|(_, (consumed, _))| *consumed).collect::<Vec<i64>>())
        .bind(daily.iter().map(|(_, (_, denied))| *denied).collect::<Vec<i64>>())
        .execute(conn)
        .await
        .map_err(db_error)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::Arc;

    use serde_json::json;
    use time::Duration;
    use tollgate_core::Store;
    use tollgate_core::accounts::NewExternalAccount;
    use tollgate_core::conformance::t0;
    use tollgate_core::ids::AccountId;
    use tollgate_core::metering::window::Window;
    use tollgate_core::metering::{EventContext, UsageOp, UsageRequest, WindowCheck};
    use tollgate_core::{StoreError, Timestamp};

    use super::{commit_batch, is_batchable};
    use crate::PgStore;
    use crate::testing::TestDatabase;
    use crate::usage::consume_alone;

    async fn account(store: &PgStore, external_id: &str) -> AccountId {
        let new = NewExternalAccount {
            id: AccountId::new(),
            external_id: external_id.into(),
            name: None,
            email: None,
            created_at: t0(),
        };
        store.upsert_external_account(new).await.unwrap().0.id
    }

    fn window(window: Window, count_keys: &[&str], increment_key: &str, limit: Option<i64>) -> WindowCheck {
        WindowCheck {
            window,
            limit,
            count_keys: count_keys.iter().map(|k| (*k).to_owned()).collect(),
            increment_key: increment_key.into(),
            resets_at: None,
        }
    }

    fn request(
        account: AccountId,
        now: Timestamp,
        op: UsageOp,
        amount: i64,
        windows: Vec<WindowCheck>,
    ) -> UsageRequest {
        UsageRequest {
            account,
            meter: "messages".into(),
            op,
            amount,
            windows,
            dry_run: false,
            idempotency: None,
            context: EventContext { endpoint: Some("/chat".into()), metadata: None, ip: Some("10.0.0.1".into()) },
            now,
            reservation: None,
            credits: None,
        }
    }

    /// Every kind of plain request, in an order where each depends on the ones before.
    fn sequence(account: AccountId, now: Timestamp) -> Vec<UsageRequest> {
        let at = |i: i64| now + Duration::seconds(i);
        // A rolling window of two buckets, incrementing the second.
        let rolling = || vec![window(Window::Rolling { seconds: 120 }, &["b:1", "b:2"], "b:2", Some(10))];
        let pair =
            || vec![window(Window::Day, &["d:1"], "d:1", Some(10)), window(Window::Month, &["m:1"], "m:1", Some(3))];
        let gauge = || vec![window(Window::Lifetime, &["g"], "g", Some(10))];
        // Two windows sharing a row, and a window naming its row twice.
        let shared = || vec![window(Window::Day, &["s"], "s", None), window(Window::Month, &["s"], "s", None)];
        let twice = || vec![window(Window::Day, &["s", "s"], "s", Some(100))];
        let mut requests = vec![
            request(account, at(0), UsageOp::Consume, 5, vec![window(Window::Lifetime, &["b:1"], "b:1", None)]),
            // Takes 4 from the current bucket, which holds nothing: the row stays at 0
            // while the answer says 1.
            request(account, at(1), UsageOp::Refund, 4, rolling()),
            request(account, at(2), UsageOp::Consume, 3, rolling()),
            request(account, at(3), UsageOp::Consume, 3, rolling()),
            request(account, at(4), UsageOp::Consume, 4, pair()),
            request(account, at(5), UsageOp::Consume, 2, pair()),
            request(account, at(6), UsageOp::Refund, 10, pair()),
            request(account, at(7), UsageOp::Set, 7, gauge()),
            request(account, at(8), UsageOp::Set, 11, gauge()),
            request(account, at(9), UsageOp::Set, 2, gauge()),
            request(account, at(10), UsageOp::Consume, 2, shared()),
            request(account, at(11), UsageOp::Consume, 1, twice()),
            request(AccountId::new(), at(12), UsageOp::Consume, 1, pair()),
            // The next day, with metadata and without a context.
            request(account, at(86_400), UsageOp::Consume, 1, pair()),
        ];
        requests[11].context.metadata = Some(json!({"model": "large", "tokens": [1, 2.5], "nested": {"ok": true}}));
        requests[13].context = EventContext::default();
        requests
    }

    /// meter, amount, outcome, endpoint, metadata, ip, created_at
    type EventRow = (String, i64, String, Option<String>, Option<String>, Option<String>, Timestamp);

    /// What a sequence left in the database for `account`, as comparable text.
    async fn stored(store: &PgStore, account: AccountId) -> (Vec<String>, Vec<String>, Vec<String>) {
        let counters: Vec<(String, i64)> =
            sqlx::query_as("SELECT window_key, used FROM usage_counters WHERE account_id = $1 ORDER BY window_key")
                .bind(account.0)
                .fetch_all(&store.pool)
                .await
                .unwrap();
        let events: Vec<EventRow> = sqlx::query_as(
            "SELECT meter, amount, outcome, endpoint, metadata::text, ip, created_at FROM usage_events \
                 WHERE account_id = $1 ORDER BY created_at",
        )
        .bind(account.0)
        .fetch_all(&store.pool)
        .await
        .unwrap();
        let daily: Vec<(String, time::Date, i64, i64)> = sqlx::query_as(
            "SELECT meter, day, consumed, denied FROM usage_daily WHERE account_id = $1 ORDER BY meter, day",
        )
        .bind(account.0)
        .fetch_all(&store.pool)
        .await
        .unwrap();
        (
            counters.iter().map(|r| format!("{r:?}")).collect(),
            events.iter().map(|r| format!("{r:?}")).collect(),
            daily.iter().map(|r| format!("{r:?}")).collect(),
        )
    }

    /// One batch decides and writes exactly what the same requests do one transaction
    /// at a time: answers, counter rows (clamped at zero), events and daily rollups.
    #[tokio::test]
    async fn a_batch_matches_single_consumes() {
        let Some(database) = TestDatabase::create().await else { return };
        let store = PgStore::connect_with(database.options.clone()).await.unwrap();
        let (batched_account, single_account) = (account(&store, "batched").await, account(&store, "single").await);

        let now = t0();
        let batched_requests = sequence(batched_account, now);
        assert!(batched_requests.iter().all(is_batchable));
        let refs: Vec<&UsageRequest> = batched_requests.iter().collect();
        let batched = commit_batch(&store.pool, &mut HashSet::new(), &refs).await.unwrap();
        let mut single = Vec::new();
        for request in sequence(single_account, now) {
            single.push(consume_alone(&store, request).await);
        }
        assert_eq!(batched.len(), single.len());
        for (i, (batched, single)) in batched.iter().zip(&single).enumerate() {
            assert_eq!(format!("{batched:?}"), format!("{single:?}"), "request {i}");
        }
        assert!(matches!(batched[12], Err(StoreError::NotFound)));
        let answer = |i: usize| batched[i].as_ref().unwrap();
        assert_eq!(answer(1).windows[0].used, 1, "the unclamped answer");
        assert!(!answer(3).allowed && answer(4).denied_by == Some(Window::Month));

        let (counters, events, daily) = stored(&store, batched_account).await;
        assert_eq!((counters.clone(), events.clone(), daily.clone()), stored(&store, single_account).await);
        assert!(counters.contains(&r#"("b:2", 3)"#.to_owned()), "{counters:?}");
        assert_eq!(events.len(), 13);
        assert_eq!(daily.len(), 2);
        store.close().await;
        database.drop().await;
    }

    #[test]
    fn only_plain_requests_without_nul_are_batched() {
        let plain = request(AccountId::new(), t0(), UsageOp::Consume, 1, vec![]);
        assert!(is_batchable(&plain));
        let mut dry = plain.clone();
        dry.dry_run = true;
        assert!(!is_batchable(&dry));
        let mut nul = plain.clone();
        nul.context.metadata = Some(json!({"note": ["a\u{0}b"]}));
        assert!(!is_batchable(&nul));
        let mut nul = plain;
        nul.context.endpoint = Some("/x\u{0}".into());
        assert!(!is_batchable(&nul));
    }

    /// Two instances (two stores, each with its own batcher and pool) consume on one
    /// hot account at once: exactly the limit is granted, and the counters, events and
    /// daily rollup agree.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_instances_grant_exactly_the_limit() {
        const INSTANCES: usize = 2;
        const TASKS: usize = 32;
        const EACH: usize = 100;
        const LIMIT: i64 = 5_000;
        let Some(database) = TestDatabase::create().await else { return };
        let mut stores = Vec::new();
        for _ in 0..INSTANCES {
            stores.push(PgStore::connect_with(database.options.clone()).await.unwrap());
        }
        let hot = account(&stores[0], "cus_hot").await;
        let now = t0();
        let windows = || {
            vec![
                window(Window::Day, &["d:1"], "d:1", Some(LIMIT)),
                window(Window::Rolling { seconds: 120 }, &["r:1", "r:2"], "r:2", Some(LIMIT + 500)),
            ]
        };
        let start = Arc::new(tokio::sync::Barrier::new(INSTANCES * TASKS));
        let mut tasks = Vec::new();
        for store in &stores {
            for _ in 0..TASKS {
                let (store, start) = (store.clone(), start.clone());
                tasks.push(tokio::spawn(async move {
                    start.wait().await;
                    let mut granted = 0i64;
                    for _ in 0..EACH {
                        let request = request(hot, now, UsageOp::Consume, 1, windows());
                        if store.consume_usage(request).await.unwrap().allowed {
                            granted += 1;
                        }
                    }
                    granted
                }));
            }
        }
        let mut granted = 0;
        for task in tasks {
            granted += task.await.unwrap();
        }
        let total = (INSTANCES * TASKS * EACH) as i64;
        assert_eq!(granted, LIMIT, "exactly the limit was granted");
        let store = &stores[1];
        let keys = vec![vec!["d:1".to_owned()], vec!["r:1".to_owned(), "r:2".to_owned()]];
        assert_eq!(store.counter_values(hot, "messages", &keys).await.unwrap(), vec![LIMIT, LIMIT]);
        let outcomes: Vec<(String, i64)> = sqlx::query_as(
            "SELECT outcome, COUNT(*) FROM usage_events WHERE account_id = $1 GROUP BY outcome ORDER BY outcome",
        )
        .bind(hot.0)
        .fetch_all(&store.pool)
        .await
        .unwrap();
        assert_eq!(outcomes, vec![("consumed".to_owned(), LIMIT), ("denied".to_owned(), total - LIMIT)]);
        // Each event's inserting transaction: fewer than the consumes, so they were batched.
        let transactions: i64 =
            sqlx::query_scalar("SELECT COUNT(DISTINCT xmin::text) FROM usage_events WHERE account_id = $1")
                .bind(hot.0)
                .fetch_one(&store.pool)
                .await
                .unwrap();
        eprintln!("{total} consumes in {transactions} transactions");
        assert!(transactions < total, "{transactions} transactions");
        let daily = store.usage_daily(hot, None, "2000-01-01", "2999-12-31").await.unwrap();
        assert_eq!(daily.len(), 1);
        assert_eq!((daily[0].consumed, daily[0].denied), (LIMIT, total - LIMIT));
        for store in stores {
            store.close().await;
        }
        database.drop().await;
    }
}
