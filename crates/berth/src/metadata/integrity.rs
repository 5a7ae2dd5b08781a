//! Statements of the integrity scrub and `berth fsck`: quarantined blobs, the scrub worker's
//! lease and position, and the reference checks.
//!
//! The lease is like a webhook subscription's (see [`super::webhooks`]): one row, taken when
//! free or expired by the database's clock (`{NOW_MS}`), never by a node's, and every change to
//! the position is fenced by `lease_owner`, so a node that stalled past its lease moves nothing.

use oci::Digest;

use super::MetadataError;
use super::db::{Row, Tx};

/// What was found wrong with a blob's stored bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Problem {
    /// The bytes hash to another digest.
    Mismatch,
    /// No bytes are stored under the digest.
    Missing,
    /// The stored bytes are not the size recorded for the blob.
    Size,
}

impl Problem {
    pub fn as_str(self) -> &'static str {
        match self {
            Problem::Mismatch => "digest mismatch",
            Problem::Missing => "missing bytes",
            Problem::Size => "size mismatch",
        }
    }

    fn parse(s: &str) -> Result<Problem, MetadataError> {
        match s {
            "digest mismatch" => Ok(Problem::Mismatch),
            "missing bytes" => Ok(Problem::Missing),
            "size mismatch" => Ok(Problem::Size),
            other => Err(MetadataError::internal(format!(
                "unknown quarantine problem {other:?}"
            ))),
        }
    }
}

/// A quarantined blob, as recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct Quarantined {
    pub digest: Digest,
    pub found_at_ms: i64,
    pub problem: Problem,
    /// What was found, for people: "hashes to sha256:...", "3 bytes stored, 5 recorded".
    pub detail: String,
}

/// The scrub worker's stored state, as the lease holder sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ScrubState {
    /// The last blob checked in the pass in progress; `None` before the first.
    pub cursor: Option<String>,
    /// When the pass in progress began; `None` when no pass is in progress.
    pub pass_started_ms: Option<i64>,
    /// When the last pass ended.
    pub last_pass_done_ms: Option<i64>,
    /// The database's clock when the lease was taken.
    pub now_ms: i64,
}

/// Records a blob as quarantined, if its `blobs` row is still live (garbage collection may
/// have taken the bytes of a blob it deletes). `true` if newly recorded.
pub async fn quarantine(
    tx: &mut Tx<'_>,
    digest: &Digest,
    problem: Problem,
    detail: &str,
) -> Result<bool, MetadataError> {
    let d = digest.to_string();
    Ok(tx
        .execute(
            "INSERT INTO quarantined_blobs (digest, found_at_ms, problem, detail)
             SELECT ?1, {NOW_MS}, ?2, ?3
             WHERE EXISTS (SELECT 1 FROM blobs WHERE digest = ?1 AND state = 'live')
             ON CONFLICT (digest) DO NOTHING",
            &[(&d).into(), problem.as_str().into(), detail.into()],
        )
        .await?
        == 1)
}

/// Lifts a quarantine (the bytes were replaced, or verify again); `true` if there was one.
pub async fn release(tx: &mut Tx<'_>, digest: &Digest) -> Result<bool, MetadataError> {
    let d = digest.to_string();
    Ok(tx
        .execute(
            "DELETE FROM quarantined_blobs WHERE digest = ?1",
            &[(&d).into()],
        )
        .await?
        == 1)
}

pub async fn is_quarantined(tx: &mut Tx<'_>, digest: &Digest) -> Result<bool, MetadataError> {
    let d = digest.to_string();
    Ok(tx
        .query_opt(
            "SELECT 1 FROM quarantined_blobs WHERE digest = ?1",
            &[(&d).into()],
        )
        .await?
        .is_some())
}

fn quarantined_row(row: &Row) -> Result<Quarantined, MetadataError> {
    Ok(Quarantined {
        digest: row.digest(0)?,
        found_at_ms: row.i64(1)?,
        problem: Problem::parse(row.text(2)?)?,
        detail: row.text(3)?.to_owned(),
    })
}

/// Quarantined blobs, in digest order, at most `limit`.
pub async fn quarantined(tx: &mut Tx<'_>, limit: i64) -> Result<Vec<Quarantined>, MetadataError> {
    tx.query(
        "SELECT digest, found_at_ms, problem, detail FROM quarantined_blobs
         ORDER BY digest LIMIT ?1",
        &[limit.into()],
    )
    .await?
    .iter()
    .map(quarantined_row)
    .collect()
}

pub async fn quarantined_count(tx: &mut Tx<'_>) -> Result<u64, MetadataError> {
    match tx
        .query_opt("SELECT COUNT(*) FROM quarantined_blobs", &[])
        .await?
    {
        Some(row) => row.u64(0),
        None => Ok(0),
    }
}

/// Live blobs, and how many of them sort after `after` (what a pass resumed there has left).
pub async fn blob_counts(
    tx: &mut Tx<'_>,
    after: Option<&str>,
) -> Result<(u64, u64), MetadataError> {
    match tx
        .query_opt(
            "SELECT COUNT(*), COUNT(CASE WHEN digest > ?1 THEN 1 END) FROM blobs
             WHERE state = 'live'",
            &[after.unwrap_or("").into()],
        )
        .await?
    {
        Some(row) => Ok((row.u64(0)?, row.u64(1)?)),
        None => Ok((0, 0)),
    }
}

/// A blob as the scrub walks them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBlob {
    pub digest: Digest,
    /// The size recorded when it was pushed.
    pub size: u64,
    pub quarantined: bool,
}

/// Up to `limit` live blobs after `after` in digest order, with their recorded sizes.
pub async fn blobs_after(
    tx: &mut Tx<'_>,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<StoredBlob>, MetadataError> {
    tx.query(
        "SELECT b.digest, b.size,
                CASE WHEN EXISTS (SELECT 1 FROM quarantined_blobs q WHERE q.digest = b.digest)
                     THEN 1 ELSE 0 END
         FROM blobs b WHERE b.digest > ?1 AND b.state = 'live'
         ORDER BY b.digest LIMIT ?2",
        &[after.unwrap_or("").into(), limit.into()],
    )
    .await?
    .iter()
    .map(|r| {
        Ok(StoredBlob {
            digest: r.digest(0)?,
            size: r.u64(1)?,
            quarantined: r.i64(2)? != 0,
        })
    })
    .collect()
}

/// (repository, manifest) pairs whose manifest references the blob: what a bad blob breaks.
pub async fn needed_by(
    tx: &mut Tx<'_>,
    digest: &Digest,
) -> Result<Vec<(String, Digest)>, MetadataError> {
    let d = digest.to_string();
    tx.query(
        "SELECT r.name, m.digest FROM manifest_blobs mb
         JOIN manifests m ON m.id = mb.manifest_id
         JOIN repositories r ON r.id = m.repository_id
         WHERE mb.digest = ?1 ORDER BY r.name, m.digest LIMIT 1000",
        &[(&d).into()],
    )
    .await?
    .iter()
    .map(|r| Ok((r.text(0)?.to_owned(), r.digest(1)?)))
    .collect()
}

/// A reference whose target has no row: (repository, referring manifest if any, target).
#[derive(Debug, Clone, PartialEq)]
pub struct Dangling {
    pub repository: String,
    pub manifest: Option<Digest>,
    pub target: Digest,
}

fn dangling(rows: Vec<Row>, manifest: bool) -> Result<Vec<Dangling>, MetadataError> {
    rows.iter()
        .map(|r| {
            Ok(Dangling {
                repository: r.text(0)?.to_owned(),
                manifest: if manifest { Some(r.digest(1)?) } else { None },
                target: r.digest(if manifest { 2 } else { 1 })?,
            })
        })
        .collect()
}

/// Manifest→blob references whose blob has no `blobs` row (a full scan: fsck only).
pub async fn manifest_blobs_without_rows(tx: &mut Tx<'_>) -> Result<Vec<Dangling>, MetadataError> {
    let rows = tx
        .query(
            "SELECT r.name, m.digest, mb.digest FROM manifest_blobs mb
             JOIN manifests m ON m.id = mb.manifest_id
             JOIN repositories r ON r.id = m.repository_id
             WHERE NOT EXISTS (SELECT 1 FROM blobs b WHERE b.digest = mb.digest)
             ORDER BY mb.digest, r.name",
            &[],
        )
        .await?;
    dangling(rows, true)
}

/// Repository links whose blob has no `blobs` row (a full scan: fsck only).
pub async fn links_without_rows(tx: &mut Tx<'_>) -> Result<Vec<Dangling>, MetadataError> {
    let rows = tx
        .query(
            "SELECT r.name, rb.digest FROM repository_blobs rb
             JOIN repositories r ON r.id = rb.repository_id
             WHERE NOT EXISTS (SELECT 1 FROM blobs b WHERE b.digest = rb.digest)
             ORDER BY rb.digest, r.name",
            &[],
        )
        .await?;
    dangling(rows, false)
}

/// Index→manifest references whose child is not in the index's repository (fsck only).
pub async fn missing_children(tx: &mut Tx<'_>) -> Result<Vec<Dangling>, MetadataError> {
    let rows = tx
        .query(
            "SELECT r.name, m.digest, mc.child_digest FROM manifest_children mc
             JOIN manifests m ON m.id = mc.manifest_id
             JOIN repositories r ON r.id = m.repository_id
             WHERE NOT EXISTS (SELECT 1 FROM manifests c
                               WHERE c.repository_id = m.repository_id
                               AND c.digest = mc.child_digest)
             ORDER BY mc.child_digest, r.name",
            &[],
        )
        .await?;
    dangling(rows, true)
}

/// Takes (or renews) the scrub lease for `ttl_ms`: the stored state if this node holds it now.
pub async fn take_scrub_lease(
    tx: &mut Tx<'_>,
    owner: &str,
    ttl_ms: i64,
) -> Result<Option<ScrubState>, MetadataError> {
    let row = tx
        .query_opt(
            "UPDATE scrub_state SET lease_owner = ?1, lease_until_ms = {NOW_MS} + ?2
             WHERE id = 1 AND (lease_owner = ?1 OR lease_owner IS NULL
                               OR lease_until_ms < {NOW_MS})
             RETURNING cursor, pass_started_ms, last_pass_done_ms, {NOW_MS}",
            &[owner.into(), ttl_ms.into()],
        )
        .await?;
    row.map(|r| {
        Ok(ScrubState {
            cursor: r.opt_text(0)?.map(str::to_owned),
            pass_started_ms: r.opt_i64(1)?,
            last_pass_done_ms: r.opt_i64(2)?,
            now_ms: r.i64(3)?,
        })
    })
    .transpose()
}

/// Stores the pass's position and renews the lease; `false` (nothing changed) if another node
/// holds the lease now.
pub async fn save_scrub_position(
    tx: &mut Tx<'_>,
    owner: &str,
    cursor: Option<&str>,
    pass_started_ms: i64,
    ttl_ms: i64,
) -> Result<bool, MetadataError> {
    Ok(tx
        .execute(
            "UPDATE scrub_state SET cursor = ?2, pass_started_ms = ?3,
                                    lease_until_ms = {NOW_MS} + ?4
             WHERE id = 1 AND lease_owner = ?1",
            &[
                owner.into(),
                cursor.into(),
                pass_started_ms.into(),
                ttl_ms.into(),
            ],
        )
        .await?
        == 1)
}

/// Ends the pass: the next starts from the first blob. Fenced like the position.
pub async fn finish_scrub_pass(tx: &mut Tx<'_>, owner: &str) -> Result<bool, MetadataError> {
    Ok(tx
        .execute(
            "UPDATE scrub_state SET cursor = NULL, pass_started_ms = NULL,
                                    last_pass_done_ms = {NOW_MS}
             WHERE id = 1 AND lease_owner = ?1",
            &[owner.into()],
        )
        .await?
        == 1)
}

/// Gives the lease up, so another node (or this one restarted) may take it at once.
pub async fn release_scrub_lease(tx: &mut Tx<'_>, owner: &str) -> Result<(), MetadataError> {
    tx.execute(
        "UPDATE scrub_state SET lease_owner = NULL, lease_until_ms = 0
         WHERE id = 1 AND lease_owner = ?1",
        &[owner.into()],
    )
    .await?;
    Ok(())
}

/// The stored state without taking the lease (for tests and operators).
pub async fn scrub_state(tx: &mut Tx<'_>) -> Result<Option<ScrubState>, MetadataError> {
    let row = tx
        .query_opt(
            "SELECT cursor, pass_started_ms, last_pass_done_ms, {NOW_MS} FROM scrub_state
             WHERE id = 1",
            &[],
        )
        .await?;
    row.map(|r| {
        Ok(ScrubState {
            cursor: r.opt_text(0)?.map(str::to_owned),
            pass_started_ms: r.opt_i64(1)?,
            last_pass_done_ms: r.opt_i64(2)?,
            now_ms: r.i64(3)?,
        })
    })
    .transpose()
}
