//! The embedded metadata store: SQLite in WAL mode, one writer connection and a few readers.
//!
//! SQLite calls block, so each runs on tokio's blocking pool. WAL lets readers proceed while the
//! writer commits; `synchronous = FULL` makes every acknowledged commit survive power loss, not
//! only a process crash.
//!
//! Hot read queries look the repository up in a scalar subquery rather than a join: SQLite
//! re-prepares a statement on every execution when a join's constant propagation involves
//! a bound parameter, which cost more than the query itself (seen with
//! `sqlite3_stmt_status(REPREPARE)`).

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use oci::{Digest, RepositoryName, Tag};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::{
    MetadataError, MetadataStore, NewManifest, Page, Referrer, StoredManifest, UploadSession,
};

const READERS: usize = 4;

/// Each entry upgrades the schema by one version; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE repositories (
    id   INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE
);
CREATE TABLE blobs (
    digest TEXT PRIMARY KEY,
    size   INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE repository_blobs (
    repository_id INTEGER NOT NULL REFERENCES repositories(id),
    digest        TEXT NOT NULL REFERENCES blobs(digest),
    PRIMARY KEY (repository_id, digest)
) WITHOUT ROWID;
CREATE INDEX repository_blobs_digest ON repository_blobs(digest);
CREATE TABLE manifests (
    id            INTEGER PRIMARY KEY,
    repository_id INTEGER NOT NULL REFERENCES repositories(id),
    digest        TEXT NOT NULL,
    media_type    TEXT NOT NULL,
    content       BLOB NOT NULL,
    subject       TEXT,
    artifact_type TEXT,
    annotations   TEXT,
    created_at    INTEGER NOT NULL,
    UNIQUE (repository_id, digest)
);
-- Not a partial index: a partial one makes SQLite re-prepare every statement on manifests
-- whose WHERE binds a parameter (it re-checks the index condition per bound value).
CREATE INDEX manifests_subject ON manifests(repository_id, subject);
CREATE TABLE manifest_blobs (
    manifest_id INTEGER NOT NULL REFERENCES manifests(id) ON DELETE CASCADE,
    digest      TEXT NOT NULL,
    PRIMARY KEY (manifest_id, digest)
) WITHOUT ROWID;
CREATE INDEX manifest_blobs_digest ON manifest_blobs(digest);
CREATE TABLE manifest_children (
    manifest_id  INTEGER NOT NULL REFERENCES manifests(id) ON DELETE CASCADE,
    child_digest TEXT NOT NULL,
    PRIMARY KEY (manifest_id, child_digest)
) WITHOUT ROWID;
CREATE TABLE tags (
    repository_id INTEGER NOT NULL REFERENCES repositories(id),
    name          TEXT NOT NULL,
    manifest_id   INTEGER NOT NULL REFERENCES manifests(id) ON DELETE CASCADE,
    updated_at    INTEGER NOT NULL,
    PRIMARY KEY (repository_id, name)
) WITHOUT ROWID;
CREATE TABLE uploads (
    id         TEXT PRIMARY KEY,
    repository TEXT NOT NULL,
    updated_at INTEGER NOT NULL
) WITHOUT ROWID;
"#];

struct Pool {
    writer: Mutex<Connection>,
    readers: Vec<Mutex<Connection>>,
    next_reader: AtomicUsize,
}

pub struct SqliteMetadata {
    pool: Arc<Pool>,
}

fn unavailable(e: impl std::fmt::Display) -> MetadataError {
    MetadataError::Unavailable(e.to_string())
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    // 2 MiB of page cache per connection (negative = KiB): the hot set is tags and manifests.
    conn.pragma_update(None, "cache_size", -2048)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(())
}

fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Exclusive)?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)?;
    }
    tx.commit()
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn parse_digest(s: String) -> rusqlite::Result<Digest> {
    s.parse().map_err(|e: oci::DigestError| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn repository_id(conn: &Connection, repo: &RepositoryName) -> rusqlite::Result<Option<i64>> {
    conn.prepare_cached("SELECT id FROM repositories WHERE name = ?1")?
        .query_row([repo.as_str()], |r| r.get(0))
        .optional()
}

fn ensure_repository(conn: &Connection, repo: &RepositoryName) -> rusqlite::Result<i64> {
    conn.prepare_cached(
        "INSERT INTO repositories (name) VALUES (?1) ON CONFLICT (name) DO NOTHING",
    )?
    .execute([repo.as_str()])?;
    conn.prepare_cached("SELECT id FROM repositories WHERE name = ?1")?
        .query_row([repo.as_str()], |r| r.get(0))
}

fn stored_manifest(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredManifest> {
    Ok(StoredManifest {
        digest: parse_digest(r.get(0)?)?,
        media_type: r.get(1)?,
        bytes: r.get(2)?,
    })
}

impl SqliteMetadata {
    pub fn open(path: &Path) -> Result<SqliteMetadata, MetadataError> {
        let mut writer = Connection::open(path).map_err(unavailable)?;
        configure(&writer).map_err(unavailable)?;
        migrate(&mut writer).map_err(unavailable)?;
        let readers = (0..READERS)
            .map(|_| {
                let c = Connection::open(path)?;
                configure(&c)?;
                Ok(Mutex::new(c))
            })
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(unavailable)?;
        Ok(SqliteMetadata {
            pool: Arc::new(Pool {
                writer: Mutex::new(writer),
                readers,
                next_reader: AtomicUsize::new(0),
            }),
        })
    }

    /// Runs `f` on an idle reader right here, or hands `f` back if every reader is busy.
    fn try_read_inline<T, F: FnOnce(&Connection) -> rusqlite::Result<T>>(
        &self,
        start: usize,
        f: F,
    ) -> Result<rusqlite::Result<T>, F> {
        let readers = &self.pool.readers;
        match (0..readers.len()).find_map(|i| readers[(start + i) % readers.len()].try_lock().ok())
        {
            Some(conn) => Ok(f(&conn)),
            None => Err(f),
        }
    }

    /// Runs a read query. Point reads take microseconds from the page cache, so they run
    /// inline on the calling task when a reader connection is free: a hop to the blocking pool
    /// would cost more than the query. Only when every reader is busy does the query wait for
    /// one on the blocking pool.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, MetadataError> {
        let start = self.pool.next_reader.fetch_add(1, Ordering::Relaxed);
        let f = match self.try_read_inline(start, f) {
            Ok(result) => return result.map_err(unavailable),
            Err(f) => f,
        };
        let pool = self.pool.clone();
        tokio::task::spawn_blocking(move || {
            let conn = pool.readers[start % pool.readers.len()]
                .lock()
                .map_err(|_| rusqlite::Error::InvalidQuery)?;
            f(&conn)
        })
        .await
        .map_err(unavailable)?
        .map_err(unavailable)
    }

    /// Runs `f` in one IMMEDIATE transaction on the writer connection; `Err(Ok(e))` from `f`
    /// is a domain refusal that rolls back, `Err(Err(e))` a database failure.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T, MetadataError> + Send + 'static,
    ) -> Result<T, MetadataError> {
        let pool = self.pool.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = pool.writer.lock().map_err(unavailable)?;
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            let value = f(&tx)?;
            tx.commit().map_err(unavailable)?;
            Ok(value)
        })
        .await
        .map_err(unavailable)?
    }
}

#[async_trait]
impl MetadataStore for SqliteMetadata {
    async fn blob_in_repository(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
    ) -> Result<Option<u64>, MetadataError> {
        let (repo, digest) = (repo.to_string(), digest.to_string());
        self.read(move |c| {
            c.prepare_cached(
                "SELECT size FROM blobs WHERE digest = (
                   SELECT digest FROM repository_blobs
                   WHERE repository_id = (SELECT id FROM repositories WHERE name = ?1)
                   AND digest = ?2)",
            )?
            .query_row([repo, digest], |r| r.get::<_, i64>(0))
            .optional()
            .map(|s| s.map(|s| s as u64))
        })
        .await
    }

    async fn link_blob(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
        size: u64,
    ) -> Result<(), MetadataError> {
        let (repo, digest) = (repo.clone(), digest.to_string());
        self.write(move |tx| {
            let id = ensure_repository(tx, &repo).map_err(unavailable)?;
            tx.prepare_cached("INSERT INTO blobs (digest, size) VALUES (?1, ?2) ON CONFLICT DO NOTHING")
                .and_then(|mut s| s.execute(params![digest, size as i64]))
                .map_err(unavailable)?;
            tx.prepare_cached(
                "INSERT INTO repository_blobs (repository_id, digest) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
            )
            .and_then(|mut s| s.execute(params![id, digest]))
            .map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    async fn unlink_blob(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
    ) -> Result<bool, MetadataError> {
        let (repo, digest) = (repo.to_string(), digest.to_string());
        self.write(move |tx| {
            tx.prepare_cached(
                "DELETE FROM repository_blobs WHERE digest = ?2
                 AND repository_id = (SELECT id FROM repositories WHERE name = ?1)",
            )
            .and_then(|mut s| s.execute([repo, digest]))
            .map(|n| n > 0)
            .map_err(unavailable)
        })
        .await
    }

    async fn create_upload(&self, session: &UploadSession) -> Result<(), MetadataError> {
        let s = session.clone();
        self.write(move |tx| {
            tx.execute(
                "INSERT INTO uploads (id, repository, updated_at) VALUES (?1, ?2, ?3)",
                params![s.id, s.repository.as_str(), s.updated_at],
            )
            .map(|_| ())
            .map_err(unavailable)
        })
        .await
    }

    async fn get_upload(&self, id: &str) -> Result<Option<UploadSession>, MetadataError> {
        let id = id.to_string();
        self.read(move |c| {
            c.prepare_cached("SELECT id, repository, updated_at FROM uploads WHERE id = ?1")?
                .query_row([id], |r| {
                    let repo: String = r.get(1)?;
                    let repository = repo.parse().map_err(|e: oci::NameError| {
                        rusqlite::Error::FromSqlConversionFailure(
                            1,
                            rusqlite::types::Type::Text,
                            Box::new(e),
                        )
                    })?;
                    Ok(UploadSession {
                        id: r.get(0)?,
                        repository,
                        updated_at: r.get(2)?,
                    })
                })
                .optional()
        })
        .await
    }

    async fn touch_upload(&self, id: &str, now: i64) -> Result<(), MetadataError> {
        let id = id.to_string();
        self.write(move |tx| {
            tx.execute(
                "UPDATE uploads SET updated_at = ?2 WHERE id = ?1",
                params![id, now],
            )
            .map(|_| ())
            .map_err(unavailable)
        })
        .await
    }

    async fn delete_upload(&self, id: &str) -> Result<(), MetadataError> {
        let id = id.to_string();
        self.write(move |tx| {
            tx.execute("DELETE FROM uploads WHERE id = ?1", [id])
                .map(|_| ())
                .map_err(unavailable)
        })
        .await
    }

    async fn stale_uploads(&self, before: i64) -> Result<Vec<String>, MetadataError> {
        self.read(move |c| {
            c.prepare_cached("SELECT id FROM uploads WHERE updated_at < ?1")?
                .query_map([before], |r| r.get(0))?
                .collect()
        })
        .await
    }

    async fn put_manifest(
        &self,
        repo: &RepositoryName,
        manifest: &NewManifest,
        tag: Option<&Tag>,
    ) -> Result<(), MetadataError> {
        let (repo, m, tag) = (repo.clone(), manifest.clone(), tag.map(|t| t.to_string()));
        self.write(move |tx| {
            let repo_id = ensure_repository(tx, &repo).map_err(unavailable)?;
            {
                let mut has_blob = tx
                    .prepare_cached("SELECT 1 FROM repository_blobs WHERE repository_id = ?1 AND digest = ?2")
                    .map_err(unavailable)?;
                for blob in &m.blobs {
                    if !has_blob.exists(params![repo_id, blob.to_string()]).map_err(unavailable)? {
                        return Err(MetadataError::MissingBlob(blob.clone()));
                    }
                }
                let mut has_manifest = tx
                    .prepare_cached("SELECT 1 FROM manifests WHERE repository_id = ?1 AND digest = ?2")
                    .map_err(unavailable)?;
                for child in &m.children {
                    if !has_manifest.exists(params![repo_id, child.to_string()]).map_err(unavailable)? {
                        return Err(MetadataError::MissingManifest(child.clone()));
                    }
                }
            }
            let digest = m.digest.to_string();
            let existing: Option<i64> = tx
                .prepare_cached("SELECT id FROM manifests WHERE repository_id = ?1 AND digest = ?2")
                .and_then(|mut s| s.query_row(params![repo_id, digest], |r| r.get(0)).optional())
                .map_err(unavailable)?;
            let manifest_id = match existing {
                Some(id) => id,
                None => {
                    let annotations = m
                        .annotations
                        .as_ref()
                        .map(serde_json::to_string)
                        .transpose()
                        .map_err(unavailable)?;
                    tx.execute(
                        "INSERT INTO manifests (repository_id, digest, media_type, content, subject, artifact_type, annotations, created_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                        params![
                            repo_id,
                            digest,
                            m.media_type,
                            m.bytes,
                            m.subject.as_ref().map(|s| s.to_string()),
                            m.artifact_type,
                            annotations,
                            now_secs()
                        ],
                    )
                    .map_err(unavailable)?;
                    let id = tx.last_insert_rowid();
                    let mut add_blob = tx
                        .prepare_cached("INSERT OR IGNORE INTO manifest_blobs (manifest_id, digest) VALUES (?1, ?2)")
                        .map_err(unavailable)?;
                    for blob in &m.blobs {
                        add_blob.execute(params![id, blob.to_string()]).map_err(unavailable)?;
                    }
                    let mut add_child = tx
                        .prepare_cached("INSERT OR IGNORE INTO manifest_children (manifest_id, child_digest) VALUES (?1, ?2)")
                        .map_err(unavailable)?;
                    for child in &m.children {
                        add_child.execute(params![id, child.to_string()]).map_err(unavailable)?;
                    }
                    id
                }
            };
            if let Some(tag) = tag {
                tx.prepare_cached(
                    "INSERT INTO tags (repository_id, name, manifest_id, updated_at) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (repository_id, name) DO UPDATE SET manifest_id = excluded.manifest_id, updated_at = excluded.updated_at",
                )
                .and_then(|mut s| s.execute(params![repo_id, tag, manifest_id, now_secs()]))
                .map_err(unavailable)?;
            }
            Ok(())
        })
        .await
    }

    async fn manifest_by_digest(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
    ) -> Result<Option<StoredManifest>, MetadataError> {
        let (repo, digest) = (repo.to_string(), digest.to_string());
        self.read(move |c| {
            c.prepare_cached(
                "SELECT digest, media_type, content FROM manifests
                 WHERE repository_id = (SELECT id FROM repositories WHERE name = ?1)
                 AND digest = ?2",
            )?
            .query_row([repo, digest], stored_manifest)
            .optional()
        })
        .await
    }

    async fn manifest_by_tag(
        &self,
        repo: &RepositoryName,
        tag: &Tag,
    ) -> Result<Option<StoredManifest>, MetadataError> {
        let (repo, tag) = (repo.to_string(), tag.to_string());
        self.read(move |c| {
            c.prepare_cached(
                "SELECT digest, media_type, content FROM manifests WHERE id = (
                   SELECT manifest_id FROM tags
                   WHERE repository_id = (SELECT id FROM repositories WHERE name = ?1)
                   AND name = ?2)",
            )?
            .query_row([repo, tag], stored_manifest)
            .optional()
        })
        .await
    }

    async fn delete_manifest(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
    ) -> Result<bool, MetadataError> {
        let (repo, digest) = (repo.to_string(), digest.to_string());
        self.write(move |tx| {
            tx.execute(
                "DELETE FROM manifests WHERE digest = ?2
                 AND repository_id = (SELECT id FROM repositories WHERE name = ?1)",
                [repo, digest],
            )
            .map(|n| n > 0)
            .map_err(unavailable)
        })
        .await
    }

    async fn delete_tag(&self, repo: &RepositoryName, tag: &Tag) -> Result<bool, MetadataError> {
        let (repo, tag) = (repo.to_string(), tag.to_string());
        self.write(move |tx| {
            tx.execute(
                "DELETE FROM tags WHERE name = ?2
                 AND repository_id = (SELECT id FROM repositories WHERE name = ?1)",
                [repo, tag],
            )
            .map(|n| n > 0)
            .map_err(unavailable)
        })
        .await
    }

    async fn list_tags(
        &self,
        repo: &RepositoryName,
        page: Page<'_>,
    ) -> Result<Option<Vec<String>>, MetadataError> {
        let repo = repo.clone();
        let last = page.last.unwrap_or("").to_string();
        let limit = page.limit.map(|l| l as i64).unwrap_or(-1);
        self.read(move |c| {
            let Some(repo_id) = repository_id(c, &repo)? else {
                return Ok(None);
            };
            c.prepare_cached(
                "SELECT name FROM tags WHERE repository_id = ?1 AND name > ?2 ORDER BY name LIMIT ?3",
            )?
            .query_map(params![repo_id, last, limit], |r| r.get(0))?
            .collect::<rusqlite::Result<Vec<String>>>()
            .map(Some)
        })
        .await
    }

    async fn list_repositories(&self, page: Page<'_>) -> Result<Vec<String>, MetadataError> {
        let last = page.last.unwrap_or("").to_string();
        let limit = page.limit.map(|l| l as i64).unwrap_or(-1);
        self.read(move |c| {
            c.prepare_cached(
                "SELECT r.name FROM repositories r
                 WHERE r.name > ?1 AND EXISTS (SELECT 1 FROM manifests m WHERE m.repository_id = r.id)
                 ORDER BY r.name LIMIT ?2",
            )?
            .query_map(params![last, limit], |r| r.get(0))?
            .collect()
        })
        .await
    }

    async fn all_repositories(&self) -> Result<Vec<String>, MetadataError> {
        self.read(|c| {
            c.prepare_cached("SELECT name FROM repositories ORDER BY name")?
                .query_map([], |r| r.get(0))?
                .collect()
        })
        .await
    }

    async fn repository_blobs(
        &self,
        repo: &RepositoryName,
    ) -> Result<Vec<(Digest, u64)>, MetadataError> {
        let repo = repo.to_string();
        self.read(move |c| {
            c.prepare_cached(
                "SELECT b.digest, b.size FROM blobs b WHERE b.digest IN (
                   SELECT digest FROM repository_blobs
                   WHERE repository_id = (SELECT id FROM repositories WHERE name = ?1))",
            )?
            .query_map([repo], |r| {
                Ok((parse_digest(r.get(0)?)?, r.get::<_, i64>(1)? as u64))
            })?
            .collect()
        })
        .await
    }

    async fn repository_manifests(
        &self,
        repo: &RepositoryName,
    ) -> Result<Vec<StoredManifest>, MetadataError> {
        let repo = repo.to_string();
        self.read(move |c| {
            let mut rows = c
                .prepare_cached(
                    "SELECT digest, media_type, content, id FROM manifests
                     WHERE repository_id = (SELECT id FROM repositories WHERE name = ?1)",
                )?
                .query_map([repo], |r| Ok((r.get::<_, i64>(3)?, stored_manifest(r)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            rows.sort_by_key(|(id, _)| *id);
            Ok(rows.into_iter().map(|(_, m)| m).collect())
        })
        .await
    }

    async fn repository_tags(
        &self,
        repo: &RepositoryName,
    ) -> Result<Vec<(String, Digest)>, MetadataError> {
        let repo = repo.to_string();
        self.read(move |c| {
            let mut rows = c
                .prepare_cached(
                    "SELECT t.name, m.digest FROM tags t, manifests m
                     WHERE m.id = t.manifest_id
                     AND t.repository_id = (SELECT id FROM repositories WHERE name = ?1)",
                )?
                .query_map([repo], |r| {
                    Ok((r.get::<_, String>(0)?, parse_digest(r.get(1)?)?))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            rows.sort();
            Ok(rows)
        })
        .await
    }

    async fn referrers(
        &self,
        repo: &RepositoryName,
        subject: &Digest,
    ) -> Result<Vec<Referrer>, MetadataError> {
        let (repo, subject) = (repo.to_string(), subject.to_string());
        self.read(move |c| {
            c.prepare_cached(
                "SELECT digest, media_type, length(content), artifact_type, annotations, id
                 FROM manifests
                 WHERE repository_id = (SELECT id FROM repositories WHERE name = ?1)
                 AND subject = ?2",
            )?
            .query_map([repo, subject], |r| {
                let annotations: Option<String> = r.get(4)?;
                let referrer = Referrer {
                    digest: parse_digest(r.get(0)?)?,
                    media_type: r.get(1)?,
                    size: r.get::<_, i64>(2)? as u64,
                    artifact_type: r.get(3)?,
                    annotations: annotations.and_then(|a| serde_json::from_str(&a).ok()),
                };
                Ok((r.get::<_, i64>(5)?, referrer))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map(|mut rows| {
                // Oldest first. Sorted here: an ORDER BY in this statement makes SQLite
                // re-prepare it on every execution.
                rows.sort_by_key(|(id, _)| *id);
                rows.into_iter().map(|(_, r)| r).collect()
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::tests::metadata_suite;

    #[tokio::test(flavor = "multi_thread")]
    async fn passes_the_shared_suite() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store =
            SqliteMetadata::open(&dir.path().join("m.db")).unwrap_or_else(|e| panic!("{e}"));
        metadata_suite(&store).await;
    }

    #[test]
    fn migrations_are_idempotent() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("m.db");
        drop(SqliteMetadata::open(&path));
        assert!(SqliteMetadata::open(&path).is_ok());
    }
}
