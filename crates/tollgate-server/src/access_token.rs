//! Access tokens: short-lived JWTs signed with Ed25519 (EdDSA) so a product's backend
//! can verify them offline against `/.well-known/jwks.json`.
//!
//! Keys live in one JSON file (0600) in the data directory. A rotation adds a new
//! signing key and retires the old one, which stays published until every token it
//! signed has expired. The server re-reads the file when it changes, so
//! `tollgate signing-keys rotate` takes effect without a restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tollgate_core::identity::{Role, Session, User};
use tollgate_core::ids::{AccountId, SessionId, UserId};
use uuid::Uuid;

/// The claims of a Tollgate access token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Claims {
    pub iss: String,
    /// The user id.
    pub sub: String,
    /// The session id: revoking the session invalidates the token at Tollgate at once.
    pub sid: String,
    /// The user's personal account.
    pub acc: String,
    pub role: Role,
    pub exp: i64,
    pub iat: i64,
    pub jti: String,
    /// RFC 8693 actor: on an impersonation token, the admin acting as `sub`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act: Option<ActorClaim>,
}

/// The `act` claim (RFC 8693 section 4.1): who is really acting.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ActorClaim {
    pub sub: String,
}

impl Claims {
    pub fn user_id(&self) -> Option<UserId> {
        self.sub.parse().ok()
    }
    pub fn session_id(&self) -> Option<SessionId> {
        self.sid.parse().ok()
    }
    pub fn account_id(&self) -> Option<AccountId> {
        self.acc.parse().ok()
    }
    /// An impersonation token: someone else (`act.sub`) acts as this user.
    pub fn is_impersonation(&self) -> bool {
        self.act.is_some()
    }
    /// The admin behind an impersonation token.
    pub fn impersonator(&self) -> Option<UserId> {
        self.act.as_ref().and_then(|a| a.sub.parse().ok())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("malformed token")]
    Malformed,
    #[error("unknown signing key")]
    UnknownKey,
    #[error("bad signature, algorithm, issuer or claims")]
    Invalid,
    #[error("token expired")]
    Expired,
}

/// The keys file on disk.
#[derive(Serialize, Deserialize, Clone)]
struct KeyFile {
    keys: Vec<StoredKey>,
}

#[derive(Serialize, Deserialize, Clone)]
struct StoredKey {
    kid: String,
    /// PKCS#8 v1 DER, base64.
    private_pkcs8: String,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option", default)]
    retired_at: Option<OffsetDateTime>,
}

struct LoadedKey {
    kid: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
    /// Base64url of the raw public key (the JWK `x`).
    x: String,
    retired_at: Option<OffsetDateTime>,
}

struct KeySet {
    /// The newest unretired key signs; all keys verify.
    keys: Vec<LoadedKey>,
    modified: Option<SystemTime>,
}

pub struct AccessTokens {
    path: PathBuf,
    issuer: String,
    ttl: Duration,
    set: RwLock<Arc<KeySet>>,
}

fn generate_key(now: OffsetDateTime) -> anyhow::Result<StoredKey> {
    let pair = Ed25519KeyPair::generate().map_err(|_| anyhow::anyhow!("Ed25519 key generation failed"))?;
    let der = pair.to_pkcs8v1().map_err(|_| anyhow::anyhow!("PKCS#8 encoding failed"))?;
    let x = URL_SAFE_NO_PAD.encode(pair.public_key().as_ref());
    Ok(StoredKey {
        kid: thumbprint(&x),
        private_pkcs8: STANDARD.encode(der.as_ref()),
        created_at: now,
        retired_at: None,
    })
}

/// RFC 7638 JWK thumbprint of an Ed25519 public key: a stable `kid`.
fn thumbprint(x: &str) -> String {
    let canonical = format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#);
    URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
}

fn load_key(stored: &StoredKey) -> anyhow::Result<LoadedKey> {
    let der = STANDARD.decode(&stored.private_pkcs8).context("signing key is not base64")?;
    let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der).map_err(|e| anyhow::anyhow!("bad signing key: {e}"))?;
    let x = URL_SAFE_NO_PAD.encode(pair.public_key().as_ref());
    Ok(LoadedKey {
        kid: stored.kid.clone(),
        encoding: EncodingKey::from_ed_der(&der),
        decoding: DecodingKey::from_ed_components(&x).context("bad public key")?,
        x,
        retired_at: stored.retired_at,
    })
}

fn write_private(path: &Path, file: &KeyFile) -> anyhow::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // Write then rename, so a reader never sees half a file.
    let tmp = path.with_extension("json.tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut f = options.open(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    // `mode` applies only to a file it creates: a leftover temp file keeps its own.
    #[cfg(unix)]
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    f.write_all(serde_json::to_string_pretty(file)?.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn read_file(path: &Path) -> anyhow::Result<KeyFile> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?.permissions().mode();
        if mode & 0o077 != 0 {
            anyhow::bail!(
                "{} is readable by other users (mode {:o}); run chmod 600 on it",
                path.display(),
                mode & 0o777
            );
        }
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl AccessTokens {
    /// Loads the key file, creating it with a fresh key when missing.
    pub fn load_or_create(path: &Path, issuer: &str, ttl: Duration) -> anyhow::Result<Self> {
        if !path.exists() {
            write_private(path, &KeyFile { keys: vec![generate_key(OffsetDateTime::now_utc())?] })?;
            tracing::info!(path = %path.display(), "generated a new signing key");
        }
        let tokens = Self {
            path: path.to_owned(),
            issuer: issuer.to_owned(),
            ttl,
            set: RwLock::new(Arc::new(Self::read_set(path)?)),
        };
        Ok(tokens)
    }

    fn read_set(path: &Path) -> anyhow::Result<KeySet> {
        let file = read_file(path)?;
        let keys = file.keys.iter().map(load_key).collect::<anyhow::Result<Vec<_>>>()?;
        if !keys.iter().any(|k| k.retired_at.is_none()) {
            anyhow::bail!("{} has no active signing key", path.display());
        }
        Ok(KeySet { keys, modified: modified(path) })
    }

    /// Re-reads the key file if it changed since it was loaded.
    pub fn reload_if_changed(&self) -> anyhow::Result<bool> {
        let current = self.current();
        if modified(&self.path) == current.modified {
            return Ok(false);
        }
        let set = Self::read_set(&self.path)?;
        *self.set.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
        Ok(true)
    }

    /// Adds a new signing key and retires the current one (kept for verification
    /// until its tokens expire). Keys retired for over a day are dropped.
    pub fn rotate(path: &Path) -> anyhow::Result<String> {
        let now = OffsetDateTime::now_utc();
        let mut file = if path.exists() { read_file(path)? } else { KeyFile { keys: vec![] } };
        file.keys.retain(|k| k.retired_at.is_none_or(|r| now - r < time::Duration::days(1)));
        for key in file.keys.iter_mut().filter(|k| k.retired_at.is_none()) {
            key.retired_at = Some(now);
        }
        let key = generate_key(now)?;
        let kid = key.kid.clone();
        file.keys.push(key);
        write_private(path, &file)?;
        Ok(kid)
    }

    fn current(&self) -> Arc<KeySet> {
        self.set.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Mints an access token for a session.
    pub fn issue(&self, user: &User, session: &Session) -> Result<String, jsonwebtoken::errors::Error> {
        self.issue_at(user, session, OffsetDateTime::now_utc())
    }

    pub fn issue_at(
        &self,
        user: &User,
        session: &Session,
        now: OffsetDateTime,
    ) -> Result<String, jsonwebtoken::errors::Error> {
        self.mint(user, session, now, self.ttl, None)
    }

    /// Mints a token with which `admin` acts as `user` in `session` (an impersonation
    /// session), carrying `act: {sub: admin}` (RFC 8693). It lives `ttl` at most.
    pub fn issue_impersonation(
        &self,
        user: &User,
        session: &Session,
        admin: UserId,
        now: OffsetDateTime,
        ttl: Duration,
    ) -> Result<String, jsonwebtoken::errors::Error> {
        self.mint(user, session, now, ttl.min(self.ttl), Some(ActorClaim { sub: admin.to_string() }))
    }

    fn mint(
        &self,
        user: &User,
        session: &Session,
        now: OffsetDateTime,
        ttl: Duration,
        act: Option<ActorClaim>,
    ) -> Result<String, jsonwebtoken::errors::Error> {
        let set = self.current();
        let key = set.keys.iter().rev().find(|k| k.retired_at.is_none()).expect("a key set always has an active key");
        let claims = Claims {
            iss: self.issuer.clone(),
            sub: user.id.to_string(),
            sid: session.id.to_string(),
            acc: user.account_id.to_string(),
            role: user.role,
            iat: now.unix_timestamp(),
            exp: now.unix_timestamp() + ttl.as_secs() as i64,
            jti: Uuid::now_v7().to_string(),
            act,
        };
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(key.kid.clone());
        header.typ = Some("at+jwt".into());
        jsonwebtoken::encode(&header, &claims, &key.encoding)
    }

    /// Verifies signature (EdDSA only: `alg: none` and HMAC tokens are refused),
    /// issuer and expiry. Revocation is checked by the caller against the session.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        if header.alg != Algorithm::EdDSA {
            return Err(TokenError::Invalid);
        }
        let kid = header.kid.ok_or(TokenError::UnknownKey)?;
        let set = self.current();
        let key = set.keys.iter().find(|k| k.kid == kid).ok_or(TokenError::UnknownKey)?;
        // A retired key verifies only while tokens it signed can still be alive; after
        // an emergency rotation a leaked key stops working within one lifetime.
        if key.retired_at.is_some_and(|r| OffsetDateTime::now_utc() - r > self.retired_key_grace()) {
            return Err(TokenError::UnknownKey);
        }
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[&self.issuer]);
        validation.set_required_spec_claims(&["exp", "iat", "iss", "sub"]);
        validation.leeway = 5;
        jsonwebtoken::decode::<Claims>(token, &key.decoding, &validation).map(|d| d.claims).map_err(|e| {
            match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
                _ => TokenError::Invalid,
            }
        })
    }

    /// How long a retired key stays trusted and published: one token lifetime plus a
    /// minute of clock skew.
    fn retired_key_grace(&self) -> time::Duration {
        time::Duration::try_from(self.ttl).unwrap_or(time::Duration::MAX).saturating_add(time::Duration::seconds(60))
    }

    /// The public keys to publish: the active one and those retired less than one
    /// token lifetime ago.
    pub fn jwks(&self) -> serde_json::Value {
        let now = OffsetDateTime::now_utc();
        let grace = self.retired_key_grace();
        let keys: Vec<serde_json::Value> = self
            .current()
            .keys
            .iter()
            .filter(|k| k.retired_at.is_none_or(|r| now - r <= grace))
            .map(|k| serde_json::json!({ "kty": "OKP", "crv": "Ed25519", "x": k.x, "kid": k.kid, "alg": "EdDSA", "use": "sig" }))
            .collect();
        serde_json::json!({ "keys": keys })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_core::identity::{EmailAddress, Locale, UserStatus};

    fn user_and_session() -> (User, Session) {
        let now = OffsetDateTime::now_utc();
        let user = User {
            id: UserId::new(),
            email: EmailAddress::parse("ada@example.com").unwrap(),
            email_verified_at: None,
            name: None,
            locale: Locale::En,
            password_hash: None,
            status: UserStatus::Active,
            role: Role::User,
            account_id: AccountId::new(),
            totp_secret: None,
            totp_enabled_at: None,
            totp_last_step: None,
            created_at: now,
            updated_at: now,
            last_login_at: None,
        };
        let session = Session {
            id: SessionId::new(),
            user_id: user.id,
            ip: None,
            user_agent: None,
            created_at: now,
            last_seen_at: now,
            expires_at: now,
            revoked_at: None,
        };
        (user, session)
    }

    #[test]
    fn issue_verify_and_forgeries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        let tokens = AccessTokens::load_or_create(&path, "https://issuer.test", Duration::from_secs(900)).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let (user, session) = user_and_session();
        let jwt = tokens.issue(&user, &session).unwrap();
        let claims = tokens.verify(&jwt).unwrap();
        assert_eq!(claims.sub, user.id.to_string());
        assert_eq!(claims.sid, session.id.to_string());
        assert_eq!(claims.acc, user.account_id.to_string());

        // Expired.
        let old = tokens.issue_at(&user, &session, OffsetDateTime::now_utc() - time::Duration::hours(1)).unwrap();
        assert_eq!(tokens.verify(&old), Err(TokenError::Expired));
        // Another issuer with the same key.
        let other = AccessTokens::load_or_create(&path, "https://evil.test", Duration::from_secs(900)).unwrap();
        assert_eq!(tokens.verify(&other.issue(&user, &session).unwrap()), Err(TokenError::Invalid));
        // A tampered payload.
        let mut parts: Vec<String> = jwt.split('.').map(str::to_owned).collect();
        parts[1] = URL_SAFE_NO_PAD.encode(br#"{"sub":"someone-else"}"#);
        assert_eq!(tokens.verify(&parts.join(".")), Err(TokenError::Invalid));
        // alg: none.
        let none_header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let payload = jwt.split('.').nth(1).unwrap();
        assert!(tokens.verify(&format!("{none_header}.{payload}.")).is_err());
        // HS256 "signed" with the public key (the classic key-confusion attack).
        let x = tokens.jwks()["keys"][0]["x"].as_str().unwrap().to_owned();
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(tokens.jwks()["keys"][0]["kid"].as_str().unwrap().to_owned());
        let hs = jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(x.as_bytes())).unwrap();
        assert_eq!(tokens.verify(&hs), Err(TokenError::Invalid));
        assert_eq!(tokens.verify("not.a.jwt"), Err(TokenError::Malformed));
    }

    #[test]
    fn rotation_keeps_old_key_published_and_valid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        let tokens = AccessTokens::load_or_create(&path, "iss", Duration::from_secs(900)).unwrap();
        let (user, session) = user_and_session();
        let before = tokens.issue(&user, &session).unwrap();
        let old_kid = tokens.jwks()["keys"][0]["kid"].as_str().unwrap().to_owned();
        // Make sure the mtime differs on coarse filesystems.
        std::thread::sleep(Duration::from_millis(20));
        let new_kid = AccessTokens::rotate(&path).unwrap();
        assert!(tokens.reload_if_changed().unwrap());
        let kids: Vec<String> =
            tokens.jwks()["keys"].as_array().unwrap().iter().map(|k| k["kid"].as_str().unwrap().to_owned()).collect();
        assert_eq!(kids, vec![old_kid.clone(), new_kid.clone()]);
        assert!(tokens.verify(&before).is_ok(), "tokens of the retired key stay valid");
        let after = tokens.issue(&user, &session).unwrap();
        assert_eq!(jsonwebtoken::decode_header(&after).unwrap().kid.unwrap(), new_kid);

        // Once the retired key is older than a token lifetime, it neither verifies nor
        // is published (simulated by back-dating its retirement).
        let mut file = read_file(&path).unwrap();
        file.keys[0].retired_at = Some(OffsetDateTime::now_utc() - time::Duration::hours(1));
        std::thread::sleep(Duration::from_millis(20));
        write_private(&path, &file).unwrap();
        assert!(tokens.reload_if_changed().unwrap());
        assert_eq!(tokens.verify(&before), Err(TokenError::UnknownKey));
        assert_eq!(tokens.jwks()["keys"].as_array().unwrap().len(), 1);
        assert!(tokens.verify(&after).is_ok());
    }

    #[cfg(unix)]
    #[test]
    fn a_key_file_readable_by_others_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        AccessTokens::load_or_create(&path, "iss", Duration::from_secs(900)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = AccessTokens::load_or_create(&path, "iss", Duration::from_secs(900)).err().unwrap();
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }
}
