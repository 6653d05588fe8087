//! Audit events: an append-only record of who did what to whom. Stores write them in
//! the same transaction as the change they describe; login history is part of it.

use serde::{Deserialize, Serialize};

use crate::Timestamp;
use crate::identity::str_enum;
use crate::ids::{ApiKeyId, AuditEventId, ServiceKeyId, UserId};

/// Who acted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "id", rename_all = "snake_case")]
pub enum Actor {
    /// A signed-in user acting for themselves.
    User(UserId),
    /// Someone not (yet) signed in: a failed login, a registration.
    Anonymous,
    /// Tollgate itself (CLI, background jobs).
    System,
    /// A product's backend, by its service key.
    ServiceKey(ServiceKeyId),
    /// An admin acting as a user through an impersonation token: both identities.
    Impersonator { admin: UserId, user: UserId },
    /// A user's program, through one of the user's API keys: both named.
    ApiKey { user: UserId, key: ApiKeyId },
}

impl Actor {
    pub fn kind(&self) -> &'static str {
        match self {
            Actor::User(_) => "user",
            Actor::Anonymous => "anonymous",
            Actor::System => "system",
            Actor::ServiceKey(_) => "service_key",
            Actor::Impersonator { .. } => "impersonator",
            Actor::ApiKey { .. } => "api_key",
        }
    }

    pub fn id(&self) -> Option<String> {
        match self {
            Actor::User(id) => Some(id.to_string()),
            Actor::ServiceKey(id) => Some(id.to_string()),
            // Stored in the one `actor_id` column as `<admin>/<user>`.
            Actor::Impersonator { admin, user } => Some(format!("{admin}/{user}")),
            Actor::ApiKey { user, key } => Some(format!("{user}/{key}")),
            Actor::Anonymous | Actor::System => None,
        }
    }

    pub fn from_parts(kind: &str, id: Option<&str>) -> Option<Self> {
        match (kind, id) {
            ("user", Some(id)) => id.parse().ok().map(Actor::User),
            ("service_key", Some(id)) => id.parse().ok().map(Actor::ServiceKey),
            ("impersonator", Some(ids)) => {
                let (admin, user) = ids.split_once('/')?;
                Some(Actor::Impersonator { admin: admin.parse().ok()?, user: user.parse().ok()? })
            }
            ("api_key", Some(ids)) => {
                let (user, key) = ids.split_once('/')?;
                Some(Actor::ApiKey { user: user.parse().ok()?, key: key.parse().ok()? })
            }
            ("anonymous", _) => Some(Actor::Anonymous),
            ("system", _) => Some(Actor::System),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

str_enum!(Severity { Info => "info", Warning => "warning", Critical => "critical" });

/// Where a request came from, carried into audit events and sessions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestOrigin {
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    /// The admin behind an impersonation token: what the request does as a user is
    /// recorded as [`Actor::Impersonator`].
    pub impersonator: Option<UserId>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct AuditEvent {
    pub id: AuditEventId,
    pub actor: Actor,
    /// `noun.verb_past`, e.g. `login.failed`, `session.revoked`.
    pub action: String,
    /// What was acted on, e.g. `("user", "<uuid>")`.
    pub target_type: Option<String>,
    pub target_id: Option<String>,
    pub metadata: serde_json::Value,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    pub severity: Severity,
    pub created_at: Timestamp,
}

impl AuditEvent {
    /// An event of `actor`; a user acting through an impersonation token (see
    /// `origin.impersonator`) is recorded with the admin behind it.
    pub fn new(actor: Actor, action: &str, origin: &RequestOrigin, now: Timestamp) -> Self {
        let actor = match (actor, origin.impersonator) {
            (Actor::User(user), Some(admin)) => Actor::Impersonator { admin, user },
            (actor, _) => actor,
        };
        Self {
            id: AuditEventId::new(),
            actor,
            action: action.to_owned(),
            target_type: None,
            target_id: None,
            metadata: serde_json::Value::Object(Default::default()),
            ip: origin.ip.clone(),
            user_agent: origin.user_agent.clone(),
            severity: Severity::Info,
            created_at: now,
        }
    }

    pub fn target_user(mut self, user: UserId) -> Self {
        self.target_type = Some("user".into());
        self.target_id = Some(user.to_string());
        self
    }

    /// What was acted on, other than a user: e.g. `("account", "<uuid>")`.
    pub fn target(mut self, kind: &str, id: impl ToString) -> Self {
        self.target_type = Some(kind.to_owned());
        self.target_id = Some(id.to_string());
        self
    }

    pub fn severity(mut self, severity: Severity) -> Self {
        self.severity = severity;
        self
    }

    pub fn meta(mut self, key: &str, value: impl Into<serde_json::Value>) -> Self {
        if let serde_json::Value::Object(map) = &mut self.metadata {
            map.insert(key.to_owned(), value.into());
        }
        self
    }
}

/// Filter for reading the audit log back, newest first. Every filter narrows.
#[derive(Clone, Debug, Default)]
pub struct AuditQuery {
    pub target_user: Option<UserId>,
    pub action_prefix: Option<String>,
    /// Exactly this action.
    pub action: Option<String>,
    pub actor: Option<Actor>,
    /// `(target_type, target_id)`.
    pub target: Option<(String, String)>,
    pub severity: Option<Severity>,
    /// At or after.
    pub from: Option<Timestamp>,
    /// Strictly before.
    pub to: Option<Timestamp>,
    /// Strictly older than this event (the previous page's last): keyset pagination.
    pub before: Option<(Timestamp, AuditEventId)>,
    pub limit: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actors_round_trip_through_their_parts() {
        let (admin, user) = (UserId::new(), UserId::new());
        for actor in [
            Actor::User(user),
            Actor::Anonymous,
            Actor::System,
            Actor::ServiceKey(ServiceKeyId::new()),
            Actor::Impersonator { admin, user },
            Actor::ApiKey { user, key: ApiKeyId::new() },
        ] {
            assert_eq!(Actor::from_parts(actor.kind(), actor.id().as_deref()), Some(actor));
        }
        assert_eq!(Actor::from_parts("impersonator", Some("nope")), None);
        assert_eq!(Actor::from_parts("api_key", Some("nope")), None);
    }

    #[test]
    fn a_user_acting_through_an_impersonation_token_names_both() {
        let (admin, user) = (UserId::new(), UserId::new());
        let origin = RequestOrigin { impersonator: Some(admin), ..Default::default() };
        let now = time::OffsetDateTime::now_utc();
        assert_eq!(AuditEvent::new(Actor::User(user), "x", &origin, now).actor, Actor::Impersonator { admin, user });
        assert_eq!(AuditEvent::new(Actor::System, "x", &origin, now).actor, Actor::System);
    }
}
