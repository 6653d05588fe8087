//! The outbox sender: a background task that claims due emails from the store (with a
//! lease, so two nodes never send the same one), delivers them over SMTP — or writes
//! them to the log when no SMTP server is configured (the zero-config default) — and
//! records the outcome. Failed deliveries are retried with exponential backoff; an
//! unsent email survives restarts because it is only a row until it is marked sent.

use std::sync::Arc;
use std::time::Duration;

use lettre::message::{Mailbox, MultiPart};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use time::OffsetDateTime;
use tokio::sync::watch;
use tollgate_core::Store;
use tollgate_core::email::OutboxEmail;
use tollgate_core::store::EmailOutcome;

/// Attempts before an email is given up on.
const MAX_ATTEMPTS: i32 = 8;
const LEASE: Duration = Duration::from_secs(120);
const BATCH: u32 = 20;

pub enum Transport {
    Smtp {
        transport: AsyncSmtpTransport<Tokio1Executor>,
        from: Mailbox,
    },
    /// Dev mode: the email (with its link) goes to the log at INFO.
    Log,
}

impl Transport {
    pub fn smtp(url: &str, from: &str) -> anyhow::Result<Self> {
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
            .map_err(|e| anyhow::anyhow!("TOLLGATE_SMTP_URL: {e}"))?
            .timeout(Some(Duration::from_secs(20)))
            .build();
        let from = from.parse().map_err(|e| anyhow::anyhow!("TOLLGATE_SMTP_FROM: {e}"))?;
        Ok(Self::Smtp { transport, from })
    }
}

pub struct Mailer {
    store: Arc<dyn Store>,
    transport: Transport,
}

fn backoff(attempts: i32) -> Duration {
    let secs = 5u64.saturating_mul(1 << attempts.clamp(0, 12));
    Duration::from_secs(secs.min(3600))
}

impl Mailer {
    pub fn new(store: Arc<dyn Store>, transport: Transport) -> Self {
        Self { store, transport }
    }

    /// Delivers what is due now; returns how many emails were attempted.
    pub async fn deliver_due(&self) -> usize {
        let now = OffsetDateTime::now_utc();
        let lease_until = now + time::Duration::try_from(LEASE).unwrap_or(time::Duration::MINUTE);
        let batch = match self.store.claim_emails(now, lease_until, BATCH).await {
            Ok(batch) => batch,
            Err(e) => {
                tracing::warn!(error = %e, "could not claim emails from the outbox");
                return 0;
            }
        };
        let count = batch.len();
        for email in batch {
            let outcome = self.deliver(&email).await;
            if let Err(e) = self.store.finish_email(email.id, outcome, OffsetDateTime::now_utc()).await {
                tracing::warn!(email_id = %email.id, error = %e, "could not record email delivery");
            }
        }
        count
    }

    async fn deliver(&self, email: &OutboxEmail) -> EmailOutcome {
        match &self.transport {
            Transport::Log => {
                tracing::info!(
                    email_id = %email.id,
                    to = %email.to,
                    template = %email.template,
                    subject = %email.subject,
                    body = %email.text_body,
                    "email (no SMTP configured; set TOLLGATE_SMTP_URL to send)"
                );
                EmailOutcome::Logged
            }
            Transport::Smtp { transport, from } => {
                let message = match build_message(from, email) {
                    Ok(m) => m,
                    Err(e) => return EmailOutcome::Failed { error: e },
                };
                match transport.send(message).await {
                    Ok(_) => {
                        tracing::info!(email_id = %email.id, template = %email.template, "email sent");
                        EmailOutcome::Sent
                    }
                    Err(e) if e.is_permanent() || email.attempts + 1 >= MAX_ATTEMPTS => {
                        tracing::warn!(email_id = %email.id, error = %e, "email delivery failed for good");
                        EmailOutcome::Failed { error: e.to_string() }
                    }
                    Err(e) => {
                        let wait = backoff(email.attempts);
                        tracing::info!(email_id = %email.id, error = %e, retry_in_s = wait.as_secs(), "email delivery failed; will retry");
                        let at =
                            OffsetDateTime::now_utc() + time::Duration::try_from(wait).unwrap_or(time::Duration::HOUR);
                        EmailOutcome::Retry { at, error: e.to_string() }
                    }
                }
            }
        }
    }

    /// Runs until `shutdown` turns true, polling the outbox every `interval`.
    pub async fn run(self, interval: Duration, mut shutdown: watch::Receiver<bool>) {
        loop {
            while self.deliver_due().await == BATCH as usize {}
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

fn build_message(from: &Mailbox, email: &OutboxEmail) -> Result<Message, String> {
    let to: Mailbox = email.to.as_str().parse().map_err(|e| format!("bad recipient: {e}"))?;
    Message::builder()
        .from(from.clone())
        .to(to)
        .subject(email.subject.clone())
        .message_id(Some(format!("<{}@tollgate>", email.id)))
        .multipart(MultiPart::alternative_plain_html(email.text_body.clone(), email.html_body.clone()))
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::backoff;
    use std::time::Duration;

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(backoff(0), Duration::from_secs(5));
        assert_eq!(backoff(1), Duration::from_secs(10));
        assert_eq!(backoff(3), Duration::from_secs(40));
        assert_eq!(backoff(20), Duration::from_secs(3600));
    }
}

#[cfg(test)]
mod delivery_tests {
    use std::sync::Arc;

    use tollgate_core::Store;
    use tollgate_core::audit::RequestOrigin;
    use tollgate_core::identity::flows::Registration;
    use tollgate_core::identity::password::HashCost;
    use tollgate_core::identity::{Identity, IdentitySettings};
    use tollgate_store_sqlite::SqliteStore;

    use super::{Mailer, Transport};

    /// An unreachable SMTP server leaves the email pending with one attempt counted,
    /// to be retried after a backoff; nothing is lost.
    #[tokio::test]
    async fn unreachable_smtp_schedules_a_retry() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&url).await.unwrap());
        let settings = IdentitySettings {
            hash_cost: HashCost { memory_kib: 64, iterations: 1, parallelism: 1 },
            ..IdentitySettings::default()
        };
        let identity = Identity::new(store.clone(), settings).unwrap();
        let registration = Registration {
            email: "ada@example.com".into(),
            password: "correct horse battery".into(),
            ..Default::default()
        };
        identity.register(registration, &RequestOrigin::default()).await.unwrap();
        // Port 9 (discard) on loopback: nothing listens there.
        let mailer = Mailer::new(store.clone(), Transport::smtp("smtp://127.0.0.1:9", "T <t@t.test>").unwrap());
        assert_eq!(mailer.deliver_due().await, 1);
        assert_eq!(store.pending_email_count().await.unwrap(), 1, "still pending");
        assert_eq!(mailer.deliver_due().await, 0, "not due again before the backoff");
        let logger = Mailer::new(store.clone(), Transport::Log);
        assert_eq!(logger.deliver_due().await, 0, "the lease is released, the retry time holds");
    }
}
