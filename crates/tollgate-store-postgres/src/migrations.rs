//! Migrations embedded in the binary. Same versions and names as the SQLite store (a
//! server test compares the lists). Embedded by hand rather than with
//! `sqlx::migrate!`, which needs sqlx's `macros` feature and with it a second build
//! of both database drivers for the proc-macro host.

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;

use sqlx::SqlSafeStr;
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};
use sqlx::postgres::PgPool;
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

/// Applies pending migrations; returns the versions applied by this call. sqlx holds
/// a PostgreSQL advisory lock while it migrates, so concurrent instances starting
/// together apply each migration once.
pub(crate) async fn run(pool: &PgPool) -> Result<Vec<i64>, StoreError> {
    let migrator = Migrator::new(Embedded).await.map_err(|e| StoreError::Internal(e.to_string()))?;
    let before = applied(pool).await?;
    migrator.run(pool).await.map_err(|e| StoreError::Internal(format!("migration failed: {e}")))?;
    let after = applied(pool).await?;
    Ok(after.into_iter().filter(|v| !before.contains(v)).collect())
}

/// Versions recorded as applied (none before the first run creates the table).
async fn applied(pool: &PgPool) -> Result<Vec<i64>, StoreError> {
    // Checked rather than letting the SELECT fail, which would log an error server-side.
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(pool)
        .await
        .map_err(crate::db_error)?;
    if !exists {
        return Ok(Vec::new());
    }
    sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
        .fetch_all(pool)
        .await
        .map_err(crate::db_error)
}
