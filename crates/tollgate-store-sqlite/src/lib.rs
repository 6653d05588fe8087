//! Tollgate's [`Store`](tollgate_core::Store) on embedded SQLite, the default backend.
//!
//! One writer connection and a pool of readers: SQLite allows one writer at a time
//! anyway, and serialising writes in-process means transactions never fail with
//! `SQLITE_BUSY` lock upgrades (the classic "database is locked"). WAL lets readers
//! run alongside the writer.

mod admin;
mod api_keys;
mod billing;
mod checkpointer;
mod limit_overrides;
mod migrations;
mod plans;
mod read_cache;
mod reports;
mod rows;
mod store;
mod system;
mod usage;
mod usage_writer;

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use tollgate_core::StoreError;

pub use migrations::MIGRATIONS;

/// The SQLite store. Cheap to clone.
#[derive(Clone)]
pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
    /// Group commit of consumes (see `usage_writer`).
    usage: usage_writer::UsageWriter,
    /// Accounts and subscriptions the hot path reads (see `read_cache`).
    cache: std::sync::Arc<read_cache::ReadCache>,
    /// The checkpointer stops when the last clone of the store is dropped.
    _alive: std::sync::Arc<()>,
}

impl SqliteStore {
    /// Opens (creating if missing) the database at `url` (`sqlite://path/to/file.db`)
    /// and applies pending migrations.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let store = Self::connect(url).await?;
        store.migrate().await?;
        Ok(store)
    }

    /// Opens without migrating (for `tollgate migrate` to report what it applies).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| StoreError::Unavailable(format!("bad SQLite URL: {e}")))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // NORMAL in WAL mode: a commit survives a crash of the process (kill -9);
            // only an OS crash or power loss can lose the last transactions.
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5))
            // A WAL file left large by a burst is cut back after checkpoints.
            .pragma("journal_size_limit", (64 * 1024 * 1024).to_string());
        // The writer never checkpoints: an automatic checkpoint runs inside the commit
        // that crosses the threshold, fsyncs the database file, and stalls every
        // consume of that batch. `checkpointer` does it beside the writer instead.
        let alive = std::sync::Arc::new(());
        let wal_size = std::sync::Arc::new(checkpointer::WalSize::default());
        let restart = wal_size.clone();
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            // A ping before every acquire is a round trip to sqlx's SQLite thread for
            // nothing: the database is in this process.
            .test_before_acquire(false)
            // Between two write transactions (after their callers were answered), when
            // the WAL has grown: see `checkpointer`. Every writer passes here, the
            // usage writer's batches and every other store write alike.
            .after_release(move |conn, _| {
                let restart = restart.clone();
                Box::pin(async move {
                    if restart.take_restart_due()
                        && let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").execute(&mut *conn).await
                    {
                        tracing::warn!(error = %e, "WAL checkpoint by the writer failed");
                    }
                    Ok(true)
                })
            })
            .connect_with(options.clone().pragma("wal_autocheckpoint", "0"))
            .await
            .map_err(unavailable)?;
        checkpointer::spawn(options.clone(), std::sync::Arc::downgrade(&alive), wal_size.clone()).await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.clone().read_only(true))
            .await
            .map_err(unavailable)?;
        let usage = usage_writer::UsageWriter::spawn(writer.clone(), &options)?;
        Ok(Self { writer, reader, usage, cache: Default::default(), _alive: alive })
    }

    /// Applies pending migrations; returns the versions applied now.
    pub async fn migrate(&self) -> Result<Vec<i64>, StoreError> {
        migrations::run(&self.writer).await
    }
}

fn unavailable(e: sqlx::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// Maps sqlx errors to store errors, naming the unique rules the domain cares about.
pub(crate) fn db_error(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => {
            let message = db.message();
            if message.contains("users.email") {
                StoreError::Conflict("users_email")
            } else if message.contains("accounts.external_id") {
                StoreError::Conflict("accounts_external_id")
            } else {
                StoreError::Conflict("unique")
            }
        }
        sqlx::Error::Database(db) if db.is_foreign_key_violation() => StoreError::NotFound,
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
            StoreError::Unavailable(e.to_string())
        }
        _ => StoreError::Internal(e.to_string()),
    }
}

/// Maps the usage writer's rusqlite errors like [`db_error`] does sqlx's.
pub(crate) fn sql_error(e: rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode;
    match e.sqlite_error_code() {
        Some(ErrorCode::ConstraintViolation) => {
            let message = e.to_string();
            if message.contains("FOREIGN KEY") { StoreError::NotFound } else { StoreError::Conflict("unique") }
        }
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked | ErrorCode::DiskFull | ErrorCode::CannotOpen) => {
            StoreError::Unavailable(e.to_string())
        }
        _ => StoreError::Internal(e.to_string()),
    }
}

#[cfg(test)]
mod conformance {
    use std::sync::Arc;

    use tollgate_core::Store;
    use tollgate_core::conformance::Fixture;

    use super::SqliteStore;

    /// A fresh database file per test in its own temporary directory.
    struct SqliteFixture {
        store: Arc<dyn Store>,
        dir: tempfile::TempDir,
    }

    impl Fixture for SqliteFixture {
        fn store(&self) -> Arc<dyn Store> {
            self.store.clone()
        }

        async fn cleanup(self) {
            drop(self.store);
            drop(self.dir);
        }
    }

    async fn fresh() -> Option<SqliteFixture> {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("tollgate.db").display());
        let store = Arc::new(SqliteStore::open(&url).await.unwrap());
        Some(SqliteFixture { store, dir })
    }

    tollgate_core::conformance_tests!(fresh());

    #[tokio::test]
    async fn migrating_twice_does_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let store = SqliteStore::connect(&url).await.unwrap();
        assert_eq!(store.migrate().await.unwrap(), vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
        assert!(store.migrate().await.unwrap().is_empty());
    }
}
