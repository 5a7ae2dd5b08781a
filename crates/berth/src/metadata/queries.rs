//! The registry's statements, written once for both dialects. Each takes the transaction it
//! runs in, so the service composes several into one commit:
//!
//! ```ignore
//! metadata.write(|tx| Box::pin(async move {
//!     queries::link_blob(tx, repo, digest, size).await?;
//!     queries::delete_upload(tx, upload_id).await?;
//!     Ok(())
//! })).await?;
//! ```
//!
//! Integrity rules live here, inside the transactions, ordered so that PostgreSQL's READ
//! COMMITTED gives the same outcome as SQLite's single writer: a manifest put share-locks
//! (`{KEY_SHARE}`) the blob links and child manifests it checks; a blob unlink or manifest
//! delete removes its row *first* (waiting for any put holding that lock) and only then looks
//! for references, in a new statement that sees what the put committed, rolling back if any.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use oci::{Digest, RepositoryName, Tag};

use super::db::{Param, Row, Tx};
pub use super::immutability::protecting_rule;
use super::{MetadataError, NewManifest, Page, Referrer, StoredManifest, UploadSession};
use super::{immutability, quotas};

/// A manifest put refreshes its blobs' `last_referenced_at` only when it is at least this old,
/// so concurrent pushes sharing a base layer do not all write (and on PostgreSQL lock) its row.
/// GC grace periods are hours; a minute of staleness is immaterial.
pub const REFERENCE_REFRESH_SECS: i64 = 60;

pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn size_param(size: u64) -> Result<Param<'static>, MetadataError> {
    i64::try_from(size)
        .map(Param::Int)
        .map_err(|_| MetadataError::internal(format!("size {size} does not fit the database")))
}

fn limit(page: Page<'_>) -> i64 {
    page.limit
        .map_or(i64::MAX, |l| i64::try_from(l).unwrap_or(i64::MAX))
}

/// The statements on the pull path, kept stable (see `hot_statements_are_never_re_prepared`).
/// The quarantine flag costs one primary-key probe of a table that is almost always empty.
const BLOB_IN_REPOSITORY: &str = "SELECT b.size,
         CASE WHEN EXISTS (SELECT 1 FROM quarantined_blobs q WHERE q.digest = b.digest)
              THEN 1 ELSE 0 END
         FROM repositories r
         JOIN repository_blobs rb ON rb.repository_id = r.id
         JOIN blobs b ON b.digest = rb.digest
         WHERE r.name = ?1 AND rb.digest = ?2";
const MANIFEST_BY_DIGEST: &str = "SELECT m.digest, m.media_type, m.content FROM repositories r
         JOIN manifests m ON m.repository_id = r.id
         WHERE r.name = ?1 AND m.digest = ?2";
const MANIFEST_BY_TAG: &str = "SELECT m.digest, m.media_type, m.content FROM repositories r
         JOIN tags t ON t.repository_id = r.id
         JOIN manifests m ON m.id = t.manifest_id
         WHERE r.name = ?1 AND t.name = ?2";
const LIST_TAGS: &str = "SELECT name FROM tags
             WHERE repository_id = (SELECT id FROM repositories WHERE name = ?1) AND name > ?2
             ORDER BY name LIMIT ?3";
const REPOSITORY_TAGS: &str = "SELECT t.name, m.digest FROM repositories r
         JOIN tags t ON t.repository_id = r.id
         JOIN manifests m ON m.id = t.manifest_id
         WHERE r.name = ?1 ORDER BY t.name";
const REFERRERS: &str =
    "SELECT m.digest, m.media_type, length(m.content), m.artifact_type, m.annotations
         FROM repositories r JOIN manifests m ON m.repository_id = r.id
         WHERE r.name = ?1 AND m.subject = ?2 ORDER BY m.id";
#[cfg(test)]
pub(crate) const HOT_STATEMENTS: &[&str] = &[
    BLOB_IN_REPOSITORY,
    MANIFEST_BY_DIGEST,
    MANIFEST_BY_TAG,
    LIST_TAGS,
    REPOSITORY_TAGS,
    REFERRERS,
];

const REPOSITORY_ID: &str = "SELECT id FROM repositories WHERE name = ?1";

pub async fn repository_id(
    tx: &mut Tx<'_>,
    repo: &RepositoryName,
) -> Result<Option<i64>, MetadataError> {
    tx.query_opt(REPOSITORY_ID, &[repo.as_str().into()])
        .await?
        .map(|r| r.i64(0))
        .transpose()
}

/// The repository's id, creating the row if needed. Safe against another node creating it at
/// the same moment: `ON CONFLICT DO NOTHING` waits for that insert, and the second `SELECT`
/// (a new statement, so a new snapshot) then sees it.
pub async fn ensure_repository(
    tx: &mut Tx<'_>,
    repo: &RepositoryName,
) -> Result<i64, MetadataError> {
    if let Some(id) = repository_id(tx, repo).await? {
        return Ok(id);
    }
    let inserted = tx
        .query_opt(
            "INSERT INTO repositories (name) VALUES (?1)
             ON CONFLICT (name) DO NOTHING RETURNING id",
            &[repo.as_str().into()],
        )
        .await?;
    match inserted {
        Some(row) => row.i64(0),
        None => repository_id(tx, repo)
            .await?
            .ok_or_else(|| MetadataError::internal("a repository vanished while created")),
    }
}

const PING: &str = "SELECT 1";
/// PostgreSQL's SUM of a BIGINT is a NUMERIC; the cast keeps it an integer on both.
const STORED_BLOB_BYTES: &str = "SELECT CAST(COALESCE(SUM(size), 0) AS BIGINT) FROM blobs";

/// The readiness probe: a statement that touches no table.
pub async fn ping(tx: &mut Tx<'_>) -> Result<(), MetadataError> {
    tx.query_opt(PING, &[]).await.map(|_| ())
}

/// Bytes of every blob the registry holds, each counted once (a full scan: callers cache it).
pub async fn stored_blob_bytes(tx: &mut Tx<'_>) -> Result<u64, MetadataError> {
    match tx.query_opt(STORED_BLOB_BYTES, &[]).await? {
        Some(row) => row.u64(0),
        None => Ok(0),
    }
}

/// A blob linked into a repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkedBlob {
    pub size: u64,
    /// Its stored bytes failed an integrity check: it is not served until pushed again.
    pub quarantined: bool,
}

/// The blob as linked into `repo`, quarantined or not.
pub async fn linked_blob(
    tx: &mut Tx<'_>,
    repo: &RepositoryName,
    digest: &Digest,
) -> Result<Option<LinkedBlob>, MetadataError> {
    let digest = digest.to_string();
    tx.query_opt(
        BLOB_IN_REPOSITORY,
        &[repo.as_str().into(), (&digest).into()],
    )
    .await?
    .map(|r| {
        Ok(LinkedBlob {
            size: r.u64(0)?,
            quarantined: r.i64(1)? != 0,
        })
    })
    .transpose()
}

/// The blob's size if `repo` may read it (linked, and not quarantined).
pub async fn blob_in_repository(
    tx: &mut Tx<'_>,
    repo: &RepositoryName,
    digest: &Digest,
) -> Result<Option<u64>, MetadataError> {
    Ok(linked_blob(tx, repo, digest)
        .await?
        .filter(|b| !b.quarantined)
        .map(|b| b.size))
}

/// Lets `repo` read a committed blob (creating the repository if needed), and marks the blob
/// referenced now. Refused with [`MetadataError::BlobDeleting`] while garbage collection is
/// deleting the blob's bytes.
pub async fn link_blob(
    tx: &mut Tx<'_>,
    repo: &RepositoryName,
    digest: &Digest,
    size: u64,
) -> Result<(), MetadataError> {
    let repo_id = ensure_repository(tx, repo).await?;
    let (d, now) = (digest.to_string(), now_secs());
    // The upsert locks the blob row: a GC marking it `deleting` either committed before (no
    // row comes back) or waits and then sees the fresh `last_referenced_at`.
    let live = tx
        .query_opt(
            "INSERT INTO blobs (digest, size, created_at, last_referenced_at)
             VALUES (?1, ?2, ?3, ?3)
             ON CONFLICT (digest) DO UPDATE SET last_referenced_at = excluded.last_referenced_at
             WHERE blobs.state = 'live'
             RETURNING state",
            &[(&d).into(), size_param(size)?, now.into()],
        )
        .await?;
    if live.is_none() {
        return Err(MetadataError::BlobDeleting(digest.clone()));
    }
    tx.execute(
        "INSERT INTO repository_blobs (repository_id, digest, created_at, last_referenced_at)
         VALUES (?1, ?2, ?3, ?3)
         ON CONFLICT (repository_id, digest)
         DO UPDATE SET last_referenced_at = excluded.last_referenced_at",
        &[repo_id.into(), (&d).into(), now.into()],
    )
    .await?;
    Ok(())
}

/// Removes `repo`'s link to the blob; false if there was none. Refused with
/// [`MetadataError::BlobReferenced`] (and rolled back) while a manifest of `repo` references it.
pub async fn unlink_blob(
    tx: &mut Tx<'_>,
    repo: &RepositoryName,
    digest: &Digest,
) -> Result<bool, MetadataError> {
    let by = delete_unless_referenced(
        tx,
        repo,
        digest,
        "DELETE FROM repository_blobs
         WHERE repository_id = (SELECT id FROM repositories WHERE name = ?1) AND digest = ?2",
        "SELECT m.digest FROM manifest_blobs mb JOIN manifests m ON m.id = mb.manifest_id
         WHERE mb.digest = ?2
         AND m.repository_id = (SELECT id FROM repositories WHERE name = ?1)
         LIMIT 1",
    )
    .await?;
    match by {
        Deleted::Gone => Ok(true),
        Deleted::NotThere => Ok(false),
        Deleted::Refused(by) => Err(MetadataError::BlobReferenced { by }),
    }
}

enum Deleted {
    Gone,
    NotThere,
    /// A manifest of the repository still references it; the transaction must roll back.
    Refused(Digest),
}

/// Runs `delete` (params: repository name, digest), then `referrer`, which names a manifest
/// still referencing what was deleted. Delete first: on PostgreSQL the delete waits for a
/// manifest put holding the row, and the check, a new statement, then sees that manifest.
async fn delete_unless_referenced(
    tx: &mut Tx<'_>,
    repo: &RepositoryName,
    digest: &Digest,
    delete: &'static str,
    referrer: &'static str,
) -> Result<Deleted, MetadataError> {
    let d = digest.to_string();
    let params = [repo.as_str().into(), (&d).into()];
    if tx.execute(delete, &params).await? == 0 {
        return Ok(Deleted::NotThere);
    }
    match tx.query_opt(referrer, &params).await? {
        Some(row) => Ok(Deleted::Refused(row.digest(0)?)),
        None => Ok(Deleted::Gone),
    }
}

/// Links the uploaded blob into `repo` and ends upload session `upload_id`. `repaired`: the
/// upload's bytes replaced a quarantined blob's, so the quarantine is lifted and this event
/// (`blob.repaired`) appended.
pub async fn finish_upload(
    tx: &mut Tx<'_>,
    repo: &RepositoryName,
    digest: &Digest,
    size: u64,
    upload_id: &str,
    repaired: Option<&super::events::NewEvent>,
) -> Result<(), MetadataError> {
    link_blob(tx, repo, digest, size).await?;
    delete_upload(tx, upload_id).await?;
    if let Some(event) = repaired
        && super::integrity::release(tx, digest).await?
    {
        super::events::append(tx, event).await?;
    }
    Ok(())
}

pub async fn create_upload(tx: &mut Tx<'_>, s: &UploadSession) -> Result<(), MetadataError> {
    tx.execute(
        "INSERT INTO uploads (id, repository, updated_at, owner) VALUES (?1, ?2, ?3, ?4)",
        &[
            s.id.as_str().into(),
            s.repository.as_str().into(),
            s.updated_at.into(),
            s.owner.as_deref().into(),
        ],
    )
    .await?;
    Ok(())
}

pub async fn get_upload(tx: &mut Tx<'_>, id: &str) -> Result<Option<UploadSession>, MetadataError> {
    let Some(row) = tx
        .query_opt(
            "SELECT id, repository, updated_at, owner FROM uploads WHERE id = ?1",
            &[id.into()],
        )
        .await?
    else {
        return Ok(None);
    };
    Ok(Some(UploadSession {
        id: row.text(0)?.to_owned(),
        repository: row.text(1)?.parse().map_err(MetadataError::internal)?,
        updated_at: row.i64(2)?,
        owner: row.opt_text(3)?.map(str::to_owned),
    }))
}

/// Marks the upload active at `now`, writing only if the stored time is at least
/// [`UPLOAD_TOUCH_GRANULARITY_SECS`] older: a PATCH must not cost an fsync just for this.
/// Moves `updated_at` to `now` only when it is at least `granularity_secs` old, so PATCHes in
/// quick succession write (and on SQLite fsync) nothing. The caller picks the granularity as a
/// small fraction of the idle timeout, so an active upload never looks idle.
pub async fn touch_upload(
    tx: &mut Tx<'_>,
    id: &str,
    now: i64,
    granularity_secs: i64,
) -> Result<(), MetadataError> {
    tx.execute(
        "UPDATE uploads SET updated_at = ?2 WHERE id = ?1 AND updated_at <= ?3",
        &[id.into(), now.into(), (now - granularity_secs).into()],
    )
    .await?;
    Ok(())
}

/// False if there was no such upload.
pub async fn delete_upload(tx: &mut Tx<'_>, id: &str) -> Result<bool, MetadataError> {
    Ok(tx
        .execute("DELETE FROM uploads WHERE id = ?1", &[id.into()])
        .await?
        > 0)
}

/// Uploads last touched before `before`.
pub async fn stale_uploads(tx: &mut Tx<'_>, before: i64) -> Result<Vec<String>, MetadataError> {
    texts(
        tx.query(
            "SELECT id FROM uploads WHERE updated_at < ?1 ORDER BY id",
            &[before.into()],
        )
        .await?,
    )
}

/// Every upload session's id, sorted (for reconciling storage with metadata).
pub async fn upload_ids(tx: &mut Tx<'_>) -> Result<Vec<String>, MetadataError> {
    texts(tx.query("SELECT id FROM uploads ORDER BY id", &[]).await?)
}

fn texts(rows: Vec<Row>) -> Result<Vec<String>, MetadataError> {
    rows.iter().map(|r| r.text(0).map(str::to_owned)).collect()
}

const MANIFEST_ID: &str =
    "SELECT id FROM manifests WHERE repository_id = ?1 AND digest = ?2 {KEY_SHARE}";

/// Stores a manifest with a row per reference and, with it, points every tag in `tags` at it.
/// Refused without changing anything if a referenced blob or child manifest is missing from
/// the repository, the size stored under a digest differs from the size the manifest declares
/// for it, or a tag that an immutability rule protects points at another manifest
/// ([`MetadataError::TagImmutable`]). A new manifest row is charged to its namespace's usage
/// (see [`quotas`]); returns the bytes charged (0 if the manifest was there already). The
/// quota's limit is not checked here: the push path calls [`quotas::check_limit`].
pub async fn put_manifest(
    tx: &mut Tx<'_>,
    repo: &RepositoryName,
    m: &NewManifest,
    tags: &[Tag],
) -> Result<u64, MetadataError> {
    let repo_id = ensure_repository(tx, repo).await?;
    let now = now_secs();
    let declared: HashMap<&Digest, u64> = m.declared_sizes.iter().map(|(d, s)| (d, *s)).collect();
    // Distinct, sorted: the order the accounting rows are locked in.
    let mut sizes = BTreeMap::new();
    let mut seen = HashSet::new();
    for blob in m.blobs.iter().filter(|b| seen.insert(*b)) {
        let d = blob.to_string();
        // Share-locked: neither the link nor the blob can go until this commits.
        let stored = tx
            .query_opt(
                "SELECT b.size FROM repository_blobs rb JOIN blobs b ON b.digest = rb.digest
                 WHERE rb.repository_id = ?1 AND rb.digest = ?2 {KEY_SHARE}",
                &[repo_id.into(), (&d).into()],
            )
            .await?
            .ok_or_else(|| MetadataError::MissingBlob(blob.clone()))?
            .u64(0)?;
        check_size(&declared, blob, stored)?;
        sizes.insert(d, stored);
    }
    for child in &m.children {
        let d = child.to_string();
        let stored = tx
            .query_opt(
                "SELECT length(content) FROM manifests
                 WHERE repository_id = ?1 AND digest = ?2 {KEY_SHARE}",
                &[repo_id.into(), (&d).into()],
            )
            .await?
            .ok_or_else(|| MetadataError::MissingManifest(child.clone()))?
            .u64(0)?;
        check_size(&declared, child, stored)?;
    }

    let digest = m.digest.to_string();
    let existing = tx
        .query_opt(MANIFEST_ID, &[repo_id.into(), (&digest).into()])
        .await?;
    let (manifest_id, charged) = match existing {
        Some(row) => (row.i64(0)?, 0),
        None => match insert_manifest(tx, repo_id, m, &digest, now).await? {
            Inserted::New(id) => {
                let len = m.bytes.len() as u64;
                (id, quotas::charge(tx, repo.namespace(), &sizes, len).await?)
            }
            Inserted::Existing(id) => (id, 0),
        },
    };
    let stale = now - REFERENCE_REFRESH_SECS;
    tx.execute(
        "UPDATE repository_blobs SET last_referenced_at = ?2
         WHERE repository_id = ?1 AND last_referenced_at <= ?3
         AND digest IN (SELECT digest FROM manifest_blobs WHERE manifest_id = ?4)",
        &[repo_id.into(), now.into(), stale.into(), manifest_id.into()],
    )
    .await?;
    tx.execute(
        "UPDATE blobs SET last_referenced_at = ?1
         WHERE last_referenced_at <= ?2
         AND digest IN (SELECT digest FROM manifest_blobs WHERE manifest_id = ?3)",
        &[now.into(), stale.into(), manifest_id.into()],
    )
    .await?;
    let rules = match tags {
        [] => Vec::new(),
        _ => immutability::rules(tx, repo.namespace()).await?,
    };
    for tag in tags {
        let params = [
            repo_id.into(),
            tag.as_str().into(),
            manifest_id.into(),
            now.into(),
        ];
        match immutability::first_protecting(&rules, tag.as_str()) {
            None => {
                tx.execute(PUT_TAG, &params).await?;
            }
            // The upsert changes a protected tag only where it already points at this
            // manifest; on PostgreSQL it locks the row and judges its latest committed
            // version, so a tag another node just created is seen.
            Some(rule) => {
                if tx.query_opt(PUT_PROTECTED_TAG, &params).await?.is_none() {
                    return Err(immutability::refusal(rule, tag.as_str()));
                }
            }
        }
    }
    Ok(charged)
}

const PUT_TAG: &str = "INSERT INTO tags (repository_id, name, manifest_id, updated_at)
     VALUES (?1, ?2, ?3, ?4)
     ON CONFLICT (repository_id, name)
     DO UPDATE SET manifest_id = excluded.manifest_id, updated_at = excluded.updated_at";
const PUT_PROTECTED_TAG: &str = "INSERT INTO tags (repository_id, name, manifest_id, updated_at)
     VALUES (?1, ?2, ?3, ?4)
     ON CONFLICT (repository_id, name)
     DO UPDATE SET updated_at = excluded.updated_at WHERE tags.manifest_id = excluded.manifest_id
     RETURNING manifest_id";

/// A manifest's descriptor for `digest` must declare the size stored under it.
fn check_size(
    declared: &HashMap<&Digest, u64>,
    digest: &Digest,
    stored: u64,
) -> Result<(), MetadataError> {
    match declared.get(digest) {
        Some(&size) if size != stored => Err(MetadataError::SizeMismatch {
            digest: digest.clone(),
            declared: size,
            stored,
        }),
        _ => Ok(()),
    }
}

enum Inserted {
    New(i64),
    /// Another transaction inserted it first.
    Existing(i64),
}

async fn insert_manifest(
    tx: &mut Tx<'_>,
    repo_id: i64,
    m: &NewManifest,
    digest: &str,
    now: i64,
) -> Result<Inserted, MetadataError> {
    let annotations = m
        .annotations
        .as_ref()
        .map(serde_json::to_string)
        .transpose()
        .map_err(MetadataError::internal)?;
    let subject = m.subject.as_ref().map(|s| s.to_string());
    let inserted = tx
        .query_opt(
            "INSERT INTO manifests (repository_id, digest, media_type, content, subject,
                                    artifact_type, annotations, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT (repository_id, digest) DO NOTHING RETURNING id",
            &[
                repo_id.into(),
                digest.into(),
                m.media_type.as_str().into(),
                m.bytes.as_slice().into(),
                subject.as_ref().into(),
                m.artifact_type.as_ref().into(),
                annotations.as_ref().into(),
                now.into(),
            ],
        )
        .await?;
    let Some(row) = inserted else {
        // Another node inserted the same manifest since our SELECT and has committed (the
        // insert waited for it): take its row, whose references (and charge) it recorded.
        return tx
            .query_opt(MANIFEST_ID, &[repo_id.into(), digest.into()])
            .await?
            .ok_or_else(|| MetadataError::internal("a manifest vanished while inserted"))?
            .i64(0)
            .map(Inserted::Existing);
    };
    let id = row.i64(0)?;
    for blob in &m.blobs {
        tx.execute(
            "INSERT INTO manifest_blobs (manifest_id, digest) VALUES (?1, ?2)
             ON CONFLICT DO NOTHING",
            &[id.into(), blob.to_string().as_str().into()],
        )
        .await?;
    }
    for child in &m.children {
        tx.execute(
            "INSERT INTO manifest_children (manifest_id, child_digest) VALUES (?1, ?2)
             ON CONFLICT DO NOTHING",
            &[id.into(), child.to_string().as_str().into()],
        )
        .await?;
    }
    Ok(Inserted::New(id))
}

fn stored_manifest(mut row: Row) -> Result<StoredManifest, MetadataError> {
    Ok(StoredManifest {
        digest: row.digest(0)?,
        media_type: row.text(1)?.to_owned(),
        bytes: row.take_bytes(2)?.into(),
    })
}

pub async fn manifest_by_digest(
    tx: &mut Tx<'_>,
    repo: &RepositoryName,
    digest: &Digest,
) -> Result<Option<StoredManifest>, MetadataError> {
    let d = digest.to_string();
    tx.query_opt(MANIFEST_BY_DIGEST, &[repo.as_str().into(), (&d).into()])
        .await?
        .map(stored_manifest)
        .transpose()
}

pub async fn manifest_by_tag(
    tx: &mut Tx<'_>,
    repo: &RepositoryName,
    tag: &Tag,
) -> Result<Option<StoredManifest>, MetadataError> {
    tx.query_opt(
        MANIFEST_BY_TAG,
        &[repo.as_str().into(), tag.as_str().into()],
    )
    .await?
    .map(stored_manifest)
    .transpose()
}

/// Records that the manifest was pulled at `at` (seconds), unless a later pull already is.
pub async fn record_pull(
    tx: &mut Tx<'_>,
    repository: &str,
    digest: &str,
    at: i64,
) -> Result<(), MetadataError> {
    tx.execute(
        "UPDATE manifests SET last_pulled_at = ?3
         WHERE repository_id = (SELECT id FROM repositories WHERE name = ?1) AND digest = ?2
           AND (last_pulled_at IS NULL OR last_pulled_at < ?3)",
        &[repository.into(), digest.into(), at.into()],
    )
    .await?;
    Ok(())
}

/// Removes the manifest, its reference rows and every tag pointing at it; false if it was not
/// there. Refused with [`MetadataError::ManifestReferenced`] (and rolled back) while an index
/// of the same repository lists it, and with [`MetadataError::TagImmutable`] while a tag an
/// immutability rule protects points at it. Referrers (manifests whose subject it is) do not
/// block it. Its bytes and the blobs only it referenced leave its namespace's usage.
pub async fn delete_manifest(
    tx: &mut Tx<'_>,
    repo: &RepositoryName,
    digest: &Digest,
) -> Result<bool, MetadataError> {
    let d = digest.to_string();
    // Locked first: a put holding the row (to tag it, or to list it in an index) commits
    // before this goes on, and the statements below see what it wrote.
    let Some(row) = tx
        .query_opt(
            "SELECT id, length(content) FROM manifests
             WHERE repository_id = (SELECT id FROM repositories WHERE name = ?1) AND digest = ?2
             {FOR_UPDATE}",
            &[repo.as_str().into(), (&d).into()],
        )
        .await?
    else {
        return Ok(false);
    };
    let (id, len) = (row.i64(0)?, row.u64(1)?);
    let tags = texts(
        tx.query(
            "SELECT name FROM tags WHERE manifest_id = ?1 ORDER BY name",
            &[id.into()],
        )
        .await?,
    )?;
    if !tags.is_empty() {
        let rules = immutability::rules(tx, repo.namespace()).await?;
        for tag in &tags {
            if let Some(rule) = immutability::first_protecting(&rules, tag) {
                return Err(immutability::refusal(rule, tag));
            }
        }
    }
    let blobs: BTreeSet<String> = texts(
        tx.query(
            "SELECT digest FROM manifest_blobs WHERE manifest_id = ?1",
            &[id.into()],
        )
        .await?,
    )?
    .into_iter()
    .collect();
    let by = delete_unless_referenced(
        tx,
        repo,
        digest,
        "DELETE FROM manifests
         WHERE repository_id = (SELECT id FROM repositories WHERE name = ?1) AND digest = ?2",
        "SELECT m.digest FROM manifest_children c JOIN manifests m ON m.id = c.manifest_id
         WHERE c.child_digest = ?2
         AND m.repository_id = (SELECT id FROM repositories WHERE name = ?1)
         LIMIT 1",
    )
    .await?;
    match by {
        Deleted::Gone => {
            quotas::uncharge(tx, repo.namespace(), &blobs, len).await?;
            Ok(true)
        }
        Deleted::NotThere => Ok(false),
        Deleted::Refused(by) => Err(MetadataError::ManifestReferenced { by }),
    }
}

/// False if the tag was not there. Refused with [`MetadataError::TagImmutable`] if an
/// immutability rule protects it.
pub async fn delete_tag(
    tx: &mut Tx<'_>,
    repo: &RepositoryName,
    tag: &Tag,
) -> Result<bool, MetadataError> {
    let params = [repo.as_str().into(), tag.as_str().into()];
    if let Some(rule) = protecting_rule(tx, repo, tag).await? {
        let exists = tx
            .query_opt(
                "SELECT 1 FROM tags
                 WHERE repository_id = (SELECT id FROM repositories WHERE name = ?1)
                 AND name = ?2",
                &params,
            )
            .await?
            .is_some();
        return match exists {
            true => Err(immutability::refusal(&rule, tag.as_str())),
            false => Ok(false),
        };
    }
    Ok(tx
        .execute(
            "DELETE FROM tags
             WHERE repository_id = (SELECT id FROM repositories WHERE name = ?1) AND name = ?2",
            &params,
        )
        .await?
        > 0)
}

/// Tags sorted bytewise, or `None` if the repository is unknown.
pub async fn list_tags(
    tx: &mut Tx<'_>,
    repo: &RepositoryName,
    page: Page<'_>,
) -> Result<Option<Vec<String>>, MetadataError> {
    let tags = texts(
        tx.query(
            LIST_TAGS,
            &[
                repo.as_str().into(),
                page.last.unwrap_or("").into(),
                limit(page).into(),
            ],
        )
        .await?,
    )?;
    // Only an empty page needs a second statement, to tell "no tags" from "no repository".
    if tags.is_empty() && repository_id(tx, repo).await?.is_none() {
        return Ok(None);
    }
    Ok(Some(tags))
}

/// Repositories holding at least one manifest, sorted.
pub async fn list_repositories(
    tx: &mut Tx<'_>,
    page: Page<'_>,
) -> Result<Vec<String>, MetadataError> {
    texts(
        tx.query(
            "SELECT r.name FROM repositories r
             WHERE r.name > ?1 AND EXISTS (SELECT 1 FROM manifests m WHERE m.repository_id = r.id)
             ORDER BY r.name LIMIT ?2",
            &[page.last.unwrap_or("").into(), limit(page).into()],
        )
        .await?,
    )
}

/// Every repository, including those holding only blobs, sorted.
pub async fn all_repositories(tx: &mut Tx<'_>) -> Result<Vec<String>, MetadataError> {
    texts(
        tx.query("SELECT name FROM repositories ORDER BY name", &[])
            .await?,
    )
}

/// Every blob the repository may read, with its size, sorted by digest.
pub async fn repository_blobs(
    tx: &mut Tx<'_>,
    repo: &RepositoryName,
) -> Result<Vec<(Digest, u64)>, MetadataError> {
    tx.query(
        "SELECT b.digest, b.size FROM repositories r
         JOIN repository_blobs rb ON rb.repository_id = r.id
         JOIN blobs b ON b.digest = rb.digest
         WHERE r.name = ?1 ORDER BY b.digest",
        &[repo.as_str().into()],
    )
    .await?
    .iter()
    .map(|r| Ok((r.digest(0)?, r.u64(1)?)))
    .collect()
}

/// Every manifest of the repository, oldest first (so an index follows its children).
pub async fn repository_manifests(
    tx: &mut Tx<'_>,
    repo: &RepositoryName,
) -> Result<Vec<StoredManifest>, MetadataError> {
    tx.query(
        "SELECT m.digest, m.media_type, m.content FROM repositories r
         JOIN manifests m ON m.repository_id = r.id
         WHERE r.name = ?1 ORDER BY m.id",
        &[repo.as_str().into()],
    )
    .await?
    .into_iter()
    .map(stored_manifest)
    .collect()
}

/// Every tag of the repository with the digest it points at, sorted by tag.
pub async fn repository_tags(
    tx: &mut Tx<'_>,
    repo: &RepositoryName,
) -> Result<Vec<(String, Digest)>, MetadataError> {
    tx.query(REPOSITORY_TAGS, &[repo.as_str().into()])
        .await?
        .iter()
        .map(|r| Ok((r.text(0)?.to_owned(), r.digest(1)?)))
        .collect()
}

/// Manifests in `repo` whose subject is `subject`, oldest first.
pub async fn referrers(
    tx: &mut Tx<'_>,
    repo: &RepositoryName,
    subject: &Digest,
) -> Result<Vec<Referrer>, MetadataError> {
    let s = subject.to_string();
    tx.query(REFERRERS, &[repo.as_str().into(), (&s).into()])
        .await?
        .iter()
        .map(|r| {
            Ok(Referrer {
                digest: r.digest(0)?,
                media_type: r.text(1)?.to_owned(),
                size: r.u64(2)?,
                artifact_type: r.opt_text(3)?.map(str::to_owned),
                annotations: r
                    .opt_text(4)?
                    .map(serde_json::from_str)
                    .transpose()
                    .map_err(MetadataError::internal)?,
            })
        })
        .collect()
}

/// Up to 1000 repositories that may read a blob (for a mount without `from`, which looks for
/// one the caller may read).
pub async fn repositories_with_blob(
    tx: &mut Tx<'_>,
    digest: &Digest,
) -> Result<Vec<String>, MetadataError> {
    let digest = digest.to_string();
    tx.query(
        "SELECT r.name FROM repository_blobs rb JOIN repositories r ON r.id = rb.repository_id
         WHERE rb.digest = ?1 ORDER BY r.name LIMIT 1000",
        &[(&digest).into()],
    )
    .await?
    .iter()
    .map(|r| r.text(0).map(str::to_owned))
    .collect()
}
