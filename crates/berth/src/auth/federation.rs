//! CI identity federation: a CI job proves who it is with its own OIDC identity token (GitHub
//! Actions, GitLab CI, a Kubernetes service account), and a trust rule turns that identity into
//! a robot's rights. No secret is stored anywhere: the CI system signs, Berth checks the
//! signature against the issuer's published keys.
//!
//! A [`TrustRule`] names an issuer, the audience its tokens must be minted for, where the
//! issuer's keys are, conditions on the token's claims ([`conditions`](super::conditions)) and
//! the robot whose rights a matching token gets. [`matching`] finds the rules a token
//! satisfies; `Auth` then picks the robot and builds the principal, whose actor is
//! `Actor::Federated` (the robot, and `issuer#sub` of the CI identity).

use std::sync::Arc;

use super::conditions::{self, Expr};
use super::jwks::{self, Expect, JwksCache, JwtError, KeySource, Verified};
use crate::metadata::access::TrustRuleRow;

/// The OAuth2 token exchange grant (RFC 8693) a CI job may use at `POST /auth/token`.
pub const TOKEN_EXCHANGE_GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// Subject token types accepted in a token exchange.
pub const SUBJECT_TOKEN_TYPES: [&str; 2] = [
    "urn:ietf:params:oauth:token-type:jwt",
    "urn:ietf:params:oauth:token-type:id_token",
];
/// What a token exchange issues (RFC 8693 `issued_token_type`).
pub const ISSUED_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";

/// A trust rule as a node uses it: conditions parsed, JWKS location checked.
#[derive(Debug, Clone)]
pub struct TrustRule {
    pub name: String,
    pub issuer: String,
    pub audience: String,
    pub jwks: KeySource,
    pub conditions: Expr,
    pub robot_id: i64,
}

/// What a trust rule's fields must be; shared by adding a rule and loading one.
pub fn check_fields(
    name: &str,
    issuer: &str,
    audience: &str,
    jwks: &str,
    conditions: &str,
) -> Result<(KeySource, Expr), String> {
    if !super::manage::valid_account_name(name) {
        return Err(format!(
            "invalid trust rule name {name:?}: lower case letters, digits and ._- (at most 64)"
        ));
    }
    let issuer_ok = (issuer.starts_with("https://") || issuer.starts_with("http://"))
        && issuer.len() <= 1024
        && !issuer.contains(char::is_whitespace);
    if !issuer_ok {
        return Err(format!(
            "issuer {issuer:?} must be the exact `iss` of the CI system's tokens, an https:// URL \
             (e.g. https://token.actions.githubusercontent.com)"
        ));
    }
    if audience.is_empty() || audience.len() > 1024 {
        return Err("the audience must be 1 to 1024 characters".to_string());
    }
    let jwks = KeySource::parse(jwks)?;
    let conditions = conditions::parse(conditions).map_err(|e| e.to_string())?;
    Ok((jwks, conditions))
}

impl TrustRule {
    pub fn from_row(row: &TrustRuleRow) -> Result<TrustRule, String> {
        let (jwks, conditions) = check_fields(
            &row.name,
            &row.issuer,
            &row.audience,
            &row.jwks,
            &row.conditions,
        )?;
        Ok(TrustRule {
            name: row.name.clone(),
            issuer: row.issuer.clone(),
            audience: row.audience.clone(),
            jwks,
            conditions,
            robot_id: row.robot_id,
        })
    }
}

/// Why no rule took a token.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FederationError {
    #[error("not a JWT with an issuer")]
    NotAToken,
    #[error("no trust rule trusts tokens of issuer {0}")]
    UnknownIssuer(String),
    #[error("the token of {issuer} is refused: {error}")]
    Refused { issuer: String, error: JwtError },
}

/// A token that verified, and the rules whose conditions it satisfies (possibly none).
#[derive(Debug)]
pub struct Matched<'a> {
    pub issuer: String,
    pub verified: Verified,
    pub rules: Vec<&'a TrustRule>,
}

impl Matched<'_> {
    /// `issuer#sub`: the CI identity, as logs and the `act` claim name it.
    pub fn subject(&self) -> String {
        let sub = self.verified.claims["sub"].as_str().unwrap_or_default();
        format!("{}#{sub}", self.issuer)
    }
}

/// Verifies `token` for each rule of its issuer (once per JWKS and audience) and returns the
/// rules whose conditions its claims satisfy. A token that verifies for none of them is
/// refused with the reason; if one rule's keys could not be fetched, that is the reason given
/// (a retry may succeed).
pub async fn matching<'a>(
    cache: &Arc<JwksCache>,
    rules: impl IntoIterator<Item = &'a TrustRule>,
    token: &str,
    now: i64,
) -> Result<Matched<'a>, FederationError> {
    let issuer = jwks::unverified_issuer(token).ok_or(FederationError::NotAToken)?;
    let candidates: Vec<&TrustRule> = rules.into_iter().filter(|r| r.issuer == issuer).collect();
    if candidates.is_empty() {
        return Err(FederationError::UnknownIssuer(issuer));
    }
    let refused = |error| FederationError::Refused {
        issuer: issuer.clone(),
        error,
    };
    let (_, kid) = jwks::header(token).map_err(refused)?;
    let mut checked: Vec<(&KeySource, &str, Result<Verified, JwtError>)> = Vec::new();
    let mut matched = Vec::new();
    for rule in candidates {
        let known = checked
            .iter()
            .find(|(source, audience, _)| **source == rule.jwks && *audience == rule.audience);
        let result = match known {
            Some((_, _, result)) => result.clone(),
            None => {
                let expect = Expect {
                    issuer: &rule.issuer,
                    audience: &rule.audience,
                    require_iat: true,
                };
                let result = match cache.key(&rule.jwks, kid.as_deref()).await {
                    Ok(key) => jwks::verify(token, &key, expect, now).and_then(|v| {
                        if v.expired {
                            Err(JwtError::Expired)
                        } else {
                            Ok(v)
                        }
                    }),
                    Err(e) => Err(e),
                };
                checked.push((&rule.jwks, &rule.audience, result.clone()));
                result
            }
        };
        if let Ok(v) = &result
            && rule.conditions.eval(&v.claims)
        {
            matched.push(rule);
        }
    }
    let mut first_error = None;
    for (_, _, result) in checked {
        match result {
            Ok(verified) => {
                return Ok(Matched {
                    issuer,
                    verified,
                    rules: matched,
                });
            }
            Err(e @ JwtError::KeysUnavailable(_)) => first_error = Some(e),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    Err(refused(first_error.unwrap_or(JwtError::Malformed)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap in a test is the failure
mod tests {
    use super::*;
    use crate::auth::jwks::tests::{TestIssuer, now};
    use serde_json::json;

    const GITHUB: &str = "https://token.actions.githubusercontent.com";

    fn rule(dir: &std::path::Path, name: &str, audience: &str, conditions: &str) -> TrustRule {
        let row = TrustRuleRow {
            id: 0,
            name: name.into(),
            issuer: GITHUB.into(),
            audience: audience.into(),
            jwks: dir.join("jwks.json").display().to_string(),
            conditions: conditions.into(),
            robot_id: 1,
            created_at: 0,
        };
        TrustRule::from_row(&row).unwrap()
    }

    #[test]
    fn fields_are_checked_before_a_rule_is_stored() {
        let ok = (
            "ci",
            GITHUB,
            "berth",
            "/etc/jwks.json",
            r#"repository == "o/a""#,
        );
        assert!(check_fields(ok.0, ok.1, ok.2, ok.3, ok.4).is_ok());
        let cases = [
            ("Bad Name", ok.1, ok.2, ok.3, ok.4, "rule name"),
            (
                ok.0,
                "token.actions.githubusercontent.com",
                ok.2,
                ok.3,
                ok.4,
                "issuer",
            ),
            (ok.0, ok.1, "", ok.3, ok.4, "audience"),
            (ok.0, ok.1, ok.2, "jwks.json", ok.4, "absolute"),
            (ok.0, ok.1, ok.2, ok.3, "", "empty"),
            (ok.0, ok.1, ok.2, ok.3, "repository = \"x\"", "at byte 11"),
        ];
        for (name, issuer, audience, jwks, conditions, message) in cases {
            let e = check_fields(name, issuer, audience, jwks, conditions).unwrap_err();
            assert!(e.contains(message), "{e}");
        }
    }

    #[tokio::test]
    async fn tokens_match_the_rules_whose_audience_and_conditions_they_satisfy() {
        let dir = tempfile::tempdir().unwrap();
        let issuer = TestIssuer::new("k1");
        std::fs::write(
            dir.path().join("jwks.json"),
            json!({"keys": [issuer.jwk()]}).to_string(),
        )
        .unwrap();
        let rules = [
            rule(
                dir.path(),
                "main",
                "berth",
                r#"repository == "org/app" && ref == "refs/heads/main""#,
            ),
            rule(
                dir.path(),
                "tags",
                "berth",
                r#"repository == "org/app" && ref =~ "refs/tags/v*""#,
            ),
            rule(
                dir.path(),
                "elsewhere",
                "other",
                r#"repository == "org/app""#,
            ),
        ];
        let cache = JwksCache::new();
        let now = now();
        let token = |repository: &str, r#ref: &str, aud: &str| {
            issuer.sign(&json!({
                "iss": GITHUB, "aud": aud, "sub": format!("repo:{repository}:ref:{ref}"),
                "iat": now, "exp": now + 300, "repository": repository, "ref": r#ref,
            }))
        };
        let names = |m: &Matched<'_>| m.rules.iter().map(|r| r.name.clone()).collect::<Vec<_>>();

        let m = matching(
            &cache,
            &rules,
            &token("org/app", "refs/heads/main", "berth"),
            now,
        )
        .await
        .unwrap();
        assert_eq!(names(&m), ["main"]);
        assert_eq!(
            m.subject(),
            format!("{GITHUB}#repo:org/app:ref:refs/heads/main")
        );
        let m = matching(
            &cache,
            &rules,
            &token("org/app", "refs/tags/v1", "berth"),
            now,
        )
        .await
        .unwrap();
        assert_eq!(names(&m), ["tags"]);
        let m = matching(
            &cache,
            &rules,
            &token("org/app", "refs/tags/v1", "other"),
            now,
        )
        .await
        .unwrap();
        assert_eq!(names(&m), ["elsewhere"]);
        // Genuine, but its claims match no rule.
        for (repository, r#ref) in [
            ("org/evil", "refs/heads/main"),
            ("org/app", "refs/heads/dev"),
        ] {
            let m = matching(&cache, &rules, &token(repository, r#ref, "berth"), now)
                .await
                .unwrap();
            assert!(m.rules.is_empty(), "{repository} {ref}");
        }
        // Refused outright.
        let aud = matching(
            &cache,
            &rules,
            &token("org/app", "refs/heads/main", "x"),
            now,
        )
        .await;
        assert!(matches!(
            aud,
            Err(FederationError::Refused {
                error: JwtError::Invalid(_),
                ..
            })
        ));
        let stranger = TestIssuer::new("k2").sign(&json!({
            "iss": GITHUB, "aud": "berth", "sub": "x", "iat": now, "exp": now + 300,
        }));
        assert!(matches!(
            matching(&cache, &rules, &stranger, now).await,
            Err(FederationError::Refused {
                error: JwtError::UnknownKey,
                ..
            })
        ));
        let elsewhere = issuer.sign(&json!({
            "iss": "https://gitlab.com", "aud": "berth", "sub": "x", "iat": now, "exp": now + 300,
        }));
        assert_eq!(
            matching(&cache, &rules, &elsewhere, now).await.unwrap_err(),
            FederationError::UnknownIssuer("https://gitlab.com".into())
        );
        let late = token("org/app", "refs/heads/main", "berth");
        assert!(matches!(
            matching(&cache, &rules, &late, now + 301).await,
            Err(FederationError::Refused {
                error: JwtError::Expired,
                ..
            })
        ));
        assert_eq!(
            matching(&cache, &rules, "password", now).await.unwrap_err(),
            FederationError::NotAToken
        );
    }
}
