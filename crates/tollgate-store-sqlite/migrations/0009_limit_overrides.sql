-- An admin's per-account limit overrides: one set per account, replaced whole.
-- `limits` is JSON: meter key -> allowance, shaped like a plan's.
CREATE TABLE limit_overrides (
    account_id BLOB PRIMARY KEY REFERENCES accounts (id),
    limits     TEXT NOT NULL,
    reason     TEXT NOT NULL,
    expires_at INTEGER,
    set_by     TEXT NOT NULL,
    updated_at INTEGER NOT NULL
);
