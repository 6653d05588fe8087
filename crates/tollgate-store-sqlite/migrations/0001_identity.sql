-- Identity: accounts, users, sessions and their refresh tokens, one-time tokens,
-- recovery codes, the audit log and the email outbox.
--
-- SQLite conventions (the PostgreSQL schema mirrors them with native types):
--   ids        16-byte BLOB UUIDv7 (sqlx's encoding of uuid::Uuid)
--   timestamps INTEGER microseconds since the Unix epoch, UTC: sorts and compares
--              correctly, unlike RFC 3339 text whose fractional part varies in length
--   emails     stored normalised (lower-case), so a plain unique index is enough

-- Who owns plans, quotas and credits. Every user gets a personal one.
CREATE TABLE accounts (
    id          BLOB PRIMARY KEY,
    kind        TEXT NOT NULL CHECK (kind IN ('personal', 'organization', 'external')),
    name        TEXT,
    external_id TEXT UNIQUE,
    created_at  INTEGER NOT NULL
);

CREATE TABLE users (
    id                BLOB PRIMARY KEY,
    email             TEXT NOT NULL,
    email_verified_at INTEGER,
    name              TEXT,
    locale            TEXT NOT NULL,
    -- PHC string (Argon2id); NULL until an admin created from the CLI sets one.
    password_hash     TEXT,
    status            TEXT NOT NULL CHECK (status IN ('active', 'suspended', 'deleted')),
    role              TEXT NOT NULL CHECK (role IN ('user', 'admin')),
    account_id        BLOB NOT NULL REFERENCES accounts (id),
    totp_secret       TEXT,
    totp_enabled_at   INTEGER,
    -- Last accepted TOTP time step: codes are accepted once.
    totp_last_step    INTEGER,
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL,
    last_login_at     INTEGER
);
-- A deleted user's address is free to register again.
CREATE UNIQUE INDEX users_email ON users (email) WHERE status <> 'deleted';

CREATE TABLE sessions (
    id           BLOB PRIMARY KEY,
    user_id      BLOB NOT NULL REFERENCES users (id),
    ip           TEXT,
    user_agent   TEXT,
    created_at   INTEGER NOT NULL,
    last_seen_at INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL,
    revoked_at   INTEGER
);
CREATE INDEX sessions_user ON sessions (user_id);

-- Every refresh token a session ever had. Exactly one per live session has
-- rotated_at NULL; presenting a rotated one is a replay and revokes the session.
CREATE TABLE refresh_tokens (
    digest     TEXT PRIMARY KEY,
    session_id BLOB NOT NULL REFERENCES sessions (id),
    created_at INTEGER NOT NULL,
    rotated_at INTEGER
);
CREATE INDEX refresh_tokens_session ON refresh_tokens (session_id);

-- Email verification, email change, password reset, magic link and MFA login tokens.
CREATE TABLE one_time_tokens (
    id         BLOB PRIMARY KEY,
    digest     TEXT NOT NULL UNIQUE,
    purpose    TEXT NOT NULL CHECK (purpose IN ('verify_email', 'change_email', 'password_reset', 'magic_link', 'mfa_login')),
    user_id    BLOB NOT NULL REFERENCES users (id),
    new_email  TEXT,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    used_at    INTEGER
);
CREATE INDEX one_time_tokens_user ON one_time_tokens (user_id);

CREATE TABLE recovery_codes (
    user_id    BLOB NOT NULL REFERENCES users (id),
    digest     TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    used_at    INTEGER,
    PRIMARY KEY (user_id, digest)
);

-- Append-only. Written in the same transaction as the change it records.
CREATE TABLE audit_events (
    id          BLOB PRIMARY KEY,
    actor_type  TEXT NOT NULL,
    actor_id    TEXT,
    action      TEXT NOT NULL,
    target_type TEXT,
    target_id   TEXT,
    metadata    TEXT NOT NULL,
    ip          TEXT,
    user_agent  TEXT,
    severity    TEXT NOT NULL CHECK (severity IN ('info', 'warning', 'critical')),
    created_at  INTEGER NOT NULL
);
CREATE INDEX audit_events_created ON audit_events (created_at);
CREATE INDEX audit_events_target ON audit_events (target_type, target_id, created_at);

-- Durable outbox: a sender claims due rows with a lease, so a crash never loses an
-- email and two senders never send one twice.
CREATE TABLE email_outbox (
    id              BLOB PRIMARY KEY,
    to_address      TEXT NOT NULL,
    template        TEXT NOT NULL,
    subject         TEXT NOT NULL,
    text_body       TEXT NOT NULL,
    html_body       TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('pending', 'sent', 'logged', 'failed')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    claimed_until   INTEGER,
    last_error      TEXT,
    created_at      INTEGER NOT NULL,
    sent_at         INTEGER
);
CREATE INDEX email_outbox_due ON email_outbox (status, next_attempt_at);
