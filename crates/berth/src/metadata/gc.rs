//! Garbage collection's statements, and leases (one holder among several nodes).
//!
//! GC never takes a store-wide lock: each step is a short transaction over a batch, and the
//! ordering against concurrent pushes comes from row locks and `last_referenced_at` (the
//! protocol is in ARCHITECTURE.md, "Garbage collection"). The steps, in order:
//! [`untagged_manifests`] (candidates for the trash), [`super::trash::purge`],
//! [`unlink_dangling`], [`unreferenced_page`] then [`mark_unreferenced`] / [`mark_orphans`],
//! then the service deletes the bytes and [`forget_deleted`] removes the rows.

use oci::Digest;

use super::MetadataError;
use super::db::{Param, Row, Tx};

/// Takes or renews the lease `name` for `owner` until `ttl_ms` from now by the database's
/// clock (so node clocks do not matter); false if another owner holds it unexpired.
pub async fn take_lease(
    tx: &mut Tx<'_>,
    name: &str,
    owner: &str,
    ttl_ms: i64,
) -> Result<bool, MetadataError> {
    let row = tx
        .query_opt(
            "INSERT INTO leases (name, owner, until_ms) VALUES (?1, ?2, {NOW_MS} + ?3)
             ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, until_ms = excluded.until_ms
             WHERE leases.owner = excluded.owner OR leases.until_ms < {NOW_MS}
             RETURNING owner",
            &[name.into(), owner.into(), ttl_ms.into()],
        )
        .await?;
    Ok(row.is_some())
}

/// Gives the lease up if `owner` holds it.
pub async fn release_lease(tx: &mut Tx<'_>, name: &str, owner: &str) -> Result<(), MetadataError> {
    tx.execute(
        "DELETE FROM leases WHERE name = ?1 AND owner = ?2",
        &[name.into(), owner.into()],
    )
    .await?;
    Ok(())
}

/// SQL conditions on a manifest `m`: no tag points at it and no index of its repository lists
/// it, so removing it breaks nothing.
macro_rules! loose_manifest {
    () => {
        "NOT EXISTS (SELECT 1 FROM tags t WHERE t.manifest_id = m.id)
         AND NOT EXISTS (SELECT 1 FROM manifest_children c
                         JOIN manifests i ON i.id = c.manifest_id
                         WHERE c.child_digest = m.digest AND i.repository_id = m.repository_id)"
    };
}
/// SQL condition on a manifest `m`: it is not a referrer of a manifest still there (a referrer
/// follows its subject instead).
macro_rules! not_a_held_referrer {
    () => {
        "(m.subject IS NULL OR NOT EXISTS (SELECT 1 FROM manifests s
                WHERE s.repository_id = m.repository_id AND s.digest = m.subject))"
    };
}
/// SQL condition on a manifest `m`: not pulled since `?2` (a deployment that pulls it by
/// digest keeps an untagged manifest young).
macro_rules! not_pulled_since {
    () => {
        "(m.last_pulled_at IS NULL OR m.last_pulled_at < ?2)"
    };
}
pub(crate) use {loose_manifest, not_a_held_referrer, not_pulled_since};

/// A manifest GC may move to the trash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: i64,
    pub repository: String,
    pub digest: Digest,
}

/// Manifests with no tag, created and last pulled before `before`, that no index of their
/// repository lists and that are not a referrer of a manifest still there (referrers follow
/// their subject), in id order after `after`.
pub async fn untagged_manifests(
    tx: &mut Tx<'_>,
    before: i64,
    after: i64,
    limit: i64,
) -> Result<Option<(i64, Vec<Candidate>)>, MetadataError> {
    // A window of `limit` manifests, then the candidates in it: each statement looks at a
    // bounded number of rows, however few candidates there are (on SQLite statements run on
    // the server's async threads, so a scan of the whole table would stall requests).
    let Some(end) = tx
        .query(
            "SELECT id FROM manifests WHERE id > ?1 ORDER BY id LIMIT ?2",
            &[after.into(), limit.into()],
        )
        .await?
        .last()
        .map(|r| r.i64(0))
        .transpose()?
    else {
        return Ok(None);
    };
    let rows = tx
        .query(
            concat!(
                "SELECT m.id, r.name, m.digest FROM manifests m
                 JOIN repositories r ON r.id = m.repository_id
                 WHERE m.id > ?1 AND m.id <= ?3 AND m.created_at < ?2 AND ",
                not_pulled_since!(),
                " AND ",
                loose_manifest!(),
                " AND ",
                not_a_held_referrer!(),
                " ORDER BY m.id"
            ),
            &[after.into(), before.into(), end.into()],
        )
        .await?;
    let candidates = rows
        .iter()
        .map(|r| {
            Ok(Candidate {
                id: r.i64(0)?,
                repository: r.text(1)?.to_owned(),
                digest: r.digest(2)?,
            })
        })
        .collect::<Result<_, MetadataError>>()?;
    Ok(Some((end, candidates)))
}

/// A repository's link to a blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub repository_id: i64,
    pub digest: String,
}

/// The next window of the link scan: up to `limit` links after `after` in key order. Returns
/// the window's last link and those in it not refreshed since `before` that no manifest and no
/// trashed manifest of the repository references; `None` at the end. Each statement looks at
/// a bounded number of rows (see [`untagged_manifests`]).
pub async fn dangling_links(
    tx: &mut Tx<'_>,
    before: i64,
    after: &Link,
    limit: i64,
) -> Result<Option<(Link, Vec<Link>)>, MetadataError> {
    let link = |r: &Row| -> Result<Link, MetadataError> {
        Ok(Link {
            repository_id: r.i64(0)?,
            digest: r.text(1)?.to_owned(),
        })
    };
    let Some(end) = tx
        .query(
            "SELECT repository_id, digest FROM repository_blobs
             WHERE repository_id > ?1 OR (repository_id = ?1 AND digest > ?2)
             ORDER BY repository_id, digest LIMIT ?3",
            &[
                after.repository_id.into(),
                after.digest.as_str().into(),
                limit.into(),
            ],
        )
        .await?
        .last()
        .map(link)
        .transpose()?
    else {
        return Ok(None);
    };
    let rows = tx
        .query(
            "SELECT rb.repository_id, rb.digest FROM repository_blobs rb
             WHERE (rb.repository_id > ?1 OR (rb.repository_id = ?1 AND rb.digest > ?2))
             AND (rb.repository_id < ?4 OR (rb.repository_id = ?4 AND rb.digest <= ?5))
             AND rb.last_referenced_at < ?3
             AND NOT EXISTS (SELECT 1 FROM manifest_blobs mb
                             JOIN manifests m ON m.id = mb.manifest_id
                             WHERE mb.digest = rb.digest AND m.repository_id = rb.repository_id)
             AND NOT EXISTS (SELECT 1 FROM trash_refs tr
                             JOIN trash t ON t.id = tr.trash_id
                             JOIN repositories r ON r.name = t.repository
                             WHERE tr.digest = rb.digest AND r.id = rb.repository_id)
             ORDER BY rb.repository_id, rb.digest",
            &[
                after.repository_id.into(),
                after.digest.as_str().into(),
                before.into(),
                end.repository_id.into(),
                end.digest.as_str().into(),
            ],
        )
        .await?;
    let dangling = rows
        .iter()
        .map(link)
        .collect::<Result<_, MetadataError>>()?;
    Ok(Some((end, dangling)))
}

/// Removes a link found dangling, unless it was refreshed since `before` or a manifest (or a
/// trashed one) of the repository references it now; true if it went. Delete first, then
/// check in a new statement, as a blob DELETE does: on PostgreSQL the delete waits for a
/// manifest put holding the row (`FOR KEY SHARE`), and the check then sees that put's
/// references, in which case the link is put back as it was.
pub async fn unlink_dangling(
    tx: &mut Tx<'_>,
    link: &Link,
    before: i64,
) -> Result<bool, MetadataError> {
    let params = [link.repository_id.into(), link.digest.as_str().into()];
    let Some(row) = tx
        .query_opt(
            "DELETE FROM repository_blobs
             WHERE repository_id = ?1 AND digest = ?2 AND last_referenced_at < ?3
             RETURNING created_at, last_referenced_at",
            &[params[0], params[1], before.into()],
        )
        .await?
    else {
        return Ok(false);
    };
    let referenced = tx
        .query_opt(
            "SELECT 1 FROM manifest_blobs mb JOIN manifests m ON m.id = mb.manifest_id
             WHERE mb.digest = ?2 AND m.repository_id = ?1
             UNION ALL
             SELECT 1 FROM trash_refs tr JOIN trash t ON t.id = tr.trash_id
             JOIN repositories r ON r.name = t.repository
             WHERE tr.digest = ?2 AND r.id = ?1
             LIMIT 1",
            &params,
        )
        .await?
        .is_some();
    if referenced {
        tx.execute(
            "INSERT INTO repository_blobs (repository_id, digest, created_at, last_referenced_at)
             VALUES (?1, ?2, ?3, ?4)",
            &[params[0], params[1], row.i64(0)?.into(), row.i64(1)?.into()],
        )
        .await?;
        return Ok(false);
    }
    Ok(true)
}

/// A blob whose bytes GC is to delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Doomed {
    pub digest: Digest,
    pub size: u64,
}

fn doomed(rows: Vec<Row>) -> Result<Vec<Doomed>, MetadataError> {
    rows.iter()
        .map(|r| {
            Ok(Doomed {
                digest: r.digest(0)?,
                size: r.u64(1)?,
            })
        })
        .collect()
}

/// The last of the next `limit` blob digests after `after`: a page of the scan, whose position
/// moves past every blob looked at, marked or not. `None` at the end.
async fn page_end(
    tx: &mut Tx<'_>,
    after: &str,
    limit: i64,
) -> Result<Option<String>, MetadataError> {
    let candidates = tx
        .query(
            "SELECT digest FROM blobs WHERE digest > ?1 ORDER BY digest LIMIT ?2",
            &[after.into(), limit.into()],
        )
        .await?;
    candidates
        .last()
        .map(|row| row.text(0).map(str::to_owned))
        .transpose()
}

/// SQL condition on a row of `blobs`: live, not referenced since `?3`, and linked by no
/// repository: what GC marks.
macro_rules! unreferenced_blob {
    () => {
        "state = 'live' AND last_referenced_at < ?3
         AND NOT EXISTS (SELECT 1 FROM repository_blobs rb WHERE rb.digest = blobs.digest)"
    };
}

/// The next page of the blob scan (up to `limit` digests after `after`): its last digest, and
/// whether any blob in it is one [`mark_unreferenced`] would mark. A read, so that the pages
/// with nothing to mark (most of them, in a registry GC keeps clean) never take the writer,
/// which on SQLite is the one lock every push needs too. `None` at the end.
pub async fn unreferenced_page(
    tx: &mut Tx<'_>,
    before: i64,
    after: &str,
    limit: i64,
) -> Result<Option<(String, bool)>, MetadataError> {
    let Some(last) = page_end(tx, after, limit).await? else {
        return Ok(None);
    };
    let any = tx
        .query_opt(
            concat!(
                "SELECT 1 FROM blobs WHERE digest > ?1 AND digest <= ?2 AND ",
                unreferenced_blob!(),
                " LIMIT 1"
            ),
            &[after.into(), (&last).into(), before.into()],
        )
        .await?
        .is_some();
    Ok(Some((last, any)))
}

/// Marks `deleting` the live blobs in `(after, last]` that no repository links and that were
/// not referenced since `before`, and returns them. A link (upload, mount) upserts the blob
/// row, so on PostgreSQL a mark racing it either commits first (the link then finds
/// `deleting` and is refused) or waits for the row and re-checks `last_referenced_at`, which
/// the link just refreshed.
pub async fn mark_unreferenced(
    tx: &mut Tx<'_>,
    before: i64,
    after: &str,
    last: &str,
) -> Result<Vec<Doomed>, MetadataError> {
    let marked = tx
        .query(
            concat!(
                "UPDATE blobs SET state = 'deleting'
                 WHERE digest > ?1 AND digest <= ?2 AND ",
                unreferenced_blob!(),
                " RETURNING digest, size"
            ),
            &[after.into(), last.into(), before.into()],
        )
        .await?;
    doomed(marked)
}

/// What a run would delete, changing nothing (a dry run): live blobs not referenced since
/// `before` whose every link would be removed as dangling, counting trash entries from before
/// `trash_before` as purged.
pub async fn unreferenced(
    tx: &mut Tx<'_>,
    before: i64,
    trash_before: i64,
    after: &str,
    limit: i64,
) -> Result<(Vec<Doomed>, Option<String>), MetadataError> {
    let Some(last) = page_end(tx, after, limit).await? else {
        return Ok((Vec::new(), None));
    };
    let found = tx
        .query(
            "SELECT b.digest, b.size FROM blobs b
             WHERE b.digest > ?1 AND b.digest <= ?2 AND b.state = 'live'
             AND b.last_referenced_at < ?3
             AND NOT EXISTS (
                SELECT 1 FROM repository_blobs rb WHERE rb.digest = b.digest
                AND (rb.last_referenced_at >= ?3
                     OR EXISTS (SELECT 1 FROM manifest_blobs mb
                                JOIN manifests m ON m.id = mb.manifest_id
                                WHERE mb.digest = rb.digest
                                AND m.repository_id = rb.repository_id)
                     OR EXISTS (SELECT 1 FROM trash_refs tr
                                JOIN trash t ON t.id = tr.trash_id
                                JOIN repositories r ON r.name = t.repository
                                WHERE tr.digest = rb.digest AND r.id = rb.repository_id
                                AND t.deleted_at >= ?4)))",
            &[
                after.into(),
                (&last).into(),
                before.into(),
                trash_before.into(),
            ],
        )
        .await?;
    Ok((doomed(found)?, Some(last)))
}

/// Blobs left `deleting` (a GC that stopped between marking and deleting): their bytes are
/// deleted again, which is idempotent.
pub async fn marked(tx: &mut Tx<'_>, limit: i64) -> Result<Vec<Doomed>, MetadataError> {
    doomed(
        tx.query(
            "SELECT digest, size FROM blobs WHERE state = 'deleting' ORDER BY digest LIMIT ?1",
            &[limit.into()],
        )
        .await?,
    )
}

/// Of `digests` (bytes found in storage), those with no blob row, each recorded `deleting`
/// (size `size`) so that an upload finishing meanwhile is refused its link rather than left
/// pointing at bytes GC removes. Returns the ones marked.
pub async fn mark_orphans(
    tx: &mut Tx<'_>,
    orphans: &[(Digest, u64)],
) -> Result<Vec<Doomed>, MetadataError> {
    let mut marked = Vec::new();
    for (digest, size) in orphans {
        let d = digest.to_string();
        let size_param = Param::Int(i64::try_from(*size).unwrap_or(i64::MAX));
        if tx
            .query_opt(
                "INSERT INTO blobs (digest, size, created_at, last_referenced_at, state)
                 VALUES (?1, ?2, {NOW}, 0, 'deleting')
                 ON CONFLICT (digest) DO NOTHING RETURNING digest",
                &[(&d).into(), size_param],
            )
            .await?
            .is_some()
        {
            marked.push(Doomed {
                digest: digest.clone(),
                size: *size,
            });
        }
    }
    Ok(marked)
}

/// The digests with a blob row (any state) from `first` to `last`, sorted: one statement for
/// a page of a storage listing, however many blobs it holds.
pub async fn blobs_between(
    tx: &mut Tx<'_>,
    first: &str,
    last: &str,
) -> Result<Vec<String>, MetadataError> {
    let rows = tx
        .query(
            "SELECT digest FROM blobs WHERE digest >= ?1 AND digest <= ?2 ORDER BY digest",
            &[first.into(), last.into()],
        )
        .await?;
    rows.iter().map(|r| r.text(0).map(str::to_owned)).collect()
}

/// Removes the rows of blobs whose bytes are gone; only rows still `deleting`.
pub async fn forget_deleted(tx: &mut Tx<'_>, digests: &[Digest]) -> Result<(), MetadataError> {
    for digest in digests {
        tx.execute(
            "DELETE FROM blobs WHERE digest = ?1 AND state = 'deleting'",
            &[digest.to_string().as_str().into()],
        )
        .await?;
    }
    Ok(())
}
