//! The admin side's view of users: which users a list shows and in what order, where
//! its pages start (keyset cursors, stable under inserts), and what an admin change
//! may set. The stores run the queries; the rules are here.

use serde::{Deserialize, Serialize};

use crate::Timestamp;
use crate::identity::{EmailAddress, Role, User, UserStatus};
use crate::ids::UserId;

/// Largest page of an admin list.
pub const MAX_PAGE: u32 = 200;
/// Page size when none is asked for.
pub const DEFAULT_PAGE: u32 = 50;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UserSortField {
    Created,
    /// Users who never signed in sort as if they had at the epoch.
    LastLogin,
    Email,
}

/// The order of a user list; ties are broken by id, so the order is total.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UserSort {
    pub field: UserSortField,
    pub descending: bool,
}

impl Default for UserSort {
    /// Newest first.
    fn default() -> Self {
        Self { field: UserSortField::Created, descending: true }
    }
}

impl UserSort {
    /// `created`, `last_login` or `email`; a leading `-` sorts descending.
    pub fn parse(s: &str) -> Option<Self> {
        let (descending, name) = match s.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        let field = match name {
            "created" => UserSortField::Created,
            "last_login" => UserSortField::LastLogin,
            "email" => UserSortField::Email,
            _ => return None,
        };
        Some(Self { field, descending })
    }

    pub fn as_string(self) -> String {
        let name = match self.field {
            UserSortField::Created => "created",
            UserSortField::LastLogin => "last_login",
            UserSortField::Email => "email",
        };
        if self.descending { format!("-{name}") } else { name.to_owned() }
    }

    /// The value a user is sorted by (what a cursor remembers).
    pub fn value_of(self, user: &User) -> SortValue {
        match self.field {
            UserSortField::Created => SortValue::Micros(micros(user.created_at)),
            UserSortField::LastLogin => SortValue::Micros(user.last_login_at.map_or(0, micros)),
            UserSortField::Email => SortValue::Text(user.email.as_str().to_owned()),
        }
    }
}

/// Microseconds since the epoch: what both stores keep and compare.
pub fn micros(t: Timestamp) -> i64 {
    (t.unix_timestamp_nanos() / 1000) as i64
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SortValue {
    Micros(i64),
    Text(String),
}

/// Where the next page starts: strictly after this (value, id) in the list's order.
/// Rows inserted meanwhile are either before it or after it, so no user is repeated
/// or skipped by paging.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserCursor {
    pub value: SortValue,
    pub id: UserId,
}

/// Users on a plan: a live subscription to `key`, or (when `key` is the default plan)
/// no live subscription at all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanFilter {
    pub key: String,
    pub is_default: bool,
}

#[derive(Clone, Debug, Default)]
pub struct UserQuery {
    /// Lower-cased: a substring of the email or the name, or a prefix of the id.
    pub q: Option<String>,
    /// `None`: every user but the deleted ones.
    pub status: Option<UserStatus>,
    pub role: Option<Role>,
    pub plan: Option<PlanFilter>,
    /// At or after.
    pub created_after: Option<Timestamp>,
    /// Strictly before.
    pub created_before: Option<Timestamp>,
    pub sort: UserSort,
    pub after: Option<UserCursor>,
    pub limit: u32,
}

impl UserQuery {
    /// The id prefix `q` could be: its hex digits without dashes, when it is nothing
    /// else (ids are compared as 32 hex digits).
    pub fn id_prefix(&self) -> Option<String> {
        let q = self.q.as_deref()?;
        let hex: String = q.chars().filter(|c| *c != '-').collect();
        (!hex.is_empty() && hex.len() <= 32 && hex.chars().all(|c| c.is_ascii_hexdigit()))
            .then(|| hex.to_ascii_lowercase())
    }

    /// A page of `limit` clamped to 1..=MAX_PAGE.
    pub fn page_size(&self) -> u32 {
        self.limit.clamp(1, MAX_PAGE)
    }
}

/// One page of users, with how many match the filters in all (cursor aside).
#[derive(Clone, Debug)]
pub struct UserPage {
    pub users: Vec<User>,
    pub total: u64,
    pub next: Option<UserCursor>,
}

impl UserPage {
    /// From up to `page_size + 1` rows read in order: one more than a page means
    /// there is a next page, which starts after the last user shown.
    pub fn from_rows(mut users: Vec<User>, total: u64, query: &UserQuery) -> Self {
        let size = query.page_size() as usize;
        let next = if users.len() > size {
            users.truncate(size);
            users.last().map(|u| UserCursor { value: query.sort.value_of(u), id: u.id })
        } else {
            None
        };
        Self { users, total, next }
    }
}

/// What an admin changes on a user; `None` leaves a field as it is. Suspending or
/// deleting ends every session (and every outstanding link) in the same transaction.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct UserChange {
    pub status: Option<UserStatus>,
    pub role: Option<Role>,
    pub name: Option<Option<String>>,
    /// Set as given; the admin vouches for it, so it stays verified as it was.
    pub email: Option<EmailAddress>,
}

impl UserChange {
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }

    /// Whether this change ends the user's sessions.
    pub fn ends_sessions(&self) -> bool {
        matches!(self.status, Some(UserStatus::Suspended | UserStatus::Deleted))
    }

    /// The audit action for this change of `before`: the status change when there is
    /// one, otherwise a generic update.
    pub fn action(&self, before: &User) -> &'static str {
        match self.status {
            Some(UserStatus::Deleted) => "admin.user.deleted",
            Some(UserStatus::Suspended) if before.status != UserStatus::Suspended => "admin.user.suspended",
            Some(UserStatus::Active) if before.status != UserStatus::Active => "admin.user.activated",
            _ if self.role.is_some_and(|r| r != before.role) => "admin.user.role_changed",
            _ => "admin.user.updated",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorts_parse_both_ways() {
        assert_eq!(UserSort::parse("-created"), Some(UserSort { field: UserSortField::Created, descending: true }));
        assert_eq!(UserSort::parse("email"), Some(UserSort { field: UserSortField::Email, descending: false }));
        assert_eq!(UserSort::parse("last_login").unwrap().as_string(), "last_login");
        assert_eq!(UserSort::parse("--email"), None);
        assert_eq!(UserSort::parse("name"), None);
    }

    #[test]
    fn only_hex_can_be_an_id_prefix() {
        let q = |s: &str| UserQuery { q: Some(s.into()), ..Default::default() };
        assert_eq!(q("0192AB-3c").id_prefix().as_deref(), Some("0192ab3c"));
        assert_eq!(q("ada@").id_prefix(), None);
        assert_eq!(q("-").id_prefix(), None);
        assert_eq!(q(&"a".repeat(33)).id_prefix(), None);
    }
}
