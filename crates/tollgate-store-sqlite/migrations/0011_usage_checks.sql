-- SQLite evaluates `x IN ('a', 'b', 'c', ...)` in a CHECK by building an ephemeral
-- B-tree of the list for every row written: on `usage_events`, written by every
-- consume, that was about 8% of the usage writer's CPU per consume (BENCHMARKS.md).
-- The same constraints as OR chains, which compare in place. Tables written by the
-- hot path only; the rest keep their IN lists. PostgreSQL has nothing to change.
CREATE TABLE usage_events_new (
    id              BLOB NOT NULL,
    account_id      BLOB NOT NULL REFERENCES accounts (id),
    meter           TEXT NOT NULL,
    outcome         TEXT NOT NULL CHECK (outcome = 'consumed' OR outcome = 'denied' OR outcome = 'released'
                                         OR outcome = 'refunded'),
    amount          INTEGER NOT NULL,
    idempotency_key TEXT,
    endpoint        TEXT,
    metadata        TEXT,
    ip              TEXT,
    created_at      INTEGER NOT NULL
);
INSERT INTO usage_events_new (id, account_id, meter, outcome, amount, idempotency_key, endpoint, metadata, ip, created_at)
    SELECT id, account_id, meter, outcome, amount, idempotency_key, endpoint, metadata, ip, created_at FROM usage_events;
DROP TABLE usage_events;
ALTER TABLE usage_events_new RENAME TO usage_events;
CREATE INDEX usage_events_account ON usage_events (account_id, created_at);

CREATE TABLE usage_reservations_new (
    id         BLOB PRIMARY KEY,
    account_id BLOB NOT NULL REFERENCES accounts (id),
    meter      TEXT NOT NULL,
    amount     INTEGER NOT NULL,
    -- The window instances counted in (JSON of tollgate_core::metering::WindowCheck),
    -- so settling gives back to them even after they rolled over.
    windows    TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    status     TEXT NOT NULL CHECK (status = 'pending' OR status = 'committed' OR status = 'released'
                                    OR status = 'expired'),
    created_at INTEGER NOT NULL,
    settled_at INTEGER
);
INSERT INTO usage_reservations_new (id, account_id, meter, amount, windows, expires_at, status, created_at, settled_at)
    SELECT id, account_id, meter, amount, windows, expires_at, status, created_at, settled_at FROM usage_reservations;
DROP TABLE usage_reservations;
ALTER TABLE usage_reservations_new RENAME TO usage_reservations;
CREATE INDEX usage_reservations_pending ON usage_reservations (status, expires_at);
