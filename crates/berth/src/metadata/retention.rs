//! Retention policies: what GC keeps of the repositories a pattern matches. The statements
//! here store the policies and read what a plan needs; the deciding is `service::retention`.

use serde::{Deserialize, Serialize};

use super::MetadataError;
use super::db::{Row, Tx};
use super::gc::{loose_manifest, not_a_held_referrer, not_pulled_since};
use super::queries::now_secs;

/// A policy as stored. Of the tags of a repository `repositories` matches, a tag is kept if it
/// is among the `keep_last` most recently pushed, matches one of `keep_tags`, was pushed within
/// `keep_days`, or its manifest was pulled within `keep_pulled_days`; the rest go. Untagged
/// manifests neither pushed nor pulled for `untagged_days` go too.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    #[serde(default)]
    pub id: i64,
    /// A glob on repository names (`*` any run of characters, `/` included; `?` one).
    pub repositories: String,
    #[serde(default)]
    pub keep_last: Option<u64>,
    /// Globs on tag names.
    #[serde(default)]
    pub keep_tags: Vec<String>,
    #[serde(default)]
    pub keep_days: Option<u64>,
    #[serde(default)]
    pub keep_pulled_days: Option<u64>,
    #[serde(default)]
    pub untagged_days: Option<u64>,
    #[serde(default)]
    pub created_at: i64,
}

fn policy(row: &Row) -> Result<Policy, MetadataError> {
    let opt_u64 = |i| -> Result<Option<u64>, MetadataError> {
        row.opt_i64(i)?
            .map(|v| u64::try_from(v).map_err(MetadataError::internal))
            .transpose()
    };
    Ok(Policy {
        id: row.i64(0)?,
        repositories: row.text(1)?.to_owned(),
        keep_last: opt_u64(2)?,
        keep_tags: serde_json::from_str(row.text(3)?).map_err(MetadataError::internal)?,
        keep_days: opt_u64(4)?,
        untagged_days: opt_u64(5)?,
        created_at: row.i64(6)?,
        keep_pulled_days: opt_u64(7)?,
    })
}

fn opt_int(v: Option<u64>) -> Option<i64> {
    v.map(|v| i64::try_from(v).unwrap_or(i64::MAX))
}

/// Stores a policy; returns it with its id.
pub async fn add(tx: &mut Tx<'_>, p: &Policy) -> Result<Policy, MetadataError> {
    let keep_tags = serde_json::to_string(&p.keep_tags).map_err(MetadataError::internal)?;
    let now = now_secs();
    let id = tx
        .query_opt(
            "INSERT INTO retention_policies (repositories, keep_last, keep_tags, keep_days,
                                             untagged_days, created_at, keep_pulled_days)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) RETURNING id",
            &[
                p.repositories.as_str().into(),
                opt_int(p.keep_last).into(),
                (&keep_tags).into(),
                opt_int(p.keep_days).into(),
                opt_int(p.untagged_days).into(),
                now.into(),
                opt_int(p.keep_pulled_days).into(),
            ],
        )
        .await?
        .ok_or_else(|| MetadataError::internal("insert returned no id"))?
        .i64(0)?;
    Ok(Policy {
        id,
        created_at: now,
        ..p.clone()
    })
}

pub async fn list(tx: &mut Tx<'_>) -> Result<Vec<Policy>, MetadataError> {
    let rows = tx
        .query(
            "SELECT id, repositories, keep_last, keep_tags, keep_days, untagged_days, created_at,
                    keep_pulled_days
             FROM retention_policies ORDER BY id",
            &[],
        )
        .await?;
    rows.iter().map(policy).collect()
}

/// False if there was no such policy.
pub async fn remove(tx: &mut Tx<'_>, id: i64) -> Result<bool, MetadataError> {
    Ok(tx
        .execute("DELETE FROM retention_policies WHERE id = ?1", &[id.into()])
        .await?
        > 0)
}

/// A tag as a plan sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagRow {
    pub name: String,
    pub digest: String,
    /// When the tag was last pointed (seconds).
    pub pushed_at: i64,
    /// When its manifest was last pulled, by any name (seconds).
    pub pulled_at: Option<i64>,
}

/// Every tag of a repository with its digest, push time and its manifest's last pull.
pub async fn tags(tx: &mut Tx<'_>, repository: &str) -> Result<Vec<TagRow>, MetadataError> {
    let rows = tx
        .query(
            "SELECT t.name, m.digest, t.updated_at, m.last_pulled_at FROM repositories r
             JOIN tags t ON t.repository_id = r.id
             JOIN manifests m ON m.id = t.manifest_id
             WHERE r.name = ?1",
            &[repository.into()],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(TagRow {
                name: r.text(0)?.to_owned(),
                digest: r.text(1)?.to_owned(),
                pushed_at: r.i64(2)?,
                pulled_at: r.opt_i64(3)?,
            })
        })
        .collect()
}

/// Manifests of a repository with no tag, created and last pulled before `before`, that no
/// index there lists and that are not a referrer of a manifest still there.
pub async fn untagged(
    tx: &mut Tx<'_>,
    repository: &str,
    before: i64,
) -> Result<Vec<String>, MetadataError> {
    let rows = tx
        .query(
            concat!(
                "SELECT m.digest FROM repositories r JOIN manifests m ON m.repository_id = r.id
                 WHERE r.name = ?1 AND m.created_at < ?2 AND ",
                not_pulled_since!(),
                " AND ",
                loose_manifest!(),
                " AND ",
                not_a_held_referrer!(),
                " ORDER BY m.id"
            ),
            &[repository.into(), before.into()],
        )
        .await?;
    rows.iter().map(|r| r.text(0).map(str::to_owned)).collect()
}

/// Whether the manifest has no tag left and no index of its repository lists it (so that
/// removing its last tag by a policy lets the manifest go too).
pub async fn is_loose(
    tx: &mut Tx<'_>,
    repository: &str,
    digest: &str,
) -> Result<bool, MetadataError> {
    Ok(tx
        .query_opt(
            concat!(
                "SELECT 1 FROM repositories r JOIN manifests m ON m.repository_id = r.id
                 WHERE r.name = ?1 AND m.digest = ?2 AND ",
                loose_manifest!()
            ),
            &[repository.into(), digest.into()],
        )
        .await?
        .is_some())
}
