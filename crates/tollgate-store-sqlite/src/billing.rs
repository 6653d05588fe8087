//! Credits and billing on SQLite: the ledger, provider customers, provider events and
//! payments (the `BillingStore` impl in `store.rs` delegates here). Writes go through
//! the single writer connection with `BEGIN IMMEDIATE`, so a balance read and the
//! write that depends on it cannot interleave with another writer.

use sqlx::Row;
use sqlx::sqlite::{SqliteConnection, SqliteRow};
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

use crate::rows::{from_micros, micros};
use crate::store::{insert_audit, insert_email};
use crate::usage::{stored_answer, subscription_in, write_subscription};
use crate::{SqliteStore, db_error};

fn json_err(e: serde_json::Error) -> StoreError {
    StoreError::Internal(format!("JSON: {e}"))
}

pub(crate) async fn transfer_credits(store: &SqliteStore, t: CreditTransfer) -> Result<CreditReceipt, StoreError> {
    let mut tx = store.writer.begin_with("BEGIN IMMEDIATE").await.map_err(db_error)?;
    let receipt = transfer_in(&mut tx, &t).await?;
    if !receipt.replayed {
        tx.commit().await.map_err(db_error)?;
    }
    Ok(receipt)
}

const INSERT_TRANSFER: &str = "INSERT INTO credit_transfers (id, account_id, kind, amount, balance_after, description, \
    endpoint, metadata, idempotency_key, actor_type, actor_id, payment_id, created_at) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)";
/// The two entries: the account's side and the system account's, summing to zero.
const INSERT_ENTRIES: &str = "INSERT INTO credit_entries (transfer_id, ledger_account, account_id, amount) \
    VALUES (?1, 'account', ?2, ?3), (?1, ?4, NULL, -?3)";
const UPSERT_BALANCE: &str = "INSERT INTO credit_balances (account_id, balance, updated_at) VALUES (?1, ?2, ?3) \
    ON CONFLICT (account_id) DO UPDATE SET balance = excluded.balance, updated_at = excluded.updated_at";

/// A meter's payment in credits, inside the usage writer's batch transaction (its own
/// connection, synchronous): the same rows as [`transfer_in`], for a transfer that
/// carries no idempotency key and no audit event (`CreditTransfer::metered`), to an
/// account the batch has already found.
pub(crate) fn metered_transfer(conn: &rusqlite::Connection, t: &CreditTransfer) -> Result<i64, StoreError> {
    use rusqlite::{OptionalExtension, params};

    use crate::sql_error;
    debug_assert!(t.idempotency.is_none() && t.audit.is_none());
    let balance: i64 = conn
        .prepare_cached("SELECT balance FROM credit_balances WHERE account_id = ?1")
        .and_then(|mut s| s.query_row([t.account.0.as_bytes()], |row| row.get(0)).optional())
        .map_err(sql_error)?
        .unwrap_or(0);
    let amount = credits::allowed_amount(balance, t.amount, t.floor, t.shortfall)
        .ok_or(StoreError::Conflict("insufficient_credits"))?;
    let after = balance.checked_add(amount).ok_or(StoreError::Conflict("credits_overflow"))?;
    let now = micros(t.now);
    let metadata = t.metadata.as_ref().map(serde_json::to_string).transpose().map_err(json_err)?;
    let account = &t.account.0.as_bytes()[..];
    conn.prepare_cached(INSERT_TRANSFER)
        .and_then(|mut s| {
            s.execute(params![
                &t.id.0.as_bytes()[..],
                account,
                t.kind.as_str(),
                amount,
                after,
                t.description,
                t.endpoint,
                metadata,
                None::<String>,
                t.actor.kind(),
                t.actor.id(),
                t.payment.map(|p| p.0.as_bytes().to_vec()),
                now,
            ])
        })
        .map_err(sql_error)?;
    conn.prepare_cached(INSERT_ENTRIES)
        .and_then(|mut s| s.execute(params![&t.id.0.as_bytes()[..], account, amount, t.kind.system_account()]))
        .map_err(sql_error)?;
    conn.prepare_cached(UPSERT_BALANCE).and_then(|mut s| s.execute(params![account, after, now])).map_err(sql_error)?;
    Ok(amount)
}

/// The transfer inside the caller's transaction (the caller commits).
pub(crate) async fn transfer_in(conn: &mut SqliteConnection, t: &CreditTransfer) -> Result<CreditReceipt, StoreError> {
    if let Some(idem) = &t.idempotency
        && let Some((hash, mut receipt)) = stored_answer::<CreditReceipt>(&mut *conn, &idem.scope, &idem.key).await?
    {
        if hash != idem.request_hash {
            return Err(StoreError::Conflict("idempotency_key"));
        }
        receipt.replayed = true;
        return Ok(receipt);
    }
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM accounts WHERE id = ?1)")
        .bind(t.account.0)
        .fetch_one(&mut *conn)
        .await
        .map_err(db_error)?;
    if !exists {
        return Err(StoreError::NotFound);
    }
    let balance: i64 = sqlx::query_scalar("SELECT balance FROM credit_balances WHERE account_id = ?1")
        .bind(t.account.0)
        .fetch_optional(&mut *conn)
        .await
        .map_err(db_error)?
        .unwrap_or(0);
    let amount = credits::allowed_amount(balance, t.amount, t.floor, t.shortfall)
        .ok_or(StoreError::Conflict("insufficient_credits"))?;
    let after = balance.checked_add(amount).ok_or(StoreError::Conflict("credits_overflow"))?;
    let now = micros(t.now);
    let metadata = t.metadata.as_ref().map(serde_json::to_string).transpose().map_err(json_err)?;
    sqlx::query(INSERT_TRANSFER)
        .bind(t.id.0)
        .bind(t.account.0)
        .bind(t.kind.as_str())
        .bind(amount)
        .bind(after)
        .bind(&t.description)
        .bind(&t.endpoint)
        .bind(&metadata)
        .bind(t.idempotency.as_ref().map(|i| &i.key))
        .bind(t.actor.kind())
        .bind(t.actor.id())
        .bind(t.payment.map(|p| p.0))
        .bind(now)
        .execute(&mut *conn)
        .await
        .map_err(db_error)?;
    sqlx::query(INSERT_ENTRIES)
        .bind(t.id.0)
        .bind(t.account.0)
        .bind(amount)
        .bind(t.kind.system_account())
        .execute(&mut *conn)
        .await
        .map_err(db_error)?;
    sqlx::query(UPSERT_BALANCE).bind(t.account.0).bind(after).bind(now).execute(&mut *conn).await.map_err(db_error)?;
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
    if let Some(idem) = &t.idempotency {
        sqlx::query(
            "INSERT INTO idempotency_keys (scope, key, request_hash, response, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .bind(&idem.scope)
        .bind(&idem.key)
        .bind(&idem.request_hash)
        .bind(serde_json::to_string(&receipt).map_err(json_err)?)
        .bind(now)
        .execute(&mut *conn)
        .await
        .map_err(db_error)?;
    }
    if let Some(audit) = &t.audit {
        insert_audit(conn, audit).await?;
    }
    Ok(receipt)
}

pub(crate) async fn credit_balance(store: &SqliteStore, account: AccountId) -> Result<CreditBalance, StoreError> {
    let mut conn = store.reader.acquire().await.map_err(db_error)?;
    let balance: i64 = sqlx::query_scalar("SELECT balance FROM credit_balances WHERE account_id = ?1")
        .bind(account.0)
        .fetch_optional(&mut *conn)
        .await
        .map_err(db_error)?
        .unwrap_or(0);
    let totals: Vec<(String, i64)> =
        sqlx::query_as("SELECT kind, SUM(amount) FROM credit_transfers WHERE account_id = ?1 GROUP BY kind")
            .bind(account.0)
            .fetch_all(&mut *conn)
            .await
            .map_err(db_error)?;
    Ok(balance_from(balance, &totals))
}

/// Totals by kind: purchases net of reversals, spending net of refunds, bonuses.
pub(crate) fn balance_from(balance: i64, totals: &[(String, i64)]) -> CreditBalance {
    let sum = |kind: CreditKind| totals.iter().filter(|(k, _)| k == kind.as_str()).map(|(_, v)| *v).sum::<i64>();
    CreditBalance {
        balance,
        purchased: sum(CreditKind::Purchase) + sum(CreditKind::Reversal),
        used: -(sum(CreditKind::Usage) + sum(CreditKind::Refund)),
        granted: sum(CreditKind::Bonus),
    }
}

fn transaction(row: &SqliteRow) -> Result<CreditTransaction, StoreError> {
    let kind: String = row.try_get("kind").map_err(db_error)?;
    let metadata: Option<String> = row.try_get("metadata").map_err(db_error)?;
    Ok(CreditTransaction {
        id: CreditTransferId(row.try_get("id").map_err(db_error)?),
        account_id: AccountId(row.try_get("account_id").map_err(db_error)?),
        kind: CreditKind::parse(&kind).ok_or_else(|| StoreError::Internal(format!("credit kind {kind:?}")))?,
        amount: row.try_get("amount").map_err(db_error)?,
        balance_after: row.try_get("balance_after").map_err(db_error)?,
        description: row.try_get("description").map_err(db_error)?,
        endpoint: row.try_get("endpoint").map_err(db_error)?,
        metadata: metadata.map(|m| serde_json::from_str(&m)).transpose().map_err(json_err)?,
        payment_id: row.try_get::<Option<uuid::Uuid>, _>("payment_id").map_err(db_error)?.map(PaymentId),
        created_at: from_micros(row.try_get("created_at").map_err(db_error)?)?,
    })
}

pub(crate) async fn credit_transactions(
    store: &SqliteStore,
    account: AccountId,
    query: TransactionQuery,
) -> Result<Vec<CreditTransaction>, StoreError> {
    // Ids are UUIDv7, so id order is time order; `before` pages without offsets.
    let rows = sqlx::query(
        "SELECT id, account_id, kind, amount, balance_after, description, endpoint, metadata, payment_id, created_at \
         FROM credit_transfers WHERE account_id = ?1 AND (?2 IS NULL OR kind = ?2) AND (?3 IS NULL OR id < ?3) \
         ORDER BY id DESC LIMIT ?4",
    )
    .bind(account.0)
    .bind(query.kind.map(|k| k.as_str()))
    .bind(query.before.map(|b| b.0))
    .bind(i64::from(query.limit))
    .fetch_all(&store.reader)
    .await
    .map_err(db_error)?;
    rows.iter().map(transaction).collect()
}

pub(crate) async fn ledger_check(store: &SqliteStore) -> Result<LedgerCheck, StoreError> {
    let mut conn = store.reader.acquire().await.map_err(db_error)?;
    let transfers: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM credit_transfers").fetch_one(&mut *conn).await.map_err(db_error)?;
    let unbalanced: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM credit_transfers t WHERE \
           (SELECT COUNT(*) FROM credit_entries e WHERE e.transfer_id = t.id) <> 2 \
           OR (SELECT SUM(amount) FROM credit_entries e WHERE e.transfer_id = t.id) <> 0 \
           OR (SELECT amount FROM credit_entries e WHERE e.transfer_id = t.id AND e.ledger_account = 'account') \
              IS NOT t.amount",
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(db_error)?;
    let mismatched: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM credit_balances b WHERE b.balance <> \
           (SELECT COALESCE(SUM(amount), 0) FROM credit_entries e WHERE e.account_id = b.account_id)",
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(db_error)?;
    Ok(LedgerCheck {
        transfers: transfers as u64,
        unbalanced_transfers: unbalanced as u64,
        mismatched_balances: mismatched as u64,
    })
}

pub(crate) async fn provider_customer(
    store: &SqliteStore,
    account: AccountId,
    provider: &str,
) -> Result<Option<String>, StoreError> {
    sqlx::query_scalar("SELECT customer_id FROM provider_customers WHERE account_id = ?1 AND provider = ?2")
        .bind(account.0)
        .bind(provider)
        .fetch_optional(&store.reader)
        .await
        .map_err(db_error)
}

pub(crate) async fn link_provider_customer(
    store: &SqliteStore,
    account: AccountId,
    provider: &str,
    customer: &str,
) -> Result<String, StoreError> {
    let mut tx = store.writer.begin_with("BEGIN IMMEDIATE").await.map_err(db_error)?;
    sqlx::query(
        "INSERT INTO provider_customers (account_id, provider, customer_id, created_at) VALUES (?1, ?2, ?3, ?4) \
         ON CONFLICT (account_id, provider) DO NOTHING",
    )
    .bind(account.0)
    .bind(provider)
    .bind(customer)
    .bind(micros(time::OffsetDateTime::now_utc()))
    .execute(&mut *tx)
    .await
    .map_err(db_error)?;
    let linked: String =
        sqlx::query_scalar("SELECT customer_id FROM provider_customers WHERE account_id = ?1 AND provider = ?2")
            .bind(account.0)
            .bind(provider)
            .fetch_one(&mut *tx)
            .await
            .map_err(db_error)?;
    tx.commit().await.map_err(db_error)?;
    Ok(linked)
}

pub(crate) async fn account_by_provider_customer(
    store: &SqliteStore,
    provider: &str,
    customer: &str,
) -> Result<Option<AccountId>, StoreError> {
    let id: Option<uuid::Uuid> =
        sqlx::query_scalar("SELECT account_id FROM provider_customers WHERE provider = ?1 AND customer_id = ?2")
            .bind(provider)
            .bind(customer)
            .fetch_optional(&store.reader)
            .await
            .map_err(db_error)?;
    Ok(id.map(AccountId))
}

pub(crate) async fn apply_billing_event(
    store: &SqliteStore,
    event: ProviderEvent,
    effect: BillingEffect,
    email: Option<NewEmail>,
) -> Result<BillingOutcome, StoreError> {
    let mut tx = store.writer.begin_with("BEGIN IMMEDIATE").await.map_err(db_error)?;
    // Claim the event id first: a second delivery finds it and does nothing. With one
    // writer connection, two concurrent deliveries run one after the other.
    let claimed = sqlx::query(
        "INSERT INTO provider_events (provider, event_id, event_type, created, received_at, outcome) \
         VALUES (?1, ?2, ?3, ?4, ?5, 'applied') ON CONFLICT (provider, event_id) DO NOTHING",
    )
    .bind(&event.provider)
    .bind(&event.id)
    .bind(&event.event_type)
    .bind(micros(event.created))
    .bind(micros(event.received_at))
    .execute(&mut *tx)
    .await
    .map_err(db_error)?;
    if claimed.rows_affected() == 0 {
        return Ok(BillingOutcome::Duplicate);
    }
    let mut changed_subscription = None;
    let outcome = match effect {
        BillingEffect::Nothing => BillingOutcome::Ignored,
        BillingEffect::CreditsPurchased { payment } => credits_purchased(&mut tx, &event, &payment).await?,
        BillingEffect::Subscription(state) => {
            let outcome = provider_subscription(&mut tx, &event, &state).await?;
            changed_subscription = outcome.1;
            outcome.0
        }
        BillingEffect::Invoice { payment, provider_subscription_id, at } => {
            let outcome = invoice(&mut tx, &event, &payment, provider_subscription_id.as_deref(), at).await?;
            changed_subscription = outcome.1;
            outcome.0
        }
        BillingEffect::Refunded { provider_intent_id, amount_refunded } => {
            refunded(&mut tx, &event, &provider_intent_id, amount_refunded).await?
        }
    };
    if outcome != BillingOutcome::Applied {
        let recorded = if outcome == BillingOutcome::Deferred { "deferred" } else { "ignored" };
        sqlx::query("UPDATE provider_events SET outcome = ?3 WHERE provider = ?1 AND event_id = ?2")
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
    if let Some(subscription) = changed_subscription {
        store.cache.store_subscription(subscription.account_id, Some(subscription));
    }
    Ok(outcome)
}

async fn insert_payment(conn: &mut SqliteConnection, p: &Payment) -> Result<bool, StoreError> {
    let inserted = sqlx::query(
        "INSERT INTO payments (id, account_id, provider, kind, provider_payment_id, provider_intent_id, amount, currency, \
           status, credits, credit_package, amount_refunded, credits_reversed, credits_unrecovered, created_at, updated_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, 0, 0, 0, ?12, ?12) \
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
    .bind(micros(p.created_at))
    .execute(&mut *conn)
    .await
    .map_err(db_error)?;
    Ok(inserted.rows_affected() > 0)
}

/// Records the payment and grants its credits, once per payment: another event about
/// the same checkout (a retry under a new event id) finds the payment and grants nothing.
async fn credits_purchased(
    conn: &mut SqliteConnection,
    event: &ProviderEvent,
    payment: &Payment,
) -> Result<BillingOutcome, StoreError> {
    if !insert_payment(conn, payment).await? {
        return Ok(BillingOutcome::Ignored);
    }
    transfer_in(conn, &CreditTransfer::purchase(payment)).await?;
    // A refund that arrived before this purchase applies now.
    if let Some(intent) = &payment.provider_intent_id {
        let pending: Option<i64> = sqlx::query_scalar(
            "DELETE FROM pending_refunds WHERE provider = ?1 AND provider_intent_id = ?2 RETURNING amount_refunded",
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
    conn: &mut SqliteConnection,
    event: &ProviderEvent,
    state: &ProviderSubscription,
) -> Result<(BillingOutcome, Option<Subscription>), StoreError> {
    let stored = subscription_in(conn, state.account).await?;
    let Some(next) = billing::subscription_from_state(stored.as_ref(), &event.provider, state, event.received_at)
    else {
        return Ok((BillingOutcome::Ignored, None));
    };
    let previous = stored.as_ref().map(|s| s.updated_at);
    if !write_subscription(conn, &next, previous).await? {
        return Err(StoreError::Internal("subscription changed inside its own transaction".into()));
    }
    Ok((BillingOutcome::Applied, Some(next)))
}

/// Records an invoice payment (a failure never overwrites a success of the same
/// invoice) and moves the subscription: failed → `past_due`, paid → `active`, unless a
/// newer provider state is stored.
async fn invoice(
    conn: &mut SqliteConnection,
    event: &ProviderEvent,
    payment: &Payment,
    provider_subscription_id: Option<&str>,
    at: Timestamp,
) -> Result<(BillingOutcome, Option<Subscription>), StoreError> {
    if !insert_payment(conn, payment).await? && payment.status == PaymentStatus::Succeeded {
        sqlx::query(
            "UPDATE payments SET status = 'succeeded', amount = ?3, updated_at = ?4 \
             WHERE provider = ?1 AND provider_payment_id = ?2 AND status IN ('pending', 'failed')",
        )
        .bind(&payment.provider)
        .bind(&payment.provider_payment_id)
        .bind(payment.amount)
        .bind(micros(payment.updated_at))
        .execute(&mut *conn)
        .await
        .map_err(db_error)?;
    }
    let Some(provider_subscription_id) = provider_subscription_id else { return Ok((BillingOutcome::Applied, None)) };
    let Some(stored) = subscription_in(conn, payment.account_id).await? else {
        return Ok((BillingOutcome::Applied, None));
    };
    let next =
        billing::subscription_after_invoice(&stored, provider_subscription_id, payment.status, at, event.received_at);
    let Some(next) = next else { return Ok((BillingOutcome::Applied, None)) };
    if !write_subscription(conn, &next, Some(stored.updated_at)).await? {
        return Err(StoreError::Internal("subscription changed inside its own transaction".into()));
    }
    Ok((BillingOutcome::Applied, Some(next)))
}

/// Takes back a refunded payment's credits in proportion, as far as the balance
/// allows (to zero; an overdraft is not extended by a refund), and records the rest.
async fn refunded(
    conn: &mut SqliteConnection,
    event: &ProviderEvent,
    provider_intent_id: &str,
    amount_refunded: i64,
) -> Result<BillingOutcome, StoreError> {
    let row = sqlx::query(
        "SELECT id, account_id, amount, credits, amount_refunded, credits_reversed, credits_unrecovered FROM payments \
         WHERE provider = ?1 AND provider_intent_id = ?2",
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
             VALUES (?1, ?2, ?3, ?4) ON CONFLICT (provider, provider_intent_id) \
             DO UPDATE SET amount_refunded = MAX(amount_refunded, excluded.amount_refunded)",
        )
        .bind(&event.provider)
        .bind(provider_intent_id)
        .bind(amount_refunded)
        .bind(micros(event.received_at))
        .execute(&mut *conn)
        .await
        .map_err(db_error)?;
        return Ok(BillingOutcome::Deferred);
    };
    let id = PaymentId(row.try_get("id").map_err(db_error)?);
    let account = AccountId(row.try_get("account_id").map_err(db_error)?);
    let amount: i64 = row.try_get("amount").map_err(db_error)?;
    let credits: i64 = row.try_get("credits").map_err(db_error)?;
    let stored_refunded: i64 = row.try_get("amount_refunded").map_err(db_error)?;
    let reversed: i64 = row.try_get("credits_reversed").map_err(db_error)?;
    let unrecovered: i64 = row.try_get("credits_unrecovered").map_err(db_error)?;
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
        "UPDATE payments SET amount_refunded = ?2, credits_reversed = credits_reversed + ?3, \
           credits_unrecovered = credits_unrecovered + ?4, status = ?5, updated_at = ?6 WHERE id = ?1",
    )
    .bind(id.0)
    .bind(amount_refunded.min(amount))
    .bind(taken)
    .bind(due - taken)
    .bind(status.as_str())
    .bind(micros(event.received_at))
    .execute(&mut *conn)
    .await
    .map_err(db_error)?;
    Ok(BillingOutcome::Applied)
}

pub(crate) fn payment(row: &SqliteRow) -> Result<Payment, StoreError> {
    let kind: String = row.try_get("kind").map_err(db_error)?;
    let status: String = row.try_get("status").map_err(db_error)?;
    Ok(Payment {
        id: PaymentId(row.try_get("id").map_err(db_error)?),
        account_id: AccountId(row.try_get("account_id").map_err(db_error)?),
        provider: row.try_get("provider").map_err(db_error)?,
        kind: PaymentKind::parse(&kind).ok_or_else(|| StoreError::Internal(format!("payment kind {kind:?}")))?,
        provider_payment_id: row.try_get("provider_payment_id").map_err(db_error)?,
        provider_intent_id: row.try_get("provider_intent_id").map_err(db_error)?,
        amount: row.try_get("amount").map_err(db_error)?,
        currency: row.try_get("currency").map_err(db_error)?,
        status: PaymentStatus::parse(&status)
            .ok_or_else(|| StoreError::Internal(format!("payment status {status:?}")))?,
        credits: row.try_get("credits").map_err(db_error)?,
        credit_package: row.try_get("credit_package").map_err(db_error)?,
        amount_refunded: row.try_get("amount_refunded").map_err(db_error)?,
        credits_reversed: row.try_get("credits_reversed").map_err(db_error)?,
        credits_unrecovered: row.try_get("credits_unrecovered").map_err(db_error)?,
        created_at: from_micros(row.try_get("created_at").map_err(db_error)?)?,
        updated_at: from_micros(row.try_get("updated_at").map_err(db_error)?)?,
    })
}

pub(crate) async fn payments(
    store: &SqliteStore,
    account: Option<AccountId>,
    limit: u32,
) -> Result<Vec<Payment>, StoreError> {
    let rows = sqlx::query(
        "SELECT id, account_id, provider, kind, provider_payment_id, provider_intent_id, amount, currency, status, \
           credits, credit_package, amount_refunded, credits_reversed, credits_unrecovered, created_at, updated_at \
         FROM payments WHERE (?1 IS NULL OR account_id = ?1) ORDER BY created_at DESC, id DESC LIMIT ?2",
    )
    .bind(account.map(|a| a.0))
    .bind(i64::from(limit))
    .fetch_all(&store.reader)
    .await
    .map_err(db_error)?;
    rows.iter().map(payment).collect()
}
