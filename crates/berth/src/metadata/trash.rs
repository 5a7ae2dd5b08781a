//! The trash: manifests and tags deleted by a client, a retention rule or GC, kept for
//! `trash_retention_secs` with everything needed to put them back byte for byte.
//!
//! A trashed manifest keeps its bytes, media type and tags in a `trash` row and the digests of
//! the blobs it referenced in `trash_refs`. Those rows are what keep its blobs alive: GC
//! unlinks a blob from a repository only when neither a manifest nor a trashed manifest of the
//! repository references it, so a restore finds every blob where it was. A manifest's
//! referrers (signatures, SBOMs) follow it into the trash, grouped under its entry, and come
//! back with it. Restoring goes through [`queries::put_manifest`], the push path's own
//! statement, so whatever a push keeps (references, quota usage) a restore keeps too.

use oci::{Digest, RepositoryName, Tag};
use serde::Serialize;

use super::db::{Row, Tx};
use super::queries::{self, now_secs};
use super::{MetadataError, NewManifest};

/// Why something went to the trash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// A client's DELETE.
    Deleted,
    /// It followed its subject (a referrer of a trashed manifest).
    Subject,
    /// A retention rule.
    Retention,
    /// GC: an untagged manifest past its age.
    Untagged,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Deleted => "deleted",
            Reason::Subject => "subject",
            Reason::Retention => "retention",
            Reason::Untagged => "untagged",
        }
    }
}

/// One entry of the trash, as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TrashEntry {
    pub id: i64,
    pub repository: String,
    /// `manifest` or `tag`.
    pub kind: String,
    pub digest: String,
    pub tags: Vec<String>,
    pub reason: String,
    pub actor: String,
    /// The entry this one went with, if it followed its subject.
    pub group_id: Option<i64>,
    pub deleted_at: i64,
    /// The manifest's own size in bytes (0 for a tag).
    pub size: u64,
}

/// What to list or restore.
#[derive(Debug, Clone, Default)]
pub struct TrashFilter {
    pub repository: Option<String>,
    /// Repositories whose name starts with `namespace/` (or is `namespace`).
    pub namespace: Option<String>,
    /// Entries deleted at or after this time (seconds since the epoch).
    pub since: Option<i64>,
    pub reason: Option<String>,
    /// Entries with an id below this (paging, newest first).
    pub before: Option<i64>,
    pub limit: Option<i64>,
}

/// The columns [`entry`] reads, in its order.
macro_rules! entry_columns {
    () => {
        "id, repository, kind, digest, tags, reason, actor, group_id, deleted_at,
         COALESCE(length(content), 0)"
    };
}

fn entry(row: &Row) -> Result<TrashEntry, MetadataError> {
    Ok(TrashEntry {
        id: row.i64(0)?,
        repository: row.text(1)?.to_owned(),
        kind: row.text(2)?.to_owned(),
        digest: row.text(3)?.to_owned(),
        tags: serde_json::from_str(row.text(4)?).map_err(MetadataError::internal)?,
        reason: row.text(5)?.to_owned(),
        actor: row.text(6)?.to_owned(),
        group_id: row.opt_i64(7)?,
        deleted_at: row.i64(8)?,
        size: row.u64(9)?,
    })
}

/// Trashed entries matching `filter`, newest first. Entries that followed their subject are
/// listed too (with `group_id` set).
pub async fn list(tx: &mut Tx<'_>, filter: &TrashFilter) -> Result<Vec<TrashEntry>, MetadataError> {
    let (lo, hi) = namespace_range(filter.namespace.as_deref());
    const LIST: &str = concat!(
        "SELECT ",
        entry_columns!(),
        " FROM trash
         WHERE (CAST(?1 AS TEXT) IS NULL OR repository = ?1)
         AND (CAST(?2 AS TEXT) IS NULL OR repository = ?2
              OR (repository >= ?3 AND repository < ?4))
         AND deleted_at >= ?5 AND (CAST(?6 AS TEXT) IS NULL OR reason = ?6) AND id < ?7
         ORDER BY id DESC LIMIT ?8"
    );
    let rows = tx
        .query(
            LIST,
            &[
                filter.repository.as_deref().into(),
                filter.namespace.as_deref().into(),
                lo.as_deref().into(),
                hi.as_deref().into(),
                filter.since.unwrap_or(0).into(),
                filter.reason.as_deref().into(),
                filter.before.unwrap_or(i64::MAX).into(),
                filter.limit.unwrap_or(i64::MAX).into(),
            ],
        )
        .await?;
    rows.iter().map(entry).collect()
}

/// `[ns/, ns/\u{10FFFF})`: the repositories under a namespace, as a range on the name index.
fn namespace_range(namespace: Option<&str>) -> (Option<String>, Option<String>) {
    match namespace {
        Some(ns) => (Some(format!("{ns}/")), Some(format!("{ns}/\u{10FFFF}"))),
        None => (None, None),
    }
}

pub async fn get(tx: &mut Tx<'_>, id: i64) -> Result<Option<TrashEntry>, MetadataError> {
    const GET: &str = concat!("SELECT ", entry_columns!(), " FROM trash WHERE id = ?1");
    tx.query_opt(GET, &[id.into()])
        .await?
        .map(|r| entry(&r))
        .transpose()
}

/// Moves a manifest and, after it, its referrers (recursively) into the trash, deleting them
/// from the repository with their tags. With `keep` false nothing is kept (a trash period of
/// 0): the manifests are simply deleted. Returns the manifests removed, the subject first, or
/// an empty list if it was not there. Refused with [`MetadataError::ManifestReferenced`] while
/// an index of the repository lists one of them (the caller's transaction must roll back).
pub async fn trash_manifest(
    tx: &mut Tx<'_>,
    repo: &RepositoryName,
    digest: &Digest,
    reason: Reason,
    actor: &str,
    keep: bool,
) -> Result<Vec<Digest>, MetadataError> {
    let mut removed = Vec::new();
    // (digest, the entry it follows)
    let mut queue: Vec<(Digest, Option<i64>)> = vec![(digest.clone(), None)];
    while let Some((digest, group)) = queue.pop() {
        let d = digest.to_string();
        let Some(mut row) = tx
            .query_opt(
                "SELECT m.id, m.media_type, m.content FROM repositories r
                 JOIN manifests m ON m.repository_id = r.id
                 WHERE r.name = ?1 AND m.digest = ?2",
                &[repo.as_str().into(), (&d).into()],
            )
            .await?
        else {
            continue;
        };
        let manifest_id = row.i64(0)?;
        let media_type = row.text(1)?.to_owned();
        let content = row.take_bytes(2)?;
        let tags = texts(
            tx.query(
                "SELECT name FROM tags WHERE manifest_id = ?1 ORDER BY name",
                &[manifest_id.into()],
            )
            .await?,
        )?;
        let blobs = texts(
            tx.query(
                "SELECT digest FROM manifest_blobs WHERE manifest_id = ?1",
                &[manifest_id.into()],
            )
            .await?,
        )?;
        let referrers = texts(
            tx.query(
                "SELECT digest FROM manifests WHERE repository_id =
                    (SELECT repository_id FROM manifests WHERE id = ?1) AND subject = ?2",
                &[manifest_id.into(), (&d).into()],
            )
            .await?,
        )?;
        if !queries::delete_manifest(tx, repo, &digest).await? {
            continue;
        }
        let entry_id = if keep {
            let tags_json = serde_json::to_string(&tags).map_err(MetadataError::internal)?;
            let reason = if group.is_some() {
                Reason::Subject
            } else {
                reason
            };
            let id = tx
                .query_opt(
                    "INSERT INTO trash (repository, kind, digest, media_type, content, tags,
                                        reason, actor, group_id, deleted_at)
                     VALUES (?1, 'manifest', ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) RETURNING id",
                    &[
                        repo.as_str().into(),
                        (&d).into(),
                        media_type.as_str().into(),
                        content.as_slice().into(),
                        (&tags_json).into(),
                        reason.as_str().into(),
                        actor.into(),
                        group.into(),
                        now_secs().into(),
                    ],
                )
                .await?
                .ok_or_else(|| MetadataError::internal("trash insert returned no id"))?
                .i64(0)?;
            for blob in &blobs {
                tx.execute(
                    "INSERT INTO trash_refs (trash_id, digest) VALUES (?1, ?2)
                     ON CONFLICT DO NOTHING",
                    &[id.into(), blob.as_str().into()],
                )
                .await?;
            }
            Some(id)
        } else {
            None
        };
        removed.push(digest);
        for referrer in referrers {
            let referrer: Digest = referrer.parse().map_err(MetadataError::internal)?;
            queue.push((referrer, entry_id.or(group)));
        }
    }
    Ok(removed)
}

/// Deletes a tag, keeping in the trash which manifest it pointed at. False if the tag was not
/// there.
pub async fn trash_tag(
    tx: &mut Tx<'_>,
    repo: &RepositoryName,
    tag: &Tag,
    reason: Reason,
    actor: &str,
    keep: bool,
) -> Result<bool, MetadataError> {
    let pointed = tx
        .query_opt(
            "SELECT m.digest FROM repositories r
             JOIN tags t ON t.repository_id = r.id
             JOIN manifests m ON m.id = t.manifest_id
             WHERE r.name = ?1 AND t.name = ?2",
            &[repo.as_str().into(), tag.as_str().into()],
        )
        .await?;
    if !queries::delete_tag(tx, repo, tag).await? {
        return Ok(false);
    }
    if let (true, Some(row)) = (keep, pointed) {
        let tags = serde_json::to_string(&[tag.as_str()]).map_err(MetadataError::internal)?;
        tx.execute(
            "INSERT INTO trash (repository, kind, digest, tags, reason, actor, deleted_at)
             VALUES (?1, 'tag', ?2, ?3, ?4, ?5, ?6)",
            &[
                repo.as_str().into(),
                row.text(0)?.into(),
                (&tags).into(),
                reason.as_str().into(),
                actor.into(),
                now_secs().into(),
            ],
        )
        .await?;
    }
    Ok(true)
}

/// What a restore did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Restored {
    /// `repository@digest` of each manifest put back.
    pub manifests: Vec<String>,
    /// `repository:tag` of each tag put back.
    pub tags: Vec<String>,
    /// `repository:tag` of tags not put back because they now point at another manifest.
    pub kept_newer: Vec<String>,
}

/// Puts a trash entry back: a manifest with its tags (those not re-pointed since), its
/// children if they are in the trash too, and the referrers that followed it; or a tag (and
/// its manifest, if that is in the trash). The entries restored leave the trash. False if no
/// such entry.
pub async fn restore(tx: &mut Tx<'_>, id: i64, out: &mut Restored) -> Result<bool, MetadataError> {
    let Some(entry) = get(tx, id).await? else {
        return Ok(false);
    };
    let repo: RepositoryName = entry.repository.parse().map_err(MetadataError::internal)?;
    let digest: Digest = entry.digest.parse().map_err(MetadataError::internal)?;
    let tags = parse_tags(&entry.tags)?;
    if entry.kind == "tag" {
        tx.execute("DELETE FROM trash WHERE id = ?1", &[id.into()])
            .await?;
        ensure_manifest(tx, &repo, &digest, out).await?;
        point_tags(tx, &repo, &digest, &tags, out).await?;
        return Ok(true);
    }
    restore_manifest(tx, id, &repo, &digest, &tags, out).await?;
    Ok(true)
}

fn parse_tags(tags: &[String]) -> Result<Vec<Tag>, MetadataError> {
    tags.iter()
        .map(|t| t.parse().map_err(MetadataError::internal))
        .collect()
}

/// Makes sure the manifest is in the repository, restoring its newest trash entry if it is
/// not. A manifest in neither place is a [`MetadataError::MissingManifest`].
async fn ensure_manifest(
    tx: &mut Tx<'_>,
    repo: &RepositoryName,
    digest: &Digest,
    out: &mut Restored,
) -> Result<(), MetadataError> {
    if queries::manifest_by_digest(tx, repo, digest)
        .await?
        .is_some()
    {
        return Ok(());
    }
    let d = digest.to_string();
    let Some(row) = tx
        .query_opt(
            "SELECT id, tags FROM trash WHERE repository = ?1 AND digest = ?2
             AND kind = 'manifest' ORDER BY id DESC LIMIT 1",
            &[repo.as_str().into(), (&d).into()],
        )
        .await?
    else {
        return Err(MetadataError::MissingManifest(digest.clone()));
    };
    let id = row.i64(0)?;
    let tags: Vec<String> = serde_json::from_str(row.text(1)?).map_err(MetadataError::internal)?;
    let tags = parse_tags(&tags)?;
    Box::pin(restore_manifest(tx, id, repo, digest, &tags, out)).await
}

async fn restore_manifest(
    tx: &mut Tx<'_>,
    id: i64,
    repo: &RepositoryName,
    digest: &Digest,
    tags: &[Tag],
    out: &mut Restored,
) -> Result<(), MetadataError> {
    let Some(mut row) = tx
        .query_opt(
            "SELECT media_type, content FROM trash WHERE id = ?1",
            &[id.into()],
        )
        .await?
    else {
        return Ok(());
    };
    let media_type = row.text(0)?.to_owned();
    let content = row.take_bytes(1)?;
    tx.execute("DELETE FROM trash WHERE id = ?1", &[id.into()])
        .await?;
    let record = NewManifest::parse(digest.clone(), Some(&media_type), content)
        .map_err(MetadataError::internal)?;
    for child in &record.children {
        Box::pin(ensure_manifest(tx, repo, child, out)).await?;
    }
    queries::put_manifest(tx, repo, &record, &[]).await?;
    out.manifests.push(format!("{repo}@{digest}"));
    point_tags(tx, repo, digest, tags, out).await?;
    let followers = tx
        .query(
            "SELECT id, digest, tags FROM trash WHERE group_id = ?1 ORDER BY id",
            &[id.into()],
        )
        .await?;
    for follower in followers {
        let digest: Digest = follower.digest(1)?;
        let tags: Vec<String> =
            serde_json::from_str(follower.text(2)?).map_err(MetadataError::internal)?;
        let tags = parse_tags(&tags)?;
        Box::pin(restore_manifest(
            tx,
            follower.i64(0)?,
            repo,
            &digest,
            &tags,
            out,
        ))
        .await?;
    }
    Ok(())
}

/// Points each tag at the manifest unless it now points at another one (a newer push wins).
async fn point_tags(
    tx: &mut Tx<'_>,
    repo: &RepositoryName,
    digest: &Digest,
    tags: &[Tag],
    out: &mut Restored,
) -> Result<(), MetadataError> {
    for tag in tags {
        match queries::manifest_by_tag(tx, repo, tag).await? {
            Some(current) if &current.digest != digest => {
                out.kept_newer.push(format!("{repo}:{tag}"));
            }
            Some(_) => {}
            None => {
                let record = queries::manifest_by_digest(tx, repo, digest)
                    .await?
                    .ok_or_else(|| MetadataError::MissingManifest(digest.clone()))?;
                let record = NewManifest::parse(
                    digest.clone(),
                    Some(&record.media_type),
                    record.bytes.to_vec(),
                )
                .map_err(MetadataError::internal)?;
                queries::put_manifest(tx, repo, &record, std::slice::from_ref(tag)).await?;
                out.tags.push(format!("{repo}:{tag}"));
            }
        }
    }
    Ok(())
}

/// Deletes entries trashed before `before` (seconds), at most `max` of them; returns how many
/// went. Their references go with them (`trash_refs` cascades), which lets GC unlink the blobs
/// nothing else references.
pub async fn purge(tx: &mut Tx<'_>, before: i64, max: i64) -> Result<u64, MetadataError> {
    tx.execute(
        "DELETE FROM trash WHERE id IN
            (SELECT id FROM trash WHERE deleted_at < ?1 ORDER BY id LIMIT ?2)",
        &[before.into(), max.into()],
    )
    .await
}

/// How many entries were trashed before `before` (what a purge would remove).
pub async fn expired(tx: &mut Tx<'_>, before: i64) -> Result<u64, MetadataError> {
    match tx
        .query_opt(
            "SELECT COUNT(*) FROM trash WHERE deleted_at < ?1",
            &[before.into()],
        )
        .await?
    {
        Some(row) => row.u64(0),
        None => Ok(0),
    }
}

/// Entries and bytes (manifests' own bytes) in the trash, for the metrics.
pub async fn totals(tx: &mut Tx<'_>) -> Result<(u64, u64), MetadataError> {
    match tx
        .query_opt(
            "SELECT COUNT(*), CAST(COALESCE(SUM(length(content)), 0) AS BIGINT) FROM trash",
            &[],
        )
        .await?
    {
        Some(row) => Ok((row.u64(0)?, row.u64(1)?)),
        None => Ok((0, 0)),
    }
}

fn texts(rows: Vec<Row>) -> Result<Vec<String>, MetadataError> {
    rows.iter().map(|r| r.text(0).map(str::to_owned)).collect()
}
