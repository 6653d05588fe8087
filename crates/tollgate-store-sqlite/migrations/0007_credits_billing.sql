-- Credits: a double-entry ledger. A transfer moves `amount` into (or, negative, out
-- of) an account's balance from (to) a system ledger account; its two entries sum to
-- zero. `credit_balances` keeps each account's running balance; `ledger_check`
-- compares it with the sum of the account's entries.
CREATE TABLE credit_balances (
    account_id BLOB PRIMARY KEY REFERENCES accounts (id),
    balance    INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);

CREATE TABLE credit_transfers (
    id              BLOB PRIMARY KEY,
    account_id      BLOB NOT NULL REFERENCES accounts (id),
    kind            TEXT NOT NULL CHECK (kind IN ('purchase', 'usage', 'bonus', 'refund', 'adjustment', 'expiry', 'reversal')),
    amount          INTEGER NOT NULL,
    balance_after   INTEGER NOT NULL,
    description     TEXT,
    endpoint        TEXT,
    metadata        TEXT,
    idempotency_key TEXT,
    actor_type      TEXT NOT NULL,
    actor_id        TEXT,
    payment_id      BLOB,
    created_at      INTEGER NOT NULL
);
-- Pages of an account's history, newest first (ids are UUIDv7: time-ordered).
CREATE INDEX credit_transfers_account ON credit_transfers (account_id, id);

CREATE TABLE credit_entries (
    transfer_id    BLOB NOT NULL REFERENCES credit_transfers (id),
    -- 'account' (then account_id is set) or a system account: 'purchases', 'usage',
    -- 'bonus', 'refund', 'admin_adjustment', 'expiry'.
    ledger_account TEXT NOT NULL,
    account_id     BLOB,
    amount         INTEGER NOT NULL,
    PRIMARY KEY (transfer_id, ledger_account)
);
CREATE INDEX credit_entries_account ON credit_entries (account_id) WHERE account_id IS NOT NULL;

-- Payment providers' customers, one per account and provider.
CREATE TABLE provider_customers (
    account_id  BLOB NOT NULL REFERENCES accounts (id),
    provider    TEXT NOT NULL,
    customer_id TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (account_id, provider),
    UNIQUE (provider, customer_id)
);

-- Every provider event, once: the primary key is what makes processing exactly once.
CREATE TABLE provider_events (
    provider    TEXT NOT NULL,
    event_id    TEXT NOT NULL,
    event_type  TEXT NOT NULL,
    created     INTEGER NOT NULL,
    received_at INTEGER NOT NULL,
    outcome     TEXT NOT NULL,
    PRIMARY KEY (provider, event_id)
) WITHOUT ROWID;

CREATE TABLE payments (
    id                  BLOB PRIMARY KEY,
    account_id          BLOB NOT NULL REFERENCES accounts (id),
    provider            TEXT NOT NULL,
    kind                TEXT NOT NULL CHECK (kind IN ('credits', 'subscription')),
    provider_payment_id TEXT NOT NULL,
    provider_intent_id  TEXT,
    amount              INTEGER NOT NULL,
    currency            TEXT NOT NULL,
    status              TEXT NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed', 'refunded', 'partially_refunded')),
    credits             INTEGER NOT NULL,
    credit_package      TEXT,
    amount_refunded     INTEGER NOT NULL DEFAULT 0,
    credits_reversed    INTEGER NOT NULL DEFAULT 0,
    credits_unrecovered INTEGER NOT NULL DEFAULT 0,
    created_at          INTEGER NOT NULL,
    updated_at          INTEGER NOT NULL,
    UNIQUE (provider, provider_payment_id)
);
CREATE INDEX payments_account ON payments (account_id, created_at);
CREATE INDEX payments_intent ON payments (provider, provider_intent_id);

-- A refund whose payment is not known yet (the provider delivered the refund before
-- the purchase): kept here and applied when the payment arrives.
CREATE TABLE pending_refunds (
    provider           TEXT NOT NULL,
    provider_intent_id TEXT NOT NULL,
    amount_refunded    INTEGER NOT NULL,
    received_at        INTEGER NOT NULL,
    PRIMARY KEY (provider, provider_intent_id)
);

-- A provider's subscription id, and the time of the provider state stored, so that an
-- older event arriving late cannot move the subscription backwards.
ALTER TABLE subscriptions ADD COLUMN provider_subscription_id TEXT;
ALTER TABLE subscriptions ADD COLUMN provider_state_at INTEGER;
