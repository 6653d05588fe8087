//! Moves WAL frames back into the database file off the commit path. The writer
//! connection has automatic checkpoints turned off (see `SqliteStore::connect`); this
//! task runs a PASSIVE checkpoint on its own connection twice a second, which copies
//! what no reader still needs without taking the write lock, so commits go on while
//! it fsyncs.

use std::sync::Weak;
use std::time::Duration;

use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection};
use tollgate_core::StoreError;

const EVERY: Duration = Duration::from_millis(500);

pub(crate) async fn spawn(options: SqliteConnectOptions, alive: Weak<()>) -> Result<(), StoreError> {
    let mut conn = options.connect().await.map_err(crate::unavailable)?;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if alive.upgrade().is_none() {
                break;
            }
            if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").execute(&mut conn).await {
                tracing::warn!(error = %e, "WAL checkpoint failed; retrying");
            }
        }
        let _ = conn.close().await;
    });
    Ok(())
}
