-- Identity: accounts, users, sessions and their refresh tokens, one-time tokens,
-- recovery codes, the audit log and the email outbox.
--
-- PostgreSQL conventions (mirroring the SQLite schema table for table, column for
-- column, with native types):
--   ids        uuid (UUIDv7, time-ordered)
--   timestamps timestamptz, microsecond precision like the SQLite integers
--   enums      text with a CHECK, as in SQLite
--   emails     stored normalised (lower-case), so a plain unique index is enough
--   names      unique indexes and constraints are named as the store reports them in
--              conflicts (`users_email`, `accounts_external_id`)

-- Who owns plans, quotas and credits. Every user gets a personal one.
CREATE TABLE accounts (
    id          uuid PRIMARY KEY,
    kind        text NOT NULL CHECK (kind IN ('personal', 'organization', 'external')),
    name        text,
    external_id text CONSTRAINT accounts_external_id UNIQUE,
    created_at  timestamptz NOT NULL
);

CREATE TABLE users (
    id                uuid PRIMARY KEY,
    email             text NOT NULL,
    email_verified_at timestamptz,
    name              text,
    locale            text NOT NULL,
    -- PHC string (Argon2id); NULL until an admin created from the CLI sets one.
    password_hash     text,
    status            text NOT NULL CHECK (status IN ('active', 'suspended', 'deleted')),
    role              text NOT NULL CHECK (role IN ('user', 'admin')),
    account_id        uuid NOT NULL REFERENCES accounts (id),
    totp_secret       text,
    totp_enabled_at   timestamptz,
    -- Last accepted TOTP time step: codes are accepted once.
    totp_last_step    bigint,
    created_at        timestamptz NOT NULL,
    updated_at        timestamptz NOT NULL,
    last_login_at     timestamptz
);
-- A deleted user's address is free to register again.
CREATE UNIQUE INDEX users_email ON users (email) WHERE status <> 'deleted';

CREATE TABLE sessions (
    id           uuid PRIMARY KEY,
    user_id      uuid NOT NULL REFERENCES users (id),
    ip           text,
    user_agent   text,
    created_at   timestamptz NOT NULL,
    last_seen_at timestamptz NOT NULL,
    expires_at   timestamptz NOT NULL,
    revoked_at   timestamptz
);
CREATE INDEX sessions_user ON sessions (user_id);

-- Every refresh token a session ever had. Exactly one per live session has
-- rotated_at NULL; presenting a rotated one is a replay and revokes the session.
CREATE TABLE refresh_tokens (
    digest     text PRIMARY KEY,
    session_id uuid NOT NULL REFERENCES sessions (id),
    created_at timestamptz NOT NULL,
    rotated_at timestamptz
);
CREATE INDEX refresh_tokens_session ON refresh_tokens (session_id);

-- Email verification, email change, password reset, magic link and MFA login tokens.
CREATE TABLE one_time_tokens (
    id         uuid PRIMARY KEY,
    digest     text NOT NULL UNIQUE,
    purpose    text NOT NULL CHECK (purpose IN ('verify_email', 'change_email', 'password_reset', 'magic_link', 'mfa_login')),
    user_id    uuid NOT NULL REFERENCES users (id),
    new_email  text,
    created_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL,
    used_at    timestamptz
);
CREATE INDEX one_time_tokens_user ON one_time_tokens (user_id);

CREATE TABLE recovery_codes (
    user_id    uuid NOT NULL REFERENCES users (id),
    digest     text NOT NULL,
    created_at timestamptz NOT NULL,
    used_at    timestamptz,
    PRIMARY KEY (user_id, digest)
);

-- Append-only. Written in the same transaction as the change it records.
CREATE TABLE audit_events (
    id          uuid PRIMARY KEY,
    actor_type  text NOT NULL,
    actor_id    text,
    action      text NOT NULL,
    target_type text,
    target_id   text,
    metadata    jsonb NOT NULL,
    ip          text,
    user_agent  text,
    severity    text NOT NULL CHECK (severity IN ('info', 'warning', 'critical')),
    created_at  timestamptz NOT NULL
);
CREATE INDEX audit_events_created ON audit_events (created_at);
CREATE INDEX audit_events_target ON audit_events (target_type, target_id, created_at);

-- Durable outbox: a sender claims due rows with a lease, so a crash never loses an
-- email and two senders never send one twice.
CREATE TABLE email_outbox (
    id              uuid PRIMARY KEY,
    to_address      text NOT NULL,
    template        text NOT NULL,
    subject         text NOT NULL,
    text_body       text NOT NULL,
    html_body       text NOT NULL,
    status          text NOT NULL CHECK (status IN ('pending', 'sent', 'logged', 'failed')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL,
    claimed_until   timestamptz,
    last_error      text,
    created_at      timestamptz NOT NULL,
    sent_at         timestamptz
);
CREATE INDEX email_outbox_due ON email_outbox (status, next_attempt_at);
