//! The `tollgate` command line.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tollgate_core::identity::Identity;
use tollgate_server::access_token::AccessTokens;
use tollgate_server::config::{Config, LogFormat};
use tollgate_server::server;
use tracing_subscriber::EnvFilter;

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
        Command::SigningKeys { command: SigningKeysCommand::Rotate } => {
            let kid = AccessTokens::rotate(&config.signing_key_file)?;
            println!("new signing key {kid}; running servers pick it up within seconds");
        }
    }
    Ok(())
}
