-- Credits and billing: the ledger, payment providers' customers, provider events and
-- payments, and the provider's side of subscriptions.
--
-- Mirrors the SQLite migration of the same name table for table, column for column,
-- with native types (see 0001_identity.sql): uuid, timestamptz, bigint amounts and
-- jsonb metadata.
--
-- Concurrency (writers really run at once here, see `billing.rs`): a transfer locks
-- its account's `credit_balances` row (inserted first if missing) before reading the
-- balance; a provider event is claimed by inserting its primary key, so a concurrent
-- duplicate waits for the claimant and then finds it; a refund locks its payment row.

-- Credits: a double-entry ledger. A transfer moves `amount` into (or, negative, out
-- of) an account's balance from (to) a system ledger account; its two entries sum to
-- zero. `credit_balances` keeps each account's running balance; `ledger_check`
-- compares it with the sum of the account's entries.
CREATE TABLE credit_balances (
    account_id uuid PRIMARY KEY REFERENCES accounts (id),
    balance    bigint NOT NULL,
    updated_at timestamptz NOT NULL
);

CREATE TABLE credit_transfers (
    id              uuid PRIMARY KEY,
    account_id      uuid NOT NULL REFERENCES accounts (id),
    kind            text NOT NULL CHECK (kind IN ('purchase', 'usage', 'bonus', 'refund', 'adjustment', 'expiry', 'reversal')),
    amount          bigint NOT NULL,
    balance_after   bigint NOT NULL,
    description     text,
    endpoint        text,
    metadata        jsonb,
    idempotency_key text,
    actor_type      text NOT NULL,
    actor_id        text,
    payment_id      uuid,
    created_at      timestamptz NOT NULL
);
-- Pages of an account's history, newest first (ids are UUIDv7: time-ordered, and
-- uuid compares byte by byte).
CREATE INDEX credit_transfers_account ON credit_transfers (account_id, id);

CREATE TABLE credit_entries (
    transfer_id    uuid NOT NULL REFERENCES credit_transfers (id),
    -- 'account' (then account_id is set) or a system account: 'purchases', 'usage',
    -- 'bonus', 'refund', 'admin_adjustment', 'expiry'.
    ledger_account text NOT NULL,
    account_id     uuid,
    amount         bigint NOT NULL,
    PRIMARY KEY (transfer_id, ledger_account)
);
CREATE INDEX credit_entries_account ON credit_entries (account_id) WHERE account_id IS NOT NULL;

-- Payment providers' customers, one per account and provider.
CREATE TABLE provider_customers (
    account_id  uuid NOT NULL REFERENCES accounts (id),
    provider    text NOT NULL,
    customer_id text NOT NULL,
    created_at  timestamptz NOT NULL,
    PRIMARY KEY (account_id, provider),
    UNIQUE (provider, customer_id)
);

-- Every provider event, once: the primary key is what makes processing exactly once.
CREATE TABLE provider_events (
    provider    text NOT NULL,
    event_id    text NOT NULL,
    event_type  text NOT NULL,
    created     timestamptz NOT NULL,
    received_at timestamptz NOT NULL,
    outcome     text NOT NULL,
    PRIMARY KEY (provider, event_id)
);

CREATE TABLE payments (
    id                  uuid PRIMARY KEY,
    account_id          uuid NOT NULL REFERENCES accounts (id),
    provider            text NOT NULL,
    kind                text NOT NULL CHECK (kind IN ('credits', 'subscription')),
    provider_payment_id text NOT NULL,
    provider_intent_id  text,
    amount              bigint NOT NULL,
    currency            text NOT NULL,
    status              text NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed', 'refunded', 'partially_refunded')),
    credits             bigint NOT NULL,
    credit_package      text,
    amount_refunded     bigint NOT NULL DEFAULT 0,
    credits_reversed    bigint NOT NULL DEFAULT 0,
    credits_unrecovered bigint NOT NULL DEFAULT 0,
    created_at          timestamptz NOT NULL,
    updated_at          timestamptz NOT NULL,
    UNIQUE (provider, provider_payment_id)
);
CREATE INDEX payments_account ON payments (account_id, created_at);
CREATE INDEX payments_intent ON payments (provider, provider_intent_id);

-- A refund whose payment is not known yet (the provider delivered the refund before
-- the purchase): kept here and applied when the payment arrives.
CREATE TABLE pending_refunds (
    provider           TEXT NOT NULL,
    provider_intent_id TEXT NOT NULL,
    amount_refunded    BIGINT NOT NULL,
    received_at        TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (provider, provider_intent_id)
);

-- A provider's subscription id, and the time of the provider state stored, so that an
-- older event arriving late cannot move the subscription backwards.
ALTER TABLE subscriptions ADD COLUMN provider_subscription_id text;
ALTER TABLE subscriptions ADD COLUMN provider_state_at timestamptz;
