//! `TestApp`: the real server (router, store, mailer) on 127.0.0.1 with a random port,
//! a fresh SQLite database in a temp dir, cheap Argon2 parameters and an SMTP sink.

use std::path::PathBuf;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tollgate_core::identity::password::HashCost;
use tollgate_core::ratelimit::RateLimit;
use tollgate_server::config::{AuthConfig, Config, LogFormat, SmtpConfig};
use tollgate_server::server::{self, Running};

use super::smtp_sink::SmtpSink;

pub const PASSWORD: &str = "correct horse battery staple";

pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    pub mail: SmtpSink,
    pub running: Option<Running>,
    pub config: Config,
    _dir: tempfile::TempDir,
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Reply {
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
}

pub struct Builder {
    ip_limit: RateLimit,
    failed_login_limit: RateLimit,
    email_limit: RateLimit,
    database_url: Option<String>,
    plans_file: Option<PathBuf>,
    redis_prefix: Option<String>,
    stripe: Option<tollgate_server::config::StripeConfig>,
    admin_require_2fa: bool,
}

impl TestApp {
    pub fn builder() -> Builder {
        Builder {
            ip_limit: RateLimit::per(10_000, Duration::from_secs(60)),
            failed_login_limit: RateLimit::per(10, Duration::from_secs(3600)),
            email_limit: RateLimit::per(100, Duration::from_secs(3600)),
            database_url: None,
            plans_file: None,
            redis_prefix: None,
            stripe: None,
            admin_require_2fa: false,
        }
    }

    pub async fn new() -> Self {
        Self::builder().start().await
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn request(&self, method: Method, path: &str, token: Option<&str>, body: Option<Value>) -> Reply {
        let mut req = self.client.request(method, self.url(path));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let res = req.send().await.unwrap();
        let status = res.status();
        let headers = res.headers().clone();
        let text = res.text().await.unwrap();
        let body =
            if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) };
        Reply { status, headers, body }
    }

    pub async fn post(&self, path: &str, body: Value) -> Reply {
        self.request(Method::POST, path, None, Some(body)).await
    }

    pub async fn post_auth(&self, path: &str, token: &str, body: Value) -> Reply {
        self.request(Method::POST, path, Some(token), Some(body)).await
    }

    pub async fn get_auth(&self, path: &str, token: &str) -> Reply {
        self.request(Method::GET, path, Some(token), None).await
    }

    /// Registers and verifies `email` (through the real email), returns nothing.
    pub async fn verified_user(&self, email: &str) {
        let r = self.post("/v1/auth/register", json!({ "email": email, "password": PASSWORD })).await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
        let mail = self.mail.wait_for(email, self.mail.count_to(email) + 1).await;
        let r = self.post("/v1/auth/verify-email", json!({ "token": mail.token("verify-email") })).await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    }

    /// A verified, signed-in user: (access token, refresh token).
    pub async fn signed_in(&self, email: &str) -> (String, String) {
        self.verified_user(email).await;
        self.login(email, PASSWORD).await
    }

    pub async fn login(&self, email: &str, password: &str) -> (String, String) {
        let r = self.post("/v1/auth/login", json!({ "email": email, "password": password })).await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        (r.body["access_token"].as_str().unwrap().to_owned(), r.body["refresh_token"].as_str().unwrap().to_owned())
    }

    /// A service key with `scopes` (e.g. `&["usage:write"]`); returns its secret.
    pub async fn service_key(&self, scopes: &[&str]) -> String {
        let scopes = scopes.iter().map(|s| tollgate_core::accounts::Scope::parse(s).unwrap()).collect();
        let store = &self.running.as_ref().unwrap().state.store;
        tollgate_server::service_key::create(store, "tests", scopes).await.unwrap().1
    }

    pub async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown().await.unwrap();
        }
    }
}

impl Builder {
    pub fn ip_limit(mut self, requests: u32, seconds: u64) -> Self {
        self.ip_limit = RateLimit::per(requests, Duration::from_secs(seconds));
        self
    }

    pub fn failed_login_limit(mut self, requests: u32, seconds: u64) -> Self {
        self.failed_login_limit = RateLimit::per(requests, Duration::from_secs(seconds));
        self
    }

    pub fn email_limit(mut self, requests: u32, seconds: u64) -> Self {
        self.email_limit = RateLimit::per(requests, Duration::from_secs(seconds));
        self
    }

    /// Rate limits in the test Redis under `prefix`.
    pub fn redis(mut self, prefix: &str) -> Self {
        self.redis_prefix = Some(prefix.to_owned());
        self
    }

    /// Loads one of `examples/plans/*.toml`.
    pub fn example_plans(mut self, name: &str) -> Self {
        self.plans_file = Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/plans").join(name));
        self
    }

    /// Stripe at `api_base` (a local stand-in) with this webhook secret.
    pub fn stripe(mut self, api_base: &str, webhook_secret: &str) -> Self {
        self.stripe = Some(tollgate_server::config::StripeConfig {
            secret_key: Some("sk_test_tollgate".into()),
            webhook_secret: Some(webhook_secret.into()),
            api_base: api_base.into(),
            api_version: tollgate_server::config::STRIPE_API_VERSION.into(),
            redirect_origins: vec![],
        });
        self
    }

    /// A plans file of the test's own.
    pub fn plans_file(mut self, path: PathBuf) -> Self {
        self.plans_file = Some(path);
        self
    }

    /// Checkout redirects limited to these origins (after `stripe`).
    pub fn redirect_origins(mut self, origins: &[&str]) -> Self {
        if let Some(stripe) = &mut self.stripe {
            stripe.redirect_origins = origins.iter().map(|o| (*o).to_owned()).collect();
        }
        self
    }

    /// Admins need 2FA for the admin API.
    pub fn admin_require_2fa(mut self) -> Self {
        self.admin_require_2fa = true;
        self
    }

    pub fn database_url(mut self, url: String) -> Self {
        self.database_url = Some(url);
        self
    }

    pub async fn start(self) -> TestApp {
        let dir = tempfile::tempdir().unwrap();
        let data_dir: PathBuf = dir.path().to_owned();
        let mail = SmtpSink::start().await;
        let config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: data_dir.clone(),
            database_url: self
                .database_url
                .unwrap_or_else(|| format!("sqlite://{}", data_dir.join("tollgate.db").display())),
            public_url: "http://tollgate.test".into(),
            log_format: LogFormat::Text,
            auth: AuthConfig {
                access_token_ttl: Duration::from_secs(900),
                session_ttl: Duration::from_secs(30 * 24 * 3600),
                require_verified_email: true,
                // Cheap hashes keep the suite fast; production cost is tested in core.
                password_hash: HashCost { memory_kib: 256, iterations: 1, parallelism: 1 },
                ip_limit: self.ip_limit,
                failed_login_limit: self.failed_login_limit,
                email_limit: self.email_limit,
            },
            smtp: Some(SmtpConfig {
                url: format!("smtp://127.0.0.1:{}", mail.port),
                from: "Tollgate <no-reply@tollgate.test>".into(),
            }),
            signing_key_file: data_dir.join("signing-keys.json"),
            plans_file: self.plans_file.unwrap_or_else(|| data_dir.join("plans.toml")),
            redis: self.redis_prefix.map(|key_prefix| tollgate_server::config::RedisConfig {
                url: redis_url(),
                key_prefix,
                on_failure: tollgate_server::rate_limit::FailureMode::Closed,
            }),
            stripe: self.stripe,
            admin_require_2fa: self.admin_require_2fa,
            retention: tollgate_server::config::RetentionConfig { usage_events_days: 90, audit_days: 365 },
        };
        let running = server::start(config.clone()).await.unwrap();
        let base = format!("http://{}", running.addr);
        let client = reqwest::Client::builder()
            .user_agent("tollgate-tests")
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        TestApp { base, client, mail, running: Some(running), config, _dir: dir }
    }
}

pub fn redis_url() -> String {
    std::env::var("TOLLGATE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into())
}

/// Whether the test Redis answers; a loud skip otherwise (a failure when services
/// are required).
pub async fn redis_available() -> bool {
    let url = redis_url();
    let probe = tollgate_server::rate_limit::RedisRateLimiter::connect(&url, "probe:").await;
    match probe {
        Ok(_) => true,
        Err(e) if std::env::var("TOLLGATE_REQUIRE_SERVICES").is_ok_and(|v| v == "1") => {
            panic!("Redis not reachable at {url} ({e}) and TOLLGATE_REQUIRE_SERVICES=1")
        }
        Err(e) => {
            eprintln!("SKIPPED: Redis not reachable at {url} ({e}); set TOLLGATE_TEST_REDIS_URL");
            false
        }
    }
}
