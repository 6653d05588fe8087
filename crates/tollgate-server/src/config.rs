//! Configuration: built-in defaults, then an optional TOML file (`tollgate.toml`, or
//! the path in `--config` / `TOLLGATE_CONFIG`), then `TOLLGATE_*` environment
//! variables, each layer overriding the one before. `tollgate serve` with none of
//! them works: SQLite and signing keys in `./tollgate-data`, emails to the log.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;
use tollgate_core::identity::password::HashCost;
use tollgate_core::ratelimit::RateLimit;

#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// `sqlite://...` or `postgres://...`.
    pub database_url: String,
    /// Base of links in emails and the `iss` of access tokens.
    pub public_url: String,
    pub log_format: LogFormat,
    pub auth: AuthConfig,
    /// `None`: emails are written to the log (and kept in the outbox) instead of sent.
    pub smtp: Option<SmtpConfig>,
    pub signing_key_file: PathBuf,
    /// Meters and plans (TOML); absent: the built-in free plan.
    pub plans_file: PathBuf,
    /// Rate-limit state in Redis, shared by every node; `None`: in memory.
    pub redis: Option<RedisConfig>,
    /// Stripe billing; `None` when neither key is set.
    pub stripe: Option<StripeConfig>,
    /// Admin users must have 2FA on to use the admin API. Default: on, except in the
    /// embedded dev setup (SQLite and a loopback listen address).
    pub admin_require_2fa: bool,
    /// What `POST /v1/admin/system/cleanup` keeps.
    pub retention: RetentionConfig,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetentionConfig {
    /// Usage events older than this many days are deleted (daily rollups stay).
    pub usage_events_days: u32,
    /// Audit events older than this many days are deleted.
    pub audit_days: u32,
}

#[derive(Clone)]
pub struct StripeConfig {
    /// `sk_...`; checkouts, portal sessions and cancellations need it.
    pub secret_key: Option<String>,
    /// `whsec_...`; the webhook endpoint refuses every event without it.
    pub webhook_secret: Option<String>,
    /// `https://api.stripe.com`, or a local stand-in in tests.
    pub api_base: String,
    /// The `Stripe-Version` every request is pinned to.
    pub api_version: String,
    /// Origins (`https://app.example.com`) that `success_url`, `cancel_url` and
    /// `return_url` may point to; empty: any http(s) URL with a host.
    pub redirect_origins: Vec<String>,
}

/// Secrets stay out of `{:?}` (configuration is logged at start in debug).
impl std::fmt::Debug for StripeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StripeConfig")
            .field("secret_key", &self.secret_key.as_ref().map(|_| "<redacted>"))
            .field("webhook_secret", &self.webhook_secret.as_ref().map(|_| "<redacted>"))
            .field("api_base", &self.api_base)
            .field("api_version", &self.api_version)
            .field("redirect_origins", &self.redirect_origins)
            .finish()
    }
}

/// The Stripe API version Tollgate's requests and event parsing are written for.
pub const STRIPE_API_VERSION: &str = "2026-09-30.endive";

#[derive(Clone, Debug)]
pub struct RedisConfig {
    pub url: String,
    /// Prefix of every key Tollgate writes.
    pub key_prefix: String,
    /// What rate limits do when Redis does not answer.
    pub on_failure: crate::rate_limit::FailureMode,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Debug)]
pub struct AuthConfig {
    pub access_token_ttl: Duration,
    pub session_ttl: Duration,
    pub require_verified_email: bool,
    pub password_hash: HashCost,
    /// All auth endpoints together, per client ip.
    pub ip_limit: RateLimit,
    /// Failed logins (and second-factor attempts) per email address.
    pub failed_login_limit: RateLimit,
    /// Emails (reset, magic link, verification) requested per address.
    pub email_limit: RateLimit,
}

#[derive(Clone, Debug)]
pub struct SmtpConfig {
    /// `smtp://host:port` (plain, for a relay on loopback) or `smtps://user:pass@host`.
    pub url: String,
    pub from: String,
}

/// The TOML file's shape. Unknown keys are an error: a typo must not silently fall
/// back to a default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    database_url: Option<String>,
    public_url: Option<String>,
    log_format: Option<LogFormat>,
    signing_key_file: Option<PathBuf>,
    plans_file: Option<PathBuf>,
    #[serde(default)]
    auth: FileAuth,
    redis: Option<FileRedis>,
    smtp: Option<FileSmtp>,
    stripe: Option<FileStripe>,
    admin_require_2fa: Option<bool>,
    #[serde(default)]
    retention: FileRetention,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRetention {
    usage_events_days: Option<u32>,
    audit_days: Option<u32>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileStripe {
    secret_key: Option<String>,
    webhook_secret: Option<String>,
    api_base: Option<String>,
    api_version: Option<String>,
    /// Origins checkout and portal redirects may go to (any when empty).
    #[serde(default)]
    redirect_origins: Vec<String>,
}

impl std::fmt::Debug for FileStripe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileStripe").field("api_base", &self.api_base).finish_non_exhaustive()
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAuth {
    access_token_ttl_seconds: Option<u64>,
    session_ttl_seconds: Option<u64>,
    require_verified_email: Option<bool>,
    password_hash: Option<HashCost>,
    ip_limit: Option<RateLimit>,
    failed_login_limit: Option<RateLimit>,
    email_limit: Option<RateLimit>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRedis {
    url: String,
    key_prefix: Option<String>,
    on_failure: Option<crate::rate_limit::FailureMode>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSmtp {
    url: String,
    from: Option<String>,
}

const DEFAULT_FROM: &str = "Tollgate <no-reply@localhost>";

impl Config {
    /// Loads from `file` (if given, it must exist; otherwise `./tollgate.toml` is read
    /// when present) and the environment as seen through `env`.
    pub fn load(file: Option<&Path>, env: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let file_path = file.map(Path::to_path_buf).or_else(|| env("TOLLGATE_CONFIG").map(PathBuf::from));
        let parsed: FileConfig = match &file_path {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).with_context(|| format!("reading config file {}", path.display()))?;
                toml::from_str(&text).with_context(|| format!("parsing config file {}", path.display()))?
            }
            None if Path::new("tollgate.toml").exists() => {
                let text = std::fs::read_to_string("tollgate.toml").context("reading tollgate.toml")?;
                toml::from_str(&text).context("parsing tollgate.toml")?
            }
            None => FileConfig::default(),
        };
        Self::resolve(parsed, env)
    }

    fn resolve(file: FileConfig, env: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let listen = env("TOLLGATE_LISTEN").or(file.listen).unwrap_or_else(|| "127.0.0.1:8080".into());
        let listen: SocketAddr =
            listen.parse().with_context(|| format!("TOLLGATE_LISTEN / listen: not an address: {listen:?}"))?;
        let data_dir = env("TOLLGATE_DATA_DIR")
            .map(PathBuf::from)
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from("tollgate-data"));
        let database_url = env("TOLLGATE_DATABASE_URL")
            .or(file.database_url)
            .unwrap_or_else(|| format!("sqlite://{}", data_dir.join("tollgate.db").display()));
        if !(database_url.starts_with("sqlite:")
            || database_url.starts_with("postgres://")
            || database_url.starts_with("postgresql://"))
        {
            bail!("TOLLGATE_DATABASE_URL must start with sqlite:// or postgres://");
        }
        let public_url = env("TOLLGATE_PUBLIC_URL").or(file.public_url).unwrap_or_else(|| format!("http://{listen}"));
        let public_url = public_url.trim_end_matches('/').to_owned();
        let log_format = match env("TOLLGATE_LOG_FORMAT").as_deref() {
            Some("json") => LogFormat::Json,
            Some("text") => LogFormat::Text,
            Some(other) => bail!("TOLLGATE_LOG_FORMAT must be text or json, not {other:?}"),
            None => file.log_format.unwrap_or(LogFormat::Text),
        };
        let signing_key_file = env("TOLLGATE_SIGNING_KEY_FILE")
            .map(PathBuf::from)
            .or(file.signing_key_file)
            .unwrap_or_else(|| data_dir.join("signing-keys.json"));
        let plans_file = env("TOLLGATE_PLANS_FILE")
            .map(PathBuf::from)
            .or(file.plans_file)
            .unwrap_or_else(|| data_dir.join("plans.toml"));

        let seconds = |var: &str, file_value: Option<u64>, default: u64| -> anyhow::Result<Duration> {
            let secs = match env(var) {
                Some(v) => v.parse().with_context(|| format!("{var} must be a number of seconds"))?,
                None => file_value.unwrap_or(default),
            };
            if secs == 0 {
                bail!("{var} must be positive");
            }
            Ok(Duration::from_secs(secs))
        };
        let limit = |var: &str, file_value: Option<RateLimit>, default: RateLimit| -> anyhow::Result<RateLimit> {
            match env(var) {
                Some(v) => parse_limit(&v).with_context(|| format!("{var} must look like 100/60 (requests/seconds)")),
                None => Ok(file_value.unwrap_or(default)),
            }
        };
        let bool_var = |var: &str, file_value: Option<bool>, default: bool| -> anyhow::Result<bool> {
            match env(var).as_deref() {
                Some("1" | "true") => Ok(true),
                Some("0" | "false") => Ok(false),
                Some(other) => bail!("{var} must be true or false, not {other:?}"),
                None => Ok(file_value.unwrap_or(default)),
            }
        };
        let mut password_hash = file.auth.password_hash.unwrap_or_default();
        if let Some(kib) = env("TOLLGATE_PASSWORD_HASH_MEMORY_KIB") {
            password_hash.memory_kib = kib.parse().context("TOLLGATE_PASSWORD_HASH_MEMORY_KIB must be a number")?;
        }
        if let Some(t) = env("TOLLGATE_PASSWORD_HASH_ITERATIONS") {
            password_hash.iterations = t.parse().context("TOLLGATE_PASSWORD_HASH_ITERATIONS must be a number")?;
        }
        let auth = AuthConfig {
            access_token_ttl: seconds(
                "TOLLGATE_ACCESS_TOKEN_TTL_SECONDS",
                file.auth.access_token_ttl_seconds,
                15 * 60,
            )?,
            session_ttl: seconds("TOLLGATE_SESSION_TTL_SECONDS", file.auth.session_ttl_seconds, 30 * 24 * 3600)?,
            require_verified_email: bool_var(
                "TOLLGATE_REQUIRE_VERIFIED_EMAIL",
                file.auth.require_verified_email,
                true,
            )?,
            password_hash,
            ip_limit: limit(
                "TOLLGATE_AUTH_IP_LIMIT",
                file.auth.ip_limit,
                RateLimit::per(100, Duration::from_secs(60)),
            )?,
            failed_login_limit: limit(
                "TOLLGATE_AUTH_FAILED_LOGIN_LIMIT",
                file.auth.failed_login_limit,
                RateLimit::per(10, Duration::from_secs(3600)),
            )?,
            email_limit: limit(
                "TOLLGATE_AUTH_EMAIL_LIMIT",
                file.auth.email_limit,
                RateLimit::per(5, Duration::from_secs(3600)),
            )?,
        };
        let smtp = match (env("TOLLGATE_SMTP_URL"), file.smtp) {
            (Some(url), file_smtp) => Some(SmtpConfig {
                url,
                from: env("TOLLGATE_SMTP_FROM")
                    .or(file_smtp.and_then(|s| s.from))
                    .unwrap_or_else(|| DEFAULT_FROM.into()),
            }),
            (None, Some(s)) => Some(SmtpConfig {
                url: s.url,
                from: env("TOLLGATE_SMTP_FROM").or(s.from).unwrap_or_else(|| DEFAULT_FROM.into()),
            }),
            (None, None) => None,
        };
        if let Some(smtp) = &smtp
            && !(smtp.url.starts_with("smtp://") || smtp.url.starts_with("smtps://"))
        {
            bail!("TOLLGATE_SMTP_URL must start with smtp:// or smtps://");
        }
        if let Some(smtp) = &smtp
            && plain_smtp_leaves_the_machine(&smtp.url)
        {
            bail!(
                "TOLLGATE_SMTP_URL: plain smtp:// sends passwords and emailed links unencrypted; \
                 use smtps://, add ?tls=required, or point it at a relay on loopback"
            );
        }
        let on_failure = match env("TOLLGATE_RATE_LIMIT_ON_FAILURE").as_deref() {
            Some("open") => Some(crate::rate_limit::FailureMode::Open),
            Some("closed") => Some(crate::rate_limit::FailureMode::Closed),
            Some(other) => bail!("TOLLGATE_RATE_LIMIT_ON_FAILURE must be open or closed, not {other:?}"),
            None => None,
        };
        let redis = match (env("TOLLGATE_REDIS_URL"), file.redis) {
            (None, None) => None,
            (url, file_redis) => {
                let (file_url, prefix, file_failure) = match file_redis {
                    Some(r) => (Some(r.url), r.key_prefix, r.on_failure),
                    None => (None, None, None),
                };
                let url = url.or(file_url).unwrap_or_default();
                if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                    bail!("TOLLGATE_REDIS_URL must start with redis:// or rediss://");
                }
                Some(RedisConfig {
                    url,
                    key_prefix: env("TOLLGATE_REDIS_KEY_PREFIX").or(prefix).unwrap_or_else(|| "tollgate:".into()),
                    on_failure: on_failure.or(file_failure).unwrap_or(crate::rate_limit::FailureMode::Open),
                })
            }
        };
        let file_stripe = file.stripe.unwrap_or_default();
        let secret_key = env("TOLLGATE_STRIPE_SECRET_KEY").or(file_stripe.secret_key).filter(|k| !k.is_empty());
        let webhook_secret =
            env("TOLLGATE_STRIPE_WEBHOOK_SECRET").or(file_stripe.webhook_secret).filter(|k| !k.is_empty());
        let stripe = if secret_key.is_some() || webhook_secret.is_some() {
            let api_base = env("TOLLGATE_STRIPE_API_BASE")
                .or(file_stripe.api_base)
                .unwrap_or_else(|| "https://api.stripe.com".into())
                .trim_end_matches('/')
                .to_owned();
            if !(api_base.starts_with("https://") || api_base.starts_with("http://")) {
                bail!("TOLLGATE_STRIPE_API_BASE must be an http(s) URL");
            }
            Some(StripeConfig {
                secret_key,
                webhook_secret,
                api_base,
                api_version: env("TOLLGATE_STRIPE_API_VERSION")
                    .or(file_stripe.api_version)
                    .unwrap_or_else(|| STRIPE_API_VERSION.into()),
                redirect_origins: match env("TOLLGATE_BILLING_REDIRECT_ORIGINS") {
                    Some(list) => list
                        .split(',')
                        .map(|o| o.trim().trim_end_matches('/').to_owned())
                        .filter(|o| !o.is_empty())
                        .collect(),
                    None => file_stripe.redirect_origins,
                },
            })
        } else {
            None
        };
        // Off only where nobody but the developer can reach it: the embedded database
        // on a loopback address. Anything else (PostgreSQL, or listening beyond this
        // machine) is a deployment, and an admin's password alone is not enough there.
        let embedded_dev = database_url.starts_with("sqlite:") && listen.ip().is_loopback();
        let admin_require_2fa = bool_var("TOLLGATE_ADMIN_REQUIRE_2FA", file.admin_require_2fa, !embedded_dev)?;
        let days = |var: &str, file_value: Option<u32>, default: u32| -> anyhow::Result<u32> {
            let days = match env(var) {
                Some(v) => v.parse().with_context(|| format!("{var} must be a whole number of days"))?,
                None => file_value.unwrap_or(default),
            };
            if !(1..=36_500).contains(&days) {
                bail!("{var} must be 1 to 36500 days");
            }
            Ok(days)
        };
        let retention = RetentionConfig {
            usage_events_days: days("TOLLGATE_RETENTION_USAGE_EVENTS_DAYS", file.retention.usage_events_days, 90)?,
            audit_days: days("TOLLGATE_RETENTION_AUDIT_DAYS", file.retention.audit_days, 365)?,
        };
        Ok(Self {
            retention,
            admin_require_2fa,
            listen,
            data_dir,
            database_url,
            public_url,
            log_format,
            auth,
            smtp,
            signing_key_file,
            plans_file,
            redis,
            stripe,
        })
    }
}

/// True for `smtp://` without `tls=required` to a host other than loopback.
fn plain_smtp_leaves_the_machine(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("smtp://") else { return false };
    if rest.contains("tls=required") {
        return false;
    }
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    let host_port = authority.rsplit('@').next().unwrap_or_default();
    let host = if let Some(bracketed) = host_port.strip_prefix('[') {
        bracketed.split(']').next().unwrap_or_default()
    } else {
        host_port.split(':').next().unwrap_or_default()
    };
    let loopback = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    !loopback
}

/// `"100/60"`: 100 requests per 60 seconds.
fn parse_limit(s: &str) -> anyhow::Result<RateLimit> {
    let (requests, seconds) = s.split_once('/').context("missing '/'")?;
    let requests: u32 = requests.trim().parse()?;
    let seconds: u64 = seconds.trim().parse()?;
    if requests == 0 || seconds == 0 {
        bail!("both parts must be positive");
    }
    Ok(RateLimit::per(requests, Duration::from_secs(seconds)))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn defaults_need_nothing() {
        let c = Config::resolve(FileConfig::default(), &env_of(&[])).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.database_url, "sqlite://tollgate-data/tollgate.db");
        assert_eq!(c.public_url, "http://127.0.0.1:8080");
        assert_eq!(c.signing_key_file, PathBuf::from("tollgate-data/signing-keys.json"));
        assert!(c.smtp.is_none());
        assert_eq!(c.auth.access_token_ttl, Duration::from_secs(900));
        assert_eq!(c.auth.password_hash, HashCost::default());
    }

    #[test]
    fn env_overrides_file() {
        let file: FileConfig = toml::from_str(
            r#"
            listen = "127.0.0.1:9000"
            public_url = "https://file.example/"
            [auth]
            access_token_ttl_seconds = 60
            ip_limit = { requests = 5, window_seconds = 10 }
            [smtp]
            url = "smtp://127.0.0.1:25"
            "#,
        )
        .unwrap();
        let c = Config::resolve(
            file,
            &env_of(&[
                ("TOLLGATE_LISTEN", "127.0.0.1:7000"),
                ("TOLLGATE_DATABASE_URL", "postgres://postgres@127.0.0.1/x"),
                ("TOLLGATE_AUTH_FAILED_LOGIN_LIMIT", "3/60"),
            ]),
        )
        .unwrap();
        assert_eq!(c.listen.port(), 7000);
        assert_eq!(c.public_url, "https://file.example");
        assert_eq!(c.database_url, "postgres://postgres@127.0.0.1/x");
        assert_eq!(c.auth.access_token_ttl, Duration::from_secs(60));
        assert_eq!(c.auth.ip_limit, RateLimit::per(5, Duration::from_secs(10)));
        assert_eq!(c.auth.failed_login_limit, RateLimit::per(3, Duration::from_secs(60)));
        assert_eq!(c.smtp.unwrap().url, "smtp://127.0.0.1:25");
    }

    #[test]
    fn the_example_file_is_valid_and_its_commented_keys_too() {
        let text = include_str!("../../../tollgate.example.toml");
        let file: FileConfig = toml::from_str(text).unwrap();
        Config::resolve(file, &env_of(&[])).unwrap();
        // The documented admin key, uncommented, is a real key.
        let admin = text.replace("# admin_require_2fa = true", "admin_require_2fa = true");
        let file: FileConfig = toml::from_str(&admin).unwrap();
        assert!(Config::resolve(file, &env_of(&[])).unwrap().admin_require_2fa);
    }

    #[test]
    fn admin_2fa_is_required_outside_the_embedded_dev_setup() {
        assert!(!Config::resolve(FileConfig::default(), &env_of(&[])).unwrap().admin_require_2fa);
        let public = env_of(&[("TOLLGATE_LISTEN", "0.0.0.0:8080")]);
        assert!(Config::resolve(FileConfig::default(), &public).unwrap().admin_require_2fa);
        let postgres = env_of(&[("TOLLGATE_DATABASE_URL", "postgres://postgres@127.0.0.1/x")]);
        assert!(Config::resolve(FileConfig::default(), &postgres).unwrap().admin_require_2fa);
        let off = env_of(&[("TOLLGATE_LISTEN", "0.0.0.0:8080"), ("TOLLGATE_ADMIN_REQUIRE_2FA", "false")]);
        assert!(!Config::resolve(FileConfig::default(), &off).unwrap().admin_require_2fa);
        let file: FileConfig = toml::from_str("admin_require_2fa = true").unwrap();
        assert!(Config::resolve(file, &env_of(&[])).unwrap().admin_require_2fa);
    }

    #[test]
    fn plain_smtp_only_on_loopback() {
        for ok in [
            "smtp://127.0.0.1:2525",
            "smtp://localhost",
            "smtp://[::1]:25",
            "smtps://u:p@mail.example.com",
            "smtp://u:p@mail.example.com:587?tls=required",
        ] {
            assert!(!plain_smtp_leaves_the_machine(ok), "{ok}");
        }
        assert!(plain_smtp_leaves_the_machine("smtp://u:p@mail.example.com:25"));
    }

    #[test]
    fn typos_and_bad_values_are_errors() {
        assert!(toml::from_str::<FileConfig>("listn = \"x\"").is_err());
        for (k, v) in [
            ("TOLLGATE_LISTEN", "nope"),
            ("TOLLGATE_DATABASE_URL", "mysql://x"),
            ("TOLLGATE_AUTH_IP_LIMIT", "10"),
            ("TOLLGATE_SMTP_URL", "http://x"),
            ("TOLLGATE_REQUIRE_VERIFIED_EMAIL", "maybe"),
            ("TOLLGATE_SMTP_URL", "smtp://user:pass@mail.example.com:25"),
            ("TOLLGATE_SMTP_URL", "smtp://mail.example.com"),
        ] {
            assert!(Config::resolve(FileConfig::default(), &env_of(&[(k, v)])).is_err(), "{k}={v}");
        }
    }
}
