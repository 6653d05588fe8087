-- Usage reservations.
--
-- Mirrors the SQLite migration of the same name column for column, with native
-- types (see 0001_identity.sql): uuid, timestamptz, bigint and jsonb.

-- Usage counted before the work and settled after it: committed (kept, possibly in
-- part), released (given back) or expired (given back by the server's sweeper).
-- A settle takes the row with SELECT ... FOR UPDATE inside `consume_usage`, so of two
-- concurrent settles of one reservation the second finds it no longer pending.
CREATE TABLE usage_reservations (
    id         uuid PRIMARY KEY,
    account_id uuid NOT NULL REFERENCES accounts (id),
    meter      text NOT NULL,
    amount     bigint NOT NULL,
    -- The window instances counted in (JSON of tollgate_core::metering::WindowCheck),
    -- so settling gives back to them even after they rolled over.
    windows    jsonb NOT NULL,
    expires_at timestamptz NOT NULL,
    status     text NOT NULL CHECK (status IN ('pending', 'committed', 'released', 'expired')),
    created_at timestamptz NOT NULL,
    settled_at timestamptz
);
CREATE INDEX usage_reservations_pending ON usage_reservations (status, expires_at);
