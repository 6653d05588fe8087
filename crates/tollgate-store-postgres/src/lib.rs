//! Tollgate's [`Store`](tollgate_core::Store) on PostgreSQL, for the scaled mode
//! (several Tollgate instances sharing one database).
//!
//! One pool of connections running truly concurrent transactions at PostgreSQL's
//! default READ COMMITTED isolation. The schema mirrors the SQLite one with native
//! types (uuid, timestamptz, jsonb); the "use once" rules (tokens, refresh rotation,
//! TOTP steps, recovery codes, outbox claims) rely on conditional UPDATEs and row
//! locks rather than on a single writer, see `store.rs`; usage counters, idempotency
//! keys and the plans catalog, see `usage.rs`; plain consumes are committed in
//! batches, see `usage_batch.rs`; the credits ledger, provider events and payments
//! (balance, subscription and payment row locks), see `billing.rs`.

mod admin;
mod api_keys;
mod billing;
mod limit_overrides;
mod migrations;
mod plans;
mod read_cache;
mod reports;
mod rows;
mod store;
mod system;
mod usage;
mod usage_batch;

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use tollgate_core::StoreError;
use usage_batch::UsageBatcher;

pub use migrations::MIGRATIONS;

/// Connections per instance. Concurrent requests beyond this wait for a connection
/// (up to [`ACQUIRE_TIMEOUT`], then `Unavailable`).
const MAX_CONNECTIONS: u32 = 10;
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// The PostgreSQL store. Cheap to clone; its usage batcher stops once every clone is
/// dropped.
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    usage_batch: UsageBatcher,
    /// Accounts and subscriptions the hot path reads (see `read_cache`).
    cache: std::sync::Arc<read_cache::ReadCache>,
}

impl PgStore {
    /// Connects to the database at `url` (`postgres://user:pass@host/db`) and applies
    /// pending migrations.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let store = Self::connect(url).await?;
        store.migrate().await?;
        Ok(store)
    }

    /// Connects without migrating (for `tollgate migrate` to report what it applies).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let options =
            PgConnectOptions::from_str(url).map_err(|e| StoreError::Unavailable(format!("bad PostgreSQL URL: {e}")))?;
        Self::connect_with(options).await
    }

    pub(crate) async fn connect_with(mut options: PgConnectOptions) -> Result<Self, StoreError> {
        // Names our connections in pg_stat_activity, unless the URL already does.
        if options.get_application_name().is_none() {
            options = options.application_name("tollgate");
        }
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(unavailable)?;
        let usage_batch = UsageBatcher::spawn(pool.clone())?;
        Ok(Self { pool, usage_batch, cache: Default::default() })
    }

    /// Applies pending migrations; returns the versions applied now.
    pub async fn migrate(&self) -> Result<Vec<i64>, StoreError> {
        migrations::run(&self.pool).await
    }

    /// Closes every connection, waiting for those in use to be returned. Later calls
    /// fail with `Unavailable`.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

fn unavailable(e: sqlx::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// Maps sqlx errors to store errors, naming the unique rules the domain cares about.
pub(crate) fn db_error(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => match db.constraint() {
            Some("users_email") => StoreError::Conflict("users_email"),
            Some("accounts_external_id") => StoreError::Conflict("accounts_external_id"),
            _ => StoreError::Conflict("unique"),
        },
        sqlx::Error::Database(db) if db.is_foreign_key_violation() => StoreError::NotFound,
        // Class 08: connection exception; 53300: too many connections; 57P0x: the
        // server is shutting down or starting up.
        sqlx::Error::Database(db)
            if db.code().is_some_and(|c| c.starts_with("08") || c == "53300" || c.starts_with("57P0")) =>
        {
            StoreError::Unavailable(e.to_string())
        }
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) | sqlx::Error::Tls(_) => {
            StoreError::Unavailable(e.to_string())
        }
        _ => StoreError::Internal(e.to_string()),
    }
}

/// Throwaway databases for tests (this crate's and the server's), on the server named
/// by `TOLLGATE_TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`).
/// Where no server answers, tests are skipped with a printed reason, unless
/// `TOLLGATE_REQUIRE_SERVICES=1`, which makes that a failure.
#[cfg(any(test, feature = "testing"))]
pub mod testing {
    use std::str::FromStr;
    use std::time::Duration;

    use sqlx::postgres::{PgConnectOptions, PgConnection};
    use sqlx::{AssertSqlSafe, Connection};

    use super::{MIGRATIONS, PgStore};

    const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
    /// Serialises template creation across test processes (nextest runs each test
    /// in its own process).
    const TEMPLATE_LOCK: i64 = 0x746f_6c6c_6761_7465; // "tollgate"

    /// The server's options and an admin connection (to the database in the URL, for
    /// CREATE and DROP DATABASE), or None after a loud skip when no server answers.
    pub async fn server() -> Option<(PgConnectOptions, PgConnection)> {
        let url = std::env::var("TOLLGATE_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned());
        let options =
            PgConnectOptions::from_str(&url).unwrap_or_else(|e| panic!("bad TOLLGATE_TEST_POSTGRES_URL {url:?}: {e}"));
        let error = match tokio::time::timeout(Duration::from_secs(10), PgConnection::connect_with(&options)).await {
            Ok(Ok(admin)) => return Some((options, admin)),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "timed out after 10s".to_owned(),
        };
        if std::env::var("TOLLGATE_REQUIRE_SERVICES").is_ok_and(|v| v == "1") {
            panic!(
                "PostgreSQL not reachable at {url} ({error}) and TOLLGATE_REQUIRE_SERVICES=1; set TOLLGATE_TEST_POSTGRES_URL"
            );
        }
        eprintln!("SKIPPED: PostgreSQL not reachable at {url} ({error}); set TOLLGATE_TEST_POSTGRES_URL");
        None
    }

    /// FNV-1a: stable across Rust versions, unlike `DefaultHasher`.
    fn migrations_hash() -> String {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for (version, name, sql) in MIGRATIONS {
            for byte in
                version.to_le_bytes().iter().chain(name.as_bytes()).chain(&[0]).chain(sql.as_bytes()).chain(&[0])
            {
                hash ^= u64::from(*byte);
                hash = hash.wrapping_mul(0x0100_0000_01b3);
            }
        }
        format!("{hash:016x}")
    }

    pub async fn execute(admin: &mut PgConnection, sql: String) {
        // Names are generated here (hex and fixed prefixes), never user input.
        sqlx::raw_sql(AssertSqlSafe(sql.clone())).execute(admin).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// Creates and migrates the template once per migration set. Its creation is
    /// serialised by an advisory lock; `datistemplate` marks it complete, so a
    /// template left half-made by a crashed run is rebuilt.
    async fn ensure_template(admin: &mut PgConnection, server: &PgConnectOptions) -> String {
        let template = format!("tollgate_tmpl_{}", migrations_hash());
        sqlx::query("SELECT pg_advisory_lock($1)").bind(TEMPLATE_LOCK).execute(&mut *admin).await.unwrap();
        let ready: Option<bool> = sqlx::query_scalar("SELECT datistemplate FROM pg_database WHERE datname = $1")
            .bind(&template)
            .fetch_optional(&mut *admin)
            .await
            .unwrap();
        if ready != Some(true) {
            if ready.is_some() {
                execute(admin, format!("DROP DATABASE \"{template}\" WITH (FORCE)")).await;
            }
            execute(admin, format!("CREATE DATABASE \"{template}\"")).await;
            let store = PgStore::connect_with(server.clone().database(&template)).await.unwrap();
            store.migrate().await.unwrap();
            // Nobody may be connected to a database being cloned.
            store.close().await;
            execute(admin, format!("ALTER DATABASE \"{template}\" WITH IS_TEMPLATE true")).await;
        }
        sqlx::query("SELECT pg_advisory_unlock($1)").bind(TEMPLATE_LOCK).execute(&mut *admin).await.unwrap();
        template
    }

    pub fn test_database() -> String {
        format!("tollgate_t_{}", uuid::Uuid::now_v7().simple())
    }

    pub async fn drop_database(server: &PgConnectOptions, database: &str) {
        let mut admin = PgConnection::connect_with(server).await.unwrap();
        execute(&mut admin, format!("DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)")).await;
        admin.close().await.unwrap();
    }

    /// A database of its own, cloned from the migrated template; dropped by `drop`
    /// (a failing test leaves it behind for inspection).
    pub struct TestDatabase {
        /// Connection URL of the database, for a server under test.
        pub url: String,
        pub options: PgConnectOptions,
        server: PgConnectOptions,
        name: String,
    }

    impl TestDatabase {
        /// A migrated database, or None when the test must be skipped.
        pub async fn create() -> Option<Self> {
            let (server, mut admin) = server().await?;
            let template = ensure_template(&mut admin, &server).await;
            Some(Self::clone_from(server, admin, Some(&template)).await)
        }

        /// An empty database (no migrations), or None when the test must be skipped.
        pub async fn create_empty() -> Option<Self> {
            let (server, admin) = server().await?;
            Some(Self::clone_from(server, admin, None).await)
        }

        async fn clone_from(server: PgConnectOptions, mut admin: PgConnection, template: Option<&str>) -> Self {
            let name = test_database();
            let sql = match template {
                Some(t) => format!("CREATE DATABASE \"{name}\" TEMPLATE \"{t}\""),
                None => format!("CREATE DATABASE \"{name}\""),
            };
            execute(&mut admin, sql).await;
            // Test databases need not wait for the WAL to reach disk at each commit
            // (the durability of commits is PostgreSQL's, not what these tests check);
            // this keeps the concurrency tests fast on slow disks.
            execute(&mut admin, format!("ALTER DATABASE \"{name}\" SET synchronous_commit = off")).await;
            admin.close().await.unwrap();
            let url = database_url(&name);
            Self { url, options: server.clone().database(&name), server, name }
        }

        pub async fn drop(self) {
            drop_database(&self.server, &self.name).await;
        }
    }

    /// The test server's URL with its database replaced by `name`.
    fn database_url(name: &str) -> String {
        let base = std::env::var("TOLLGATE_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned());
        let (without_query, query) = match base.split_once('?') {
            Some((b, q)) => (b.to_owned(), format!("?{q}")),
            None => (base.clone(), String::new()),
        };
        let scheme_end = without_query.find("://").map_or(0, |i| i + 3);
        let host_part = match without_query[scheme_end..].find('/') {
            Some(slash) => &without_query[..scheme_end + slash],
            None => &without_query[..],
        };
        format!("{host_part}/{name}{query}")
    }
}

#[cfg(test)]
mod conformance {
    use std::sync::Arc;

    use tollgate_core::Store;
    use tollgate_core::conformance::Fixture;

    use super::PgStore;
    use super::testing::TestDatabase;

    struct PgFixture {
        store: Arc<PgStore>,
        database: TestDatabase,
    }

    impl Fixture for PgFixture {
        fn store(&self) -> Arc<dyn Store> {
            self.store.clone()
        }

        async fn cleanup(self) {
            self.store.close().await;
            self.database.drop().await;
        }
    }

    async fn fresh() -> Option<PgFixture> {
        let database = TestDatabase::create().await?;
        let store = PgStore::connect_with(database.options.clone()).await.unwrap();
        // Already migrated by the template: this checks that it is up to date.
        assert!(store.migrate().await.unwrap().is_empty());
        Some(PgFixture { store: Arc::new(store), database })
    }

    tollgate_core::conformance_tests!(fresh());

    #[tokio::test]
    async fn migrating_twice_does_nothing() {
        let Some(database) = TestDatabase::create_empty().await else { return };
        let store = PgStore::open(&database.url).await.unwrap();
        assert!(store.migrate().await.unwrap().is_empty());
        store.close().await;
        let store = PgStore::connect(&database.url).await.unwrap();
        assert!(store.migrate().await.unwrap().is_empty());
        store.close().await;
        database.drop().await;
    }

    #[tokio::test]
    async fn first_migration_reports_what_it_applied() {
        let Some(database) = TestDatabase::create_empty().await else { return };
        let store = PgStore::connect(&database.url).await.unwrap();
        assert_eq!(store.migrate().await.unwrap(), vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
        store.close().await;
        database.drop().await;
    }
}
