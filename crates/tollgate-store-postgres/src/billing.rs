//! Credits and billing on PostgreSQL: the ledger, provider customers, provider events
//! and payments (the `BillingStore` impl in `store.rs` delegates here).
//!
//! Writers really run concurrently here (READ COMMITTED, a pool of connections), so
//! each rule that SQLite gets from its single writer is made explicit:
//! - a transfer locks its account's `credit_balances` row (inserted first when
//!   missing, `ON CONFLICT DO NOTHING`, then `SELECT ... FOR UPDATE`) before reading
//!   the balance, and keeps the lock until it commits the transfer, its entries and the
//!   new balance: concurrent debits of one account take turns, each reading the
//!   balance the previous one committed, so none goes below its floor;
//! - a transfer's idempotency key is claimed before that lock (as for consumes, see
//!   `usage::claim_idempotency_key_raw`): a concurrent duplicate's claim waits on the
//!   key's primary key until the first request commits (then replays its receipt) or
//!   rolls back (then runs itself), so a duplicate never surfaces as a unique
//!   violation and never writes a second transfer;
//! - a provider event is claimed by inserting its `(provider, id)` with
//!   `ON CONFLICT DO NOTHING`: a concurrent delivery of the same event waits on the
//!   primary key until the first commits, then finds it (`Duplicate`);
//! - a subscription's read-decide-write holds the row's lock (`FOR UPDATE`), so two
//!   events for one account, or an event and a `put_subscription`, take turns;
//! - a refund locks its payment row before reading what was already refunded;
//! - linking a provider customer is `INSERT ... ON CONFLICT DO NOTHING` then a read:
//!   the second of two racing links waits for the first, does nothing, and reads the
//!   first one's customer.
//!
//! Locks are always taken in the order event claim → payment → subscription or
//! balance (and idempotency key → balance for transfers), so these transactions
//! cannot deadlock one another.

use serde_json::Value;
use sqlx::postgres::{PgConnection, PgRow};
use sqlx::types::Json;
use tollgate_core::accounts::Subscription;
use tollgate_core::billing::{
    self, BillingEffect, BillingOutcome, Payment, PaymentKind, PaymentStatus, ProviderEvent, ProviderSubscription,
};
use tollgate_core::credits::{
    self, CreditBalance, CreditKind, CreditReceipt, CreditTransaction, CreditTransfer, LedgerCheck, TransactionQuery,
};
use tollgate_core::email::NewEmail;
use tollgate_core::ids::{AccountId, CreditTransferId, PaymentId};
use tollgate_core::{StoreError, Timestamp};
use uuid::Uuid;

use crate::rows::get;
use crate::store::{insert_audit, insert_email};
use crate::usage::{claim_idempotency_key_raw, subscription_in, write_subscription};
use crate::{PgStore, db_error};

fn json_err(e: serde_json::Error) -> StoreError {
    StoreError::Internal(format!("stored JSON: {e}"))
}

pub(crate) async fn transfer_credits(store: &PgStore, t: CreditTransfer) -> Result<CreditReceipt, StoreError> {
    let mut tx = store.pool.begin().await.map_err(db_error)?;
    let receipt = transfer_in(&mut tx, &t).await?;
    // A replay wrote nothing (its claim attempt conflicted): rolled back on drop.
    if !receipt.replayed {
        tx.commit().await.map_err(db_error)?;
    }
    Ok(receipt)
}

/// The transfer inside the caller's transaction (the caller commits; an error leaves
/// the transaction to be rolled back).
pub(crate) async fn transfer_in(conn: &mut PgConnection, t: &CreditTransfer) -> Result<CreditReceipt, StoreError> {
    // The key first, before the balance lock: a duplicate waiting on it holds nothing.
    if let Some(idem) = &t.idempotency
        && let Some(stored) = claim_idempotency_key_raw(&mut *conn, idem, t.now).await?
    {
        let mut receipt: CreditReceipt = serde_json::from_value(stored).map_err(json_err)?;
        receipt.replayed = true;
        return Ok(receipt);
    }
    // The account's balance row, created at zero for an account that never had
    // credits (none for an unknown account), so that there is always a row to lock.
    // A concurrent first insert makes this one wait for it, then do nothing.
    sqlx::query(
        "INSERT INTO credit_balances (account_id, balance, updated_at) \
         SELECT $1, 0, $2 WHERE EXISTS (SELECT 1 FROM accounts WHERE id = $1) \
         ON CONFLICT (account_id) DO NOTHING",
    )
    .bind(t.account.0)
    .bind(t.now)
    .execute(&mut *conn)
    .await
    .map_err(db_error)?;
    // Locked until commit: a concurrent transfer of this account waits here, then reads
    // the balance as this one committed it.
    let balance: i64 = sqlx::query_scalar("SELECT balance FROM credit_balances WHERE account_id = $1 FOR UPDATE")
        .bind(t.account.0)
        .fetch_optional(&mut *conn)
        .await
        .map_err(db_error)?
        .ok_or(StoreError::NotFound)?;
    let amount = credits::allowed_amount(balance, t.amount, t.floor, t.shortfall)
        .ok_or(StoreError::Conflict("insufficient_credits"))?;
    let after = balance.checked_add(amount).ok_or(StoreError::Conflict("credits_overflow"))?;
    let receipt = CreditReceipt {
        transaction: CreditTransaction {
            id: t.id,
            account_id: t.account,
            kind: t.kind,
            amount,
            balance_after: after,
            description: t.description.clone(),
            endpoint: t.endpoint.clone(),
            metadata: t.metadata.clone(),
            payment_id: t.payment,
            created_at: t.now,
        },
        shortfall: amount - t.amount,
        replayed: false,
    };
    // One statement for the transfer, its two entries (the account's side and the
    // system account's, summing to zero), the running balance and the key's answer,
    // to hold the balance lock for as few round trips as possible.
    let answered: i64 = sqlx::query_scalar(
        "WITH transfer AS ( \
           INSERT INTO credit_transfers (id, account_id, kind, amount, balance_after, description, endpoint, metadata, \
             idempotency_key, actor_type, actor_id, payment_id, created_at) \
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) \
         ), entries AS ( \
           INSERT INTO credit_entries (transfer_id, ledger_account, account_id, amount) \
           VALUES ($1, 'account', $2, $4), ($1, $14, NULL, -($4::bigint)) \
         ), balance AS ( \
           UPDATE credit_balances SET balance = $5, updated_at = $13 WHERE account_id = $2 \
         ), answer AS ( \
           UPDATE idempotency_keys SET response = $16 WHERE scope = $15 AND key = $9 RETURNING 1 \
         ) \
         SELECT COUNT(*) FROM answer",
    )
    .bind(t.id.0)
    .bind(t.account.0)
    .bind(t.kind.as_str())
    .bind(amount)
    .bind(after)
    .bind(&t.description)
    .bind(&t.endpoint)
    .bind(t.metadata.as_ref().map(Json))
    .bind(t.idempotency.as_ref().map(|i| i.key.as_str()))
    .bind(t.actor.kind())
    .bind(t.actor.id())
    .bind(t.payment.map(|p| p.0))
    .bind(t.now)
    .bind(t.kind.system_account())
    .bind(t.idempotency.as_ref().map(|i| i.scope.as_str()))
    .bind(t.idempotency.as_ref().map(|_| Json(&receipt)))
    .fetch_one(&mut *conn)
    .await
    .map_err(db_error)?;
    if answered != i64::from(t.idempotency.is_some()) {
        return Err(StoreError::Internal("idempotency claim lost before its answer was stored".into()));
    }
    if let Some(audit) = &t.audit {
        insert_audit(conn, audit).await?;
    }
    Ok(receipt)
}

pub(crate) async fn credit_balance(store: &PgStore, account: AccountId) -> Result<CreditBalance, StoreError> {
    // One statement, so one snapshot: the balance and the totals agree.
    let rows: Vec<(Option<String>, i64)> = sqlx::query_as(
        "SELECT NULL::text, balance FROM credit_balances WHERE account_id = $1 \
         UNION ALL SELECT kind, SUM(amount)::bigint FROM credit_transfers WHERE account_id = $1 GROUP BY kind",
    )
    .bind(account.0)
    .fetch_all(&store.pool)
    .await
    .map_err(db_error)?;
    let balance = rows.iter().find(|(kind, _)| kind.is_none()).map_or(0, |(_, b)| *b);
    let sum = |kind: CreditKind| {
        rows.iter().filter(|(k, _)| k.as_deref() == Some(kind.as_str())).map(|(_, v)| *v).sum::<i64>()
    };
    // Purchases net of reversals, spending net of refunds, bonuses.
    Ok(CreditBalance {
        balance,
        purchased: sum(CreditKind::Purchase) + sum(CreditKind::Reversal),
        used: -(sum(CreditKind::Usage) + sum(CreditKind::Refund)),
        granted: sum(CreditKind::Bonus),
    })
}

fn transaction(row: &PgRow) -> Result<CreditTransaction, StoreError> {
    let kind: String = get(row, "kind")?;
    let metadata: Option<Json<Value>> = get(row, "metadata")?;
    Ok(CreditTransaction {
        id: CreditTransferId(get::<Uuid>(row, "id")?),
        account_id: AccountId(get::<Uuid>(row, "account_id")?),
        kind: CreditKind::parse(&kind).ok_or_else(|| StoreError::Internal(format!("credit kind {kind:?}")))?,
        amount: get(row, "amount")?,
        balance_after: get(row, "balance_after")?,
        description: get(row, "description")?,
        endpoint: get(row, "endpoint")?,
        metadata: metadata.map(|Json(m)| m),
        payment_id: get::<Option<Uuid>>(row, "payment_id")?.map(PaymentId),
        created_at: get(row, "created_at")?,
    })
}

pub(crate) async fn credit_transactions(
    store: &PgStore,
    account: AccountId,
    query: TransactionQuery,
) -> Result<Vec<CreditTransaction>, StoreError> {
    // Ids are UUIDv7 and uuid compares byte by byte, so id order is time order;
    // `before` pages without offsets.
    let rows = sqlx::query(
        "SELECT id, account_id, kind, amount, balance_after, description, endpoint, metadata, payment_id, created_at \
         FROM credit_transfers WHERE account_id = $1 AND ($2::text IS NULL OR kind = $2) AND ($3::uuid IS NULL OR id < $3) \
         ORDER BY id DESC LIMIT $4",
    )
    .bind(account.0)
    .bind(query.kind.map(|k| k.as_str()))
    .bind(query.before.map(|b| b.0))
    .bind(i64::from(query.limit))
    .fetch_all(&store.pool)
    .await
    .map_err(db_error)?;
    rows.iter().map(transaction).collect()
}

pub(crate) async fn ledger_check(store: &PgStore) -> Result<LedgerCheck, StoreError> {
    // One statement, so one snapshot: no transfer half-seen while others commit.
    let (transfers, unbalanced, mismatched): (i64, i64, i64) = sqlx::query_as(
        "SELECT \
           (SELECT COUNT(*) FROM credit_transfers), \
           (SELECT COUNT(*) FROM credit_transfers t WHERE \
              (SELECT COUNT(*) FROM credit_entries e WHERE e.transfer_id = t.id) <> 2 \
              OR (SELECT SUM(amount) FROM credit_entries e WHERE e.transfer_id = t.id) <> 0 \
              OR (SELECT amount FROM credit_entries e WHERE e.transfer_id = t.id AND e.ledger_account = 'account') \
                 IS DISTINCT FROM t.amount), \
           (SELECT COUNT(*) FROM credit_balances b WHERE b.balance <> \
              (SELECT COALESCE(SUM(amount), 0) FROM credit_entries e WHERE e.account_id = b.account_id))",
    )
    .fetch_one(&store.pool)
    .await
    .map_err(db_error)?;
    Ok(LedgerCheck {
        transfers: transfers as u64,
        unbalanced_transfers: unbalanced as u64,
        mismatched_balances: mismatched as u64,
    })
}

pub(crate) async fn provider_customer(
    store: &PgStore,
    account: AccountId,
    provider: &str,
) -> Result<Option<String>, StoreError> {
    sqlx::query_scalar("SELECT customer_id FROM provider_customers WHERE account_id = $1 AND provider = $2")
        .bind(account.0)
        .bind(provider)
        .fetch_optional(&store.pool)
        .await
        .map_err(db_error)
}

pub(crate) async fn link_provider_customer(
    store: &PgStore,
    account: AccountId,
    provider: &str,
    customer: &str,
) -> Result<String, StoreError> {
    let mut tx = store.pool.begin().await.map_err(db_error)?;
    // A concurrent link of the same (account, provider) makes this insert wait for it
    // to commit, then do nothing; the SELECT (a new snapshot under READ COMMITTED)
    // reads the first one's customer. An unknown account fails the foreign key
    // (`NotFound`).
    sqlx::query(
        "INSERT INTO provider_customers (account_id, provider, customer_id, created_at) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (account_id, provider) DO NOTHING",
    )
    .bind(account.0)
    .bind(provider)
    .bind(customer)
    .bind(time::OffsetDateTime::now_utc())
    .execute(&mut *tx)
    .await
    .map_err(db_error)?;
    let linked: String =
        sqlx::query_scalar("SELECT customer_id FROM provider_customers WHERE account_id = $1 AND provider = $2")
            .bind(account.0)
            .bind(provider)
            .fetch_one(&mut *tx)
            .await
            .map_err(db_error)?;
    tx.commit().await.map_err(db_error)?;
    Ok(linked)
}

pub(crate) async fn account_by_provider_customer(
    store: &PgStore,
    provider: &str,
    customer: &str,
) -> Result<Option<AccountId>, StoreError> {
    let id: Option<Uuid> =
        sqlx::query_scalar("SELECT account_id FROM provider_customers WHERE provider = $1 AND customer_id = $2")
            .bind(provider)
            .bind(customer)
            .fetch_optional(&store.pool)
            .await
            .map_err(db_error)?;
    Ok(id.map(AccountId))
}

pub(crate) async fn apply_billing_event(
    store: &PgStore,
    event: ProviderEvent,
    effect: BillingEffect,
    email: Option<NewEmail>,
) -> Result<BillingOutcome, StoreError> {
    let mut tx = store.pool.begin().await.map_err(db_error)?;
    // Claim the event id first: a second delivery finds it and does nothing. A
    // concurrent one waits here on the primary key until this transaction ends: after
    // a commit it conflicts (`Duplicate`), after a rollback it claims the id itself.
    let claimed = sqlx::query(
        "INSERT INTO provider_events (provider, event_id, event_type, created, received_at, outcome) \
         VALUES ($1, $2, $3, $4, $5, 'applied') ON CONFLICT (provider, event_id) DO NOTHING",
    )
    .bind(&event.provider)
    .bind(&event.id)
    .bind(&event.event_type)
    .bind(event.created)
    .bind(event.received_at)
    .execute(&mut *tx)
    .await
    .map_err(db_error)?;
    if claimed.rows_affected() == 0 {
        // Rolled back on drop: nothing was written.
        return Ok(BillingOutcome::Duplicate);
    }
    let mut changed_subscription = None;
    let outcome = match effect {
        BillingEffect::Nothing => BillingOutcome::Ignored,
        BillingEffect::CreditsPurchased { payment } => credits_purchased(&mut tx, &event, &payment).await?,
        BillingEffect::Subscription(state) => {
            let (outcome, changed) = provider_subscription(&mut tx, &event, &state).await?;
            changed_subscription = changed;
            outcome
        }
        BillingEffect::Invoice { payment, provider_subscription_id, at } => {
            let (outcome, changed) =
                invoice(&mut tx, &event, &payment, provider_subscription_id.as_deref(), at).await?;
            changed_subscription = changed;
            outcome
        }
        BillingEffect::Refunded { provider_intent_id, amount_refunded } => {
            refunded(&mut tx, &event, &provider_intent_id, amount_refunded).await?
        }
    };
    if outcome != BillingOutcome::Applied {
        let recorded = if outcome == BillingOutcome::Deferred { "deferred" } else { "ignored" };
        sqlx::query("UPDATE provider_events SET outcome = $3 WHERE provider = $1 AND event_id = $2")
            .bind(&event.provider)
            .bind(&event.id)
            .bind(recorded)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
    } else if let Some(email) = &email {
        insert_email(&mut tx, email).await?;
    }
    tx.commit().await.map_err(db_error)?;
    // This node's own change, as `put_subscription` records it.
    if let Some(subscription) = changed_subscription {
        store.cache.store_subscription(subscription.account_id, subscription);
    }
    Ok(outcome)
}

/// Records a payment unless one of the same `(provider, provider_payment_id)` exists;
/// true when inserted. A concurrent insert of the same payment makes this one wait
/// for it, then do nothing.
async fn insert_payment(conn: &mut PgConnection, p: &Payment) -> Result<bool, StoreError> {
    let inserted = sqlx::query(
        "INSERT INTO payments (id, account_id, provider, kind, provider_payment_id, provider_intent_id, amount, currency, \
           status, credits, credit_package, amount_refunded, credits_reversed, credits_unrecovered, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 0, 0, 0, $12, $12) \
         ON CONFLICT (provider, provider_payment_id) DO NOTHING",
    )
    .bind(p.id.0)
    .bind(p.account_id.0)
    .bind(&p.provider)
    .bind(p.kind.as_str())
    .bind(&p.provider_payment_id)
    .bind(&p.provider_intent_id)
    .bind(p.amount)
    .bind(&p.currency)
    .bind(p.status.as_str())
    .bind(p.credits)
    .bind(&p.credit_package)
    .bind(p.created_at)
    .execute(&mut *conn)
    .await
    .map_err(db_error)?;
    Ok(inserted.rows_affected() > 0)
}

/// Serialises a payment's purchase with its refunds by the provider's intent id, so
/// that a refund delivered before its purchase is either seen by the purchase (kept in
/// `pending_refunds`) or sees the payment: never neither.
async fn lock_intent(conn: &mut PgConnection, provider: &str, intent: &str) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(format!("refund:{provider}:{intent}"))
        .execute(&mut *conn)
        .await
        .map_err(db_error)?;
    Ok(())
}

/// Records the payment and grants its credits, once per payment: another event about
/// the same checkout (a retry under a new event id) finds the payment and grants nothing.
async fn credits_purchased(
    conn: &mut PgConnection,
    event: &ProviderEvent,
    payment: &Payment,
) -> Result<BillingOutcome, StoreError> {
    if let Some(intent) = &payment.provider_intent_id {
        lock_intent(conn, &payment.provider, intent).await?;
    }
    if !insert_payment(conn, payment).await? {
        return Ok(BillingOutcome::Ignored);
    }
    transfer_in(conn, &CreditTransfer::purchase(payment)).await?;
    // A refund that arrived before this purchase applies now.
    if let Some(intent) = &payment.provider_intent_id {
        let pending: Option<i64> = sqlx::query_scalar(
            "DELETE FROM pending_refunds WHERE provider = $1 AND provider_intent_id = $2 RETURNING amount_refunded",
        )
        .bind(&payment.provider)
        .bind(intent)
        .fetch_optional(&mut *conn)
        .await
        .map_err(db_error)?;
        if let Some(amount_refunded) = pending {
            refunded(conn, event, intent, amount_refunded).await?;
        }
    }
    Ok(BillingOutcome::Applied)
}

/// Applies a provider's subscription state unless what is stored is newer.
async fn provider_subscription(
    conn: &mut PgConnection,
    event: &ProviderEvent,
    state: &ProviderSubscription,
) -> Result<(BillingOutcome, Option<Subscription>), StoreError> {
    // Twice at most: a first attempt finding no row can lose to a concurrent first
    // write (another event, or `put_subscription`). Its refused upsert waited for that
    // write to commit and locked the row, so the second attempt reads it and decides
    // against it; with a row to lock, the write cannot be refused.
    for _ in 0..2 {
        // Locked until commit: another event for this account (or a
        // `put_subscription`) waits, then sees what this one wrote.
        let stored = subscription_in(conn, state.account, true).await?;
        let Some(next) = billing::subscription_from_state(stored.as_ref(), &event.provider, state, event.received_at)
        else {
            return Ok((BillingOutcome::Ignored, None));
        };
        let previous = stored.as_ref().map(|s| s.updated_at);
        if write_subscription(conn, &next, previous).await? {
            return Ok((BillingOutcome::Applied, Some(next)));
        }
        if stored.is_some() {
            break;
        }
    }
    Err(StoreError::Internal("subscription changed while locked by its own transaction".into()))
}

/// Records an invoice payment (a failure never overwrites a success of the same
/// invoice) and moves the subscription: failed → `past_due`, paid → `active`, unless a
/// newer provider state is stored.
async fn invoice(
    conn: &mut PgConnection,
    event: &ProviderEvent,
    payment: &Payment,
    provider_subscription_id: Option<&str>,
    at: Timestamp,
) -> Result<(BillingOutcome, Option<Subscription>), StoreError> {
    if !insert_payment(conn, payment).await? && payment.status == PaymentStatus::Succeeded {
        // The row lock this UPDATE takes re-checks the status as a concurrent writer
        // committed it.
        sqlx::query(
            "UPDATE payments SET status = 'succeeded', amount = $3, updated_at = $4 \
             WHERE provider = $1 AND provider_payment_id = $2 AND status IN ('pending', 'failed')",
        )
        .bind(&payment.provider)
        .bind(&payment.provider_payment_id)
        .bind(payment.amount)
        .bind(payment.updated_at)
        .execute(&mut *conn)
        .await
        .map_err(db_error)?;
    }
    let Some(provider_subscription_id) = provider_subscription_id else { return Ok((BillingOutcome::Applied, None)) };
    // Locked until commit, as in `provider_subscription`.
    let Some(stored) = subscription_in(conn, payment.account_id, true).await? else {
        return Ok((BillingOutcome::Applied, None));
    };
    let next =
        billing::subscription_after_invoice(&stored, provider_subscription_id, payment.status, at, event.received_at);
    let Some(next) = next else { return Ok((BillingOutcome::Applied, None)) };
    if !write_subscription(conn, &next, Some(stored.updated_at)).await? {
        return Err(StoreError::Internal("subscription changed while locked by its own transaction".into()));
    }
    Ok((BillingOutcome::Applied, Some(next)))
}

/// Takes back a refunded payment's credits in proportion, as far as the balance
/// allows (to zero; an overdraft is not extended by a refund), and records the rest.
async fn refunded(
    conn: &mut PgConnection,
    event: &ProviderEvent,
    provider_intent_id: &str,
    amount_refunded: i64,
) -> Result<BillingOutcome, StoreError> {
    lock_intent(conn, &event.provider, provider_intent_id).await?;
    // Locked until commit: two refund events of one payment take turns, the second
    // reading the totals the first wrote.
    let row = sqlx::query(
        "SELECT id, account_id, amount, credits, amount_refunded, credits_reversed, credits_unrecovered FROM payments \
         WHERE provider = $1 AND provider_intent_id = $2 ORDER BY created_at, id LIMIT 1 FOR UPDATE",
    )
    .bind(&event.provider)
    .bind(provider_intent_id)
    .fetch_optional(&mut *conn)
    .await
    .map_err(db_error)?;
    let Some(row) = row else {
        // Not known yet (delivered before its purchase): kept, the largest total wins.
        sqlx::query(
            "INSERT INTO pending_refunds (provider, provider_intent_id, amount_refunded, received_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (provider, provider_intent_id) \
             DO UPDATE SET amount_refunded = GREATEST(pending_refunds.amount_refunded, excluded.amount_refunded)",
        )
        .bind(&event.provider)
        .bind(provider_intent_id)
        .bind(amount_refunded)
        .bind(event.received_at)
        .execute(&mut *conn)
        .await
        .map_err(db_error)?;
        return Ok(BillingOutcome::Deferred);
    };
    let id = PaymentId(get::<Uuid>(&row, "id")?);
    let account = AccountId(get::<Uuid>(&row, "account_id")?);
    let amount: i64 = get(&row, "amount")?;
    let credits: i64 = get(&row, "credits")?;
    let stored_refunded: i64 = get(&row, "amount_refunded")?;
    let reversed: i64 = get(&row, "credits_reversed")?;
    let unrecovered: i64 = get(&row, "credits_unrecovered")?;
    // Refund totals only grow; an older event (a smaller total) changes nothing.
    if amount_refunded <= stored_refunded {
        return Ok(BillingOutcome::Ignored);
    }
    let due = billing::credits_to_reverse(credits, amount, amount_refunded, reversed + unrecovered);
    let mut taken = 0;
    if due > 0 {
        let reversal = CreditTransfer::reversal(account, id, due, event);
        taken = -transfer_in(conn, &reversal).await?.transaction.amount;
    }
    let status = if amount_refunded >= amount { PaymentStatus::Refunded } else { PaymentStatus::PartiallyRefunded };
    sqlx::query(
        "UPDATE payments SET amount_refunded = $2, credits_reversed = credits_reversed + $3, \
           credits_unrecovered = credits_unrecovered + $4, status = $5, updated_at = $6 WHERE id = $1",
    )
    .bind(id.0)
    .bind(amount_refunded.min(amount))
    .bind(taken)
    .bind(due - taken)
    .bind(status.as_str())
    .bind(event.received_at)
    .execute(&mut *conn)
    .await
    .map_err(db_error)?;
    Ok(BillingOutcome::Applied)
}

pub(crate) fn payment(row: &PgRow) -> Result<Payment, StoreError> {
    let kind: String = get(row, "kind")?;
    let status: String = get(row, "status")?;
    Ok(Payment {
        id: PaymentId(get::<Uuid>(row, "id")?),
        account_id: AccountId(get::<Uuid>(row, "account_id")?),
        provider: get(row, "provider")?,
        kind: PaymentKind::parse(&kind).ok_or_else(|| StoreError::Internal(format!("payment kind {kind:?}")))?,
        provider_payment_id: get(row, "provider_payment_id")?,
        provider_intent_id: get(row, "provider_intent_id")?,
        amount: get(row, "amount")?,
        currency: get(row, "currency")?,
        status: PaymentStatus::parse(&status)
            .ok_or_else(|| StoreError::Internal(format!("payment status {status:?}")))?,
        credits: get(row, "credits")?,
        credit_package: get(row, "credit_package")?,
        amount_refunded: get(row, "amount_refunded")?,
        credits_reversed: get(row, "credits_reversed")?,
        credits_unrecovered: get(row, "credits_unrecovered")?,
        created_at: get(row, "created_at")?,
        updated_at: get(row, "updated_at")?,
    })
}

pub(crate) async fn payments(
    store: &PgStore,
    account: Option<AccountId>,
    limit: u32,
) -> Result<Vec<Payment>, StoreError> {
    let rows = sqlx::query(
        "SELECT id, account_id, provider, kind, provider_payment_id, provider_intent_id, amount, currency, status, \
           credits, credit_package, amount_refunded, credits_reversed, credits_unrecovered, created_at, updated_at \
         FROM payments WHERE ($1::uuid IS NULL OR account_id = $1) ORDER BY created_at DESC, id DESC LIMIT $2",
    )
    .bind(account.map(|a| a.0))
    .bind(i64::from(limit))
    .fetch_all(&store.pool)
    .await
    .map_err(db_error)?;
    rows.iter().map(payment).collect()
}

/// Races the conformance suite cannot stage: several nodes (stores with pools of their
/// own) on one database, and first writes racing where there is no row to lock yet.
#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use time::Duration;
    use tollgate_core::Store;
    use tollgate_core::accounts::{NewExternalAccount, Subscription, SubscriptionStatus};
    use tollgate_core::audit::{Actor, AuditEvent, RequestOrigin};
    use tollgate_core::billing::{
        BillingEffect, BillingOutcome, Payment, PaymentKind, PaymentStatus, ProviderEvent, ProviderSubscription,
    };
    use tollgate_core::conformance::t0;
    use tollgate_core::credits::{CreditKind, CreditTransfer};
    use tollgate_core::ids::{AccountId, PaymentId};
    use tollgate_core::metering::Idempotency;
    use tollgate_core::store::BillingStore;
    use tollgate_core::{StoreError, Timestamp};

    use crate::PgStore;
    use crate::testing::TestDatabase;

    async fn nodes(database: &TestDatabase, n: usize) -> Vec<Arc<PgStore>> {
        let mut stores = Vec::new();
        for _ in 0..n {
            stores.push(Arc::new(PgStore::connect_with(database.options.clone()).await.unwrap()));
        }
        stores
    }

    async fn close(stores: Vec<Arc<PgStore>>, database: TestDatabase) {
        for store in stores {
            store.close().await;
        }
        database.drop().await;
    }

    async fn account(store: &PgStore, external_id: &str) -> AccountId {
        let new = NewExternalAccount {
            id: AccountId::new(),
            external_id: external_id.into(),
            name: None,
            email: None,
            created_at: t0(),
        };
        store.upsert_external_account(new).await.unwrap().0.id
    }

    fn event(id: String, at: Timestamp) -> ProviderEvent {
        ProviderEvent { provider: "stripe".into(), id, event_type: "test".into(), created: at, received_at: t0() }
    }

    fn state(account: AccountId, status: SubscriptionStatus, at: Timestamp) -> BillingEffect {
        BillingEffect::Subscription(ProviderSubscription {
            account,
            provider_subscription_id: "sub_1".into(),
            plan: "pro".into(),
            status,
            started_at: t0(),
            trial_ends_at: None,
            cancel_at_period_end: false,
            cancel_at: None,
            at,
        })
    }

    /// Two nodes debit one account at once, half of the requests under shared keys:
    /// the balance never goes below zero, every key makes one transfer, and the ledger
    /// balances.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn two_nodes_spend_one_balance() {
        let Some(database) = TestDatabase::create().await else { return };
        let stores = nodes(&database, 2).await;
        let a = account(&stores[0], "two-nodes").await;
        let grant = CreditTransfer::new(a, CreditKind::Purchase, 300, Actor::System, t0());
        stores[0].transfer_credits(grant).await.unwrap();
        let mut tasks = Vec::new();
        for i in 0..40 {
            let store = stores[i % 2].clone();
            tasks.push(tokio::spawn(async move {
                let mut receipts = Vec::new();
                for j in 0..10 {
                    let mut spend = CreditTransfer::new(a, CreditKind::Usage, -2, Actor::System, t0());
                    if j % 2 == 0 {
                        // The same key from tasks 2k and 2k+1, one on each node.
                        spend.idempotency = Some(Idempotency {
                            scope: "svc:race".into(),
                            key: format!("k{}-{j}", i / 2),
                            request_hash: "h".into(),
                        });
                    }
                    match store.transfer_credits(spend).await {
                        Ok(receipt) => receipts.push((j % 2 == 0, i / 2, j, receipt)),
                        Err(StoreError::Conflict("insufficient_credits")) => {}
                        Err(e) => panic!("{e:?}"),
                    }
                }
                receipts
            }));
        }
        let mut receipts = Vec::new();
        for task in tasks {
            receipts.extend(task.await.unwrap());
        }
        let mut transfers: Vec<_> = receipts.iter().map(|(_, _, _, r)| r.transaction.id).collect();
        transfers.sort();
        transfers.dedup();
        for (keyed, pair, j, receipt) in &receipts {
            assert!(receipt.transaction.balance_after >= 0);
            if *keyed {
                let same: Vec<_> = receipts
                    .iter()
                    .filter(|(k, p, jj, _)| *k && p == pair && jj == j)
                    .map(|r| r.3.transaction.id)
                    .collect();
                assert!(same.iter().all(|id| *id == receipt.transaction.id), "one transfer per key");
            }
        }
        let left = stores[1].credit_balance(a).await.unwrap().balance;
        assert_eq!(left, 300 - 2 * transfers.len() as i64);
        assert_eq!(left, 0, "300 distinct spends of 2 drain 300 credits");
        assert!(stores[0].ledger_check().await.unwrap().is_sound());
        close(stores, database).await;
    }

    /// The first subscription of an account, written by racing events on two nodes
    /// (there is no row to lock yet): no error, and the newest state stands.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn first_subscription_events_race_without_errors() {
        let Some(database) = TestDatabase::create().await else { return };
        let stores = nodes(&database, 2).await;
        let base = t0();
        for round in 0..5 {
            let a = account(&stores[0], &format!("race-{round}")).await;
            let start = Arc::new(tokio::sync::Barrier::new(8));
            let tasks: Vec<_> = (0..8i64)
                .map(|i| {
                    let (store, start) = (stores[i as usize % 2].clone(), start.clone());
                    let at = base + Duration::seconds(i);
                    tokio::spawn(async move {
                        start.wait().await;
                        let effect = state(a, SubscriptionStatus::Active, at);
                        store.apply_billing_event(event(format!("evt-{round}-{i}"), at), effect, None).await
                    })
                })
                .collect();
            for task in tasks {
                let outcome = task.await.unwrap().unwrap();
                assert!(matches!(outcome, BillingOutcome::Applied | BillingOutcome::Ignored), "{outcome:?}");
            }
            // Read on a third node: the two others' caches may hold their own last
            // write for up to `SUBSCRIPTION_TTL`.
            let fresh = PgStore::connect_with(database.options.clone()).await.unwrap();
            let stored = fresh.subscription(a).await.unwrap().unwrap();
            assert_eq!(stored.provider_state_at, Some(base + Duration::seconds(7)), "the newest state stands");
            fresh.close().await;
        }
        close(stores, database).await;
    }

    /// A `put_subscription` and a provider event racing on a subscription: the event
    /// waits for the row lock or the put is refused, never both applied blindly.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn events_and_puts_take_turns_on_the_row() {
        let Some(database) = TestDatabase::create().await else { return };
        let stores = nodes(&database, 2).await;
        let a = account(&stores[0], "put-race").await;
        let t = t0();
        stores[0]
            .apply_billing_event(event("first".into(), t), state(a, SubscriptionStatus::Active, t), None)
            .await
            .unwrap();
        let base = stores[1].subscription(a).await.unwrap().unwrap();
        let put = {
            let store = stores[1].clone();
            let mut changed: Subscription = base.clone();
            changed.plan = "max".into();
            changed.updated_at = base.updated_at + Duration::seconds(1);
            let audit = AuditEvent::new(Actor::System, "subscription.changed", &RequestOrigin::default(), t);
            tokio::spawn(async move { store.put_subscription(changed, Some(base.updated_at), audit).await })
        };
        let later = t + Duration::seconds(5);
        let past_due = stores[0]
            .apply_billing_event(event("second".into(), later), state(a, SubscriptionStatus::PastDue, later), None)
            .await
            .unwrap();
        assert_eq!(past_due, BillingOutcome::Applied);
        let put = put.await.unwrap();
        let stored = stores[0].subscription(a).await.unwrap().unwrap();
        assert_eq!(stored.status, SubscriptionStatus::PastDue, "the event applied in any order");
        match put {
            // The put ran first: the event read its plan, then replaced it with the
            // provider's (a provider state is the whole subscription).
            Ok(()) => assert_eq!(stored.plan, "pro"),
            Err(StoreError::Conflict("subscription_changed")) => assert_eq!(stored.plan, "pro"),
            Err(e) => panic!("{e:?}"),
        }
        assert_eq!(stored.provider_state_at, Some(later));
        close(stores, database).await;
    }

    /// Partial refunds of one payment delivered at once on two nodes: each total is
    /// applied in turn, the credits taken back never exceed what was bought, and the
    /// payment ends refunded in full.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_refunds_of_one_payment_take_turns() {
        let Some(database) = TestDatabase::create().await else { return };
        let stores = nodes(&database, 2).await;
        let a = account(&stores[0], "refunds").await;
        let payment = Payment {
            id: PaymentId::new(),
            account_id: a,
            provider: "stripe".into(),
            kind: PaymentKind::Credits,
            provider_payment_id: "cs_r".into(),
            provider_intent_id: Some("pi_r".into()),
            amount: 1000,
            currency: "USD".into(),
            status: PaymentStatus::Succeeded,
            credits: 100,
            credit_package: None,
            amount_refunded: 0,
            credits_reversed: 0,
            credits_unrecovered: 0,
            created_at: t0(),
            updated_at: t0(),
        };
        let bought = stores[0]
            .apply_billing_event(event("buy".into(), t0()), BillingEffect::CreditsPurchased { payment }, None)
            .await
            .unwrap();
        assert_eq!(bought, BillingOutcome::Applied);
        let tasks: Vec<_> = (1..=10i64)
            .map(|i| {
                let store = stores[i as usize % 2].clone();
                let effect = BillingEffect::Refunded { provider_intent_id: "pi_r".into(), amount_refunded: i * 100 };
                tokio::spawn(async move {
                    store.apply_billing_event(event(format!("refund-{i}"), t0()), effect, None).await
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        let payment = &stores[1].payments(Some(a), 10).await.unwrap()[0];
        assert_eq!(payment.status, PaymentStatus::Refunded);
        assert_eq!((payment.amount_refunded, payment.credits_reversed, payment.credits_unrecovered), (1000, 100, 0));
        assert_eq!(stores[0].credit_balance(a).await.unwrap().balance, 0);
        assert!(stores[0].ledger_check().await.unwrap().is_sound());
        close(stores, database).await;
    }

    /// Racing links of one account on two nodes: one customer wins, every caller is
    /// told which.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn racing_links_agree_on_the_first() {
        let Some(database) = TestDatabase::create().await else { return };
        let stores = nodes(&database, 2).await;
        let a = account(&stores[0], "links").await;
        let start = Arc::new(tokio::sync::Barrier::new(8));
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let (store, start) = (stores[i % 2].clone(), start.clone());
                tokio::spawn(async move {
                    start.wait().await;
                    store.link_provider_customer(a, "stripe", &format!("cus_{i}")).await.unwrap()
                })
            })
            .collect();
        let mut linked = Vec::new();
        for task in tasks {
            linked.push(task.await.unwrap());
        }
        linked.dedup();
        assert_eq!(linked.len(), 1, "{linked:?}");
        assert_eq!(stores[1].provider_customer(a, "stripe").await.unwrap(), Some(linked[0].clone()));
        close(stores, database).await;
    }
}
