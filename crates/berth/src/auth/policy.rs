//! Who may change what through the management API: the authorization rules, written once, as
//! pure functions of an [`Authority`] (what the caller may manage) and an [`Op`] (what it asks
//! to do, with the facts a rule needs already looked up). No IO.
//!
//! - Administrators may do everything; so may everyone when access control is off.
//! - A namespace's owners may see it, manage its members, robots, webhooks and tag
//!   immutability rules, read its quota, and list, create and revoke the secrets of its
//!   robots. Global webhooks and setting quotas are for administrators.
//! - A user may see its own account, change its own password (giving the old one: see
//!   [`needs_old_password`]) and list, create and revoke its own personal access tokens.
//! - Everything else is refused. Robots, federated CI identities, personal access tokens
//!   limited to some grants, and registry tokens (bearer) are identified (`Op::Me`) but manage
//!   nothing: a limited token stays limited, and a registry token carries only the repository
//!   access it was issued for.
//! - A refusal never depends on whether the target exists: where a rule needs a fact about the
//!   target (whose secret is this?), a missing target is asked as `None`, which only an
//!   administrator passes (and then learns it is missing).

use std::collections::BTreeSet;

use super::rights::{Basis, Role};
use super::{Method, Principal};
use crate::service::Actor;

/// What a caller may manage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authority {
    /// An administrator (with a password, an unrestricted secret or a client certificate), or
    /// anyone when access control is off (`account` is then `None`).
    Admin { account: Option<String> },
    /// A user, proven with a password, an unrestricted personal access token or a client
    /// certificate; `owns` are the namespaces where it is owner.
    User {
        name: String,
        owns: BTreeSet<String>,
    },
    /// Identified (or anonymous, `None`) but managing nothing.
    Limited { account: Option<String> },
}

impl Authority {
    pub fn of(principal: &Principal, access_control: bool) -> Authority {
        if !access_control {
            return Authority::Admin { account: None };
        }
        let account = principal.account().map(str::to_string);
        // Only a credential that stands for the whole account manages: not a registry token
        // (its rights are its `access` claim), not a federated identity, not a restricted
        // personal token.
        let whole_account = principal.rights.restrict.is_none()
            && matches!(
                principal.method,
                Method::Password | Method::Secret | Method::ClientCertificate
            );
        match (&principal.actor, &principal.rights.basis, account) {
            (Actor::User(_), Basis::All, Some(name)) if whole_account => Authority::Admin {
                account: Some(name),
            },
            (Actor::User(_), Basis::Roles(roles), Some(name)) if whole_account => Authority::User {
                name,
                owns: roles
                    .iter()
                    .filter(|(_, role)| **role == Role::Owner)
                    .map(|(ns, _)| ns.clone())
                    .collect(),
            },
            (_, _, account) => Authority::Limited { account },
        }
    }

    /// The account acting, if any.
    pub fn account(&self) -> Option<&str> {
        match self {
            Authority::Admin { account } | Authority::Limited { account } => account.as_deref(),
            Authority::User { name, .. } => Some(name),
        }
    }

    pub fn is_admin(&self) -> bool {
        matches!(self, Authority::Admin { .. })
    }

    /// Whether a listing of namespaces shows `namespace`.
    pub fn sees(&self, namespace: &str) -> bool {
        permits(self, &Op::ReadNamespace(namespace))
    }

    pub fn owns(&self, namespace: &str) -> bool {
        match self {
            Authority::Admin { .. } => true,
            Authority::User { owns, .. } => owns.contains(namespace),
            Authority::Limited { .. } => false,
        }
    }

    fn is_user(&self, account: &str) -> bool {
        matches!(self, Authority::User { name, .. } if name == account)
    }
}

/// The account a secret belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holder<'a> {
    pub account: &'a str,
    /// The robot's namespace, when the account is a robot.
    pub robot_of: Option<&'a str>,
}

/// What a caller asks to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op<'a> {
    /// Who am I: anyone identified.
    Me,
    ListUsers,
    CreateUser,
    ReadUser(&'a str),
    DeleteUser(&'a str),
    SetPassword(&'a str),
    /// Listing namespaces: each caller sees those [`Authority::sees`] allows.
    ListNamespaces,
    CreateNamespace,
    /// Reading a namespace, its members and its robots.
    ReadNamespace(&'a str),
    /// The namespace itself: its public flag, its deletion.
    ChangeNamespace(&'a str),
    /// Its members and robots.
    ManageNamespace(&'a str),
    /// Listing, creating or revoking an account's secrets; `None`: no such account or secret.
    Secrets(Option<Holder<'a>>),
    RotateKeys,
    /// Reading the event log: of one namespace, or (`None`) all of it.
    ReadAudit(Option<&'a str>),
    /// Listing webhooks: each caller sees those of the namespaces it owns (all for admins).
    ListWebhooks,
    /// Creating, reading, deleting or replaying a webhook of a namespace, or (`None`) a global
    /// one or one that does not exist.
    Webhooks(Option<&'a str>),
    /// Listing or restoring the trash of a namespace, or (`None`) all of it or an entry that
    /// does not exist.
    Trash(Option<&'a str>),
    /// Running garbage collection.
    RunGc,
    /// Reading the quarantined blobs and the scrub's progress (they name repositories of
    /// every namespace).
    ReadQuarantine,
    /// Managing retention policies whose pattern stays within a namespace, or (`None`) any
    /// other, and reading the plan of all of them.
    Retention(Option<&'a str>),
    /// Listing retention policies: each caller sees those it may manage.
    ListRetention,
    /// Listing, adding or removing a namespace's tag immutability rules.
    Immutability(&'a str),
    /// Reading a namespace's quota and usage.
    ReadQuota(&'a str),
    /// Setting or removing a namespace's quota.
    SetQuota(&'a str),
}

/// The rules. See the module doc.
pub fn permits(who: &Authority, op: &Op<'_>) -> bool {
    if who.is_admin() {
        return true;
    }
    match *op {
        Op::Me => true,
        Op::ListNamespaces | Op::ListWebhooks | Op::ListRetention => {
            matches!(who, Authority::User { .. })
        }
        Op::Webhooks(Some(ns)) | Op::Trash(Some(ns)) | Op::Retention(Some(ns)) => who.owns(ns),
        Op::ReadUser(name) | Op::SetPassword(name) => who.is_user(name),
        Op::ReadNamespace(ns)
        | Op::ManageNamespace(ns)
        | Op::ReadAudit(Some(ns))
        | Op::Immutability(ns)
        | Op::ReadQuota(ns) => who.owns(ns),
        Op::Secrets(Some(holder)) => {
            who.is_user(holder.account) || holder.robot_of.is_some_and(|ns| who.owns(ns))
        }
        Op::Secrets(None)
        | Op::ListUsers
        | Op::CreateUser
        | Op::DeleteUser(_)
        | Op::CreateNamespace
        | Op::ChangeNamespace(_)
        | Op::SetQuota(_)
        | Op::Webhooks(None)
        | Op::RotateKeys
        | Op::ReadAudit(None)
        | Op::Trash(None)
        | Op::Retention(None)
        | Op::RunGc
        | Op::ReadQuarantine => false,
    }
}

/// Whether changing `account`'s password needs its current one: always when it is the
/// caller's own (administrators too), so that a stolen personal token or an unattended
/// session cannot take the account over; never when an administrator sets another's.
pub fn needs_old_password(who: &Authority, account: &str) -> bool {
    who.account() == Some(account)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use super::*;
    use crate::auth::rights::{Grant, Rights};

    fn principal(actor: Actor, basis: Basis, method: Method, restricted: bool) -> Principal {
        Principal {
            actor,
            rights: Rights {
                basis,
                restrict: restricted
                    .then(|| vec![Grant::parse("team/*:pull").unwrap_or_else(|e| panic!("{e}"))]),
                public: Arc::default(),
            },
            credential: None,
            catalog: true,
            method,
        }
    }

    fn user(name: &str, roles: &[(&str, Role)]) -> Principal {
        let roles: HashMap<String, Role> = roles.iter().map(|(n, r)| (n.to_string(), *r)).collect();
        principal(
            Actor::User(name.into()),
            Basis::Roles(roles),
            Method::Password,
            false,
        )
    }

    #[test]
    fn only_whole_account_credentials_manage() {
        let admin = |method, restricted| {
            Authority::of(
                &principal(Actor::User("root".into()), Basis::All, method, restricted),
                true,
            )
        };
        let root = Some("root".to_string());
        for (what, got, want) in [
            (
                "password",
                admin(Method::Password, false),
                Authority::Admin {
                    account: root.clone(),
                },
            ),
            (
                "secret",
                admin(Method::Secret, false),
                Authority::Admin {
                    account: root.clone(),
                },
            ),
            (
                "certificate",
                admin(Method::ClientCertificate, false),
                Authority::Admin {
                    account: root.clone(),
                },
            ),
            (
                "restricted",
                admin(Method::Secret, true),
                Authority::Limited {
                    account: root.clone(),
                },
            ),
            (
                "registry token",
                admin(Method::Token, false),
                Authority::Limited {
                    account: root.clone(),
                },
            ),
            (
                "robot",
                Authority::of(
                    &principal(
                        Actor::Robot("team+ci".into()),
                        Basis::Grants(vec![]),
                        Method::Secret,
                        false,
                    ),
                    true,
                ),
                Authority::Limited {
                    account: Some("team+ci".into()),
                },
            ),
            (
                "anonymous",
                Authority::of(
                    &principal(Actor::Anonymous, Basis::Nothing, Method::None, false),
                    true,
                ),
                Authority::Limited { account: None },
            ),
            (
                "access control off",
                Authority::of(
                    &principal(Actor::Anonymous, Basis::All, Method::None, false),
                    false,
                ),
                Authority::Admin { account: None },
            ),
            (
                "owner",
                Authority::of(
                    &user("alice", &[("team", Role::Owner), ("lib", Role::Writer)]),
                    true,
                ),
                Authority::User {
                    name: "alice".into(),
                    owns: ["team".to_string()].into(),
                },
            ),
        ] {
            assert_eq!(got, want, "{what}");
        }
    }

    #[test]
    fn the_rules() {
        let admin = Authority::Admin {
            account: Some("root".into()),
        };
        let alice = Authority::of(&user("alice", &[("team", Role::Owner)]), true);
        let bob = Authority::of(&user("bob", &[("team", Role::Maintainer)]), true);
        let robot = Authority::Limited {
            account: Some("team+ci".into()),
        };
        let team_robot = Holder {
            account: "team+ci",
            robot_of: Some("team"),
        };
        let other_robot = Holder {
            account: "lib+ci",
            robot_of: Some("lib"),
        };
        let bobs = Holder {
            account: "bob",
            robot_of: None,
        };
        // (op, [admin, alice (owner of team), bob (maintainer of team), robot])
        let table: &[(Op<'_>, [bool; 4])] = &[
            (Op::Me, [true, true, true, true]),
            (Op::ListUsers, [true, false, false, false]),
            (Op::CreateUser, [true, false, false, false]),
            (Op::ReadUser("bob"), [true, false, true, false]),
            (Op::DeleteUser("bob"), [true, false, false, false]),
            (Op::SetPassword("bob"), [true, false, true, false]),
            (Op::ListNamespaces, [true, true, true, false]),
            (Op::CreateNamespace, [true, false, false, false]),
            (Op::ReadNamespace("team"), [true, true, false, false]),
            (Op::ReadNamespace("lib"), [true, false, false, false]),
            (Op::ChangeNamespace("team"), [true, false, false, false]),
            (Op::ManageNamespace("team"), [true, true, false, false]),
            (Op::ManageNamespace("lib"), [true, false, false, false]),
            (Op::Secrets(Some(bobs)), [true, false, true, false]),
            (Op::Secrets(Some(team_robot)), [true, true, false, false]),
            (Op::Secrets(Some(other_robot)), [true, false, false, false]),
            (Op::Secrets(None), [true, false, false, false]),
            (Op::RotateKeys, [true, false, false, false]),
            (Op::ListWebhooks, [true, true, true, false]),
            (Op::Webhooks(Some("team")), [true, true, false, false]),
            (Op::Webhooks(Some("lib")), [true, false, false, false]),
            (Op::Webhooks(None), [true, false, false, false]),
            (Op::Trash(Some("team")), [true, true, false, false]),
            (Op::Trash(Some("lib")), [true, false, false, false]),
            (Op::Trash(None), [true, false, false, false]),
            (Op::RunGc, [true, false, false, false]),
            (Op::ReadQuarantine, [true, false, false, false]),
            (Op::Retention(Some("team")), [true, true, false, false]),
            (Op::Retention(None), [true, false, false, false]),
            (Op::Immutability("team"), [true, true, false, false]),
            (Op::Immutability("lib"), [true, false, false, false]),
            (Op::ReadQuota("team"), [true, true, false, false]),
            (Op::ReadQuota("lib"), [true, false, false, false]),
            (Op::SetQuota("team"), [true, false, false, false]),
        ];
        for (op, expected) in table {
            for (who, want) in [&admin, &alice, &bob, &robot].iter().zip(expected) {
                assert_eq!(permits(who, op), *want, "{who:?} {op:?}");
            }
        }
        assert!(needs_old_password(&bob, "bob"));
        assert!(needs_old_password(&admin, "root"));
        assert!(!needs_old_password(&admin, "bob"));
        assert!(!needs_old_password(
            &Authority::Admin { account: None },
            "bob"
        ));
    }
}
