-- Plans and meters (applied from the plans file), external customers, subscriptions,
-- service keys, usage counters and events, and idempotency answers.
--
-- Mirrors the SQLite migration of the same name table for table, column for column,
-- with native types (see 0001_identity.sql): uuid, timestamptz, bigint, boolean,
-- jsonb, text[] for the scopes and date for days.

-- Definitions are the validated JSON of tollgate_core::plans; the file is the source
-- of truth and `apply_catalog` keeps these rows equal to it.
CREATE TABLE meters (
    key        text PRIMARY KEY,
    definition jsonb NOT NULL,
    updated_at timestamptz NOT NULL
);

CREATE TABLE plans (
    key         text PRIMARY KEY,
    definition  jsonb NOT NULL,
    -- Set instead of deleting a plan that a subscription still uses.
    archived_at timestamptz,
    updated_at  timestamptz NOT NULL
);

-- External customers may carry an email of their own.
ALTER TABLE accounts ADD COLUMN email text;

-- At most one per account; no row means the default plan.
CREATE TABLE subscriptions (
    account_id           uuid PRIMARY KEY REFERENCES accounts (id),
    plan_key             text NOT NULL,
    status               text NOT NULL CHECK (status IN ('trialing', 'active', 'past_due', 'canceled', 'expired', 'incomplete')),
    provider             text NOT NULL,
    started_at           timestamptz NOT NULL,
    trial_ends_at        timestamptz,
    cancel_at_period_end boolean NOT NULL,
    updated_at           timestamptz NOT NULL
);
CREATE INDEX subscriptions_plan ON subscriptions (plan_key);

CREATE TABLE service_keys (
    id         uuid PRIMARY KEY,
    name       text NOT NULL,
    -- The first characters of the secret, to recognise it in lists.
    prefix     text NOT NULL,
    digest     text NOT NULL UNIQUE,
    -- Scopes, e.g. '{usage:write,accounts:write}' (space-separated text in SQLite).
    scopes     text[] NOT NULL,
    created_at timestamptz NOT NULL,
    revoked_at timestamptz
);

-- One row per (account, meter, window instance); rolling windows have a row per
-- bucket. Window instances roll over by their key, so nothing ever resets them.
-- Writers of one (account, meter) take turns on a transaction-level advisory lock
-- (see `consume_usage`), so concurrent consumes never push a window past its limit.
CREATE TABLE usage_counters (
    account_id uuid NOT NULL REFERENCES accounts (id),
    meter      text NOT NULL,
    window_key text NOT NULL,
    used       bigint NOT NULL,
    PRIMARY KEY (account_id, meter, window_key)
);

-- Every decision that changed or refused usage.
CREATE TABLE usage_events (
    id              uuid PRIMARY KEY,
    account_id      uuid NOT NULL REFERENCES accounts (id),
    meter           text NOT NULL,
    outcome         text NOT NULL CHECK (outcome IN ('consumed', 'denied', 'released', 'refunded')),
    amount          bigint NOT NULL,
    idempotency_key text,
    endpoint        text,
    metadata        jsonb,
    ip              text,
    created_at      timestamptz NOT NULL
);
CREATE INDEX usage_events_account ON usage_events (account_id, created_at);

-- Daily totals per account and meter, kept in the same transaction as the events.
CREATE TABLE usage_daily (
    account_id uuid NOT NULL REFERENCES accounts (id),
    meter      text NOT NULL,
    day        date NOT NULL,
    consumed   bigint NOT NULL DEFAULT 0,
    denied     bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (account_id, meter, day)
);

-- The stored answer of a request with an Idempotency-Key. A request claims its key
-- first (with a JSON null answer, replaced before its transaction commits), so a
-- concurrent duplicate waits on the primary key and then reads the real answer.
CREATE TABLE idempotency_keys (
    scope        text NOT NULL,
    key          text NOT NULL,
    request_hash text NOT NULL,
    response     jsonb NOT NULL,
    created_at   timestamptz NOT NULL,
    PRIMARY KEY (scope, key)
);
