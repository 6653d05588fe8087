//! Assembles a running server from a `Config`: opens the store (migrating it), loads
//! or creates the signing keys, starts the outbox sender and the key watcher, and
//! serves HTTP until told to stop, finishing in-flight requests first.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tollgate_core::Store;
use tollgate_core::identity::{Identity, IdentitySettings};
use tollgate_store_postgres::PgStore;
use tollgate_store_sqlite::SqliteStore;

use crate::access_token::AccessTokens;
use crate::catalog::SharedCatalog;
use crate::config::Config;
use crate::mailer::{Mailer, Transport};
use crate::rate_limit::Limiter;
use crate::service_key::KeyCache;
use crate::state::{AppState, Shared};
use tollgate_core::metering::quotas::Quotas;

/// The one place the backend is chosen, by the URL scheme.
pub async fn open_store(url: &str) -> anyhow::Result<Arc<dyn Store>> {
    if url.starts_with("sqlite:") {
        if let Some(dir) = sqlite_path(url).and_then(|p| p.parent().map(Path::to_path_buf))
            && !dir.as_os_str().is_empty()
        {
            create_private_dir(&dir)?;
        }
        Ok(Arc::new(SqliteStore::open(url).await.context("opening SQLite")?))
    } else {
        Ok(Arc::new(PgStore::open(url).await.context("opening PostgreSQL")?))
    }
}

fn sqlite_path(url: &str) -> Option<&Path> {
    let rest = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next()?;
    (!path.is_empty() && path != ":memory:").then(|| Path::new(path))
}

/// Creates the data directory readable by its owner only (it holds the database with
/// password hashes, and the signing keys). An existing directory is left as it is.
pub fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        return Ok(());
    }
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).with_context(|| format!("creating data directory {}", dir.display()))
}

/// Applies pending migrations; returns the versions applied.
pub async fn migrate(url: &str) -> anyhow::Result<Vec<i64>> {
    if url.starts_with("sqlite:") {
        Ok(SqliteStore::connect(url).await?.migrate().await?)
    } else {
        Ok(PgStore::connect(url).await?.migrate().await?)
    }
}

pub fn identity_settings(config: &Config) -> IdentitySettings {
    IdentitySettings {
        public_url: config.public_url.clone(),
        session_ttl: config.auth.session_ttl,
        require_verified_email: config.auth.require_verified_email,
        hash_cost: config.auth.password_hash,
        ..IdentitySettings::default()
    }
}

/// Builds the state the router needs.
pub async fn build_state(config: Config) -> anyhow::Result<AppState> {
    create_private_dir(&config.data_dir)?;
    let store = open_store(&config.database_url).await?;
    let identity = Identity::new(store.clone(), identity_settings(&config)).map_err(|e| anyhow::anyhow!("{e}"))?;
    let tokens =
        AccessTokens::load_or_create(&config.signing_key_file, &config.public_url, config.auth.access_token_ttl)?;
    let catalog = crate::catalog::at_start(&store, &config.plans_file).await?;
    let limiter = match &config.redis {
        Some(redis) => {
            let backend = crate::rate_limit::RedisRateLimiter::connect(&redis.url, &redis.key_prefix)
                .await
                .map_err(|e| anyhow::anyhow!("connecting to Redis (TOLLGATE_REDIS_URL): {e}"))?;
            Limiter::new(Arc::new(backend), redis.on_failure)
        }
        None => Limiter::in_memory(),
    };
    let quotas = Quotas::new(store.clone());
    quotas.reload_overrides().await.context("loading the accounts' limit overrides")?;
    Ok(AppState::new(Shared {
        quotas,
        store,
        identity,
        tokens: Arc::new(tokens),
        limiter,
        catalog: SharedCatalog::new(catalog),
        service_keys: Arc::new(KeyCache::default()),
        api_keys: Default::default(),
        billing: crate::billing::Billing::from_config(&config)?,
        config: Arc::new(config),
        started_at: std::time::Instant::now(),
    }))
}

/// A server running in the background.
pub struct Running {
    pub addr: SocketAddr,
    pub state: AppState,
    shutdown: watch::Sender<bool>,
    handle: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Stops accepting, finishes in-flight requests and the background tasks.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(true);
        self.handle.await?
    }

    /// Resolves when the server stops on its own (it should not) or after `shutdown`.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.handle.await?
    }

    pub fn shutdown_sender(&self) -> watch::Sender<bool> {
        self.shutdown.clone()
    }
}

/// Binds `config.listen` and serves in the background.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    let transport = match &config.smtp {
        Some(smtp) => Transport::smtp(&smtp.url, &smtp.from)?,
        None => {
            if !config.listen.ip().is_loopback() {
                tracing::warn!(
                    "no SMTP configured: emails, with their sign-in and reset links, go to the log; \
                     set TOLLGATE_SMTP_URL before exposing Tollgate beyond this machine"
                );
            }
            Transport::Log
        }
    };
    let listen = config.listen;
    let state = build_state(config).await?;
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
    let addr = listener.local_addr()?;
    let (shutdown, mut stop) = watch::channel(false);

    let mailer = Mailer::new(state.store.clone(), transport);
    let mailer_task = tokio::spawn(mailer.run(Duration::from_millis(500), shutdown.subscribe()));
    let key_watch = tokio::spawn(watch_signing_keys(state.tokens.clone(), shutdown.subscribe()));
    let sweeper = tokio::spawn(expire_reservations(state.quotas.clone(), shutdown.subscribe()));
    let overrides = tokio::spawn(reload_overrides(state.quotas.clone(), shutdown.subscribe()));
    let plans = tokio::spawn(reload_plans(state.clone(), shutdown.subscribe()));

    let app = crate::app::router(state.clone());
    let handle = tokio::spawn(async move {
        axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
            .with_graceful_shutdown(async move {
                let _ = stop.wait_for(|stop| *stop).await;
            })
            .await
            .context("serving HTTP")?;
        let _ = mailer_task.await;
        let _ = key_watch.await;
        let _ = sweeper.await;
        let _ = overrides.await;
        let _ = plans.await;
        Ok(())
    });
    Ok(Running { addr, state, shutdown, handle })
}

/// Gives back reservations nobody settled in time.
async fn expire_reservations(quotas: Quotas, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.changed() => return,
        }
        match quotas.expire_reservations().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(expired = n, "reservations expired"),
            Err(e) => tracing::warn!(error = %e, "could not expire reservations"),
        }
    }
}

/// Picks up limit overrides set through other nodes, and drops expired ones.
async fn reload_overrides(quotas: Quotas, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(tollgate_core::metering::overrides::RELOAD_EVERY) => {}
            _ = shutdown.changed() => return,
        }
        if let Err(e) = quotas.reload_overrides().await {
            tracing::warn!(error = %e, "could not reload limit overrides");
        }
    }
}

/// How often nodes look for plans changed elsewhere.
const PLANS_RELOAD_EVERY: Duration = Duration::from_secs(5);

/// Picks up plans changed through another node's admin API or `tollgate plans apply`.
async fn reload_plans(state: AppState, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(PLANS_RELOAD_EVERY) => {}
            _ = shutdown.changed() => return,
        }
        match state.catalog.reload(&state.store).await {
            Ok(true) => tracing::info!("plans changed elsewhere: reloaded"),
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "could not reload plans"),
        }
    }
}

/// Picks up `tollgate signing-keys rotate` without a restart.
async fn watch_signing_keys(tokens: Arc<AccessTokens>, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = shutdown.changed() => return,
        }
        match tokens.reload_if_changed() {
            Ok(true) => tracing::info!("signing keys reloaded"),
            Ok(false) => {}
            Err(e) => {
                tracing::error!(error = %e, "signing key file unreadable; keeping the keys in memory")
            }
        }
    }
}
