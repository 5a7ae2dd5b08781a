//! The Docker token scope grammar (distribution's `docs/content/spec/auth/scope.md`):
//!
//! ```text
//! scope          := resourcescope [ ' ' resourcescope ]*
//! resourcescope  := resourcetype ":" resourcename ":" action [ ',' action ]*
//! resourcetype   := resourcetypevalue [ '(' resourcetypevalue ')' ]
//! resourcename   := [ hostname '/' ] component [ '/' component ]*
//! action         := /[a-z]*/ | '*'
//! ```
//!
//! A resource name may start with `host:port/`, so the type is what precedes the first `:` and
//! the actions what follows the last. Parsing is strict: a name that is not the reference
//! grammar (upper case, `..`, `%2F`, empty components, over-long) is an error, not a scope that
//! grants nothing, so a client's mistake is reported instead of silently yielding an empty token.

use std::fmt;

/// The longest scope string accepted (a request may carry several).
pub const MAX_SCOPE_LEN: usize = 4096;
/// The longest resource name accepted, host included (the reference grammar's limit).
pub const MAX_NAME_LEN: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceScope {
    /// `repository`, `registry`, ... (without the class).
    pub resource_type: String,
    /// The part in parentheses, e.g. `plugin` in `repository(plugin)`.
    pub class: Option<String>,
    pub name: String,
    /// As requested, deduplicated, in order; `*` kept as is.
    pub actions: Vec<String>,
}

impl ResourceScope {
    /// The type as it is written in a scope and in a token's `access` claim.
    pub fn type_with_class(&self) -> String {
        match &self.class {
            Some(c) => format!("{}({c})", self.resource_type),
            None => self.resource_type.clone(),
        }
    }
}

impl fmt::Display for ResourceScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}",
            self.type_with_class(),
            self.name,
            self.actions.join(",")
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid scope {scope:?}: {reason}")]
pub struct ScopeError {
    pub scope: String,
    pub reason: &'static str,
}

fn type_value_ok(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// A registry host: DNS labels separated by `.`, an optional `:port`. Upper case is allowed in
/// host names by the reference grammar.
fn host_ok(h: &str) -> bool {
    let (host, port) = match h.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (h, None),
    };
    if let Some(port) = port
        && (port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()))
    {
        return false;
    }
    !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn name_ok(name: &str) -> bool {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return false;
    }
    let mut parts = name.split('/');
    let first = parts.next().unwrap_or_default();
    // A first component that could only be a host (a `.` or `:`, or `localhost`) is one,
    // as in the reference grammar; otherwise it is an ordinary path component.
    let first_is_host =
        name.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
    let first_ok = if first_is_host {
        host_ok(first)
    } else {
        oci::name::is_path_component(first)
    };
    first_ok && parts.all(oci::name::is_path_component)
}

fn action_ok(a: &str) -> bool {
    a == "*" || a.bytes().all(|b| b.is_ascii_lowercase())
}

/// Parses one resource scope.
pub fn parse_one(s: &str) -> Result<ResourceScope, ScopeError> {
    let err = |reason| ScopeError {
        scope: s.chars().take(120).collect(),
        reason,
    };
    let (type_part, rest) = s.split_once(':').ok_or_else(|| err("no ':'"))?;
    let (name, actions) = rest
        .rsplit_once(':')
        .ok_or_else(|| err("no actions after the name"))?;
    let (resource_type, class) = match type_part.split_once('(') {
        Some((t, c)) => {
            let c = c
                .strip_suffix(')')
                .ok_or_else(|| err("unclosed resource class"))?;
            if !type_value_ok(c) {
                return Err(err("resource class must be [a-z0-9]+"));
            }
            (t, Some(c.to_string()))
        }
        None => (type_part, None),
    };
    if !type_value_ok(resource_type) {
        return Err(err("resource type must be [a-z0-9]+"));
    }
    if !name_ok(name) {
        return Err(err("resource name is not a valid name"));
    }
    let mut list: Vec<String> = Vec::new();
    for a in actions.split(',') {
        if !action_ok(a) {
            return Err(err("actions must be [a-z]* or '*'"));
        }
        if !a.is_empty() && !list.iter().any(|x| x == a) {
            list.push(a.to_string());
        }
    }
    Ok(ResourceScope {
        resource_type: resource_type.to_string(),
        class,
        name: name.to_string(),
        actions: list,
    })
}

/// Parses a space-separated list of resource scopes (a `scope` parameter may hold several,
/// and a request may carry several `scope` parameters: call this for each).
pub fn parse(s: &str) -> Result<Vec<ResourceScope>, ScopeError> {
    if s.len() > MAX_SCOPE_LEN {
        return Err(ScopeError {
            scope: s.chars().take(120).collect(),
            reason: "scope too long",
        });
    }
    s.split(' ')
        .filter(|p| !p.is_empty())
        .map(parse_one)
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap in a test is the failure
mod tests {
    use super::*;

    fn check(input: &str, expected: Result<&str, &str>) {
        let got = parse(input).map(|v| {
            v.iter()
                .map(|s| format!("{s}"))
                .collect::<Vec<_>>()
                .join(" ")
        });
        match expected {
            Ok(want) => assert_eq!(got.as_deref(), Ok(want), "{input}"),
            Err(reason) => assert_eq!(got.map_err(|e| e.reason), Err(reason), "{input}"),
        }
    }

    #[test]
    fn the_scope_grammar() {
        check("repository:team/app:pull", Ok("repository:team/app:pull"));
        check(
            "repository:team/app:pull,push",
            Ok("repository:team/app:pull,push"),
        );
        check(
            "repository:team/app:push,pull,push",
            Ok("repository:team/app:push,pull"),
        );
        check("repository:a:*", Ok("repository:a:*"));
        check("registry:catalog:*", Ok("registry:catalog:*"));
        check(
            "repository(plugin):team/app:pull",
            Ok("repository(plugin):team/app:pull"),
        );
        check(
            "repository:localhost:5000/team/app:pull",
            Ok("repository:localhost:5000/team/app:pull"),
        );
        check(
            "repository:Registry.example.com/a:pull",
            Ok("repository:Registry.example.com/a:pull"),
        );
        check(
            "repository:a:pull repository:b/c:push",
            Ok("repository:a:pull repository:b/c:push"),
        );
        check("repository:a:", Ok("repository:a:"));
        check(
            "repository:a__b-c---d/e.f_g:pull",
            Ok("repository:a__b-c---d/e.f_g:pull"),
        );
        check(
            "repository:Team/app:pull",
            Err("resource name is not a valid name"),
        );
        check(
            "repository:team/../app:pull",
            Err("resource name is not a valid name"),
        );
        check(
            "repository:team/%2Fapp:pull",
            Err("resource name is not a valid name"),
        );
        check(
            "repository:team%2Fapp:pull",
            Err("resource name is not a valid name"),
        );
        check(
            "repository:team//app:pull",
            Err("resource name is not a valid name"),
        );
        check(
            "repository:team/app/:pull",
            Err("resource name is not a valid name"),
        );
        check(
            "repository:a___b:pull",
            Err("resource name is not a valid name"),
        );
        check("repository::pull", Err("resource name is not a valid name"));
        check(
            &format!("repository:{}:pull", "a".repeat(256)),
            Err("resource name is not a valid name"),
        );
        check("repository:a:PULL", Err("actions must be [a-z]* or '*'"));
        check("Repository:a:pull", Err("resource type must be [a-z0-9]+"));
        check("repository(:a:pull", Err("unclosed resource class"));
        check("repository", Err("no ':'"));
        check("repository:a", Err("no actions after the name"));
        check(&"repository:a:pull ".repeat(300), Err("scope too long"));
    }

    proptest::proptest! {
        #[test]
        fn the_parser_never_panics(s in "\\PC{0,300}") {
            let _ = parse(&s);
        }

        #[test]
        fn the_parser_never_panics_on_near_scopes(
            t in "[a-z()]{0,12}", n in "[a-zA-Z0-9./:_%-]{0,40}", a in "[a-z*,]{0,12}"
        ) {
            let _ = parse(&format!("{t}:{n}:{a}"));
        }

        #[test]
        fn what_parses_prints_back_the_same(
            n in "[a-z0-9]{1,8}(/[a-z0-9]{1,8}){0,3}", a in "(pull|push|delete|\\*)"
        ) {
            let s = format!("repository:{n}:{a}");
            let parsed = parse(&s).expect("valid scope");
            proptest::prop_assert_eq!(parsed[0].to_string(), s);
        }
    }
}
