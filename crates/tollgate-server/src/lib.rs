//! Tollgate's server: configuration, the HTTP API, background workers and the
//! `tollgate` command line. The domain lives in `tollgate-core`; storage in the
//! store crates.

pub mod access_token;
pub mod api_key;
pub mod app;
pub mod billing;
pub mod catalog;
pub mod config;
pub mod digest_cache;
pub mod error;
pub mod extract;
pub mod impersonation;
pub mod mailer;
pub mod metrics;
pub mod observe;
pub mod rate_limit;
pub mod routes;
pub mod server;
pub mod service_key;
pub mod state;
