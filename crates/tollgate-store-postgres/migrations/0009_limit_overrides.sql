-- An admin's per-account limit overrides: one set per account, replaced whole.
-- `limits` maps meter key -> allowance, shaped like a plan's.
CREATE TABLE limit_overrides (
    account_id uuid PRIMARY KEY REFERENCES accounts (id),
    limits     jsonb NOT NULL,
    reason     text NOT NULL,
    expires_at timestamptz,
    set_by     text NOT NULL,
    updated_at timestamptz NOT NULL
);
