//! Typed ids: UUIDv7 (time-ordered, so they index well) wrapped per entity, so a
//! session id can never be passed where a user id is expected.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

macro_rules! typed_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A fresh UUIDv7.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.fmt(f)
            }
        }

        impl std::str::FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }
    };
}

typed_id!(
    /// A person who signs in.
    UserId
);
typed_id!(
    /// Who owns a subscription, quotas and credits.
    AccountId
);
typed_id!(
    /// A signed-in device.
    SessionId
);
typed_id!(
    /// An append-only audit record.
    AuditEventId
);
typed_id!(
    /// An email waiting in (or sent from) the outbox.
    EmailId
);
typed_id!(
    /// A one-time token (email verification, reset, magic link, ...).
    OneTimeTokenId
);
typed_id!(
    /// A service key (an integrating backend's secret).
    ServiceKeyId
);
typed_id!(
    /// An account's API key.
    ApiKeyId
);
typed_id!(
    /// A usage event.
    UsageEventId
);
typed_id!(
    /// A lease on a concurrency meter (a slot held until released or expired).
    LeaseId
);
typed_id!(
    /// A reservation: usage counted before the work, settled after it.
    ReservationId
);
typed_id!(
    /// A credit transfer (one movement of the ledger, two entries).
    CreditTransferId
);
typed_id!(
    /// A payment reported by a payment provider.
    PaymentId
);
