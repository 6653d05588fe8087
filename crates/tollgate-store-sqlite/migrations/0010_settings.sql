-- Small named values Tollgate keeps for itself, e.g. the digest of the plans file
-- last applied (so a restart with the same file keeps plans edited through the API).
CREATE TABLE settings (
    key        TEXT PRIMARY KEY,
    value      TEXT NOT NULL,
    updated_at INTEGER NOT NULL
);
