//! What an identity may do: roles per namespace, robot grants, and the rights a request
//! carries. Pure data and rules; no IO.
//!
//! A namespace is a repository name's first path segment. Roles are ordered, each including
//! the one below: reader (pull) < writer (push) < maintainer (delete, tag rules) < owner
//! (members, robots). A public namespace lets anyone pull. A system administrator may do
//! everything.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// What a request does to a repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Pull,
    Push,
    Delete,
}

impl Action {
    pub const ALL: [Action; 3] = [Action::Pull, Action::Push, Action::Delete];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Pull => "pull",
            Action::Push => "push",
            Action::Delete => "delete",
        }
    }

    /// The actions a scope's action names ask for (`*` is all of them; unknown names none).
    pub fn from_scope(names: &[String]) -> Vec<Action> {
        let mut out = Vec::new();
        for n in names {
            let add: &[Action] = match n.as_str() {
                "*" => &Action::ALL,
                "pull" => &[Action::Pull],
                "push" => &[Action::Push],
                "delete" => &[Action::Delete],
                _ => &[],
            };
            for a in add {
                if !out.contains(a) {
                    out.push(*a);
                }
            }
        }
        out
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Reader,
    Writer,
    Maintainer,
    Owner,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Writer => "writer",
            Role::Maintainer => "maintainer",
            Role::Owner => "owner",
        }
    }

    pub fn allows(self, action: Action) -> bool {
        match action {
            Action::Pull => true,
            Action::Push => self >= Role::Writer,
            Action::Delete => self >= Role::Maintainer,
        }
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        Ok(match s {
            "reader" => Role::Reader,
            "writer" => Role::Writer,
            "maintainer" => Role::Maintainer,
            "owner" => Role::Owner,
            _ => {
                return Err(format!(
                    "unknown role {s:?} (reader, writer, maintainer, owner)"
                ));
            }
        })
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The namespace of a repository name: its first path segment.
pub fn namespace_of(repository: &str) -> &str {
    repository.split_once('/').map_or(repository, |(ns, _)| ns)
}

/// Some actions on the repositories a pattern matches: an exact name, or a pattern where `*`
/// matches any run of characters, `/` included (`team/*` is every repository under `team`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub repositories: String,
    pub actions: Vec<Action>,
}

impl Grant {
    pub fn covers(&self, repository: &str, action: Action) -> bool {
        self.actions.contains(&action) && glob_match(&self.repositories, repository)
    }

    /// Whether every repository the pattern can match lies in `namespace`.
    pub fn within(&self, namespace: &str) -> bool {
        let p = &self.repositories;
        p == namespace
            || p.strip_prefix(namespace)
                .is_some_and(|rest| rest.starts_with('/'))
    }

    /// Parses `PATTERN:ACTION[,ACTION]` as the command line writes a grant.
    pub fn parse(s: &str) -> Result<Grant, String> {
        let (pattern, actions) = s.rsplit_once(':').ok_or_else(|| {
            format!("grant {s:?}: expected PATTERN:ACTIONS, e.g. team/*:pull,push")
        })?;
        let valid_pattern = !pattern.is_empty()
            && pattern.len() <= 255
            && pattern
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/*".contains(&b));
        if !valid_pattern {
            return Err(format!("grant {s:?}: invalid repository pattern"));
        }
        let mut list = Vec::new();
        for a in actions.split(',') {
            let action = match a {
                "pull" => Action::Pull,
                "push" => Action::Push,
                "delete" => Action::Delete,
                _ => {
                    return Err(format!(
                        "grant {s:?}: unknown action {a:?} (pull, push, delete)"
                    ));
                }
            };
            if !list.contains(&action) {
                list.push(action);
            }
        }
        Ok(Grant {
            repositories: pattern.to_string(),
            actions: list,
        })
    }
}

impl fmt::Display for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let actions: Vec<&str> = self.actions.iter().map(|a| a.as_str()).collect();
        write!(f, "{}:{}", self.repositories, actions.join(","))
    }
}

/// `*` matches any run of characters; everything else literally.
fn glob_match(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// Where an identity's rights come from.
#[derive(Debug, Clone)]
pub enum Basis {
    /// Everything: a system administrator, or a registry with access control off.
    All,
    /// A user's roles, by namespace.
    Roles(HashMap<String, Role>),
    /// Exactly these grants: a robot's, or what a bearer token's `access` claim lists.
    Grants(Vec<Grant>),
    /// Nothing of its own: anonymous.
    Nothing,
}

/// The rights a request carries.
#[derive(Debug, Clone)]
pub struct Rights {
    pub basis: Basis,
    /// A personal access token's limit: at most these, whatever the user may do.
    pub restrict: Option<Vec<Grant>>,
    /// Namespaces anyone may pull from.
    pub public: Arc<HashSet<String>>,
}

impl Rights {
    /// Everything (access control off, or an administrator).
    pub fn all() -> Rights {
        Rights {
            basis: Basis::All,
            restrict: None,
            public: Arc::default(),
        }
    }

    pub fn anonymous(public: Arc<HashSet<String>>) -> Rights {
        Rights {
            basis: Basis::Nothing,
            restrict: None,
            public,
        }
    }

    pub fn may(&self, repository: &str, action: Action) -> bool {
        let namespace = namespace_of(repository);
        let own = match &self.basis {
            Basis::All => true,
            Basis::Roles(roles) => roles.get(namespace).is_some_and(|r| r.allows(action)),
            Basis::Grants(grants) => grants.iter().any(|g| g.covers(repository, action)),
            Basis::Nothing => false,
        };
        let public = action == Action::Pull && self.public.contains(namespace);
        (own || public)
            && self
                .restrict
                .as_ref()
                .is_none_or(|grants| grants.iter().any(|g| g.covers(repository, action)))
    }

    pub fn is_all(&self) -> bool {
        matches!(self.basis, Basis::All) && self.restrict.is_none()
    }

    /// The subset of `wanted` these rights allow on `repository`.
    pub fn allowed(&self, repository: &str, wanted: &[Action]) -> Vec<Action> {
        wanted
            .iter()
            .copied()
            .filter(|a| self.may(repository, *a))
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap in a test is the failure
mod tests {
    use super::*;

    #[test]
    fn globs() {
        for (pattern, text, want) in [
            ("team/*", "team/app", true),
            ("team/*", "team/a/b", true),
            ("team/*", "team", false),
            ("team/*", "teamx/app", false),
            ("team/app", "team/app", true),
            ("team/app", "team/app2", false),
            ("*", "anything/at/all", true),
            ("team/*-dev", "team/app-dev", true),
            ("team/*-dev", "team/app-prod", false),
            ("a*b*c", "abc", true),
            ("a*b*c", "acb", false),
        ] {
            assert_eq!(glob_match(pattern, text), want, "{pattern} ~ {text}");
        }
    }

    #[test]
    fn roles_include_the_ones_below() {
        let roles = |r: Role| Rights {
            basis: Basis::Roles(HashMap::from([("team".to_string(), r)])),
            restrict: None,
            public: Arc::default(),
        };
        let table = [
            (Role::Reader, [true, false, false]),
            (Role::Writer, [true, true, false]),
            (Role::Maintainer, [true, true, true]),
            (Role::Owner, [true, true, true]),
        ];
        for (role, expected) in table {
            for (action, want) in Action::ALL.iter().zip(expected) {
                assert_eq!(
                    roles(role).may("team/app", *action),
                    want,
                    "{role} {action}"
                );
                assert!(!roles(role).may("other/app", *action));
            }
        }
    }

    #[test]
    fn public_namespaces_and_restrictions() {
        let public: Arc<HashSet<String>> = Arc::new(["lib".to_string()].into());
        let anon = Rights::anonymous(public.clone());
        assert!(anon.may("lib/alpine", Action::Pull));
        assert!(!anon.may("lib/alpine", Action::Push));
        assert!(!anon.may("team/app", Action::Pull));
        let pat = Rights {
            basis: Basis::Roles(HashMap::from([("team".to_string(), Role::Owner)])),
            restrict: Some(vec![Grant::parse("team/app:pull").unwrap()]),
            public,
        };
        assert!(pat.may("team/app", Action::Pull));
        assert!(!pat.may("team/app", Action::Push));
        assert!(!pat.may("team/other", Action::Pull));
    }

    #[test]
    fn grants_parse_and_stay_in_their_namespace() {
        let g = Grant::parse("team/*:pull,push").unwrap();
        assert!(g.within("team"));
        assert!(!g.within("tea"));
        assert!(!Grant::parse("*:pull").unwrap().within("team"));
        assert!(Grant::parse("team/*:fly").is_err());
        assert!(Grant::parse("Team/*:pull").is_err());
        assert!(Grant::parse("team").is_err());
        assert_eq!(g.to_string(), "team/*:pull,push");
    }
}
