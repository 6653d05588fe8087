//! The `tollgate` command line.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tollgate_core::accounts::Scope;
use tollgate_core::identity::Identity;
use tollgate_server::access_token::AccessTokens;
use tollgate_server::config::{Config, LogFormat};
use tollgate_server::server;
use tracing_subscriber::EnvFilter;

/// mimalloc instead of glibc malloc: the request path allocates small short-lived
/// buffers, and glibc's allocator took about a sixth of the CPU of a consume in a
/// profile (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "tollgate", version, about = "Accounts, plans, quotas, credits and billing for any SaaS product")]
struct Cli {
    /// TOML configuration file (default: ./tollgate.toml when present).
    #[arg(long, global = true, env = "TOLLGATE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (migrates the database first).
    Serve,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Administrators.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// Meters and plans.
    Plans {
        #[command(subcommand)]
        command: PlansCommand,
    },
    /// Service keys: the secrets with which your backend calls Tollgate.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Access-token signing keys.
    SigningKeys {
        #[command(subcommand)]
        command: SigningKeysCommand,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Create an admin (or promote an existing user) and print a one-time link that
    /// sets their password.
    Create {
        #[arg(long)]
        email: String,
    },
}

#[derive(Subcommand)]
enum PlansCommand {
    /// Validate a plans file and make the database match it (prints what changed; a
    /// plan still in use is archived, never deleted). A running server picks the new
    /// plans up at its next start.
    Apply { file: PathBuf },
    /// Validate a plans file without applying it.
    Check { file: PathBuf },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a service key and print its secret (shown once).
    Create {
        #[arg(long)]
        name: String,
        /// Comma-separated: usage:read, usage:write, accounts:read, accounts:write,
        /// ratelimit:check, admin:*
        #[arg(long, value_delimiter = ',')]
        scopes: Vec<String>,
    },
}

#[derive(Subcommand)]
enum SigningKeysCommand {
    /// Start signing with a new key; the old one stays published until its tokens expire.
    Rotate,
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_env("TOLLGATE_LOG").unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // One TLS provider for every client (SMTP, PostgreSQL): aws-lc-rs.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = Cli::parse();
    let config = Config::load(cli.config.as_deref(), &|k| std::env::var(k).ok())?;
    init_logging(config.log_format);
    match cli.command {
        Command::Serve => {
            let running = server::start(config).await?;
            tracing::info!(addr = %running.addr, "tollgate listening");
            let stop = running.shutdown_sender();
            tokio::spawn(async move {
                shutdown_signal().await;
                tracing::info!("shutting down: finishing in-flight requests");
                let _ = stop.send(true);
            });
            running.wait().await?;
            tracing::info!("stopped");
        }
        Command::Migrate => {
            server::create_private_dir(&config.data_dir)?;
            let applied = server::migrate(&config.database_url).await?;
            if applied.is_empty() {
                println!("database is up to date");
            } else {
                println!("applied migrations: {applied:?}");
            }
        }
        Command::Admin { command: AdminCommand::Create { email } } => {
            let store = server::open_store(&config.database_url).await?;
            let identity =
                Identity::new(store, server::identity_settings(&config)).map_err(|e| anyhow::anyhow!("{e}"))?;
            let (user, link) =
                identity.create_admin(&email).await.map_err(|e| anyhow::anyhow!("{e}")).context("creating admin")?;
            println!("admin: {} ({})", user.email, user.id);
            println!("set the password within the hour (the link works once):");
            println!("{link}");
        }
        Command::Plans { command: PlansCommand::Check { file } } => {
            let catalog = tollgate_server::catalog::load_file(&file)?;
            println!("{} meters, {} plans: valid", catalog.meters.len(), catalog.plans.len());
        }
        Command::Plans { command: PlansCommand::Apply { file } } => {
            let store = server::open_store(&config.database_url).await?;
            let (_, changes) = tollgate_server::catalog::apply_file(&store, &file).await?;
            print!("{}", tollgate_server::catalog::describe(&changes));
        }
        Command::Keys { command: KeysCommand::Create { name, scopes } } => {
            let scopes = scopes
                .iter()
                .map(|s| Scope::parse(s.trim()).ok_or_else(|| anyhow::anyhow!("unknown scope {s:?}")))
                .collect::<anyhow::Result<Vec<_>>>()?;
            if scopes.is_empty() || name.trim().is_empty() || name.len() > 100 {
                anyhow::bail!("give a --name (1 to 100 characters) and at least one scope");
            }
            let store = server::open_store(&config.database_url).await?;
            let (key, secret) = tollgate_server::service_key::create(&store, name.trim(), scopes)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            println!(
                "service key {} ({}) with scopes {:?}",
                key.name,
                key.id,
                key.scopes.iter().map(|s| s.as_str()).collect::<Vec<_>>()
            );
            println!("secret (shown once; send it as Authorization: Bearer <secret>):");
            println!("{secret}");
        }
        Command::SigningKeys { command: SigningKeysCommand::Rotate } => {
            let kid = AccessTokens::rotate(&config.signing_key_file)?;
            println!("new signing key {kid}; running servers pick it up within seconds");
        }
    }
    Ok(())
}
