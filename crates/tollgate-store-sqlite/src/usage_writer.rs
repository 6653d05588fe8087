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

use std::collections::{HashMap, HashSet};

use sqlx::sqlite::{Sqlite, SqliteConnection, SqlitePool};
use sqlx::{Connection, QueryBuilder};
use tokio::sync::{mpsc, oneshot};
use tollgate_core::credits::CreditTransfer;
use tollgate_core::ids::{AccountId, ReservationId, UsageEventId};
use tollgate_core::metering::{
    self, CreditFunding, ReservationAction, ReservationStatus, UsageDecision, UsageRequest, WindowState,
};
use tollgate_core::{StoreError, Timestamp};

use crate::db_error;
use crate::rows::micros;

/// Most consumes committed together; a larger batch waits in the channel.
const MAX_BATCH: usize = 512;
/// Counter rows kept in memory before the cache is dropped and reloaded lazily.
const MAX_CACHED: usize = 200_000;
/// Rows per multi-row statement (keeps well under SQLite's parameter limit).
const CHUNK: usize = 200;

type CounterKey = (AccountId, String, String);

struct Job {
    request: UsageRequest,
    reply: oneshot::Sender<Result<UsageDecision, StoreError>>,
}

#[derive(Clone)]
pub(crate) struct UsageWriter {
    jobs: mpsc::Sender<Job>,
}

impl UsageWriter {
    /// Starts the writer on its own thread: on the shared runtime, each of a batch's
    /// awaits on SQLite queued the writer behind every request task, and a batch
    /// took as long as the whole server's backlog (p99 latency, BENCHMARKS.md).
    pub(crate) fn spawn(pool: SqlitePool) -> Result<Self, StoreError> {
        let (jobs, rx) = mpsc::channel(MAX_BATCH * 8);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Unavailable(format!("usage writer runtime: {e}")))?;
        std::thread::Builder::new()
            .name("tollgate-usage-writer".into())
            .spawn(move || runtime.block_on(run(pool, rx)))
            .map_err(|e| StoreError::Unavailable(format!("usage writer thread: {e}")))?;
        Ok(Self { jobs })
    }

    pub(crate) async fn consume(&self, request: UsageRequest) -> Result<UsageDecision, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job { request, reply })
            .await
            .map_err(|_| StoreError::Unavailable("usage writer stopped".into()))?;
        answer.await.map_err(|_| StoreError::Unavailable("usage writer stopped".into()))?
    }
}

/// What a batch will write, accumulated while its consumes are decided.
#[derive(Default)]
struct Pending {
    counters: HashMap<CounterKey, i64>,
    events: Vec<Event>,
    daily: HashMap<(AccountId, String, String), (i64, i64)>,
    answers: Vec<(String, String, String, String)>,
    /// Idempotency keys answered earlier in this batch: (scope, key) → (hash, answer).
    answered: HashMap<(String, String), (String, UsageDecision)>,
    /// Reservations opened in this batch.
    opened: Vec<(ReservationId, AccountId, String, i64, String, i64, i64)>,
    /// Reservations settled in this batch, with their new status.
    settled: Vec<(ReservationId, ReservationStatus, i64)>,
}

struct Event {
    account: AccountId,
    meter: String,
    outcome: &'static str,
    amount: i64,
    idempotency_key: Option<String>,
    endpoint: Option<String>,
    metadata: Option<String>,
    ip: Option<String>,
    at: i64,
}

#[derive(Default)]
struct Cache {
    counters: HashMap<CounterKey, i64>,
    accounts: HashSet<AccountId>,
}

async fn run(pool: SqlitePool, mut rx: mpsc::Receiver<Job>) {
    let mut cache = Cache::default();
    while let Some(first) = rx.recv().await {
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
        let mut conn = match pool.acquire().await {
            Ok(conn) => conn,
            Err(e) => {
                let e = db_error(e);
                tracing::error!(error = %e, batch = jobs.len(), "usage batch failed");
                for job in jobs {
                    let _ = job.reply.send(Err(StoreError::Unavailable(e.to_string())));
                }
                continue;
            }
        };
        match run_batch(&mut conn, &mut cache, &jobs).await {
            Ok(decisions) => {
                for (job, decision) in jobs.into_iter().zip(decisions) {
                    let _ = job.reply.send(decision);
                }
            }
            Err(e) => {
                // The transaction rolled back: the in-memory counters may be ahead of
                // the database, so forget them; every caller of the batch gets the error.
                cache.counters.clear();
                tracing::error!(error = %e, batch = jobs.len(), "usage batch failed");
                for job in jobs {
                    let _ = job.reply.send(Err(StoreError::Unavailable(e.to_string())));
                }
            }
        }
        // Releasing the connection (after the answers) may checkpoint: see
        // `checkpointer.rs` and the writer pool's `after_release`.
    }
}

/// Decides every job in order and writes the batch; per-job errors (unknown account,
/// idempotency conflict) are answers, a database error fails the batch.
async fn run_batch(
    conn: &mut SqliteConnection,
    cache: &mut Cache,
    jobs: &[Job],
) -> Result<Vec<Result<UsageDecision, StoreError>>, StoreError> {
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await.map_err(db_error)?;
    let mut pending = Pending::default();
    let mut decisions = Vec::with_capacity(jobs.len());
    for job in jobs {
        decisions.push(decide(&mut tx, cache, &mut pending, &job.request).await?);
    }
    flush(&mut tx, &pending).await?;
    tx.commit().await.map_err(db_error)?;
    Ok(decisions)
}

async fn decide(
    conn: &mut SqliteConnection,
    cache: &mut Cache,
    pending: &mut Pending,
    request: &UsageRequest,
) -> Result<Result<UsageDecision, StoreError>, StoreError> {
    if !cache.accounts.contains(&request.account) {
        let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM accounts WHERE id = ?1)")
            .bind(request.account.0)
            .fetch_one(&mut *conn)
            .await
            .map_err(db_error)?;
        if !exists {
            return Ok(Err(StoreError::NotFound));
        }
        cache.accounts.insert(request.account);
    }
    if let Some(idem) = &request.idempotency {
        let earlier = match pending.answered.get(&(idem.scope.clone(), idem.key.clone())) {
            Some((hash, decision)) => Some((hash.clone(), decision.clone())),
            None => crate::usage::stored_answer(&mut *conn, &idem.scope, &idem.key).await?,
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
        let status: Option<String> =
            sqlx::query_scalar("SELECT status FROM usage_reservations WHERE id = ?1 AND account_id = ?2")
                .bind(id.0)
                .bind(request.account.0)
                .fetch_optional(&mut *conn)
                .await
                .map_err(db_error)?;
        if settled_here || status.as_deref() != Some("pending") {
            return Ok(Err(StoreError::NotFound));
        }
    }
    let mut used = Vec::with_capacity(request.windows.len());
    for window in &request.windows {
        let mut sum = 0i64;
        for key in &window.count_keys {
            sum = sum.saturating_add(counter(conn, cache, request.account, &request.meter, key).await?);
        }
        used.push(sum);
    }
    let mut applied = metering::apply(request.op, &request.windows, &used, request.amount);
    // Spent windows, but the meter draws on credits: pay in this batch's transaction.
    let mut credits_charged = 0;
    if let Some((funding, cost)) = CreditFunding::applies(request, applied.allowed) {
        let payment = CreditTransfer::metered(request, funding, cost);
        match crate::billing::transfer_in(conn, &payment).await {
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
        let key = (request.account, request.meter.clone(), window.increment_key.clone());
        // `counter` above loaded every count key; the increment key is one of them.
        let value = cache.counters.entry(key.clone()).or_insert(0);
        // A refund on a rolling window takes from the current bucket only, which may
        // hold less than the window: a row never goes below zero, and the answer,
        // the event and the rollup report what was really taken.
        let delta = applied.deltas[i].max(-*value);
        applied.after[i] = used[i].saturating_add(delta);
        applied.deltas[i] = delta;
        *value = value.saturating_add(delta);
        let pending_delta = pending.counters.entry(key).or_insert(0);
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
        meter: request.meter.clone(),
        outcome,
        amount: event_amount,
        idempotency_key: request.idempotency.as_ref().map(|i| i.key.clone()),
        endpoint: request.context.endpoint.clone(),
        metadata: request.context.metadata.as_ref().map(|m| m.to_string()),
        ip: request.context.ip.clone(),
        at,
    });
    let daily = pending.daily.entry((request.account, request.meter.clone(), day_of(request.now))).or_insert((0, 0));
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
async fn counter(
    conn: &mut SqliteConnection,
    cache: &mut Cache,
    account: AccountId,
    meter: &str,
    window_key: &str,
) -> Result<i64, StoreError> {
    let key = (account, meter.to_owned(), window_key.to_owned());
    if let Some(value) = cache.counters.get(&key) {
        return Ok(*value);
    }
    let stored: Option<i64> =
        sqlx::query_scalar("SELECT used FROM usage_counters WHERE account_id = ?1 AND meter = ?2 AND window_key = ?3")
            .bind(account.0)
            .bind(meter)
            .bind(window_key)
            .fetch_optional(&mut *conn)
            .await
            .map_err(db_error)?;
    let value = stored.unwrap_or(0);
    cache.counters.insert(key, value);
    Ok(value)
}

pub(crate) fn day_of(now: Timestamp) -> String {
    let d = now.date();
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

async fn flush(conn: &mut SqliteConnection, pending: &Pending) -> Result<(), StoreError> {
    let counters: Vec<(&CounterKey, &i64)> = pending.counters.iter().collect();
    for chunk in counters.chunks(CHUNK) {
        let mut sql: QueryBuilder<Sqlite> =
            QueryBuilder::new("INSERT INTO usage_counters (account_id, meter, window_key, used) ");
        sql.push_values(chunk, |mut row, ((account, meter, window_key), delta)| {
            row.push_bind(account.0).push_bind(meter).push_bind(window_key).push_bind(**delta);
        });
        sql.push(" ON CONFLICT (account_id, meter, window_key) DO UPDATE SET used = used + excluded.used");
        sql.build().execute(&mut *conn).await.map_err(db_error)?;
    }
    for chunk in pending.events.chunks(CHUNK) {
        let mut sql: QueryBuilder<Sqlite> = QueryBuilder::new(
            "INSERT INTO usage_events (id, account_id, meter, outcome, amount, idempotency_key, endpoint, metadata, ip, created_at) ",
        );
        sql.push_values(chunk, |mut row, e| {
            row.push_bind(UsageEventId::new().0)
                .push_bind(e.account.0)
                .push_bind(&e.meter)
                .push_bind(e.outcome)
                .push_bind(e.amount)
                .push_bind(&e.idempotency_key)
                .push_bind(&e.endpoint)
                .push_bind(&e.metadata)
                .push_bind(&e.ip)
                .push_bind(e.at);
        });
        sql.build().execute(&mut *conn).await.map_err(db_error)?;
    }
    let daily: Vec<_> = pending.daily.iter().collect();
    for chunk in daily.chunks(CHUNK) {
        let mut sql: QueryBuilder<Sqlite> =
            QueryBuilder::new("INSERT INTO usage_daily (account_id, meter, day, consumed, denied) ");
        sql.push_values(chunk, |mut row, ((account, meter, day), (consumed, denied))| {
            row.push_bind(account.0).push_bind(meter).push_bind(day).push_bind(*consumed).push_bind(*denied);
        });
        sql.push(
            " ON CONFLICT (account_id, meter, day) DO UPDATE SET consumed = consumed + excluded.consumed, \
             denied = denied + excluded.denied",
        );
        sql.build().execute(&mut *conn).await.map_err(db_error)?;
    }
    for (id, account, meter, amount, windows, expires_at, created_at) in &pending.opened {
        sqlx::query(
            "INSERT INTO usage_reservations (id, account_id, meter, amount, windows, expires_at, status, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'pending', ?7)",
        )
        .bind(id.0)
        .bind(account.0)
        .bind(meter)
        .bind(amount)
        .bind(windows)
        .bind(expires_at)
        .bind(created_at)
        .execute(&mut *conn)
        .await
        .map_err(db_error)?;
    }
    for (id, status, at) in &pending.settled {
        sqlx::query("UPDATE usage_reservations SET status = ?2, settled_at = ?3 WHERE id = ?1 AND status = 'pending'")
            .bind(id.0)
            .bind(status.as_str())
            .bind(at)
            .execute(&mut *conn)
            .await
            .map_err(db_error)?;
    }
    for chunk in pending.answers.chunks(CHUNK) {
        let now = micros(time::OffsetDateTime::now_utc());
        let mut sql: QueryBuilder<Sqlite> =
            QueryBuilder::new("INSERT INTO idempotency_keys (scope, key, request_hash, response, created_at) ");
        sql.push_values(chunk, |mut row, (scope, key, hash, response)| {
            row.push_bind(scope).push_bind(key).push_bind(hash).push_bind(response).push_bind(now);
        });
        sql.build().execute(&mut *conn).await.map_err(db_error)?;
    }
    Ok(())
}
