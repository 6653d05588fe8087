-- Leases on concurrency meters.

-- Slots of concurrency meters: live while not released and not expired, so a holder
-- that dies frees its slot by itself.
CREATE TABLE usage_leases (
    id          BLOB PRIMARY KEY,
    account_id  BLOB NOT NULL REFERENCES accounts (id),
    meter       TEXT NOT NULL,
    expires_at  INTEGER NOT NULL,
    released_at INTEGER,
    created_at  INTEGER NOT NULL
);
CREATE INDEX usage_leases_live ON usage_leases (account_id, meter, expires_at);
