-- Plans and meters (applied from the plans file), external customers, subscriptions,
-- service keys, usage counters and events, and idempotency answers.

-- Definitions are the validated JSON of tollgate_core::plans; the file is the source
-- of truth and `apply_catalog` keeps these rows equal to it.
CREATE TABLE meters (
    key        TEXT PRIMARY KEY,
    definition TEXT NOT NULL,
    updated_at INTEGER NOT NULL
);

CREATE TABLE plans (
    key         TEXT PRIMARY KEY,
    definition  TEXT NOT NULL,
    -- Set instead of deleting a plan that a subscription still uses.
    archived_at INTEGER,
    updated_at  INTEGER NOT NULL
);

-- External customers may carry an email of their own.
ALTER TABLE accounts ADD COLUMN email TEXT;

-- At most one per account; no row means the default plan.
CREATE TABLE subscriptions (
    account_id           BLOB PRIMARY KEY REFERENCES accounts (id),
    plan_key             TEXT NOT NULL,
    status               TEXT NOT NULL CHECK (status IN ('trialing', 'active', 'past_due', 'canceled', 'expired', 'incomplete')),
    provider             TEXT NOT NULL,
    started_at           INTEGER NOT NULL,
    trial_ends_at        INTEGER,
    cancel_at_period_end INTEGER NOT NULL,
    updated_at           INTEGER NOT NULL
);
CREATE INDEX subscriptions_plan ON subscriptions (plan_key);

CREATE TABLE service_keys (
    id         BLOB PRIMARY KEY,
    name       TEXT NOT NULL,
    -- The first characters of the secret, to recognise it in lists.
    prefix     TEXT NOT NULL,
    digest     TEXT NOT NULL UNIQUE,
    -- Space-separated scopes, e.g. 'usage:write accounts:write'.
    scopes     TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
);

-- One row per (account, meter, window instance); rolling windows have a row per
-- bucket. Window instances roll over by their key, so nothing ever resets them.
CREATE TABLE usage_counters (
    account_id BLOB NOT NULL REFERENCES accounts (id),
    meter      TEXT NOT NULL,
    window_key TEXT NOT NULL,
    used       INTEGER NOT NULL,
    PRIMARY KEY (account_id, meter, window_key)
) WITHOUT ROWID;

-- Every decision that changed or refused usage.
CREATE TABLE usage_events (
    id              BLOB PRIMARY KEY,
    account_id      BLOB NOT NULL REFERENCES accounts (id),
    meter           TEXT NOT NULL,
    outcome         TEXT NOT NULL CHECK (outcome IN ('consumed', 'denied', 'released', 'refunded')),
    amount          INTEGER NOT NULL,
    idempotency_key TEXT,
    endpoint        TEXT,
    metadata        TEXT,
    ip              TEXT,
    created_at      INTEGER NOT NULL
);
CREATE INDEX usage_events_account ON usage_events (account_id, created_at);

-- Daily totals per account and meter, kept in the same transaction as the events.
CREATE TABLE usage_daily (
    account_id BLOB NOT NULL REFERENCES accounts (id),
    meter      TEXT NOT NULL,
    day        TEXT NOT NULL,
    consumed   INTEGER NOT NULL DEFAULT 0,
    denied     INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (account_id, meter, day)
) WITHOUT ROWID;

-- The stored answer of a request with an Idempotency-Key.
CREATE TABLE idempotency_keys (
    scope        TEXT NOT NULL,
    key          TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    response     TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    PRIMARY KEY (scope, key)
) WITHOUT ROWID;
