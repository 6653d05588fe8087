//! The admin side: user lists (filters, order, keyset pages, totals) and admin changes.

use std::collections::HashSet;
use std::sync::Arc;

use time::Duration;

use super::{audit, new_user, session_for, t0};
use crate::admin::{PlanFilter, UserChange, UserQuery, UserSort};
use crate::audit::{Actor, AuditEvent, AuditQuery, RequestOrigin, Severity};
use crate::identity::{EmailAddress, RefreshOutcome, Role, SecretToken, UserStatus};
use crate::ids::UserId;
use crate::store::{Rotation, Store, StoreError};

async fn all_pages(store: &Arc<dyn Store>, mut query: UserQuery) -> Vec<UserId> {
    let mut seen = vec![];
    loop {
        let page = store.admin_users(query.clone()).await.unwrap();
        seen.extend(page.users.iter().map(|u| u.id));
        match page.next {
            Some(next) => query.after = Some(next),
            None => return seen,
        }
    }
}

pub async fn admin_user_lists_filter_sort_and_page(store: Arc<dyn Store>) {
    let now = t0();
    let mut ids = vec![];
    for (i, email) in ["carol@example.com", "ada@example.com", "bob@example.org", "dan@example.com"].iter().enumerate()
    {
        let mut u = new_user(email, now + Duration::seconds(i as i64));
        u.name = Some(format!("Person {i}"));
        if i == 3 {
            u.role = Role::Admin;
        }
        ids.push(store.create_user(u, None, audit("user.registered", now)).await.unwrap().id);
    }
    let base = UserQuery { limit: 2, ..Default::default() };
    let page = store.admin_users(base.clone()).await.unwrap();
    assert_eq!(page.total, 4);
    assert_eq!(page.users.iter().map(|u| u.id).collect::<Vec<_>>(), vec![ids[3], ids[2]], "newest first");
    assert_eq!(all_pages(&store, base.clone()).await, vec![ids[3], ids[2], ids[1], ids[0]]);
    let by_email = UserQuery { sort: UserSort::parse("email").unwrap(), ..base.clone() };
    assert_eq!(all_pages(&store, by_email).await, vec![ids[1], ids[2], ids[0], ids[3]]);
    let by_email_desc = UserQuery { sort: UserSort::parse("-email").unwrap(), ..base.clone() };
    assert_eq!(all_pages(&store, by_email_desc).await, vec![ids[3], ids[0], ids[2], ids[1]]);

    // q: email substring, name substring (any case), id prefix.
    let q = |s: &str| UserQuery { q: Some(s.into()), limit: 50, ..Default::default() };
    assert_eq!(store.admin_users(q("example.org")).await.unwrap().total, 1);
    assert_eq!(store.admin_users(q("person 2")).await.unwrap().users[0].id, ids[2]);
    let full = ids[1].to_string();
    let found = store.admin_users(q(&full)).await.unwrap();
    assert_eq!(found.users.iter().map(|u| u.id).collect::<Vec<_>>(), vec![ids[1]]);
    assert!(store.admin_users(q(&full[..13])).await.unwrap().users.iter().any(|u| u.id == ids[1]));
    assert_eq!(store.admin_users(q("%")).await.unwrap().total, 0, "no wildcards");

    let role = UserQuery { role: Some(Role::Admin), limit: 50, ..Default::default() };
    assert_eq!(store.admin_users(role).await.unwrap().users[0].id, ids[3]);
    let window = UserQuery {
        created_after: Some(now + Duration::seconds(1)),
        created_before: Some(now + Duration::seconds(3)),
        limit: 50,
        ..Default::default()
    };
    assert_eq!(store.admin_users(window).await.unwrap().total, 2);

    // Plans: a live subscription's plan; the default plan for the others.
    let carol = store.user_by_id(ids[0]).await.unwrap().unwrap();
    let sub = super::manual_subscription(carol.account_id, "pro", now);
    store.put_subscription(sub, None, audit("subscription.changed", now)).await.unwrap();
    let plan = |key: &str, is_default| UserQuery {
        plan: Some(PlanFilter { key: key.into(), is_default }),
        limit: 50,
        ..Default::default()
    };
    let pro = store.admin_users(plan("pro", false)).await.unwrap();
    assert_eq!((pro.total, pro.users[0].id), (1, ids[0]));
    assert_eq!(store.admin_users(plan("free", true)).await.unwrap().total, 3);

    // Deleted users are left out unless asked for.
    store
        .admin_update_user(
            ids[2],
            UserChange { status: Some(UserStatus::Deleted), ..Default::default() },
            audit("admin.user.deleted", now),
        )
        .await
        .unwrap();
    assert_eq!(store.admin_users(base.clone()).await.unwrap().total, 3);
    let deleted = UserQuery { status: Some(UserStatus::Deleted), ..base.clone() };
    assert_eq!(store.admin_users(deleted).await.unwrap().users[0].id, ids[2]);
}

pub async fn admin_user_pages_are_stable_under_inserts(store: Arc<dyn Store>) {
    let now = t0();
    let mut ids = HashSet::new();
    for i in 0..7 {
        let u = new_user(&format!("u{i}@example.com"), now + Duration::milliseconds(i));
        ids.insert(store.create_user(u, None, audit("user.registered", now)).await.unwrap().id);
    }
    for sort in ["created", "-created", "email", "-email", "last_login", "-last_login"] {
        let mut query = UserQuery { limit: 3, sort: UserSort::parse(sort).unwrap(), ..Default::default() };
        let mut seen = vec![];
        let mut inserted = 0;
        loop {
            let page = store.admin_users(query.clone()).await.unwrap();
            seen.extend(page.users.iter().map(|u| u.id));
            // Someone registers between two pages.
            let u = new_user(&format!("{sort}-{inserted}@example.net"), now + Duration::seconds(10 + inserted));
            store.create_user(u, None, audit("user.registered", now)).await.unwrap();
            inserted += 1;
            match page.next {
                Some(next) => query.after = Some(next),
                None => break,
            }
        }
        let unique: HashSet<UserId> = seen.iter().copied().collect();
        assert_eq!(unique.len(), seen.len(), "{sort}: no user twice");
        assert!(ids.is_subset(&unique), "{sort}: every user present before paging was seen");
    }
}

pub async fn admin_suspension_ends_sessions_in_one_transaction(store: Arc<dyn Store>) {
    let now = t0();
    let user = store.create_user(new_user("ada@example.com", now), None, audit("a", now)).await.unwrap();
    let (refresh, s) = session_for(user.id, now);
    store.create_session(s, audit("login.succeeded", now)).await.unwrap();
    let admin = UserId::new();
    let origin = RequestOrigin { ip: Some("10.1.1.1".into()), user_agent: Some("admin-ui".into()), impersonator: None };
    let event = AuditEvent::new(Actor::User(admin), "admin.user.suspended", &origin, now + Duration::seconds(1))
        .severity(Severity::Warning);
    let change = UserChange { status: Some(UserStatus::Suspended), name: Some(None), ..Default::default() };
    let after = store.admin_update_user(user.id, change, event.clone()).await.unwrap();
    assert_eq!(after.status, UserStatus::Suspended);
    assert_eq!(after.name, None);
    assert!(store.list_sessions(user.id, now).await.unwrap().is_empty(), "sessions revoked");
    let rotation = Rotation { presented: refresh.digest(), replacement: SecretToken::generate().digest(), now };
    assert_eq!(store.rotate_refresh_token(rotation).await.unwrap(), RefreshOutcome::Invalid);
    let events = store
        .list_audit(AuditQuery { action: Some("admin.user.suspended".into()), limit: 10, ..Default::default() })
        .await
        .unwrap();
    assert_eq!(events, vec![event.target_user(user.id)], "one event, targeted at the user");
    let by_actor = AuditQuery {
        actor: Some(Actor::User(admin)),
        severity: Some(Severity::Warning),
        limit: 10,
        ..Default::default()
    };
    assert_eq!(store.list_audit(by_actor).await.unwrap().len(), 1);
    let at = now + Duration::seconds(1);
    let window = |from, to| AuditQuery { from, to, actor: Some(Actor::User(admin)), limit: 10, ..Default::default() };
    assert_eq!(store.list_audit(window(Some(at), None)).await.unwrap().len(), 1, "from is inclusive");
    assert_eq!(store.list_audit(window(None, Some(at))).await.unwrap().len(), 0, "to is exclusive");
    let target = AuditQuery { target: Some(("user".into(), user.id.to_string())), limit: 10, ..Default::default() };
    assert!(store.list_audit(target).await.unwrap().iter().any(|e| e.action == "admin.user.suspended"));
    let other = AuditQuery {
        severity: Some(Severity::Critical),
        actor: Some(Actor::User(admin)),
        limit: 10,
        ..Default::default()
    };
    assert!(store.list_audit(other).await.unwrap().is_empty());

    // Role and email; a taken email is a conflict and changes nothing.
    store.create_user(new_user("bob@example.com", now), None, audit("a", now)).await.unwrap();
    let taken = UserChange {
        email: Some(EmailAddress::parse("bob@example.com").unwrap()),
        role: Some(Role::Admin),
        ..Default::default()
    };
    let err = store.admin_update_user(user.id, taken, audit("admin.user.updated", now)).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict("users_email")), "{err:?}");
    assert_eq!(store.user_by_id(user.id).await.unwrap().unwrap().role, Role::User, "nothing written");
    let n = store.list_audit(AuditQuery { action: Some("admin.user.updated".into()), limit: 10, ..Default::default() });
    assert!(n.await.unwrap().is_empty(), "no audit event for a refused change");

    // Deletion frees the email; a deleted user can no longer be changed.
    let delete = UserChange { status: Some(UserStatus::Deleted), ..Default::default() };
    store.admin_update_user(user.id, delete.clone(), audit("admin.user.deleted", now)).await.unwrap();
    assert!(store.user_by_email(&user.email).await.unwrap().is_none());
    store.create_user(new_user("ada@example.com", now), None, audit("a", now)).await.unwrap();
    let err = store.admin_update_user(user.id, delete, audit("admin.user.deleted", now)).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound));
    assert!(store.admin_update_user(UserId::new(), UserChange::default(), audit("x", now)).await.is_err());
    // The deleted row is kept, for the audit trail.
    assert_eq!(store.user_by_id(user.id).await.unwrap().unwrap().status, UserStatus::Deleted);

    // The audit log pages by (time, id), newest first.
    let mut before = None;
    let mut seen = 0;
    loop {
        let page = store.list_audit(AuditQuery { before, limit: 2, ..Default::default() }).await.unwrap();
        if page.is_empty() {
            break;
        }
        seen += page.len();
        before = page.last().map(|e| (e.created_at, e.id));
    }
    assert_eq!(seen, store.list_audit(AuditQuery { limit: 1000, ..Default::default() }).await.unwrap().len());
}

pub async fn impersonation_sessions_do_not_count_as_logins(store: Arc<dyn Store>) {
    let now = t0();
    let user = store.create_user(new_user("ada@example.com", now), None, audit("a", now)).await.unwrap();
    let admin = UserId::new();
    let (refresh, s) = session_for(user.id, now);
    let origin = RequestOrigin::default();
    let event =
        AuditEvent::new(Actor::User(admin), "admin.user.impersonated", &origin, now).severity(Severity::Critical);
    let session = store.start_impersonation(s, event.clone()).await.unwrap();
    assert_eq!(session.user_id, user.id);
    assert_eq!(store.user_by_id(user.id).await.unwrap().unwrap().last_login_at, None, "not a login");
    assert_eq!(store.list_sessions(user.id, now).await.unwrap(), vec![session.clone()], "visible to the user");
    let rotation = Rotation { presented: refresh.digest(), replacement: SecretToken::generate().digest(), now };
    assert_eq!(store.rotate_refresh_token(rotation).await.unwrap(), RefreshOutcome::Invalid, "no refresh token");
    let logged = store.list_audit(AuditQuery { target_user: Some(user.id), limit: 10, ..Default::default() });
    assert_eq!(logged.await.unwrap()[0], event.target_user(user.id));

    // Only active users.
    let suspend = UserChange { status: Some(UserStatus::Suspended), ..Default::default() };
    store.admin_update_user(user.id, suspend, audit("admin.user.suspended", now)).await.unwrap();
    let (_, s) = session_for(user.id, now);
    let err = store.start_impersonation(s, audit("admin.user.impersonated", now)).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound), "{err:?}");
    let (_, s) = session_for(UserId::new(), now);
    assert!(store.start_impersonation(s, audit("admin.user.impersonated", now)).await.is_err());
}
