-- Usage counted before the work and settled after it: committed (kept, possibly in
-- part), released (given back) or expired (given back by the server's sweeper).
CREATE TABLE usage_reservations (
    id         BLOB PRIMARY KEY,
    account_id BLOB NOT NULL REFERENCES accounts (id),
    meter      TEXT NOT NULL,
    amount     INTEGER NOT NULL,
    -- The window instances counted in (JSON of tollgate_core::metering::WindowCheck),
    -- so settling gives back to them even after they rolled over.
    windows    TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    status     TEXT NOT NULL CHECK (status IN ('pending', 'committed', 'released', 'expired')),
    created_at INTEGER NOT NULL,
    settled_at INTEGER
);
CREATE INDEX usage_reservations_pending ON usage_reservations (status, expires_at);
