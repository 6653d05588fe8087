//! Migrations embedded in the binary. The PostgreSQL store has the same versions and
//! names (a server test compares the lists). Embedded by hand rather than with
//! `sqlx::migrate!`, which needs sqlx's `macros` feature and with it a second build
//! of both database drivers for the proc-macro host.

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;

use sqlx::SqlSafeStr;
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};
use sqlx::sqlite::SqlitePool;
use tollgate_core::StoreError;

/// (version, name, SQL)
pub const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "identity", include_str!("../migrations/0001_identity.sql")),
    (2, "plans_accounts_usage", include_str!("../migrations/0002_plans_accounts_usage.sql")),
    (3, "usage_leases", include_str!("../migrations/0003_usage_leases.sql")),
    (4, "subscription_changes", include_str!("../migrations/0004_subscription_changes.sql")),
    (5, "usage_reservations", include_str!("../migrations/0005_usage_reservations.sql")),
    (6, "usage_events_unindexed_id", include_str!("../migrations/0006_usage_events_unindexed_id.sql")),
    (7, "credits_billing", include_str!("../migrations/0007_credits_billing.sql")),
    (8, "api_keys", include_str!("../migrations/0008_api_keys.sql")),
    (9, "limit_overrides", include_str!("../migrations/0009_limit_overrides.sql")),
    (10, "settings", include_str!("../migrations/0010_settings.sql")),
    (11, "usage_checks", include_str!("../migrations/0011_usage_checks.sql")),
];

#[derive(Debug)]
struct Embedded;

impl<'s> MigrationSource<'s> for Embedded {
    fn resolve(self) -> Pin<Box<dyn Future<Output = Result<Vec<Migration>, sqlx::error::BoxDynError>> + Send + 's>> {
        Box::pin(async {
            Ok(MIGRATIONS
                .iter()
                .map(|(version, name, sql)| {
                    Migration::new(*version, Cow::Borrowed(*name), MigrationType::Simple, sql.into_sql_str(), false)
                })
                .collect())
        })
    }
}

pub(crate) async fn run(pool: &SqlitePool) -> Result<Vec<i64>, StoreError> {
    let migrator = Migrator::new(Embedded).await.map_err(|e| StoreError::Internal(e.to_string()))?;
    let before = applied(pool).await?;
    migrator.run(pool).await.map_err(|e| StoreError::Internal(format!("migration failed: {e}")))?;
    Ok(applied(pool).await?.into_iter().filter(|v| !before.contains(v)).collect())
}

/// Versions applied so far (none before the first run creates the table).
async fn applied(pool: &SqlitePool) -> Result<Vec<i64>, StoreError> {
    let exists: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations')",
    )
    .fetch_one(pool)
    .await
    .map_err(crate::db_error)?;
    if !exists {
        return Ok(Vec::new());
    }
    sqlx::query_scalar("SELECT version FROM _sqlx_migrations ORDER BY version")
        .fetch_all(pool)
        .await
        .map_err(crate::db_error)
}

#[cfg(test)]
mod tests {
    use super::MIGRATIONS;

    fn opcodes(db: &rusqlite::Connection, sql: &str) -> Vec<String> {
        let mut explain = db.prepare(&format!("EXPLAIN {sql}")).unwrap();
        let params = vec![rusqlite::types::Value::Null; explain.parameter_count()];
        explain
            .query_map(rusqlite::params_from_iter(params), |row| row.get::<_, String>(1))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    /// 0011 keeps every row and the constraints' meaning, and writing a usage event or
    /// a reservation no longer builds an ephemeral table for its CHECK.
    #[test]
    fn usage_checks_keep_rows_and_meaning_without_ephemeral_tables() {
        let db = rusqlite::Connection::open_in_memory().unwrap();
        db.execute_batch("PRAGMA foreign_keys = ON;").unwrap();
        for (version, _, sql) in MIGRATIONS.iter().filter(|(v, _, _)| *v < 11) {
            db.execute_batch(sql).unwrap_or_else(|e| panic!("migration {version}: {e}"));
        }
        let event = "INSERT INTO usage_events (id, account_id, meter, outcome, amount, created_at) \
                     VALUES (randomblob(16), x'01', 'm', ?1, 1, 0)";
        let reservation = "INSERT INTO usage_reservations (id, account_id, meter, amount, windows, expires_at, status, \
                           created_at) VALUES (randomblob(16), x'01', 'm', 1, '[]', 0, ?1, 0)";
        assert!(opcodes(&db, event).iter().any(|op| op == "OpenEphemeral"), "the IN list this replaces");
        db.execute("INSERT INTO accounts (id, kind, created_at) VALUES (x'01', 'external', 0)", []).unwrap();
        for outcome in ["consumed", "denied", "released", "refunded"] {
            db.execute(event, [outcome]).unwrap();
        }
        db.execute(reservation, ["pending"]).unwrap();

        db.execute_batch(MIGRATIONS.iter().find(|(v, _, _)| *v == 11).unwrap().2).unwrap();

        for sql in [event, reservation] {
            assert!(!opcodes(&db, sql).iter().any(|op| op == "OpenEphemeral"), "{sql}");
        }
        let count =
            |table: &str| db.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get::<_, i64>(0)).unwrap();
        assert_eq!((count("usage_events"), count("usage_reservations")), (4, 1));
        for status in ["committed", "released", "expired"] {
            db.execute(reservation, [status]).unwrap();
        }
        assert!(db.execute(event, ["spent"]).is_err());
        assert!(db.execute(reservation, ["lost"]).is_err());
        assert_eq!((count("usage_events"), count("usage_reservations")), (4, 4));
        let indexes: Vec<String> = db
            .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND name LIKE 'usage_%' ORDER BY name")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert!(indexes.contains(&"usage_events_account".to_owned()), "{indexes:?}");
        assert!(indexes.contains(&"usage_reservations_pending".to_owned()), "{indexes:?}");
    }
}
