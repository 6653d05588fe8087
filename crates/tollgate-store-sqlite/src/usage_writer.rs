//! Group commit for the hot path. Every consume goes through one task that owns the
//! usage counters in memory (loaded from the database on first use) and writes a whole
//! batch of consumes — counters, events, daily rollups, idempotency answers — in one
//! transaction with a handful of multi-row statements. Each caller is answered only
//! after that transaction commits, so nothing acknowledged is lost, and the single
//! task keeps decisions exact without locks.
//!
//! Why not one transaction per consume: with sqlx every statement is a round trip to
//! the connection's thread, and a consume needs about eight of them; batching turns
//! that into a few per batch. The cache is exact because this task is the only
//! writer of `usage_counters` in the process (SQLite has one process writing).
//!
//! The batch itself runs synchronously on this thread over a connection of its own
//! (rusqlite, statements prepared once and cached), not through sqlx: each sqlx
//! statement is a hop to sqlx's worker thread and back, two context switches that
//! cost more than SQLite's own work (BENCHMARKS.md). SQLite still sees one writer at
//! a time: the batch holds the store's single sqlx writer connection, untouched, as
//! its write lock, so no other write of the store can start meanwhile (kept over
//! back-to-back batches for up to [`HOLD_LOCK_FOR`], given back whenever the queue is
//! empty).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rusqlite::{OptionalExtension, TransactionBehavior, params};
use sqlx::Sqlite;
use sqlx::pool::PoolConnection;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool};
use tokio::sync::{mpsc, oneshot};
use tollgate_core::StoreError;
use tollgate_core::credits::CreditTransfer;
use tollgate_core::ids::{AccountId, ReservationId, UsageEventId};
use tollgate_core::metering::{
    self, CounterReset, CreditFunding, ReservationAction, ReservationStatus, UsageDecision, UsageRequest, WindowState,
};

use crate::rows::micros;
use crate::{db_error, sql_error};

/// Most consumes committed together; a larger batch waits in the channel.
const MAX_BATCH: usize = 512;
/// Longest the writer keeps the store's write lock over back-to-back batches. Giving
/// it back costs a round trip to sqlx's SQLite thread (sqlx pings a connection
/// returning to its pool), and the next batch waited for it on a busy machine; other
/// writes wait at most this long (plus a batch) under a stream of consumes.
const HOLD_LOCK_FOR: Duration = Duration::from_millis(2);
/// Counter rows kept in memory before the cache is dropped and reloaded lazily.
const MAX_CACHED: usize = 200_000;

type CounterKey = (AccountId, String, String);

/// A counter's key borrowed from a request, to look a [`CounterKey`] up without
/// building one (two strings per window per consume). Hashes as the tuple does.
#[derive(Hash)]
struct CounterRef<'a>(AccountId, &'a str, &'a str);

impl hashbrown::Equivalent<CounterKey> for CounterRef<'_> {
    fn equivalent(&self, key: &CounterKey) -> bool {
        self.0 == key.0 && self.1 == key.1 && self.2 == key.2
    }
}

/// What the writer is asked to do: a usage request, or an admin's quota reset (here
/// because this task is the only writer of the counters it remembers).
enum Job {
    Usage { request: UsageRequest, reply: oneshot::Sender<Result<UsageDecision, StoreError>> },
    Reset { reset: CounterReset, reply: oneshot::Sender<Result<u64, StoreError>> },
}

/// A job's answer, in the order of the batch.
enum Answer {
    Usage(Result<UsageDecision, StoreError>),
    Reset(u64),
}

impl Job {
    fn answer(self, answer: Answer) {
        match (self, answer) {
            (Job::Usage { reply, .. }, Answer::Usage(decision)) => {
                let _ = reply.send(decision);
            }
            (Job::Reset { reply, .. }, Answer::Reset(deleted)) => {
                let _ = reply.send(Ok(deleted));
            }
            (job, _) => job.fail("usage writer answered out of order"),
        }
    }

    fn fail(self, error: &str) {
        let e = || StoreError::Unavailable(error.to_owned());
        match self {
            Job::Usage { reply, .. } => drop(reply.send(Err(e()))),
            Job::Reset { reply, .. } => drop(reply.send(Err(e()))),
        }
    }
}

#[derive(Clone)]
pub(crate) struct UsageWriter {
    jobs: mpsc::Sender<Job>,
}

impl UsageWriter {
    /// Starts the writer on its own thread: on the shared runtime, each of a batch's
    /// awaits on SQLite queued the writer behind every request task, and a batch
    /// took as long as the whole server's backlog (p99 latency, BENCHMARKS.md).
    /// `pool` is the store's writer pool (one connection), held through each batch as
    /// the write lock; `options` name the file the writer's own connection opens.
    pub(crate) fn spawn(pool: SqlitePool, options: &SqliteConnectOptions) -> Result<Self, StoreError> {
        let db = open(options)?;
        let (jobs, rx) = mpsc::channel(MAX_BATCH * 8);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Unavailable(format!("usage writer runtime: {e}")))?;
        std::thread::Builder::new()
            .name("tollgate-usage-writer".into())
            .spawn(move || runtime.block_on(run(pool, db, rx)))
            .map_err(|e| StoreError::Unavailable(format!("usage writer thread: {e}")))?;
        Ok(Self { jobs })
    }

    pub(crate) async fn consume(&self, request: UsageRequest) -> Result<UsageDecision, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(Job::Usage { request, reply }).await?;
        answer.await.map_err(|_| StoreError::Unavailable("usage writer stopped".into()))?
    }

    pub(crate) async fn reset(&self, reset: CounterReset) -> Result<u64, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(Job::Reset { reset, reply }).await?;
        answer.await.map_err(|_| StoreError::Unavailable("usage writer stopped".into()))?
    }

    async fn send(&self, job: Job) -> Result<(), StoreError> {
        self.jobs.send(job).await.map_err(|_| StoreError::Unavailable("usage writer stopped".into()))
    }
}

/// What a batch will write, accumulated while its consumes are decided; it borrows
/// names and keys from the batch's requests, which outlive it.
#[derive(Default)]
struct Pending<'a> {
    counters: hashbrown::HashMap<(AccountId, &'a str, &'a str), i64>,
    events: Vec<Event<'a>>,
    daily: hashbrown::HashMap<(AccountId, &'a str, time::Date), (i64, i64)>,
    answers: Vec<(String, String, String, String)>,
    /// Idempotency keys answered earlier in this batch: (scope, key) → (hash, answer).
    answered: HashMap<(String, String), (String, UsageDecision)>,
    /// Reservations opened in this batch.
    opened: Vec<(ReservationId, AccountId, String, i64, String, i64, i64)>,
    /// Reservations settled in this batch, with their new status.
    settled: Vec<(ReservationId, ReservationStatus, i64)>,
}

struct Event<'a> {
    account: AccountId,
    meter: &'a str,
    outcome: &'static str,
    amount: i64,
    idempotency_key: Option<&'a str>,
    endpoint: Option<&'a str>,
    metadata: Option<String>,
    ip: Option<&'a str>,
    at: i64,
}

/// The writer's own connection to the store's file, set up like the sqlx writer
/// (WAL, NORMAL sync, foreign keys, no automatic checkpoints: see `checkpointer`).
fn open(options: &SqliteConnectOptions) -> Result<rusqlite::Connection, StoreError> {
    let path = options.get_filename();
    if path.as_os_str() == ":memory:" || path.to_string_lossy().starts_with("file:sqlx-in-memory") {
        return Err(StoreError::Unavailable("the SQLite store needs a database file, not :memory:".into()));
    }
    let db = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| StoreError::Unavailable(format!("usage writer: {e}")))?;
    db.busy_timeout(std::time::Duration::from_secs(5)).map_err(sql_error)?;
    db.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON; \
         PRAGMA wal_autocheckpoint = 0; PRAGMA journal_size_limit = 67108864;",
    )
    .map_err(sql_error)?;
    db.set_prepared_statement_cache_capacity(32);
    Ok(db)
}

#[derive(Default)]
struct Cache {
    counters: hashbrown::HashMap<CounterKey, i64>,
    accounts: hashbrown::HashSet<AccountId>,
}

async fn run(pool: SqlitePool, mut db: rusqlite::Connection, mut rx: mpsc::Receiver<Job>) {
    let mut cache = Cache::default();
    // The store's one writer connection, unused: while we hold it, no other write of
    // this store can begin. Kept across back-to-back batches (see `HOLD_LOCK_FOR`).
    let mut write_lock: Option<(PoolConnection<Sqlite>, Instant)> = None;
    loop {
        let first = match rx.try_recv() {
            Ok(job) => job,
            Err(_) => {
                // Nothing queued: let other writes in while we wait.
                write_lock = None;
                match rx.recv().await {
                    Some(job) => job,
                    None => break,
                }
            }
        };
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        if cache.counters.len() > MAX_CACHED {
            cache.counters.clear();
        }
        if write_lock.as_ref().is_some_and(|(_, since)| since.elapsed() > HOLD_LOCK_FOR) {
            // Releasing (after the answers) may checkpoint: see `checkpointer.rs` and
            // the writer pool's `after_release`. The pool is fair: a write waiting
            // for it goes before our next batch.
            write_lock = None;
        }
        if write_lock.is_none() {
            match pool.acquire().await {
                Ok(conn) => write_lock = Some((conn, Instant::now())),
                Err(e) => {
                    let e = db_error(e);
                    tracing::error!(error = %e, batch = jobs.len(), "usage batch failed");
                    let message = e.to_string();
                    jobs.into_iter().for_each(|job| job.fail(&message));
                    continue;
                }
            }
        }
        match run_batch(&mut db, &mut cache, &jobs) {
            Ok(answers) => {
                for (job, answer) in jobs.into_iter().zip(answers) {
                    job.answer(answer);
                }
            }
            Err(e) => {
                // The transaction rolled back: the in-memory counters may be ahead of
                // the database, so forget them; every caller of the batch gets the error.
                cache.counters.clear();
                tracing::error!(error = %e, batch = jobs.len(), "usage batch failed");
                let message = e.to_string();
                jobs.into_iter().for_each(|job| job.fail(&message));
            }
        }
    }
}

/// Decides every job in order and writes the batch; per-job errors (unknown account,
/// idempotency conflict) are answers, a database error fails the batch.
fn run_batch(db: &mut rusqlite::Connection, cache: &mut Cache, jobs: &[Job]) -> Result<Vec<Answer>, StoreError> {
    let tx = db.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sql_error)?;
    let mut pending = Pending::default();
    let mut answers = Vec::with_capacity(jobs.len());
    for job in jobs {
        match job {
            Job::Usage { request, .. } => answers.push(Answer::Usage(decide(&tx, cache, &mut pending, request)?)),
            Job::Reset { reset, .. } => {
                // What the batch decided so far is written first, so the reset comes
                // after it, as it came after it in the queue.
                flush(&tx, &std::mem::take(&mut pending))?;
                answers.push(Answer::Reset(reset_counters(&tx, cache, reset)?));
            }
        }
    }
    flush(&tx, &pending)?;
    // Dropped without a commit (an error above), the transaction rolls back.
    tx.commit().map_err(sql_error)?;
    Ok(answers)
}

/// Deletes a reset's counter rows, and forgets them: a missing row counts zero.
fn reset_counters(conn: &rusqlite::Connection, cache: &mut Cache, reset: &CounterReset) -> Result<u64, StoreError> {
    let mut delete = conn
        .prepare_cached("DELETE FROM usage_counters WHERE account_id = ?1 AND meter = ?2 AND window_key = ?3")
        .map_err(sql_error)?;
    let mut deleted = 0;
    for (meter, keys) in &reset.counters {
        for key in keys {
            deleted += delete.execute(params![&reset.account.0.as_bytes()[..], meter, key]).map_err(sql_error)? as u64;
            cache.counters.insert((reset.account, meter.clone(), key.clone()), 0);
        }
    }
    let e = reset.audit.clone().meta("rows_deleted", deleted);
    conn.prepare_cached(crate::store::INSERT_AUDIT)
        .and_then(|mut s| {
            s.execute(params![
                &e.id.0.as_bytes()[..],
                e.actor.kind(),
                e.actor.id(),
                e.action,
                e.target_type,
                e.target_id,
                e.metadata.to_string(),
                e.ip,
                e.user_agent,
                e.severity.as_str(),
                micros(e.created_at),
            ])
        })
        .map_err(sql_error)?;
    Ok(deleted)
}

fn decide<'a>(
    conn: &rusqlite::Connection,
    cache: &mut Cache,
    pending: &mut Pending<'a>,
    request: &'a UsageRequest,
) -> Result<Result<UsageDecision, StoreError>, StoreError> {
    if !cache.accounts.contains(&request.account) {
        let exists: bool = conn
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM accounts WHERE id = ?1)")
            .and_then(|mut s| s.query_row([request.account.0.as_bytes()], |row| row.get(0)))
            .map_err(sql_error)?;
        if !exists {
            return Ok(Err(StoreError::NotFound));
        }
        cache.accounts.insert(request.account);
    }
    if let Some(idem) = &request.idempotency {
        let earlier = match pending.answered.get(&(idem.scope.clone(), idem.key.clone())) {
            Some((hash, decision)) => Some((hash.clone(), decision.clone())),
            None => stored_answer(conn, &idem.scope, &idem.key)?,
        };
        if let Some((hash, mut decision)) = earlier {
            if hash != idem.request_hash {
                return Ok(Err(StoreError::Conflict("idempotency_key")));
            }
            decision.replayed = true;
            return Ok(Ok(decision));
        }
    }
    if let Some(ReservationAction::Settle { id, .. }) = &request.reservation {
        let settled_here = pending.settled.iter().any(|(settled, _, _)| settled == id);
        let status: Option<String> = conn
            .prepare_cached("SELECT status FROM usage_reservations WHERE id = ?1 AND account_id = ?2")
            .and_then(|mut s| s.query_row([id.0.as_bytes(), request.account.0.as_bytes()], |row| row.get(0)).optional())
            .map_err(sql_error)?;
        if settled_here || status.as_deref() != Some("pending") {
            return Ok(Err(StoreError::NotFound));
        }
    }
    let mut used = Vec::with_capacity(request.windows.len());
    for window in &request.windows {
        let mut sum = 0i64;
        for key in window.count_keys.iter() {
            sum = sum.saturating_add(counter(conn, cache, request.account, &request.meter, key)?);
        }
        used.push(sum);
    }
    let mut applied = metering::apply(request.op, &request.windows, &used, request.amount);
    // Spent windows, but the meter draws on credits: pay in this batch's transaction.
    let mut credits_charged = 0;
    if let Some((funding, cost)) = CreditFunding::applies(request, applied.allowed) {
        let payment = CreditTransfer::metered(request, funding, cost);
        match crate::billing::metered_transfer(conn, &payment) {
            Ok(_) => {
                applied.paid_with_credits();
                credits_charged = cost;
            }
            Err(StoreError::Conflict("insufficient_credits")) => {}
            Err(e) => return Err(e),
        }
    }
    for (i, window) in request.windows.iter().enumerate() {
        if applied.deltas[i] == 0 {
            continue;
        }
        let key = CounterRef(request.account, &request.meter, &window.increment_key);
        // `counter` above loaded every count key; the increment key is one of them.
        let value = match cache.counters.get_mut(&key) {
            Some(value) => value,
            None => cache
                .counters
                .entry((request.account, request.meter.clone(), window.increment_key.clone()))
                .or_insert(0),
        };
        // A refund on a rolling window takes from the current bucket only, which may
        // hold less than the window: a row never goes below zero, and the answer,
        // the event and the rollup report what was really taken.
        let delta = applied.deltas[i].max(-*value);
        applied.after[i] = used[i].saturating_add(delta);
        applied.deltas[i] = delta;
        *value = value.saturating_add(delta);
        let pending_delta =
            pending.counters.entry((request.account, &request.meter, &window.increment_key)).or_insert(0);
        *pending_delta = pending_delta.saturating_add(delta);
    }
    match &request.reservation {
        Some(ReservationAction::Open { id, expires_at }) if applied.allowed => {
            let windows = serde_json::to_string(&request.windows).map_err(|e| StoreError::Internal(e.to_string()))?;
            pending.opened.push((
                *id,
                request.account,
                request.meter.clone(),
                request.amount,
                windows,
                micros(*expires_at),
                micros(request.now),
            ));
        }
        Some(ReservationAction::Settle { id, status }) => pending.settled.push((*id, *status, micros(request.now))),
        _ => {}
    }
    let windows = request.windows.iter().zip(&applied.after).map(|(w, u)| WindowState::new(w, *u)).collect();
    let decision = UsageDecision {
        allowed: applied.allowed,
        windows,
        denied_by: applied.denied_by,
        replayed: false,
        credits_charged,
    };
    let (outcome, event_amount) = applied.event(request.op, request.amount);
    let at = micros(request.now);
    pending.events.push(Event {
        account: request.account,
        meter: &request.meter,
        outcome,
        amount: event_amount,
        idempotency_key: request.idempotency.as_ref().map(|i| i.key.as_str()),
        endpoint: request.context.endpoint.as_deref(),
        metadata: request.context.metadata.as_ref().map(|m| m.to_string()),
        ip: request.context.ip.as_deref(),
        at,
    });
    let daily = pending.daily.entry((request.account, &request.meter, request.now.date())).or_insert((0, 0));
    if applied.allowed {
        // Net change: consumes add (paid with credits too), refunds and lowered gauges subtract.
        let net = if credits_charged > 0 { request.amount } else { applied.deltas.first().copied().unwrap_or(0) };
        daily.0 = daily.0.saturating_add(net);
    } else {
        daily.1 += 1;
    }
    if let Some(idem) = &request.idempotency {
        let response = serde_json::to_string(&decision).map_err(|e| StoreError::Internal(e.to_string()))?;
        pending.answers.push((idem.scope.clone(), idem.key.clone(), idem.request_hash.clone(), response));
        pending.answered.insert((idem.scope.clone(), idem.key.clone()), (idem.request_hash.clone(), decision.clone()));
    }
    Ok(Ok(decision))
}

/// A counter row's value: from memory, else from the database (then remembered).
fn counter(
    conn: &rusqlite::Connection,
    cache: &mut Cache,
    account: AccountId,
    meter: &str,
    window_key: &str,
) -> Result<i64, StoreError> {
    if let Some(value) = cache.counters.get(&CounterRef(account, meter, window_key)) {
        return Ok(*value);
    }
    let stored: Option<i64> = conn
        .prepare_cached("SELECT used FROM usage_counters WHERE account_id = ?1 AND meter = ?2 AND window_key = ?3")
        .and_then(|mut s| {
            s.query_row(params![&account.0.as_bytes()[..], meter, window_key], |row| row.get(0)).optional()
        })
        .map_err(sql_error)?;
    let value = stored.unwrap_or(0);
    cache.counters.insert((account, meter.to_owned(), window_key.to_owned()), value);
    Ok(value)
}

/// A daily rollup's day, as stored (`YYYY-MM-DD`, UTC).
fn day_key(d: time::Date) -> String {
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

/// The stored answer to an idempotency key: its request's hash and the decision.
fn stored_answer(
    conn: &rusqlite::Connection,
    scope: &str,
    key: &str,
) -> Result<Option<(String, UsageDecision)>, StoreError> {
    let row: Option<(String, String)> = conn
        .prepare_cached("SELECT request_hash, response FROM idempotency_keys WHERE scope = ?1 AND key = ?2")
        .and_then(|mut s| s.query_row([scope, key], |row| Ok((row.get(0)?, row.get(1)?))).optional())
        .map_err(sql_error)?;
    row.map(|(hash, response)| {
        serde_json::from_str(&response)
            .map(|answer| (hash, answer))
            .map_err(|e| StoreError::Internal(format!("stored answer: {e}")))
    })
    .transpose()
}

/// Writes what the batch decided. One cached statement per table, run once per row:
/// with no thread hop per statement, that is cheaper than building multi-row SQL.
fn flush(conn: &rusqlite::Connection, pending: &Pending) -> Result<(), StoreError> {
    let mut counters = conn
        .prepare_cached(
            "INSERT INTO usage_counters (account_id, meter, window_key, used) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (account_id, meter, window_key) DO UPDATE SET used = used + excluded.used",
        )
        .map_err(sql_error)?;
    for ((account, meter, window_key), delta) in &pending.counters {
        counters.execute(params![&account.0.as_bytes()[..], meter, window_key, delta]).map_err(sql_error)?;
    }
    let mut events = conn
        .prepare_cached(
            "INSERT INTO usage_events (id, account_id, meter, outcome, amount, idempotency_key, endpoint, metadata, ip, \
             created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )
        .map_err(sql_error)?;
    for e in &pending.events {
        events
            .execute(params![
                &UsageEventId::new().0.as_bytes()[..],
                &e.account.0.as_bytes()[..],
                e.meter,
                e.outcome,
                e.amount,
                e.idempotency_key,
                e.endpoint,
                e.metadata,
                e.ip,
                e.at,
            ])
            .map_err(sql_error)?;
    }
    let mut daily = conn
        .prepare_cached(
            "INSERT INTO usage_daily (account_id, meter, day, consumed, denied) VALUES (?1, ?2, ?3, ?4, ?5) \
             ON CONFLICT (account_id, meter, day) DO UPDATE SET consumed = consumed + excluded.consumed, \
             denied = denied + excluded.denied",
        )
        .map_err(sql_error)?;
    for ((account, meter, day), (consumed, denied)) in &pending.daily {
        daily.execute(params![&account.0.as_bytes()[..], meter, day_key(*day), consumed, denied]).map_err(sql_error)?;
    }
    for (id, account, meter, amount, windows, expires_at, created_at) in &pending.opened {
        conn.prepare_cached(
            "INSERT INTO usage_reservations (id, account_id, meter, amount, windows, expires_at, status, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'pending', ?7)",
        )
        .and_then(|mut s| {
            s.execute(params![
                &id.0.as_bytes()[..],
                &account.0.as_bytes()[..],
                meter,
                amount,
                windows,
                expires_at,
                created_at
            ])
        })
        .map_err(sql_error)?;
    }
    for (id, status, at) in &pending.settled {
        conn.prepare_cached(
            "UPDATE usage_reservations SET status = ?2, settled_at = ?3 WHERE id = ?1 AND status = 'pending'",
        )
        .and_then(|mut s| s.execute(params![&id.0.as_bytes()[..], status.as_str(), at]))
        .map_err(sql_error)?;
    }
    if !pending.answers.is_empty() {
        let now = micros(time::OffsetDateTime::now_utc());
        let mut answers = conn
            .prepare_cached(
                "INSERT INTO idempotency_keys (scope, key, request_hash, response, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .map_err(sql_error)?;
        for (scope, key, hash, response) in &pending.answers {
            answers.execute(params![scope, key, hash, response, now]).map_err(sql_error)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A borrowed key finds the owned one (hashbrown needs both to hash alike), and
    /// no other.
    #[test]
    fn a_borrowed_counter_key_finds_the_owned_one() {
        let account = AccountId::new();
        let mut counters = hashbrown::HashMap::new();
        counters.insert((account, "requests".to_owned(), "d:2026-12-07".to_owned()), 7);
        assert_eq!(counters.get(&CounterRef(account, "requests", "d:2026-12-07")), Some(&7));
        assert_eq!(counters.get(&CounterRef(account, "requests", "m:2026-12")), None);
        assert_eq!(counters.get(&CounterRef(AccountId::new(), "requests", "d:2026-12-07")), None);
    }
}
