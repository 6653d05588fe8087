-- Leases on concurrency meters.
--
-- Mirrors the SQLite migration of the same name column for column, with native
-- types (see 0001_identity.sql): uuid and timestamptz.

-- Slots of concurrency meters: live while not released and not expired, so a holder
-- that dies frees its slot by itself.
-- Acquires of one (account, meter) take turns on the same transaction-level advisory
-- lock as `consume_usage`, so concurrent acquires never exceed the maximum.
CREATE TABLE usage_leases (
    id          uuid PRIMARY KEY,
    account_id  uuid NOT NULL REFERENCES accounts (id),
    meter       text NOT NULL,
    expires_at  timestamptz NOT NULL,
    released_at timestamptz,
    created_at  timestamptz NOT NULL
);
CREATE INDEX usage_leases_live ON usage_leases (account_id, meter, expires_at);
