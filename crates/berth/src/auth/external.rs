//! External token issuers: sites that already run a token server (Distribution's token auth,
//! for instance) may keep it. Berth accepts its bearer tokens besides its own: the `access`
//! claim (the Docker token format) is what the token may do, `sub` who acts (an identity of that
//! server's, no account here).
//!
//! They are listed in a TOML file named by the `trusted_issuers_file` config key:
//!
//! ```toml
//! [[issuer]]
//! issuer = "https://auth.example.com"        # the tokens' `iss`, exactly
//! audience = "registry.example.com"          # their `aud` (Distribution: the `service`)
//! jwks = "https://auth.example.com/jwks"     # a JWKS URL or file, or:
//! # public_key_file = "/etc/berth/auth.pem"  # an RSA or EC (P-256) public key in PEM
//! ```
//!
//! Relative file names are relative to the file that lists them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;

use super::jwks::{self, Expect, JwksCache, JwtError, KeySource, Verified, VerifyingKey};
use super::token::AccessClaim;

#[derive(Debug, Clone)]
pub struct ExternalIssuer {
    pub issuer: String,
    pub audience: String,
    pub keys: IssuerKeys,
}

#[derive(Debug, Clone)]
pub enum IssuerKeys {
    Jwks(KeySource),
    Pem(Arc<VerifyingKey>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    issuer: Vec<Entry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    issuer: String,
    audience: String,
    jwks: Option<String>,
    public_key_file: Option<PathBuf>,
}

/// Reads the list of trusted issuers (and their PEM keys) from `path`.
pub fn load(path: &Path) -> Result<Vec<ExternalIssuer>, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    parse(&text, base).map_err(|e| format!("{}: {e}", path.display()))
}

/// Parses the file's text; relative paths are taken from `base`.
pub fn parse(text: &str, base: &Path) -> Result<Vec<ExternalIssuer>, String> {
    let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
    let mut out: Vec<ExternalIssuer> = Vec::new();
    for entry in file.issuer {
        let name = &entry.issuer;
        if entry.issuer.is_empty() || entry.audience.is_empty() {
            return Err("every [[issuer]] needs a non-empty issuer and audience".into());
        }
        if out.iter().any(|i| i.issuer == entry.issuer) {
            return Err(format!("issuer {name:?} is listed twice"));
        }
        let keys = match (entry.jwks, entry.public_key_file) {
            (Some(jwks), None) => {
                let is_url = jwks.starts_with("https://") || jwks.starts_with("http://");
                let location = if is_url {
                    jwks
                } else {
                    base.join(jwks).display().to_string()
                };
                IssuerKeys::Jwks(
                    KeySource::parse(&location).map_err(|e| format!("issuer {name:?}: {e}"))?,
                )
            }
            (None, Some(file)) => {
                let file = base.join(file);
                let pem = std::fs::read(&file)
                    .map_err(|e| format!("issuer {name:?}: reading {}: {e}", file.display()))?;
                let key = VerifyingKey::from_pem(&pem)
                    .map_err(|e| format!("issuer {name:?}: {}: {e}", file.display()))?;
                IssuerKeys::Pem(Arc::new(key))
            }
            _ => {
                return Err(format!(
                    "issuer {name:?}: give exactly one of jwks and public_key_file"
                ));
            }
        };
        out.push(ExternalIssuer {
            issuer: entry.issuer,
            audience: entry.audience,
            keys,
        });
    }
    Ok(out)
}

impl ExternalIssuer {
    /// Verifies a token of this issuer (signature, audience, times). An expired but genuine
    /// token comes back with `expired` set.
    pub async fn verify(
        &self,
        cache: &Arc<JwksCache>,
        token: &str,
        now: i64,
    ) -> Result<Verified, JwtError> {
        let (_, kid) = jwks::header(token)?;
        let key = match &self.keys {
            IssuerKeys::Pem(key) => key.clone(),
            IssuerKeys::Jwks(source) => cache.key(source, kid.as_deref()).await?,
        };
        let expect = Expect {
            issuer: &self.issuer,
            audience: &self.audience,
            require_iat: false,
        };
        jwks::verify(token, &key, expect, now)
    }
}

/// A verified token's `access` claim; none is no access.
pub fn access(claims: &Value) -> Result<Vec<AccessClaim>, JwtError> {
    match claims.get("access") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(v) => serde_json::from_value(v.clone())
            .map_err(|e| JwtError::Invalid(format!("the access claim: {e}"))),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap in a test is the failure
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn issuer_files() {
        let dir = tempfile::tempdir().unwrap();
        let ok = r#"
            [[issuer]]
            issuer = "https://auth.example.com"
            audience = "registry.example.com"
            jwks = "https://auth.example.com/jwks"

            [[issuer]]
            issuer = "local"
            audience = "berth"
            jwks = "keys/jwks.json"
        "#;
        let list = parse(ok, dir.path()).unwrap();
        assert_eq!(list.len(), 2);
        assert!(
            matches!(&list[1].keys, IssuerKeys::Jwks(KeySource::File(p)) if *p == dir.path().join("keys/jwks.json"))
        );
        assert!(parse("", dir.path()).unwrap().is_empty());
        let cases = [
            (
                "[[issuer]]\nissuer = \"a\"\naudience = \"b\"",
                "exactly one",
            ),
            (
                "[[issuer]]\nissuer = \"a\"\naudience = \"b\"\njwks = \"/x\"\npublic_key_file = \"k\"",
                "exactly one",
            ),
            (
                "[[issuer]]\nissuer = \"a\"\naudience = \"b\"\npublic_key_file = \"missing.pem\"",
                "missing.pem",
            ),
            (
                "[[issuer]]\nissuer = \"\"\naudience = \"b\"\njwks = \"/x\"",
                "non-empty",
            ),
            (
                "[[issuer]]\nissuer = \"a\"\naudience = \"b\"\njwks = \"/x\"\nextra = 1",
                "extra",
            ),
            (
                "[[issuer]]\nissuer = \"a\"\naudience = \"b\"\njwks = \"/x\"\n[[issuer]]\nissuer = \"a\"\naudience = \"c\"\njwks = \"/y\"",
                "twice",
            ),
        ];
        for (text, message) in cases {
            let e = parse(text, dir.path()).unwrap_err();
            assert!(e.contains(message), "{text}: {e}");
        }
    }

    #[test]
    fn access_claims() {
        assert!(access(&json!({})).unwrap().is_empty());
        let a = access(
            &json!({"access": [{"type": "repository", "name": "a/b", "actions": ["pull"]}]}),
        )
        .unwrap();
        assert_eq!(a[0].name, "a/b");
        assert!(access(&json!({"access": "everything"})).is_err());
    }
}
