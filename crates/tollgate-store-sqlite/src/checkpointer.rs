//! Moves WAL frames back into the database file mostly off the commit path.
//!
//! The writer connection has automatic checkpoints turned off (see
//! `SqliteStore::connect`): one runs inside the commit that crosses the threshold,
//! copies the whole WAL and fsyncs, stalling every consume of that batch. Instead
//! this task runs a PASSIVE checkpoint on its own connection ten times a second, which
//! copies what no reader still needs without taking the write lock.
//!
//! Under sustained writes that alone never lets the WAL start over (new frames land
//! while it copies, so it never catches up, and the file grew by ~50 MB/s in a
//! benchmark). So it also publishes how many frames the WAL holds, and when that
//! passes [`RESTART_FRAMES`] the writer connection runs one more PASSIVE checkpoint
//! itself as it goes back to its pool, between two write transactions (usage batches
//! or any other write: credit spends grew the WAL to 378 MB in 6 s when only the usage
//! writer did this): with nothing being written and most frames already copied, it
//! finishes quickly and completely, and the next transaction starts the WAL over
//! (`journal_size_limit` then trims the file).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection};
use tollgate_core::StoreError;

/// Often enough that little is left to copy when the writer checkpoints (every 500 ms
/// gave a p99 of 22 ms in the benchmark, every 100 ms 7–10 ms).
const EVERY: Duration = Duration::from_millis(100);
/// WAL frames (pages, 4 KiB by default) beyond which the writer checkpoints: the WAL
/// stays around 16–30 MB under sustained load.
pub(crate) const RESTART_FRAMES: i64 = 4096;

/// Frames in the WAL at the last background checkpoint.
#[derive(Default)]
pub(crate) struct WalSize(AtomicI64);

impl WalSize {
    /// True once if the WAL has grown past [`RESTART_FRAMES`] (then counts as reset).
    pub(crate) fn take_restart_due(&self) -> bool {
        self.0.load(Ordering::Relaxed) > RESTART_FRAMES && self.0.swap(0, Ordering::Relaxed) > RESTART_FRAMES
    }
}

pub(crate) async fn spawn(
    options: SqliteConnectOptions,
    alive: Weak<()>,
    wal_size: Arc<WalSize>,
) -> Result<(), StoreError> {
    let mut conn = options.connect().await.map_err(crate::unavailable)?;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if alive.upgrade().is_none() {
                break;
            }
            // (busy, frames in the WAL, frames copied)
            match sqlx::query_as::<_, (i64, i64, i64)>("PRAGMA wal_checkpoint(PASSIVE)").fetch_one(&mut conn).await {
                Ok((_, frames, _)) => wal_size.0.store(frames, Ordering::Relaxed),
                Err(e) => tracing::warn!(error = %e, "WAL checkpoint failed; retrying"),
            }
        }
        let _ = conn.close().await;
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tollgate_core::Store;
    use tollgate_core::accounts::NewExternalAccount;
    use tollgate_core::ids::AccountId;
    use tollgate_core::metering::window::Window;
    use tollgate_core::metering::{EventContext, UsageOp, UsageRequest, WindowCheck};

    use crate::SqliteStore;

    /// Sustained consumes (each batch a commit, a few pages each) for longer than the
    /// background checkpointer needs to notice: the WAL starts over instead of growing
    /// with every commit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_wal_starts_over_under_sustained_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let store = Arc::new(SqliteStore::open(&format!("sqlite://{}", path.display())).await.unwrap());
        let now = tollgate_core::conformance::t0();
        let new = NewExternalAccount {
            id: AccountId::new(),
            external_id: "hot".into(),
            name: None,
            email: None,
            created_at: now,
        };
        let (account, _) = store.upsert_external_account(new).await.unwrap();
        let request = move || UsageRequest {
            account: account.id,
            meter: "requests".into(),
            op: UsageOp::Consume,
            amount: 1,
            windows: vec![WindowCheck {
                window: Window::Day,
                limit: None,
                count_keys: ["d:1".into()].into(),
                increment_key: "d:1".into(),
                resets_at: None,
            }],
            dry_run: false,
            idempotency: None,
            context: EventContext::default(),
            now,
            reservation: None,
            credits: None,
        };
        // A consume writes at least one frame.
        wal_stays_bounded(&dir, 2 * super::RESTART_FRAMES as u64 * 4096, 1, || {
            let store = store.clone();
            async move { store.consume_usage(request()).await.map(|_| ()) }
        })
        .await;
    }

    /// The same for writes outside the usage writer: credit transfers, one commit each.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_wal_starts_over_under_sustained_transfers() {
        use tollgate_core::audit::Actor;
        use tollgate_core::credits::{CreditKind, CreditTransfer};
        use tollgate_core::store::BillingStore;

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let store = Arc::new(SqliteStore::open(&format!("sqlite://{}", path.display())).await.unwrap());
        let now = tollgate_core::conformance::t0();
        let new = NewExternalAccount {
            id: AccountId::new(),
            external_id: "buyer".into(),
            name: None,
            email: None,
            created_at: now,
        };
        let (account, _) = store.upsert_external_account(new).await.unwrap();
        // A transfer writes at least four frames (transfers, entries and their indexes,
        // the balance), so the WAL outgrows the restart threshold faster between two
        // background checks; bounded by `journal_size_limit` (64 MiB) all the same.
        wal_stays_bounded(&dir, 64 * 1024 * 1024, 4, || {
            let store = store.clone();
            let grant = CreditTransfer::new(account.id, CreditKind::Bonus, 1, Actor::System, now);
            async move { store.transfer_credits(grant).await.map(|_| ()) }
        })
        .await;
    }

    /// Writes one at a time (a commit each, at least `frames` 4 KiB frames each),
    /// enough of them that a WAL holding them all would be twice `bound`, and checks the
    /// WAL file never reaches `bound`.
    async fn wal_stays_bounded<F, W>(dir: &tempfile::TempDir, bound: u64, frames: u64, mut write: W)
    where
        W: FnMut() -> F,
        F: std::future::Future<Output = Result<(), tollgate_core::StoreError>>,
    {
        let started = std::time::Instant::now();
        let mut largest = 0;
        let mut commits = 0u64;
        while commits * frames * 4096 < 2 * bound && started.elapsed() < std::time::Duration::from_secs(60) {
            write().await.unwrap();
            commits += 1;
            if commits.is_multiple_of(100) {
                let wal = std::fs::metadata(dir.path().join("t.db-wal")).map(|m| m.len()).unwrap_or(0);
                largest = largest.max(wal);
            }
        }
        assert!(commits * frames * 4096 >= 2 * bound, "too few commits to tell: {commits}");
        assert!(largest < bound, "WAL reached {largest} bytes after {commits} commits");
    }
}
