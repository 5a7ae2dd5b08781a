//! Storage accounting per namespace, and its limits.
//!
//! A namespace's usage is the size of every distinct blob its manifests reference (once per
//! namespace, however many images and repositories share it) plus every manifest's own bytes.
//! Uploads in progress and blobs linked but referenced by no manifest never count.
//!
//! It is kept exact incrementally, in the transaction that adds or removes a manifest row:
//! [`super::queries::put_manifest`] calls [`charge`] when it inserts one,
//! [`super::queries::delete_manifest`] calls [`uncharge`]. `namespace_blobs` counts the
//! manifests referencing each blob; a blob is added to the usage when its count goes from 0 to
//! 1 and taken off when it returns to 0. Both changes are single-row upserts / updates, so on
//! PostgreSQL the row lock orders concurrent pushes and deletes exactly as SQLite's single
//! writer does; rows are touched in digest order, then the namespace's usage row, so two
//! transactions never wait on each other in a cycle.
//!
//! The limit is checked separately ([`check_limit`]), by the push path, in the same
//! transaction after the charge: a restore from the trash calls `put_manifest` without it.

use std::collections::{BTreeMap, BTreeSet};

use super::MetadataError;
use super::db::{Param, Tx};

fn int(v: u64) -> Result<Param<'static>, MetadataError> {
    i64::try_from(v)
        .map(Param::Int)
        .map_err(|_| MetadataError::internal(format!("{v} does not fit the database")))
}

/// A namespace's usage and limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quota {
    pub namespace: String,
    pub usage_bytes: u64,
    /// `None`: no limit.
    pub limit_bytes: Option<u64>,
}

/// Adds a new manifest row of `namespace` to its usage: `blobs` are the distinct blobs it
/// references with their stored sizes, `manifest_len` its own bytes. Returns the bytes added
/// (blobs no other manifest of the namespace referenced, plus the manifest).
pub(crate) async fn charge(
    tx: &mut Tx<'_>,
    namespace: &str,
    blobs: &BTreeMap<String, u64>,
    manifest_len: u64,
) -> Result<u64, MetadataError> {
    let mut added = manifest_len;
    for (digest, &size) in blobs {
        let refs = tx
            .query_opt(
                "INSERT INTO namespace_blobs (namespace, digest, size, refs)
                 VALUES (?1, ?2, ?3, 1)
                 ON CONFLICT (namespace, digest) DO UPDATE SET refs = namespace_blobs.refs + 1
                 RETURNING refs",
                &[namespace.into(), digest.into(), int(size)?],
            )
            .await?
            .ok_or_else(|| MetadataError::internal("an upsert returned nothing"))?
            .i64(0)?;
        if refs == 1 {
            added = added.saturating_add(size);
        }
    }
    add_usage(tx, namespace, i64::try_from(added).unwrap_or(i64::MAX)).await?;
    Ok(added)
}

/// Takes a manifest row of `namespace` that is being deleted off its usage: `blobs` are the
/// digests its reference rows list. Returns the bytes freed.
pub(crate) async fn uncharge(
    tx: &mut Tx<'_>,
    namespace: &str,
    blobs: &BTreeSet<String>,
    manifest_len: u64,
) -> Result<u64, MetadataError> {
    let mut freed = manifest_len;
    for digest in blobs {
        let row = tx
            .query_opt(
                "UPDATE namespace_blobs SET refs = refs - 1
                 WHERE namespace = ?1 AND digest = ?2 AND refs > 0
                 RETURNING refs, size",
                &[namespace.into(), digest.into()],
            )
            .await?;
        match row {
            Some(row) if row.i64(0)? == 0 => {
                tx.execute(
                    "DELETE FROM namespace_blobs WHERE namespace = ?1 AND digest = ?2",
                    &[namespace.into(), digest.into()],
                )
                .await?;
                freed = freed.saturating_add(row.u64(1)?);
            }
            Some(_) => {}
            // Accounting drifted (found by `berth quota reconcile`); a delete must not fail
            // because of it.
            None => tracing::warn!(
                namespace,
                blob.digest = digest.as_str(),
                "no reference count for a blob of a deleted manifest; run `berth quota reconcile`"
            ),
        }
    }
    add_usage(tx, namespace, -i64::try_from(freed).unwrap_or(i64::MAX)).await?;
    Ok(freed)
}

async fn add_usage(tx: &mut Tx<'_>, namespace: &str, delta: i64) -> Result<(), MetadataError> {
    tx.execute(
        "INSERT INTO namespace_quotas (namespace, usage_bytes) VALUES (?1, ?2)
         ON CONFLICT (namespace)
         DO UPDATE SET usage_bytes = namespace_quotas.usage_bytes + excluded.usage_bytes",
        &[namespace.into(), delta.into()],
    )
    .await?;
    Ok(())
}

const QUOTA: &str = "SELECT namespace, usage_bytes, limit_bytes FROM namespace_quotas
     WHERE namespace = ?1";

fn quota(row: &super::db::Row) -> Result<Quota, MetadataError> {
    Ok(Quota {
        namespace: row.text(0)?.to_owned(),
        // A drifted count below zero reads as nothing used.
        usage_bytes: u64::try_from(row.i64(1)?).unwrap_or(0),
        limit_bytes: row
            .opt_i64(2)?
            .map(|l| u64::try_from(l).map_err(MetadataError::internal))
            .transpose()?,
    })
}

/// The namespace's usage and limit (nothing used and no limit if it never held a manifest).
pub async fn quota_of(tx: &mut Tx<'_>, namespace: &str) -> Result<Quota, MetadataError> {
    match tx.query_opt(QUOTA, &[namespace.into()]).await? {
        Some(row) => quota(&row),
        None => Ok(Quota {
            namespace: namespace.to_string(),
            usage_bytes: 0,
            limit_bytes: None,
        }),
    }
}

/// Every namespace that has a usage or a limit, sorted.
pub async fn quotas(tx: &mut Tx<'_>) -> Result<Vec<Quota>, MetadataError> {
    tx.query(
        "SELECT namespace, usage_bytes, limit_bytes FROM namespace_quotas ORDER BY namespace",
        &[],
    )
    .await?
    .iter()
    .map(quota)
    .collect()
}

/// Sets (`Some`) or removes (`None`) the namespace's limit; false if that changed nothing.
pub async fn set_limit(
    tx: &mut Tx<'_>,
    namespace: &str,
    limit: Option<u64>,
) -> Result<bool, MetadataError> {
    let before = quota_of(tx, namespace).await?.limit_bytes;
    if before == limit {
        return Ok(false);
    }
    tx.execute(
        "INSERT INTO namespace_quotas (namespace, usage_bytes, limit_bytes) VALUES (?1, 0, ?2)
         ON CONFLICT (namespace) DO UPDATE SET limit_bytes = excluded.limit_bytes",
        &[namespace.into(), limit.map(int).transpose()?.into()],
    )
    .await?;
    Ok(true)
}

/// Refuses a push that added `charged` bytes to the namespace if its usage is now over the
/// limit. Called after [`charge`], in its transaction, whose usage row it locked: the usage read
/// here is exact whatever other nodes do. A push that added nothing (a tag moved, a manifest
/// pushed again) is never refused, even over a limit lowered below the usage.
pub async fn check_limit(
    tx: &mut Tx<'_>,
    namespace: &str,
    charged: u64,
) -> Result<(), MetadataError> {
    if charged == 0 {
        return Ok(());
    }
    let q = quota_of(tx, namespace).await?;
    match q.limit_bytes {
        Some(limit) if q.usage_bytes > limit => Err(MetadataError::QuotaExceeded {
            namespace: q.namespace,
            usage: q.usage_bytes.saturating_sub(charged),
            limit,
            needed: charged,
        }),
        _ => Ok(()),
    }
}

/// Refuses early a blob of `size` bytes that can never fit the namespace: it is not charged
/// yet (no manifest of the namespace references it) and is larger than what is left. A read:
/// the exact check is [`check_limit`], at the manifest.
pub async fn check_blob_fits(
    tx: &mut Tx<'_>,
    namespace: &str,
    digest: &str,
    size: u64,
) -> Result<(), MetadataError> {
    let q = quota_of(tx, namespace).await?;
    let Some(limit) = q.limit_bytes else {
        return Ok(());
    };
    if q.usage_bytes.saturating_add(size) <= limit {
        return Ok(());
    }
    let charged = tx
        .query_opt(
            "SELECT 1 FROM namespace_blobs WHERE namespace = ?1 AND digest = ?2",
            &[namespace.into(), digest.into()],
        )
        .await?
        .is_some();
    if charged {
        return Ok(());
    }
    Err(MetadataError::QuotaExceeded {
        namespace: q.namespace,
        usage: q.usage_bytes,
        limit,
        needed: size,
    })
}

/// A namespace's usage as stored and as recomputed from the manifests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageCheck {
    pub namespace: String,
    pub stored_bytes: u64,
    pub actual_bytes: u64,
    /// Blob reference counts that differ from the manifests' reference rows.
    pub wrong_counts: u64,
}

impl UsageCheck {
    pub fn drift(&self) -> i128 {
        self.stored_bytes as i128 - self.actual_bytes as i128
    }

    pub fn drifted(&self) -> bool {
        self.drift() != 0 || self.wrong_counts > 0
    }
}

/// `CASE` expression for the namespace of repository `r` (its name up to the first `/`).
/// Written out in each statement: statements are static text.
const TRUE_COUNTS: &str = "SELECT CASE WHEN {STRPOS}(r.name, '/') > 0
                THEN substr(r.name, 1, {STRPOS}(r.name, '/') - 1) ELSE r.name END,
           mb.digest, MAX(b.size), COUNT(*)
     FROM manifest_blobs mb
     JOIN manifests m ON m.id = mb.manifest_id
     JOIN repositories r ON r.id = m.repository_id
     JOIN blobs b ON b.digest = mb.digest
     GROUP BY 1, 2";
const TRUE_MANIFEST_BYTES: &str = "SELECT CASE WHEN {STRPOS}(r.name, '/') > 0
                THEN substr(r.name, 1, {STRPOS}(r.name, '/') - 1) ELSE r.name END,
           CAST(SUM(length(m.content)) AS BIGINT)
     FROM manifests m JOIN repositories r ON r.id = m.repository_id
     GROUP BY 1";

type Counts = BTreeMap<(String, String), (u64, i64)>;

/// Recomputes every namespace's usage from the manifests and their reference rows and compares
/// it with what is stored; with `fix`, stores the recomputed counts and usage (limits stay).
/// Run the fix while the registry is quiet: a push committing meanwhile may be counted twice
/// or not at all (a second reconcile shows it).
pub async fn reconcile(tx: &mut Tx<'_>, fix: bool) -> Result<Vec<UsageCheck>, MetadataError> {
    let mut truth: Counts = BTreeMap::new();
    for row in tx.query(TRUE_COUNTS, &[]).await? {
        truth.insert(
            (row.text(0)?.to_owned(), row.text(1)?.to_owned()),
            (row.u64(2)?, row.i64(3)?),
        );
    }
    let mut stored: Counts = BTreeMap::new();
    for row in tx
        .query(
            "SELECT namespace, digest, size, refs FROM namespace_blobs",
            &[],
        )
        .await?
    {
        stored.insert(
            (row.text(0)?.to_owned(), row.text(1)?.to_owned()),
            (row.u64(2)?, row.i64(3)?),
        );
    }
    let mut checks: BTreeMap<String, UsageCheck> = BTreeMap::new();
    let entry = |checks: &mut BTreeMap<String, UsageCheck>, ns: &str| {
        checks
            .entry(ns.to_string())
            .or_insert_with(|| UsageCheck {
                namespace: ns.to_string(),
                stored_bytes: 0,
                actual_bytes: 0,
                wrong_counts: 0,
            })
            .namespace
            .clone()
    };
    for q in quotas(tx).await? {
        entry(&mut checks, &q.namespace);
        if let Some(c) = checks.get_mut(&q.namespace) {
            c.stored_bytes = q.usage_bytes;
        }
    }
    for row in tx.query(TRUE_MANIFEST_BYTES, &[]).await? {
        let ns = entry(&mut checks, row.text(0)?);
        if let Some(c) = checks.get_mut(&ns) {
            c.actual_bytes = c.actual_bytes.saturating_add(row.u64(1)?);
        }
    }
    for ((ns, _), (size, _)) in &truth {
        entry(&mut checks, ns);
        if let Some(c) = checks.get_mut(ns) {
            c.actual_bytes = c.actual_bytes.saturating_add(*size);
        }
    }
    let keys: BTreeSet<&(String, String)> = truth.keys().chain(stored.keys()).collect();
    for key in keys {
        if truth.get(key) != stored.get(key) {
            entry(&mut checks, &key.0);
            if let Some(c) = checks.get_mut(&key.0) {
                c.wrong_counts += 1;
            }
        }
    }
    if fix {
        tx.execute("DELETE FROM namespace_blobs", &[]).await?;
        for ((ns, digest), (size, refs)) in &truth {
            tx.execute(
                "INSERT INTO namespace_blobs (namespace, digest, size, refs)
                 VALUES (?1, ?2, ?3, ?4)",
                &[ns.into(), digest.into(), int(*size)?, (*refs).into()],
            )
            .await?;
        }
        for c in checks.values().filter(|c| c.drift() != 0) {
            tx.execute(
                "INSERT INTO namespace_quotas (namespace, usage_bytes) VALUES (?1, ?2)
                 ON CONFLICT (namespace) DO UPDATE SET usage_bytes = excluded.usage_bytes",
                &[c.namespace.as_str().into(), int(c.actual_bytes)?],
            )
            .await?;
        }
    }
    Ok(checks.into_values().collect())
}
