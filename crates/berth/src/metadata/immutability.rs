//! Tag immutability rules: per namespace, glob patterns over tag names. A tag a rule matches
//! may be created, and pushed again with the digest it already has, but never moved to another
//! manifest nor deleted (by tag, or by deleting its manifest) while the rule stands.
//!
//! The checks run inside the transactions of [`super::queries::put_manifest`],
//! [`super::queries::delete_tag`] and [`super::queries::delete_manifest`], on the rows they
//! write, so every caller (the API, garbage collection, retention, trash) is held to them and
//! two nodes cannot race past them.
//!
//! Tags that start with `sha256-` are the ones tools derive from a digest and rewrite as they
//! add to them: cosign's legacy `sha256-<hex>.sig` / `.att` / `.sbom` and the referrers API's
//! fallback tag `sha256-<hex>`. A rule matches them only if its own pattern starts with
//! `sha256-`, so that `*` or `v*` never stops an image from being signed again.

use oci::{RepositoryName, Tag};

use super::MetadataError;
use super::db::{Row, Tx};

/// Longest pattern accepted.
pub const MAX_PATTERN_LEN: usize = 128;

/// Tags with this prefix are matched only by patterns that have it too (see the module doc).
const DIGEST_TAG_PREFIX: &str = "sha256-";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImmutabilityRule {
    pub namespace: String,
    pub pattern: String,
    pub created_at: i64,
    /// The actor that added it, as the event log names it.
    pub created_by: String,
}

/// A pattern is what a tag may hold (`[A-Za-z0-9_.-]`) plus the wildcards `*` (any run of
/// characters, also none) and `?` (exactly one), at most [`MAX_PATTERN_LEN`] long.
pub fn valid_pattern(pattern: &str) -> bool {
    !pattern.is_empty()
        && pattern.len() <= MAX_PATTERN_LEN
        && pattern
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"_.-*?".contains(&c))
}

/// Whether the rule's `pattern` covers `tag` (see the module doc for `sha256-` tags).
pub fn protects(pattern: &str, tag: &str) -> bool {
    if tag.starts_with(DIGEST_TAG_PREFIX) && !pattern.starts_with(DIGEST_TAG_PREFIX) {
        return false;
    }
    glob(pattern.as_bytes(), tag.as_bytes())
}

/// `*` and `?` over bytes, linear in practice: on a mismatch only the last `*` is retried.
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == b'?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

fn rule(row: &Row) -> Result<ImmutabilityRule, MetadataError> {
    Ok(ImmutabilityRule {
        namespace: row.text(0)?.to_owned(),
        pattern: row.text(1)?.to_owned(),
        created_at: row.i64(2)?,
        created_by: row.text(3)?.to_owned(),
    })
}

/// The namespace's rules, sorted by pattern.
pub async fn rules(
    tx: &mut Tx<'_>,
    namespace: &str,
) -> Result<Vec<ImmutabilityRule>, MetadataError> {
    tx.query(
        "SELECT namespace, pattern, created_at, created_by FROM immutability_rules
         WHERE namespace = ?1 ORDER BY pattern",
        &[namespace.into()],
    )
    .await?
    .iter()
    .map(rule)
    .collect()
}

/// Every rule, by namespace and pattern.
pub async fn all_rules(tx: &mut Tx<'_>) -> Result<Vec<ImmutabilityRule>, MetadataError> {
    tx.query(
        "SELECT namespace, pattern, created_at, created_by FROM immutability_rules
         ORDER BY namespace, pattern",
        &[],
    )
    .await?
    .iter()
    .map(rule)
    .collect()
}

/// False if the namespace had the rule already.
pub async fn add_rule(
    tx: &mut Tx<'_>,
    namespace: &str,
    pattern: &str,
    created_at: i64,
    created_by: &str,
) -> Result<bool, MetadataError> {
    Ok(tx
        .execute(
            "INSERT INTO immutability_rules (namespace, pattern, created_at, created_by)
             VALUES (?1, ?2, ?3, ?4) ON CONFLICT (namespace, pattern) DO NOTHING",
            &[
                namespace.into(),
                pattern.into(),
                created_at.into(),
                created_by.into(),
            ],
        )
        .await?
        > 0)
}

/// False if there was no such rule.
pub async fn remove_rule(
    tx: &mut Tx<'_>,
    namespace: &str,
    pattern: &str,
) -> Result<bool, MetadataError> {
    Ok(tx
        .execute(
            "DELETE FROM immutability_rules WHERE namespace = ?1 AND pattern = ?2",
            &[namespace.into(), pattern.into()],
        )
        .await?
        > 0)
}

/// The first rule (by pattern) of the repository's namespace that protects `tag`, if any.
/// Garbage collection and retention ask this before removing a tag; the write paths check it
/// themselves.
pub async fn protecting_rule(
    tx: &mut Tx<'_>,
    repo: &RepositoryName,
    tag: &Tag,
) -> Result<Option<ImmutabilityRule>, MetadataError> {
    let rules = rules(tx, repo.namespace()).await?;
    Ok(first_protecting(&rules, tag.as_str()).cloned())
}

/// The first of `rules` that protects `tag`.
pub(crate) fn first_protecting<'r>(
    rules: &'r [ImmutabilityRule],
    tag: &str,
) -> Option<&'r ImmutabilityRule> {
    rules.iter().find(|r| protects(&r.pattern, tag))
}

/// The refusal of a change to `tag` that `rule` protects.
pub(crate) fn refusal(rule: &ImmutabilityRule, tag: &str) -> MetadataError {
    MetadataError::TagImmutable {
        tag: tag.to_string(),
        namespace: rule.namespace.clone(),
        pattern: rule.pattern.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_tags() {
        let cases: &[(&str, &str, bool)] = &[
            ("v*", "v1.2.3", true),
            ("v*", "v", true),
            ("v*", "latest", false),
            ("*", "latest", true),
            ("release-?", "release-1", true),
            ("release-?", "release-10", false),
            ("*-prod", "2024-01-prod", true),
            ("*-prod", "2024-01-prod-x", false),
            ("a*b*c", "aXbYbZc", true),
            ("a*b*c", "aXbYbZ", false),
            ("exact", "exact", true),
            ("exact", "exactly", false),
            ("**", "", true),
            // Digest-derived tags only by a pattern that names them.
            ("*", "sha256-abc.sig", false),
            ("s*", "sha256-abc.sig", false),
            ("sha256-*", "sha256-abc.sig", true),
            ("sha256-*.att", "sha256-abc.sig", false),
            ("sha256-*.att", "sha256-abc.att", true),
        ];
        for &(pattern, tag, want) in cases {
            assert_eq!(protects(pattern, tag), want, "{pattern} {tag}");
        }
    }

    #[test]
    fn patterns_are_validated() {
        let long = "a".repeat(MAX_PATTERN_LEN + 1);
        for (pattern, want) in [
            ("v*", true),
            ("release-?.*", true),
            ("sha256-*", true),
            ("", false),
            ("v/1", false),
            ("v[0-9]", false),
            ("v 1", false),
            (long.as_str(), false),
        ] {
            assert_eq!(valid_pattern(pattern), want, "{pattern:?}");
        }
    }
}
